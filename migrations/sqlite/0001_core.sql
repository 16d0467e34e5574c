-- herald core schema (SQLite). Instants are epoch milliseconds (INTEGER) in both backends so that
-- the same code compares them; ids of herald's own rows are UUIDv7 text (time-ordered).

-- Every accepted course event, the inbox of the dispatcher. (source, id) deduplicates.
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    source       TEXT    NOT NULL,
    id           TEXT    NOT NULL,
    type         TEXT    NOT NULL,
    contact_id   TEXT    NOT NULL,
    time_ms      INTEGER NOT NULL,
    received_ms  INTEGER NOT NULL,
    body         TEXT    NOT NULL,
    dispatched   INTEGER NOT NULL DEFAULT 0,
    UNIQUE (source, id)
);
CREATE INDEX events_undispatched ON events (seq) WHERE dispatched = 0;
CREATE INDEX events_contact ON events (contact_id, seq);

-- The membership projection: latest contact details (by event time).
CREATE TABLE contacts (
    id            TEXT PRIMARY KEY,
    email         TEXT,
    phone         TEXT,
    first_name    TEXT,
    last_name     TEXT,
    timezone      TEXT,
    custom_fields TEXT,
    details_ms    INTEGER NOT NULL,
    last_event_ms INTEGER NOT NULL
);

-- Offer and product grants per contact; changed_ms is the event time of the last change, so an
-- older event arriving late cannot undo a newer one.
CREATE TABLE grants (
    contact_id TEXT    NOT NULL,
    kind       TEXT    NOT NULL CHECK (kind IN ('offer', 'product')),
    item_id    TEXT    NOT NULL,
    active     INTEGER NOT NULL,
    changed_ms INTEGER NOT NULL,
    PRIMARY KEY (contact_id, kind, item_id)
);

-- The catalogue as events describe it.
CREATE TABLE products (
    id         TEXT PRIMARY KEY,
    title      TEXT,
    url        TEXT,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE offers (
    id         TEXT PRIMARY KEY,
    title      TEXT,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE offer_products (
    offer_id   TEXT NOT NULL,
    product_id TEXT NOT NULL,
    PRIMARY KEY (offer_id, product_id)
);

-- Every workflow version a run was ever pinned to: the YAML and templates as they were.
CREATE TABLE workflow_versions (
    workflow_id TEXT    NOT NULL,
    version     TEXT    NOT NULL,
    bundle      TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (workflow_id, version)
);

-- Runs are also the step queue: an active run with due_ms <= now is claimable under a lease.
CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    workflow_id      TEXT    NOT NULL,
    workflow_version TEXT    NOT NULL,
    contact_id       TEXT    NOT NULL,
    event_seq        INTEGER NOT NULL,
    state            TEXT    NOT NULL,
    reason           TEXT,
    pc               INTEGER NOT NULL,
    wait_event       TEXT,
    due_ms           INTEGER,
    locked_until_ms  INTEGER,
    lease_token      TEXT,
    created_ms       INTEGER NOT NULL,
    updated_ms       INTEGER NOT NULL,
    ended_ms         INTEGER
);
-- A contact is never in two live runs of one workflow: a key, not a hope.
CREATE UNIQUE INDEX runs_one_live ON runs (workflow_id, contact_id)
    WHERE state IN ('active', 'waiting_event', 'parked');
CREATE INDEX runs_due ON runs (due_ms) WHERE state IN ('active', 'waiting_event');
CREATE INDEX runs_contact ON runs (contact_id, workflow_id, created_ms);
CREATE INDEX runs_workflow ON runs (workflow_id, id);

-- What each run did, step by step (admin API).
CREATE TABLE run_steps (
    run_id  TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    step_id TEXT    NOT NULL,
    kind    TEXT    NOT NULL,
    outcome TEXT    NOT NULL,
    at_ms   INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- Messages are also the delivery queue: queued with due_ms <= now is claimable under a lease.
-- UNIQUE (run_id, step_id) makes a send step produce at most one message per run.
CREATE TABLE messages (
    id              TEXT PRIMARY KEY,
    run_id          TEXT    NOT NULL,
    step_id         TEXT    NOT NULL,
    pc              INTEGER NOT NULL,
    workflow_id     TEXT    NOT NULL,
    contact_id      TEXT    NOT NULL,
    channel         TEXT    NOT NULL,
    recipient       TEXT,
    subject         TEXT,
    header_message_id TEXT  NOT NULL,
    status          TEXT    NOT NULL,
    reason          TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    due_ms          INTEGER,
    locked_until_ms INTEGER,
    lease_token     TEXT,
    provider_id     TEXT,
    created_ms      INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL,
    sent_ms         INTEGER,
    UNIQUE (run_id, step_id)
);
CREATE INDEX messages_due ON messages (due_ms) WHERE status = 'queued';
CREATE INDEX messages_contact ON messages (contact_id, id);
CREATE INDEX messages_workflow ON messages (workflow_id, id);

-- The dev mailbox: what would have gone out when no provider is configured.
CREATE TABLE mailbox (
    id         TEXT PRIMARY KEY,
    message_id TEXT,
    channel    TEXT    NOT NULL,
    sender     TEXT,
    recipient  TEXT    NOT NULL,
    subject    TEXT,
    text_body  TEXT,
    html_body  TEXT,
    created_ms INTEGER NOT NULL
);
