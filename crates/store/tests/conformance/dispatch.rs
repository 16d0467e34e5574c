//! Dispatch: applying a planner's plan, one live run per workflow and contact, exits and
//! resumes, event order, and dispatchers taking turns.

use super::*;
use herald_store::{ContactId, RunExit, RunResume, WorkflowId};

conformance! {
    dispatch_applies_the_plan_in_one_go,
    dispatch_keeps_one_live_run_per_workflow_and_contact,
    dispatch_exits_and_resumes_runs,
    dispatch_takes_events_in_order_up_to_the_limit,
    concurrent_dispatchers_dispatch_each_event_once,
    a_loop_spawned_beside_the_writer_dispatches_and_ends_with_its_handle,
    dispatchers_take_turns_so_later_events_see_earlier_runs,
}

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
    fn plan(&self, input: &DispatchInput, now: Timestamp) -> DispatchPlan {
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
                        Some(now + ms(60_000)),
                    );
                    run.pc = 1;
                    run.steps = vec![step("welcome", "sent", now)];
                    run.messages = vec![queued_email(&format!("msg_{}", e.id), "welcome", now)];
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
                        Some(now + ms(86_400_000)),
                    );
                    run.wait_event = Some("lesson_completed".into());
                    plan.new_runs.push(run);
                }
                _ => {}
            }
        }
        let copy = DispatchInput {
            now: input.now,
            events: input.events.clone(),
            live_runs: input.live_runs.clone(),
            counts: input.counts.clone(),
            contacts: input.contacts.clone(),
            states: input.states.clone(),
        };
        self.seen.lock().unwrap().push(copy);
        plan
    }

    async fn dispatch(&self, store: &Store, limit: i64, now: Timestamp) -> usize {
        store
            .dispatch(DispatchRequest::new(
                limit,
                &|| now,
                Duration::from_secs(86_400),
                &|input: &DispatchInput| self.plan(input, now),
            ))
            .await
            .expect("dispatch")
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Vec<DispatchInput>> {
        self.seen.lock().unwrap()
    }
}

async fn dispatch_applies_the_plan_in_one_go(db: &TestDb) {
    let s = &db.store;
    let planner = TestPlanner::default();
    let now = T0 + ms(10_000);
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
        (RunState::Active, 1, Some(now + ms(60_000)), None)
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
    let now = T0 + ms(10_000);
    // Two grants of one contact in one batch: the planner plans two runs; the second is
    // silently not inserted, nor are its steps and messages.
    accept(
        s,
        vec![granted("e1", "c1", T0), granted("e2", "c1", T0 + ms(1))],
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
    accept(s, vec![granted("e3", "c1", T0 + ms(2))]).await;
    assert_eq!(planner.dispatch(s, 100, now + ms(1)).await, 1);
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
        let counts = input.counts[&(ContactId::from("c1"), WorkflowId::from(WELCOME))];
        assert_eq!((counts.total, counts.recent, counts.live), (1, 1, true));
    }
    assert_eq!(s.runs(all()).await.unwrap().len(), 1);
    let mut refused = run_write("run_refused", WELCOME, "c1", 1, RunState::Refused, None);
    refused.reason = Some("loop".into());
    seed_runs(s, vec![refused], now).await;
    assert_eq!(s.runs(all()).await.unwrap().len(), 2);

    // Counts: refusals are not enrollments; `recent` counts from the window start.
    accept(s, vec![granted("e4", "c2", T0)]).await;
    assert_eq!(planner.dispatch(s, 100, now + ms(86_400_005)).await, 1);
    accept(s, vec![granted("e5", "c1", T0 + ms(3))]).await;
    assert_eq!(planner.dispatch(s, 100, now + ms(86_400_010)).await, 1);
    let seen = planner.last();
    let counts = seen.last().unwrap().counts[&(ContactId::from("c1"), WorkflowId::from(WELCOME))];
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
            .contains_key(&(ContactId::from("c2"), WorkflowId::from(WELCOME))),
        "only the batch's contacts"
    );
}

async fn dispatch_exits_and_resumes_runs(db: &TestDb) {
    let s = &db.store;
    let planner = TestPlanner::default();
    let now = T0 + ms(10_000);
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
        (RunState::WaitingEvent, Some(now + ms(86_400_000)))
    );

    // The goal event exits the run; the awaited event resumes the other, due at once.
    let later = now + ms(5_000);
    accept(
        s,
        vec![
            new_event(
                "e3",
                "product_completed",
                T0 + ms(1),
                json!({"contact": {"id": "c1"}, "product": {"id": "p1"}}),
            ),
            lesson_event("e4", "c2", json!({"id": "p1"}), T0 + ms(1)),
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
    let claimed = s.claim_runs(later, 10, ms(1_000)).await.unwrap();
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
    assert_eq!(
        s.dispatch(DispatchRequest::new(
            100,
            &|| later + ms(1),
            Duration::MAX,
            &plan
        ))
        .await
        .unwrap(),
        1
    );
    let still = run_row(s, "run_e1").await;
    assert_eq!(
        (still.state, still.reason.as_deref(), still.updated_ms),
        (RunState::Exited, Some("goal reached"), later)
    );

    // With the run ended, the contact may be enrolled again.
    accept(s, vec![granted("e6", "c1", T0 + ms(2))]).await;
    planner.dispatch(s, 100, later + ms(2)).await;
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
        let n = s
            .dispatch(DispatchRequest::new(2, &|| T0, Duration::MAX, &planner))
            .await
            .unwrap();
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
                let got = planner.dispatch(&store, 7, T0 + ms(10_000)).await;
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
            T0 + ms(1),
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
        TestPlanner::default().plan(input, T0 + ms(10))
    });
    let first_store = db.store.clone();
    let first = tokio::spawn(async move {
        first_store
            .dispatch(DispatchRequest::new(
                1,
                &|| T0 + ms(10),
                Duration::MAX,
                &*slow,
            ))
            .await
            .expect("first dispatch")
    });
    entered_rx
        .await
        .expect("the first dispatcher reached its planner");

    let second = tokio::spawn(async move {
        TestPlanner::default()
            .dispatch(&other, 10, T0 + ms(20))
            .await
    });
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

/// The dispatcher runs where the store puts it (on SQLite the writer's thread): it dispatches
/// there, and aborting its handle on the caller's runtime ends it.
async fn a_loop_spawned_beside_the_writer_dispatches_and_ends_with_its_handle(db: &TestDb) {
    accept(&db.store, vec![contact_event("e1", "c1", T0)]).await;
    let (dispatched_tx, dispatched) = tokio::sync::oneshot::channel();
    let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
    let store = db.store.clone();
    let (handle, _) = db.store.spawn_writing(async move {
        let _ended = ended_tx;
        let n = store
            .dispatch(DispatchRequest::new(10, &|| T0, Duration::ZERO, &no_plan))
            .await
            .unwrap();
        let thread = std::thread::current().name().map(str::to_owned);
        let _ = dispatched_tx.send((n, thread));
        std::future::pending::<()>().await;
    });
    let (n, thread) = dispatched.await.unwrap();
    assert_eq!(n, 1);
    if db.kind == support::Kind::Sqlite {
        assert_eq!(thread.as_deref(), Some("herald-sqlite-writer"));
    }
    handle.abort();
    tokio::time::timeout(std::time::Duration::from_secs(10), ended)
        .await
        .expect("the spawned loop ended with its handle")
        .unwrap_err();
}
