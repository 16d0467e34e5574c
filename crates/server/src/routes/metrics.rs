//! `GET /metrics`: Prometheus text format. Counters and histograms come from the `metrics`
//! facade; queue depths and the age of the oldest due job are read from the store at scrape time.

use crate::AppState;
use crate::error::ApiError;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use herald_store::Timestamp;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Seconds; from a fast local relay to a slow remote provider.
const SEND_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process-wide recorder, installed on first use (several apps in one test process share it).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("herald_send_duration_seconds".into()),
                SEND_BUCKETS,
            )
            .expect("buckets are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed by an embedding program; keep ours rendering anyway.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

pub async fn render(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let now = state.clock.now();
    let q = state.store.queue_stats(now).await?;
    let age = |at: Option<Timestamp>| at.map_or(0.0, |at| now.since(at).as_secs_f64());
    let mut text = handle().render();
    text.push_str(&format!(
        "# HELP herald_job_queue_depth Jobs due now, by queue.\n# TYPE herald_job_queue_depth gauge\n\
         herald_job_queue_depth{{queue=\"events\"}} {}\nherald_job_queue_depth{{queue=\"runs\"}} {}\n\
         herald_job_queue_depth{{queue=\"messages\"}} {}\n\
         # HELP herald_oldest_due_job_age_seconds How long the oldest due run or message has waited.\n\
         # TYPE herald_oldest_due_job_age_seconds gauge\nherald_oldest_due_job_age_seconds {}\n\
         # HELP herald_queue_oldest_due_seconds How long the oldest due item of each queue has waited (events: since received).\n\
         # TYPE herald_queue_oldest_due_seconds gauge\n\
         herald_queue_oldest_due_seconds{{queue=\"events\"}} {}\nherald_queue_oldest_due_seconds{{queue=\"runs\"}} {}\n\
         herald_queue_oldest_due_seconds{{queue=\"messages\"}} {}\n",
        q.undispatched_events,
        q.due_runs,
        q.due_messages,
        age(q.oldest_job_due()),
        age(q.oldest_event_ms),
        age(q.oldest_run_due_ms),
        age(q.oldest_message_due_ms),
    ));
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}
