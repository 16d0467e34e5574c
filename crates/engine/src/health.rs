//! Whether the engine's loops are alive and keeping up, for `/healthz`. Each loop records when it
//! last made progress (finished a pass over due work, or found none); a loop that is dead, or
//! has made no progress for longer than the stall limit while its queue holds work due for that
//! long, is reported by name.

use herald_store::{QueueStats, Timestamp};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The engine's loops, by name.
pub const LOOP_NAMES: [&str; 4] = ["dispatcher", "stepper", "deliverer", "scheduler"];

/// What `/healthz` says of one loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoopStatus {
    Ok,
    /// No progress for longer than the stall limit while work was due.
    Stalled,
    /// The loop's task has ended.
    Dead,
}

/// One loop's liveness.
pub struct LoopHealth {
    name: &'static str,
    /// Milliseconds since `Loops::started` at the last progress.
    last_progress: AtomicU64,
    alive: AtomicBool,
    paused: AtomicBool,
    resumed: Notify,
}

impl LoopHealth {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            last_progress: AtomicU64::new(0),
            alive: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            resumed: Notify::new(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Marks the loop alive until the returned guard drops (the task ends, also by a panic).
    pub(crate) fn alive_while(&self) -> AliveGuard<'_> {
        self.alive.store(true, Ordering::SeqCst);
        AliveGuard(self)
    }

    /// Returns once the loop is not paused.
    pub(crate) async fn unpaused(&self) {
        loop {
            let resumed = self.resumed.notified();
            if !self.paused.load(Ordering::SeqCst) {
                return;
            }
            resumed.await;
        }
    }
}

pub(crate) struct AliveGuard<'a>(&'a LoopHealth);

impl Drop for AliveGuard<'_> {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

/// The health of every loop of one engine.
pub struct Loops {
    started: Instant,
    loops: [LoopHealth; 4],
}

impl Default for Loops {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            loops: LOOP_NAMES.map(LoopHealth::new),
        }
    }
}

impl Loops {
    pub fn get(&self, name: &str) -> Option<&LoopHealth> {
        self.loops.iter().find(|l| l.name == name)
    }

    pub(crate) fn progress(&self, name: &str) {
        if let Some(l) = self.get(name) {
            let at = self.started.elapsed().as_millis() as u64;
            l.last_progress.fetch_max(at, Ordering::SeqCst);
        }
    }

    /// Holds a loop where it stands (it finishes the pass in hand first); its work waits and,
    /// once due for longer than the stall limit, health reports it. For maintenance and tests.
    pub fn pause(&self, name: &str) -> bool {
        self.get(name)
            .map(|l| l.paused.store(true, Ordering::SeqCst))
            .is_some()
    }

    pub fn resume(&self, name: &str) -> bool {
        self.get(name)
            .map(|l| {
                l.paused.store(false, Ordering::SeqCst);
                l.resumed.notify_waiters();
            })
            .is_some()
    }

    /// Each loop's status, given the queues at `now` (the engine's clock).
    pub fn report(
        &self,
        stall_limit: Duration,
        queues: &QueueStats,
        now: Timestamp,
    ) -> Vec<(&'static str, LoopStatus)> {
        let elapsed = self.started.elapsed().as_millis() as u64;
        self.loops
            .iter()
            .map(|l| {
                let oldest_due = match l.name {
                    "dispatcher" => queues.oldest_event_ms,
                    "stepper" => queues.oldest_run_due_ms,
                    "deliverer" => queues.oldest_message_due_ms,
                    // The scheduler checks its clock every pass: it always has work due.
                    _ => Some(Timestamp::from_millis(i64::MIN)),
                };
                let due_for = oldest_due.map_or(Duration::ZERO, |at| now.since(at));
                let idle_for = Duration::from_millis(
                    elapsed.saturating_sub(l.last_progress.load(Ordering::SeqCst)),
                );
                let status = if !l.alive.load(Ordering::SeqCst) {
                    LoopStatus::Dead
                } else if idle_for > stall_limit && due_for > stall_limit {
                    LoopStatus::Stalled
                } else {
                    LoopStatus::Ok
                };
                (l.name, status)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queues(oldest_message_due_ms: Option<i64>) -> QueueStats {
        let oldest_message_due_ms = oldest_message_due_ms.map(Timestamp::from_millis);
        QueueStats {
            undispatched_events: 0,
            due_runs: 0,
            due_messages: i64::from(oldest_message_due_ms.is_some()),
            oldest_event_ms: None,
            oldest_run_due_ms: None,
            oldest_message_due_ms,
        }
    }

    #[test]
    fn a_loop_is_stalled_only_while_its_work_waits_past_the_limit() {
        let loops = Loops::default();
        let guards: Vec<_> = loops.loops.iter().map(LoopHealth::alive_while).collect();
        std::thread::sleep(Duration::from_millis(30));
        let limit = Duration::from_millis(10);
        let status = |q: &QueueStats| loops.report(limit, q, Timestamp::from_millis(1_000))[2].1;
        assert_eq!(status(&queues(None)), LoopStatus::Ok, "nothing due");
        assert_eq!(status(&queues(Some(995))), LoopStatus::Ok, "due only 5 ms");
        assert_eq!(status(&queues(Some(900))), LoopStatus::Stalled);
        loops.progress("deliverer");
        assert_eq!(
            status(&queues(Some(900))),
            LoopStatus::Ok,
            "just progressed"
        );
        drop(guards);
        assert_eq!(status(&queues(None)), LoopStatus::Dead);
    }
}
