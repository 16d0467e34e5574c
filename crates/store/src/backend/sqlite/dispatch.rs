//! Dispatch on SQLite: the statements of `backend/dispatch.rs` and the membership projection,
//! whose multi-row upserts SQLite applies row after row.

use super::{json_list, json_rows};
use crate::{Result, projection};
use herald_core::CourseEvent;
use serde_json::json;
use sqlx::{Row, SqliteConnection};
use std::collections::HashSet;

pub(crate) const UNDISPATCHED: &str =
    "SELECT seq, body FROM events WHERE dispatched = 0 ORDER BY seq LIMIT $1";

pub(crate) const CONTACTS: &str = "SELECT id AS contact_id, email, phone, first_name, last_name, timezone, custom_fields, locale
 FROM contacts WHERE id IN (SELECT value FROM json_each($1))";

pub(crate) const LIVE_RUNS: &str = "SELECT id, workflow_id, workflow_version, contact_id, state, wait_event FROM runs
 WHERE contact_id IN (SELECT value FROM json_each($1)) AND state IN ('active', 'waiting_event', 'parked')";

pub(crate) const ENROLLMENT_COUNTS: &str = "SELECT contact_id, workflow_id,
        SUM(CASE WHEN state <> 'refused' THEN 1 ELSE 0 END) AS total,
        SUM(CASE WHEN state <> 'refused' AND created_ms >= $1 THEN 1 ELSE 0 END) AS recent,
        MAX(CASE WHEN state IN ('active', 'waiting_event', 'parked') THEN 1 ELSE 0 END) AS live
 FROM runs WHERE contact_id IN (SELECT value FROM json_each($2)) GROUP BY contact_id, workflow_id";

pub(crate) const SUPPRESSED: &str = "SELECT address_hash, source FROM suppressed_addresses
 WHERE address_hash IN (SELECT value FROM json_each($1))";

pub(crate) const END_LEARNER_LINKS: &str = "UPDATE magic_links SET revoked_ms = $1 WHERE kind = 'learner' AND revoked_ms IS NULL
   AND contact_id IN (SELECT value FROM json_each($2))
   AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = magic_links.contact_id AND g.kind = 'offer' AND g.active)";

pub(crate) const END_LEARNER_SESSIONS: &str = "UPDATE sessions SET ended_ms = $1 WHERE kind = 'learner' AND ended_ms IS NULL
   AND contact_id IN (SELECT value FROM json_each($2))
   AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = sessions.contact_id AND g.kind = 'offer' AND g.active)";

/// Rows (run id, reason); then now.
pub(crate) const EXIT_RUNS: &str = "UPDATE runs SET state = 'exited', reason = j.value ->> 1, due_ms = NULL, ended_ms = $2,
        updated_ms = $2, locked_until_ms = NULL, lease_token = NULL
 FROM json_each($1) AS j
 WHERE runs.id = j.value ->> 0 AND runs.state IN ('active', 'waiting_event', 'parked')";

/// Rows (run id, reason); then now.
pub(crate) const CANCEL_EXITED_MESSAGES: &str = "UPDATE messages SET status = 'cancelled', reason = 'run exited: ' || (j.value ->> 1), due_ms = NULL,
        updated_ms = $2, locked_until_ms = NULL, lease_token = NULL
 FROM json_each($1) AS j
 WHERE messages.run_id = j.value ->> 0 AND messages.status = 'queued'
   AND (messages.locked_until_ms IS NULL OR messages.locked_until_ms <= $2)";

/// Rows (run id, awaited event seq); then now.
pub(crate) const RESUME_RUNS: &str = "UPDATE runs SET state = 'active', wait_event = NULL, due_ms = $2, updated_ms = $2,
        awaited_seq = j.value ->> 1
 FROM json_each($1) AS j
 WHERE runs.id = j.value ->> 0 AND runs.state = 'waiting_event'";

pub(crate) const MARK_DISPATCHED: &str =
    "UPDATE events SET dispatched = 1 WHERE seq IN (SELECT value FROM json_each($1))";

/// The membership projection of a batch of events (see [`projection`]): one statement per
/// table. SQLite applies the rows of a multi-row upsert one after the other, in `key` order, so
/// the batch has exactly the effect of its events projected one by one.
pub(crate) async fn project(conn: &mut SqliteConnection, events: &[(i64, CourseEvent)]) -> Result<()> {
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
