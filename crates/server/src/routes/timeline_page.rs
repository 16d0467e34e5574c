//! `/admin/contacts/{id}/timeline`: a contact's timeline as a page for the school's team, usable
//! on a phone. The admin token is asked for in a form and posted with it (never in the URL; no
//! cookie, no script); a client that sends `Authorization: Bearer` gets the page at once.

use super::admin::{timeline_of, token_matches};
use crate::AppState;
use crate::html::{escape, page, private_page};
use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use herald_store::ContactId;
use serde_json::Value;

#[derive(Debug, serde::Deserialize)]
pub struct TokenForm {
    token: String,
}

pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<ContactId>,
    headers: HeaderMap,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());
    match bearer {
        Some(token) => answer(&state, &id, &token).await,
        None => ask_for_token(&id, StatusCode::OK, ""),
    }
}

pub async fn show_posted(
    State(state): State<AppState>,
    Path(id): Path<ContactId>,
    Form(form): Form<TokenForm>,
) -> Response {
    answer(&state, &id, form.token.trim()).await
}

async fn answer(state: &AppState, id: &ContactId, token: &str) -> Response {
    let Some(expected) = &state.admin_token else {
        let body = "<h1>The admin API is off</h1><p>Set HERALD_ADMIN_TOKEN to see timelines.</p>";
        return private_page(StatusCode::NOT_FOUND, page("Timeline", body));
    };
    if !token_matches(expected, token) {
        return ask_for_token(id, StatusCode::UNAUTHORIZED, "That is not the admin token.");
    }
    match timeline_of(state, id).await {
        Ok(timeline) => private_page(
            StatusCode::OK,
            page(&format!("Timeline of {id}"), &render(&timeline)),
        ),
        Err(e) => private_page(
            e.status,
            page(
                "Timeline",
                &format!("<h1>No timeline</h1><p>{}</p>", escape(&e.message)),
            ),
        ),
    }
}

fn ask_for_token(id: &str, status: StatusCode, problem: &str) -> Response {
    let problem = if problem.is_empty() {
        String::new()
    } else {
        format!("<p role=\"alert\"><b>{}</b></p>", escape(problem))
    };
    let body = format!(
        "<h1>Timeline of {id}</h1>{problem}<form method=\"post\" action=\"/admin/contacts/{path}/timeline\">\
         <label>Admin token<br><input type=\"password\" name=\"token\" autocomplete=\"current-password\" required \
         style=\"width:100%;font-size:1.1rem;padding:.4rem\"></label><p><button type=\"submit\">Show the timeline</button></p></form>",
        id = escape(id),
        // A path segment (contact ids come from the platform and may hold anything).
        path = escape(
            &percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        ),
    );
    private_page(status, page("Timeline", &body))
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => escape(s),
        other => escape(&other.to_string()),
    }
}

fn render(timeline: &Value) -> String {
    let c = &timeline["contact"];
    let name = [text(&c["first_name"]), text(&c["last_name"])].join(" ");
    let details: Vec<String> = [text(&c["email"]), text(&c["phone"])]
        .into_iter()
        .filter(|d| !d.is_empty())
        .chain([format!("<code>{}</code>", text(&c["id"]))])
        .collect();
    let mut out = format!(
        "<h1>{}</h1><p>{}</p>",
        if name.trim().is_empty() {
            text(&c["id"])
        } else {
            name
        },
        details.join(" · "),
    );
    out.push_str("<ol style=\"list-style:none;padding:0\">");
    for item in timeline["timeline"].as_array().into_iter().flatten() {
        let at = item["at"].as_str().unwrap_or_default().replace('T', " ");
        let (kind, summary) = summary(item);
        out.push_str(&format!(
            "<li style=\"border-bottom:1px solid #ddd;padding:.5rem 0\"><small><time>{}</time></small><br><b>{kind}</b> {summary}",
            escape(&at)
        ));
        if let Some(content) = item.get("content").filter(|c| c.is_object()) {
            let body = match (&content["text"], &content["html"], &content["error"]) {
                (Value::String(t), _, _) => escape(t),
                (_, Value::String(h), _) => escape(h),
                (_, _, Value::String(e)) => format!("could not render: {}", escape(e)),
                _ => String::new(),
            };
            out.push_str(&format!(
                "<details><summary>Content</summary><pre>{body}</pre></details>"
            ));
        }
        out.push_str("</li>");
    }
    out.push_str("</ol>");
    out
}

/// The kind of a timeline item and one line about it, as HTML.
fn summary(item: &Value) -> (&'static str, String) {
    match item["kind"].as_str().unwrap_or_default() {
        "event" => (
            "Event",
            format!("{} ({})", text(&item["type"]), text(&item["status"])),
        ),
        "run_started" => ("Run started", text(&item["workflow"])),
        "step" => (
            "Step",
            format!(
                "{} · {} {}: {}",
                text(&item["workflow"]),
                text(&item["step"]),
                text(&item["step_id"]),
                text(&item["outcome"])
            ),
        ),
        "run_ended" => (
            "Run ended",
            format!(
                "{}: {} {}",
                text(&item["workflow"]),
                text(&item["state"]),
                text(&item["reason"])
            ),
        ),
        "message" => (
            "Message",
            format!(
                "{} to {}: {} · <b>{}</b> {} ({} attempts)",
                text(&item["channel"]),
                text(&item["recipient"]),
                text(&item["subject"]),
                text(&item["status"]),
                text(&item["reason"]),
                text(&item["attempts"])
            ),
        ),
        "opt_out" => (
            "Opt-out",
            format!("{} ({})", text(&item["channel"]), text(&item["source"])),
        ),
        "link" => (
            "Sign-in link",
            format!(
                "{} {} {}",
                text(&item["link"]),
                text(&item["action"]),
                text(&item["reason"])
            ),
        ),
        _ => ("Record", text(item)),
    }
}
