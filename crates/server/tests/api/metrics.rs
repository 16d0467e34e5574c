//! `GET /metrics`: Prometheus text with events accepted and rejected by
//! reason, runs started and finished, messages by channel and status, the send latency
//! histogram, queue depths and the age of the oldest due job, and link redemptions by outcome.
//! The recorder is process-wide (tests may share a process), so counters are compared before and
//! after, never as totals.

use crate::helpers::*;
use crate::link_helpers::{Jar, enroll, link_options, unknown_token};
use crate::twilio_stub::*;
use herald_store::MessageStatus;
use std::time::Duration;

both_backends!(
    metrics_count_events_runs_messages_and_latency,
    queue_depth_and_oldest_due_job_age,
    link_redemptions_are_counted_by_outcome,
);

/// Whether this test has the process (and so the global recorder) to itself, as under nextest;
/// then exact increases are asserted too.
fn own_process() -> bool {
    std::env::var("NEXTEST_EXECUTION_MODE").is_ok_and(|m| m == "process-per-test")
}

/// One parsed sample: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses the Prometheus text exposition format (enough of it for these tests).
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line}"));
                let mut labels = Vec::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (key, after) = rest
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label in {line}"));
                    let mut value = String::new();
                    let mut chars = after.char_indices();
                    let mut end = None;
                    while let Some((i, c)) = chars.next() {
                        match c {
                            '\\' => {
                                if let Some((_, e)) = chars.next() {
                                    value.push(match e {
                                        'n' => '\n',
                                        other => other,
                                    });
                                }
                            }
                            '"' => {
                                end = Some(i);
                                break;
                            }
                            c => value.push(c),
                        }
                    }
                    let end = end.unwrap_or_else(|| panic!("unterminated label in {line}"));
                    labels.push((key.trim_start_matches(',').to_owned(), value));
                    rest = after[end + 1..].trim_start_matches(',');
                }
                (name.to_owned(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// A scrape of `/metrics`.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    /// The sum of the samples of `name` carrying all of `labels` (0 when there is none).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().map(|s| s.value).sum()
    }

    fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .collect()
    }

    /// Asserts that the series exists.
    fn has(&self, name: &str, labels: &[(&str, &str)]) {
        assert!(
            !self.matching(name, labels).is_empty(),
            "no {name}{labels:?} in /metrics:\n{}",
            self.text
        );
    }
}

async fn scrape(app: &TestApp) -> Scrape {
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        content_type.starts_with("text/plain"),
        "Prometheus text format: {content_type}"
    );
    let text = response.text().await.unwrap();
    let samples = parse(&text);
    Scrape { text, samples }
}

/// Asserts `after - before` of a counter is `expected` (at least, when `at_least`).
fn assert_increase(
    before: &Scrape,
    after: &Scrape,
    name: &str,
    labels: &[(&str, &str)],
    expected: f64,
) {
    after.has(name, labels);
    let delta = after.get(name, labels) - before.get(name, labels);
    assert!(
        delta >= expected,
        "{name}{labels:?} rose by {delta}, expected at least {expected}\n{}",
        after.text
    );
}

const EMAIL_AND_SMS: &str = r#"
name: Email and SMS
trigger:
  event: new_signup
steps:
  - id: mail
    send_email:
      subject: "Welcome"
      text: "Hi"
  - id: text
    send_sms:
      body: "Hi {{contact.first_name}}"
"#;

async fn metrics_count_events_runs_messages_and_latency(backend: Backend) {
    let stub = TwilioStub::start().await;
    let opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("m_signup", EMAIL_AND_SMS)
        .sms(stub.sender());
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let before = scrape(&app).await;

    // Events: one new, the same again (duplicate), and one refusal of each kind.
    let first = new_signup(sms_contact("c_m1", "Ann", "+15551260001"));
    assert_eq!(app.accept(&first).await, "new");
    assert_eq!(app.accept(&first).await, "duplicate");
    let body = serde_json::to_vec(&new_signup(contact("c_m_x", "X"))).unwrap();
    assert_eq!(
        app.post_raw(
            body.clone(),
            &[("content-type", "application/cloudevents+json".into())]
        )
        .await
        .status(),
        401
    );
    assert_eq!(
        app.post_signed(b"{\"specversion\": ".to_vec(), CLOUDEVENT)
            .await
            .status(),
        400
    );
    assert_eq!(
        app.post_signed(body.clone(), "text/plain").await.status(),
        415
    );
    assert_eq!(
        app.post_signed(vec![b' '; 1024 * 1024 + 1], CLOUDEVENT)
            .await
            .status(),
        413
    );

    // Messages: sent (email and SMS), failed (a 400 from the provider), skipped (no phone).
    app.wait_for_status(2, MessageStatus::Sent).await;
    stub.reply_next(&[Reply::status(400)]);
    app.accept(&new_signup(sms_contact("c_m2", "Bob", "+15551260002")))
        .await;
    app.accept(&new_signup(contact("c_m3", "Cy"))).await;
    app.wait_for_status(1, MessageStatus::Failed).await;
    app.wait_for_status(4, MessageStatus::Sent).await;
    app.settle().await;
    let after = scrape(&app).await;

    for (name, labels, n) in [
        ("herald_events_accepted_total", vec![("status", "new")], 3.0),
        (
            "herald_events_accepted_total",
            vec![("status", "duplicate")],
            1.0,
        ),
        (
            "herald_events_rejected_total",
            vec![("reason", "signature")],
            1.0,
        ),
        (
            "herald_events_rejected_total",
            vec![("reason", "invalid")],
            1.0,
        ),
        (
            "herald_events_rejected_total",
            vec![("reason", "content_type")],
            1.0,
        ),
        (
            "herald_events_rejected_total",
            vec![("reason", "too_large")],
            1.0,
        ),
        (
            "herald_runs_started_total",
            vec![("workflow", "m_signup")],
            3.0,
        ),
        (
            "herald_runs_finished_total",
            vec![("workflow", "m_signup"), ("outcome", "completed")],
            3.0,
        ),
        (
            "herald_messages_total",
            vec![("channel", "email"), ("status", "sent")],
            3.0,
        ),
        (
            "herald_messages_total",
            vec![("channel", "sms"), ("status", "sent")],
            1.0,
        ),
        (
            "herald_messages_total",
            vec![("channel", "sms"), ("status", "failed")],
            1.0,
        ),
        (
            "herald_messages_total",
            vec![("channel", "sms"), ("status", "skipped")],
            1.0,
        ),
        (
            "herald_send_duration_seconds_count",
            vec![("channel", "email")],
            3.0,
        ),
        (
            "herald_send_duration_seconds_count",
            vec![("channel", "sms")],
            2.0,
        ),
    ] {
        assert_increase(&before, &after, name, &labels, n);
    }
    if own_process() {
        // The duplicate counted as a duplicate only, and started no second run.
        for (name, labels, n) in [
            ("herald_events_accepted_total", vec![("status", "new")], 3.0),
            (
                "herald_runs_started_total",
                vec![("workflow", "m_signup")],
                3.0,
            ),
        ] {
            let delta = after.get(name, &labels) - before.get(name, &labels);
            assert_eq!(delta, n, "{name}{labels:?}\n{}", after.text);
        }
    }
    // A histogram: buckets up to +Inf, whose count equals _count.
    after.has(
        "herald_send_duration_seconds_bucket",
        &[("channel", "sms"), ("le", "+Inf")],
    );
    assert_eq!(
        after.get(
            "herald_send_duration_seconds_bucket",
            &[("channel", "sms"), ("le", "+Inf")]
        ),
        after.get("herald_send_duration_seconds_count", &[("channel", "sms")])
    );
    assert!(after.get("herald_send_duration_seconds_sum", &[("channel", "sms")]) > 0.0);
    for ty in [
        "# TYPE herald_runs_started_total counter",
        "# TYPE herald_messages_total counter",
        "# TYPE herald_send_duration_seconds histogram",
        "# TYPE herald_job_queue_depth gauge",
        "# TYPE herald_events_accepted_total counter",
        "# TYPE herald_events_rejected_total counter",
    ] {
        assert!(after.text.contains(ty), "missing {ty:?}:\n{}", after.text);
    }
}

async fn queue_depth_and_oldest_due_job_age(backend: Backend) {
    let wf = r#"
name: Wait, then email
trigger:
  event: new_signup
steps:
  - wait: 1h
  - id: mail
    send_email:
      subject: "An hour later"
      text: "Hi"
"#;
    let mut opts = TestOptions::new(backend)
        .manual_clock()
        .workflow("m_wait", wf);
    // Idle loops wake only when told: due work stays due until the test wakes them.
    opts.poll_interval = Duration::from_secs(3600);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    app.accept(&new_signup(contact("c_q", "Ann"))).await;
    app.settle().await;
    let idle = scrape(&app).await;
    for queue in ["events", "runs", "messages"] {
        idle.has("herald_job_queue_depth", &[("queue", queue)]);
        assert_eq!(
            idle.get("herald_job_queue_depth", &[("queue", queue)]),
            0.0,
            "{queue}:\n{}",
            idle.text
        );
    }
    idle.has("herald_oldest_due_job_age_seconds", &[]);
    assert_eq!(idle.get("herald_oldest_due_job_age_seconds", &[]), 0.0);

    // Three hours on without waking the engine: the run has been due for two hours.
    app.clock.advance(Duration::from_secs(3 * 3600));
    let due = scrape(&app).await;
    assert_eq!(
        due.get("herald_job_queue_depth", &[("queue", "runs")]),
        1.0,
        "{}",
        due.text
    );
    assert_eq!(
        due.get("herald_oldest_due_job_age_seconds", &[]),
        7200.0,
        "{}",
        due.text
    );

    app.state.wakers.all();
    app.wait_for_mails(1).await;
    app.settle().await;
    let done = scrape(&app).await;
    for queue in ["events", "runs", "messages"] {
        assert_eq!(
            done.get("herald_job_queue_depth", &[("queue", queue)]),
            0.0,
            "{queue}:\n{}",
            done.text
        );
    }
    assert_eq!(done.get("herald_oldest_due_job_age_seconds", &[]), 0.0);
}

async fn link_redemptions_are_counted_by_outcome(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend)).await else {
        return;
    };
    enroll(&app, "c_lm", "Ann").await;
    let old = app.mint_token("c_lm").await;
    let token = app.mint_token("c_lm").await;
    let before = scrape(&app).await;
    let mut jar = Jar::new(&app);
    jar.sign_in(&token).await;
    assert_eq!(jar.redeem(&unknown_token()).await.status, 404);
    assert_eq!(jar.redeem(&old).await.status, 410);
    // Showing the page is no redemption.
    assert_eq!(jar.open(&token).await.status, 200);
    let after = scrape(&app).await;
    for (outcome, n) in [("redeemed", 1.0), ("unknown", 1.0), ("revoked", 1.0)] {
        assert_increase(
            &before,
            &after,
            "herald_link_redemptions_total",
            &[("outcome", outcome)],
            n,
        );
    }
    if own_process() {
        let total = |s: &Scrape| s.get("herald_link_redemptions_total", &[]);
        assert_eq!(
            total(&after) - total(&before),
            3.0,
            "GET of a link counted as a redemption:\n{}",
            after.text
        );
    }
}
