//! Opt-outs, SQLite flavour.

use super::SqliteStore;
use crate::{Channel, OptOutRow, Result, StoreError};
use sqlx::Row;

impl SqliteStore {
    pub async fn set_opt_out(
        &self,
        contact_id: String,
        channel: Channel,
        opted_out: bool,
        source: String,
        now_ms: i64,
    ) -> Result<bool> {
        let mut conn = self.writer.lock().await;
        let changed = if opted_out {
            sqlx::query("INSERT INTO opt_outs (contact_id, channel, source, at_ms) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING")
                .bind(&contact_id)
                .bind(channel.as_str())
                .bind(&source)
                .bind(now_ms)
                .execute(&mut *conn)
                .await?
        } else {
            sqlx::query("DELETE FROM opt_outs WHERE contact_id = ? AND channel = ?")
                .bind(&contact_id)
                .bind(channel.as_str())
                .execute(&mut *conn)
                .await?
        };
        Ok(changed.rows_affected() > 0)
    }

    pub async fn suppress_email_address(
        &self,
        address: String,
        source: String,
        now_ms: i64,
    ) -> Result<Vec<String>> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, super::write::BEGIN).await?;
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT id FROM contacts WHERE lower(email) = lower(?) ORDER BY id")
                .bind(&address)
                .fetch_all(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO opt_outs (contact_id, channel, source, at_ms)
             SELECT value, 'email', ?2, ?3 FROM json_each(?1) WHERE true ON CONFLICT DO NOTHING",
        )
        .bind(serde_json::to_string(&ids).expect("strings serialize"))
        .bind(&source)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ids)
    }

    pub async fn opt_outs(&self, contact_id: String) -> Result<Vec<OptOutRow>> {
        let rows = sqlx::query(
            "SELECT channel, source, at_ms FROM opt_outs WHERE contact_id = ? ORDER BY channel",
        )
        .bind(&contact_id)
        .fetch_all(&self.readers)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(OptOutRow {
                    channel: Channel::parse(r.get(0))
                        .ok_or_else(|| StoreError::Corrupt("unknown channel".into()))?,
                    source: r.get(1),
                    at_ms: r.get(2),
                })
            })
            .collect()
    }

    pub async fn contacts_by_phone(&self, phone: String) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM contacts WHERE phone = ? ORDER BY id")
                .bind(&phone)
                .fetch_all(&self.readers)
                .await?,
        )
    }
}
