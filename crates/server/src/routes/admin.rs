//! The admin API (`Authorization: Bearer {HERALD_ADMIN_TOKEN}`), compared in constant time.

use crate::AppState;
use crate::error::ApiError;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use herald_store::{ContactId, MessageId, RunId, Timestamp, WorkflowId};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

/// Refuses requests without the admin bearer token (and everything when none is configured).
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(expected) = &state.admin_token else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the admin API is off: set HERALD_ADMIN_TOKEN to enable it",
        ));
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| {
            v.split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        })
        .map(|(_, token)| token.trim())
        .unwrap_or("");
    if !token_matches(expected, given) {
        return Err(
            ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
                .with("hint", "send Authorization: Bearer <HERALD_ADMIN_TOKEN>"),
        );
    }
    Ok(next.run(request).await)
}

/// Whether `given` is the admin token, compared in constant time.
pub(crate) fn token_matches(expected: &str, given: &str) -> bool {
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// `POST /v1/contacts/{id}/magic-link`: a new learner link; every older one stops working.
pub async fn regenerate_contact_link(
    State(state): State<AppState>,
    Path(id): Path<ContactId>,
) -> Result<Json<Value>, ApiError> {
    if state.store.contact(id.clone()).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no contact {id:?}: herald learns contacts from course events"),
        ));
    }
    let url = state
        .engine
        .links
        .regenerate_learner(&state.store, &id, state.clock.now())
        .await?;
    Ok(Json(json!({ "url": url })))
}

/// `GET /v1/links/user`.
pub async fn user_link(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let url = state
        .engine
        .links
        .user_link(&state.store, false, state.clock.now())
        .await?;
    Ok(Json(json!({ "url": url })))
}

/// `POST /v1/links/user/regenerate`.
pub async fn regenerate_user_link(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let url = state
        .engine
        .links
        .user_link(&state.store, true, state.clock.now())
        .await?;
    Ok(Json(json!({ "url": url })))
}

/// Query of the list endpoints: filters plus cursor pagination (`after` = the last id seen;
/// ids are time-ordered, so the cursor is stable under inserts).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    contact_id: Option<ContactId>,
    workflow: Option<WorkflowId>,
    status: Option<String>,
    state: Option<String>,
    after: Option<String>,
    limit: Option<i64>,
}

/// An unknown parameter or a value of the wrong type is a JSON 400 like every other refusal
/// (axum's own rejection is plain text).
fn list_query(
    query: Result<axum::extract::Query<ListQuery>, QueryRejection>,
) -> Result<ListQuery, ApiError> {
    query.map(|q| q.0).map_err(|rejection| {
        ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text()).with(
            "hint",
            "query parameters: contact_id, workflow, status (messages), state (runs), after, limit",
        )
    })
}

const MAX_PAGE: i64 = 500;
const DEFAULT_PAGE: i64 = 100;

impl ListQuery {
    fn filter(self, status: Option<String>) -> Result<herald_store::ListFilter, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("limit must be between 1 and {MAX_PAGE}"),
            ));
        }
        Ok(herald_store::ListFilter {
            contact_id: self.contact_id,
            workflow_id: self.workflow,
            status,
            after: self.after,
            limit,
        })
    }
}

pub(crate) fn rfc3339(at: Timestamp) -> Value {
    json!(at.to_string())
}

fn opt_time(at: Option<Timestamp>) -> Value {
    at.map_or(Value::Null, rfc3339)
}

/// `GET /v1/messages?contact_id=&workflow=&status=&after=&limit=`.
pub async fn messages(
    State(state): State<AppState>,
    query: Result<axum::extract::Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = list_query(query)?;
    if let Some(s) = &q.status
        && herald_store::MessageStatus::parse(s).is_none()
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("unknown status {s:?}: use queued, sent, failed, skipped, suppressed, cancelled or dead"),
        )
        .with("field", "status"));
    }
    let status = q.status.clone();
    let filter = q.filter(status)?;
    let limit = filter.limit;
    let rows = state.store.messages(filter).await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|m| m.id.clone()))
        .flatten();
    let messages: Vec<Value> = rows.into_iter().map(message_json).collect();
    Ok(Json(json!({ "messages": messages, "next_cursor": next })))
}

fn message_json(m: herald_store::MessageRow) -> Value {
    json!({
        "id": m.id, "run_id": m.run_id, "step_id": m.step_id, "workflow": m.workflow_id,
        "contact_id": m.contact_id, "channel": m.channel, "recipient": m.recipient, "subject": m.subject,
        "status": m.status, "reason": m.reason, "attempts": m.attempts,
        "message_id": m.header_message_id, "provider_id": m.provider_id, "segments": m.segments,
        "scheduled_for": if m.status == herald_store::MessageStatus::Queued { opt_time(m.due_ms) } else { Value::Null },
        "created_at": rfc3339(m.created_ms), "updated_at": rfc3339(m.updated_ms), "sent_at": opt_time(m.sent_ms),
    })
}

/// `POST /v1/messages/{id}/retry`: a failed (or dead) message is queued again with a fresh
/// attempt count and the same Message-ID.
pub async fn retry_message(
    State(state): State<AppState>,
    Path(id): Path<MessageId>,
) -> Result<Json<Value>, ApiError> {
    let now = state.clock.now();
    match state.store.retry_message(id.clone(), now).await? {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no message {id:?}"),
        )),
        Some(herald_store::MessageStatus::Queued) => {
            state.wakers.all();
            state.store.announce(herald_store::Signals::MESSAGES);
            Ok(Json(json!({ "id": id, "status": "queued" })))
        }
        Some(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "message {id:?} is {}: only failed or dead messages are retried",
                status.as_str()
            ),
        )
        .with("status", status.as_str())),
    }
}

/// `POST /v1/messages/retry` body: which failed messages to queue again.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryFilter {
    /// `failed` (default) or `dead`.
    status: Option<String>,
    /// Only messages whose last change is at or after this RFC 3339 time.
    since: Option<String>,
    workflow: Option<WorkflowId>,
    contact_id: Option<ContactId>,
}

/// The most messages one `POST /v1/messages/retry` queues again; `more` says to call again.
const MAX_RETRY: usize = 10_000;

/// `POST /v1/messages/retry` `{"status": "failed", "since": "2026-12-04T22:00:00Z", "workflow":
/// …, "contact_id": …}`: every matching message is queued again as by
/// `POST /v1/messages/{id}/retry` (after the relay was down, say).
pub async fn retry_messages(
    State(state): State<AppState>,
    body: Result<Json<RetryFilter>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(f) = body.map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, e.body_text()).with(
            "hint",
            r#"send {"status": "failed", "since": "2026-12-04T22:00:00Z"} (workflow and contact_id optional)"#,
        )
    })?;
    let status = f.status.unwrap_or_else(|| "failed".into());
    if !matches!(status.as_str(), "failed" | "dead") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("status {status:?}: only failed or dead messages are retried"),
        )
        .with("field", "status"));
    }
    let since = match &f.since {
        None => Timestamp::from_millis(i64::MIN),
        Some(t) => {
            let at = chrono::DateTime::parse_from_rfc3339(t).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("since {t:?} is not an RFC 3339 time such as 2026-12-04T22:00:00Z"),
                )
                .with("field", "since")
            })?;
            Timestamp::from_datetime(at.to_utc())
        }
    };
    let now = state.clock.now();
    let mut retried = Vec::new();
    let mut after = None;
    let more = loop {
        let page = state
            .store
            .messages(herald_store::ListFilter {
                contact_id: f.contact_id.clone(),
                workflow_id: f.workflow.clone(),
                status: Some(status.clone()),
                after: after.clone(),
                limit: MAX_PAGE,
            })
            .await?;
        let Some(last) = page.last() else { break false };
        after = Some(last.id.to_string());
        for m in page.iter().filter(|m| m.updated_ms >= since) {
            if retried.len() == MAX_RETRY {
                break;
            }
            if state.store.retry_message(m.id.clone(), now).await?
                == Some(herald_store::MessageStatus::Queued)
            {
                retried.push(m.id.clone());
            }
        }
        if retried.len() == MAX_RETRY {
            break true;
        }
    };
    if !retried.is_empty() {
        state.wakers.all();
        state.store.announce(herald_store::Signals::MESSAGES);
    }
    Ok(Json(
        json!({ "retried": retried.len(), "message_ids": retried, "more": more }),
    ))
}

/// `GET /v1/events?status=dead&after=&limit=`: the events set aside because their dispatch kept
/// failing, oldest first, with the last error. (Events that were processed are seen through
/// their runs and messages.)
pub async fn events(
    State(state): State<AppState>,
    query: Result<axum::extract::Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = list_query(query)?;
    if q.status.as_deref() != Some("dead") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "events are listed by status=dead (events set aside); see runs and messages for the rest",
        )
        .with("field", "status"));
    }
    let after = match &q.after {
        None => 0,
        Some(a) => a.parse::<i64>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "after must be a next_cursor from this list",
            )
            .with("field", "after")
        })?,
    };
    let limit = q.filter(None)?.limit;
    let rows = state.store.dead_events(after, limit).await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|e| e.seq.to_string()))
        .flatten();
    let events: Vec<Value> = rows
        .into_iter()
        .map(|e| {
            json!({
                "source": e.source, "id": e.id, "type": e.event_type, "contact_id": e.contact_id,
                "status": "dead", "error": e.error,
                "received_at": rfc3339(e.received_ms), "dead_at": rfc3339(e.dead_ms),
            })
        })
        .collect();
    Ok(Json(json!({ "events": events, "next_cursor": next })))
}

/// `GET /v1/runs?contact_id=&workflow=&state=&after=&limit=`.
pub async fn runs(
    State(state): State<AppState>,
    query: Result<axum::extract::Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = list_query(query)?;
    if let Some(s) = &q.state
        && herald_store::RunState::parse(s).is_none()
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("unknown state {s:?}: use active, waiting_event, parked, completed, exited, failed, refused, dead or cancelled"),
        )
        .with("field", "state"));
    }
    let run_state = q.state.clone();
    let filter = q.filter(run_state)?;
    let limit = filter.limit;
    let rows = state.store.runs(filter).await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id.clone()))
        .flatten();
    let runs: Vec<Value> = rows.into_iter().map(run_json).collect();
    Ok(Json(json!({ "runs": runs, "next_cursor": next })))
}

fn run_json(r: herald_store::RunRow) -> Value {
    let steps: Vec<Value> = r
        .steps
        .iter()
        .map(|s| json!({"step_id": s.step_id, "kind": s.kind, "outcome": s.outcome, "at": rfc3339(s.at_ms)}))
        .collect();
    json!({
        "id": r.id, "workflow": r.workflow_id, "workflow_version": r.workflow_version,
        "contact_id": r.contact_id, "state": r.state, "reason": r.reason,
        "next_step_at": opt_time(r.due_ms), "created_at": rfc3339(r.created_ms),
        "updated_at": rfc3339(r.updated_ms), "ended_at": opt_time(r.ended_ms), "steps": steps,
    })
}

/// `POST /v1/runs/{id}/cancel`: a live run ends as `cancelled`; its queued messages become
/// `cancelled` (one already being sent is sent). Cancelling a cancelled run again is a no-op.
pub async fn cancel_run(
    State(state): State<AppState>,
    Path(id): Path<RunId>,
) -> Result<Json<Value>, ApiError> {
    use herald_store::RunState;
    let now = state.clock.now();
    let after = state
        .store
        .end_run(
            id.clone(),
            RunState::Cancelled,
            "cancelled by an operator".into(),
            now,
        )
        .await?;
    match after {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no run {id:?}"),
        )),
        Some(RunState::Cancelled) => Ok(Json(json!({ "id": id, "state": "cancelled" }))),
        Some(ended) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "run {id:?} already ended ({}): only live runs are cancelled",
                ended.as_str()
            ),
        )
        .with("state", ended.as_str())),
    }
}

/// `GET /v1/contacts/{id}`: details, grants and opt-outs.
pub async fn contact(
    State(state): State<AppState>,
    Path(id): Path<ContactId>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(contact_json(&state, &id).await?))
}

async fn contact_json(state: &AppState, id: &ContactId) -> Result<Value, ApiError> {
    let Some(c) = state.store.contact(id.to_owned()).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no contact {id:?}"),
        ));
    };
    let grants = state.store.grants(id.to_owned()).await?;
    let active: Vec<Value> = grants
        .iter()
        .filter(|g| g.active)
        .map(|g| json!({"kind": g.kind, "id": g.item_id, "since": rfc3339(g.changed_ms)}))
        .collect();
    let custom: Value = c
        .custom_fields
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    Ok(json!({
        "id": c.id, "email": c.email, "phone": c.phone, "first_name": c.first_name, "last_name": c.last_name,
        "timezone": c.timezone, "custom_fields": custom, "grants": active,
        "opt_outs": state.store.opt_outs(id.to_owned()).await?,
    }))
}

/// `GET /v1/contacts/{id}/export`: everything herald holds on the contact, as JSON (details,
/// every grant, the events received, runs, messages, opt-outs, link activity).
pub async fn export(
    State(state): State<AppState>,
    Path(id): Path<ContactId>,
) -> Result<Json<Value>, ApiError> {
    let contact = contact_json(&state, &id).await?;
    let all = || herald_store::ListFilter {
        contact_id: Some(id.clone()),
        workflow_id: None,
        status: None,
        after: None,
        limit: i64::MAX,
    };
    let grants: Vec<Value> = state
        .store
        .grants(id.clone())
        .await?
        .into_iter()
        .map(|g| json!({"kind": g.kind, "id": g.item_id, "active": g.active, "changed_at": rfc3339(g.changed_ms)}))
        .collect();
    let events: Vec<Value> = state
        .store
        .contact_events(id.clone(), i64::MAX)
        .await?
        .into_iter()
        .map(|e| json!({"source": e.source, "id": e.id, "type": e.event_type, "time": rfc3339(e.time_ms), "received_at": rfc3339(e.received_ms)}))
        .collect();
    let runs: Vec<Value> = state
        .store
        .runs(all())
        .await?
        .into_iter()
        .map(run_json)
        .collect();
    let messages: Vec<Value> = state
        .store
        .messages(all())
        .await?
        .into_iter()
        .map(message_json)
        .collect();
    let links: Vec<Value> = state
        .store
        .link_audit(Some(id.clone()), i64::MAX)
        .await?
        .into_iter()
        .map(|a| json!({"at": rfc3339(a.at_ms), "action": a.action, "link": a.kind, "reason": a.reason}))
        .collect();
    Ok(Json(json!({
        "contact": contact, "grants": grants, "events": events, "runs": runs,
        "messages": messages, "link_activity": links,
    })))
}

/// `DELETE /v1/contacts/{id}`: everything herald holds on the contact is removed (details,
/// grants, events, runs, messages, links, sessions, opt-outs, dev-mailbox copies). Only an
/// address they had opted out of is kept, as a keyed hash, so a later event with it cannot
/// subscribe them again.
pub async fn erase(
    State(state): State<AppState>,
    Path(id): Path<ContactId>,
) -> Result<Json<Value>, ApiError> {
    match state
        .store
        .erase_contact(id.clone(), state.clock.now())
        .await?
    {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no contact {id:?}"),
        )),
        Some(erased) => Ok(Json(json!({ "id": id, "erased": erased }))),
    }
}

/// The content of each message as an operator reads it (rendered again from its pinned version,
/// its event and the contact's current details, links as markers), by message id: an object
/// with subject, text and html, or with the error that kept it from rendering.
async fn reviewed_contents(
    state: &AppState,
    ids: Vec<MessageId>,
) -> Result<std::collections::HashMap<MessageId, Value>, ApiError> {
    let sources = state.store.message_sources(ids).await?;
    let mut versions: Vec<(String, String)> = sources
        .iter()
        .map(|s| (s.workflow_id.to_string(), s.workflow_version.clone()))
        .collect();
    versions.sort();
    versions.dedup();
    if let Err(e) = state.registry.ensure_versions(&versions).await {
        tracing::warn!(error = %e, "a message's workflow version could not be loaded for review");
    }
    let snapshot = state.registry.snapshot();
    Ok(sources
        .iter()
        .map(|source| {
            let content = match herald_engine::delivery::render_for_review(
                source,
                &snapshot,
                &state.engine,
            ) {
                Ok(c) => json!(c),
                Err(e) => json!({ "error": e }),
            };
            (source.id.clone(), content)
        })
        .collect())
}

/// How many of each kind of record a timeline shows (the newest).
const TIMELINE_LIMIT: i64 = 500;

/// `GET /v1/contacts/{id}/timeline`: what happened to the contact, oldest first: events in,
/// runs started, each step, runs ended, messages with their outcome, opt-outs and link activity.
pub async fn timeline(
    State(state): State<AppState>,
    Path(id): Path<ContactId>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(timeline_of(&state, &id).await?))
}

/// `{"contact": …, "timeline": [...]}` of [`timeline`].
pub(crate) async fn timeline_of(state: &AppState, id: &ContactId) -> Result<Value, ApiError> {
    let id = id.to_owned();
    let state = state.clone();
    let contact = contact_json(&state, &id).await?;
    let by_contact = || herald_store::ListFilter {
        contact_id: Some(id.clone()),
        workflow_id: None,
        status: None,
        after: None,
        limit: TIMELINE_LIMIT,
    };
    let mut items: Vec<(Timestamp, Value)> = Vec::new();
    for e in state
        .store
        .contact_events(id.clone(), TIMELINE_LIMIT)
        .await?
    {
        items.push((
            e.received_ms,
            json!({
                "kind": "event", "at": rfc3339(e.received_ms), "type": e.event_type, "id": e.id,
                "source": e.source, "time": rfc3339(e.time_ms),
                "status": if e.dead_error.is_some() { "dead" } else if e.dispatched { "processed" } else { "pending" },
                "error": e.dead_error,
            }),
        ));
    }
    for r in state.store.runs(by_contact()).await? {
        items.push((
            r.created_ms,
            json!({"kind": "run_started", "at": rfc3339(r.created_ms), "run_id": r.id,
                   "workflow": r.workflow_id, "workflow_version": r.workflow_version}),
        ));
        for step in &r.steps {
            items.push((
                step.at_ms,
                json!({"kind": "step", "at": rfc3339(step.at_ms), "run_id": r.id, "workflow": r.workflow_id,
                       "step_id": step.step_id, "step": step.kind, "outcome": step.outcome}),
            ));
        }
        if let Some(ended) = r.ended_ms {
            items.push((
                ended,
                json!({"kind": "run_ended", "at": rfc3339(ended), "run_id": r.id, "workflow": r.workflow_id,
                       "state": r.state, "reason": r.reason}),
            ));
        }
    }
    let messages = state.store.messages(by_contact()).await?;
    let mut contents =
        reviewed_contents(&state, messages.iter().map(|m| m.id.clone()).collect()).await?;
    for m in messages {
        let at = m.sent_ms.unwrap_or(m.updated_ms);
        let content = contents.remove(&m.id).unwrap_or(Value::Null);
        let mut item = message_json(m);
        item["kind"] = json!("message");
        item["at"] = rfc3339(at);
        item["content"] = content;
        items.push((at, item));
    }
    for o in state.store.opt_outs(id.clone()).await? {
        items.push((
            o.at_ms,
            json!({"kind": "opt_out", "at": rfc3339(o.at_ms), "channel": o.channel, "source": o.source}),
        ));
    }
    for a in state
        .store
        .link_audit(Some(id.clone()), TIMELINE_LIMIT)
        .await?
    {
        items.push((
            a.at_ms,
            json!({"kind": "link", "at": rfc3339(a.at_ms), "action": a.action, "link": a.kind, "reason": a.reason}),
        ));
    }
    // Stable: records of one instant keep the order above (an event before the run it started).
    items.sort_by_key(|(at, _)| *at);
    let timeline: Vec<Value> = items.into_iter().map(|(_, item)| item).collect();
    Ok(json!({ "contact": contact, "timeline": timeline }))
}

/// `POST /v1/workflows/reload`: reload workflows and templates, or say why they do not check
/// (then the running set stays).
pub async fn reload(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    match state.registry.reload(state.clock.now()).await {
        Ok(warnings) => {
            let snapshot = state.registry.snapshot();
            let workflows: Vec<Value> = snapshot
                .current
                .values()
                .map(|w| json!({"id": w.id, "version": w.version, "enabled": w.enabled}))
                .collect();
            let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
            Ok(Json(
                json!({ "workflows": workflows, "warnings": warnings }),
            ))
        }
        Err(herald_engine::RegistryError::Invalid(diagnostics)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "workflows do not check; the running set is unchanged",
        )
        .with("diagnostics", diagnostics)),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}
