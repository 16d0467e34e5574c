//! `/u/{token}`: unsubscribe from marketing email (what still comes is listed). GET shows a confirmation page and changes nothing (mail
//! scanners fetch links); POST, from that page's form or as an RFC 8058 one-click request
//! (`List-Unsubscribe=One-Click`), opts the contact out and answers `200`, never a redirect.

use crate::AppState;
use crate::error::ApiError;
use crate::html::{escape, page, private_page};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use herald_store::{Channel, ContactId};

pub async fn show(State(state): State<AppState>, Path(token): Path<String>) -> Response {
    if state.engine.unsubscribe.verify(&token).is_none() {
        return unknown();
    }
    let body = format!(
        "<h1>Stop marketing email?</h1><p>You will no longer receive course news, reminders and offers by email.</p>\
         <form method=\"post\" action=\"/u/{}\"><button type=\"submit\">Stop marketing email</button></form>{}",
        escape(&token),
        still_comes(&state)
    );
    private_page(StatusCode::OK, page("Unsubscribe", &body))
}

/// What unsubscribing does not stop: sign-in links the learner asks for, and the school's
/// transactional workflows, by name.
fn still_comes(state: &AppState) -> String {
    let snapshot = state.registry.snapshot();
    let mut items = vec!["sign-in links you ask for".to_owned()];
    items.extend(
        snapshot
            .current
            .values()
            .filter(|w| {
                w.category == herald_core::workflow::Category::Transactional
                    && snapshot.is_enabled(&w.id)
            })
            .map(|w| escape(&w.name)),
    );
    let list: String = items.iter().map(|i| format!("<li>{i}</li>")).collect();
    format!("<p>You will still receive:</p><ul>{list}</ul>")
}

pub async fn unsubscribe(
    State(state): State<AppState>,
    Path(token): Path<String>,
    body: String,
) -> Result<Response, ApiError> {
    let Some(contact) = state.engine.unsubscribe.verify(&token) else {
        return Ok(unknown());
    };
    let source = if body.contains("List-Unsubscribe=One-Click") {
        "one_click"
    } else {
        "unsubscribe_link"
    };
    if state
        .store
        .set_opt_out(
            ContactId::from(contact),
            Channel::Email,
            true,
            source.into(),
            state.clock.now(),
        )
        .await?
    {
        tracing::info!(source, "contact opted out of email");
    }
    let body = format!(
        "<h1>You are unsubscribed</h1><p>You will receive no more marketing email from us.</p>{}",
        still_comes(&state)
    );
    Ok(private_page(StatusCode::OK, page("Unsubscribed", &body)))
}

fn unknown() -> Response {
    let body = "<h1>This unsubscribe link is not valid</h1><p>Use the link from your most recent email.</p>";
    private_page(StatusCode::NOT_FOUND, page("Unsubscribe", body))
}
