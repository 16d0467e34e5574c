//! From event to inbox: rendering (templates, escaping, `default`, custom values), addressing,
//! filters, skipped sends, and the retry policy against a real SMTP server.

use crate::helpers::*;
use herald_store::MessageStatus;
use herald_test_support::smtp::Stage;
use serde_json::json;
use std::collections::HashSet;

both_backends!(
    email_arrives_rendered_with_both_parts,
    default_from_and_text_only_email,
    html_is_escaped_text_is_not,
    default_helper_falls_back,
    custom_values_resolve_and_lookalike_names_stay_literal,
    where_filters_select_events,
    missing_address_skips_the_send_and_the_run_goes_on,
    transient_smtp_failure_is_retried_with_the_same_message_id,
    permanent_smtp_failure_fails_at_once,
    smtp_down_is_retried_until_it_is_back,
    subject_never_contains_a_line_break,
    event_time_renders_as_received,
    every_workflow_email_carries_list_unsubscribe,
    emails_one_after_another_share_one_smtp_connection,
    a_connection_the_relay_dropped_is_replaced_without_a_failed_attempt,
);

const WELCOME: &str = r#"
name: Welcome new members
trigger:
  event: offer_access_granted
from: "Ada at Rust School <ada@school.example.com>"
steps:
  - id: welcome
    send_email:
      subject: "Welcome to {{offer.title}}, {{default contact.first_name 'there'}}!"
      template: welcome
"#;

const WELCOME_HTML: &str = r#"<!doctype html>
<html><body>
<p>Hi {{default contact.first_name "there"}},</p>
<p>welcome to <b>{{offer.title}}</b>.</p>
<p>Questions? Write to <<support_email>>.</p>
</body></html>
"#;

const WELCOME_TXT: &str = r#"Hi {{default contact.first_name "there"}},

welcome to {{offer.title}}.

Questions? Write to <<support_email>>.
"#;

fn welcome(backend: Backend) -> TestOptions {
    TestOptions::new(backend)
        .workflow("welcome", WELCOME)
        .template("welcome.html.hbs", WELCOME_HTML)
        .template("welcome.txt.hbs", WELCOME_TXT)
}

async fn email_arrives_rendered_with_both_parts(backend: Backend) {
    let Some(app) = spawn_app(welcome(backend)).await else {
        return;
    };
    assert_eq!(
        app.accept(&offer_granted(contact("c_ann", "Ann"), "o_pro"))
            .await,
        "new"
    );
    let mails = app.wait_for_mails(1).await;
    let mail = &mails[0];
    assert_eq!(mail.mail_from, "ada@school.example.com");
    assert_eq!(mail.rcpt_to, ["c_ann@example.com"]);

    let email = mail.parse();
    assert_eq!(email.subject, "Welcome to Rust Pro, Ann!");
    assert!(
        email.from.contains("Ada at Rust School")
            && email.from.contains("<ada@school.example.com>"),
        "From: {}",
        email.from
    );
    assert!(email.to.contains("c_ann@example.com"), "To: {}", email.to);
    assert_eq!(email.mime_type, "multipart/alternative");
    let text = email.text.as_deref().expect("text/plain part");
    let html = email.html.as_deref().expect("text/html part");
    assert!(text.contains("Hi Ann,"), "{text}");
    assert!(text.contains("welcome to Rust Pro."), "{text}");
    assert!(
        text.contains(&format!("Questions? Write to {SUPPORT_EMAIL}.")),
        "{text}"
    );
    assert!(!text.contains('<'), "the text part holds markup: {text}");
    assert!(html.contains("<p>Hi Ann,</p>"), "{html}");
    assert!(html.contains("<b>Rust Pro</b>"), "{html}");
    assert!(html.contains(SUPPORT_EMAIL), "{html}");

    let messages = app.wait_for_status(1, MessageStatus::Sent).await;
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(
        email.message_id, m.header_message_id,
        "Message-ID differs from the stored one"
    );
    assert!(
        m.header_message_id.starts_with('<') && m.header_message_id.ends_with("@herald.test>"),
        "{}",
        m.header_message_id
    );
    assert_eq!(m.attempts, 1);
    assert_eq!(m.recipient.as_deref(), Some("c_ann@example.com"));
    assert_eq!(m.subject.as_deref(), Some("Welcome to Rust Pro, Ann!"));
    assert_eq!(m.workflow_id, "welcome");
    assert_eq!(m.step_id, "welcome");
    assert!(m.sent_ms.is_some());
    assert!(m.reason.is_none(), "{:?}", m.reason);
    app.settle().await;
    let runs = app.runs().await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, herald_store::RunState::Completed);
}

async fn default_from_and_text_only_email(backend: Backend) {
    let opts = TestOptions::new(backend).workflow(
        "signup",
        &one_email_workflow("new_signup", "Hello {{contact.first_name}}", false),
    );
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&new_signup(contact("c_plain", "Bea"))).await;
    let mails = app.wait_for_mails(1).await;
    assert_eq!(mails[0].mail_from, "noreply@herald.test");
    let email = mails[0].parse();
    assert!(
        email.from.contains("Herald Test") && email.from.contains("noreply@herald.test"),
        "{}",
        email.from
    );
    assert_eq!(email.subject, "Hello Bea");
    assert_eq!(email.mime_type, "text/plain");
    assert_eq!(email.text.as_deref().map(str::trim_end), Some("Hello Bea"));
    assert!(email.html.is_none());
    assert!(!email.message_id.is_empty());
}

async fn html_is_escaped_text_is_not(backend: Backend) {
    let Some(app) = spawn_app(welcome(backend)).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_esc", "<b>Ann & Co</b>"), "o_pro"))
        .await;
    let email = app.wait_for_mails(1).await[0].parse();
    assert_eq!(
        email.subject, "Welcome to Rust Pro, <b>Ann & Co</b>!",
        "subjects are not HTML-escaped"
    );
    let text = email.text.unwrap();
    let html = email.html.unwrap();
    assert!(
        text.contains("Hi <b>Ann & Co</b>,"),
        "text bodies are not HTML-escaped: {text}"
    );
    assert!(
        html.contains("Hi &lt;b&gt;Ann &amp; Co&lt;/b&gt;,"),
        "HTML bodies escape values: {html}"
    );
    assert!(!html.contains("<b>Ann"), "{html}");
}

async fn default_helper_falls_back(backend: Backend) {
    let Some(app) = spawn_app(welcome(backend)).await else {
        return;
    };
    app.accept(&offer_granted(
        json!({"id": "c_anon", "email": "anon@example.com"}),
        "o_pro",
    ))
    .await;
    let email = app.wait_for_mails(1).await[0].parse();
    assert_eq!(email.subject, "Welcome to Rust Pro, there!");
    assert!(email.text.unwrap().contains("Hi there,"));
    assert!(email.html.unwrap().contains("<p>Hi there,</p>"));
}

async fn custom_values_resolve_and_lookalike_names_stay_literal(backend: Backend) {
    let Some(app) = spawn_app(welcome(backend)).await else {
        return;
    };
    app.accept(&offer_granted(
        contact("c_cv1", "<<support_email>>"),
        "o_pro",
    ))
    .await;
    app.accept(&offer_granted(contact("c_cv2", "<<login_url>>"), "o_pro"))
        .await;
    let mails = app.wait_for_mails(2).await;
    let of = |rcpt: &str| {
        mails
            .iter()
            .find(|m| m.rcpt_to == [rcpt])
            .unwrap_or_else(|| panic!("no mail to {rcpt}"))
            .parse()
    };

    let e1 = of("c_cv1@example.com");
    assert_eq!(e1.subject, "Welcome to Rust Pro, <<support_email>>!");
    let text = e1.text.unwrap();
    assert!(
        text.contains("Hi <<support_email>>,"),
        "a name that looks like a custom value was resolved: {text}"
    );
    assert_eq!(text.matches(SUPPORT_EMAIL).count(), 1, "{text}");
    let html = e1.html.unwrap();
    assert!(html.contains("Hi &lt;&lt;support_email&gt;&gt;,"), "{html}");
    assert_eq!(html.matches(SUPPORT_EMAIL).count(), 1, "{html}");

    let e2 = of("c_cv2@example.com");
    let text = e2.text.unwrap();
    assert!(text.contains("Hi <<login_url>>,"), "{text}");
    assert!(
        !text.contains("/l/"),
        "a contact named <<login_url>> received a link: {text}"
    );
    assert!(!e2.html.unwrap().contains("/l/"));
}

async fn where_filters_select_events(backend: Backend) {
    let products = r#"
name: Rust lessons, not on the free offer
trigger:
  event: lesson_completed
  where:
    product.id: [p_rust101, p_async]
    offer.id: {not: [o_free]}
steps:
  - id: congrats
    send_email:
      subject: "Well done on {{lesson.title}}"
      text: "Keep going!"
"#;
    let pro_only = r#"
name: Pro lessons
trigger:
  event: [lesson_completed, product_completed]
  where:
    offer.id: o_pro
steps:
  - id: pro
    send_email:
      subject: "Pro tip"
      text: "Pro tip for {{contact.first_name}}"
"#;
    let opts = TestOptions::new(backend)
        .workflow("products", products)
        .workflow("pro_only", pro_only);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let with_offer = |mut ev: serde_json::Value, offer_id: &str| {
        ev["data"]["offer"] = offer(offer_id, "Some offer");
        ev
    };
    // Matches `products` (no offer passes the `not` list), not `pro_only` (no offer fails it).
    app.accept(&lesson_completed(
        contact("c_w1", "A"),
        "p_rust101",
        "Ownership",
    ))
    .await;
    // Matches neither: another product, and no offer.
    app.accept(&lesson_completed(
        contact("c_w2", "B"),
        "p_other",
        "Ownership",
    ))
    .await;
    // `products` refuses the free offer; `pro_only` needs o_pro.
    app.accept(&with_offer(
        lesson_completed(contact("c_w3", "C"), "p_async", "Tasks"),
        "o_free",
    ))
    .await;
    // Matches both.
    app.accept(&with_offer(
        lesson_completed(contact("c_w4", "D"), "p_async", "Tasks"),
        "o_pro",
    ))
    .await;
    // Matches `pro_only` through its second trigger.
    app.accept(&with_offer(
        product_completed(contact("c_w5", "E"), "p_other"),
        "o_pro",
    ))
    .await;
    app.settle().await;

    let mut got: Vec<(String, String)> = app
        .messages()
        .await
        .into_iter()
        .map(|m| (m.workflow_id.into(), m.contact_id.into()))
        .collect();
    got.sort();
    let expected = [
        ("pro_only", "c_w4"),
        ("pro_only", "c_w5"),
        ("products", "c_w1"),
        ("products", "c_w4"),
    ];
    assert_eq!(got, expected.map(|(w, c)| (w.to_owned(), c.to_owned())));
    let mails = app.wait_for_mails(4).await;
    assert_eq!(mails.len(), 4);
    let subjects: HashSet<String> = mails.iter().map(|m| m.parse().subject).collect();
    assert!(
        subjects.contains("Well done on Ownership") && subjects.contains("Well done on Tasks"),
        "{subjects:?}"
    );
}

async fn missing_address_skips_the_send_and_the_run_goes_on(backend: Backend) {
    let wf = r#"
name: Email then SMS
trigger:
  event: new_signup
steps:
  - id: mail
    send_email:
      subject: "Welcome"
      text: "Welcome aboard"
  - id: sms
    send_sms:
      body: "Hi {{default contact.first_name 'there'}}, welcome!"
"#;
    let Some(app) = spawn_app(TestOptions::new(backend).workflow("both", wf)).await else {
        return;
    };
    // No email: the email is skipped, the SMS still goes.
    app.accept(&new_signup(
        json!({"id": "c_noemail", "first_name": "Ann", "phone": "+15551234567"}),
    ))
    .await;
    // An invalid email: skipped too.
    app.accept(&new_signup(
        json!({"id": "c_bademail", "first_name": "Bob", "email": "not an address", "phone": "+15551234568"}),
    ))
    .await;
    // An invalid phone: the email goes, the SMS is skipped.
    app.accept(&new_signup(
        json!({"id": "c_badphone", "first_name": "Cy", "email": "cy@example.com", "phone": "12345"}),
    ))
    .await;
    app.wait_for_mails(1).await;
    app.settle().await;

    let status_of = async |contact: &str, step: &str| {
        let ms = app.messages_of(contact).await;
        let m = ms
            .iter()
            .find(|m| m.step_id == step)
            .unwrap_or_else(|| panic!("no {step} message for {contact}: {ms:#?}"));
        (m.status, m.reason.clone().unwrap_or_default())
    };
    let (status, reason) = status_of("c_noemail", "mail").await;
    assert_eq!(status, MessageStatus::Skipped);
    assert!(
        reason.contains("email"),
        "reason should name the missing email: {reason}"
    );
    assert_eq!(status_of("c_noemail", "sms").await.0, MessageStatus::Sent);

    let (status, reason) = status_of("c_bademail", "mail").await;
    assert_eq!(status, MessageStatus::Skipped);
    assert!(reason.contains("email"), "{reason}");
    assert_eq!(status_of("c_bademail", "sms").await.0, MessageStatus::Sent);

    assert_eq!(status_of("c_badphone", "mail").await.0, MessageStatus::Sent);
    let (status, reason) = status_of("c_badphone", "sms").await;
    assert_eq!(status, MessageStatus::Skipped);
    assert!(
        reason.contains("phone") || reason.contains("E.164"),
        "{reason}"
    );

    for c in ["c_noemail", "c_bademail", "c_badphone"] {
        let runs = app.runs_of(c).await;
        assert_eq!(runs.len(), 1, "{c}");
        assert_eq!(
            runs[0].state,
            herald_store::RunState::Completed,
            "{c}: {:#?}",
            runs[0]
        );
        assert!(
            runs[0].steps.iter().any(|s| s.step_id == "sms"),
            "{c}: the run did not reach the SMS step: {:#?}",
            runs[0].steps
        );
    }
    // Only the one deliverable email reached SMTP; the SMS went to the dev mailbox.
    let mails = app.sink().received();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].rcpt_to, ["cy@example.com"]);
    let sms: Vec<_> = app
        .store
        .mailbox(50)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.channel == herald_store::Channel::Sms)
        .collect();
    assert_eq!(sms.len(), 2, "{sms:#?}");
    let to_ann = sms
        .iter()
        .find(|m| m.recipient == "+15551234567")
        .expect("SMS to Ann");
    assert!(
        to_ann
            .text_body
            .as_deref()
            .unwrap_or("")
            .starts_with("Hi Ann, welcome!"),
        "{to_ann:?}"
    );
}

async fn transient_smtp_failure_is_retried_with_the_same_message_id(backend: Backend) {
    let opts = TestOptions::new(backend)
        .workflow("signup", &one_email_workflow("new_signup", "Hi", false));
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    // Two 451s at the end of DATA, then success.
    app.sink().fail_next(2, Stage::Data, 451);
    app.accept(&new_signup(contact("c_451", "Ann"))).await;
    let mails = app.wait_for_mails(1).await;
    let delivered_id = mails[0].message_id();
    let refusals = app.sink().refusals();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    for r in &refusals {
        assert_eq!((r.stage, r.code), (Stage::Data, 451));
        assert_eq!(
            r.mail.as_ref().unwrap().message_id(),
            delivered_id,
            "a retry changed the Message-ID"
        );
    }
    let rows = app.wait_for_status(1, MessageStatus::Sent).await;
    assert_eq!(rows[0].attempts, 3, "{rows:#?}");
    assert_eq!(rows[0].header_message_id, delivered_id);

    // A 450 at RCPT is transient too.
    app.sink().fail_next(1, Stage::Rcpt, 450);
    app.accept(&new_signup(contact("c_450", "Bob"))).await;
    let mails = app.wait_for_mails(2).await;
    assert_eq!(mails[1].rcpt_to, ["c_450@example.com"]);
    let rows = app.wait_for_status(2, MessageStatus::Sent).await;
    let m = rows.iter().find(|m| m.contact_id == "c_450").unwrap();
    assert_eq!(m.attempts, 2);
    app.settle().await;
    assert_eq!(app.sink().count(), 2, "a delivered message was sent again");
}

async fn permanent_smtp_failure_fails_at_once(backend: Backend) {
    let opts = TestOptions::new(backend)
        .workflow("signup", &one_email_workflow("new_signup", "Hi", false));
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    // (A 550 5.1.1, no such mailbox, is a bounce: see the opt-out tests.)
    app.sink().fail_next(1, Stage::Rcpt, 554);
    app.accept(&new_signup(contact("c_550", "Ann"))).await;
    let rows = app.wait_for_status(1, MessageStatus::Failed).await;
    let m = &rows[0];
    assert_eq!(m.attempts, 1, "a permanent failure was retried: {m:#?}");
    let reason = m.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("554") && reason.contains("5.7.1"),
        "the reason should carry the SMTP answer: {reason}"
    );
    assert!(m.sent_ms.is_none());

    // A 554 at the end of DATA is permanent as well.
    app.sink().fail_next(1, Stage::Data, 554);
    app.accept(&new_signup(contact("c_554", "Bob"))).await;
    let rows = app.wait_for_status(2, MessageStatus::Failed).await;
    assert!(rows.iter().all(|m| m.attempts == 1), "{rows:#?}");
    app.settle().await;
    assert_eq!(
        app.sink().refusals().len(),
        2,
        "permanent failures must not be retried"
    );
    assert_eq!(app.sink().count(), 0);
}

async fn smtp_down_is_retried_until_it_is_back(backend: Backend) {
    let opts = TestOptions::new(backend)
        .workflow("signup", &one_email_workflow("new_signup", "Hi", false))
        .retries(
            std::time::Duration::from_millis(20),
            std::time::Duration::from_millis(100),
            1000,
        );
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.sink().stop().await;
    app.accept(&new_signup(contact("c_down", "Ann"))).await;
    wait_for("two failed attempts while SMTP is down", async || {
        app.messages()
            .await
            .first()
            .is_some_and(|m| m.attempts >= 2 && m.status == MessageStatus::Queued)
    })
    .await;
    let queued = &app.messages().await[0];
    assert!(
        queued.reason.is_some(),
        "a retried message should say why: {queued:#?}"
    );
    assert!(queued.due_ms.is_some());
    assert_eq!(app.sink().count(), 0);

    app.sink().resume().await;
    let mails = app.wait_for_mails(1).await;
    let rows = app.wait_for_status(1, MessageStatus::Sent).await;
    assert!(rows[0].attempts >= 3, "{rows:#?}");
    assert_eq!(mails[0].message_id(), rows[0].header_message_id);
    app.settle().await;
    assert_eq!(app.sink().count(), 1);
}

/// `List-Unsubscribe` and `List-Unsubscribe-Post` on every workflow email.
async fn every_workflow_email_carries_list_unsubscribe(backend: Backend) {
    let Some(app) = spawn_app(welcome(backend)).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_unsub", "Ann"), "o_pro"))
        .await;
    let email = app.wait_for_mails(1).await[0].parse();
    let unsub = email
        .header("List-Unsubscribe")
        .expect("List-Unsubscribe header");
    assert!(unsub.contains(PUBLIC_URL), "{unsub}");
    assert_eq!(
        email.header("List-Unsubscribe-Post"),
        Some("List-Unsubscribe=One-Click")
    );
}

async fn subject_never_contains_a_line_break(backend: Backend) {
    let Some(app) = spawn_app(welcome(backend)).await else {
        return;
    };
    let sneaky = "Ann\r\nBcc: victim@example.com\r\nX-Injected: yes";
    app.accept(&offer_granted(contact("c_crlf", sneaky), "o_pro"))
        .await;
    let mails = app.wait_for_mails(1).await;
    assert_eq!(
        mails[0].rcpt_to,
        ["c_crlf@example.com"],
        "a value added a recipient"
    );
    let email = mails[0].parse();
    assert!(
        !email.subject.contains('\n') && !email.subject.contains('\r'),
        "{:?}",
        email.subject
    );
    assert!(
        email.subject.starts_with("Welcome to Rust Pro, Ann"),
        "{:?}",
        email.subject
    );
    assert!(
        email.header("Bcc").is_none() && email.header("X-Injected").is_none(),
        "{:?}",
        email.headers
    );
}

async fn event_time_renders_as_received(backend: Backend) {
    let wf = r#"
name: Time
trigger:
  event: new_signup
steps:
  - id: at
    send_email:
      subject: "Signed up at {{event.time}}"
      text: "{{event.type}} at {{event.time}}"
"#;
    let Some(app) = spawn_app(TestOptions::new(backend).workflow("time", wf)).await else {
        return;
    };
    app.accept(&at(
        new_signup(contact("c_time", "Ann")),
        "2026-11-24T11:00:00.5+01:00",
    ))
    .await;
    let email = app.wait_for_mails(1).await[0].parse();
    assert_eq!(email.subject, "Signed up at 2026-11-24T11:00:00.5+01:00");
    let text = email.text.unwrap();
    assert!(text.contains("at 2026-11-24T11:00:00.5+01:00"), "{text}");
    assert!(
        text.contains("new_signup") || text.contains("course.new_signup"),
        "{text}"
    );
}

/// The SMTP client keeps its connection to the relay: five emails one after another, one
/// connection (a relay counts connections per client; reconnecting per email is slow and rude).
async fn emails_one_after_another_share_one_smtp_connection(backend: Backend) {
    let Some(app) = spawn_app(welcome(backend)).await else {
        return;
    };
    for i in 1..=5 {
        app.accept(&offer_granted(
            contact(&format!("c_seq{i}"), "Ann"),
            "o_pro",
        ))
        .await;
        app.wait_for_mails(i).await;
    }
    assert_eq!(app.sink().connections(), 1);
    let rows = app.wait_for_status(5, MessageStatus::Sent).await;
    assert!(rows.iter().all(|m| m.attempts == 1), "{rows:#?}");
}

/// A relay that closed herald's idle connection (a restart, an idle timeout) costs the next email
/// no failed attempt and no retry delay: it goes out at once on a new connection.
async fn a_connection_the_relay_dropped_is_replaced_without_a_failed_attempt(backend: Backend) {
    let Some(app) = spawn_app(welcome(backend)).await else {
        return;
    };
    app.accept(&offer_granted(contact("c_before", "Ann"), "o_pro"))
        .await;
    app.wait_for_mails(1).await;
    // Restart the relay: the pooled connection is now closed at the far end.
    app.sink().stop().await;
    app.sink().resume().await;
    app.accept(&offer_granted(contact("c_after", "Bea"), "o_pro"))
        .await;
    app.wait_for_mails(2).await;
    let rows = app.wait_for_status(2, MessageStatus::Sent).await;
    assert!(rows.iter().all(|m| m.attempts == 1), "{rows:#?}");
    assert_eq!(app.sink().connections(), 2);
}
