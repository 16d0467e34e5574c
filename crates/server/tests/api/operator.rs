//! What an operator does to runs and messages through the admin API: cancel a run (its queued
//! messages are cancelled, nothing more is sent), and retry failed messages once the relay is
//! back (the same Message-ID, a fresh attempt count), read a contact's timeline and export, and
//! erase a contact.

use crate::helpers::*;
use crate::link_helpers::ADMIN_TOKEN;
use herald_store::{MessageStatus, RunState, Timestamp};
use herald_test_support::smtp::Stage;
use std::time::Duration;

both_backends!(
    cancelling_a_run_during_its_wait_sends_nothing_more,
    failed_messages_are_retried_once_the_relay_is_back,
    a_contacts_timeline_tells_what_happened_in_order,
    erasure_removes_everything_but_keeps_an_opt_out,
    the_timeline_page_needs_the_admin_token,
);

const DAY: Duration = Duration::from_secs(86_400);

const WELCOME_THEN_REMINDER: &str = r#"
name: Welcome and a reminder
trigger:
  event: offer_access_granted
steps:
  - id: welcome
    send_email:
      subject: "Welcome {{contact.first_name}}"
      text: "Hi {{contact.first_name}}"
  - wait: 1d
  - id: reminder
    send_email:
      subject: "Reminder for {{contact.first_name}}"
      text: "Still there?"
"#;

async fn cancelling_a_run_during_its_wait_sends_nothing_more(backend: Backend) {
    let opts = TestOptions::new(backend)
        .manual_clock()
        .admin_token(ADMIN_TOKEN)
        .workflow("welcome", WELCOME_THEN_REMINDER);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    for id in ["c_stop", "c_go"] {
        app.accept(&offer_granted(contact(id, "Ann"), "o_pro"))
            .await;
    }
    app.wait_for_mails(2).await;
    app.settle().await;
    let run = app.runs_of("c_stop").await.remove(0);
    assert_eq!(run.state, RunState::Active, "{run:?}");

    let path = format!("/v1/runs/{}/cancel", run.id);
    let (status, body) = app.admin_post(&path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "cancelled");
    let (status, body) = app.admin_post(&path).await;
    assert_eq!(status, 200, "cancelling again changes nothing: {body}");

    app.advance(2 * DAY);
    app.settle().await;
    let to: Vec<Vec<String>> = app
        .sink()
        .received()
        .into_iter()
        .map(|m| m.rcpt_to)
        .collect();
    assert_eq!(
        to.len(),
        3,
        "welcomes for both, a reminder for c_go only: {to:?}"
    );
    assert_eq!(to[2], vec!["c_go@example.com".to_owned()]);
    let run = app.runs_of("c_stop").await.remove(0);
    assert_eq!(run.state, RunState::Cancelled, "{run:?}");
    assert_eq!(run.reason.as_deref(), Some("cancelled by an operator"));

    // A run that already ended is not cancelled; an unknown one is not found.
    let done = app.runs_of("c_go").await.remove(0);
    assert_eq!(done.state, RunState::Completed);
    let (status, body) = app
        .admin_post(&format!("/v1/runs/{}/cancel", done.id))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["state"], "completed");
    let (status, body) = app.admin_post("/v1/runs/no-such-run/cancel").await;
    assert_eq!(status, 404, "{body}");
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

async fn failed_messages_are_retried_once_the_relay_is_back(backend: Backend) {
    let opts = TestOptions::new(backend)
        .admin_token(ADMIN_TOKEN)
        .workflow("welcome", WELCOME);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    // The relay refuses every message for good (a 5xx fails at once, without retries).
    app.sink().fail_all(Stage::Data, 554);
    let events: Vec<_> = (0..50)
        .map(|i| offer_granted(contact(&format!("c_relay_{i}"), "Ann"), "o_pro"))
        .collect();
    app.accept_batch(&events).await;
    app.wait_for_status(50, MessageStatus::Failed).await;
    app.settle().await;
    assert_eq!(app.sink().count(), 0);

    app.sink().clear_faults();
    let failed = app.messages().await;
    // Ten one by one, the other forty by a filter (every message failed since an hour ago).
    for m in &failed[..10] {
        let (status, body) = app
            .admin_post(&format!("/v1/messages/{}/retry", m.id))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "queued");
    }
    let in_an_hour = (chrono::Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339();
    let (status, body) = app
        .admin_post_json(
            "/v1/messages/retry",
            &serde_json::json!({"status": "failed", "since": in_an_hour}),
            &[],
        )
        .await;
    assert_eq!(
        (status, &body["retried"]),
        (200, &serde_json::json!(0)),
        "nothing failed after `since`: {body}"
    );
    let an_hour_ago = (chrono::Utc::now() - chrono::TimeDelta::hours(1)).to_rfc3339();
    let (status, body) = app
        .admin_post_json(
            "/v1/messages/retry",
            &serde_json::json!({"status": "failed", "since": an_hour_ago, "workflow": "welcome"}),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["retried"], 40, "{body}");
    assert_eq!(body["more"], false, "{body}");
    let (status, body) = app
        .admin_post_json(
            "/v1/messages/retry",
            &serde_json::json!({"status": "sent"}),
            &[],
        )
        .await;
    assert_eq!(status, 400, "sent messages are not retried: {body}");
    let mails = app.wait_for_mails(50).await;
    app.settle().await;
    assert_eq!(app.sink().count(), 50, "each retried message sent once");
    let sent = app.messages().await;
    for m in &sent {
        assert_eq!(m.status, MessageStatus::Sent, "{m:?}");
        assert_eq!(m.attempts, 1, "a fresh attempt count: {m:?}");
    }
    let mut ids_sent: Vec<String> = mails.iter().map(|m| m.message_id()).collect();
    let mut ids_stored: Vec<String> = failed.iter().map(|m| m.header_message_id.clone()).collect();
    ids_sent.sort();
    ids_stored.sort();
    assert_eq!(ids_sent, ids_stored, "retried with the Message-ID each had");

    let (status, body) = app
        .admin_post(&format!("/v1/messages/{}/retry", sent[0].id))
        .await;
    assert_eq!(status, 409, "a sent message is not sent again: {body}");
    assert_eq!(body["status"], "sent");
    let (status, _) = app.admin_post("/v1/messages/nope/retry").await;
    assert_eq!(status, 404);
}

async fn a_contacts_timeline_tells_what_happened_in_order(backend: Backend) {
    let opts = TestOptions::new(backend)
        .manual_clock()
        .admin_token(ADMIN_TOKEN)
        .workflow(
            "welcome",
            &WELCOME_THEN_REMINDER.replace("Still there?", "Still there? <<login_url>>"),
        );
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_story", "Ann"), "o_pro"))
        .await;
    app.wait_for_mails(1).await;
    // Recorded before the clock jumps (a jump past a send's lease would free it again).
    app.settle().await;
    app.advance(2 * DAY);
    app.wait_for_mails(2).await;
    app.settle().await;
    let (status, body) = app.admin_post("/v1/contacts/c_story/magic-link").await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = app.admin_get("/v1/contacts/c_story/timeline").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["contact"]["id"], "c_story");
    let items = body["timeline"].as_array().expect("a timeline");
    let kinds: Vec<&str> = items.iter().map(|i| i["kind"].as_str().unwrap()).collect();
    let first = |kind: &str| kinds.iter().position(|k| *k == kind);
    assert_eq!(kinds[0], "event", "{kinds:?}");
    assert!(first("event") < first("run_started"), "{kinds:?}");
    assert!(first("run_started") < first("message"), "{kinds:?}");
    let messages: Vec<&serde_json::Value> =
        items.iter().filter(|i| i["kind"] == "message").collect();
    assert_eq!(messages.len(), 2, "{body}");
    assert!(messages.iter().all(|m| m["status"] == "sent"), "{body}");
    assert_eq!(messages[0]["step_id"], "welcome");
    assert_eq!(messages[1]["step_id"], "reminder");
    // What was sent, to read: the reminder's sign-in link (a working one in the email) shows as
    // a marker, never as a token.
    assert_eq!(
        messages[0]["content"],
        serde_json::json!({"subject": "Welcome Ann", "text": "Hi Ann", "html": null}),
        "{body}"
    );
    assert_eq!(
        messages[1]["content"]["text"], "Still there? [sign-in link]",
        "{body}"
    );
    let sent_reminder = app
        .sink()
        .received()
        .iter()
        .map(|m| m.parse())
        .find(|m| m.subject.starts_with("Reminder"))
        .expect("the reminder was sent");
    let sent_text = sent_reminder.text.unwrap_or_default();
    assert!(sent_text.contains("/l/"), "{sent_text}");
    assert!(
        !body.to_string().contains("/l/"),
        "a link in the timeline: {body}"
    );
    let ended = items
        .iter()
        .find(|i| i["kind"] == "run_ended")
        .expect("the run ended");
    assert_eq!(ended["state"], "completed", "{body}");
    assert!(
        items
            .iter()
            .any(|i| i["kind"] == "link" && i["action"] == "mint"),
        "the minted link: {body}"
    );
    let times: Vec<&str> = items.iter().map(|i| i["at"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "oldest first");

    let (status, _) = app.admin_get("/v1/contacts/nobody/timeline").await;
    assert_eq!(status, 404);

    // The export holds all of it.
    let (status, export) = app.admin_get("/v1/contacts/c_story/export").await;
    assert_eq!(status, 200, "{export}");
    assert_eq!(export["contact"]["email"], "c_story@example.com");
    assert_eq!(export["events"].as_array().unwrap().len(), 1, "{export}");
    assert_eq!(export["events"][0]["type"], "course.offer_access_granted");
    assert_eq!(export["runs"].as_array().unwrap().len(), 1);
    assert_eq!(export["messages"].as_array().unwrap().len(), 2);
    assert_eq!(export["grants"][0]["id"], "o_pro");
    let (status, _) = app.admin_get("/v1/contacts/nobody/export").await;
    assert_eq!(status, 404);
}

async fn admin_delete(app: &TestApp, path: &str) -> (u16, serde_json::Value) {
    let r = app
        .client
        .delete(app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("DELETE");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// Export, then erase: the contact, their events, runs and messages are gone. Their address,
/// which had unsubscribed, stays suppressed when the same person comes back; another erased
/// contact who had not unsubscribed is welcomed again like anyone new.
async fn erasure_removes_everything_but_keeps_an_opt_out(backend: Backend) {
    let opts = TestOptions::new(backend)
        .admin_token(ADMIN_TOKEN)
        .workflow("welcome", WELCOME);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    for id in ["c_gone", "c_back"] {
        app.accept(&offer_granted(contact(id, "Ann"), "o_pro"))
            .await;
    }
    app.wait_for_mails(2).await;
    app.settle().await;
    let (status, _) = app.admin_post("/v1/contacts/c_gone/magic-link").await;
    assert_eq!(status, 200);
    // c_gone unsubscribes (as an operator records it for them).
    let changed = app
        .store
        .set_opt_out(
            "c_gone".into(),
            herald_store::Channel::Email,
            true,
            "one_click".into(),
            Timestamp::from_millis(0),
        )
        .await
        .unwrap();
    assert!(changed);

    let (status, export) = app.admin_get("/v1/contacts/c_gone/export").await;
    assert_eq!(status, 200, "{export}");
    for id in ["c_gone", "c_back"] {
        let (status, body) = admin_delete(&app, &format!("/v1/contacts/{id}")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["erased"]["events"], 1, "{body}");
        assert_eq!(body["erased"]["runs"], 1, "{body}");
        assert_eq!(body["erased"]["messages"], 1, "{body}");
    }
    let (status, _) = app.admin_get("/v1/contacts/c_gone").await;
    assert_eq!(status, 404);
    assert!(app.messages_of("c_gone").await.is_empty());
    assert!(app.runs_of("c_gone").await.is_empty());
    let (status, _) = admin_delete(&app, "/v1/contacts/c_gone").await;
    assert_eq!(status, 404, "erasing twice: nothing left");

    // Both come back with the same addresses.
    for id in ["c_gone", "c_back"] {
        app.accept(&offer_granted(contact(id, "Ann"), "o_pro"))
            .await;
    }
    app.settle().await;
    let gone = app.messages_of("c_gone").await;
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].status, MessageStatus::Suppressed, "{gone:?}");
    let back = app.messages_of("c_back").await;
    assert_eq!(back[0].status, MessageStatus::Sent, "{back:?}");
    let mut to: Vec<String> = app
        .sink()
        .received()
        .into_iter()
        .flat_map(|m| m.rcpt_to)
        .collect();
    to.sort();
    assert_eq!(
        to,
        [
            "c_back@example.com",
            "c_back@example.com",
            "c_gone@example.com"
        ]
        .map(String::from),
        "the unsubscribed address got nothing after coming back"
    );
}

async fn the_timeline_page_needs_the_admin_token(backend: Backend) {
    let opts = TestOptions::new(backend)
        .admin_token(ADMIN_TOKEN)
        .workflow("welcome", WELCOME);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_page", "Ann"), "o_pro"))
        .await;
    app.wait_for_mails(1).await;
    app.settle().await;
    let path = "/admin/contacts/c_page/timeline";
    let page = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    };

    // Without the token: a form, and nothing about the contact.
    let (status, html) = page(app.client.get(app.url(path)).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("name=\"token\"") && !html.contains("c_page@example.com"),
        "{html}"
    );
    let (status, html) = page(
        app.client
            .post(app.url(path))
            .form(&[("token", "wrong")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401, "{html}");
    assert!(!html.contains("c_page@example.com"), "{html}");

    for request in [
        app.client.get(app.url(path)).bearer_auth(ADMIN_TOKEN),
        app.client
            .post(app.url(path))
            .form(&[("token", ADMIN_TOKEN)]),
    ] {
        let (status, html) = page(request.send().await.unwrap()).await;
        assert_eq!(status, 200, "{html}");
        assert!(
            html.contains("c_page@example.com") && html.contains("Welcome Ann"),
            "{html}"
        );
    }
    // A page on another site cannot post the token form for the team.
    let (status, _) = page(
        app.client
            .post(app.url(path))
            .header("sec-fetch-site", "cross-site")
            .form(&[("token", ADMIN_TOKEN)])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = page(
        app.client
            .get(app.url("/admin/contacts/c_nobody/timeline"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
}
