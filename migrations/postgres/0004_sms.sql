-- SMS: the segment count of each SMS, and finding contacts by phone for inbound keywords.
ALTER TABLE messages ADD COLUMN segments BIGINT;
CREATE INDEX contacts_phone ON contacts (phone);
