//! The stepper: claims runs whose wait is over, under a lease, advances each until its next wait
//! or its end, and writes the results while the lease holds. A run whose advance panics is ended
//! as dead with the panic; a write the database keeps rejecting sets that run aside the same way.

use super::{Pass, Shared, panic_message, write_isolating};
use crate::config::Stage;
use crate::{runner, telemetry};
use herald_core::workflow::ContactState;
use herald_store::{
    ClaimedRun, ContactId, NewMessage, RunAdvance, RunState, RunWrite, Signals, StepRecord,
    StoreError, Timestamp,
};
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;

impl Shared {
    pub(crate) async fn step_once(&self) -> Result<Pass, StoreError> {
        let now = self.clock.now();
        let claimed = self
            .store
            .claim_runs(now, self.config.batch_size, self.config.lease)
            .await?;
        if claimed.is_empty() {
            return Ok(Pass::Idle);
        }
        self.load_pinned_versions(
            claimed
                .iter()
                .map(|r| (r.workflow_id.as_str(), r.workflow_version.as_str())),
        )
        .await?;
        let states = self.contact_states(&claimed).await?;
        let no_state = ContactState::default();
        let host = self.config.public_host();
        let mut advances = Vec::with_capacity(claimed.len());
        for run in &claimed {
            let state = states.get(&run.contact_id).unwrap_or(&no_state);
            let _span = tracing::info_span!("step", run = %run.run_id, workflow = %run.workflow_id, pc = run.pc).entered();
            let write = std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.config.fault_point(Stage::Step, &run.contact_id);
                self.advance(run, state, now, &host)
            }))
            .unwrap_or_else(|panic| {
                let reason = format!("advancing the run panicked: {}", panic_message(&*panic));
                tracing::error!(run = %run.run_id, error = %reason, "run set aside");
                telemetry::set_aside("runs");
                RunWrite {
                    state: RunState::Dead,
                    reason: Some(reason),
                    due: None,
                    ..blank_write(run)
                }
            });
            advances.push(RunAdvance {
                lease_token: run.lease_token.clone(),
                write,
            });
        }
        let finished: Vec<_> = advances
            .iter()
            .map(|a| {
                (
                    a.write.workflow_id.clone(),
                    a.write.state,
                    message_labels(&a.write.messages),
                )
            })
            .collect();
        write_isolating(
            advances,
            |batch| self.store.finish_runs(now, batch),
            |advance, error| async move {
                tracing::error!(run = %advance.write.run_id, error = %error, "run set aside: the database keeps rejecting its step");
                telemetry::set_aside("runs");
                self.store
                    .end_run(advance.write.run_id, RunState::Dead, error, now)
                    .await
                    .map(drop)
            },
        )
        .await?;
        let mut queued = false;
        for (workflow, state, messages) in finished {
            telemetry::run_finished(&workflow, state);
            record_messages(&messages);
            queued |= !messages.is_empty();
        }
        self.wakers.delivery.notify_one();
        if queued {
            self.store.announce(Signals::MESSAGES);
        }
        Ok(Pass::Worked)
    }

    /// The state of the contacts of those claimed runs whose workflow's conditions read it (one
    /// query for the batch; none when no such run was claimed).
    async fn contact_states(
        &self,
        claimed: &[ClaimedRun],
    ) -> Result<HashMap<ContactId, ContactState>, StoreError> {
        let snapshot = self.registry.snapshot();
        let contacts: Vec<ContactId> = claimed
            .iter()
            .filter(|r| {
                snapshot
                    .version(&r.workflow_id, &r.workflow_version)
                    .is_some_and(|wf| wf.reads_contact_state)
            })
            .map(|r| r.contact_id.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if contacts.is_empty() {
            return Ok(HashMap::new());
        }
        self.store.contact_states(contacts).await
    }

    /// The new state of one claimed run.
    fn advance(
        &self,
        run: &ClaimedRun,
        state: &ContactState,
        now: Timestamp,
        host: &str,
    ) -> RunWrite {
        let snapshot = self.registry.snapshot();
        let mut write = blank_write(run);
        match snapshot.version(&run.workflow_id, &run.workflow_version) {
            None => {
                write.state = RunState::Failed;
                write.reason = Some(format!(
                    "workflow version {} is not loaded",
                    run.workflow_version
                ));
            }
            Some(_) if !snapshot.is_enabled(&run.workflow_id) => {
                // Disabled after the claim query ran: park it where it stands.
                write.state = RunState::Parked;
                write.due = Some(now);
            }
            Some(wf) => {
                // A run claimed while still waiting for an event has reached its timeout.
                let received = run
                    .awaited
                    .as_ref()
                    .filter(|_| run.state != RunState::WaitingEvent);
                let event = runner::with_wait_outcome(
                    wf,
                    runner::with_latest_contact(&run.event, &run.contact),
                    received,
                );
                let ctx = runner::RunContext {
                    event: &event,
                    state,
                    now: now.to_datetime(),
                    default_timezone: self.config.default_timezone,
                    message_host: host,
                };
                let mut advanced = runner::advance(wf, run.pc as usize, &ctx);
                if run.state == RunState::WaitingEvent {
                    let timed_out = StepRecord {
                        step_id: "wait".into(),
                        kind: "wait".into(),
                        outcome: "timed out".into(),
                        at_ms: now,
                    };
                    advanced.steps.insert(0, timed_out);
                }
                write.state = advanced.state;
                write.pc = advanced.pc as i64;
                write.wait_event = advanced.wait_event;
                write.due = advanced.due;
                write.steps = advanced.steps;
                write.messages = advanced.messages;
            }
        }
        write
    }
}

/// A claimed run's write before advancing: where it stands, nothing done.
fn blank_write(run: &ClaimedRun) -> RunWrite {
    RunWrite {
        run_id: run.run_id.clone(),
        workflow_id: run.workflow_id.clone(),
        workflow_version: run.workflow_version.clone(),
        contact_id: run.contact_id.clone(),
        event_seq: run.event_seq,
        state: run.state,
        reason: None,
        pc: run.pc,
        wait_event: None,
        due: None,
        steps: Vec::new(),
        messages: Vec::new(),
    }
}

/// Channel and status of newly created messages, for metrics.
pub(crate) fn message_labels(messages: &[NewMessage]) -> Vec<(&'static str, &'static str)> {
    messages
        .iter()
        .map(|m| (m.channel.as_str(), m.status.as_str()))
        .collect()
}

pub(crate) fn record_messages(labels: &[(&'static str, &'static str)]) {
    for (channel, status) in labels {
        telemetry::message(channel, status);
    }
}
