//! `/portal`: the membership portal a magic link opens. Entitlement is evaluated on every
//! request from the current grants, never copied into the session, so removing a learner's last
//! offer takes effect at once.

use crate::AppState;
use crate::error::ApiError;
use crate::html::{escape, page, private_page};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_engine::links;
use herald_store::LinkKind;
use std::time::Duration;

/// How long a portal session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The cookie's name: `__Host-` prefixed (which requires Secure, Path=/ and no Domain) when the
/// public URL is https.
fn cookie_name(state: &AppState) -> &'static str {
    if secure(state) {
        "__Host-herald_session"
    } else {
        "herald_session"
    }
}

fn secure(state: &AppState) -> bool {
    state.engine.public_url.starts_with("https://")
}

/// A `Set-Cookie` value for the session id (`max_age` 0 clears it).
pub fn session_cookie(state: &AppState, value: &str, max_age_secs: u64) -> String {
    let secure = if secure(state) { "; Secure" } else { "" };
    format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}{secure}",
        cookie_name(state)
    )
}

fn session_id<'a>(state: &AppState, headers: &'a HeaderMap) -> Option<&'a str> {
    let name = cookie_name(state);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| links::looks_like_token(v))
}

pub async fn show(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let holder = match session_id(&state, &headers) {
        Some(id) => state.store.session(links::hash(id), now).await?,
        None => None,
    };
    let Some(holder) = holder else {
        let body = "<h1>You are not signed in</h1><p>Open the sign-in link from your most recent course email or \
                    text message. Each link signs you in with one click, on any device.</p>\
                    <p>No link at hand? Ask the school to send you a new one.</p>";
        return Ok(private_page(
            StatusCode::UNAUTHORIZED,
            page("Sign in to your courses", body),
        ));
    };
    let (greeting, products) = match (holder.kind, &holder.contact_id) {
        (LinkKind::Learner, Some(contact)) => {
            let first = state
                .store
                .contact(contact.clone())
                .await?
                .and_then(|c| c.first_name)
                .filter(|n| !n.is_empty());
            let greeting = match first {
                Some(name) => format!("Welcome back, {}!", escape(&name)),
                None => "Welcome back!".to_owned(),
            };
            (
                greeting,
                state.store.portal_products(Some(contact.clone())).await?,
            )
        }
        _ => (
            "Staff view: every product in the catalogue".to_owned(),
            state.store.portal_products(None).await?,
        ),
    };
    let mut body = format!("<h1>{greeting}</h1>");
    if holder.kind == LinkKind::User {
        body.push_str("<p class=\"staff\"><strong>Staff view</strong>: you see all products.</p>");
    }
    if products.is_empty() {
        body.push_str("<p>You have no active courses at the moment.</p>");
    } else {
        body.push_str("<h2>Your courses</h2><ul class=\"products\">");
        for p in &products {
            let title = escape(p.title.as_deref().unwrap_or(&p.id));
            match p
                .url
                .as_deref()
                .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
            {
                Some(url) => {
                    body.push_str(&format!("<li><a href=\"{}\">{title}</a></li>", escape(url)))
                }
                None => body.push_str(&format!("<li>{title}</li>")),
            }
        }
        body.push_str("</ul>");
    }
    body.push_str("<form method=\"post\" action=\"/portal/logout\"><button type=\"submit\">Log out</button></form>");
    Ok(private_page(StatusCode::OK, page("Your courses", &body)))
}

pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(id) = session_id(&state, &headers) {
        state
            .store
            .end_session(links::hash(id), state.clock.now())
            .await?;
    }
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/portal")]).into_response();
    let cookie = session_cookie(&state, "", 0);
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("cookie is ASCII"),
    );
    Ok(response)
}
