//! The storage conformance suite: every test runs against both backends (`sqlite::*` and
//! `postgres::*`), so the two implementations keep the same behaviour. See `support/mod.rs` for
//! how the databases are made (and when PostgreSQL tests skip).

mod support;

use herald_core::CourseEvent;
use herald_store::{
    Accepted, Channel, DeliveryResult, DispatchInput, DispatchPlan, LinkHolder, LinkKind,
    LinkRefusal, ListFilter, MailboxItem, MessageOutcome, MessageStatus, NewEvent, NewLink,
    NewMessage, NewSession, RunAdvance, RunExit, RunResume, RunState, RunWrite, Signals,
    StepRecord, Store,
};
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
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

conformance! {
    migrations_apply_and_reapply,
    accept_events_deduplicates_by_source_and_id,
    concurrent_accepts_store_each_event_once,
    contact_details_latest_event_wins_and_older_fills_gaps,
    grants_follow_event_time,
    catalogue_products_offers_and_offer_products,
    dispatch_applies_the_plan_in_one_go,
    dispatch_keeps_one_live_run_per_workflow_and_contact,
    dispatch_exits_and_resumes_runs,
    dispatch_takes_events_in_order_up_to_the_limit,
    concurrent_dispatchers_dispatch_each_event_once,
    dispatchers_take_turns_so_later_events_see_earlier_runs,
    claim_runs_holds_a_lease,
    finish_runs_drops_stale_leases_and_appends_effects,
    concurrent_claims_never_share_a_run,
    claim_and_complete_messages_for_every_result,
    one_message_per_run_and_step,
    mailbox_lists_newest_first,
    next_due_ms_is_the_earliest_due_work,
    workflow_versions_are_kept_and_live_ones_listed,
    parking_a_workflow_keeps_its_runs_wait_state,
    list_filters_and_cursor_pagination,
    magic_links_check_redeem_and_refuse,
    magic_links_regenerate_sessions_and_site_values,
    link_resends_are_rate_limited,
    portal_products_follow_active_grants,
    opt_outs_are_kept_per_channel_and_shown_to_claims,
    queue_stats_count_due_work,
    processes_hear_each_others_announcements,
    workflow_states_and_versions_are_read_back,
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A fixed instant (2023-11-14T22:13:20Z) all test times count from; the store never reads the
/// clock, so tests pass times explicitly.
const T0: i64 = 1_700_000_000_000;
const SOURCE: &str = "https://school.example.com";

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A course event of type `ty` (trigger name) at `time_ms`, with `data` as the platform sends it.
fn course_event(id: &str, ty: &str, time_ms: i64, data: Value) -> CourseEvent {
    let envelope = json!({
        "specversion": "1.0", "id": id, "source": SOURCE, "type": format!("course.{ty}"),
        "time": rfc3339(time_ms), "data": data,
    });
    herald_core::event::parse_event(0, envelope, chrono::DateTime::UNIX_EPOCH)
        .expect("a valid test event")
}

fn new_event(id: &str, ty: &str, time_ms: i64, data: Value) -> NewEvent {
    NewEvent {
        event: course_event(id, ty, time_ms, data),
        received_ms: T0,
    }
}

/// A `new_signup` of `contact` with the given contact details.
fn signup(id: &str, contact: Value, time_ms: i64) -> NewEvent {
    new_event(id, "new_signup", time_ms, json!({ "contact": contact }))
}

fn contact_event(id: &str, contact: &str, time_ms: i64) -> NewEvent {
    signup(id, json!({ "id": contact }), time_ms)
}

async fn accept(store: &Store, events: Vec<NewEvent>) -> Vec<Accepted> {
    store.accept_events(events).await.expect("accept events")
}

fn no_plan(_: &DispatchInput) -> DispatchPlan {
    DispatchPlan::default()
}

/// Dispatches everything undispatched with a planner that plans nothing (projection only).
async fn project_all(store: &Store, now_ms: i64) {
    while store
        .dispatch(100, now_ms, 0, &no_plan)
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
    due_ms: Option<i64>,
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
        due_ms,
        steps: Vec::new(),
        messages: Vec::new(),
    }
}

fn step(step_id: &str, outcome: &str, at_ms: i64) -> StepRecord {
    StepRecord {
        step_id: step_id.into(),
        kind: "send_email".into(),
        outcome: outcome.into(),
        at_ms,
    }
}

fn queued_email(id: &str, step_id: &str, due_ms: i64) -> NewMessage {
    NewMessage {
        id: id.into(),
        step_id: step_id.into(),
        pc: 1,
        channel: Channel::Email,
        recipient: Some("ann@example.com".into()),
        header_message_id: format!("<{id}@herald.test>"),
        status: MessageStatus::Queued,
        reason: None,
        due_ms: Some(due_ms),
    }
}

/// Stores one event per entry of `runs` and dispatches them with a planner that creates exactly
/// those runs (each pinned to its own event). Returns after everything is dispatched.
async fn seed_runs(store: &Store, runs: Vec<RunWrite>, now_ms: i64) {
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
        .dispatch(100, now_ms, 0, &planner)
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

async fn message_row(store: &Store, id: &str) -> herald_store::MessageRow {
    store
        .messages(all())
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("message {id}"))
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

fn row(cols: &[&str]) -> Vec<String> {
    cols.iter().map(|c| c.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Migrations

async fn migrations_apply_and_reapply(db: &TestDb) {
    // Once by connect; again explicitly, and again by a second store: harmless.
    db.store
        .backend()
        .migrate()
        .await
        .expect("migrating again is harmless");
    let second = db.open_another().await;
    second.ping().await.expect("ping");
    db.store.ping().await.expect("ping");

    let applied = strings(
        db.text_rows("SELECT CAST(version AS TEXT) FROM _sqlx_migrations ORDER BY version")
            .await,
    );
    let expected: Vec<Vec<String>> = migration_numbers(db.kind)
        .into_iter()
        .map(|n| vec![n.trim_start_matches('0').to_owned()])
        .collect();
    assert_eq!(applied, expected, "each migration applied exactly once");
    assert_eq!(db.store.undispatched_count().await.unwrap(), 0);
}

fn migration_numbers(kind: support::Kind) -> Vec<String> {
    let folder = match kind {
        support::Kind::Sqlite => "sqlite",
        support::Kind::Postgres => "postgres",
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../migrations")
        .join(folder);
    let mut numbers: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".sql"))
        .map(|name| name.split('_').next().unwrap().to_owned())
        .collect();
    numbers.sort();
    numbers
}

#[test]
fn both_backends_have_the_same_migration_numbers() {
    let sqlite = migration_numbers(support::Kind::Sqlite);
    let postgres = migration_numbers(support::Kind::Postgres);
    assert!(!sqlite.is_empty());
    assert_eq!(
        sqlite, postgres,
        "migrations/sqlite and migrations/postgres must list the same numbers"
    );
    let unique: BTreeSet<&String> = sqlite.iter().collect();
    assert_eq!(
        unique.len(),
        sqlite.len(),
        "no migration number is used twice"
    );
}

// ---------------------------------------------------------------------------------------------
// Events in

async fn accept_events_deduplicates_by_source_and_id(db: &TestDb) {
    let s = &db.store;
    let a = contact_event("evt_a", "c1", T0);
    let b = contact_event("evt_b", "c1", T0);
    let mut a_elsewhere = contact_event("evt_a", "c1", T0);
    a_elsewhere.event.source = "https://other.example.com".into();
    let got = accept(s, vec![a.clone(), b, a.clone(), a_elsewhere]).await;
    assert_eq!(
        got,
        [
            Accepted::New,
            Accepted::New,
            Accepted::Duplicate,
            Accepted::New
        ]
    );

    let got = accept(s, vec![a.clone(), contact_event("evt_c", "c2", T0), a]).await;
    assert_eq!(
        got,
        [Accepted::Duplicate, Accepted::New, Accepted::Duplicate]
    );
    assert_eq!(s.undispatched_count().await.unwrap(), 4);
    assert_eq!(accept(s, Vec::new()).await, []);

    // A duplicate has no further effect: one event was stored per (source, id).
    let seen = Mutex::new(Vec::new());
    let planner = |input: &DispatchInput| {
        seen.lock().unwrap().extend(
            input
                .events
                .iter()
                .map(|(_, e)| (e.source.clone(), e.id.clone())),
        );
        DispatchPlan::default()
    };
    assert_eq!(s.dispatch(100, T0, 0, &planner).await.unwrap(), 4);
    let seen = seen.into_inner().unwrap();
    assert_eq!(
        seen,
        [
            (SOURCE.to_owned(), "evt_a".to_owned()),
            (SOURCE.to_owned(), "evt_b".to_owned()),
            ("https://other.example.com".to_owned(), "evt_a".to_owned()),
            (SOURCE.to_owned(), "evt_c".to_owned()),
        ]
    );
}

async fn concurrent_accepts_store_each_event_once(db: &TestDb) {
    let other = db.open_another().await;
    let events: Vec<NewEvent> = (0..30)
        .map(|i| contact_event(&format!("evt_{i}"), &format!("c{}", i % 7), T0))
        .collect();
    let mut tasks = Vec::new();
    for k in 0..6 {
        let store = if k % 2 == 0 {
            db.store.clone()
        } else {
            other.clone()
        };
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            store.accept_events(events).await.expect("accept")
        }));
    }
    let mut new_per_event = vec![0; events.len()];
    for t in tasks {
        for (i, fate) in t.await.unwrap().into_iter().enumerate() {
            if fate == Accepted::New {
                new_per_event[i] += 1;
            }
        }
    }
    assert_eq!(
        new_per_event,
        vec![1; events.len()],
        "each event is new for exactly one caller"
    );
    assert_eq!(db.store.undispatched_count().await.unwrap(), 30);
}

// ---------------------------------------------------------------------------------------------
// Membership projection

async fn contact_details_latest_event_wins_and_older_fills_gaps(db: &TestDb) {
    let s = &db.store;
    let first = |c: &str| {
        signup(
            &format!("{c}-1"),
            json!({"id": c, "email": "a@example.com", "first_name": "Ann",
                                          "custom_fields": {"company": "Acme"}}),
            T0 + 2_000,
        )
    };
    let second = |c: &str| {
        signup(
            &format!("{c}-2"),
            json!({"id": c, "email": "b@example.com"}),
            T0 + 3_000,
        )
    };
    // Older than both, arriving last: overwrites nothing, fills what is missing.
    let late = |c: &str| {
        signup(
            &format!("{c}-3"),
            json!({"id": c, "email": "old@example.com", "first_name": "Old",
                                          "phone": "+15551234567", "last_name": "Lee", "timezone": "Europe/Berlin",
                                          "custom_fields": {"company": "Old Co"}}),
            T0 + 1_000,
        )
    };
    let expected = |c: &str| herald_store::ContactRow {
        id: c.into(),
        email: Some("b@example.com".into()),
        phone: Some("+15551234567".into()),
        first_name: Some("Ann".into()),
        last_name: Some("Lee".into()),
        timezone: Some("Europe/Berlin".into()),
        custom_fields: Some(json!({"company": "Acme"}).to_string()),
    };

    // Across dispatches...
    accept(s, vec![first("c1"), second("c1")]).await;
    project_all(s, T0).await;
    let c1 = s.contact("c1".into()).await.unwrap().unwrap();
    assert_eq!(c1.email.as_deref(), Some("b@example.com"));
    assert_eq!(c1.phone, None);
    accept(s, vec![late("c1")]).await;
    project_all(s, T0).await;
    assert_eq!(s.contact("c1".into()).await.unwrap(), Some(expected("c1")));

    // ...and within one batch, in other arrival orders. (Details carry one time per contact,
    // not per field: a field an older event filled stays until a newer event sets it.)
    accept(s, vec![first("c2"), late("c2"), second("c2")]).await;
    accept(s, vec![second("c3"), first("c3"), late("c3")]).await;
    project_all(s, T0).await;
    assert_eq!(s.contact("c2".into()).await.unwrap(), Some(expected("c2")));
    assert_eq!(s.contact("c3".into()).await.unwrap(), Some(expected("c3")));

    // A newer event with the same field replaces it; equal times: the later arrival wins.
    accept(
        s,
        vec![signup(
            "c1-4",
            json!({"id": "c1", "first_name": "Anna"}),
            T0 + 3_000,
        )],
    )
    .await;
    project_all(s, T0).await;
    let c1 = s.contact("c1".into()).await.unwrap().unwrap();
    assert_eq!(
        (c1.first_name.as_deref(), c1.email.as_deref()),
        (Some("Anna"), Some("b@example.com"))
    );

    assert_eq!(s.contact("nobody".into()).await.unwrap(), None);
}

fn grant_event(id: &str, ty: &str, contact: &str, item: &str, time_ms: i64) -> NewEvent {
    let data = if ty.starts_with("offer") {
        json!({"contact": {"id": contact}, "offer": {"id": item}})
    } else {
        json!({"contact": {"id": contact}, "product": {"id": item}})
    };
    new_event(id, ty, time_ms, data)
}

async fn grants_follow_event_time(db: &TestDb) {
    let s = &db.store;
    let g = |kind: &str, item: &str, active: bool, changed: i64| herald_store::GrantRow {
        kind: kind.into(),
        item_id: item.into(),
        active,
        changed_ms: changed,
    };
    // One batch: a grant, then an older removal arriving late (must not undo it); a removal,
    // then an older grant arriving late.
    accept(
        s,
        vec![
            grant_event("g1", "offer_access_granted", "c1", "o_pro", T0 + 2_000),
            grant_event("g2", "offer_access_removed", "c1", "o_pro", T0 + 1_000),
            grant_event("g3", "product_access_removed", "c1", "p_rust", T0 + 3_000),
            grant_event("g4", "product_access_granted", "c1", "p_rust", T0 + 2_500),
            grant_event("g5", "offer_access_granted", "c2", "o_pro", T0),
        ],
    )
    .await;
    project_all(s, T0).await;
    assert_eq!(
        s.grants("c1".into()).await.unwrap(),
        [
            g("offer", "o_pro", true, T0 + 2_000),
            g("product", "p_rust", false, T0 + 3_000)
        ]
    );

    // Across batches: a late older event is still ignored; a newer one applies; at equal times
    // the later arrival wins.
    accept(
        s,
        vec![grant_event(
            "g6",
            "offer_access_removed",
            "c1",
            "o_pro",
            T0 + 1_500,
        )],
    )
    .await;
    project_all(s, T0).await;
    accept(
        s,
        vec![
            grant_event("g7", "offer_access_granted", "c1", "o_basic", T0 + 5_000),
            grant_event("g8", "offer_access_removed", "c1", "o_basic", T0 + 5_000),
            grant_event("g9", "product_access_granted", "c1", "p_rust", T0 + 4_000),
        ],
    )
    .await;
    project_all(s, T0).await;
    assert_eq!(
        s.grants("c1".into()).await.unwrap(),
        [
            g("offer", "o_basic", false, T0 + 5_000),
            g("offer", "o_pro", true, T0 + 2_000),
            g("product", "p_rust", true, T0 + 4_000),
        ]
    );
    accept(
        s,
        vec![grant_event(
            "g10",
            "offer_access_removed",
            "c1",
            "o_pro",
            T0 + 6_000,
        )],
    )
    .await;
    project_all(s, T0).await;
    assert_eq!(
        s.grants("c1".into()).await.unwrap()[1],
        g("offer", "o_pro", false, T0 + 6_000)
    );
    // Other contacts are untouched; non-grant events make no grants.
    assert_eq!(
        s.grants("c2".into()).await.unwrap(),
        [g("offer", "o_pro", true, T0)]
    );
    accept(s, vec![contact_event("n1", "c3", T0)]).await;
    project_all(s, T0).await;
    assert_eq!(s.grants("c3".into()).await.unwrap(), []);
}

fn lesson_event(id: &str, contact: &str, product: Value, time_ms: i64) -> NewEvent {
    new_event(
        id,
        "lesson_completed",
        time_ms,
        json!({"contact": {"id": contact}, "product": product, "lesson": {"id": "l1"}}),
    )
}

fn offer_event(id: &str, contact: &str, offer: Value, time_ms: i64) -> NewEvent {
    new_event(
        id,
        "offer_access_granted",
        time_ms,
        json!({"contact": {"id": contact}, "offer": offer}),
    )
}

async fn catalogue(db: &TestDb) -> (Vec<Vec<String>>, Vec<Vec<String>>, Vec<Vec<String>>) {
    let products =
        strings(db.text_rows("SELECT id, title, url, CAST(updated_ms - 1700000000000 AS TEXT) FROM products ORDER BY id").await);
    let offers = strings(
        db.text_rows(
            "SELECT id, title, CAST(updated_ms - 1700000000000 AS TEXT) FROM offers ORDER BY id",
        )
        .await,
    );
    let offer_products = strings(
        db.text_rows(
            "SELECT offer_id, product_id FROM offer_products ORDER BY offer_id, product_id",
        )
        .await,
    );
    (products, offers, offer_products)
}

async fn catalogue_products_offers_and_offer_products(db: &TestDb) {
    let s = &db.store;
    accept(
        s,
        vec![
            lesson_event(
                "e1",
                "c1",
                json!({"id": "p1", "title": "Rust 101", "url": "https://s/p1"}),
                T0 + 2_000,
            ),
            // Older, later: keeps the newer title, fills nothing (nothing is missing).
            lesson_event(
                "e2",
                "c1",
                json!({"id": "p1", "title": "Old title", "url": "https://s/old"}),
                T0 + 1_000,
            ),
            offer_event(
                "e3",
                "c1",
                json!({"id": "o1", "product_ids": ["p1", "p2"]}),
                T0 + 3_000,
            ),
            // The offer created p2 without a title; an older event describing p2 fills it in.
            lesson_event(
                "e4",
                "c1",
                json!({"id": "p2", "title": "Async"}),
                T0 + 1_000,
            ),
            // An older offer event: its product list is ignored and p3 is not created; its title
            // fills the missing one.
            offer_event(
                "e5",
                "c1",
                json!({"id": "o1", "title": "Pro", "product_ids": ["p3"]}),
                T0 + 2_000,
            ),
        ],
    )
    .await;
    project_all(s, T0).await;
    let (products, offers, offer_products) = catalogue(db).await;
    assert_eq!(
        products,
        [
            row(&["p1", "Rust 101", "https://s/p1", "2000"]),
            row(&["p2", "Async", "NULL", "3000"])
        ]
    );
    assert_eq!(offers, [row(&["o1", "Pro", "3000"])]);
    assert_eq!(offer_products, [row(&["o1", "p1"]), row(&["o1", "p2"])]);

    // A newer offer event replaces the list (creating unknown products); a newer one without a
    // list keeps it; several in one batch: the last newer list wins.
    accept(
        s,
        vec![
            offer_event(
                "e6",
                "c2",
                json!({"id": "o1", "title": "Pro 2", "product_ids": ["p2", "p4"]}),
                T0 + 5_000,
            ),
            offer_event(
                "e7",
                "c2",
                json!({"id": "o2", "product_ids": ["p5"]}),
                T0 + 5_000,
            ),
            offer_event(
                "e8",
                "c2",
                json!({"id": "o2", "product_ids": ["p5", "p6"]}),
                T0 + 6_000,
            ),
            offer_event(
                "e9",
                "c2",
                json!({"id": "o2", "product_ids": ["p7"]}),
                T0 + 4_000,
            ),
        ],
    )
    .await;
    project_all(s, T0).await;
    accept(
        s,
        vec![offer_event(
            "e10",
            "c2",
            json!({"id": "o1", "title": "Pro 3"}),
            T0 + 7_000,
        )],
    )
    .await;
    project_all(s, T0).await;
    let (products, offers, offer_products) = catalogue(db).await;
    assert_eq!(
        products,
        [
            row(&["p1", "Rust 101", "https://s/p1", "2000"]),
            row(&["p2", "Async", "NULL", "3000"]),
            row(&["p4", "NULL", "NULL", "5000"]),
            row(&["p5", "NULL", "NULL", "5000"]),
            row(&["p6", "NULL", "NULL", "6000"]),
        ]
    );
    assert_eq!(
        offers,
        [row(&["o1", "Pro 3", "7000"]), row(&["o2", "NULL", "6000"])]
    );
    assert_eq!(
        offer_products,
        [
            row(&["o1", "p2"]),
            row(&["o1", "p4"]),
            row(&["o2", "p5"]),
            row(&["o2", "p6"])
        ]
    );

    // A product first named by an offer and described by a later event of the same batch.
    accept(
        s,
        vec![
            offer_event(
                "e11",
                "c3",
                json!({"id": "o3", "product_ids": ["p8"]}),
                T0 + 8_000,
            ),
            lesson_event(
                "e12",
                "c3",
                json!({"id": "p8", "title": "Eight", "url": "https://s/p8"}),
                T0 + 9_000,
            ),
            lesson_event(
                "e13",
                "c3",
                json!({"id": "p8", "title": "Eight (old)"}),
                T0 + 8_500,
            ),
        ],
    )
    .await;
    project_all(s, T0).await;
    let (products, _, _) = catalogue(db).await;
    assert_eq!(
        products.last().unwrap(),
        &row(&["p8", "Eight", "https://s/p8", "9000"])
    );
}

// ---------------------------------------------------------------------------------------------
// Dispatch

const WELCOME: &str = "wf_welcome";

/// The test planner: `offer_access_granted` starts a welcome run with a first step and a queued
/// email; `product_completed` exits the contact's live welcome runs; `lesson_completed` resumes
/// the contact's runs waiting for it; `new_signup` with `data.contact.first_name == "Wait"`
/// starts a run waiting for `lesson_completed`. Records what it was shown.
#[derive(Default)]
struct TestPlanner {
    seen: Mutex<Vec<DispatchInput>>,
}

impl TestPlanner {
    fn plan(&self, input: &DispatchInput, now_ms: i64) -> DispatchPlan {
        let mut plan = DispatchPlan::default();
        for (seq, e) in &input.events {
            let contact = e.contact_id();
            let run_id = format!("run_{}", e.id);
            match e.event_type.trigger_name() {
                "offer_access_granted" => {
                    let mut run = run_write(
                        &run_id,
                        WELCOME,
                        contact,
                        *seq,
                        RunState::Active,
                        Some(now_ms + 60_000),
                    );
                    run.pc = 1;
                    run.steps = vec![step("welcome", "sent", now_ms)];
                    run.messages = vec![queued_email(&format!("msg_{}", e.id), "welcome", now_ms)];
                    plan.new_runs.push(run);
                }
                "product_completed" => {
                    for live in input
                        .live_runs
                        .iter()
                        .filter(|r| r.contact_id == contact && r.workflow_id == WELCOME)
                    {
                        plan.exits.push(RunExit {
                            run_id: live.run_id.clone(),
                            reason: "goal reached".into(),
                        });
                    }
                }
                "lesson_completed" => {
                    for live in input.live_runs.iter().filter(|r| {
                        r.contact_id == contact
                            && r.wait_event.as_deref() == Some("lesson_completed")
                    }) {
                        plan.resumes.push(RunResume {
                            run_id: live.run_id.clone(),
                            event_seq: *seq,
                        });
                    }
                }
                "new_signup" if e.field("contact.first_name") == Some(json!("Wait")) => {
                    let mut run = run_write(
                        &run_id,
                        "wf_wait",
                        contact,
                        *seq,
                        RunState::WaitingEvent,
                        Some(now_ms + 86_400_000),
                    );
                    run.wait_event = Some("lesson_completed".into());
                    plan.new_runs.push(run);
                }
                _ => {}
            }
        }
        let copy = DispatchInput {
            events: input.events.clone(),
            live_runs: input.live_runs.clone(),
            counts: input.counts.clone(),
            contacts: input.contacts.clone(),
        };
        self.seen.lock().unwrap().push(copy);
        plan
    }

    async fn dispatch(&self, store: &Store, limit: i64, now_ms: i64) -> usize {
        store
            .dispatch(
                limit,
                now_ms,
                now_ms - 86_400_000,
                &|input: &DispatchInput| self.plan(input, now_ms),
            )
            .await
            .expect("dispatch")
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Vec<DispatchInput>> {
        self.seen.lock().unwrap()
    }
}

fn granted(id: &str, contact: &str, time_ms: i64) -> NewEvent {
    offer_event(id, contact, json!({"id": "o_pro"}), time_ms)
}

async fn dispatch_applies_the_plan_in_one_go(db: &TestDb) {
    let s = &db.store;
    let planner = TestPlanner::default();
    let now = T0 + 10_000;
    accept(s, vec![granted("e1", "c1", T0), granted("e2", "c2", T0)]).await;
    assert_eq!(s.undispatched_count().await.unwrap(), 2);
    assert_eq!(planner.dispatch(s, 100, now).await, 2);
    assert_eq!(s.undispatched_count().await.unwrap(), 0);
    assert_eq!(
        planner.dispatch(s, 100, now).await,
        0,
        "nothing left to dispatch"
    );

    // The projection ran in the same transaction.
    assert!(s.contact("c1".into()).await.unwrap().is_some());
    assert_eq!(s.grants("c2".into()).await.unwrap().len(), 1);

    let runs = s.runs(all()).await.unwrap();
    assert_eq!(runs.len(), 2);
    let r1 = &runs[0];
    assert_eq!(
        (
            r1.id.as_str(),
            r1.workflow_id.as_str(),
            r1.workflow_version.as_str(),
            r1.contact_id.as_str()
        ),
        ("run_e1", WELCOME, "v1", "c1")
    );
    assert_eq!(
        (r1.state, r1.pc, r1.due_ms, r1.reason.as_deref()),
        (RunState::Active, 1, Some(now + 60_000), None)
    );
    assert_eq!(
        (r1.created_ms, r1.updated_ms, r1.ended_ms),
        (now, now, None)
    );
    assert_eq!(r1.steps, [step("welcome", "sent", now)]);

    let messages = s.messages(all()).await.unwrap();
    assert_eq!(messages.len(), 2);
    let m = &messages[0];
    assert_eq!(
        (m.id.as_str(), m.run_id.as_str(), m.step_id.as_str()),
        ("msg_e1", "run_e1", "welcome")
    );
    assert_eq!(
        (m.workflow_id.as_str(), m.contact_id.as_str(), m.channel),
        (WELCOME, "c1", Channel::Email)
    );
    assert_eq!(
        (m.status, m.attempts, m.due_ms),
        (MessageStatus::Queued, 0, Some(now))
    );
    assert_eq!(
        (m.recipient.as_deref(), m.header_message_id.as_str()),
        (Some("ann@example.com"), "<msg_e1@herald.test>")
    );
    assert_eq!(
        (m.subject.as_deref(), m.provider_id.as_deref(), m.sent_ms),
        (None, None, None)
    );
    assert_eq!((m.created_ms, m.updated_ms), (now, now));

    // A non-live run (a refusal) is stored with its end time.
    let refused = {
        let mut r = run_write("run_refused", WELCOME, "c1", 1, RunState::Refused, None);
        r.reason = Some("re_entry".into());
        r
    };
    seed_runs(s, vec![refused], now).await;
    let r = run_row(s, "run_refused").await;
    assert_eq!(
        (r.state, r.reason.as_deref(), r.ended_ms),
        (RunState::Refused, Some("re_entry"), Some(now))
    );
}

async fn dispatch_keeps_one_live_run_per_workflow_and_contact(db: &TestDb) {
    let s = &db.store;
    let planner = TestPlanner::default();
    let now = T0 + 10_000;
    // Two grants of one contact in one batch: the planner plans two runs; the second is
    // silently not inserted, nor are its steps and messages.
    accept(
        s,
        vec![granted("e1", "c1", T0), granted("e2", "c1", T0 + 1)],
    )
    .await;
    assert_eq!(planner.dispatch(s, 100, now).await, 2);
    let runs = s.runs(all()).await.unwrap();
    assert_eq!(
        runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["run_e1"]
    );
    assert_eq!(
        s.messages(all())
            .await
            .unwrap()
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        ["msg_e1"]
    );

    // A later batch: the planner sees the live run and the counts; a second live run is still
    // refused by the key, while a refused (non-live) run may be stored beside it.
    accept(s, vec![granted("e3", "c1", T0 + 2)]).await;
    assert_eq!(planner.dispatch(s, 100, now + 1).await, 1);
    {
        let seen = planner.last();
        let input = seen.last().unwrap();
        assert_eq!(input.live_runs.len(), 1);
        let live = &input.live_runs[0];
        assert_eq!(
            (live.run_id.as_str(), live.workflow_id.as_str(), live.state),
            ("run_e1", WELCOME, RunState::Active)
        );
        assert_eq!(
            (
                live.workflow_version.as_str(),
                live.contact_id.as_str(),
                live.wait_event.as_deref()
            ),
            ("v1", "c1", None)
        );
        let counts = input.counts[&("c1".to_owned(), WELCOME.to_owned())];
        assert_eq!((counts.total, counts.recent, counts.live), (1, 1, true));
    }
    assert_eq!(s.runs(all()).await.unwrap().len(), 1);
    let mut refused = run_write("run_refused", WELCOME, "c1", 1, RunState::Refused, None);
    refused.reason = Some("loop".into());
    seed_runs(s, vec![refused], now).await;
    assert_eq!(s.runs(all()).await.unwrap().len(), 2);

    // Counts: refusals are not enrollments; `recent` counts from the window start.
    accept(s, vec![granted("e4", "c2", T0)]).await;
    assert_eq!(planner.dispatch(s, 100, now + 86_400_000 + 5).await, 1);
    accept(s, vec![granted("e5", "c1", T0 + 3)]).await;
    assert_eq!(planner.dispatch(s, 100, now + 86_400_000 + 10).await, 1);
    let seen = planner.last();
    let counts = seen.last().unwrap().counts[&("c1".to_owned(), WELCOME.to_owned())];
    assert_eq!(
        (counts.total, counts.recent, counts.live),
        (1, 0, true),
        "run_e1 is older than the window"
    );
    assert!(
        !seen
            .last()
            .unwrap()
            .counts
            .contains_key(&("c2".to_owned(), WELCOME.to_owned())),
        "only the batch's contacts"
    );
}

async fn dispatch_exits_and_resumes_runs(db: &TestDb) {
    let s = &db.store;
    let planner = TestPlanner::default();
    let now = T0 + 10_000;
    accept(
        s,
        vec![
            granted("e1", "c1", T0),
            signup("e2", json!({"id": "c2", "first_name": "Wait"}), T0),
        ],
    )
    .await;
    planner.dispatch(s, 100, now).await;
    let waiting = run_row(s, "run_e2").await;
    assert_eq!(
        (waiting.state, waiting.due_ms),
        (RunState::WaitingEvent, Some(now + 86_400_000))
    );

    // The goal event exits the run; the awaited event resumes the other, due at once.
    let later = now + 5_000;
    accept(
        s,
        vec![
            new_event(
                "e3",
                "product_completed",
                T0 + 1,
                json!({"contact": {"id": "c1"}, "product": {"id": "p1"}}),
            ),
            lesson_event("e4", "c2", json!({"id": "p1"}), T0 + 1),
        ],
    )
    .await;
    assert_eq!(planner.dispatch(s, 100, later).await, 2);
    {
        let seen = planner.last();
        let live = &seen.last().unwrap().live_runs;
        let waiting = live
            .iter()
            .find(|r| r.run_id == "run_e2")
            .expect("the waiting run is shown");
        assert_eq!(
            (waiting.state, waiting.wait_event.as_deref()),
            (RunState::WaitingEvent, Some("lesson_completed"))
        );
    }
    let exited = run_row(s, "run_e1").await;
    assert_eq!(
        (
            exited.state,
            exited.reason.as_deref(),
            exited.due_ms,
            exited.ended_ms,
            exited.updated_ms
        ),
        (
            RunState::Exited,
            Some("goal reached"),
            None,
            Some(later),
            later
        )
    );
    let resumed = run_row(s, "run_e2").await;
    assert_eq!(
        (
            resumed.state,
            resumed.due_ms,
            resumed.updated_ms,
            resumed.ended_ms
        ),
        (RunState::Active, Some(later), later, None)
    );
    let claimed = s.claim_runs(later, 10, 1_000).await.unwrap();
    assert_eq!(
        claimed
            .iter()
            .map(|c| c.run_id.as_str())
            .collect::<Vec<_>>(),
        ["run_e2"]
    );
    assert_eq!(
        claimed[0].awaited.as_ref().map(|e| e.id.as_str()),
        Some("e4"),
        "the claim carries the event that ended the wait"
    );

    // An exit or resume of a run that is not (or no longer) in that state changes nothing.
    let plan = |_: &DispatchInput| DispatchPlan {
        exits: vec![RunExit {
            run_id: "run_e1".into(),
            reason: "again".into(),
        }],
        resumes: vec![RunResume {
            run_id: "run_e1".into(),
            event_seq: 1,
        }],
        ..DispatchPlan::default()
    };
    accept(s, vec![contact_event("e5", "c1", T0)]).await;
    assert_eq!(s.dispatch(100, later + 1, 0, &plan).await.unwrap(), 1);
    let still = run_row(s, "run_e1").await;
    assert_eq!(
        (still.state, still.reason.as_deref(), still.updated_ms),
        (RunState::Exited, Some("goal reached"), later)
    );

    // With the run ended, the contact may be enrolled again.
    accept(s, vec![granted("e6", "c1", T0 + 2)]).await;
    planner.dispatch(s, 100, later + 2).await;
    assert_eq!(run_row(s, "run_e6").await.state, RunState::Active);
}

async fn dispatch_takes_events_in_order_up_to_the_limit(db: &TestDb) {
    let s = &db.store;
    let order = Mutex::new(Vec::new());
    let planner = |input: &DispatchInput| {
        let seqs: Vec<i64> = input.events.iter().map(|(seq, _)| *seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "events come in seq order"
        );
        order
            .lock()
            .unwrap()
            .extend(input.events.iter().map(|(_, e)| e.id.clone()));
        DispatchPlan::default()
    };
    accept(
        s,
        (0..3)
            .map(|i| contact_event(&format!("e{i}"), "c1", T0))
            .collect(),
    )
    .await;
    accept(
        s,
        (3..5)
            .map(|i| contact_event(&format!("e{i}"), "c2", T0))
            .collect(),
    )
    .await;
    let mut sizes = Vec::new();
    loop {
        let n = s.dispatch(2, T0, 0, &planner).await.unwrap();
        if n == 0 {
            break;
        }
        sizes.push(n);
    }
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(order.into_inner().unwrap(), ["e0", "e1", "e2", "e3", "e4"]);
    assert_eq!(s.undispatched_count().await.unwrap(), 0);
}

async fn concurrent_dispatchers_dispatch_each_event_once(db: &TestDb) {
    let other = db.open_another().await;
    let events: Vec<NewEvent> = (0..60)
        .map(|i| granted(&format!("e{i:02}"), &format!("c{i:02}"), T0))
        .collect();
    accept(&db.store, events).await;
    let planner = std::sync::Arc::new(TestPlanner::default());
    let mut tasks = Vec::new();
    for store in [db.store.clone(), other.clone(), db.store.clone(), other] {
        let planner = planner.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            loop {
                let got = planner.dispatch(&store, 7, T0 + 10_000).await;
                if got == 0 {
                    return n;
                }
                n += got;
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 60, "every event dispatched exactly once");
    let mut ids: Vec<String> = planner
        .last()
        .iter()
        .flat_map(|i| i.events.iter().map(|(_, e)| e.id.clone()))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 60, "no event planned twice");
    assert_eq!(db.store.runs(all()).await.unwrap().len(), 60);
    assert_eq!(db.store.undispatched_count().await.unwrap(), 0);
}

/// Two processes dispatching at once must not plan a contact's later event before the runs of its
/// earlier one are committed: here the goal event (`product_completed`) must find and exit the run
/// the first dispatcher is still creating.
async fn dispatchers_take_turns_so_later_events_see_earlier_runs(db: &TestDb) {
    let other = db.open_another().await;
    accept(&db.store, vec![granted("e1", "c1", T0)]).await;
    accept(
        &db.store,
        vec![new_event(
            "e2",
            "product_completed",
            T0 + 1,
            json!({"contact": {"id": "c1"}, "product": {"id": "p1"}}),
        )],
    )
    .await;

    // The first dispatcher stops inside its planner (inside its transaction) until released.
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let entered = Mutex::new(Some(entered_tx));
    let release = Mutex::new(release_rx);
    let slow = std::sync::Arc::new(move |input: &DispatchInput| {
        if let Some(tx) = entered.lock().unwrap().take() {
            let _ = tx.send(());
            let _ = release
                .lock()
                .unwrap()
                .recv_timeout(std::time::Duration::from_secs(10));
        }
        TestPlanner::default().plan(input, T0 + 10)
    });
    let first_store = db.store.clone();
    let first = tokio::spawn(async move {
        first_store
            .dispatch(1, T0 + 10, 0, &*slow)
            .await
            .expect("first dispatch")
    });
    entered_rx
        .await
        .expect("the first dispatcher reached its planner");

    let second =
        tokio::spawn(async move { TestPlanner::default().dispatch(&other, 10, T0 + 20).await });
    // Give the second dispatcher the chance to (wrongly) go ahead, then let the first finish.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    release_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap(), 1);
    assert_eq!(second.await.unwrap(), 1);
    let run = run_row(&db.store, "run_e1").await;
    assert_eq!(
        (run.state, run.reason.as_deref()),
        (RunState::Exited, Some("goal reached"))
    );
}

// ---------------------------------------------------------------------------------------------
// Run queue

async fn claim_runs_holds_a_lease(db: &TestDb) {
    let s = &db.store;
    accept(
        s,
        vec![signup(
            "details",
            json!({"id": "c1", "email": "ann@example.com", "first_name": "Ann"}),
            T0,
        )],
    )
    .await;
    project_all(s, T0).await;
    seed_runs(
        s,
        vec![
            run_write("r1", "wf", "c1", 0, RunState::Active, Some(T0 + 1_000)),
            run_write(
                "r2",
                "wf2",
                "c1",
                0,
                RunState::WaitingEvent,
                Some(T0 + 1_200),
            ),
            run_write("r3", "wf3", "c2", 0, RunState::Active, None),
            run_write("r4", "wf4", "c2", 0, RunState::Completed, Some(T0)),
        ],
        T0,
    )
    .await;
    assert!(
        s.claim_runs(T0 + 999, 10, 500).await.unwrap().is_empty(),
        "nothing due yet"
    );

    let claimed = s.claim_runs(T0 + 1_000, 10, 500).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];
    assert_eq!(
        (
            c.run_id.as_str(),
            c.workflow_id.as_str(),
            c.workflow_version.as_str()
        ),
        ("r1", "wf", "v1")
    );
    assert_eq!(
        (c.contact_id.as_str(), c.state, c.pc),
        ("c1", RunState::Active, 0)
    );
    assert_eq!(c.event.id, "seed-r1", "the run's triggering event");
    assert_eq!(
        c.event,
        course_event(
            "seed-r1",
            "new_signup",
            T0,
            json!({"contact": {"id": "c1"}})
        )
    );
    assert_eq!(
        (
            c.contact.id.as_str(),
            c.contact.email.as_deref(),
            c.contact.first_name.as_deref()
        ),
        ("c1", Some("ann@example.com"), Some("Ann"))
    );
    assert!(!c.lease_token.is_empty());

    // Leased: not claimable until the lease runs out; a waiting run is claimable at its timeout.
    let later = s.claim_runs(T0 + 1_200, 10, 500).await.unwrap();
    assert_eq!(
        later.iter().map(|c| c.run_id.as_str()).collect::<Vec<_>>(),
        ["r2"]
    );
    assert_eq!(later[0].state, RunState::WaitingEvent);
    assert!(s.claim_runs(T0 + 1_499, 10, 500).await.unwrap().is_empty());
    let again = s.claim_runs(T0 + 1_500, 10, 500).await.unwrap();
    assert_eq!(
        again.iter().map(|c| c.run_id.as_str()).collect::<Vec<_>>(),
        ["r1"]
    );
    assert_ne!(
        again[0].lease_token, c.lease_token,
        "a new claim, a new token"
    );

    // Limit and order by due time.
    seed_runs(
        s,
        (0..5)
            .map(|i| {
                run_write(
                    &format!("q{i}"),
                    &format!("wq{i}"),
                    "c3",
                    0,
                    RunState::Active,
                    Some(T0 + 10 - i),
                )
            })
            .collect(),
        T0,
    )
    .await;
    // (The order within one claim is unspecified.)
    let first = s.claim_runs(T0 + 100, 3, 500).await.unwrap();
    assert_eq!(
        sorted(first.iter().map(|c| c.run_id.as_str())),
        ["q2", "q3", "q4"]
    );
    let rest = s.claim_runs(T0 + 100, 3, 500).await.unwrap();
    assert_eq!(sorted(rest.iter().map(|c| c.run_id.as_str())), ["q0", "q1"]);
}

async fn finish_runs_drops_stale_leases_and_appends_effects(db: &TestDb) {
    let s = &db.store;
    let mut r1 = run_write("r1", "wf", "c1", 0, RunState::Active, Some(T0));
    r1.steps = vec![step("start", "ok", T0)];
    seed_runs(
        s,
        vec![
            r1,
            run_write("r2", "wf", "c2", 0, RunState::Active, Some(T0)),
        ],
        T0,
    )
    .await;

    let stale = s.claim_runs(T0, 10, 100).await.unwrap();
    assert_eq!(stale.len(), 2);
    let fresh = s.claim_runs(T0 + 100, 10, 100).await.unwrap();
    assert_eq!(fresh.len(), 2, "the first lease ran out");
    let token = |claims: &[herald_store::ClaimedRun], id: &str| {
        claims
            .iter()
            .find(|c| c.run_id == id)
            .unwrap()
            .lease_token
            .clone()
    };

    let advance = |id: &str, contact: &str, state: RunState, token: String| {
        let mut w = run_write(
            id,
            "wf",
            contact,
            0,
            state,
            (state == RunState::Active).then_some(T0 + 9_000),
        );
        w.pc = 3;
        w.steps = vec![step("s2", "sent", T0 + 150), step("s3", "waited", T0 + 151)];
        w.messages = vec![queued_email(&format!("m_{id}"), "s2", T0 + 150)];
        RunAdvance {
            lease_token: token,
            write: w,
        }
    };
    // The late result under the lost lease is dropped, with its effects.
    s.finish_runs(
        T0 + 150,
        vec![advance(
            "r1",
            "c1",
            RunState::Completed,
            token(&stale, "r1"),
        )],
    )
    .await
    .unwrap();
    let r1 = run_row(s, "r1").await;
    assert_eq!((r1.state, r1.pc, r1.steps.len()), (RunState::Active, 0, 1));
    assert!(s.messages(all()).await.unwrap().is_empty());

    // Under the current lease: applied, with steps appended in order and messages queued.
    s.finish_runs(
        T0 + 150,
        vec![
            advance("r1", "c1", RunState::Completed, token(&fresh, "r1")),
            advance("r2", "c2", RunState::Active, token(&fresh, "r2")),
            // A second result for r1 in the same batch: the first cleared the lease.
            advance("r1", "c1", RunState::Failed, token(&fresh, "r1")),
        ],
    )
    .await
    .unwrap();
    let r1 = run_row(s, "r1").await;
    assert_eq!(
        (r1.state, r1.pc, r1.due_ms, r1.ended_ms, r1.updated_ms),
        (RunState::Completed, 3, None, Some(T0 + 150), T0 + 150)
    );
    assert_eq!(
        r1.steps,
        [
            step("start", "ok", T0),
            step("s2", "sent", T0 + 150),
            step("s3", "waited", T0 + 151)
        ]
    );
    let r2 = run_row(s, "r2").await;
    assert_eq!(
        (r2.state, r2.due_ms, r2.ended_ms),
        (RunState::Active, Some(T0 + 9_000), None)
    );
    assert_eq!(r2.steps.len(), 2);
    let messages = s.messages(all()).await.unwrap();
    assert_eq!(
        messages.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["m_r1", "m_r2"]
    );
    assert_eq!(
        (
            messages[0].workflow_id.as_str(),
            messages[0].contact_id.as_str()
        ),
        ("wf", "c1")
    );

    // The lease is released: r2 is claimable at its due time, and the used token is dead.
    s.finish_runs(
        T0 + 200,
        vec![advance("r2", "c2", RunState::Failed, token(&fresh, "r2"))],
    )
    .await
    .unwrap();
    assert_eq!(run_row(s, "r2").await.state, RunState::Active);
    assert!(s.claim_runs(T0 + 8_999, 10, 100).await.unwrap().is_empty());
    let claimed = s.claim_runs(T0 + 9_000, 10, 100).await.unwrap();
    assert_eq!(
        claimed
            .iter()
            .map(|c| (c.run_id.as_str(), c.pc))
            .collect::<Vec<_>>(),
        [("r2", 3)]
    );

    // Advancing into a wait stores the awaited event (the planner sees it).
    let mut w = run_write(
        "r2",
        "wf",
        "c2",
        0,
        RunState::WaitingEvent,
        Some(T0 + 99_000),
    );
    w.wait_event = Some("lesson_completed".into());
    s.finish_runs(
        T0 + 9_001,
        vec![RunAdvance {
            lease_token: claimed[0].lease_token.clone(),
            write: w,
        }],
    )
    .await
    .unwrap();
    accept(s, vec![contact_event("probe", "c2", T0)]).await;
    let waits = Mutex::new(Vec::new());
    s.dispatch(10, T0 + 9_002, 0, &|input: &DispatchInput| {
        waits.lock().unwrap().extend(
            input
                .live_runs
                .iter()
                .map(|r| (r.run_id.clone(), r.state, r.wait_event.clone())),
        );
        DispatchPlan::default()
    })
    .await
    .unwrap();
    assert_eq!(
        waits.into_inner().unwrap(),
        [(
            "r2".to_owned(),
            RunState::WaitingEvent,
            Some("lesson_completed".to_owned())
        )]
    );
    s.finish_runs(T0, Vec::new()).await.unwrap();
}

async fn concurrent_claims_never_share_a_run(db: &TestDb) {
    let other = db.open_another().await;
    seed_runs(
        &db.store,
        (0..40)
            .map(|i| {
                run_write(
                    &format!("r{i:02}"),
                    "wf",
                    &format!("c{i:02}"),
                    0,
                    RunState::Active,
                    Some(T0 + i),
                )
            })
            .collect(),
        T0,
    )
    .await;
    let mut tasks = Vec::new();
    for store in [db.store.clone(), other.clone(), db.store.clone(), other] {
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = store.claim_runs(T0 + 100, 3, 60_000).await.expect("claim");
                if claimed.is_empty() {
                    return mine;
                }
                mine.extend(claimed.into_iter().map(|c| c.run_id));
            }
        }));
    }
    let mut all_claims = Vec::new();
    for t in tasks {
        all_claims.extend(t.await.unwrap());
    }
    let total = all_claims.len();
    all_claims.sort();
    all_claims.dedup();
    assert_eq!(all_claims.len(), total, "no run was claimed twice");
    assert_eq!(total, 40, "every due run was claimed");
}

// ---------------------------------------------------------------------------------------------
// Delivery queue

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

fn mail(id: &str, created_ms: i64) -> MailboxItem {
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

async fn claim_and_complete_messages_for_every_result(db: &TestDb) {
    let s = &db.store;
    accept(
        s,
        vec![signup(
            "details",
            json!({"id": "c1", "email": "ann@example.com", "phone": "+15551234567"}),
            T0,
        )],
    )
    .await;
    project_all(s, T0).await;
    let mut run = run_write("r1", "wf", "c1", 0, RunState::Completed, None);
    run.workflow_version = "v7".into();
    run.messages = ["sent", "retry", "failed", "skipped", "suppressed"]
        .iter()
        .enumerate()
        .map(|(i, name)| queued_email(&format!("m_{name}"), &format!("step_{name}"), T0 + i as i64))
        .collect();
    let mut sms = queued_email("m_later", "step_later", T0 + 5_000);
    sms.channel = Channel::Sms;
    sms.recipient = Some("+15551234567".into());
    run.messages.push(sms);
    let mut skipped = queued_email("m_skipped_at_creation", "step_x", T0);
    skipped.status = MessageStatus::Skipped;
    skipped.reason = Some("no email address".into());
    skipped.due_ms = None;
    run.messages.push(skipped);
    seed_runs(s, vec![run], T0).await;

    assert!(
        s.claim_messages(T0 - 1, 10, 1_000)
            .await
            .unwrap()
            .is_empty()
    );
    // The earliest due first (the order within one claim is unspecified).
    let first = s.claim_messages(T0 + 100, 3, 1_000).await.unwrap();
    assert_eq!(
        sorted(first.iter().map(|m| m.id.as_str())),
        ["m_failed", "m_retry", "m_sent"]
    );
    let rest = s.claim_messages(T0 + 100, 10, 1_000).await.unwrap();
    assert_eq!(
        sorted(rest.iter().map(|m| m.id.as_str())),
        ["m_skipped", "m_suppressed"]
    );
    assert!(
        s.claim_messages(T0 + 100, 10, 1_000)
            .await
            .unwrap()
            .is_empty(),
        "all leased"
    );

    let m = first.iter().find(|m| m.id == "m_sent").unwrap();
    assert_eq!(
        (m.run_id.as_str(), m.step_id.as_str(), m.pc),
        ("r1", "step_sent", 1)
    );
    assert_eq!(
        (
            m.workflow_id.as_str(),
            m.workflow_version.as_str(),
            m.channel
        ),
        ("wf", "v7", Channel::Email)
    );
    assert_eq!(
        (
            m.recipient.as_deref(),
            m.header_message_id.as_str(),
            m.attempts
        ),
        (Some("ann@example.com"), "<m_sent@herald.test>", 0)
    );
    assert_eq!(
        (
            m.event.id.as_str(),
            m.contact.id.as_str(),
            m.contact.phone.as_deref()
        ),
        ("seed-r1", "c1", Some("+15551234567"))
    );

    let now = T0 + 200;
    let by_id = |id: &str| {
        first
            .iter()
            .chain(&rest)
            .find(|m| m.id == id)
            .unwrap()
            .clone()
    };
    let mut sent = outcome(
        &by_id("m_sent"),
        DeliveryResult::Sent {
            provider_id: Some("smtp-42".into()),
        },
    );
    sent.mailbox = Some(mail("mb1", now));
    let stale = MessageOutcome {
        lease_token: "not-the-lease".into(),
        ..outcome(
            &by_id("m_failed"),
            DeliveryResult::Sent { provider_id: None },
        )
    };
    s.complete_messages(
        now,
        vec![
            stale,
            sent,
            outcome(
                &by_id("m_retry"),
                DeliveryResult::Retry {
                    due_ms: T0 + 60_000,
                    reason: "421 try later".into(),
                },
            ),
            outcome(
                &by_id("m_failed"),
                DeliveryResult::Failed {
                    reason: "550 no such user".into(),
                },
            ),
            outcome(
                &by_id("m_skipped"),
                DeliveryResult::Skipped {
                    reason: "outside quiet hours".into(),
                },
            ),
            outcome(
                &by_id("m_suppressed"),
                DeliveryResult::Suppressed {
                    reason: "unsubscribed".into(),
                },
            ),
        ],
    )
    .await
    .unwrap();

    let m = message_row(s, "m_sent").await;
    assert_eq!(
        (m.status, m.reason.as_deref(), m.due_ms, m.attempts),
        (MessageStatus::Sent, None, None, 1)
    );
    assert_eq!(
        (
            m.provider_id.as_deref(),
            m.sent_ms,
            m.subject.as_deref(),
            m.updated_ms
        ),
        (Some("smtp-42"), Some(now), Some("Subject m_sent"), now)
    );
    let m = message_row(s, "m_retry").await;
    assert_eq!(
        (m.status, m.reason.as_deref(), m.due_ms, m.attempts),
        (
            MessageStatus::Queued,
            Some("421 try later"),
            Some(T0 + 60_000),
            1
        )
    );
    assert_eq!(m.sent_ms, None);
    let m = message_row(s, "m_failed").await;
    assert_eq!(
        (m.status, m.reason.as_deref(), m.due_ms, m.attempts),
        (MessageStatus::Failed, Some("550 no such user"), None, 1)
    );
    let m = message_row(s, "m_skipped").await;
    assert_eq!(
        (m.status, m.reason.as_deref(), m.attempts),
        (MessageStatus::Skipped, Some("outside quiet hours"), 0),
        "skipped at delivery: never tried, no attempt"
    );
    let m = message_row(s, "m_suppressed").await;
    assert_eq!(
        (m.status, m.reason.as_deref(), m.attempts),
        (MessageStatus::Suppressed, Some("unsubscribed"), 0),
        "suppressed: never tried, no attempt"
    );
    let m = message_row(s, "m_skipped_at_creation").await;
    assert_eq!(
        (m.status, m.reason.as_deref(), m.due_ms, m.attempts),
        (MessageStatus::Skipped, Some("no email address"), None, 0)
    );
    assert_eq!(s.mailbox(10).await.unwrap(), [mail("mb1", now)]);

    // The retry is queued again: claimable at its due time, with the attempt counted.
    assert_eq!(
        s.claim_messages(T0 + 59_999, 10, 1_000)
            .await
            .unwrap()
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        ["m_later"]
    );
    let retry = s.claim_messages(T0 + 60_000, 10, 1_000).await.unwrap();
    assert_eq!(
        retry
            .iter()
            .map(|m| (m.id.as_str(), m.attempts))
            .collect::<Vec<_>>(),
        [("m_retry", 1)]
    );
    // A completion without a subject or provider id keeps the recorded ones.
    let mut done = outcome(&retry[0], DeliveryResult::Sent { provider_id: None });
    done.subject = None;
    s.complete_messages(T0 + 60_001, vec![done]).await.unwrap();
    let m = message_row(s, "m_retry").await;
    assert_eq!(
        (m.status, m.attempts, m.sent_ms, m.subject.as_deref()),
        (
            MessageStatus::Sent,
            2,
            Some(T0 + 60_001),
            Some("Subject m_retry")
        )
    );
    // Completed messages are never claimed again, whatever the time.
    let later = s.claim_messages(T0 + 10_000_000, 10, 1_000).await.unwrap();
    assert_eq!(
        later.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["m_later"],
        "only the leased-out SMS again"
    );
    assert_eq!(later[0].channel, Channel::Sms);
    s.complete_messages(T0, Vec::new()).await.unwrap();
}

async fn one_message_per_run_and_step(db: &TestDb) {
    let s = &db.store;
    let mut run = run_write("r1", "wf", "c1", 0, RunState::Active, Some(T0));
    run.messages = vec![
        queued_email("m1", "send", T0),
        queued_email("m2", "send", T0),
    ];
    seed_runs(s, vec![run], T0).await;
    let ids = |ms: Vec<herald_store::MessageRow>| ms.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(ids(s.messages(all()).await.unwrap()), ["m1"]);

    // Re-running the step after a lost lease makes no second message either.
    let claimed = s.claim_runs(T0, 1, 100).await.unwrap();
    let mut w = run_write("r1", "wf", "c1", 0, RunState::Completed, None);
    w.messages = vec![
        queued_email("m3", "send", T0),
        queued_email("m4", "other", T0),
    ];
    s.finish_runs(
        T0 + 1,
        vec![RunAdvance {
            lease_token: claimed[0].lease_token.clone(),
            write: w,
        }],
    )
    .await
    .unwrap();
    assert_eq!(ids(s.messages(all()).await.unwrap()), ["m1", "m4"]);
}

async fn mailbox_lists_newest_first(db: &TestDb) {
    let s = &db.store;
    assert!(s.mailbox(10).await.unwrap().is_empty());
    let mut sms = mail("b", T0 + 5);
    sms.channel = Channel::Sms;
    sms.subject = None;
    sms.html_body = None;
    sms.sender = None;
    sms.message_id = None;
    s.add_to_mailbox(mail("a", T0 + 5)).await.unwrap();
    s.add_to_mailbox(sms.clone()).await.unwrap();
    s.add_to_mailbox(mail("c", T0 + 1)).await.unwrap();
    s.add_to_mailbox(mail("d", T0 + 9)).await.unwrap();
    // The same id again changes nothing.
    s.add_to_mailbox(mail("d", T0)).await.unwrap();
    let ids = |items: Vec<MailboxItem>| items.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.mailbox(10).await.unwrap()),
        ["d", "b", "a", "c"],
        "newest first, then by id descending"
    );
    assert_eq!(ids(s.mailbox(2).await.unwrap()), ["d", "b"]);
    assert_eq!(s.mailbox(10).await.unwrap()[1], sms);

    // Delivery completions put their copy there too.
    let mut run = run_write("r1", "wf", "c1", 0, RunState::Completed, None);
    run.messages = vec![queued_email("m1", "s", T0)];
    seed_runs(s, vec![run], T0).await;
    let claimed = s.claim_messages(T0, 1, 100).await.unwrap();
    let mut done = outcome(&claimed[0], DeliveryResult::Sent { provider_id: None });
    done.mailbox = Some(mail("e", T0 + 20));
    s.complete_messages(T0 + 20, vec![done]).await.unwrap();
    assert_eq!(ids(s.mailbox(1).await.unwrap()), ["e"]);
}

// ---------------------------------------------------------------------------------------------
// Scheduling, versions, parking

async fn next_due_ms_is_the_earliest_due_work(db: &TestDb) {
    let s = &db.store;
    assert_eq!(s.next_due_ms().await.unwrap(), None);
    let mut done = run_write("r_done", "wf0", "c1", 0, RunState::Completed, None);
    done.messages = vec![queued_email("m1", "s1", T0 + 700)];
    let mut sent = queued_email("m2", "s2", T0 + 50);
    sent.status = MessageStatus::Sent;
    done.messages.push(sent);
    seed_runs(
        s,
        vec![
            done,
            run_write("r_active", "wf1", "c1", 0, RunState::Active, Some(T0 + 900)),
            run_write(
                "r_wait",
                "wf2",
                "c1",
                0,
                RunState::WaitingEvent,
                Some(T0 + 800),
            ),
            run_write("r_parked", "wf3", "c1", 0, RunState::Parked, Some(T0 + 10)),
            run_write("r_failed", "wf4", "c1", 0, RunState::Failed, Some(T0 + 20)),
        ],
        T0,
    )
    .await;
    assert_eq!(
        s.next_due_ms().await.unwrap(),
        Some(T0 + 700),
        "the queued message"
    );
    let claimed = s.claim_messages(T0 + 700, 10, 100).await.unwrap();
    s.complete_messages(
        T0 + 701,
        vec![outcome(
            &claimed[0],
            DeliveryResult::Sent { provider_id: None },
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        s.next_due_ms().await.unwrap(),
        Some(T0 + 800),
        "the waiting run's timeout"
    );
    set_enabled(s, "wf2", false, T0).await;
    assert_eq!(
        s.next_due_ms().await.unwrap(),
        Some(T0 + 900),
        "parked runs are not due"
    );
}

async fn workflow_versions_are_kept_and_live_ones_listed(db: &TestDb) {
    let s = &db.store;
    let v = |id: &str, version: &str, bundle: &str| {
        (id.to_owned(), version.to_owned(), bundle.to_owned())
    };
    s.save_workflow_versions(
        vec![
            v("wf", "v1", "{\"a\":1}"),
            v("wf", "v2", "{\"a\":2}"),
            v("wf2", "v1", "{}"),
        ],
        T0,
    )
    .await
    .unwrap();
    // Saving again (even with another bundle) keeps the first: versions are immutable.
    s.save_workflow_versions(
        vec![
            v("wf", "v1", "{\"changed\":true}"),
            v("wf", "v1", "{\"twice\":1}"),
        ],
        T0 + 1,
    )
    .await
    .unwrap();
    s.save_workflow_versions(Vec::new(), T0).await.unwrap();
    assert!(
        s.live_workflow_versions().await.unwrap().is_empty(),
        "no run is pinned yet"
    );

    let mut parked = run_write("r1", "wf", "c1", 0, RunState::Parked, Some(T0));
    parked.workflow_version = "v1".into();
    let mut done = run_write("r2", "wf", "c2", 0, RunState::Completed, None);
    done.workflow_version = "v2".into();
    let mut ended = run_write("r3", "wf2", "c3", 0, RunState::Exited, None);
    ended.workflow_version = "v1".into();
    seed_runs(s, vec![parked, done, ended], T0).await;
    let mut live = s.live_workflow_versions().await.unwrap();
    live.sort();
    assert_eq!(live, [v("wf", "v1", "{\"a\":1}")]);

    // A finished run with a queued message still needs its version to render it.
    let mut sending = run_write("r4", "wf", "c4", 0, RunState::Completed, None);
    sending.workflow_version = "v2".into();
    sending.messages = vec![queued_email("m1", "s", T0)];
    seed_runs(s, vec![sending], T0).await;
    let mut live = s.live_workflow_versions().await.unwrap();
    live.sort();
    assert_eq!(
        live,
        [v("wf", "v1", "{\"a\":1}"), v("wf", "v2", "{\"a\":2}")]
    );
}

async fn parking_a_workflow_keeps_its_runs_wait_state(db: &TestDb) {
    let s = &db.store;
    let mut waiting = run_write(
        "r_wait",
        "wf",
        "c2",
        0,
        RunState::WaitingEvent,
        Some(T0 + 900),
    );
    waiting.wait_event = Some("lesson_completed".into());
    seed_runs(
        s,
        vec![
            run_write("r_active", "wf", "c1", 0, RunState::Active, Some(T0 + 500)),
            waiting,
            run_write("r_done", "wf", "c3", 0, RunState::Completed, None),
            run_write(
                "r_other",
                "wf_other",
                "c1",
                0,
                RunState::Active,
                Some(T0 + 500),
            ),
        ],
        T0,
    )
    .await;
    assert_eq!(set_enabled(s, "wf", false, T0 + 1).await, 2);
    assert_eq!(
        set_enabled(s, "wf", false, T0 + 2).await,
        0,
        "already parked"
    );
    for id in ["r_active", "r_wait"] {
        let r = run_row(s, id).await;
        assert_eq!(
            (r.state, r.updated_ms, r.reason.as_deref()),
            (RunState::Parked, T0 + 1, None)
        );
    }
    assert_eq!(run_row(s, "r_done").await.state, RunState::Completed);
    let claimed = s.claim_runs(T0 + 10_000, 10, 100).await.unwrap();
    assert_eq!(
        claimed
            .iter()
            .map(|c| c.run_id.as_str())
            .collect::<Vec<_>>(),
        ["r_other"],
        "parked runs are not claimed"
    );

    // A parked run still blocks a second live run of its contact.
    seed_runs(
        s,
        vec![run_write(
            "r_dup",
            "wf",
            "c1",
            0,
            RunState::Active,
            Some(T0),
        )],
        T0,
    )
    .await;
    assert!(s.runs(all()).await.unwrap().iter().all(|r| r.id != "r_dup"));

    assert_eq!(set_enabled(s, "wf", true, T0 + 3).await, 2);
    let active = run_row(s, "r_active").await;
    assert_eq!(
        (
            active.state,
            active.due_ms,
            active.reason.as_deref(),
            active.updated_ms
        ),
        (RunState::Active, Some(T0 + 500), None, T0 + 3)
    );
    let wait = run_row(s, "r_wait").await;
    assert_eq!(
        (wait.state, wait.due_ms, wait.reason.as_deref()),
        (RunState::WaitingEvent, Some(T0 + 900), None)
    );
    // The wait is intact: the dispatcher still sees what the run waits for.
    accept(s, vec![contact_event("probe", "c2", T0)]).await;
    let waits = Mutex::new(Vec::new());
    s.dispatch(10, T0 + 4, 0, &|input: &DispatchInput| {
        waits.lock().unwrap().extend(
            input
                .live_runs
                .iter()
                .map(|r| (r.run_id.clone(), r.wait_event.clone())),
        );
        DispatchPlan::default()
    })
    .await
    .unwrap();
    assert_eq!(
        waits.into_inner().unwrap(),
        [("r_wait".to_owned(), Some("lesson_completed".to_owned()))]
    );
    assert_eq!(set_enabled(s, "wf", true, T0 + 5).await, 0);
}

// ---------------------------------------------------------------------------------------------
// Admin lists

async fn list_filters_and_cursor_pagination(db: &TestDb) {
    let s = &db.store;
    let mut runs = Vec::new();
    for i in 0..6 {
        let contact = if i % 2 == 0 { "c_even" } else { "c_odd" };
        let workflow = if i < 3 { "wf_a" } else { "wf_b" };
        let state = if i == 5 {
            RunState::Completed
        } else {
            RunState::Active
        };
        let mut r = run_write(&format!("run_{i}"), workflow, contact, 0, state, Some(T0));
        if i != 5 {
            // One live run per workflow and contact: make the others distinct workflows.
            r.workflow_id = format!("{workflow}{i}");
        }
        r.messages = vec![queued_email(&format!("msg_{i}"), "s", T0 + i)];
        runs.push(r);
    }
    seed_runs(s, runs, T0).await;
    let claimed = s.claim_messages(T0, 1, 100).await.unwrap();
    assert_eq!(claimed[0].id, "msg_0");
    s.complete_messages(
        T0,
        vec![outcome(
            &claimed[0],
            DeliveryResult::Failed { reason: "x".into() },
        )],
    )
    .await
    .unwrap();

    let f = |contact: Option<&str>,
             workflow: Option<&str>,
             status: Option<&str>,
             after: Option<&str>,
             limit: i64| ListFilter {
        contact_id: contact.map(Into::into),
        workflow_id: workflow.map(Into::into),
        status: status.map(Into::into),
        after: after.map(Into::into),
        limit,
    };
    let run_ids =
        |rows: Vec<herald_store::RunRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let msg_ids =
        |rows: Vec<herald_store::MessageRow>| rows.into_iter().map(|m| m.id).collect::<Vec<_>>();

    assert_eq!(
        run_ids(
            s.runs(f(Some("c_even"), None, None, None, 100))
                .await
                .unwrap()
        ),
        ["run_0", "run_2", "run_4"]
    );
    assert_eq!(
        run_ids(
            s.runs(f(None, Some("wf_b"), None, None, 100))
                .await
                .unwrap()
        ),
        ["run_5"]
    );
    assert_eq!(
        run_ids(
            s.runs(f(None, None, Some("completed"), None, 100))
                .await
                .unwrap()
        ),
        ["run_5"]
    );
    assert_eq!(
        run_ids(
            s.runs(f(Some("c_even"), None, Some("completed"), None, 100))
                .await
                .unwrap()
        ),
        Vec::<String>::new()
    );
    // Pages of two, each after the last id of the previous one.
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = run_ids(
            s.runs(f(None, None, None, after.as_deref(), 2))
                .await
                .unwrap(),
        );
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        pages.push(page);
    }
    assert_eq!(
        pages,
        [["run_0", "run_1"], ["run_2", "run_3"], ["run_4", "run_5"]]
    );
    assert_eq!(
        run_ids(
            s.runs(f(Some("c_odd"), None, None, Some("run_1"), 1))
                .await
                .unwrap()
        ),
        ["run_3"]
    );
    assert_eq!(
        s.runs(f(None, None, None, None, 0)).await.unwrap().len(),
        0,
        "limit 0: nothing"
    );

    assert_eq!(
        msg_ids(
            s.messages(f(Some("c_odd"), None, None, None, 100))
                .await
                .unwrap()
        ),
        ["msg_1", "msg_3", "msg_5"]
    );
    assert_eq!(
        msg_ids(
            s.messages(f(None, Some("wf_a0"), None, None, 100))
                .await
                .unwrap()
        ),
        ["msg_0"]
    );
    assert_eq!(
        msg_ids(
            s.messages(f(None, None, Some("failed"), None, 100))
                .await
                .unwrap()
        ),
        ["msg_0"]
    );
    assert_eq!(
        msg_ids(
            s.messages(f(None, None, Some("queued"), Some("msg_2"), 2))
                .await
                .unwrap()
        ),
        ["msg_3", "msg_4"]
    );
    assert_eq!(
        msg_ids(
            s.messages(f(
                Some("c_even"),
                Some("wf_a2"),
                Some("queued"),
                Some("msg_0"),
                5
            ))
            .await
            .unwrap()
        ),
        ["msg_2"]
    );
    let counts: HashMap<_, usize> =
        s.messages(all())
            .await
            .unwrap()
            .into_iter()
            .fold(HashMap::new(), |mut acc, m| {
                *acc.entry(m.status).or_default() += 1;
                acc
            });
    assert_eq!(
        (
            counts[&MessageStatus::Queued],
            counts[&MessageStatus::Failed]
        ),
        (5, 1)
    );
}

async fn opt_outs_are_kept_per_channel_and_shown_to_claims(db: &TestDb) {
    let s = &db.store;
    assert!(s.opt_outs("c1".into()).await.unwrap().is_empty());
    assert!(
        s.set_opt_out(
            "c1".into(),
            Channel::Email,
            true,
            "unsubscribe_link".into(),
            T0
        )
        .await
        .unwrap()
    );
    assert!(
        !s.set_opt_out(
            "c1".into(),
            Channel::Email,
            true,
            "one_click".into(),
            T0 + 1
        )
        .await
        .unwrap(),
        "already out"
    );
    assert!(
        s.set_opt_out(
            "c1".into(),
            Channel::Sms,
            true,
            "sms_keyword".into(),
            T0 + 2
        )
        .await
        .unwrap()
    );
    let out = |channel, source: &str, at_ms| herald_store::OptOutRow {
        channel,
        source: source.into(),
        at_ms,
    };
    assert_eq!(
        s.opt_outs("c1".into()).await.unwrap(),
        [
            out(Channel::Email, "unsubscribe_link", T0),
            out(Channel::Sms, "sms_keyword", T0 + 2)
        ]
    );
    assert!(s.opt_outs("c2".into()).await.unwrap().is_empty());

    // A claim tells whether the contact opted out of the message's channel, as of the claim.
    let mut run = run_write("r1", "wf", "c1", 0, RunState::Completed, None);
    let mut sms = queued_email("m_sms", "s_sms", T0);
    sms.channel = Channel::Sms;
    run.messages = vec![queued_email("m_email", "s_email", T0), sms];
    let mut other = run_write("r2", "wf", "c2", 0, RunState::Completed, None);
    other.messages = vec![queued_email("m_c2", "s", T0)];
    seed_runs(s, vec![run, other], T0).await;
    assert!(
        s.set_opt_out(
            "c1".into(),
            Channel::Sms,
            false,
            "resubscribe".into(),
            T0 + 3
        )
        .await
        .unwrap()
    );
    assert!(
        !s.set_opt_out(
            "c1".into(),
            Channel::Sms,
            false,
            "resubscribe".into(),
            T0 + 4
        )
        .await
        .unwrap(),
        "already in"
    );
    let claimed = s.claim_messages(T0 + 10, 10, 100).await.unwrap();
    let mut flags: Vec<(&str, bool)> = claimed
        .iter()
        .map(|m| (m.id.as_str(), m.opted_out))
        .collect();
    flags.sort();
    assert_eq!(
        flags,
        [("m_c2", false), ("m_email", true), ("m_sms", false)]
    );
}

async fn queue_stats_count_due_work(db: &TestDb) {
    let s = &db.store;
    assert_eq!(
        s.queue_stats(T0).await.unwrap(),
        herald_store::QueueStats::default()
    );
    let mut run = run_write("r1", "wf", "c1", 0, RunState::Active, Some(T0 + 50));
    run.messages = vec![
        queued_email("m1", "s1", T0 + 20),
        queued_email("m2", "s2", T0 + 500),
    ];
    seed_runs(
        s,
        vec![
            run,
            run_write("r2", "wf2", "c1", 0, RunState::WaitingEvent, Some(T0 + 30)),
            run_write("r3", "wf3", "c1", 0, RunState::Parked, Some(T0)),
            run_write("r4", "wf4", "c1", 0, RunState::Active, Some(T0 + 900)),
        ],
        T0,
    )
    .await;
    accept(s, vec![contact_event("pending", "c9", T0)]).await;
    let stats = s.queue_stats(T0 + 100).await.unwrap();
    let received_ms = stats.oldest_event_ms;
    assert!(received_ms.is_some(), "the pending event's receipt time");
    assert_eq!(
        stats,
        herald_store::QueueStats {
            undispatched_events: 1,
            due_runs: 2,
            due_messages: 1,
            oldest_event_ms: received_ms,
            oldest_run_due_ms: Some(T0 + 30),
            oldest_message_due_ms: Some(T0 + 20),
        }
    );
    assert_eq!(stats.oldest_job_due_ms(), Some(T0 + 20));
    let stats = s.queue_stats(T0 + 10).await.unwrap();
    assert_eq!(
        (
            stats.due_runs,
            stats.due_messages,
            stats.oldest_job_due_ms()
        ),
        (0, 0, None)
    );
}

// ---------------------------------------------------------------------------------------------
// Magic links and the portal

fn learner_link(
    hash: &str,
    contact: &str,
    message: Option<&str>,
    max_uses: Option<i64>,
    expires_ms: Option<i64>,
) -> NewLink {
    NewLink {
        token_hash: hash.into(),
        kind: LinkKind::Learner,
        contact_id: Some(contact.into()),
        message_id: message.map(Into::into),
        max_uses,
        expires_ms,
    }
}

fn user_link(hash: &str) -> NewLink {
    NewLink {
        token_hash: hash.into(),
        kind: LinkKind::User,
        contact_id: None,
        message_id: None,
        max_uses: None,
        expires_ms: None,
    }
}

fn learner(contact: &str) -> LinkHolder {
    LinkHolder {
        kind: LinkKind::Learner,
        contact_id: Some(contact.into()),
    }
}

fn session(id: &str, expires_ms: i64) -> NewSession {
    NewSession {
        id_hash: id.into(),
        expires_ms,
    }
}

fn audit_lines(
    rows: Vec<herald_store::LinkAuditRow>,
) -> Vec<(String, Option<String>, Option<String>)> {
    rows.into_iter()
        .map(|r| (r.action, r.contact_id, r.reason))
        .collect()
}

async fn magic_links_check_redeem_and_refuse(db: &TestDb) {
    let s = &db.store;
    accept(
        s,
        vec![granted("g1", "c1", T0), contact_event("n2", "c2", T0)],
    )
    .await;
    project_all(s, T0).await;
    assert!(s.has_active_offer("c1".into()).await.unwrap());
    assert!(!s.has_active_offer("c2".into()).await.unwrap());

    s.mint_link(
        learner_link("h1", "c1", Some("m1"), Some(1), Some(T0 + 1_000)),
        T0,
    )
    .await
    .unwrap();
    // Checking is read-only.
    for _ in 0..2 {
        assert_eq!(
            s.check_link("h1".into(), T0).await.unwrap(),
            Ok(learner("c1"))
        );
    }
    assert_eq!(
        s.check_link("nope".into(), T0).await.unwrap(),
        Err((LinkRefusal::Unknown, None))
    );

    // Redeeming counts a use, starts a session and stores a login event, in one go.
    let redeemed = s
        .redeem_link(
            "h1".into(),
            T0 + 1,
            session("s1", T0 + 5_000),
            SOURCE.into(),
        )
        .await
        .unwrap();
    assert_eq!(redeemed, Ok(learner("c1")));
    assert_eq!(
        s.session("s1".into(), T0 + 2).await.unwrap(),
        Some(learner("c1"))
    );
    assert_eq!(
        s.session("s1".into(), T0 + 5_000).await.unwrap(),
        None,
        "expired session"
    );
    assert_eq!(s.session("other".into(), T0 + 2).await.unwrap(), None);
    let logins = Mutex::new(Vec::new());
    s.dispatch(10, T0, 0, &|input: &DispatchInput| {
        logins
            .lock()
            .unwrap()
            .extend(input.events.iter().map(|(_, e)| {
                (
                    e.event_type.trigger_name(),
                    e.contact_id().to_owned(),
                    e.source.clone(),
                )
            }));
        DispatchPlan::default()
    })
    .await
    .unwrap();
    assert_eq!(
        logins.into_inner().unwrap(),
        [("user_login", "c1".to_owned(), SOURCE.to_owned())]
    );

    // Used up; refusals are audited (newest first) and store no event.
    let again = s
        .redeem_link(
            "h1".into(),
            T0 + 2,
            session("s2", T0 + 5_000),
            SOURCE.into(),
        )
        .await
        .unwrap();
    assert_eq!(again, Err((LinkRefusal::UsedUp, Some("c1".into()))));
    assert_eq!(
        s.check_link("h1".into(), T0 + 2).await.unwrap(),
        Err((LinkRefusal::UsedUp, Some("c1".into())))
    );
    assert_eq!(s.session("s2".into(), T0 + 3).await.unwrap(), None);
    assert_eq!(s.undispatched_count().await.unwrap(), 0);
    let unknown = s
        .redeem_link(
            "nope".into(),
            T0 + 2,
            session("s3", T0 + 5_000),
            SOURCE.into(),
        )
        .await
        .unwrap();
    assert_eq!(unknown, Err((LinkRefusal::Unknown, None)));
    assert_eq!(
        audit_lines(s.link_audit(Some("c1".into()), 10).await.unwrap()),
        [
            (
                "refuse".to_owned(),
                Some("c1".to_owned()),
                Some("used_up".to_owned())
            ),
            ("redeem".to_owned(), Some("c1".to_owned()), None),
            ("mint".to_owned(), Some("c1".to_owned()), None),
        ]
    );
    let all_audit = s.link_audit(None, 10).await.unwrap();
    assert_eq!(
        (
            all_audit.len(),
            all_audit[0].kind.as_str(),
            all_audit[0].action.as_str()
        ),
        (4, "unknown", "refuse")
    );
    assert_eq!(s.link_audit(None, 1).await.unwrap().len(), 1);

    // Expired; not entitled (no active offer); unlimited uses.
    s.mint_link(learner_link("h2", "c1", None, None, Some(T0 + 10)), T0)
        .await
        .unwrap();
    assert_eq!(
        s.check_link("h2".into(), T0 + 9).await.unwrap(),
        Ok(learner("c1"))
    );
    let expired = s
        .redeem_link(
            "h2".into(),
            T0 + 10,
            session("s4", T0 + 5_000),
            SOURCE.into(),
        )
        .await
        .unwrap();
    assert_eq!(expired, Err((LinkRefusal::Expired, Some("c1".into()))));
    s.mint_link(learner_link("h3", "c2", None, Some(5), None), T0)
        .await
        .unwrap();
    assert_eq!(
        s.check_link("h3".into(), T0).await.unwrap(),
        Err((LinkRefusal::NotEntitled, Some("c2".into())))
    );
    let refused = s
        .redeem_link("h3".into(), T0, session("s5", T0 + 5_000), SOURCE.into())
        .await
        .unwrap();
    assert_eq!(refused, Err((LinkRefusal::NotEntitled, Some("c2".into()))));
    s.mint_link(learner_link("h4", "c1", None, None, None), T0)
        .await
        .unwrap();
    for i in 0..3 {
        let id = format!("s_many_{i}");
        assert_eq!(
            s.redeem_link("h4".into(), T0, session(&id, T0 + 5_000), SOURCE.into())
                .await
                .unwrap(),
            Ok(learner("c1"))
        );
    }

    // Re-minting for the same message revokes that message's earlier link.
    s.mint_link(
        learner_link("h1b", "c1", Some("m1"), Some(1), Some(T0 + 1_000)),
        T0 + 3,
    )
    .await
    .unwrap();
    assert_eq!(
        s.check_link("h1".into(), T0 + 3).await.unwrap(),
        Err((LinkRefusal::Revoked, Some("c1".into())))
    );
    assert_eq!(
        s.check_link("h1b".into(), T0 + 3).await.unwrap(),
        Ok(learner("c1"))
    );

    // Losing the offer makes the contact's links refuse.
    accept(
        s,
        vec![new_event(
            "r1",
            "offer_access_removed",
            T0 + 1,
            json!({"contact": {"id": "c1"}, "offer": {"id": "o_pro"}}),
        )],
    )
    .await;
    project_all(s, T0).await;
    assert_eq!(
        s.check_link("h4".into(), T0 + 4).await.unwrap(),
        Err((LinkRefusal::NotEntitled, Some("c1".into())))
    );
}

async fn magic_links_regenerate_sessions_and_site_values(db: &TestDb) {
    let s = &db.store;
    accept(s, vec![granted("g1", "c1", T0), granted("g2", "c2", T0)]).await;
    project_all(s, T0).await;
    s.mint_link(learner_link("a1", "c1", Some("m1"), None, None), T0)
        .await
        .unwrap();
    s.mint_link(learner_link("a2", "c1", Some("m2"), None, None), T0)
        .await
        .unwrap();
    s.mint_link(learner_link("b1", "c2", None, None, None), T0)
        .await
        .unwrap();
    s.regenerate_link(user_link("u1"), None, T0).await.unwrap();
    assert_eq!(
        s.check_link("u1".into(), T0).await.unwrap(),
        Ok(LinkHolder {
            kind: LinkKind::User,
            contact_id: None
        })
    );

    // Regenerating a learner's link revokes all of theirs and nobody else's.
    s.regenerate_link(learner_link("a3", "c1", None, None, None), None, T0 + 1)
        .await
        .unwrap();
    for old in ["a1", "a2"] {
        assert_eq!(
            s.check_link(old.into(), T0 + 2).await.unwrap(),
            Err((LinkRefusal::Revoked, Some("c1".into())))
        );
    }
    assert_eq!(
        s.check_link("a3".into(), T0 + 2).await.unwrap(),
        Ok(learner("c1"))
    );
    assert_eq!(
        s.check_link("b1".into(), T0 + 2).await.unwrap(),
        Ok(learner("c2"))
    );
    assert_eq!(
        s.check_link("u1".into(), T0 + 2).await.unwrap(),
        Ok(LinkHolder {
            kind: LinkKind::User,
            contact_id: None
        })
    );
    let revoked = s
        .redeem_link("a1".into(), T0 + 2, session("x", T0 + 100), SOURCE.into())
        .await
        .unwrap();
    assert_eq!(revoked, Err((LinkRefusal::Revoked, Some("c1".into()))));

    // Regenerating the user link revokes only the user link; a user redemption stores no event.
    s.regenerate_link(
        user_link("u2"),
        Some(("user_link_generation".into(), "2".into())),
        T0 + 3,
    )
    .await
    .unwrap();
    assert_eq!(
        s.site_value("user_link_generation".into(), "0".into())
            .await
            .unwrap(),
        "2",
        "the site value is written with the link"
    );
    assert_eq!(
        s.check_link("u1".into(), T0 + 4).await.unwrap(),
        Err((LinkRefusal::Revoked, None))
    );
    assert_eq!(
        s.check_link("a3".into(), T0 + 4).await.unwrap(),
        Ok(learner("c1"))
    );
    let staff = s
        .redeem_link(
            "u2".into(),
            T0 + 4,
            session("staff", T0 + 100),
            SOURCE.into(),
        )
        .await
        .unwrap();
    assert_eq!(
        staff,
        Ok(LinkHolder {
            kind: LinkKind::User,
            contact_id: None
        })
    );
    assert_eq!(s.undispatched_count().await.unwrap(), 0);
    assert_eq!(
        s.session("staff".into(), T0 + 5).await.unwrap(),
        Some(LinkHolder {
            kind: LinkKind::User,
            contact_id: None
        })
    );
    s.end_session("staff".into(), T0 + 6).await.unwrap();
    assert_eq!(s.session("staff".into(), T0 + 7).await.unwrap(), None);
    s.end_session("staff".into(), T0 + 8).await.unwrap();

    // Site values: created once with the default, then only set explicitly.
    assert_eq!(
        s.site_value("user_key".into(), "first".into())
            .await
            .unwrap(),
        "first"
    );
    assert_eq!(
        s.site_value("user_key".into(), "second".into())
            .await
            .unwrap(),
        "first"
    );
    s.set_site_value("user_key".into(), "third".into())
        .await
        .unwrap();
    assert_eq!(
        s.site_value("user_key".into(), "fourth".into())
            .await
            .unwrap(),
        "third"
    );
    s.set_site_value("other".into(), "x".into()).await.unwrap();
    assert_eq!(s.site_value("other".into(), "y".into()).await.unwrap(), "x");
}

async fn link_resends_are_rate_limited(db: &TestDb) {
    let s = &db.store;
    // At most 2 per short window and 3 per day.
    let allow =
        |now: i64, short_since: i64| s.allow_link_resend("c1".into(), now, short_since, 2, T0, 3);
    assert!(allow(T0 + 100, T0).await.unwrap());
    assert!(allow(T0 + 101, T0).await.unwrap());
    assert!(
        !allow(T0 + 102, T0).await.unwrap(),
        "third in the short window"
    );
    assert!(
        allow(T0 + 300, T0 + 200).await.unwrap(),
        "a new short window"
    );
    assert!(
        !allow(T0 + 301, T0 + 301).await.unwrap(),
        "the day's budget is spent"
    );
    assert!(
        s.allow_link_resend("c2".into(), T0 + 302, T0, 2, T0, 3)
            .await
            .unwrap(),
        "per contact"
    );
    let actions: Vec<String> = s
        .link_audit(Some("c1".into()), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .collect();
    assert_eq!(
        actions,
        [
            "resend_refused",
            "resend",
            "resend_refused",
            "resend",
            "resend"
        ]
    );

    // Concurrent requests of one contact never exceed the budget.
    let other = db.open_another().await;
    let mut tasks = Vec::new();
    for k in 0..8 {
        let store = if k % 2 == 0 { s.clone() } else { other.clone() };
        tasks.push(tokio::spawn(async move {
            store
                .allow_link_resend("c3".into(), T0 + 500, T0, 3, T0, 10)
                .await
                .unwrap()
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += usize::from(t.await.unwrap());
    }
    assert_eq!(allowed, 3);
}

async fn portal_products_follow_active_grants(db: &TestDb) {
    let s = &db.store;
    accept(
        s,
        vec![
            offer_event(
                "o1",
                "c1",
                json!({"id": "o_pro", "title": "Pro", "product_ids": ["p_b", "p_a"]}),
                T0,
            ),
            lesson_event(
                "l1",
                "c1",
                json!({"id": "p_a", "title": "Zeta course", "url": "https://s/a"}),
                T0,
            ),
            lesson_event(
                "l2",
                "c1",
                json!({"id": "p_b", "title": "Alpha course"}),
                T0,
            ),
            new_event(
                "pg",
                "product_access_granted",
                T0,
                json!({"contact": {"id": "c1"}, "product": {"id": "p_c"}}),
            ),
            new_event(
                "pr",
                "product_access_granted",
                T0,
                json!({"contact": {"id": "c1"}, "product": {"id": "p_d", "title": "Gone"}}),
            ),
            new_event(
                "pr2",
                "product_access_removed",
                T0 + 1,
                json!({"contact": {"id": "c1"}, "product": {"id": "p_d"}}),
            ),
            offer_event(
                "o2",
                "c2",
                json!({"id": "o_other", "product_ids": ["p_e"]}),
                T0,
            ),
            new_event(
                "o2r",
                "offer_access_removed",
                T0 + 1,
                json!({"contact": {"id": "c2"}, "offer": {"id": "o_other"}}),
            ),
        ],
    )
    .await;
    project_all(s, T0).await;
    let ids =
        |rows: Vec<herald_store::ProductRow>| rows.into_iter().map(|p| p.id).collect::<Vec<_>>();
    // Ordered by title (else id), bytewise.
    let mine = s.portal_products(Some("c1".into())).await.unwrap();
    assert_eq!(ids(mine.clone()), ["p_b", "p_a", "p_c"]);
    assert_eq!(
        mine[1],
        herald_store::ProductRow {
            id: "p_a".into(),
            title: Some("Zeta course".into()),
            url: Some("https://s/a".into())
        }
    );
    assert!(
        s.portal_products(Some("c2".into()))
            .await
            .unwrap()
            .is_empty(),
        "a removed offer shows nothing"
    );
    assert!(
        s.portal_products(Some("nobody".into()))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ids(s.portal_products(None).await.unwrap()),
        ["p_b", "p_d", "p_a", "p_c", "p_e"]
    );
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only

mod postgres_only {
    use super::support::{self, TestDb};

    /// The store's connections use the schema the URL's `options=-csearch_path%3D…` names: its
    /// tables are created there, not in `public`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn url_options_select_the_schema() {
        let Some(db) = TestDb::postgres("url_options_select_the_schema").await else {
            return;
        };
        let schema = db.schema().unwrap().to_owned();
        let mut admin =
            <sqlx::PgConnection as sqlx::Connection>::connect(&support::pg_server_url())
                .await
                .unwrap();
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY table_name",
        )
        .bind(&schema)
        .fetch_all(&mut admin)
        .await
        .unwrap();
        for t in ["_sqlx_migrations", "events", "messages", "runs"] {
            assert!(tables.iter().any(|x| x == t), "{t} in {schema}: {tables:?}");
        }
        let current = db.text_rows("SELECT current_schema()::text").await;
        assert_eq!(current, [[Some(schema)]]);
    }
}

/// Records a workflow's enabled state; returns how many runs that parked or resumed (none when
/// the stored state was already that).
async fn set_enabled(s: &Store, workflow_id: &str, enabled: bool, now_ms: i64) -> u64 {
    s.sync_workflow_states(vec![(workflow_id.into(), enabled)], now_ms)
        .await
        .unwrap()
        .first()
        .map_or(0, |(_, _, runs)| *runs)
}

async fn processes_hear_each_others_announcements(db: &TestDb) {
    use herald_store::Heard;
    use std::time::Duration;
    let Some(mut heard_by_first) = db.store.announcements().await.expect("listen") else {
        assert_eq!(
            db.kind,
            support::Kind::Sqlite,
            "only SQLite has no one to tell"
        );
        return;
    };
    let second = db.open_another().await;
    let mut heard_by_second = second
        .announcements()
        .await
        .expect("listen")
        .expect("PostgreSQL listens");
    let next = async |a: &mut herald_store::Announcements| {
        tokio::time::timeout(Duration::from_secs(5), a.next())
            .await
            .ok()
            .map(|h| h.expect("listening"))
    };

    second.announce(Signals::MESSAGES);
    second.announce(Signals::WORKFLOWS);
    let mut got = Signals::default();
    while !(got.contains(Signals::MESSAGES) && got.contains(Signals::WORKFLOWS)) {
        match next(&mut heard_by_first).await {
            Some(Heard::Signals(s)) => got = got | s,
            other => panic!("expected the second store's announcement, got {other:?}"),
        }
    }
    assert!(!got.contains(Signals::EVENTS), "{got:?}");

    // Stored events are announced by the store itself; a process does not hear its own.
    accept(&db.store, vec![contact_event("evt_announced", "c1", T0)]).await;
    assert_eq!(
        next(&mut heard_by_second).await,
        Some(Heard::Signals(Signals::EVENTS))
    );
    assert_eq!(
        tokio::time::timeout(Duration::from_millis(300), heard_by_first.next())
            .await
            .ok()
            .map(|h| h.expect("listening")),
        None,
        "a store hears only the others"
    );
}

async fn workflow_states_and_versions_are_read_back(db: &TestDb) {
    db.store
        .save_workflow_versions(vec![("welcome".into(), "v1".into(), "{}".into())], T0)
        .await
        .unwrap();
    assert_eq!(
        db.store
            .workflow_version("welcome".into(), "v1".into())
            .await
            .unwrap()
            .as_deref(),
        Some("{}")
    );
    assert_eq!(
        db.store
            .workflow_version("welcome".into(), "v2".into())
            .await
            .unwrap(),
        None
    );
    db.store
        .sync_workflow_states(vec![("welcome".into(), false), ("nudge".into(), true)], T0)
        .await
        .unwrap();
    let mut states = db.store.workflow_states().await.unwrap();
    states.sort();
    assert_eq!(
        states,
        vec![("nudge".to_owned(), true), ("welcome".to_owned(), false)]
    );
}
