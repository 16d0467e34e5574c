//! The statements of `backend/membership.rs` on PostgreSQL. Rows arrive as one array per column;
//! PostgreSQL refuses to touch a row twice in one statement, so the upserts go in rounds (see
//! `Tx::rounds`).

/// Rows (id, email, phone, first name, last name, timezone, custom fields, details time, event
/// time, locale).
pub(crate) const UPSERT_CONTACTS: &str = "INSERT INTO contacts (id, email, phone, first_name, last_name, timezone, custom_fields, details_ms, last_event_ms, locale)
 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int8[], $9::int8[], $10::text[])
 ON CONFLICT (id) DO UPDATE SET
   email = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.email, contacts.email) ELSE COALESCE(contacts.email, excluded.email) END,
   phone = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.phone, contacts.phone) ELSE COALESCE(contacts.phone, excluded.phone) END,
   first_name = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.first_name, contacts.first_name) ELSE COALESCE(contacts.first_name, excluded.first_name) END,
   last_name = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.last_name, contacts.last_name) ELSE COALESCE(contacts.last_name, excluded.last_name) END,
   timezone = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.timezone, contacts.timezone) ELSE COALESCE(contacts.timezone, excluded.timezone) END,
   custom_fields = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.custom_fields, contacts.custom_fields) ELSE COALESCE(contacts.custom_fields, excluded.custom_fields) END,
   locale = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.locale, contacts.locale) ELSE COALESCE(contacts.locale, excluded.locale) END,
   details_ms = GREATEST(contacts.details_ms, excluded.details_ms),
   last_event_ms = GREATEST(contacts.last_event_ms, excluded.last_event_ms)";

/// Rows (contact id, kind, item id, active, changed at).
pub(crate) const UPSERT_GRANTS: &str = "INSERT INTO grants (contact_id, kind, item_id, active, changed_ms)
 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bool[], $5::int8[])
 ON CONFLICT (contact_id, kind, item_id) DO UPDATE SET active = excluded.active, changed_ms = excluded.changed_ms
 WHERE excluded.changed_ms >= grants.changed_ms";

pub(crate) const STORED_OFFERS: &str =
    "SELECT id, title, updated_ms FROM offers WHERE id = ANY($1)";

/// Rows (id, title, updated at), one per offer.
pub(crate) const UPSERT_OFFERS: &str = "INSERT INTO offers (id, title, updated_ms) SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[])
 ON CONFLICT (id) DO UPDATE SET title = excluded.title, updated_ms = excluded.updated_ms";

pub(crate) const DELETE_OFFER_PRODUCTS: &str =
    "DELETE FROM offer_products WHERE offer_id = ANY($1)";

/// Rows (offer id, product id).
pub(crate) const INSERT_OFFER_PRODUCTS: &str =
    "INSERT INTO offer_products (offer_id, product_id) SELECT * FROM UNNEST($1::text[], $2::text[])
 ON CONFLICT DO NOTHING";

/// Rows (id, updated at).
pub(crate) const INSERT_MISSING_PRODUCTS: &str =
    "INSERT INTO products (id, updated_ms) SELECT * FROM UNNEST($1::text[], $2::int8[])
 ON CONFLICT (id) DO NOTHING";

/// Rows (id, title, url, updated at).
pub(crate) const UPSERT_PRODUCTS: &str = "INSERT INTO products (id, title, url, updated_ms) SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[])
 ON CONFLICT (id) DO UPDATE SET
   title = CASE WHEN excluded.updated_ms >= products.updated_ms THEN COALESCE(excluded.title, products.title) ELSE COALESCE(products.title, excluded.title) END,
   url = CASE WHEN excluded.updated_ms >= products.updated_ms THEN COALESCE(excluded.url, products.url) ELSE COALESCE(products.url, excluded.url) END,
   updated_ms = GREATEST(products.updated_ms, excluded.updated_ms)";
