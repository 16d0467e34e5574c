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
pub mod links;
pub mod registry;
pub mod runner;
pub mod telemetry;
pub mod unsubscribe;

pub use clock::Clock;
pub use config::EngineConfig;
pub use registry::{Registry, RegistryError, Sources};

use herald_store::{RunAdvance, RunState, RunWrite, StepRecord, Store};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// Wakes the loops when there may be new work, so nothing waits for a poll tick.
#[derive(Default)]
pub struct Wakers {
    dispatch: Notify,
    steps: Notify,
    delivery: Notify,
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
    }
}

/// The running engine.
pub struct Engine {
    wakers: Arc<Wakers>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    store: Store,
    registry: Arc<Registry>,
    config: EngineConfig,
    clock: Clock,
    wakers: Arc<Wakers>,
    delivery: delivery::Delivery,
}

impl Engine {
    pub fn start(
        store: Store,
        registry: Arc<Registry>,
        config: EngineConfig,
        clock: Clock,
    ) -> Self {
        let wakers = Arc::new(Wakers::default());
        let (shutdown, rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            delivery: delivery::Delivery {
                config: config.clone(),
                registry: registry.clone(),
                clock: clock.clone(),
                store: store.clone(),
            },
            store,
            registry,
            config,
            clock,
            wakers: wakers.clone(),
        });
        let poll = shared.config.poll_interval;
        let tasks = vec![
            spawn_loop(
                "dispatcher",
                shared.clone(),
                rx.clone(),
                poll,
                |s| &s.wakers.dispatch,
                |s| async move { s.dispatch_once().await },
            ),
            spawn_loop(
                "stepper",
                shared.clone(),
                rx.clone(),
                poll,
                |s| &s.wakers.steps,
                |s| async move { s.step_once().await },
            ),
            spawn_loop(
                "deliverer",
                shared,
                rx,
                poll,
                |s| &s.wakers.delivery,
                |s| async move { s.deliver_once().await },
            ),
        ];
        Self {
            wakers,
            shutdown,
            tasks,
        }
    }

    pub fn wakers(&self) -> Arc<Wakers> {
        self.wakers.clone()
    }

    /// Graceful stop: each loop finishes the batch in hand, then returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

/// Dropping the engine without [`Engine::shutdown`] stops every loop where it stands, like a
/// killed process: claims stay until their lease runs out (crash tests rely on this).
impl Drop for Engine {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One loop: do a batch; if it found work, go again at once; otherwise sleep until woken, the
/// poll interval passes or shutdown.
fn spawn_loop<F, Fut>(
    name: &'static str,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    poll: std::time::Duration,
    notify: fn(&Shared) -> &Notify,
    work: F,
) -> JoinHandle<()>
where
    F: Fn(Arc<Shared>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<usize, herald_store::StoreError>> + Send,
{
    tokio::spawn(async move {
        loop {
            if *shutdown.borrow() {
                break;
            }
            let idle = match work(shared.clone()).await {
                Ok(n) => n == 0,
                Err(e) => {
                    tracing::error!(loop_name = name, error = %e, "engine loop failed; retrying");
                    true
                }
            };
            if idle {
                tokio::select! {
                    _ = notify(&shared).notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    })
}

impl Shared {
    async fn dispatch_once(&self) -> Result<usize, herald_store::StoreError> {
        let snapshot = self.registry.snapshot();
        let now_ms = self.clock.now_ms();
        let host = self.config.public_host();
        let planner = dispatch::Planner {
            workflows: &snapshot,
            now_ms,
            default_timezone: self.config.default_timezone,
            message_host: &host,
        };
        // What the planner decided, recorded as metrics only once its transaction committed.
        let started = std::sync::Mutex::new(Vec::new());
        let plan = |input: &herald_store::DispatchInput| {
            // The workflows as they stand now that the events are selected: a reload that finished
            // before an event was accepted must apply to it (not the snapshot taken above).
            let snapshot = self.registry.snapshot();
            let plan = dispatch::Planner {
                workflows: &snapshot,
                ..planner
            }
            .plan(input);
            let mut started = started.lock().expect("metrics lock");
            started.clear();
            started.extend(
                plan.new_runs
                    .iter()
                    .map(|r| (r.workflow_id.clone(), r.state, message_labels(&r.messages))),
            );
            plan
        };
        let n = self
            .store
            .dispatch(
                self.config.batch_size,
                now_ms,
                now_ms - dispatch::LOOP_WINDOW_MS,
                &plan,
            )
            .await?;
        for (workflow, state, messages) in started.into_inner().expect("metrics lock") {
            if state != RunState::Refused {
                telemetry::run_started(&workflow);
            }
            telemetry::run_finished(&workflow, state);
            record_messages(&messages);
        }
        if n > 0 {
            // New messages to send, and runs whose awaited event just came.
            self.wakers.delivery.notify_one();
            self.wakers.steps.notify_one();
        }
        Ok(n)
    }

    async fn step_once(&self) -> Result<usize, herald_store::StoreError> {
        let now = self.clock.now();
        let claimed = self
            .store
            .claim_runs(
                now.timestamp_millis(),
                self.config.batch_size,
                self.config.lease.as_millis() as i64,
            )
            .await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let snapshot = self.registry.snapshot();
        let host = self.config.public_host();
        let mut advances = Vec::with_capacity(claimed.len());
        for run in &claimed {
            let _span = tracing::info_span!("step", run = %run.run_id, workflow = %run.workflow_id, pc = run.pc).entered();
            let mut write = RunWrite {
                run_id: run.run_id.clone(),
                workflow_id: run.workflow_id.clone(),
                workflow_version: run.workflow_version.clone(),
                contact_id: run.contact_id.clone(),
                event_seq: run.event_seq,
                state: run.state,
                reason: None,
                pc: run.pc,
                wait_event: None,
                due_ms: None,
                steps: Vec::new(),
                messages: Vec::new(),
            };
            match snapshot.version(&run.workflow_id, &run.workflow_version) {
                None => {
                    write.state = RunState::Failed;
                    write.reason = Some(format!(
                        "workflow version {} is not loaded",
                        run.workflow_version
                    ));
                }
                Some(_) if !snapshot.is_enabled(&run.workflow_id) => {
                    // Disabled after the claim query ran: park it where it stands.
                    write.state = RunState::Parked;
                    write.due_ms = Some(now.timestamp_millis());
                }
                Some(wf) => {
                    let event = runner::with_latest_contact(&run.event, &run.contact);
                    let ctx = runner::RunContext {
                        event: &event,
                        now,
                        default_timezone: self.config.default_timezone,
                        message_host: &host,
                    };
                    let mut advanced = runner::advance(wf, run.pc as usize, &ctx);
                    if run.state == RunState::WaitingEvent {
                        let timed_out = StepRecord {
                            step_id: "wait".into(),
                            kind: "wait".into(),
                            outcome: "timed out".into(),
                            at_ms: now.timestamp_millis(),
                        };
                        advanced.steps.insert(0, timed_out);
                    }
                    write.state = advanced.state;
                    write.pc = advanced.pc as i64;
                    write.wait_event = advanced.wait_event;
                    write.due_ms = advanced.due_ms;
                    write.steps = advanced.steps;
                    write.messages = advanced.messages;
                }
            }
            advances.push(RunAdvance {
                lease_token: run.lease_token.clone(),
                write,
            });
        }
        let finished: Vec<_> = advances
            .iter()
            .map(|a| {
                (
                    a.write.workflow_id.clone(),
                    a.write.state,
                    message_labels(&a.write.messages),
                )
            })
            .collect();
        self.store
            .finish_runs(now.timestamp_millis(), advances)
            .await?;
        for (workflow, state, messages) in finished {
            telemetry::run_finished(&workflow, state);
            record_messages(&messages);
        }
        self.wakers.delivery.notify_one();
        Ok(claimed.len())
    }

    async fn deliver_once(&self) -> Result<usize, herald_store::StoreError> {
        use futures::StreamExt;
        let claimed = self
            .store
            // A few sends' worth per claim, so that claims are few; the heartbeat below keeps the
            // lease of those still waiting for a free send slot.
            .claim_messages(
                self.clock.now_ms(),
                self.config
                    .batch_size
                    .min(CLAIMS_PER_SEND_SLOT * self.config.send_concurrency as i64),
                self.config.lease.as_millis() as i64,
            )
            .await?;
        let n = claimed.len();
        if n == 0 {
            return Ok(0);
        }
        // Several messages of one contact on one channel claimed together (two SMS steps in a
        // row): only the earliest (ids are time-ordered) is its first, so only that one carries
        // the opt-out line.
        let mut claimed = claimed;
        claimed.sort_by(|a, b| a.id.cmp(&b.id));
        let mut firsts = std::collections::HashSet::new();
        for m in &mut claimed {
            if m.first_on_channel && !firsts.insert((m.event.contact_id().to_owned(), m.channel)) {
                m.first_on_channel = false;
            }
        }
        let channels: std::collections::HashMap<String, &'static str> = claimed
            .iter()
            .map(|m| (m.id.clone(), m.channel.as_str()))
            .collect();
        // Outcomes are recorded in groups: at most one send slot's worth, and none older than
        // `COMPLETION_DELAY`. A crash or a lost lease then re-sends at most one group, and under
        // load a group is one commit for many sends instead of one each.
        let lease_token = claimed[0].lease_token.clone();
        let mut finished = futures::stream::iter(claimed)
            .map(|m| self.delivery.deliver(m))
            .buffer_unordered(self.config.send_concurrency);
        let mut group = Vec::with_capacity(self.config.send_concurrency);
        let mut group_deadline = None;
        // Heartbeat: while sends are in flight their lease is renewed, so a slow provider does
        // not let another process claim and send the same messages again.
        let mut heartbeat = tokio::time::interval(self.config.lease / 3);
        heartbeat.tick().await;
        loop {
            let deadline = async {
                match group_deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                next = finished.next() => {
                    let Some(outcome) = next else { break };
                    group.push(outcome);
                    group_deadline.get_or_insert(tokio::time::Instant::now() + COMPLETION_DELAY);
                    if group.len() >= self.config.send_concurrency {
                        self.record_outcomes(&channels, std::mem::take(&mut group)).await?;
                        group_deadline = None;
                    }
                }
                _ = deadline => {
                    self.record_outcomes(&channels, std::mem::take(&mut group)).await?;
                    group_deadline = None;
                }
                _ = heartbeat.tick() => {
                    // A failed renewal must not abandon sends in flight (whose outcomes would then
                    // go unrecorded and be sent again): the next tick tries again.
                    let until = self.clock.now_ms() + self.config.lease.as_millis() as i64;
                    if let Err(e) = self.store.extend_message_lease(lease_token.clone(), until).await {
                        tracing::warn!(error = %e, "could not renew the lease of messages being sent");
                    }
                }
            }
        }
        if !group.is_empty() {
            self.record_outcomes(&channels, group).await?;
        }
        Ok(n)
    }

    /// Writes delivery outcomes, then counts them in the metrics. A failed write is tried again a
    /// few times (the lease check makes it idempotent): given up, those messages are sent again
    /// once their lease runs out.
    async fn record_outcomes(
        &self,
        channels: &std::collections::HashMap<String, &'static str>,
        outcomes: Vec<herald_store::MessageOutcome>,
    ) -> Result<(), herald_store::StoreError> {
        let results: Vec<_> = outcomes
            .iter()
            .map(|o| (channels[&o.message_id], o.result.clone()))
            .collect();
        let mut pause = std::time::Duration::from_millis(100);
        let mut tries = 1;
        while let Err(e) = self
            .store
            .complete_messages(self.clock.now_ms(), outcomes.clone())
            .await
        {
            if tries == RECORD_TRIES {
                return Err(e);
            }
            tracing::warn!(error = %e, tries, "could not record delivery outcomes; trying again");
            tokio::time::sleep(pause).await;
            pause *= 2;
            tries += 1;
        }
        for (channel, result) in &results {
            telemetry::delivery(channel, result);
        }
        Ok(())
    }
}

/// Attempts to record one group of delivery outcomes (over about 1.5 s) before giving up.
const RECORD_TRIES: u32 = 5;

/// Messages claimed at once per send slot (`send_concurrency`).
const CLAIMS_PER_SEND_SLOT: i64 = 4;

/// Longest a finished send waits for others to share its commit.
const COMPLETION_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// Channel and status of newly created messages, for metrics.
fn message_labels(messages: &[herald_store::NewMessage]) -> Vec<(&'static str, &'static str)> {
    messages
        .iter()
        .map(|m| (m.channel.as_str(), m.status.as_str()))
        .collect()
}

fn record_messages(labels: &[(&'static str, &'static str)]) {
    for (channel, status) in labels {
        telemetry::message(channel, status);
    }
}
