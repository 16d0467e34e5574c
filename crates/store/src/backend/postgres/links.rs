//! The statements of `backend/links.rs` on PostgreSQL that take a batch of message links.

pub(crate) const ENTITLED: &str = "SELECT DISTINCT contact_id FROM grants WHERE kind = 'offer' AND active AND contact_id = ANY($1)";

/// (now, message ids).
pub(crate) const REVOKE_MESSAGES_LINKS: &str =
    "UPDATE magic_links SET revoked_ms = COALESCE(revoked_ms, $1), message_id = NULL
 WHERE message_id = ANY($2)";

/// Rows (token hash, kind, contact id, message id, uses allowed, expires); then now.
pub(crate) const INSERT_LINKS: &str = "INSERT INTO magic_links (token_hash, kind, contact_id, message_id, max_uses, expires_ms, created_ms)
 SELECT u.*, $7 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[]) AS u";

/// Rows (kind, contact id); then now.
pub(crate) const AUDIT_MINTS: &str = "INSERT INTO link_audit (at_ms, kind, contact_id, action, reason)
 SELECT $3, u.kind, u.contact_id, 'mint', NULL FROM UNNEST($1::text[], $2::text[]) AS u(kind, contact_id)";
