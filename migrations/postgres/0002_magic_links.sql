-- Magic links (SPEC §6). Only the SHA-256 of a token is stored, and lookups go by that hash.
CREATE TABLE magic_links (
    token_hash TEXT PRIMARY KEY,
    kind       TEXT    NOT NULL CHECK (kind IN ('learner', 'user')),
    -- The learner a learner link opens the portal as; NULL for the user (staff) link.
    contact_id TEXT,
    -- The message a link was minted for: one link per message, replaced if the send is retried.
    message_id TEXT UNIQUE,
    uses       BIGINT NOT NULL DEFAULT 0,
    -- NULL: unlimited (the user link).
    max_uses   BIGINT,
    -- NULL: never expires (the user link, until regenerated).
    expires_ms BIGINT,
    revoked_ms BIGINT,
    created_ms BIGINT NOT NULL
);
CREATE INDEX magic_links_live_contact ON magic_links (contact_id) WHERE revoked_ms IS NULL;
CREATE INDEX magic_links_live_kind ON magic_links (kind) WHERE revoked_ms IS NULL;

-- Portal sessions; the cookie holds a random id, the table its SHA-256.
CREATE TABLE sessions (
    id_hash    TEXT PRIMARY KEY,
    kind       TEXT    NOT NULL CHECK (kind IN ('learner', 'user')),
    contact_id TEXT,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    ended_ms   BIGINT
);

-- Every mint, redemption and refusal, without the token.
CREATE TABLE link_audit (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms      BIGINT NOT NULL,
    kind       TEXT    NOT NULL,
    contact_id TEXT,
    action     TEXT    NOT NULL,
    reason     TEXT
);
CREATE INDEX link_audit_contact ON link_audit (contact_id, action, at_ms);

-- Site-wide secrets: the key the user (staff) link is derived from, and its generation.
CREATE TABLE site (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
