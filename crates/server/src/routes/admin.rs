//! The admin API (`Authorization: Bearer {HERALD_ADMIN_TOKEN}`), compared in constant time.

use crate::AppState;
use crate::error::ApiError;
use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

/// Refuses requests without the admin bearer token (and everything when none is configured).
pub async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Result<Response, ApiError> {
    let Some(expected) = &state.admin_token else {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "the admin API is off: set HERALD_ADMIN_TOKEN to enable it"));
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
            .with("hint", "send Authorization: Bearer <HERALD_ADMIN_TOKEN>"));
    }
    Ok(next.run(request).await)
}

/// `POST /v1/contacts/{id}/magic-link`: a new learner link; every older one stops working.
pub async fn regenerate_contact_link(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if state.store.contact(id.clone()).await?.is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no contact {id:?}: herald learns contacts from course events")));
    }
    let url = state.engine.links.regenerate_learner(&state.store, &id, state.clock.now_ms()).await?;
    Ok(Json(json!({ "url": url })))
}

/// `GET /v1/links/user`.
pub async fn user_link(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let url = state.engine.links.user_link(&state.store, false, state.clock.now_ms()).await?;
    Ok(Json(json!({ "url": url })))
}

/// `POST /v1/links/user/regenerate`.
pub async fn regenerate_user_link(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let url = state.engine.links.user_link(&state.store, true, state.clock.now_ms()).await?;
    Ok(Json(json!({ "url": url })))
}
