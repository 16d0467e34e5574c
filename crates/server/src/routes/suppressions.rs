//! Who gets no email or SMS: a provider's bounce and complaint reports (one as JSON, or a CSV
//! list when moving from another provider), the suppression list as JSON or CSV, and an
//! operator opting a contact out of, or back into, a channel.

use super::admin::rfc3339;
use crate::AppState;
use crate::error::ApiError;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_store::{Channel, ContactId};
use serde_json::{Value, json};

/// Addresses one CSV import may hold, and its size.
pub const MAX_CSV_ROWS: usize = 100_000;
pub const MAX_CSV_BYTES: usize = 16 * 1024 * 1024;

/// Why an address is suppressed, as a provider reports it or a list from elsewhere says.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reason {
    Bounced,
    Complaint,
    Unsubscribed,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Bounced => "bounced",
            Self::Complaint => "complaint",
            Self::Unsubscribed => "unsubscribed",
        }
    }
}

/// `POST /v1/suppressions` JSON body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Suppression {
    email: String,
    reason: Reason,
}

const JSON_HINT: &str = r#"send {"email": "ann@example.com", "reason": "bounced"} ("complaint", "unsubscribed"), or a CSV list with Content-Type: text/csv"#;
const CSV_HINT: &str = "a header line `email,reason`, then one address per line; reason is bounced, complaint or unsubscribed (unsubscribed when left empty)";

/// `POST /v1/suppressions`: `{"email", "reason"}`, or with `Content-Type: text/csv` a list
/// (`email,reason`). Every contact with each address is opted out of email, and the address
/// stays suppressed for a contact who arrives with it later. A list is taken whole or not at
/// all: the first bad line is named and nothing is stored.
pub async fn suppress(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let is_csv = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/csv"));
    let addresses = if is_csv {
        csv_addresses(&body)?
    } else {
        let s: Suppression = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}"))
                .with("hint", JSON_HINT)
        })?;
        vec![(
            email_address(&s.email).map_err(|e| e.with("field", "email"))?,
            s.reason,
        )]
    };
    let count = addresses.len();
    let rows: Vec<(String, String)> = addresses
        .iter()
        .map(|(email, reason)| (email.clone(), reason.as_str().to_owned()))
        .collect();
    let contacts = state
        .store
        .suppress_email_addresses(rows, state.clock.now())
        .await?;
    Ok(Json(match (is_csv, addresses.first()) {
        (false, Some((email, reason))) => {
            json!({ "email": email, "reason": reason.as_str(), "contacts": contacts })
        }
        _ => json!({ "addresses": count, "contacts": contacts }),
    }))
}

fn email_address(text: &str) -> Result<String, ApiError> {
    let email = text.trim();
    if email.is_empty()
        || !email.contains('@')
        || email.len() > 320
        || email.chars().any(char::is_control)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{email:?} is not an email address"),
        ));
    }
    Ok(email.to_owned())
}

fn csv_addresses(body: &[u8]) -> Result<Vec<(String, Reason)>, ApiError> {
    let bad = |line: u64, message: String| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("line {line}: {message}"))
            .with("line", line)
            .with("hint", CSV_HINT)
    };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(body);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| bad(1, e.to_string()))?
        .iter()
        .map(str::to_ascii_lowercase)
        .collect();
    let column = |name: &str| header.iter().position(|h| h == name);
    let Some(email_at) = column("email") else {
        return Err(bad(1, "the header line has no `email` column".into()));
    };
    let reason_at = column("reason");
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            bad(line, e.to_string())
        })?;
        let line = record.position().map_or(0, |p| p.line());
        if out.len() == MAX_CSV_ROWS {
            return Err(bad(
                line,
                format!("more than {MAX_CSV_ROWS} addresses: split the list"),
            ));
        }
        let email = email_address(record.get(email_at).unwrap_or_default())
            .map_err(|e| bad(line, e.message))?;
        let reason = match reason_at.and_then(|i| record.get(i)).unwrap_or_default() {
            "" => Reason::Unsubscribed,
            text => serde_json::from_value(json!(text)).map_err(|_| {
                bad(
                    line,
                    format!("reason {text:?}: use bounced, complaint or unsubscribed"),
                )
            })?,
        };
        out.push((email, reason));
    }
    if out.is_empty() {
        return Err(bad(1, "the list holds no address".into()));
    }
    Ok(out)
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListFormat {
    format: Option<String>,
}

/// `GET /v1/suppressions[?format=csv]`: every opt-out, oldest first, with the contact's current
/// addresses (addresses of erased contacts are kept only as hashes, so they are not listed).
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListFormat>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let format = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?
        .0
        .format;
    let rows = state.store.suppression_list().await?;
    match format.as_deref() {
        None | Some("json") => {
            let list: Vec<Value> = rows
                .into_iter()
                .map(|r| {
                    json!({"contact_id": r.contact_id, "email": r.email, "phone": r.phone,
                           "channel": r.channel, "reason": r.source, "at": rfc3339(r.at_ms)})
                })
                .collect();
            Ok(Json(json!({ "suppressions": list })).into_response())
        }
        Some("csv") => {
            let mut out = csv::Writer::from_writer(Vec::new());
            let write = |out: &mut csv::Writer<Vec<u8>>, row: [&str; 6]| {
                out.write_record(row)
                    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
            };
            write(
                &mut out,
                ["email", "reason", "channel", "phone", "contact_id", "at"],
            )?;
            for r in &rows {
                let at = rfc3339(r.at_ms);
                write(
                    &mut out,
                    [
                        r.email.as_deref().unwrap_or_default(),
                        &r.source,
                        &r.channel,
                        r.phone.as_deref().unwrap_or_default(),
                        &r.contact_id,
                        at.as_str().unwrap_or_default(),
                    ],
                )?;
            }
            let bytes = out
                .into_inner()
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            Ok((
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                    (
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"suppressions.csv\"",
                    ),
                ],
                bytes,
            )
                .into_response())
        }
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("format {other:?}: use json or csv"),
        )
        .with("field", "format")),
    }
}

/// `POST /v1/contacts/{id}/opt-outs` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptOutChange {
    channel: String,
    opted_out: bool,
}

/// `POST /v1/contacts/{id}/opt-outs` `{"channel": "email" | "sms", "opted_out": true | false}`:
/// an operator opts a contact out of a channel's marketing messages, or back in (a learner who
/// asked by phone). Answers the contact's opt-outs as they now stand.
pub async fn set_opt_out(
    State(state): State<AppState>,
    Path(id): Path<ContactId>,
    body: Result<Json<OptOutChange>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(change) = body.map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, e.body_text())
            .with("hint", r#"send {"channel": "email", "opted_out": true}"#)
    })?;
    let Some(channel) = Channel::parse(&change.channel) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("channel {:?}: use email or sms", change.channel),
        )
        .with("field", "channel"));
    };
    if state.store.contact(id.clone()).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no contact {id:?}"),
        ));
    }
    state
        .store
        .set_opt_out(
            id.clone(),
            channel,
            change.opted_out,
            "admin".into(),
            state.clock.now(),
        )
        .await?;
    let opt_outs: Vec<Value> = state
        .store
        .opt_outs(id.clone())
        .await?
        .into_iter()
        .map(|o| json!({"channel": o.channel, "source": o.source, "at": rfc3339(o.at_ms)}))
        .collect();
    Ok(Json(json!({ "contact_id": id, "opt_outs": opt_outs })))
}
