//! Enrolling contacts in a workflow on request (the admin API's enrollments, `herald replay`)
//! rather than by a trigger. Each enrollment is stored as a `herald.enrollment` event and
//! dispatched like any event, so the enrollment rules (one live run, `re_entry`, loop protection)
//! are applied in the same place and transaction as for triggered runs. What is refused up front
//! is what the rules would refuse now, so the answer can name each refusal; the dispatcher still
//! has the last word.

use crate::dispatch::{LOOP_LIMIT, LOOP_WINDOW};
use crate::registry::Snapshot;
use herald_core::CourseEvent;
use herald_core::event::MAX_BATCH;
use herald_core::workflow::Audience;
use herald_store::{AudienceQuery, ContactId, NewEvent, Signals, Store, StoreError, Timestamp};

/// Who to enroll.
#[derive(Debug, Clone)]
pub enum Enrollees {
    Contacts(Vec<ContactId>),
    Audience(Audience),
}

/// Why a contact was not enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// herald has had no event of this contact.
    UnknownContact,
    /// The contact is in a live run of the workflow.
    InALiveRun,
    /// The contact ran the workflow before and it has `re_entry: false`.
    AlreadyEnrolled,
    /// Too many enrollments in this workflow within 30 minutes.
    LoopProtection,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EnrollmentReport {
    pub accepted: Vec<ContactId>,
    pub refused: Vec<(ContactId, Refusal)>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error("no workflow {0:?}: its file is workflows/{0}.yaml")]
    UnknownWorkflow(String),
    #[error("workflow {0:?} is disabled: enable it (enabled: true) and reload first")]
    Disabled(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Stores an enrollment event for every contact of `enrollees` the rules would enroll now in the
/// current version of `workflow_id`. `request` names the request: the same request (workflow,
/// request and contact) stored again enrolls no one twice.
pub async fn enroll(
    store: &Store,
    workflows: &Snapshot,
    workflow_id: &str,
    enrollees: Enrollees,
    request: &str,
    now: Timestamp,
) -> Result<EnrollmentReport, EnrollmentError> {
    let workflow = workflows
        .current
        .get(workflow_id)
        .ok_or_else(|| EnrollmentError::UnknownWorkflow(workflow_id.to_owned()))?;
    if !workflows.is_enabled(workflow_id) {
        return Err(EnrollmentError::Disabled(workflow_id.to_owned()));
    }
    let mut contacts = match enrollees {
        Enrollees::Contacts(ids) => ids,
        Enrollees::Audience(audience) => store.audience(audience_query(&audience, now)).await?,
    };
    contacts.sort();
    contacts.dedup();
    let known: std::collections::HashMap<ContactId, herald_store::EnrollmentCounts> = store
        .enrollment_counts(workflow_id.into(), contacts.clone(), now - LOOP_WINDOW)
        .await?
        .into_iter()
        .collect();
    let mut report = EnrollmentReport::default();
    for contact in contacts {
        let refusal = match known.get(&contact) {
            None => Some(Refusal::UnknownContact),
            Some(c) if c.live => Some(Refusal::InALiveRun),
            Some(c) if !workflow.re_entry && c.total > 0 => Some(Refusal::AlreadyEnrolled),
            Some(c) if c.recent >= LOOP_LIMIT => Some(Refusal::LoopProtection),
            Some(_) => None,
        };
        match refusal {
            Some(reason) => report.refused.push((contact, reason)),
            None => report.accepted.push(contact),
        }
    }
    let at = now.to_datetime();
    let events: Vec<NewEvent> = report
        .accepted
        .iter()
        .map(|contact| NewEvent {
            event: CourseEvent::enrollment(
                CourseEvent::enrollment_id("enrollment", &[workflow_id, request, contact]),
                workflow_id,
                contact,
                "api",
                at,
            ),
            received: now,
        })
        .collect();
    store_enrollments(store, events).await?;
    Ok(report)
}

/// The store's query for an audience at `now` (who is inactive is measured from then).
pub fn audience_query(audience: &Audience, now: Timestamp) -> AudienceQuery {
    AudienceQuery {
        offers: audience.offers.clone(),
        products: audience.products.clone(),
        inactive_before: audience.inactive_for.map(|d| now - d.to_std()),
    }
}

/// Stores enrollment events in batches and tells every process there are events to dispatch.
pub async fn store_enrollments(store: &Store, events: Vec<NewEvent>) -> Result<(), StoreError> {
    for chunk in events.chunks(MAX_BATCH) {
        store.accept_events(chunk.to_vec()).await?;
    }
    if !events.is_empty() {
        store.announce(Signals::EVENTS);
    }
    Ok(())
}
