//! Announcements between the processes sharing one PostgreSQL database: "events were stored",
//! "runs or messages are due", "the workflows changed". Each is a wake-up, never the work itself:
//! the work is in the tables, so a lost announcement only costs a poll interval. On SQLite (one
//! process) there is no one to tell.
//!
//! Announcing is cheap for the caller: it sets a bit and returns; one task sends whatever bits
//! gathered over a few milliseconds as one `NOTIFY`, so a stream of commits costs at most a
//! couple of hundred notifications a second, not one each (every `NOTIFY` commit takes
//! PostgreSQL's notification queue lock). Every process tags its notifications with an origin of
//! its own and ignores its own.

use crate::backend::postgres::PgStore;
use crate::{Backend, Result};
use sqlx::postgres::PgListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// How long announcements gather before one `NOTIFY` carries them: the most another process
/// waits longer than it would for a notification per commit.
const GATHER: Duration = Duration::from_millis(5);

/// A set of announcements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Signals(u8);

impl Signals {
    /// New events were stored: dispatchers have work.
    pub const EVENTS: Self = Self(1);
    /// Runs became due (an awaited event came): steppers have work.
    pub const RUNS: Self = Self(2);
    /// Messages were queued: deliverers have work.
    pub const MESSAGES: Self = Self(4);
    /// A reload changed the stored workflow versions or enabled states.
    pub const WORKFLOWS: Self = Self(8);

    const NAMES: [(Self, &'static str); 4] = [
        (Self::EVENTS, "events"),
        (Self::RUNS, "runs"),
        (Self::MESSAGES, "messages"),
        (Self::WORKFLOWS, "workflows"),
    ];

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn names(self) -> String {
        Self::NAMES
            .iter()
            .filter(|(s, _)| self.contains(*s))
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Unknown names (a newer herald) are ignored.
    fn parse(names: &str) -> Self {
        names
            .split(',')
            .filter_map(|n| Self::NAMES.iter().find(|(_, name)| *name == n))
            .fold(Self::default(), |all, (s, _)| all | *s)
    }
}

impl std::ops::BitOr for Signals {
    type Output = Self;
    fn bitor(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

/// Gathers announcements and sends them; a no-op on SQLite.
pub(crate) struct Announcer {
    pending: AtomicU8,
    wake: Notify,
    origin: String,
}

impl Announcer {
    pub(crate) fn start(backend: Arc<Backend>) -> Arc<Self> {
        let announcer = Arc::new(Self {
            pending: AtomicU8::new(0),
            wake: Notify::new(),
            origin: uuid::Uuid::new_v4().simple().to_string(),
        });
        if let Backend::Postgres(_) = &*backend {
            tokio::spawn(send(announcer.clone(), backend));
        }
        announcer
    }

    pub(crate) fn announce(&self, signals: Signals) {
        if signals.is_empty() {
            return;
        }
        self.pending.fetch_or(signals.0, Ordering::Relaxed);
        self.wake.notify_one();
    }

    pub(crate) fn origin(&self) -> &str {
        &self.origin
    }
}

async fn send(announcer: Arc<Announcer>, backend: Arc<Backend>) {
    let Backend::Postgres(pg) = &*backend else {
        return;
    };
    loop {
        announcer.wake.notified().await;
        tokio::time::sleep(GATHER).await;
        let signals = Signals(announcer.pending.swap(0, Ordering::Relaxed));
        if signals.is_empty() {
            continue;
        }
        let payload = format!("{} {}", announcer.origin, signals.names());
        if let Err(e) = pg.notify(&payload).await {
            // The others find the work at their next poll.
            tracing::debug!(error = %e, "could not announce to the other processes");
        }
    }
}

/// What a listener heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Another process announced these.
    Signals(Signals),
    /// The connection was lost and made anew: announcements may have been missed.
    Missed,
}

/// Announcements of the other processes on this database.
pub struct Announcements {
    listener: PgListener,
    origin: String,
}

impl Announcements {
    pub(crate) async fn open(pg: &PgStore, origin: &str) -> Result<Self> {
        Ok(Self {
            listener: pg.listener().await?,
            origin: origin.to_owned(),
        })
    }

    /// The next announcement of another process.
    pub async fn next(&mut self) -> Result<Heard> {
        loop {
            let Some(n) = self.listener.try_recv().await? else {
                return Ok(Heard::Missed);
            };
            let (origin, names) = n.payload().split_once(' ').unwrap_or(("", n.payload()));
            if origin != self.origin {
                return Ok(Heard::Signals(Signals::parse(names)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Signals;

    #[test]
    fn signals_round_trip_through_their_names() {
        let all = Signals::EVENTS | Signals::MESSAGES | Signals::WORKFLOWS;
        assert_eq!(all.names(), "events,messages,workflows");
        assert_eq!(Signals::parse(&all.names()), all);
        assert_eq!(Signals::parse("runs,shiny_new_thing"), Signals::RUNS);
        assert!(Signals::parse("").is_empty());
    }
}
