-- The event that ended a run's last event wait (NULL when that wait timed out, or before any):
-- what `received` and `awaited.*` read in the steps after it.
ALTER TABLE runs ADD COLUMN awaited_seq INTEGER;
