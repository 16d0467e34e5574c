//! Every write of the PostgreSQL backend. Each method is one transaction (or one statement, which
//! is one), and writes a batch with multi-row statements over `UNNEST`ed arrays, so the round
//! trips of a call do not grow with the size of its batch.

use super::{PgStore, contact_at, retrying, sql_limit};
use crate::DeliveryResult;
use crate::backend::first_per_key;
use crate::backend::sql::Tx;
use crate::decode::{channel, outcome_columns, parse_stored_event, run_state};
use crate::{
    Accepted, ClaimedMessage, ClaimedRun, MailboxItem, MessageOutcome, NewEvent, Result,
    RunAdvance, RunWrite,
};
use sqlx::{PgExecutor, Row};
use std::collections::HashSet;

impl PgStore {
    /// One statement for the whole batch, atomic on its own.
    pub(crate) async fn insert_events(&self, events: Vec<NewEvent>) -> Result<Vec<Accepted>> {
        let events: Vec<&NewEvent> = events.iter().collect();
        retrying!("insert events", insert_event_rows(&self.pool, &events))
    }

    /// One statement: lock the due rows no one else holds, set the lease, and read what the
    /// engine needs, so a claim is one round trip and two processes never claim the same run.
    pub async fn claim_runs(
        &self,
        now_ms: i64,
        limit: i64,
        lease_ms: i64,
    ) -> Result<Vec<ClaimedRun>> {
        let token = uuid::Uuid::new_v4().to_string();
        let rows = retrying!("claim runs", async {
            Ok(sqlx::query(
                "WITH picked AS MATERIALIZED (
                     SELECT id FROM runs
                     WHERE state IN ('active', 'waiting_event') AND due_ms <= $3
                       AND (locked_until_ms IS NULL OR locked_until_ms <= $3)
                     ORDER BY due_ms LIMIT $4 FOR UPDATE SKIP LOCKED),
                 claimed AS (
                     UPDATE runs SET locked_until_ms = $1, lease_token = $2 FROM picked WHERE runs.id = picked.id
                     RETURNING runs.id, runs.workflow_id, runs.workflow_version, runs.contact_id, runs.event_seq,
                               runs.state, runs.pc, runs.due_ms, runs.awaited_seq)
                 SELECT r.id, r.workflow_id, r.workflow_version, r.contact_id, r.event_seq, r.state, r.pc, e.body,
                        c.id, c.email, c.phone, c.first_name, c.last_name, c.timezone, c.custom_fields, c.locale, aw.body
                 FROM claimed r JOIN events e ON e.seq = r.event_seq LEFT JOIN contacts c ON c.id = r.contact_id
                 LEFT JOIN events aw ON aw.seq = r.awaited_seq
                 ORDER BY r.due_ms, r.id",
            )
            .bind(now_ms + lease_ms)
            .bind(&token)
            .bind(now_ms)
            .bind(sql_limit(limit))
            .fetch_all(&self.pool)
            .await?)
        })?;
        rows.into_iter()
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
            .collect()
    }

    pub async fn finish_runs(&self, now_ms: i64, advances: Vec<RunAdvance>) -> Result<()> {
        if advances.is_empty() {
            return Ok(());
        }
        retrying!("finish runs", self.try_finish_runs(now_ms, &advances))
    }

    async fn try_finish_runs(&self, now_ms: i64, advances: &[RunAdvance]) -> Result<()> {
        // Applied one by one, the first advance holding the run's current lease wins (it clears
        // the lease). Without repeated (run, token) pairs at most one row matches each run.
        let advances = first_per_key(advances, |a| {
            (a.write.run_id.as_str(), a.lease_token.as_str())
        });
        let mut c = RunColumns::default();
        let mut tokens = Vec::with_capacity(advances.len());
        for adv in &advances {
            c.push(&adv.write, now_ms);
            tokens.push(adv.lease_token.as_str());
        }
        let mut tx = self.pool.begin().await?;
        let updated: HashSet<i64> = sqlx::query(
            // A run advanced from `waiting_event` timed out: its last event wait received nothing.
            "UPDATE runs SET state = u.state, reason = u.reason, pc = u.pc, wait_event = u.wait_event, due_ms = u.due_ms,
                    updated_ms = $9, ended_ms = u.ended_ms, locked_until_ms = NULL, lease_token = NULL,
                    awaited_seq = CASE WHEN runs.state = 'waiting_event' THEN NULL ELSE runs.awaited_seq END
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::int8[], $8::int8[])
                  WITH ORDINALITY AS u(id, token, state, reason, pc, wait_event, due_ms, ended_ms, n)
             WHERE runs.id = u.id AND runs.lease_token = u.token
             RETURNING u.n",
        )
        .bind(&c.ids)
        .bind(&tokens)
        .bind(&c.states)
        .bind(&c.reasons)
        .bind(&c.pcs)
        .bind(&c.wait_events)
        .bind(&c.due)
        .bind(&c.ended)
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
        let mut applied = Vec::with_capacity(updated.len());
        for (n, adv) in (1..).zip(&advances) {
            if updated.contains(&n) {
                applied.push(&adv.write);
            } else {
                tracing::warn!(run = %adv.write.run_id, "run lease lost before its step finished; result dropped");
            }
        }
        crate::backend::runs::insert_run_effects(Tx::Postgres(&mut *tx), &applied, now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Like [`PgStore::claim_runs`]: one statement that locks, leases and reads.
    pub async fn claim_messages(
        &self,
        now_ms: i64,
        limit: i64,
        lease_ms: i64,
    ) -> Result<Vec<ClaimedMessage>> {
        let token = uuid::Uuid::new_v4().to_string();
        let rows = retrying!("claim messages", async {
            Ok(sqlx::query(
                "WITH picked AS MATERIALIZED (
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
                        m.header_message_id, m.attempts, e.body,
                        c.id, c.email, c.phone, c.first_name, c.last_name, c.timezone, c.custom_fields, c.locale,
                    EXISTS (SELECT 1 FROM opt_outs o WHERE o.contact_id = m.contact_id AND o.channel = m.channel),
                    NOT EXISTS (SELECT 1 FROM messages p WHERE p.contact_id = m.contact_id AND p.channel = m.channel AND p.status = 'sent'),
                    r.state, aw.body
                 FROM claimed m JOIN runs r ON r.id = m.run_id JOIN events e ON e.seq = r.event_seq
                 LEFT JOIN contacts c ON c.id = m.contact_id LEFT JOIN events aw ON aw.seq = r.awaited_seq
                 ORDER BY m.due_ms, m.id",
            )
            .bind(now_ms + lease_ms)
            .bind(&token)
            .bind(now_ms)
            .bind(sql_limit(limit))
            .fetch_all(&self.pool)
            .await?)
        })?;
        rows.into_iter()
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
            .collect()
    }

    pub async fn extend_message_lease(&self, lease_token: String, until_ms: i64) -> Result<u64> {
        let n = sqlx::query(
            "UPDATE messages SET locked_until_ms = $1 WHERE lease_token = $2 AND status = 'queued'",
        )
        .bind(until_ms)
        .bind(&lease_token)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n)
    }

    pub async fn complete_messages(
        &self,
        now_ms: i64,
        outcomes: Vec<MessageOutcome>,
    ) -> Result<()> {
        if outcomes.is_empty() {
            return Ok(());
        }
        retrying!(
            "complete messages",
            self.try_complete_messages(now_ms, &outcomes)
        )
    }

    async fn try_complete_messages(&self, now_ms: i64, outcomes: &[MessageOutcome]) -> Result<()> {
        // Applied one by one, the first outcome holding the message's current lease wins (it
        // clears the lease). Without repeated (message, token) pairs at most one row matches.
        let outcomes = first_per_key(outcomes, |o| {
            (o.message_id.as_str(), o.lease_token.as_str())
        });
        let n = outcomes.len();
        let (mut ids, mut tokens, mut statuses, mut reasons) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut due, mut providers, mut sent, mut subjects) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut segments = Vec::with_capacity(n);
        let mut attempted = Vec::with_capacity(n);
        for o in &outcomes {
            let c = outcome_columns(&o.result, now_ms);
            attempted.push(c.attempted);
            ids.push(o.message_id.as_str());
            tokens.push(o.lease_token.as_str());
            statuses.push(c.status.as_str());
            reasons.push(c.reason);
            due.push(c.due_ms);
            providers.push(c.provider_id);
            sent.push(c.sent_ms);
            subjects.push(o.subject.as_deref());
            segments.push(o.segments);
        }
        let mut tx = self.pool.begin().await?;
        let updated: HashSet<i64> = sqlx::query(
            "UPDATE messages SET status = u.status, reason = u.reason, due_ms = u.due_ms,
                    provider_id = COALESCE(u.provider_id, messages.provider_id),
                    sent_ms = COALESCE(u.sent_ms, messages.sent_ms), subject = COALESCE(u.subject, messages.subject),
                    segments = COALESCE(u.segments, messages.segments),
                    attempts = messages.attempts + CASE WHEN u.attempted THEN 1 ELSE 0 END,
                    updated_ms = $9, locked_until_ms = NULL, lease_token = NULL
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::int8[], $8::text[], $10::int8[], $11::bool[])
                  WITH ORDINALITY AS u(id, token, status, reason, due_ms, provider_id, sent_ms, subject, segments, attempted, n)
             WHERE messages.id = u.id AND messages.lease_token = u.token
             RETURNING u.n",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(&statuses)
        .bind(&reasons)
        .bind(&due)
        .bind(&providers)
        .bind(&sent)
        .bind(&subjects)
        .bind(now_ms)
        .bind(&segments)
        .bind(&attempted)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();

        let mut mail = MailColumns::default();
        let mut bounced = Vec::new();
        for (n, o) in (1..).zip(&outcomes) {
            if updated.contains(&n) && matches!(o.result, DeliveryResult::Bounced { .. }) {
                bounced.push(o.message_id.as_str());
            }
            if !updated.contains(&n) {
                tracing::warn!(message = %o.message_id, "message lease lost before delivery finished; outcome dropped");
            } else if let Some(m) = &o.mailbox {
                mail.ids.push(m.id.as_str());
                mail.message_ids.push(m.message_id.as_deref());
                mail.channels.push(m.channel.as_str());
                mail.senders.push(m.sender.as_deref());
                mail.recipients.push(m.recipient.as_str());
                mail.subjects.push(m.subject.as_deref());
                mail.texts.push(m.text_body.as_deref());
                mail.htmls.push(m.html_body.as_deref());
                mail.created.push(m.created_ms);
            }
        }
        if !mail.ids.is_empty() {
            sqlx::query(
                "INSERT INTO mailbox (id, message_id, channel, sender, recipient, subject, text_body, html_body, created_ms)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                                      $8::text[], $9::int8[])
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(&mail.ids)
            .bind(&mail.message_ids)
            .bind(&mail.channels)
            .bind(&mail.senders)
            .bind(&mail.recipients)
            .bind(&mail.subjects)
            .bind(&mail.texts)
            .bind(&mail.htmls)
            .bind(&mail.created)
            .execute(&mut *tx)
            .await?;
        }
        if !bounced.is_empty() {
            sqlx::query(
                "INSERT INTO opt_outs (contact_id, channel, source, at_ms)
                 SELECT DISTINCT contact_id, 'email', 'bounced', $1::int8 FROM messages WHERE id = ANY($2)
                 ON CONFLICT DO NOTHING",
            )
            .bind(now_ms)
            .bind(&bounced)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn add_to_mailbox(&self, item: MailboxItem) -> Result<()> {
        sqlx::query(
            "INSERT INTO mailbox (id, message_id, channel, sender, recipient, subject, text_body, html_body, created_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&item.id)
        .bind(&item.message_id)
        .bind(item.channel.as_str())
        .bind(&item.sender)
        .bind(&item.recipient)
        .bind(&item.subject)
        .bind(&item.text_body)
        .bind(&item.html_body)
        .bind(item.created_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Inserts events with one multi-row statement; `RETURNING` names the rows that were new, and of
/// several copies of one event in the batch the first is the new one.
pub(crate) async fn insert_event_rows<'c>(
    exec: impl PgExecutor<'c>,
    events: &[&NewEvent],
) -> Result<Vec<Accepted>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let n = events.len();
    let (mut sources, mut ids, mut types, mut contacts) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut times, mut received, mut bodies) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for e in events {
        let ev = &e.event;
        sources.push(ev.source.as_str());
        ids.push(ev.id.as_str());
        types.push(ev.event_type.trigger_name());
        contacts.push(ev.contact_id());
        times.push(ev.time.timestamp_millis());
        received.push(e.received_ms);
        bodies.push(ev.to_json().to_string());
    }
    let rows = sqlx::query(
        "INSERT INTO events (source, id, type, contact_id, time_ms, received_ms, body)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::text[])
         ON CONFLICT (source, id) DO NOTHING
         RETURNING source, id",
    )
    .bind(&sources)
    .bind(&ids)
    .bind(&types)
    .bind(&contacts)
    .bind(&times)
    .bind(&received)
    .bind(&bodies)
    .fetch_all(exec)
    .await?;
    let new = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(crate::ingest::accepted_in_order(events, new))
}

/// The columns of run writes, as arrays to bind.
#[derive(Default)]
struct RunColumns<'a> {
    ids: Vec<&'a str>,
    workflows: Vec<&'a str>,
    versions: Vec<&'a str>,
    contacts: Vec<&'a str>,
    event_seqs: Vec<i64>,
    states: Vec<&'static str>,
    reasons: Vec<Option<&'a str>>,
    pcs: Vec<i64>,
    wait_events: Vec<Option<&'a str>>,
    due: Vec<Option<i64>>,
    ended: Vec<Option<i64>>,
}

impl<'a> RunColumns<'a> {
    fn push(&mut self, w: &'a RunWrite, now_ms: i64) {
        self.ids.push(&w.run_id);
        self.workflows.push(&w.workflow_id);
        self.versions.push(&w.workflow_version);
        self.contacts.push(&w.contact_id);
        self.event_seqs.push(w.event_seq);
        self.states.push(w.state.as_str());
        self.reasons.push(w.reason.as_deref());
        self.pcs.push(w.pc);
        self.wait_events.push(w.wait_event.as_deref());
        self.due.push(w.due_ms);
        self.ended.push((!w.state.is_live()).then_some(now_ms));
    }
}

#[derive(Default)]
struct MailColumns<'a> {
    ids: Vec<&'a str>,
    message_ids: Vec<Option<&'a str>>,
    channels: Vec<&'static str>,
    senders: Vec<Option<&'a str>>,
    recipients: Vec<&'a str>,
    subjects: Vec<Option<&'a str>>,
    texts: Vec<Option<&'a str>>,
    htmls: Vec<Option<&'a str>>,
    created: Vec<i64>,
}

