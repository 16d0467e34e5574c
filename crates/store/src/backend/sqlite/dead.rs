//! Setting aside what keeps failing (SQLite): an event, run or message marked dead with its
//! last error, so the queue behind it goes on.

use super::SqliteStore;
use crate::{DeadEventRow, Result};
use sqlx::Row;

impl SqliteStore {
    pub async fn set_aside_next_event(
        &self,
        error: String,
        now_ms: i64,
    ) -> Result<Option<(String, String)>> {
        let mut conn = self.writer.lock().await;
        let row = sqlx::query(
            "UPDATE events SET dispatched = 1, dead_error = ?, dead_ms = ?
             WHERE seq = (SELECT MIN(seq) FROM events WHERE dispatched = 0)
             RETURNING source, id",
        )
        .bind(&error)
        .bind(now_ms)
        .fetch_optional(&mut *conn)
        .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    pub async fn set_run_dead(&self, run_id: String, error: String, now_ms: i64) -> Result<bool> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, super::write::BEGIN).await?;
        let n = sqlx::query(
            "UPDATE runs SET state = 'dead', reason = ?, due_ms = NULL, ended_ms = ?, updated_ms = ?,
                    locked_until_ms = NULL, lease_token = NULL
             WHERE id = ? AND state IN ('active', 'waiting_event', 'parked')",
        )
        .bind(&error)
        .bind(now_ms)
        .bind(now_ms)
        .bind(&run_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        super::write::cancel_queued_messages(&mut tx, &[run_id.as_str()], "run is dead", now_ms)
            .await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    pub async fn set_message_dead(
        &self,
        message_id: String,
        error: String,
        now_ms: i64,
    ) -> Result<bool> {
        let mut conn = self.writer.lock().await;
        let n = sqlx::query(
            "UPDATE messages SET status = 'dead', reason = ?, due_ms = NULL, updated_ms = ?,
                    locked_until_ms = NULL, lease_token = NULL
             WHERE id = ? AND status = 'queued'",
        )
        .bind(&error)
        .bind(now_ms)
        .bind(&message_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    pub async fn dead_events(&self, after_seq: i64, limit: i64) -> Result<Vec<DeadEventRow>> {
        // Events store the trigger name; the row carries the type as posted.
        Ok(sqlx::query_as(
            "SELECT seq, source, id, 'course.' || type AS event_type, contact_id, dead_error AS error,
                    received_ms, dead_ms
             FROM events WHERE dead_error IS NOT NULL AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?)
    }
}
