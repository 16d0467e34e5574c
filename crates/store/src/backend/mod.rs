//! The backends. Each folder holds one, with its own SQL. The reads are written once for both
//! ([`read`], over the few primitives of [`sql`]); each folder's `read.rs` holds only their SQL.

pub mod postgres;
pub(crate) mod read;
pub(crate) mod sql;
pub mod sqlite;

use crate::{NewEvent, Result, StoreError};

pub enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

impl Backend {
    pub async fn connect(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite(sqlite::SqliteStore::connect(url).await?))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(postgres::PgStore::connect(url).await?))
        } else {
            Err(StoreError::UnsupportedUrl(url.to_owned()))
        }
    }

    /// Where the reads run: SQLite's reader pool, or the PostgreSQL pool.
    pub(crate) fn reader(&self) -> sql::Conn<'_> {
        match self {
            Self::Sqlite(b) => sql::Conn::Sqlite(&b.readers),
            Self::Postgres(b) => sql::Conn::Postgres(&b.pool),
        }
    }

    pub async fn migrate(&self) -> Result<()> {
        match self {
            Self::Sqlite(b) => b.migrate().await,
            Self::Postgres(b) => b.migrate().await,
        }
    }

    /// Event groups the intake task may be committing at once (see `ingest`).
    pub(crate) fn commits_in_flight(&self) -> usize {
        match self {
            Self::Sqlite(_) => sqlite::INTAKE_COMMITS_IN_FLIGHT,
            // The pool has room for these beside the engine and the API (see its size).
            Self::Postgres(_) => postgres::INTAKE_COMMITS_IN_FLIGHT,
        }
    }

    pub(crate) async fn insert_events(
        &self,
        events: Vec<NewEvent>,
    ) -> Result<Vec<crate::Accepted>> {
        match self {
            Self::Sqlite(b) => b.insert_events(events).await,
            Self::Postgres(b) => b.insert_events(events).await,
        }
    }
}
