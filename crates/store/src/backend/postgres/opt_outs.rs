//! Opt-outs, PostgreSQL flavour.

use super::PgStore;
use crate::{Channel, OptOutRow, Result, StoreError};
use sqlx::Row;

impl PgStore {
    pub async fn set_opt_out(
        &self,
        contact_id: String,
        channel: Channel,
        opted_out: bool,
        source: String,
        now_ms: i64,
    ) -> Result<bool> {
        let changed = if opted_out {
            sqlx::query("INSERT INTO opt_outs (contact_id, channel, source, at_ms) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                .bind(&contact_id)
                .bind(channel.as_str())
                .bind(&source)
                .bind(now_ms)
                .execute(&self.pool)
                .await?
        } else {
            sqlx::query("DELETE FROM opt_outs WHERE contact_id = $1 AND channel = $2")
                .bind(&contact_id)
                .bind(channel.as_str())
                .execute(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM contacts WHERE lower(email) = lower($1) ORDER BY id",
        )
        .bind(&address)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO opt_outs (contact_id, channel, source, at_ms)
             SELECT id, 'email', $2, $3 FROM UNNEST($1::text[]) AS u(id) ON CONFLICT DO NOTHING",
        )
        .bind(&ids)
        .bind(&source)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ids)
    }

    pub async fn opt_outs(&self, contact_id: String) -> Result<Vec<OptOutRow>> {
        let rows = sqlx::query(
            "SELECT channel, source, at_ms FROM opt_outs WHERE contact_id = $1 ORDER BY channel",
        )
        .bind(&contact_id)
        .fetch_all(&self.pool)
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
            sqlx::query_scalar("SELECT id FROM contacts WHERE phone = $1 ORDER BY id")
                .bind(&phone)
                .fetch_all(&self.pool)
                .await?,
        )
    }
}
