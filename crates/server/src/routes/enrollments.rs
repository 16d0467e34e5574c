//! `POST /v1/workflows/{id}/enrollments`: enroll contacts (by id, or an audience) in a workflow
//! as if its trigger had fired now, under the same enrollment rules. Each refusal is named.

use crate::AppState;
use crate::error::ApiError;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use herald_core::event::MAX_ID_LEN;
use herald_core::workflow::Audience;
use herald_engine::enrollment::{self, Enrollees, EnrollmentError};
use herald_store::ContactId;
use serde_json::{Value, json};

/// The most contact ids one request may name.
pub const MAX_CONTACT_IDS: usize = 10_000;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentRequest {
    contact_ids: Option<Vec<String>>,
    audience: Option<AudienceRequest>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AudienceRequest {
    #[serde(default)]
    offers: Vec<String>,
    #[serde(default)]
    products: Vec<String>,
    inactive_for: Option<String>,
}

const HINT: &str = r#"send {"contact_ids": ["c_1", "c_2"]} or {"audience": {"offers": ["o_pro"], "products": [], "inactive_for": "7d"}}"#;

fn bad(message: impl Into<String>, field: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
        .with("field", field)
        .with("hint", HINT)
}

pub async fn enroll(
    State(state): State<AppState>,
    Path(workflow_id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<EnrollmentRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(request) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()).with("hint", HINT))?;
    let enrollees = match (request.contact_ids, request.audience) {
        (Some(ids), None) => Enrollees::Contacts(contact_ids(ids)?),
        (None, Some(audience)) => Enrollees::Audience(audience_of(audience)?),
        _ => return Err(bad("give either contact_ids or audience", "contact_ids")),
    };
    // A client that repeats a request (a timeout, a retry) with the same Idempotency-Key enrolls
    // no one twice.
    let request_id = match headers.get("idempotency-key") {
        Some(key) => key
            .to_str()
            .ok()
            .filter(|k| !k.is_empty() && k.len() <= MAX_ID_LEN)
            .map(str::to_owned)
            .ok_or_else(|| {
                bad(
                    "Idempotency-Key must be 1 to 256 visible characters",
                    "Idempotency-Key",
                )
            })?,
        None => uuid::Uuid::now_v7().to_string(),
    };
    let snapshot = state.registry.snapshot();
    let report = enrollment::enroll(
        &state.store,
        &snapshot,
        &workflow_id,
        enrollees,
        &request_id,
        state.clock.now(),
    )
    .await
    .map_err(|e| match e {
        EnrollmentError::UnknownWorkflow(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
        EnrollmentError::Disabled(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        EnrollmentError::Store(e) => e.into(),
    })?;
    if !report.accepted.is_empty() {
        state.wakers.events_stored();
    }
    let refused: Vec<Value> = report
        .refused
        .iter()
        .map(|(contact, reason)| json!({ "contact_id": contact, "reason": reason }))
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "workflow": workflow_id,
            "version": snapshot.current.get(&workflow_id).map(|w| w.version.clone()),
            "accepted": report.accepted,
            "refused": refused,
        })),
    ))
}

fn contact_ids(ids: Vec<String>) -> Result<Vec<ContactId>, ApiError> {
    if ids.is_empty() {
        return Err(bad("contact_ids lists no contact", "contact_ids"));
    }
    if ids.len() > MAX_CONTACT_IDS {
        return Err(bad(
            format!(
                "contact_ids holds {} ids: at most {MAX_CONTACT_IDS} per request",
                ids.len()
            ),
            "contact_ids",
        ));
    }
    for (i, id) in ids.iter().enumerate() {
        if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(|c| c.is_control()) {
            return Err(bad(
                format!(
                    "contact_ids[{i}] is not a contact id: 1 to {MAX_ID_LEN} bytes, no control characters"
                ),
                &format!("contact_ids[{i}]"),
            ));
        }
    }
    Ok(ids.into_iter().map(ContactId::from).collect())
}

fn audience_of(a: AudienceRequest) -> Result<Audience, ApiError> {
    let inactive_for = a
        .inactive_for
        .map(|d| {
            d.parse::<herald_core::Duration>()
                .map_err(|e| bad(format!("inactive_for: {e}"), "audience.inactive_for"))
        })
        .transpose()?;
    for (list, name) in [(&a.offers, "offers"), (&a.products, "products")] {
        if list.iter().any(|id| id.is_empty() || id.len() > MAX_ID_LEN) {
            return Err(bad(
                format!("audience.{name} holds an empty or overlong id"),
                &format!("audience.{name}"),
            ));
        }
    }
    Ok(Audience {
        offers: a.offers,
        products: a.products,
        inactive_for,
    })
}
