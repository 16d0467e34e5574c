//! "Now", injectable: the engine never reads the wall clock directly, so tests can move time
//! forward by days without sleeping.

use herald_store::Timestamp;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// A clock that moves only when told to (tests).
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A manual clock starting at `start`.
    pub fn manual(start: Timestamp) -> Self {
        Self::Manual(Arc::new(AtomicI64::new(start.millis())))
    }

    pub fn now(&self) -> Timestamp {
        match self {
            Self::System => Timestamp::from_datetime(chrono::Utc::now()),
            Self::Manual(t) => Timestamp::from_millis(t.load(Ordering::SeqCst)),
        }
    }

    pub fn now_utc(&self) -> chrono::DateTime<chrono::Utc> {
        self.now().to_datetime()
    }

    /// Moves a manual clock forward; a no-op on the system clock.
    pub fn advance(&self, by: std::time::Duration) {
        if let Self::Manual(t) = self {
            let later = |ms| Some((Timestamp::from_millis(ms) + by).millis());
            let _ = t.fetch_update(Ordering::SeqCst, Ordering::SeqCst, later);
        }
    }
}
