//! Reads of the SQLite backend, on the reader pool.

use super::SqliteStore;
use super::write::contact_at;
use crate::decode::{channel, message_status, run_state};
use crate::{
    ContactEventRow, ContactRow, GrantRow, ListFilter, MailboxItem, MessageRow, Result, RunRow,
    StepRecord,
};
use sqlx::Row;

impl SqliteStore {
    pub async fn next_due_ms(&self) -> Result<Option<i64>> {
        let due: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(d) FROM (
               SELECT MIN(due_ms) AS d FROM runs WHERE state IN ('active', 'waiting_event')
               UNION ALL SELECT MIN(due_ms) AS d FROM messages WHERE status = 'queued')",
        )
        .fetch_one(&self.readers)
        .await?;
        Ok(due)
    }

    pub async fn live_workflow_versions(&self) -> Result<Vec<(String, String, String)>> {
        let rows = sqlx::query(
            "SELECT v.workflow_id, v.version, v.bundle FROM workflow_versions v
             WHERE EXISTS (SELECT 1 FROM runs r WHERE r.workflow_id = v.workflow_id AND r.workflow_version = v.version
                           AND r.state IN ('active', 'waiting_event', 'parked'))
                OR EXISTS (SELECT 1 FROM messages m JOIN runs r ON r.id = m.run_id
                           WHERE m.status = 'queued' AND r.workflow_id = v.workflow_id AND r.workflow_version = v.version)",
        )
        .fetch_all(&self.readers)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    pub async fn contact_events(
        &self,
        contact_id: String,
        limit: i64,
    ) -> Result<Vec<ContactEventRow>> {
        // The newest `limit`, oldest first.
        let mut rows: Vec<ContactEventRow> = sqlx::query_as(
            "SELECT source, id, CASE WHEN type = 'enrollment' THEN 'herald.enrollment' ELSE 'course.' || type END AS event_type, time_ms, received_ms, dispatched, dead_error
             FROM events WHERE contact_id = ? ORDER BY seq DESC LIMIT ?",
        )
        .bind(contact_id)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.reverse();
        Ok(rows)
    }

    pub async fn workflow_version(&self, id: String, version: String) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT bundle FROM workflow_versions WHERE workflow_id = ? AND version = ?",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(&self.readers)
        .await?)
    }

    pub async fn workflow_states(&self) -> Result<Vec<(String, bool)>> {
        Ok(
            sqlx::query_as("SELECT workflow_id, enabled FROM workflow_states")
                .fetch_all(&self.readers)
                .await?,
        )
    }

    pub async fn mailbox(&self, limit: i64) -> Result<Vec<MailboxItem>> {
        let rows = sqlx::query(
            "SELECT id, message_id, channel, sender, recipient, subject, text_body, html_body, created_ms
             FROM mailbox ORDER BY created_ms DESC, id DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(MailboxItem {
                    id: r.get(0),
                    message_id: r.get(1),
                    channel: channel(r.get(2))?,
                    sender: r.get(3),
                    recipient: r.get(4),
                    subject: r.get(5),
                    text_body: r.get(6),
                    html_body: r.get(7),
                    created_ms: r.get(8),
                })
            })
            .collect()
    }

    pub async fn messages(&self, f: ListFilter) -> Result<Vec<MessageRow>> {
        let rows = sqlx::query(
            "SELECT id, run_id, step_id, workflow_id, contact_id, channel, recipient, subject, header_message_id,
                    status, reason, attempts, due_ms, provider_id, created_ms, updated_ms, sent_ms, segments
             FROM messages
             WHERE (?1 IS NULL OR contact_id = ?1) AND (?2 IS NULL OR workflow_id = ?2)
               AND (?3 IS NULL OR status = ?3) AND (?4 IS NULL OR id > ?4)
             ORDER BY id LIMIT ?5",
        )
        .bind(&f.contact_id)
        .bind(&f.workflow_id)
        .bind(&f.status)
        .bind(&f.after)
        .bind(f.limit)
        .fetch_all(&self.readers)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(MessageRow {
                    id: r.get(0),
                    run_id: r.get(1),
                    step_id: r.get(2),
                    workflow_id: r.get(3),
                    contact_id: r.get(4),
                    channel: channel(r.get(5))?,
                    recipient: r.get(6),
                    subject: r.get(7),
                    header_message_id: r.get(8),
                    status: message_status(r.get(9))?,
                    reason: r.get(10),
                    attempts: r.get(11),
                    due_ms: r.get(12),
                    provider_id: r.get(13),
                    segments: r.get(17),
                    created_ms: r.get(14),
                    updated_ms: r.get(15),
                    sent_ms: r.get(16),
                })
            })
            .collect()
    }

    pub async fn runs(&self, f: ListFilter) -> Result<Vec<RunRow>> {
        let rows = sqlx::query(
            "SELECT id, workflow_id, workflow_version, contact_id, state, reason, pc, due_ms, created_ms, updated_ms, ended_ms
             FROM runs
             WHERE (?1 IS NULL OR contact_id = ?1) AND (?2 IS NULL OR workflow_id = ?2)
               AND (?3 IS NULL OR state = ?3) AND (?4 IS NULL OR id > ?4)
             ORDER BY id LIMIT ?5",
        )
        .bind(&f.contact_id)
        .bind(&f.workflow_id)
        .bind(&f.status)
        .bind(&f.after)
        .bind(f.limit)
        .fetch_all(&self.readers)
        .await?;
        let mut runs = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.get(0);
            let steps = sqlx::query(
                "SELECT step_id, kind, outcome, at_ms FROM run_steps WHERE run_id = ? ORDER BY seq",
            )
            .bind(&id)
            .fetch_all(&self.readers)
            .await?
            .into_iter()
            .map(|s| StepRecord {
                step_id: s.get(0),
                kind: s.get(1),
                outcome: s.get(2),
                at_ms: s.get(3),
            })
            .collect();
            runs.push(RunRow {
                id,
                workflow_id: r.get(1),
                workflow_version: r.get(2),
                contact_id: r.get(3),
                state: run_state(r.get(4))?,
                reason: r.get(5),
                pc: r.get(6),
                due_ms: r.get(7),
                created_ms: r.get(8),
                updated_ms: r.get(9),
                ended_ms: r.get(10),
                steps,
            });
        }
        Ok(runs)
    }

    pub async fn contact(&self, id: String) -> Result<Option<ContactRow>> {
        let row = sqlx::query(
            "SELECT id, email, phone, first_name, last_name, timezone, custom_fields FROM contacts WHERE id = ?",
        )
        .bind(&id)
        .fetch_optional(&self.readers)
        .await?;
        Ok(row.map(|r| contact_at(&r, 0)))
    }

    pub async fn grants(&self, contact_id: String) -> Result<Vec<GrantRow>> {
        let rows = sqlx::query(
            "SELECT kind, item_id, active, changed_ms FROM grants WHERE contact_id = ? ORDER BY kind, item_id",
        )
        .bind(&contact_id)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| GrantRow {
                kind: r.get(0),
                item_id: r.get(1),
                active: r.get(2),
                changed_ms: r.get(3),
            })
            .collect())
    }

    pub async fn undispatched_count(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE dispatched = 0")
                .fetch_one(&self.readers)
                .await?,
        )
    }
}

impl SqliteStore {
    pub async fn queue_stats(&self, now_ms: i64) -> Result<crate::QueueStats> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM events WHERE dispatched = 0),
                    (SELECT COUNT(*) FROM runs WHERE state IN ('active', 'waiting_event') AND due_ms <= ?1),
                    (SELECT COUNT(*) FROM messages WHERE status = 'queued' AND due_ms <= ?1),
                    (SELECT received_ms FROM events WHERE seq = (SELECT MIN(seq) FROM events WHERE dispatched = 0)),
                    (SELECT MIN(due_ms) FROM runs WHERE state IN ('active', 'waiting_event') AND due_ms <= ?1),
                    (SELECT MIN(due_ms) FROM messages WHERE status = 'queued' AND due_ms <= ?1)",
        )
        .bind(now_ms)
        .fetch_one(&self.readers)
        .await?;
        Ok(crate::QueueStats {
            undispatched_events: row.get(0),
            due_runs: row.get(1),
            due_messages: row.get(2),
            oldest_event_ms: row.get(3),
            oldest_run_due_ms: row.get(4),
            oldest_message_due_ms: row.get(5),
        })
    }

    pub async fn message_sources(&self, ids: Vec<String>) -> Result<Vec<crate::MessageSource>> {
        let rows = sqlx::query(
            "SELECT m.id, m.workflow_id, r.workflow_version, m.pc, m.channel, e.body,
                    c.id, c.email, c.phone, c.first_name, c.last_name, c.timezone, c.custom_fields, aw.body
             FROM messages m JOIN runs r ON r.id = m.run_id JOIN events e ON e.seq = r.event_seq
             LEFT JOIN contacts c ON c.id = m.contact_id LEFT JOIN events aw ON aw.seq = r.awaited_seq
             WHERE m.id IN (SELECT value FROM json_each(?))",
        )
        .bind(super::json_list(ids.iter().map(String::as_str)))
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(crate::MessageSource {
                    id: r.get(0),
                    workflow_id: r.get(1),
                    workflow_version: r.get(2),
                    pc: r.get(3),
                    channel: channel(r.get(4))?,
                    event: crate::decode::parse_stored_event(r.get(5))?,
                    contact: contact_at(r, 6),
                    awaited: r
                        .get::<Option<&str>, _>(13)
                        .map(crate::decode::parse_stored_event)
                        .transpose()?,
                })
            })
            .collect()
    }
}
