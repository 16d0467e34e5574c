//! Setting aside what keeps failing (PostgreSQL): an event, run or message marked dead with its
//! last error, so the queue behind it goes on.

use super::{PgStore, retrying};
use crate::decode::{message_status, run_state};
use crate::{DeadEventRow, MessageStatus, Result, RunState};
use sqlx::Row;

impl PgStore {
    pub async fn set_aside_next_event(
        &self,
        error: String,
        now_ms: i64,
    ) -> Result<Option<(String, String)>> {
        retrying!("set aside an event", async {
            let mut tx = self.pool.begin().await?;
            // The dispatcher's lock: the event set aside is the one dispatch keeps failing on.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('herald.dispatch:' || COALESCE(current_schema(), ''), 0))")
                .execute(&mut *tx)
                .await?;
            let row = sqlx::query(
                "UPDATE events SET dispatched = TRUE, dead_error = $1, dead_ms = $2
                 WHERE seq = (SELECT seq FROM events WHERE NOT dispatched ORDER BY seq LIMIT 1)
                 RETURNING source, id",
            )
            .bind(&error)
            .bind(now_ms)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
    }

    pub async fn end_run(
        &self,
        run_id: String,
        state: RunState,
        reason: String,
        now_ms: i64,
    ) -> Result<Option<RunState>> {
        retrying!("end a run", async {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "UPDATE runs SET state = $1, reason = $2, due_ms = NULL, ended_ms = $3, updated_ms = $3,
                        locked_until_ms = NULL, lease_token = NULL
                 WHERE id = $4 AND state IN ('active', 'waiting_event', 'parked')",
            )
            .bind(state.as_str())
            .bind(&reason)
            .bind(now_ms)
            .bind(&run_id)
            .execute(&mut *tx)
            .await?;
            let after: Option<String> = sqlx::query_scalar("SELECT state FROM runs WHERE id = $1")
                .bind(&run_id)
                .fetch_optional(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE messages SET status = 'cancelled', reason = $3, due_ms = NULL,
                        updated_ms = $1, locked_until_ms = NULL, lease_token = NULL
                 WHERE run_id = $2 AND status = 'queued'
                   AND (locked_until_ms IS NULL OR locked_until_ms <= $1)",
            )
            .bind(now_ms)
            .bind(&run_id)
            .bind(format!("run {}", state.as_str()))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            after.map(|s| run_state(&s)).transpose()
        })
    }

    pub async fn retry_message(
        &self,
        message_id: String,
        now_ms: i64,
    ) -> Result<Option<MessageStatus>> {
        retrying!("retry a message", async {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "UPDATE messages SET status = 'queued', attempts = 0, reason = NULL, due_ms = $1,
                        updated_ms = $1, locked_until_ms = NULL, lease_token = NULL
                 WHERE id = $2 AND status IN ('failed', 'dead')",
            )
            .bind(now_ms)
            .bind(&message_id)
            .execute(&mut *tx)
            .await?;
            let after: Option<String> =
                sqlx::query_scalar("SELECT status FROM messages WHERE id = $1")
                    .bind(&message_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.commit().await?;
            after.map(|s| message_status(&s)).transpose()
        })
    }

    pub async fn set_message_dead(
        &self,
        message_id: String,
        error: String,
        now_ms: i64,
    ) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE messages SET status = 'dead', reason = $1, due_ms = NULL, updated_ms = $2,
                    locked_until_ms = NULL, lease_token = NULL
             WHERE id = $3 AND status = 'queued'",
        )
        .bind(&error)
        .bind(now_ms)
        .bind(&message_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    pub async fn dead_events(&self, after_seq: i64, limit: i64) -> Result<Vec<DeadEventRow>> {
        // Events store the trigger name; the row carries the type as posted.
        Ok(sqlx::query_as(
            "SELECT seq, source, id, CASE WHEN type = 'enrollment' THEN 'herald.enrollment' ELSE 'course.' || type END AS event_type, contact_id, dead_error AS error,
                    received_ms, dead_ms
             FROM events WHERE dead_error IS NOT NULL AND seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}
