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
pub(crate) const INSERT_RUN_STEPS: &str =
    "INSERT INTO run_steps (run_id, seq, step_id, kind, outcome, at_ms)
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

/// Locks the due runs no one else holds, leases them and reads what stepping them needs, in one
/// round trip: (lease until, token, now, limit).
pub(crate) const CLAIM_RUNS: &str = "WITH picked AS MATERIALIZED (
     SELECT id FROM runs
     WHERE state IN ('active', 'waiting_event') AND due_ms <= $3
       AND (locked_until_ms IS NULL OR locked_until_ms <= $3)
     ORDER BY due_ms LIMIT $4 FOR UPDATE SKIP LOCKED),
 claimed AS (
     UPDATE runs SET locked_until_ms = $1, lease_token = $2 FROM picked WHERE runs.id = picked.id
     RETURNING runs.id, runs.workflow_id, runs.workflow_version, runs.contact_id, runs.event_seq,
               runs.state, runs.pc, runs.due_ms, runs.awaited_seq)
 SELECT r.id, r.workflow_id, r.workflow_version, r.event_seq, r.state, r.pc, e.body AS event,
        r.contact_id, c.email, c.phone, c.first_name, c.last_name, c.timezone, c.custom_fields, c.locale,
        aw.body AS awaited
 FROM claimed r JOIN events e ON e.seq = r.event_seq LEFT JOIN contacts c ON c.id = r.contact_id
 LEFT JOIN events aw ON aw.seq = r.awaited_seq
 ORDER BY r.due_ms, r.id";

/// Locked until the transaction ends, so no other process claims them meanwhile; in id order,
/// so two processes lock overlapping sets without deadlocking.
pub(crate) const RUN_LEASES: &str =
    "SELECT id, lease_token FROM runs WHERE id = ANY($1) ORDER BY id FOR UPDATE";

/// Rows (id, state, reason, pc, wait event, due, ended); then now. A run advanced from
/// `waiting_event` timed out: its last event wait received nothing.
pub(crate) const FINISH_RUNS: &str = "UPDATE runs SET state = u.state, reason = u.reason, pc = u.pc, wait_event = u.wait_event,
        due_ms = u.due_ms, updated_ms = $8, ended_ms = u.ended_ms, locked_until_ms = NULL, lease_token = NULL,
        awaited_seq = CASE WHEN runs.state = 'waiting_event' THEN NULL ELSE runs.awaited_seq END
 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int8[], $7::int8[])
      AS u(id, state, reason, pc, wait_event, due_ms, ended_ms)
 WHERE runs.id = u.id";
