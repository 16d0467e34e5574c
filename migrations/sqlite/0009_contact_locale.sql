-- The contact's language (`contact.locale`, such as de-DE), kept like its other details so that
-- runs not started by one of its events (schedules, enrollments) format dates and numbers in it.
ALTER TABLE contacts ADD COLUMN locale TEXT;
