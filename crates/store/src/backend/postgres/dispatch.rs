//! The statements of `backend/dispatch.rs` on PostgreSQL.

/// `FOR UPDATE SKIP LOCKED`: no event is dispatched twice even without the dispatch lock.
pub(crate) const UNDISPATCHED: &str = "SELECT seq, body FROM events WHERE NOT dispatched ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED";

pub(crate) const CONTACTS: &str =
    "SELECT id AS contact_id, email, phone, first_name, last_name, timezone, custom_fields, locale
 FROM contacts WHERE id = ANY($1)";

pub(crate) const LIVE_RUNS: &str =
    "SELECT id, workflow_id, workflow_version, contact_id, state, wait_event FROM runs
 WHERE contact_id = ANY($1) AND state IN ('active', 'waiting_event', 'parked')";

pub(crate) const ENROLLMENT_COUNTS: &str = "SELECT contact_id, workflow_id,
        COUNT(*) FILTER (WHERE state <> 'refused') AS total,
        COUNT(*) FILTER (WHERE state <> 'refused' AND created_ms >= $1) AS recent,
        BOOL_OR(state IN ('active', 'waiting_event', 'parked')) AS live
 FROM runs WHERE contact_id = ANY($2) GROUP BY contact_id, workflow_id";

pub(crate) const SUPPRESSED: &str =
    "SELECT address_hash, source FROM suppressed_addresses WHERE address_hash = ANY($1)";

pub(crate) const END_LEARNER_LINKS: &str = "UPDATE magic_links SET revoked_ms = $1 WHERE kind = 'learner' AND revoked_ms IS NULL
   AND contact_id = ANY($2)
   AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = magic_links.contact_id AND g.kind = 'offer' AND g.active)";

pub(crate) const END_LEARNER_SESSIONS: &str = "UPDATE sessions SET ended_ms = $1 WHERE kind = 'learner' AND ended_ms IS NULL
   AND contact_id = ANY($2)
   AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = sessions.contact_id AND g.kind = 'offer' AND g.active)";

/// Rows (run id, reason); then now.
pub(crate) const EXIT_RUNS: &str = "UPDATE runs SET state = 'exited', reason = u.reason, due_ms = NULL, ended_ms = $3, updated_ms = $3,
        locked_until_ms = NULL, lease_token = NULL
 FROM UNNEST($1::text[], $2::text[]) AS u(id, reason)
 WHERE runs.id = u.id AND runs.state IN ('active', 'waiting_event', 'parked')";

/// Rows (run id, reason); then now.
pub(crate) const CANCEL_EXITED_MESSAGES: &str =
    "UPDATE messages SET status = 'cancelled', reason = 'run exited: ' || u.reason, due_ms = NULL,
        updated_ms = $3, locked_until_ms = NULL, lease_token = NULL
 FROM UNNEST($1::text[], $2::text[]) AS u(id, reason)
 WHERE messages.run_id = u.id AND messages.status = 'queued'
   AND (messages.locked_until_ms IS NULL OR messages.locked_until_ms <= $3)";

/// Rows (run id, awaited event seq); then now.
pub(crate) const RESUME_RUNS: &str = "UPDATE runs SET state = 'active', wait_event = NULL, due_ms = $3, updated_ms = $3, awaited_seq = u.seq
 FROM UNNEST($1::text[], $2::int8[]) AS u(id, seq)
 WHERE runs.id = u.id AND runs.state = 'waiting_event'";

pub(crate) const MARK_DISPATCHED: &str = "UPDATE events SET dispatched = TRUE WHERE seq = ANY($1)";
