-- Ending a contact's live sessions (a regenerated link, a last offer removed) finds them by
-- contact instead of reading every session.
CREATE INDEX sessions_live_contact ON sessions (contact_id) WHERE ended_ms IS NULL;
-- A suppression reported by a provider names an address, not a contact.
CREATE INDEX contacts_email ON contacts (lower(email));
