//! The admin lists: filters and cursor pagination, queue statistics, the dev mailbox.

use super::*;
use std::collections::HashMap;

conformance! {
    mailbox_lists_newest_first,
    list_filters_and_cursor_pagination,
    queue_stats_count_due_work,
}

async fn mailbox_lists_newest_first(db: &TestDb) {
    let s = &db.store;
    assert!(s.mailbox(10).await.unwrap().is_empty());
    let mut sms = mail("b", T0 + 5);
    sms.channel = Channel::Sms;
    sms.subject = None;
    sms.html_body = None;
    sms.sender = None;
    sms.message_id = None;
    s.add_to_mailbox(mail("a", T0 + 5)).await.unwrap();
    s.add_to_mailbox(sms.clone()).await.unwrap();
    s.add_to_mailbox(mail("c", T0 + 1)).await.unwrap();
    s.add_to_mailbox(mail("d", T0 + 9)).await.unwrap();
    // The same id again changes nothing.
    s.add_to_mailbox(mail("d", T0)).await.unwrap();
    let ids = |items: Vec<MailboxItem>| items.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.mailbox(10).await.unwrap()),
        ["d", "b", "a", "c"],
        "newest first, then by id descending"
    );
    assert_eq!(ids(s.mailbox(2).await.unwrap()), ["d", "b"]);
    assert_eq!(s.mailbox(10).await.unwrap()[1], sms);

    // Delivery completions put their copy there too.
    let mut run = run_write("r1", "wf", "c1", 0, RunState::Completed, None);
    run.messages = vec![queued_email("m1", "s", T0)];
    seed_runs(s, vec![run], T0).await;
    let claimed = s.claim_messages(T0, 1, 100).await.unwrap();
    let mut done = outcome(&claimed[0], DeliveryResult::Sent { provider_id: None });
    done.mailbox = Some(mail("e", T0 + 20));
    s.complete_messages(T0 + 20, vec![done]).await.unwrap();
    assert_eq!(ids(s.mailbox(1).await.unwrap()), ["e"]);
}

async fn list_filters_and_cursor_pagination(db: &TestDb) {
    let s = &db.store;
    let mut runs = Vec::new();
    for i in 0..6 {
        let contact = if i % 2 == 0 { "c_even" } else { "c_odd" };
        let workflow = if i < 3 { "wf_a" } else { "wf_b" };
        let state = if i == 5 {
            RunState::Completed
        } else {
            RunState::Active
        };
        let mut r = run_write(&format!("run_{i}"), workflow, contact, 0, state, Some(T0));
        if i != 5 {
            // One live run per workflow and contact: make the others distinct workflows.
            r.workflow_id = format!("{workflow}{i}");
        }
        r.messages = vec![queued_email(&format!("msg_{i}"), "s", T0 + i)];
        runs.push(r);
    }
    seed_runs(s, runs, T0).await;
    let claimed = s.claim_messages(T0, 1, 100).await.unwrap();
    assert_eq!(claimed[0].id, "msg_0");
    s.complete_messages(
        T0,
        vec![outcome(
            &claimed[0],
            DeliveryResult::Failed { reason: "x".into() },
        )],
    )
    .await
    .unwrap();

    let f = |contact: Option<&str>,
             workflow: Option<&str>,
             status: Option<&str>,
             after: Option<&str>,
             limit: i64| ListFilter {
        contact_id: contact.map(Into::into),
        workflow_id: workflow.map(Into::into),
        status: status.map(Into::into),
        after: after.map(Into::into),
        limit,
    };
    let run_ids =
        |rows: Vec<herald_store::RunRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let msg_ids =
        |rows: Vec<herald_store::MessageRow>| rows.into_iter().map(|m| m.id).collect::<Vec<_>>();

    assert_eq!(
        run_ids(
            s.runs(f(Some("c_even"), None, None, None, 100))
                .await
                .unwrap()
        ),
        ["run_0", "run_2", "run_4"]
    );
    assert_eq!(
        run_ids(
            s.runs(f(None, Some("wf_b"), None, None, 100))
                .await
                .unwrap()
        ),
        ["run_5"]
    );
    assert_eq!(
        run_ids(
            s.runs(f(None, None, Some("completed"), None, 100))
                .await
                .unwrap()
        ),
        ["run_5"]
    );
    assert_eq!(
        run_ids(
            s.runs(f(Some("c_even"), None, Some("completed"), None, 100))
                .await
                .unwrap()
        ),
        Vec::<String>::new()
    );
    // Pages of two, each after the last id of the previous one.
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = run_ids(
            s.runs(f(None, None, None, after.as_deref(), 2))
                .await
                .unwrap(),
        );
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        pages.push(page);
    }
    assert_eq!(
        pages,
        [["run_0", "run_1"], ["run_2", "run_3"], ["run_4", "run_5"]]
    );
    assert_eq!(
        run_ids(
            s.runs(f(Some("c_odd"), None, None, Some("run_1"), 1))
                .await
                .unwrap()
        ),
        ["run_3"]
    );
    assert_eq!(
        s.runs(f(None, None, None, None, 0)).await.unwrap().len(),
        0,
        "limit 0: nothing"
    );

    assert_eq!(
        msg_ids(
            s.messages(f(Some("c_odd"), None, None, None, 100))
                .await
                .unwrap()
        ),
        ["msg_1", "msg_3", "msg_5"]
    );
    assert_eq!(
        msg_ids(
            s.messages(f(None, Some("wf_a0"), None, None, 100))
                .await
                .unwrap()
        ),
        ["msg_0"]
    );
    assert_eq!(
        msg_ids(
            s.messages(f(None, None, Some("failed"), None, 100))
                .await
                .unwrap()
        ),
        ["msg_0"]
    );
    assert_eq!(
        msg_ids(
            s.messages(f(None, None, Some("queued"), Some("msg_2"), 2))
                .await
                .unwrap()
        ),
        ["msg_3", "msg_4"]
    );
    assert_eq!(
        msg_ids(
            s.messages(f(
                Some("c_even"),
                Some("wf_a2"),
                Some("queued"),
                Some("msg_0"),
                5
            ))
            .await
            .unwrap()
        ),
        ["msg_2"]
    );
    let counts: HashMap<_, usize> =
        s.messages(all())
            .await
            .unwrap()
            .into_iter()
            .fold(HashMap::new(), |mut acc, m| {
                *acc.entry(m.status).or_default() += 1;
                acc
            });
    assert_eq!(
        (
            counts[&MessageStatus::Queued],
            counts[&MessageStatus::Failed]
        ),
        (5, 1)
    );
}

async fn queue_stats_count_due_work(db: &TestDb) {
    let s = &db.store;
    assert_eq!(
        s.queue_stats(T0).await.unwrap(),
        herald_store::QueueStats::default()
    );
    let mut run = run_write("r1", "wf", "c1", 0, RunState::Active, Some(T0 + 50));
    run.messages = vec![
        queued_email("m1", "s1", T0 + 20),
        queued_email("m2", "s2", T0 + 500),
    ];
    seed_runs(
        s,
        vec![
            run,
            run_write("r2", "wf2", "c1", 0, RunState::WaitingEvent, Some(T0 + 30)),
            run_write("r3", "wf3", "c1", 0, RunState::Parked, Some(T0)),
            run_write("r4", "wf4", "c1", 0, RunState::Active, Some(T0 + 900)),
        ],
        T0,
    )
    .await;
    accept(s, vec![contact_event("pending", "c9", T0)]).await;
    let stats = s.queue_stats(T0 + 100).await.unwrap();
    let received_ms = stats.oldest_event_ms;
    assert!(received_ms.is_some(), "the pending event's receipt time");
    assert_eq!(
        stats,
        herald_store::QueueStats {
            undispatched_events: 1,
            due_runs: 2,
            due_messages: 1,
            oldest_event_ms: received_ms,
            oldest_run_due_ms: Some(T0 + 30),
            oldest_message_due_ms: Some(T0 + 20),
        }
    );
    assert_eq!(stats.oldest_job_due_ms(), Some(T0 + 20));
    let stats = s.queue_stats(T0 + 10).await.unwrap();
    assert_eq!(
        (
            stats.due_runs,
            stats.due_messages,
            stats.oldest_job_due_ms()
        ),
        (0, 0, None)
    );
}
