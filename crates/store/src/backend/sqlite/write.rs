//! Every write of the SQLite backend, each one transaction on the writer connection.

use super::{SqliteStore, json_list};
use crate::{
    Accepted, ClaimedMessage, ClaimedRun, DeliveryResult, DispatchInput, EnrollmentCounts, LiveRun,
    MailboxItem, MessageOutcome, MessageStatus, NewEvent, Planner, Result, RunAdvance, RunState,
    RunWrite, StoreError,
};
use herald_core::CourseEvent;
use herald_core::event::EventType;
use sqlx::{Row, SqliteConnection};
use std::collections::HashMap;

const BEGIN: &str = "BEGIN IMMEDIATE";

impl SqliteStore {
    pub(crate) async fn insert_events(&self, events: &[&NewEvent]) -> Result<Vec<Accepted>> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
        let out = insert_event_rows(&mut tx, events).await?;
        tx.commit().await?;
        Ok(out)
    }

    pub async fn dispatch(
        &self,
        limit: i64,
        now_ms: i64,
        window_start_ms: i64,
        planner: Planner<'_>,
    ) -> Result<usize> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
        let rows =
            sqlx::query("SELECT seq, body FROM events WHERE dispatched = 0 ORDER BY seq LIMIT ?")
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.get(0);
            events.push((seq, parse_stored_event(row.get(1))?));
        }
        let contacts = json_list(events.iter().map(|(_, e)| e.contact_id()));
        for (_, event) in &events {
            project(&mut tx, event).await?;
        }
        let contact_rows = sqlx::query(
            "SELECT id, email, phone, first_name, last_name, timezone, custom_fields FROM contacts
             WHERE id IN (SELECT value FROM json_each(?))",
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

        let live_runs = sqlx::query(
            "SELECT id, workflow_id, workflow_version, contact_id, state, wait_event FROM runs
             WHERE contact_id IN (SELECT value FROM json_each(?)) AND state IN ('active', 'waiting_event', 'parked')",
        )
        .bind(&contacts)
        .fetch_all(&mut *tx)
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
        .fetch_all(&mut *tx)
        .await?
        {
            counts.insert(
                (r.get::<String, _>(0), r.get::<String, _>(1)),
                EnrollmentCounts { total: r.get(2), recent: r.get(3), live: r.get::<i64, _>(4) == 1 },
            );
        }

        let input = DispatchInput {
            events,
            live_runs,
            counts,
            contacts: contact_rows,
        };
        let plan = planner(&input);

        for run in &plan.new_runs {
            insert_run(&mut tx, run, now_ms).await?;
        }
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
            .execute(&mut *tx)
            .await?;
        }
        for run_id in &plan.resumes {
            sqlx::query(
                "UPDATE runs SET state = 'active', wait_event = NULL, due_ms = ?, updated_ms = ?
                 WHERE id = ? AND state = 'waiting_event'",
            )
            .bind(now_ms)
            .bind(now_ms)
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
        }
        let seqs: Vec<String> = input.events.iter().map(|(s, _)| s.to_string()).collect();
        sqlx::query(
            "UPDATE events SET dispatched = 1 WHERE seq IN (SELECT value FROM json_each(?))",
        )
        .bind(json_list(seqs.iter().map(String::as_str)))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(input.events.len())
    }

    pub async fn claim_runs(
        &self,
        now_ms: i64,
        limit: i64,
        lease_ms: i64,
    ) -> Result<Vec<ClaimedRun>> {
        let token = uuid::Uuid::new_v4().to_string();
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
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
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids = json_list(rows.iter().map(|r| r.get::<&str, _>(0)));
        let claimed = sqlx::query(
            "SELECT r.id, r.workflow_id, r.workflow_version, r.contact_id, r.event_seq, r.state, r.pc, e.body,
                    c.id, c.email, c.phone, c.first_name, c.last_name, c.timezone, c.custom_fields
             FROM runs r JOIN events e ON e.seq = r.event_seq LEFT JOIN contacts c ON c.id = r.contact_id
             WHERE r.id IN (SELECT value FROM json_each(?))",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
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
            })
        })
        .collect::<Result<Vec<_>>>()?;
        tx.commit().await?;
        Ok(claimed)
    }

    pub async fn finish_runs(&self, now_ms: i64, advances: Vec<RunAdvance>) -> Result<()> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
        for adv in &advances {
            let w = &adv.write;
            let ended = (!w.state.is_live()).then_some(now_ms);
            let updated = sqlx::query(
                "UPDATE runs SET state = ?, reason = ?, pc = ?, wait_event = ?, due_ms = ?, updated_ms = ?,
                        ended_ms = ?, locked_until_ms = NULL, lease_token = NULL
                 WHERE id = ? AND lease_token = ?",
            )
            .bind(w.state.as_str())
            .bind(&w.reason)
            .bind(w.pc)
            .bind(&w.wait_event)
            .bind(w.due_ms)
            .bind(now_ms)
            .bind(ended)
            .bind(&w.run_id)
            .bind(&adv.lease_token)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 1 {
                insert_run_effects(&mut tx, w, now_ms).await?;
            } else {
                tracing::warn!(run = %w.run_id, "run lease lost before its step finished; result dropped");
            }
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn claim_messages(
        &self,
        now_ms: i64,
        limit: i64,
        lease_ms: i64,
    ) -> Result<Vec<ClaimedMessage>> {
        let token = uuid::Uuid::new_v4().to_string();
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
        let rows = sqlx::query(
            "UPDATE messages SET locked_until_ms = ?, lease_token = ?
             WHERE id IN (SELECT id FROM messages WHERE status = 'queued' AND due_ms <= ?
                          AND (locked_until_ms IS NULL OR locked_until_ms <= ?) ORDER BY due_ms LIMIT ?)
             RETURNING id",
        )
        .bind(now_ms + lease_ms)
        .bind(&token)
        .bind(now_ms)
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids = json_list(rows.iter().map(|r| r.get::<&str, _>(0)));
        let claimed = sqlx::query(
            "SELECT m.id, m.run_id, m.step_id, m.pc, m.workflow_id, r.workflow_version, m.channel, m.recipient,
                    m.header_message_id, m.attempts, e.body,
                    c.id, c.email, c.phone, c.first_name, c.last_name, c.timezone, c.custom_fields,
                    EXISTS (SELECT 1 FROM opt_outs o WHERE o.contact_id = m.contact_id AND o.channel = m.channel),
                    NOT EXISTS (SELECT 1 FROM messages p WHERE p.contact_id = m.contact_id AND p.channel = m.channel AND p.status = 'sent')
             FROM messages m JOIN runs r ON r.id = m.run_id JOIN events e ON e.seq = r.event_seq
             LEFT JOIN contacts c ON c.id = m.contact_id
             WHERE m.id IN (SELECT value FROM json_each(?))",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
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
                channel: super::read::channel(r.get(6))?,
                recipient: r.get(7),
                header_message_id: r.get(8),
                attempts: r.get(9),
                lease_token: token.clone(),
                event: parse_stored_event(r.get(10))?,
                contact: contact_at(&r, 11),
                opted_out: r.get(18),
                first_on_channel: r.get(19),
            })
        })
        .collect::<Result<Vec<_>>>()?;
        tx.commit().await?;
        Ok(claimed)
    }

    pub async fn extend_message_lease(&self, lease_token: String, until_ms: i64) -> Result<u64> {
        let mut conn = self.writer.lock().await;
        let n = sqlx::query(
            "UPDATE messages SET locked_until_ms = ? WHERE lease_token = ? AND status = 'queued'",
        )
        .bind(until_ms)
        .bind(&lease_token)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        Ok(n)
    }

    pub async fn complete_messages(
        &self,
        now_ms: i64,
        outcomes: Vec<MessageOutcome>,
    ) -> Result<()> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
        for o in &outcomes {
            let (status, reason, due, provider, sent) = outcome_columns(&o.result, now_ms);
            let updated = sqlx::query(
                "UPDATE messages SET status = ?, reason = ?, due_ms = ?, provider_id = COALESCE(?, provider_id),
                        sent_ms = COALESCE(?, sent_ms), subject = COALESCE(?, subject),
                        segments = COALESCE(?, segments),
                        attempts = attempts + ?,
                        updated_ms = ?, locked_until_ms = NULL, lease_token = NULL
                 WHERE id = ? AND lease_token = ?",
            )
            .bind(status.as_str())
            .bind(reason)
            .bind(due)
            .bind(provider)
            .bind(sent)
            .bind(&o.subject)
            .bind(o.segments)
            // Suppressed and skipped messages were never tried: no attempt.
            .bind(i64::from(!matches!(status, MessageStatus::Suppressed | MessageStatus::Skipped)))
            .bind(now_ms)
            .bind(&o.message_id)
            .bind(&o.lease_token)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 0 {
                tracing::warn!(message = %o.message_id, "message lease lost before delivery finished; outcome dropped");
                continue;
            }
            if let Some(m) = &o.mailbox {
                insert_mailbox(&mut tx, m).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn add_to_mailbox(&self, item: MailboxItem) -> Result<()> {
        let mut conn = self.writer.lock().await;
        insert_mailbox(&mut conn, &item).await
    }

    pub async fn save_workflow_versions(
        &self,
        versions: Vec<(String, String, String)>,
        now_ms: i64,
    ) -> Result<()> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
        for (id, version, bundle) in &versions {
            sqlx::query(
                "INSERT INTO workflow_versions (workflow_id, version, bundle, created_ms) VALUES (?, ?, ?, ?)
                 ON CONFLICT (workflow_id, version) DO NOTHING",
            )
            .bind(id)
            .bind(version)
            .bind(bundle)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_workflow_parked(
        &self,
        workflow_id: String,
        parked: bool,
        now_ms: i64,
    ) -> Result<u64> {
        let mut conn = self.writer.lock().await;
        // A parked run keeps its pc, due time and awaited event, so resuming continues exactly
        // where it stood.
        let sql = if parked {
            "UPDATE runs SET state = 'parked', updated_ms = ?
             WHERE workflow_id = ? AND state IN ('active', 'waiting_event')"
        } else {
            "UPDATE runs SET state = CASE WHEN wait_event IS NULL THEN 'active' ELSE 'waiting_event' END, updated_ms = ?
             WHERE workflow_id = ? AND state = 'parked'"
        };
        let n = sqlx::query(sql)
            .bind(now_ms)
            .bind(&workflow_id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        Ok(n)
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

/// Inserts events, skipping those whose (source, id) is already stored.
pub(crate) async fn insert_event_rows(
    conn: &mut SqliteConnection,
    events: &[&NewEvent],
) -> Result<Vec<Accepted>> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let ev = &e.event;
        let inserted = sqlx::query(
            "INSERT INTO events (source, id, type, contact_id, time_ms, received_ms, body)
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source, id) DO NOTHING",
        )
        .bind(&ev.source)
        .bind(&ev.id)
        .bind(ev.event_type.trigger_name())
        .bind(ev.contact_id())
        .bind(ev.time.timestamp_millis())
        .bind(e.received_ms)
        .bind(ev.to_json().to_string())
        .execute(&mut *conn)
        .await?
        .rows_affected();
        out.push(if inserted == 1 {
            Accepted::New
        } else {
            Accepted::Duplicate
        });
    }
    Ok(out)
}

/// Inserts a new run with its effects; a conflict on the one-live-run key means the contact is
/// already in a live run of this workflow, and then nothing is written.
async fn insert_run(conn: &mut SqliteConnection, w: &RunWrite, now_ms: i64) -> Result<()> {
    let ended = (!w.state.is_live()).then_some(now_ms);
    let inserted = sqlx::query(
        "INSERT INTO runs (id, workflow_id, workflow_version, contact_id, event_seq, state, reason, pc, wait_event,
                           due_ms, created_ms, updated_ms, ended_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(&w.run_id)
    .bind(&w.workflow_id)
    .bind(&w.workflow_version)
    .bind(&w.contact_id)
    .bind(w.event_seq)
    .bind(w.state.as_str())
    .bind(&w.reason)
    .bind(w.pc)
    .bind(&w.wait_event)
    .bind(w.due_ms)
    .bind(now_ms)
    .bind(now_ms)
    .bind(ended)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        insert_run_effects(conn, w, now_ms).await?;
    }
    Ok(())
}

async fn insert_run_effects(conn: &mut SqliteConnection, w: &RunWrite, now_ms: i64) -> Result<()> {
    for step in &w.steps {
        sqlx::query(
            "INSERT INTO run_steps (run_id, seq, step_id, kind, outcome, at_ms)
             SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ?, ? FROM run_steps WHERE run_id = ?",
        )
        .bind(&w.run_id)
        .bind(&step.step_id)
        .bind(&step.kind)
        .bind(&step.outcome)
        .bind(step.at_ms)
        .bind(&w.run_id)
        .execute(&mut *conn)
        .await?;
    }
    for m in &w.messages {
        sqlx::query(
            "INSERT INTO messages (id, run_id, step_id, pc, workflow_id, contact_id, channel, recipient,
                                   header_message_id, status, reason, due_ms, created_ms, updated_ms)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, step_id) DO NOTHING",
        )
        .bind(&m.id)
        .bind(&w.run_id)
        .bind(&m.step_id)
        .bind(m.pc)
        .bind(&w.workflow_id)
        .bind(&w.contact_id)
        .bind(m.channel.as_str())
        .bind(&m.recipient)
        .bind(&m.header_message_id)
        .bind(m.status.as_str())
        .bind(&m.reason)
        .bind(m.due_ms)
        .bind(now_ms)
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The membership projection of one event: contact details, grants and catalogue, each guarded
/// by event time so that a late, older event never overwrites a newer fact.
async fn project(conn: &mut SqliteConnection, event: &CourseEvent) -> Result<()> {
    let t = event.time.timestamp_millis();
    let contact = event.object("contact").expect("validated contact");
    let s = |k: &str| contact.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let custom = contact
        .get("custom_fields")
        .filter(|v| v.is_object())
        .map(|v| v.to_string());
    // An event that carries no details (herald's own user_login, say) must not make older
    // details look stale.
    let details_ms = if crate::carries_contact_details(contact) {
        t
    } else {
        i64::MIN
    };
    sqlx::query(
        "INSERT INTO contacts (id, email, phone, first_name, last_name, timezone, custom_fields, details_ms, last_event_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (id) DO UPDATE SET
           email = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.email, contacts.email) ELSE COALESCE(contacts.email, excluded.email) END,
           phone = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.phone, contacts.phone) ELSE COALESCE(contacts.phone, excluded.phone) END,
           first_name = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.first_name, contacts.first_name) ELSE COALESCE(contacts.first_name, excluded.first_name) END,
           last_name = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.last_name, contacts.last_name) ELSE COALESCE(contacts.last_name, excluded.last_name) END,
           timezone = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.timezone, contacts.timezone) ELSE COALESCE(contacts.timezone, excluded.timezone) END,
           custom_fields = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.custom_fields, contacts.custom_fields) ELSE COALESCE(contacts.custom_fields, excluded.custom_fields) END,
           details_ms = MAX(contacts.details_ms, excluded.details_ms),
           last_event_ms = MAX(contacts.last_event_ms, excluded.last_event_ms)",
    )
    .bind(event.contact_id())
    .bind(s("email"))
    .bind(s("phone"))
    .bind(s("first_name"))
    .bind(s("last_name"))
    .bind(s("timezone"))
    .bind(custom)
    .bind(details_ms)
    .bind(t)
    .execute(&mut *conn)
    .await?;

    let grant = match event.event_type {
        EventType::OfferAccessGranted => Some(("offer", "offer", true)),
        EventType::OfferAccessRemoved => Some(("offer", "offer", false)),
        EventType::ProductAccessGranted => Some(("product", "product", true)),
        EventType::ProductAccessRemoved => Some(("product", "product", false)),
        _ => None,
    };
    if let Some((kind, object, active)) = grant
        && let Some(item) = event
            .field(&format!("{object}.id"))
            .and_then(|v| v.as_str().map(str::to_owned))
    {
        sqlx::query(
            "INSERT INTO grants (contact_id, kind, item_id, active, changed_ms) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (contact_id, kind, item_id) DO UPDATE SET active = excluded.active, changed_ms = excluded.changed_ms
             WHERE excluded.changed_ms >= grants.changed_ms",
        )
        .bind(event.contact_id())
        .bind(kind)
        .bind(item)
        .bind(active)
        .bind(t)
        .execute(&mut *conn)
        .await?;
    }

    if let Some(p) = event.object("product") {
        let g = |k: &str| p.get(k).and_then(|v| v.as_str());
        sqlx::query(
            "INSERT INTO products (id, title, url, updated_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET
               title = CASE WHEN excluded.updated_ms >= products.updated_ms THEN COALESCE(excluded.title, products.title) ELSE COALESCE(products.title, excluded.title) END,
               url = CASE WHEN excluded.updated_ms >= products.updated_ms THEN COALESCE(excluded.url, products.url) ELSE COALESCE(products.url, excluded.url) END,
               updated_ms = MAX(products.updated_ms, excluded.updated_ms)",
        )
        .bind(g("id"))
        .bind(g("title"))
        .bind(g("url"))
        .bind(t)
        .execute(&mut *conn)
        .await?;
    }
    if let Some(o) = event.object("offer") {
        let offer_id = o.get("id").and_then(|v| v.as_str()).unwrap_or_default();
        let previous: Option<i64> =
            sqlx::query_scalar("SELECT updated_ms FROM offers WHERE id = ?")
                .bind(offer_id)
                .fetch_optional(&mut *conn)
                .await?;
        let newer = previous.is_none_or(|p| t >= p);
        sqlx::query(
            "INSERT INTO offers (id, title, updated_ms) VALUES (?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET
               title = CASE WHEN excluded.updated_ms >= offers.updated_ms THEN COALESCE(excluded.title, offers.title) ELSE COALESCE(offers.title, excluded.title) END,
               updated_ms = MAX(offers.updated_ms, excluded.updated_ms)",
        )
        .bind(offer_id)
        .bind(o.get("title").and_then(|v| v.as_str()))
        .bind(t)
        .execute(&mut *conn)
        .await?;
        if newer && let Some(ids) = o.get("product_ids").and_then(|v| v.as_array()) {
            sqlx::query("DELETE FROM offer_products WHERE offer_id = ?")
                .bind(offer_id)
                .execute(&mut *conn)
                .await?;
            for pid in ids.iter().filter_map(|v| v.as_str()) {
                sqlx::query("INSERT INTO offer_products (offer_id, product_id) VALUES (?, ?) ON CONFLICT DO NOTHING")
                    .bind(offer_id)
                    .bind(pid)
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("INSERT INTO products (id, updated_ms) VALUES (?, ?) ON CONFLICT (id) DO NOTHING")
                    .bind(pid)
                    .bind(t)
                    .execute(&mut *conn)
                    .await?;
            }
        }
    }
    Ok(())
}

/// Columns of a delivery outcome: status, reason, next due time, provider id, sent time.
pub(crate) fn outcome_columns(
    result: &DeliveryResult,
    now_ms: i64,
) -> (
    MessageStatus,
    Option<&str>,
    Option<i64>,
    Option<&str>,
    Option<i64>,
) {
    match result {
        DeliveryResult::Sent { provider_id } => (
            MessageStatus::Sent,
            None,
            None,
            provider_id.as_deref(),
            Some(now_ms),
        ),
        DeliveryResult::Retry { due_ms, reason } => (
            MessageStatus::Queued,
            Some(reason),
            Some(*due_ms),
            None,
            None,
        ),
        DeliveryResult::Failed { reason } => {
            (MessageStatus::Failed, Some(reason), None, None, None)
        }
        DeliveryResult::Skipped { reason } => {
            (MessageStatus::Skipped, Some(reason), None, None, None)
        }
        DeliveryResult::Suppressed { reason } => {
            (MessageStatus::Suppressed, Some(reason), None, None, None)
        }
    }
}

pub(crate) fn parse_stored_event(body: &str) -> Result<CourseEvent> {
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    // Stored events were validated on the way in; `time` is present, so the receipt time is unused.
    herald_core::event::parse_event(0, value, chrono_epoch())
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn chrono_epoch() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::UNIX_EPOCH
}

pub(crate) fn run_state(s: &str) -> Result<RunState> {
    RunState::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown run state {s:?}")))
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

/// The contact columns starting at `at` (id, email, phone, first, last, timezone, custom fields).
pub(crate) fn contact_at(r: &sqlx::sqlite::SqliteRow, at: usize) -> crate::ContactRow {
    crate::ContactRow {
        id: r.get::<Option<String>, _>(at).unwrap_or_default(),
        email: r.get(at + 1),
        phone: r.get(at + 2),
        first_name: r.get(at + 3),
        last_name: r.get(at + 4),
        timezone: r.get(at + 5),
        custom_fields: r.get(at + 6),
    }
}
