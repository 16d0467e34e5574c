//! The statements of `backend/membership.rs` on SQLite. A batch runs its statement once per
//! row, in order, so a whole batch is one statement per table.

/// Per row (id, email, phone, first name, last name, timezone, custom fields, details time,
/// event time, locale).
pub(crate) const UPSERT_CONTACTS: &str = "INSERT INTO contacts (id, email, phone, first_name, last_name, timezone, custom_fields, details_ms, last_event_ms, locale)
 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
 ON CONFLICT (id) DO UPDATE SET
   email = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.email, contacts.email) ELSE COALESCE(contacts.email, excluded.email) END,
   phone = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.phone, contacts.phone) ELSE COALESCE(contacts.phone, excluded.phone) END,
   first_name = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.first_name, contacts.first_name) ELSE COALESCE(contacts.first_name, excluded.first_name) END,
   last_name = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.last_name, contacts.last_name) ELSE COALESCE(contacts.last_name, excluded.last_name) END,
   timezone = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.timezone, contacts.timezone) ELSE COALESCE(contacts.timezone, excluded.timezone) END,
   custom_fields = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.custom_fields, contacts.custom_fields) ELSE COALESCE(contacts.custom_fields, excluded.custom_fields) END,
   locale = CASE WHEN excluded.details_ms >= contacts.details_ms THEN COALESCE(excluded.locale, contacts.locale) ELSE COALESCE(contacts.locale, excluded.locale) END,
   details_ms = MAX(contacts.details_ms, excluded.details_ms),
   last_event_ms = MAX(contacts.last_event_ms, excluded.last_event_ms)";

/// Per row (contact id, kind, item id, active, changed at).
pub(crate) const UPSERT_GRANTS: &str = "INSERT INTO grants (contact_id, kind, item_id, active, changed_ms)
 VALUES ($1, $2, $3, $4, $5)
 ON CONFLICT (contact_id, kind, item_id) DO UPDATE SET active = excluded.active, changed_ms = excluded.changed_ms
 WHERE excluded.changed_ms >= grants.changed_ms";

pub(crate) const STORED_OFFERS: &str =
    "SELECT id, title, updated_ms FROM offers WHERE id IN (SELECT value FROM json_each($1))";

/// Per row (id, title, updated at), one per offer.
pub(crate) const UPSERT_OFFERS: &str =
    "INSERT INTO offers (id, title, updated_ms) VALUES ($1, $2, $3)
 ON CONFLICT (id) DO UPDATE SET title = excluded.title, updated_ms = excluded.updated_ms";

pub(crate) const DELETE_OFFER_PRODUCTS: &str =
    "DELETE FROM offer_products WHERE offer_id IN (SELECT value FROM json_each($1))";

/// Per row (offer id, product id).
pub(crate) const INSERT_OFFER_PRODUCTS: &str =
    "INSERT INTO offer_products (offer_id, product_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";

/// Per row (id, updated at).
pub(crate) const INSERT_MISSING_PRODUCTS: &str =
    "INSERT INTO products (id, updated_ms) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING";

/// Per row (id, title, url, updated at).
pub(crate) const UPSERT_PRODUCTS: &str = "INSERT INTO products (id, title, url, updated_ms)
 VALUES ($1, $2, $3, $4)
 ON CONFLICT (id) DO UPDATE SET
   title = CASE WHEN excluded.updated_ms >= products.updated_ms THEN COALESCE(excluded.title, products.title) ELSE COALESCE(products.title, excluded.title) END,
   url = CASE WHEN excluded.updated_ms >= products.updated_ms THEN COALESCE(excluded.url, products.url) ELSE COALESCE(products.url, excluded.url) END,
   updated_ms = MAX(products.updated_ms, excluded.updated_ms)";
