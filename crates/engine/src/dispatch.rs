//! The dispatcher's planner: for a batch of newly stored events, decide which runs end
//! (`exit_when`), which event waits are over, and who is enrolled where (the enrollment rules the
//! README states), and run each new run's first steps. Pure: the store calls it inside the transaction
//! that applies its plan.

use crate::registry::Snapshot;
use crate::runner::{self, RunContext};
use herald_core::workflow::ContactState;
use herald_store::{
    ContactId, DispatchInput, DispatchPlan, EnrollmentCounts, LiveRun, RunExit, RunId, RunResume,
    RunState, RunWrite, StepRecord, Timestamp, WorkflowId,
};
use std::collections::HashMap;
use std::time::Duration;

/// Enrollments of one contact in one workflow within [`LOOP_WINDOW`] beyond which further
/// enrollments are refused (loop protection).
pub const LOOP_LIMIT: i64 = 50;
pub const LOOP_WINDOW: Duration = Duration::from_secs(30 * 60);

pub struct Planner<'a> {
    pub workflows: &'a Snapshot,
    pub now: Timestamp,
    pub default_timezone: chrono_tz::Tz,
    pub message_host: &'a str,
    /// Postpone a batch with a live run whose pinned version is not loaded (see
    /// [`DispatchPlan::postponed`]), rather than plan it without that run's `exit_when` and waits.
    pub wait_for_versions: bool,
}

impl Planner<'_> {
    pub fn plan(&self, input: &DispatchInput) -> DispatchPlan {
        let mut plan = DispatchPlan::default();
        // Runs and counts as they stand after the events planned so far in this batch.
        let mut live: Vec<LiveRun> = input.live_runs.clone();
        let mut counts: HashMap<(ContactId, WorkflowId), EnrollmentCounts> = input.counts.clone();
        let now = self.now.to_datetime();
        // A live run's `exit_when` and event waits are in its pinned version: without it, the
        // run would miss this batch's events.
        if self.wait_for_versions
            && input.live_runs.iter().any(|r| {
                self.workflows
                    .version(&r.workflow_id, &r.workflow_version)
                    .is_none()
            })
        {
            plan.postponed = true;
            return plan;
        }
        // A reload since the dispatcher decided whether to load the contacts' state may have
        // brought a workflow whose conditions read it: plan again, with the state.
        if self.wait_for_versions && input.states.is_none() && self.workflows.reads_contact_state()
        {
            plan.postponed = true;
            return plan;
        }

        let no_state = ContactState::default();
        for (seq, event) in &input.events {
            // Trigger filters, conditions and recipients see the contact's latest details.
            let event = &match input.contacts.get(event.contact_id()) {
                Some(row) => runner::with_latest_contact(event, row),
                None => event.clone(),
            };
            let contact = event.contact_id();
            let state = input
                .states
                .as_ref()
                .and_then(|states| states.get(contact))
                .unwrap_or(&no_state);
            let trigger = event.event_type.trigger_name();

            live.retain(|run| {
                if run.contact_id != contact {
                    return true;
                }
                let exits = self
                    .workflows
                    .version(&run.workflow_id, &run.workflow_version)
                    .is_some_and(|wf| wf.exits_on(event, state));
                if exits {
                    plan.exits.push(RunExit {
                        run_id: run.run_id.clone(),
                        reason: format!("exit_when: {trigger}"),
                    });
                    if let Some(c) =
                        counts.get_mut(&(ContactId::from(contact), run.workflow_id.clone()))
                    {
                        c.live = false;
                    }
                    return false;
                }
                if run.state == RunState::WaitingEvent && run.wait_event.as_deref() == Some(trigger)
                {
                    plan.resumes.push(RunResume {
                        run_id: run.run_id.clone(),
                        event_seq: *seq,
                    });
                }
                true
            });
            for run in live
                .iter_mut()
                .filter(|r| plan.resumes.iter().any(|resume| resume.run_id == r.run_id))
            {
                run.state = RunState::Active;
                run.wait_event = None;
            }

            // An enrollment event names its workflow; a course event starts every workflow
            // whose trigger it matches.
            let targets: Vec<_> = match event.enrolls_in() {
                Some(id) => self.workflows.current.get(id).into_iter().collect(),
                None => self
                    .workflows
                    .current
                    .values()
                    .filter(|wf| wf.trigger_matches(event, state))
                    .collect(),
            };
            for wf in targets
                .into_iter()
                .filter(|wf| self.workflows.is_enabled(&wf.id))
            {
                let key = (ContactId::from(contact), WorkflowId::from(wf.id.as_str()));
                let c = counts.entry(key).or_default();
                if c.live || (!wf.re_entry && c.total > 0) {
                    continue;
                }
                let run_id = RunId::fresh();
                let mut write = RunWrite {
                    run_id: run_id.clone(),
                    workflow_id: wf.id.as_str().into(),
                    workflow_version: wf.version.clone(),
                    contact_id: ContactId::from(contact),
                    event_seq: *seq,
                    state: RunState::Refused,
                    reason: Some("loop_protection".into()),
                    pc: 0,
                    wait_event: None,
                    due: None,
                    steps: vec![StepRecord {
                        step_id: "enroll".into(),
                        kind: "enroll".into(),
                        outcome: format!(
                            "refused: more than {LOOP_LIMIT} enrollments within 30 minutes"
                        ),
                        at_ms: self.now,
                    }],
                    messages: Vec::new(),
                };
                if c.recent >= LOOP_LIMIT {
                    tracing::warn!(workflow = %wf.id, contact = %contact, "enrollment refused by loop protection");
                    plan.new_runs.push(write);
                    continue;
                }
                let ctx = RunContext {
                    event,
                    state,
                    now,
                    default_timezone: self.default_timezone,
                    message_host: self.message_host,
                };
                let advanced = runner::advance(wf, 0, &ctx);
                write.state = advanced.state;
                write.reason = None;
                write.pc = advanced.pc as i64;
                write.wait_event = advanced.wait_event.clone();
                write.due = advanced.due;
                write.steps = advanced.steps;
                write.messages = advanced.messages;
                c.total += 1;
                c.recent += 1;
                c.live = write.state.is_live();
                if c.live {
                    live.push(LiveRun {
                        run_id,
                        workflow_id: wf.id.as_str().into(),
                        workflow_version: wf.version.clone(),
                        contact_id: ContactId::from(contact),
                        state: write.state,
                        wait_event: write.wait_event.clone(),
                    });
                }
                plan.new_runs.push(write);
            }
        }
        plan
    }
}
