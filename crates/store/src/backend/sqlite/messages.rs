//! The statements of `backend/messages.rs` on SQLite.

/// Leases due messages, each after its run's earlier steps' messages: (lease until, token, now,
/// limit). Returns the ids; [`CLAIMED_MESSAGES`] reads them.
pub(crate) const CLAIM_MESSAGES: &str = "UPDATE messages SET locked_until_ms = $1, lease_token = $2
 WHERE id IN (SELECT m.id FROM messages m WHERE m.status = 'queued' AND m.due_ms <= $3
              AND (m.locked_until_ms IS NULL OR m.locked_until_ms <= $3)
              AND NOT EXISTS (SELECT 1 FROM messages p
                              WHERE p.run_id = m.run_id AND p.status = 'queued' AND p.pc < m.pc)
              ORDER BY m.due_ms LIMIT $4)
 RETURNING id";

pub(crate) const CLAIMED_MESSAGES: &str = "SELECT m.id, m.run_id, m.step_id, m.pc, m.workflow_id, r.workflow_version, m.channel, m.recipient,
        m.header_message_id, m.attempts, e.body AS event,
        m.contact_id, c.email, c.phone, c.first_name, c.last_name, c.timezone, c.custom_fields, c.locale,
        EXISTS (SELECT 1 FROM opt_outs o WHERE o.contact_id = m.contact_id AND o.channel = m.channel) AS opted_out,
        NOT EXISTS (SELECT 1 FROM messages p WHERE p.contact_id = m.contact_id AND p.channel = m.channel
                    AND p.status = 'sent') AS first_on_channel,
        r.state AS run_state, aw.body AS awaited
 FROM messages m JOIN runs r ON r.id = m.run_id JOIN events e ON e.seq = r.event_seq
 LEFT JOIN contacts c ON c.id = m.contact_id LEFT JOIN events aw ON aw.seq = r.awaited_seq
 WHERE m.id IN (SELECT value FROM json_each($1))
 ORDER BY m.due_ms, m.id";

pub(crate) const MESSAGE_LEASES: &str =
    "SELECT id, lease_token FROM messages WHERE id IN (SELECT value FROM json_each($1))";

/// Per row (id, status, reason, due, provider id, sent at, subject, segments, attempted 0 or
/// 1); then now.
pub(crate) const COMPLETE_MESSAGES: &str =
    "UPDATE messages SET status = $2, reason = $3, due_ms = $4,
        provider_id = COALESCE($5, provider_id), sent_ms = COALESCE($6, sent_ms),
        subject = COALESCE($7, subject), segments = COALESCE($8, segments),
        attempts = attempts + $9,
        updated_ms = $10, locked_until_ms = NULL, lease_token = NULL
 WHERE id = $1";

/// Per row (id, Message-ID, channel, sender, recipient, subject, text, HTML, created).
pub(crate) const INSERT_MAILBOX: &str = "INSERT INTO mailbox (id, message_id, channel, sender, recipient, subject, text_body, html_body, created_ms)
 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
 ON CONFLICT (id) DO NOTHING";

/// (now, message ids).
pub(crate) const OPT_OUT_BOUNCED: &str = "INSERT INTO opt_outs (contact_id, channel, source, at_ms)
 SELECT DISTINCT contact_id, 'email', 'bounced', $1 FROM messages WHERE id IN (SELECT value FROM json_each($2))
 ON CONFLICT DO NOTHING";
