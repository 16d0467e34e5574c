//! Workflow versions and states, and parking a disabled workflow's runs.

use super::*;
use herald_store::{RunId, WorkflowId};

conformance! {
    workflow_versions_are_kept_and_live_ones_listed,
    parking_a_workflow_keeps_its_runs_wait_state,
    workflow_states_and_versions_are_read_back,
}

async fn workflow_versions_are_kept_and_live_ones_listed(db: &TestDb) {
    let s = &db.store;
    let v = |id: &str, version: &str, bundle: &str| {
        (WorkflowId::from(id), version.to_owned(), bundle.to_owned())
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
        T0 + ms(1),
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
        Some(T0 + ms(900)),
    );
    waiting.wait_event = Some("lesson_completed".into());
    seed_runs(
        s,
        vec![
            run_write(
                "r_active",
                "wf",
                "c1",
                0,
                RunState::Active,
                Some(T0 + ms(500)),
            ),
            waiting,
            run_write("r_done", "wf", "c3", 0, RunState::Completed, None),
            run_write(
                "r_other",
                "wf_other",
                "c1",
                0,
                RunState::Active,
                Some(T0 + ms(500)),
            ),
        ],
        T0,
    )
    .await;
    assert_eq!(set_enabled(s, "wf", false, T0 + ms(1)).await, 2);
    assert_eq!(
        set_enabled(s, "wf", false, T0 + ms(2)).await,
        0,
        "already parked"
    );
    for id in ["r_active", "r_wait"] {
        let r = run_row(s, id).await;
        assert_eq!(
            (r.state, r.updated_ms, r.reason.as_deref()),
            (RunState::Parked, T0 + ms(1), None)
        );
    }
    assert_eq!(run_row(s, "r_done").await.state, RunState::Completed);
    let claimed = s.claim_runs(T0 + ms(10_000), 10, ms(100)).await.unwrap();
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

    assert_eq!(set_enabled(s, "wf", true, T0 + ms(3)).await, 2);
    let active = run_row(s, "r_active").await;
    assert_eq!(
        (
            active.state,
            active.due_ms,
            active.reason.as_deref(),
            active.updated_ms
        ),
        (RunState::Active, Some(T0 + ms(500)), None, T0 + ms(3))
    );
    let wait = run_row(s, "r_wait").await;
    assert_eq!(
        (wait.state, wait.due_ms, wait.reason.as_deref()),
        (RunState::WaitingEvent, Some(T0 + ms(900)), None)
    );
    // The wait is intact: the dispatcher still sees what the run waits for.
    accept(s, vec![contact_event("probe", "c2", T0)]).await;
    let waits = Mutex::new(Vec::new());
    s.dispatch(DispatchRequest::new(
        10,
        &|| T0 + ms(4),
        Duration::MAX,
        &|input: &DispatchInput| {
            waits.lock().unwrap().extend(
                input
                    .live_runs
                    .iter()
                    .map(|r| (r.run_id.clone(), r.wait_event.clone())),
            );
            DispatchPlan::default()
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        waits.into_inner().unwrap(),
        [(RunId::from("r_wait"), Some("lesson_completed".to_owned()))]
    );
    assert_eq!(set_enabled(s, "wf", true, T0 + ms(5)).await, 0);
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
        vec![("nudge".into(), true), ("welcome".into(), false)]
    );
}
