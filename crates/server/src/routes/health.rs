//! `GET /healthz`: `200` when the database answers and every engine loop is alive and keeping up;
//! `503` naming the loops that are dead or stalled (no progress while work was due for longer
//! than the stall limit), or saying the database is unreachable.

use crate::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use herald_engine::LoopStatus;
use serde_json::{Map, Value, json};

pub async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let now = state.clock.now();
    let queues = match state.store.queue_stats(now).await {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(error = %e, "health check: database unreachable");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "error": "database unreachable"})),
            );
        }
    };
    let report = state.loops.report(state.engine.stall_limit, &queues, now);
    let unhealthy: Vec<&str> = report
        .iter()
        .filter(|(_, s)| *s != LoopStatus::Ok)
        .map(|(name, _)| *name)
        .collect();
    let loops: Map<String, Value> = report
        .iter()
        .map(|(name, s)| ((*name).to_owned(), json!(s)))
        .collect();
    if unhealthy.is_empty() {
        (
            StatusCode::OK,
            Json(json!({"status": "ok", "loops": loops})),
        )
    } else {
        tracing::error!(loops = ?unhealthy, "health check: engine loops dead or stalled");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "unavailable",
                "error": format!("engine loops dead or stalled: {}", unhealthy.join(", ")),
                "loops": loops,
            })),
        )
    }
}
