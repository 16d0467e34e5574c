//! Events in: acceptance, deduplicated on `(source, id)`, also under concurrent writers.

use super::*;

conformance! {
    accept_events_deduplicates_by_source_and_id,
    concurrent_accepts_store_each_event_once,
}

async fn accept_events_deduplicates_by_source_and_id(db: &TestDb) {
    let s = &db.store;
    let a = contact_event("evt_a", "c1", T0);
    let b = contact_event("evt_b", "c1", T0);
    let mut a_elsewhere = contact_event("evt_a", "c1", T0);
    a_elsewhere.event.source = "https://other.example.com".into();
    let got = accept(s, vec![a.clone(), b, a.clone(), a_elsewhere]).await;
    assert_eq!(
        got,
        [
            Accepted::New,
            Accepted::New,
            Accepted::Duplicate,
            Accepted::New
        ]
    );

    let got = accept(s, vec![a.clone(), contact_event("evt_c", "c2", T0), a]).await;
    assert_eq!(
        got,
        [Accepted::Duplicate, Accepted::New, Accepted::Duplicate]
    );
    assert_eq!(s.undispatched_count().await.unwrap(), 4);
    assert_eq!(accept(s, Vec::new()).await, []);

    // A duplicate has no further effect: one event was stored per (source, id).
    let seen = Mutex::new(Vec::new());
    let planner = |input: &DispatchInput| {
        seen.lock().unwrap().extend(
            input
                .events
                .iter()
                .map(|(_, e)| (e.source.clone(), e.id.clone())),
        );
        DispatchPlan::default()
    };
    assert_eq!(
        s.dispatch(DispatchRequest::new(100, &|| T0, Duration::MAX, &planner))
            .await
            .unwrap(),
        4
    );
    let seen = seen.into_inner().unwrap();
    assert_eq!(
        seen,
        [
            (SOURCE.to_owned(), "evt_a".to_owned()),
            (SOURCE.to_owned(), "evt_b".to_owned()),
            ("https://other.example.com".to_owned(), "evt_a".to_owned()),
            (SOURCE.to_owned(), "evt_c".to_owned()),
        ]
    );
}

async fn concurrent_accepts_store_each_event_once(db: &TestDb) {
    let other = db.open_another().await;
    let events: Vec<NewEvent> = (0..30)
        .map(|i| contact_event(&format!("evt_{i}"), &format!("c{}", i % 7), T0))
        .collect();
    let mut tasks = Vec::new();
    for k in 0..6 {
        let store = if k % 2 == 0 {
            db.store.clone()
        } else {
            other.clone()
        };
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            store.accept_events(events).await.expect("accept")
        }));
    }
    let mut new_per_event = vec![0; events.len()];
    for t in tasks {
        for (i, fate) in t.await.unwrap().into_iter().enumerate() {
            if fate == Accepted::New {
                new_per_event[i] += 1;
            }
        }
    }
    assert_eq!(
        new_per_event,
        vec![1; events.len()],
        "each event is new for exactly one caller"
    );
    assert_eq!(db.store.undispatched_count().await.unwrap(), 30);
}
