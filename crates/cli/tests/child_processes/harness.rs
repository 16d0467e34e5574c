//! Real herald processes for the tests: the binary this package builds, started with its
//! configuration in environment variables, its stderr kept in a file (printed when a test
//! fails), killed when dropped. Plus what the tests share: a signed event poster, a fresh
//! PostgreSQL schema, and the login-link welcome workflow.

#![allow(dead_code)]

use herald_core::signature::WebhookSecret;
use herald_test_support::current_test;
use herald_test_support::postgres::TestSchema;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "admin-secret-for-tests";

pub fn secret() -> WebhookSecret {
    WebhookSecret::from_bytes(
        (0u8..32)
            .map(|i| i.wrapping_mul(41).wrapping_add(7))
            .collect(),
    )
    .expect("a valid key")
}

/// A welcome email with a sign-in link in both parts, for every offer grant.
pub const WELCOME_WITH_LINK: &str = r#"
name: Welcome with a link
trigger:
  event: offer_access_granted
steps:
  - id: welcome
    send_email:
      subject: "Welcome {{contact.first_name}}"
      text: "Hi {{contact.first_name}}, your courses: <<login_url>>\nUnsubscribe: <<unsubscribe_url>>"
      html: "<p>Hi {{contact.first_name}}, <a href=\"<<login_url>>\">your courses</a></p>"
"#;

pub fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The folders a herald process reads (each process its own copy, as on its own machine).
pub struct Site {
    pub root: tempfile::TempDir,
    pub database_url: String,
    /// The PostgreSQL schema, dropped with the site.
    _pg_schema: Option<TestSchema>,
}

impl Site {
    /// A site on SQLite (a file in a temporary folder) or on a fresh PostgreSQL schema.
    /// `None` when PostgreSQL is wanted but unreachable outside CI (under `CI=true` that fails).
    pub async fn new(postgres: bool, workflows: &[(&str, &str)]) -> Option<Self> {
        let root = tempfile::tempdir().expect("temp dir");
        let pg_schema = if postgres {
            Some(TestSchema::create(&current_test()).await?)
        } else {
            None
        };
        let database_url = match &pg_schema {
            Some(schema) => schema.url().to_owned(),
            None => format!("sqlite://{}", root.path().join("herald.db").display()),
        };
        let site = Self {
            root,
            database_url,
            _pg_schema: pg_schema,
        };
        for (name, yaml) in workflows {
            site.write_workflow(0, name, yaml);
        }
        Some(site)
    }

    /// The workflows folder of process `n` (created on first use).
    pub fn workflows(&self, n: usize) -> PathBuf {
        let dir = self.root.path().join(format!("p{n}")).join("workflows");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes a workflow into the folder of process `n`; process 0's files are copied to a new
    /// process's folder when it starts.
    pub fn write_workflow(&self, n: usize, name: &str, yaml: &str) {
        std::fs::write(self.workflows(n).join(format!("{name}.yaml")), yaml).unwrap();
    }
}

/// A running herald process.
pub struct Herald {
    child: Option<Child>,
    pub port: Option<u16>,
    pub log: PathBuf,
    pub label: String,
    client: reqwest::Client,
}

/// What kind of process to start.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    Serve,
    Worker,
}

impl Herald {
    /// Starts process `n` of the site (`serve` listens on a free port; `worker` has no HTTP),
    /// sending email to `smtp_url`, and waits until it is healthy (a worker: until it has
    /// migrated and loaded, which a short pause after its start stands for).
    pub async fn start(site: &Site, n: usize, role: Role, smtp_url: &str, lease: &str) -> Self {
        Self::start_with(site, n, role, smtp_url, lease, &[]).await
    }

    /// As [`Herald::start`], with more environment variables.
    pub async fn start_with(
        site: &Site,
        n: usize,
        role: Role,
        smtp_url: &str,
        lease: &str,
        env: &[(&str, String)],
    ) -> Self {
        install_crypto();
        let workflows = site.workflows(n);
        if n != 0 {
            for entry in std::fs::read_dir(site.workflows(0)).unwrap() {
                let entry = entry.unwrap();
                let to = workflows.join(entry.file_name());
                if !to.exists() {
                    std::fs::copy(entry.path(), to).unwrap();
                }
            }
        }
        let templates = site.root.path().join(format!("p{n}")).join("templates");
        std::fs::create_dir_all(&templates).unwrap();
        let port = (role == Role::Serve).then(free_port);
        let listen = format!("127.0.0.1:{}", port.unwrap_or(0));
        let label = format!("p{n}-{role:?}");
        let log = site
            .root
            .path()
            .join(format!("{label}-{}.log", uuid::Uuid::new_v4().simple()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.arg(match role {
            Role::Serve => "serve",
            Role::Worker => "worker",
        })
        .current_dir(site.root.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HERALD_DATABASE_URL", &site.database_url)
        .env("HERALD_LISTEN", &listen)
        // Every process names the same public address, as behind one load balancer.
        .env("HERALD_PUBLIC_URL", "http://herald.test")
        .env("HERALD_WEBHOOK_SECRET", secret().to_whsec())
        .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("HERALD_WORKFLOWS", &workflows)
        .env("HERALD_TEMPLATES", &templates)
        .env("HERALD_SMTP_URL", smtp_url)
        .env("HERALD_LEASE", lease)
        .env("HERALD_LOG", "warn,herald=info")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("start herald");
        let herald = Self {
            child: Some(child),
            port,
            log,
            label,
            client: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        herald.wait_until_ready().await;
        herald
    }

    async fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = match self.port {
                Some(_) => self
                    .client
                    .get(self.url("/healthz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
                None => std::fs::read_to_string(&self.log)
                    .is_ok_and(|l| l.contains("herald worker running")),
            };
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become ready within 60 s:\n{}",
                self.label,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the process runs").id()
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}{path}",
            self.port.expect("an HTTP process")
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`: no shutdown, no draining; its claims stay until their lease runs out.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Posts events as one signed batch; panics unless 202.
    pub async fn post(&self, events: &[Value]) {
        let body = serde_json::to_vec(events).unwrap();
        let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
        let ts = chrono::Utc::now().timestamp();
        let r = self
            .client
            .post(self.url("/v1/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", secret().sign(&id, ts, &body))
            .body(body)
            .send()
            .await
            .expect("post events");
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, 202, "{}: {text}\n{}", self.label, self.log_text());
    }

    /// An admin API GET; the JSON body.
    pub async fn admin_get(&self, path: &str) -> Value {
        let r = self
            .client
            .get(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin GET");
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.expect("JSON")
    }

    pub async fn admin_post(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Every message (up to 500 per page, all pages).
    pub async fn messages(&self) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let page = self
                .admin_get(&format!("/v1/messages?limit=500{after}"))
                .await;
            all.extend(page["messages"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(c) => after = format!("&after={c}"),
                None => return all,
            }
        }
    }

    /// Redeems a sign-in link and opens the portal with the session; the portal page.
    pub async fn sign_in(&self, token: &str) -> (u16, String) {
        let r = self
            .client
            .post(self.url(&format!("/l/{token}")))
            .header("content-type", "application/x-www-form-urlencoded")
            .send()
            .await
            .expect("redeem");
        let status = r.status().as_u16();
        let Some(cookie) = r
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|c| c.split(';').next())
            .map(str::to_owned)
        else {
            return (status, String::new());
        };
        let portal = self
            .client
            .get(self.url("/portal"))
            .header("cookie", cookie)
            .send()
            .await
            .expect("portal");
        let status = portal.status().as_u16();
        (status, portal.text().await.unwrap_or_default())
    }

    /// POSTs to an unsubscribe link (the one-click form).
    pub async fn unsubscribe(&self, path: &str) -> u16 {
        self.client
            .post(self.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .expect("unsubscribe")
            .status()
            .as_u16()
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- {} log -----\n{}", self.label, self.log_text());
        }
    }
}

/// Whether a portal page shows the product every test learner holds.
pub fn shows_the_course(portal: &str) -> bool {
    portal.contains("p_rust101") && !portal.contains("no active courses")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// An `offer_access_granted` event for contact `id`.
pub fn grant(id: &str) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("evt_{}", uuid::Uuid::new_v4().simple()),
        "source": "https://school.example.com",
        "type": "course.offer_access_granted",
        "time": chrono::Utc::now().to_rfc3339(),
        "datacontenttype": "application/json",
        "data": {
            "contact": {"id": id, "email": format!("{id}@example.com"), "first_name": "Ann"},
            "offer": {"id": "o_pro", "title": "Rust Pro", "product_ids": ["p_rust101"]},
        },
    })
}

/// The sign-in tokens of a text, in order.
pub fn login_tokens(text: &str) -> Vec<String> {
    tokens_after(text, "http://herald.test/l/")
}

/// The path of the unsubscribe link in a text (`/u/...`).
pub fn unsubscribe_path(text: &str) -> Option<String> {
    tokens_after(text, "http://herald.test/u/")
        .into_iter()
        .next()
        .map(|t| format!("/u/{t}"))
}

fn tokens_after(text: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let after = &rest[i + prefix.len()..];
        out.push(
            after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.')
                .collect(),
        );
        rest = after;
    }
    out
}

/// Polls `check` every 50 ms until it holds or `within` passes; whether it held.
pub async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The text of a received mail's text part (quoted-printable decoded).
pub fn text_of(mail: &herald_test_support::smtp::ReceivedMail) -> String {
    mail.parse().text.unwrap_or_default()
}
