//! The one writer connection, its thread, and group commit across the engine's loops.
//!
//! SQLite has one writer and each `COMMIT` is an fsync (`synchronous=FULL`). Intake, dispatch,
//! claims, link mints and delivery outcomes each come as a unit of work; the units waiting when
//! the writer comes free run in one transaction, each under its own savepoint (a unit that fails
//! is undone alone and its caller gets the error), and share one `COMMIT`. Callers are answered
//! only after that commit, so nothing is reported stored that is not on disk.
//!
//! The writer has a thread of its own, with a single-threaded runtime: queued units are handed
//! to it whole ([`Writer::run`]) and it leads their groups. Its connection is rusqlite's, so a
//! unit's statements run right there, one after the other, with no hand-off to another thread
//! and no wait in the main runtime's queue behind HTTP requests. The dispatcher, which leads the
//! largest groups with its own work ([`Writer::lead`], whose planner borrows from its caller),
//! runs there too (see [`Writer::executor`]).

use super::WriterConnection;
use crate::{Result, StoreError};
use futures::FutureExt;
use futures::future::BoxFuture;
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, Weak};
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{Mutex, MutexGuard, Notify, oneshot};

/// Queued units one transaction takes at most, so that one commit stays short.
const MAX_GROUP: usize = 64;

type Output = Box<dyn Any + Send>;
type Work =
    Box<dyn for<'c> FnOnce(&'c mut WriterConnection) -> BoxFuture<'c, Result<Output>> + Send>;

struct Unit {
    work: Work,
    reply: oneshot::Sender<Result<Output>>,
}

pub(in crate::backend) struct Writer {
    conn: Mutex<WriterConnection>,
    queue: SyncMutex<Vec<Unit>>,
    /// A group was dropped before it finished (its caller was cancelled): the connection may
    /// still be inside its transaction, which the next leader rolls back.
    abandoned: AtomicBool,
    /// Told when a unit is queued; the writer thread's leader task waits on it.
    queued: Arc<Notify>,
    /// The writer thread's runtime.
    executor: Handle,
    /// Dropped with the writer, which ends the thread.
    _stop: oneshot::Sender<()>,
}

impl Writer {
    /// Starts the writer thread for `conn`.
    pub(super) fn start(conn: WriterConnection) -> std::io::Result<Arc<Self>> {
        let (stop, stopped) = oneshot::channel::<()>();
        let (started, runtime) = std::sync::mpsc::sync_channel(1);
        // The runtime is built and dropped on the thread: dropping it here, in async code, would
        // panic (should the thread fail to start, say).
        std::thread::Builder::new()
            .name("herald-sqlite-writer".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        let _ = started.send(Ok(runtime.handle().clone()));
                        // Ends when the writer is dropped; the runtime's tasks end with it.
                        let _ = runtime.block_on(stopped);
                    }
                    Err(e) => {
                        let _ = started.send(Err(e));
                    }
                }
            })?;
        // Waits only while the thread builds its runtime.
        let executor = runtime
            .recv()
            .map_err(|_| std::io::Error::other("the SQLite writer thread ended at its start"))??;
        let writer = Arc::new(Self {
            conn: Mutex::new(conn),
            queue: SyncMutex::new(Vec::new()),
            abandoned: AtomicBool::new(false),
            queued: Arc::new(Notify::new()),
            executor,
            _stop: stop,
        });
        writer
            .executor
            .spawn(lead_queued(Arc::downgrade(&writer), writer.queued.clone()));
        Ok(writer)
    }

    /// The writer thread's runtime, for a loop that leads groups of its own (the dispatcher):
    /// its statements then wait for nothing but the connection.
    pub(in crate::backend) fn executor(&self) -> &Handle {
        &self.executor
    }

    /// The connection alone, outside any group: holding it keeps every other write waiting (the
    /// migrations, which run on a connection of their own).
    pub(super) async fn lock(&self) -> MutexGuard<'_, WriterConnection> {
        let mut conn = self.conn.lock().await;
        self.recover(&mut conn);
        conn
    }

    /// Runs `work` in a write transaction on the writer thread, possibly beside other callers'
    /// units, and answers after the commit. A caller that stops waiting does not stop the work.
    pub(in crate::backend) async fn run<T, W>(&self, work: W) -> Result<T>
    where
        T: Send + 'static,
        W: for<'c> FnOnce(&'c mut WriterConnection) -> BoxFuture<'c, Result<T>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let work: Work = Box::new(move |conn| {
            Box::pin(async move { work(conn).await.map(|t| Box::new(t) as Output) })
        });
        self.queue
            .lock()
            .expect("writer queue")
            .push(Unit { work, reply });
        self.queued.notify_one();
        let output = answer.await.map_err(|_| StoreError::Closed)??;
        Ok(*output
            .downcast::<T>()
            .expect("a unit's output has its type"))
    }

    /// Opens a write transaction that the caller leads: the caller does its own work on
    /// [`Group::conn`] and then [`Group::finish`]es, which runs the units queued meanwhile and
    /// commits all of it at once.
    pub(in crate::backend) async fn lead(&self) -> Result<Group<'_>> {
        let conn = self.conn.lock().await;
        Ok(self
            .begin(conn, true)?
            .expect("a leader with work always opens a group"))
    }

    /// Begins a group's transaction (`None`: nothing to do). With `own_work`, the caller's work
    /// follows under a savepoint of its own; the queued units are taken at the commit, so that
    /// those arriving meanwhile join it.
    fn begin<'w>(
        &'w self,
        mut conn: MutexGuard<'w, WriterConnection>,
        own_work: bool,
    ) -> Result<Option<Group<'w>>> {
        self.recover(&mut conn);
        if !own_work && !self.has_queued() {
            return Ok(None);
        }
        let begun = match wait_for_lock(|| conn.command("BEGIN IMMEDIATE")) {
            Ok(()) if own_work => conn.command("SAVEPOINT unit"),
            begun => begun,
        };
        if let Err(e) = begun {
            let _ = conn.command("ROLLBACK");
            if !own_work {
                answer_all(self.take_queued(), &e);
            }
            return Err(e);
        }
        self.abandoned.store(true, Ordering::Relaxed);
        Ok(Some(Group {
            writer: self,
            conn,
            taken: Vec::new(),
            own_savepoint: own_work,
        }))
    }

    fn has_queued(&self) -> bool {
        !self.queue.lock().expect("writer queue").is_empty()
    }

    fn take_queued(&self) -> Vec<Unit> {
        let mut queue = self.queue.lock().expect("writer queue");
        let take = queue.len().min(MAX_GROUP);
        queue.drain(..take).collect()
    }

    fn recover(&self, conn: &mut WriterConnection) {
        if self.abandoned.swap(false, Ordering::Relaxed) {
            // Fails harmlessly when the abandoned group had finished after all.
            let _ = conn.command("ROLLBACK");
        }
    }
}

/// One open write transaction and the queued units it will run before its commit.
pub(in crate::backend) struct Group<'w> {
    writer: &'w Writer,
    conn: MutexGuard<'w, WriterConnection>,
    /// Queued units taken at the commit and not run yet.
    taken: Vec<Unit>,
    /// The leader's own work runs under a savepoint of its own (see [`Writer::begin`]).
    own_savepoint: bool,
}

impl Group<'_> {
    pub(in crate::backend) fn conn(&mut self) -> &mut WriterConnection {
        &mut self.conn
    }

    /// Ends the leader's own work (`own`: its outcome; an error undoes it alone), runs the queued
    /// units, commits, and answers every unit. Returns `own`, or the commit's error.
    pub(in crate::backend) async fn finish<T>(self, own: Result<T>) -> Result<T> {
        let keep = own.is_ok();
        self.end(keep).await.and(own)
    }

    /// Like [`Group::finish`], but the leader's own work is undone although it did not fail.
    pub(in crate::backend) async fn undo<T>(self, value: T) -> Result<T> {
        self.end(false).await.map(|()| value)
    }

    async fn end(mut self, keep_own: bool) -> Result<()> {
        let outcome = self.commit(keep_own).await;
        self.writer.abandoned.store(false, Ordering::Relaxed);
        outcome
    }

    async fn commit(&mut self, own_ok: bool) -> Result<()> {
        let mut broken = None;
        if self.own_savepoint {
            broken = end_savepoint(&mut self.conn, own_ok).err();
        }
        self.taken = self.writer.take_queued();
        self.taken.reverse();
        let mut done = Vec::with_capacity(self.taken.len());
        while broken.is_none() {
            let Some(unit) = self.taken.pop() else { break };
            match isolated(&mut self.conn, unit.work).await {
                Ok(outcome) => done.push((unit.reply, outcome)),
                Err(e) => {
                    let _ = unit.reply.send(Err(StoreError::Batch(e.to_string())));
                    broken = Some(e);
                }
            }
        }
        let failure = match broken {
            Some(e) => Some(e),
            None => self.conn.command("COMMIT").err(),
        };
        if let Some(e) = failure {
            let _ = self.conn.command("ROLLBACK");
            let message = e.to_string();
            for (reply, _) in done {
                let _ = reply.send(Err(StoreError::Batch(message.clone())));
            }
            answer_all(std::mem::take(&mut self.taken), &e);
            return Err(e);
        }
        for (reply, outcome) in done {
            let _ = reply.send(outcome);
        }
        Ok(())
    }
}

impl Drop for Group<'_> {
    /// A group dropped while committing (its caller was cancelled) puts the units it took and
    /// had not run back at the front of the queue, for the next leader.
    fn drop(&mut self) {
        if !self.taken.is_empty() {
            let mut queue = self.writer.queue.lock().expect("writer queue");
            queue.splice(0..0, self.taken.drain(..).rev());
            drop(queue);
            self.writer.queued.notify_one();
        }
    }
}

/// The writer thread's leader: whenever units are queued and no other leader took them, it
/// leads a group for them. Holds the writer weakly, so that dropping the store ends it.
async fn lead_queued(writer: Weak<Writer>, queued: Arc<Notify>) {
    loop {
        queued.notified().await;
        let Some(writer) = writer.upgrade() else {
            return;
        };
        while writer.has_queued() {
            let conn = writer.conn.lock().await;
            // A failed group has answered its units with the error.
            if let Ok(Some(group)) = writer.begin(conn, false) {
                let _ = group.finish(Ok(())).await;
            }
        }
    }
}

/// Runs one unit under a savepoint: kept if it succeeds, undone alone if not. The outer error
/// means the transaction itself broke (a savepoint statement failed).
async fn isolated(conn: &mut WriterConnection, work: Work) -> Result<Result<Output>> {
    conn.command("SAVEPOINT unit")?;
    // A unit that panics is undone alone, like one that fails: the writer thread goes on.
    let outcome = match std::panic::AssertUnwindSafe(work(conn))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(panic) => Err(StoreError::Batch(format!(
            "the write panicked: {}",
            herald_core::panic_message(&*panic)
        ))),
    };
    end_savepoint(conn, outcome.is_ok())?;
    Ok(outcome)
}

/// Runs `begin`, which may wait (up to the busy timeout) while another process holds SQLite's
/// write lock. The writer's own thread just waits; a caller on a multi-threaded runtime (a
/// dispatcher leading from a test or a tool) lets that runtime move its other tasks to another
/// thread meanwhile, rather than stall them.
fn wait_for_lock<T>(begin: impl FnOnce() -> T) -> T {
    match Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(begin)
        }
        _ => begin(),
    }
}

/// Ends a unit's savepoint, keeping its work or undoing it.
fn end_savepoint(conn: &mut WriterConnection, keep: bool) -> Result<()> {
    if !keep {
        conn.command("ROLLBACK TO unit")?;
    }
    conn.command("RELEASE unit")
}

fn answer_all(units: Vec<Unit>, error: &StoreError) {
    let message = error.to_string();
    for unit in units {
        let _ = unit.reply.send(Err(StoreError::Batch(message.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sql::Param;
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, SqliteConnection};

    struct Db {
        writer: Arc<Writer>,
        reader: SqliteConnection,
        _dir: tempfile::TempDir,
    }

    async fn db() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let mut conn = WriterConnection::open(&path).unwrap();
        conn.command("CREATE TABLE t (x INTEGER NOT NULL UNIQUE)")
            .unwrap();
        Db {
            writer: Writer::start(conn).unwrap(),
            reader: SqliteConnectOptions::new()
                .filename(path)
                .connect()
                .await
                .unwrap(),
            _dir: dir,
        }
    }

    fn insert(conn: &mut WriterConnection, x: i64) -> Result<i64> {
        conn.execute("INSERT INTO t (x) VALUES ($1)", &[Param::Int(x)])?;
        Ok(conn
            .fetch_optional_scalar("SELECT count(*) FROM t", &[])?
            .expect("a count"))
    }

    async fn stored(reader: &mut SqliteConnection) -> Vec<i64> {
        sqlx::query_scalar("SELECT x FROM t ORDER BY x")
            .fetch_all(reader)
            .await
            .unwrap()
    }

    fn queued(writer: &Writer) -> usize {
        writer.queue.lock().unwrap().len()
    }

    /// Starts `run(insert x)` on its own task.
    fn spawn_insert(writer: &Arc<Writer>, x: i64) -> tokio::task::JoinHandle<Result<i64>> {
        let writer = writer.clone();
        tokio::spawn(async move {
            writer
                .run(move |conn| Box::pin(async move { insert(conn, x) }))
                .await
        })
    }

    /// Starts `run(insert x)` on its own task, the unit telling `running` when it starts and
    /// then waiting for `go` (its insert follows whether `go` is sent or dropped).
    fn spawn_insert_on_cue(
        writer: &Arc<Writer>,
        x: i64,
        running: oneshot::Sender<()>,
        go: oneshot::Receiver<()>,
    ) -> tokio::task::JoinHandle<Result<i64>> {
        let writer = writer.clone();
        tokio::spawn(async move {
            writer
                .run(move |conn| {
                    Box::pin(async move {
                        let _ = running.send(());
                        let _ = go.await;
                        insert(conn, x)
                    })
                })
                .await
        })
    }

    async fn until_queued(writer: &Writer, n: usize) {
        while queued(writer) < n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_units_join_the_leaders_transaction_and_fail_alone() {
        let mut db = db().await;
        let mut group = db.writer.lead().await.unwrap();
        // Queued one at a time: the units run in queue order, and spawned tasks need not queue
        // in spawn order.
        let first = spawn_insert(&db.writer, 1);
        until_queued(&db.writer, 1).await;
        let duplicate = spawn_insert(&db.writer, 10);
        until_queued(&db.writer, 2).await;
        let second = spawn_insert(&db.writer, 2);
        until_queued(&db.writer, 3).await;
        let own = insert(group.conn(), 10);
        // Nothing is visible before the one commit.
        assert_eq!(stored(&mut db.reader).await, Vec::<i64>::new());
        assert_eq!(group.finish(own).await.unwrap(), 1);

        // Each unit saw the leader's row: they ran inside its transaction.
        assert_eq!(first.await.unwrap().unwrap(), 2);
        let refused = duplicate.await.unwrap().unwrap_err();
        assert!(refused.is_rejection(), "{refused}");
        assert_eq!(second.await.unwrap().unwrap(), 3);
        assert_eq!(stored(&mut db.reader).await, vec![1, 2, 10]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_undone_leader_keeps_the_queued_units() {
        let mut db = db().await;
        let mut group = db.writer.lead().await.unwrap();
        let queued_insert = spawn_insert(&db.writer, 3);
        until_queued(&db.writer, 1).await;
        insert(group.conn(), 10).unwrap();
        assert_eq!(group.undo("postponed").await.unwrap(), "postponed");
        assert_eq!(queued_insert.await.unwrap().unwrap(), 1);
        assert_eq!(stored(&mut db.reader).await, vec![3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_group_is_rolled_back_by_the_next_writer() {
        let mut db = db().await;
        let mut group = db.writer.lead().await.unwrap();
        insert(group.conn(), 10).unwrap();
        drop(group);
        assert_eq!(spawn_insert(&db.writer, 4).await.unwrap().unwrap(), 1);
        let mut conn = db.writer.lock().await;
        conn.command("BEGIN").unwrap();
        insert(&mut conn, 5).unwrap();
        conn.command("COMMIT").unwrap();
        drop(conn);
        assert_eq!(stored(&mut db.reader).await, vec![4, 5]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_units_of_a_leader_that_panics_run_in_the_next_group() {
        let mut db = db().await;
        let writer = db.writer.clone();
        let (leading_tx, leading) = oneshot::channel();
        let (queued_tx, queued_rx) = oneshot::channel();
        let leader = tokio::spawn(async move {
            let mut group = writer.lead().await.unwrap();
            insert(group.conn(), 10).unwrap();
            leading_tx.send(()).unwrap();
            queued_rx.await.unwrap();
            panic!("the leader's own work panics");
        });
        // Queued only once the leader holds the writer: queued earlier, the writer thread could
        // run the unit first and the queue would never hold it.
        leading.await.unwrap();
        let queued_insert = spawn_insert(&db.writer, 6);
        until_queued(&db.writer, 1).await;
        queued_tx.send(()).unwrap();
        assert!(leader.await.unwrap_err().is_panic());
        assert_eq!(queued_insert.await.unwrap().unwrap(), 1);
        assert_eq!(stored(&mut db.reader).await, vec![6]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_unit_whose_caller_stops_waiting_is_still_committed() {
        let mut db = db().await;
        let (running_tx, running) = oneshot::channel();
        let (go_on, go) = oneshot::channel::<()>();
        let caller = spawn_insert_on_cue(&db.writer, 7, running_tx, go);
        // Cancelled while its unit runs on the writer thread.
        running.await.unwrap();
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        go_on.send(()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stored(&mut db.reader).await.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the unit was not committed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(stored(&mut db.reader).await, vec![7]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_unit_that_panics_fails_alone_and_the_writer_goes_on() {
        let mut db = db().await;
        let first = spawn_insert(&db.writer, 1);
        first.await.unwrap().unwrap();
        let panicked = db
            .writer
            .run(|conn| {
                Box::pin(async move {
                    insert(conn, 2)?;
                    panic!("a write that panics");
                    #[allow(unreachable_code)]
                    Ok(())
                })
            })
            .await
            .unwrap_err();
        assert!(
            panicked.to_string().contains("a write that panics"),
            "{panicked}"
        );
        assert_eq!(spawn_insert(&db.writer, 3).await.unwrap().unwrap(), 2);
        assert_eq!(stored(&mut db.reader).await, vec![1, 3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn units_a_dropped_group_puts_back_are_run_without_another_post() {
        let mut db = db().await;
        // Hold the writer thread, so that its leader task sees the queue only when let go.
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let (held_tx, held) = oneshot::channel();
        db.writer.executor().spawn(async move {
            let _ = held_tx.send(());
            let _ = hold_rx.recv();
        });
        held.await.unwrap();

        let (leading_tx, leading) = oneshot::channel();
        let (commit_tx, commit) = oneshot::channel::<()>();
        let writer = db.writer.clone();
        let leader = tokio::spawn(async move {
            let group = writer.lead().await.unwrap();
            let _ = leading_tx.send(());
            let _ = commit.await;
            group.finish(Ok(())).await
        });
        leading.await.unwrap();
        let (_go_on, go) = oneshot::channel::<()>();
        let first = spawn_insert_on_cue(&db.writer, 1, oneshot::channel().0, go);
        until_queued(&db.writer, 1).await;
        let second = spawn_insert(&db.writer, 2);
        until_queued(&db.writer, 2).await;
        // The leader's commit takes both units and waits inside the first.
        commit_tx.send(()).unwrap();
        while queued(&db.writer) > 0 {
            tokio::task::yield_now().await;
        }
        // The writer thread's leader task wakes to an empty queue and waits again.
        hold_tx.send(()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;

        // Dropped mid-commit: the first unit is undone, the second put back, and run.
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        assert!(first.await.unwrap().is_err());
        let second = tokio::time::timeout(std::time::Duration::from_secs(10), second)
            .await
            .expect("the put-back unit ran")
            .unwrap()
            .unwrap();
        assert_eq!(second, 1);
        assert_eq!(stored(&mut db.reader).await, vec![2]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_units_run_on_the_writer_thread() {
        let db = db().await;
        let thread = db
            .writer
            .run(|_| Box::pin(async { Ok(std::thread::current().name().map(str::to_owned)) }))
            .await
            .unwrap();
        assert_eq!(thread.as_deref(), Some("herald-sqlite-writer"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_writer_ends_its_thread() {
        let db = db().await;
        let executor = db.writer.executor().clone();
        let Db {
            writer,
            reader,
            _dir,
        } = db;
        drop((writer, reader));
        // A runtime that has shut down cancels what is spawned on it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while executor.spawn(async {}).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer thread still runs"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_units_are_each_stored_once() {
        let mut db = db().await;
        let tasks: Vec<_> = (0..300).map(|x| spawn_insert(&db.writer, x)).collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(stored(&mut db.reader).await, (0..300).collect::<Vec<_>>());
        assert_eq!(queued(&db.writer), 0);
    }
}
