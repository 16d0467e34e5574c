//! The run queue: claims under a lease, finishing runs, and the earliest due work.

use super::*;
use herald_store::{LeaseToken, RunAdvance, RunId};

conformance! {
    claim_runs_holds_a_lease,
    finish_runs_drops_stale_leases_and_appends_effects,
    concurrent_claims_never_share_a_run,
    next_due_is_the_earliest_due_work,
}

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
            run_write("r1", "wf", "c1", 0, RunState::Active, Some(T0 + ms(1_000))),
            run_write(
                "r2",
                "wf2",
                "c1",
                0,
                RunState::WaitingEvent,
                Some(T0 + ms(1_200)),
            ),
            run_write("r3", "wf3", "c2", 0, RunState::Active, None),
            run_write("r4", "wf4", "c2", 0, RunState::Completed, Some(T0)),
        ],
        T0,
    )
    .await;
    assert!(
        s.claim_runs(T0 + ms(999), 10, ms(500))
            .await
            .unwrap()
            .is_empty(),
        "nothing due yet"
    );

    let claimed = s.claim_runs(T0 + ms(1_000), 10, ms(500)).await.unwrap();
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
    assert!(!c.lease_token.as_str().is_empty());

    // Leased: not claimable until the lease runs out; a waiting run is claimable at its timeout.
    let later = s.claim_runs(T0 + ms(1_200), 10, ms(500)).await.unwrap();
    assert_eq!(
        later.iter().map(|c| c.run_id.as_str()).collect::<Vec<_>>(),
        ["r2"]
    );
    assert_eq!(later[0].state, RunState::WaitingEvent);
    assert!(
        s.claim_runs(T0 + ms(1_499), 10, ms(500))
            .await
            .unwrap()
            .is_empty()
    );
    let again = s.claim_runs(T0 + ms(1_500), 10, ms(500)).await.unwrap();
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
                    Some(T0 + ms(10) - ms(i)),
                )
            })
            .collect(),
        T0,
    )
    .await;
    // (The order within one claim is unspecified.)
    let first = s.claim_runs(T0 + ms(100), 3, ms(500)).await.unwrap();
    assert_eq!(
        sorted(first.iter().map(|c| c.run_id.as_str())),
        ["q2", "q3", "q4"]
    );
    let rest = s.claim_runs(T0 + ms(100), 3, ms(500)).await.unwrap();
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

    let stale = s.claim_runs(T0, 10, ms(100)).await.unwrap();
    assert_eq!(stale.len(), 2);
    let fresh = s.claim_runs(T0 + ms(100), 10, ms(100)).await.unwrap();
    assert_eq!(fresh.len(), 2, "the first lease ran out");
    let token = |claims: &[herald_store::ClaimedRun], id: &str| {
        claims
            .iter()
            .find(|c| c.run_id == id)
            .unwrap()
            .lease_token
            .clone()
    };

    let advance = |id: &str, contact: &str, state: RunState, token: LeaseToken| {
        let mut w = run_write(
            id,
            "wf",
            contact,
            0,
            state,
            (state == RunState::Active).then_some(T0 + ms(9_000)),
        );
        w.pc = 3;
        w.steps = vec![
            step("s2", "sent", T0 + ms(150)),
            step("s3", "waited", T0 + ms(151)),
        ];
        w.messages = vec![queued_email(&format!("m_{id}"), "s2", T0 + ms(150))];
        RunAdvance {
            lease_token: token,
            write: w,
        }
    };
    // The late result under the lost lease is dropped, with its effects.
    s.finish_runs(
        T0 + ms(150),
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
        T0 + ms(150),
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
        (
            RunState::Completed,
            3,
            None,
            Some(T0 + ms(150)),
            T0 + ms(150)
        )
    );
    assert_eq!(
        r1.steps,
        [
            step("start", "ok", T0),
            step("s2", "sent", T0 + ms(150)),
            step("s3", "waited", T0 + ms(151))
        ]
    );
    let r2 = run_row(s, "r2").await;
    assert_eq!(
        (r2.state, r2.due_ms, r2.ended_ms),
        (RunState::Active, Some(T0 + ms(9_000)), None)
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
        T0 + ms(200),
        vec![advance("r2", "c2", RunState::Failed, token(&fresh, "r2"))],
    )
    .await
    .unwrap();
    assert_eq!(run_row(s, "r2").await.state, RunState::Active);
    assert!(
        s.claim_runs(T0 + ms(8_999), 10, ms(100))
            .await
            .unwrap()
            .is_empty()
    );
    let claimed = s.claim_runs(T0 + ms(9_000), 10, ms(100)).await.unwrap();
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
        Some(T0 + ms(99_000)),
    );
    w.wait_event = Some("lesson_completed".into());
    s.finish_runs(
        T0 + ms(9_001),
        vec![RunAdvance {
            lease_token: claimed[0].lease_token.clone(),
            write: w,
        }],
    )
    .await
    .unwrap();
    accept(s, vec![contact_event("probe", "c2", T0)]).await;
    let waits = Mutex::new(Vec::new());
    s.dispatch(DispatchRequest::new(
        10,
        &|| T0 + ms(9_002),
        Duration::MAX,
        &|input: &DispatchInput| {
            waits.lock().unwrap().extend(
                input
                    .live_runs
                    .iter()
                    .map(|r| (r.run_id.clone(), r.state, r.wait_event.clone())),
            );
            DispatchPlan::default()
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        waits.into_inner().unwrap(),
        [(
            RunId::from("r2"),
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
                    Some(T0 + ms(i)),
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
                let claimed = store
                    .claim_runs(T0 + ms(100), 3, ms(60_000))
                    .await
                    .expect("claim");
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

async fn next_due_is_the_earliest_due_work(db: &TestDb) {
    let s = &db.store;
    assert_eq!(s.next_due().await.unwrap(), None);
    let mut done = run_write("r_done", "wf0", "c1", 0, RunState::Completed, None);
    done.messages = vec![queued_email("m1", "s1", T0 + ms(700))];
    let mut sent = queued_email("m2", "s2", T0 + ms(50));
    sent.status = MessageStatus::Sent;
    done.messages.push(sent);
    seed_runs(
        s,
        vec![
            done,
            run_write(
                "r_active",
                "wf1",
                "c1",
                0,
                RunState::Active,
                Some(T0 + ms(900)),
            ),
            run_write(
                "r_wait",
                "wf2",
                "c1",
                0,
                RunState::WaitingEvent,
                Some(T0 + ms(800)),
            ),
            run_write(
                "r_parked",
                "wf3",
                "c1",
                0,
                RunState::Parked,
                Some(T0 + ms(10)),
            ),
            run_write(
                "r_failed",
                "wf4",
                "c1",
                0,
                RunState::Failed,
                Some(T0 + ms(20)),
            ),
        ],
        T0,
    )
    .await;
    assert_eq!(
        s.next_due().await.unwrap(),
        Some(T0 + ms(700)),
        "the queued message"
    );
    let claimed = s.claim_messages(T0 + ms(700), 10, ms(100)).await.unwrap();
    s.complete_messages(
        T0 + ms(701),
        vec![outcome(
            &claimed[0],
            DeliveryResult::Sent { provider_id: None },
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        s.next_due().await.unwrap(),
        Some(T0 + ms(800)),
        "the waiting run's timeout"
    );
    set_enabled(s, "wf2", false, T0).await;
    assert_eq!(
        s.next_due().await.unwrap(),
        Some(T0 + ms(900)),
        "parked runs are not due"
    );
}
