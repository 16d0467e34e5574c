//! The admin API: the bearer token, messages and runs with their filters and cursor
//! pagination (stable under inserts), contact details with grants and opt-outs, workflow reload,
//! and JSON errors for every refusal.

use crate::helpers::*;
use crate::link_helpers::{ADMIN_TOKEN, T_GRANT, T_LATER, grant_offer, offer_with, remove_offer};
use crate::twilio_stub::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

both_backends!(
    admin_api_requires_the_bearer_token,
    messages_list_with_filters_and_fields,
    runs_list_with_filters_steps_and_versions,
    list_queries_are_validated_with_json_errors,
    cursor_pagination_is_stable_under_inserts,
    contact_details_grants_and_opt_outs,
    reload_reports_workflows_and_refuses_what_does_not_check,
);

const DAY: Duration = Duration::from_secs(86_400);

/// A GET with the admin token: status and JSON body.
async fn admin_get(app: &TestApp, path: &str) -> (u16, Value) {
    let r = app
        .client
        .get(app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("admin GET");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("GET {path} answered {status} with non-JSON ({e}): {text}"));
    (status, body)
}

/// A GET that must answer 200; its body.
async fn admin_ok(app: &TestApp, path: &str) -> Value {
    let (status, body) = admin_get(app, path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

async fn reload(app: &TestApp) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/v1/workflows/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("reload");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("reload answered {status} with non-JSON ({e}): {text}"));
    (status, body)
}

/// `field` of every listed item, as strings (`null` for null).
fn column(items: &Value, field: &str) -> Vec<String> {
    items
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {items}"))
        .iter()
        .map(|i| match &i[field] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn admin_api_requires_the_bearer_token(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend).admin()).await else {
        return;
    };
    app.accept(&new_signup(contact("c_auth", "Ann"))).await;
    app.settle().await;
    let endpoints: [(reqwest::Method, &str); 7] = [
        (reqwest::Method::GET, "/v1/messages"),
        (reqwest::Method::GET, "/v1/runs"),
        (reqwest::Method::GET, "/v1/contacts/c_auth"),
        (reqwest::Method::POST, "/v1/contacts/c_auth/magic-link"),
        (reqwest::Method::GET, "/v1/links/user"),
        (reqwest::Method::POST, "/v1/links/user/regenerate"),
        (reqwest::Method::POST, "/v1/workflows/reload"),
    ];
    let wrong: Vec<(&str, Option<String>)> = vec![
        ("no Authorization", None),
        ("an empty bearer", Some("Bearer ".into())),
        ("a wrong token", Some("Bearer adm_wrong".into())),
        (
            "the token with one character changed",
            Some(format!("Bearer {}x", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])),
        ),
        (
            "a prefix of the token",
            Some(format!("Bearer {}", &ADMIN_TOKEN[..10])),
        ),
        ("the token and more", Some(format!("Bearer {ADMIN_TOKEN}0"))),
        ("basic auth", Some(format!("Basic {ADMIN_TOKEN}"))),
        ("the bare token", Some(ADMIN_TOKEN.to_owned())),
    ];
    for (method, path) in &endpoints {
        for (what, header) in &wrong {
            let mut req = app.client.request(method.clone(), app.url(path));
            if let Some(h) = header {
                req = req.header("authorization", h);
            }
            let err = expect_error(req.send().await.unwrap(), 401).await;
            assert!(
                err["error"].is_string(),
                "{method} {path} with {what}: {err}"
            );
        }
        let ok = app
            .admin_request(method.clone(), path, Some(ADMIN_TOKEN))
            .await;
        assert!(
            ok.status().is_success(),
            "{method} {path} with the token: {}",
            ok.status()
        );
    }

    // Without HERALD_ADMIN_TOKEN the admin API is off, whatever is sent.
    let Some(off) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    for (method, path) in &endpoints {
        for header in [
            None,
            Some("Bearer "),
            Some(&*format!("Bearer {ADMIN_TOKEN}")),
        ] {
            let mut req = off.client.request(method.clone(), off.url(path));
            if let Some(h) = header {
                req = req.header("authorization", h);
            }
            expect_error(req.send().await.unwrap(), 401).await;
        }
    }
}

/// Sends at noon UTC only (the manual clock starts at 10:00), so its message stays queued.
const NOON_EMAIL: &str = r#"
name: Noon email
trigger:
  event: product_completed
send_window:
  days: [mon, tue, wed, thu, fri, sat, sun]
  between: ["12:00", "13:00"]
  timezone: UTC
steps:
  - id: congrats
    send_email:
      subject: "Congratulations"
      text: "Well done"
"#;

const WELCOME_EMAIL: &str = r#"
name: Welcome email
trigger:
  event: offer_access_granted
steps:
  - id: welcome
    send_email:
      subject: "Welcome, {{contact.first_name}}"
      text: "Hello"
"#;

const SIGNUP_SMS: &str = r#"
name: Signup text
trigger:
  event: new_signup
steps:
  - id: hello_text
    send_sms:
      body: "Hi {{contact.first_name}}"
"#;

async fn messages_list_with_filters_and_fields(backend: Backend) {
    let stub = TwilioStub::start().await;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .admin()
        .sms(stub.sender())
        .workflow("welcome", WELCOME_EMAIL)
        .workflow("texts", SIGNUP_SMS)
        .workflow("noon", NOON_EMAIL);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    // c_a: an email and an SMS, both sent.
    app.accept(&offer_granted(
        sms_contact("c_a", "Ann", "+15551250001"),
        "o_pro",
    ))
    .await;
    app.accept(&new_signup(sms_contact("c_a", "Ann", "+15551250001")))
        .await;
    // c_b: no email, the welcome is skipped.
    app.accept(&offer_granted(
        json!({"id": "c_b", "first_name": "Bob"}),
        "o_pro",
    ))
    .await;
    // c_c: the provider refuses the SMS with a 400.
    app.wait_for_status(2, herald_store::MessageStatus::Sent)
        .await;
    stub.reply_next(&[Reply::status(400)]);
    app.accept(&new_signup(sms_contact("c_c", "Cy", "+15551250003")))
        .await;
    // c_d: held until noon.
    app.accept(&product_completed(contact("c_d", "Di"), "p_rust101"))
        .await;
    // c_e: texted STOP before signing up, so the SMS is suppressed.
    app.accept(&event(
        "user_login",
        json!({"contact": sms_contact("c_e", "Eve", "+15551250005")}),
    ))
    .await;
    app.settle().await;
    app.text_in("+15551250005", "STOP").await;
    app.accept(&new_signup(sms_contact("c_e", "Eve", "+15551250005")))
        .await;
    app.settle().await;

    let all = admin_ok(&app, "/v1/messages").await;
    let messages = &all["messages"];
    assert_eq!(messages.as_array().unwrap().len(), 6, "{all:#}");
    assert_eq!(all["next_cursor"], Value::Null, "{all:#}");
    let fields = [
        "id",
        "run_id",
        "step_id",
        "workflow",
        "contact_id",
        "channel",
        "recipient",
        "subject",
        "status",
        "reason",
        "attempts",
        "message_id",
        "provider_id",
        "scheduled_for",
        "created_at",
        "updated_at",
        "sent_at",
    ];
    for m in messages.as_array().unwrap() {
        for f in fields {
            assert!(m.get(f).is_some(), "message without {f}: {m:#}");
        }
    }
    let ids = column(messages, "id");
    assert_eq!(ids, sorted(ids.clone()), "listed in id order");

    let by_status = async |status: &str| {
        let body = admin_ok(&app, &format!("/v1/messages?status={status}")).await;
        let list = body["messages"].clone();
        assert!(
            column(&list, "status").iter().all(|s| s == status),
            "{body:#}"
        );
        list
    };
    let sent = by_status("sent").await;
    assert_eq!(sorted(column(&sent, "contact_id")), ["c_a", "c_a"]);
    let skipped = by_status("skipped").await;
    assert_eq!(column(&skipped, "contact_id"), ["c_b"]);
    assert!(
        skipped[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("email")),
        "{skipped:#}"
    );
    let failed = by_status("failed").await;
    assert_eq!(column(&failed, "contact_id"), ["c_c"]);
    assert_eq!(failed[0]["attempts"], 1);
    assert!(
        failed[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("400")),
        "{failed:#}"
    );
    let queued = by_status("queued").await;
    assert_eq!(column(&queued, "contact_id"), ["c_d"]);
    assert_eq!(
        queued[0]["scheduled_for"],
        json!(rfc3339_ms(START_MS + 2 * 3_600_000)),
        "a held send shows when it will go: {queued:#}"
    );
    assert_eq!(queued[0]["sent_at"], Value::Null);
    let suppressed = by_status("suppressed").await;
    assert_eq!(column(&suppressed, "contact_id"), ["c_e"]);
    assert!(
        suppressed[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("opted out")),
        "{suppressed:#}"
    );

    let mine = admin_ok(&app, "/v1/messages?contact_id=c_a").await["messages"].clone();
    assert_eq!(column(&mine, "contact_id"), ["c_a", "c_a"]);
    let texts = admin_ok(&app, "/v1/messages?workflow=texts").await["messages"].clone();
    assert_eq!(sorted(column(&texts, "contact_id")), ["c_a", "c_c", "c_e"]);
    assert!(column(&texts, "channel").iter().all(|c| c == "sms"));

    // Filters combine.
    let sms_sent = admin_ok(
        &app,
        "/v1/messages?workflow=texts&status=sent&contact_id=c_a",
    )
    .await;
    let sms = &sms_sent["messages"][0];
    assert_eq!(sms_sent["messages"].as_array().unwrap().len(), 1);
    let delivered = stub.delivered();
    let sid = delivered
        .iter()
        .find(|r| r.to.as_deref() == Some("+15551250001"))
        .and_then(|r| r.sid.clone())
        .unwrap();
    assert_eq!(sms["provider_id"], json!(sid));
    assert_eq!(sms["channel"], "sms");
    assert_eq!(sms["recipient"], "+15551250001");
    assert_eq!(sms["workflow"], "texts");
    assert_eq!(sms["step_id"], "hello_text");
    assert_eq!(sms["status"], "sent");
    assert_eq!(sms["attempts"], 1);
    assert_eq!(sms["sent_at"], json!(rfc3339_ms(START_MS)));
    assert_eq!(sms["created_at"], json!(rfc3339_ms(START_MS)));
    assert_eq!(sms["scheduled_for"], Value::Null);
    let email =
        admin_ok(&app, "/v1/messages?workflow=welcome&contact_id=c_a").await["messages"][0].clone();
    assert_eq!(email["subject"], "Welcome, Ann");
    assert_eq!(email["channel"], "email");
    assert_eq!(email["recipient"], "c_a@example.com");
    let received = app.sink().received();
    assert_eq!(
        email["message_id"],
        json!(received[0].message_id()),
        "the stored Message-ID is the one sent"
    );
    let runs = admin_ok(&app, "/v1/runs?contact_id=c_a&workflow=welcome").await;
    assert_eq!(email["run_id"], runs["runs"][0]["id"], "{runs:#}");

    // Nothing matches: an empty list.
    let none = admin_ok(&app, "/v1/messages?contact_id=c_nobody").await;
    assert_eq!(none, json!({"messages": [], "next_cursor": null}));
    let none = admin_ok(&app, "/v1/messages?workflow=texts&status=queued").await;
    assert_eq!(none["messages"], json!([]));
}

const COURSE: &str = r#"
name: Course
trigger:
  event: new_signup
steps:
  - id: hello
    send_email:
      subject: "Welcome"
      text: "Hi"
  - id: pause
    wait: 1d
  - id: later
    send_email:
      subject: "A day later"
      text: "Still there?"
"#;

async fn runs_list_with_filters_steps_and_versions(backend: Backend) {
    let opts = TestOptions::new(backend)
        .manual_clock()
        .admin()
        .workflow("course", COURSE)
        .workflow("welcome", WELCOME_EMAIL);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let (status, loaded) = reload(&app).await;
    assert_eq!(status, 200, "{loaded}");
    let version_of = |body: &Value, id: &str| {
        body["workflows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in {body}"))["version"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let v1 = version_of(&loaded, "course");

    app.accept(&new_signup(contact("c_r1", "Ann"))).await;
    app.wait_for_mails(1).await;
    app.settle().await;
    app.advance(DAY);
    app.wait_for_mails(2).await;
    app.settle().await;
    app.accept(&new_signup(contact("c_r2", "Bob"))).await;
    app.accept(&offer_granted(contact("c_r2", "Bob"), "o_pro"))
        .await;
    app.wait_for_mails(4).await;
    app.settle().await;

    let all = admin_ok(&app, "/v1/runs").await;
    let runs = all["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "{all:#}");
    assert_eq!(all["next_cursor"], Value::Null);
    for r in runs {
        for f in [
            "id",
            "workflow",
            "workflow_version",
            "contact_id",
            "state",
            "reason",
            "steps",
        ] {
            assert!(r.get(f).is_some(), "run without {f}: {r:#}");
        }
    }
    let r1 = admin_ok(&app, "/v1/runs?contact_id=c_r1").await["runs"].clone();
    assert_eq!(r1.as_array().unwrap().len(), 1);
    let r1 = &r1[0];
    assert_eq!(r1["workflow"], "course");
    assert_eq!(r1["workflow_version"], json!(v1));
    assert_eq!(r1["state"], "completed");
    let steps = r1["steps"].as_array().unwrap();
    let seen: Vec<(String, String)> = steps
        .iter()
        .map(|s| {
            (
                s["step_id"].as_str().unwrap().to_owned(),
                s["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("hello".to_owned(), "send_email".to_owned()),
            ("pause".to_owned(), "wait".to_owned()),
            ("later".to_owned(), "send_email".to_owned()),
        ],
        "{r1:#}"
    );
    for s in steps {
        assert!(s["outcome"].as_str().is_some_and(|o| !o.is_empty()), "{s}");
    }
    assert_eq!(steps[0]["at"], json!(rfc3339_ms(START_MS)));
    assert_eq!(steps[2]["at"], json!(rfc3339_ms(START_MS + 86_400_000)));

    let active = admin_ok(&app, "/v1/runs?state=active").await["runs"].clone();
    assert_eq!(column(&active, "contact_id"), ["c_r2"], "{all:#}");
    assert_eq!(column(&active, "workflow"), ["course"]);
    let completed = admin_ok(&app, "/v1/runs?state=completed").await["runs"].clone();
    assert_eq!(sorted(column(&completed, "contact_id")), ["c_r1", "c_r2"]);
    let welcome = admin_ok(&app, "/v1/runs?workflow=welcome").await["runs"].clone();
    assert_eq!(column(&welcome, "contact_id"), ["c_r2"]);
    let both = admin_ok(
        &app,
        "/v1/runs?workflow=course&state=completed&contact_id=c_r1",
    )
    .await;
    assert_eq!(both["runs"].as_array().unwrap().len(), 1);
    for state in ["waiting_event", "parked", "exited", "failed", "refused"] {
        let none = admin_ok(&app, &format!("/v1/runs?state={state}")).await;
        assert_eq!(none["runs"], json!([]), "{state}");
    }

    // A new version: new runs use it, the waiting run stays on its own.
    std::fs::write(
        app.env.workflows.join("course.yaml"),
        COURSE.replace("A day later", "One day on"),
    )
    .unwrap();
    let (status, loaded) = reload(&app).await;
    assert_eq!(status, 200, "{loaded}");
    let v2 = version_of(&loaded, "course");
    assert_ne!(v1, v2, "an edited workflow has a new version");
    app.accept(&new_signup(contact("c_r3", "Cy"))).await;
    app.wait_for_mails(5).await;
    app.settle().await;
    let versions = |body: Value| {
        body["runs"][0]["workflow_version"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        versions(admin_ok(&app, "/v1/runs?contact_id=c_r3&workflow=course").await),
        v2
    );
    assert_eq!(
        versions(admin_ok(&app, "/v1/runs?contact_id=c_r2&workflow=course").await),
        v1,
        "a live run stays pinned to its version"
    );
    app.advance(DAY);
    let mails = app.wait_for_mails(7).await;
    let later: BTreeSet<(String, String)> = mails[5..]
        .iter()
        .map(|m| (m.rcpt_to[0].clone(), m.parse().subject))
        .collect();
    assert_eq!(
        later,
        BTreeSet::from([
            ("c_r2@example.com".to_owned(), "A day later".to_owned()),
            ("c_r3@example.com".to_owned(), "One day on".to_owned()),
        ])
    );
}

async fn list_queries_are_validated_with_json_errors(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend).admin()).await else {
        return;
    };
    let bad = [
        "/v1/messages?status=delivered",
        "/v1/messages?status=SENT",
        "/v1/runs?state=running",
        "/v1/messages?limit=0",
        "/v1/messages?limit=501",
        "/v1/runs?limit=-1",
        "/v1/messages?limit=ten",
        "/v1/runs?limit=",
        "/v1/messages?contact=c_1",
        "/v1/runs?page=2",
        "/v1/messages?cursor=abc",
    ];
    let mut problems = Vec::new();
    for path in bad {
        let r = app
            .client
            .get(app.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let json_error = serde_json::from_str::<Value>(&text)
            .ok()
            .is_some_and(|b| b["error"].as_str().is_some_and(|e| !e.is_empty()));
        if status != 400 || !json_error {
            problems.push(format!("{path}: {status} {text:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "expected 400 with a JSON error for each:\n{}",
        problems.join("\n")
    );
    // The edges of the limit are fine.
    for path in ["/v1/messages?limit=1", "/v1/runs?limit=500"] {
        admin_ok(&app, path).await;
    }
    // An unknown contact: 404 with a JSON error.
    let (status, body) = admin_get(&app, "/v1/contacts/c_nobody").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].is_string(), "{body}");
}

/// Walks every page of `path` (which has its own `?`) with `limit`, from `after`; the ids in
/// order.
async fn walk_from(
    app: &TestApp,
    path: &str,
    key: &str,
    limit: usize,
    mut after: Option<String>,
) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..100 {
        let page_path = match &after {
            Some(a) => format!("{path}&limit={limit}&after={a}"),
            None => format!("{path}&limit={limit}"),
        };
        let body = admin_ok(app, &page_path).await;
        let items = column(&body[key], "id");
        assert!(items.len() <= limit, "{page_path}: more than the limit");
        ids.extend(items);
        match &body["next_cursor"] {
            Value::Null => return ids,
            Value::String(c) => after = Some(c.clone()),
            other => panic!("next_cursor is {other}"),
        }
    }
    panic!("pagination of {path} did not end");
}

async fn walk(app: &TestApp, path: &str, key: &str, limit: usize) -> Vec<String> {
    walk_from(app, path, key, limit, None).await
}

async fn cursor_pagination_is_stable_under_inserts(backend: Backend) {
    let opts = TestOptions::new(backend)
        .manual_clock()
        .admin()
        .workflow("signup", &one_email_workflow("new_signup", "Hi", false));
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    for i in 0..5 {
        app.accept(&new_signup(contact(&format!("c_page{i}"), "Ann")))
            .await;
    }
    app.wait_for_mails(5).await;
    app.settle().await;

    for (path, key) in [("/v1/messages?", "messages"), ("/v1/runs?", "runs")] {
        let before = app.messages().await.len() + app.runs().await.len();
        let first = admin_ok(&app, &format!("{path}limit=2")).await;
        let page1 = column(&first[key], "id");
        assert_eq!(page1.len(), 2, "{first:#}");
        let cursor = first["next_cursor"]
            .as_str()
            .unwrap_or_else(|| panic!("a full page has a next_cursor: {first:#}"))
            .to_owned();
        assert_eq!(cursor, page1[1], "the cursor is the last id of the page");

        // Inserts between pages.
        for i in 0..3 {
            app.accept(&new_signup(contact(&format!("c_{key}_late{i}"), "Bob")))
                .await;
        }
        app.settle().await;
        assert_eq!(
            app.messages().await.len() + app.runs().await.len(),
            before + 6
        );

        let mut seen = page1.clone();
        let rest = walk_from(&app, path, key, 2, Some(cursor)).await;
        seen.extend(rest);
        let expected: Vec<String> = if key == "messages" {
            app.messages()
                .await
                .into_iter()
                .map(|m| m.id.into())
                .collect()
        } else {
            app.runs().await.into_iter().map(|r| r.id.into()).collect()
        };
        let unique: BTreeSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "{key}: duplicates across pages");
        assert_eq!(
            seen, expected,
            "{key}: pages after inserts must continue without gaps or duplicates"
        );
    }

    // Pagination with a filter.
    let sent = walk(&app, "/v1/messages?status=sent", "messages", 3).await;
    assert_eq!(sent.len(), 11);
    let one = walk(&app, "/v1/runs?contact_id=c_page3", "runs", 1).await;
    assert_eq!(one.len(), 1);
}

async fn contact_details_grants_and_opt_outs(backend: Backend) {
    let stub = TwilioStub::start().await;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .admin()
        .sms(stub.sender())
        .workflow("welcome", WELCOME_EMAIL);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let mut c = sms_contact("c_full", "Ann", "+15551250101");
    c["last_name"] = json!("Lee");
    c["timezone"] = json!("Europe/Berlin");
    c["custom_fields"] = json!({"company": "Acme"});
    app.accept_batch(&[
        grant_offer(
            c.clone(),
            offer_with("o_pro", "Rust Pro", &["p_rust101"]),
            T_GRANT,
        ),
        grant_offer(
            c.clone(),
            offer_with("o_old", "Old offer", &["p_old"]),
            T_GRANT,
        ),
        at(
            event(
                "product_access_granted",
                json!({"contact": c.clone(), "product": product("p_async", "Async Rust")}),
            ),
            T_GRANT,
        ),
        remove_offer(
            c.clone(),
            offer_with("o_old", "Old offer", &["p_old"]),
            T_LATER,
        ),
    ])
    .await;
    let mails = app.wait_for_mails(1).await;
    app.settle().await;

    let body = admin_ok(&app, "/v1/contacts/c_full").await;
    assert_eq!(body["id"], "c_full");
    assert_eq!(body["email"], "c_full@example.com");
    assert_eq!(body["phone"], "+15551250101");
    assert_eq!(body["first_name"], "Ann");
    assert_eq!(body["last_name"], "Lee");
    assert_eq!(body["timezone"], "Europe/Berlin");
    assert_eq!(body["custom_fields"], json!({"company": "Acme"}));
    let grants: BTreeSet<(String, String)> = body["grants"]
        .as_array()
        .unwrap_or_else(|| panic!("no grants list: {body:#}"))
        .iter()
        .map(|g| {
            (
                g["kind"].as_str().unwrap_or_default().to_owned(),
                g["id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        grants,
        BTreeSet::from([
            ("offer".to_owned(), "o_pro".to_owned()),
            ("product".to_owned(), "p_async".to_owned()),
        ]),
        "active grants only: {body:#}"
    );
    assert_eq!(body["opt_outs"], json!([]));

    // STOP by SMS, then the email unsubscribe link.
    app.text_in("+15551250101", "STOP").await;
    let body = admin_ok(&app, "/v1/contacts/c_full").await;
    assert_eq!(column(&body["opt_outs"], "channel"), ["sms"], "{body:#}");
    let unsubscribe = mails[0].parse();
    let url = unsubscribe
        .header("List-Unsubscribe")
        .unwrap()
        .trim_matches(['<', '>'])
        .to_owned();
    let r = app
        .client
        .post(app.url(url.strip_prefix(PUBLIC_URL).unwrap()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = admin_ok(&app, "/v1/contacts/c_full").await;
    assert_eq!(
        sorted(column(&body["opt_outs"], "channel")),
        ["email", "sms"],
        "{body:#}"
    );
    // START lifts the SMS opt-out only.
    app.text_in("+15551250101", "START").await;
    let body = admin_ok(&app, "/v1/contacts/c_full").await;
    assert_eq!(column(&body["opt_outs"], "channel"), ["email"], "{body:#}");

    let (status, err) = admin_get(&app, "/v1/contacts/c_unknown").await;
    assert_eq!(status, 404, "{err}");
    assert!(err["error"].is_string(), "{err}");
}

async fn reload_reports_workflows_and_refuses_what_does_not_check(backend: Backend) {
    let opts = TestOptions::new(backend).manual_clock().admin().workflow(
        "signup",
        &one_email_workflow("new_signup", "Original", false),
    );
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let (status, body) = reload(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["warnings"], json!([]), "{body}");
    let listed = body["workflows"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{body}");
    assert_eq!(listed[0]["id"], "signup");
    assert_eq!(listed[0]["enabled"], true);
    let v1 = listed[0]["version"].as_str().unwrap().to_owned();
    assert!(!v1.is_empty());
    // Unchanged files: the same version.
    let (_, again) = reload(&app).await;
    assert_eq!(again["workflows"][0]["version"], json!(v1));

    // A draft and a workflow with a warning (a login link after access was removed).
    std::fs::write(
        app.env.workflows.join("draft.yaml"),
        one_email_workflow("lesson_completed", "Draft", false)
            .replace("name: One email\n", "name: One email\nenabled: false\n"),
    )
    .unwrap();
    std::fs::write(
        app.env.workflows.join("removed.yaml"),
        "name: Removed\ntrigger:\n  event: offer_access_removed\nsteps:\n  - send_email:\n      subject: \"Come back\"\n      text: \"<<login_url>>\"\n",
    )
    .unwrap();
    let (status, body) = reload(&app).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<(String, bool)> = body["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["id"].as_str().unwrap().to_owned(),
                w["enabled"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [
            ("draft".to_owned(), false),
            ("removed".to_owned(), true),
            ("signup".to_owned(), true),
        ]
    );
    let warnings = body["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w.to_string().contains("removed")),
        "the login_url warning should be reported: {body:#}"
    );

    // A file that does not check: 422 with diagnostics, the running set stays. The broken file
    // goes first: on PostgreSQL this process also hears its own last reload announced and
    // re-reads the folder, and a re-read between the two writes must not find the changed file
    // alone (it checks, and would go live).
    std::fs::write(
        app.env.workflows.join("broken.yaml"),
        "name: Broken\ntrigger:\n  event: new_signup\nsteps:\n  - launch_rocket: {}\n",
    )
    .unwrap();
    std::fs::write(
        app.env.workflows.join("signup.yaml"),
        one_email_workflow("new_signup", "Changed", false),
    )
    .unwrap();
    let (status, body) = reload(&app).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].is_string(), "{body}");
    let diagnostics = body["diagnostics"]
        .as_array()
        .unwrap_or_else(|| panic!("no diagnostics list: {body:#}"));
    assert!(!diagnostics.is_empty());
    let d = diagnostics
        .iter()
        .find(|d| {
            d["file"]
                .as_str()
                .is_some_and(|f| f.ends_with("broken.yaml"))
        })
        .unwrap_or_else(|| panic!("no diagnostic names broken.yaml: {body:#}"));
    assert_eq!(d["line"], 5, "{d}");
    assert!(d["column"].as_u64().is_some_and(|c| c > 0), "{d}");
    assert!(d["message"].as_str().is_some_and(|m| !m.is_empty()), "{d}");

    app.accept(&new_signup(contact("c_old", "Ann"))).await;
    let mails = app.wait_for_mails(1).await;
    assert_eq!(mails[0].parse().subject, "Original");
    app.settle().await;
    let runs = admin_ok(&app, "/v1/runs?contact_id=c_old").await;
    assert_eq!(column(&runs["runs"], "workflow"), ["signup"], "{runs:#}");
    assert_eq!(runs["runs"][0]["workflow_version"], json!(v1));

    std::fs::remove_file(app.env.workflows.join("broken.yaml")).unwrap();
    let (status, body) = reload(&app).await;
    assert_eq!(status, 200, "{body}");
    app.accept(&new_signup(contact("c_new", "Bob"))).await;
    let mails = app.wait_for_mails(2).await;
    assert_eq!(mails[1].parse().subject, "Changed");
}
