//! Storing events on SQLite: one insert statement per batch, run once per event.

use super::WriterConnection;
use crate::backend::sql::{Column, Param};
use crate::{Accepted, NewEvent, Result};

impl super::SqliteStore {
    pub(crate) async fn insert_events(&self, events: Vec<NewEvent>) -> Result<Vec<Accepted>> {
        // Serialised, and handed back to be freed, on the caller's thread: the writer's thread
        // only writes.
        let bodies = stored_bodies(&events);
        let (accepted, _events) = self
            .writer
            .run(move |conn| {
                Box::pin(async move {
                    let rows: Vec<&NewEvent> = events.iter().collect();
                    let accepted = insert_rows(conn, &rows, &bodies);
                    drop(rows);
                    accepted.map(|accepted| (accepted, (events, bodies)))
                })
            })
            .await?;
        Ok(accepted)
    }
}

/// The body each event is stored with.
fn stored_bodies<'e>(events: impl IntoIterator<Item = &'e NewEvent>) -> Vec<String> {
    events
        .into_iter()
        .map(|e| e.event.to_json().to_string())
        .collect()
}

/// Inserts events, in batch order (their `seq` is the dispatch order); of several copies of
/// one event in the batch the first is the new one.
pub(crate) fn insert_event_rows(
    conn: &mut WriterConnection,
    events: &[&NewEvent],
) -> Result<Vec<Accepted>> {
    insert_rows(conn, events, &stored_bodies(events.iter().copied()))
}

fn insert_rows(
    conn: &mut WriterConnection,
    events: &[&NewEvent],
    bodies: &[String],
) -> Result<Vec<Accepted>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let columns = [
        Column::texts(events, |e| Some(e.event.source.as_str())),
        Column::texts(events, |e| Some(e.event.id.as_str())),
        Column::texts(events, |e| Some(e.event.event_type.trigger_name())),
        Column::texts(events, |e| Some(e.event.contact_id())),
        Column::ints(events, |e| Some(e.event.time.timestamp_millis())),
        Column::times(events, |e| Some(e.received)),
        Column::texts(bodies, |b| Some(b.as_str())),
    ];
    // No `RETURNING`: it would open (and truncate) a statement journal for every row; a row
    // is new when its run stored it.
    let stored = conn.changed_rows(
        "INSERT INTO events (source, id, type, contact_id, time_ms, received_ms, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (source, id) DO NOTHING",
        &[Param::Rows(&columns)],
    )?;
    Ok(stored.into_iter().map(Accepted::of_stored).collect())
}
