//! `kill -9` while 300 login-link welcomes are being delivered (the SMTP server holding its
//! answers after 40): after a restart nothing is lost, a repeat (of a message accepted but not
//! yet recorded when the process died) carries the same Message-ID, and each learner's last link
//! signs them in.

use crate::harness::*;
use herald_test_support::smtp::SmtpSink;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const CONTACTS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_login_link_burst_loses_nothing_on_sqlite() {
    kill_9_mid_login_link_burst_loses_nothing(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_login_link_burst_loses_nothing_on_postgres() {
    kill_9_mid_login_link_burst_loses_nothing(true).await;
}

async fn kill_9_mid_login_link_burst_loses_nothing(postgres: bool) {
    let Some(site) = Site::new(postgres, &[("welcome", WELCOME_WITH_LINK)]).await else {
        return;
    };
    let sink = SmtpSink::start().await;
    sink.hold_after(40);
    let mut first = Herald::start(&site, 0, Role::Serve, &sink.url(), "2s").await;
    let ids: Vec<String> = (0..CONTACTS).map(|i| format!("c_burst_{i}")).collect();
    for chunk in ids.chunks(150) {
        let events: Vec<_> = chunk.iter().map(|id| grant(id)).collect();
        first.post(&events).await;
    }
    // Killed with sends in flight: 40 accepted, more held mid-DATA.
    let mid_send = eventually(Duration::from_secs(30), async || {
        sink.count() >= 40 && sink.held() > 0
    })
    .await;
    assert!(
        mid_send,
        "never got to 40 sent with more in flight: {} sent",
        sink.count()
    );
    first.kill();
    let accepted_before_kill = sink.count();
    sink.release();

    let started = Instant::now();
    let second = Herald::start(&site, 0, Role::Serve, &sink.url(), "2s").await;
    let all_arrived = eventually(Duration::from_secs(60), async || {
        recipients(&sink).len() == CONTACTS
    })
    .await;
    assert!(
        all_arrived,
        "{} of {CONTACTS} learners got their welcome after the restart",
        recipients(&sink).len()
    );
    let mut sent = 0;
    let recorded = eventually(Duration::from_secs(10), async || {
        let messages = second.messages().await;
        sent = messages.iter().filter(|m| m["status"] == "sent").count();
        sent == CONTACTS
    })
    .await;
    assert!(recorded, "{sent} of {CONTACTS} messages recorded as sent");
    // A repeat is allowed only for a message accepted but not recorded before the kill, and
    // then with the same Message-ID.
    let mails = sink.received();
    let repeats = mails.len() - CONTACTS;
    eprintln!(
        "kill -9 after {accepted_before_kill} accepted; all {CONTACTS} delivered {:.1} s after the restart, {repeats} sent twice",
        started.elapsed().as_secs_f64()
    );
    // Only a message the SMTP server had accepted before the kill can come twice (the held ones
    // were never accepted).
    assert!(
        repeats <= accepted_before_kill,
        "{repeats} repeats, but only {accepted_before_kill} were accepted before the kill"
    );
    let mut ids_of: HashMap<String, Vec<String>> = HashMap::new();
    for m in &mails {
        ids_of
            .entry(m.rcpt_to[0].clone())
            .or_default()
            .push(m.message_id());
    }
    for (to, message_ids) in &ids_of {
        assert!(
            message_ids.iter().all(|id| *id == message_ids[0]),
            "{to} got different messages: {message_ids:?}"
        );
    }

    // Each learner's last link signs them in (a sample of 20, doubled learners first).
    let mut last_link: HashMap<String, String> = HashMap::new();
    for m in &mails {
        let tokens = login_tokens(&text_of(m));
        assert_eq!(tokens.len(), 1, "one link per welcome: {}", text_of(m));
        last_link.insert(m.rcpt_to[0].clone(), tokens[0].clone());
    }
    let mut sample: Vec<&String> = ids_of
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(to, _)| to)
        .collect();
    sample.extend(ids_of.keys().take(20));
    sample.truncate(20);
    for to in sample {
        let (status, portal) = second.sign_in(&last_link[to]).await;
        assert_eq!(status, 200, "{to}'s last link did not sign in");
        assert!(shows_the_course(&portal), "{to}'s portal: {portal}");
    }
}

fn recipients(sink: &SmtpSink) -> std::collections::HashSet<String> {
    sink.received()
        .into_iter()
        .map(|m| m.rcpt_to[0].clone())
        .collect()
}
