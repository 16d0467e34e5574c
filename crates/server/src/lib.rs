//! herald's HTTP server and the composition of the whole application: `Application::build` opens
//! the store, loads the workflows, starts the engine and binds the listener (port 0 in tests), in
//! the manner of zero-to-production; `run` serves until the shutdown future resolves and then
//! drains, in the manner of mini-redis.

mod app;
mod client_ip;
mod error;
mod html;
mod routes;

pub use app::{Application, BuildError, Settings, redact_url};
pub use routes::{MAX_EVENT_REQUESTS_IN_FLIGHT, router};

use herald_core::signature::WebhookSecret;
use herald_engine::{Clock, Registry, Wakers};
use herald_store::Store;
use std::sync::Arc;

/// What every request handler may use.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// Verification keys of `HERALD_WEBHOOK_SECRET` (several during rotation).
    pub secrets: Arc<Vec<WebhookSecret>>,
    pub clock: Clock,
    /// Wake the engine after new events are stored.
    pub wakers: Arc<Wakers>,
    /// The engine loops' health (`/healthz`); pausing and resuming them.
    pub loops: Arc<herald_engine::Loops>,
    pub registry: Arc<Registry>,
    /// Whether messages go to the dev mailbox (then `/dev/mailbox` is served).
    pub dev_mailbox: bool,
    /// Links, the From address, SMTP and custom values, for the login-link email.
    pub engine: herald_engine::EngineConfig,
    /// Where `login_link.*` templates may override the built-in ones.
    pub templates: std::path::PathBuf,
    /// `HERALD_ADMIN_TOKEN`; `None` turns the admin API off.
    pub admin_token: Option<Arc<str>>,
    /// Event requests being read, verified or stored at once; more are answered 503 before
    /// their body is read, so bodies in memory stay bounded.
    pub intake_slots: Arc<tokio::sync::Semaphore>,
    /// Redemption attempts per client address (GCRA, keyed by IP).
    pub redeem_limiter: Arc<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>,
    /// Views of a link's page (`GET /l/{token}`, what mail scanners fetch) per client address:
    /// counted apart from redemptions, with ten times their budget.
    pub view_limiter: Arc<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>,
    /// Proxies whose `X-Forwarded-For` / `Forwarded` name the client (`HERALD_TRUSTED_PROXIES`).
    pub trusted_proxies: Arc<Vec<ipnet::IpNet>>,
}
