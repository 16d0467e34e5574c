//! Writing runs, written once for both backends over [`super::sql`]: new runs with their steps
//! and messages, in one multi-row statement per table whatever the batch's size.

use super::sql::{Column, Param, Tx, statement};
use crate::{Result, RunWrite};
use std::collections::HashSet;

/// Inserts new runs with their effects; a conflict on the one-live-run key means the contact is
/// already in a live run of this workflow, and then nothing is written for that run.
pub(crate) async fn insert_runs(mut tx: Tx<'_>, runs: &[RunWrite], now_ms: i64) -> Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    let ended = |w: &RunWrite| (!w.state.is_live()).then_some(now_ms);
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
        Column::ints(runs, |w| w.due_ms),
        Column::ints(runs, ended),
    ];
    let mut inserted: HashSet<String> = tx
        .at()
        .fetch_scalars(
            statement!(runs::INSERT_RUNS),
            &[Param::Rows(&columns), Param::Int(now_ms)],
        )
        .await?
        .into_iter()
        .collect();
    // Of two writes with one run id only the first was inserted.
    let written: Vec<&RunWrite> = runs.iter().filter(|w| inserted.remove(&w.run_id)).collect();
    insert_run_effects(tx, &written, now_ms).await
}

/// The steps and messages of written runs, in order: steps numbered after the run's last one,
/// and at most one message per (run, step).
pub(crate) async fn insert_run_effects(
    mut tx: Tx<'_>,
    runs: &[&RunWrite],
    now_ms: i64,
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
            Column::ints(&steps, |(_, s)| Some(s.at_ms)),
        ];
        tx.at()
            .execute(
                statement!(runs::INSERT_RUN_STEPS),
                &[Param::Rows(&columns)],
            )
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
            Column::ints(&messages, |(_, m)| m.due_ms),
        ];
        tx.at()
            .execute(
                statement!(runs::INSERT_MESSAGES),
                &[Param::Rows(&columns), Param::Int(now_ms)],
            )
            .await?;
    }
    Ok(())
}
