//! Test databases: a fresh SQLite file or a fresh PostgreSQL schema per test, behind one type.
//!
//! Other crates' tests may copy this file (or include it with `#[path = "…"] mod support;`):
//! it depends only on herald-store, sqlx, tokio, uuid and tempfile.
//!
//! PostgreSQL comes from `HERALD_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test gets its own schema, selected by the
//! libpq `options=-csearch_path%3D<schema>` URL parameter, and dropped when the [`TestDb`] is
//! dropped (also when the test panics). When the server cannot be reached the test is skipped
//! with a note on stderr, except under `CI=true`, where it fails: CI must not pass by skipping.

#![allow(dead_code)]

use herald_store::Store;
use sqlx::Connection;
use std::time::Duration;

/// The default test server, as the project's CI starts it.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// One test's database and a [`Store`] opened (and migrated) on it.
pub struct TestDb {
    pub store: Store,
    /// The URL `store` was opened with: [`TestDb::open_another`] opens more stores on the same
    /// database, as several processes would.
    pub url: String,
    pub kind: Kind,
    /// Keeps the SQLite file until the test ends.
    _dir: Option<tempfile::TempDir>,
    /// (server URL, schema) to drop at the end.
    pg_schema: Option<(String, String)>,
}

/// The PostgreSQL server URL the tests use.
pub fn pg_server_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_PG_URL.to_owned())
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

/// Reports that PostgreSQL is unreachable: a panic in CI, otherwise a note on stderr (and the
/// caller skips the test).
pub fn pg_unavailable(test: &str, reason: &str) {
    if in_ci() {
        panic!(
            "PostgreSQL test {test} cannot run under CI=true: {reason} (set HERALD_TEST_DATABASE_URL or start the server)"
        );
    }
    eprintln!("skipping PostgreSQL test {test}: {reason}");
}

/// A schema name for `test`: unique, lowercase, at most 63 bytes.
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
        .take(36)
        .collect();
    let unique = uuid::Uuid::new_v4().simple().to_string();
    format!("t_{clean}_{}", &unique[..16])
}

impl TestDb {
    /// A migrated store on a fresh SQLite file.
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}", dir.path().join("herald.db").display());
        let store = Store::connect(&url)
            .await
            .expect("open the SQLite test database");
        TestDb {
            store,
            url,
            kind: Kind::Sqlite,
            _dir: Some(dir),
            pg_schema: None,
        }
    }

    /// A migrated store on a fresh schema of the test server; `None` when the test is skipped.
    pub async fn postgres(test: &str) -> Option<TestDb> {
        let server = pg_server_url();
        let schema = schema_name(test);
        let created = async {
            let mut admin = sqlx::PgConnection::connect(&server).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                .execute(&mut admin)
                .await?;
            admin.close().await
        };
        match tokio::time::timeout(Duration::from_secs(10), created).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                pg_unavailable(test, &format!("{server}: {e}"));
                return None;
            }
            Err(_) => {
                pg_unavailable(test, &format!("{server}: no answer within 10 s"));
                return None;
            }
        }
        let url = url_with_schema(&server, &schema);
        // From here on the server is there: a failure is a real one.
        let pg_schema = Some((server, schema));
        let store = match Store::connect(&url).await {
            Ok(store) => store,
            Err(e) => {
                drop_schema(pg_schema);
                panic!("open the PostgreSQL test store at {url}: {e}");
            }
        };
        Some(TestDb {
            store,
            url,
            kind: Kind::Postgres,
            _dir: None,
            pg_schema,
        })
    }

    /// Another store on the same database (its own connections and ingest task), as a second
    /// herald process would have.
    pub async fn open_another(&self) -> Store {
        Store::connect(&self.url)
            .await
            .expect("open a second store")
    }

    /// The test's schema (PostgreSQL only).
    pub fn schema(&self) -> Option<&str> {
        self.pg_schema.as_ref().map(|(_, s)| s.as_str())
    }

    /// Runs a raw query whose columns are all text (`CAST(x AS TEXT)` where needed) and returns
    /// its rows: for assertions on tables the store API does not read back.
    pub async fn text_rows(&self, sql: &'static str) -> Vec<Vec<Option<String>>> {
        use sqlx::Row;
        match self.kind {
            Kind::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url)
                    .await
                    .expect("open the SQLite file");
                let rows = sqlx::query(sql).fetch_all(&mut conn).await.expect(sql);
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.get::<Option<String>, _>(i))
                            .collect()
                    })
                    .collect()
            }
            Kind::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("connect to PostgreSQL");
                let rows = sqlx::query(sql).fetch_all(&mut conn).await.expect(sql);
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.get::<Option<String>, _>(i))
                            .collect()
                    })
                    .collect()
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        drop_schema(self.pg_schema.take());
    }
}

/// Drops a test schema on a thread of its own (a `Drop` cannot await, and may run inside the
/// test's runtime). Failures are only reported: a leftover schema is harmless.
fn drop_schema(pg_schema: Option<(String, String)>) {
    let Some((server, schema)) = pg_schema else {
        return;
    };
    let dropped = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut admin = sqlx::PgConnection::connect(&server).await?;
            sqlx::query("SET lock_timeout = '5s'")
                .execute(&mut admin)
                .await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE"
            )))
            .execute(&mut admin)
            .await?;
            admin.close().await
        })
    })
    .join();
    if let Ok(Err(e)) = dropped {
        eprintln!("could not drop a test schema: {e}");
    }
}
