//! What the magic-link, portal and browser tests need beyond the shared harness: options for the
//! link policy and the admin API, a cookie jar per "device" over a client that does not follow
//! redirects, token extraction from received emails, raw reads of the link tables, and a log
//! capture.

#![allow(dead_code)]

use crate::helpers::*;
use serde_json::{Value, json};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The `HERALD_ADMIN_TOKEN` of these tests.
pub const ADMIN_TOKEN: &str = "adm_4f1c0b7e2d9a44e8b3c6a1f0e5d7c9b2";

/// Event times before the manual clock's start (2026-11-24T10:00:00Z), in order.
pub const T_GRANT: &str = "2026-11-24T08:00:00Z";
pub const T_LATER: &str = "2026-11-24T09:00:00Z";
pub const T_LATEST: &str = "2026-11-24T09:30:00Z";

impl TestOptions {
    /// Turns the admin API on with [`ADMIN_TOKEN`].
    pub fn admin(mut self) -> Self {
        self.admin_token = Some(ADMIN_TOKEN.to_owned());
        self
    }

    /// `HERALD_PUBLIC_URL` (configuration only: the server still listens on plain http).
    pub fn public_url(mut self, url: &str) -> Self {
        self.public_url = url.to_owned();
        self
    }

    pub fn redeem_per_minute(mut self, n: u32) -> Self {
        self.redeem_per_minute = n;
        self
    }

    /// `HERALD_LEARNER_LINK_TTL` and `HERALD_LEARNER_LINK_USES`.
    pub fn learner_links(mut self, ttl: Duration, uses: i64) -> Self {
        self.learner_ttl = ttl;
        self.learner_uses = uses;
        self
    }
}

/// The defaults of this area: manual clock, admin API on, SMTP sink.
pub fn link_options(backend: Backend) -> TestOptions {
    TestOptions::new(backend).manual_clock().admin()
}

// ----- events -----

/// An offer with explicit products.
pub fn offer_with(id: &str, title: &str, product_ids: &[&str]) -> Value {
    json!({"id": id, "title": title, "product_ids": product_ids})
}

pub fn grant_offer(contact: Value, offer: Value, time: &str) -> Value {
    at(
        event(
            "offer_access_granted",
            json!({"contact": contact, "offer": offer}),
        ),
        time,
    )
}

pub fn remove_offer(contact: Value, offer: Value, time: &str) -> Value {
    at(
        event(
            "offer_access_removed",
            json!({"contact": contact, "offer": offer}),
        ),
        time,
    )
}

pub fn grant_product(contact: Value, id: &str, title: &str, time: &str) -> Value {
    at(
        event(
            "product_access_granted",
            json!({"contact": contact, "product": product(id, title)}),
        ),
        time,
    )
}

/// A `product_started` event: it grants nothing but teaches herald the product's title and URL.
pub fn product_seen(contact: Value, id: &str, title: &str) -> Value {
    at(
        event(
            "product_started",
            json!({"contact": contact, "product": product(id, title)}),
        ),
        T_GRANT,
    )
}

/// `o_pro` ("Rust Pro") holds p_rust101 ("Rust 101") and p_async ("Async Rust").
pub fn pro_offer() -> Value {
    offer_with("o_pro", "Rust Pro", &["p_rust101", "p_async"])
}

/// A learner holding `o_pro`, with the titles of its products in the catalogue. Waits until the
/// events are applied.
pub async fn enroll(app: &TestApp, id: &str, first_name: &str) -> Value {
    let c = contact(id, first_name);
    app.accept_batch(&[
        product_seen(c.clone(), "p_rust101", "Rust 101"),
        product_seen(c.clone(), "p_async", "Async Rust"),
        grant_offer(c.clone(), pro_offer(), T_GRANT),
    ])
    .await;
    app.settle().await;
    c
}

/// Waits for `n` emails at the SMTP sink, then a little longer, and asserts there are exactly `n`.
pub async fn expect_mail_count(app: &TestApp, n: usize, what: &str) {
    if n > 0 {
        app.wait_for_mails(n).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(app.sink().count(), n, "{what}");
}

// ----- tokens -----

/// Every magic-link token in `text` under the app's public URL, in order.
pub fn link_tokens(public_url: &str, text: &str) -> Vec<String> {
    let prefix = format!("{}/l/", public_url.trim_end_matches('/'));
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&prefix) {
        let after = &rest[i + prefix.len()..];
        let token: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        out.push(token);
        rest = after;
    }
    out
}

/// The one token in the text part of a received email.
pub fn token_in_mail(app: &TestApp, mail: &herald_test_support::smtp::ReceivedMail) -> String {
    let email = mail.parse();
    let text = email
        .text
        .clone()
        .unwrap_or_else(|| panic!("no text part in {email:?}"));
    let tokens = link_tokens(&app.options.public_url, &text);
    assert_eq!(
        tokens.len(),
        1,
        "expected exactly one magic link in the text part:\n{text}"
    );
    let token = tokens.into_iter().next().unwrap();
    assert_eq!(
        token.len(),
        43,
        "a token is 43 base64url characters: {token}"
    );
    token
}

/// The token of a link URL (`{public_url}/l/{token}`).
pub fn token_of_url(app: &TestApp, url: &str) -> String {
    let tokens = link_tokens(&app.options.public_url, url);
    assert_eq!(
        tokens.len(),
        1,
        "not a magic link URL under {}: {url}",
        app.options.public_url
    );
    assert_eq!(
        url,
        format!("{}/l/{}", app.options.public_url, tokens[0]),
        "unexpected link URL shape"
    );
    tokens.into_iter().next().unwrap()
}

// ----- admin API -----

impl TestApp {
    pub async fn admin_request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("admin request")
    }

    /// `{"url"}` of an admin endpoint called with this app's token; asserts 200.
    pub async fn admin_url(&self, method: reqwest::Method, path: &str) -> String {
        let token = self.options.admin_token.clone();
        let response = self.admin_request(method, path, token.as_deref()).await;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, 200, "admin {path}: {text}");
        let body: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        body["url"]
            .as_str()
            .unwrap_or_else(|| panic!("no url in {body}"))
            .to_owned()
    }

    /// A new learner link for the contact by the admin API (invalidates older ones); its token.
    pub async fn mint_token(&self, contact_id: &str) -> String {
        let url = self
            .admin_url(
                reqwest::Method::POST,
                &format!("/v1/contacts/{contact_id}/magic-link"),
            )
            .await;
        token_of_url(self, &url)
    }

    /// The database row of a link: (uses, revoked).
    pub async fn link_row(&self, token: &str) -> Option<(i64, bool)> {
        let hash = herald_engine::links::hash(token);
        let rows = query_rows(
            self,
            &format!("SELECT uses, revoked_ms FROM magic_links WHERE token_hash = '{hash}'"),
        )
        .await;
        rows.first()
            .map(|r| (r[0].parse().expect("uses"), r[1] != "NULL"))
    }
}

/// Runs a read-only query directly on the app's database; every value as text (`NULL` for null).
/// Columns must be text or integers.
pub async fn query_rows(app: &TestApp, sql: &str) -> Vec<Vec<String>> {
    use sqlx::{Connection, Row};
    match app.env.backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&app.env.database_url)
                .await
                .expect("open SQLite");
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_all(&mut conn)
                .await
                .expect(sql);
            let _ = conn.close().await;
            rows.iter()
                .map(|r| {
                    (0..r.columns().len())
                        .map(|i| {
                            r.try_get::<Option<String>, _>(i)
                                .map(|v| v.unwrap_or_else(|| "NULL".into()))
                                .or_else(|_| {
                                    r.try_get::<Option<i64>, _>(i)
                                        .map(|v| v.map_or("NULL".into(), |n| n.to_string()))
                                })
                                .or_else(|_| {
                                    r.try_get::<Option<f64>, _>(i)
                                        .map(|v| v.map_or("NULL".into(), |n| n.to_string()))
                                })
                                .or_else(|_| {
                                    r.try_get::<Option<Vec<u8>>, _>(i).map(|v| {
                                        v.map_or("NULL".into(), |b| {
                                            String::from_utf8_lossy(&b).into_owned()
                                        })
                                    })
                                })
                                .unwrap_or_else(|e| panic!("{sql}: column {i}: {e}"))
                        })
                        .collect()
                })
                .collect()
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&app.env.database_url)
                .await
                .expect("open PostgreSQL");
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_all(&mut conn)
                .await
                .expect(sql);
            let _ = conn.close().await;
            rows.iter()
                .map(|r| {
                    (0..r.columns().len())
                        .map(|i| {
                            r.try_get::<Option<String>, _>(i)
                                .map(|v| v.unwrap_or_else(|| "NULL".into()))
                                .or_else(|_| {
                                    r.try_get::<Option<i64>, _>(i)
                                        .map(|v| v.map_or("NULL".into(), |n| n.to_string()))
                                })
                                .or_else(|_| {
                                    r.try_get::<Option<bool>, _>(i)
                                        .map(|v| v.map_or("NULL".into(), |n| n.to_string()))
                                })
                                .unwrap_or_else(|e| panic!("{sql}: column {i}: {e}"))
                        })
                        .collect()
                })
                .collect()
        }
    }
}

/// Every row of a table as text, whatever its column types: every column (SQLite) or the
/// row's text form (PostgreSQL).
pub async fn table_dump(app: &TestApp, table: &str) -> Vec<Vec<String>> {
    match app.env.backend {
        Backend::Sqlite => query_rows(app, &format!("SELECT * FROM {table}")).await,
        Backend::Postgres => query_rows(app, &format!("SELECT t::text FROM {table} t")).await,
    }
}

// ----- a browser-like client per device -----

/// One device: a client that does not follow redirects and keeps the session cookie, as a
/// browser would.
pub struct Jar<'a> {
    app: &'a TestApp,
    client: reqwest::Client,
    /// `name=value` to send back.
    pub cookie: Option<String>,
    /// The last `Set-Cookie` received.
    pub set_cookie: Option<String>,
}

/// A page as a test sees it.
#[derive(Debug)]
pub struct Page {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Page {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn set_cookie(&self) -> Option<&str> {
        self.header("set-cookie")
    }

    /// Asserts the headers every link page carries.
    pub fn assert_private(&self) {
        assert_eq!(self.header("cache-control"), Some("no-store"), "{self:?}");
        assert_eq!(
            self.header("referrer-policy"),
            Some("no-referrer"),
            "{self:?}"
        );
    }

    /// Whether the page offers "Email me a new link" for this token.
    pub fn offers_new_link(&self, token: &str) -> bool {
        self.body
            .contains(&format!("action=\"/l/{token}/new-link\""))
            && self.body.contains("Email me a new link")
    }
}

/// A reqwest client that shows redirects instead of following them.
pub fn no_redirect_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn page(response: reqwest::Response) -> Page {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.text().await.unwrap_or_default();
    Page {
        status,
        headers,
        body,
    }
}

impl<'a> Jar<'a> {
    pub fn new(app: &'a TestApp) -> Self {
        Self {
            app,
            client: no_redirect_client(),
            cookie: None,
            set_cookie: None,
        }
    }

    /// A jar whose requests come from another loopback address (another client, for the
    /// per-address rate limit).
    pub fn from_address(app: &'a TestApp, ip: std::net::IpAddr) -> Self {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .local_address(ip)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        Self {
            app,
            client,
            cookie: None,
            set_cookie: None,
        }
    }

    /// A jar whose requests arrive through a proxy that names `client` in `X-Forwarded-For`.
    pub fn behind_proxy(app: &'a TestApp, client: &str) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-forwarded-for", client.parse().expect("a header value"));
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(headers)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        Self {
            app,
            client,
            cookie: None,
            set_cookie: None,
        }
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> Page {
        let req = match &self.cookie {
            Some(c) => req.header("cookie", c.clone()),
            None => req,
        };
        let p = page(req.send().await.expect("request")).await;
        if let Some(sc) = p.set_cookie() {
            self.set_cookie = Some(sc.to_owned());
            let pair = sc.split(';').next().unwrap_or("").trim().to_owned();
            let cleared = sc.contains("Max-Age=0") || pair.ends_with('=');
            self.cookie = if cleared { None } else { Some(pair) };
        }
        p
    }

    pub async fn get(&mut self, path: &str) -> Page {
        let req = self.client.get(self.app.url(path));
        self.send(req).await
    }

    pub async fn head(&mut self, path: &str) -> Page {
        let req = self.client.head(self.app.url(path));
        self.send(req).await
    }

    pub async fn post(&mut self, path: &str) -> Page {
        let req = self
            .client
            .post(self.app.url(path))
            .header("content-type", "application/x-www-form-urlencoded");
        self.send(req).await
    }

    /// POSTs a form body.
    pub async fn post_form(&mut self, path: &str, body: &str) -> Page {
        let req = self
            .client
            .post(self.app.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_owned());
        self.send(req).await
    }

    /// POSTs an empty form as a browser does, with the given `Origin` and `Sec-Fetch-Site`
    /// headers (`None`: not sent).
    pub async fn post_from(
        &mut self,
        path: &str,
        origin: Option<&str>,
        fetch_site: Option<&str>,
    ) -> Page {
        let mut req = self
            .client
            .post(self.app.url(path))
            .header("content-type", "application/x-www-form-urlencoded");
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        if let Some(s) = fetch_site {
            req = req.header("sec-fetch-site", s);
        }
        self.send(req).await
    }

    /// `GET /l/{token}`.
    pub async fn open(&mut self, token: &str) -> Page {
        self.get(&format!("/l/{token}")).await
    }

    /// `POST /l/{token}` (the Continue button).
    pub async fn redeem(&mut self, token: &str) -> Page {
        self.post(&format!("/l/{token}")).await
    }

    /// Redeems and asserts success: 303 to /portal with a session cookie.
    pub async fn sign_in(&mut self, token: &str) -> Page {
        let p = self.redeem(token).await;
        assert_eq!(p.status, 303, "redeeming a valid link: {p:?}");
        assert_eq!(p.header("location"), Some("/portal"), "{p:?}");
        assert!(p.set_cookie().is_some(), "no session cookie: {p:?}");
        assert!(self.cookie.is_some());
        p
    }

    pub async fn portal(&mut self) -> Page {
        self.get("/portal").await
    }
}

/// A random token-shaped string (43 base64url characters) that herald never minted.
pub fn unknown_token() -> String {
    let raw = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    raw[..43].to_owned()
}

// ----- log capture -----

static CAPTURED: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
/// Tests capturing right now; the subscriber records nothing while it is 0.
static CAPTURING: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone)]
struct BufWriter(Arc<Mutex<Vec<u8>>>);

impl Write for BufWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Records every tracing event (and `log` record) of the process at TRACE level while alive.
pub struct LogCapture {
    buffer: Arc<Mutex<Vec<u8>>>,
}

impl LogCapture {
    /// Installs the process-wide subscriber on first use. Panics if another one was installed
    /// first, since the capture would then see nothing.
    pub fn start() -> Self {
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let buffer = CAPTURED
            .get_or_init(|| {
                let buffer = Arc::new(Mutex::new(Vec::new()));
                let writer = BufWriter(buffer.clone());
                let layer = tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_target(true)
                    .with_writer(move || writer.clone())
                    .with_filter(tracing_subscriber::filter::LevelFilter::TRACE)
                    .with_filter(tracing_subscriber::filter::filter_fn(|_| CAPTURING.load(Ordering::SeqCst) > 0));
                tracing_subscriber::registry()
                    .with(layer)
                    .try_init()
                    .expect("another global tracing subscriber is installed; the log capture cannot work");
                buffer
            })
            .clone();
        CAPTURING.fetch_add(1, Ordering::SeqCst);
        Self { buffer }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap()).into_owned()
    }
}

impl Drop for LogCapture {
    fn drop(&mut self) {
        CAPTURING.fetch_sub(1, Ordering::SeqCst);
    }
}
