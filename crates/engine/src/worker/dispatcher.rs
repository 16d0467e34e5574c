//! The dispatcher: stored events become membership state, exits, resumed waits and new runs
//! (each new run's first steps run at once), in one transaction per batch.
//!
//! A batch the database rejects, or whose planning panics, is retried one event at a time; the
//! event at the head that keeps failing is set aside (dead, with its error) so the events behind
//! it are dispatched.

use super::{Pass, SET_ASIDE_AFTER, Shared, panic_message};
use crate::config::Stage;
use crate::{dispatch, telemetry};
use futures::FutureExt;
use herald_store::{DispatchInput, DispatchRequest, RunState, Signals, StoreError};
use std::panic::AssertUnwindSafe;
use std::time::Duration;

/// Whether the dispatcher is narrowing a failing batch down to its first event.
#[derive(Debug, Default)]
pub(crate) struct DispatchQuarantine {
    /// Dispatching one event at a time, for as many events as the failed batch held, so the one
    /// at fault is reached wherever it stood in the batch.
    one_at_a_time: bool,
    singles_left: i64,
    /// Failures of the head event in a row.
    failures: u32,
}

/// Pause between tries of a failing head event.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

impl Shared {
    pub(crate) async fn dispatch_once(&self) -> Result<Pass, StoreError> {
        let one_at_a_time = self.quarantine().one_at_a_time;
        let limit = if one_at_a_time {
            1
        } else {
            self.config.batch_size
        };
        let error = match AssertUnwindSafe(self.dispatch_loading_versions(limit))
            .catch_unwind()
            .await
        {
            Ok(Ok(n)) => {
                let mut q = self.quarantine();
                q.failures = 0;
                q.singles_left -= 1;
                if n == 0 || q.singles_left <= 0 {
                    *q = DispatchQuarantine::default();
                }
                return Ok(if n > 0 { Pass::Worked } else { Pass::Idle });
            }
            Ok(Err(e)) if !e.is_rejection() => return Err(e),
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!("dispatch panicked: {}", panic_message(&*panic)),
        };
        let failures = {
            let mut q = self.quarantine();
            if !q.one_at_a_time {
                q.one_at_a_time = true;
                q.singles_left = self.config.batch_size;
                q.failures = 0;
            } else {
                q.failures += 1;
            }
            q.failures
        };
        if failures == 0 {
            tracing::warn!(error = %error, "dispatch of a batch failed; dispatching one event at a time");
        } else if failures >= SET_ASIDE_AFTER {
            let now = self.clock.now();
            if let Some((source, id)) = self.store.set_aside_next_event(error.clone(), now).await? {
                tracing::error!(event_source = %source, event_id = %id, error = %error,
                    "event set aside: its dispatch failed {failures} times in a row");
                telemetry::set_aside("events");
            }
            self.quarantine().failures = 0;
        } else {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        Ok(Pass::Worked)
    }

    fn quarantine(&self) -> std::sync::MutexGuard<'_, DispatchQuarantine> {
        self.dispatch_quarantine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One batch; if a live run of it is pinned to a version this process lacks, the version is
    /// loaded from the database and the batch planned again (then without a version that could
    /// not be loaded, so one bad stored version cannot hold up dispatch).
    async fn dispatch_loading_versions(&self, limit: i64) -> Result<usize, StoreError> {
        match self.dispatch_batch(limit, true).await? {
            Batch::Dispatched(n) => Ok(n),
            Batch::Missing(versions) => {
                self.load_pinned_versions(versions.iter().map(|(w, v)| (w.as_str(), v.as_str())))
                    .await?;
                match self.dispatch_batch(limit, false).await? {
                    Batch::Dispatched(n) => Ok(n),
                    Batch::Missing(_) => unreachable!("planned without waiting for versions"),
                }
            }
        }
    }

    async fn dispatch_batch(
        &self,
        limit: i64,
        wait_for_versions: bool,
    ) -> Result<Batch, StoreError> {
        let host = self.config.public_host();
        // What the planner decided, recorded as metrics only once its transaction committed.
        let started = std::sync::Mutex::new(Vec::new());
        // When planning was postponed: the versions live runs are pinned to that this process
        // lacked (none when the contacts' state was what the planner lacked).
        let missing = std::sync::Mutex::new(None::<Vec<(String, String)>>);
        let plan = |input: &DispatchInput| {
            for (_, event) in &input.events {
                self.config.fault_point(Stage::Dispatch, event.contact_id());
            }
            // The workflows as they stand now that the events are selected: a reload that
            // finished before an event was accepted must apply to it.
            let snapshot = self.registry.snapshot();
            let plan = dispatch::Planner {
                workflows: &snapshot,
                // The clock read once the events were selected: an event stored while this pass
                // waited for the database is planned at its own time, not before it (its waits
                // would otherwise end early, and loop protection would count from too early).
                now: input.now,
                default_timezone: self.config.default_timezone,
                message_host: &host,
                wait_for_versions,
            }
            .plan(input);
            *missing.lock().unwrap_or_else(|p| p.into_inner()) = plan.postponed.then(|| {
                input
                    .live_runs
                    .iter()
                    .filter(|r| {
                        snapshot
                            .version(&r.workflow_id, &r.workflow_version)
                            .is_none()
                    })
                    .map(|r| (r.workflow_id.to_string(), r.workflow_version.clone()))
                    .collect()
            });
            let mut started = started.lock().unwrap_or_else(|p| p.into_inner());
            started.clear();
            started.extend(plan.new_runs.iter().map(|r| {
                (
                    r.workflow_id.clone(),
                    r.state,
                    super::stepper::message_labels(&r.messages),
                )
            }));
            plan
        };
        let n = self
            .store
            .dispatch(DispatchRequest {
                limit,
                clock: &|| self.clock.now(),
                loop_window: dispatch::LOOP_WINDOW,
                contact_states: self.registry.snapshot().reads_contact_state(),
                planner: &plan,
            })
            .await?;
        if let Some(missing) = missing.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Ok(Batch::Missing(missing));
        }
        for (workflow, state, messages) in started.into_inner().unwrap_or_else(|p| p.into_inner()) {
            if state != RunState::Refused {
                telemetry::run_started(&workflow);
            }
            telemetry::run_finished(&workflow, state);
            super::stepper::record_messages(&messages);
        }
        if n > 0 {
            // New messages to send, and runs whose awaited event just came.
            self.wakers.delivery.notify_one();
            self.wakers.steps.notify_one();
            self.store.announce(Signals::RUNS | Signals::MESSAGES);
        }
        Ok(Batch::Dispatched(n))
    }
}

enum Batch {
    Dispatched(usize),
    /// Nothing was written: these versions, pinned by live runs of the batch, are not loaded (or
    /// none, when the planner needed the contacts' state that was not loaded).
    Missing(Vec<(String, String)>),
}
