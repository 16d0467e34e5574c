//! SMS out through a Twilio-compatible provider: the wire format, the opt-out line
//! on a contact's first SMS, segment counts, E.164 validation, the dev mailbox fallback, and the
//! classification of every provider answer (retries with backoff on a manual clock, Retry-After,
//! permanent 4xx, the provider down, giving up).

use crate::helpers::*;
use crate::twilio_stub::*;
use herald_store::{Channel, MessageRow, MessageStatus, RunState};
use std::time::Duration;

both_backends!(
    sms_reaches_the_provider_in_twilio_form,
    opt_out_line_only_on_a_contacts_first_sms,
    two_sms_queued_together_carry_the_opt_out_line_once,
    segments_are_counted_per_message,
    invalid_phone_is_skipped_and_the_run_goes_on,
    without_a_provider_sms_go_to_the_dev_mailbox,
    transient_provider_errors_retry_with_exponential_backoff,
    retry_after_is_honoured,
    a_lost_answer_is_retried_under_the_same_key_and_delivered_once,
    provider_client_errors_fail_at_once,
    provider_down_is_retried_until_it_is_back,
    gives_up_after_max_attempts,
);

const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);

/// One SMS on `new_signup` whose body is the contact's first name (so each test chooses it).
const NAME_SMS: &str = r#"
name: The first name as an SMS
trigger:
  event: new_signup
steps:
  - id: text
    send_sms:
      body: "{{contact.first_name}}"
"#;

const WELCOME_SMS: &str = r#"
name: Welcome by SMS
trigger:
  event: new_signup
steps:
  - id: hello
    send_sms:
      body: "Hi {{contact.first_name}}, welcome to Rust School"
"#;

async fn sms_app(backend: Backend, yaml: &str, stub: &TwilioStub) -> Option<TestApp> {
    spawn_app(
        TestOptions::new(backend)
            .manual_clock()
            .workflow("texts", yaml)
            .sms(stub.sender()),
    )
    .await
}

/// The one message of a contact.
async fn only_message(app: &TestApp, contact_id: &str) -> MessageRow {
    let rows = app.messages_of(contact_id).await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    rows.into_iter().next().unwrap()
}

/// Waits until the contact's one message has been attempted `attempts` times.
async fn wait_for_attempts(app: &TestApp, contact_id: &str, attempts: i64) -> MessageRow {
    let mut last = None;
    let ok = eventually(async || {
        let rows = app.messages_of(contact_id).await;
        let done = rows.first().is_some_and(|m| m.attempts >= attempts);
        last = rows.into_iter().next();
        done
    })
    .await;
    assert!(
        ok,
        "the message of {contact_id} never reached {attempts} attempts: {last:#?}"
    );
    last.unwrap()
}

async fn sms_reaches_the_provider_in_twilio_form(backend: Backend) {
    let stub = TwilioStub::start().await;
    let Some(app) = sms_app(backend, WELCOME_SMS, &stub).await else {
        return;
    };
    app.accept(&new_signup(sms_contact("c_sms", "Ann", "+15551230001")))
        .await;
    let rows = app.wait_for_status(1, MessageStatus::Sent).await;
    let requests = stub.wait_for_requests(1).await;
    stub.assert_well_formed();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    let r = &requests[0];
    assert_eq!(r.to.as_deref(), Some("+15551230001"));
    assert_eq!(r.from.as_deref(), Some(SMS_FROM));
    assert_eq!(
        r.body.as_deref(),
        Some(format!("Hi Ann, welcome to Rust School\n{OPT_OUT_LINE}").as_str()),
        "the first SMS to a contact ends with the opt-out line on a line of its own"
    );

    let m = &rows[0];
    assert_eq!(m.channel, Channel::Sms);
    assert_eq!(m.recipient.as_deref(), Some("+15551230001"));
    assert_eq!(m.attempts, 1);
    assert_eq!(m.reason, None, "{m:#?}");
    assert_eq!(m.provider_id, r.sid, "the provider's sid is stored");
    assert!(m.provider_id.is_some());
    assert_eq!(m.sent_ms, Some(START));
    assert_eq!(m.segments, Some(1));
    assert_eq!(
        r.idempotency_key.as_deref(),
        Some(m.id.as_str()),
        "the Idempotency-Key is the message's id"
    );

    app.settle().await;
    assert_eq!(stub.count(), 1, "one SMS step, one request");
    let runs = app.runs_of("c_sms").await;
    assert_eq!(runs[0].state, RunState::Completed, "{runs:#?}");
}

async fn opt_out_line_only_on_a_contacts_first_sms(backend: Backend) {
    let wf = r#"
name: Two texts an hour apart
trigger:
  event: new_signup
steps:
  - id: first
    send_sms:
      body: "First for {{contact.first_name}}"
  - wait: 1h
  - id: second
    send_sms:
      body: "Second for {{contact.first_name}}"
"#;
    let stub = TwilioStub::start().await;
    let Some(app) = sms_app(backend, wf, &stub).await else {
        return;
    };
    app.accept(&new_signup(sms_contact("c_one", "Ann", "+15551230011")))
        .await;
    stub.wait_for_requests(1).await;
    app.wait_for_status(1, MessageStatus::Sent).await;
    app.settle().await;
    app.advance(HOUR);
    stub.wait_for_requests(2).await;
    app.wait_for_status(2, MessageStatus::Sent).await;
    // A second contact's first SMS carries the line again.
    app.accept(&new_signup(sms_contact("c_two", "Bob", "+15551230012")))
        .await;
    stub.wait_for_requests(3).await;
    app.settle().await;
    stub.assert_well_formed();

    let bodies: Vec<(String, String)> = stub
        .requests()
        .into_iter()
        .map(|r| (r.to.unwrap(), r.body.unwrap()))
        .collect();
    assert_eq!(
        bodies,
        [
            (
                "+15551230011".to_owned(),
                format!("First for Ann\n{OPT_OUT_LINE}")
            ),
            ("+15551230011".to_owned(), "Second for Ann".to_owned()),
            (
                "+15551230012".to_owned(),
                format!("First for Bob\n{OPT_OUT_LINE}")
            ),
        ]
    );
}

/// Two SMS steps in a row are queued in the same transaction and claimed in the same batch:
/// only the first is the contact's first SMS.
async fn two_sms_queued_together_carry_the_opt_out_line_once(backend: Backend) {
    let wf = r#"
name: Two texts at once
trigger:
  event: new_signup
steps:
  - id: first
    send_sms:
      body: "First for {{contact.first_name}}"
  - id: second
    send_sms:
      body: "Second for {{contact.first_name}}"
"#;
    let stub = TwilioStub::start().await;
    let Some(app) = sms_app(backend, wf, &stub).await else {
        return;
    };
    app.accept(&new_signup(sms_contact("c_pair", "Ann", "+15551230013")))
        .await;
    stub.wait_for_requests(2).await;
    app.settle().await;
    stub.assert_well_formed();
    let with_line: Vec<String> = stub
        .requests()
        .into_iter()
        .filter_map(|r| r.body)
        .filter(|b| b.ends_with(OPT_OUT_LINE))
        .collect();
    assert_eq!(
        with_line.len(),
        1,
        "the opt-out line belongs on the contact's first SMS only: {:#?}",
        stub.requests()
    );
}

async fn segments_are_counted_per_message(backend: Backend) {
    let stub = TwilioStub::start().await;
    let Some(app) = sms_app(backend, NAME_SMS, &stub).await else {
        return;
    };
    // The first SMS gets "\nReply STOP to opt out" (22 GSM-7 characters) appended, so a body of
    // 138 characters is 160 in all.
    let line = 1 + OPT_OUT_LINE.chars().count();
    assert_eq!(line, 22);
    let a = |n: usize| "a".repeat(n);
    let cases: Vec<(&str, String, i64)> = vec![
        // GSM-7: 160 in one message, 153 per segment when concatenated.
        ("g160", a(138), 1),
        ("g161", a(139), 2),
        ("g306", a(284), 2),
        ("g307", a(285), 3),
        // Extension characters (€ [ ] { } ~ ^ | \) take two septets.
        ("e160", format!("€{}", a(136)), 1),
        ("e161", format!("€{}", a(137)), 2),
        ("x160", format!("[]{}", a(134)), 1),
        ("x161", format!("[]{}", a(135)), 2),
        // One character outside GSM-7 makes the whole message UCS-2: 70, then 67 per segment.
        ("u70", format!("ł{}", a(47)), 1),
        ("u71", format!("ł{}", a(48)), 2),
        ("u134", format!("ł{}", a(111)), 2),
        ("u135", format!("ł{}", a(112)), 3),
        // GSM-7's own accented letters keep it GSM-7.
        ("accents", format!("é{}", a(137)), 1),
    ];
    for (i, (id, body, _)) in cases.iter().enumerate() {
        app.accept(&new_signup(sms_contact(
            &format!("c_{id}"),
            body,
            &format!("+1555200{i:04}"),
        )))
        .await;
    }
    app.wait_for_status(cases.len(), MessageStatus::Sent).await;
    app.settle().await;
    stub.assert_well_formed();
    let requests = stub.requests();
    assert_eq!(requests.len(), cases.len());
    let mut wrong = Vec::new();
    for (i, (id, body, expected)) in cases.iter().enumerate() {
        let to = format!("+1555200{i:04}");
        let sent = requests
            .iter()
            .find(|r| r.to.as_deref() == Some(to.as_str()))
            .unwrap_or_else(|| panic!("no SMS to {to}"));
        assert_eq!(
            sent.body.as_deref(),
            Some(format!("{body}\n{OPT_OUT_LINE}").as_str()),
            "{id}"
        );
        let m = only_message(&app, &format!("c_{id}")).await;
        if m.segments != Some(*expected) {
            wrong.push(format!(
                "{id}: {} characters, expected {expected} segments, recorded {:?}",
                body.chars().count() + line,
                m.segments
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "wrong segment counts:\n{}",
        wrong.join("\n")
    );
}

async fn invalid_phone_is_skipped_and_the_run_goes_on(backend: Backend) {
    let wf = r#"
name: SMS, then email
trigger:
  event: new_signup
steps:
  - id: text
    send_sms:
      body: "Hi {{contact.first_name}}"
  - id: mail
    send_email:
      subject: "Welcome"
      text: "Hi {{contact.first_name}}"
"#;
    let stub = TwilioStub::start().await;
    let Some(app) = sms_app(backend, wf, &stub).await else {
        return;
    };
    let bad = [
        ("c_dashes", "555-123-4567"),
        ("c_noplus", "15551234567"),
        ("c_zero", "+0123456789"),
        ("c_long", "+1234567890123456"),
        ("c_letters", "+1555CALLNOW"),
    ];
    for (id, phone) in bad {
        app.accept(&new_signup(sms_contact(id, "Ann", phone))).await;
    }
    app.accept(&new_signup(contact("c_nophone", "Bob"))).await;
    app.wait_for_mails(bad.len() + 1).await;
    app.settle().await;
    assert_eq!(stub.count(), 0, "an invalid phone reached the provider");
    for id in bad
        .iter()
        .map(|(id, _)| *id)
        .chain(std::iter::once("c_nophone"))
    {
        let rows = app.messages_of(id).await;
        let sms = rows
            .iter()
            .find(|m| m.step_id == "text")
            .unwrap_or_else(|| panic!("{id}: no SMS message recorded: {rows:#?}"));
        assert_eq!(sms.status, MessageStatus::Skipped, "{id}: {sms:#?}");
        let reason = sms.reason.clone().unwrap_or_default();
        assert!(
            reason.contains("phone") || reason.contains("E.164"),
            "{id}: the reason should name the phone: {reason:?}"
        );
        assert_eq!(
            sms.attempts, 0,
            "{id}: a skipped message is never attempted"
        );
        let mail = rows.iter().find(|m| m.step_id == "mail").unwrap();
        assert_eq!(mail.status, MessageStatus::Sent, "{id}: the run went on");
        let runs = app.runs_of(id).await;
        assert_eq!(runs[0].state, RunState::Completed, "{id}: {runs:#?}");
    }
}

async fn without_a_provider_sms_go_to_the_dev_mailbox(backend: Backend) {
    let opts = TestOptions::new(backend)
        .manual_clock()
        .without_smtp()
        .workflow("texts", WELCOME_SMS);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&new_signup(sms_contact("c_dev", "Ann", "+15551230021")))
        .await;
    let rows = app.wait_for_status(1, MessageStatus::Sent).await;
    app.settle().await;
    let m = &rows[0];
    assert_eq!(m.segments, Some(1));
    assert_eq!(m.provider_id, None);
    let items: Vec<_> = app
        .store
        .mailbox(10)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.channel == Channel::Sms)
        .collect();
    assert_eq!(items.len(), 1, "{items:#?}");
    assert_eq!(items[0].recipient, "+15551230021");
    assert_eq!(
        items[0].text_body.as_deref(),
        Some(format!("Hi Ann, welcome to Rust School\n{OPT_OUT_LINE}").as_str())
    );
}

/// 500, 429 without Retry-After, 503 without it and 502 are transient: each is retried after an
/// exponentially growing, jittered delay (never sooner), with the same Idempotency-Key and body.
async fn transient_provider_errors_retry_with_exponential_backoff(backend: Backend) {
    let stub = TwilioStub::start().await;
    let base = Duration::from_secs(10);
    let cap = Duration::from_secs(60);
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("texts", WELCOME_SMS)
        .sms(stub.sender())
        .retries(base, cap, 8);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let failures = [500u16, 429, 503, 502];
    stub.reply_next(&failures.map(Reply::status));
    app.accept(&new_signup(sms_contact("c_retry", "Ann", "+15551230031")))
        .await;
    for (k, code) in failures.iter().enumerate() {
        let attempt = k as i64 + 1;
        let m = wait_for_attempts(&app, "c_retry", attempt).await;
        assert_eq!(m.status, MessageStatus::Queued, "after a {code}: {m:#?}");
        let reason = m.reason.clone().unwrap_or_default();
        assert!(
            reason.contains(&code.to_string()),
            "the reason should carry the provider's answer {code}: {reason:?}"
        );
        let now = app.clock.now();
        let delay = m
            .due_ms
            .expect("a retried message has a due time")
            .since(now);
        let full = base.saturating_mul(1 << k).min(cap);
        assert!(
            delay >= full / 2 && delay <= full,
            "retry {attempt} after a {code}: delay {delay:?} not within [{:?}, {full:?}]",
            full / 2
        );
        // Not a millisecond sooner.
        app.advance(delay - Duration::from_millis(1));
        app.settle().await;
        assert_eq!(
            stub.count(),
            k + 1,
            "retried before the backoff delay was over"
        );
        app.advance(Duration::from_millis(1));
        stub.wait_for_requests(k + 2).await;
    }
    let rows = app.wait_for_status(1, MessageStatus::Sent).await;
    app.settle().await;
    stub.assert_well_formed();
    let requests = stub.requests();
    assert_eq!(requests.len(), 5, "{requests:#?}");
    let m = &rows[0];
    assert_eq!(m.attempts, 5);
    assert_eq!(m.provider_id, requests[4].sid);
    assert!(m.provider_id.is_some());
    assert_eq!(m.sent_ms, Some(app.clock.now()));
    for r in &requests {
        assert_eq!(
            r.idempotency_key.as_deref(),
            Some(m.id.as_str()),
            "every attempt carries the same Idempotency-Key"
        );
        assert_eq!(r.body, requests[0].body, "a retry changed the body");
    }
    assert_eq!(
        requests[0].body.as_deref(),
        Some(format!("Hi Ann, welcome to Rust School\n{OPT_OUT_LINE}").as_str())
    );
}

/// A 429 or 503 with `Retry-After: N` is retried no sooner than N seconds, even when N is far
/// beyond the backoff cap.
async fn retry_after_is_honoured(backend: Backend) {
    let stub = TwilioStub::start().await;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("texts", WELCOME_SMS)
        .sms(stub.sender())
        .retries(SECOND, 4 * SECOND, 8);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    for (i, (status, after)) in [(429u16, 120u64), (503, 30)].into_iter().enumerate() {
        let id = format!("c_after_{status}");
        let before = stub.count();
        stub.reply_next(&[Reply::retry_after(status, after)]);
        app.accept(&new_signup(sms_contact(
            &id,
            "Ann",
            &format!("+1555123004{i}"),
        )))
        .await;
        let m = wait_for_attempts(&app, &id, 1).await;
        assert_eq!(m.status, MessageStatus::Queued, "{m:#?}");
        let now = app.clock.now();
        let delay = m.due_ms.unwrap().since(now);
        assert!(
            delay >= Duration::from_secs(after),
            "{status} with Retry-After: {after} retried after {delay:?}"
        );
        assert!(
            delay <= Duration::from_secs(after + 4),
            "{status} with Retry-After: {after}: delay {delay:?} is far beyond it"
        );
        app.advance(delay - Duration::from_millis(1));
        app.settle().await;
        assert_eq!(
            stub.count(),
            before + 1,
            "retried before Retry-After ({after} s) was over"
        );
        app.advance(Duration::from_millis(1));
        stub.wait_for_requests(before + 2).await;
        wait_for("the retry to be recorded as sent", async || {
            only_message(&app, &id).await.status == MessageStatus::Sent
        })
        .await;
        assert_eq!(only_message(&app, &id).await.attempts, 2);
    }
    stub.assert_well_formed();
}

/// The provider took the message but its answer was lost (a 502 from a proxy): herald retries,
/// with the same Idempotency-Key, so the provider recognises the message and the learner gets
/// one SMS; herald records the provider's sid of that one message.
async fn a_lost_answer_is_retried_under_the_same_key_and_delivered_once(backend: Backend) {
    let stub = TwilioStub::start().await;
    let base = Duration::from_secs(10);
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("texts", WELCOME_SMS)
        .sms(stub.sender())
        .retries(base, base, 8);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    stub.reply_next(&[Reply::lost_answer(502)]);
    app.accept(&new_signup(sms_contact("c_lost", "Ann", "+15551230081")))
        .await;
    let m = wait_for_attempts(&app, "c_lost", 1).await;
    assert_eq!(
        m.status,
        MessageStatus::Queued,
        "a 502 is transient: {m:#?}"
    );
    app.advance(base);
    stub.wait_for_requests(2).await;
    let rows = app.wait_for_status(1, MessageStatus::Sent).await;
    app.settle().await;
    stub.assert_well_formed();
    let requests = stub.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    assert_eq!(
        requests[0].idempotency_key, requests[1].idempotency_key,
        "the retry must carry the same Idempotency-Key"
    );
    assert_eq!(requests[0].body, requests[1].body);
    let delivered = stub.delivered();
    assert_eq!(delivered.len(), 1, "the learner got two SMS: {requests:#?}");
    assert_eq!(rows[0].provider_id, delivered[0].sid);
    assert_eq!(rows[0].attempts, 2);
}

/// A provider's 4xx other than 429 is permanent: failed at once with the provider's answer as
/// the reason, never retried.
async fn provider_client_errors_fail_at_once(backend: Backend) {
    let stub = TwilioStub::start().await;
    let Some(app) = sms_app(backend, WELCOME_SMS, &stub).await else {
        return;
    };
    let codes = [400u16, 404, 403];
    for (i, code) in codes.iter().enumerate() {
        stub.reply_next(&[Reply::status(*code)]);
        let id = format!("c_{code}");
        app.accept(&new_signup(sms_contact(
            &id,
            "Ann",
            &format!("+1555123005{i}"),
        )))
        .await;
        wait_for(&format!("the {code} message to fail"), async || {
            app.messages_of(&id)
                .await
                .first()
                .is_some_and(|m| m.status == MessageStatus::Failed)
        })
        .await;
        let m = only_message(&app, &id).await;
        assert_eq!(m.attempts, 1, "{m:#?}");
        assert_eq!(m.sent_ms, None);
        assert_eq!(m.provider_id, None);
        assert_eq!(m.due_ms, None, "a failed message is not due again: {m:#?}");
        let reason = m.reason.unwrap_or_default();
        assert!(
            reason.contains(&code.to_string()),
            "the reason should carry the provider's answer: {reason:?}"
        );
        assert!(
            reason.contains("Injected by the test stub"),
            "the reason should carry the provider's message: {reason:?}"
        );
    }
    app.advance(24 * HOUR);
    app.settle().await;
    assert_eq!(stub.count(), codes.len(), "a permanent failure was retried");
    stub.assert_well_formed();
}

/// Connection refused is transient: retried until the provider is back, then sent once.
async fn provider_down_is_retried_until_it_is_back(backend: Backend) {
    let stub = TwilioStub::start().await;
    let base = Duration::from_secs(10);
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("texts", WELCOME_SMS)
        .sms(stub.sender())
        .retries(base, base, 100);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    stub.stop().await;
    app.accept(&new_signup(sms_contact("c_down", "Ann", "+15551230061")))
        .await;
    for attempt in 1..=3 {
        let m = wait_for_attempts(&app, "c_down", attempt).await;
        assert_eq!(m.status, MessageStatus::Queued, "{m:#?}");
        assert!(
            m.reason.as_deref().is_some_and(|r| !r.is_empty()),
            "a retried message says why: {m:#?}"
        );
        app.advance(base);
    }
    stub.resume().await;
    let rows = app.wait_for_status(1, MessageStatus::Sent).await;
    app.settle().await;
    let m = &rows[0];
    assert!(m.attempts >= 4, "{m:#?}");
    assert_eq!(stub.count(), 1, "{:#?}", stub.requests());
    assert_eq!(m.provider_id, stub.requests()[0].sid);
    stub.assert_well_formed();
}

async fn gives_up_after_max_attempts(backend: Backend) {
    let stub = TwilioStub::start().await;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("texts", WELCOME_SMS)
        .sms(stub.sender())
        .retries(SECOND, 2 * SECOND, 3);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    stub.reply_always(Some(Reply::status(500)));
    app.accept(&new_signup(sms_contact("c_giveup", "Ann", "+15551230071")))
        .await;
    // The clock moves only once an attempt is recorded: moving it while a send is in flight
    // would run out that claim's lease and send the message twice.
    for attempt in 1..=2 {
        let m = wait_for_attempts(&app, "c_giveup", attempt).await;
        assert_eq!(m.status, MessageStatus::Queued, "{m:#?}");
        app.advance(2 * SECOND);
    }
    let m = wait_for_attempts(&app, "c_giveup", 3).await;
    assert_eq!(m.status, MessageStatus::Failed, "{m:#?}");
    app.advance(HOUR);
    app.settle().await;
    let m = only_message(&app, "c_giveup").await;
    assert_eq!(m.attempts, 3, "{m:#?}");
    assert_eq!(stub.count(), 3, "max_attempts 3 means three requests");
    let reason = m.reason.unwrap_or_default();
    assert!(reason.contains("500"), "{reason:?}");
    assert_eq!(m.due_ms, None);
}
