//! `/l/{token}`: magic-link redemption. GET and HEAD change nothing and show one "Continue"
//! button, so a mail scanner that fetches every link neither uses one up nor gets a session;
//! POST redeems atomically and starts a session.

use super::portal::{SESSION_TTL, session_cookie};
use crate::AppState;
use crate::error::ApiError;
use crate::html::{escape, no_store, page, private_page};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_engine::links::{self, looks_like_token};
use herald_store::{LinkKind, LinkRefusal, NewSession};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// "Email me a new link": at most one per 10 minutes and five a day per contact.
const RESEND_WINDOW: Duration = Duration::from_secs(10 * 60);
const RESEND_PER_DAY: i64 = 5;
const DAY: Duration = Duration::from_secs(24 * 3600);

pub async fn show(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    limit(&state.view_limiter, client(&state, peer, &headers))?;
    let checked = match looks_like_token(&token) {
        true => {
            state
                .store
                .check_link(links::hash(&token), state.clock.now())
                .await?
        }
        false => Err((LinkRefusal::Unknown, None)),
    };
    Ok(match checked {
        Ok(holder) => {
            let who = if holder.kind == LinkKind::User {
                "the staff view of the courses"
            } else {
                "your courses"
            };
            let body = format!(
                "<h1>Continue to {who}</h1><p>This sign-in link opens {who}. It was sent to you; press the button to continue.</p>\
                 <form method=\"post\" action=\"/l/{}\"><button type=\"submit\">Continue to {who}</button></form>",
                escape(&token)
            );
            private_page(StatusCode::OK, page("Continue to your courses", &body))
        }
        Err((reason, _)) => refusal_page(&token, reason),
    })
}

pub async fn redeem(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    limit(&state.redeem_limiter, client(&state, peer, &headers))
        .inspect_err(|_| redemption("rate_limited"))?;
    if !looks_like_token(&token) {
        redemption(LinkRefusal::Unknown.as_str());
        return Ok(refusal_page(&token, LinkRefusal::Unknown));
    }
    let now = state.clock.now();
    let session = links::generate();
    let expires = now + SESSION_TTL;
    let redeemed = state
        .store
        .redeem_link(
            links::hash(&token),
            now,
            NewSession {
                id_hash: session.hash,
                expires,
            },
            state.engine.public_url.clone(),
        )
        .await?;
    match redeemed {
        Ok(holder) => {
            if holder.kind == LinkKind::Learner {
                state.wakers.events_stored();
            }
            tracing::info!(kind = holder.kind.as_str(), "magic link redeemed");
            redemption("redeemed");
            let mut response =
                (StatusCode::SEE_OTHER, [(header::LOCATION, "/portal")]).into_response();
            let cookie = session_cookie(&state, &session.raw, SESSION_TTL.as_secs());
            response.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_str(&cookie).expect("cookie is ASCII"),
            );
            no_store(&mut response);
            Ok(response)
        }
        Err((reason, _)) => {
            tracing::info!(reason = reason.as_str(), "magic link refused");
            redemption(reason.as_str());
            Ok(refusal_page(&token, reason))
        }
    }
}

/// POST `/l/{token}/new-link`: sends a fresh link to the address on file of an expired or used-up
/// learner link. The answer is the same whatever happened, so it reveals no address.
pub async fn new_link(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    limit(&state.redeem_limiter, client(&state, peer, &headers))?;
    if looks_like_token(&token) {
        let now = state.clock.now();
        if let Err((LinkRefusal::Expired | LinkRefusal::UsedUp, Some(contact))) =
            state.store.check_link(links::hash(&token), now).await?
            // A link it could not use is not sent (and not minted).
            && state.store.has_active_offer(contact.clone()).await?
            && state
                .store
                .allow_link_resend(
                    contact.clone(),
                    now,
                    now - RESEND_WINDOW,
                    1,
                    now - DAY,
                    RESEND_PER_DAY,
                )
                .await?
            && let Err(e) = super::login_mail::send_new_link(&state, &contact).await
        {
            tracing::warn!(error = %e, "could not send a new login link");
        }
    }
    let body = "<h1>Check your inbox</h1><p>If this link belongs to an account with an email address on file, \
                a new sign-in link is on its way to that address. It can take a minute to arrive.</p>";
    Ok(private_page(StatusCode::OK, page("Check your inbox", body)))
}

/// Counts a redemption attempt (`POST /l/{token}`) by outcome: `redeemed`, a refusal reason
/// (`unknown`, `expired`, `used_up`, `revoked`, `not_entitled`) or `rate_limited`.
fn redemption(outcome: &'static str) {
    metrics::counter!("herald_link_redemptions_total", "outcome" => outcome).increment(1);
}

fn client(state: &AppState, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    crate::client_ip::client_ip(peer, headers, &state.trusted_proxies)
}

fn limit(
    limiter: &governor::DefaultKeyedRateLimiter<IpAddr>,
    client: IpAddr,
) -> Result<(), ApiError> {
    limiter.check_key(&client).map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many sign-in attempts from this address; wait a minute and try again",
        )
    })
}

fn refusal_page(token: &str, reason: LinkRefusal) -> Response {
    let (status, title, text) = match reason {
        LinkRefusal::Unknown => (
            StatusCode::NOT_FOUND,
            "This link is not valid",
            "We do not know this sign-in link. Check that you copied it completely, or open the link from your most recent email.",
        ),
        LinkRefusal::Expired => (
            StatusCode::GONE,
            "This link has expired",
            "Sign-in links work for a limited time. We can email you a new one.",
        ),
        LinkRefusal::UsedUp => (
            StatusCode::GONE,
            "This link has been used up",
            "This sign-in link has been opened as many times as it allows. We can email you a new one.",
        ),
        LinkRefusal::Revoked => (
            StatusCode::GONE,
            "This link was replaced",
            "A newer sign-in link was issued, which makes this one invalid. Open the link from your most recent email.",
        ),
        LinkRefusal::NotEntitled => (
            StatusCode::FORBIDDEN,
            "No active access",
            "This account has no active course access at the moment. If you think this is a mistake, contact the school.",
        ),
    };
    let mut body = format!("<h1>{title}</h1><p>{text}</p>");
    if matches!(reason, LinkRefusal::Expired | LinkRefusal::UsedUp) {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/l/{}/new-link\"><button type=\"submit\">Email me a new link</button></form>",
            escape(token)
        ));
    }
    private_page(status, page(title, &body))
}
