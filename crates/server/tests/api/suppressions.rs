//! The suppression list as an operator moves it: a CSV list from another provider imported (an
//! address herald has not seen yet stays suppressed when its contact arrives), the list exported
//! as CSV and JSON, a bad list refused whole, and a contact opted out of and back into email by
//! the operator.

use crate::helpers::*;
use crate::link_helpers::ADMIN_TOKEN;
use herald_store::{Channel, MessageStatus};
use serde_json::{Value, json};

both_backends!(
    a_suppression_list_moves_in_and_out_as_csv,
    an_operator_opts_a_contact_out_and_back_in,
);

const WELCOME: &str = r#"
name: Welcome
trigger:
  event: new_signup
steps:
  - id: welcome
    send_email:
      subject: "Welcome {{contact.first_name}}"
      text: "Hi"
"#;

fn signup(id: &str) -> Value {
    event("new_signup", json!({"contact": contact(id, "Ann")}))
}

async fn post_csv(app: &TestApp, csv: &str) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/v1/suppressions"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/csv")
        .body(csv.to_owned())
        .send()
        .await
        .expect("POST /v1/suppressions");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn opted_out(app: &TestApp, id: &str) -> Vec<Channel> {
    app.store
        .opt_outs(id.into())
        .await
        .expect("opt_outs")
        .into_iter()
        .map(|o| o.channel)
        .collect()
}

async fn a_suppression_list_moves_in_and_out_as_csv(backend: Backend) {
    let opts = TestOptions::new(backend)
        .admin_token(ADMIN_TOKEN)
        .workflow("welcome", WELCOME);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&signup("c_known")).await;
    app.accept(&signup("c_other")).await;
    app.wait_for_mails(2).await;

    // A bad line refuses the whole list: nothing is stored.
    let (status, body) = post_csv(
        &app,
        "email,reason\nc_other@example.com,bounced\nnot-an-address,bounced\n",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("line 3"),
        "{body}"
    );
    let (status, body) = post_csv(&app, "email,reason\nc_other@example.com,spam\n").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post_csv(&app, "address\nc_other@example.com\n").await;
    assert_eq!(status, 400, "no email column: {body}");
    assert!(opted_out(&app, "c_other").await.is_empty());

    // A list from another provider: one address herald knows (any case), one it has not seen.
    let (status, body) = post_csv(
        &app,
        "Email,Reason\nC_Known@Example.com,bounced\nc_later@example.com,\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"addresses": 2, "contacts": ["c_known"]}));
    assert_eq!(opted_out(&app, "c_known").await, [Channel::Email]);

    // The address herald had not seen arrives with a new contact: its welcome is suppressed.
    app.accept(&signup("c_later")).await;
    app.settle().await;
    let later = app.messages_of("c_later").await;
    assert_eq!(later.len(), 1, "{later:#?}");
    assert_eq!(later[0].status, MessageStatus::Suppressed, "{later:#?}");
    assert_eq!(app.sink().count(), 2);

    let (status, list) = app.admin_get("/v1/suppressions").await;
    assert_eq!(status, 200, "{list}");
    // Oldest first; the two opt-outs may fall in the same millisecond, so compare as a set.
    let mut listed: Vec<(&str, &str)> = list["suppressions"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| {
            (
                s["contact_id"].as_str().unwrap(),
                s["reason"].as_str().unwrap(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [("c_known", "bounced"), ("c_later", "unsubscribed")]
    );

    let csv = app
        .client
        .get(app.url("/v1/suppressions?format=csv"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = csv.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0], "email,reason,channel,phone,contact_id,at",
        "{text}"
    );
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[1..]
            .iter()
            .any(|l| l.starts_with("c_known@example.com,bounced,email,,c_known,")),
        "{text}"
    );

    // What was exported imports again (another herald, or the same one: nothing changes).
    let (status, body) = post_csv(&app, &text).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["addresses"], 2, "{body}");
}

async fn an_operator_opts_a_contact_out_and_back_in(backend: Backend) {
    const LESSON: &str = r#"
name: Lesson done
re_entry: true
trigger:
  event: lesson_completed
steps:
  - id: congrats
    send_email:
      subject: "Well done"
      text: "Next one?"
"#;
    let opts = TestOptions::new(backend)
        .admin_token(ADMIN_TOKEN)
        .workflow("lesson", LESSON);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let lesson = || {
        event(
            "lesson_completed",
            json!({"contact": contact("c_pref", "Ann"), "product": product("p_rust101", "Rust 101"),
                   "lesson": {"id": "l_1", "title": "Ownership"}}),
        )
    };
    app.accept(&lesson()).await;
    app.wait_for_mails(1).await;

    let set = async |body: Value| {
        app.admin_post_json("/v1/contacts/c_pref/opt-outs", &body, &[])
            .await
    };
    let (status, body) = set(json!({"channel": "email", "opted_out": true})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["opt_outs"][0]["channel"], "email", "{body}");
    assert_eq!(body["opt_outs"][0]["source"], "admin", "{body}");
    app.accept(&lesson()).await;
    app.settle().await;
    assert_eq!(app.sink().count(), 1, "suppressed while opted out");

    let (status, body) = set(json!({"channel": "email", "opted_out": false})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["opt_outs"], json!([]), "{body}");
    app.accept(&lesson()).await;
    app.wait_for_mails(2).await;

    let (status, _) = set(json!({"channel": "fax", "opted_out": true})).await;
    assert_eq!(status, 400);
    let (status, _) = app
        .admin_post_json(
            "/v1/contacts/c_nobody/opt-outs",
            &json!({"channel": "sms", "opted_out": true}),
            &[],
        )
        .await;
    assert_eq!(status, 404);
}
