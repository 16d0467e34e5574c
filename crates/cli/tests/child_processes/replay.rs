//! `herald replay` as an operator runs it beside a running `herald serve`: a workflow added after
//! the events came is given the runs it missed (rendered from the original events), the count
//! comes first (`--dry-run` stores nothing), and replaying again starts nothing twice.

use crate::harness::*;
use herald_test_support::smtp::SmtpSink;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_added_later_gets_the_runs_it_missed_sqlite() {
    a_workflow_added_later_gets_the_runs_it_missed(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_added_later_gets_the_runs_it_missed_postgres() {
    a_workflow_added_later_gets_the_runs_it_missed(true).await;
}

const WELCOME: &str = r#"
name: Welcome
trigger:
  event: offer_access_granted
steps:
  - send_email:
      subject: "Welcome {{contact.first_name}}"
      text: "Hi"
"#;

const INTRO: &str = r#"
name: Course intro
trigger:
  event: offer_access_granted
steps:
  - send_email:
      subject: "Intro to {{offer.title}} for {{contact.first_name}}"
      text: "Here is how the course works."
"#;

const CONTACTS: usize = 1_000;

async fn a_workflow_added_later_gets_the_runs_it_missed(postgres: bool) {
    let Some(site) = Site::new(postgres, &[("welcome", WELCOME)]).await else {
        return;
    };
    let sink = SmtpSink::start().await;
    let herald = Herald::start(&site, 0, Role::Serve, &sink.url(), "10s").await;
    let grants: Vec<_> = (0..CONTACTS).map(|i| grant(&format!("c_{i}"))).collect();
    herald.post(&grants).await;
    assert!(
        eventually(Duration::from_secs(30), async || sink.count() >= CONTACTS).await,
        "welcomes: {}",
        sink.count()
    );

    site.write_workflow(0, "intro", INTRO);
    let (status, body) = herald.admin_post("/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");

    let dry = replay(&site, &["--since", "1h", "--dry-run"]);
    assert!(dry.contains(&format!("{CONTACTS} event(s) read")), "{dry}");
    assert!(
        dry.contains(&format!("intro: {CONTACTS} to replay, 0 already")),
        "{dry}"
    );
    assert!(
        dry.contains(&format!("welcome: 0 to replay, {CONTACTS} already")),
        "{dry}"
    );
    assert!(dry.contains("dry run: nothing stored"), "{dry}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.count(), CONTACTS, "a dry run sent nothing");

    let real = replay(&site, &["--since", "1h", "--workflow", "intro"]);
    assert!(
        real.contains(&format!("stored {CONTACTS} enrollment(s)")),
        "{real}"
    );
    assert!(
        eventually(Duration::from_secs(30), async || sink.count()
            >= 2 * CONTACTS)
        .await,
        "intros: {}\n{}",
        sink.count() - CONTACTS,
        herald.log_text()
    );
    let intros: Vec<String> = sink
        .received()
        .iter()
        .map(|m| m.parse().subject)
        .filter(|s| s.starts_with("Intro"))
        .collect();
    assert_eq!(intros.len(), CONTACTS);
    assert!(
        intros.iter().all(|s| s == "Intro to Rust Pro for Ann"),
        "rendered from the original event: {intros:?}"
    );

    let again = replay(&site, &["--since", "1h"]);
    assert!(
        again.contains(&format!("intro: 0 to replay, {CONTACTS} already")),
        "{again}"
    );
    assert!(again.contains("nothing to replay"), "{again}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.count(), 2 * CONTACTS, "nothing ran twice");

    let refused = replay_status(&site, &["--since", "last tuesday"]);
    assert!(!refused.0, "an unreadable --since is refused");
    assert!(
        refused.1.contains("--since \"last tuesday\""),
        "{}",
        refused.1
    );
}

/// Runs `herald replay ARGS` for process 0's folders; its standard output. Panics unless it
/// succeeds.
fn replay(site: &Site, args: &[&str]) -> String {
    let (ok, output) = replay_status(site, args);
    assert!(ok, "herald replay {args:?} failed:\n{output}");
    output
}

/// Whether `herald replay ARGS` succeeded, with its output (stdout, then stderr).
fn replay_status(site: &Site, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("replay")
        .args(args)
        .current_dir(site.root.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HERALD_DATABASE_URL", &site.database_url)
        .env("HERALD_WORKFLOWS", site.workflows(0))
        .env(
            "HERALD_TEMPLATES",
            site.root.path().join("p0").join("templates"),
        )
        .output()
        .expect("run herald replay");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}
