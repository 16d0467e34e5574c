//! herald's durable engine. Three loops share one store:
//! - the **dispatcher** turns stored events into membership state, exits, resumed waits and new
//!   runs (running each new run's first steps at once);
//! - the **stepper** claims runs whose wait is over and advances them;
//! - the **deliverer** claims queued messages, renders and sends them.
//!
//! Every claim is a lease committed before any network I/O; every result is written only while
//! its lease holds. A process killed at any point leaves work that the next one (or, on
//! PostgreSQL, another process) picks up once the lease runs out.

pub mod clock;
pub mod config;
pub mod delivery;
pub mod dispatch;
pub mod enrollment;
pub mod health;
pub mod links;
pub mod registry;
pub mod runner;
pub mod telemetry;
pub mod unsubscribe;
mod worker;

pub use clock::Clock;
pub use config::{EngineConfig, FaultHook, Stage};
pub use health::{LoopStatus, Loops};
pub use registry::{Registry, RegistryError, Sources};

use herald_store::{Heard, Signals, Store};
use std::sync::Arc;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use worker::{Deliverer, LoopTask, Runs, Shared, spawn_loop};

/// Wakes the loops when there may be new work, so nothing waits for a poll tick.
#[derive(Default)]
pub struct Wakers {
    dispatch: Notify,
    steps: Notify,
    delivery: Notify,
    schedules: Notify,
}

impl Wakers {
    /// New events were stored.
    pub fn events_stored(&self) {
        self.dispatch.notify_one();
    }
    /// Something may be due now (e.g. a test moved the clock).
    pub fn all(&self) {
        self.dispatch.notify_one();
        self.steps.notify_one();
        self.delivery.notify_one();
        self.schedules.notify_one();
    }
}

/// The running engine.
pub struct Engine {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    /// The four loops.
    loops: Vec<LoopTask>,
    /// The deliverer's recorder and heartbeat, which outlive the loops until sends drain.
    background: Vec<JoinHandle<()>>,
}

impl Engine {
    pub fn start(
        store: Store,
        registry: Arc<Registry>,
        config: EngineConfig,
        clock: Clock,
    ) -> Self {
        let wakers = Arc::new(Wakers::default());
        let health = Arc::new(Loops::default());
        let (shutdown, rx) = watch::channel(false);
        let deliverer = Deliverer::new(delivery::Delivery {
            config: config.clone(),
            registry: registry.clone(),
            clock: clock.clone(),
        });
        let mut background = deliverer.start_background(
            store.clone(),
            clock.clone(),
            wakers.clone(),
            health.clone(),
        );
        background.push(tokio::spawn(listen_to_other_processes(
            store.clone(),
            registry.clone(),
            wakers.clone(),
            clock.clone(),
        )));
        let shared = Arc::new(Shared {
            store,
            registry,
            config,
            clock,
            wakers,
            loops: health,
            deliverer,
            dispatch_quarantine: Default::default(),
            schedules: Default::default(),
        });
        let loops = vec![
            spawn_loop(
                "dispatcher",
                Runs::BesideWriter,
                shared.clone(),
                rx.clone(),
                |s| &s.wakers.dispatch,
                |s| async move { s.dispatch_once().await },
            ),
            spawn_loop(
                "stepper",
                Runs::Here,
                shared.clone(),
                rx.clone(),
                |s| &s.wakers.steps,
                |s| async move { s.step_once().await },
            ),
            spawn_loop(
                "deliverer",
                Runs::Here,
                shared.clone(),
                rx.clone(),
                |s| &s.wakers.delivery,
                |s| async move { s.deliver_once().await },
            ),
            spawn_loop(
                "scheduler",
                Runs::Here,
                shared.clone(),
                rx,
                |s| &s.wakers.schedules,
                |s| async move { s.schedule_once().await },
            ),
        ];
        Self {
            shared,
            shutdown,
            loops,
            background,
        }
    }

    pub fn wakers(&self) -> Arc<Wakers> {
        self.shared.wakers.clone()
    }

    /// The loops' health (for `/healthz`), and pausing or resuming them.
    pub fn loops(&self) -> Arc<Loops> {
        self.shared.loops.clone()
    }

    /// Graceful stop: each loop finishes the pass in hand, sends in flight finish and are
    /// recorded (for at most one lease), then the engine returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for l in std::mem::take(&mut self.loops) {
            let _ = l.task.await;
        }
        self.shared.deliverer.drain(self.shared.config.lease).await;
    }
}

/// Wakes this process's loops when another process on the same database announces work, and
/// takes in its workflow reloads. Announcements are wake-ups only: one missed (the connection
/// dropped) costs at most a poll interval, and after a reconnect every loop looks once.
async fn listen_to_other_processes(
    store: Store,
    registry: Arc<Registry>,
    wakers: Arc<Wakers>,
    clock: Clock,
) {
    let everything = Signals::EVENTS | Signals::RUNS | Signals::MESSAGES | Signals::WORKFLOWS;
    let mut pause = std::time::Duration::from_millis(500);
    let mut listened_before = false;
    loop {
        let mut announcements = match store.announcements().await {
            Ok(Some(a)) => a,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen to the other processes; polling until it can");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(30));
                continue;
            }
        };
        pause = std::time::Duration::from_millis(500);
        // What was announced before listening began (the loops' first passes may have run
        // before it) is looked for once, as after a lost connection; except that this process's
        // own files, read when it loaded, are re-read only on an announced reload.
        let mut signals = everything;
        let mut files_current = !listened_before;
        listened_before = true;
        loop {
            tracing::debug!(?signals, "announcements of other processes");
            if signals.contains(Signals::WORKFLOWS) {
                let taken_in = if std::mem::take(&mut files_current) {
                    registry.catch_up().await
                } else {
                    registry.refresh(clock.now()).await
                };
                if let Err(e) = taken_in {
                    tracing::error!(error = %e, "could not take in another process's workflow reload");
                }
            }
            if signals.contains(Signals::EVENTS) {
                wakers.dispatch.notify_one();
            }
            if signals.contains(Signals::RUNS) {
                wakers.steps.notify_one();
            }
            if signals.contains(Signals::MESSAGES) {
                wakers.delivery.notify_one();
            }
            signals = match announcements.next().await {
                Ok(Heard::Signals(s)) => s,
                Ok(Heard::Missed) => everything,
                Err(e) => {
                    tracing::warn!(error = %e, "lost the other processes' announcements; listening again");
                    break;
                }
            };
        }
    }
}

/// Dropping the engine without [`Engine::shutdown`] stops every loop and send where it stands,
/// like a killed process: claims stay until their lease runs out (crash tests rely on this).
impl Drop for Engine {
    fn drop(&mut self) {
        for l in &self.loops {
            l.abort.abort();
            l.task.abort();
        }
        for t in &self.background {
            t.abort();
        }
        self.shared.deliverer.abort_sends();
    }
}
