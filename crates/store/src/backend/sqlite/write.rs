//! Every write of the SQLite backend, each one transaction on the writer connection.

use super::{SqliteStore, json_list, json_rows};
use crate::DeliveryResult;
use crate::backend::sql::Tx;
use crate::decode::{channel, outcome_columns, parse_stored_event, run_state};
use crate::{
    Accepted, ClaimedMessage, ClaimedRun, MailboxItem, MessageOutcome, NewEvent, Result,
    RunAdvance, RunWrite,
};
use serde_json::json;
use sqlx::{Row, SqliteConnection};
use std::collections::HashMap;

impl SqliteStore {
    pub(crate) async fn insert_events(&self, events: Vec<NewEvent>) -> Result<Vec<Accepted>> {
        self.writer
            .run(move |conn| {
                Box::pin(async move {
                    let events: Vec<&NewEvent> = events.iter().collect();
                    insert_event_rows(conn, &events).await
                })
            })
            .await
    }

    pub async fn claim_runs(
        &self,
        now_ms: i64,
        limit: i64,
        lease_ms: i64,
    ) -> Result<Vec<ClaimedRun>> {
        let token = uuid::Uuid::new_v4().to_string();
        self.writer
            .run(move |conn| Box::pin(claim_runs(conn, token, now_ms, limit, lease_ms)))
            .await
    }

    pub async fn finish_runs(&self, now_ms: i64, advances: Vec<RunAdvance>) -> Result<()> {
        if advances.is_empty() {
            return Ok(());
        }
        self.writer
            .run(move |conn| Box::pin(finish_runs(conn, now_ms, advances)))
            .await
    }

    pub async fn claim_messages(
        &self,
        now_ms: i64,
        limit: i64,
        lease_ms: i64,
    ) -> Result<Vec<ClaimedMessage>> {
        let token = uuid::Uuid::new_v4().to_string();
        self.writer
            .run(move |conn| Box::pin(claim_messages(conn, token, now_ms, limit, lease_ms)))
            .await
    }

    pub async fn extend_message_lease(&self, lease_token: String, until_ms: i64) -> Result<u64> {
        self.writer
            .run(move |conn| {
                Box::pin(async move {
                    let n = sqlx::query(
                        "UPDATE messages SET locked_until_ms = ? WHERE lease_token = ? AND status = 'queued'",
                    )
                    .bind(until_ms)
                    .bind(&lease_token)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    Ok(n)
                })
            })
            .await
    }

    pub async fn complete_messages(
        &self,
        now_ms: i64,
        outcomes: Vec<MessageOutcome>,
    ) -> Result<()> {
        if outcomes.is_empty() {
            return Ok(());
        }
        self.writer
            .run(move |conn| Box::pin(complete_messages(conn, now_ms, outcomes)))
            .await
    }

    pub async fn add_to_mailbox(&self, item: MailboxItem) -> Result<()> {
        let mut conn = self.writer.lock().await;
        insert_mailbox(&mut conn, &item).await
    }
}

async fn insert_mailbox(conn: &mut SqliteConnection, m: &MailboxItem) -> Result<()> {
    sqlx::query(
        "INSERT INTO mailbox (id, message_id, channel, sender, recipient, subject, text_body, html_body, created_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&m.id)
    .bind(&m.message_id)
    .bind(m.channel.as_str())
    .bind(&m.sender)
    .bind(&m.recipient)
    .bind(&m.subject)
    .bind(&m.text_body)
    .bind(&m.html_body)
    .bind(m.created_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Leases up to `limit` due runs to `token` and reads what stepping them needs.
async fn claim_runs(
    conn: &mut SqliteConnection,
    token: String,
    now_ms: i64,
    limit: i64,
    lease_ms: i64,
) -> Result<Vec<ClaimedRun>> {
    let rows = sqlx::query(
        "UPDATE runs SET locked_until_ms = ?, lease_token = ?
         WHERE id IN (SELECT id FROM runs WHERE state IN ('active', 'waiting_event') AND due_ms <= ?
                      AND (locked_until_ms IS NULL OR locked_until_ms <= ?) ORDER BY due_ms LIMIT ?)
         RETURNING id",
    )
    .bind(now_ms + lease_ms)
    .bind(&token)
    .bind(now_ms)
    .bind(now_ms)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids = json_list(rows.iter().map(|r| r.get::<&str, _>(0)));
    let claimed = sqlx::query(
        "SELECT r.id, r.workflow_id, r.workflow_version, r.contact_id, r.event_seq, r.state, r.pc, e.body,
                c.id, c.email, c.phone, c.first_name, c.last_name, c.timezone, c.custom_fields, c.locale, aw.body
         FROM runs r JOIN events e ON e.seq = r.event_seq LEFT JOIN contacts c ON c.id = r.contact_id
         LEFT JOIN events aw ON aw.seq = r.awaited_seq
         WHERE r.id IN (SELECT value FROM json_each(?))",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| {
        Ok(ClaimedRun {
            run_id: r.get(0),
            workflow_id: r.get(1),
            workflow_version: r.get(2),
            contact_id: r.get(3),
            event_seq: r.get(4),
            state: run_state(r.get(5))?,
            pc: r.get(6),
            lease_token: token.clone(),
            event: parse_stored_event(r.get(7))?,
            contact: contact_at(&r, 8),
            awaited: r
                .get::<Option<&str>, _>(16)
                .map(parse_stored_event)
                .transpose()?,
        })
    })
    .collect::<Result<Vec<_>>>()?;
    Ok(claimed)
}

/// Writes advanced runs whose lease still holds.
async fn finish_runs(
    conn: &mut SqliteConnection,
    now_ms: i64,
    advances: Vec<RunAdvance>,
) -> Result<()> {
    let written: Vec<&RunWrite> = under_current_lease(
        conn,
        "SELECT id, lease_token FROM runs WHERE id IN (SELECT value FROM json_each(?))",
        &advances,
        |a| (&a.write.run_id, &a.lease_token),
        |a| tracing::warn!(run = %a.write.run_id, "run lease lost before its step finished; result dropped"),
    )
    .await?
    .into_iter()
    .map(|a| &a.write)
    .collect();
    if written.is_empty() {
        return Ok(());
    }
    let rows = json_rows(written.iter().map(|w| {
        json!([
            w.run_id,
            w.state.as_str(),
            w.reason,
            w.pc,
            w.wait_event,
            w.due_ms,
            (!w.state.is_live()).then_some(now_ms),
        ])
    }));
    sqlx::query(
        // A run advanced from `waiting_event` timed out: its last event wait received nothing.
        "UPDATE runs SET state = j.value ->> 1, reason = j.value ->> 2, pc = j.value ->> 3,
                wait_event = j.value ->> 4, due_ms = j.value ->> 5, updated_ms = ?2,
                ended_ms = j.value ->> 6, locked_until_ms = NULL, lease_token = NULL,
                awaited_seq = CASE WHEN runs.state = 'waiting_event' THEN NULL ELSE runs.awaited_seq END
         FROM json_each(?1) AS j
         WHERE runs.id = j.value ->> 0",
    )
    .bind(rows)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    crate::backend::runs::insert_run_effects(Tx::Sqlite(conn), &written, now_ms).await?;
    Ok(())
}

/// Leases up to `limit` due messages to `token` (each after its run's earlier steps' messages)
/// and reads what sending them needs.
async fn claim_messages(
    conn: &mut SqliteConnection,
    token: String,
    now_ms: i64,
    limit: i64,
    lease_ms: i64,
) -> Result<Vec<ClaimedMessage>> {
    let rows = sqlx::query(
        // A run's messages go in step order: one waits while an earlier step's message of its
        // run is still queued (being sent, or waiting for a retry).
        "UPDATE messages SET locked_until_ms = ?, lease_token = ?
         WHERE id IN (SELECT m.id FROM messages m WHERE m.status = 'queued' AND m.due_ms <= ?
                      AND (m.locked_until_ms IS NULL OR m.locked_until_ms <= ?)
                      AND NOT EXISTS (SELECT 1 FROM messages p
                                      WHERE p.run_id = m.run_id AND p.status = 'queued' AND p.pc < m.pc)
                      ORDER BY m.due_ms LIMIT ?)
         RETURNING id",
    )
    .bind(now_ms + lease_ms)
    .bind(&token)
    .bind(now_ms)
    .bind(now_ms)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids = json_list(rows.iter().map(|r| r.get::<&str, _>(0)));
    let claimed = sqlx::query(
        "SELECT m.id, m.run_id, m.step_id, m.pc, m.workflow_id, r.workflow_version, m.channel, m.recipient,
                m.header_message_id, m.attempts, e.body,
                c.id, c.email, c.phone, c.first_name, c.last_name, c.timezone, c.custom_fields, c.locale,
                EXISTS (SELECT 1 FROM opt_outs o WHERE o.contact_id = m.contact_id AND o.channel = m.channel),
                NOT EXISTS (SELECT 1 FROM messages p WHERE p.contact_id = m.contact_id AND p.channel = m.channel AND p.status = 'sent'),
                r.state, aw.body
         FROM messages m JOIN runs r ON r.id = m.run_id JOIN events e ON e.seq = r.event_seq
         LEFT JOIN contacts c ON c.id = m.contact_id LEFT JOIN events aw ON aw.seq = r.awaited_seq
         WHERE m.id IN (SELECT value FROM json_each(?))",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| {
        Ok(ClaimedMessage {
            id: r.get(0),
            run_id: r.get(1),
            step_id: r.get(2),
            pc: r.get(3),
            workflow_id: r.get(4),
            workflow_version: r.get(5),
            channel: channel(r.get(6))?,
            recipient: r.get(7),
            header_message_id: r.get(8),
            attempts: r.get(9),
            lease_token: token.clone(),
            event: parse_stored_event(r.get(10))?,
            contact: contact_at(&r, 11),
            opted_out: r.get(19),
            first_on_channel: r.get(20),
            run_state: run_state(r.get(21))?,
            awaited: r
                .get::<Option<&str>, _>(22)
                .map(parse_stored_event)
                .transpose()?,
        })
    })
    .collect::<Result<Vec<_>>>()?;
    Ok(claimed)
}

/// Records delivery outcomes whose lease still holds.
async fn complete_messages(
    conn: &mut SqliteConnection,
    now_ms: i64,
    outcomes: Vec<MessageOutcome>,
) -> Result<()> {
    let written = under_current_lease(
        conn,
        "SELECT id, lease_token FROM messages WHERE id IN (SELECT value FROM json_each(?))",
        &outcomes,
        |o| (&o.message_id, &o.lease_token),
        |o| tracing::warn!(message = %o.message_id, "message lease lost before delivery finished; outcome dropped"),
    )
    .await?;
    if written.is_empty() {
        return Ok(());
    }
    let rows = json_rows(written.iter().map(|o| {
        let c = outcome_columns(&o.result, now_ms);
        json!([
            o.message_id,
            c.status.as_str(),
            c.reason,
            c.due_ms,
            c.provider_id,
            c.sent_ms,
            o.subject,
            o.segments,
            i64::from(c.attempted),
        ])
    }));
    sqlx::query(
        "UPDATE messages SET status = j.value ->> 1, reason = j.value ->> 2, due_ms = j.value ->> 3,
                provider_id = COALESCE(j.value ->> 4, provider_id), sent_ms = COALESCE(j.value ->> 5, sent_ms),
                subject = COALESCE(j.value ->> 6, subject), segments = COALESCE(j.value ->> 7, segments),
                attempts = attempts + (j.value ->> 8),
                updated_ms = ?2, locked_until_ms = NULL, lease_token = NULL
         FROM json_each(?1) AS j
         WHERE messages.id = j.value ->> 0",
    )
    .bind(rows)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    for m in written.iter().filter_map(|o| o.mailbox.as_ref()) {
        insert_mailbox(conn, m).await?;
    }
    let bounced = bounced_ids(&written);
    if !bounced.is_empty() {
        sqlx::query(
            "INSERT INTO opt_outs (contact_id, channel, source, at_ms)
             SELECT contact_id, 'email', 'bounced', ?1 FROM messages
             WHERE id IN (SELECT value FROM json_each(?2))
             ON CONFLICT DO NOTHING",
        )
        .bind(now_ms)
        .bind(json_list(bounced.iter().copied()))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Of `items`, in order, those whose row still holds the lease the item carries (`key`: row id
/// and lease token), read inside the writing transaction; `lost` is told of each other one. As if
/// applied one by one: writing a result clears its row's lease, so a second result for the same
/// row is dropped like one under a lost lease.
async fn under_current_lease<'a, T>(
    conn: &mut SqliteConnection,
    leases_sql: &'static str,
    items: &'a [T],
    key: impl Fn(&'a T) -> (&'a str, &'a str),
    lost: impl Fn(&T),
) -> Result<Vec<&'a T>> {
    let mut held: HashMap<String, Option<String>> = sqlx::query(leases_sql)
        .bind(json_list(items.iter().map(|i| key(i).0)))
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut kept = Vec::with_capacity(items.len());
    for item in items {
        let (id, token) = key(item);
        match held.get_mut(id) {
            Some(lease) if lease.as_deref() == Some(token) => {
                *lease = None;
                kept.push(item);
            }
            _ => lost(item),
        }
    }
    Ok(kept)
}

/// Inserts events with one multi-row statement, in batch order (their `seq` is the dispatch
/// order); `RETURNING` names the rows that were new.
pub(crate) async fn insert_event_rows(
    conn: &mut SqliteConnection,
    events: &[&NewEvent],
) -> Result<Vec<Accepted>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let rows = json_rows(events.iter().map(|e| {
        let ev = &e.event;
        json!([
            ev.source,
            ev.id,
            ev.event_type.trigger_name(),
            ev.contact_id(),
            ev.time.timestamp_millis(),
            e.received_ms,
            ev.to_json().to_string(),
        ])
    }));
    let new = sqlx::query(
        "INSERT INTO events (source, id, type, contact_id, time_ms, received_ms, body)
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6
         FROM json_each(?) WHERE true ORDER BY key
         ON CONFLICT (source, id) DO NOTHING
         RETURNING source, id",
    )
    .bind(rows)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    Ok(crate::ingest::accepted_in_order(events, new))
}

/// The ids of the outcomes that bounced (the mailbox does not exist).
fn bounced_ids<'a>(outcomes: &[&'a MessageOutcome]) -> Vec<&'a str> {
    outcomes
        .iter()
        .filter(|o| matches!(o.result, DeliveryResult::Bounced { .. }))
        .map(|o| o.message_id.as_str())
        .collect()
}

/// The contact columns starting at `at` (id, email, phone, first, last, timezone, custom fields,
/// locale).
pub(crate) fn contact_at(r: &sqlx::sqlite::SqliteRow, at: usize) -> crate::ContactRow {
    crate::ContactRow {
        id: r.get::<Option<String>, _>(at).unwrap_or_default(),
        email: r.get(at + 1),
        phone: r.get(at + 2),
        first_name: r.get(at + 3),
        last_name: r.get(at + 4),
        timezone: r.get(at + 5),
        custom_fields: r.get(at + 6),
        locale: r.get(at + 7),
    }
}
