//! The scheduler: fires the ticks of workflows a schedule starts. A tick becomes one
//! `herald.enrollment` event per contact in the audience, stored like any event, so the
//! dispatcher applies the enrollment rules. Each event's id is made from the workflow, the tick's
//! wall-clock time and the contact: a tick enrolls a contact once however many processes fire it,
//! however often it is fired again after a crash, and when the clocks go back over it.
//!
//! The last tick handled is kept per workflow and expression (in the database, shared by every
//! process). A schedule seen for the first time starts at its next tick; after downtime only the
//! latest missed tick fires; a disabled workflow's ticks pass without firing.

use super::{Pass, Shared};
use herald_core::CourseEvent;
use herald_core::workflow::{Schedule, Tick};
use herald_store::{NewEvent, StoreError};
use std::collections::HashMap;

/// The last tick handled, by schedule key, as this process knows it.
#[derive(Debug, Default)]
pub(crate) struct ScheduleMemory(std::sync::Mutex<HashMap<String, i64>>);

impl ScheduleMemory {
    fn handled(&self, key: &str) -> Option<i64> {
        self.lock().get(key).copied()
    }

    fn remember(&self, key: String, tick_ms: i64) {
        self.lock().insert(key, tick_ms);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Shared {
    pub(crate) async fn schedule_once(&self) -> Result<Pass, StoreError> {
        let snapshot = self.registry.snapshot();
        let now = self.clock.now_utc();
        let mut fired = false;
        for wf in snapshot.current.values() {
            let Some(schedule) = wf.schedule() else {
                continue;
            };
            let Some(tick) = schedule.latest_tick(now, self.config.default_timezone) else {
                continue;
            };
            let tick_ms = tick.at.timestamp_millis();
            // A changed expression or zone is a new schedule: it starts at its next tick.
            let key = format!(
                "schedule:{}:{}@{}",
                wf.id,
                schedule.expression,
                schedule.zone(self.config.default_timezone)
            );
            if self.schedules.handled(&key) >= Some(tick_ms) {
                continue;
            }
            let stored: Option<i64> = self
                .store
                .site_value(key.clone(), String::new())
                .await?
                .parse()
                .ok();
            match stored {
                Some(done) if done >= tick_ms => {
                    self.schedules.remember(key, done);
                    continue;
                }
                Some(_) if snapshot.is_enabled(&wf.id) => {
                    self.fire(&wf.id, schedule, &tick).await?;
                    fired = true;
                }
                // Seen for the first time, or disabled: the tick passes.
                _ => {}
            }
            self.store
                .set_site_value(key.clone(), tick_ms.to_string())
                .await?;
            self.schedules.remember(key, tick_ms);
        }
        Ok(if fired { Pass::Worked } else { Pass::Idle })
    }

    async fn fire(
        &self,
        workflow_id: &str,
        schedule: &Schedule,
        tick: &Tick,
    ) -> Result<(), StoreError> {
        let now = self.clock.now();
        let audience = &schedule.audience;
        let contacts = self
            .store
            .audience(crate::enrollment::audience_query(audience, now))
            .await?;
        let events: Vec<NewEvent> = contacts
            .iter()
            .map(|contact| NewEvent {
                event: CourseEvent::enrollment(
                    CourseEvent::enrollment_id("schedule", &[workflow_id, &tick.local, contact]),
                    workflow_id,
                    contact,
                    "schedule",
                    tick.at,
                ),
                received: now,
            })
            .collect();
        let stored = !events.is_empty();
        crate::enrollment::store_enrollments(&self.store, events).await?;
        tracing::info!(workflow = %workflow_id, tick = %tick.local, contacts = contacts.len(), "schedule tick fired");
        if stored {
            self.wakers.events_stored();
        }
        Ok(())
    }
}
