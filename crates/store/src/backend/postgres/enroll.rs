//! What enrollments read on PostgreSQL: audiences, the enrollment state of named contacts, and stored
//! course events to replay.

use super::PgStore;
use crate::decode::{self, parse_stored_event};
use crate::{AudienceQuery, EnrollmentCounts, Result};
use herald_core::CourseEvent;
use herald_core::workflow::ContactState;
use sqlx::{Postgres, Row};
use std::collections::HashMap;

/// What each of `contact_ids` holds and has completed (see [`decode::contact_states`]); run in
/// the dispatch transaction, or on the pool.
pub(super) async fn contact_states<'e>(
    executor: impl sqlx::Executor<'e, Database = Postgres>,
    contact_ids: &[String],
) -> Result<HashMap<String, ContactState>> {
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT g.contact_id, g.kind, g.item_id FROM grants g
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
    )
    .bind(contact_ids)
    .fetch_all(executor)
    .await?;
    Ok(decode::contact_states(contact_ids, rows))
}

impl PgStore {
    pub async fn contact_states(
        &self,
        contact_ids: Vec<String>,
    ) -> Result<HashMap<String, ContactState>> {
        contact_states(&self.pool, &contact_ids).await
    }

    pub async fn audience(&self, query: AudienceQuery) -> Result<Vec<String>> {
        let everyone = query.offers.is_empty() && query.products.is_empty();
        Ok(sqlx::query_scalar(
            "SELECT c.id FROM contacts c
             WHERE ($1 OR EXISTS (
                     SELECT 1 FROM grants g WHERE g.contact_id = c.id AND g.active AND (
                       (g.kind = 'offer' AND g.item_id = ANY($2))
                       OR (g.kind = 'product' AND g.item_id = ANY($3))
                       OR (g.kind = 'offer' AND EXISTS (
                             SELECT 1 FROM offer_products op WHERE op.offer_id = g.item_id
                               AND op.product_id = ANY($3))))))
               AND ($4::bigint IS NULL OR c.last_event_ms < $4)
             ORDER BY c.id",
        )
        .bind(everyone)
        .bind(&query.offers)
        .bind(&query.products)
        .bind(query.inactive_before_ms)
        .fetch_all(&self.pool)
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
                    COUNT(r.id) FILTER (WHERE r.state <> 'refused' AND r.created_ms >= $3),
                    COUNT(r.id) FILTER (WHERE r.state IN ('active', 'waiting_event', 'parked'))
             FROM contacts c LEFT JOIN runs r ON r.contact_id = c.id AND r.workflow_id = $1
             WHERE c.id = ANY($2)
             GROUP BY c.id",
        )
        .bind(&workflow_id)
        .bind(&contact_ids)
        .bind(window_start_ms)
        .fetch_all(&self.pool)
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
             WHERE seq > $1 AND received_ms >= $2 AND type <> 'enrollment' AND dead_error IS NULL
             ORDER BY seq LIMIT $3",
        )
        .bind(after_seq)
        .bind(since_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.get(0), parse_stored_event(r.get(1))?)))
            .collect()
    }

    pub async fn runs_started_by_events(
        &self,
        contact_ids: Vec<String>,
    ) -> Result<Vec<(i64, String)>> {
        Ok(
            sqlx::query_as("SELECT event_seq, workflow_id FROM runs WHERE contact_id = ANY($1)")
                .bind(&contact_ids)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn stored_event_ids(&self, source: String, ids: Vec<String>) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM events WHERE source = $1 AND id = ANY($2)")
                .bind(&source)
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?,
        )
    }
}
