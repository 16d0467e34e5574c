//! Setting aside what keeps failing, written once for both backends: an event, run or message
//! marked dead with its last error, so the queue behind it goes on; and the operator's way back.

use super::Backend;
use super::sql::{Param, Statement, limit_param, text};
use crate::backend::sqlite::FromSqliteRow;
use crate::{DeadEventRow, MessageId, MessageStatus, Result, RunId, RunState, Timestamp};

/// Each backend's spelling of "not dispatched" is the one its partial index is declared with.
const SET_ASIDE_NEXT_EVENT: Statement = Statement {
    sqlite: "UPDATE events SET dispatched = 1, dead_error = $1, dead_ms = $2
             WHERE seq = (SELECT seq FROM events WHERE dispatched = 0 ORDER BY seq LIMIT 1)
             RETURNING source, id",
    postgres: "UPDATE events SET dispatched = TRUE, dead_error = $1, dead_ms = $2
               WHERE seq = (SELECT seq FROM events WHERE NOT dispatched ORDER BY seq LIMIT 1)
               RETURNING source, id",
};
const END_RUN: Statement = Statement::portable(
    "UPDATE runs SET state = $1, reason = $2, due_ms = NULL, ended_ms = $3, updated_ms = $3,
            locked_until_ms = NULL, lease_token = NULL
     WHERE id = $4 AND state IN ('active', 'waiting_event', 'parked')",
);
const RUN_STATE: Statement = Statement::portable("SELECT state FROM runs WHERE id = $1");
/// The run's queued messages that no send holds (an unexpired lease is a send under way).
const CANCEL_RUN_MESSAGES: Statement = Statement::portable(
    "UPDATE messages SET status = 'cancelled', reason = $3, due_ms = NULL,
            updated_ms = $1, locked_until_ms = NULL, lease_token = NULL
     WHERE run_id = $2 AND status = 'queued'
       AND (locked_until_ms IS NULL OR locked_until_ms <= $1)",
);
const RETRY_MESSAGE: Statement = Statement::portable(
    "UPDATE messages SET status = 'queued', attempts = 0, reason = NULL, due_ms = $1,
            updated_ms = $1, locked_until_ms = NULL, lease_token = NULL
     WHERE id = $2 AND status IN ('failed', 'dead')",
);
const MESSAGE_STATUS: Statement = Statement::portable("SELECT status FROM messages WHERE id = $1");
const SET_MESSAGE_DEAD: Statement = Statement::portable(
    "UPDATE messages SET status = 'dead', reason = $1, due_ms = NULL, updated_ms = $2,
            locked_until_ms = NULL, lease_token = NULL
     WHERE id = $3 AND status = 'queued'",
);
/// Events store the trigger name; the row carries the type as posted.
const DEAD_EVENTS: Statement = Statement::portable(
    "SELECT seq, source, id,
            CASE WHEN type = 'enrollment' THEN 'herald.enrollment' ELSE 'course.' || type END
              AS event_type,
            contact_id, dead_error AS error, received_ms, dead_ms
     FROM events WHERE dead_error IS NOT NULL AND seq > $1 ORDER BY seq LIMIT $2",
);

#[derive(sqlx::FromRow, FromSqliteRow)]
struct EventKey {
    source: String,
    id: String,
}

pub(crate) async fn set_aside_next_event(
    backend: &Backend,
    error: String,
    now: Timestamp,
) -> Result<Option<(String, String)>> {
    backend
        .write(
            "set aside an event",
            (error, now),
            |mut tx, (error, now)| {
                Box::pin(async move {
                    // The event set aside must be the one dispatch keeps failing on.
                    tx.lock_dispatch().await?;
                    let key: Option<EventKey> = tx
                        .at()
                        .fetch_optional(SET_ASIDE_NEXT_EVENT, &[text(error), Param::from(*now)])
                        .await?;
                    Ok(key.map(|k| (k.source, k.id)))
                })
            },
        )
        .await
}

pub(crate) async fn end_run(
    backend: &Backend,
    run_id: RunId,
    state: RunState,
    reason: String,
    now: Timestamp,
) -> Result<Option<RunState>> {
    let args = (run_id, state, reason, now);
    backend
        .write("end a run", args, |mut tx, (run_id, state, reason, now)| {
            Box::pin(async move {
                let params = [
                    text(state.as_str()),
                    text(reason),
                    Param::from(*now),
                    text(run_id),
                ];
                tx.at().execute(END_RUN, &params).await?;
                let after: Option<String> = tx
                    .at()
                    .fetch_optional_scalar(RUN_STATE, &[text(run_id)])
                    .await?;
                let reason = format!("run {}", state.as_str());
                let params = [Param::from(*now), text(run_id), text(&reason)];
                tx.at().execute(CANCEL_RUN_MESSAGES, &params).await?;
                after
                    .map(crate::decode::stored::<crate::RunState>)
                    .transpose()
            })
        })
        .await
}

pub(crate) async fn retry_message(
    backend: &Backend,
    message_id: MessageId,
    now: Timestamp,
) -> Result<Option<MessageStatus>> {
    backend
        .write(
            "retry a message",
            (message_id, now),
            |mut tx, (message_id, now)| {
                Box::pin(async move {
                    let params = [Param::from(*now), text(message_id)];
                    tx.at().execute(RETRY_MESSAGE, &params).await?;
                    let after: Option<String> = tx
                        .at()
                        .fetch_optional_scalar(MESSAGE_STATUS, &[text(message_id)])
                        .await?;
                    after
                        .map(crate::decode::stored::<crate::MessageStatus>)
                        .transpose()
                })
            },
        )
        .await
}

pub(crate) async fn set_message_dead(
    backend: &Backend,
    message_id: MessageId,
    error: String,
    now: Timestamp,
) -> Result<bool> {
    let args = (message_id, error, now);
    backend
        .write(
            "set a message dead",
            args,
            |tx, (message_id, error, now)| {
                Box::pin(async move {
                    let params = [text(error), Param::from(*now), text(message_id)];
                    Ok(tx.execute(SET_MESSAGE_DEAD, &params).await? > 0)
                })
            },
        )
        .await
}

pub(crate) async fn dead_events(
    backend: &Backend,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<DeadEventRow>> {
    backend
        .reader()
        .fetch_all(DEAD_EVENTS, &[Param::Int(after_seq), limit_param(limit)])
        .await
}
