//! The admin lists: filters and cursor pagination, queue statistics, the dev mailbox.

use super::*;
use std::collections::HashMap;

conformance! {
    mailbox_lists_newest_first,
    list_filters_and_cursor_pagination,
    queue_stats_count_due_work,
    runs_list_every_step_of_every_run,
    a_negative_limit_means_no_limit,
}

async fn mailbox_lists_newest_first(db: &TestDb) {
    let s = &db.store;
    assert!(s.mailbox(10).await.unwrap().is_empty());
    let mut sms = mail("b", T0 + ms(5));
    sms.channel = Channel::Sms;
    sms.subject = None;
    sms.html_body = None;
    sms.sender = None;
    sms.message_id = None;
    s.add_to_mailbox(mail("a", T0 + ms(5))).await.unwrap();
    s.add_to_mailbox(sms.clone()).await.unwrap();
    s.add_to_mailbox(mail("c", T0 + ms(1))).await.unwrap();
    s.add_to_mailbox(mail("d", T0 + ms(9))).await.unwrap();
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
    let claimed = s.claim_messages(T0, 1, ms(100)).await.unwrap();
    let mut done = outcome(&claimed[0], DeliveryResult::Sent { provider_id: None });
    done.mailbox = Some(mail("e", T0 + ms(20)));
    s.complete_messages(T0 + ms(20), vec![done]).await.unwrap();
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
            r.workflow_id = format!("{workflow}{i}").into();
        }
        r.messages = vec![queued_email(&format!("msg_{i}"), "s", T0 + ms(i))];
        runs.push(r);
    }
    seed_runs(s, runs, T0).await;
    let claimed = s.claim_messages(T0, 1, ms(100)).await.unwrap();
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
    let run_ids = |rows: Vec<herald_store::RunRow>| {
        rows.into_iter()
            .map(|r| String::from(r.id))
            .collect::<Vec<_>>()
    };
    let msg_ids = |rows: Vec<herald_store::MessageRow>| {
        rows.into_iter()
            .map(|m| String::from(m.id))
            .collect::<Vec<_>>()
    };

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
    let mut run = run_write("r1", "wf", "c1", 0, RunState::Active, Some(T0 + ms(50)));
    run.messages = vec![
        queued_email("m1", "s1", T0 + ms(20)),
        queued_email("m2", "s2", T0 + ms(500)),
    ];
    seed_runs(
        s,
        vec![
            run,
            run_write(
                "r2",
                "wf2",
                "c1",
                0,
                RunState::WaitingEvent,
                Some(T0 + ms(30)),
            ),
            run_write("r3", "wf3", "c1", 0, RunState::Parked, Some(T0)),
            run_write("r4", "wf4", "c1", 0, RunState::Active, Some(T0 + ms(900))),
        ],
        T0,
    )
    .await;
    accept(s, vec![contact_event("pending", "c9", T0)]).await;
    let stats = s.queue_stats(T0 + ms(100)).await.unwrap();
    let received_ms = stats.oldest_event_ms;
    assert!(received_ms.is_some(), "the pending event's receipt time");
    assert_eq!(
        stats,
        herald_store::QueueStats {
            undispatched_events: 1,
            due_runs: 2,
            due_messages: 1,
            oldest_event_ms: received_ms,
            oldest_run_due_ms: Some(T0 + ms(30)),
            oldest_message_due_ms: Some(T0 + ms(20)),
        }
    );
    assert_eq!(stats.oldest_job_due(), Some(T0 + ms(20)));
    let stats = s.queue_stats(T0 + ms(10)).await.unwrap();
    assert_eq!(
        (stats.due_runs, stats.due_messages, stats.oldest_job_due()),
        (0, 0, None)
    );
}

async fn runs_list_every_step_of_every_run(db: &TestDb) {
    let s = &db.store;
    // Step ids that sort against their order, so only `seq` can put them right.
    let steps_of = |i: usize| -> Vec<StepRecord> {
        (0..i % 5)
            .map(|n| step(&format!("s{}", 9 - n), "ok", T0 + ms(n as u64)))
            .collect()
    };
    let runs = (0..40)
        .map(|i| {
            let mut r = run_write(
                &format!("run_{i:02}"),
                "wf",
                &format!("c{i}"),
                0,
                RunState::Active,
                Some(T0),
            );
            r.steps = steps_of(i);
            r
        })
        .collect();
    seed_runs(s, runs, T0).await;

    let listed = s.runs(all()).await.unwrap();
    assert_eq!(listed.len(), 40);
    for (i, run) in listed.iter().enumerate() {
        assert_eq!(run.id, format!("run_{i:02}"));
        assert_eq!(run.steps, steps_of(i), "the steps of {}", run.id);
    }
    // A page carries its own runs' steps, and only theirs.
    let page = s
        .runs(ListFilter {
            after: Some("run_10".into()),
            limit: 3,
            ..ListFilter::default()
        })
        .await
        .unwrap();
    let got: Vec<_> = page
        .iter()
        .map(|r| (r.id.as_str(), r.steps.len()))
        .collect();
    assert_eq!(got, [("run_11", 1), ("run_12", 2), ("run_13", 3)]);
}

async fn a_negative_limit_means_no_limit(db: &TestDb) {
    let s = &db.store;
    let runs = (0..3)
        .map(|i| {
            let mut r = run_write(
                &format!("run_{i}"),
                "wf",
                &format!("c{i}"),
                0,
                RunState::Active,
                Some(T0),
            );
            r.messages = vec![queued_email(&format!("msg_{i}"), "s", T0)];
            r
        })
        .collect();
    seed_runs(s, runs, T0).await;
    accept(
        s,
        vec![
            contact_event("e1", "c0", T0 + ms(1)),
            contact_event("e2", "c0", T0 + ms(2)),
        ],
    )
    .await;
    for m in ["a", "b", "c"] {
        s.add_to_mailbox(mail(m, T0)).await.unwrap();
    }

    for limit in [-1, i64::MIN, i64::MAX] {
        let f = ListFilter {
            limit,
            ..ListFilter::default()
        };
        assert_eq!(s.runs(f.clone()).await.unwrap().len(), 3, "runs, {limit}");
        assert_eq!(s.messages(f).await.unwrap().len(), 3, "messages, {limit}");
        assert_eq!(s.mailbox(limit).await.unwrap().len(), 3, "mailbox, {limit}");
        let events = s.contact_events("c0".into(), limit).await.unwrap();
        let ids: Vec<_> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["seed-run_0", "e1", "e2"], "contact events, {limit}");
    }
    // A limit of zero is still none at all.
    assert!(s.runs(ListFilter::default()).await.unwrap().is_empty());
    assert!(s.contact_events("c0".into(), 0).await.unwrap().is_empty());
}
