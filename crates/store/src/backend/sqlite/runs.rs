//! The statements of `backend/runs.rs` on SQLite: a batch runs its statement once per row
//! (see [`crate::backend::sql::Param::Rows`]).

/// Per row (id, workflow id, version, contact id, event seq, state, reason, pc, wait event, due,
/// ended); then now. A run that stored nothing met a conflict (see `Tx::inserted`).
pub(crate) const INSERT_RUNS: &str =
    "INSERT INTO runs (id, workflow_id, workflow_version, contact_id, event_seq, state, reason, pc,
                   wait_event, due_ms, created_ms, updated_ms, ended_ms)
 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $12, $12, $11)
 ON CONFLICT DO NOTHING";

/// Per row (run id, step id, kind, outcome, at): numbered after the run's last step.
pub(crate) const INSERT_RUN_STEPS: &str =
    "INSERT INTO run_steps (run_id, seq, step_id, kind, outcome, at_ms)
 VALUES ($1, COALESCE((SELECT MAX(seq) FROM run_steps WHERE run_id = $1), 0) + 1, $2, $3, $4, $5)";

/// Per row (id, run id, step id, pc, workflow id, contact id, channel, recipient, Message-ID
/// header, status, reason, due); then now.
pub(crate) const INSERT_MESSAGES: &str =
    "INSERT INTO messages (id, run_id, step_id, pc, workflow_id, contact_id, channel, recipient,
                       header_message_id, status, reason, due_ms, created_ms, updated_ms)
 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13)
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

/// Per row (id, state, reason, pc, wait event, due, ended); then now. A run advanced from
/// `waiting_event` timed out: its last event wait received nothing.
pub(crate) const FINISH_RUNS: &str = "UPDATE runs SET state = $2, reason = $3, pc = $4,
        wait_event = $5, due_ms = $6, updated_ms = $8,
        ended_ms = $7, locked_until_ms = NULL, lease_token = NULL,
        awaited_seq = CASE WHEN state = 'waiting_event' THEN NULL ELSE awaited_seq END
 WHERE id = $1";
