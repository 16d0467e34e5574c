//! Building and running the whole application: the one composition root of `herald serve` (HTTP
//! and engine) and `herald worker` (the same without the HTTP listener), so both run with the
//! same keys, registry and engine.

use crate::{AppState, routes};
use herald_core::signature::WebhookSecret;
use herald_engine::{Clock, Engine, EngineConfig, Registry, RegistryError, Sources};
use herald_store::{Store, StoreError};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Everything `Application::build` needs, already parsed and validated by the CLI.
pub struct Settings {
    /// `sqlite://PATH` or `postgres://…`.
    pub database_url: String,
    /// Address to bind; port 0 picks a free one (tests). `None`: no HTTP, the engine only
    /// (`herald worker`).
    pub listen: Option<String>,
    pub secrets: Vec<WebhookSecret>,
    pub sources: Sources,
    pub engine: EngineConfig,
    pub clock: Clock,
    /// `HERALD_ADMIN_TOKEN`; `None` turns the admin API off.
    pub admin_token: Option<String>,
    /// Magic-link redemption attempts allowed per client address and minute (views of a link's
    /// page: ten times as many).
    pub redeem_per_minute: u32,
    /// Proxies whose forwarding headers name the client (`HERALD_TRUSTED_PROXIES`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Event requests handled at once; more are answered 503 (see
    /// [`crate::MAX_EVENT_REQUESTS_IN_FLIGHT`]).
    pub event_requests_in_flight: usize,
    /// `herald serve --dev`: serves the dev mailbox page, which shows every stored message and
    /// its sign-in links to anyone who can reach the server (local development only).
    pub dev: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("database {url}: {source}")]
    Store { url: String, source: StoreError },
    #[error(transparent)]
    Workflows(#[from] RegistryError),
    #[error("cannot listen on {addr}: {source} (set HERALD_LISTEN to a free address)")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

pub struct Application {
    listener: Option<TcpListener>,
    state: AppState,
    engine: Engine,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, BuildError> {
        routes::metrics::handle();
        let store = Store::connect(&settings.database_url)
            .await
            .map_err(|source| BuildError::Store {
                url: redact_url(&settings.database_url),
                source,
            })?;
        let mut settings = settings;
        let key = store
            .site_value(
                "unsubscribe_key".into(),
                herald_engine::links::generate().raw,
            )
            .await
            .map_err(|source| BuildError::Store {
                url: redact_url(&settings.database_url),
                source,
            })?;
        // The same site secret keys the erased contacts' address hashes (the hash separates
        // the two uses).
        store.set_address_key(herald_store::AddressKey::new(key.clone().into_bytes()));
        settings.engine.unsubscribe =
            herald_engine::unsubscribe::UnsubscribeKey::new(key.into_bytes());
        let custom: Vec<String> = settings.engine.custom_values.keys().cloned().collect();
        let registry = Arc::new(
            Registry::load(
                settings.sources.clone(),
                custom,
                store.clone(),
                settings.clock.now(),
            )
            .await?,
        );
        // The page is unauthenticated and shows links that sign learners in, so it exists only
        // when asked for with `--dev`; without it the stored messages are read with
        // `herald mailbox`.
        let dev_mailbox = settings.dev;
        let engine = Engine::start(
            store.clone(),
            registry.clone(),
            settings.engine.clone(),
            settings.clock.clone(),
        );
        let listener = match &settings.listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| BuildError::Listen {
                            addr: addr.clone(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let per_minute =
            std::num::NonZeroU32::new(settings.redeem_per_minute.max(1)).expect("at least 1");
        let state = AppState {
            store,
            secrets: Arc::new(settings.secrets),
            clock: settings.clock,
            wakers: engine.wakers(),
            loops: engine.loops(),
            registry,
            dev_mailbox,
            templates: settings.sources.templates.clone(),
            engine: settings.engine,
            admin_token: settings
                .admin_token
                .filter(|t| !t.is_empty())
                .map(Arc::from),
            intake_slots: Arc::new(tokio::sync::Semaphore::new(
                settings.event_requests_in_flight.max(1),
            )),
            redeem_limiter: Arc::new(governor::RateLimiter::keyed(governor::Quota::per_minute(
                per_minute,
            ))),
            view_limiter: Arc::new(governor::RateLimiter::keyed(governor::Quota::per_minute(
                per_minute.saturating_mul(std::num::NonZeroU32::new(10).expect("10")),
            ))),
            trusted_proxies: Arc::new(settings.trusted_proxies),
        };
        Ok(Self {
            listener,
            state,
            engine,
        })
    }

    /// The HTTP port, 0 without a listener.
    pub fn port(&self) -> u16 {
        self.listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(0, |a| a.port())
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops taking requests, lets those in flight finish
    /// and stops the engine after its current batches.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Some(listener) = self.listener else {
            shutdown.await;
            self.engine.shutdown().await;
            return Ok(());
        };
        let app = routes::router(self.state.clone());
        // The keyed limiters keep a cell per client address; forget idle ones now and then.
        let limiters = [
            self.state.redeem_limiter.clone(),
            self.state.view_limiter.clone(),
        ];
        let cleanup = tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tick.tick().await;
                for limiter in &limiters {
                    limiter.retain_recent();
                }
            }
        });
        let served = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await;
        cleanup.abort();
        self.engine.shutdown().await;
        served
    }
}

/// A database URL without its password (`user:password@` or a `password=` parameter), for
/// error messages.
pub fn redact_url(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    };
    if let Some((base, query)) = out.split_once('?') {
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{base}?{}", query.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            super::redact_url("sqlite://herald.db"),
            "sqlite://herald.db"
        );
        assert_eq!(
            super::redact_url("postgres://u@h/db?sslmode=require&password=hunter2"),
            "postgres://u@h/db?sslmode=require&password=***"
        );
    }
}
