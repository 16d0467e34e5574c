//! The statements of `backend/runs.rs` on SQLite: rows arrive as one JSON array
//! (see [`crate::backend::sql::Param::Rows`]).

/// Rows (id, workflow id, version, contact id, event seq, state, reason, pc, wait event, due,
/// ended); then now. Returns the ids inserted.
pub(crate) const INSERT_RUNS: &str =
    "INSERT INTO runs (id, workflow_id, workflow_version, contact_id, event_seq, state, reason, pc,
                   wait_event, due_ms, created_ms, updated_ms, ended_ms)
 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
        value ->> 7, value ->> 8, value ->> 9, $2, $2, value ->> 10
 FROM json_each($1) WHERE true ORDER BY key
 ON CONFLICT DO NOTHING
 RETURNING id";

/// Rows (run id, step id, kind, outcome, at). SQLite computes the whole `SELECT` before inserting
/// (it reads the table it fills), so the numbering sees only earlier batches' steps.
pub(crate) const INSERT_RUN_STEPS: &str =
    "INSERT INTO run_steps (run_id, seq, step_id, kind, outcome, at_ms)
 SELECT value ->> 0,
        COALESCE((SELECT MAX(s.seq) FROM run_steps s WHERE s.run_id = value ->> 0), 0)
          + ROW_NUMBER() OVER (PARTITION BY value ->> 0 ORDER BY key),
        value ->> 1, value ->> 2, value ->> 3, value ->> 4
 FROM json_each($1)";

/// Rows (id, run id, step id, pc, workflow id, contact id, channel, recipient, Message-ID header,
/// status, reason, due); then now.
pub(crate) const INSERT_MESSAGES: &str =
    "INSERT INTO messages (id, run_id, step_id, pc, workflow_id, contact_id, channel, recipient,
                       header_message_id, status, reason, due_ms, created_ms, updated_ms)
 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
        value ->> 7, value ->> 8, value ->> 9, value ->> 10, value ->> 11, $2, $2
 FROM json_each($1) WHERE true ORDER BY key
 ON CONFLICT (run_id, step_id) DO NOTHING";

/// Leases due runs: (lease until, token, now, limit). Returns the ids; SQLite's `RETURNING`
/// cannot join, so [`CLAIMED_RUNS`] reads them.
pub(crate) const CLAIM_RUNS: &str = "UPDATE runs SET locked_until_ms = $1, lease_token = $2
 WHERE id IN (SELECT id FROM runs WHERE state IN ('active', 'waiting_event') AND due_ms <= $3
              AND (locked_until_ms IS NULL OR locked_until_ms <= $3) ORDER BY due_ms LIMIT $4)
 RETURNING id";

pub(crate) const CLAIMED_RUNS: &str = "SELECT r.id, r.workflow_id, r.workflow_version, r.event_seq, r.state, r.pc, e.body AS event,
        r.contact_id, c.email, c.phone, c.first_name, c.last_name, c.timezone, c.custom_fields, c.locale,
        aw.body AS awaited
 FROM runs r JOIN events e ON e.seq = r.event_seq LEFT JOIN contacts c ON c.id = r.contact_id
 LEFT JOIN events aw ON aw.seq = r.awaited_seq
 WHERE r.id IN (SELECT value FROM json_each($1))
 ORDER BY r.due_ms, r.id";

pub(crate) const RUN_LEASES: &str =
    "SELECT id, lease_token FROM runs WHERE id IN (SELECT value FROM json_each($1))";

/// Rows (id, state, reason, pc, wait event, due, ended); then now. A run advanced from
/// `waiting_event` timed out: its last event wait received nothing.
pub(crate) const FINISH_RUNS: &str =
    "UPDATE runs SET state = j.value ->> 1, reason = j.value ->> 2, pc = j.value ->> 3,
        wait_event = j.value ->> 4, due_ms = j.value ->> 5, updated_ms = $2,
        ended_ms = j.value ->> 6, locked_until_ms = NULL, lease_token = NULL,
        awaited_seq = CASE WHEN runs.state = 'waiting_event' THEN NULL ELSE runs.awaited_seq END
 FROM json_each($1) AS j
 WHERE runs.id = j.value ->> 0";
