//! The dev mailbox: with no SMTP configured, messages are stored; `herald serve --dev` shows them
//! at `/dev/mailbox` (HTML) and `/dev/mailbox.json`, and without `--dev` nobody can read them
//! over HTTP (they carry sign-in links).

use crate::helpers::*;
use herald_store::MessageStatus;
use serde_json::Value;

both_backends!(
    dev_mailbox_holds_messages_when_no_smtp,
    dev_mailbox_is_absent_with_smtp,
    dev_mailbox_page_needs_dev_even_without_smtp
);

const WF: &str = r#"
name: Welcome
trigger:
  event: offer_access_granted
from: "Ada at Rust School <ada@school.example.com>"
steps:
  - id: welcome
    send_email:
      subject: "Welcome {{contact.first_name}}"
      html: "<p>Hi {{contact.first_name}}, start at https://school.example.com/p/rust-101</p>"
      text: "Hi {{contact.first_name}}, start at https://school.example.com/p/rust-101 (help: <<support_email>>)"
"#;

async fn dev_mailbox_holds_messages_when_no_smtp(backend: Backend) {
    let opts = TestOptions::new(backend)
        .without_smtp()
        .dev()
        .workflow("welcome", WF);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&offer_granted(
        contact("c_box", "<script>alert(1)</script>"),
        "o_pro",
    ))
    .await;
    let rows = app.wait_for_status(1, MessageStatus::Sent).await;

    let response = app.get("/dev/mailbox.json").await;
    assert_eq!(response.status(), 200);
    let items: Value = response.json().await.unwrap();
    let items = items.as_array().expect("a JSON list");
    assert_eq!(items.len(), 1, "{items:?}");
    let m = &items[0];
    assert_eq!(m["channel"], "email");
    assert_eq!(m["recipient"], "c_box@example.com");
    assert_eq!(m["subject"], "Welcome <script>alert(1)</script>");
    assert_eq!(m["message_id"], rows[0].header_message_id.as_str());
    assert!(
        m["sender"]
            .as_str()
            .unwrap()
            .contains("ada@school.example.com"),
        "{m}"
    );
    let text = m["text_body"].as_str().unwrap();
    assert!(
        text.contains("Hi <script>alert(1)</script>, start at"),
        "{text}"
    );
    assert!(text.contains(SUPPORT_EMAIL), "{text}");
    let html = m["html_body"].as_str().unwrap();
    assert!(html.contains("&lt;script&gt;"), "{html}");

    let response = app.get("/dev/mailbox").await;
    assert_eq!(response.status(), 200);
    let ct = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(ct.starts_with("text/html"), "{ct}");
    let page = response.text().await.unwrap();
    assert!(
        page.contains("Welcome &lt;script&gt;alert(1)&lt;/script&gt;"),
        "the subject is not shown escaped: {page}"
    );
    assert!(
        !page.contains("<script>"),
        "the mailbox page runs message content: {page}"
    );
    assert!(page.contains("c_box@example.com"));
    assert!(
        page.contains("<a href=\"https://school.example.com/p/rust-101\">"),
        "links are not clickable: {page}"
    );

    // The store agrees: nothing went anywhere else.
    assert_eq!(app.store.mailbox(10).await.unwrap().len(), 1);
    app.settle().await;
    assert_eq!(app.messages().await.len(), 1);
}

async fn dev_mailbox_is_absent_with_smtp(backend: Backend) {
    let opts = TestOptions::new(backend).workflow("welcome", WF);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    assert_eq!(app.get("/dev/mailbox").await.status(), 404);
    assert_eq!(app.get("/dev/mailbox.json").await.status(), 404);
    app.accept(&offer_granted(contact("c_box_smtp", "Ann"), "o_pro"))
        .await;
    app.wait_for_mails(1).await;
    app.settle().await;
    assert!(
        app.store.mailbox(10).await.unwrap().is_empty(),
        "an email sent by SMTP was also put in the dev mailbox"
    );
}

async fn dev_mailbox_page_needs_dev_even_without_smtp(backend: Backend) {
    let opts = TestOptions::new(backend)
        .without_smtp()
        .workflow("welcome", WF);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_box_nodev", "Ann"), "o_pro"))
        .await;
    app.wait_for_status(1, MessageStatus::Sent).await;
    assert_eq!(
        app.store.mailbox(10).await.unwrap().len(),
        1,
        "the email is kept for `herald mailbox`"
    );
    assert_eq!(app.get("/dev/mailbox").await.status(), 404);
    assert_eq!(app.get("/dev/mailbox.json").await.status(), 404);
}
