//! The deliverer: claims queued messages under a lease, mints the `<<login_url>>` links of the
//! whole claim in one write, and hands each message to a send task of its own. Three parts that
//! never wait on each other:
//! - the **claim loop** takes work only while there is room (claimed messages not yet recorded),
//!   so a slow provider slows claims instead of letting leases lapse;
//! - **send tasks** (at most `send_concurrency` sending at once) render and send, then pass the
//!   outcome to the recorder over a channel; no send holds a database resource;
//! - the **recorder** commits outcomes in groups (up to `send_concurrency` or 20 ms), and the
//!   **heartbeat** renews the leases of claims still in flight.
//!
//! A send starts only while its claim's lease has at least a third of its length left: a process
//! cut off from the database stops sending what it could no longer record.

use super::{Pass, Shared, panic_message, write_isolating};
use crate::config::Stage;
use crate::delivery::{Delivery, LoginLink};
use crate::health::Loops;
use crate::{Clock, Wakers, telemetry};
use futures::FutureExt;
use herald_store::{
    ClaimedMessage, LeaseToken, MessageId, MessageOutcome, Store, StoreError, Timestamp,
};
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Messages claimed per send slot: enough that claims are few, few enough that a lease is not
/// spent waiting for a slot.
const CLAIMS_PER_SEND_SLOT: usize = 4;

/// Longest a finished send waits for others to share its commit.
const COMPLETION_DELAY: Duration = Duration::from_millis(20);

/// Attempts to record one group of outcomes (over about 1.5 s) before giving up: given up, those
/// messages are sent again, with the same Message-ID, once their lease runs out.
const RECORD_TRIES: u32 = 5;

/// What a send task reports.
enum Finished {
    Outcome(Box<MessageOutcome>, &'static str),
    /// The send panicked: the message is set aside.
    Panicked {
        message_id: MessageId,
        error: String,
    },
    /// The claim's lease could not be kept: nothing was sent and nothing is recorded; the
    /// message is claimed again once the lease runs out.
    LeaseLost,
}

/// A finished send and the room it held.
struct Report {
    finished: Finished,
    lease_token: LeaseToken,
    _room: OwnedSemaphorePermit,
}

/// The leases of claims with messages still in flight.
#[derive(Default)]
struct Leases {
    held: Mutex<HashMap<LeaseToken, Lease>>,
}

struct Lease {
    in_flight: usize,
    /// Until when the lease is known to hold (renewed by the heartbeat).
    valid_until: Instant,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseToken, Lease>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a send under this lease may still start: a third of the lease left at least.
    fn may_send(&self, token: &LeaseToken, lease: Duration) -> bool {
        self.lock()
            .get(token)
            .is_some_and(|l| l.valid_until > Instant::now() + lease / 3)
    }

    fn finished(&self, token: &LeaseToken) {
        let mut held = self.lock();
        if let Some(l) = held.get_mut(token) {
            l.in_flight -= 1;
            if l.in_flight == 0 {
                held.remove(token);
            }
        }
    }
}

pub(crate) struct Deliverer {
    delivery: Arc<Delivery>,
    /// Claimed messages not yet recorded.
    room: Arc<Semaphore>,
    room_size: usize,
    /// Sends in flight.
    slots: Arc<Semaphore>,
    leases: Arc<Leases>,
    reports: mpsc::UnboundedSender<Report>,
    /// Taken by `start_background`.
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Report>>>,
    sends: Mutex<Sends>,
}

/// The send tasks, and whether they were stopped for good ([`Deliverer::abort_sends`]).
#[derive(Default)]
struct Sends {
    tasks: JoinSet<()>,
    /// Set by a crash-like stop: a claim loop that was mid-pass on another thread and comes to
    /// spawn its sends afterwards must not, or they would run on, unrecorded, beside the next
    /// process (its claim stands until its lease runs out, as a killed process's would).
    stopped: bool,
}

impl Deliverer {
    pub(crate) fn new(delivery: Delivery) -> Self {
        let concurrency = delivery.config.send_concurrency.max(1);
        let room_size = concurrency * CLAIMS_PER_SEND_SLOT;
        let (reports, inbox) = mpsc::unbounded_channel();
        Self {
            delivery: Arc::new(delivery),
            room: Arc::new(Semaphore::new(room_size)),
            room_size,
            slots: Arc::new(Semaphore::new(concurrency)),
            leases: Arc::default(),
            reports,
            inbox: Mutex::new(Some(inbox)),
            sends: Mutex::default(),
        }
    }

    /// Starts the recorder and the heartbeat.
    pub(crate) fn start_background(
        &self,
        store: Store,
        clock: Clock,
        wakers: Arc<Wakers>,
        loops: Arc<Loops>,
    ) -> Vec<JoinHandle<()>> {
        let inbox = self
            .inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("the deliverer's background tasks start once");
        let config = &self.delivery.config;
        let recorder = Recorder {
            store: store.clone(),
            clock: clock.clone(),
            leases: self.leases.clone(),
            wakers,
            loops,
            group_size: config.send_concurrency.max(1),
        };
        vec![
            tokio::spawn(recorder.run(inbox)),
            tokio::spawn(heartbeat(store, clock, self.leases.clone(), config.lease)),
        ]
    }

    /// Waits until every claimed message has been recorded (graceful shutdown), at most `limit`.
    pub(crate) async fn drain(&self, limit: Duration) {
        let all = self.room.acquire_many(self.room_size as u32);
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!(
                "shutting down with sends still in flight; their messages are sent again once their lease runs out"
            );
        }
    }

    /// Stops every send where it stands (a crash, as far as delivery is concerned).
    pub(crate) fn abort_sends(&self) {
        let mut sends = self.sends.lock().unwrap_or_else(|p| p.into_inner());
        sends.stopped = true;
        sends.tasks.abort_all();
    }
}

impl Shared {
    pub(crate) async fn deliver_once(&self) -> Result<Pass, StoreError> {
        let d = &self.deliverer;
        // Forget finished send tasks.
        {
            let mut sends = d.sends.lock().unwrap_or_else(|p| p.into_inner());
            while sends.tasks.try_join_next().is_some() {}
        }
        let room = d.room.available_permits();
        if room == 0 {
            return Ok(Pass::Blocked);
        }
        let lease = self.config.lease;
        let now = self.clock.now();
        let claimed_at = Instant::now();
        let limit = (self.config.batch_size.max(1) as usize).min(room);
        let mut claimed = self.store.claim_messages(now, limit as i64, lease).await?;
        if claimed.is_empty() {
            return Ok(Pass::Idle);
        }
        // On failure the claim stands until its lease runs out, then it is claimed again.
        self.load_pinned_versions(
            claimed
                .iter()
                .map(|m| (m.workflow_id.as_str(), m.workflow_version.as_str())),
        )
        .await?;
        let lease_token = claimed[0].lease_token.clone();
        d.leases.lock().insert(
            lease_token.clone(),
            Lease {
                in_flight: claimed.len(),
                valid_until: claimed_at + lease,
            },
        );
        // Several messages of one contact on one channel claimed together (two workflows' SMS):
        // only the earliest (ids are time-ordered) is its first, so only that one carries the
        // opt-out line.
        claimed.sort_by(|a, b| a.id.cmp(&b.id));
        let mut firsts = HashSet::new();
        for m in &mut claimed {
            if m.first_on_channel && !firsts.insert((m.event.contact_id().to_owned(), m.channel)) {
                m.first_on_channel = false;
            }
        }
        let links = self.mint_links(&claimed, now).await;
        let mut sends = d.sends.lock().unwrap_or_else(|p| p.into_inner());
        if sends.stopped {
            return Ok(Pass::Idle);
        }
        for (m, login) in claimed.into_iter().zip(links) {
            let room = d
                .room
                .clone()
                .try_acquire_owned()
                .expect("room was counted before the claim and only this loop takes it");
            let task = SendTask {
                delivery: d.delivery.clone(),
                slots: d.slots.clone(),
                leases: d.leases.clone(),
                reports: d.reports.clone(),
                lease,
            };
            sends.tasks.spawn(task.run(m, login, room));
        }
        Ok(Pass::Worked)
    }

    /// The `<<login_url>>` of each claimed message, minted in one write for the whole claim.
    async fn mint_links(&self, claimed: &[ClaimedMessage], now: Timestamp) -> Vec<LoginLink> {
        let policy = &self.config.links;
        let mut links = vec![LoginLink::Unused; claimed.len()];
        let mut rows = Vec::new();
        let mut urls = Vec::new();
        for (i, m) in claimed.iter().enumerate() {
            if self.deliverer.delivery.needs_login_link(m) {
                let (row, url) = policy.for_message(m.event.contact_id(), &m.id, now);
                rows.push(row);
                urls.push((i, url));
            }
        }
        if rows.is_empty() {
            return links;
        }
        match self.store.mint_message_links(rows, now).await {
            Ok(minted) => {
                for ((i, url), ok) in urls.into_iter().zip(minted) {
                    links[i] = if ok {
                        LoginLink::Minted(url)
                    } else {
                        LoginLink::NotEntitled
                    };
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not mint the login links of a claim; those sends are retried");
                for (i, _) in urls {
                    links[i] = LoginLink::Failed(e.to_string());
                }
            }
        }
        links
    }
}

/// What one send task needs; nothing of the store.
struct SendTask {
    delivery: Arc<Delivery>,
    slots: Arc<Semaphore>,
    leases: Arc<Leases>,
    reports: mpsc::UnboundedSender<Report>,
    lease: Duration,
}

impl SendTask {
    async fn run(self, m: ClaimedMessage, login: LoginLink, room: OwnedSemaphorePermit) {
        let lease_token = m.lease_token.clone();
        let finished = match self.slots.acquire().await {
            Ok(_slot) if self.leases.may_send(&lease_token, self.lease) => {
                let message_id = m.id.clone();
                let channel = m.channel.as_str();
                let delivery = self.delivery.clone();
                let send = async move {
                    delivery
                        .config
                        .fault_point(Stage::Deliver, m.event.contact_id());
                    delivery.deliver(m, login).await
                };
                match AssertUnwindSafe(send).catch_unwind().await {
                    Ok(outcome) => Finished::Outcome(Box::new(outcome), channel),
                    Err(panic) => Finished::Panicked {
                        message_id,
                        error: format!("delivery panicked: {}", panic_message(&*panic)),
                    },
                }
            }
            _ => Finished::LeaseLost,
        };
        // The recorder outlives every send except at shutdown, when nothing is recorded anyway.
        let _ = self.reports.send(Report {
            finished,
            lease_token,
            _room: room,
        });
    }
}

struct Recorder {
    store: Store,
    clock: Clock,
    leases: Arc<Leases>,
    wakers: Arc<Wakers>,
    loops: Arc<Loops>,
    group_size: usize,
}

impl Recorder {
    async fn run(self, mut inbox: mpsc::UnboundedReceiver<Report>) {
        while let Some(first) = inbox.recv().await {
            let mut group = vec![first];
            let deadline = Instant::now() + COMPLETION_DELAY;
            while group.len() < self.group_size {
                tokio::select! {
                    next = inbox.recv() => match next {
                        Some(r) => group.push(r),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            self.record(&group).await;
            for r in &group {
                self.leases.finished(&r.lease_token);
            }
            // Dropping the group frees its room; the claim loop may take more.
            drop(group);
            self.loops.progress("deliverer");
            self.wakers.delivery.notify_one();
        }
    }

    async fn record(&self, group: &[Report]) {
        let mut outcomes = Vec::with_capacity(group.len());
        let mut channels = HashMap::new();
        for r in group {
            match &r.finished {
                Finished::Outcome(o, channel) => {
                    channels.insert(o.message_id.clone(), *channel);
                    outcomes.push(MessageOutcome::clone(o));
                }
                Finished::Panicked { message_id, error } => {
                    tracing::error!(message = %message_id, error = %error, "message set aside");
                    let now = self.clock.now();
                    match self
                        .store
                        .set_message_dead(message_id.clone(), error.clone(), now)
                        .await
                    {
                        Ok(_) => telemetry::set_aside("messages"),
                        Err(e) => {
                            tracing::error!(message = %message_id, error = %e, "could not set a message aside")
                        }
                    }
                }
                Finished::LeaseLost => {}
            }
        }
        if outcomes.is_empty() {
            return;
        }
        let results: Vec<_> = outcomes
            .iter()
            .map(|o| (channels[&o.message_id], o.result.clone()))
            .collect();
        let mut pause = Duration::from_millis(100);
        for tries in 1..=RECORD_TRIES {
            let now = self.clock.now();
            let written = write_isolating(
                outcomes.clone(),
                |batch| self.store.complete_messages(now, batch),
                |o, error| async move {
                    tracing::error!(message = %o.message_id, error = %error, "message set aside: the database keeps rejecting its outcome");
                    telemetry::set_aside("messages");
                    self.store
                        .set_message_dead(o.message_id, error, now)
                        .await
                        .map(drop)
                },
            )
            .await;
            match written {
                Ok(()) => {
                    for (channel, result) in &results {
                        telemetry::delivery(channel, result);
                    }
                    return;
                }
                Err(e) if tries < RECORD_TRIES => {
                    tracing::warn!(error = %e, tries, "could not record delivery outcomes; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(e) => {
                    tracing::error!(error = %e, messages = outcomes.len(),
                        "could not record delivery outcomes; those messages are sent again once their lease runs out");
                }
            }
        }
    }
}

/// Renews the leases of claims with messages in flight, a third of a lease apart, so a slow
/// provider does not let another process claim and send them again. A failed renewal is tried
/// at the next beat; meanwhile no new send starts under a lease about to lapse.
async fn heartbeat(store: Store, clock: Clock, leases: Arc<Leases>, lease: Duration) {
    let mut beat = tokio::time::interval((lease / 3).max(Duration::from_millis(10)));
    beat.tick().await;
    loop {
        beat.tick().await;
        let tokens: Vec<LeaseToken> = leases.lock().keys().cloned().collect();
        for token in tokens {
            let renewed_at = Instant::now();
            match store
                .extend_message_lease(token.clone(), clock.now() + lease)
                .await
            {
                Ok(_) => {
                    if let Some(l) = leases.lock().get_mut(&token) {
                        l.valid_until = renewed_at + lease;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the lease of messages being sent")
                }
            }
        }
    }
}
