//! Minting the links of a batch of messages being sent, on SQLite: the batch's rows go in as one
//! JSON array (see `backend/links.rs` for the rest of the links, written once).

use super::{json_list, json_rows};
use crate::{NewLink, Result};
use serde_json::json;
use sqlx::SqliteConnection;
use std::collections::HashSet;

/// Stores the links of messages being sent whose contact holds an active offer grant; returns,
/// per link, whether it was.
pub(crate) async fn mint_message_links(
    conn: &mut SqliteConnection,
    links: &[NewLink],
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
    let (minted, kept) = crate::model::split_entitled(links, &entitled);
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
