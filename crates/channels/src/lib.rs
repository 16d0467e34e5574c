//! herald's delivery channels. Each takes a rendered message and answers sent, or failed
//! transiently (retry later) or permanently (stop). Where the message goes when no provider is
//! configured, the dev mailbox, is decided by the engine, which stores the copy in the database.

pub mod dkim;
pub mod email;
pub mod sms;
mod smtp_pool;

/// Why a send did not go through, classified for the retry policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// May pass later (SMTP 4xx, timeouts, connection errors): retried with backoff.
    #[error("temporary failure: {0}")]
    Transient(String),
    /// May pass later, but not before the provider's `Retry-After` (HTTP 429 or 503).
    #[error("temporary failure, retry after {1:?}: {0}")]
    RetryAfter(String, std::time::Duration),
    /// Will not pass (SMTP 5xx, an invalid address): failed at once.
    #[error("permanent failure: {0}")]
    Permanent(String),
    /// The receiving server says the mailbox does not exist (SMTP 5xx with status 5.1.1): the
    /// address is suppressed for future email.
    #[error("mailbox does not exist: {0}")]
    NoSuchMailbox(String),
}
