//! Workflow semantics with a manual clock: waits, branches, enrollment rules, exits, event waits,
//! drafts and loop protection.

use crate::helpers::*;
use herald_store::RunState;
use serde_json::{Value, json};
use std::time::Duration;

both_backends!(
    one_layout_wraps_the_emails_of_three_workflows,
    the_step_after_an_event_wait_knows_whether_it_came,
    conditions_and_filters_read_what_the_contact_holds_and_completed,
    dates_and_numbers_in_each_learners_language,
    wait_two_days_then_send,
    if_then_else_branches,
    re_entry_false_runs_once_true_runs_again,
    live_run_blocks_re_enrollment,
    exit_when_ends_a_waiting_run,
    wait_for_event_resumes_on_the_event,
    wait_for_event_times_out,
    disabled_workflow_never_triggers,
    loop_protection_refuses_the_51st_enrollment,
    disabling_parks_waiting_runs_and_enabling_resumes_them,
    runs_stay_pinned_to_their_version_across_a_reload,
    a_reload_that_does_not_check_changes_nothing,
    a_later_email_goes_to_the_current_address,
);

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

const WELCOME_THEN_WAIT: &str = r#"
name: Welcome, then check in
trigger:
  event: offer_access_granted
exit_when:
  event: product_completed
steps:
  - id: welcome
    send_email:
      subject: "Welcome"
      text: "Hi {{contact.first_name}}"
  - wait: 2d
  - id: check_in
    send_email:
      subject: "Two days in"
      text: "How is it going, {{contact.first_name}}?"
"#;

fn subjects(app: &TestApp) -> Vec<(String, String)> {
    app.sink()
        .received()
        .iter()
        .map(|m| (m.rcpt_to.join(","), m.parse().subject))
        .collect()
}

async fn wait_two_days_then_send(backend: Backend) {
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("welcome", WELCOME_THEN_WAIT);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_wait", "Ann"), "o_pro"))
        .await;
    app.wait_for_mails(1).await;
    app.settle().await;
    let runs = app.runs().await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, RunState::Active);
    assert_eq!(
        runs[0].due_ms,
        Some(START + Duration::from_secs(2 * 86_400)),
        "the wait should end two days after the start"
    );

    app.advance(2 * DAY - MINUTE);
    app.settle().await;
    assert_eq!(
        app.sink().count(),
        1,
        "the second email went before the wait was over"
    );

    app.advance(2 * MINUTE);
    app.wait_for_mails(2).await;
    app.settle().await;
    let to = |s: &str| ("c_wait@example.com".to_owned(), s.to_owned());
    assert_eq!(subjects(&app), [to("Welcome"), to("Two days in")]);
    let ids: Vec<String> = app
        .sink()
        .received()
        .iter()
        .map(|m| m.message_id())
        .collect();
    assert_ne!(ids[0], ids[1], "two messages share a Message-ID");
    let runs = app.runs().await;
    assert_eq!(runs[0].state, RunState::Completed);
    assert!(runs[0].ended_ms.is_some());
}

async fn if_then_else_branches(backend: Backend) {
    let wf = r#"
name: Branching
trigger:
  event: offer_access_granted
steps:
  - if:
      all:
        - { field: offer.id, equals: o_pro }
        - { field: contact.phone, exists: true }
    then:
      - id: pro
        send_email:
          subject: "Pro with phone"
          text: "x"
    else:
      - id: other
        send_email:
          subject: "Other"
          text: "x"
  - if:
      any:
        - { field: offer.id, in: [o_vip, o_gold] }
        - { field: contact.first_name, equals: Zed }
    then:
      - id: vip
        send_email:
          subject: "VIP"
          text: "x"
  - id: after
    send_email:
      subject: "After the branches"
      text: "x"
"#;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("branching", wf);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let with_phone = |id: &str, name: &str| {
        let mut c = contact(id, name);
        c["phone"] = serde_json::json!("+15551234567");
        c
    };
    app.accept(&offer_granted(with_phone("c_if1", "Ann"), "o_pro"))
        .await;
    app.accept(&offer_granted(contact("c_if2", "Bob"), "o_pro"))
        .await;
    app.accept(&offer_granted(with_phone("c_if3", "Cy"), "o_basic"))
        .await;
    app.accept(&offer_granted(contact("c_if4", "Di"), "o_gold"))
        .await;
    app.accept(&offer_granted(contact("c_if5", "Zed"), "o_basic"))
        .await;
    app.settle().await;

    let mut got: Vec<(String, String)> = app
        .messages()
        .await
        .into_iter()
        .map(|m| (m.contact_id.into(), m.step_id))
        .collect();
    got.sort();
    let expected = [
        ("c_if1", "after"),
        ("c_if1", "pro"),
        ("c_if2", "after"),
        ("c_if2", "other"),
        ("c_if3", "after"),
        ("c_if3", "other"),
        ("c_if4", "after"),
        ("c_if4", "other"),
        ("c_if4", "vip"),
        ("c_if5", "after"),
        ("c_if5", "other"),
        ("c_if5", "vip"),
    ];
    assert_eq!(got, expected.map(|(c, s)| (c.to_owned(), s.to_owned())));
    let mails = app.wait_for_mails(12).await;
    let to_ann: Vec<String> = mails
        .iter()
        .filter(|m| m.rcpt_to == ["c_if1@example.com"])
        .map(|m| m.parse().subject)
        .collect();
    assert_eq!(to_ann.len(), 2);
    assert!(
        to_ann.contains(&"Pro with phone".to_owned())
            && to_ann.contains(&"After the branches".to_owned()),
        "{to_ann:?}"
    );
    assert!(
        app.runs()
            .await
            .iter()
            .all(|r| r.state == RunState::Completed)
    );
}

async fn re_entry_false_runs_once_true_runs_again(backend: Backend) {
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow(
            "once",
            &one_email_workflow("lesson_completed", "Once", false),
        )
        .workflow(
            "again",
            &one_email_workflow("lesson_completed", "Again", true),
        );
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    for lesson in ["Ownership", "Borrowing", "Lifetimes"] {
        app.accept(&lesson_completed(
            contact("c_re", "Ann"),
            "p_rust101",
            lesson,
        ))
        .await;
        app.settle().await;
    }
    let runs = app.runs_of("c_re").await;
    let count = |wf: &str| runs.iter().filter(|r| r.workflow_id == wf).count();
    assert_eq!(count("once"), 1, "re_entry: false enrolled a contact twice");
    assert_eq!(
        count("again"),
        3,
        "re_entry: true did not enroll again after the run ended"
    );
    app.wait_for_mails(4).await;
    app.settle().await;
    let mails = subjects(&app);
    assert_eq!(mails.iter().filter(|(_, s)| s == "Once").count(), 1);
    assert_eq!(mails.iter().filter(|(_, s)| s == "Again").count(), 3);
}

async fn live_run_blocks_re_enrollment(backend: Backend) {
    let wf = r#"
name: Re-entrant with a wait
trigger:
  event: lesson_completed
re_entry: true
steps:
  - id: first
    send_email:
      subject: "First"
      text: "x"
  - wait: 1d
  - id: second
    send_email:
      subject: "Second"
      text: "x"
"#;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("waiting", wf);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&lesson_completed(
        contact("c_live", "Ann"),
        "p_rust101",
        "One",
    ))
    .await;
    app.settle().await;
    // Still in the first run: never enrolled twice at once, even with re_entry: true.
    app.accept(&lesson_completed(
        contact("c_live", "Ann"),
        "p_rust101",
        "Two",
    ))
    .await;
    app.settle().await;
    assert_eq!(
        app.runs_of("c_live").await.len(),
        1,
        "a contact was enrolled while its run was live"
    );

    app.advance(DAY + MINUTE);
    app.wait_for_mails(2).await;
    app.settle().await;
    assert_eq!(app.runs_of("c_live").await[0].state, RunState::Completed);
    // Ended: now it may enter again.
    app.accept(&lesson_completed(
        contact("c_live", "Ann"),
        "p_rust101",
        "Three",
    ))
    .await;
    app.wait_for_mails(3).await;
    app.settle().await;
    assert_eq!(app.runs_of("c_live").await.len(), 2);
}

async fn exit_when_ends_a_waiting_run(backend: Backend) {
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("welcome", WELCOME_THEN_WAIT);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_exit", "Ann"), "o_pro"))
        .await;
    app.accept(&offer_granted(contact("c_stay", "Bob"), "o_pro"))
        .await;
    app.wait_for_mails(2).await;
    app.settle().await;

    // The goal is reached for one contact only.
    app.accept(&product_completed(contact("c_exit", "Ann"), "p_rust101"))
        .await;
    app.settle().await;
    let exited = &app.runs_of("c_exit").await[0];
    assert_eq!(exited.state, RunState::Exited, "{exited:#?}");
    assert!(
        exited
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("product_completed"),
        "{:?}",
        exited.reason
    );
    assert_eq!(app.runs_of("c_stay").await[0].state, RunState::Active);

    app.advance(2 * DAY + MINUTE);
    app.wait_for_mails(3).await;
    app.settle().await;
    let mails = subjects(&app);
    assert_eq!(mails.len(), 3, "{mails:?}");
    assert!(mails.contains(&("c_stay@example.com".into(), "Two days in".into())));
    assert!(
        !mails.contains(&("c_exit@example.com".into(), "Two days in".into())),
        "an exited run sent its later email"
    );
    assert_eq!(app.messages_of("c_exit").await.len(), 1);
}

const WAIT_FOR_LESSON: &str = r#"
name: Nudge until the first lesson
trigger:
  event: offer_access_granted
steps:
  - id: start
    send_email:
      subject: "Start lesson one"
      text: "x"
  - id: wait_lesson
    wait: { event: lesson_completed, timeout: 3d }
  - id: next
    send_email:
      subject: "On to lesson two"
      text: "x"
"#;

async fn wait_for_event_resumes_on_the_event(backend: Backend) {
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("nudge", WAIT_FOR_LESSON);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_we", "Ann"), "o_pro"))
        .await;
    app.accept(&offer_granted(contact("c_we_other", "Bob"), "o_pro"))
        .await;
    app.wait_for_mails(2).await;
    app.settle().await;
    let run = &app.runs_of("c_we").await[0];
    assert_eq!(run.state, RunState::WaitingEvent);

    // Another contact's lesson does not resume this run; this contact's does, at once.
    app.accept(&lesson_completed(
        contact("c_someone", "Cy"),
        "p_rust101",
        "Ownership",
    ))
    .await;
    app.accept(&lesson_completed(
        contact("c_we", "Ann"),
        "p_rust101",
        "Ownership",
    ))
    .await;
    app.wait_for_mails(3).await;
    app.settle().await;
    let mails = subjects(&app);
    assert!(
        mails.contains(&("c_we@example.com".into(), "On to lesson two".into())),
        "{mails:?}"
    );
    assert_eq!(mails.len(), 3, "{mails:?}");
    assert_eq!(app.runs_of("c_we").await[0].state, RunState::Completed);
    assert_eq!(
        app.runs_of("c_we_other").await[0].state,
        RunState::WaitingEvent
    );
}

async fn wait_for_event_times_out(backend: Backend) {
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("nudge", WAIT_FOR_LESSON);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_to", "Ann"), "o_pro"))
        .await;
    app.wait_for_mails(1).await;
    app.settle().await;
    let run = &app.runs_of("c_to").await[0];
    assert_eq!(run.state, RunState::WaitingEvent);
    assert_eq!(run.due_ms, Some(START + Duration::from_secs(3 * 86_400)));

    app.advance(3 * DAY - MINUTE);
    app.settle().await;
    assert_eq!(app.sink().count(), 1, "the wait ended before its timeout");
    app.advance(2 * MINUTE);
    app.wait_for_mails(2).await;
    app.settle().await;
    assert_eq!(
        subjects(&app)[1],
        ("c_to@example.com".into(), "On to lesson two".into())
    );
    let run = &app.runs_of("c_to").await[0];
    assert_eq!(run.state, RunState::Completed);
    assert!(
        run.steps.iter().any(|s| s.outcome.contains("timed out")),
        "{:#?}",
        run.steps
    );

    // An event after the run ended changes nothing.
    app.accept(&lesson_completed(
        contact("c_to", "Ann"),
        "p_rust101",
        "Ownership",
    ))
    .await;
    app.settle().await;
    assert_eq!(app.sink().count(), 2);
}

async fn disabled_workflow_never_triggers(backend: Backend) {
    let draft = r#"
name: A draft
enabled: false
trigger:
  event: new_signup
steps:
  - id: draft_mail
    send_email:
      subject: "Draft"
      text: "x"
"#;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("draft", draft)
        .workflow("live", &one_email_workflow("new_signup", "Live", false));
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&new_signup(contact("c_draft", "Ann"))).await;
    app.accept_batch(&[
        new_signup(contact("c_draft2", "Bob")),
        new_signup(contact("c_draft3", "Cy")),
    ])
    .await;
    app.wait_for_mails(3).await;
    app.settle().await;
    let runs = app.runs().await;
    assert_eq!(runs.len(), 3);
    assert!(
        runs.iter().all(|r| r.workflow_id == "live"),
        "a disabled workflow started a run: {runs:#?}"
    );
    assert!(subjects(&app).iter().all(|(_, s)| s == "Live"));
}

async fn loop_protection_refuses_the_51st_enrollment(backend: Backend) {
    let opts = TestOptions::new(backend)
        .without_smtp()
        .manual_clock()
        .workflow(
            "every_lesson",
            &one_email_workflow("lesson_completed", "Lesson {{lesson.title}}", true),
        );
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let events: Vec<_> = (0..55)
        .map(|i| lesson_completed(contact("c_loop", "Ann"), "p_rust101", &format!("L{i}")))
        .collect();
    // Two batches, so the limit holds across dispatches too.
    app.accept_batch(&events[..30]).await;
    app.settle().await;
    app.accept_batch(&events[30..]).await;
    app.settle().await;
    app.accept(&lesson_completed(
        contact("c_not_looping", "Bob"),
        "p_rust101",
        "L0",
    ))
    .await;
    app.settle().await;

    let runs = app.runs_of("c_loop").await;
    let completed = runs
        .iter()
        .filter(|r| r.state == RunState::Completed)
        .count();
    let refused: Vec<_> = runs
        .iter()
        .filter(|r| r.state == RunState::Refused)
        .collect();
    assert_eq!(completed, 50, "at most 50 enrollments in 30 minutes");
    assert_eq!(refused.len(), 5, "each refusal is recorded");
    assert!(
        refused
            .iter()
            .all(|r| r.reason.as_deref() == Some("loop_protection")),
        "{refused:#?}"
    );
    assert_eq!(app.messages_of("c_loop").await.len(), 50);
    assert_eq!(
        app.runs_of("c_not_looping").await[0].state,
        RunState::Completed,
        "other contacts are not limited"
    );

    // Half an hour later the contact may be enrolled again.
    app.advance(Duration::from_secs(31 * 60));
    app.accept(&lesson_completed(
        contact("c_loop", "Ann"),
        "p_rust101",
        "Later",
    ))
    .await;
    app.settle().await;
    let runs = app.runs_of("c_loop").await;
    assert_eq!(
        runs.iter()
            .filter(|r| r.state == RunState::Completed)
            .count(),
        51
    );
}

const ADMIN_TOKEN: &str = "test-admin-token";

async fn reload(app: &TestApp) -> reqwest::Response {
    app.client
        .post(app.url("/v1/workflows/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("reload")
}

fn with_admin(mut opts: TestOptions) -> TestOptions {
    opts.admin_token = Some(ADMIN_TOKEN.into());
    opts
}

async fn disabling_parks_waiting_runs_and_enabling_resumes_them(backend: Backend) {
    let opts = with_admin(
        TestOptions::new(backend)
            .manual_clock()
            .workflow("welcome", WELCOME_THEN_WAIT),
    );
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_park", "Ann"), "o_pro"))
        .await;
    app.wait_for_mails(1).await;
    app.settle().await;
    assert_eq!(app.runs_of("c_park").await[0].state, RunState::Active);

    let file = app.env.workflows.join("welcome.yaml");
    let disabled = WELCOME_THEN_WAIT.replace(
        "name: Welcome, then check in",
        "name: Welcome, then check in\nenabled: false",
    );
    std::fs::write(&file, &disabled).unwrap();
    assert_eq!(reload(&app).await.status(), 200);
    assert_eq!(
        app.runs_of("c_park").await[0].state,
        RunState::Parked,
        "disabling must park the waiting run"
    );

    // Parked: its wait ends but nothing is sent, and the draft starts no new run.
    app.advance(2 * DAY + MINUTE);
    app.accept(&offer_granted(contact("c_park_new", "Bob"), "o_pro"))
        .await;
    app.settle().await;
    assert_eq!(app.sink().count(), 1, "a parked run sent its email");
    assert!(
        app.runs_of("c_park_new").await.is_empty(),
        "a disabled workflow enrolled a contact"
    );
    assert_eq!(app.runs_of("c_park").await[0].state, RunState::Parked);

    std::fs::write(&file, WELCOME_THEN_WAIT).unwrap();
    assert_eq!(reload(&app).await.status(), 200);
    app.state.wakers.all();
    app.wait_for_mails(2).await;
    app.settle().await;
    assert_eq!(
        subjects(&app)[1],
        ("c_park@example.com".into(), "Two days in".into())
    );
    assert_eq!(app.runs_of("c_park").await[0].state, RunState::Completed);
}

async fn runs_stay_pinned_to_their_version_across_a_reload(backend: Backend) {
    let opts = with_admin(
        TestOptions::new(backend)
            .manual_clock()
            .workflow("welcome", WELCOME_THEN_WAIT),
    );
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_v1", "Ann"), "o_pro"))
        .await;
    app.wait_for_mails(1).await;
    app.settle().await;

    let v2 = WELCOME_THEN_WAIT
        .replace("\"Welcome\"", "\"Welcome (v2)\"")
        .replace("\"Two days in\"", "\"Two days in (v2)\"");
    std::fs::write(app.env.workflows.join("welcome.yaml"), v2).unwrap();
    assert_eq!(reload(&app).await.status(), 200);
    app.accept(&offer_granted(contact("c_v2", "Bob"), "o_pro"))
        .await;
    app.wait_for_mails(2).await;
    app.settle().await;
    let runs = app.runs().await;
    assert_eq!(runs.len(), 2);
    assert_ne!(
        runs[0].workflow_version, runs[1].workflow_version,
        "the edit made no new version"
    );

    app.advance(2 * DAY + MINUTE);
    app.wait_for_mails(4).await;
    app.settle().await;
    let mut got = subjects(&app);
    got.sort();
    let expected = [
        ("c_v1@example.com", "Two days in"),
        ("c_v1@example.com", "Welcome"),
        ("c_v2@example.com", "Two days in (v2)"),
        ("c_v2@example.com", "Welcome (v2)"),
    ];
    assert_eq!(
        got,
        expected.map(|(a, b)| (a.to_owned(), b.to_owned())),
        "a run left the version that started it"
    );
}

async fn a_reload_that_does_not_check_changes_nothing(backend: Backend) {
    let opts = with_admin(TestOptions::new(backend).manual_clock().workflow(
        "signup",
        &one_email_workflow("new_signup", "Original", false),
    ));
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let unauthorized = app
        .client
        .post(app.url("/v1/workflows/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);

    std::fs::write(
        app.env.workflows.join("signup.yaml"),
        one_email_workflow("new_signup", "Changed", false),
    )
    .unwrap();
    std::fs::write(
        app.env.workflows.join("broken.yaml"),
        "name: Broken\ntrigger:\n  event: new_signup\nsteps:\n  - launch_rocket: {}\n",
    )
    .unwrap();
    let response = reload(&app).await;
    let err = expect_error(response, 422).await;
    assert!(
        err.to_string().contains("broken.yaml"),
        "the refusal should name the file: {err}"
    );

    app.accept(&new_signup(contact("c_reload1", "Ann"))).await;
    let mails = app.wait_for_mails(1).await;
    assert_eq!(
        mails[0].parse().subject,
        "Original",
        "a refused reload changed the running set"
    );
    app.settle().await;
    assert!(app.runs().await.iter().all(|r| r.workflow_id == "signup"));

    std::fs::remove_file(app.env.workflows.join("broken.yaml")).unwrap();
    assert_eq!(reload(&app).await.status(), 200);
    app.accept(&new_signup(contact("c_reload2", "Bob"))).await;
    let mails = app.wait_for_mails(2).await;
    assert_eq!(mails[1].parse().subject, "Changed");
}

async fn a_later_email_goes_to_the_current_address(backend: Backend) {
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("welcome", WELCOME_THEN_WAIT);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_moves", "Ann"), "o_pro"))
        .await;
    app.wait_for_mails(1).await;
    // During the wait the platform reports a new address and name.
    let mut moved = contact("c_moves", "Annie");
    moved["email"] = serde_json::json!("annie@new.example.com");
    app.accept(&new_signup(moved)).await;
    app.settle().await;

    app.advance(2 * DAY + MINUTE);
    let mails = app.wait_for_mails(2).await;
    assert_eq!(mails[0].rcpt_to, ["c_moves@example.com"]);
    assert_eq!(
        mails[1].rcpt_to,
        ["annie@new.example.com"],
        "the later email went to the old address"
    );
    assert!(mails[1].parse().text.unwrap().contains("Annie"));
}

/// A school's header and footer written once: `templates/layout.html.hbs` and `layout.txt.hbs`
/// wrap the emails of three workflows, each with its own unsubscribe link in the footer, and a
/// workflow that says `layout: none` goes out bare.
async fn one_layout_wraps_the_emails_of_three_workflows(backend: Backend) {
    let workflow = |name: &str, trigger: &str, layout: &str| {
        format!(
            "name: {name}\n{layout}trigger: {{event: {trigger}}}\nsteps:\n  - send_email:\n      subject: \"{name}\"\n      html: \"<p>{name} for {{{{contact.first_name}}}}</p>\"\n      text: \"{name} for {{{{contact.first_name}}}}\"\n"
        )
    };
    let opts = TestOptions::new(backend)
        .template(
            "layout.html.hbs",
            "<header>Rust School</header>{{{body}}}<footer><a href=\"<<unsubscribe_url>>\">Unsubscribe</a></footer>",
        )
        .template("layout.txt.hbs", "{{body}}\n--\nRust School\nUnsubscribe: <<unsubscribe_url>>")
        .workflow("welcome", &workflow("Welcome", "new_signup", ""))
        .workflow("access", &workflow("Access", "offer_access_granted", ""))
        .workflow("lesson", &workflow("Lesson", "lesson_completed", ""))
        .workflow("bare", &workflow("Bare", "offer_access_granted", "layout: none\n"));
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let ann = contact("c_layout", "Ann");
    app.accept(&event(
        "new_signup",
        serde_json::json!({"contact": ann.clone()}),
    ))
    .await;
    app.accept(&offer_granted(ann.clone(), "o_pro")).await;
    app.accept(&event(
        "lesson_completed",
        serde_json::json!({"contact": ann, "product": product("p_rust101", "Rust 101"),
               "lesson": {"id": "l_1", "title": "Ownership"}}),
    ))
    .await;
    let mails = app.wait_for_mails(4).await;
    app.settle().await;
    for mail in &mails {
        let email = mail.parse();
        let html = email.html.clone().unwrap_or_default();
        let text = email.text.clone().unwrap_or_default().replace("\r\n", "\n");
        let body = format!("<p>{} for Ann</p>", email.subject);
        if email.subject == "Bare" {
            assert_eq!(html, body, "layout: none");
            continue;
        }
        assert!(
            html.starts_with("<header>Rust School</header><p>"),
            "{html}"
        );
        assert!(html.contains(&body), "{html}");
        let unsubscribe = email
            .header("List-Unsubscribe")
            .expect("List-Unsubscribe")
            .trim_matches(['<', '>'])
            .to_owned();
        // HTML escapes `=` in the URL, which a browser reads back.
        assert!(
            html.contains(&unsubscribe.replace('=', "&#x3D;")),
            "the footer's link is the message's own: {html}"
        );
        assert!(
            text.starts_with(&format!(
                "{} for Ann\n--\nRust School\nUnsubscribe: {unsubscribe}",
                email.subject
            )),
            "{text}"
        );
    }
}

/// "Three days after access, if lesson 2 is still not completed, remind them", for learners who
/// still hold the offer; and an upsell whose trigger filter reads what the learner holds. The
/// contact's state is read when the step runs, days after the trigger: a lesson completed or an
/// offer removed meanwhile counts.
async fn conditions_and_filters_read_what_the_contact_holds_and_completed(backend: Backend) {
    const NUDGE: &str = r#"
name: Lesson 2 nudge
trigger:
  event: offer_access_granted
steps:
  - wait: 3d
  - if:
      all:
        - holds_offer: o_pro
        - not: {completed_lesson: l_borrowing}
    then:
      - id: remind
        send_email:
          subject: "Lesson 2 is waiting, {{contact.first_name}}"
          text: "Borrowing takes ten minutes."
"#;
    const UPSELL: &str = r#"
name: Go pro
trigger:
  event: lesson_completed
  where:
    holds_offer: {not: [o_pro]}
re_entry: true
steps:
  - send_email:
      subject: "Go pro, {{contact.first_name}}"
      text: "You finished {{lesson.title}}."
"#;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("nudge", NUDGE)
        .workflow("upsell", UPSELL);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let learners = [
        ("c_done", "Ann"),
        ("c_other", "Bo"),
        ("c_idle", "Cy"),
        ("c_gone", "Di"),
    ];
    for (id, name) in learners {
        app.accept(&offer_granted(contact(id, name), "o_pro")).await;
    }
    app.settle().await;
    app.accept(&lesson_completed(
        contact("c_done", "Ann"),
        "p_rust101",
        "Borrowing",
    ))
    .await;
    app.accept(&lesson_completed(
        contact("c_other", "Bo"),
        "p_rust101",
        "Ownership",
    ))
    .await;
    app.accept(&offer_removed(contact("c_gone", "Di"), "o_pro"))
        .await;
    // A learner without the offer completes a (free) lesson: the upsell's filter passes.
    app.accept(&lesson_completed(
        contact("c_free", "Ed"),
        "p_intro",
        "Hello",
    ))
    .await;
    app.wait_for_mails(1).await;
    app.settle().await;
    app.advance(3 * DAY + MINUTE);
    app.wait_for_mails(3).await;
    app.settle().await;
    let mut mails = subjects(&app);
    mails.sort();
    assert_eq!(
        mails,
        [
            ("c_free@example.com".to_owned(), "Go pro, Ed".to_owned()),
            (
                "c_idle@example.com".to_owned(),
                "Lesson 2 is waiting, Cy".to_owned()
            ),
            (
                "c_other@example.com".to_owned(),
                "Lesson 2 is waiting, Bo".to_owned()
            ),
        ],
        "{:#?}\n{:#?}",
        app.runs().await,
        app.messages().await
    );
}

/// A learner whose platform profile says `locale: de-DE` reads German month names and German
/// number formatting, also when the event that starts the run does not repeat it (the locale is
/// kept with the contact's details); one without a locale gets the configured default (English
/// here).
async fn dates_and_numbers_in_each_learners_language(backend: Backend) {
    const RECEIPT: &str = r#"
name: Receipt
trigger:
  event: offer_access_granted
steps:
  - send_email:
      subject: "{{offer.title}}, {{format_date event.time \"%e %B %Y\"}}"
      text: "{{format_number offer.price 2}} EUR"
"#;
    let opts = TestOptions::new(backend).workflow("receipt", RECEIPT);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let grant = |contact: Value| {
        at(
            event(
                "offer_access_granted",
                json!({"contact": contact, "offer": {"id": "o_pro", "title": "Rust Pro", "price": 1490.5}}),
            ),
            "2026-03-08T13:30:00Z",
        )
    };
    let mut ann = contact("c_ann", "Ann");
    ann["locale"] = json!("de-DE");
    app.accept(&grant(ann)).await;
    app.accept(&grant(contact("c_bo", "Bo"))).await;
    // Cy's language came with an earlier event; the grant that starts the run carries none.
    let mut cy = contact("c_cy", "Cy");
    cy["locale"] = json!("de");
    app.accept(&new_signup(cy)).await;
    app.settle().await;
    app.accept(&grant(contact("c_cy", "Cy"))).await;
    let mails = app.wait_for_mails(3).await;
    let mut got: Vec<(String, String)> = mails
        .iter()
        .map(|m| {
            let email = m.parse();
            (
                email.subject,
                email.text.unwrap_or_default().trim().to_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                "Rust Pro,  8 March 2026".to_owned(),
                "1,490.50 EUR".to_owned()
            ),
            (
                "Rust Pro,  8 März 2026".to_owned(),
                "1.490,50 EUR".to_owned()
            ),
            (
                "Rust Pro,  8 März 2026".to_owned(),
                "1.490,50 EUR".to_owned()
            ),
        ]
    );
}

/// The nudge marketers ask for most: three days after access, praise the learner who started
/// (naming the lesson they completed) and remind the one who did not. `received` and
/// `awaited.*` come from the wait, also when the run is finished by the stepper days later.
async fn the_step_after_an_event_wait_knows_whether_it_came(backend: Backend) {
    const NUDGE: &str = r#"
name: Started yet?
trigger:
  event: offer_access_granted
steps:
  - wait: {event: lesson_completed, timeout: 3d}
  - if:
      all:
        - {field: received, equals: true}
    then:
      - id: praise
        send_email:
          subject: "Great start on {{awaited.lesson.title}}, {{contact.first_name}}"
          text: "You finished it at {{awaited.event.time}}."
    else:
      - id: remind
        send_email:
          subject: "Your first lesson is waiting, {{contact.first_name}}"
          text: "It takes ten minutes."
"#;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("nudge", NUDGE);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_keen", "Ann"), "o_pro"))
        .await;
    app.accept(&offer_granted(contact("c_busy", "Bo"), "o_pro"))
        .await;
    app.settle().await;
    app.accept(&at(
        lesson_completed(contact("c_keen", "Ann"), "p_rust101", "Ownership"),
        "2026-11-24T11:00:00Z",
    ))
    .await;
    app.wait_for_mails(1).await;
    // Recorded before the clock jumps three days (a jump past a send's lease would free it).
    app.settle().await;
    app.advance(Duration::from_secs(3 * 86_400 + 60));
    app.wait_for_mails(2).await;
    app.settle().await;
    let mut mails = subjects(&app);
    mails.sort();
    assert_eq!(
        mails,
        [
            (
                "c_busy@example.com".to_owned(),
                "Your first lesson is waiting, Bo".to_owned()
            ),
            (
                "c_keen@example.com".to_owned(),
                "Great start on Ownership, Ann".to_owned()
            ),
        ],
        "{:#?}\n{:#?}",
        app.runs().await,
        app.messages().await
    );
    let praise = app
        .sink()
        .received()
        .iter()
        .map(|m| m.parse())
        .find(|m| m.subject.starts_with("Great"))
        .expect("the praise");
    assert_eq!(
        praise.text.as_deref().map(str::trim),
        Some("You finished it at 2026-11-24T11:00:00Z.")
    );
}
