//! Opt-outs, PostgreSQL flavour.

use super::PgStore;
use crate::erasure::{AddressKey, Erased};
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

    pub async fn suppress_email_addresses(
        &self,
        addresses: Vec<(String, String)>,
        key: Option<&AddressKey>,
        now_ms: i64,
    ) -> Result<Vec<String>> {
        let mut tx = self.pool.begin().await?;
        let mut opted_out = Vec::new();
        for (address, source) in &addresses {
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT id FROM contacts WHERE lower(email) = lower($1) ORDER BY id",
            )
            .bind(address)
            .fetch_all(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO opt_outs (contact_id, channel, source, at_ms)
                 SELECT id, 'email', $2, $3 FROM UNNEST($1::text[]) AS u(id) ON CONFLICT DO NOTHING",
            )
            .bind(&ids)
            .bind(source)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            if let Some(key) = key {
                sqlx::query("INSERT INTO suppressed_addresses (address_hash, channel, source, at_ms) VALUES ($1, 'email', $2, $3) ON CONFLICT DO NOTHING")
                    .bind(key.hash(Channel::Email, address))
                    .bind(source)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            opted_out.extend(ids);
        }
        tx.commit().await?;
        Ok(opted_out)
    }

    pub async fn suppression_list(&self) -> Result<Vec<crate::SuppressionRow>> {
        Ok(sqlx::query_as(
            "SELECT o.contact_id, c.email, c.phone, o.channel, o.source, o.at_ms
             FROM opt_outs o LEFT JOIN contacts c ON c.id = o.contact_id
             ORDER BY o.at_ms, o.contact_id, o.channel",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn erase_contact(
        &self,
        contact_id: String,
        key: &AddressKey,
        now_ms: i64,
    ) -> Result<Option<Erased>> {
        let mut tx = self.pool.begin().await?;
        let Some((email, phone)): Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT email, phone FROM contacts WHERE id = $1")
                .bind(&contact_id)
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(None);
        };
        let mut erased = Erased::default();
        let opted_out: Vec<(String, String)> =
            sqlx::query_as("SELECT channel, source FROM opt_outs WHERE contact_id = $1")
                .bind(&contact_id)
                .fetch_all(&mut *tx)
                .await?;
        for (channel, source) in opted_out {
            let channel = crate::decode::channel(&channel)?;
            let address = match channel {
                Channel::Email => email.as_deref(),
                Channel::Sms => phone.as_deref(),
            };
            if let Some(address) = address.filter(|a| !a.trim().is_empty()) {
                erased.suppressed_addresses += sqlx::query("INSERT INTO suppressed_addresses (address_hash, channel, source, at_ms) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                    .bind(key.hash(channel, address))
                    .bind(channel.as_str())
                    .bind(&source)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
        }
        // Children first: steps before their runs.
        let counted = [
            "DELETE FROM run_steps WHERE run_id IN (SELECT id FROM runs WHERE contact_id = $1)",
            "DELETE FROM messages WHERE contact_id = $1",
            "DELETE FROM runs WHERE contact_id = $1",
            "DELETE FROM events WHERE contact_id = $1",
            "DELETE FROM magic_links WHERE contact_id = $1",
            "DELETE FROM sessions WHERE contact_id = $1",
            "DELETE FROM link_audit WHERE contact_id = $1",
            "DELETE FROM opt_outs WHERE contact_id = $1",
            "DELETE FROM grants WHERE contact_id = $1",
            "DELETE FROM contacts WHERE id = $1",
        ];
        let mut removed = Vec::with_capacity(counted.len());
        for sql in counted {
            removed.push(
                sqlx::query(sql)
                    .bind(&contact_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected(),
            );
        }
        (erased.messages, erased.runs, erased.events) = (removed[1], removed[2], removed[3]);
        sqlx::query("DELETE FROM mailbox WHERE recipient = $1 OR recipient = $2")
            .bind(email.as_deref().unwrap_or_default())
            .bind(phone.as_deref().unwrap_or_default())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(erased))
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
