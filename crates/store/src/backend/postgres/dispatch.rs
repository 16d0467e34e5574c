//! Dispatch on PostgreSQL: the statements of `backend/dispatch.rs` and the membership
//! projection, whose multi-row upserts go in rounds (PostgreSQL refuses to touch a row twice in
//! one statement).

use crate::backend::distinct;
use crate::{Result, projection};
use herald_core::CourseEvent;
use sqlx::{PgConnection, Row};
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// `FOR UPDATE SKIP LOCKED`: no event is dispatched twice even without the dispatch lock.
pub(crate) const UNDISPATCHED: &str =
    "SELECT seq, body FROM events WHERE NOT dispatched ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED";

pub(crate) const CONTACTS: &str = "SELECT id AS contact_id, email, phone, first_name, last_name, timezone, custom_fields, locale
 FROM contacts WHERE id = ANY($1)";

pub(crate) const LIVE_RUNS: &str = "SELECT id, workflow_id, workflow_version, contact_id, state, wait_event FROM runs
 WHERE contact_id = ANY($1) AND state IN ('active', 'waiting_event', 'parked')";

pub(crate) const ENROLLMENT_COUNTS: &str = "SELECT contact_id, workflow_id,
        COUNT(*) FILTER (WHERE state <> 'refused') AS total,
        COUNT(*) FILTER (WHERE state <> 'refused' AND created_ms >= $1) AS recent,
        BOOL_OR(state IN ('active', 'waiting_event', 'parked')) AS live
 FROM runs WHERE contact_id = ANY($2) GROUP BY contact_id, workflow_id";

pub(crate) const SUPPRESSED: &str =
    "SELECT address_hash, source FROM suppressed_addresses WHERE address_hash = ANY($1)";

pub(crate) const END_LEARNER_LINKS: &str = "UPDATE magic_links SET revoked_ms = $1 WHERE kind = 'learner' AND revoked_ms IS NULL
   AND contact_id = ANY($2)
   AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = magic_links.contact_id AND g.kind = 'offer' AND g.active)";

pub(crate) const END_LEARNER_SESSIONS: &str = "UPDATE sessions SET ended_ms = $1 WHERE kind = 'learner' AND ended_ms IS NULL
   AND contact_id = ANY($2)
   AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = sessions.contact_id AND g.kind = 'offer' AND g.active)";

/// Rows (run id, reason); then now.
pub(crate) const EXIT_RUNS: &str = "UPDATE runs SET state = 'exited', reason = u.reason, due_ms = NULL, ended_ms = $3, updated_ms = $3,
        locked_until_ms = NULL, lease_token = NULL
 FROM UNNEST($1::text[], $2::text[]) AS u(id, reason)
 WHERE runs.id = u.id AND runs.state IN ('active', 'waiting_event', 'parked')";

/// Rows (run id, reason); then now.
pub(crate) const CANCEL_EXITED_MESSAGES: &str = "UPDATE messages SET status = 'cancelled', reason = 'run exited: ' || u.reason, due_ms = NULL,
        updated_ms = $3, locked_until_ms = NULL, lease_token = NULL
 FROM UNNEST($1::text[], $2::text[]) AS u(id, reason)
 WHERE messages.run_id = u.id AND messages.status = 'queued'
   AND (messages.locked_until_ms IS NULL OR messages.locked_until_ms <= $3)";

/// Rows (run id, awaited event seq); then now.
pub(crate) const RESUME_RUNS: &str = "UPDATE runs SET state = 'active', wait_event = NULL, due_ms = $3, updated_ms = $3, awaited_seq = u.seq
 FROM UNNEST($1::text[], $2::int8[]) AS u(id, seq)
 WHERE runs.id = u.id AND runs.state = 'waiting_event'";

pub(crate) const MARK_DISPATCHED: &str = "UPDATE events SET dispatched = TRUE WHERE seq = ANY($1)";

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

/// The membership projection of a batch of events (see [`projection`]), in a few statements per
/// batch: each table's writes depend only on earlier writes to the same table, so the tables are
/// written one after the other, each in [`rounds`] that keep the order of the writes to one row.
pub(crate) async fn project(conn: &mut PgConnection, events: &[(i64, CourseEvent)]) -> Result<()> {
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
