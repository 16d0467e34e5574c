//! The real path: what a school's first week does to herald, features combined at realistic
//! counts. A bulk import whose welcome carries `<<login_url>>` while the platform keeps posting;
//! a row the database rejects and an item whose processing panics, with the queue behind them;
//! a loop that stops, seen by `/healthz`; a goal reached while a send window holds the message;
//! three emails in a row per learner; a workflow disabled across a restart.

use crate::helpers::*;
use herald_engine::Stage;
use herald_store::{MessageStatus, RunState};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

both_backends!(
    a_login_link_burst_is_delivered_once_while_ingest_stays_responsive,
    a_row_the_database_rejects_is_set_aside_and_the_queue_goes_on,
    a_panicking_item_is_set_aside_and_later_runs_go_on,
    exit_when_during_a_closed_send_window_cancels_the_message,
    three_sends_in_a_row_arrive_in_order_for_100_contacts,
    disable_restart_enable_resumes_parked_runs,
);

const WELCOME: &str = "name: Welcome\ntrigger:\n  event: offer_access_granted\nsteps:\n  - id: welcome\n    send_email:\n      subject: \"Welcome {{contact.first_name}}\"\n      template: welcome\n";
const WELCOME_TXT: &str = "Hi {{contact.first_name}}, sign in: <<login_url>>\n";
const WELCOME_HTML: &str =
    "<p>Hi {{contact.first_name}}, <a href=\"<<login_url>>\">sign in</a></p>\n";

fn grants(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| offer_granted(contact(&format!("{prefix}{i}"), "Ann"), "o_pro"))
        .collect()
}

/// The login links (`/l/TOKEN`) in a text.
fn links(text: &str) -> Vec<String> {
    text.match_indices("/l/")
        .map(|(at, _)| text[at + 3..].chars().take(43).collect())
        .collect()
}

async fn a_login_link_burst_is_delivered_once_while_ingest_stays_responsive(backend: Backend) {
    let options = TestOptions::new(backend)
        .workflow("welcome", WELCOME)
        .template("welcome.txt.hbs", WELCOME_TXT)
        .template("welcome.html.hbs", WELCOME_HTML);
    let Some(app) = spawn_app(options).await else {
        return;
    };
    let first = grants("bulk_a_", 150);
    let second = grants("bulk_b_", 150);
    let singles = async {
        let mut slowest = Duration::ZERO;
        for i in 0..10 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let started = Instant::now();
            let ev = offer_granted(contact(&format!("single_{i}"), "Bo"), "o_pro");
            expect_202(app.post_event(&ev).await).await;
            slowest = slowest.max(started.elapsed());
        }
        slowest
    };
    let (_, _, slowest) =
        tokio::join!(app.accept_batch(&first), app.accept_batch(&second), singles);
    assert!(
        slowest < Duration::from_secs(1),
        "a single post during the burst took {slowest:?}"
    );
    let mails = app.wait_for_mails(310).await;
    app.settle().await;
    let mut per_recipient: BTreeMap<String, usize> = BTreeMap::new();
    let mut tokens = BTreeSet::new();
    for mail in &mails {
        *per_recipient.entry(mail.rcpt_to.join(",")).or_default() += 1;
        let email = mail.parse();
        let text_links = links(email.text.as_deref().unwrap_or_default());
        let html_links = links(email.html.as_deref().unwrap_or_default());
        assert_eq!(text_links.len(), 1, "text part: {:?}", email.text);
        assert_eq!(text_links, html_links, "both parts carry the same link");
        assert!(tokens.insert(text_links[0].clone()), "a link sent twice");
    }
    assert_eq!(per_recipient.len(), 310, "every contact welcomed");
    assert!(
        per_recipient.values().all(|&n| n == 1),
        "welcomed more than once: {:?}",
        per_recipient
            .iter()
            .filter(|(_, n)| **n > 1)
            .collect::<Vec<_>>()
    );
    let sent = app
        .messages()
        .await
        .iter()
        .filter(|m| m.status == MessageStatus::Sent)
        .count();
    assert_eq!(sent, 310);
    // A sample of the links opens the portal's interstitial.
    for token in tokens.iter().take(5) {
        assert_eq!(app.get(&format!("/l/{token}")).await.status(), 200);
    }
    app.assert_healthy().await;
}

/// Makes the database refuse any contact row with id `poison`, as a constraint or an encoding
/// it cannot store would.
async fn poison_contacts(app: &TestApp) {
    use sqlx::Connection;
    let url = &app.env.database_url;
    match app.env.backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
            for op in ["INSERT", "UPDATE"] {
                let sql = format!(
                    "CREATE TRIGGER poison_{op} BEFORE {op} ON contacts WHEN NEW.id = 'poison'
                     BEGIN SELECT RAISE(ABORT, 'poisoned row refused'); END"
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::raw_sql(
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN IF NEW.id = 'poison' THEN RAISE EXCEPTION 'poisoned row refused'; END IF;
                 RETURN NEW; END $$;
                 CREATE TRIGGER poison BEFORE INSERT OR UPDATE ON contacts
                 FOR EACH ROW EXECUTE FUNCTION poison();",
            )
            .execute(&mut conn)
            .await
            .unwrap();
        }
    }
}

async fn a_row_the_database_rejects_is_set_aside_and_the_queue_goes_on(backend: Backend) {
    let mut options = TestOptions::new(backend).workflow(
        "signup",
        &one_email_workflow("new_signup", "Welcome", false),
    );
    options.admin_token = Some("admin-token".into());
    let Some(app) = spawn_app(options).await else {
        return;
    };
    poison_contacts(&app).await;
    app.accept(&new_signup(contact("poison", "Eve"))).await;
    let after: Vec<Value> = (0..100)
        .map(|i| new_signup(contact(&format!("after_{i}"), "Ann")))
        .collect();
    app.accept_batch(&after[..50]).await;
    for ev in &after[50..] {
        app.accept(ev).await;
    }
    let mails = app.wait_for_mails(100).await;
    app.settle().await;
    assert_eq!(mails.len(), 100, "every event after the poisoned one");
    assert!(app.runs_of("poison").await.is_empty());
    let dead: Value = app
        .client
        .get(app.url("/v1/events?status=dead"))
        .bearer_auth("admin-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = dead["events"].as_array().expect("a list");
    assert_eq!(events.len(), 1, "{dead}");
    assert_eq!(events[0]["contact_id"], "poison");
    assert_eq!(events[0]["status"], "dead");
    let error = events[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("poisoned row refused"), "{error}");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("herald_dead_total{queue=\"events\"}")),
        "{metrics}"
    );
    app.assert_healthy().await;
}

async fn a_panicking_item_is_set_aside_and_later_runs_go_on(backend: Backend) {
    let hook: herald_engine::FaultHook = Arc::new(|stage, contact_id| {
        let boom = match stage {
            Stage::Dispatch => "boom_dispatch",
            Stage::Step => "boom_step",
            Stage::Deliver => "boom_deliver",
        };
        if contact_id == boom {
            panic!("injected fault at {stage:?}");
        }
    });
    let workflow = "name: Two\ntrigger:\n  event: new_signup\nsteps:\n  - id: first\n    send_email:\n      subject: \"First\"\n      text: \"one\"\n  - wait: 1s\n  - id: second\n    send_email:\n      subject: \"Second\"\n      text: \"two\"\n";
    let options = TestOptions::new(backend)
        .workflow("two", workflow)
        .fault_hook(hook);
    let Some(app) = spawn_app(options).await else {
        return;
    };
    for boom in ["boom_dispatch", "boom_step", "boom_deliver"] {
        app.accept(&new_signup(contact(boom, "Eve"))).await;
    }
    let good: Vec<Value> = (0..20)
        .map(|i| new_signup(contact(&format!("good_{i}"), "Ann")))
        .collect();
    app.accept_batch(&good).await;
    // 20 good contacts get both emails; boom_step gets its first; boom_deliver nothing.
    let mails = app.wait_for_mails(41).await;
    app.settle().await;
    let to = |who: &str| {
        mails
            .iter()
            .filter(|m| m.rcpt_to.iter().any(|r| r.starts_with(who)))
            .count()
    };
    for i in 0..20 {
        assert_eq!(to(&format!("good_{i}@")), 2, "good_{i}");
    }
    assert_eq!(to("boom_step@"), 1);
    assert_eq!(to("boom_deliver@"), 0);
    assert_eq!(to("boom_dispatch@"), 0);
    assert!(app.runs_of("boom_dispatch").await.is_empty());
    let step_runs = app.runs_of("boom_step").await;
    assert_eq!(step_runs[0].state, RunState::Dead, "{step_runs:?}");
    assert!(
        step_runs[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("injected fault")),
        "{step_runs:?}"
    );
    let deliver = app.messages_of("boom_deliver").await;
    assert_eq!(deliver[0].status, MessageStatus::Dead, "{deliver:?}");
    app.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_names_a_stopped_loop_and_recovers() {
    let options = TestOptions::new(Backend::Sqlite)
        .workflow(
            "signup",
            &one_email_workflow("new_signup", "Welcome", false),
        )
        .stall_limit(Duration::from_millis(300));
    let Some(app) = spawn_app(options).await else {
        return;
    };
    app.assert_healthy().await;
    let loops = app.state.loops.clone();
    assert!(loops.pause("deliverer"));
    app.accept(&new_signup(contact("held", "Ann"))).await;
    wait_for("healthz to report the stopped deliverer", async || {
        let response = app.get("/healthz").await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        status == 503 && body["loops"]["deliverer"] == "stalled"
    })
    .await;
    assert!(loops.resume("deliverer"));
    app.wait_for_mails(1).await;
    wait_for("healthz to be ok again", async || {
        app.get("/healthz").await.status() == 200
    })
    .await;
}

async fn exit_when_during_a_closed_send_window_cancels_the_message(backend: Backend) {
    // Saturday mornings only; the manual clock starts on a Tuesday.
    let workflow = "name: Weekend\ntrigger:\n  event: offer_access_granted\nexit_when:\n  event: product_completed\nsend_window:\n  days: [sat]\n  between: [\"09:00\", \"18:00\"]\n  timezone: UTC\nsteps:\n  - id: nudge\n    send_email:\n      subject: \"Weekend\"\n      text: \"hi\"\n  - wait: 7d\n  - send_email: {subject: \"Later\", text: \"later\"}\n";
    let options = TestOptions::new(backend)
        .workflow("weekend", workflow)
        .manual_clock();
    let Some(app) = spawn_app(options).await else {
        return;
    };
    app.accept(&offer_granted(contact("ann", "Ann"), "o_pro"))
        .await;
    app.wait_for_status(1, MessageStatus::Queued).await;
    app.accept(&product_completed(contact("ann", "Ann"), "p_rust101"))
        .await;
    app.settle().await;
    let runs = app.runs_of("ann").await;
    assert_eq!(runs[0].state, RunState::Exited, "{runs:?}");
    let rows = app.wait_for_status(1, MessageStatus::Cancelled).await;
    assert!(
        rows[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("exited")),
        "{rows:?}"
    );
    app.advance(Duration::from_secs(5 * 86_400));
    app.settle().await;
    assert_eq!(app.sink().count(), 0, "a cancelled message was sent");
    assert_eq!(app.messages().await[0].status, MessageStatus::Cancelled);
}

async fn three_sends_in_a_row_arrive_in_order_for_100_contacts(backend: Backend) {
    let workflow = "name: Three\ntrigger:\n  event: new_signup\nsteps:\n  - send_email: {subject: \"1\", text: \"one\"}\n  - send_email: {subject: \"2\", text: \"two\"}\n  - send_email: {subject: \"3\", text: \"three\"}\n";
    let options = TestOptions::new(backend).workflow("three", workflow);
    let Some(app) = spawn_app(options).await else {
        return;
    };
    // The first few sends fail transiently, so a message retried would be overtaken if order
    // were not kept.
    app.sink().fail_next(5, crate::smtp_sink::Stage::Data, 451);
    let signups: Vec<Value> = (0..100)
        .map(|i| new_signup(contact(&format!("three_{i}"), "Ann")))
        .collect();
    app.accept_batch(&signups).await;
    let mails = app.wait_for_mails(300).await;
    app.settle().await;
    let mut per_recipient: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for mail in &mails {
        per_recipient
            .entry(mail.rcpt_to.join(","))
            .or_default()
            .push(mail.parse().subject);
    }
    assert_eq!(per_recipient.len(), 100);
    for (to, subjects) in per_recipient {
        assert_eq!(subjects, ["1", "2", "3"], "{to}");
    }
}

async fn disable_restart_enable_resumes_parked_runs(backend: Backend) {
    let workflow = |enabled: bool| {
        format!(
            "name: Drip\nenabled: {enabled}\ntrigger:\n  event: new_signup\nsteps:\n  - send_email: {{subject: \"1\", text: \"one\"}}\n  - wait: 1d\n  - send_email: {{subject: \"2\", text: \"two\"}}\n"
        )
    };
    let options = TestOptions::new(backend)
        .workflow("drip", &workflow(true))
        .manual_clock();
    let Some(app) = spawn_app(options).await else {
        return;
    };
    let signups: Vec<Value> = (0..5)
        .map(|i| new_signup(contact(&format!("drip_{i}"), "Ann")))
        .collect();
    app.accept_batch(&signups).await;
    app.wait_for_mails(5).await;
    app.settle().await;
    let file = app.env.workflows.join("drip.yaml");
    std::fs::write(&file, workflow(false)).unwrap();
    app.state.registry.reload(app.clock.now_ms()).await.unwrap();
    let parked = app
        .runs()
        .await
        .iter()
        .filter(|r| r.state == RunState::Parked)
        .count();
    assert_eq!(parked, 5);

    let app = app.shutdown().await.restart().await;
    std::fs::write(&file, workflow(true)).unwrap();
    app.state.registry.reload(app.clock.now_ms()).await.unwrap();
    app.advance(Duration::from_secs(86_400 + 60));
    app.wait_for_mails(10).await;
    app.settle().await;
    let states: Vec<RunState> = app.runs().await.iter().map(|r| r.state).collect();
    assert!(
        states.iter().all(|s| *s == RunState::Completed),
        "{states:?}"
    );
}
