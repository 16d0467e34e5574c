//! Group commit for event intake. Request handlers hand their events to one task over a channel;
//! it writes whatever has queued up (up to [`MAX_BATCH_EVENTS`]) in one transaction and answers
//! every handler after that commit. Under load many posts share one fsync; when idle a single
//! post is committed at once, without waiting for company. Several groups may be in flight:
//! PostgreSQL commits them at once (its commits wait on the WAL flush, which it shares between
//! them); SQLite's writer runs the groups waiting for it in one transaction with the engine's
//! work.

use crate::announce::{Announcer, Signals};
use crate::{Accepted, Backend, NewEvent, Result, StoreError};
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Upper bound on the events of one commit: keeps a transaction short and its memory bounded.
const MAX_BATCH_EVENTS: usize = 5_000;

struct Request {
    events: Vec<NewEvent>,
    /// How many events the request brought (its answer has as many entries).
    count: usize,
    reply: oneshot::Sender<Result<Vec<Accepted>>>,
}

#[derive(Clone)]
pub(crate) struct Ingestor {
    /// Bounded, so a flood of posts waits here instead of growing memory without limit.
    tx: mpsc::Sender<Request>,
}

impl Ingestor {
    pub(crate) fn start(backend: Arc<Backend>, announcer: Arc<Announcer>) -> Self {
        let (tx, rx) = mpsc::channel(4_096);
        tokio::spawn(run(backend, announcer, rx));
        Self { tx }
    }

    pub(crate) async fn accept(&self, events: Vec<NewEvent>) -> Result<Vec<Accepted>> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request {
                count: events.len(),
                events,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

async fn run(backend: Arc<Backend>, announcer: Arc<Announcer>, mut rx: mpsc::Receiver<Request>) {
    let in_flight = Arc::new(Semaphore::new(backend.commits_in_flight()));
    loop {
        // Wait for a free commit slot first, so that posts arriving meanwhile join the next group.
        let slot = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let Some(first) = rx.recv().await else { break };
        let mut batch = vec![first];
        let mut count = batch[0].events.len();
        while count < MAX_BATCH_EVENTS {
            match rx.try_recv() {
                Ok(req) => {
                    count += req.events.len();
                    batch.push(req);
                }
                Err(_) => break,
            }
        }
        let backend = backend.clone();
        let announcer = announcer.clone();
        tokio::spawn(async move {
            if commit(&backend, batch).await {
                announcer.announce(Signals::EVENTS);
            }
            drop(slot);
        });
    }
}

/// Stores one group and answers each of its requests; whether any event was new.
async fn commit(backend: &Backend, mut batch: Vec<Request>) -> bool {
    let events: Vec<NewEvent> = batch
        .iter_mut()
        .flat_map(|r| std::mem::take(&mut r.events))
        .collect();
    let count = events.len();
    match backend.insert_events(events).await {
        Ok(results) => {
            let any_new = results.iter().any(|a| matches!(a, Accepted::New));
            let mut results = results.into_iter();
            for req in batch {
                let mine = results.by_ref().take(req.count).collect();
                let _ = req.reply.send(Ok(mine));
            }
            any_new
        }
        Err(e) => {
            tracing::error!(error = %e, events = count, "event batch could not be stored");
            let msg = e.to_string();
            for req in batch {
                let _ = req.reply.send(Err(StoreError::Batch(msg.clone())));
            }
            false
        }
    }
}
