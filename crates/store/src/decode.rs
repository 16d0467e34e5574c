//! Turning stored text back into domain values, and outcomes into columns: shared by both
//! backends, so a state or status is spelled in one place.

use crate::{ContactId, DeliveryResult, LinkKind, MessageStatus, Result, StoreError, Timestamp};
use herald_core::CourseEvent;
use herald_core::workflow::ContactState;
use std::collections::HashMap;

pub(crate) fn parse_stored_event(body: &str) -> Result<CourseEvent> {
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    herald_core::event::parse_stored_event(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Folds the rows of a backend's contact-state query, `(contact_id, fact, id)`, into one state
/// per contact: fact `offer` or `product` for what the contact holds, a completion trigger
/// (`lesson_completed`, ...) for what it completed. Every contact asked for gets a state, empty
/// when nothing is known.
pub(crate) fn contact_states(
    contact_ids: &[ContactId],
    rows: impl IntoIterator<Item = (String, String, Option<String>)>,
) -> HashMap<ContactId, ContactState> {
    let mut states: HashMap<ContactId, ContactState> = contact_ids
        .iter()
        .map(|id| (id.clone(), ContactState::default()))
        .collect();
    for (contact_id, fact, id) in rows {
        let (Some(state), Some(id)) = (states.get_mut(contact_id.as_str()), id) else {
            continue;
        };
        match fact.as_str() {
            "offer" => {
                state.offers.insert(id);
            }
            "product" => {
                state.products.insert(id);
            }
            completion => state.add_completion(completion, id),
        }
    }
    states
}

/// A stored run state, message status or channel.
pub(crate) fn stored<T: TryFrom<String, Error = herald_core::status::UnknownName>>(
    name: String,
) -> Result<T> {
    T::try_from(name).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// How a link kind column becomes the enum (`#[sqlx(try_from = "String")]`).
impl TryFrom<String> for LinkKind {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self> {
        LinkKind::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("unknown link kind {s:?}")))
    }
}

/// The columns a delivery outcome writes.
pub(crate) struct OutcomeColumns<'a> {
    pub status: MessageStatus,
    pub reason: Option<&'a str>,
    /// When to try again (a retry).
    pub due: Option<Timestamp>,
    pub provider_id: Option<&'a str>,
    pub sent: Option<Timestamp>,
    /// Suppressed, skipped and cancelled messages were never tried: no attempt is counted.
    pub attempted: bool,
}

fn not_tried(status: MessageStatus, reason: &str) -> OutcomeColumns<'_> {
    OutcomeColumns {
        status,
        reason: Some(reason),
        due: None,
        provider_id: None,
        sent: None,
        attempted: false,
    }
}

pub(crate) fn outcome_columns(result: &DeliveryResult, now: Timestamp) -> OutcomeColumns<'_> {
    match result {
        DeliveryResult::Sent { provider_id } => OutcomeColumns {
            status: MessageStatus::Sent,
            reason: None,
            due: None,
            provider_id: provider_id.as_deref(),
            sent: Some(now),
            attempted: true,
        },
        DeliveryResult::Retry { due, reason } => OutcomeColumns {
            status: MessageStatus::Queued,
            reason: Some(reason),
            due: Some(*due),
            provider_id: None,
            sent: None,
            attempted: true,
        },
        DeliveryResult::Failed { reason } => OutcomeColumns {
            attempted: true,
            ..not_tried(MessageStatus::Failed, reason)
        },
        DeliveryResult::Skipped { reason } => not_tried(MessageStatus::Skipped, reason),
        DeliveryResult::Suppressed { reason } => not_tried(MessageStatus::Suppressed, reason),
        DeliveryResult::Cancelled { reason } => not_tried(MessageStatus::Cancelled, reason),
        DeliveryResult::Bounced { reason } => OutcomeColumns {
            attempted: true,
            ..not_tried(MessageStatus::Suppressed, reason)
        },
    }
}
