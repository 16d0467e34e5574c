//! Crash tests: the process is killed (engine loops aborted where they stand, nothing drained)
//! and a new one started on the same database. Every accepted event must still produce its
//! message, and messages must not be sent twice except in the one window SMTP cannot close: a
//! message the server accepted whose outcome the dead process had not yet recorded. Such a
//! message is sent again after its lease runs out, with the same `Message-ID`.

use crate::helpers::*;
use herald_store::{MessageStatus, RunState};
use herald_test_support::smtp::ReceivedMail;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

both_backends!(
    accepted_events_survive_a_crash_while_smtp_is_down,
    crash_mid_delivery_loses_nothing_and_resends_only_unrecorded,
    graceful_restart_delivers_everything_once,
    a_waiting_run_survives_a_crash,
);

/// A short lease, so that the claims of a dead process expire quickly.
const LEASE: Duration = Duration::from_secs(1);

fn options(backend: Backend) -> TestOptions {
    TestOptions::new(backend)
        .workflow(
            "signup",
            &one_email_workflow("new_signup", "Welcome {{contact.first_name}}", false),
        )
        .lease(LEASE)
        .retries(
            Duration::from_millis(20),
            Duration::from_millis(100),
            10_000,
        )
}

fn signups(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| new_signup(contact(&format!("{prefix}_{i}"), "Ann")))
        .collect()
}

/// Delivery count per Message-ID.
fn by_message_id(mails: &[ReceivedMail]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for m in mails {
        *counts.entry(m.message_id()).or_insert(0) += 1;
    }
    counts
}

/// Waits until the store has `n` messages, all sent, and the sink has seen each of them.
async fn wait_all_sent(app: &TestApp, n: usize) {
    let mut last = String::new();
    let ok = eventually(async || {
        let rows = app.messages().await;
        let sent = rows
            .iter()
            .filter(|m| m.status == MessageStatus::Sent)
            .count();
        let distinct = by_message_id(&app.sink().received()).len();
        last = format!(
            "{} messages, {sent} sent, {distinct} distinct Message-IDs at the sink",
            rows.len()
        );
        rows.len() == n && sent == n && distinct == n
    })
    .await;
    if !ok {
        panic!(
            "not every message was delivered after the restart: {last}\n{:#?}",
            app.messages().await
        );
    }
    app.settle().await;
}

/// The contacts' addresses must be exactly the recipients of the stored messages, and the stored
/// Message-IDs exactly those the sink saw.
async fn assert_consistent(app: &TestApp, events: &[Value]) {
    let rows = app.messages().await;
    let stored: BTreeSet<String> = rows.iter().map(|m| m.header_message_id.clone()).collect();
    let seen: BTreeSet<String> = by_message_id(&app.sink().received()).into_keys().collect();
    assert_eq!(
        stored, seen,
        "the sink saw other Message-IDs than the store holds"
    );
    let expected: BTreeSet<String> = events
        .iter()
        .map(|e| e["data"]["contact"]["email"].as_str().unwrap().to_owned())
        .collect();
    let delivered: BTreeSet<String> = app
        .sink()
        .received()
        .iter()
        .flat_map(|m| m.rcpt_to.clone())
        .collect();
    assert_eq!(
        delivered, expected,
        "some accepted event's message was lost"
    );
    assert_eq!(
        app.runs().await.len(),
        events.len(),
        "one run per accepted event"
    );
}

async fn accepted_events_survive_a_crash_while_smtp_is_down(backend: Backend) {
    let Some(app) = spawn_app(options(backend)).await else {
        return;
    };
    let sink = app.sink().clone();
    sink.stop().await;

    // 24 events: singles and a batch, all acknowledged with 202 before the crash.
    let events = signups("c_crash", 24);
    for e in &events[..12] {
        assert_eq!(app.accept(e).await, "new");
    }
    assert_eq!(app.accept_batch(&events[12..]).await, vec!["new"; 12]);
    // Let the engine get some way: runs made, sends claimed and failing.
    wait_for("some failed send attempts", async || {
        app.messages().await.iter().any(|m| m.attempts >= 1)
    })
    .await;
    assert_eq!(sink.count(), 0);

    let crashed = app.crash().await;
    sink.resume().await;
    let app = crashed.restart().await;

    wait_all_sent(&app, events.len()).await;
    let counts = by_message_id(&sink.received());
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "nothing reached SMTP before the crash, yet messages were delivered twice: {twice:?}"
    );
    assert_eq!(sink.count(), events.len());
    assert_consistent(&app, &events).await;
    // Posting them again after the restart: all duplicates.
    assert_eq!(app.accept_batch(&events).await, vec!["duplicate"; 24]);
    app.settle().await;
    assert_eq!(sink.count(), events.len());
}

async fn crash_mid_delivery_loses_nothing_and_resends_only_unrecorded(backend: Backend) {
    let Some(app) = spawn_app(options(backend)).await else {
        return;
    };
    let sink = app.sink().clone();
    // Three messages go through, the rest hang in flight at the end of DATA.
    sink.hold_after(3);
    let events = signups("c_mid", 10);
    assert_eq!(app.accept_batch(&events).await, vec!["new"; 10]);
    wait_for("3 delivered and some in flight", async || {
        sink.count() == 3 && sink.held() >= 1
    })
    .await;

    // What the dead process had recorded as sent must never be sent again.
    let recorded_sent: BTreeSet<String> = app
        .messages()
        .await
        .into_iter()
        .filter(|m| m.status == MessageStatus::Sent)
        .map(|m| m.header_message_id)
        .collect();
    let delivered_before: BTreeSet<String> = by_message_id(&sink.received()).into_keys().collect();

    let crashed = app.crash().await;
    wait_for("the dead process's SMTP connections to close", async || {
        sink.held() == 0
    })
    .await;
    sink.release();
    let app = crashed.restart().await;

    wait_all_sent(&app, events.len()).await;
    let counts = by_message_id(&sink.received());
    assert_eq!(
        counts.len(),
        events.len(),
        "every accepted event's message arrives"
    );
    for (id, n) in &counts {
        if recorded_sent.contains(id) {
            assert_eq!(
                *n, 1,
                "{id} was recorded as sent before the crash and was sent again"
            );
        } else if delivered_before.contains(id) {
            assert!(*n <= 2, "{id} delivered {n} times");
        } else {
            assert_eq!(
                *n, 1,
                "{id} was not delivered before the crash but arrived {n} times"
            );
        }
    }
    let resent: Vec<_> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.clone())
        .collect();
    eprintln!(
        "crash mid-delivery: {} delivered before the crash, {} recorded as sent, {} sent again after the restart",
        delivered_before.len(),
        recorded_sent.len(),
        resent.len()
    );
    assert_consistent(&app, &events).await;
}

async fn graceful_restart_delivers_everything_once(backend: Backend) {
    let Some(app) = spawn_app(options(backend)).await else {
        return;
    };
    let sink = app.sink().clone();
    let events = signups("c_graceful", 15);
    assert_eq!(app.accept_batch(&events[..10]).await, vec!["new"; 10]);
    for e in &events[10..] {
        app.accept(e).await;
    }
    // Stop at once, whatever the engine is doing; it finishes its batches in hand.
    let stopped = app.shutdown().await;
    let app = stopped.restart().await;
    wait_all_sent(&app, events.len()).await;
    let counts = by_message_id(&sink.received());
    assert!(
        counts.values().all(|n| *n == 1),
        "a graceful restart sent a message twice: {counts:?}"
    );
    assert_consistent(&app, &events).await;
}

async fn a_waiting_run_survives_a_crash(backend: Backend) {
    let wf = r#"
name: Two emails two days apart
trigger:
  event: new_signup
steps:
  - id: first
    send_email:
      subject: "First"
      text: "x"
  - wait: 2d
  - id: second
    send_email:
      subject: "Second"
      text: "x"
"#;
    let opts = TestOptions::new(backend).manual_clock().workflow("two", wf);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&new_signup(contact("c_waits", "Ann"))).await;
    app.wait_for_mails(1).await;
    app.settle().await;
    assert_eq!(app.runs().await[0].state, RunState::Active);

    // Edit the workflow while the run waits, then crash: the run stays on its own version.
    let edited = wf.replace("subject: \"Second\"", "subject: \"Second, edited\"");
    std::fs::write(app.env.workflows.join("two.yaml"), edited).unwrap();
    let crashed = app.crash().await;
    let app = crashed.restart().await;
    app.advance(Duration::from_secs(2 * 86_400 + 60));
    let mails = app.wait_for_mails(2).await;
    app.settle().await;
    assert_eq!(mails.len(), 2);
    assert_eq!(
        mails[1].parse().subject,
        "Second",
        "a run must stay pinned to the version that started it"
    );
    assert_eq!(app.runs().await[0].state, RunState::Completed);
}

/// Several processes on one PostgreSQL database split the work without doubles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_postgres_database() {
    let Some(first) = spawn_app(options(Backend::Postgres)).await else {
        return;
    };
    let sink = first.sink().clone();
    let second = Crashed {
        env: first.env.clone(),
        options: first.options.clone(),
        smtp: Some(sink.clone()),
        clock: first.clock.clone(),
    }
    .restart()
    .await;
    let events = signups("c_two", 40);
    let (a, b) = events.split_at(20);
    let (ra, rb) = tokio::join!(first.accept_batch(a), second.accept_batch(b));
    assert_eq!(ra, vec!["new"; 20]);
    assert_eq!(rb, vec!["new"; 20]);
    // Each also sees the other's events as duplicates.
    assert_eq!(second.accept(&a[0]).await, "duplicate");
    wait_all_sent(&first, events.len()).await;
    second.settle().await;
    let counts = by_message_id(&sink.received());
    assert_eq!(counts.len(), 40);
    assert!(
        counts.values().all(|n| *n == 1),
        "two processes sent one message twice: {counts:?}"
    );
    assert_consistent(&first, &events).await;
}

/// A delivery batch that outlives its lease (a slow SMTP server) must not let a second process
/// claim and send its messages again: the lease has to be extended while the sends are in flight
/// (a heartbeat).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_smtp_does_not_make_a_second_process_send_again() {
    let Some(first) = spawn_app(options(Backend::Postgres)).await else {
        return;
    };
    let sink = first.sink().clone();
    // Every message hangs at the end of DATA: a relay slower than the 1 s lease.
    sink.hold_after(0);
    let events = signups("c_slow", 5);
    assert_eq!(first.accept_batch(&events).await, vec!["new"; 5]);
    wait_for(
        "the first process to have every message in flight",
        async || sink.held() == 5,
    )
    .await;

    let second = Crashed {
        env: first.env.clone(),
        options: first.options.clone(),
        smtp: Some(sink.clone()),
        clock: first.clock.clone(),
    }
    .restart()
    .await;
    // Three leases long: a second process sending the same messages would be holding them now.
    let doubled = eventually_within(3 * LEASE, async || sink.held() > 5).await;
    sink.release();
    wait_all_sent(&first, events.len()).await;
    second.settle().await;
    let counts = by_message_id(&sink.received());
    assert!(
        !doubled && counts.values().all(|n| *n == 1),
        "messages in flight past their lease were sent again by another process: {counts:?}"
    );
}
