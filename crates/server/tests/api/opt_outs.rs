//! Opt-outs: the unsubscribe link and the RFC 8058 one-click POST for email, inbound
//! SMS keywords behind Twilio's signature for SMS, and suppression of every later message to an
//! opted-out channel, including messages already queued.

use crate::helpers::*;
use crate::link_helpers::{ADMIN_TOKEN, no_redirect_client};
use crate::twilio_stub::*;
use herald_store::{Channel, MessageStatus};
use serde_json::{Value, json};
use std::time::Duration;

both_backends!(
    every_email_carries_the_unsubscribe_url_and_headers,
    unsubscribe_get_changes_nothing_and_one_click_post_opts_out,
    the_confirmation_pages_form_post_opts_out,
    forged_unsubscribe_tokens_are_refused,
    queued_and_held_emails_are_suppressed_after_unsubscribe,
    inbound_sms_needs_a_valid_twilio_signature,
    inbound_signature_covers_the_configured_public_url,
    sms_keywords_opt_out_and_back_in,
    stop_applies_to_every_contact_with_that_phone,
    queued_sms_is_suppressed_after_stop_and_start_resumes,
    unsubscribe_stops_marketing_but_not_transactional_email,
    a_mailbox_that_does_not_exist_gets_no_further_email,
    a_complaint_reported_by_the_provider_suppresses_the_address,
);

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// An email with the unsubscribe URL in both parts, a day's wait, another email and an SMS.
const COURSE: &str = r#"
name: Course emails
trigger:
  event: new_signup
steps:
  - id: hello
    send_email:
      subject: "Welcome"
      text: "Hi {{contact.first_name}}. Unsubscribe: <<unsubscribe_url>>"
      html: "<p>Hi {{contact.first_name}}</p><p><a href=\"<<unsubscribe_url>>\">Unsubscribe</a></p>"
  - wait: 1d
  - id: later
    send_email:
      subject: "A day later"
      text: "Still there?"
  - id: text
    send_sms:
      body: "A text a day later"
"#;

/// Sends between 12:00 and 13:00 UTC; the manual clock starts at 10:00, so a send waits 2 h.
const NOON: &str = r#"
name: Held until noon
trigger:
  event: new_signup
send_window:
  days: [mon, tue, wed, thu, fri, sat, sun]
  between: ["12:00", "13:00"]
  timezone: UTC
steps:
  - id: noon_mail
    send_email:
      subject: "Noon digest"
      text: "Lunch reading"
  - id: noon_text
    send_sms:
      body: "Noon text"
"#;

/// An SMS on every login (re-entry, so a learner may get several).
const LOGIN_SMS: &str = r#"
name: Login text
trigger:
  event: user_login
re_entry: true
steps:
  - id: login_text
    send_sms:
      body: "Welcome back {{contact.first_name}}"
"#;

fn user_login(contact: Value) -> Value {
    event("user_login", json!({ "contact": contact }))
}

async fn course_app(backend: Backend, stub: &TwilioStub) -> Option<TestApp> {
    spawn_app(
        TestOptions::new(backend)
            .manual_clock()
            .workflow("course", COURSE)
            .sms(stub.sender())
            .admin(),
    )
    .await
}

/// The unsubscribe URL a received email carries in `List-Unsubscribe`.
fn unsubscribe_url(mail: &herald_test_support::smtp::ReceivedMail) -> String {
    let email = mail.parse();
    let header = email
        .header("List-Unsubscribe")
        .unwrap_or_else(|| panic!("no List-Unsubscribe header: {:?}", email.headers));
    header
        .strip_prefix('<')
        .and_then(|h| h.strip_suffix('>'))
        .unwrap_or_else(|| panic!("List-Unsubscribe is not one <URL>: {header}"))
        .to_owned()
}

/// The path of an unsubscribe URL under the public URL.
fn path_of(url: &str) -> String {
    url.strip_prefix(PUBLIC_URL)
        .unwrap_or_else(|| panic!("{url} is not under {PUBLIC_URL}"))
        .to_owned()
}

/// The email received for `rcpt`.
fn mail_to(app: &TestApp, rcpt: &str) -> herald_test_support::smtp::ReceivedMail {
    app.sink()
        .received()
        .into_iter()
        .find(|m| m.rcpt_to == [rcpt])
        .unwrap_or_else(|| panic!("no email to {rcpt}"))
}

async fn get(app: &TestApp, path: &str) -> (u16, String) {
    let r = no_redirect_client()
        .get(app.url(path))
        .send()
        .await
        .expect("GET");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// A POST as a mail client sends it for RFC 8058: no cookies, the one-click body.
async fn one_click(app: &TestApp, path: &str) -> reqwest::Response {
    no_redirect_client()
        .post(app.url(path))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .expect("POST")
}

async fn every_email_carries_the_unsubscribe_url_and_headers(backend: Backend) {
    let stub = TwilioStub::start().await;
    let Some(app) = course_app(backend, &stub).await else {
        return;
    };
    app.accept(&new_signup(sms_contact("c_hdr", "Ann", "+15551240001")))
        .await;
    app.accept(&new_signup(contact("c_hdr2", "Bob"))).await;
    app.wait_for_mails(2).await;
    // Recorded before the clock jumps (a jump past a send's lease would free it again).
    app.settle().await;
    app.advance(DAY);
    app.wait_for_mails(4).await;
    let mut urls = Vec::new();
    for mail in app.sink().received() {
        let email = mail.parse();
        let url = unsubscribe_url(&mail);
        assert_eq!(
            email.header("List-Unsubscribe-Post"),
            Some("List-Unsubscribe=One-Click"),
            "{}: {:?}",
            email.subject,
            email.headers
        );
        assert!(
            url.starts_with(&format!("{PUBLIC_URL}/u/")) && url.len() > PUBLIC_URL.len() + 20,
            "{url}"
        );
        if email.subject == "Welcome" {
            // `<<unsubscribe_url>>` renders the very same URL.
            let text = email.text.clone().unwrap();
            assert!(text.contains(&format!("Unsubscribe: {url}")), "{text}");
            let html = email.html.clone().unwrap();
            assert!(html.contains(&format!("href=\"{url}\"")), "{html}");
        }
        urls.push((mail.rcpt_to[0].clone(), url));
    }
    urls.sort();
    // One URL per contact, the same on every email to it, different between contacts.
    assert_eq!(urls[0].1, urls[1].1, "{urls:#?}");
    assert_eq!(urls[2].1, urls[3].1, "{urls:#?}");
    assert_ne!(urls[0].1, urls[2].1, "{urls:#?}");
}

async fn unsubscribe_get_changes_nothing_and_one_click_post_opts_out(backend: Backend) {
    let stub = TwilioStub::start().await;
    let Some(app) = course_app(backend, &stub).await else {
        return;
    };
    app.accept(&new_signup(sms_contact("c_click", "Ann", "+15551240011")))
        .await;
    let mails = app.wait_for_mails(1).await;
    let path = path_of(&unsubscribe_url(&mails[0]));

    // A mail scanner fetching the link changes nothing.
    for _ in 0..3 {
        let (status, body) = get(&app, &path).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("<form") && body.to_lowercase().contains("method=\"post\""),
            "the page should offer a POST button: {body}"
        );
    }
    assert_eq!(app.opted_out_channels("c_click").await, []);

    let response = one_click(&app, &path).await;
    assert_eq!(
        response.status(),
        200,
        "RFC 8058: the one-click POST answers 2xx, never a redirect"
    );
    assert_eq!(app.opted_out_channels("c_click").await, [Channel::Email]);
    // Again: still 200, nothing more.
    assert_eq!(one_click(&app, &path).await.status(), 200);
    assert_eq!(app.opted_out_channels("c_click").await, [Channel::Email]);

    // The admin API lists it.
    let body: Value = app
        .client
        .get(app.url("/v1/contacts/c_click"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let opt_outs = body["opt_outs"].as_array().expect("opt_outs list");
    assert_eq!(opt_outs.len(), 1, "{body}");
    assert_eq!(opt_outs[0]["channel"], "email", "{body}");

    // The day-later email is suppressed; the SMS (another channel) still goes.
    app.advance(DAY);
    stub.wait_for_requests(1).await;
    app.settle().await;
    assert_eq!(
        app.sink().count(),
        1,
        "an email reached an opted-out contact"
    );
    let rows = app.messages_of("c_click").await;
    let later = rows.iter().find(|m| m.step_id == "later").unwrap();
    assert_eq!(later.status, MessageStatus::Suppressed, "{later:#?}");
    assert!(
        later
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("opted out")),
        "{later:#?}"
    );
    assert_eq!(later.sent_ms, None);
    let text = rows.iter().find(|m| m.step_id == "text").unwrap();
    assert_eq!(text.status, MessageStatus::Sent, "{text:#?}");
}

async fn the_confirmation_pages_form_post_opts_out(backend: Backend) {
    let stub = TwilioStub::start().await;
    let Some(app) = course_app(backend, &stub).await else {
        return;
    };
    app.accept(&new_signup(contact("c_form", "Ann"))).await;
    let mails = app.wait_for_mails(1).await;
    let path = path_of(&unsubscribe_url(&mails[0]));
    let (_, page) = get(&app, &path).await;
    let action = page
        .split("action=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no form action in {page}"))
        .replace("&amp;", "&");
    assert_eq!(action, path, "the form posts back to the same link");
    // A browser's form submission: an empty urlencoded body.
    let response = no_redirect_client()
        .post(app.url(&action))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let page = response.text().await.unwrap();
    assert!(page.to_lowercase().contains("unsubscribed"), "{page}");
    assert_eq!(app.opted_out_channels("c_form").await, [Channel::Email]);
}

async fn forged_unsubscribe_tokens_are_refused(backend: Backend) {
    let stub = TwilioStub::start().await;
    let Some(app) = course_app(backend, &stub).await else {
        return;
    };
    app.accept(&new_signup(contact("c_ann", "Ann"))).await;
    app.accept(&new_signup(contact("c_bob", "Bob"))).await;
    app.wait_for_mails(2).await;
    let ann = path_of(&unsubscribe_url(&mail_to(&app, "c_ann@example.com")));
    let bob = path_of(&unsubscribe_url(&mail_to(&app, "c_bob@example.com")));
    let ann_token = ann.strip_prefix("/u/").unwrap().to_owned();
    let bob_token = bob.strip_prefix("/u/").unwrap().to_owned();

    let mut forged = Vec::new();
    // One character changed, at the end and at the start.
    let flip = |s: &str, i: usize| {
        let mut chars: Vec<char> = s.chars().collect();
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        chars.into_iter().collect::<String>()
    };
    forged.push(flip(&ann_token, ann_token.len() - 1));
    forged.push(flip(&ann_token, 0));
    // Truncated.
    forged.push(ann_token[..ann_token.len() - 4].to_owned());
    // Ann's token with something appended.
    forged.push(format!("{ann_token}AAAA"));
    // Halves of two genuine tokens recombined, each way.
    if let (Some((a1, a2)), Some((b1, b2))) = (ann_token.split_once('.'), bob_token.split_once('.'))
    {
        forged.push(format!("{a1}.{b2}"));
        forged.push(format!("{b1}.{a2}"));
    }
    forged.push("Y19hbm4.AAAAAAAAAAAAAAAAAAAAAA".to_owned());
    forged.push("garbage".to_owned());
    for token in &forged {
        let path = format!("/u/{token}");
        let (status, body) = get(&app, &path).await;
        assert_eq!(status, 404, "GET of a forged token {token}: {body}");
        let response = one_click(&app, &path).await;
        assert_eq!(response.status(), 404, "POST of a forged token {token}");
    }
    assert_eq!(app.opted_out_channels("c_ann").await, []);
    assert_eq!(app.opted_out_channels("c_bob").await, []);

    // Bob's genuine link opts out Bob only.
    assert_eq!(one_click(&app, &bob).await.status(), 200);
    assert_eq!(app.opted_out_channels("c_bob").await, [Channel::Email]);
    assert_eq!(app.opted_out_channels("c_ann").await, []);
}

async fn queued_and_held_emails_are_suppressed_after_unsubscribe(backend: Backend) {
    let stub = TwilioStub::start().await;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("course", COURSE)
        .workflow("noon", NOON)
        .sms(stub.sender());
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&new_signup(sms_contact("c_held", "Ann", "+15551240021")))
        .await;
    let mails = app.wait_for_mails(1).await;
    app.settle().await;
    // The noon email and SMS are queued for 12:00 (visible as queued with their time).
    let rows = app.messages_of("c_held").await;
    let noon = rows.iter().find(|m| m.step_id == "noon_mail").unwrap();
    assert_eq!(noon.status, MessageStatus::Queued, "{noon:#?}");
    assert_eq!(noon.due_ms, Some(START + Duration::from_secs(2 * 3_600)));

    assert_eq!(
        one_click(&app, &path_of(&unsubscribe_url(&mails[0])))
            .await
            .status(),
        200
    );
    app.advance(2 * HOUR);
    stub.wait_for_requests(1).await;
    app.settle().await;
    app.advance(DAY);
    stub.wait_for_requests(2).await;
    app.settle().await;
    assert_eq!(
        app.sink().count(),
        1,
        "queued emails reached an opted-out contact"
    );
    let rows = app.messages_of("c_held").await;
    for step in ["noon_mail", "later"] {
        let m = rows.iter().find(|m| m.step_id == step).unwrap();
        assert_eq!(m.status, MessageStatus::Suppressed, "{step}: {m:#?}");
        assert!(m.reason.is_some(), "{m:#?}");
    }
    for step in ["noon_text", "text"] {
        let m = rows.iter().find(|m| m.step_id == step).unwrap();
        assert_eq!(
            m.status,
            MessageStatus::Sent,
            "{step}: SMS is another channel: {m:#?}"
        );
    }
}

#[test]
fn twilio_signature_matches_the_published_example() {
    // www.twilio.com/docs/usage/webhooks/webhooks-security: auth token 12345, this URL and these
    // fields sign to 0/KCTR6DLpKmkAf8muzZqo1nDgQ=. Checks the test's own implementation.
    let fields = [
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", "+12349013030"),
        ("Digits", "1234"),
        ("From", "+12349013030"),
        ("To", "+18005551212"),
    ];
    assert_eq!(
        twilio_signature(
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=2",
            &fields
        ),
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    );
    // The order the fields come in does not matter: they are sorted by name.
    let mut reversed = fields;
    reversed.reverse();
    assert_eq!(
        twilio_signature(
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=2",
            &reversed
        ),
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    );
}

async fn inbound_sms_needs_a_valid_twilio_signature(backend: Backend) {
    let stub = TwilioStub::start().await;
    let Some(app) = course_app(backend, &stub).await else {
        return;
    };
    let phone = "+15551240031";
    app.accept(&new_signup(sms_contact("c_sig", "Ann", phone)))
        .await;
    app.settle().await;
    let fields = inbound_fields(phone, "STOP");
    let url = app.inbound_url();
    assert_eq!(url, "http://herald.test/v1/sms/inbound");
    let good = twilio_signature(AUTH_TOKEN, &url, &fields);
    // Concatenated in the order posted instead of sorted.
    let unsorted = {
        use base64::Engine as _;
        use hmac::{Hmac, KeyInit, Mac};
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(AUTH_TOKEN.as_bytes()).unwrap();
        mac.update(url.as_bytes());
        for (k, v) in &fields {
            mac.update(k.as_bytes());
            mac.update(v.as_bytes());
        }
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    };
    assert_ne!(unsorted, good);
    let bad: Vec<(&str, Option<String>)> = vec![
        ("no signature", None),
        ("an empty signature", Some(String::new())),
        ("garbage", Some("bm90IGEgc2lnbmF0dXJl".into())),
        (
            "another auth token",
            Some(twilio_signature("wrong-token", &url, &fields)),
        ),
        (
            "https instead of http",
            Some(twilio_signature(
                AUTH_TOKEN,
                "https://herald.test/v1/sms/inbound",
                &fields,
            )),
        ),
        (
            "the listening address instead of the public URL",
            Some(twilio_signature(
                AUTH_TOKEN,
                &app.url("/v1/sms/inbound"),
                &fields,
            )),
        ),
        (
            "another body (tampered)",
            Some(twilio_signature(
                AUTH_TOKEN,
                &url,
                &inbound_fields(phone, "HELLO"),
            )),
        ),
        (
            "another sender (tampered)",
            Some(twilio_signature(
                AUTH_TOKEN,
                &url,
                &inbound_fields("+15559999999", "STOP"),
            )),
        ),
        ("fields not sorted", Some(unsorted)),
        ("the right one with a flipped character", {
            let mut s = good.clone().into_bytes();
            s[3] = if s[3] == b'A' { b'B' } else { b'A' };
            Some(String::from_utf8(s).unwrap())
        }),
    ];
    for (what, signature) in &bad {
        let response = app.post_inbound(&fields, signature.as_deref()).await;
        assert_eq!(response.status(), 403, "{what}");
        let text = response.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{what}: the 403 is not JSON ({e}): {text}"));
        assert!(body["error"].is_string(), "{what}: {body}");
        assert_eq!(
            app.opted_out_channels("c_sig").await,
            [],
            "{what}: a refused request changed something"
        );
    }
    // Twilio's own signature.
    let response = app.post_inbound(&fields, Some(&good)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(app.opted_out_channels("c_sig").await, [Channel::Sms]);
}

/// Twilio signs the URL it was configured with: herald's public URL (here behind a path prefix,
/// configured with a trailing slash), not the address it listens on.
async fn inbound_signature_covers_the_configured_public_url(backend: Backend) {
    let stub = TwilioStub::start().await;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .sms(stub.sender())
        .public_url("https://school.example.com/herald/");
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let phone = "+15551240081";
    app.accept(&event(
        "user_login",
        json!({"contact": sms_contact("c_url", "Ann", phone)}),
    ))
    .await;
    app.settle().await;
    let fields = inbound_fields(phone, "STOP");
    for url in [
        "https://school.example.com/v1/sms/inbound",
        "https://school.example.com/herald//v1/sms/inbound",
        "http://school.example.com/herald/v1/sms/inbound",
    ] {
        let signature = twilio_signature(AUTH_TOKEN, url, &fields);
        let response = app.post_inbound(&fields, Some(&signature)).await;
        assert_eq!(response.status(), 403, "signed over {url}");
    }
    assert_eq!(app.opted_out_channels("c_url").await, []);
    let signature = twilio_signature(
        AUTH_TOKEN,
        "https://school.example.com/herald/v1/sms/inbound",
        &fields,
    );
    let response = app.post_inbound(&fields, Some(&signature)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(app.opted_out_channels("c_url").await, [Channel::Sms]);
}

async fn sms_keywords_opt_out_and_back_in(backend: Backend) {
    let stub = TwilioStub::start().await;
    let Some(app) = course_app(backend, &stub).await else {
        return;
    };
    let phone = "+15551240041";
    app.accept(&new_signup(sms_contact("c_kw", "Ann", phone)))
        .await;
    app.settle().await;
    let stops = [
        "STOP",
        "stop",
        "  Stop  ",
        "STOPALL",
        "stopall",
        "UNSUBSCRIBE",
        "Unsubscribe",
        "CANCEL",
        "cancel\n",
        "END",
        "end",
        "QUIT",
        "Quit",
        "REVOKE",
        "revoke",
        "OPTOUT",
        "optout",
        "OPT OUT",
        "opt out",
        " Opt Out ",
    ];
    let starts = [
        "START", "start", " Start ", "YES", "yes", "UNSTOP", "Unstop",
    ];
    let not_keywords = [
        "STOP IT",
        "stopp",
        "please stop",
        "Hello",
        "",
        "YES PLEASE",
        "START NOW",
        "S T O P",
    ];
    for (i, stop) in stops.iter().enumerate() {
        app.text_in(phone, stop).await;
        assert_eq!(
            app.opted_out_channels("c_kw").await,
            [Channel::Sms],
            "{stop:?} should opt out"
        );
        // Ordinary replies change nothing while opted out.
        let other = not_keywords[i % not_keywords.len()];
        app.text_in(phone, other).await;
        assert_eq!(
            app.opted_out_channels("c_kw").await,
            [Channel::Sms],
            "{other:?} is no keyword"
        );
        let start = starts[i % starts.len()];
        app.text_in(phone, start).await;
        assert_eq!(
            app.opted_out_channels("c_kw").await,
            [],
            "{start:?} should opt back in"
        );
    }
    // Nor while opted in.
    for other in not_keywords {
        app.text_in(phone, other).await;
        assert_eq!(
            app.opted_out_channels("c_kw").await,
            [],
            "{other:?} is no keyword"
        );
    }
    // STOP twice is still one opt-out; START undoes it.
    app.text_in(phone, "STOP").await;
    app.text_in(phone, "STOP").await;
    assert_eq!(app.opted_out_channels("c_kw").await, [Channel::Sms]);
    app.text_in(phone, "START").await;
    assert_eq!(app.opted_out_channels("c_kw").await, []);
    app.settle().await;
}

async fn stop_applies_to_every_contact_with_that_phone(backend: Backend) {
    let stub = TwilioStub::start().await;
    let Some(app) = course_app(backend, &stub).await else {
        return;
    };
    let shared = "+15551240051";
    app.accept_batch(&[
        new_signup(sms_contact("c_p1", "Ann", shared)),
        new_signup(sms_contact("c_p2", "Bob", shared)),
        new_signup(sms_contact("c_p3", "Cy", "+15551240052")),
    ])
    .await;
    app.settle().await;
    app.text_in(shared, "STOP").await;
    assert_eq!(app.opted_out_channels("c_p1").await, [Channel::Sms]);
    assert_eq!(app.opted_out_channels("c_p2").await, [Channel::Sms]);
    assert_eq!(app.opted_out_channels("c_p3").await, []);
    // Their emails go on: the day-later email reaches both, their SMS do not.
    app.advance(DAY);
    stub.wait_for_requests(1).await;
    app.wait_for_mails(6).await;
    app.settle().await;
    let requests = stub.requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(requests[0].to.as_deref(), Some("+15551240052"));
    for id in ["c_p1", "c_p2"] {
        let rows = app.messages_of(id).await;
        let text = rows.iter().find(|m| m.step_id == "text").unwrap();
        assert_eq!(text.status, MessageStatus::Suppressed, "{id}: {text:#?}");
        let later = rows.iter().find(|m| m.step_id == "later").unwrap();
        assert_eq!(later.status, MessageStatus::Sent, "{id}: {later:#?}");
    }
}

async fn queued_sms_is_suppressed_after_stop_and_start_resumes(backend: Backend) {
    let stub = TwilioStub::start().await;
    let base = Duration::from_secs(10);
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("noon", NOON)
        .workflow("login", LOGIN_SMS)
        .sms(stub.sender())
        .retries(base, base, 8);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    // Held by the send window: queued for 12:00.
    let held_phone = "+15551240061";
    app.accept(&new_signup(sms_contact("c_window", "Ann", held_phone)))
        .await;
    // In the retry queue: the first attempt got a 500.
    let retry_phone = "+15551240062";
    stub.reply_next(&[Reply::status(500)]);
    app.accept(&user_login(sms_contact("c_retrying", "Bob", retry_phone)))
        .await;
    stub.wait_for_requests(1).await;
    app.settle().await;
    let queued = |rows: &[herald_store::MessageRow], step: &str| {
        rows.iter()
            .find(|m| m.step_id == step)
            .unwrap_or_else(|| panic!("no {step}: {rows:#?}"))
            .clone()
    };
    let held = queued(&app.messages_of("c_window").await, "noon_text");
    assert_eq!(held.status, MessageStatus::Queued, "{held:#?}");
    let retrying = queued(&app.messages_of("c_retrying").await, "login_text");
    assert_eq!(retrying.status, MessageStatus::Queued, "{retrying:#?}");
    assert_eq!(retrying.attempts, 1);

    app.text_in(held_phone, "STOP").await;
    app.text_in(retry_phone, "stop").await;
    app.advance(2 * HOUR);
    app.settle().await;
    assert_eq!(
        stub.count(),
        1,
        "an opted-out contact got an SMS: {:#?}",
        stub.requests()
    );
    for (id, step) in [("c_window", "noon_text"), ("c_retrying", "login_text")] {
        let m = queued(&app.messages_of(id).await, step);
        assert_eq!(m.status, MessageStatus::Suppressed, "{id}: {m:#?}");
        assert!(
            m.reason.as_deref().is_some_and(|r| r.contains("opted out")),
            "{id}: {m:#?}"
        );
        assert_eq!(m.sent_ms, None);
    }
    // The held email of the same window was not affected by an SMS opt-out.
    let mails = app.wait_for_mails(1).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].rcpt_to, ["c_window@example.com"]);

    // START, and the next login's SMS goes again.
    app.text_in(retry_phone, "START").await;
    app.accept(&user_login(sms_contact("c_retrying", "Bob", retry_phone)))
        .await;
    let requests = stub.wait_for_requests(2).await;
    assert_eq!(requests[1].to.as_deref(), Some(retry_phone));
    assert!(
        requests[1]
            .body
            .as_deref()
            .is_some_and(|b| b.starts_with("Welcome back Bob")),
        "{requests:#?}"
    );
    app.settle().await;
    assert_eq!(stub.count(), 2);
    stub.assert_well_formed();
}

/// A suppressed (or delivery-time skipped) message was never tried, so it counts no attempt in
/// the admin API.
mod suppression_counts_no_attempt {
    use crate::helpers::Backend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::suppression_counts_no_attempt(Backend::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::suppression_counts_no_attempt(Backend::Postgres).await
    }
}

async fn suppression_counts_no_attempt(backend: Backend) {
    let stub = TwilioStub::start().await;
    let base = Duration::from_secs(10);
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("noon", NOON)
        .workflow("login", LOGIN_SMS)
        .sms(stub.sender())
        .retries(base, base, 8);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&new_signup(sms_contact("c_held0", "Ann", "+15551240071")))
        .await;
    stub.reply_next(&[Reply::status(500)]);
    app.accept(&user_login(sms_contact("c_tried1", "Bob", "+15551240072")))
        .await;
    stub.wait_for_requests(1).await;
    app.settle().await;
    app.text_in("+15551240071", "STOP").await;
    app.text_in("+15551240072", "STOP").await;
    app.advance(2 * HOUR);
    app.settle().await;
    for (id, step, attempts) in [("c_held0", "noon_text", 0), ("c_tried1", "login_text", 1)] {
        let rows = app.messages_of(id).await;
        let m = rows.iter().find(|m| m.step_id == step).unwrap();
        assert_eq!(m.status, MessageStatus::Suppressed, "{id}: {m:#?}");
        assert_eq!(
            m.attempts, attempts,
            "{id}: suppression is no send attempt: {m:#?}"
        );
    }
}

/// Access and receipts are not marketing: after an unsubscribe, a `category: transactional`
/// workflow's email still goes out, while a marketing one (the default) is suppressed.
async fn unsubscribe_stops_marketing_but_not_transactional_email(backend: Backend) {
    const ACCESS: &str = r#"
name: Your access
category: transactional
trigger:
  event: offer_access_granted
steps:
  - id: access
    send_email:
      subject: "Your access to {{offer.title}}"
      text: "Start here"
"#;
    const PROMO: &str = r#"
name: Promotion
trigger:
  event: offer_access_granted
steps:
  - id: promo
    send_email:
      subject: "Our next course"
      text: "Have a look"
"#;
    let opts = TestOptions::new(backend)
        .workflow("hello", COURSE)
        .workflow("access", ACCESS)
        .workflow("promo", PROMO);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let ann = contact("c_tx", "Ann");
    app.accept(&new_signup(ann.clone())).await;
    let mails = app.wait_for_mails(1).await;
    let path = path_of(&unsubscribe_url(&mails[0]));
    // The page says what stops and what still comes (the transactional workflow, by name).
    let (status, page) = get(&app, &path).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Stop marketing email"), "{page}");
    assert!(
        page.contains("<li>Your access</li>") && page.contains("sign-in links"),
        "{page}"
    );
    assert!(!page.contains("Promotion"), "{page}");
    assert_eq!(one_click(&app, &path).await.status(), 200);
    assert_eq!(app.opted_out_channels("c_tx").await, [Channel::Email]);

    app.accept(&offer_granted(ann, "o_pro")).await;
    app.settle().await;
    let by_step: std::collections::BTreeMap<String, MessageStatus> = app
        .messages_of("c_tx")
        .await
        .into_iter()
        .map(|m| (m.step_id, m.status))
        .collect();
    assert_eq!(by_step["access"], MessageStatus::Sent, "{by_step:?}");
    assert_eq!(by_step["promo"], MessageStatus::Suppressed, "{by_step:?}");
    let subjects: Vec<String> = app
        .sink()
        .received()
        .iter()
        .map(|m| m.parse().subject)
        .collect();
    assert_eq!(subjects, ["Welcome", "Your access to Rust Pro"]);
}

/// A 550 5.1.1 (no such mailbox) suppresses the address: that message is `suppressed` with reason
/// bounced, the contact is opted out of email, and later emails are not attempted.
async fn a_mailbox_that_does_not_exist_gets_no_further_email(backend: Backend) {
    const TWO_EMAILS: &str = r#"
name: Welcome and a reminder
trigger:
  event: offer_access_granted
steps:
  - id: welcome
    send_email:
      subject: "Welcome"
      text: "Hi"
  - wait: 1d
  - id: reminder
    send_email:
      subject: "Reminder"
      text: "Still there?"
"#;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("welcome", TWO_EMAILS);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.sink()
        .fail_next(1, herald_test_support::smtp::Stage::Rcpt, 550);
    app.accept(&offer_granted(contact("c_nomailbox", "Ann"), "o_pro"))
        .await;
    let rows = app.wait_for_status(1, MessageStatus::Suppressed).await;
    assert!(
        rows[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("bounced") && r.contains("5.1.1")),
        "{rows:?}"
    );
    assert_eq!(rows[0].attempts, 1, "it was tried once");
    assert_eq!(
        app.opted_out_channels("c_nomailbox").await,
        [Channel::Email]
    );

    app.advance(2 * DAY);
    app.settle().await;
    let messages = app.messages_of("c_nomailbox").await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(
        messages
            .iter()
            .all(|m| m.status == MessageStatus::Suppressed),
        "{messages:?}"
    );
    assert_eq!(app.sink().count(), 0);
    assert_eq!(
        app.sink().refusals().len(),
        1,
        "the reminder was never attempted"
    );
}

async fn a_complaint_reported_by_the_provider_suppresses_the_address(backend: Backend) {
    let opts = TestOptions::new(backend)
        .admin_token(ADMIN_TOKEN)
        .workflow("signup", &one_email_workflow("new_signup", "Hi", false))
        .workflow(
            "lesson",
            &one_email_workflow("lesson_completed", "Well done", false),
        );
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let ann = contact("c_complains", "Ann");
    app.accept(&new_signup(ann.clone())).await;
    app.wait_for_mails(1).await;
    let post = |body: Value| {
        app.client
            .post(app.url("/v1/suppressions"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let r = post(json!({"email": "C_Complains@Example.com", "reason": "complaint"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["contacts"], json!(["c_complains"]), "{body}");
    assert_eq!(
        app.opted_out_channels("c_complains").await,
        [Channel::Email]
    );

    app.accept(&lesson_completed(ann, "p_rust101", "Ownership"))
        .await;
    app.settle().await;
    let statuses: Vec<MessageStatus> = app
        .messages_of("c_complains")
        .await
        .into_iter()
        .map(|m| m.status)
        .collect();
    assert!(
        statuses.contains(&MessageStatus::Suppressed),
        "{statuses:?}"
    );
    assert_eq!(app.sink().count(), 1, "nothing after the complaint");

    // Bad requests are refused with a reason; nothing changes.
    for bad in [
        json!({"email": "x@example.com"}),
        json!({"email": "x@example.com", "reason": "spam"}),
        json!({"email": "no-at-sign", "reason": "bounced"}),
        json!({"email": "x@example.com", "reason": "bounced", "extra": 1}),
    ] {
        let r = post(bad.clone()).await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].is_string(), "{body}");
    }
}
