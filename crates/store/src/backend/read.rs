//! The admin and engine reads, written once for both backends: each runs its backend's statement
//! of the same name (`sqlite/read.rs`, `postgres/read.rs`) through [`super::sql`], and the rows
//! are decoded by column name into the model's types.

use super::sql::{Conn, Param, limit_param, statement, text_list};
use crate::backend::sqlite::FromSqliteRow;
use crate::decode::parse_stored_event;
use crate::{
    Channel, ContactEventRow, ContactId, ContactRow, GrantRow, ListFilter, MailboxItem, MessageId,
    MessageRow, MessageSource, QueueStats, Result, RunId, RunRow, StepRecord, Timestamp,
    WorkflowId,
};
use std::collections::HashMap;

pub(crate) async fn next_due(conn: Conn<'_>) -> Result<Option<Timestamp>> {
    conn.fetch_scalar(statement!(read::NEXT_DUE_MS), &[]).await
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct VersionRow {
    workflow_id: WorkflowId,
    version: String,
    bundle: String,
}

pub(crate) async fn live_workflow_versions(
    conn: Conn<'_>,
) -> Result<Vec<(WorkflowId, String, String)>> {
    let rows: Vec<VersionRow> = conn
        .fetch_all(statement!(read::LIVE_WORKFLOW_VERSIONS), &[])
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.workflow_id, r.version, r.bundle))
        .collect())
}

/// The newest `limit`, oldest first.
pub(crate) async fn contact_events(
    conn: Conn<'_>,
    contact_id: ContactId,
    limit: i64,
) -> Result<Vec<ContactEventRow>> {
    let mut rows: Vec<ContactEventRow> = conn
        .fetch_all(
            statement!(read::CONTACT_EVENTS),
            &[Param::Text(Some(&contact_id)), limit_param(limit)],
        )
        .await?;
    rows.reverse();
    Ok(rows)
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct BundleRow {
    bundle: String,
}

pub(crate) async fn workflow_version(
    conn: Conn<'_>,
    id: WorkflowId,
    version: String,
) -> Result<Option<String>> {
    let row: Option<BundleRow> = conn
        .fetch_optional(
            statement!(read::WORKFLOW_VERSION),
            &[Param::Text(Some(&id)), Param::Text(Some(&version))],
        )
        .await?;
    Ok(row.map(|r| r.bundle))
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct StateRow {
    workflow_id: WorkflowId,
    enabled: bool,
}

pub(crate) async fn workflow_states(conn: Conn<'_>) -> Result<Vec<(WorkflowId, bool)>> {
    let rows: Vec<StateRow> = conn
        .fetch_all(statement!(read::WORKFLOW_STATES), &[])
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.workflow_id, r.enabled))
        .collect())
}

pub(crate) async fn mailbox(conn: Conn<'_>, limit: i64) -> Result<Vec<MailboxItem>> {
    conn.fetch_all(statement!(read::MAILBOX), &[limit_param(limit)])
        .await
}

/// The filter's parameters, in the order the list statements number them.
fn list_params(f: &ListFilter) -> [Param<'_>; 5] {
    [
        Param::Text(f.contact_id.as_deref()),
        Param::Text(f.workflow_id.as_deref()),
        Param::Text(f.status.as_deref()),
        Param::Text(f.after.as_deref()),
        limit_param(f.limit),
    ]
}

pub(crate) async fn messages(conn: Conn<'_>, f: ListFilter) -> Result<Vec<MessageRow>> {
    conn.fetch_all(statement!(read::MESSAGES), &list_params(&f))
        .await
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct StepRow {
    run_id: RunId,
    #[sqlx(flatten)]
    step: StepRecord,
}

/// The runs and, in a second query for all of them at once, their steps.
pub(crate) async fn runs(conn: Conn<'_>, f: ListFilter) -> Result<Vec<RunRow>> {
    let mut runs: Vec<RunRow> = conn
        .fetch_all(statement!(read::RUNS), &list_params(&f))
        .await?;
    if runs.is_empty() {
        return Ok(runs);
    }
    let ids: Vec<&RunId> = runs.iter().map(|r| &r.id).collect();
    let rows: Vec<StepRow> = conn
        .fetch_all(statement!(read::RUN_STEPS), &[text_list(&ids)])
        .await?;
    let mut steps: HashMap<RunId, Vec<StepRecord>> = HashMap::new();
    for r in rows {
        steps.entry(r.run_id).or_default().push(r.step);
    }
    for run in &mut runs {
        run.steps = steps.remove(&run.id).unwrap_or_default();
    }
    Ok(runs)
}

pub(crate) async fn contact(conn: Conn<'_>, id: ContactId) -> Result<Option<ContactRow>> {
    conn.fetch_optional(statement!(read::CONTACT), &[Param::Text(Some(&id))])
        .await
}

pub(crate) async fn grants(conn: Conn<'_>, contact_id: ContactId) -> Result<Vec<GrantRow>> {
    conn.fetch_all(statement!(read::GRANTS), &[Param::Text(Some(&contact_id))])
        .await
}

pub(crate) async fn undispatched_count(conn: Conn<'_>) -> Result<i64> {
    conn.fetch_scalar(statement!(read::UNDISPATCHED_COUNT), &[])
        .await
}

pub(crate) async fn queue_stats(conn: Conn<'_>, now: Timestamp) -> Result<QueueStats> {
    conn.fetch_one(statement!(read::QUEUE_STATS), &[Param::from(now)])
        .await
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct MessageSourceRow {
    id: MessageId,
    workflow_id: WorkflowId,
    workflow_version: String,
    pc: i64,
    #[sqlx(try_from = "String")]
    channel: Channel,
    event: String,
    #[sqlx(flatten)]
    contact: ContactRow,
    awaited: Option<String>,
}

pub(crate) async fn message_sources(
    conn: Conn<'_>,
    ids: Vec<MessageId>,
) -> Result<Vec<MessageSource>> {
    let rows: Vec<MessageSourceRow> = conn
        .fetch_all(statement!(read::MESSAGE_SOURCES), &[text_list(&ids)])
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok(MessageSource {
                event: parse_stored_event(&r.event)?,
                awaited: r.awaited.as_deref().map(parse_stored_event).transpose()?,
                id: r.id,
                workflow_id: r.workflow_id,
                workflow_version: r.workflow_version,
                pc: r.pc,
                channel: r.channel,
                contact: r.contact,
            })
        })
        .collect()
}
