//! The HTTP routes, one module per area.

mod admin;
mod cross_site;
mod enrollments;
mod events;
mod health;
mod links;
mod login_mail;
mod mailbox;
pub mod metrics;
mod portal;
mod sms;
mod suppressions;
mod timeline_page;
mod unsubscribe;

use crate::AppState;
use axum::Router;
use axum::routing::{get, post};
use std::time::Duration;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;

/// Event requests handled at once by default (each may hold a body of up to 1 MiB): 128 MiB at
/// most, and twice what the benchmarks keep in flight.
pub const MAX_EVENT_REQUESTS_IN_FLIGHT: usize = 128;

/// The whole HTTP surface; tests may call it without a socket.
pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route(
            "/v1/contacts/{id}/magic-link",
            post(admin::regenerate_contact_link),
        )
        .route("/v1/links/user", get(admin::user_link))
        .route(
            "/v1/links/user/regenerate",
            post(admin::regenerate_user_link),
        )
        .route("/v1/messages", get(admin::messages))
        .route("/v1/messages/retry", post(admin::retry_messages))
        .route("/v1/messages/{id}/retry", post(admin::retry_message))
        .route("/v1/runs/{id}/cancel", post(admin::cancel_run))
        .route("/v1/events", get(admin::events))
        .route("/v1/runs", get(admin::runs))
        .route(
            "/v1/contacts/{id}",
            get(admin::contact).delete(admin::erase),
        )
        .route("/v1/contacts/{id}/timeline", get(admin::timeline))
        .route("/v1/contacts/{id}/export", get(admin::export))
        .route(
            "/v1/suppressions",
            post(suppressions::suppress)
                .layer(axum::extract::DefaultBodyLimit::max(
                    suppressions::MAX_CSV_BYTES,
                ))
                .get(suppressions::list),
        )
        .route(
            "/v1/contacts/{id}/opt-outs",
            post(suppressions::set_opt_out),
        )
        .route("/v1/workflows/reload", post(admin::reload))
        .route("/v1/workflows/{id}/enrollments", post(enrollments::enroll))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::require_token,
        ));
    // The pages a browser posts forms from (a learner's; the team's timeline page).
    let browser = Router::new()
        .route("/l/{token}", get(links::show).post(links::redeem))
        .route("/l/{token}/new-link", post(links::new_link))
        .route("/portal", get(portal::show))
        .route("/portal/logout", post(portal::logout))
        .route(
            "/u/{token}",
            get(unsubscribe::show).post(unsubscribe::unsubscribe),
        )
        .route(
            "/admin/contacts/{id}/timeline",
            get(timeline_page::show).post(timeline_page::show_posted),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cross_site::refuse_cross_site_posts,
        ));
    let mut router = Router::new()
        .route("/v1/events", post(events::post_events))
        .route("/v1/sms/inbound", post(sms::inbound))
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(metrics::render))
        .merge(browser)
        .merge(admin);
    if state.dev_mailbox {
        router = router
            .route("/dev/mailbox", get(mailbox::page))
            .route("/dev/mailbox.json", get(mailbox::json));
    }
    router
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(30),
        ))
        .layer(CatchPanicLayer::new())
        .with_state(state)
}
