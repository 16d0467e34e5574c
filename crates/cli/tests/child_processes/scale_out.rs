//! Several herald processes on one PostgreSQL database, as an operator runs them behind a load
//! balancer: each welcome sent once however the events are spread; a `herald worker`'s links
//! accepted by the HTTP processes; a run started on one process on a version only it has on disk
//! finished by another after the first is killed.

use crate::harness::*;
use herald_test_support::smtp::SmtpSink;
use std::collections::HashSet;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_send_each_welcome_once() {
    let Some(site) = Site::new(true, &[("welcome", WELCOME_WITH_LINK)]).await else {
        return;
    };
    let sink = SmtpSink::start().await;
    let a = Herald::start(&site, 0, Role::Serve, &sink.url(), "5s").await;
    let b = Herald::start(&site, 1, Role::Serve, &sink.url(), "5s").await;
    let _worker = Herald::start(&site, 2, Role::Worker, &sink.url(), "5s").await;
    for round in 0..5 {
        let before = sink.count();
        let started = Instant::now();
        let ids: Vec<String> = (0..600).map(|i| format!("c_r{round}_{i}")).collect();
        for (k, chunk) in ids.chunks(50).enumerate() {
            let events: Vec<_> = chunk.iter().map(|id| grant(id)).collect();
            if k % 2 == 0 { &a } else { &b }.post(&events).await;
        }
        let arrived = eventually(Duration::from_secs(60), async || {
            sink.count() >= before + 600
        })
        .await;
        assert!(arrived, "round {round}: {} of 600", sink.count() - before);
        // Anything sent twice would arrive shortly after: give it the time.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mails = &sink.received()[before..];
        let message_ids: HashSet<String> = mails.iter().map(|m| m.message_id()).collect();
        let to: HashSet<&str> = mails.iter().map(|m| m.rcpt_to[0].as_str()).collect();
        assert_eq!(mails.len(), 600, "round {round}: exactly 600 emails");
        assert_eq!(
            message_ids.len(),
            600,
            "round {round}: 600 distinct Message-IDs"
        );
        assert_eq!(to.len(), 600, "round {round}: one per learner");
        eprintln!(
            "round {round}: 600 welcomes through 3 processes in {:.2} s",
            started.elapsed().as_secs_f64()
        );
    }
}

/// A welcome now and a second email two seconds later.
const TWO_STEPS: &str = r#"
name: Two steps
trigger:
  event: offer_access_granted
steps:
  - id: welcome
    send_email:
      subject: "Welcome {{contact.first_name}}"
      text: "Your courses: <<login_url>>\nUnsubscribe: <<unsubscribe_url>>"
  - wait: 2s
  - id: follow_up
    send_email:
      subject: "Day two"
      text: "Back to your courses: <<login_url>>\nUnsubscribe: <<unsubscribe_url>>"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_finishes_what_serve_started_and_its_links_work() {
    let Some(site) = Site::new(true, &[("two", TWO_STEPS)]).await else {
        return;
    };
    // Each process has its own SMTP server, so what the worker sent is known.
    let serve_sink = SmtpSink::start().await;
    let worker_sink = SmtpSink::start().await;
    let mut serve = Herald::start(&site, 0, Role::Serve, &serve_sink.url(), "2s").await;
    let _worker = Herald::start(&site, 1, Role::Worker, &worker_sink.url(), "2s").await;
    let ids: Vec<String> = (0..50).map(|i| format!("c_w_{i}")).collect();
    serve
        .post(&ids.iter().map(|id| grant(id)).collect::<Vec<_>>())
        .await;
    let welcomed = eventually(Duration::from_secs(30), async || {
        serve_sink.count() + worker_sink.count() >= 50
    })
    .await;
    assert!(welcomed, "the welcomes did not go out");
    // The HTTP process goes away: the worker alone finishes the runs.
    serve.kill();
    let finished = eventually(Duration::from_secs(30), async || {
        let follow_ups = serve_sink
            .received()
            .iter()
            .chain(worker_sink.received().iter())
            .filter(|m| m.parse().subject == "Day two")
            .count();
        follow_ups >= 50
    })
    .await;
    assert!(finished, "the worker did not finish the runs");
    let by_worker = worker_sink.received();
    assert!(
        by_worker.iter().any(|m| m.parse().subject == "Day two"),
        "the worker sent none of the follow-ups"
    );

    // Its links work at an HTTP process.
    let http = Herald::start(&site, 2, Role::Serve, &serve_sink.url(), "2s").await;
    for m in by_worker
        .iter()
        .filter(|m| m.parse().subject == "Day two")
        .take(10)
    {
        let text = text_of(m);
        let path = unsubscribe_path(&text).expect("an unsubscribe link");
        assert_eq!(
            http.unsubscribe(&path).await,
            200,
            "the worker's unsubscribe link was refused: {path}"
        );
        let token = &login_tokens(&text)[0];
        let (status, portal) = http.sign_in(token).await;
        assert_eq!(status, 200, "the worker's sign-in link was refused");
        assert!(shows_the_course(&portal), "{portal}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_started_on_a_reloaded_version_is_finished_by_another_process() {
    let Some(site) = Site::new(true, &[("two", TWO_STEPS)]).await else {
        return;
    };
    let sink = SmtpSink::start().await;
    let mut a = Herald::start(&site, 0, Role::Serve, &sink.url(), "2s").await;
    let b = Herald::start(&site, 1, Role::Serve, &sink.url(), "2s").await;
    // A new version on A only (B's folder keeps the old one), then A reloads.
    site.write_workflow(
        0,
        "two",
        &TWO_STEPS.replace("Day two", "Day two, new edition"),
    );
    let (status, body) = a.admin_post("/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    a.post(&[grant("c_versioned")]).await;
    let welcomed = eventually(Duration::from_secs(20), async || sink.count() >= 1).await;
    assert!(welcomed, "no welcome");
    a.kill();
    let day_two = |sink: &SmtpSink| {
        sink.received()
            .iter()
            .map(|m| m.parse().subject)
            .find(|s| s.starts_with("Day two"))
    };
    let finished = eventually(Duration::from_secs(30), async || day_two(&sink).is_some()).await;
    assert!(finished, "B did not finish the run:\n{}", b.log_text());
    assert_eq!(
        day_two(&sink).as_deref(),
        Some("Day two, new edition"),
        "the run went on with the version it was started on"
    );
    // A welcome accepted but not recorded before the kill is sent again, as the same message.
    let welcomes: HashSet<String> = sink
        .received()
        .iter()
        .filter(|m| m.parse().subject == "Welcome Ann")
        .map(|m| m.message_id())
        .collect();
    assert_eq!(
        welcomes.len(),
        1,
        "one welcome message, whatever its repeats"
    );
    assert!(!b.log_text().contains("is not loaded"), "{}", b.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_processes_killed_under_load_loses_nothing() {
    let Some(site) = Site::new(true, &[("welcome", WELCOME_WITH_LINK)]).await else {
        return;
    };
    let sink = SmtpSink::start().await;
    sink.hold_after(100);
    let mut a = Herald::start(&site, 0, Role::Serve, &sink.url(), "2s").await;
    let b = Herald::start(&site, 1, Role::Serve, &sink.url(), "2s").await;
    let _worker = Herald::start(&site, 2, Role::Worker, &sink.url(), "2s").await;
    let ids: Vec<String> = (0..600).map(|i| format!("c_k_{i}")).collect();
    for (k, chunk) in ids.chunks(100).enumerate() {
        let events: Vec<_> = chunk.iter().map(|id| grant(id)).collect();
        if k % 2 == 0 { &a } else { &b }.post(&events).await;
    }
    let in_flight = eventually(Duration::from_secs(30), async || {
        sink.count() >= 100 && sink.held() > 0
    })
    .await;
    assert!(
        in_flight,
        "never had sends in flight: {} sent",
        sink.count()
    );
    a.kill();
    let killed_at = Instant::now();
    sink.release();
    let all = eventually(Duration::from_secs(60), async || {
        sink.received()
            .iter()
            .map(|m| m.rcpt_to[0].clone())
            .collect::<HashSet<_>>()
            .len()
            == 600
    })
    .await;
    assert!(all, "not every learner got a welcome after the kill");
    eprintln!(
        "one of three killed with sends in flight: all 600 delivered {:.1} s later, {} sent twice",
        killed_at.elapsed().as_secs_f64(),
        sink.count() - 600
    );
    let mut ids_of: std::collections::HashMap<String, HashSet<String>> = Default::default();
    for m in sink.received() {
        ids_of
            .entry(m.rcpt_to[0].clone())
            .or_default()
            .insert(m.message_id());
    }
    assert!(
        ids_of.values().all(|ids| ids.len() == 1),
        "a learner got two different messages"
    );
    let messages = b.messages().await;
    let sent = messages.iter().filter(|m| m["status"] == "sent").count();
    assert!(
        eventually(Duration::from_secs(10), async || {
            b.messages()
                .await
                .iter()
                .filter(|m| m["status"] == "sent")
                .count()
                == 600
        })
        .await,
        "{sent} of 600 recorded as sent"
    );
}

/// Saving a workflow file is enough: the running process reloads it (no SIGHUP, no API call),
/// and a file that does not check is refused while the running version stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_workflow_file_is_reloaded_by_the_running_process() {
    let Some(site) = Site::new(false, &[("two", TWO_STEPS)]).await else {
        return;
    };
    let sink = SmtpSink::start().await;
    let herald = Herald::start(&site, 0, Role::Serve, &sink.url(), "5s").await;
    let reloads = || herald.log_text().matches("workflow files changed").count();
    // Reading the files (as every reload does) is not a change.
    let _ = std::fs::read_to_string(site.workflows(0).join("two.yaml")).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        reloads(),
        0,
        "a read set off a reload:\n{}",
        herald.log_text()
    );
    site.write_workflow(0, "two", "name: [broken\n");
    tokio::time::sleep(Duration::from_millis(800)).await;
    herald.post(&[grant("c_before_fix")]).await;
    assert!(
        eventually(Duration::from_secs(10), async || sink.count() >= 1).await,
        "a broken file stopped the running version"
    );
    assert_eq!(sink.received()[0].parse().subject, "Welcome Ann");
    site.write_workflow(0, "two", &TWO_STEPS.replace("Welcome {{", "Hello again {{"));
    let reloaded = eventually(Duration::from_secs(10), async || {
        herald
            .log_text()
            .contains("workflow files changed: reloaded")
    })
    .await;
    assert!(reloaded, "no reload after the save:\n{}", herald.log_text());
    herald.post(&[grant("c_after_fix")]).await;
    let sent = eventually(Duration::from_secs(10), async || {
        sink.received()
            .iter()
            .any(|m| m.parse().subject == "Hello again Ann")
    })
    .await;
    assert!(sent, "the saved version was not used");
    // Two saves, two reloads, and no more: a reload does not set off the next one.
    let settled = reloads();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(settled, 2, "{}", herald.log_text());
    assert_eq!(
        reloads(),
        settled,
        "reloads went on by themselves:\n{}",
        herald.log_text()
    );
    assert!(
        herald.log_text().contains("do not check"),
        "the broken save was reported:\n{}",
        herald.log_text()
    );
}
