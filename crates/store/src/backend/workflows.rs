//! Workflow versions and whether each workflow is enabled, written once for both backends.

use super::Backend;
use super::sql::{Param, Statement, Tx, text};
use crate::{Result, Timestamp, WorkflowId};

const SAVE_VERSION: Statement = Statement::portable(
    "INSERT INTO workflow_versions (workflow_id, version, bundle, created_ms) VALUES ($1, $2, $3, $4)
     ON CONFLICT (workflow_id, version) DO NOTHING",
);
/// Changes a row only when the state differs, so that the count says whether it changed.
const SET_STATE: Statement = Statement::portable(
    "INSERT INTO workflow_states (workflow_id, enabled, updated_ms) VALUES ($1, $2, $3)
     ON CONFLICT (workflow_id) DO UPDATE SET enabled = excluded.enabled, updated_ms = excluded.updated_ms
     WHERE workflow_states.enabled <> excluded.enabled",
);
/// A parked run keeps its pc, due time and awaited event, so resuming continues exactly where
/// it stood.
const PARK_RUNS: Statement = Statement::portable(
    "UPDATE runs SET state = 'parked', updated_ms = $1
     WHERE workflow_id = $2 AND state IN ('active', 'waiting_event')",
);
const RESUME_RUNS: Statement = Statement::portable(
    "UPDATE runs SET state = CASE WHEN wait_event IS NULL THEN 'active' ELSE 'waiting_event' END,
            updated_ms = $1
     WHERE workflow_id = $2 AND state = 'parked'",
);
/// The queued messages of parked (or just completed) runs that no send holds.
const CANCEL_PARKED_MESSAGES: Statement = Statement::portable(
    "UPDATE messages SET status = 'cancelled', reason = 'workflow disabled', due_ms = NULL,
            updated_ms = $1, locked_until_ms = NULL, lease_token = NULL
     WHERE status = 'queued' AND (locked_until_ms IS NULL OR locked_until_ms <= $1)
       AND run_id IN (SELECT id FROM runs WHERE workflow_id = $2 AND state IN ('parked', 'completed'))",
);

/// Stores workflow versions (id, version, bundle JSON); existing ones are kept. A reload saves a
/// handful, so one statement each is cheap.
pub(crate) async fn save_workflow_versions(
    backend: &Backend,
    versions: Vec<(WorkflowId, String, String)>,
    now: Timestamp,
) -> Result<()> {
    if versions.is_empty() {
        return Ok(());
    }
    backend
        .write(
            "save workflow versions",
            (versions, now),
            |mut tx, (versions, now)| {
                Box::pin(async move {
                    for (id, version, bundle) in versions {
                        let params = [text(id), text(version), text(bundle), Param::from(*now)];
                        tx.at().execute(SAVE_VERSION, &params).await?;
                    }
                    Ok(())
                })
            },
        )
        .await
}

/// Records whether each workflow is enabled; each whose stored state changed (or that is new)
/// parks or resumes its runs in the same transaction, so a restart with unchanged files touches
/// no run, and one with changed files catches up. Returns those (id, enabled, runs changed).
pub(crate) async fn sync_workflow_states(
    backend: &Backend,
    states: Vec<(WorkflowId, bool)>,
    now: Timestamp,
) -> Result<Vec<(WorkflowId, bool, u64)>> {
    backend
        .write(
            "sync workflow states",
            (states, now),
            |mut tx, (states, now)| {
                Box::pin(async move {
                    let mut changed = Vec::new();
                    for (id, enabled) in states {
                        let params = [text(id), Param::Bool(*enabled), Param::from(*now)];
                        if tx.at().execute(SET_STATE, &params).await? > 0 {
                            let runs = park_or_resume(&mut tx, id, !enabled, *now).await?;
                            changed.push((id.clone(), *enabled, runs));
                        }
                    }
                    Ok(changed)
                })
            },
        )
        .await
}

/// Parks the live runs of a workflow (cancelling the messages they had queued) or resumes its
/// parked ones where they stood.
async fn park_or_resume(
    tx: &mut Tx<'_>,
    workflow_id: &WorkflowId,
    parked: bool,
    now: Timestamp,
) -> Result<u64> {
    let params = [Param::from(now), text(workflow_id)];
    let statement = if parked { PARK_RUNS } else { RESUME_RUNS };
    let n = tx.at().execute(statement, &params).await?;
    if parked {
        tx.at().execute(CANCEL_PARKED_MESSAGES, &params).await?;
    }
    Ok(n)
}
