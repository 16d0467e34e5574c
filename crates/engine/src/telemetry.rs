//! The engine's metrics, named in one place. Recorded through the `metrics` facade; the server
//! installs the Prometheus recorder and renders `/metrics`.

use herald_store::{DeliveryResult, RunState};

pub fn run_started(workflow: &str) {
    metrics::counter!("herald_runs_started_total", "workflow" => workflow.to_owned()).increment(1);
}

/// Counts a run that reached a final state (completed, exited, failed, refused).
pub fn run_finished(workflow: &str, state: RunState) {
    if !state.is_live() {
        metrics::counter!("herald_runs_finished_total", "workflow" => workflow.to_owned(), "outcome" => state.as_str())
            .increment(1);
    }
}

/// Counts a message reaching a status (queued counts retries).
pub fn message(channel: &'static str, status: &'static str) {
    metrics::counter!("herald_messages_total", "channel" => channel, "status" => status)
        .increment(1);
}

pub fn delivery(channel: &'static str, result: &DeliveryResult) {
    let status = match result {
        DeliveryResult::Sent { .. } => "sent",
        // A failed attempt that will be retried: the message is queued again.
        DeliveryResult::Retry { .. } => "queued",
        DeliveryResult::Failed { .. } => "failed",
        DeliveryResult::Skipped { .. } => "skipped",
        DeliveryResult::Suppressed { .. } | DeliveryResult::Bounced { .. } => "suppressed",
        DeliveryResult::Cancelled { .. } => "cancelled",
    };
    message(channel, status);
}

/// Time a provider took to accept (or refuse) one message.
pub fn send_latency(channel: &'static str, seconds: f64) {
    metrics::histogram!("herald_send_duration_seconds", "channel" => channel).record(seconds);
}

/// Counts an item set aside because its processing kept failing (`queue`: events, runs,
/// messages).
pub fn set_aside(queue: &'static str) {
    metrics::counter!("herald_dead_total", "queue" => queue).increment(1);
}
