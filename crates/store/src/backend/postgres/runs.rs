//! The statements of `backend/runs.rs` on PostgreSQL: rows arrive as one array per column
//! (see [`crate::backend::sql::Param::Rows`]).

/// Rows (id, workflow id, version, contact id, event seq, state, reason, pc, wait event, due,
/// ended); then now. Returns the ids inserted.
pub(crate) const INSERT_RUNS: &str = "INSERT INTO runs (id, workflow_id, workflow_version, contact_id, event_seq, state, reason, pc, wait_event,
                   due_ms, created_ms, updated_ms, ended_ms)
 SELECT id, workflow_id, workflow_version, contact_id, event_seq, state, reason, pc, wait_event, due_ms,
        $12, $12, ended_ms
 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::text[], $8::int8[],
             $9::text[], $10::int8[], $11::int8[])
      AS u(id, workflow_id, workflow_version, contact_id, event_seq, state, reason, pc, wait_event, due_ms, ended_ms)
 ON CONFLICT DO NOTHING
 RETURNING id";

/// Rows (run id, step id, kind, outcome, at), numbered after the run's last step.
pub(crate) const INSERT_RUN_STEPS: &str = "INSERT INTO run_steps (run_id, seq, step_id, kind, outcome, at_ms)
 SELECT u.run_id,
        COALESCE((SELECT MAX(s.seq) FROM run_steps s WHERE s.run_id = u.run_id), 0)
          + ROW_NUMBER() OVER (PARTITION BY u.run_id ORDER BY u.n),
        u.step_id, u.kind, u.outcome, u.at_ms
 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[]) WITH ORDINALITY
      AS u(run_id, step_id, kind, outcome, at_ms, n)";

/// Rows (id, run id, step id, pc, workflow id, contact id, channel, recipient, Message-ID header,
/// status, reason, due); then now.
pub(crate) const INSERT_MESSAGES: &str = "INSERT INTO messages (id, run_id, step_id, pc, workflow_id, contact_id, channel, recipient,
                       header_message_id, status, reason, due_ms, created_ms, updated_ms)
 SELECT id, run_id, step_id, pc, workflow_id, contact_id, channel, recipient, header_message_id, status,
        reason, due_ms, $13, $13
 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[],
             $9::text[], $10::text[], $11::text[], $12::int8[])
      AS u(id, run_id, step_id, pc, workflow_id, contact_id, channel, recipient, header_message_id, status,
           reason, due_ms)
 ON CONFLICT (run_id, step_id) DO NOTHING";
