//! The statements of `backend/links.rs` on SQLite that take a batch of message links.

pub(crate) const ENTITLED: &str = "SELECT DISTINCT contact_id FROM grants
 WHERE kind = 'offer' AND active AND contact_id IN (SELECT value FROM json_each($1))";

/// (now, message ids).
pub(crate) const REVOKE_MESSAGES_LINKS: &str =
    "UPDATE magic_links SET revoked_ms = COALESCE(revoked_ms, $1), message_id = NULL
 WHERE message_id IN (SELECT value FROM json_each($2))";

/// Rows (token hash, kind, contact id, message id, uses allowed, expires); then now.
pub(crate) const INSERT_LINKS: &str = "INSERT INTO magic_links (token_hash, kind, contact_id, message_id, max_uses, expires_ms, created_ms)
 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, $2
 FROM json_each($1)";

/// Rows (kind, contact id); then now.
pub(crate) const AUDIT_MINTS: &str =
    "INSERT INTO link_audit (at_ms, kind, contact_id, action, reason)
 SELECT $2, value ->> 0, value ->> 1, 'mint', NULL FROM json_each($1)";
