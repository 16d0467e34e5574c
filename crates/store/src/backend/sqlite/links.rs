//! The statements of `backend/links.rs` on SQLite that take a batch of message links.

pub(crate) const ENTITLED: &str = "SELECT DISTINCT contact_id FROM grants
 WHERE kind = 'offer' AND active AND contact_id IN (SELECT value FROM json_each($1))";

/// (now, message ids).
pub(crate) const REVOKE_MESSAGES_LINKS: &str =
    "UPDATE magic_links SET revoked_ms = COALESCE(revoked_ms, $1), message_id = NULL
 WHERE message_id IN (SELECT value FROM json_each($2))";

/// Per row (token hash, kind, contact id, message id, uses allowed, expires); then now.
pub(crate) const INSERT_LINKS: &str = "INSERT INTO magic_links (token_hash, kind, contact_id, message_id, max_uses, expires_ms, created_ms)
 VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// Per row (kind, contact id); then now.
pub(crate) const AUDIT_MINTS: &str = "INSERT INTO link_audit (at_ms, kind, contact_id, action, reason) VALUES ($3, $1, $2, 'mint', NULL)";
