//! A fresh PostgreSQL schema per test.
//!
//! The server comes from `HERALD_TEST_DATABASE_URL` (default [`DEFAULT_SERVER_URL`]). Each test
//! gets its own schema, selected by the libpq `options=-csearch_path%3D<schema>` URL parameter
//! ([`TestSchema::url`]), and dropped when the [`TestSchema`] is dropped (also when the test
//! panics). A schema's name carries the id of the process that made it, so the first schema a
//! process makes also drops those of earlier processes that were killed before they could. When
//! the server cannot be reached the test is skipped with a note on stderr, except under
//! `CI=true`, where it fails: CI must not pass by skipping.

use sqlx::{Connection, PgConnection};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The test server, as the project's CI starts it.
pub const DEFAULT_SERVER_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Every test schema's name starts with this, followed by the id of the process that made it.
const SCHEMA_PREFIX: &str = "herald_t_";

/// How long an unreachable server may keep a test waiting before it counts as unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The PostgreSQL server URL the tests use.
pub fn server_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVER_URL.to_owned())
}

/// `url` with the libpq parameter that makes `schema` the search path of every connection.
pub fn url_with_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

/// Whether a missing database must fail the test rather than skip it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// One test's schema on the test server; dropped with it.
pub struct TestSchema {
    server: String,
    name: String,
    url: String,
}

impl TestSchema {
    /// Creates a fresh schema for `test` (a test's name: it appears in the schema's name and in
    /// the skip note). `None` when the server is unreachable and the test is to be skipped;
    /// under `CI=true` that panics instead.
    pub async fn create(test: &str) -> Option<TestSchema> {
        let server = server_url();
        let name = schema_name(test);
        if let Err(reason) = create_schema(&server, &name).await {
            if in_ci() {
                panic!(
                    "PostgreSQL test {test} cannot run under CI=true: {reason} (set HERALD_TEST_DATABASE_URL or start the server)"
                );
            }
            eprintln!("skipping PostgreSQL test {test}: {reason}");
            return None;
        }
        Some(TestSchema {
            url: url_with_schema(&server, &name),
            server,
            name,
        })
    }

    /// The URL that selects this schema.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server URL without the schema parameter.
    pub fn server_url(&self) -> &str {
        &self.server
    }
}

impl Drop for TestSchema {
    /// Drops the schema on a thread of its own (a `Drop` cannot await, and may run inside the
    /// test's runtime). Failures are only reported: a leftover schema is harmless, and the next
    /// test process sweeps it.
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&server).await?;
                drop_schema(&mut admin, &name).await?;
                admin.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop the test schema {}: {e}", self.name);
        }
    }
}

/// A schema name for `test`: unique, lowercase, at most 63 bytes, with this process's id.
fn schema_name(test: &str) -> String {
    let clean: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(28)
        .collect();
    let unique = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "{SCHEMA_PREFIX}{}_{clean}_{}",
        std::process::id(),
        &unique[..16]
    )
}

/// Creates `schema` on `server`; the error says why PostgreSQL is unusable.
async fn create_schema(server: &str, schema: &str) -> Result<(), String> {
    let mut admin = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(server))
        .await
        .map_err(|_| format!("{server}: no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("{server}: {e}"))?;
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if !SWEPT.swap(true, Ordering::SeqCst) {
        sweep_dead_schemas(&mut admin).await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut admin)
        .await
        .map_err(|e| format!("{server}: cannot create schema {schema}: {e}"))?;
    let _ = admin.close().await;
    Ok(())
}

/// Drops the schemas of earlier test processes that are no longer running (killed before they
/// could drop their own).
async fn sweep_dead_schemas(admin: &mut PgConnection) {
    let Ok(names) = sqlx::query_scalar::<_, String>(
        "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)",
    )
    .bind(SCHEMA_PREFIX)
    .fetch_all(&mut *admin)
    .await
    else {
        return;
    };
    for name in names {
        let pid = name
            .strip_prefix(SCHEMA_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let alive = pid.is_some_and(|pid| {
            pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists()
        });
        if !alive {
            let _ = drop_schema(admin, &name).await;
        }
    }
}

/// Drops `schema`, waiting at most a few seconds for the locks of connections still using it.
async fn drop_schema(admin: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(admin)
    .await
    .map(drop)
}
