//! Test databases: a fresh SQLite file or a fresh PostgreSQL schema per test, behind one type.
//!
//! The PostgreSQL schemas come from `herald_test_support::postgres`, which says which server the
//! tests use and when a test skips rather than fails; a schema is dropped with its [`TestDb`].

#![allow(dead_code)]

use herald_store::Store;
use herald_test_support::postgres::TestSchema;
pub use herald_test_support::postgres::server_url as pg_server_url;
use sqlx::Connection;

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
    /// The PostgreSQL schema, dropped with the `TestDb`.
    pg_schema: Option<TestSchema>,
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
        let schema = TestSchema::create(test).await?;
        // From here on the server is there: a failure is a real one.
        let url = schema.url().to_owned();
        let store = Store::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("open the PostgreSQL test store at {url}: {e}"));
        Some(TestDb {
            store,
            url,
            kind: Kind::Postgres,
            _dir: None,
            pg_schema: Some(schema),
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
        self.pg_schema.as_ref().map(TestSchema::name)
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
