//! Dispatch, written once for both backends: one batch of stored events, in order, becomes the
//! membership projection and the planner's runs, exits and resumes, in one transaction with the
//! events marked dispatched, so a crash applies all of it or none. Each backend supplies its
//! statements (`sqlite/dispatch.rs`, `postgres/dispatch.rs`), its projection and the
//! transaction around a batch.

use super::sql::{Column, On, Param, Tx, limit_param, statement, text, text_list};
use super::{Backend, distinct, first_per_key};
use crate::backend::sqlite::FromSqliteRow;
use crate::decode::parse_stored_event;
use crate::erasure::AddressKey;
use crate::{
    ContactId, ContactRow, DispatchInput, DispatchRequest, EnrollmentCounts, LiveRun, Result,
    Timestamp, WorkflowId, projection,
};
use herald_core::CourseEvent;
use std::collections::HashMap;

/// Runs one dispatch pass: on SQLite in the writer's group (undone when the planner postpones),
/// on PostgreSQL in a transaction that holds the dispatchers' lock (see [`Tx::lock_dispatch`]),
/// tried again after a deadlock, and committed without waiting for the WAL flush (a pass a
/// server crash loses is done again from the stored events; see `PgStore::relaxed`).
pub(crate) async fn dispatch(
    backend: &Backend,
    request: DispatchRequest<'_>,
    address_key: Option<&AddressKey>,
) -> Result<usize> {
    match backend {
        Backend::Sqlite(b) => {
            let mut group = b.writer.lead().await?;
            match dispatch_batch(On::Sqlite(group.conn()), request, address_key).await {
                Ok(Dispatched::Events(n)) => group.finish(Ok(n)).await,
                Ok(Dispatched::Postponed) => group.undo(0).await,
                Err(e) => group.finish(Err(e)).await,
            }
        }
        Backend::Postgres(b) => {
            super::postgres::retrying!("dispatch", async {
                let mut tx = b.relaxed.begin().await?;
                match dispatch_batch(On::Postgres(&mut *tx), request, address_key).await? {
                    Dispatched::Events(n) => {
                        tx.commit().await?;
                        Ok(n)
                    }
                    // Rolled back: the events stay undispatched.
                    Dispatched::Postponed => Ok(0),
                }
            })
        }
    }
}

/// What one dispatch did.
enum Dispatched {
    Events(usize),
    /// The planner needs workflow versions not loaded yet: the batch is undone and waits.
    Postponed,
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct EventRow {
    seq: i64,
    body: String,
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct CountRow {
    contact_id: ContactId,
    workflow_id: WorkflowId,
    total: i64,
    recent: i64,
    live: bool,
}

/// Plans and applies one batch of undispatched events with their membership projection, on the
/// caller's transaction.
async fn dispatch_batch(
    mut tx: Tx<'_>,
    request: DispatchRequest<'_>,
    address_key: Option<&AddressKey>,
) -> Result<Dispatched> {
    let DispatchRequest {
        limit,
        clock,
        loop_window,
        contact_states,
        planner,
    } = request;
    tx.lock_dispatch().await?;
    let rows: Vec<EventRow> = tx
        .at()
        .fetch_all(statement!(dispatch::UNDISPATCHED), &[limit_param(limit)])
        .await?;
    if rows.is_empty() {
        return Ok(Dispatched::Events(0));
    }
    // Read after the batch is selected: waiting for the database must not age the reading.
    let now = clock();
    let events = rows
        .iter()
        .map(|r| Ok((r.seq, parse_stored_event(&r.body)?)))
        .collect::<Result<Vec<_>>>()?;
    let contacts: Vec<ContactId> = distinct(events.iter().map(|(_, e)| e.contact_id()))
        .into_iter()
        .map(ContactId::from)
        .collect();
    super::membership::project(tx.at(), &events).await?;
    end_learner_access(tx.at(), &projection::lost_an_offer(&events), now).await?;
    if let Some(key) = address_key {
        opt_out_suppressed_addresses(tx.at(), key, &events, now).await?;
    }
    let contact_rows: Vec<ContactRow> = tx
        .at()
        .fetch_all(statement!(dispatch::CONTACTS), &[text_list(&contacts)])
        .await?;
    let states = if contact_states {
        Some(super::enroll::contact_states_on(tx.at(), &contacts).await?)
    } else {
        None
    };
    let live_runs: Vec<LiveRun> = tx
        .at()
        .fetch_all(statement!(dispatch::LIVE_RUNS), &[text_list(&contacts)])
        .await?;
    let counts: Vec<CountRow> = tx
        .at()
        .fetch_all(
            statement!(dispatch::ENROLLMENT_COUNTS),
            &[Param::from(now - loop_window), text_list(&contacts)],
        )
        .await?;

    let input = DispatchInput {
        now,
        events,
        live_runs,
        counts: counts
            .into_iter()
            .map(|c| {
                let counts = EnrollmentCounts {
                    total: c.total,
                    recent: c.recent,
                    live: c.live,
                };
                ((c.contact_id, c.workflow_id), counts)
            })
            .collect(),
        contacts: contact_rows
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect(),
        states,
    };
    let plan = planner(&input);
    if plan.postponed {
        return Ok(Dispatched::Postponed);
    }

    super::runs::insert_runs(tx.at(), &plan.new_runs, now).await?;
    // As if applied one by one: the first exit of a run ends it and later ones find it ended;
    // the first resume of a run resumes it.
    let exits = first_per_key(&plan.exits, |e| e.run_id.as_str());
    if !exits.is_empty() {
        let rows = [
            Column::texts(exits.iter().copied(), |e| Some(&e.run_id)),
            Column::texts(exits.iter().copied(), |e| Some(&e.reason)),
        ];
        let params = [Param::Rows(&rows), Param::from(now)];
        tx.at()
            .execute(statement!(dispatch::EXIT_RUNS), &params)
            .await?;
        // Messages the exited runs still had queued are not sent; those being sent under a live
        // lease are left to their outcome.
        tx.at()
            .execute(statement!(dispatch::CANCEL_EXITED_MESSAGES), &params)
            .await?;
    }
    let resumes = first_per_key(&plan.resumes, |r| r.run_id.as_str());
    if !resumes.is_empty() {
        let rows = [
            Column::texts(resumes.iter().copied(), |r| Some(&r.run_id)),
            Column::ints(resumes.iter().copied(), |r| Some(r.event_seq)),
        ];
        tx.at()
            .execute(
                statement!(dispatch::RESUME_RUNS),
                &[Param::Rows(&rows), Param::from(now)],
            )
            .await?;
    }
    let seqs: Vec<i64> = input.events.iter().map(|(s, _)| *s).collect();
    tx.at()
        .execute(statement!(dispatch::MARK_DISPATCHED), &[Param::Ints(&seqs)])
        .await?;
    Ok(Dispatched::Events(input.events.len()))
}

/// Revokes the learner links and ends the learner sessions of those of `contacts` that hold no
/// active offer grant any more.
async fn end_learner_access(mut tx: Tx<'_>, contacts: &[&str], now: Timestamp) -> Result<()> {
    if contacts.is_empty() {
        return Ok(());
    }
    let params = [Param::from(now), text_list(contacts)];
    tx.at()
        .execute(statement!(dispatch::END_LEARNER_LINKS), &params)
        .await?;
    tx.at()
        .execute(statement!(dispatch::END_LEARNER_SESSIONS), &params)
        .await?;
    Ok(())
}

/// Opts the contacts of a batch out again where their address belongs to an erased contact who
/// had opted out (kept as a keyed hash).
async fn opt_out_suppressed_addresses(
    mut tx: Tx<'_>,
    key: &AddressKey,
    events: &[(i64, CourseEvent)],
    now: Timestamp,
) -> Result<()> {
    let facts = projection::contacts(events);
    let hashes = key.hashes_of(facts.iter().map(|c| (c.id, c.fields[0], c.fields[1])));
    if hashes.is_empty() {
        return Ok(());
    }
    let all: Vec<&str> = hashes.iter().map(|(_, _, h)| h.as_str()).collect();
    let suppressed: HashMap<String, String> = tx
        .at()
        .fetch_all::<(String, String)>(statement!(dispatch::SUPPRESSED), &[text_list(&all)])
        .await?
        .into_iter()
        .collect();
    for (contact, channel, hash) in &hashes {
        if let Some(source) = suppressed.get(hash) {
            let params = [
                text(contact),
                text(channel.as_str()),
                text(source),
                Param::from(now),
            ];
            tx.at().execute(super::opt_outs::OPT_OUT, &params).await?;
        }
    }
    Ok(())
}
