//! The statements of `backend/messages.rs` on PostgreSQL.

/// Like `runs::CLAIM_RUNS`: one statement that locks, leases and reads, each message after its
/// run's earlier steps' messages: (lease until, token, now, limit).
pub(crate) const CLAIM_MESSAGES: &str = "WITH picked AS MATERIALIZED (
     SELECT m.id FROM messages m
     WHERE m.status = 'queued' AND m.due_ms <= $3 AND (m.locked_until_ms IS NULL OR m.locked_until_ms <= $3)
       AND NOT EXISTS (SELECT 1 FROM messages p
                       WHERE p.run_id = m.run_id AND p.status = 'queued' AND p.pc < m.pc)
     ORDER BY m.due_ms LIMIT $4 FOR UPDATE SKIP LOCKED),
 claimed AS (
     UPDATE messages SET locked_until_ms = $1, lease_token = $2 FROM picked WHERE messages.id = picked.id
     RETURNING messages.id, messages.run_id, messages.step_id, messages.pc, messages.workflow_id,
               messages.channel, messages.recipient, messages.header_message_id, messages.attempts,
               messages.contact_id, messages.due_ms)
 SELECT m.id, m.run_id, m.step_id, m.pc, m.workflow_id, r.workflow_version, m.channel, m.recipient,
        m.header_message_id, m.attempts, e.body AS event,
        m.contact_id, c.email, c.phone, c.first_name, c.last_name, c.timezone, c.custom_fields, c.locale,
        EXISTS (SELECT 1 FROM opt_outs o WHERE o.contact_id = m.contact_id AND o.channel = m.channel) AS opted_out,
        NOT EXISTS (SELECT 1 FROM messages p WHERE p.contact_id = m.contact_id AND p.channel = m.channel
                    AND p.status = 'sent') AS first_on_channel,
        r.state AS run_state, aw.body AS awaited
 FROM claimed m JOIN runs r ON r.id = m.run_id JOIN events e ON e.seq = r.event_seq
 LEFT JOIN contacts c ON c.id = m.contact_id LEFT JOIN events aw ON aw.seq = r.awaited_seq
 ORDER BY m.due_ms, m.id";

/// Locked until the transaction ends, in id order (see `runs::RUN_LEASES`).
pub(crate) const MESSAGE_LEASES: &str =
    "SELECT id, lease_token FROM messages WHERE id = ANY($1) ORDER BY id FOR UPDATE";

/// Rows (id, status, reason, due, provider id, sent at, subject, segments, attempted 0 or 1);
/// then now.
pub(crate) const COMPLETE_MESSAGES: &str = "UPDATE messages SET status = u.status, reason = u.reason, due_ms = u.due_ms,
        provider_id = COALESCE(u.provider_id, messages.provider_id),
        sent_ms = COALESCE(u.sent_ms, messages.sent_ms), subject = COALESCE(u.subject, messages.subject),
        segments = COALESCE(u.segments, messages.segments), attempts = messages.attempts + u.attempted,
        updated_ms = $10, locked_until_ms = NULL, lease_token = NULL
 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int8[], $7::text[], $8::int8[], $9::int8[])
      AS u(id, status, reason, due_ms, provider_id, sent_ms, subject, segments, attempted)
 WHERE messages.id = u.id";

/// Rows (id, Message-ID, channel, sender, recipient, subject, text, HTML, created).
pub(crate) const INSERT_MAILBOX: &str = "INSERT INTO mailbox (id, message_id, channel, sender, recipient, subject, text_body, html_body, created_ms)
 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                      $8::text[], $9::int8[])
 ON CONFLICT (id) DO NOTHING";

/// (now, message ids).
pub(crate) const OPT_OUT_BOUNCED: &str = "INSERT INTO opt_outs (contact_id, channel, source, at_ms)
 SELECT DISTINCT contact_id, 'email', 'bounced', $1::int8 FROM messages WHERE id = ANY($2)
 ON CONFLICT DO NOTHING";
