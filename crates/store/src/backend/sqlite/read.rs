//! The SQL of the reads (`backend/read.rs`) on SQLite, run on the reader pool. Column names are
//! the fields of the types the rows decode into.

pub(crate) const NEXT_DUE_MS: &str = "SELECT MIN(d) FROM (
   SELECT MIN(due_ms) AS d FROM runs WHERE state IN ('active', 'waiting_event')
   UNION ALL SELECT MIN(due_ms) AS d FROM messages WHERE status = 'queued')";

pub(crate) const LIVE_WORKFLOW_VERSIONS: &str = "SELECT v.workflow_id, v.version, v.bundle FROM workflow_versions v
 WHERE EXISTS (SELECT 1 FROM runs r WHERE r.workflow_id = v.workflow_id AND r.workflow_version = v.version
               AND r.state IN ('active', 'waiting_event', 'parked'))
    OR EXISTS (SELECT 1 FROM messages m JOIN runs r ON r.id = m.run_id
               WHERE m.status = 'queued' AND r.workflow_id = v.workflow_id AND r.workflow_version = v.version)";

pub(crate) const CONTACT_EVENTS: &str = "SELECT source, id, CASE WHEN type = 'enrollment' THEN 'herald.enrollment' ELSE 'course.' || type END AS event_type,
        time_ms, received_ms, dispatched, dead_error
 FROM events WHERE contact_id = ?1 ORDER BY seq DESC LIMIT ?2";

pub(crate) const WORKFLOW_VERSION: &str =
    "SELECT bundle FROM workflow_versions WHERE workflow_id = ?1 AND version = ?2";

pub(crate) const WORKFLOW_STATES: &str = "SELECT workflow_id, enabled FROM workflow_states";

pub(crate) const MAILBOX: &str =
    "SELECT id, message_id, channel, sender, recipient, subject, text_body, html_body, created_ms
 FROM mailbox ORDER BY created_ms DESC, id DESC LIMIT ?1";

pub(crate) const MESSAGES: &str = "SELECT id, run_id, step_id, workflow_id, contact_id, channel, recipient, subject, header_message_id,
        status, reason, attempts, due_ms, provider_id, created_ms, updated_ms, sent_ms, segments
 FROM messages
 WHERE (?1 IS NULL OR contact_id = ?1) AND (?2 IS NULL OR workflow_id = ?2)
   AND (?3 IS NULL OR status = ?3) AND (?4 IS NULL OR id > ?4)
 ORDER BY id LIMIT ?5";

pub(crate) const RUNS: &str = "SELECT id, workflow_id, workflow_version, contact_id, state, reason, pc, due_ms, created_ms, updated_ms, ended_ms
 FROM runs
 WHERE (?1 IS NULL OR contact_id = ?1) AND (?2 IS NULL OR workflow_id = ?2)
   AND (?3 IS NULL OR state = ?3) AND (?4 IS NULL OR id > ?4)
 ORDER BY id LIMIT ?5";

pub(crate) const RUN_STEPS: &str = "SELECT run_id, step_id, kind, outcome, at_ms FROM run_steps
 WHERE run_id IN (SELECT value FROM json_each(?1)) ORDER BY run_id, seq";

pub(crate) const CONTACT: &str =
    "SELECT id AS contact_id, email, phone, first_name, last_name, timezone, custom_fields, locale
 FROM contacts WHERE id = ?1";

pub(crate) const GRANTS: &str = "SELECT kind, item_id, active, changed_ms FROM grants WHERE contact_id = ?1 ORDER BY kind, item_id";

pub(crate) const UNDISPATCHED_COUNT: &str = "SELECT COUNT(*) FROM events WHERE dispatched = 0";

pub(crate) const QUEUE_STATS: &str = "SELECT
   (SELECT COUNT(*) FROM events WHERE dispatched = 0) AS undispatched_events,
   (SELECT COUNT(*) FROM runs WHERE state IN ('active', 'waiting_event') AND due_ms <= ?1) AS due_runs,
   (SELECT COUNT(*) FROM messages WHERE status = 'queued' AND due_ms <= ?1) AS due_messages,
   (SELECT received_ms FROM events WHERE seq = (SELECT MIN(seq) FROM events WHERE dispatched = 0)) AS oldest_event_ms,
   (SELECT MIN(due_ms) FROM runs WHERE state IN ('active', 'waiting_event') AND due_ms <= ?1) AS oldest_run_due_ms,
   (SELECT MIN(due_ms) FROM messages WHERE status = 'queued' AND due_ms <= ?1) AS oldest_message_due_ms";

pub(crate) const MESSAGE_SOURCES: &str = "SELECT m.id, m.workflow_id, r.workflow_version, m.pc, m.channel, e.body AS event,
        COALESCE(c.id, '') AS contact_id, c.email, c.phone, c.first_name, c.last_name, c.timezone, c.custom_fields, c.locale,
        aw.body AS awaited
 FROM messages m JOIN runs r ON r.id = m.run_id JOIN events e ON e.seq = r.event_seq
 LEFT JOIN contacts c ON c.id = m.contact_id LEFT JOIN events aw ON aw.seq = r.awaited_seq
 WHERE m.id IN (SELECT value FROM json_each(?1))";
