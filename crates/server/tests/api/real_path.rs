//! The real path: what a school's first week does to herald, features combined at realistic
//! counts. A bulk import whose welcome carries `<<login_url>>` while the platform keeps posting;
//! the same with a relay that answers 451 and a send window that is closed at first; three emails
//! in a row per learner; a row the database rejects and items whose processing panics, with the
//! queue behind them; a loop that stops, seen by `/healthz`; a goal reached, or a workflow
//! disabled, while a send window holds the message; a workflow disabled across a restart.
//!
//! Failures name counts, contacts and statuses, so a red test says what went wrong.

mod bursts;
mod faults;
mod lifecycle;

use crate::helpers::*;
use herald_store::{MessageRow, MessageStatus, RunRow};
use herald_test_support::smtp::ReceivedMail;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The bearer token of the admin API in these tests.
const ADMIN_TOKEN: &str = "real-path-admin-token";

/// `n` offer grants of contacts `{prefix}{i}`.
fn grants(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| offer_granted(contact(&format!("{prefix}{i}"), "Ann"), "o_pro"))
        .collect()
}

/// `n` signups of contacts `{prefix}{i}`.
fn signups(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| new_signup(contact(&format!("{prefix}{i}"), "Ann")))
        .collect()
}

/// The email addresses of the events' contacts.
fn addresses(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .map(|e| {
            e["data"]["contact"]["email"]
                .as_str()
                .expect("an event with a contact email")
                .to_owned()
        })
        .collect()
}

/// The mails the sink accepted, by recipient, in the order the sink accepted them.
fn by_recipient(mails: &[ReceivedMail]) -> BTreeMap<String, Vec<&ReceivedMail>> {
    let mut out: BTreeMap<String, Vec<&ReceivedMail>> = BTreeMap::new();
    for mail in mails {
        out.entry(mail.rcpt_to.join(",")).or_default().push(mail);
    }
    out
}

/// Asserts that every address in `expected` received exactly one email and nobody else any.
fn assert_one_email_each(mails: &[ReceivedMail], expected: &BTreeSet<String>) {
    let got = by_recipient(mails);
    let missing: Vec<&String> = expected.iter().filter(|a| !got.contains_key(*a)).collect();
    let repeated: Vec<(&String, usize)> = got
        .iter()
        .filter(|(_, m)| m.len() > 1)
        .map(|(a, m)| (a, m.len()))
        .collect();
    let unexpected: Vec<&String> = got.keys().filter(|a| !expected.contains(*a)).collect();
    assert!(
        missing.is_empty() && repeated.is_empty() && unexpected.is_empty(),
        "expected exactly one email to each of {} contacts; the sink holds {} emails to {} recipients\n\
         {} got none: {missing:?}\n{} got more than one (address, count): {repeated:?}\n\
         {} were not expected: {unexpected:?}",
        expected.len(),
        mails.len(),
        got.len(),
        missing.len(),
        repeated.len(),
        unexpected.len(),
    );
}

/// How many messages are in each status, for failure messages.
fn status_counts(rows: &[MessageRow]) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    for m in rows {
        *out.entry(m.status.as_str()).or_default() += 1;
    }
    out
}

/// Asserts every message in the store is `sent`, naming the others with their status and reason.
fn assert_all_sent(rows: &[MessageRow], expected: usize) {
    let not_sent: Vec<(&str, &str, &str, Option<&str>)> = rows
        .iter()
        .filter(|m| m.status != MessageStatus::Sent)
        .map(|m| {
            (
                m.contact_id.as_str(),
                m.step_id.as_str(),
                m.status.as_str(),
                m.reason.as_deref(),
            )
        })
        .collect();
    assert!(
        rows.len() == expected && not_sent.is_empty(),
        "expected {expected} messages, all sent; the store holds {} ({:?}); not sent (contact, step, status, reason): {not_sent:?}",
        rows.len(),
        status_counts(rows),
    );
}

/// The state of each contact's runs, for failure messages.
fn run_states(runs: &[RunRow]) -> Vec<(String, &'static str, Option<String>)> {
    runs.iter()
        .map(|r| (r.contact_id.to_string(), r.state.as_str(), r.reason.clone()))
        .collect()
}

/// `/healthz` answers 200 with `"status":"ok"` and every loop `ok`.
async fn assert_health_ok(app: &TestApp, when: &str) {
    let (status, body) = app.health().await;
    assert_eq!(status, 200, "/healthz {when}: {body}");
    assert_eq!(body["status"], "ok", "/healthz {when}: {body}");
    for name in ["dispatcher", "stepper", "deliverer"] {
        assert_eq!(
            body["loops"][name], "ok",
            "/healthz {when}: loop {name} is not ok: {body}"
        );
    }
}

/// The `herald_dead_total` sample of one queue (0 when nothing was counted yet).
async fn dead_total(app: &TestApp, queue: &str) -> f64 {
    app.metric(&format!("herald_dead_total{{queue=\"{queue}\"}}"))
        .await
        .unwrap_or(0.0)
}

/// Under a manual clock: when nothing is due now, moves the clock to the next due item (a retry
/// backoff, a send window's opening) and wakes the engine. Whether it moved.
async fn advance_to_next_due(app: &TestApp) -> bool {
    let now = app.clock.now();
    match app.store.next_due().await.expect("next_due") {
        Some(due) if due > now => {
            app.advance(due.since(now));
            true
        }
        _ => false,
    }
}
