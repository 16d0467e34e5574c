//! `POST /v1/events`: signatures, validation, deduplication, limits, and the membership
//! projection the events feed.

use crate::helpers::*;
use herald_core::signature::WebhookSecret;
use serde_json::{Value, json};

/// Test vector V1 published with the Standard Webhooks specification.
const V1_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const V1_MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const V1_TIMESTAMP: i64 = 1614265330;
const V1_PAYLOAD: &str = r#"{"test": 2432232314}"#;
const V1_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
const V1_NEGATIVE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=";
const DECOY: &str = "Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";

both_backends!(
    single_event_is_accepted_and_projected,
    batch_reports_status_per_event,
    duplicate_event_has_no_further_effect,
    concurrent_duplicates_are_stored_once,
    unsigned_or_wrongly_signed_requests_get_401_and_change_nothing,
    timestamp_tolerance_is_five_minutes,
    published_vector_is_refused_as_a_foreign_secret,
    one_valid_signature_among_several_passes,
    malformed_json_gets_400,
    missing_required_field_names_index_and_field,
    unknown_type_gets_400,
    wrong_field_type_gets_400,
    bad_event_in_a_batch_rejects_the_whole_batch,
    control_character_in_any_field_gets_400_and_later_events_flow,
    control_character_in_a_batch_refuses_all_of_it,
    oversized_body_gets_413,
    unsigned_or_stale_requests_are_refused_before_their_body_is_read,
    requests_over_the_in_flight_limit_get_503_with_retry_after,
    wrong_content_type_gets_415,
    invalid_phone_does_not_invalidate_the_event,
    grants_follow_event_time,
    contact_latest_details_win,
);

async fn single_event_is_accepted_and_projected(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let ev = offer_granted(contact("c_single", "Ann"), "o_pro");
    let response = app.post_event(&ev).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"events": [{"id": ev["id"], "source": SOURCE, "status": "new"}]})
    );

    // `application/json` is the same as `application/cloudevents+json`.
    let ev2 = new_signup(contact("c_single_json", "Bob"));
    let statuses = expect_202(
        app.post_signed(
            serde_json::to_vec(&ev2).unwrap(),
            "application/json; charset=utf-8",
        )
        .await,
    )
    .await;
    assert_eq!(statuses, ["new"]);

    app.settle().await;
    let c = app
        .store
        .contact("c_single".into())
        .await
        .unwrap()
        .expect("contact projected");
    assert_eq!(c.email.as_deref(), Some("c_single@example.com"));
    assert_eq!(c.first_name.as_deref(), Some("Ann"));
    let grants = app.store.grants("c_single".into()).await.unwrap();
    assert!(
        grants
            .iter()
            .any(|g| g.kind == "offer" && g.item_id == "o_pro" && g.active),
        "{grants:?}"
    );
    assert!(
        app.store
            .contact("c_single_json".into())
            .await
            .unwrap()
            .is_some()
    );
}

async fn batch_reports_status_per_event(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let e1 = new_signup(contact("c_b1", "A"));
    let e2 = new_signup(contact("c_b2", "B"));
    let e3 = new_signup(contact("c_b3", "C"));
    assert_eq!(app.accept(&e1).await, "new");

    let response = app
        .post_batch(&[e2.clone(), e1.clone(), e3.clone(), e2.clone()])
        .await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    let listed = body["events"].as_array().unwrap();
    let got: Vec<(&str, &str)> = listed
        .iter()
        .map(|e| (e["id"].as_str().unwrap(), e["status"].as_str().unwrap()))
        .collect();
    let id = |e: &Value| e["id"].as_str().unwrap().to_owned();
    assert_eq!(
        got,
        [
            (id(&e2).as_str(), "new"),
            (id(&e1).as_str(), "duplicate"),
            (id(&e3).as_str(), "new"),
            (id(&e2).as_str(), "duplicate")
        ]
    );
    assert!(listed.iter().all(|e| e["source"] == SOURCE));

    // The same id from another source is another event.
    let mut other = e3.clone();
    other["source"] = json!("https://other-school.example.com");
    assert_eq!(app.accept(&other).await, "new");
}

async fn duplicate_event_has_no_further_effect(backend: Backend) {
    let opts = TestOptions::new(backend).workflow(
        "lesson",
        &one_email_workflow("lesson_completed", "Lesson done", true),
    );
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let ev = lesson_completed(contact("c_dup", "Ann"), "p_rust101", "Ownership");
    assert_eq!(app.accept(&ev).await, "new");
    app.wait_for_mails(1).await;

    // Posted again, alone and inside a batch: success, no further effect.
    assert_eq!(app.accept(&ev).await, "duplicate");
    let other = lesson_completed(contact("c_dup_other", "Bob"), "p_rust101", "Borrowing");
    assert_eq!(
        app.accept_batch(&[ev.clone(), other]).await,
        ["duplicate", "new"]
    );
    app.wait_for_mails(2).await;
    app.settle().await;

    assert_eq!(
        app.runs_of("c_dup").await.len(),
        1,
        "a duplicate started a second run"
    );
    assert_eq!(
        app.messages_of("c_dup").await.len(),
        1,
        "a duplicate queued a second message"
    );
    let to_dup = app
        .sink()
        .received()
        .iter()
        .filter(|m| m.rcpt_to == ["c_dup@example.com"])
        .count();
    assert_eq!(to_dup, 1, "a duplicate sent a second email");
    assert_eq!(app.sink().count(), 2);
}

async fn concurrent_duplicates_are_stored_once(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let events: Vec<Value> = (0..20)
        .map(|i| new_signup(contact(&format!("c_conc_{i}"), "Ann")))
        .collect();
    // Every event posted twice, all 40 requests at once.
    let posts = events
        .iter()
        .chain(events.iter())
        .map(|e| app.post_event(e));
    let answers = futures::future::join_all(posts).await;
    let mut new_ids = Vec::new();
    let mut duplicates = 0;
    for response in answers {
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        match body["events"][0]["status"].as_str().unwrap() {
            "new" => new_ids.push(body["events"][0]["id"].as_str().unwrap().to_owned()),
            "duplicate" => duplicates += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    new_ids.sort();
    let mut expected: Vec<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    expected.sort();
    assert_eq!(new_ids, expected, "each event must be new exactly once");
    assert_eq!(duplicates, 20);
}

/// The body every refused request carries: were it accepted, contact `c_forged` would exist.
fn forged_body() -> Vec<u8> {
    serde_json::to_vec(&new_signup(contact("c_forged", "Mallory"))).unwrap()
}

async fn unsigned_or_wrongly_signed_requests_get_401_and_change_nothing(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let body = forged_body();
    let good = app.signature_headers(&body);
    let (id, ts, sig) = (good[0].1.clone(), good[1].1.clone(), good[2].1.clone());
    let ct = ("content-type", CLOUDEVENT.to_owned());
    let wrong_secret = WebhookSecret::parse(V1_SECRET).unwrap();
    let now = app.clock.now_utc().timestamp();
    let tampered_sig = secret().sign(&id, now, b"{\"something\": \"else\"}");

    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("unsigned", vec![ct.clone()]),
        (
            "missing webhook-id",
            vec![
                ct.clone(),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", sig.clone()),
            ],
        ),
        (
            "missing webhook-timestamp",
            vec![
                ct.clone(),
                ("webhook-id", id.clone()),
                ("webhook-signature", sig.clone()),
            ],
        ),
        (
            "missing webhook-signature",
            vec![
                ct.clone(),
                ("webhook-id", id.clone()),
                ("webhook-timestamp", ts.clone()),
            ],
        ),
        (
            "signed with another secret",
            vec![
                ct.clone(),
                ("webhook-id", id.clone()),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", wrong_secret.sign(&id, now, &body)),
            ],
        ),
        (
            "signature of another body",
            vec![
                ct.clone(),
                ("webhook-id", id.clone()),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", tampered_sig),
            ],
        ),
        (
            "signature for another webhook-id",
            vec![
                ct.clone(),
                ("webhook-id", "msg_other".into()),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", sig.clone()),
            ],
        ),
        (
            "just v1,",
            vec![
                ct.clone(),
                ("webhook-id", id.clone()),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", "v1,".into()),
            ],
        ),
        (
            "first 8 characters of a valid signature",
            vec![
                ct.clone(),
                ("webhook-id", id.clone()),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", sig[..8].into()),
            ],
        ),
        (
            "timestamp hello",
            vec![
                ct.clone(),
                ("webhook-id", id.clone()),
                ("webhook-timestamp", "hello".into()),
                ("webhook-signature", sig.clone()),
            ],
        ),
        (
            "v2 scheme only",
            vec![
                ct.clone(),
                ("webhook-id", id.clone()),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", sig.replacen("v1,", "v2,", 1)),
            ],
        ),
    ];
    for (what, headers) in cases {
        let response = app.post_raw(body.clone(), &headers).await;
        let err = expect_error(response, 401).await;
        assert!(
            !err.to_string().contains(&secret().to_whsec()),
            "{what}: the secret leaked into {err}"
        );
    }
    // The correctly signed request really was acceptable: it was the signatures that failed.
    let mut ok = good.clone();
    ok.push(ct);
    app.settle().await;
    assert!(
        app.store
            .contact("c_forged".into())
            .await
            .unwrap()
            .is_none(),
        "a refused request changed state"
    );
    assert_eq!(app.runs().await.len(), 0);
    app.assert_healthy().await;
    let statuses = expect_202(app.post_raw(body, &ok).await).await;
    assert_eq!(statuses, ["new"]);
}

async fn timestamp_tolerance_is_five_minutes(backend: Backend) {
    // A manual clock: on the system clock a second could tick over between signing and the
    // server's check, and a timestamp 301 s ahead then passed as 300 s ahead.
    let Some(app) = spawn_app(TestOptions::new(backend).manual_clock()).await else {
        return;
    };
    let body = forged_body();
    let now = app.clock.now_utc().timestamp();
    let post_at = |ts: i64| {
        let body = body.clone();
        let app = &app;
        async move {
            let id = format!("msg_ts_{ts}");
            let headers = [
                ("content-type", CLOUDEVENT.to_owned()),
                ("webhook-id", id.clone()),
                ("webhook-timestamp", ts.to_string()),
                ("webhook-signature", secret().sign(&id, ts, &body)),
            ];
            app.post_raw(body, &headers).await
        }
    };
    expect_error(post_at(now - 301).await, 401).await;
    expect_error(post_at(now + 301).await, 401).await;
    expect_error(post_at(now - 3600).await, 401).await;
    app.settle().await;
    assert!(
        app.store
            .contact("c_forged".into())
            .await
            .unwrap()
            .is_none()
    );
    // Within five minutes either way, to the second: accepted (the second is the same event:
    // duplicate).
    assert_eq!(expect_202(post_at(now - 300).await).await, ["new"]);
    assert_eq!(expect_202(post_at(now + 300).await).await, ["duplicate"]);
    app.assert_healthy().await;
}

async fn published_vector_is_refused_as_a_foreign_secret(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    // Our signer reproduces the published vector, so the harness signs like any platform would.
    let v1 = WebhookSecret::parse(V1_SECRET).unwrap();
    assert_eq!(
        v1.sign(V1_MSG_ID, V1_TIMESTAMP, V1_PAYLOAD.as_bytes()),
        V1_SIGNATURE
    );

    // The vector request verbatim: years old and signed with a secret herald does not hold.
    for signature in [V1_SIGNATURE, V1_NEGATIVE] {
        let headers = [
            ("content-type", CLOUDEVENT.to_owned()),
            ("webhook-id", V1_MSG_ID.to_owned()),
            ("webhook-timestamp", V1_TIMESTAMP.to_string()),
            ("webhook-signature", signature.to_owned()),
        ];
        expect_error(app.post_raw(V1_PAYLOAD, &headers).await, 401).await;
    }
    // A fresh timestamp and a valid event, still under the vector's secret: refused.
    let body = forged_body();
    let now = app.clock.now_utc().timestamp();
    let headers = [
        ("content-type", CLOUDEVENT.to_owned()),
        ("webhook-id", V1_MSG_ID.to_owned()),
        ("webhook-timestamp", now.to_string()),
        ("webhook-signature", v1.sign(V1_MSG_ID, now, &body)),
    ];
    expect_error(app.post_raw(body, &headers).await, 401).await;
    app.settle().await;
    assert!(
        app.store
            .contact("c_forged".into())
            .await
            .unwrap()
            .is_none()
    );
    app.assert_healthy().await;
}

async fn one_valid_signature_among_several_passes(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let ev = new_signup(contact("c_multi", "Ann"));
    let body = serde_json::to_vec(&ev).unwrap();
    let headers = app.signature_headers(&body);
    let valid = headers[2].1.clone();
    let with = |sig: String| {
        let mut h = headers.clone();
        h[2].1 = sig;
        h.push(("content-type", CLOUDEVENT.to_owned()));
        h
    };
    let without_valid = format!("v1,{DECOY} v2,{DECOY} v1,{DECOY}");
    expect_error(app.post_raw(body.clone(), &with(without_valid)).await, 401).await;
    let with_valid = format!("v1,{DECOY} v2,{DECOY} {valid} v1,{DECOY}");
    assert_eq!(
        expect_202(app.post_raw(body, &with(with_valid)).await).await,
        ["new"]
    );
}

async fn malformed_json_gets_400(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let deep = "[".repeat(100_000);
    let bodies: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated JSON",
            br#"{"specversion": "1.0", "id": "#.to_vec(),
            CLOUDEVENT,
        ),
        ("not JSON at all", b"hello".to_vec(), CLOUDEVENT),
        ("empty body", Vec::new(), CLOUDEVENT),
        ("invalid UTF-8", vec![0xff, 0xfe, 0x7b, 0x7d], CLOUDEVENT),
        ("deeply nested", deep.into_bytes(), CLOUDEVENT),
        (
            "an array sent as a single event",
            b"[]".to_vec(),
            CLOUDEVENT,
        ),
        (
            "an object sent as a batch",
            serde_json::to_vec(&new_signup(contact("c_x", "X"))).unwrap(),
            CLOUDEVENT_BATCH,
        ),
        ("an empty batch", b"[]".to_vec(), CLOUDEVENT_BATCH),
        ("a number", b"42".to_vec(), CLOUDEVENT),
    ];
    for (what, body, ct) in bodies {
        let response = app.post_signed(body, ct).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 400, "{what}: {text}");
        let err: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
        assert!(err["error"].is_string(), "{what}: {err}");
    }
    // Too many events in one batch.
    let many: Vec<Value> = (0..1001)
        .map(|i| new_signup(json!({"id": format!("c_many_{i}")})))
        .collect();
    expect_error(app.post_batch(&many).await, 400).await;
    app.settle().await;
    assert!(app.store.contact("c_x".into()).await.unwrap().is_none());
    assert!(
        app.store
            .contact("c_many_0".into())
            .await
            .unwrap()
            .is_none()
    );
    app.assert_healthy().await;
}

async fn missing_required_field_names_index_and_field(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let full = lesson_completed(contact("c_missing", "Ann"), "p_rust101", "Ownership");
    let without = |path: &[&str]| {
        let mut ev = full.clone();
        let (last, parents) = path.split_last().unwrap();
        let mut at = &mut ev;
        for p in parents {
            at = &mut at[*p];
        }
        at.as_object_mut().unwrap().remove(*last);
        ev
    };
    let cases: Vec<(Value, &str)> = vec![
        (without(&["data", "lesson"]), "data.lesson"),
        (without(&["data", "product"]), "data.product"),
        (without(&["data", "contact"]), "data.contact"),
        (without(&["data", "contact", "id"]), "data.contact.id"),
        (without(&["data", "lesson", "id"]), "data.lesson.id"),
        (without(&["data"]), "data"),
        (without(&["id"]), "id"),
        (without(&["source"]), "source"),
        (without(&["type"]), "type"),
        (without(&["specversion"]), "specversion"),
        (
            offer_granted(contact("c_missing", "Ann"), "o_pro")
                .tap(|e| e["data"].as_object_mut().unwrap().remove("offer")),
            "data.offer",
        ),
    ];
    for (ev, field) in cases {
        let err = expect_error(app.post_event(&ev).await, 400).await;
        assert_eq!(err["index"], 0, "{field}: {err}");
        assert_eq!(err["field"], field, "{err}");
    }
    // The category of a lesson event is optional.
    assert_eq!(app.accept(&without(&["data", "category"])).await, "new");
    app.assert_healthy().await;
}

async fn unknown_type_gets_400(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    for ty in [
        "course.lesson_exploded",
        "lesson_completed",
        "com.example.other",
        "",
    ] {
        let mut ev = new_signup(contact("c_type", "Ann"));
        ev["type"] = json!(ty);
        let err = expect_error(app.post_event(&ev).await, 400).await;
        assert_eq!(err["index"], 0, "{err}");
        assert_eq!(err["field"], "type", "{ty}: {err}");
    }
    app.settle().await;
    assert!(app.store.contact("c_type".into()).await.unwrap().is_none());
    app.assert_healthy().await;
}

async fn wrong_field_type_gets_400(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let base = lesson_completed(contact("c_wrong", "Ann"), "p_rust101", "Ownership");
    let with = |path: &[&str], value: Value| {
        let mut ev = base.clone();
        let mut at = &mut ev;
        for p in path {
            at = &mut at[*p];
        }
        *at = value;
        ev
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            with(&["data", "contact", "email"], json!(5)),
            "data.contact.email",
        ),
        (
            with(&["data", "contact", "id"], json!(123)),
            "data.contact.id",
        ),
        (with(&["data", "contact"], json!("c_wrong")), "data.contact"),
        (with(&["data", "lesson"], json!(["l_own"])), "data.lesson"),
        (
            with(&["data", "product", "title"], json!({"en": "Rust"})),
            "data.product.title",
        ),
        (with(&["data"], json!("a string")), "data"),
        (with(&["time"], json!("yesterday")), "time"),
        (with(&["time"], json!(1795514400)), "time"),
        (with(&["id"], json!(7)), "id"),
        (with(&["specversion"], json!("0.3")), "specversion"),
    ];
    for (ev, field) in cases {
        let err = expect_error(app.post_event(&ev).await, 400).await;
        assert_eq!(err["index"], 0, "{field}: {err}");
        assert_eq!(err["field"], field, "{err}");
    }
    app.settle().await;
    assert!(app.store.contact("c_wrong".into()).await.unwrap().is_none());
    app.assert_healthy().await;
}

async fn bad_event_in_a_batch_rejects_the_whole_batch(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let good = new_signup(contact("c_batch_ok", "Ann"));
    let mut bad = lesson_completed(contact("c_batch_bad", "Bob"), "p_rust101", "Ownership");
    bad["data"].as_object_mut().unwrap().remove("lesson");
    let third = new_signup(contact("c_batch_third", "Cy"));
    let err = expect_error(
        app.post_batch(&[good.clone(), bad.clone(), third.clone()])
            .await,
        400,
    )
    .await;
    assert_eq!(err["index"], 1, "{err}");
    assert_eq!(err["field"], "data.lesson", "{err}");

    app.settle().await;
    for c in ["c_batch_ok", "c_batch_bad", "c_batch_third"] {
        assert!(
            app.store.contact(c.into()).await.unwrap().is_none(),
            "{c} was stored from a refused batch"
        );
    }
    // Nothing of it was stored: once fixed, every event of the batch is new.
    let fixed = lesson_completed(contact("c_batch_bad", "Bob"), "p_rust101", "Ownership");
    assert_eq!(
        app.accept_batch(&[good, fixed, third]).await,
        ["new", "new", "new"]
    );
    app.assert_healthy().await;
}

/// A lesson event with a string in every field the example events carry.
fn event_with_every_field(contact_id: &str) -> Value {
    let mut ev = lesson_completed(contact(contact_id, "Ann"), "p_rust101", "Ownership");
    let c = &mut ev["data"]["contact"];
    c["phone"] = json!("+15551234567");
    c["last_name"] = json!("Lee");
    c["timezone"] = json!("Europe/Berlin");
    c["custom_fields"] = json!({"company": "Acme"});
    ev["data"]["offer"] = offer("o_pro", "Rust Pro");
    ev
}

async fn control_character_in_any_field_gets_400_and_later_events_flow(backend: Backend) {
    let opts = TestOptions::new(backend).workflow(
        "lesson",
        &one_email_workflow("lesson_completed", "Lesson done", true),
    );
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let fields = [
        ("/data/contact/id", "data.contact.id"),
        ("/data/contact/email", "data.contact.email"),
        ("/data/contact/phone", "data.contact.phone"),
        ("/data/contact/first_name", "data.contact.first_name"),
        ("/data/contact/last_name", "data.contact.last_name"),
        ("/data/contact/timezone", "data.contact.timezone"),
        (
            "/data/contact/custom_fields/company",
            "data.contact.custom_fields.company",
        ),
        ("/data/offer/id", "data.offer.id"),
        ("/data/offer/title", "data.offer.title"),
        ("/data/offer/product_ids/1", "data.offer.product_ids[1]"),
        ("/data/product/id", "data.product.id"),
        ("/data/product/title", "data.product.title"),
        ("/data/product/url", "data.product.url"),
        ("/data/category/title", "data.category.title"),
        ("/data/lesson/id", "data.lesson.id"),
        ("/data/lesson/title", "data.lesson.title"),
        ("/id", "id"),
        ("/source", "source"),
        ("/type", "type"),
    ];
    for (pointer, field) in fields {
        let mut ev = event_with_every_field("c_nul");
        let at = ev.pointer_mut(pointer).expect("the example event has it");
        let text = at.as_str().expect("a string field");
        *at = json!(format!("{}\u{0}{}", &text[..1], &text[1..]));
        let err = expect_error(app.post_event(&ev).await, 400).await;
        assert_eq!(err["index"], 0, "{field}: {err}");
        assert_eq!(err["field"], field, "{err}");
        let message = err["error"].as_str().unwrap();
        assert!(
            message.contains("control character (U+0000)") && message.ends_with("remove it"),
            "{field}: {message}"
        );
    }
    // A custom field's name, and a string nested in an object herald does not know.
    let mut ev = event_with_every_field("c_nul");
    ev["data"]["contact"]["custom_fields"] = json!({"com\u{0}pany": "Acme"});
    let err = expect_error(app.post_event(&ev).await, 400).await;
    assert_eq!(
        err["field"], "data.contact.custom_fields.com\\0pany",
        "{err}"
    );
    let mut ev = event_with_every_field("c_nul");
    ev["data"]["order"] = json!({"lines": [{"note": "gift\u{0}"}]});
    let err = expect_error(app.post_event(&ev).await, 400).await;
    assert_eq!(err["field"], "data.order.lines[0].note", "{err}");

    // The next valid event goes all the way to its email; the text it carries keeps its tab and
    // line breaks, which are not refused.
    let mut good = event_with_every_field("c_after_nul");
    good["data"]["contact"]["first_name"] = json!("Ann\tMarie");
    good["data"]["contact"]["custom_fields"] = json!({"notes": "line 1\r\nline 2"});
    good["data"]["lesson"]["title"] = json!("Part 1\nOwnership");
    assert_eq!(app.accept(&good).await, "new");
    let mails = app.wait_for_mails(1).await;
    assert_eq!(mails[0].rcpt_to, ["c_after_nul@example.com"]);
    app.settle().await;
    let c = app
        .store
        .contact("c_after_nul".into())
        .await
        .unwrap()
        .expect("the valid event's contact");
    assert_eq!(c.first_name.as_deref(), Some("Ann\tMarie"));
    assert_eq!(
        serde_json::from_str::<Value>(c.custom_fields.as_deref().unwrap()).unwrap(),
        json!({"notes": "line 1\r\nline 2"})
    );
    let runs = app.runs().await;
    assert_eq!(
        runs.len(),
        1,
        "only the valid event started a run: {runs:?}"
    );
    assert_eq!(runs[0].contact_id, "c_after_nul");
    assert!(app.store.contact("c_nul".into()).await.unwrap().is_none());
    assert_eq!(app.sink().count(), 1);
    app.assert_healthy().await;
}

async fn control_character_in_a_batch_refuses_all_of_it(backend: Backend) {
    let opts = TestOptions::new(backend).workflow(
        "lesson",
        &one_email_workflow("lesson_completed", "Lesson done", true),
    );
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let ids = ["c_nul_batch_0", "c_nul_batch_1", "c_nul_batch_2"];
    let batch: Vec<Value> = ids.iter().map(|id| event_with_every_field(id)).collect();
    let mut refused = batch.clone();
    refused[2]["data"]["contact"]["first_name"] = json!("A\u{0}nn");
    let err = expect_error(app.post_batch(&refused).await, 400).await;
    assert_eq!(err["index"], 2, "{err}");
    assert_eq!(err["field"], "data.contact.first_name", "{err}");

    app.settle().await;
    for id in ids {
        assert!(
            app.store.contact(id.into()).await.unwrap().is_none(),
            "{id} was stored from a refused batch"
        );
    }
    assert_eq!(app.runs().await.len(), 0);
    // None of it was stored: the same events, the bad one fixed, are all new and all flow.
    assert_eq!(app.accept_batch(&batch).await, ["new", "new", "new"]);
    let mut to: Vec<String> = app
        .wait_for_mails(3)
        .await
        .into_iter()
        .flat_map(|m| m.rcpt_to)
        .collect();
    to.sort();
    assert_eq!(to, ids.map(|id| format!("{id}@example.com")));
}

async fn oversized_body_gets_413(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let mut ev = new_signup(contact("c_big", "Ann"));
    ev["data"]["contact"]["custom_fields"] = json!({"blob": "x".repeat(1024 * 1024)});
    let body = serde_json::to_vec(&ev).unwrap();
    assert!(body.len() > 1024 * 1024);
    let (status, answer) = post_oversized(&app, &body, CLOUDEVENT).await;
    assert_eq!(status, 413, "{answer}");
    let answer = answer_body(&answer);
    let answer: Value =
        serde_json::from_str(answer).unwrap_or_else(|_| panic!("413 body is not JSON: {answer}"));
    assert!(answer["error"].is_string(), "{answer}");

    // A batch over 1 MiB made of small events.
    let batch: Vec<Value> = (0..900)
        .map(|i| {
            let mut e = new_signup(contact(&format!("c_big_{i}"), "Ann"));
            e["data"]["contact"]["custom_fields"] = json!({"notes": "y".repeat(1300)});
            e
        })
        .collect();
    let body = serde_json::to_vec(&batch).unwrap();
    assert!(body.len() > 1024 * 1024);
    let (status, answer) = post_oversized(&app, &body, CLOUDEVENT_BATCH).await;
    assert_eq!(status, 413, "{answer}");

    // Just under the limit is fine.
    let mut ev = new_signup(contact("c_almost", "Ann"));
    ev["data"]["contact"]["custom_fields"] = json!({"blob": ""});
    let overhead = serde_json::to_vec(&ev).unwrap().len();
    ev["data"]["contact"]["custom_fields"] = json!({"blob": "z".repeat(1024 * 1024 - overhead)});
    assert_eq!(serde_json::to_vec(&ev).unwrap().len(), 1024 * 1024);
    assert_eq!(app.accept(&ev).await, "new");

    app.settle().await;
    assert!(app.store.contact("c_big".into()).await.unwrap().is_none());
    assert!(app.store.contact("c_big_0".into()).await.unwrap().is_none());
    app.assert_healthy().await;
}

/// Posts a signed body over plain TCP, the way a careful client sends a large upload: the head
/// first, then the body only if no answer came within a second. herald refuses a declared length
/// over 1 MiB from the head alone; a client that writes the whole body at once (reqwest) may see
/// its write fail with a broken pipe instead of reading that 413, because the server closes the
/// connection with the body unread. Returns the status and the answer's body.
async fn post_oversized(app: &TestApp, body: &[u8], content_type: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    let mut head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in app.signature_headers(body) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .expect("write the head");
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    let first =
        tokio::time::timeout(std::time::Duration::from_secs(1), stream.read(&mut buf)).await;
    match first {
        Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        Ok(Err(e)) => panic!("reading the answer: {e}"),
        Err(_) => {
            // No early refusal: send the body, then read (a refusal may cut the write short).
            let _ = stream.write_all(body).await;
        }
    }
    read_answer(&mut stream, answer).await
}

/// Sends a request head for `POST /v1/events` declaring `length` body bytes, with `headers`.
async fn send_head(
    app: &TestApp,
    length: usize,
    headers: &[(&str, String)],
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    let mut head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {CLOUDEVENT}\r\nContent-Length: {length}\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .expect("write the head");
    stream
}

/// Reads one answer (head and declared body), starting from what was already read; returns the
/// status and the whole answer's text.
async fn read_answer(stream: &mut tokio::net::TcpStream, mut answer: Vec<u8>) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                let status = text
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .expect("status line");
                return (status, text);
            }
        }
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the answer took more than 10 s")
            .expect("reading the answer");
        assert!(n > 0, "connection closed before a complete answer: {text}");
        answer.extend_from_slice(&buf[..n]);
    }
}

async fn wrong_content_type_gets_415(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let body = serde_json::to_vec(&new_signup(contact("c_ct", "Ann"))).unwrap();
    for ct in [
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
        "application/cloudevents+xml",
    ] {
        expect_error(app.post_signed(body.clone(), ct).await, 415).await;
    }
    // No Content-Type at all.
    expect_error(
        app.post_raw(body.clone(), &app.signature_headers(&body))
            .await,
        415,
    )
    .await;
    app.settle().await;
    assert!(app.store.contact("c_ct".into()).await.unwrap().is_none());
    app.assert_healthy().await;
}

async fn invalid_phone_does_not_invalidate_the_event(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    for (i, phone) in ["12345", "+0123", "call me", ""].into_iter().enumerate() {
        let id = format!("c_phone_{i}");
        let mut c = contact(&id, "Ann");
        c["phone"] = json!(phone);
        assert_eq!(app.accept(&new_signup(c)).await, "new", "phone {phone:?}");
    }
    app.settle().await;
    assert!(
        app.store
            .contact("c_phone_0".into())
            .await
            .unwrap()
            .is_some()
    );
}

async fn grants_follow_event_time(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let c = || contact("c_grants", "Ann");
    let offer_active = async || {
        app.settle().await;
        let grants = app.store.grants("c_grants".into()).await.unwrap();
        grants
            .iter()
            .find(|g| g.kind == "offer" && g.item_id == "o_pro")
            .map(|g| g.active)
    };

    assert_eq!(
        app.accept(&at(offer_granted(c(), "o_pro"), "2026-11-24T12:00:00Z"))
            .await,
        "new"
    );
    assert_eq!(offer_active().await, Some(true));
    // An older removal arriving late does not undo the newer grant.
    assert_eq!(
        app.accept(&at(offer_removed(c(), "o_pro"), "2026-11-24T11:00:00Z"))
            .await,
        "new"
    );
    assert_eq!(
        offer_active().await,
        Some(true),
        "a late, older removal removed a newer grant"
    );
    // A newer removal does.
    assert_eq!(
        app.accept(&at(offer_removed(c(), "o_pro"), "2026-11-24T13:00:00Z"))
            .await,
        "new"
    );
    assert_eq!(offer_active().await, Some(false));
    // And an older grant arriving late does not restore it.
    assert_eq!(
        app.accept(&at(
            offer_granted(c(), "o_pro"),
            "2026-11-24T12:30:00+00:00"
        ))
        .await,
        "new"
    );
    assert_eq!(
        offer_active().await,
        Some(false),
        "a late, older grant undid a newer removal"
    );

    // Product grants behave the same, also within one batch in reverse order.
    let granted = at(
        event(
            "product_access_granted",
            json!({"contact": c(), "product": product("p_async", "Async")}),
        ),
        "2026-11-25T10:00:00Z",
    );
    let removed = at(
        event(
            "product_access_removed",
            json!({"contact": c(), "product": product("p_async", "Async")}),
        ),
        "2026-11-25T09:00:00Z",
    );
    assert_eq!(app.accept_batch(&[granted, removed]).await, ["new", "new"]);
    app.settle().await;
    let grants = app.store.grants("c_grants".into()).await.unwrap();
    let p = grants
        .iter()
        .find(|g| g.kind == "product" && g.item_id == "p_async")
        .expect("product grant");
    assert!(p.active, "{grants:?}");
}

async fn contact_latest_details_win(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let mut first = contact("c_latest", "Ann");
    first["email"] = json!("ann@old.example.com");
    assert_eq!(
        app.accept(&at(new_signup(first), "2026-11-24T10:00:00Z"))
            .await,
        "new"
    );
    app.settle().await;
    let c = app.store.contact("c_latest".into()).await.unwrap().unwrap();
    assert_eq!(c.email.as_deref(), Some("ann@old.example.com"));

    let mut newer = contact("c_latest", "Annie");
    newer["email"] = json!("ann@new.example.com");
    newer["timezone"] = json!("Europe/Berlin");
    assert_eq!(
        app.accept(&at(new_signup(newer), "2026-11-24T12:00:00Z"))
            .await,
        "new"
    );
    app.settle().await;
    let c = app.store.contact("c_latest".into()).await.unwrap().unwrap();
    assert_eq!(c.email.as_deref(), Some("ann@new.example.com"));
    assert_eq!(c.first_name.as_deref(), Some("Annie"));
    assert_eq!(c.timezone.as_deref(), Some("Europe/Berlin"));

    // Details from an older event arriving late do not overwrite newer ones.
    let mut stale = contact("c_latest", "Stale");
    stale["email"] = json!("ann@stale.example.com");
    assert_eq!(
        app.accept(&at(new_signup(stale), "2026-11-24T11:00:00Z"))
            .await,
        "new"
    );
    app.settle().await;
    let c = app.store.contact("c_latest".into()).await.unwrap().unwrap();
    assert_eq!(
        c.email.as_deref(),
        Some("ann@new.example.com"),
        "a late, older event overwrote the email"
    );
    assert_eq!(c.first_name.as_deref(), Some("Annie"));
}

/// `value.tap(|v| ...)`: mutate a value inline.
trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self) -> Option<Value>) -> Self {
        let _ = f(&mut self);
        self
    }
}
impl Tap for Value {}

fn answer_body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Unsigned or stale requests cost no body read: 40 of them, each declaring (and sending) 8 MiB,
/// are answered 401 from their head alone and leave memory where it was.
async fn unsigned_or_stale_requests_are_refused_before_their_body_is_read(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    const DECLARED: usize = 8 * 1024 * 1024;
    let stale_ts = (app.clock.now_utc().timestamp() - 3600).to_string();
    let rss_before = rss_bytes();
    let mut clients = Vec::new();
    for i in 0..40 {
        let headers: Vec<(&str, String)> = if i % 2 == 0 {
            vec![]
        } else {
            vec![
                ("webhook-id", format!("msg_stale_{i}")),
                ("webhook-timestamp", stale_ts.clone()),
                ("webhook-signature", format!("v1,{DECOY}")),
            ]
        };
        let mut stream = send_head(&app, DECLARED, &headers).await;
        clients.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 4096];
            // The answer comes from the head alone, before any body byte is sent.
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("no answer to the head alone within 5 s")
                .expect("read");
            let (status, answer) = read_answer(&mut stream, buf[..n].to_vec()).await;
            // Then the body, as a careless client sends it anyway; herald does not read it.
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..DECLARED / chunk.len() {
                let write = stream.write_all(&chunk);
                match tokio::time::timeout(std::time::Duration::from_millis(200), write).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            (status, answer)
        }));
    }
    for client in clients {
        let (status, answer) = client.await.unwrap();
        assert_eq!(status, 401, "{answer}");
        assert!(answer.contains("webhook"), "{answer}");
        // The unread body ends the connection, and the client is told so up front.
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < 50 * 1024 * 1024,
        "memory grew by {} MB for 40 refused requests",
        grown / (1024 * 1024)
    );
    assert_eq!(
        app.metric("herald_events_rejected_total{reason=\"signature\"}")
            .await,
        Some(40.0)
    );
    app.assert_healthy().await;
}

/// More event requests than herald handles at once are shed with 503 and `Retry-After` before
/// their body is read; once the others finish, posts are accepted again.
async fn requests_over_the_in_flight_limit_get_503_with_retry_after(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend).event_requests_in_flight(4)).await else {
        return;
    };
    // Freshly signed heads whose bodies never come: each holds its slot while herald waits.
    let mut holders = Vec::new();
    for _ in 0..4 {
        holders.push(send_head(&app, 1000, &app.signature_headers(b"")).await);
    }
    let seated = eventually(async || app.state.intake_slots.available_permits() == 0).await;
    if !seated {
        let mut answers = Vec::new();
        for holder in &mut holders {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 4096];
            let read =
                tokio::time::timeout(std::time::Duration::from_millis(500), holder.read(&mut buf));
            answers.push(match read.await {
                Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
                other => format!("{other:?}"),
            });
        }
        panic!(
            "the four requests waiting for their bodies do not hold the four slots ({} free); they were answered: {answers:#?}",
            app.state.intake_slots.available_permits()
        );
    }
    let mut stream = send_head(&app, 2, &app.signature_headers(b"{}")).await;
    {
        use tokio::io::AsyncWriteExt;
        let _ = stream.write_all(b"{}").await;
    }
    let (status, answer) = read_answer(&mut stream, Vec::new()).await;
    assert_eq!(status, 503, "the fifth request was not shed: {answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    let body: Value = serde_json::from_str(answer_body(&answer)).expect("a JSON error");
    assert!(body["error"].as_str().unwrap().contains("retry"), "{body}");
    drop(holders);
    let accepted = eventually(async || {
        app.post_event(&new_signup(contact("c_after_shed", "Ann")))
            .await
            .status()
            == 202
    })
    .await;
    assert!(
        accepted,
        "posts are accepted again once the others are gone"
    );
}
