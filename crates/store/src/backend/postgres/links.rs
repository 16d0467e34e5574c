//! Minting the links of a batch of messages being sent, on PostgreSQL: the batch's columns go in
//! as arrays through `UNNEST` (see `backend/links.rs` for the rest of the links, written once).

use crate::{NewLink, Result};
use sqlx::PgConnection;
use std::collections::HashSet;

/// Stores the links of messages being sent whose contact holds an active offer grant; returns,
/// per link, whether it was.
pub(crate) async fn mint_message_links(
    tx: &mut PgConnection,
    links: &[NewLink],
    now_ms: i64,
) -> Result<Vec<bool>> {
    let contacts: Vec<&str> = links
        .iter()
        .filter_map(|l| l.contact_id.as_deref())
        .collect();
    let entitled: HashSet<String> = sqlx::query_scalar(
        "SELECT DISTINCT contact_id FROM grants WHERE kind = 'offer' AND active AND contact_id = ANY($1)",
    )
    .bind(&contacts)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let (minted, kept) = crate::model::split_entitled(links, &entitled);
    if !kept.is_empty() {
        let messages: Vec<&str> = kept
            .iter()
            .filter_map(|l| l.message_id.as_deref())
            .collect();
        // A retried send re-mints: the earlier token of that message is revoked (kept, so a
        // copy that did arrive says "replaced" rather than "unknown").
        sqlx::query(
            "UPDATE magic_links SET revoked_ms = COALESCE(revoked_ms, $1), message_id = NULL
             WHERE message_id = ANY($2)",
        )
        .bind(now_ms)
        .bind(&messages)
        .execute(&mut *tx)
        .await?;
        let hashes: Vec<&str> = kept.iter().map(|l| l.token_hash.as_str()).collect();
        let kinds: Vec<&str> = kept.iter().map(|l| l.kind.as_str()).collect();
        let contacts: Vec<Option<&str>> = kept.iter().map(|l| l.contact_id.as_deref()).collect();
        let message_ids: Vec<Option<&str>> = kept.iter().map(|l| l.message_id.as_deref()).collect();
        let uses: Vec<Option<i64>> = kept.iter().map(|l| l.max_uses).collect();
        let expires: Vec<Option<i64>> = kept.iter().map(|l| l.expires_ms).collect();
        sqlx::query(
            "WITH minted AS (
                 INSERT INTO magic_links (token_hash, kind, contact_id, message_id, max_uses, expires_ms, created_ms)
                 SELECT u.*, $7 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[]) AS u
                 RETURNING kind, contact_id)
             INSERT INTO link_audit (at_ms, kind, contact_id, action, reason)
             SELECT $7, kind, contact_id, 'mint', NULL FROM minted",
        )
        .bind(&hashes)
        .bind(&kinds)
        .bind(&contacts)
        .bind(&message_ids)
        .bind(&uses)
        .bind(&expires)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
    }
    Ok(minted)
}
