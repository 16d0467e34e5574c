//! Magic links, sessions and the portal's reads, SQLite flavour.

use super::{SqliteStore, json_list, json_rows};
use crate::{
    LinkAuditRow, LinkHolder, LinkKind, LinkRefusal, NewLink, NewSession, ProductRow, Result,
    StoreError,
};
use serde_json::json;
use sqlx::{Row, SqliteConnection};
use std::collections::HashSet;

type Checked = std::result::Result<LinkHolder, (LinkRefusal, Option<String>)>;

use super::write::BEGIN;

impl SqliteStore {
    pub async fn has_active_offer(&self, contact_id: String) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM grants WHERE contact_id = ? AND kind = 'offer' AND active",
        )
        .bind(&contact_id)
        .fetch_one(&self.readers)
        .await?;
        Ok(n > 0)
    }

    pub async fn mint_link(&self, link: NewLink, now_ms: i64) -> Result<()> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
        if let Some(message_id) = &link.message_id {
            // A retried send re-mints: the earlier token of that message is revoked (kept, so a
            // copy that did arrive says "replaced" rather than "unknown").
            sqlx::query(
                "UPDATE magic_links SET revoked_ms = COALESCE(revoked_ms, ?), message_id = NULL WHERE message_id = ?",
            )
            .bind(now_ms)
            .bind(message_id)
                .execute(&mut *tx)
                .await?;
        }
        insert_link(&mut tx, &link, now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn mint_message_links(&self, links: Vec<NewLink>, now_ms: i64) -> Result<Vec<bool>> {
        if links.is_empty() {
            return Ok(Vec::new());
        }
        self.writer
            .run(move |conn| Box::pin(mint_message_links(conn, links, now_ms)))
            .await
    }

    pub async fn regenerate_link(
        &self,
        link: NewLink,
        site_value: Option<(String, String)>,
        now_ms: i64,
    ) -> Result<()> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
        sqlx::query(
            "UPDATE magic_links SET revoked_ms = ? WHERE revoked_ms IS NULL AND kind = ?
               AND ((? IS NULL AND contact_id IS NULL) OR contact_id = ?)",
        )
        .bind(now_ms)
        .bind(link.kind.as_str())
        .bind(&link.contact_id)
        .bind(&link.contact_id)
        .execute(&mut *tx)
        .await?;
        // A session opened with a revoked link ends with it (a leaked staff link, a learner who
        // asked for a fresh one).
        sqlx::query(
            "UPDATE sessions SET ended_ms = ? WHERE ended_ms IS NULL AND kind = ?
               AND ((? IS NULL AND contact_id IS NULL) OR contact_id = ?)",
        )
        .bind(now_ms)
        .bind(link.kind.as_str())
        .bind(&link.contact_id)
        .bind(&link.contact_id)
        .execute(&mut *tx)
        .await?;
        insert_link(&mut tx, &link, now_ms).await?;
        if let Some((name, value)) = &site_value {
            sqlx::query("INSERT INTO site (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
                .bind(name)
                .bind(value)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn check_link(&self, token_hash: String, now_ms: i64) -> Result<Checked> {
        let mut conn = self.readers.acquire().await?;
        classify(&mut conn, &token_hash, now_ms).await
    }

    pub async fn redeem_link(
        &self,
        token_hash: String,
        now_ms: i64,
        session: NewSession,
        login_source: String,
    ) -> Result<Checked> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
        let redeemed = sqlx::query(
            "UPDATE magic_links AS l SET uses = uses + 1
             WHERE token_hash = ? AND revoked_ms IS NULL
               AND (expires_ms IS NULL OR expires_ms > ?)
               AND (max_uses IS NULL OR uses < max_uses)
               AND (kind = 'user' OR EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = l.contact_id AND g.kind = 'offer' AND g.active))
             RETURNING kind, contact_id",
        )
        .bind(&token_hash)
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = redeemed else {
            let refusal = classify(&mut tx, &token_hash, now_ms).await?;
            let (reason, contact) = match &refusal {
                Err((r, c)) => (*r, c.clone()),
                // Valid a moment ago but not now cannot happen under the write lock; treat as unknown.
                Ok(_) => (LinkRefusal::Unknown, None),
            };
            let kind = kind_of(&mut tx, &token_hash).await?;
            audit(
                &mut tx,
                now_ms,
                kind.as_deref().unwrap_or("unknown"),
                contact.as_deref(),
                "refuse",
                Some(reason.as_str()),
            )
            .await?;
            tx.commit().await?;
            return Ok(Err((reason, contact)));
        };
        let kind = LinkKind::parse(row.get(0))
            .ok_or_else(|| StoreError::Corrupt("unknown link kind".into()))?;
        let contact_id: Option<String> = row.get(1);
        sqlx::query("INSERT INTO sessions (id_hash, kind, contact_id, created_ms, expires_ms) VALUES (?, ?, ?, ?, ?)")
            .bind(&session.id_hash)
            .bind(kind.as_str())
            .bind(&contact_id)
            .bind(now_ms)
            .bind(session.expires_ms)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            now_ms,
            kind.as_str(),
            contact_id.as_deref(),
            "redeem",
            None,
        )
        .await?;
        if let (LinkKind::Learner, Some(contact)) = (kind, &contact_id) {
            // The login enters the event stream in the same transaction as the redemption.
            let event = crate::login_event(&login_source, contact, now_ms);
            super::write::insert_event_rows(&mut tx, &[&event]).await?;
        }
        tx.commit().await?;
        Ok(Ok(LinkHolder { kind, contact_id }))
    }

    pub async fn session(&self, id_hash: String, now_ms: i64) -> Result<Option<LinkHolder>> {
        let row = sqlx::query(
            "SELECT kind, contact_id FROM sessions WHERE id_hash = ? AND ended_ms IS NULL AND expires_ms > ?",
        )
        .bind(&id_hash)
        .bind(now_ms)
        .fetch_optional(&self.readers)
        .await?;
        row.map(|r| {
            Ok(LinkHolder {
                kind: LinkKind::parse(r.get(0))
                    .ok_or_else(|| StoreError::Corrupt("unknown session kind".into()))?,
                contact_id: r.get(1),
            })
        })
        .transpose()
    }

    pub async fn end_session(&self, id_hash: String, now_ms: i64) -> Result<()> {
        let mut conn = self.writer.lock().await;
        sqlx::query("UPDATE sessions SET ended_ms = ? WHERE id_hash = ? AND ended_ms IS NULL")
            .bind(now_ms)
            .bind(&id_hash)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    pub async fn portal_products(&self, contact_id: Option<String>) -> Result<Vec<ProductRow>> {
        let rows = match &contact_id {
            None => {
                sqlx::query("SELECT id, title, url FROM products ORDER BY COALESCE(title, id), id")
                    .fetch_all(&self.readers)
                    .await?
            }
            Some(contact) => {
                sqlx::query(
                    "SELECT p.id, p.title, p.url FROM products p WHERE p.id IN (
                       SELECT op.product_id FROM grants g JOIN offer_products op ON op.offer_id = g.item_id
                        WHERE g.contact_id = ?1 AND g.kind = 'offer' AND g.active
                       UNION
                       SELECT g.item_id FROM grants g WHERE g.contact_id = ?1 AND g.kind = 'product' AND g.active)
                     ORDER BY COALESCE(p.title, p.id), p.id",
                )
                .bind(contact)
                .fetch_all(&self.readers)
                .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|r| ProductRow {
                id: r.get(0),
                title: r.get(1),
                url: r.get(2),
            })
            .collect())
    }

    pub async fn allow_link_resend(
        &self,
        contact_id: String,
        now_ms: i64,
        short_since_ms: i64,
        max_short: i64,
        day_since_ms: i64,
        max_day: i64,
    ) -> Result<bool> {
        let mut conn = self.writer.lock().await;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, BEGIN).await?;
        let row = sqlx::query(
            "SELECT COALESCE(SUM(CASE WHEN at_ms >= ? THEN 1 ELSE 0 END), 0), COUNT(*)
             FROM link_audit WHERE contact_id = ? AND action = 'resend' AND at_ms >= ?",
        )
        .bind(short_since_ms)
        .bind(&contact_id)
        .bind(day_since_ms)
        .fetch_one(&mut *tx)
        .await?;
        let (short, day): (i64, i64) = (row.get(0), row.get(1));
        let allowed = short < max_short && day < max_day;
        let action = if allowed { "resend" } else { "resend_refused" };
        audit(
            &mut tx,
            now_ms,
            "learner",
            Some(&contact_id),
            action,
            (!allowed).then_some("rate_limited"),
        )
        .await?;
        tx.commit().await?;
        Ok(allowed)
    }

    pub async fn site_value(&self, name: String, default: String) -> Result<String> {
        let mut conn = self.writer.lock().await;
        sqlx::query("INSERT INTO site (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING")
            .bind(&name)
            .bind(&default)
            .execute(&mut *conn)
            .await?;
        Ok(sqlx::query_scalar("SELECT value FROM site WHERE name = ?")
            .bind(&name)
            .fetch_one(&mut *conn)
            .await?)
    }

    pub async fn set_site_value(&self, name: String, value: String) -> Result<()> {
        let mut conn = self.writer.lock().await;
        sqlx::query("INSERT INTO site (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(&name)
            .bind(&value)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    pub async fn link_audit(
        &self,
        contact_id: Option<String>,
        limit: i64,
    ) -> Result<Vec<LinkAuditRow>> {
        let rows = sqlx::query(
            "SELECT at_ms, kind, contact_id, action, reason FROM link_audit
             WHERE (?1 IS NULL OR contact_id = ?1) ORDER BY id DESC LIMIT ?2",
        )
        .bind(&contact_id)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| LinkAuditRow {
                at_ms: r.get(0),
                kind: r.get(1),
                contact_id: r.get(2),
                action: r.get(3),
                reason: r.get(4),
            })
            .collect())
    }
}

/// Stores the links of messages being sent whose contact holds an active offer grant; returns,
/// per link, whether it was.
async fn mint_message_links(
    conn: &mut SqliteConnection,
    links: Vec<NewLink>,
    now_ms: i64,
) -> Result<Vec<bool>> {
    let contacts = json_list(links.iter().filter_map(|l| l.contact_id.as_deref()));
    let entitled: HashSet<String> = sqlx::query_scalar(
        "SELECT DISTINCT contact_id FROM grants
         WHERE kind = 'offer' AND active AND contact_id IN (SELECT value FROM json_each(?))",
    )
    .bind(&contacts)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    let (minted, kept) = crate::model::split_entitled(&links, &entitled);
    if !kept.is_empty() {
        // A retried send re-mints: the earlier token of that message is revoked (kept, so a
        // copy that did arrive says "replaced" rather than "unknown").
        sqlx::query(
            "UPDATE magic_links SET revoked_ms = COALESCE(revoked_ms, ?), message_id = NULL
             WHERE message_id IN (SELECT value FROM json_each(?))",
        )
        .bind(now_ms)
        .bind(json_list(
            kept.iter().filter_map(|l| l.message_id.as_deref()),
        ))
        .execute(&mut *conn)
        .await?;
        let rows = json_rows(kept.iter().map(|l| {
            json!([
                l.token_hash,
                l.kind.as_str(),
                l.contact_id,
                l.message_id,
                l.max_uses,
                l.expires_ms
            ])
        }));
        sqlx::query(
            "INSERT INTO magic_links (token_hash, kind, contact_id, message_id, max_uses, expires_ms, created_ms)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, ?2
             FROM json_each(?1)",
        )
        .bind(&rows)
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO link_audit (at_ms, kind, contact_id, action, reason)
             SELECT ?2, value ->> 1, value ->> 2, 'mint', NULL FROM json_each(?1)",
        )
        .bind(&rows)
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
    }
    Ok(minted)
}

async fn insert_link(conn: &mut SqliteConnection, link: &NewLink, now_ms: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO magic_links (token_hash, kind, contact_id, message_id, max_uses, expires_ms, created_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&link.token_hash)
    .bind(link.kind.as_str())
    .bind(&link.contact_id)
    .bind(&link.message_id)
    .bind(link.max_uses)
    .bind(link.expires_ms)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    audit(
        conn,
        now_ms,
        link.kind.as_str(),
        link.contact_id.as_deref(),
        "mint",
        None,
    )
    .await
}

async fn audit(
    conn: &mut SqliteConnection,
    now_ms: i64,
    kind: &str,
    contact_id: Option<&str>,
    action: &str,
    reason: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO link_audit (at_ms, kind, contact_id, action, reason) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(now_ms)
    .bind(kind)
    .bind(contact_id)
    .bind(action)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn kind_of(conn: &mut SqliteConnection, token_hash: &str) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT kind FROM magic_links WHERE token_hash = ?")
            .bind(token_hash)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// Why a link would or would not open the portal now, in the order a learner should hear it.
async fn classify(conn: &mut SqliteConnection, token_hash: &str, now_ms: i64) -> Result<Checked> {
    let row = sqlx::query(
        "SELECT l.kind, l.contact_id, l.revoked_ms, l.expires_ms, l.uses, l.max_uses,
                EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = l.contact_id AND g.kind = 'offer' AND g.active)
         FROM magic_links l WHERE l.token_hash = ?",
    )
    .bind(token_hash)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else {
        return Ok(Err((LinkRefusal::Unknown, None)));
    };
    let kind =
        LinkKind::parse(r.get(0)).ok_or_else(|| StoreError::Corrupt("unknown link kind".into()))?;
    let contact: Option<String> = r.get(1);
    let (revoked, expires, uses, max_uses, entitled): (
        Option<i64>,
        Option<i64>,
        i64,
        Option<i64>,
        bool,
    ) = (r.get(2), r.get(3), r.get(4), r.get(5), r.get(6));
    // No access at all is the reason that matters most (a learner whose last offer was
    // removed, whose links were revoked with it, is told that, not that a link was replaced).
    let refusal = if kind == LinkKind::Learner && !entitled {
        Some(LinkRefusal::NotEntitled)
    } else if revoked.is_some() {
        Some(LinkRefusal::Revoked)
    } else if expires.is_some_and(|e| e <= now_ms) {
        Some(LinkRefusal::Expired)
    } else if max_uses.is_some_and(|m| uses >= m) {
        Some(LinkRefusal::UsedUp)
    } else {
        None
    };
    Ok(match refusal {
        Some(r) => Err((r, contact)),
        None => Ok(LinkHolder {
            kind,
            contact_id: contact,
        }),
    })
}
