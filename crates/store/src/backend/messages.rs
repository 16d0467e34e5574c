//! Messages, written once for both backends over [`super::sql`]: the deliverer's claims, lease
//! heartbeats and outcomes, and the dev mailbox.

use super::Backend;
use super::leases::{claim, under_current_lease};
use super::sql::{Column, Param, Statement, Tx, statement, text, text_list};
use crate::backend::sqlite::FromSqliteRow;
use crate::decode::{outcome_columns, parse_stored_event};
use crate::{
    Channel, ClaimedMessage, ContactRow, DeliveryResult, LeaseToken, MailboxItem, MessageId,
    MessageOutcome, Result, RunId, RunState, Timestamp, WorkflowId,
};
use std::time::Duration;

#[derive(sqlx::FromRow, FromSqliteRow)]
struct ClaimedMessageRow {
    id: MessageId,
    run_id: RunId,
    step_id: String,
    pc: i64,
    workflow_id: WorkflowId,
    workflow_version: String,
    #[sqlx(try_from = "String")]
    channel: Channel,
    recipient: Option<String>,
    header_message_id: String,
    attempts: i64,
    event: String,
    #[sqlx(flatten)]
    contact: ContactRow,
    opted_out: bool,
    first_on_channel: bool,
    #[sqlx(try_from = "String")]
    run_state: RunState,
    awaited: Option<String>,
}

/// Leases up to `limit` due messages (each after its run's earlier steps' messages) and reads
/// what sending them needs.
pub(crate) async fn claim_messages(
    backend: &Backend,
    now: Timestamp,
    limit: i64,
    lease: Duration,
) -> Result<Vec<ClaimedMessage>> {
    let (token, rows): (LeaseToken, Vec<ClaimedMessageRow>) = claim(
        backend,
        "claim messages",
        statement!(messages::CLAIM_MESSAGES),
        super::sqlite::messages::CLAIMED_MESSAGES,
        (now, limit, lease),
    )
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(ClaimedMessage {
                event: parse_stored_event(&r.event)?,
                awaited: r.awaited.as_deref().map(parse_stored_event).transpose()?,
                id: r.id,
                run_id: r.run_id,
                step_id: r.step_id,
                pc: r.pc,
                workflow_id: r.workflow_id,
                workflow_version: r.workflow_version,
                channel: r.channel,
                recipient: r.recipient,
                header_message_id: r.header_message_id,
                attempts: r.attempts,
                lease_token: token.clone(),
                contact: r.contact,
                opted_out: r.opted_out,
                first_on_channel: r.first_on_channel,
                run_state: r.run_state,
            })
        })
        .collect()
}

const EXTEND_LEASE: Statement = Statement::portable(
    "UPDATE messages SET locked_until_ms = $1 WHERE lease_token = $2 AND status = 'queued'",
);

/// Extends the lease of the messages of one claim still being delivered (heartbeat).
pub(crate) async fn extend_message_lease(
    backend: &Backend,
    lease_token: LeaseToken,
    until: Timestamp,
) -> Result<u64> {
    backend
        .write(
            "extend a message lease",
            (lease_token, until),
            |tx, (lease_token, until)| {
                Box::pin(async move {
                    let params = [Param::from(*until), text(lease_token)];
                    tx.execute(EXTEND_LEASE, &params).await
                })
            },
        )
        .await
}

/// Records delivery outcomes whose lease still holds: the message's new state, its dev mailbox
/// copy, and an email opt-out for an address that bounced.
pub(crate) async fn complete_messages(
    backend: &Backend,
    now: Timestamp,
    outcomes: Vec<MessageOutcome>,
) -> Result<()> {
    if outcomes.is_empty() {
        return Ok(());
    }
    backend
        .write(
            "complete messages",
            (now, outcomes),
            |tx, (now, outcomes)| Box::pin(complete_on(tx, *now, outcomes)),
        )
        .await
}

async fn complete_on(mut tx: Tx<'_>, now: Timestamp, outcomes: &[MessageOutcome]) -> Result<()> {
    let written = under_current_lease(
        tx.at(),
        statement!(messages::MESSAGE_LEASES),
        outcomes,
        |o| (o.message_id.as_str(), &o.lease_token),
        |o| tracing::warn!(message = %o.message_id, "message lease lost before delivery finished; outcome dropped"),
    )
    .await?;
    if written.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = written
        .iter()
        .map(|o| (*o, outcome_columns(&o.result, now)))
        .collect();
    let columns = [
        Column::texts(&rows, |(o, _)| Some(&o.message_id)),
        Column::texts(&rows, |(_, c)| Some(c.status.as_str())),
        Column::texts(&rows, |(_, c)| c.reason),
        Column::times(&rows, |(_, c)| c.due),
        Column::texts(&rows, |(_, c)| c.provider_id),
        Column::times(&rows, |(_, c)| c.sent),
        Column::texts(&rows, |(o, _)| o.subject.as_deref()),
        Column::ints(&rows, |(o, _)| o.segments),
        Column::ints(&rows, |(_, c)| Some(i64::from(c.attempted))),
    ];
    tx.at()
        .execute(
            statement!(messages::COMPLETE_MESSAGES),
            &[Param::Rows(&columns), Param::from(now)],
        )
        .await?;
    let mailbox: Vec<&MailboxItem> = written.iter().filter_map(|o| o.mailbox.as_ref()).collect();
    insert_mailbox(tx.at(), &mailbox).await?;
    let bounced: Vec<&MessageId> = written
        .iter()
        .filter(|o| matches!(o.result, DeliveryResult::Bounced { .. }))
        .map(|o| &o.message_id)
        .collect();
    if !bounced.is_empty() {
        tx.at()
            .execute(
                statement!(messages::OPT_OUT_BOUNCED),
                &[Param::from(now), text_list(&bounced)],
            )
            .await?;
    }
    Ok(())
}

/// Puts a message straight into the dev mailbox (system emails outside a workflow run).
pub(crate) async fn add_to_mailbox(backend: &Backend, item: MailboxItem) -> Result<()> {
    backend
        .write("add to the mailbox", item, |tx, item| {
            Box::pin(async move { insert_mailbox(tx, &[item]).await })
        })
        .await
}

async fn insert_mailbox(tx: Tx<'_>, items: &[&MailboxItem]) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let columns = [
        Column::texts(items.iter().copied(), |m| Some(&m.id)),
        Column::texts(items.iter().copied(), |m| m.message_id.as_deref()),
        Column::texts(items.iter().copied(), |m| Some(m.channel.as_str())),
        Column::texts(items.iter().copied(), |m| m.sender.as_deref()),
        Column::texts(items.iter().copied(), |m| Some(&m.recipient)),
        Column::texts(items.iter().copied(), |m| m.subject.as_deref()),
        Column::texts(items.iter().copied(), |m| m.text_body.as_deref()),
        Column::texts(items.iter().copied(), |m| m.html_body.as_deref()),
        Column::times(items.iter().copied(), |m| Some(m.created_ms)),
    ];
    tx.execute(
        statement!(messages::INSERT_MAILBOX),
        &[Param::Rows(&columns)],
    )
    .await?;
    Ok(())
}
