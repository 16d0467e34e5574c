-- Whether a contact was ever sent a message on a channel (the SMS opt-out line goes on the
-- first one), asked at every claim: an index probe per claimed message, whatever the table's
-- size or how stale the planner's statistics are.
CREATE INDEX messages_sent_per_channel ON messages (contact_id, channel) WHERE status = 'sent';
