//! The engine's loops, one module each, and what they share: how a loop runs (catching panics,
//! reporting progress, pausing), and how a batch that the database rejects is narrowed down to
//! the item at fault, which is set aside after it keeps failing so the queue behind it goes on.

mod deliverer;
mod dispatcher;
mod scheduler;
mod stepper;

pub(crate) use deliverer::Deliverer;
pub(crate) use dispatcher::DispatchQuarantine;
pub(crate) use scheduler::ScheduleMemory;

use crate::health::Loops;
use crate::{Clock, EngineConfig, Registry, RegistryError, Wakers};
use futures::FutureExt;
pub(crate) use herald_core::panic_message;
use herald_store::{Store, StoreError};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::sync::{Notify, watch};
use tokio::task::{AbortHandle, JoinHandle};

/// Failures in a row, each a rejection by the database or a panic, after which an item is set
/// aside.
pub(crate) const SET_ASIDE_AFTER: u32 = 3;

/// What the engine's loops share.
pub(crate) struct Shared {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub config: EngineConfig,
    pub clock: Clock,
    pub wakers: Arc<Wakers>,
    pub loops: Arc<Loops>,
    pub deliverer: Deliverer,
    pub dispatch_quarantine: std::sync::Mutex<DispatchQuarantine>,
    pub schedules: ScheduleMemory,
}

impl Shared {
    /// Loads the workflow versions claimed work is pinned to that this process lacks (another
    /// process started those runs from files this one does not have). A stored version that no
    /// longer compiles is logged; its runs then fail with the reason.
    pub(crate) async fn load_pinned_versions(
        &self,
        pinned: impl IntoIterator<Item = (&str, &str)>,
    ) -> Result<(), StoreError> {
        let mut wanted: Vec<(String, String)> = pinned
            .into_iter()
            .map(|(id, version)| (id.to_owned(), version.to_owned()))
            .collect();
        wanted.sort();
        wanted.dedup();
        match self.registry.ensure_versions(&wanted).await {
            Ok(()) => Ok(()),
            Err(RegistryError::Store(e)) => Err(e),
            Err(e) => {
                tracing::error!(error = %e, "a stored workflow version cannot be loaded");
                Ok(())
            }
        }
    }
}

/// How one pass of a loop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Did work: go again at once.
    Worked,
    /// Found nothing due: sleep until woken or the poll interval passes.
    Idle,
    /// Could not take work now (e.g. every send slot busy): sleep like `Idle`, but this is not
    /// progress, so a loop stuck here shows as stalled.
    Blocked,
}

/// Where a loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Runs {
    /// On the engine's runtime.
    Here,
    /// Where the store runs the loops that lead write transactions (see
    /// [`herald_store::Store::spawn_writing`]).
    BesideWriter,
}

/// A running loop: the task to await (on the engine's runtime), and the handle that stops the
/// loop at once where it runs.
pub(crate) struct LoopTask {
    pub task: JoinHandle<()>,
    pub abort: AbortHandle,
}

/// One loop: a pass; again at once if it worked, else sleep until woken, the poll interval passes
/// or shutdown. A panic or an error in a pass is logged and the loop goes on.
pub(crate) fn spawn_loop<F, Fut>(
    name: &'static str,
    runs: Runs,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    notify: fn(&Shared) -> &Notify,
    work: F,
) -> LoopTask
where
    F: Fn(Arc<Shared>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Pass, StoreError>> + Send,
{
    let store = shared.store.clone();
    let task = async move {
        let loops = shared.loops.clone();
        let health = loops.get(name).expect("a known loop name");
        let _alive = health.alive_while();
        let poll = shared.config.poll_interval;
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                _ = health.unpaused() => {}
                _ = shutdown.changed() => continue,
            }
            let pass = match AssertUnwindSafe(work(shared.clone())).catch_unwind().await {
                Ok(Ok(pass)) => pass,
                Ok(Err(e)) => {
                    tracing::error!(loop_name = name, error = %e, "engine loop pass failed; retrying");
                    Pass::Blocked
                }
                Err(panic) => {
                    tracing::error!(loop_name = name, panic = %panic_message(&*panic), "engine loop pass panicked; retrying");
                    Pass::Blocked
                }
            };
            if pass != Pass::Blocked {
                loops.progress(name);
            }
            if pass != Pass::Worked {
                tokio::select! {
                    _ = notify(&shared).notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    };
    let (task, abort) = match runs {
        Runs::Here => {
            let here = tokio::spawn(task);
            let abort = here.abort_handle();
            (here, abort)
        }
        Runs::BesideWriter => store.spawn_writing(task),
    };
    LoopTask { task, abort }
}

/// Writes `items` as one batch; if the database rejects the batch, writes them one at a time,
/// trying each rejected one `SET_ASIDE_AFTER` times before handing it to `set_aside` with the
/// last error. Any other error (the database unreachable) is returned: nothing is blamed on an
/// item then.
pub(crate) async fn write_isolating<T, W, WF, S, SF>(
    items: Vec<T>,
    write: W,
    set_aside: S,
) -> Result<(), StoreError>
where
    T: Clone,
    W: Fn(Vec<T>) -> WF,
    WF: Future<Output = Result<(), StoreError>>,
    S: Fn(T, String) -> SF,
    SF: Future<Output = Result<(), StoreError>>,
{
    let error = match write(items.clone()).await {
        Ok(()) => return Ok(()),
        Err(e) if !e.is_rejection() => return Err(e),
        Err(e) => e,
    };
    tracing::warn!(error = %error, items = items.len(), "the database rejected a batch; writing its items one at a time");
    for item in items {
        let mut last = None;
        for _ in 0..SET_ASIDE_AFTER {
            match write(vec![item.clone()]).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) if e.is_rejection() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = last {
            set_aside(item, e.to_string()).await?;
        }
    }
    Ok(())
}
