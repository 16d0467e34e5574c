//! The statements of `backend/runs.rs` on SQLite: rows arrive as one JSON array
//! (see [`crate::backend::sql::Param::Rows`]).

/// Rows (id, workflow id, version, contact id, event seq, state, reason, pc, wait event, due,
/// ended); then now. Returns the ids inserted.
pub(crate) const INSERT_RUNS: &str = "INSERT INTO runs (id, workflow_id, workflow_version, contact_id, event_seq, state, reason, pc,
                   wait_event, due_ms, created_ms, updated_ms, ended_ms)
 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
        value ->> 7, value ->> 8, value ->> 9, $2, $2, value ->> 10
 FROM json_each($1) WHERE true ORDER BY key
 ON CONFLICT DO NOTHING
 RETURNING id";

/// Rows (run id, step id, kind, outcome, at). SQLite computes the whole `SELECT` before inserting
/// (it reads the table it fills), so the numbering sees only earlier batches' steps.
pub(crate) const INSERT_RUN_STEPS: &str = "INSERT INTO run_steps (run_id, seq, step_id, kind, outcome, at_ms)
 SELECT value ->> 0,
        COALESCE((SELECT MAX(s.seq) FROM run_steps s WHERE s.run_id = value ->> 0), 0)
          + ROW_NUMBER() OVER (PARTITION BY value ->> 0 ORDER BY key),
        value ->> 1, value ->> 2, value ->> 3, value ->> 4
 FROM json_each($1)";

/// Rows (id, run id, step id, pc, workflow id, contact id, channel, recipient, Message-ID header,
/// status, reason, due); then now.
pub(crate) const INSERT_MESSAGES: &str = "INSERT INTO messages (id, run_id, step_id, pc, workflow_id, contact_id, channel, recipient,
                       header_message_id, status, reason, due_ms, created_ms, updated_ms)
 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
        value ->> 7, value ->> 8, value ->> 9, value ->> 10, value ->> 11, $2, $2
 FROM json_each($1) WHERE true ORDER BY key
 ON CONFLICT (run_id, step_id) DO NOTHING";
