//! Storing events on PostgreSQL: one multi-row insert per batch, atomic on its own.

use super::retrying;
use crate::{Accepted, NewEvent, Result};
use sqlx::{PgExecutor, Row};

impl super::PgStore {
    pub(crate) async fn insert_events(&self, events: Vec<NewEvent>) -> Result<Vec<Accepted>> {
        let events: Vec<&NewEvent> = events.iter().collect();
        retrying!("insert events", insert_event_rows(&self.pool, &events))
    }
}

/// Inserts events with one multi-row statement; `RETURNING` names the rows that were new, and of
/// several copies of one event in the batch the first is the new one.
pub(crate) async fn insert_event_rows<'c>(
    exec: impl PgExecutor<'c>,
    events: &[&NewEvent],
) -> Result<Vec<Accepted>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let n = events.len();
    let (mut sources, mut ids, mut types, mut contacts) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut times, mut received, mut bodies) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for e in events {
        let ev = &e.event;
        sources.push(ev.source.as_str());
        ids.push(ev.id.as_str());
        types.push(ev.event_type.trigger_name());
        contacts.push(ev.contact_id());
        times.push(ev.time.timestamp_millis());
        received.push(e.received.millis());
        bodies.push(ev.to_json().to_string());
    }
    let rows = sqlx::query(
        "INSERT INTO events (source, id, type, contact_id, time_ms, received_ms, body)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::text[])
         ON CONFLICT (source, id) DO NOTHING
         RETURNING source, id",
    )
    .bind(&sources)
    .bind(&ids)
    .bind(&types)
    .bind(&contacts)
    .bind(&times)
    .bind(&received)
    .bind(&bodies)
    .fetch_all(exec)
    .await?;
    let stored = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let keys = events
        .iter()
        .map(|e| (e.event.source.as_str(), e.event.id.as_str()));
    Ok(crate::backend::stored_in_order(keys, stored)
        .into_iter()
        .map(Accepted::of_stored)
        .collect())
}
