//! What enrollments read, written once for both backends: audiences, the enrollment state and
//! the held and completed state of named contacts, and stored course events to replay.

use super::Backend;
use super::sql::{On, Param, SqliteSide, Statement, limit_param, text, text_list};
use crate::backend::sqlite::FromSqliteRow;
use crate::decode::{self, parse_stored_event};
use crate::{AudienceQuery, ContactId, EnrollmentCounts, Result, Timestamp, WorkflowId};
use herald_core::CourseEvent;
use herald_core::workflow::ContactState;
use sqlx::{Executor, Postgres};
use std::collections::HashMap;

/// `(contact_id, fact, id)`: what each asked contact holds (fact `offer` or `product`) and the
/// completions it posted (fact: the completion's trigger).
const CONTACT_STATES: Statement = Statement {
    sqlite: "WITH asked(id) AS (SELECT value FROM json_each($1))
             SELECT g.contact_id, g.kind, g.item_id FROM grants g
              WHERE g.contact_id IN asked AND g.active = 1
             UNION
             SELECT g.contact_id, 'product', op.product_id
               FROM grants g JOIN offer_products op ON op.offer_id = g.item_id
              WHERE g.contact_id IN asked AND g.kind = 'offer' AND g.active = 1
             UNION
             SELECT e.contact_id, e.type,
                    CASE e.type WHEN 'lesson_completed' THEN e.body ->> '$.data.lesson.id'
                                WHEN 'product_completed' THEN e.body ->> '$.data.product.id'
                                ELSE e.body ->> '$.data.category.id' END
               FROM events e
              WHERE e.contact_id IN asked
                AND e.type IN ('lesson_completed', 'product_completed', 'category_completed')",
    postgres: "SELECT g.contact_id, g.kind, g.item_id FROM grants g
                WHERE g.contact_id = ANY($1) AND g.active
               UNION
               SELECT g.contact_id, 'product', op.product_id
                 FROM grants g JOIN offer_products op ON op.offer_id = g.item_id
                WHERE g.contact_id = ANY($1) AND g.kind = 'offer' AND g.active
               UNION
               SELECT e.contact_id, e.type,
                      CASE e.type WHEN 'lesson_completed' THEN e.body::jsonb #>> '{data,lesson,id}'
                                  WHEN 'product_completed' THEN e.body::jsonb #>> '{data,product,id}'
                                  ELSE e.body::jsonb #>> '{data,category,id}' END
                 FROM events e
                WHERE e.contact_id = ANY($1)
                  AND e.type IN ('lesson_completed', 'product_completed', 'category_completed')",
};

const AUDIENCE: Statement = Statement {
    sqlite: "SELECT c.id FROM contacts c
             WHERE ($1 OR EXISTS (
                     SELECT 1 FROM grants g WHERE g.contact_id = c.id AND g.active = 1 AND (
                       (g.kind = 'offer' AND g.item_id IN (SELECT value FROM json_each($2)))
                       OR (g.kind = 'product' AND g.item_id IN (SELECT value FROM json_each($3)))
                       OR (g.kind = 'offer' AND EXISTS (
                             SELECT 1 FROM offer_products op WHERE op.offer_id = g.item_id
                               AND op.product_id IN (SELECT value FROM json_each($3)))))))
               AND ($4 IS NULL OR c.last_event_ms < $4)
             ORDER BY c.id",
    postgres: "SELECT c.id FROM contacts c
               WHERE ($1 OR EXISTS (
                       SELECT 1 FROM grants g WHERE g.contact_id = c.id AND g.active AND (
                         (g.kind = 'offer' AND g.item_id = ANY($2))
                         OR (g.kind = 'product' AND g.item_id = ANY($3))
                         OR (g.kind = 'offer' AND EXISTS (
                               SELECT 1 FROM offer_products op WHERE op.offer_id = g.item_id
                                 AND op.product_id = ANY($3))))))
                 AND ($4::bigint IS NULL OR c.last_event_ms < $4)
               ORDER BY c.id",
};

const ENROLLMENT_COUNTS: Statement = Statement {
    sqlite: "SELECT c.id AS contact_id,
                    COUNT(r.id) FILTER (WHERE r.state <> 'refused') AS total,
                    COUNT(r.id) FILTER (WHERE r.state <> 'refused' AND r.created_ms >= $3) AS recent,
                    COUNT(r.id) FILTER (WHERE r.state IN ('active', 'waiting_event', 'parked')) AS live
             FROM contacts c LEFT JOIN runs r ON r.contact_id = c.id AND r.workflow_id = $1
             WHERE c.id IN (SELECT value FROM json_each($2))
             GROUP BY c.id",
    postgres: "SELECT c.id AS contact_id,
                      COUNT(r.id) FILTER (WHERE r.state <> 'refused') AS total,
                      COUNT(r.id) FILTER (WHERE r.state <> 'refused' AND r.created_ms >= $3) AS recent,
                      COUNT(r.id) FILTER (WHERE r.state IN ('active', 'waiting_event', 'parked')) AS live
               FROM contacts c LEFT JOIN runs r ON r.contact_id = c.id AND r.workflow_id = $1
               WHERE c.id = ANY($2)
               GROUP BY c.id",
};

const COURSE_EVENTS_SINCE: Statement = Statement::portable(
    "SELECT seq, body FROM events
     WHERE seq > $1 AND received_ms >= $2 AND type <> 'enrollment' AND dead_error IS NULL
     ORDER BY seq LIMIT $3",
);

const RUNS_STARTED_BY_EVENTS: Statement = Statement {
    sqlite: "SELECT event_seq, workflow_id FROM runs
             WHERE contact_id IN (SELECT value FROM json_each($1))",
    postgres: "SELECT event_seq, workflow_id FROM runs WHERE contact_id = ANY($1)",
};

const STORED_EVENT_IDS: Statement = Statement {
    sqlite: "SELECT id FROM events WHERE source = $1 AND id IN (SELECT value FROM json_each($2))",
    postgres: "SELECT id FROM events WHERE source = $1 AND id = ANY($2)",
};

/// What each of `contact_ids` holds and has completed (see [`decode::contact_states`]): on a
/// reader, or inside a dispatch's transaction.
pub(crate) async fn contact_states_on<'e, S, P>(
    on: On<S, P>,
    contact_ids: &[ContactId],
) -> Result<HashMap<ContactId, ContactState>>
where
    S: SqliteSide,
    P: Executor<'e, Database = Postgres>,
{
    let rows: Vec<(String, String, Option<String>)> = on
        .fetch_all(CONTACT_STATES, &[text_list(contact_ids)])
        .await?;
    Ok(decode::contact_states(contact_ids, rows))
}

pub(crate) async fn contact_states(
    backend: &Backend,
    contact_ids: Vec<ContactId>,
) -> Result<HashMap<ContactId, ContactState>> {
    contact_states_on(backend.reader(), &contact_ids).await
}

pub(crate) async fn audience(backend: &Backend, query: AudienceQuery) -> Result<Vec<ContactId>> {
    let everyone = query.offers.is_empty() && query.products.is_empty();
    let params = [
        Param::Bool(everyone),
        text_list(&query.offers),
        text_list(&query.products),
        Param::from(query.inactive_before),
    ];
    backend.reader().fetch_scalars(AUDIENCE, &params).await
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct CountsRow {
    contact_id: ContactId,
    total: i64,
    recent: i64,
    live: i64,
}

pub(crate) async fn enrollment_counts(
    backend: &Backend,
    workflow_id: WorkflowId,
    contact_ids: Vec<ContactId>,
    window_start: Timestamp,
) -> Result<Vec<(ContactId, EnrollmentCounts)>> {
    let params = [
        text(&workflow_id),
        text_list(&contact_ids),
        Param::from(window_start),
    ];
    let rows: Vec<CountsRow> = backend
        .reader()
        .fetch_all(ENROLLMENT_COUNTS, &params)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let counts = EnrollmentCounts {
                total: r.total,
                recent: r.recent,
                live: r.live > 0,
            };
            (r.contact_id, counts)
        })
        .collect())
}

pub(crate) async fn course_events_since(
    backend: &Backend,
    since: Timestamp,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<(i64, CourseEvent)>> {
    let params = [
        Param::Int(after_seq),
        Param::from(since),
        limit_param(limit),
    ];
    let rows: Vec<(i64, String)> = backend
        .reader()
        .fetch_all(COURSE_EVENTS_SINCE, &params)
        .await?;
    rows.into_iter()
        .map(|(seq, body)| Ok((seq, parse_stored_event(&body)?)))
        .collect()
}

pub(crate) async fn runs_started_by_events(
    backend: &Backend,
    contact_ids: Vec<ContactId>,
) -> Result<Vec<(i64, WorkflowId)>> {
    backend
        .reader()
        .fetch_all(RUNS_STARTED_BY_EVENTS, &[text_list(&contact_ids)])
        .await
}

pub(crate) async fn stored_event_ids(
    backend: &Backend,
    source: String,
    ids: Vec<String>,
) -> Result<Vec<String>> {
    let params = [text(&source), text_list(&ids)];
    backend
        .reader()
        .fetch_scalars(STORED_EVENT_IDS, &params)
        .await
}
