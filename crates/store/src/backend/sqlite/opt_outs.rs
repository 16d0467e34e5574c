//! Opt-outs, SQLite flavour.

use super::SqliteStore;
use crate::erasure::{AddressKey, Erased};
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

    pub async fn suppress_email_addresses(
        &self,
        addresses: Vec<(String, String)>,
        key: Option<&AddressKey>,
        now_ms: i64,
    ) -> Result<Vec<String>> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, super::write::BEGIN).await?;
        let mut opted_out = Vec::new();
        for (address, source) in &addresses {
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT id FROM contacts WHERE lower(email) = lower(?) ORDER BY id",
            )
            .bind(address)
            .fetch_all(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO opt_outs (contact_id, channel, source, at_ms)
                 SELECT value, 'email', ?2, ?3 FROM json_each(?1) WHERE true ON CONFLICT DO NOTHING",
            )
            .bind(serde_json::to_string(&ids).expect("strings serialize"))
            .bind(source)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            if let Some(key) = key {
                sqlx::query("INSERT INTO suppressed_addresses (address_hash, channel, source, at_ms) VALUES (?, 'email', ?, ?) ON CONFLICT DO NOTHING")
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
        .fetch_all(&self.readers)
        .await?)
    }

    pub async fn erase_contact(
        &self,
        contact_id: String,
        key: &AddressKey,
        now_ms: i64,
    ) -> Result<Option<Erased>> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, super::write::BEGIN).await?;
        let Some((email, phone)): Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT email, phone FROM contacts WHERE id = ?")
                .bind(&contact_id)
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(None);
        };
        let mut erased = Erased::default();
        let opted_out: Vec<(String, String)> =
            sqlx::query_as("SELECT channel, source FROM opt_outs WHERE contact_id = ?")
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
                erased.suppressed_addresses += sqlx::query("INSERT INTO suppressed_addresses (address_hash, channel, source, at_ms) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING")
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
            "DELETE FROM run_steps WHERE run_id IN (SELECT id FROM runs WHERE contact_id = ?)",
            "DELETE FROM messages WHERE contact_id = ?",
            "DELETE FROM runs WHERE contact_id = ?",
            "DELETE FROM events WHERE contact_id = ?",
            "DELETE FROM magic_links WHERE contact_id = ?",
            "DELETE FROM sessions WHERE contact_id = ?",
            "DELETE FROM link_audit WHERE contact_id = ?",
            "DELETE FROM opt_outs WHERE contact_id = ?",
            "DELETE FROM grants WHERE contact_id = ?",
            "DELETE FROM contacts WHERE id = ?",
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
        sqlx::query("DELETE FROM mailbox WHERE recipient = ? OR recipient = ?")
            .bind(email.as_deref().unwrap_or_default())
            .bind(phone.as_deref().unwrap_or_default())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(erased))
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
