//! The test harness: `spawn_app` builds the whole application on port 0 with its workflows in a
//! temporary folder, its database on SQLite (a temp file) or PostgreSQL (a fresh schema), a real
//! SMTP sink and, when asked, a manual clock; `TestApp` signs and posts events, waits for the
//! engine, and reads the store for assertions.

#![allow(dead_code)]

use herald_channels::email::SmtpSender;
use herald_core::signature::WebhookSecret;
use herald_engine::{Clock, EngineConfig, Sources};
use herald_server::{AppState, Application, Settings};
use herald_store::{ListFilter, MessageRow, MessageStatus, RunRow, Store, Timestamp};
use herald_test_support::current_test;
use herald_test_support::postgres::TestSchema;
use herald_test_support::smtp::{ReceivedMail, SmtpSink};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Base of herald's links; its host names generated `Message-ID`s.
pub const PUBLIC_URL: &str = "http://herald.test";
/// The `source` of every event the tests post.
pub const SOURCE: &str = "https://school.example.com";
/// The configured default `From`.
pub const EMAIL_FROM: &str = "Herald Test <noreply@herald.test>";
/// The configured `[custom_values] support_email`.
pub const SUPPORT_EMAIL: &str = "help@school.example.com";
/// How long `wait_for` waits before failing the test.
pub const WAIT: Duration = Duration::from_secs(15);
/// 2026-11-24T10:00:00Z, where manual clocks start.
pub const START_MS: i64 = 1_795_514_400_000;
/// [`START_MS`] as the clock reads it.
pub const START: Timestamp = Timestamp::from_millis(START_MS);

pub const CLOUDEVENT: &str = "application/cloudevents+json";
pub const CLOUDEVENT_BATCH: &str = "application/cloudevents-batch+json";

/// Generates a `sqlite` and a `postgres` test for each `async fn NAME(backend: Backend)`.
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => { $(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::helpers::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::helpers::Backend::Postgres).await
            }
        }
    )+ };
}

/// The secret herald verifies with in these tests.
pub fn secret() -> WebhookSecret {
    WebhookSecret::from_bytes(
        (0u8..32)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect(),
    )
    .expect("valid key")
}

/// reqwest is built with `rustls-no-provider`: install ring once per process.
pub fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// How a test wants its application.
#[derive(Clone)]
pub struct TestOptions {
    pub backend: Backend,
    /// `workflows/NAME` files (name with `.yaml`) and their text.
    pub workflows: Vec<(String, String)>,
    /// `templates/NAME` files.
    pub templates: Vec<(String, String)>,
    /// `false`: no SMTP, emails go to the dev mailbox.
    pub smtp: bool,
    pub dev: bool,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub event_requests_in_flight: usize,
    /// `Some(start)`: a manual clock starting there.
    pub manual_clock: Option<Timestamp>,
    pub lease: Duration,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub max_attempts: i64,
    pub poll_interval: Duration,
    pub custom_values: BTreeMap<String, String>,
    /// `HERALD_PUBLIC_URL`: the base of every link (the server itself still listens on http).
    pub public_url: String,
    /// `HERALD_ADMIN_TOKEN`; `None` turns the admin API off.
    pub admin_token: Option<String>,
    /// Magic-link redemption attempts allowed per client address and minute.
    pub redeem_per_minute: u32,
    /// `HERALD_LEARNER_LINK_TTL`.
    pub learner_ttl: Duration,
    /// `HERALD_LEARNER_LINK_USES`.
    pub learner_uses: i64,
    /// The SMS provider (`HERALD_SMS_URL` …); `None`: SMS go to the dev mailbox.
    pub sms: Option<herald_channels::sms::SmsSender>,
    /// `HERALD_STALL_LIMIT`.
    pub stall_limit: Duration,
    /// Fault injection into the engine.
    pub fault_hook: Option<herald_engine::FaultHook>,
}

impl TestOptions {
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            workflows: Vec::new(),
            templates: Vec::new(),
            smtp: true,
            dev: false,
            trusted_proxies: Vec::new(),
            event_requests_in_flight: herald_server::MAX_EVENT_REQUESTS_IN_FLIGHT,
            manual_clock: None,
            lease: Duration::from_secs(30),
            retry_base: Duration::from_millis(20),
            retry_cap: Duration::from_millis(200),
            max_attempts: 8,
            poll_interval: Duration::from_millis(20),
            custom_values: BTreeMap::from([("support_email".to_owned(), SUPPORT_EMAIL.to_owned())]),
            public_url: PUBLIC_URL.to_owned(),
            admin_token: None,
            redeem_per_minute: 60,
            learner_ttl: Duration::from_secs(24 * 3600),
            learner_uses: 5,
            sms: None,
            stall_limit: Duration::from_secs(60),
            fault_hook: None,
        }
    }

    pub fn stall_limit(mut self, limit: Duration) -> Self {
        self.stall_limit = limit;
        self
    }

    /// Calls `hook` before the engine processes each item (e.g. to panic for one contact).
    pub fn fault_hook(mut self, hook: herald_engine::FaultHook) -> Self {
        self.fault_hook = Some(hook);
        self
    }

    /// Adds `workflows/{id}.yaml`.
    /// How long an idle loop sleeps when nothing wakes it.
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll_interval = poll;
        self
    }

    pub fn workflow(mut self, id: &str, yaml: &str) -> Self {
        self.workflows.push((format!("{id}.yaml"), yaml.to_owned()));
        self
    }

    /// Adds `templates/{file}` (e.g. `welcome.html.hbs`).
    pub fn template(mut self, file: &str, text: &str) -> Self {
        self.templates.push((file.to_owned(), text.to_owned()));
        self
    }

    pub fn without_smtp(mut self) -> Self {
        self.smtp = false;
        self
    }

    /// Event requests handled at once before 503.
    pub fn event_requests_in_flight(mut self, n: usize) -> Self {
        self.event_requests_in_flight = n;
        self
    }

    /// `HERALD_TRUSTED_PROXIES`.
    pub fn trusted_proxy(mut self, cidr: &str) -> Self {
        self.trusted_proxies.push(cidr.parse().expect("a CIDR"));
        self
    }

    /// As `herald serve --dev`: the dev mailbox page is served.
    pub fn dev(mut self) -> Self {
        self.dev = true;
        self
    }

    pub fn manual_clock(mut self) -> Self {
        self.manual_clock = Some(START);
        self
    }

    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    pub fn retries(mut self, base: Duration, cap: Duration, max_attempts: i64) -> Self {
        self.retry_base = base;
        self.retry_cap = cap;
        self.max_attempts = max_attempts;
        self
    }

    /// Sends SMS through this provider instead of the dev mailbox.
    pub fn sms(mut self, sender: herald_channels::sms::SmsSender) -> Self {
        self.sms = Some(sender);
        self
    }

    /// Turns the admin API on with this bearer token (`HERALD_ADMIN_TOKEN`).
    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.to_owned());
        self
    }
}

/// What outlives one process of the application: its folders and its database.
pub struct Env {
    pub root: TempDir,
    pub workflows: PathBuf,
    pub templates: PathBuf,
    pub database_url: String,
    pub backend: Backend,
    /// The PostgreSQL schema, shared by every process on it and dropped after the last.
    pg_schema: Option<Arc<TestSchema>>,
}

/// A running application and handles to everything around it.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    pub port: u16,
    pub client: reqwest::Client,
    pub store: Store,
    pub state: AppState,
    pub clock: Clock,
    /// The SMTP server herald sends to (`None` when the dev mailbox is used).
    pub smtp: Option<SmtpSink>,
    pub env: Arc<Env>,
    pub options: TestOptions,
    server: Option<JoinHandle<std::io::Result<()>>>,
    shutdown: Option<oneshot::Sender<()>>,
}

/// What is left after [`TestApp::crash`]: enough to start the next process on the same database.
pub struct Crashed {
    pub env: Arc<Env>,
    pub options: TestOptions,
    pub smtp: Option<SmtpSink>,
    pub clock: Clock,
}

impl Crashed {
    /// Starts a new process on the same database, folders, SMTP sink and clock.
    pub async fn restart(self) -> TestApp {
        launch(self.env, self.options, self.smtp, self.clock).await
    }
}

/// Builds and starts the application; `None` when the test must be skipped (PostgreSQL not
/// reachable outside CI).
pub async fn spawn_app(options: TestOptions) -> Option<TestApp> {
    install_crypto();
    let root = tempfile::tempdir().expect("temp dir");
    let pg_schema = match options.backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(Arc::new(TestSchema::create(&current_test()).await?)),
    };
    let database_url = match &pg_schema {
        Some(schema) => schema.url().to_owned(),
        None => format!("sqlite://{}", root.path().join("herald.db").display()),
    };
    let workflows = root.path().join("workflows");
    let templates = root.path().join("templates");
    std::fs::create_dir_all(&workflows).unwrap();
    std::fs::create_dir_all(&templates).unwrap();
    for (name, text) in &options.workflows {
        std::fs::write(workflows.join(name), text).unwrap();
    }
    for (name, text) in &options.templates {
        std::fs::write(templates.join(name), text).unwrap();
    }
    let env = Arc::new(Env {
        root,
        workflows,
        templates,
        database_url,
        backend: options.backend,
        pg_schema,
    });
    let smtp = if options.smtp {
        Some(SmtpSink::start().await)
    } else {
        None
    };
    let clock = match options.manual_clock {
        Some(start) => Clock::manual(start),
        None => Clock::System,
    };
    Some(launch(env, options, smtp, clock).await)
}

async fn launch(
    env: Arc<Env>,
    options: TestOptions,
    smtp: Option<SmtpSink>,
    clock: Clock,
) -> TestApp {
    let mut engine = EngineConfig::new(options.public_url.as_str());
    engine.links.learner_ttl = options.learner_ttl;
    engine.links.learner_uses = options.learner_uses;
    engine.links.user_link_secret = options.admin_token.clone().map(Into::into);
    engine.email_from = EMAIL_FROM.into();
    engine.custom_values = options.custom_values.clone();
    engine.smtp = smtp
        .as_ref()
        .map(|s| SmtpSender::from_url(&s.url()).expect("sink URL"));
    engine.lease = options.lease;
    engine.retry_base = options.retry_base;
    engine.retry_cap = options.retry_cap;
    engine.max_attempts = options.max_attempts;
    engine.poll_interval = options.poll_interval;
    engine.sms = options.sms.clone();
    engine.stall_limit = options.stall_limit;
    engine.fault_hook = options.fault_hook.clone();
    let settings = Settings {
        database_url: env.database_url.clone(),
        listen: Some("127.0.0.1:0".into()),
        secrets: vec![secret()],
        sources: Sources {
            workflows: env.workflows.clone(),
            templates: env.templates.clone(),
        },
        engine,
        clock: clock.clone(),
        admin_token: options.admin_token.clone(),
        redeem_per_minute: options.redeem_per_minute,
        trusted_proxies: options.trusted_proxies.clone(),
        event_requests_in_flight: options.event_requests_in_flight,
        dev: options.dev,
    };
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(e) => panic!("Application::build failed: {e}"),
    };
    let port = app.port();
    let state = app.state().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run(async move {
        let _ = rx.await;
    }));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        client,
        store: state.store.clone(),
        state,
        clock,
        smtp,
        env,
        options,
        server: Some(server),
        shutdown: Some(tx),
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

impl TestApp {
    /// The SMTP sink (panics if the app uses the dev mailbox).
    pub fn sink(&self) -> &SmtpSink {
        self.smtp.as_ref().expect("this app was built without SMTP")
    }

    /// Kills the process: the server and the engine loops stop where they stand (claims stay
    /// until their lease runs out), nothing is drained.
    pub async fn crash(mut self) -> Crashed {
        let server = self.server.take().expect("running");
        server.abort();
        let _ = server.await;
        Crashed {
            env: self.env.clone(),
            options: self.options.clone(),
            smtp: self.smtp.clone(),
            clock: self.clock.clone(),
        }
    }

    /// Graceful stop: in-flight requests finish and the engine completes its current batches.
    pub async fn shutdown(mut self) -> Crashed {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let server = self.server.take().expect("running");
        server
            .await
            .expect("server task")
            .expect("server stopped cleanly");
        Crashed {
            env: self.env.clone(),
            options: self.options.clone(),
            smtp: self.smtp.clone(),
            clock: self.clock.clone(),
        }
    }

    /// A second process on the same database, SMTP sink and clock, with its own copy of the
    /// workflow and template folders (as on another machine) and these options.
    pub async fn another_process(&self, options: TestOptions) -> TestApp {
        let root = tempfile::tempdir().expect("temp dir");
        let copy = |from: &PathBuf, name: &str| {
            let to = root.path().join(name);
            std::fs::create_dir_all(&to).unwrap();
            for entry in std::fs::read_dir(from).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
            to
        };
        let workflows = copy(&self.env.workflows, "workflows");
        let templates = copy(&self.env.templates, "templates");
        let env = Arc::new(Env {
            database_url: self.env.database_url.clone(),
            backend: self.env.backend,
            pg_schema: self.env.pg_schema.clone(),
            root,
            workflows,
            templates,
        });
        launch(env, options, self.smtp.clone(), self.clock.clone()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    /// Standard Webhooks headers for `body`, signed with [`secret`] at the app's current time.
    pub fn signature_headers(&self, body: &[u8]) -> Vec<(&'static str, String)> {
        let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
        let ts = self.clock.now_utc().timestamp();
        vec![
            ("webhook-id", id.clone()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", secret().sign(&id, ts, body)),
        ]
    }

    /// Posts `body` to `/v1/events` with exactly these headers.
    pub async fn post_raw(
        &self,
        body: impl Into<Vec<u8>>,
        headers: &[(&str, String)],
    ) -> reqwest::Response {
        let mut req = self.client.post(self.url("/v1/events")).body(body.into());
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        req.send().await.expect("POST /v1/events")
    }

    /// Posts a correctly signed body with this content type.
    pub async fn post_signed(
        &self,
        body: impl Into<Vec<u8>>,
        content_type: &str,
    ) -> reqwest::Response {
        let body = body.into();
        let mut headers = self.signature_headers(&body);
        headers.push(("content-type", content_type.to_owned()));
        self.post_raw(body, &headers).await
    }

    pub async fn post_event(&self, event: &Value) -> reqwest::Response {
        self.post_signed(serde_json::to_vec(event).unwrap(), CLOUDEVENT)
            .await
    }

    pub async fn post_batch(&self, events: &[Value]) -> reqwest::Response {
        self.post_signed(serde_json::to_vec(events).unwrap(), CLOUDEVENT_BATCH)
            .await
    }

    /// Posts one event, asserts `202` and returns its status (`new` or `duplicate`).
    pub async fn accept(&self, event: &Value) -> String {
        let statuses = expect_202(self.post_event(event).await).await;
        assert_eq!(statuses.len(), 1);
        statuses.into_iter().next().unwrap()
    }

    /// Posts a batch, asserts `202` and returns the statuses in order.
    pub async fn accept_batch(&self, events: &[Value]) -> Vec<String> {
        let statuses = expect_202(self.post_batch(events).await).await;
        assert_eq!(statuses.len(), events.len());
        statuses
    }

    /// `/healthz` answers 200 and a fresh valid event is still accepted.
    pub async fn assert_healthy(&self) {
        let health = self.get("/healthz").await;
        assert_eq!(health.status(), 200, "healthz after refusals");
        let probe = event(
            "new_signup",
            json!({"contact": {"id": format!("probe_{}", new_id())}}),
        );
        assert_eq!(
            self.accept(&probe).await,
            "new",
            "a valid event after refusals"
        );
    }

    /// `GET path` with the configured admin token; the status and the JSON body.
    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        self.admin_json(reqwest::Method::GET, path).await
    }

    /// `POST path` (no body) with the configured admin token; the status and the JSON body.
    pub async fn admin_post(&self, path: &str) -> (u16, Value) {
        self.admin_json(reqwest::Method::POST, path).await
    }

    /// `POST path` with a JSON body and extra headers, with the configured admin token.
    pub async fn admin_post_json(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut request = self.client.post(self.url(path)).json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.admin_send(reqwest::Method::POST, path, request).await
    }

    async fn admin_json(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let request = self.client.request(method.clone(), self.url(path));
        self.admin_send(method, path, request).await
    }

    async fn admin_send(
        &self,
        method: reqwest::Method,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> (u16, Value) {
        let token = self
            .options
            .admin_token
            .as_deref()
            .expect("this app was built without an admin token (TestOptions::admin_token)");
        let response = request
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("{method} {path} answered {status}, not JSON ({e}): {text}")
        });
        (status, body)
    }

    /// `GET /healthz`: the status and the JSON body.
    pub async fn health(&self) -> (u16, Value) {
        let response = self.get("/healthz").await;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("/healthz answered {status}, not JSON ({e}): {text}"));
        (status, body)
    }

    /// The value of one sample of `/metrics`, named with its labels exactly as exported
    /// (`herald_dead_total{queue="events"}`); `None` when the scrape does not have it.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let text = self
            .get("/metrics")
            .await
            .text()
            .await
            .expect("/metrics body");
        text.lines().find_map(|line| {
            let value = line.strip_prefix(sample)?.strip_prefix(' ')?;
            value.trim().parse().ok()
        })
    }

    /// Moves a manual clock and wakes the engine.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
        self.state.wakers.all();
    }

    pub async fn messages(&self) -> Vec<MessageRow> {
        self.store
            .messages(ListFilter {
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("store.messages")
    }

    pub async fn messages_of(&self, contact_id: &str) -> Vec<MessageRow> {
        self.store
            .messages(ListFilter {
                contact_id: Some(contact_id.into()),
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("store.messages")
    }

    pub async fn runs(&self) -> Vec<RunRow> {
        self.store
            .runs(ListFilter {
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("store.runs")
    }

    pub async fn runs_of(&self, contact_id: &str) -> Vec<RunRow> {
        self.store
            .runs(ListFilter {
                contact_id: Some(contact_id.into()),
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("store.runs")
    }

    /// Waits until nothing is due: every stored event dispatched, no run or queued message due
    /// at the clock's "now" (a claimed job stays due until it is finished). Then negative
    /// assertions ("no second message") are sound.
    pub async fn settle(&self) {
        self.state.wakers.all();
        let mut last = String::new();
        let ok = eventually(async || {
            let undispatched = self
                .store
                .undispatched_count()
                .await
                .expect("undispatched_count");
            let next_due = self.store.next_due().await.expect("next_due");
            let now = self.clock.now();
            last = format!("undispatched events {undispatched}, next due {next_due:?}, now {now}");
            undispatched == 0 && next_due.is_none_or(|d| d > now)
        })
        .await;
        if !ok {
            panic!(
                "the engine did not settle within {WAIT:?}: {last}\nmessages: {:#?}\nruns: {:#?}",
                self.messages().await,
                self.runs().await
            );
        }
    }

    /// Waits until the sink holds at least `n` messages; returns all of them.
    pub async fn wait_for_mails(&self, n: usize) -> Vec<ReceivedMail> {
        let sink = self.sink();
        if !eventually(async || sink.count() >= n).await {
            panic!(
                "expected {n} emails at the SMTP sink, got {} within {WAIT:?}\nrefusals: {:?}\nmessages: {:#?}\nruns: {:#?}",
                sink.count(),
                sink.refusals()
                    .iter()
                    .map(|r| (r.stage, r.code))
                    .collect::<Vec<_>>(),
                self.messages().await,
                self.runs().await
            );
        }
        sink.received()
    }

    /// Waits until the store holds `n` messages in status `status`; returns every message.
    pub async fn wait_for_status(&self, n: usize, status: MessageStatus) -> Vec<MessageRow> {
        let mut rows = Vec::new();
        let ok = eventually(async || {
            rows = self.messages().await;
            rows.iter().filter(|m| m.status == status).count() >= n
        })
        .await;
        if !ok {
            panic!(
                "expected {n} messages {status:?} within {WAIT:?}; messages: {rows:#?}\nruns: {:#?}",
                self.runs().await
            );
        }
        rows
    }
}

/// Asserts `202` and returns each event's status.
pub async fn expect_202(response: reqwest::Response) -> Vec<String> {
    let status = response.status();
    let body: Value = response.json().await.expect("JSON answer");
    assert_eq!(status, 202, "expected 202, got {status}: {body}");
    body["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events list in {body}"))
        .iter()
        .map(|e| e["status"].as_str().expect("status").to_owned())
        .collect()
}

/// Asserts the status and returns the JSON error body.
pub async fn expect_error(response: reqwest::Response, status: u16) -> Value {
    let got = response.status();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(got.as_u16(), status, "expected {status}, got {got}: {text}");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text}"));
    assert!(
        body["error"].as_str().is_some_and(|s| !s.is_empty()),
        "error body without an `error` message: {body}"
    );
    body
}

/// Polls `check` every 10 ms for up to [`WAIT`]; whether it came true.
pub async fn eventually(check: impl AsyncFnMut() -> bool) -> bool {
    eventually_within(WAIT, check).await
}

/// Polls `check` every 10 ms for up to `timeout`; whether it came true. For "this must not
/// happen" checks, with a timeout a few times longer than the thing would take.
pub async fn eventually_within(timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `check` until it holds; fails the test naming `what` otherwise.
pub async fn wait_for(what: &str, check: impl AsyncFnMut() -> bool) {
    if !eventually(check).await {
        panic!("timed out after {WAIT:?} waiting for {what}");
    }
}

// ----- events -----

pub fn new_id() -> String {
    format!("evt_{}", uuid::Uuid::now_v7().simple())
}

/// A CloudEvents envelope of `course.{trigger}` with a fresh id; `time` is left out (herald then
/// uses the time of receipt), set it with [`at`].
pub fn event(trigger: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": new_id(),
        "source": SOURCE,
        "type": format!("course.{trigger}"),
        "data": data,
    })
}

/// Sets the event's `time`.
pub fn at(mut event: Value, time: &str) -> Value {
    event["time"] = json!(time);
    event
}

/// A contact with an email address derived from its id and a first name.
pub fn contact(id: &str, first_name: &str) -> Value {
    json!({"id": id, "email": format!("{id}@example.com"), "first_name": first_name})
}

pub fn offer(id: &str, title: &str) -> Value {
    json!({"id": id, "title": title, "product_ids": ["p_rust101", "p_async"]})
}

pub fn product(id: &str, title: &str) -> Value {
    json!({"id": id, "title": title, "url": format!("https://school.example.com/p/{id}")})
}

pub fn offer_granted(contact: Value, offer_id: &str) -> Value {
    event(
        "offer_access_granted",
        json!({"contact": contact, "offer": offer(offer_id, "Rust Pro")}),
    )
}

pub fn offer_removed(contact: Value, offer_id: &str) -> Value {
    event(
        "offer_access_removed",
        json!({"contact": contact, "offer": offer(offer_id, "Rust Pro")}),
    )
}

pub fn lesson_completed(contact: Value, product_id: &str, lesson_title: &str) -> Value {
    event(
        "lesson_completed",
        json!({
            "contact": contact,
            "product": product(product_id, "Rust 101"),
            "category": {"id": "cat_w1", "title": "Week 1"},
            "lesson": {"id": format!("l_{}", lesson_title.to_lowercase()), "title": lesson_title},
        }),
    )
}

pub fn product_completed(contact: Value, product_id: &str) -> Value {
    event(
        "product_completed",
        json!({"contact": contact, "product": product(product_id, "Rust 101")}),
    )
}

pub fn new_signup(contact: Value) -> Value {
    event("new_signup", json!({"contact": contact}))
}

/// A one-step workflow: an inline email on `trigger`.
pub fn one_email_workflow(trigger: &str, subject: &str, re_entry: bool) -> String {
    format!(
        "name: One email\ntrigger:\n  event: {trigger}\nre_entry: {re_entry}\nsteps:\n  - id: only\n    send_email:\n      subject: \"{subject}\"\n      text: \"Hello {{{{default contact.first_name 'there'}}}}\"\n"
    )
}
