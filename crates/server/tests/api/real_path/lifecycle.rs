//! Runs that end or pause while a message waits: a goal reached, or a workflow disabled, while a
//! send window holds the message (it is cancelled, never sent); a workflow disabled across a
//! restart and enabled after it (its parked runs resume where they were).

use super::*;
use herald_store::{RunState, Timestamp};

both_backends!(
    exit_when_during_a_closed_send_window_cancels_the_message,
    disabling_a_workflow_during_a_closed_send_window_cancels_the_message,
    disable_restart_enable_resumes_parked_runs,
);

/// Reloads the workflows through the admin API; asserts `id` is now `enabled` (or not).
async fn reload_expecting(app: &TestApp, id: &str, enabled: bool) {
    let (status, body) = app.admin_post("/v1/workflows/reload").await;
    assert_eq!(status, 200, "POST /v1/workflows/reload: {body}");
    let listed = body["workflows"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["id"] == id))
        .unwrap_or_else(|| panic!("the reload does not list workflow {id}: {body}"));
    assert_eq!(
        listed["enabled"], enabled,
        "workflow {id} after the reload: {body}"
    );
}

/// Saturday 09:00–18:00 UTC only; the manual clock starts on a Tuesday at 10:00.
const SATURDAY_WINDOW: &str =
    "send_window:\n  days: [sat]\n  between: [\"09:00\", \"18:00\"]\n  timezone: UTC\n";
/// 2026-11-28T09:00:00Z, when [`SATURDAY_WINDOW`] next opens.
const SATURDAY_9: Timestamp = Timestamp::from_millis(START_MS + 4 * 86_400_000 - 3_600_000);

/// Waits until each contact has one message queued for Saturday 09:00.
async fn assert_held_until_saturday(app: &TestApp, contacts: &[&str]) {
    let rows = app
        .wait_for_status(contacts.len(), MessageStatus::Queued)
        .await;
    let held = |m: &MessageRow| {
        m.status == MessageStatus::Queued
            && m.due_ms
                .is_some_and(|d| (SATURDAY_9..SATURDAY_9 + Duration::from_secs(60)).contains(&d))
    };
    let not_held: Vec<(&str, &str, Option<Timestamp>)> = rows
        .iter()
        .filter(|m| !held(m))
        .map(|m| (m.contact_id.as_str(), m.status.as_str(), m.due_ms))
        .collect();
    assert!(
        rows.len() == contacts.len() && not_held.is_empty(),
        "one message per contact of {contacts:?}, each queued for Saturday 09:00 \
         ({SATURDAY_9}); not so (contact, status, due): {not_held:?}"
    );
    assert_eq!(
        app.sink().count(),
        0,
        "an email went out outside the window"
    );
}

/// Waits until `contact`'s only message is cancelled; fails naming its status and its run's.
async fn assert_cancelled(app: &TestApp, contact: &str, why: &str) {
    let mut rows = Vec::new();
    let cancelled = eventually(async || {
        rows = app.messages_of(contact).await;
        rows.len() == 1 && rows[0].status == MessageStatus::Cancelled
    })
    .await;
    assert!(
        cancelled,
        "{contact}'s held message should be cancelled ({why}); its messages (step, status, \
         reason): {:?}; its runs: {:?}",
        rows.iter()
            .map(|m| (m.step_id.as_str(), m.status.as_str(), m.reason.as_deref()))
            .collect::<Vec<_>>(),
        run_states(&app.runs_of(contact).await)
    );
}

/// Saturday 10:00: the window is open. Exactly `expected` receive an email (one each); the
/// cancelled contact's message stays cancelled and never reaches the relay.
async fn open_the_window(app: &TestApp, expected: &[&str], cancelled: &str) {
    app.advance((SATURDAY_9 + Duration::from_secs(3_600)).since(START));
    app.wait_for_mails(expected.len()).await;
    app.settle().await;
    let expected: BTreeSet<String> = expected
        .iter()
        .map(|c| format!("{c}@example.com"))
        .collect();
    assert_one_email_each(&app.sink().received(), &expected);
    let refused = app.sink().refusals().len();
    assert_eq!(refused, 0, "the relay refused {refused} attempts");
    let rows = app.messages_of(cancelled).await;
    assert!(
        rows.len() == 1 && rows[0].status == MessageStatus::Cancelled,
        "{cancelled}'s messages once the window opened (step, status): {:?}",
        rows.iter()
            .map(|m| (m.step_id.as_str(), m.status.as_str()))
            .collect::<Vec<_>>()
    );
}

async fn exit_when_during_a_closed_send_window_cancels_the_message(backend: Backend) {
    let goal = format!(
        "name: Until they finish\ntrigger:\n  event: offer_access_granted\nexit_when:\n  event: product_completed\n{SATURDAY_WINDOW}steps:\n  - id: nudge\n    send_email:\n      subject: \"Weekend nudge\"\n      text: \"hi\"\n  - wait: 7d\n  - id: later\n    send_email:\n      subject: \"A week later\"\n      text: \"later\"\n"
    );
    let options = TestOptions::new(backend)
        .workflow("goal", &goal)
        .manual_clock();
    let Some(app) = spawn_app(options).await else {
        return;
    };
    for who in ["ann", "cy"] {
        app.accept(&offer_granted(contact(who, "Ann"), "o_pro"))
            .await;
    }
    assert_held_until_saturday(&app, &["ann", "cy"]).await;

    // Ann finishes the product before Saturday: her run exits and her nudge must not go.
    app.accept(&product_completed(contact("ann", "Ann"), "p_rust101"))
        .await;
    let mut runs = Vec::new();
    let exited = eventually(async || {
        runs = app.runs_of("ann").await;
        runs.len() == 1 && runs[0].state == RunState::Exited
    })
    .await;
    assert!(
        exited,
        "ann's run should have exited: {:?}",
        run_states(&runs)
    );
    assert_cancelled(&app, "ann", "her run exited").await;

    // Cy did not finish: his nudge goes out on Saturday, Ann's does not.
    open_the_window(&app, &["cy"], "ann").await;
    let runs = app.runs_of("ann").await;
    assert_eq!(
        runs.iter().map(|r| r.state).collect::<Vec<_>>(),
        [RunState::Exited],
        "ann's run once the window opened: {:?}",
        run_states(&runs)
    );
}

async fn disabling_a_workflow_during_a_closed_send_window_cancels_the_message(backend: Backend) {
    let welcome = |enabled: bool| {
        format!(
            "name: Weekend welcome\nenabled: {enabled}\ntrigger:\n  event: new_signup\n{SATURDAY_WINDOW}steps:\n  - id: welcome\n    send_email:\n      subject: \"Weekend welcome\"\n      text: \"hi\"\n"
        )
    };
    let offer = format!(
        "name: Weekend offer\ntrigger:\n  event: offer_access_granted\n{SATURDAY_WINDOW}steps:\n  - id: offer\n    send_email:\n      subject: \"Weekend offer\"\n      text: \"hi\"\n"
    );
    let options = TestOptions::new(backend)
        .workflow("welcome", &welcome(true))
        .workflow("offer", &offer)
        .manual_clock()
        .admin_token(ADMIN_TOKEN);
    let Some(app) = spawn_app(options).await else {
        return;
    };
    app.accept(&new_signup(contact("bea", "Bea"))).await;
    app.accept(&offer_granted(contact("dan", "Dan"), "o_pro"))
        .await;
    assert_held_until_saturday(&app, &["bea", "dan"]).await;

    // The welcome is disabled before Saturday: Bea's held welcome must not go.
    std::fs::write(app.env.workflows.join("welcome.yaml"), welcome(false)).unwrap();
    reload_expecting(&app, "welcome", false).await;
    assert_cancelled(&app, "bea", "its workflow was disabled").await;

    // The offer workflow stayed enabled: Dan's email goes out on Saturday, Bea's does not.
    open_the_window(&app, &["dan"], "bea").await;
}

async fn disable_restart_enable_resumes_parked_runs(backend: Backend) {
    let drip = |enabled: bool| {
        format!(
            "name: Drip\nenabled: {enabled}\ntrigger:\n  event: new_signup\nsteps:\n  - id: first\n    send_email: {{subject: \"1\", text: \"one\"}}\n  - wait: 1d\n  - id: second\n    send_email: {{subject: \"2\", text: \"two\"}}\n"
        )
    };
    let options = TestOptions::new(backend)
        .workflow("drip", &drip(true))
        .manual_clock()
        .admin_token(ADMIN_TOKEN);
    let Some(app) = spawn_app(options).await else {
        return;
    };
    let events = signups("drip_", 5);
    assert_eq!(app.accept_batch(&events).await, vec!["new"; 5]);
    app.wait_for_mails(5).await;
    app.settle().await;
    let all_in = async |app: &TestApp, state: RunState, when: &str| {
        let mut runs = Vec::new();
        let reached = eventually(async || {
            runs = app.runs().await;
            runs.len() == 5 && runs.iter().all(|r| r.state == state)
        })
        .await;
        assert!(
            reached,
            "{when}: expected 5 runs {}, got {:?}",
            state.as_str(),
            run_states(&runs)
        );
    };
    all_in(
        &app,
        RunState::Active,
        "waiting a day after the first email",
    )
    .await;

    let file = app.env.workflows.join("drip.yaml");
    std::fs::write(&file, drip(false)).unwrap();
    reload_expecting(&app, "drip", false).await;
    all_in(&app, RunState::Parked, "after disabling").await;
    // The day passes while the workflow is disabled: parked runs send nothing.
    app.advance(Duration::from_secs(86_400 + 60));
    app.settle().await;
    assert_eq!(app.sink().count(), 5, "a parked run sent its second email");

    // Restart with the workflow still disabled, on the same database.
    let app = app.shutdown().await.restart().await;
    app.settle().await;
    all_in(&app, RunState::Parked, "after the restart").await;
    assert_eq!(
        app.sink().count(),
        5,
        "a parked run sent its second email after the restart"
    );

    // Enabled again, the runs resume where they stood: their day passed while they were parked,
    // so the second emails go without the clock moving (a jump while they are in flight would
    // outrun their lease and free them to be claimed again).
    std::fs::write(&file, drip(true)).unwrap();
    reload_expecting(&app, "drip", true).await;
    app.wait_for_mails(10).await;
    app.settle().await;
    let mails = app.sink().received();
    let wrong: Vec<(String, Vec<String>)> = by_recipient(&mails)
        .into_iter()
        .map(|(to, mails)| (to, mails.iter().map(|m| m.parse().subject).collect()))
        .filter(|(_, subjects): &(_, Vec<String>)| subjects != &["1", "2"])
        .collect();
    assert!(
        wrong.is_empty() && by_recipient(&mails).len() == 5,
        "each of the 5 contacts should get \"1\" then \"2\" once; these did not (recipient, \
         subjects): {wrong:?}"
    );
    all_in(&app, RunState::Completed, "after enabling").await;
}
