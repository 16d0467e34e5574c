//! Two herald processes on one PostgreSQL database (two applications in this test process, each
//! with its own engine, HTTP listener and copy of the workflow files): they wake each other
//! through the database's announcements rather than by polling, and a reload on one reaches the
//! other. Each process polls only once a minute here, so nothing below can be explained by polling.

use crate::helpers::*;
use herald_store::MessageStatus;
use std::time::Duration;

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_stored_by_one_process_wakes_the_other() {
        super::work_stored_by_one_process_wakes_the_other().await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_on_one_process_reaches_the_other() {
        super::a_reload_on_one_process_reaches_the_other().await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_re_reads_its_files_only_on_an_announced_reload() {
        super::a_process_re_reads_its_files_only_on_an_announced_reload().await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exit_when_holds_on_a_process_without_the_runs_version() {
        super::exit_when_holds_on_a_process_without_the_runs_version().await
    }
}

const WELCOME: &str = r#"
name: Welcome
trigger:
  event: offer_access_granted
steps:
  - id: welcome
    send_email:
      subject: "Welcome {{contact.first_name}}"
      text: "Hi {{contact.first_name}}"
"#;

fn options() -> TestOptions {
    TestOptions::new(Backend::Postgres)
        .admin_token("admin-secret")
        .poll_interval(Duration::from_secs(60))
        .workflow("welcome", WELCOME)
}

/// Within this, a woken process has done the work; a polling one would take a minute.
const WOKEN_WITHIN: Duration = Duration::from_secs(5);

async fn work_stored_by_one_process_wakes_the_other() {
    let Some(intake) = spawn_app(options()).await else {
        return;
    };
    let engine = intake.another_process(options()).await;
    // The intake process only stores: its engine does nothing.
    for name in ["dispatcher", "stepper", "deliverer"] {
        assert!(intake.state.loops.pause(name), "{name}");
    }
    let events: Vec<_> = (0..40)
        .map(|i| offer_granted(contact(&format!("c_woken_{i}"), "Ann"), "o_pro"))
        .collect();
    intake.accept_batch(&events).await;
    let delivered = eventually_within(WOKEN_WITHIN, async || intake.sink().count() >= 40).await;
    assert!(
        delivered,
        "the other process was not woken: {} of 40 emails after {WOKEN_WITHIN:?}",
        intake.sink().count()
    );
    engine.settle().await;
    assert_eq!(intake.sink().count(), 40, "each welcome once");
}

async fn a_reload_on_one_process_reaches_the_other() {
    let logs = crate::link_helpers::LogCapture::start();
    let Some(a) = spawn_app(options()).await else {
        return;
    };
    let b = a.another_process(options()).await;

    // A new version on A only (B's files keep the old one); A starts the run, B sends it.
    std::fs::write(
        a.env.workflows.join("welcome.yaml"),
        WELCOME.replace("Welcome {{", "Welcome aboard {{"),
    )
    .unwrap();
    let (status, body) = a.admin_post("/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    for name in ["stepper", "deliverer"] {
        assert!(a.state.loops.pause(name), "{name}");
    }
    // B would start the run on its own version if it dispatched the grant.
    assert!(b.state.loops.pause("dispatcher"));
    a.accept(&offer_granted(contact("c_new_version", "Ann"), "o_pro"))
        .await;
    assert!(
        eventually_within(WOKEN_WITHIN, async || a.sink().count() >= 1).await,
        "B did not send the message of A's new version: {:#?}\n{}",
        b.messages().await,
        logs.text()
            .lines()
            .filter(|l| l.contains("herald") && !l.contains("sqlx::query"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mail = &a.sink().received()[0];
    assert_eq!(
        mail.parse().subject,
        "Welcome aboard Ann",
        "sent with the version the run is pinned to"
    );
    for name in ["stepper", "deliverer"] {
        assert!(a.state.loops.resume(name), "{name}");
    }
    assert!(b.state.loops.resume("dispatcher"));

    // Disabled through A's files: B, whose files still say enabled, starts no run either.
    std::fs::write(
        a.env.workflows.join("welcome.yaml"),
        format!("enabled: false\n{WELCOME}"),
    )
    .unwrap();
    let (status, body) = a.admin_post("/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(a.state.loops.pause("dispatcher"));
    assert!(
        eventually_within(WOKEN_WITHIN, async || !b
            .state
            .registry
            .snapshot()
            .is_enabled("welcome"))
        .await,
        "B did not take in the disabled state"
    );
    b.accept(&offer_granted(contact("c_after_disable", "Bo"), "o_pro"))
        .await;
    b.settle().await;
    let runs = b.runs_of("c_after_disable").await;
    assert!(
        runs.is_empty(),
        "a disabled workflow started a run on B: {runs:#?}"
    );
    assert_eq!(
        a.sink().count(),
        1,
        "nothing sent for the disabled workflow"
    );
    let sent = b.messages().await;
    assert!(
        sent.iter().all(|m| m.status == MessageStatus::Sent),
        "{sent:#?}"
    );
}

/// What a process does when it begins to listen (catching up on what it may have missed) keeps the
/// files it loaded: an operator halfway through editing them has nothing taken live until a
/// reload is asked for, here or on another process.
async fn a_process_re_reads_its_files_only_on_an_announced_reload() {
    let Some(a) = spawn_app(options()).await else {
        return;
    };
    let registry = &a.state.registry;
    let edited_live = |registry: &herald_engine::Registry| {
        registry.snapshot().current["welcome"]
            .bundle
            .yaml
            .contains("Welcome aboard")
    };
    std::fs::write(
        a.env.workflows.join("welcome.yaml"),
        WELCOME.replace("Welcome {{", "Welcome aboard {{"),
    )
    .unwrap();
    registry.catch_up().await.expect("catch up");
    assert!(!edited_live(registry), "caught up by re-reading the files");

    // Another process's reload is announced: this one takes in its own edited files.
    let b = a.another_process(options()).await;
    let (status, body) = b.admin_post("/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        eventually_within(WOKEN_WITHIN, async || edited_live(registry)).await,
        "the announced reload did not reach A"
    );
}

const NUDGE: &str = r#"
name: Nudge
trigger:
  event: offer_access_granted
exit_when:
  event: lesson_completed
steps:
  - wait: 1d
  - id: nudge
    send_email:
      subject: "Start your first lesson, {{contact.first_name}}"
      text: "It takes ten minutes."
"#;

/// A run started on a version only process A has (A reloaded an edited file after B started)
/// is ended by its `exit_when` when B dispatches the event: B loads the version from the
/// database rather than planning without the run's exit condition.
async fn exit_when_holds_on_a_process_without_the_runs_version() {
    let opts = || options().workflow("nudge", NUDGE);
    let Some(a) = spawn_app(opts()).await else {
        return;
    };
    let b = a.another_process(opts()).await;
    std::fs::write(
        a.env.workflows.join("nudge.yaml"),
        NUDGE.replace("Start your first lesson", "Your first lesson awaits"),
    )
    .unwrap();
    let (status, body) = a.admin_post("/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    // B takes in the reload before the run exists, so it cannot have loaded the version then.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let version = a.state.registry.snapshot().current["nudge"].version.clone();
    assert!(
        b.state
            .registry
            .snapshot()
            .version("nudge", &version)
            .is_none(),
        "B has A's new version before any run needs it"
    );

    // Only A dispatches the grant (B, which would start the run on its own version, waits)...
    assert!(b.state.loops.pause("dispatcher"));
    a.accept(&offer_granted(contact("c_exit", "Ann"), "o_pro"))
        .await;
    wait_for("A to start the run on its version", async || {
        a.runs_of("c_exit")
            .await
            .iter()
            .any(|r| r.workflow_id == "nudge" && r.workflow_version == version)
    })
    .await;

    // ...and only B dispatches from here.
    assert!(a.state.loops.pause("dispatcher"));
    assert!(b.state.loops.resume("dispatcher"));
    b.accept(&event(
        "lesson_completed",
        serde_json::json!({"contact": {"id": "c_exit"}, "product": product("p_rust101", "Rust 101"),
               "lesson": {"id": "l_1", "title": "Ownership"}}),
    ))
    .await;
    b.settle().await;
    let run = a
        .runs_of("c_exit")
        .await
        .into_iter()
        .find(|r| r.workflow_id == "nudge")
        .expect("the nudge run");
    assert_eq!(
        (run.state, run.reason.as_deref()),
        (
            herald_store::RunState::Exited,
            Some("exit_when: lesson_completed")
        ),
        "{run:#?}"
    );
    assert!(a.state.loops.resume("dispatcher"));
}
