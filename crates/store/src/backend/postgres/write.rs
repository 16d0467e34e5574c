//! Every write of the PostgreSQL backend. Each method is one transaction (or one statement, which
//! is one), and writes a batch with multi-row statements over `UNNEST`ed arrays, so the round
//! trips of a call do not grow with the size of its batch.

use super::{PgStore, contact_at, retrying, sql_limit};
use crate::DeliveryResult;
use crate::backend::sql::Tx;
use crate::decode::{channel, outcome_columns, parse_stored_event, run_state};
use crate::erasure::AddressKey;
use crate::{
    Accepted, ClaimedMessage, ClaimedRun, DispatchInput, DispatchRequest, EnrollmentCounts,
    LiveRun, MailboxItem, MessageOutcome, NewEvent, Result, RunAdvance, RunWrite, projection,
};
use herald_core::CourseEvent;
use sqlx::{PgConnection, PgExecutor, Row};
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

impl PgStore {
    /// One statement for the whole batch, atomic on its own.
    pub(crate) async fn insert_events(&self, events: Vec<NewEvent>) -> Result<Vec<Accepted>> {
        let events: Vec<&NewEvent> = events.iter().collect();
        retrying!("insert events", insert_event_rows(&self.pool, &events))
    }

    /// Dispatchers of several processes take turns: each holds a transaction-scoped advisory lock
    /// (one per schema) for its whole batch. The planner must see the runs that every earlier
    /// event of its contacts created or ended; two batches planned side by side would each miss
    /// the other's runs (an `exit_when` event would not find the run an event of the other batch
    /// is starting, and enrollment counts would be stale). The events are also claimed with
    /// `FOR UPDATE SKIP LOCKED`, so no event is dispatched twice even without the lock.
    pub async fn dispatch(
        &self,
        request: DispatchRequest<'_>,
        address_key: Option<&AddressKey>,
    ) -> Result<usize> {
        retrying!("dispatch", self.try_dispatch(request, address_key))
    }

    async fn try_dispatch(
        &self,
        request: DispatchRequest<'_>,
        address_key: Option<&AddressKey>,
    ) -> Result<usize> {
        let DispatchRequest {
            limit,
            clock,
            loop_window_ms,
            contact_states,
            planner,
        } = request;
        let mut tx = self.pool.begin().await?;
        sqlx::query(super::LOCK_DISPATCH).execute(&mut *tx).await?;
        let rows =
            sqlx::query("SELECT seq, body FROM events WHERE NOT dispatched ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED")
                .bind(sql_limit(limit))
                .fetch_all(&mut *tx)
                .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let now_ms = clock();
        let window_start_ms = now_ms.saturating_sub(loop_window_ms);
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            events.push((row.get::<i64, _>(0), parse_stored_event(row.get(1))?));
        }
        let contacts: Vec<&str> = distinct(events.iter().map(|(_, e)| e.contact_id()));
        project(&mut tx, &events).await?;
        end_learner_access(&mut tx, &projection::lost_an_offer(&events), now_ms).await?;
        if let Some(key) = address_key {
            opt_out_suppressed_addresses(&mut tx, key, &events, now_ms).await?;
        }
        let contact_rows = sqlx::query(
            "SELECT id, email, phone, first_name, last_name, timezone, custom_fields, locale FROM contacts WHERE id = ANY($1)",
        )
        .bind(&contacts)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            let c = contact_at(r, 0);
            (c.id.clone(), c)
        })
        .collect();

        let states = if contact_states {
            let ids: Vec<String> = contacts.iter().map(|c| c.to_string()).collect();
            Some(crate::backend::enroll::contact_states_on(Tx::Postgres(&mut *tx), &ids).await?)
        } else {
            None
        };

        let live_runs = sqlx::query(
            "SELECT id, workflow_id, workflow_version, contact_id, state, wait_event FROM runs
             WHERE contact_id = ANY($1) AND state IN ('active', 'waiting_event', 'parked')",
        )
        .bind(&contacts)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| {
            Ok(LiveRun {
                run_id: r.get(0),
                workflow_id: r.get(1),
                workflow_version: r.get(2),
                contact_id: r.get(3),
                state: run_state(r.get(4))?,
                wait_event: r.get(5),
            })
        })
        .collect::<Result<Vec<_>>>()?;

        let mut counts = HashMap::new();
        for r in sqlx::query(
            "SELECT contact_id, workflow_id,
                    COUNT(*) FILTER (WHERE state <> 'refused'),
                    COUNT(*) FILTER (WHERE state <> 'refused' AND created_ms >= $1),
                    BOOL_OR(state IN ('active', 'waiting_event', 'parked'))
             FROM runs WHERE contact_id = ANY($2) GROUP BY contact_id, workflow_id",
        )
        .bind(window_start_ms)
        .bind(&contacts)
        .fetch_all(&mut *tx)
        .await?
        {
            counts.insert(
                (r.get::<String, _>(0), r.get::<String, _>(1)),
                EnrollmentCounts {
                    total: r.get(2),
                    recent: r.get(3),
                    live: r.get(4),
                },
            );
        }
        drop(contacts);

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
            // Rolled back: the events stay undispatched.
            return Ok(0);
        }

        insert_runs(&mut tx, &plan.new_runs, now_ms).await?;

        // Applied one by one, the first exit of a run ends it and later ones find it ended.
        let exits = first_per_key(&plan.exits, |e| e.run_id.as_str());
        if !exits.is_empty() {
            let ids: Vec<&str> = exits.iter().map(|e| e.run_id.as_str()).collect();
            let reasons: Vec<&str> = exits.iter().map(|e| e.reason.as_str()).collect();
            sqlx::query(
                "UPDATE runs SET state = 'exited', reason = u.reason, due_ms = NULL, ended_ms = $3, updated_ms = $3,
                        locked_until_ms = NULL, lease_token = NULL
                 FROM UNNEST($1::text[], $2::text[]) AS u(id, reason)
                 WHERE runs.id = u.id AND runs.state IN ('active', 'waiting_event', 'parked')",
            )
            .bind(&ids)
            .bind(&reasons)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            // Messages the exited runs still had queued are not sent; those being sent under a
            // live lease are left to their outcome.
            sqlx::query(
                "UPDATE messages SET status = 'cancelled', reason = 'run exited: ' || u.reason, due_ms = NULL,
                        updated_ms = $3, locked_until_ms = NULL, lease_token = NULL
                 FROM UNNEST($1::text[], $2::text[]) AS u(id, reason)
                 WHERE messages.run_id = u.id AND messages.status = 'queued'
                   AND (messages.locked_until_ms IS NULL OR messages.locked_until_ms <= $3)",
            )
            .bind(&ids)
            .bind(&reasons)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        if !plan.resumes.is_empty() {
            let (ids, seqs): (Vec<&str>, Vec<i64>) = plan
                .resumes
                .iter()
                .map(|r| (r.run_id.as_str(), r.event_seq))
                .unzip();
            sqlx::query(
                "UPDATE runs SET state = 'active', wait_event = NULL, due_ms = $1, updated_ms = $1, awaited_seq = u.seq
                 FROM UNNEST($2::text[], $3::bigint[]) AS u(id, seq)
                 WHERE runs.id = u.id AND runs.state = 'waiting_event'",
            )
            .bind(now_ms)
            .bind(&ids)
            .bind(&seqs)
            .execute(&mut *tx)
            .await?;
        }
        let seqs: Vec<i64> = input.events.iter().map(|(s, _)| *s).collect();
        sqlx::query("UPDATE events SET dispatched = TRUE WHERE seq = ANY($1)")
            .bind(&seqs)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(input.events.len())
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
        insert_run_effects(&mut tx, &applied, now_ms).await?;
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

/// Each distinct item once, in order of first appearance.
fn distinct<'a>(items: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = HashSet::new();
    items.into_iter().filter(|i| seen.insert(*i)).collect()
}

/// The first item of each key, in order.
fn first_per_key<'a, T, K: Eq + Hash>(
    items: impl IntoIterator<Item = &'a T>,
    key: impl Fn(&'a T) -> K,
) -> Vec<&'a T> {
    let mut seen = HashSet::new();
    items.into_iter().filter(|i| seen.insert(key(i))).collect()
}

/// Splits keyed operations into rounds in which each key occurs at most once: round `k` holds the
/// `k`-th operation of every key. Applying the rounds in order applies each key's operations in
/// their order, and one multi-row upsert per round never touches a row twice (which PostgreSQL
/// refuses within one statement).
fn rounds<K: Eq + Hash, T>(items: impl IntoIterator<Item = (K, T)>) -> Vec<Vec<T>> {
    let mut seen: HashMap<K, usize> = HashMap::new();
    let mut out: Vec<Vec<T>> = Vec::new();
    for (key, item) in items {
        let round = seen.entry(key).or_insert(0);
        if *round == out.len() {
            out.push(Vec::new());
        }
        out[*round].push(item);
        *round += 1;
    }
    out
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

/// Inserts new runs with their effects; a conflict on the one-live-run key means the contact is
/// already in a live run of this workflow, and then nothing is written for that run.
async fn insert_runs(conn: &mut PgConnection, runs: &[RunWrite], now_ms: i64) -> Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    let mut c = RunColumns::default();
    for w in runs {
        c.push(w, now_ms);
    }
    let mut inserted: HashSet<String> = sqlx::query(
        "INSERT INTO runs (id, workflow_id, workflow_version, contact_id, event_seq, state, reason, pc, wait_event,
                           due_ms, created_ms, updated_ms, ended_ms)
         SELECT id, workflow_id, workflow_version, contact_id, event_seq, state, reason, pc, wait_event, due_ms,
                $12, $12, ended_ms
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::text[], $8::int8[],
                     $9::text[], $10::int8[], $11::int8[])
              AS u(id, workflow_id, workflow_version, contact_id, event_seq, state, reason, pc, wait_event, due_ms, ended_ms)
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind(&c.ids)
    .bind(&c.workflows)
    .bind(&c.versions)
    .bind(&c.contacts)
    .bind(&c.event_seqs)
    .bind(&c.states)
    .bind(&c.reasons)
    .bind(&c.pcs)
    .bind(&c.wait_events)
    .bind(&c.due)
    .bind(&c.ended)
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

/// The steps and messages of written runs, in order: steps numbered after the run's last one,
/// and at most one message per (run, step).
async fn insert_run_effects(
    conn: &mut PgConnection,
    runs: &[&RunWrite],
    now_ms: i64,
) -> Result<()> {
    let steps: Vec<_> = runs
        .iter()
        .flat_map(|w| w.steps.iter().map(move |s| (w.run_id.as_str(), s)))
        .collect();
    if !steps.is_empty() {
        let run_ids: Vec<&str> = steps.iter().map(|(r, _)| *r).collect();
        let step_ids: Vec<&str> = steps.iter().map(|(_, s)| s.step_id.as_str()).collect();
        let kinds: Vec<&str> = steps.iter().map(|(_, s)| s.kind.as_str()).collect();
        let outcomes: Vec<&str> = steps.iter().map(|(_, s)| s.outcome.as_str()).collect();
        let at: Vec<i64> = steps.iter().map(|(_, s)| s.at_ms).collect();
        sqlx::query(
            "INSERT INTO run_steps (run_id, seq, step_id, kind, outcome, at_ms)
             SELECT u.run_id,
                    COALESCE((SELECT MAX(s.seq) FROM run_steps s WHERE s.run_id = u.run_id), 0)
                      + ROW_NUMBER() OVER (PARTITION BY u.run_id ORDER BY u.n),
                    u.step_id, u.kind, u.outcome, u.at_ms
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[]) WITH ORDINALITY
                  AS u(run_id, step_id, kind, outcome, at_ms, n)",
        )
        .bind(&run_ids)
        .bind(&step_ids)
        .bind(&kinds)
        .bind(&outcomes)
        .bind(&at)
        .execute(&mut *conn)
        .await?;
    }

    let messages: Vec<_> = runs
        .iter()
        .flat_map(|w| w.messages.iter().map(move |m| (*w, m)))
        .collect();
    if !messages.is_empty() {
        let ids: Vec<&str> = messages.iter().map(|(_, m)| m.id.as_str()).collect();
        let run_ids: Vec<&str> = messages.iter().map(|(w, _)| w.run_id.as_str()).collect();
        let step_ids: Vec<&str> = messages.iter().map(|(_, m)| m.step_id.as_str()).collect();
        let pcs: Vec<i64> = messages.iter().map(|(_, m)| m.pc).collect();
        let workflows: Vec<&str> = messages
            .iter()
            .map(|(w, _)| w.workflow_id.as_str())
            .collect();
        let contacts: Vec<&str> = messages
            .iter()
            .map(|(w, _)| w.contact_id.as_str())
            .collect();
        let channels: Vec<&str> = messages.iter().map(|(_, m)| m.channel.as_str()).collect();
        let recipients: Vec<Option<&str>> = messages
            .iter()
            .map(|(_, m)| m.recipient.as_deref())
            .collect();
        let headers: Vec<&str> = messages
            .iter()
            .map(|(_, m)| m.header_message_id.as_str())
            .collect();
        let statuses: Vec<&str> = messages.iter().map(|(_, m)| m.status.as_str()).collect();
        let reasons: Vec<Option<&str>> =
            messages.iter().map(|(_, m)| m.reason.as_deref()).collect();
        let due: Vec<Option<i64>> = messages.iter().map(|(_, m)| m.due_ms).collect();
        sqlx::query(
            "INSERT INTO messages (id, run_id, step_id, pc, workflow_id, contact_id, channel, recipient,
                                   header_message_id, status, reason, due_ms, created_ms, updated_ms)
             SELECT id, run_id, step_id, pc, workflow_id, contact_id, channel, recipient, header_message_id, status,
                    reason, due_ms, $13, $13
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[],
                         $9::text[], $10::text[], $11::text[], $12::int8[])
                  AS u(id, run_id, step_id, pc, workflow_id, contact_id, channel, recipient, header_message_id, status,
                       reason, due_ms)
             ON CONFLICT (run_id, step_id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&run_ids)
        .bind(&step_ids)
        .bind(&pcs)
        .bind(&workflows)
        .bind(&contacts)
        .bind(&channels)
        .bind(&recipients)
        .bind(&headers)
        .bind(&statuses)
        .bind(&reasons)
        .bind(&due)
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Opts the contacts of a batch out again where their address belongs to an erased contact who
/// had opted out (kept as a keyed hash).
async fn opt_out_suppressed_addresses(
    conn: &mut PgConnection,
    key: &AddressKey,
    events: &[(i64, CourseEvent)],
    now_ms: i64,
) -> Result<()> {
    let facts = projection::contacts(events);
    let hashes = key.hashes_of(facts.iter().map(|c| (c.id, c.fields[0], c.fields[1])));
    if hashes.is_empty() {
        return Ok(());
    }
    let all: Vec<&str> = hashes.iter().map(|(_, _, h)| h.as_str()).collect();
    let suppressed: HashMap<String, String> = sqlx::query_as(
        "SELECT address_hash, source FROM suppressed_addresses WHERE address_hash = ANY($1)",
    )
    .bind(&all)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    for (contact, channel, hash) in &hashes {
        if let Some(source) = suppressed.get(hash) {
            sqlx::query(
                "INSERT INTO opt_outs (contact_id, channel, source, at_ms) VALUES ($1, $2, $3, $4)
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
async fn end_learner_access(conn: &mut PgConnection, contacts: &[&str], now_ms: i64) -> Result<()> {
    if contacts.is_empty() {
        return Ok(());
    }
    for sql in [
        "UPDATE magic_links SET revoked_ms = $1 WHERE kind = 'learner' AND revoked_ms IS NULL
           AND contact_id = ANY($2)
           AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = magic_links.contact_id AND g.kind = 'offer' AND g.active)",
        "UPDATE sessions SET ended_ms = $1 WHERE kind = 'learner' AND ended_ms IS NULL
           AND contact_id = ANY($2)
           AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = sessions.contact_id AND g.kind = 'offer' AND g.active)",
    ] {
        sqlx::query(sql)
            .bind(now_ms)
            .bind(contacts)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The membership projection of a batch of events (see [`projection`]), in a few statements per
/// batch: each table's writes depend only on earlier writes to the same table, so the tables are
/// written one after the other, each in [`rounds`] that keep the order of the writes to one row.
async fn project(conn: &mut PgConnection, events: &[(i64, CourseEvent)]) -> Result<()> {
    project_contacts(conn, events).await?;
    project_grants(conn, events).await?;
    let offer_lists = project_offers(conn, events).await?;
    project_products(conn, events, &offer_lists).await
}

async fn project_contacts(conn: &mut PgConnection, events: &[(i64, CourseEvent)]) -> Result<()> {
    let facts = projection::contacts(events);
    for round in rounds(facts.iter().map(|c| (c.id, c))) {
        let ids: Vec<&str> = round.iter().map(|c| c.id).collect();
        let column = |i: usize| round.iter().map(|c| c.fields[i]).collect::<Vec<_>>();
        let custom: Vec<Option<&str>> = round.iter().map(|c| c.custom_fields.as_deref()).collect();
        let times: Vec<i64> = round.iter().map(|c| c.event_ms).collect();
        let detail_times: Vec<i64> = round.iter().map(|c| c.details_ms).collect();
        sqlx::query(
            "INSERT INTO contacts (id, email, phone, first_name, last_name, timezone, custom_fields, details_ms, last_event_ms, locale)
             SELECT id, email, phone, first_name, last_name, timezone, custom_fields, d, t, locale
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int8[], $9::int8[], $10::text[])
                  AS u(id, email, phone, first_name, last_name, timezone, custom_fields, t, d, locale)
             ON CONFLICT (id) DO UPDATE SET
               email = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.email, contacts.email) ELSE COALESCE(contacts.email, excluded.email) END,
               phone = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.phone, contacts.phone) ELSE COALESCE(contacts.phone, excluded.phone) END,
               first_name = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.first_name, contacts.first_name) ELSE COALESCE(contacts.first_name, excluded.first_name) END,
               last_name = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.last_name, contacts.last_name) ELSE COALESCE(contacts.last_name, excluded.last_name) END,
               timezone = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.timezone, contacts.timezone) ELSE COALESCE(contacts.timezone, excluded.timezone) END,
               custom_fields = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.custom_fields, contacts.custom_fields) ELSE COALESCE(contacts.custom_fields, excluded.custom_fields) END,
               locale = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.locale, contacts.locale) ELSE COALESCE(contacts.locale, excluded.locale) END,
               details_ms = GREATEST(contacts.details_ms, excluded.details_ms),
               last_event_ms = GREATEST(contacts.last_event_ms, excluded.last_event_ms)",
        )
        .bind(&ids)
        .bind(column(0))
        .bind(column(1))
        .bind(column(2))
        .bind(column(3))
        .bind(column(4))
        .bind(&custom)
        .bind(&times)
        .bind(&detail_times)
        .bind(column(5))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn project_grants(conn: &mut PgConnection, events: &[(i64, CourseEvent)]) -> Result<()> {
    let facts = projection::grants(events);
    for round in rounds(facts.iter().map(|g| ((g.contact_id, g.kind, g.item_id), g))) {
        let contacts: Vec<&str> = round.iter().map(|g| g.contact_id).collect();
        let kinds: Vec<&str> = round.iter().map(|g| g.kind).collect();
        let items: Vec<&str> = round.iter().map(|g| g.item_id).collect();
        let active: Vec<bool> = round.iter().map(|g| g.active).collect();
        let times: Vec<i64> = round.iter().map(|g| g.changed_ms).collect();
        sqlx::query(
            "INSERT INTO grants (contact_id, kind, item_id, active, changed_ms)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bool[], $5::int8[])
             ON CONFLICT (contact_id, kind, item_id) DO UPDATE SET active = excluded.active, changed_ms = excluded.changed_ms
             WHERE excluded.changed_ms >= grants.changed_ms",
        )
        .bind(&contacts)
        .bind(&kinds)
        .bind(&items)
        .bind(&active)
        .bind(&times)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Upserts the offers and replaces the product list of each offer with that of its newest event
/// carrying one (see [`projection::offer_lists`]).
async fn project_offers<'e>(
    conn: &mut PgConnection,
    events: &'e [(i64, CourseEvent)],
) -> Result<projection::OfferLists<'e>> {
    let facts = projection::offers(events);
    let mut newer = HashSet::new();
    if !facts.is_empty() {
        // Folded here, one row per offer: a batch of events for one offer would otherwise be one
        // upsert round per event. Only the dispatcher writes offers, under its advisory lock.
        let ids = distinct(facts.iter().map(|o| o.id));
        let stored = sqlx::query("SELECT id, title, updated_ms FROM offers WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let fold = projection::fold_offers(stored, &facts);
        let ids: Vec<&str> = fold.rows.iter().map(|r| r.0).collect();
        let titles: Vec<Option<&str>> = fold.rows.iter().map(|r| r.1.as_deref()).collect();
        let times: Vec<i64> = fold.rows.iter().map(|r| r.2).collect();
        sqlx::query(
            "INSERT INTO offers (id, title, updated_ms) SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[])
             ON CONFLICT (id) DO UPDATE SET title = excluded.title, updated_ms = excluded.updated_ms",
        )
        .bind(&ids)
        .bind(&titles)
        .bind(&times)
        .execute(&mut *conn)
        .await?;
        newer = fold.newer;
    }

    let lists = projection::offer_lists(events, &newer);
    if !lists.final_list.is_empty() {
        let offers: Vec<&str> = lists.final_list.keys().copied().collect();
        sqlx::query("DELETE FROM offer_products WHERE offer_id = ANY($1)")
            .bind(&offers)
            .execute(&mut *conn)
            .await?;
        let (mut offer_ids, mut product_ids) = (Vec::new(), Vec::new());
        for (offer, index) in &lists.final_list {
            for pid in &lists.by_event[index] {
                offer_ids.push(*offer);
                product_ids.push(*pid);
            }
        }
        if !offer_ids.is_empty() {
            sqlx::query(
                "INSERT INTO offer_products (offer_id, product_id) SELECT * FROM UNNEST($1::text[], $2::text[])
                 ON CONFLICT DO NOTHING",
            )
            .bind(&offer_ids)
            .bind(&product_ids)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(lists)
}

/// Products named by a newer offer's list (created if unknown) and products events describe
/// (time-guarded upserts); see [`projection::products`].
async fn project_products(
    conn: &mut PgConnection,
    events: &[(i64, CourseEvent)],
    offer_lists: &projection::OfferLists<'_>,
) -> Result<()> {
    let (missing, upserts) = projection::products(events, offer_lists);
    if !missing.is_empty() {
        let ids: Vec<&str> = missing.iter().map(|m| m.0).collect();
        let times: Vec<i64> = missing.iter().map(|m| m.1).collect();
        sqlx::query(
            "INSERT INTO products (id, updated_ms) SELECT * FROM UNNEST($1::text[], $2::int8[]) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&times)
        .execute(&mut *conn)
        .await?;
    }
    for round in rounds(upserts.iter().map(|p| (p.id, p))) {
        let ids: Vec<&str> = round.iter().map(|p| p.id).collect();
        let titles: Vec<Option<&str>> = round.iter().map(|p| p.title).collect();
        let urls: Vec<Option<&str>> = round.iter().map(|p| p.url).collect();
        let times: Vec<i64> = round.iter().map(|p| p.time_ms).collect();
        sqlx::query(
            "INSERT INTO products (id, title, url, updated_ms) SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[])
             ON CONFLICT (id) DO UPDATE SET
               title = CASE WHEN excluded.updated_ms >= products.updated_ms THEN COALESCE(excluded.title, products.title) ELSE COALESCE(products.title, excluded.title) END,
               url = CASE WHEN excluded.updated_ms >= products.updated_ms THEN COALESCE(excluded.url, products.url) ELSE COALESCE(products.url, excluded.url) END,
               updated_ms = GREATEST(products.updated_ms, excluded.updated_ms)",
        )
        .bind(&ids)
        .bind(&titles)
        .bind(&urls)
        .bind(&times)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
