-- Ending a contact's live sessions (a regenerated link, a last offer removed) finds them by
-- contact instead of reading every session.
CREATE INDEX sessions_live_contact ON sessions (contact_id) WHERE ended_ms IS NULL;
-- A suppression reported by a provider names an address, not a contact.
CREATE INDEX contacts_email ON contacts (lower(email));
-- Addresses of erased contacts that had opted out, as a keyed hash (HMAC with a site secret):
-- a later event with the same address must not resubscribe them, and nothing else is kept.
CREATE TABLE suppressed_addresses (
    address_hash TEXT    PRIMARY KEY,
    channel      TEXT    NOT NULL CHECK (channel IN ('email', 'sms')),
    source       TEXT    NOT NULL,
    at_ms        BIGINT NOT NULL
);
