-- The UNIQUE constraint on magic_links.message_id already keeps an index on that column, which
-- finds a message's link; a second index on it only cost a write per minted link.
DROP INDEX IF EXISTS magic_links_message;
