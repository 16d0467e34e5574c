-- An event whose dispatch keeps failing is set aside: marked dispatched, with the error, so the
-- events behind it go on. Listed by the admin API.
ALTER TABLE events ADD COLUMN dead_error TEXT;
ALTER TABLE events ADD COLUMN dead_ms BIGINT;
CREATE INDEX events_dead ON events (seq) WHERE dead_error IS NOT NULL;

-- Whether each workflow is enabled, shared by every process and kept across restarts, so that
-- parking and resuming its runs follow the database rather than one process's memory.
CREATE TABLE workflow_states (
    workflow_id TEXT    PRIMARY KEY,
    enabled     BOOLEAN NOT NULL,
    updated_ms  BIGINT  NOT NULL
);

-- A run's messages go out in step order: a queued message is claimable only when no earlier
-- step's message of its run is still queued, asked per candidate at every claim.
CREATE INDEX messages_queued_per_run ON messages (run_id, pc) WHERE status = 'queued';

-- A retried send re-mints its message's link and revokes the earlier one, found by message.
CREATE INDEX magic_links_message ON magic_links (message_id) WHERE message_id IS NOT NULL;
