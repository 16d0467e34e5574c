//! Opt-outs: kept per channel and shown to message claims.

use super::*;

conformance! {
    opt_outs_are_kept_per_channel_and_shown_to_claims,
}

async fn opt_outs_are_kept_per_channel_and_shown_to_claims(db: &TestDb) {
    let s = &db.store;
    assert!(s.opt_outs("c1".into()).await.unwrap().is_empty());
    assert!(
        s.set_opt_out(
            "c1".into(),
            Channel::Email,
            true,
            "unsubscribe_link".into(),
            T0
        )
        .await
        .unwrap()
    );
    assert!(
        !s.set_opt_out(
            "c1".into(),
            Channel::Email,
            true,
            "one_click".into(),
            T0 + ms(1)
        )
        .await
        .unwrap(),
        "already out"
    );
    assert!(
        s.set_opt_out(
            "c1".into(),
            Channel::Sms,
            true,
            "sms_keyword".into(),
            T0 + ms(2)
        )
        .await
        .unwrap()
    );
    let out = |channel, source: &str, at_ms| herald_store::OptOutRow {
        channel,
        source: source.into(),
        at_ms,
    };
    assert_eq!(
        s.opt_outs("c1".into()).await.unwrap(),
        [
            out(Channel::Email, "unsubscribe_link", T0),
            out(Channel::Sms, "sms_keyword", T0 + ms(2))
        ]
    );
    assert!(s.opt_outs("c2".into()).await.unwrap().is_empty());

    // A claim tells whether the contact opted out of the message's channel, as of the claim.
    let mut run = run_write("r1", "wf", "c1", 0, RunState::Completed, None);
    let mut sms = queued_email("m_sms", "s_sms", T0);
    sms.channel = Channel::Sms;
    run.messages = vec![queued_email("m_email", "s_email", T0), sms];
    let mut other = run_write("r2", "wf", "c2", 0, RunState::Completed, None);
    other.messages = vec![queued_email("m_c2", "s", T0)];
    seed_runs(s, vec![run, other], T0).await;
    assert!(
        s.set_opt_out(
            "c1".into(),
            Channel::Sms,
            false,
            "resubscribe".into(),
            T0 + ms(3)
        )
        .await
        .unwrap()
    );
    assert!(
        !s.set_opt_out(
            "c1".into(),
            Channel::Sms,
            false,
            "resubscribe".into(),
            T0 + ms(4)
        )
        .await
        .unwrap(),
        "already in"
    );
    let claimed = s.claim_messages(T0 + ms(10), 10, ms(100)).await.unwrap();
    let mut flags: Vec<(&str, bool)> = claimed
        .iter()
        .map(|m| (m.id.as_str(), m.opted_out))
        .collect();
    flags.sort();
    assert_eq!(
        flags,
        [("m_c2", false), ("m_email", true), ("m_sms", false)]
    );
}
