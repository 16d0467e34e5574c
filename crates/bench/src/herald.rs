//! The system under test: the real `herald` release binary as a child process (`herald serve`),
//! on a fresh database, with the bench workflow and the SMTP sink; its memory and CPU read from
//! `/proc`.

use anyhow::{Context, Result, bail};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bench workflow: one `send_email` step whose subject and both parts render event fields,
/// and whose both parts carry `<<login_url>>`, as every real welcome does (so each email mints a
/// learner link); the subject carries the event id in brackets, which the SMTP sink reads back.
pub const WORKFLOW_YAML: &str = r#"# herald-bench: one templated email per offer grant.
name: Bench welcome
enabled: true
trigger:
  event: offer_access_granted
re_entry: false
from: "Ada at Rust School <ada@school.example.com>"
steps:
  - id: welcome
    send_email:
      subject: "Welcome to {{offer.title}}, {{default contact.first_name 'there'}}! [{{event.id}}]"
      template: bench
"#;

pub const TEMPLATE_TXT: &str = "Hi {{default contact.first_name \"there\"}},\n\nwelcome to {{offer.title}}! \
Your courses are ready for you: <<login_url>>\n\nevent {{event.id}} of {{event.time}}\n";

pub const TEMPLATE_HTML: &str = "<!doctype html>\n<html>\n  <body>\n    <p>Hi {{default contact.first_name \"there\"}},</p>\n    \
<p>welcome to <b>{{offer.title}}</b>! <a href=\"<<login_url>>\">Your courses are ready for you.</a></p>\n    \
<p style=\"color:#888\">event {{event.id}} of {{event.time}}</p>\n  </body>\n</html>\n";

/// The workflow and template folders, written once per bench run.
pub struct Sources {
    pub dir: tempfile::TempDir,
}

impl Sources {
    pub fn write() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("herald-bench-src-")
            .tempdir()?;
        std::fs::create_dir(dir.path().join("workflows"))?;
        std::fs::create_dir(dir.path().join("templates"))?;
        std::fs::write(dir.path().join("workflows/bench.yaml"), WORKFLOW_YAML)?;
        std::fs::write(dir.path().join("templates/bench.txt.hbs"), TEMPLATE_TXT)?;
        std::fs::write(dir.path().join("templates/bench.html.hbs"), TEMPLATE_HTML)?;
        Ok(Self { dir })
    }
    pub fn workflows(&self) -> PathBuf {
        self.dir.path().join("workflows")
    }
    pub fn templates(&self) -> PathBuf {
        self.dir.path().join("templates")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Sqlite,
    Postgres,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// A fresh database for one scenario: a SQLite file in a temporary folder, or a PostgreSQL
/// database created for it and dropped afterwards.
pub struct Database {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    /// (admin URL, database name) to drop.
    pg: Option<(String, String)>,
}

impl Database {
    pub async fn create(kind: BackendKind, pg_admin_url: &str, tag: &str) -> Result<Self> {
        match kind {
            BackendKind::Sqlite => {
                // Beside the other temporary files, on the real disk (fsync costs what it costs).
                let dir = tempfile::Builder::new()
                    .prefix(&format!("herald-bench-{tag}-"))
                    .tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("herald.db").display());
                Ok(Self {
                    url,
                    _dir: Some(dir),
                    pg: None,
                })
            }
            BackendKind::Postgres => {
                let name = format!(
                    "herald_bench_{}_{}",
                    std::process::id(),
                    tag.to_ascii_lowercase()
                );
                let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(pg_admin_url)
                    .await
                    .with_context(|| format!("connect to PostgreSQL at {pg_admin_url}"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await?;
                sqlx::Connection::close(admin).await?;
                Ok(Self {
                    url: with_database(pg_admin_url, &name),
                    _dir: None,
                    pg: Some((pg_admin_url.to_owned(), name)),
                })
            }
        }
    }

    /// Drops a PostgreSQL database (the SQLite folder goes with the value).
    pub async fn drop_now(mut self) -> Result<()> {
        if let Some((admin_url, name)) = self.pg.take() {
            let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await?;
            sqlx::Connection::close(admin).await?;
        }
        Ok(())
    }

    /// Size on disk of the SQLite database (file + WAL), if SQLite.
    pub fn sqlite_bytes(&self) -> Option<u64> {
        let dir = self._dir.as_ref()?;
        let size = |n: &str| {
            std::fs::metadata(dir.path().join(n))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        Some(size("herald.db") + size("herald.db-wal"))
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Some((admin_url, name)) = self.pg.take() {
            eprintln!(
                "note: PostgreSQL database {name} was not dropped (on {admin_url}); drop it by hand"
            );
        }
    }
}

/// `postgres://user@host:port/db?x` with the database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let root = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

/// A free loopback port (bound and released; the child binds it right after).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// User + system CPU time a process has used, seconds (from `/proc/<pid>/stat`).
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux this runs on.
fn clock_ticks() -> f64 {
    100.0
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kb: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A running `herald serve`.
pub struct Herald {
    child: Child,
    pub pid: u32,
    pub base_url: String,
    log: PathBuf,
    _cwd: tempfile::TempDir,
    cpu_mark: f64,
    /// A profiler attached to it (`--attach`), stopped with SIGINT before herald stops.
    attached: Option<Child>,
    /// Where to copy the log when herald stops (with a non-default log filter).
    keep_log: Option<PathBuf>,
}

pub struct StartSpec<'a> {
    pub binary: &'a Path,
    pub database_url: &'a str,
    pub sources: &'a Sources,
    pub smtp_port: u16,
    pub webhook_secret: &'a str,
    /// A command to attach to the process once it is healthy; `{pid}` and `{label}` are replaced.
    pub attach: Option<&'a str>,
    /// The scenario, for `{label}`.
    pub label: &'a str,
    /// `HERALD_LOG` (`warn` unless `--herald-log` says otherwise).
    pub log_filter: &'a str,
}

impl Herald {
    pub async fn start(spec: StartSpec<'_>) -> Result<Self> {
        let port = free_port()?;
        // An empty working folder, so no herald.toml from elsewhere is read.
        let cwd = tempfile::Builder::new()
            .prefix("herald-bench-cwd-")
            .tempdir()?;
        let log = cwd.path().join("herald.log");
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(spec.binary);
        cmd.arg("serve")
            .current_dir(cwd.path())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("HERALD_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("HERALD_DATABASE_URL", spec.database_url)
            .env("HERALD_LISTEN", format!("127.0.0.1:{port}"))
            .env("HERALD_WEBHOOK_SECRET", spec.webhook_secret)
            .env("HERALD_WORKFLOWS", spec.sources.workflows())
            .env("HERALD_TEMPLATES", spec.sources.templates())
            .env(
                "HERALD_SMTP_URL",
                format!("smtp://127.0.0.1:{}?tls=none", spec.smtp_port),
            )
            .env("HERALD_LOG", spec.log_filter);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", spec.binary.display()))?;
        let pid = child.id();
        let mut herald = Self {
            child,
            pid,
            base_url: format!("http://127.0.0.1:{port}"),
            log,
            _cwd: cwd,
            cpu_mark: 0.0,
            attached: None,
            keep_log: (spec.log_filter != "warn")
                .then(|| std::env::temp_dir().join(format!("herald-bench-{}.log", spec.label))),
        };
        herald.wait_healthy(Duration::from_secs(60)).await?;
        if let Some(template) = spec.attach {
            let command = template
                .replace("{pid}", &pid.to_string())
                .replace("{label}", spec.label);
            eprintln!("attaching: {command}");
            herald.attached = Some(
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("exec {command}"))
                    .stdin(Stdio::null())
                    .spawn()?,
            );
            // Give the tool time to attach before the load starts.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        herald.cpu_mark = proc_cpu_seconds(pid).unwrap_or(0.0);
        Ok(herald)
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let start = Instant::now();
        let url = format!("{}/healthz", self.base_url);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "herald exited during start-up ({status}); its log:\n{}",
                    self.log_tail(4_000)
                );
            }
            if let Ok(r) = http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "herald did not answer {url} within {timeout:?}; its log:\n{}",
                    self.log_tail(4_000)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn events_url(&self) -> String {
        format!("{}/v1/events", self.base_url)
    }

    /// Peak resident memory so far (`VmHWM`), bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        proc_status_bytes(self.pid, "VmHWM")
    }

    /// CPU seconds used since the last call (or since it became healthy).
    pub fn cpu_since_mark(&mut self) -> f64 {
        let now = proc_cpu_seconds(self.pid).unwrap_or(self.cpu_mark);
        let used = now - self.cpu_mark;
        self.cpu_mark = now;
        used
    }

    /// The last `max` bytes of its log.
    pub fn log_tail(&self, max: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let start = text.len().saturating_sub(max);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// Lines of its log that are warnings or errors.
    pub fn log_problems(&self) -> Vec<String> {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text.lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
            .map(str::to_owned)
            .collect()
    }

    /// SIGTERM (graceful: requests and batches in hand finish), then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        let result = self.terminate(grace).await;
        if let Some(keep) = &self.keep_log {
            std::fs::copy(&self.log, keep)?;
            eprintln!("herald's log kept in {}", keep.display());
        }
        result
    }

    async fn terminate(&mut self, grace: Duration) -> Result<()> {
        if let Some(mut tool) = self.attached.take() {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(tool.id().to_string())
                .status();
            let start = Instant::now();
            while tool.try_wait()?.is_none() && start.elapsed() < Duration::from_secs(60) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = tool.kill();
            let _ = tool.wait();
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        let start = Instant::now();
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            if start.elapsed() > grace {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "b1"),
            "postgres://postgres@127.0.0.1:5432/b1"
        );
        assert_eq!(
            with_database("postgres://u@h/test?sslmode=disable", "b1"),
            "postgres://u@h/b1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "b1"), "postgres://u@h/b1");
    }

    #[test]
    fn reads_own_proc() {
        let pid = std::process::id();
        assert!(proc_status_bytes(pid, "VmHWM").unwrap() > 0);
        assert!(proc_cpu_seconds(pid).is_some());
    }

    #[test]
    fn the_bench_workflow_compiles() {
        let load = |name: &str| match name {
            "bench.txt.hbs" => Some(TEMPLATE_TXT.to_owned()),
            "bench.html.hbs" => Some(TEMPLATE_HTML.to_owned()),
            _ => None,
        };
        let bundle = herald_core::workflow::bundle_from(
            "bench",
            "workflows/bench.yaml",
            WORKFLOW_YAML,
            &load,
        );
        let (wf, warnings) =
            herald_core::workflow::compile(bundle, &[]).expect("the bench workflow checks");
        assert!(warnings.is_empty(), "{warnings:?}");
        let body = crate::load::offer_event("evt-9", "c-9", "2026-11-24T10:00:00Z");
        let event = herald_core::event::parse_body(
            herald_core::event::BodyKind::Single,
            body.as_bytes(),
            chrono::Utc::now(),
        )
        .unwrap()
        .remove(0);
        let custom = [("login_url".to_owned(), "http://h.test/l/TOKEN".to_owned())].into();
        let email = wf
            .render_email(0, &event.template_context(), &custom)
            .unwrap();
        assert_eq!(email.subject, "Welcome to Rust Pro, Ann! [evt-9]");
        let (text, html) = (email.text.unwrap(), email.html.unwrap());
        assert!(
            text.contains("evt-9") && text.contains("http://h.test/l/TOKEN"),
            "{text}"
        );
        assert!(
            html.contains("evt-9") && html.contains("href=\"http://h.test/l/TOKEN\""),
            "{html}"
        );
    }
}
