//! JSON errors: every refusal says what was wrong, where, and what to do.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Extra fields (e.g. `index` and `field` of a refused event).
    pub detail: serde_json::Map<String, serde_json::Value>,
    /// Seconds after which a retry may succeed (`Retry-After`).
    pub retry_after: Option<u32>,
    /// The request's body was left unread: the connection is closed after this answer, and the
    /// client is told so, instead of racing it to reuse a connection the server drops.
    pub body_unread: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            detail: Default::default(),
            retry_after: None,
            body_unread: false,
        }
    }
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }
    pub fn body_unread(mut self) -> Self {
        self.body_unread = true;
        self
    }
    pub fn with(mut self, key: &str, value: impl serde::Serialize) -> Self {
        self.detail.insert(key.into(), json!(value));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::Map::new();
        body.insert("error".into(), json!(self.message));
        body.extend(self.detail);
        let mut response = (self.status, Json(serde_json::Value::Object(body))).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        if self.body_unread {
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

impl From<herald_store::StoreError> for ApiError {
    fn from(e: herald_store::StoreError) -> Self {
        tracing::error!(error = %e, "store error while serving a request");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage is unavailable; retry later",
        )
        .retry_after(1)
    }
}
