//! The backends. Each folder holds one, with its own SQL. The reads are written once for both
//! ([`read`], over the few primitives of [`sql`]); each folder's `read.rs` holds only their SQL.

pub(crate) mod dead;
pub(crate) mod dispatch;
pub(crate) mod enroll;
pub(crate) mod leases;
pub(crate) mod links;
pub(crate) mod membership;
pub(crate) mod messages;
pub(crate) mod opt_outs;
pub mod postgres;
pub(crate) mod read;
pub(crate) mod runs;
pub(crate) mod sql;
pub mod sqlite;
pub(crate) mod workflows;

use crate::{NewEvent, Result, StoreError};
use futures::future::BoxFuture;
use sql::{On, Tx};
use std::collections::HashSet;
use std::hash::Hash;
use tokio::task::{AbortHandle, JoinHandle};

/// A unit of write work written once for both backends: given the transaction and its
/// arguments. A plain function, so that PostgreSQL can run it again after a deadlock.
pub(crate) type WriteWork<A, T> = for<'c> fn(Tx<'c>, &'c A) -> BoxFuture<'c, Result<T>>;

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

    /// Runs `work` in one write transaction: on SQLite in the writer's next group (see
    /// `sqlite::writer`), on PostgreSQL in a transaction of its own, tried again when PostgreSQL
    /// aborts it as a deadlock victim or a serialization failure.
    pub(crate) async fn write<A, T>(
        &self,
        what: &'static str,
        args: A,
        work: WriteWork<A, T>,
    ) -> Result<T>
    where
        A: Send + Sync + 'static,
        T: Send + 'static,
    {
        match self {
            Self::Sqlite(b) => {
                b.writer
                    .run(move |conn| Box::pin(async move { work(On::Sqlite(conn), &args).await }))
                    .await
            }
            Self::Postgres(b) => {
                postgres::retrying!(what, async {
                    let mut tx = b.pool.begin().await?;
                    let out = work(On::Postgres(&mut *tx), &args).await?;
                    tx.commit().await?;
                    Ok(out)
                })
            }
        }
    }

    /// See [`crate::Store::spawn_writing`].
    pub(crate) fn spawn_writing<F>(&self, task: F) -> (JoinHandle<()>, AbortHandle)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match self {
            Self::Sqlite(b) => {
                let beside_writer = b.writer.executor().spawn(task);
                let abort = beside_writer.abort_handle();
                // Made before the waiting task is spawned, so that dropping that task before its
                // first poll aborts the loop too.
                let abort_on_drop = AbortOnDrop(abort.clone());
                let waiting = tokio::spawn(async move {
                    let _abort = abort_on_drop;
                    if let Err(e) = beside_writer.await
                        && e.is_panic()
                    {
                        std::panic::resume_unwind(e.into_panic());
                    }
                });
                (waiting, abort)
            }
            Self::Postgres(_) => {
                let here = tokio::spawn(task);
                let abort = here.abort_handle();
                (here, abort)
            }
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

/// Aborts a task when dropped: a task on the writer's runtime ends with the task of the caller's
/// runtime that waits for it (see [`Backend::spawn_writing`]).
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Each distinct item once, in order of first appearance.
pub(crate) fn distinct<'a>(items: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = HashSet::new();
    items.into_iter().filter(|i| seen.insert(*i)).collect()
}

/// Whether each of `keys`, in order, is one a statement returned as stored: of several equal
/// keys only the first is (a later row with that key met the first and stored nothing).
pub(crate) fn stored_in_order<K: Eq + Hash>(
    keys: impl IntoIterator<Item = K>,
    mut stored: HashSet<K>,
) -> Vec<bool> {
    keys.into_iter().map(|k| stored.remove(&k)).collect()
}

/// The first item of each key, in order: what applying keyed writes one by one keeps, where a
/// write consumes what a later one of the same key would need.
pub(crate) fn first_per_key<'a, T, K: Eq + Hash>(
    items: impl IntoIterator<Item = &'a T>,
    key: impl Fn(&'a T) -> K,
) -> Vec<&'a T> {
    let mut seen = HashSet::new();
    items.into_iter().filter(|i| seen.insert(key(i))).collect()
}
