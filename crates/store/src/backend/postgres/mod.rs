//! PostgreSQL backend: for several herald processes on one database.
//!
//! Same methods and semantics as the SQLite backend, with SQL for PostgreSQL: `= ANY($1)` over a
//! bound array instead of `json_each`, `GREATEST` instead of two-argument `MAX`, and batches
//! written as one multi-row statement (`… FROM UNNEST($1::text[], …)`) rather than run once per
//! row as on SQLite's writer (where a run is a bind and a step on the same thread), so a batch
//! costs a handful of round trips to the server whatever its size. Commits are durable (the
//! server's default `synchronous_commit`), except those of work that is redone from durable rows
//! if a crash of the database server loses it (see [`PgStore::relaxed`]).
//!
//! Several processes share the tables, so every claim locks its rows with `FOR UPDATE SKIP
//! LOCKED` and dispatchers take a transaction-scoped advisory lock (see [`PgStore::dispatch`]).
//! A transaction that PostgreSQL aborts as a deadlock victim or a serialization failure is rolled
//! back whole and tried again (every write here is one transaction, so that is safe).
//!
//! The URL may choose a schema with libpq's `options` parameter, as the tests do:
//! `postgres://user@host/db?options=-csearch_path%3Dmy_schema`. Tables, including sqlx's
//! `_sqlx_migrations`, are then created in and read from that schema (it must exist).

pub(super) mod dispatch;
pub(super) mod events;
pub(super) mod links;
pub(super) mod membership;
pub(super) mod messages;
#[cfg(target_os = "linux")]
mod nodelay;
pub(super) mod read;
pub(super) mod runs;

use crate::{Result, StoreError};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;

/// Event groups the intake commits at once.
pub(crate) const INTAKE_COMMITS_IN_FLIGHT: usize = 4;
/// Connections the engine's durable writes may hold at once: the stepper's results, link mints,
/// the outcome recorder and the lease heartbeat.
const ENGINE_CONNECTIONS: u32 = 4;
/// Connections of the relaxed pool: the dispatcher and the stepper's and deliverer's claims.
const RELAXED_CONNECTIONS: u32 = 3;
/// Connections for the HTTP server's reads (admin API, links, portal, health).
const HTTP_READS: u32 = 4;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// The dispatchers' lock, held to the end of the transaction: one dispatch pass at a time across
/// the processes on this schema, so events are dispatched in order.
pub(crate) const LOCK_DISPATCH: &str = "SELECT pg_advisory_xact_lock(hashtextextended('herald.dispatch:' || COALESCE(current_schema(), ''), 0))";

/// How often a transaction aborted by a deadlock or a serialization failure is tried in all.
pub(super) const MAX_TRIES: usize = 4;

pub struct PgStore {
    /// Shared by reads and writes; each write is one transaction on one pooled connection.
    pub(super) pool: PgPool,
    /// Connections whose commits do not wait for the WAL to reach the disk
    /// (`synchronous_commit=off`), for the writes a crash of the database server may lose
    /// harmlessly: dispatch passes (redone from the stored events, all or nothing) and claims
    /// (leases, which lapse anyway). Whatever follows from them that must last is written by a
    /// durable commit, and that commit's WAL flush carries theirs, which came before it. What a
    /// server crash can undo is a claim whose send went out in the last moment before it: the
    /// message is sent again with its Message-ID, as after a crash between a send and its outcome.
    /// Saving these waits is most of the latency from post to inbox (see BENCHMARKS.md).
    pub(super) relaxed: PgPool,
    /// For the listener's own connection (boxed: it is large and read once).
    options: Box<PgConnectOptions>,
    /// The `NOTIFY` channel of the processes sharing this database and schema.
    channel: String,
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<Self> {
        let options = PgConnectOptions::from_str(url)?.application_name("herald");
        // Sized from what may hold a connection at once, so no loop waits on another for one:
        // the intake's commits in flight, the engine's durable writers and a few HTTP reads.
        let pool = connect_pool(
            &options,
            INTAKE_COMMITS_IN_FLIGHT as u32 + ENGINE_CONNECTIONS + HTTP_READS,
        )
        .await?;
        let relaxed = connect_pool(
            &options.clone().options([("synchronous_commit", "off")]),
            RELAXED_CONNECTIONS,
        )
        .await?;
        // Channels are database-wide: the schema is part of the name, so processes on other
        // schemas of the same database (tests, or two sites) do not hear each other.
        let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
            .fetch_one(&pool)
            .await?;
        let mut channel = format!("herald.{schema}");
        // PostgreSQL truncates identifiers to 63 bytes; LISTEN and pg_notify must agree.
        while channel.len() > 63 {
            channel.pop();
        }
        Ok(Self {
            pool,
            relaxed,
            options: Box::new(options),
            channel,
        })
    }

    /// Sends `payload` to every process listening on this database's channel (at once: the
    /// statement is its own transaction).
    pub(crate) async fn notify(&self, payload: &str) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.channel)
            .bind(payload)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A listener on this database's channel, on a connection of its own.
    pub(crate) async fn listener(&self) -> Result<PgListener> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(PgConnectOptions::clone(&self.options))
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(&self.channel).await?;
        Ok(listener)
    }

    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// A pool that opens its `size` connections at once and keeps them: opened on first use, they
/// cost the first events of a burst tens of milliseconds each (see BENCHMARKS.md). They are
/// opened side by side (`size` acquires at once): sqlx's own opening, one after the other, took a
/// process half a second to start. `min_connections` is what keeps them, and replaces one that
/// closes.
async fn connect_pool(options: &PgConnectOptions, size: u32) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .min_connections(size)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(|conn, _| {
            Box::pin(async move {
                #[cfg(target_os = "linux")]
                nodelay::set_on(conn).await?;
                #[cfg(not(target_os = "linux"))]
                let _ = conn;
                Ok(())
            })
        })
        .connect_lazy_with(options.clone());
    let opened = futures::future::try_join_all((0..size).map(|_| pool.acquire())).await?;
    drop(opened);
    Ok(pool)
}

/// Runs a write transaction (`$attempt`: an expression giving a fresh future each time), again
/// when PostgreSQL chose it as a deadlock victim or refused it as a serialization failure: those
/// roll back everything, so trying again is safe. (A macro rather than a function over an async
/// closure, whose future the compiler cannot yet show to be `Send`.)
macro_rules! retrying {
    ($what:expr, $attempt:expr) => {{
        let mut tries = 1;
        loop {
            let result: $crate::Result<_> = $attempt.await;
            match result {
                Err(e) if tries < $crate::backend::postgres::MAX_TRIES && $crate::backend::postgres::is_transient(&e) => {
                    tracing::debug!(operation = $what, error = %e, tries, "transaction aborted by the database; trying again");
                    tries += 1;
                }
                other => break other,
            }
        }
    }};
}
pub(crate) use retrying;

/// A deadlock or a serialization failure: the transaction was rolled back and may be tried again.
pub(super) fn is_transient(e: &StoreError) -> bool {
    matches!(e, StoreError::Database(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("40P01" | "40001")))
}

#[cfg(test)]
mod tests {
    use super::{
        ENGINE_CONNECTIONS, HTTP_READS, INTAKE_COMMITS_IN_FLIGHT, PgStore, RELAXED_CONNECTIONS,
    };
    use herald_test_support::postgres::TestSchema;

    #[tokio::test]
    async fn both_pools_hold_all_their_connections_once_connected() {
        let Some(schema) = TestSchema::create("warm_pools").await else {
            return;
        };
        let store = PgStore::connect(schema.url()).await.unwrap();
        let durable = INTAKE_COMMITS_IN_FLIGHT as u32 + ENGINE_CONNECTIONS + HTTP_READS;
        assert_eq!(
            [store.pool.size(), store.relaxed.size()],
            [durable, RELAXED_CONNECTIONS]
        );
    }

    #[tokio::test]
    async fn only_the_relaxed_pool_commits_without_waiting_for_the_wal() {
        let Some(schema) = TestSchema::create("relaxed_pool").await else {
            return;
        };
        let store = PgStore::connect(schema.url()).await.unwrap();
        let sql = "SELECT current_setting('synchronous_commit')";
        let durable: String = sqlx::query_scalar(sql)
            .fetch_one(&store.pool)
            .await
            .unwrap();
        let relaxed: String = sqlx::query_scalar(sql)
            .fetch_one(&store.relaxed)
            .await
            .unwrap();
        assert_eq!((durable.as_str(), relaxed.as_str()), ("on", "off"));
        // The search path chosen by the URL holds on both.
        let schemas: Vec<String> = futures::future::try_join_all(
            [&store.pool, &store.relaxed]
                .map(|pool| sqlx::query_scalar("SELECT current_schema()::text").fetch_one(pool)),
        )
        .await
        .unwrap();
        assert_eq!(schemas, [schema.name(), schema.name()]);
    }
}
