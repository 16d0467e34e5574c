//! Runs started by an operator and by schedules rather than by a course event:
//! `POST /v1/workflows/{id}/enrollments` (by contact id or by audience, each refusal named, a
//! repeated request enrolling no one twice) and schedule triggers (one run per audience member
//! per tick; a tick fires once, also from two processes and after downtime).

use crate::helpers::*;
use crate::link_helpers::ADMIN_TOKEN;
use serde_json::{Value, json};
use std::time::Duration;

both_backends!(
    enrolling_by_contact_id_names_each_refusal,
    enrolling_an_audience_picks_holders_and_the_inactive,
    a_schedule_enrolls_its_audience_once_per_tick,
    three_hundred_holders_enrolled_by_audience_get_one_sign_in_email_each,
);

const HOUR: Duration = Duration::from_secs(3_600);

/// Started only by enrollment in these tests: no platform event is `lesson_completed` here.
const ONBOARDING: &str = r#"
name: Onboarding
trigger:
  event: lesson_completed
steps:
  - id: hello
    send_email:
      subject: "Onboarding for {{contact.first_name}}"
      text: "Hi {{contact.first_name}}"
"#;

const AGAIN: &str = r#"
name: Again and again
re_entry: true
trigger:
  event: lesson_completed
steps:
  - id: hello
    send_email:
      subject: "Again for {{contact.first_name}}"
      text: "Hi"
"#;

fn enroll_path(workflow: &str) -> String {
    format!("/v1/workflows/{workflow}/enrollments")
}

fn granted_at(id: &str, name: &str, offer_id: &str, time: &str) -> Value {
    at(offer_granted(contact(id, name), offer_id), time)
}

fn subjects(app: &TestApp) -> Vec<String> {
    let mut subjects: Vec<String> = app
        .sink()
        .received()
        .iter()
        .map(|m| m.parse().subject)
        .collect();
    subjects.sort();
    subjects
}

async fn enrolling_by_contact_id_names_each_refusal(backend: Backend) {
    let opts = TestOptions::new(backend)
        .admin_token(ADMIN_TOKEN)
        .workflow("onboarding", ONBOARDING)
        .workflow("again", AGAIN);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    for id in ["c_ann", "c_bo"] {
        app.accept(&event(
            "new_signup",
            json!({"contact": contact(id, &id[2..])}),
        ))
        .await;
    }
    app.settle().await;

    let body = json!({"contact_ids": ["c_ann", "c_bo", "c_nobody", "c_ann"]});
    let (status, answer) = app
        .admin_post_json(&enroll_path("onboarding"), &body, &[])
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], json!(["c_ann", "c_bo"]), "{answer}");
    assert_eq!(
        answer["refused"],
        json!([{"contact_id": "c_nobody", "reason": "unknown_contact"}])
    );
    app.wait_for_mails(2).await;
    app.settle().await;
    assert_eq!(
        subjects(&app),
        ["Onboarding for ann", "Onboarding for bo"],
        "rendered with the contact's details"
    );

    // `re_entry: false`: a second enrollment is refused, and nothing more is sent.
    let (status, answer) = app
        .admin_post_json(
            &enroll_path("onboarding"),
            &json!({"contact_ids": ["c_ann"]}),
            &[],
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], json!([]));
    assert_eq!(
        answer["refused"],
        json!([{"contact_id": "c_ann", "reason": "already_enrolled"}])
    );

    // `re_entry: true`: each request enrolls again, but the same request repeated (same
    // Idempotency-Key, as a client retrying after a timeout) enrolls once.
    let body = json!({"contact_ids": ["c_bo"]});
    for _ in 0..2 {
        let (status, answer) = app
            .admin_post_json(&enroll_path("again"), &body, &[("Idempotency-Key", "k-1")])
            .await;
        assert_eq!(status, 202, "{answer}");
        app.settle().await;
    }
    let (status, _) = app
        .admin_post_json(&enroll_path("again"), &body, &[("Idempotency-Key", "k-2")])
        .await;
    assert_eq!(status, 202);
    app.settle().await;
    let runs: Vec<_> = app
        .runs_of("c_bo")
        .await
        .into_iter()
        .filter(|r| r.workflow_id == "again")
        .collect();
    assert_eq!(
        runs.len(),
        2,
        "k-1 twice is one run, k-2 another: {runs:#?}"
    );
    assert_eq!(app.sink().count(), 4);

    // The enrollment shows in the contact's timeline as herald's own event.
    let (status, timeline) = app.admin_get("/v1/contacts/c_bo/timeline").await;
    assert_eq!(status, 200, "{timeline}");
    let types: Vec<&str> = timeline["timeline"]
        .as_array()
        .unwrap_or_else(|| panic!("a timeline: {timeline}"))
        .iter()
        .filter(|e| e["kind"] == "event")
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert!(
        types.contains(&"herald.enrollment") && types.contains(&"course.new_signup"),
        "{types:?}"
    );

    // Refusals of the request itself.
    let cases: [(&str, Value, u16, &str); 5] = [
        (
            "onboarding",
            json!({}),
            400,
            "either contact_ids or audience",
        ),
        (
            "onboarding",
            json!({"contact_ids": ["c_ann"], "audience": {}}),
            400,
            "either contact_ids or audience",
        ),
        (
            "onboarding",
            json!({"contact_ids": [""]}),
            400,
            "contact_ids[0]",
        ),
        (
            "onboarding",
            json!({"audience": {"offers": ["o_pro"], "inactive_for": "a week"}}),
            400,
            "inactive_for",
        ),
        (
            "no_such_workflow",
            json!({"contact_ids": ["c_ann"]}),
            404,
            "no workflow",
        ),
    ];
    for (workflow, body, want, says) in cases {
        let (status, answer) = app
            .admin_post_json(&enroll_path(workflow), &body, &[])
            .await;
        assert_eq!(status, want, "{body} -> {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{body} -> {answer}");
    }
    let unauthenticated = app
        .client
        .post(app.url(&enroll_path("onboarding")))
        .json(&json!({"contact_ids": ["c_ann"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    app.settle().await;
    assert_eq!(app.sink().count(), 4, "no refused request sent anything");
}

async fn enrolling_an_audience_picks_holders_and_the_inactive(backend: Backend) {
    let opts = TestOptions::new(backend)
        .manual_clock()
        .admin_token(ADMIN_TOKEN)
        .workflow("onboarding", ONBOARDING)
        .workflow("again", AGAIN);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    // The clock reads 2026-11-24T10:00Z. Pro holders: one active today, one last seen 10 days
    // ago; a basic holder whose offer includes p_video; a pro holder whose grant was removed.
    app.accept(&granted_at(
        "c_active",
        "Ann",
        "o_pro",
        "2026-11-24T09:00:00Z",
    ))
    .await;
    app.accept(&granted_at("c_idle", "Bo", "o_pro", "2026-11-14T09:00:00Z"))
        .await;
    let basic = json!({"id": "o_basic", "title": "Basic", "product_ids": ["p_video"]});
    app.accept(&at(
        event(
            "offer_access_granted",
            json!({"contact": contact("c_basic", "Cy"), "offer": basic}),
        ),
        "2026-11-24T09:00:00Z",
    ))
    .await;
    app.accept(&granted_at("c_gone", "Di", "o_pro", "2026-11-20T09:00:00Z"))
        .await;
    app.accept(&at(
        offer_removed(contact("c_gone", "Di"), "o_pro"),
        "2026-11-21T09:00:00Z",
    ))
    .await;
    app.settle().await;

    let accepted = async |workflow: &str, audience: Value| {
        let (status, answer) = app
            .admin_post_json(
                &enroll_path(workflow),
                &json!({ "audience": audience }),
                &[],
            )
            .await;
        assert_eq!(status, 202, "{audience} -> {answer}");
        answer["accepted"].clone()
    };
    assert_eq!(
        accepted("again", json!({"offers": ["o_pro"]})).await,
        json!(["c_active", "c_idle"]),
        "active pro grants only"
    );
    app.settle().await;
    assert_eq!(
        accepted("again", json!({"offers": ["o_pro"], "inactive_for": "7d"})).await,
        json!(["c_idle"]),
        "only the one without a course event for 7 days (an enrollment is no activity)"
    );
    app.settle().await;
    assert_eq!(
        accepted("onboarding", json!({"products": ["p_video"]})).await,
        json!(["c_basic"]),
        "a product held through an offer"
    );
    app.settle().await;
    assert_eq!(
        accepted("onboarding", json!({})).await,
        json!(["c_active", "c_gone", "c_idle"]),
        "no offer or product named: every contact (c_basic is in onboarding already)"
    );
}

/// Every hour on the hour, in Berlin: holders of o_pro, again at each tick.
const HOURLY: &str = r#"
name: Hourly check-in
re_entry: true
trigger:
  schedule: "0 * * * *"
  timezone: Europe/Berlin
  audience:
    offers: [o_pro]
steps:
  - id: check_in
    send_email:
      subject: "Check-in for {{contact.first_name}} at {{event.time}}"
      text: "Hi {{contact.first_name}}"
"#;

async fn a_schedule_enrolls_its_audience_once_per_tick(backend: Backend) {
    let opts = || {
        TestOptions::new(backend)
            .manual_clock()
            .admin_token(ADMIN_TOKEN)
            .poll_interval(Duration::from_millis(50))
            .workflow("hourly", HOURLY)
    };
    let Some(app) = spawn_app(opts()).await else {
        return;
    };
    // On PostgreSQL, a second process with its own scheduler sees every tick too.
    let other = match backend {
        Backend::Postgres => Some(app.another_process(opts()).await),
        Backend::Sqlite => None,
    };
    app.accept(&granted_at("c_1", "Ann", "o_pro", "2026-11-24T09:00:00Z"))
        .await;
    app.accept(&granted_at("c_2", "Bo", "o_pro", "2026-11-24T09:00:00Z"))
        .await;
    app.accept(&granted_at("c_3", "Cy", "o_basic", "2026-11-24T09:00:00Z"))
        .await;
    app.settle().await;
    // The clock stands on a tick (10:00Z is 11:00 in Berlin); a schedule seen for the first time
    // starts at its next tick, so this one does not fire: the scheduler only records it.
    let key = "schedule:hourly:0 * * * *@Europe/Berlin".to_owned();
    wait_for("the scheduler to take in the schedule", async || {
        !app.store
            .site_value(key.clone(), String::new())
            .await
            .expect("site_value")
            .is_empty()
    })
    .await;
    let armed_at = app
        .store
        .site_value(key.clone(), String::new())
        .await
        .expect("site_value");
    app.settle().await;
    assert_eq!(app.sink().count(), 0, "{:#?}", app.messages().await);

    app.advance(HOUR);
    app.wait_for_mails(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.settle().await;
    if let Some(other) = &other {
        other.settle().await;
    }
    assert_eq!(
        subjects(&app),
        [
            "Check-in for Ann at 2026-11-24T11:00:00.000Z",
            "Check-in for Bo at 2026-11-24T11:00:00.000Z"
        ],
        "one run per holder of o_pro, once though two schedulers saw the tick"
    );

    // A process that stored a tick's enrollments and died before recording the tick fires it
    // again when it comes back: each enrollment is stored once, so no one gets a second run.
    let fired_at = app
        .store
        .site_value(key.clone(), String::new())
        .await
        .expect("site_value");
    app.store
        .set_site_value(key.clone(), armed_at)
        .await
        .expect("set_site_value");
    let app = app.shutdown().await.restart().await;
    wait_for(
        "the restarted scheduler to fire the tick again",
        async || {
            app.store
                .site_value(key.clone(), String::new())
                .await
                .expect("site_value")
                == fired_at
        },
    )
    .await;
    app.settle().await;
    assert_eq!(
        app.runs().await.len(),
        2,
        "the tick fired again enrolled no one twice"
    );
    assert_eq!(app.sink().count(), 2);

    // Five hours down: the latest missed tick fires once, not five times.
    app.advance(5 * HOUR);
    app.wait_for_mails(4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.settle().await;
    if let Some(other) = &other {
        other.settle().await;
    }
    let runs = app.runs().await;
    assert_eq!(runs.len(), 4, "{runs:#?}");
    let later: Vec<String> = subjects(&app)
        .into_iter()
        .filter(|s| s.contains("16:00"))
        .collect();
    assert_eq!(later.len(), 2, "{:?}", subjects(&app));

    let (status, health) = app.health().await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["loops"]["scheduler"], "ok", "{health}");
}

/// A school enrolls every holder of an offer in a new onboarding whose email carries a sign-in
/// link: each of 300 gets one email with a working link, and enrolling again is refused for each
/// (`re_entry: false`).
async fn three_hundred_holders_enrolled_by_audience_get_one_sign_in_email_each(backend: Backend) {
    const WITH_LINK: &str = r#"
name: Onboarding with a link
trigger:
  event: lesson_completed
steps:
  - id: hello
    send_email:
      subject: "Your courses, {{contact.first_name}}"
      text: "Sign in: <<login_url>>"
"#;
    let opts = TestOptions::new(backend)
        .admin_token(ADMIN_TOKEN)
        .workflow("onboarding", WITH_LINK);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let grants: Vec<Value> = (0..300)
        .map(|i| offer_granted(contact(&format!("c_{i:03}"), "Ann"), "o_pro"))
        .collect();
    app.accept_batch(&grants).await;
    app.settle().await;

    let audience = json!({"audience": {"offers": ["o_pro"]}});
    let (status, answer) = app
        .admin_post_json(&enroll_path("onboarding"), &audience, &[])
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"].as_array().map(Vec::len), Some(300));
    let mails = app.wait_for_mails(300).await;
    app.settle().await;
    assert_eq!(app.sink().count(), 300);
    let mut recipients: Vec<String> = mails.iter().flat_map(|m| m.rcpt_to.clone()).collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(recipients.len(), 300, "one email per holder");
    assert!(
        mails
            .iter()
            .all(|m| m.parse().text.unwrap_or_default().contains("/l/")),
        "every email carries a sign-in link"
    );

    let (status, answer) = app
        .admin_post_json(&enroll_path("onboarding"), &audience, &[])
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], json!([]));
    let refused = answer["refused"].as_array().expect("refusals");
    assert_eq!(refused.len(), 300);
    assert!(
        refused.iter().all(|r| r["reason"] == "already_enrolled"),
        "{answer}"
    );
    app.settle().await;
    assert_eq!(app.sink().count(), 300, "nothing sent twice");
}
