//! Every write of the SQLite backend, each one transaction on the writer connection.

use super::{SqliteStore, json_list, json_rows};
use crate::DeliveryResult;
use crate::backend::sql::Tx;
use crate::decode::{channel, outcome_columns, parse_stored_event, run_state};
use crate::erasure::AddressKey;
use crate::{
    Accepted, ClaimedMessage, ClaimedRun, DispatchInput, DispatchRequest, EnrollmentCounts,
    LiveRun, MailboxItem, MessageOutcome, NewEvent, Result, RunAdvance, RunWrite, projection,
};
use herald_core::CourseEvent;
use serde_json::json;
use sqlx::{Row, SqliteConnection};
use std::collections::{HashMap, HashSet};

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

    pub async fn dispatch(
        &self,
        request: DispatchRequest<'_>,
        address_key: Option<&AddressKey>,
    ) -> Result<usize> {
        let mut group = self.writer.lead().await?;
        let outcome = dispatch_batch(group.conn(), request, address_key).await;
        match outcome {
            Ok(Dispatched::Events(n)) => group.finish(Ok(n)).await,
            Ok(Dispatched::Postponed) => group.undo(0).await,
            Err(e) => group.finish(Err(e)).await,
        }
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

/// Cancels the queued messages of runs that ended before sending them; those being sent under a
/// live lease are left to their outcome.
pub(super) async fn cancel_queued_messages(
    conn: &mut SqliteConnection,
    run_ids: &[&str],
    reason: &str,
    now_ms: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE messages SET status = 'cancelled', reason = ?1, due_ms = NULL, updated_ms = ?2,
                locked_until_ms = NULL, lease_token = NULL
         WHERE status = 'queued' AND (locked_until_ms IS NULL OR locked_until_ms <= ?2)
           AND run_id IN (SELECT value FROM json_each(?3))",
    )
    .bind(reason)
    .bind(now_ms)
    .bind(json_list(run_ids.iter().copied()))
    .execute(&mut *conn)
    .await?;
    Ok(())
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
    insert_run_effects(conn, &written, now_ms).await?;
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

/// What one dispatch did.
enum Dispatched {
    Events(usize),
    /// The planner needs workflow versions not loaded yet: the batch is undone and waits.
    Postponed,
}

/// Plans and applies one batch of undispatched events with their membership projection, on the
/// caller's transaction.
async fn dispatch_batch(
    conn: &mut SqliteConnection,
    request: DispatchRequest<'_>,
    address_key: Option<&AddressKey>,
) -> Result<Dispatched> {
    let DispatchRequest {
        limit,
        clock,
        loop_window_ms,
        contact_states,
        planner,
    } = request;
    let rows =
        sqlx::query("SELECT seq, body FROM events WHERE dispatched = 0 ORDER BY seq LIMIT ?")
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
    if rows.is_empty() {
        return Ok(Dispatched::Events(0));
    }
    let now_ms = clock();
    let window_start_ms = now_ms.saturating_sub(loop_window_ms);
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        events.push((row.get::<i64, _>(0), parse_stored_event(row.get(1))?));
    }
    let contacts = json_list(events.iter().map(|(_, e)| e.contact_id()));
    project(conn, &events).await?;
    end_learner_access(conn, &projection::lost_an_offer(&events), now_ms).await?;
    if let Some(key) = address_key {
        opt_out_suppressed_addresses(conn, key, &events, now_ms).await?;
    }
    let contact_rows = sqlx::query(
        "SELECT id, email, phone, first_name, last_name, timezone, custom_fields, locale FROM contacts
         WHERE id IN (SELECT value FROM json_each(?))",
    )
    .bind(&contacts)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| {
        let c = contact_at(r, 0);
        (c.id.clone(), c)
    })
    .collect();

    let states = if contact_states {
        let ids: HashSet<String> = events
            .iter()
            .map(|(_, e)| e.contact_id().to_owned())
            .collect();
        let ids: Vec<String> = ids.into_iter().collect();
        Some(crate::backend::enroll::contact_states_on(Tx::Sqlite(&mut *conn), &ids).await?)
    } else {
        None
    };

    let live_runs = sqlx::query(
        "SELECT id, workflow_id, workflow_version, contact_id, state, wait_event FROM runs
         WHERE contact_id IN (SELECT value FROM json_each(?)) AND state IN ('active', 'waiting_event', 'parked')",
    )
    .bind(&contacts)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| live_run(&r))
    .collect::<Result<Vec<_>>>()?;

    let mut counts = HashMap::new();
    for r in sqlx::query(
        "SELECT contact_id, workflow_id,
                SUM(CASE WHEN state <> 'refused' THEN 1 ELSE 0 END),
                SUM(CASE WHEN state <> 'refused' AND created_ms >= ? THEN 1 ELSE 0 END),
                MAX(CASE WHEN state IN ('active', 'waiting_event', 'parked') THEN 1 ELSE 0 END)
         FROM runs WHERE contact_id IN (SELECT value FROM json_each(?)) GROUP BY contact_id, workflow_id",
    )
    .bind(window_start_ms)
    .bind(&contacts)
    .fetch_all(&mut *conn)
    .await?
    {
        counts.insert(
            (r.get::<String, _>(0), r.get::<String, _>(1)),
            EnrollmentCounts { total: r.get(2), recent: r.get(3), live: r.get::<i64, _>(4) == 1 },
        );
    }

    let input = DispatchInput {
        now_ms,
        events,
        live_runs,
        counts,
        contacts: contact_rows,
        states,
    };
    let plan = planner(&input);
    if plan.postponed {
        return Ok(Dispatched::Postponed);
    }

    insert_runs(conn, &plan.new_runs, now_ms).await?;
    for exit in &plan.exits {
        sqlx::query(
            "UPDATE runs SET state = 'exited', reason = ?, due_ms = NULL, ended_ms = ?, updated_ms = ?,
                    locked_until_ms = NULL, lease_token = NULL
             WHERE id = ? AND state IN ('active', 'waiting_event', 'parked')",
        )
        .bind(&exit.reason)
        .bind(now_ms)
        .bind(now_ms)
        .bind(&exit.run_id)
        .execute(&mut *conn)
        .await?;
        let reason = format!("run exited: {}", exit.reason);
        cancel_queued_messages(conn, &[exit.run_id.as_str()], &reason, now_ms).await?;
    }
    for resume in &plan.resumes {
        sqlx::query(
            "UPDATE runs SET state = 'active', wait_event = NULL, due_ms = ?, updated_ms = ?, awaited_seq = ?
             WHERE id = ? AND state = 'waiting_event'",
        )
        .bind(now_ms)
        .bind(now_ms)
        .bind(resume.event_seq)
        .bind(&resume.run_id)
        .execute(&mut *conn)
        .await?;
    }
    let seqs: Vec<String> = input.events.iter().map(|(s, _)| s.to_string()).collect();
    sqlx::query("UPDATE events SET dispatched = 1 WHERE seq IN (SELECT value FROM json_each(?))")
        .bind(json_list(seqs.iter().map(String::as_str)))
        .execute(&mut *conn)
        .await?;
    Ok(Dispatched::Events(input.events.len()))
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

/// Inserts new runs with their effects; a conflict on the one-live-run key means the contact is
/// already in a live run of this workflow, and then nothing is written for that run.
async fn insert_runs(conn: &mut SqliteConnection, runs: &[RunWrite], now_ms: i64) -> Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    let rows = json_rows(runs.iter().map(|w| {
        json!([
            w.run_id,
            w.workflow_id,
            w.workflow_version,
            w.contact_id,
            w.event_seq,
            w.state.as_str(),
            w.reason,
            w.pc,
            w.wait_event,
            w.due_ms,
            (!w.state.is_live()).then_some(now_ms),
        ])
    }));
    let mut inserted: HashSet<String> = sqlx::query(
        "INSERT INTO runs (id, workflow_id, workflow_version, contact_id, event_seq, state, reason, pc, wait_event,
                           due_ms, created_ms, updated_ms, ended_ms)
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
                value ->> 7, value ->> 8, value ->> 9, ?2, ?2, value ->> 10
         FROM json_each(?1) WHERE true ORDER BY key
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind(rows)
    .bind(now_ms)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect();
    // Of two writes with one run id only the first was inserted.
    let written: Vec<&RunWrite> = runs.iter().filter(|w| inserted.remove(&w.run_id)).collect();
    insert_run_effects(conn, &written, now_ms).await
}

/// The steps and messages of written runs, in order: steps numbered after the run's last one
/// (SQLite computes the whole `SELECT` before inserting, as it reads the table it fills), and at
/// most one message per (run, step).
async fn insert_run_effects(
    conn: &mut SqliteConnection,
    runs: &[&RunWrite],
    now_ms: i64,
) -> Result<()> {
    let steps: Vec<_> = runs
        .iter()
        .flat_map(|w| {
            w.steps
                .iter()
                .map(move |s| json!([w.run_id, s.step_id, s.kind, s.outcome, s.at_ms]))
        })
        .collect();
    if !steps.is_empty() {
        sqlx::query(
            "INSERT INTO run_steps (run_id, seq, step_id, kind, outcome, at_ms)
             SELECT value ->> 0,
                    COALESCE((SELECT MAX(s.seq) FROM run_steps s WHERE s.run_id = value ->> 0), 0)
                      + ROW_NUMBER() OVER (PARTITION BY value ->> 0 ORDER BY key),
                    value ->> 1, value ->> 2, value ->> 3, value ->> 4
             FROM json_each(?)",
        )
        .bind(json_rows(steps))
        .execute(&mut *conn)
        .await?;
    }
    let messages: Vec<_> = runs
        .iter()
        .flat_map(|w| {
            w.messages.iter().map(move |m| {
                json!([
                    m.id,
                    w.run_id,
                    m.step_id,
                    m.pc,
                    w.workflow_id,
                    w.contact_id,
                    m.channel.as_str(),
                    m.recipient,
                    m.header_message_id,
                    m.status.as_str(),
                    m.reason,
                    m.due_ms,
                ])
            })
        })
        .collect();
    if !messages.is_empty() {
        sqlx::query(
            "INSERT INTO messages (id, run_id, step_id, pc, workflow_id, contact_id, channel, recipient,
                                   header_message_id, status, reason, due_ms, created_ms, updated_ms)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
                    value ->> 7, value ->> 8, value ->> 9, value ->> 10, value ->> 11, ?2, ?2
             FROM json_each(?1) WHERE true ORDER BY key
             ON CONFLICT (run_id, step_id) DO NOTHING",
        )
        .bind(json_rows(messages))
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The ids of the outcomes that bounced (the mailbox does not exist).
fn bounced_ids<'a>(outcomes: &[&'a MessageOutcome]) -> Vec<&'a str> {
    outcomes
        .iter()
        .filter(|o| matches!(o.result, DeliveryResult::Bounced { .. }))
        .map(|o| o.message_id.as_str())
        .collect()
}

/// Opts the contacts of a batch out again where their address belongs to an erased contact who
/// had opted out (kept as a keyed hash).
async fn opt_out_suppressed_addresses(
    conn: &mut SqliteConnection,
    key: &AddressKey,
    events: &[(i64, CourseEvent)],
    now_ms: i64,
) -> Result<()> {
    let facts = projection::contacts(events);
    let hashes = key.hashes_of(facts.iter().map(|c| (c.id, c.fields[0], c.fields[1])));
    if hashes.is_empty() {
        return Ok(());
    }
    let suppressed: HashMap<String, String> = sqlx::query_as(
        "SELECT address_hash, source FROM suppressed_addresses
         WHERE address_hash IN (SELECT value FROM json_each(?))",
    )
    .bind(json_list(hashes.iter().map(|(_, _, h)| h.as_str())))
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    for (contact, channel, hash) in &hashes {
        if let Some(source) = suppressed.get(hash) {
            sqlx::query(
                "INSERT INTO opt_outs (contact_id, channel, source, at_ms) VALUES (?, ?, ?, ?)
                 ON CONFLICT DO NOTHING",
            )
            .bind(contact)
            .bind(channel.as_str())
            .bind(source)
            .bind(now_ms)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// Revokes the learner links and ends the learner sessions of those of `contacts` that hold no
/// active offer grant any more.
async fn end_learner_access(
    conn: &mut SqliteConnection,
    contacts: &[&str],
    now_ms: i64,
) -> Result<()> {
    if contacts.is_empty() {
        return Ok(());
    }
    let ids = json_list(contacts.iter().copied());
    for sql in [
        "UPDATE magic_links SET revoked_ms = ?1 WHERE kind = 'learner' AND revoked_ms IS NULL
           AND contact_id IN (SELECT value FROM json_each(?2))
           AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = magic_links.contact_id AND g.kind = 'offer' AND g.active)",
        "UPDATE sessions SET ended_ms = ?1 WHERE kind = 'learner' AND ended_ms IS NULL
           AND contact_id IN (SELECT value FROM json_each(?2))
           AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = sessions.contact_id AND g.kind = 'offer' AND g.active)",
    ] {
        sqlx::query(sql)
            .bind(now_ms)
            .bind(&ids)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The membership projection of a batch of events (see [`projection`]): one statement per
/// table. SQLite applies the rows of a multi-row upsert one after the other, in `key` order, so
/// the batch has exactly the effect of its events projected one by one.
async fn project(conn: &mut SqliteConnection, events: &[(i64, CourseEvent)]) -> Result<()> {
    let contacts = projection::contacts(events);
    sqlx::query(
        "INSERT INTO contacts (id, email, phone, first_name, last_name, timezone, custom_fields, details_ms, last_event_ms, locale)
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
                value ->> 7, value ->> 8, value ->> 9
         FROM json_each(?) WHERE true ORDER BY key
         ON CONFLICT (id) DO UPDATE SET
           email = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.email, contacts.email) ELSE COALESCE(contacts.email, excluded.email) END,
           phone = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.phone, contacts.phone) ELSE COALESCE(contacts.phone, excluded.phone) END,
           first_name = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.first_name, contacts.first_name) ELSE COALESCE(contacts.first_name, excluded.first_name) END,
           last_name = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.last_name, contacts.last_name) ELSE COALESCE(contacts.last_name, excluded.last_name) END,
           timezone = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.timezone, contacts.timezone) ELSE COALESCE(contacts.timezone, excluded.timezone) END,
           custom_fields = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.custom_fields, contacts.custom_fields) ELSE COALESCE(contacts.custom_fields, excluded.custom_fields) END,
           locale = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.locale, contacts.locale) ELSE COALESCE(contacts.locale, excluded.locale) END,
           details_ms = MAX(contacts.details_ms, excluded.details_ms),
           last_event_ms = MAX(contacts.last_event_ms, excluded.last_event_ms)",
    )
    .bind(json_rows(contacts.iter().map(|c| {
        let [email, phone, first, last, zone, locale] = c.fields;
        json!([c.id, email, phone, first, last, zone, c.custom_fields, c.details_ms, c.event_ms, locale])
    })))
    .execute(&mut *conn)
    .await?;

    let grants = projection::grants(events);
    if !grants.is_empty() {
        sqlx::query(
            "INSERT INTO grants (contact_id, kind, item_id, active, changed_ms)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4
             FROM json_each(?) WHERE true ORDER BY key
             ON CONFLICT (contact_id, kind, item_id) DO UPDATE SET active = excluded.active, changed_ms = excluded.changed_ms
             WHERE excluded.changed_ms >= grants.changed_ms",
        )
        .bind(json_rows(grants.iter().map(|g| {
            json!([g.contact_id, g.kind, g.item_id, g.active, g.changed_ms])
        })))
        .execute(&mut *conn)
        .await?;
    }

    let lists = project_offers(conn, events).await?;
    let (missing, upserts) = projection::products(events, &lists);
    if !missing.is_empty() {
        sqlx::query(
            "INSERT INTO products (id, updated_ms) SELECT value ->> 0, value ->> 1
             FROM json_each(?) WHERE true ORDER BY key ON CONFLICT (id) DO NOTHING",
        )
        .bind(json_rows(missing.iter().map(|(id, t)| json!([id, t]))))
        .execute(&mut *conn)
        .await?;
    }
    if !upserts.is_empty() {
        sqlx::query(
            "INSERT INTO products (id, title, url, updated_ms)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3
             FROM json_each(?) WHERE true ORDER BY key
             ON CONFLICT (id) DO UPDATE SET
               title = CASE WHEN excluded.updated_ms >= products.updated_ms THEN COALESCE(excluded.title, products.title) ELSE COALESCE(products.title, excluded.title) END,
               url = CASE WHEN excluded.updated_ms >= products.updated_ms THEN COALESCE(excluded.url, products.url) ELSE COALESCE(products.url, excluded.url) END,
               updated_ms = MAX(products.updated_ms, excluded.updated_ms)",
        )
        .bind(json_rows(
            upserts.iter().map(|p| json!([p.id, p.title, p.url, p.time_ms])),
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Upserts the offers and replaces the product list of each offer with that of its newest event
/// carrying one (see [`projection::offer_lists`]).
async fn project_offers<'e>(
    conn: &mut SqliteConnection,
    events: &'e [(i64, CourseEvent)],
) -> Result<projection::OfferLists<'e>> {
    let offers = projection::offers(events);
    let mut newer = HashSet::new();
    if !offers.is_empty() {
        let stored = sqlx::query(
            "SELECT id, title, updated_ms FROM offers WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(json_list(offers.iter().map(|o| o.id)))
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
        let fold = projection::fold_offers(stored, &offers);
        sqlx::query(
            "INSERT INTO offers (id, title, updated_ms) SELECT value ->> 0, value ->> 1, value ->> 2
             FROM json_each(?) WHERE true
             ON CONFLICT (id) DO UPDATE SET title = excluded.title, updated_ms = excluded.updated_ms",
        )
        .bind(json_rows(fold.rows.iter().map(|(id, title, t)| json!([id, title, t]))))
        .execute(&mut *conn)
        .await?;
        newer = fold.newer;
    }
    let lists = projection::offer_lists(events, &newer);
    if !lists.final_list.is_empty() {
        sqlx::query(
            "DELETE FROM offer_products WHERE offer_id IN (SELECT value FROM json_each(?))",
        )
        .bind(json_list(lists.final_list.keys().copied()))
        .execute(&mut *conn)
        .await?;
        let pairs: Vec<_> = lists
            .final_list
            .iter()
            .flat_map(|(offer, index)| {
                lists.by_event[index]
                    .iter()
                    .map(move |pid| json!([offer, pid]))
            })
            .collect();
        if !pairs.is_empty() {
            sqlx::query(
                "INSERT INTO offer_products (offer_id, product_id) SELECT value ->> 0, value ->> 1
                 FROM json_each(?) WHERE true ON CONFLICT DO NOTHING",
            )
            .bind(json_rows(pairs))
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(lists)
}

fn live_run(r: &sqlx::sqlite::SqliteRow) -> Result<LiveRun> {
    Ok(LiveRun {
        run_id: r.get(0),
        workflow_id: r.get(1),
        workflow_version: r.get(2),
        contact_id: r.get(3),
        state: run_state(r.get(4))?,
        wait_event: r.get(5),
    })
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
