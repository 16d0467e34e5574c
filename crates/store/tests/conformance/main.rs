//! The storage conformance suite: every test runs against both backends (`MODULE::sqlite::*` and
//! `MODULE::postgres::*`, through `conformance!`), so the two implementations keep the same
//! behaviour. One module per aggregate; the helpers they share are here. See `support.rs` for how
//! the databases are made (and when PostgreSQL tests skip).

mod support;

use herald_core::CourseEvent;
use herald_store::{
    Accepted, Channel, DeliveryResult, DispatchInput, DispatchPlan, DispatchRequest, ListFilter,
    MailboxItem, MessageOutcome, MessageStatus, NewEvent, NewMessage, RunState, RunWrite,
    StepRecord, Store, Timestamp,
};
use serde_json::{Value, json};
use std::sync::Mutex;
use std::time::Duration;
use support::TestDb;

/// Generates, for each listed test function `async fn name(db: &TestDb)`, one test per backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = crate::support::TestDb::sqlite().await;
                    super::$name(&db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(db) = crate::support::TestDb::postgres(stringify!($name)).await {
                        super::$name(&db).await;
                    }
                }
            )*
        }
    };
}

mod announcements;
mod dispatch;
mod events;
mod links;
mod lists;
mod messages;
mod migrations;
mod opt_outs;
mod postgres_only;
mod projection;
mod runs;
mod workflows;

/// A fixed instant (2023-11-14T22:13:20Z) all test times count from; the store never reads the
/// clock, so tests pass times explicitly.
const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);
const SOURCE: &str = "https://school.example.com";

/// A span of `n` milliseconds, the unit tests count in.
fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A course event of type `ty` (trigger name) at `time`, with `data` as the platform sends it.
fn course_event(id: &str, ty: &str, time: Timestamp, data: Value) -> CourseEvent {
    let envelope = json!({
        "specversion": "1.0", "id": id, "source": SOURCE, "type": format!("course.{ty}"),
        "time": time.to_string(), "data": data,
    });
    herald_core::event::parse_event(0, envelope, chrono::DateTime::UNIX_EPOCH)
        .expect("a valid test event")
}

fn new_event(id: &str, ty: &str, time: Timestamp, data: Value) -> NewEvent {
    NewEvent {
        event: course_event(id, ty, time, data),
        received: T0,
    }
}

/// A `new_signup` of `contact` with the given contact details.
fn signup(id: &str, contact: Value, time: Timestamp) -> NewEvent {
    new_event(id, "new_signup", time, json!({ "contact": contact }))
}

fn contact_event(id: &str, contact: &str, time: Timestamp) -> NewEvent {
    signup(id, json!({ "id": contact }), time)
}

async fn accept(store: &Store, events: Vec<NewEvent>) -> Vec<Accepted> {
    store.accept_events(events).await.expect("accept events")
}

fn no_plan(_: &DispatchInput) -> DispatchPlan {
    DispatchPlan::default()
}

/// Dispatches everything undispatched with a planner that plans nothing (projection only).
async fn project_all(store: &Store, now: Timestamp) {
    while store
        .dispatch(DispatchRequest::new(100, &|| now, Duration::MAX, &no_plan))
        .await
        .expect("dispatch")
        > 0
    {}
    assert_eq!(store.undispatched_count().await.unwrap(), 0);
}

/// A new run's first state, with no steps or messages yet.
fn run_write(
    run_id: &str,
    workflow: &str,
    contact: &str,
    event_seq: i64,
    state: RunState,
    due: Option<Timestamp>,
) -> RunWrite {
    RunWrite {
        run_id: run_id.into(),
        workflow_id: workflow.into(),
        workflow_version: "v1".into(),
        contact_id: contact.into(),
        event_seq,
        state,
        reason: None,
        pc: 0,
        wait_event: None,
        due,
        steps: Vec::new(),
        messages: Vec::new(),
    }
}

fn step(step_id: &str, outcome: &str, at_ms: Timestamp) -> StepRecord {
    StepRecord {
        step_id: step_id.into(),
        kind: "send_email".into(),
        outcome: outcome.into(),
        at_ms,
    }
}

fn queued_email(id: &str, step_id: &str, due: Timestamp) -> NewMessage {
    NewMessage {
        id: id.into(),
        step_id: step_id.into(),
        pc: 1,
        channel: Channel::Email,
        recipient: Some("ann@example.com".into()),
        header_message_id: format!("<{id}@herald.test>"),
        status: MessageStatus::Queued,
        reason: None,
        due: Some(due),
    }
}

/// Stores one event per entry of `runs` and dispatches them with a planner that creates exactly
/// those runs (each pinned to its own event). Returns after everything is dispatched.
async fn seed_runs(store: &Store, runs: Vec<RunWrite>, now: Timestamp) {
    let events: Vec<NewEvent> = runs
        .iter()
        .map(|r| contact_event(&format!("seed-{}", r.run_id), &r.contact_id, T0))
        .collect();
    accept(store, events).await;
    let runs = Mutex::new(runs);
    let planner = |input: &DispatchInput| {
        let mut runs = runs.lock().unwrap();
        let mut plan = DispatchPlan::default();
        for (seq, event) in &input.events {
            if let Some(run_id) = event.id.strip_prefix("seed-")
                && let Some(i) = runs.iter().position(|r| r.run_id == run_id)
            {
                let mut run = runs.remove(i);
                run.event_seq = *seq;
                plan.new_runs.push(run);
            }
        }
        plan
    };
    while store
        .dispatch(DispatchRequest::new(100, &|| now, Duration::MAX, &planner))
        .await
        .expect("dispatch")
        > 0
    {}
    assert!(
        runs.lock().unwrap().is_empty(),
        "every seeded run was planned"
    );
}

fn all() -> ListFilter {
    ListFilter {
        limit: 1000,
        ..ListFilter::default()
    }
}

async fn run_row(store: &Store, run_id: &str) -> herald_store::RunRow {
    store
        .runs(all())
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == run_id)
        .unwrap_or_else(|| panic!("run {run_id}"))
}

fn sorted<'a>(items: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = items.into_iter().collect();
    v.sort();
    v
}

fn strings(rows: Vec<Vec<Option<String>>>) -> Vec<Vec<String>> {
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .map(|c| c.unwrap_or_else(|| "NULL".into()))
                .collect()
        })
        .collect()
}

fn lesson_event(id: &str, contact: &str, product: Value, time: Timestamp) -> NewEvent {
    new_event(
        id,
        "lesson_completed",
        time,
        json!({"contact": {"id": contact}, "product": product, "lesson": {"id": "l1"}}),
    )
}

fn offer_event(id: &str, contact: &str, offer: Value, time: Timestamp) -> NewEvent {
    new_event(
        id,
        "offer_access_granted",
        time,
        json!({"contact": {"id": contact}, "offer": offer}),
    )
}

fn granted(id: &str, contact: &str, time: Timestamp) -> NewEvent {
    offer_event(id, contact, json!({"id": "o_pro"}), time)
}

fn outcome(m: &herald_store::ClaimedMessage, result: DeliveryResult) -> MessageOutcome {
    MessageOutcome {
        message_id: m.id.clone(),
        lease_token: m.lease_token.clone(),
        subject: Some(format!("Subject {}", m.id)),
        segments: Some(2),
        result,
        mailbox: None,
    }
}

fn mail(id: &str, created_ms: Timestamp) -> MailboxItem {
    MailboxItem {
        id: id.into(),
        message_id: Some(format!("<{id}@herald.test>")),
        channel: Channel::Email,
        sender: Some("Ada <ada@school.example.com>".into()),
        recipient: "ann@example.com".into(),
        subject: Some(format!("About {id}")),
        text_body: Some("Hello".into()),
        html_body: Some("<p>Hello</p>".into()),
        created_ms,
    }
}

/// Records a workflow's enabled state; returns how many runs that parked or resumed (none when
/// the stored state was already that).
async fn set_enabled(s: &Store, workflow_id: &str, enabled: bool, now: Timestamp) -> u64 {
    s.sync_workflow_states(vec![(workflow_id.into(), enabled)], now)
        .await
        .unwrap()
        .first()
        .map_or(0, |(_, _, runs)| *runs)
}
