//! The rows herald stores and the batches its engine hands the store. Plain data: the store
//! knows SQL, the engine knows the rules, and these types are the contract between them.

use crate::backend::sqlite::FromSqliteRow;
pub use crate::ids::{ContactId, LeaseToken, MessageId, RunId, WorkflowId};
use herald_core::CourseEvent;
pub use herald_core::{Channel, MessageStatus, RunState, Timestamp};
use std::collections::HashMap;

/// An event accepted at the HTTP edge, about to be stored.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event: CourseEvent,
    pub received: Timestamp,
}

/// The answer for one stored event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    New,
    /// The same (source, id) was already stored: success, and no further effect.
    Duplicate,
}

impl Accepted {
    /// The answer for an event whose insert stored a row (new) or met its (source, id).
    pub(crate) fn of_stored(stored: bool) -> Self {
        if stored { Self::New } else { Self::Duplicate }
    }
}

/// Latest known details of a contact (the membership projection).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, sqlx::FromRow, FromSqliteRow)]
pub struct ContactRow {
    // Named apart from the id of a row it is read beside (a message's source).
    #[sqlx(rename = "contact_id")]
    pub id: ContactId,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub timezone: Option<String>,
    /// JSON object text, as the platform sent it.
    pub custom_fields: Option<String>,
    /// The language its messages use (`de-DE`), as the platform sent it.
    pub locale: Option<String>,
}

/// A live run of a contact, as the dispatcher needs to see it (exits and event waits).
#[derive(Debug, Clone, sqlx::FromRow, FromSqliteRow)]
pub struct LiveRun {
    #[sqlx(rename = "id")]
    pub run_id: RunId,
    pub workflow_id: WorkflowId,
    pub workflow_version: String,
    pub contact_id: ContactId,
    #[sqlx(try_from = "String")]
    pub state: RunState,
    /// The trigger name a `WaitingEvent` run waits for.
    pub wait_event: Option<String>,
}

/// An audience with its cutoff resolved: holders of an active grant of any of `offers` or
/// `products` (every contact when both are empty), and with `inactive_before`, only those whose
/// latest course event is older.
#[derive(Debug, Clone, Default)]
pub struct AudienceQuery {
    pub offers: Vec<String>,
    pub products: Vec<String>,
    pub inactive_before: Option<Timestamp>,
}

/// How often a contact was enrolled in a workflow: what the enrollment rules need.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EnrollmentCounts {
    /// Runs ever started (refusals not counted).
    pub total: i64,
    /// Runs started since the loop-protection window began.
    pub recent: i64,
    /// Whether one of them is still live.
    pub live: bool,
}

/// What the dispatcher's planner sees: a batch of undispatched events, in order, with the
/// current run state of their contacts.
#[derive(Debug)]
pub struct DispatchInput {
    /// "Now" for this batch: the request's clock read once the events were selected.
    pub now: Timestamp,
    pub events: Vec<(i64, CourseEvent)>,
    pub live_runs: Vec<LiveRun>,
    /// Keyed by (contact id, workflow id).
    pub counts: HashMap<(ContactId, WorkflowId), EnrollmentCounts>,
    /// The batch's contacts as the projection left them (this batch's events applied), so that
    /// messages go to the latest address even when an event carries only the contact's id.
    pub contacts: HashMap<ContactId, ContactRow>,
    /// The state of the batch's contacts as the projection left them, when the dispatcher asked
    /// for it (a workflow's conditions read it).
    pub states: Option<HashMap<ContactId, herald_core::workflow::ContactState>>,
}

/// What the planner decided for a batch; applied in the same transaction that marks the events
/// dispatched, so a crash either applies all of it or none.
#[derive(Debug, Default)]
pub struct DispatchPlan {
    pub new_runs: Vec<RunWrite>,
    /// Live runs ended by `exit_when`.
    pub exits: Vec<RunExit>,
    /// Runs waiting for an event that has now arrived: due at once.
    pub resumes: Vec<RunResume>,
    /// The planner cannot plan this batch yet (it lacks a workflow version a live run is pinned
    /// to): nothing is written and the events stay undispatched.
    pub postponed: bool,
}

/// A run whose awaited event came: `event_seq` is that event, which its next steps can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResume {
    pub run_id: RunId,
    pub event_seq: i64,
}

#[derive(Debug, Clone)]
pub struct RunExit {
    pub run_id: RunId,
    pub reason: String,
}

/// A run's new state after the engine advanced it, with what it did and the messages it queued.
/// For a new run this is its first state; for a claimed run the lease token must still match.
#[derive(Debug, Clone)]
pub struct RunWrite {
    pub run_id: RunId,
    pub workflow_id: WorkflowId,
    pub workflow_version: String,
    pub contact_id: ContactId,
    pub event_seq: i64,
    pub state: RunState,
    pub reason: Option<String>,
    pub pc: i64,
    pub wait_event: Option<String>,
    pub due: Option<Timestamp>,
    pub steps: Vec<StepRecord>,
    pub messages: Vec<NewMessage>,
}

/// One line of a run's history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, FromSqliteRow)]
pub struct StepRecord {
    pub step_id: String,
    pub kind: String,
    pub outcome: String,
    pub at_ms: Timestamp,
}

/// A message a send step created. Queued messages are delivered by the delivery worker; a
/// message already known to be undeliverable is stored as skipped with its reason.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: MessageId,
    pub step_id: String,
    /// The send step's program counter in the pinned workflow version (to render it).
    pub pc: i64,
    pub channel: Channel,
    pub recipient: Option<String>,
    /// `Message-ID` header, fixed at creation so every retry carries the same one.
    pub header_message_id: String,
    pub status: MessageStatus,
    pub reason: Option<String>,
    pub due: Option<Timestamp>,
}

/// A run claimed for advancing, with what the engine needs to advance it.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub run_id: RunId,
    pub workflow_id: WorkflowId,
    pub workflow_version: String,
    pub contact_id: ContactId,
    pub event_seq: i64,
    pub state: RunState,
    pub pc: i64,
    pub lease_token: LeaseToken,
    pub event: CourseEvent,
    pub contact: ContactRow,
    /// The event that ended the run's last event wait (`None` when it timed out, or before any).
    pub awaited: Option<CourseEvent>,
}

/// What a message is rendered from: enough to render it again for an operator to read.
#[derive(Debug, Clone)]
pub struct MessageSource {
    pub id: MessageId,
    pub workflow_id: WorkflowId,
    pub workflow_version: String,
    pub pc: i64,
    pub channel: Channel,
    pub event: CourseEvent,
    pub contact: ContactRow,
    /// As [`ClaimedRun::awaited`], for the message's run.
    pub awaited: Option<CourseEvent>,
}

/// A claimed run's new state, written only if `lease_token` still holds.
#[derive(Debug, Clone)]
pub struct RunAdvance {
    pub lease_token: LeaseToken,
    pub write: RunWrite,
}

/// A message claimed for delivery, with what is needed to render and send it.
#[derive(Debug, Clone)]
pub struct ClaimedMessage {
    pub id: MessageId,
    pub run_id: RunId,
    pub step_id: String,
    pub pc: i64,
    pub workflow_id: WorkflowId,
    pub workflow_version: String,
    pub channel: Channel,
    pub recipient: Option<String>,
    pub header_message_id: String,
    /// Attempts before this one.
    pub attempts: i64,
    pub lease_token: LeaseToken,
    pub event: CourseEvent,
    pub contact: ContactRow,
    /// The contact opted out of this message's channel (checked at claim time, so messages
    /// queued before the opt-out are suppressed too).
    pub opted_out: bool,
    /// No message has been sent to the contact on this channel before (the first SMS carries
    /// the opt-out line).
    pub first_on_channel: bool,
    /// The state of the message's run at claim time: a run that stops sends cancels it.
    pub run_state: RunState,
    /// The event that ended its run's last event wait, as for [`ClaimedRun::awaited`].
    pub awaited: Option<CourseEvent>,
}

/// What happened to one delivery attempt.
#[derive(Debug, Clone)]
pub enum DeliveryResult {
    Sent {
        provider_id: Option<String>,
    },
    /// A transient failure: try again at `due`.
    Retry {
        due: Timestamp,
        reason: String,
    },
    Failed {
        reason: String,
    },
    Skipped {
        reason: String,
    },
    Suppressed {
        reason: String,
    },
    /// Its run ended before it was sent.
    Cancelled {
        reason: String,
    },
    /// The receiving server said the mailbox does not exist: the message is `suppressed` and
    /// the contact opted out of email (source `bounced`) in the same write.
    Bounced {
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub struct MessageOutcome {
    pub message_id: MessageId,
    pub lease_token: LeaseToken,
    /// The rendered subject (emails), recorded for the admin API.
    pub subject: Option<String>,
    /// GSM-7/UCS-2 segments of an SMS.
    pub segments: Option<i64>,
    pub result: DeliveryResult,
    /// The copy for the dev mailbox, when that is the channel.
    pub mailbox: Option<MailboxItem>,
}

/// A message in the dev mailbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, FromSqliteRow)]
pub struct MailboxItem {
    pub id: String,
    pub message_id: Option<String>,
    #[sqlx(try_from = "String")]
    pub channel: Channel,
    pub sender: Option<String>,
    pub recipient: String,
    pub subject: Option<String>,
    pub text_body: Option<String>,
    pub html_body: Option<String>,
    pub created_ms: Timestamp,
}

/// A message as the admin API and tests read it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, FromSqliteRow)]
pub struct MessageRow {
    pub id: MessageId,
    pub run_id: RunId,
    pub step_id: String,
    pub workflow_id: WorkflowId,
    pub contact_id: ContactId,
    #[sqlx(try_from = "String")]
    pub channel: Channel,
    pub recipient: Option<String>,
    pub subject: Option<String>,
    pub header_message_id: String,
    #[sqlx(try_from = "String")]
    pub status: MessageStatus,
    pub reason: Option<String>,
    pub attempts: i64,
    pub due_ms: Option<Timestamp>,
    pub provider_id: Option<String>,
    pub segments: Option<i64>,
    pub created_ms: Timestamp,
    pub updated_ms: Timestamp,
    pub sent_ms: Option<Timestamp>,
}

/// A run as the admin API and tests read it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, FromSqliteRow)]
pub struct RunRow {
    pub id: RunId,
    pub workflow_id: WorkflowId,
    pub workflow_version: String,
    pub contact_id: ContactId,
    #[sqlx(try_from = "String")]
    pub state: RunState,
    pub reason: Option<String>,
    pub pc: i64,
    pub due_ms: Option<Timestamp>,
    pub created_ms: Timestamp,
    pub updated_ms: Timestamp,
    pub ended_ms: Option<Timestamp>,
    /// Read by a second query, for all the listed runs at once.
    #[sqlx(skip)]
    pub steps: Vec<StepRecord>,
}

/// Filters of list queries; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub contact_id: Option<ContactId>,
    pub workflow_id: Option<WorkflowId>,
    pub status: Option<String>,
    /// Return rows with an id greater than this (cursor pagination on time-ordered ids).
    pub after: Option<String>,
    pub limit: i64,
}

/// One grant of a contact.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, FromSqliteRow)]
pub struct GrantRow {
    pub kind: String,
    pub item_id: String,
    pub active: bool,
    pub changed_ms: Timestamp,
}

/// Which portal a link or session opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// One contact's link: their granted products only.
    Learner,
    /// The site's staff link: every product.
    User,
}

impl LinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Learner => "learner",
            Self::User => "user",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "learner" => Some(Self::Learner),
            "user" => Some(Self::User),
            _ => None,
        }
    }
}

/// A link to store: the hash of its token, never the token.
#[derive(Debug, Clone)]
pub struct NewLink {
    pub token_hash: String,
    pub kind: LinkKind,
    pub contact_id: Option<ContactId>,
    /// The message it was minted for, if any (one link per message).
    pub message_id: Option<MessageId>,
    pub max_uses: Option<i64>,
    pub expires: Option<Timestamp>,
}

/// Of links to mint for messages, whether each one's contact is entitled (holds an active offer
/// grant), and those that are: only they are stored.
pub(crate) fn split_entitled<'a>(
    links: &'a [NewLink],
    entitled: &std::collections::HashSet<ContactId>,
) -> (Vec<bool>, Vec<&'a NewLink>) {
    let minted: Vec<bool> = links
        .iter()
        .map(|l| l.contact_id.as_ref().is_some_and(|c| entitled.contains(c)))
        .collect();
    let kept = links
        .iter()
        .zip(&minted)
        .filter_map(|(l, ok)| ok.then_some(l))
        .collect();
    (minted, kept)
}

/// Why a link does not open the portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkRefusal {
    Unknown,
    Expired,
    UsedUp,
    Revoked,
    NotEntitled,
}

impl LinkRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Expired => "expired",
            Self::UsedUp => "used_up",
            Self::Revoked => "revoked",
            Self::NotEntitled => "not_entitled",
        }
    }
}

/// A link that would open the portal now (read-only check), or was just redeemed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkHolder {
    pub kind: LinkKind,
    pub contact_id: Option<ContactId>,
}

/// A session to start on redemption: the hash of its cookie value.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub id_hash: String,
    pub expires: Timestamp,
}

/// A product as the portal lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, FromSqliteRow)]
pub struct ProductRow {
    pub id: String,
    pub title: Option<String>,
    pub url: Option<String>,
}

/// One line of the link audit trail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, FromSqliteRow)]
pub struct LinkAuditRow {
    pub at_ms: Timestamp,
    pub kind: String,
    pub contact_id: Option<ContactId>,
    pub action: String,
    pub reason: Option<String>,
}

/// The `course.user_login` event herald emits itself when a learner redeems a link, so that
/// workflows can react to logins.
pub fn login_event(source: &str, contact_id: &str, at: Timestamp) -> NewEvent {
    let mut data = serde_json::Map::new();
    data.insert("contact".into(), serde_json::json!({ "id": contact_id }));
    NewEvent {
        event: CourseEvent {
            id: format!("login_{}", uuid::Uuid::now_v7()),
            source: source.to_owned(),
            event_type: herald_core::EventType::UserLogin,
            time: at.to_datetime(),
            time_raw: at.to_string(),
            data,
        },
        received: at,
    }
}

/// An opt-out with the contact's current addresses (the suppression list).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, FromSqliteRow)]
pub struct SuppressionRow {
    pub contact_id: ContactId,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub channel: String,
    pub source: String,
    pub at_ms: Timestamp,
}

/// A contact's opt-out of one channel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, FromSqliteRow)]
pub struct OptOutRow {
    #[sqlx(try_from = "String")]
    pub channel: Channel,
    pub source: String,
    pub at_ms: Timestamp,
}

/// Work waiting in the queues, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow, FromSqliteRow)]
pub struct QueueStats {
    /// Stored events the dispatcher has not handled yet.
    pub undispatched_events: i64,
    /// Runs whose next step is due.
    pub due_runs: i64,
    /// Queued messages whose send is due.
    pub due_messages: i64,
    /// When the oldest undispatched event was received, if any.
    pub oldest_event_ms: Option<Timestamp>,
    /// Due time of the oldest due run, if any.
    pub oldest_run_due_ms: Option<Timestamp>,
    /// Due time of the oldest due message, if any.
    pub oldest_message_due_ms: Option<Timestamp>,
}

impl QueueStats {
    /// Due time of the oldest due run or message, if any.
    pub fn oldest_job_due(&self) -> Option<Timestamp> {
        match (self.oldest_run_due_ms, self.oldest_message_due_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// An event set aside because its dispatch kept failing. Decoded by column name, in one place
/// for both backends.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, FromSqliteRow)]
pub struct DeadEventRow {
    pub seq: i64,
    pub source: String,
    pub id: String,
    /// The CloudEvents type as posted (`course.new_signup`).
    #[serde(rename = "type")]
    pub event_type: String,
    pub contact_id: ContactId,
    pub error: String,
    pub received_ms: Timestamp,
    pub dead_ms: Timestamp,
}

/// A contact's stored event, for their timeline.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, FromSqliteRow)]
pub struct ContactEventRow {
    pub source: String,
    pub id: String,
    /// The CloudEvents type as posted (`course.new_signup`).
    #[serde(rename = "type")]
    pub event_type: String,
    pub time_ms: Timestamp,
    pub received_ms: Timestamp,
    pub dispatched: bool,
    /// Set aside: the last error of its dispatch.
    pub dead_error: Option<String>,
}

/// Whether an event's `contact` object carries any detail besides its id.
pub fn carries_contact_details(contact: &serde_json::Map<String, serde_json::Value>) -> bool {
    [
        "email",
        "phone",
        "first_name",
        "last_name",
        "timezone",
        "custom_fields",
        "locale",
    ]
    .iter()
    .any(|k| contact.get(*k).is_some_and(|v| !v.is_null()))
}
