//! `POST /v1/events`: signed CloudEvents in, `202` only after they are durably stored.

use crate::AppState;
use crate::error::ApiError;
use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use futures::StreamExt;
use herald_core::event::{self, BodyKind};
use herald_core::signature::{self, SignedHeaders};
use herald_store::{Accepted, NewEvent, Timestamp};
use serde_json::{Value, json};

/// Largest body accepted; more gets `413`.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub async fn post_events(
    State(state): State<AppState>,
    request: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // Load is shed before any body is read: bodies in memory stay bounded by the slots.
    let Ok(_slot) = state.intake_slots.clone().try_acquire_owned() else {
        rejected("busy");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many event requests in flight; retry shortly",
        )
        .retry_after(1)
        .body_unread());
    };
    let (parts, body) = request.into_parts();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let signed = SignedHeaders {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
    };
    let now = state.clock.now_utc();
    // Unsigned or stale requests are refused before their body is read.
    signed
        .check_fresh(now.timestamp())
        .map_err(|e| signature_refused(e).body_unread())?;
    let body = read_body(&parts.headers, body)
        .await
        .inspect_err(|_| rejected("too_large"))?;
    signature::verify(&state.secrets, signed, &body, now.timestamp()).map_err(signature_refused)?;

    let kind = body_kind(header(header::CONTENT_TYPE.as_str()))
        .inspect_err(|_| rejected("content_type"))?;
    let events = event::parse_body(kind, &body, now).map_err(|e| {
        tracing::info!(reason = %e, "event request refused: invalid");
        rejected("invalid");
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
            .with("index", e.index)
            .with("field", e.field)
    })?;

    let received = Timestamp::from_datetime(now);
    let ids: Vec<(String, String)> = events
        .iter()
        .map(|e| (e.source.clone(), e.id.clone()))
        .collect();
    let results = state
        .store
        .accept_events(
            events
                .into_iter()
                .map(|event| NewEvent { event, received })
                .collect(),
        )
        .await?;
    if results.contains(&Accepted::New) {
        state.wakers.events_stored();
    }
    let new = results.iter().filter(|r| **r == Accepted::New).count() as u64;
    metrics::counter!("herald_events_accepted_total", "status" => "new").increment(new);
    metrics::counter!("herald_events_accepted_total", "status" => "duplicate")
        .increment(results.len() as u64 - new);
    let listed: Vec<Value> = ids
        .into_iter()
        .zip(results)
        .map(|((source, id), r)| {
            json!({"id": id, "source": source, "status": if r == Accepted::New { "new" } else { "duplicate" }})
        })
        .collect();
    Ok((StatusCode::ACCEPTED, Json(json!({ "events": listed }))))
}

fn signature_refused(e: signature::SignatureError) -> ApiError {
    tracing::info!(reason = %e, "event request refused: signature");
    rejected("signature");
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        format!("invalid webhook signature: {e}"),
    )
    .with(
        "hint",
        "sign requests with the Standard Webhooks scheme and HERALD_WEBHOOK_SECRET",
    )
}

/// Counts a refused request by reason: `busy`, `too_large`, `signature`, `content_type` or
/// `invalid`.
fn rejected(reason: &'static str) {
    metrics::counter!("herald_events_rejected_total", "reason" => reason).increment(1);
}

/// Reads the body up to [`MAX_BODY_BYTES`], refusing early on a declared length over it.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body exceeds 1 MiB: split the batch into smaller ones",
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        // Read and drop (never buffer) a bounded amount first: a client that writes its whole
        // body before reading the answer would otherwise see a broken pipe instead of the 413.
        if declared.is_some_and(|n| n <= DRAIN_BYTES as u64) {
            let mut frames = body.into_data_stream();
            let mut drained = 0;
            while drained < DRAIN_BYTES {
                match frames.next().await {
                    Some(Ok(chunk)) => drained += chunk.len(),
                    _ => break,
                }
            }
        }
        return Err(too_large().body_unread());
    }
    // A body over the limit without a declared length is read only up to the limit.
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| too_large().body_unread())
}

/// Oversized bodies up to this size are read to their end before the 413 goes out.
const DRAIN_BYTES: usize = 8 * 1024 * 1024;

fn body_kind(content_type: Option<&str>) -> Result<BodyKind, ApiError> {
    let essence = content_type
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/cloudevents+json" | "application/json" => Ok(BodyKind::Single),
        "application/cloudevents-batch+json" => Ok(BodyKind::Batch),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "unsupported Content-Type {:?}: use application/cloudevents+json for one event or application/cloudevents-batch+json for a batch",
                content_type.unwrap_or("")
            ),
        )),
    }
}
