//! Setting aside what keeps failing (SQLite): an event, run or message marked dead with its
//! last error, so the queue behind it goes on.

use super::SqliteStore;
use crate::decode::{message_status, run_state};
use crate::{DeadEventRow, MessageStatus, Result, RunState};
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

    pub async fn end_run(
        &self,
        run_id: String,
        state: RunState,
        reason: String,
        now_ms: i64,
    ) -> Result<Option<RunState>> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, super::write::BEGIN).await?;
        sqlx::query(
            "UPDATE runs SET state = ?, reason = ?, due_ms = NULL, ended_ms = ?, updated_ms = ?,
                    locked_until_ms = NULL, lease_token = NULL
             WHERE id = ? AND state IN ('active', 'waiting_event', 'parked')",
        )
        .bind(state.as_str())
        .bind(&reason)
        .bind(now_ms)
        .bind(now_ms)
        .bind(&run_id)
        .execute(&mut *tx)
        .await?;
        let after: Option<String> = sqlx::query_scalar("SELECT state FROM runs WHERE id = ?")
            .bind(&run_id)
            .fetch_optional(&mut *tx)
            .await?;
        let reason = format!("run {}", state.as_str());
        super::write::cancel_queued_messages(&mut tx, &[run_id.as_str()], &reason, now_ms).await?;
        tx.commit().await?;
        after.map(|s| run_state(&s)).transpose()
    }

    pub async fn retry_message(
        &self,
        message_id: String,
        now_ms: i64,
    ) -> Result<Option<MessageStatus>> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, super::write::BEGIN).await?;
        sqlx::query(
            "UPDATE messages SET status = 'queued', attempts = 0, reason = NULL, due_ms = ?1,
                    updated_ms = ?1, locked_until_ms = NULL, lease_token = NULL
             WHERE id = ?2 AND status IN ('failed', 'dead')",
        )
        .bind(now_ms)
        .bind(&message_id)
        .execute(&mut *tx)
        .await?;
        let after: Option<String> = sqlx::query_scalar("SELECT status FROM messages WHERE id = ?")
            .bind(&message_id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        after.map(|s| message_status(&s)).transpose()
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
            "SELECT seq, source, id, CASE WHEN type = 'enrollment' THEN 'herald.enrollment' ELSE 'course.' || type END AS event_type, contact_id, dead_error AS error,
                    received_ms, dead_ms
             FROM events WHERE dead_error IS NOT NULL AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?)
    }
}
