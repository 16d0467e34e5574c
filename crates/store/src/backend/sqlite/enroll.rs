//! What enrollments read on SQLite: audiences, the enrollment state of named contacts, and stored
//! course events to replay.

use super::{SqliteStore, json_list};
use crate::decode::{self, parse_stored_event};
use crate::{AudienceQuery, EnrollmentCounts, Result};
use herald_core::CourseEvent;
use herald_core::workflow::ContactState;
use sqlx::{Row, Sqlite};
use std::collections::HashMap;

/// What each of `contact_ids` holds and has completed (see [`decode::contact_states`]); run on
/// the writer inside a dispatch, on a reader otherwise.
pub(super) async fn contact_states<'e>(
    executor: impl sqlx::Executor<'e, Database = Sqlite>,
    contact_ids: &[String],
) -> Result<HashMap<String, ContactState>> {
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "WITH asked(id) AS (SELECT value FROM json_each(?1))
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
    )
    .bind(json_list(contact_ids.iter().map(String::as_str)))
    .fetch_all(executor)
    .await?;
    Ok(decode::contact_states(contact_ids, rows))
}

impl SqliteStore {
    pub async fn contact_states(
        &self,
        contact_ids: Vec<String>,
    ) -> Result<HashMap<String, ContactState>> {
        contact_states(&self.readers, &contact_ids).await
    }

    pub async fn audience(&self, query: AudienceQuery) -> Result<Vec<String>> {
        let everyone = query.offers.is_empty() && query.products.is_empty();
        Ok(sqlx::query_scalar(
            "SELECT c.id FROM contacts c
             WHERE (?1 OR EXISTS (
                     SELECT 1 FROM grants g WHERE g.contact_id = c.id AND g.active = 1 AND (
                       (g.kind = 'offer' AND g.item_id IN (SELECT value FROM json_each(?2)))
                       OR (g.kind = 'product' AND g.item_id IN (SELECT value FROM json_each(?3)))
                       OR (g.kind = 'offer' AND EXISTS (
                             SELECT 1 FROM offer_products op WHERE op.offer_id = g.item_id
                               AND op.product_id IN (SELECT value FROM json_each(?3)))))))
               AND (?4 IS NULL OR c.last_event_ms < ?4)
             ORDER BY c.id",
        )
        .bind(everyone)
        .bind(json_list(query.offers.iter().map(String::as_str)))
        .bind(json_list(query.products.iter().map(String::as_str)))
        .bind(query.inactive_before_ms)
        .fetch_all(&self.readers)
        .await?)
    }

    pub async fn enrollment_counts(
        &self,
        workflow_id: String,
        contact_ids: Vec<String>,
        window_start_ms: i64,
    ) -> Result<Vec<(String, EnrollmentCounts)>> {
        let rows = sqlx::query(
            "SELECT c.id,
                    COUNT(r.id) FILTER (WHERE r.state <> 'refused'),
                    COUNT(r.id) FILTER (WHERE r.state <> 'refused' AND r.created_ms >= ?3),
                    COUNT(r.id) FILTER (WHERE r.state IN ('active', 'waiting_event', 'parked'))
             FROM contacts c LEFT JOIN runs r ON r.contact_id = c.id AND r.workflow_id = ?1
             WHERE c.id IN (SELECT value FROM json_each(?2))
             GROUP BY c.id",
        )
        .bind(&workflow_id)
        .bind(json_list(contact_ids.iter().map(String::as_str)))
        .bind(window_start_ms)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let counts = EnrollmentCounts {
                    total: r.get(1),
                    recent: r.get(2),
                    live: r.get::<i64, _>(3) > 0,
                };
                (r.get(0), counts)
            })
            .collect())
    }

    pub async fn course_events_since(
        &self,
        since_ms: i64,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<(i64, CourseEvent)>> {
        let rows = sqlx::query(
            "SELECT seq, body FROM events
             WHERE seq > ? AND received_ms >= ? AND type <> 'enrollment' AND dead_error IS NULL
             ORDER BY seq LIMIT ?",
        )
        .bind(after_seq)
        .bind(since_ms)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|r| Ok((r.get(0), parse_stored_event(r.get(1))?)))
            .collect()
    }

    pub async fn runs_started_by_events(
        &self,
        contact_ids: Vec<String>,
    ) -> Result<Vec<(i64, String)>> {
        Ok(sqlx::query_as(
            "SELECT event_seq, workflow_id FROM runs WHERE contact_id IN (SELECT value FROM json_each(?))",
        )
        .bind(json_list(contact_ids.iter().map(String::as_str)))
        .fetch_all(&self.readers)
        .await?)
    }

    pub async fn stored_event_ids(&self, source: String, ids: Vec<String>) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM events WHERE source = ? AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(&source)
        .bind(json_list(ids.iter().map(String::as_str)))
        .fetch_all(&self.readers)
        .await?)
    }
}
