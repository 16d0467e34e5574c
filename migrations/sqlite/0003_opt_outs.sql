-- Opt-outs per contact and channel (SPEC §5). A row means: do not send on this channel.
CREATE TABLE opt_outs (
    contact_id TEXT    NOT NULL,
    channel    TEXT    NOT NULL CHECK (channel IN ('email', 'sms')),
    -- How it happened: unsubscribe_link, one_click, sms_keyword.
    source     TEXT    NOT NULL,
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (contact_id, channel)
);
