//! The delivery queue: claiming and completing messages for every result, one message per run
//! and step.

use super::*;
use herald_store::{LeaseToken, RunAdvance};

conformance! {
    claim_and_complete_messages_for_every_result,
    one_message_per_run_and_step,
}

async fn message_row(store: &Store, id: &str) -> herald_store::MessageRow {
    store
        .messages(all())
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("message {id}"))
}

async fn claim_and_complete_messages_for_every_result(db: &TestDb) {
    let s = &db.store;
    accept(
        s,
        vec![signup(
            "details",
            json!({"id": "c1", "email": "ann@example.com", "phone": "+15551234567"}),
            T0,
        )],
    )
    .await;
    project_all(s, T0).await;
    let mut run = run_write("r1", "wf", "c1", 0, RunState::Completed, None);
    run.workflow_version = "v7".into();
    run.messages = ["sent", "retry", "failed", "skipped", "suppressed"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            queued_email(
                &format!("m_{name}"),
                &format!("step_{name}"),
                T0 + ms(i as u64),
            )
        })
        .collect();
    let mut sms = queued_email("m_later", "step_later", T0 + ms(5_000));
    sms.channel = Channel::Sms;
    sms.recipient = Some("+15551234567".into());
    run.messages.push(sms);
    let mut skipped = queued_email("m_skipped_at_creation", "step_x", T0);
    skipped.status = MessageStatus::Skipped;
    skipped.reason = Some("no email address".into());
    skipped.due = None;
    run.messages.push(skipped);
    seed_runs(s, vec![run], T0).await;

    assert!(
        s.claim_messages(T0 - ms(1), 10, ms(1_000))
            .await
            .unwrap()
            .is_empty()
    );
    // The earliest due first (the order within one claim is unspecified).
    let first = s.claim_messages(T0 + ms(100), 3, ms(1_000)).await.unwrap();
    assert_eq!(
        sorted(first.iter().map(|m| m.id.as_str())),
        ["m_failed", "m_retry", "m_sent"]
    );
    let rest = s.claim_messages(T0 + ms(100), 10, ms(1_000)).await.unwrap();
    assert_eq!(
        sorted(rest.iter().map(|m| m.id.as_str())),
        ["m_skipped", "m_suppressed"]
    );
    assert!(
        s.claim_messages(T0 + ms(100), 10, ms(1_000))
            .await
            .unwrap()
            .is_empty(),
        "all leased"
    );

    let m = first.iter().find(|m| m.id == "m_sent").unwrap();
    assert_eq!(
        (m.run_id.as_str(), m.step_id.as_str(), m.pc),
        ("r1", "step_sent", 1)
    );
    assert_eq!(
        (
            m.workflow_id.as_str(),
            m.workflow_version.as_str(),
            m.channel
        ),
        ("wf", "v7", Channel::Email)
    );
    assert_eq!(
        (
            m.recipient.as_deref(),
            m.header_message_id.as_str(),
            m.attempts
        ),
        (Some("ann@example.com"), "<m_sent@herald.test>", 0)
    );
    assert_eq!(
        (
            m.event.id.as_str(),
            m.contact.id.as_str(),
            m.contact.phone.as_deref()
        ),
        ("seed-r1", "c1", Some("+15551234567"))
    );

    let now = T0 + ms(200);
    let by_id = |id: &str| {
        first
            .iter()
            .chain(&rest)
            .find(|m| m.id == id)
            .unwrap()
            .clone()
    };
    let mut sent = outcome(
        &by_id("m_sent"),
        DeliveryResult::Sent {
            provider_id: Some("smtp-42".into()),
        },
    );
    sent.mailbox = Some(mail("mb1", now));
    let stale = MessageOutcome {
        lease_token: LeaseToken::from("not-the-lease"),
        ..outcome(
            &by_id("m_failed"),
            DeliveryResult::Sent { provider_id: None },
        )
    };
    s.complete_messages(
        now,
        vec![
            stale,
            sent,
            outcome(
                &by_id("m_retry"),
                DeliveryResult::Retry {
                    due: T0 + ms(60_000),
                    reason: "421 try later".into(),
                },
            ),
            outcome(
                &by_id("m_failed"),
                DeliveryResult::Failed {
                    reason: "550 no such user".into(),
                },
            ),
            outcome(
                &by_id("m_skipped"),
                DeliveryResult::Skipped {
                    reason: "outside quiet hours".into(),
                },
            ),
            outcome(
                &by_id("m_suppressed"),
                DeliveryResult::Suppressed {
                    reason: "unsubscribed".into(),
                },
            ),
        ],
    )
    .await
    .unwrap();

    let m = message_row(s, "m_sent").await;
    assert_eq!(
        (m.status, m.reason.as_deref(), m.due_ms, m.attempts),
        (MessageStatus::Sent, None, None, 1)
    );
    assert_eq!(
        (
            m.provider_id.as_deref(),
            m.sent_ms,
            m.subject.as_deref(),
            m.updated_ms
        ),
        (Some("smtp-42"), Some(now), Some("Subject m_sent"), now)
    );
    let m = message_row(s, "m_retry").await;
    assert_eq!(
        (m.status, m.reason.as_deref(), m.due_ms, m.attempts),
        (
            MessageStatus::Queued,
            Some("421 try later"),
            Some(T0 + ms(60_000)),
            1
        )
    );
    assert_eq!(m.sent_ms, None);
    let m = message_row(s, "m_failed").await;
    assert_eq!(
        (m.status, m.reason.as_deref(), m.due_ms, m.attempts),
        (MessageStatus::Failed, Some("550 no such user"), None, 1)
    );
    let m = message_row(s, "m_skipped").await;
    assert_eq!(
        (m.status, m.reason.as_deref(), m.attempts),
        (MessageStatus::Skipped, Some("outside quiet hours"), 0),
        "skipped at delivery: never tried, no attempt"
    );
    let m = message_row(s, "m_suppressed").await;
    assert_eq!(
        (m.status, m.reason.as_deref(), m.attempts),
        (MessageStatus::Suppressed, Some("unsubscribed"), 0),
        "suppressed: never tried, no attempt"
    );
    let m = message_row(s, "m_skipped_at_creation").await;
    assert_eq!(
        (m.status, m.reason.as_deref(), m.due_ms, m.attempts),
        (MessageStatus::Skipped, Some("no email address"), None, 0)
    );
    assert_eq!(s.mailbox(10).await.unwrap(), [mail("mb1", now)]);

    // The retry is queued again: claimable at its due time, with the attempt counted.
    assert_eq!(
        s.claim_messages(T0 + ms(59_999), 10, ms(1_000))
            .await
            .unwrap()
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        ["m_later"]
    );
    let retry = s
        .claim_messages(T0 + ms(60_000), 10, ms(1_000))
        .await
        .unwrap();
    assert_eq!(
        retry
            .iter()
            .map(|m| (m.id.as_str(), m.attempts))
            .collect::<Vec<_>>(),
        [("m_retry", 1)]
    );
    // A completion without a subject or provider id keeps the recorded ones.
    let mut done = outcome(&retry[0], DeliveryResult::Sent { provider_id: None });
    done.subject = None;
    s.complete_messages(T0 + ms(60_001), vec![done])
        .await
        .unwrap();
    let m = message_row(s, "m_retry").await;
    assert_eq!(
        (m.status, m.attempts, m.sent_ms, m.subject.as_deref()),
        (
            MessageStatus::Sent,
            2,
            Some(T0 + ms(60_001)),
            Some("Subject m_retry")
        )
    );
    // Completed messages are never claimed again, whatever the time.
    let later = s
        .claim_messages(T0 + ms(10_000_000), 10, ms(1_000))
        .await
        .unwrap();
    assert_eq!(
        later.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["m_later"],
        "only the leased-out SMS again"
    );
    assert_eq!(later[0].channel, Channel::Sms);
    s.complete_messages(T0, Vec::new()).await.unwrap();
}

async fn one_message_per_run_and_step(db: &TestDb) {
    let s = &db.store;
    let mut run = run_write("r1", "wf", "c1", 0, RunState::Active, Some(T0));
    run.messages = vec![
        queued_email("m1", "send", T0),
        queued_email("m2", "send", T0),
    ];
    seed_runs(s, vec![run], T0).await;
    let ids = |ms: Vec<herald_store::MessageRow>| ms.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(ids(s.messages(all()).await.unwrap()), ["m1"]);

    // Re-running the step after a lost lease makes no second message either.
    let claimed = s.claim_runs(T0, 1, ms(100)).await.unwrap();
    let mut w = run_write("r1", "wf", "c1", 0, RunState::Completed, None);
    w.messages = vec![
        queued_email("m3", "send", T0),
        queued_email("m4", "other", T0),
    ];
    s.finish_runs(
        T0 + ms(1),
        vec![RunAdvance {
            lease_token: claimed[0].lease_token.clone(),
            write: w,
        }],
    )
    .await
    .unwrap();
    assert_eq!(ids(s.messages(all()).await.unwrap()), ["m1", "m4"]);
}
