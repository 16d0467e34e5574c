//! herald's one storage API over two backends (SQLite by default, PostgreSQL for several
//! processes), in the shape of Stalwart's store: an enum over backends with a folder per backend,
//! hand-written SQL in each, and one conformance suite (`tests/conformance/`) run against both.
//! The reads are written once (`backend/read.rs`) over a few shared primitives (`backend/sql.rs`:
//! a connection of either kind, a statement with its text for each, fetches that decode rows by
//! column name); each backend's `read.rs` holds only their SQL.
//!
//! Writes come in batches: single-event posts are group-committed by the [`ingest`] task, and the
//! engine claims and completes runs and messages many at a time, so durability (an fsync or a
//! commit per batch) is paid per batch rather than per event.

mod announce;
pub mod backend;
mod decode;
mod erasure;
mod ids;
mod ingest;
pub mod model;
mod projection;

pub use announce::{Announcements, Heard, Signals};
pub use backend::Backend;
pub use erasure::{AddressKey, Erased};
pub use model::*;

use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// From SQLite's writer connection (see `backend/sqlite/connection.rs`).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("could not apply database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A group commit failed; every request in it gets the cause.
    #[error("the events could not be stored: {0}")]
    Batch(String),
    #[error("the store is shutting down")]
    Closed,
    #[error("the store is not ready for this: {0}")]
    NotConfigured(&'static str),
    #[error("could not start the database writer's thread: {0}")]
    Thread(#[from] std::io::Error),
}

impl StoreError {
    /// Whether the database refused this particular work (a constraint, an encoding, a value it
    /// cannot store, stored data that cannot be read back), rather than being unreachable, busy
    /// or shutting down. Only a rejection can be blamed on the item being written, so only a
    /// rejection that repeats sets that item aside.
    pub fn is_rejection(&self) -> bool {
        match self {
            Self::Corrupt(_) => true,
            Self::Database(sqlx::Error::Database(e)) => {
                let code = e.code();
                let code = code.as_deref().unwrap_or_default();
                match code.parse::<i32>() {
                    Ok(n) => !is_sqlite_unavailable(n),
                    // PostgreSQL SQLSTATEs: connection, resources, operator intervention,
                    // serialization and deadlock, lock not available.
                    Err(_) => {
                        !(code.starts_with("08")
                            || code.starts_with("53")
                            || code.starts_with("57")
                            || matches!(code, "40001" | "40P01" | "55P03"))
                    }
                }
            }
            Self::Database(
                sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. },
            ) => true,
            // As sqlx's errors are read above: SQLite's own result codes, and values that cannot
            // be encoded or decoded.
            Self::Sqlite(
                rusqlite::Error::SqliteFailure(e, _)
                | rusqlite::Error::SqlInputError { error: e, .. },
            ) => !is_sqlite_unavailable(e.extended_code),
            Self::Sqlite(
                rusqlite::Error::FromSqlConversionFailure(..)
                | rusqlite::Error::IntegralValueOutOfRange(..)
                | rusqlite::Error::InvalidColumnType(..)
                | rusqlite::Error::Utf8Error(..)
                | rusqlite::Error::ToSqlConversionFailure(_),
            ) => true,
            _ => false,
        }
    }
}

/// SQLite (extended) result codes that say the database could not be used, not that it refused
/// the work: busy, locked, I/O, full, cannot open.
fn is_sqlite_unavailable(code: i32) -> bool {
    matches!(code & 0xff, 5 | 6 | 10 | 13 | 14)
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Cheap to clone; every clone shares the connections and the group-commit task.
#[derive(Clone)]
pub struct Store {
    backend: Arc<Backend>,
    ingest: ingest::Ingestor,
    announcer: Arc<announce::Announcer>,
    /// Hashes the addresses of erased contacts who had opted out; set once the site's secret is
    /// known (see [`Store::set_address_key`]).
    address_key: Arc<std::sync::OnceLock<AddressKey>>,
}

/// The planner the dispatcher runs inside its transaction: pure, synchronous, given the batch
/// and the current runs of its contacts.
pub type Planner<'a> = &'a (dyn Fn(&DispatchInput) -> DispatchPlan + Send + Sync);

/// The clock a dispatch pass reads.
pub type DispatchClock<'a> = &'a (dyn Fn() -> Timestamp + Send + Sync);

/// One dispatch pass as the dispatcher asks for it.
#[derive(Clone, Copy)]
pub struct DispatchRequest<'a> {
    /// At most this many undispatched events, oldest first.
    pub limit: i64,
    /// Read once the batch is selected, so that an event stored while the pass waited for the
    /// database is planned at its own time ([`DispatchInput::now`]).
    pub clock: DispatchClock<'a>,
    /// Runs created this long before "now" count as recent enrollments
    /// ([`EnrollmentCounts::recent`]).
    pub loop_window: Duration,
    /// Load the state of the batch's contacts for the planner ([`DispatchInput::states`]): only
    /// when a workflow's conditions read it, as it costs a query per batch.
    pub contact_states: bool,
    pub planner: Planner<'a>,
}

impl<'a> DispatchRequest<'a> {
    /// A pass that does not load the contacts' state.
    pub fn new(
        limit: i64,
        clock: DispatchClock<'a>,
        loop_window: Duration,
        planner: Planner<'a>,
    ) -> Self {
        Self {
            limit,
            clock,
            loop_window,
            contact_states: false,
            planner,
        }
    }
}

impl Store {
    /// Opens (creating a SQLite file if needed) and migrates the database at `url`.
    pub async fn connect(url: &str) -> Result<Self> {
        let backend = Arc::new(Backend::connect(url).await?);
        backend.migrate().await?;
        let announcer = announce::Announcer::start(backend.clone());
        Ok(Self {
            ingest: ingest::Ingestor::start(backend.clone(), announcer.clone()),
            announcer,
            backend,
            address_key: Arc::default(),
        })
    }

    /// The key of the erased contacts' address hashes (a site secret). Until it is set, dispatch
    /// does not look for erased addresses and erasure is refused; the first key set stays.
    pub fn set_address_key(&self, key: AddressKey) {
        let _ = self.address_key.set(key);
    }

    /// Runs the planner over up to `limit` undispatched events and applies its plan together with
    /// the membership projection, in one transaction (a contact whose address belonged to an
    /// erased, opted-out contact is opted out again). Returns how many events it dispatched.
    pub async fn dispatch(&self, request: DispatchRequest<'_>) -> Result<usize> {
        backend::dispatch::dispatch(&self.backend, request, self.address_key.get()).await
    }

    /// Removes everything herald holds on a contact, in one transaction, keeping only the keyed
    /// hash of each address they had opted out of. `None` for an unknown contact.
    pub async fn erase_contact(
        &self,
        contact_id: ContactId,
        now: Timestamp,
    ) -> Result<Option<Erased>> {
        let key = self
            .address_key
            .get()
            .ok_or(StoreError::NotConfigured("no address key set"))?;
        backend::opt_outs::erase_contact(&self.backend, contact_id, key.clone(), now).await
    }

    /// Opts every contact with each email address out of email (`source` per address: bounced,
    /// complaint, ...), and keeps the address's keyed hash so that a contact who arrives with it
    /// later is opted out too. Returns the contacts opted out.
    pub async fn suppress_email_addresses(
        &self,
        addresses: Vec<(String, String)>,
        now: Timestamp,
    ) -> Result<Vec<ContactId>> {
        let key = self.address_key.get().cloned();
        backend::opt_outs::suppress_email_addresses(&self.backend, addresses, key, now).await
    }

    /// Tells the other processes on this database that there is work or news (returns at once;
    /// see [`Signals`]). Stored events are announced by the store itself.
    pub fn announce(&self, signals: Signals) {
        self.announcer.announce(signals);
    }

    /// The other processes' announcements, or `None` where there are no other processes
    /// (SQLite).
    pub async fn announcements(&self) -> Result<Option<Announcements>> {
        match &*self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(pg) => Announcements::open(pg, self.announcer.origin())
                .await
                .map(Some),
        }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Spawns `task`, a loop that leads write transactions of its own (the dispatcher), where
    /// those run fastest: on SQLite on the writer's thread, next to the connection; on
    /// PostgreSQL on the caller's runtime. Returns a task of the caller's runtime that ends with
    /// `task` (and aborts it when it is dropped or aborted), and the handle that aborts `task`
    /// itself at once.
    pub fn spawn_writing<F>(
        &self,
        task: F,
    ) -> (tokio::task::JoinHandle<()>, tokio::task::AbortHandle)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.backend.spawn_writing(task)
    }

    /// `true` for PostgreSQL: several processes may share the database.
    pub fn is_shared(&self) -> bool {
        matches!(*self.backend, Backend::Postgres(_))
    }

    /// Stores events durably; returns once committed, with each event's fate in order. Concurrent
    /// callers share a commit.
    pub async fn accept_events(&self, events: Vec<NewEvent>) -> Result<Vec<Accepted>> {
        self.ingest.accept(events).await
    }
}

/// Dispatches to the backend the methods each implements in its own folder.
macro_rules! delegate {
    ($( $(#[$meta:meta])* fn $name:ident(&self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )*) => {
        impl Store {
            $( $(#[$meta])* pub async fn $name(&self $(, $arg: $ty)*) -> Result<$ret> {
                match &*self.backend {
                    Backend::Sqlite(b) => b.$name($($arg),*).await,
                    Backend::Postgres(b) => b.$name($($arg),*).await,
                }
            } )*
        }
    };
}

delegate! {
    /// Checks that the database answers (for `/healthz`).
    fn ping(&self) -> ();
}

/// The reads, written once for both backends (`backend::read`) and run where the backend reads.
macro_rules! reads {
    ($( $(#[$meta:meta])* fn $name:ident(&self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )*) => {
        impl Store {
            $( $(#[$meta])* pub async fn $name(&self $(, $arg: $ty)*) -> Result<$ret> {
                backend::read::$name(self.backend.reader() $(, $arg)*).await
            } )*
        }
    };
}

reads! {
    /// The earliest due time of any run or queued message, to sleep until then.
    fn next_due(&self) -> Option<Timestamp>;
    /// The bundles (id, version, bundle JSON) of every version a live run is pinned to.
    fn live_workflow_versions(&self) -> Vec<(WorkflowId, String, String)>;
    /// The contact's newest `limit` events, oldest first.
    fn contact_events(&self, contact_id: ContactId, limit: i64) -> Vec<ContactEventRow>;
    /// The bundle JSON of one stored workflow version.
    fn workflow_version(&self, id: WorkflowId, version: String) -> Option<String>;
    /// Whether each workflow is enabled, as the last reload of any process recorded it.
    fn workflow_states(&self) -> Vec<(WorkflowId, bool)>;
    /// The dev mailbox, newest first.
    fn mailbox(&self, limit: i64) -> Vec<MailboxItem>;
    fn messages(&self, filter: ListFilter) -> Vec<MessageRow>;
    /// What each of these messages is rendered from (none for a message whose event was erased).
    fn message_sources(&self, ids: Vec<MessageId>) -> Vec<MessageSource>;
    fn runs(&self, filter: ListFilter) -> Vec<RunRow>;
    fn contact(&self, id: ContactId) -> Option<ContactRow>;
    fn grants(&self, contact_id: ContactId) -> Vec<GrantRow>;
    /// Events stored but not yet dispatched (for metrics and tests).
    fn undispatched_count(&self) -> i64;
    /// Queue depths and the oldest due job at `now` (for `/metrics`).
    fn queue_stats(&self, now: Timestamp) -> QueueStats;
}

/// Domain operations written once for both backends, each in its aggregate's module under
/// `backend/`.
macro_rules! written_once {
    ($( $(#[$meta:meta])* fn $module:ident :: $name:ident(&self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )*) => {
        impl Store {
            $( $(#[$meta])* pub async fn $name(&self $(, $arg: $ty)*) -> Result<$ret> {
                backend::$module::$name(&self.backend $(, $arg)*).await
            } )*
        }
    };
}

written_once! {
    /// Claims up to `limit` runs due at `now` under a lease of `lease`.
    fn runs::claim_runs(&self, now: Timestamp, limit: i64, lease: Duration) -> Vec<ClaimedRun>;
    /// Writes advanced runs whose lease still holds; the others are dropped (the lease was lost).
    fn runs::finish_runs(&self, now: Timestamp, advances: Vec<RunAdvance>) -> ();
    /// Claims up to `limit` queued messages due at `now` under a lease of `lease`.
    fn messages::claim_messages(&self, now: Timestamp, limit: i64, lease: Duration) -> Vec<ClaimedMessage>;
    /// Extends the lease of the messages of one claim still being delivered (heartbeat).
    fn messages::extend_message_lease(&self, lease_token: LeaseToken, until: Timestamp) -> u64;
    /// Records delivery outcomes whose lease still holds.
    fn messages::complete_messages(&self, now: Timestamp, outcomes: Vec<MessageOutcome>) -> ();
    /// Puts a message straight into the dev mailbox (system emails outside a workflow run).
    fn messages::add_to_mailbox(&self, item: MailboxItem) -> ();
    /// Stores workflow versions (id, version, bundle JSON); existing ones are kept.
    fn workflows::save_workflow_versions(&self, versions: Vec<(WorkflowId, String, String)>, now: Timestamp) -> ();
    /// Records whether each workflow is enabled and, for each whose stored state changed (or was
    /// unknown), parks its live runs (cancelling the messages they had queued) or resumes its
    /// parked ones, in the same transaction. Returns those (id, enabled,
    /// runs parked or resumed).
    fn workflows::sync_workflow_states(&self, states: Vec<(WorkflowId, bool)>, now: Timestamp) -> Vec<(WorkflowId, bool, u64)>;
    /// Whether the contact holds at least one active offer grant (what a learner link needs).
    fn links::has_active_offer(&self, contact_id: ContactId) -> bool;
    /// Stores a freshly minted link (replacing the one of the same message) and audits the mint.
    fn links::mint_link(&self, link: NewLink, now: Timestamp) -> ();
    /// The links of a batch of messages being sent, in one transaction: each is stored (replacing
    /// the earlier one of its message) and audited if its contact holds an active offer grant.
    /// Returns, per link, whether it was (a contact without a grant gets none).
    fn links::mint_message_links(&self, links: Vec<NewLink>, now: Timestamp) -> Vec<bool>;
    /// Revokes every live link of the contact (learner) or the site's user link (`None`) and ends
    /// every session of that kind and contact, then stores `link` and, if given, a site value
    /// (the staff link's generation): regeneration, in one transaction.
    fn links::regenerate_link(&self, link: NewLink, site_value: Option<(String, String)>, now: Timestamp) -> ();
    /// Read-only: would this link open the portal now? (GET /l/{token} changes nothing.)
    fn links::check_link(&self, token_hash: String, now: Timestamp) -> Result<LinkHolder, (LinkRefusal, Option<ContactId>)>;
    /// Redeems a link atomically: validity, use count and entitlement are checked by the statement
    /// that counts the use; on success a session starts and, for a learner, a `course.user_login`
    /// event from `login_source` is stored in the same transaction. Refusals are audited.
    fn links::redeem_link(&self, token_hash: String, now: Timestamp, session: NewSession, login_source: String) -> Result<LinkHolder, (LinkRefusal, Option<ContactId>)>;
    /// The live session with this id hash, if any.
    fn links::session(&self, id_hash: String, now: Timestamp) -> Option<LinkHolder>;
    fn links::end_session(&self, id_hash: String, now: Timestamp) -> ();
    /// Products of the contact's active grants (offers' products plus direct product grants), or,
    /// for `None` (staff), the whole catalogue.
    fn links::portal_products(&self, contact_id: Option<ContactId>) -> Vec<ProductRow>;
    /// Records a request for a new link if the contact is under `max_short` requests since
    /// `short_since` and `max_day` since `day_since`; returns whether it was allowed.
    fn links::allow_link_resend(&self, contact_id: ContactId, now: Timestamp, short_since: Timestamp, max_short: i64, day_since: Timestamp, max_day: i64) -> bool;
    /// A site-wide value (e.g. the user link key), creating it with `default` if absent.
    fn links::site_value(&self, name: String, default: String) -> String;
    fn links::set_site_value(&self, name: String, value: String) -> ();
    fn links::link_audit(&self, contact_id: Option<ContactId>, limit: i64) -> Vec<LinkAuditRow>;
    /// The contacts an audience picks, by id.
    fn enroll::audience(&self, query: AudienceQuery) -> Vec<ContactId>;
    /// What each contact holds and has completed, as stored (every contact asked for is in the
    /// answer, with an empty state when nothing is known).
    fn enroll::contact_states(&self, contact_ids: Vec<ContactId>) -> std::collections::HashMap<ContactId, herald_core::workflow::ContactState>;
    /// The enrollment counts in one workflow of each of `contact_ids` that herald knows (an
    /// unknown id has no row).
    fn enroll::enrollment_counts(&self, workflow_id: WorkflowId, contact_ids: Vec<ContactId>, window_start: Timestamp) -> Vec<(ContactId, EnrollmentCounts)>;
    /// Course events received since `since` (not herald's enrollments, not set-aside ones),
    /// after `after_seq`, in order: what a replay matches again.
    fn enroll::course_events_since(&self, since: Timestamp, after_seq: i64, limit: i64) -> Vec<(i64, herald_core::CourseEvent)>;
    /// The triggering event (its `seq`) and workflow of every run of these contacts.
    fn enroll::runs_started_by_events(&self, contact_ids: Vec<ContactId>) -> Vec<(i64, WorkflowId)>;
    /// Which of `ids` are stored as events of `source`.
    fn enroll::stored_event_ids(&self, source: String, ids: Vec<String>) -> Vec<String>;
    /// Sets aside the oldest undispatched event (its dispatch keeps failing) with the error, so
    /// the events behind it go on. Returns its (source, id).
    fn dead::set_aside_next_event(&self, error: String, now: Timestamp) -> Option<(String, String)>;
    /// Ends a live run as `state` (dead: advancing it keeps failing; cancelled: an operator's
    /// cancel) with `reason`, cancelling its queued messages that no send holds. Returns the run's
    /// state afterwards (`state` only if it was live), `None` for an unknown run.
    fn dead::end_run(&self, run_id: RunId, state: RunState, reason: String, now: Timestamp) -> Option<RunState>;
    /// Queues a failed or dead message again (attempts from zero, due now, the same Message-ID).
    /// Returns its status afterwards (`queued` only if it was failed or dead), `None` if unknown.
    fn dead::retry_message(&self, message_id: MessageId, now: Timestamp) -> Option<MessageStatus>;
    /// Marks a queued message dead (recording its delivery keeps failing).
    fn dead::set_message_dead(&self, message_id: MessageId, error: String, now: Timestamp) -> bool;
    /// Events set aside, oldest first, after the given `seq`.
    fn dead::dead_events(&self, after_seq: i64, limit: i64) -> Vec<DeadEventRow>;
    /// Opts a contact out of a channel (`true`) or back in (`false`); returns whether anything changed.
    fn opt_outs::set_opt_out(&self, contact_id: ContactId, channel: Channel, opted_out: bool, source: String, now: Timestamp) -> bool;
    fn opt_outs::opt_outs(&self, contact_id: ContactId) -> Vec<OptOutRow>;
    /// Every opt-out with the contact's current addresses, oldest first.
    fn opt_outs::suppression_list(&self) -> Vec<SuppressionRow>;
    /// Ids of the contacts whose phone is this E.164 number (inbound SMS keywords).
    fn opt_outs::contacts_by_phone(&self, phone: String) -> Vec<ContactId>;
}
