//! Runs, written once for both backends over [`super::sql`]: new runs with their steps and
//! messages (one statement per table whatever the batch's size), and the stepper's
//! claims and results.

use super::Backend;
use super::leases::{claim, under_current_lease};
use super::sql::{Column, Param, Tx, statement};
use crate::backend::sqlite::FromSqliteRow;
use crate::decode::parse_stored_event;
use crate::{
    ClaimedRun, ContactRow, LeaseToken, Result, RunAdvance, RunId, RunState, RunWrite, Timestamp,
    WorkflowId,
};
use std::time::Duration;

#[derive(sqlx::FromRow, FromSqliteRow)]
struct ClaimedRunRow {
    id: RunId,
    workflow_id: WorkflowId,
    workflow_version: String,
    event_seq: i64,
    #[sqlx(try_from = "String")]
    state: RunState,
    pc: i64,
    event: String,
    /// The run's contact (`contact_id`) with the details the projection holds.
    #[sqlx(flatten)]
    contact: ContactRow,
    awaited: Option<String>,
}

/// Leases up to `limit` due runs and reads what stepping them needs.
pub(crate) async fn claim_runs(
    backend: &Backend,
    now: Timestamp,
    limit: i64,
    lease: Duration,
) -> Result<Vec<ClaimedRun>> {
    let (token, rows): (LeaseToken, Vec<ClaimedRunRow>) = claim(
        backend,
        "claim runs",
        statement!(runs::CLAIM_RUNS),
        super::sqlite::runs::CLAIMED_RUNS,
        (now, limit, lease),
    )
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(ClaimedRun {
                event: parse_stored_event(&r.event)?,
                awaited: r.awaited.as_deref().map(parse_stored_event).transpose()?,
                run_id: r.id,
                workflow_id: r.workflow_id,
                workflow_version: r.workflow_version,
                contact_id: r.contact.id.clone(),
                event_seq: r.event_seq,
                state: r.state,
                pc: r.pc,
                lease_token: token.clone(),
                contact: r.contact,
            })
        })
        .collect()
}

/// Writes advanced runs whose lease still holds, with their steps and messages.
pub(crate) async fn finish_runs(
    backend: &Backend,
    now: Timestamp,
    advances: Vec<RunAdvance>,
) -> Result<()> {
    if advances.is_empty() {
        return Ok(());
    }
    backend
        .write("finish runs", (now, advances), |tx, (now, advances)| {
            Box::pin(finish_on(tx, *now, advances))
        })
        .await
}

async fn finish_on(mut tx: Tx<'_>, now: Timestamp, advances: &[RunAdvance]) -> Result<()> {
    let written: Vec<&RunWrite> = under_current_lease(
        tx.at(),
        statement!(runs::RUN_LEASES),
        advances,
        |a| (a.write.run_id.as_str(), &a.lease_token),
        |a| tracing::warn!(run = %a.write.run_id, "run lease lost before its step finished; result dropped"),
    )
    .await?
    .into_iter()
    .map(|a| &a.write)
    .collect();
    if written.is_empty() {
        return Ok(());
    }
    let columns = [
        Column::texts(written.iter().copied(), |w| Some(&w.run_id)),
        Column::texts(written.iter().copied(), |w| Some(w.state.as_str())),
        Column::texts(written.iter().copied(), |w| w.reason.as_deref()),
        Column::ints(written.iter().copied(), |w| Some(w.pc)),
        Column::texts(written.iter().copied(), |w| w.wait_event.as_deref()),
        Column::times(written.iter().copied(), |w| w.due),
        Column::times(written.iter().copied(), |w| ended_at(w, now)),
    ];
    tx.at()
        .execute(
            statement!(runs::FINISH_RUNS),
            &[Param::Rows(&columns), Param::from(now)],
        )
        .await?;
    insert_run_effects(tx, &written, now).await
}

/// When a write ends its run: now, unless it leaves the run live.
fn ended_at(w: &RunWrite, now: Timestamp) -> Option<Timestamp> {
    (!w.state.is_live()).then_some(now)
}

/// Inserts new runs with their effects; a conflict on the one-live-run key means the contact is
/// already in a live run of this workflow, and then nothing is written for that run.
pub(crate) async fn insert_runs(mut tx: Tx<'_>, runs: &[RunWrite], now: Timestamp) -> Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    let columns = [
        Column::texts(runs, |w| Some(&w.run_id)),
        Column::texts(runs, |w| Some(&w.workflow_id)),
        Column::texts(runs, |w| Some(&w.workflow_version)),
        Column::texts(runs, |w| Some(&w.contact_id)),
        Column::ints(runs, |w| Some(w.event_seq)),
        Column::texts(runs, |w| Some(w.state.as_str())),
        Column::texts(runs, |w| w.reason.as_deref()),
        Column::ints(runs, |w| Some(w.pc)),
        Column::texts(runs, |w| w.wait_event.as_deref()),
        Column::times(runs, |w| w.due),
        Column::times(runs, |w| ended_at(w, now)),
    ];
    let ids: Vec<&str> = runs.iter().map(|w| w.run_id.as_str()).collect();
    let stored = tx
        .inserted(
            statement!(runs::INSERT_RUNS),
            &[Param::Rows(&columns), Param::from(now)],
            &ids,
        )
        .await?;
    // Of two writes with one run id only the first was inserted.
    let written: Vec<&RunWrite> = runs
        .iter()
        .zip(stored)
        .filter_map(|(w, stored)| stored.then_some(w))
        .collect();
    insert_run_effects(tx, &written, now).await
}

/// The steps and messages of written runs, in order: steps numbered after the run's last one,
/// and at most one message per (run, step).
pub(crate) async fn insert_run_effects(
    mut tx: Tx<'_>,
    runs: &[&RunWrite],
    now: Timestamp,
) -> Result<()> {
    let steps: Vec<_> = runs
        .iter()
        .flat_map(|w| w.steps.iter().map(move |s| (w.run_id.as_str(), s)))
        .collect();
    if !steps.is_empty() {
        let columns = [
            Column::texts(&steps, |(run, _)| Some(*run)),
            Column::texts(&steps, |(_, s)| Some(&s.step_id)),
            Column::texts(&steps, |(_, s)| Some(&s.kind)),
            Column::texts(&steps, |(_, s)| Some(&s.outcome)),
            Column::times(&steps, |(_, s)| Some(s.at_ms)),
        ];
        tx.at()
            .execute(statement!(runs::INSERT_RUN_STEPS), &[Param::Rows(&columns)])
            .await?;
    }
    let messages: Vec<_> = runs
        .iter()
        .flat_map(|w| w.messages.iter().map(move |m| (*w, m)))
        .collect();
    if !messages.is_empty() {
        let columns = [
            Column::texts(&messages, |(_, m)| Some(&m.id)),
            Column::texts(&messages, |(w, _)| Some(&w.run_id)),
            Column::texts(&messages, |(_, m)| Some(&m.step_id)),
            Column::ints(&messages, |(_, m)| Some(m.pc)),
            Column::texts(&messages, |(w, _)| Some(&w.workflow_id)),
            Column::texts(&messages, |(w, _)| Some(&w.contact_id)),
            Column::texts(&messages, |(_, m)| Some(m.channel.as_str())),
            Column::texts(&messages, |(_, m)| m.recipient.as_deref()),
            Column::texts(&messages, |(_, m)| Some(&m.header_message_id)),
            Column::texts(&messages, |(_, m)| Some(m.status.as_str())),
            Column::texts(&messages, |(_, m)| m.reason.as_deref()),
            Column::times(&messages, |(_, m)| m.due),
        ];
        tx.at()
            .execute(
                statement!(runs::INSERT_MESSAGES),
                &[Param::Rows(&columns), Param::from(now)],
            )
            .await?;
    }
    Ok(())
}
