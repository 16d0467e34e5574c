//! SQLite backend: the embedded default. WAL with `synchronous=FULL`, so a committed event is on
//! disk before its `202`. All writes go through one connection (SQLite has one writer anyway;
//! queueing here beats spinning on SQLITE_BUSY), a rusqlite connection driven on a thread of its
//! own ([`connection`]); every write transaction is `BEGIN IMMEDIATE`, the engine's writes share
//! commits (see [`writer`]), and reads use a separate sqlx pool beside the writer.

mod connection;
pub(super) mod dispatch;
pub(super) mod events;
pub(super) mod links;
pub(super) mod membership;
pub(super) mod messages;
pub(super) mod read;
pub(super) mod runs;
pub(super) mod writer;

pub(crate) use connection::{FromSqliteRow, WriterConnection, converted};

use crate::{Result, StoreError};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use writer::Writer;

/// Event groups the intake hands the writer at once: one in the commit under way and one queued
/// to join the next (see [`writer`]), so posts never wait for a commit they could share.
pub(crate) const INTAKE_COMMITS_IN_FLIGHT: usize = 2;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

pub struct SqliteStore {
    /// The only connection that writes.
    pub(super) writer: Arc<Writer>,
    /// Connections for reads (admin API, mailbox, health); WAL lets them run beside the writer.
    pub(super) readers: SqlitePool,
    /// How to open the database with sqlx, for the migrations (boxed: it is large and read once).
    options: Box<SqliteConnectOptions>,
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<Self> {
        // A file only: the writer and the readers are separate connections, and a `202`
        // promises a commit on disk.
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        }
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .pragma("temp_store", "memory")
            // 8 MB of pages each for the readers and the migrations, so that four readers
            // scanning a large database stay within 32 MB; the writer keeps 32 MB of its own.
            .pragma("cache_size", "-8000");
        // Opened first: it creates the file and puts it in WAL mode for the readers.
        // Waits (up to the busy timeout) while another process holds the database.
        let path = options.get_filename().to_owned();
        let writer = tokio::task::spawn_blocking(move || WriterConnection::open(&path))
            .await
            .map_err(|e| StoreError::Thread(std::io::Error::other(e)))??;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options.clone().read_only(true))
            .await?;
        Ok(Self {
            writer: Writer::start(writer)?,
            readers,
            options: Box::new(options),
        })
    }

    /// Applies the migrations on a sqlx connection of their own (sqlx's migrator drives it),
    /// while the writer waits: nothing else writes meanwhile.
    pub async fn migrate(&self) -> Result<()> {
        let _writer = self.writer.lock().await;
        let mut conn = self.options.connect().await?;
        MIGRATOR.run(&mut conn).await?;
        conn.close().await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }
}

/// A JSON array of strings, for `IN (SELECT value FROM json_each(?))`: one statement, any length.
pub(super) fn json_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    serde_json::Value::Array(
        items
            .into_iter()
            .map(|s| serde_json::Value::String(s.to_owned()))
            .collect(),
    )
    .to_string()
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn an_in_memory_database_is_refused_naming_what_to_use() {
        for url in ["sqlite::memory:", "sqlite://herald.db?mode=memory"] {
            let err = super::SqliteStore::connect(url)
                .await
                .err()
                .expect("refused");
            assert!(
                err.to_string().contains("use sqlite://PATH"),
                "{url}: {err}"
            );
        }
    }
}
