//! Storing events on SQLite: one multi-row insert per batch.

use super::WriterConnection;
use crate::backend::sql::{Column, Param};
use crate::{Accepted, NewEvent, Result};

impl super::SqliteStore {
    pub(crate) async fn insert_events(&self, events: Vec<NewEvent>) -> Result<Vec<Accepted>> {
        self.writer
            .run(move |conn| {
                Box::pin(async move {
                    let events: Vec<&NewEvent> = events.iter().collect();
                    insert_event_rows(conn, &events)
                })
            })
            .await
    }
}

/// Inserts events with one multi-row statement, in batch order (their `seq` is the dispatch
/// order); `RETURNING` names the rows that were new.
pub(crate) fn insert_event_rows(
    conn: &mut WriterConnection,
    events: &[&NewEvent],
) -> Result<Vec<Accepted>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let bodies: Vec<String> = events
        .iter()
        .map(|e| e.event.to_json().to_string())
        .collect();
    let columns = [
        Column::texts(events, |e| Some(e.event.source.as_str())),
        Column::texts(events, |e| Some(e.event.id.as_str())),
        Column::texts(events, |e| Some(e.event.event_type.trigger_name())),
        Column::texts(events, |e| Some(e.event.contact_id())),
        Column::ints(events, |e| Some(e.event.time.timestamp_millis())),
        Column::times(events, |e| Some(e.received)),
        Column::texts(&bodies, |b| Some(b.as_str())),
    ];
    let new: Vec<(String, String)> = conn.fetch_all(
        "INSERT INTO events (source, id, type, contact_id, time_ms, received_ms, body)
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6
         FROM json_each(?) WHERE true ORDER BY key
         ON CONFLICT (source, id) DO NOTHING
         RETURNING source, id",
        &[Param::Rows(&columns)],
    )?;
    Ok(crate::ingest::accepted_in_order(
        events,
        new.into_iter().collect(),
    ))
}
