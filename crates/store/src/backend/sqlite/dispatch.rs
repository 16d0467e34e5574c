//! The statements of `backend/dispatch.rs` on SQLite.

pub(crate) const UNDISPATCHED: &str =
    "SELECT seq, body FROM events WHERE dispatched = 0 ORDER BY seq LIMIT $1";

pub(crate) const CONTACTS: &str =
    "SELECT id AS contact_id, email, phone, first_name, last_name, timezone, custom_fields, locale
 FROM contacts WHERE id IN (SELECT value FROM json_each($1))";

pub(crate) const LIVE_RUNS: &str = "SELECT id, workflow_id, workflow_version, contact_id, state, wait_event FROM runs
 WHERE contact_id IN (SELECT value FROM json_each($1)) AND state IN ('active', 'waiting_event', 'parked')";

pub(crate) const ENROLLMENT_COUNTS: &str = "SELECT contact_id, workflow_id,
        SUM(CASE WHEN state <> 'refused' THEN 1 ELSE 0 END) AS total,
        SUM(CASE WHEN state <> 'refused' AND created_ms >= $1 THEN 1 ELSE 0 END) AS recent,
        MAX(CASE WHEN state IN ('active', 'waiting_event', 'parked') THEN 1 ELSE 0 END) AS live
 FROM runs WHERE contact_id IN (SELECT value FROM json_each($2)) GROUP BY contact_id, workflow_id";

pub(crate) const SUPPRESSED: &str = "SELECT address_hash, source FROM suppressed_addresses
 WHERE address_hash IN (SELECT value FROM json_each($1))";

pub(crate) const END_LEARNER_LINKS: &str = "UPDATE magic_links SET revoked_ms = $1 WHERE kind = 'learner' AND revoked_ms IS NULL
   AND contact_id IN (SELECT value FROM json_each($2))
   AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = magic_links.contact_id AND g.kind = 'offer' AND g.active)";

pub(crate) const END_LEARNER_SESSIONS: &str = "UPDATE sessions SET ended_ms = $1 WHERE kind = 'learner' AND ended_ms IS NULL
   AND contact_id IN (SELECT value FROM json_each($2))
   AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = sessions.contact_id AND g.kind = 'offer' AND g.active)";

/// Per row (run id, reason); then now.
pub(crate) const EXIT_RUNS: &str =
    "UPDATE runs SET state = 'exited', reason = $2, due_ms = NULL, ended_ms = $3,
        updated_ms = $3, locked_until_ms = NULL, lease_token = NULL
 WHERE id = $1 AND state IN ('active', 'waiting_event', 'parked')";

/// Per row (run id, reason); then now.
pub(crate) const CANCEL_EXITED_MESSAGES: &str =
    "UPDATE messages SET status = 'cancelled', reason = 'run exited: ' || $2, due_ms = NULL,
        updated_ms = $3, locked_until_ms = NULL, lease_token = NULL
 WHERE run_id = $1 AND status = 'queued' AND (locked_until_ms IS NULL OR locked_until_ms <= $3)";

/// Per row (run id, awaited event seq); then now.
pub(crate) const RESUME_RUNS: &str =
    "UPDATE runs SET state = 'active', wait_event = NULL, due_ms = $3, updated_ms = $3,
        awaited_seq = $2
 WHERE id = $1 AND state = 'waiting_event'";

pub(crate) const MARK_DISPATCHED: &str =
    "UPDATE events SET dispatched = 1 WHERE seq IN (SELECT value FROM json_each($1))";
