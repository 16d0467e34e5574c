//! Volume with links: a bulk import of learners whose welcome carries `<<login_url>>` while the
//! platform keeps posting single events; the same behind a relay that answers 451 at first and a
//! send window that is closed when the import lands; three emails in a row per learner, in order.

use super::*;
use crate::link_helpers::link_tokens;
use herald_store::Timestamp;
use herald_test_support::smtp::Stage as SmtpStage;
use std::time::Instant;

both_backends!(
    login_link_burst_is_delivered_once_while_ingest_stays_responsive,
    a_burst_with_links_retries_and_a_send_window_combined,
    three_sends_in_a_row_arrive_in_order_for_100_contacts,
);

const WELCOME: &str = "name: Welcome\ntrigger:\n  event: offer_access_granted\nsteps:\n  - id: welcome\n    send_email:\n      subject: \"Welcome {{contact.first_name}}\"\n      template: welcome\n";
const WELCOME_TXT: &str = "Hi {{contact.first_name}}, sign in: <<login_url>>\n";
const WELCOME_HTML: &str =
    "<p>Hi {{contact.first_name}}, <a href=\"<<login_url>>\">sign in</a></p>\n";

/// The single login link of one email, checked to be the same in its text and HTML parts.
fn login_token(mail: &ReceivedMail) -> String {
    let email = mail.parse();
    let to = mail.rcpt_to.join(",");
    let text = email
        .text
        .as_deref()
        .unwrap_or_else(|| panic!("the email to {to} has no text part"));
    let html = email
        .html
        .as_deref()
        .unwrap_or_else(|| panic!("the email to {to} has no HTML part"));
    let in_text = link_tokens(PUBLIC_URL, text);
    let in_html = link_tokens(PUBLIC_URL, html);
    assert_eq!(
        in_text.len(),
        1,
        "the text part to {to} should carry one login link:\n{text}"
    );
    assert_eq!(
        in_html.len(),
        1,
        "the HTML part to {to} should carry one login link:\n{html}"
    );
    assert_eq!(
        in_text, in_html,
        "the text and HTML parts to {to} carry different login links"
    );
    assert_eq!(
        in_text[0].len(),
        43,
        "a login link token to {to} is not 43 characters: {}",
        in_text[0]
    );
    in_text[0].clone()
}

/// Asserts no two emails carry the same login link, naming the recipients that share one.
fn assert_distinct_links(mails: &[ReceivedMail]) -> Vec<String> {
    let mut holders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for mail in mails {
        holders
            .entry(login_token(mail))
            .or_default()
            .push(mail.rcpt_to.join(","));
    }
    let shared: Vec<&Vec<String>> = holders.values().filter(|h| h.len() > 1).collect();
    assert!(
        shared.is_empty(),
        "{} login links were sent in more than one email; recipients sharing one: {shared:?}",
        shared.len()
    );
    holders.into_keys().collect()
}

async fn login_link_burst_is_delivered_once_while_ingest_stays_responsive(backend: Backend) {
    let options = TestOptions::new(backend)
        .workflow("welcome", WELCOME)
        .template("welcome.txt.hbs", WELCOME_TXT)
        .template("welcome.html.hbs", WELCOME_HTML);
    let Some(app) = spawn_app(options).await else {
        return;
    };
    let first = grants("bulk_a_", 150);
    let second = grants("bulk_b_", 150);
    let singles = grants("single_", 10);
    // The platform keeps posting one event at a time while the import lands and its 300
    // welcomes are rendered and sent.
    let post_singles = async {
        let mut latencies = Vec::new();
        for event in &singles {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let started = Instant::now();
            let response = app.post_event(event).await;
            let status = response.status().as_u16();
            latencies.push((
                event["data"]["contact"]["id"].as_str().unwrap().to_owned(),
                status,
                started.elapsed(),
            ));
        }
        latencies
    };
    let (first_statuses, second_statuses, latencies) = tokio::join!(
        app.accept_batch(&first),
        app.accept_batch(&second),
        post_singles
    );
    assert_eq!(first_statuses, vec!["new"; 150], "the first batch of 150");
    assert_eq!(second_statuses, vec!["new"; 150], "the second batch of 150");
    let late: Vec<_> = latencies
        .iter()
        .filter(|(_, status, took)| *status != 202 || *took >= Duration::from_secs(1))
        .collect();
    assert!(
        late.is_empty(),
        "every single POST during the burst must be answered 202 within 1 s; these were not \
         (contact, status, time): {late:?}\nall: {latencies:?}"
    );

    let expected: BTreeSet<String> = addresses(&first)
        .into_iter()
        .chain(addresses(&second))
        .chain(addresses(&singles))
        .collect();
    app.wait_for_mails(expected.len()).await;
    app.settle().await;
    let mails = app.sink().received();
    assert_one_email_each(&mails, &expected);
    let tokens = assert_distinct_links(&mails);
    assert_all_sent(&app.messages().await, expected.len());

    // A sample of the links, spread over the burst, opens the "Continue" page.
    for token in tokens.iter().step_by(31) {
        let response = app.get(&format!("/l/{token}")).await;
        let status = response.status().as_u16();
        let page = response.text().await.unwrap_or_default();
        assert_eq!(status, 200, "GET /l/{token} answered {status}: {page}");
        assert!(
            page.contains("Continue") && page.contains(&format!("action=\"/l/{token}\"")),
            "GET /l/{token} is not the interstitial with a Continue button: {page}"
        );
    }
    assert_health_ok(&app, "after the burst").await;
}

async fn a_burst_with_links_retries_and_a_send_window_combined(backend: Backend) {
    // The manual clock starts on Tuesday 10:00 UTC; the window opens at 12:00.
    let workflow = format!(
        "{WELCOME}send_window:\n  days: [mon, tue, wed, thu, fri]\n  between: [\"12:00\", \"18:00\"]\n  timezone: UTC\n"
    );
    let opening = START + Duration::from_secs(2 * 3_600);
    let options = TestOptions::new(backend)
        .workflow("welcome", &workflow)
        .template("welcome.txt.hbs", WELCOME_TXT)
        .template("welcome.html.hbs", WELCOME_HTML)
        .manual_clock()
        .lease(Duration::from_secs(3_600))
        .retries(Duration::from_millis(50), Duration::from_secs(2), 20);
    let Some(app) = spawn_app(options).await else {
        return;
    };
    let sink = app.sink().clone();
    const REFUSED: usize = 30;
    sink.fail_next(REFUSED, SmtpStage::Data, 451);
    let events = grants("window_", 200);
    for chunk in events.chunks(50) {
        assert_eq!(app.accept_batch(chunk).await, vec!["new"; chunk.len()]);
    }
    app.wait_for_status(events.len(), MessageStatus::Queued)
        .await;
    app.settle().await;

    // The window is closed: nothing reaches the relay, every message waits for 12:00.
    assert_eq!(
        (sink.count(), sink.refusals().len()),
        (0, 0),
        "emails reached the relay while the send window was closed (accepted, refused)"
    );
    let rows = app.messages().await;
    let not_held: Vec<(&str, &str, Option<Timestamp>)> = rows
        .iter()
        .filter(|m| {
            m.status != MessageStatus::Queued
                || !m
                    .due_ms
                    .is_some_and(|d| (opening..opening + Duration::from_secs(60)).contains(&d))
        })
        .map(|m| (m.contact_id.as_str(), m.status.as_str(), m.due_ms))
        .collect();
    assert!(
        rows.len() == events.len() && not_held.is_empty(),
        "expected {} messages queued for the window's opening at {opening}; the store holds {} \
         ({:?}); not so (contact, status, due): {not_held:?}",
        events.len(),
        rows.len(),
        status_counts(&rows),
    );

    // 12:00: the window opens; the relay refuses the first 30 with a 451, which are retried.
    app.advance(opening.since(START) + Duration::from_secs(1));
    let mut last = String::new();
    let delivered = eventually(async || {
        let rows = app.messages().await;
        let sent = rows
            .iter()
            .filter(|m| m.status == MessageStatus::Sent)
            .count();
        last = format!(
            "{} emails at the sink, {} refused, store: {:?}",
            sink.count(),
            sink.refusals().len(),
            status_counts(&rows)
        );
        if sent == events.len() {
            return true;
        }
        // Let time pass until the next retry is due.
        advance_to_next_due(&app).await;
        false
    })
    .await;
    assert!(
        delivered,
        "not every message was sent within {WAIT:?} after the window opened: {last}"
    );
    app.settle().await;

    let mails = sink.received();
    assert_one_email_each(&mails, &addresses(&events));
    let message_ids: BTreeSet<String> = mails.iter().map(ReceivedMail::message_id).collect();
    assert_eq!(
        message_ids.len(),
        events.len(),
        "{} emails arrived with {} distinct Message-IDs",
        mails.len(),
        message_ids.len()
    );
    assert_distinct_links(&mails);

    // Each refused attempt was retried as the same message: same recipient, same Message-ID.
    let refusals = sink.refusals();
    assert_eq!(
        refusals.len(),
        REFUSED,
        "the relay should have refused exactly the first {REFUSED} attempts"
    );
    let delivered_id: BTreeMap<String, String> = mails
        .iter()
        .map(|m| (m.rcpt_to.join(","), m.message_id()))
        .collect();
    for refusal in &refusals {
        let mail = refusal
            .mail
            .as_ref()
            .expect("a refusal at DATA keeps the mail");
        let to = mail.rcpt_to.join(",");
        assert_eq!(
            delivered_id.get(&to),
            Some(&mail.message_id()),
            "the retry to {to} went out with another Message-ID than its refused attempt"
        );
    }

    let rows = app.messages().await;
    assert_all_sent(&rows, events.len());
    let attempts: i64 = rows.iter().map(|m| m.attempts).sum();
    assert_eq!(
        attempts,
        (events.len() + REFUSED) as i64,
        "attempts over all messages: one each plus one per 451"
    );
    let early: Vec<(&str, Option<Timestamp>)> = rows
        .iter()
        .filter(|m| m.sent_ms.is_none_or(|s| s < opening))
        .map(|m| (m.contact_id.as_str(), m.sent_ms))
        .collect();
    assert!(
        early.is_empty(),
        "sent before the window opened at {opening} (contact, sent at): {early:?}"
    );
}

async fn three_sends_in_a_row_arrive_in_order_for_100_contacts(backend: Backend) {
    let workflow = "name: Three\ntrigger:\n  event: new_signup\nsteps:\n  - id: one\n    send_email: {subject: \"1\", text: \"one\"}\n  - id: two\n    send_email: {subject: \"2\", text: \"two\"}\n  - id: three\n    send_email: {subject: \"3\", text: \"three\"}\n";
    let options = TestOptions::new(backend)
        .workflow("three", workflow)
        .retries(Duration::from_millis(20), Duration::from_millis(200), 20);
    let Some(app) = spawn_app(options).await else {
        return;
    };
    let sink = app.sink().clone();
    // The first sends (the "1"s) fail transiently and come back after a backoff, and later ones
    // hang at the relay for a while: an engine that did not keep a run's order would let a "2"
    // or "3" overtake.
    sink.fail_next(12, SmtpStage::Data, 451);
    sink.hold_after(60);
    let events = signups("three_", 100);
    assert_eq!(app.accept_batch(&events).await, vec!["new"; 100]);
    wait_for("some sends to hang at the relay", async || sink.held() > 0).await;
    sink.release();
    let mails = app.wait_for_mails(300).await;
    app.settle().await;

    let got = by_recipient(&mails);
    let expected = addresses(&events);
    let missing: Vec<&String> = expected.iter().filter(|a| !got.contains_key(*a)).collect();
    assert!(missing.is_empty(), "no email at all to {missing:?}");
    let wrong: Vec<(&String, Vec<String>)> = got
        .iter()
        .map(|(to, mails)| (to, mails.iter().map(|m| m.parse().subject).collect()))
        .filter(|(_, subjects): &(_, Vec<String>)| subjects != &["1", "2", "3"])
        .collect();
    assert!(
        wrong.is_empty(),
        "each recipient must receive \"1\", \"2\", \"3\" once each and in that order; {} of {} did \
         not (recipient, subjects in order of receipt): {wrong:?}",
        wrong.len(),
        got.len()
    );
    assert_eq!(
        sink.refusals().len(),
        12,
        "the relay should have refused exactly 12 attempts"
    );
    assert_all_sent(&app.messages().await, 300);
}
