//! The membership projection: contact details, grants by event time, the catalogue.

use super::*;
use herald_core::workflow::ContactState;

conformance! {
    contact_details_latest_event_wins_and_older_fills_gaps,
    grants_follow_event_time,
    catalogue_products_offers_and_offer_products,
    contact_state_is_what_the_contact_holds_and_completed,
}

fn row(cols: &[&str]) -> Vec<String> {
    cols.iter().map(|c| c.to_string()).collect()
}

async fn contact_details_latest_event_wins_and_older_fills_gaps(db: &TestDb) {
    let s = &db.store;
    let first = |c: &str| {
        signup(
            &format!("{c}-1"),
            json!({"id": c, "email": "a@example.com", "first_name": "Ann", "locale": "de-DE",
                                          "custom_fields": {"company": "Acme"}}),
            T0 + ms(2_000),
        )
    };
    let second = |c: &str| {
        signup(
            &format!("{c}-2"),
            json!({"id": c, "email": "b@example.com"}),
            T0 + ms(3_000),
        )
    };
    // Older than both, arriving last: overwrites nothing, fills what is missing.
    let late = |c: &str| {
        signup(
            &format!("{c}-3"),
            json!({"id": c, "email": "old@example.com", "first_name": "Old",
                                          "phone": "+15551234567", "last_name": "Lee", "timezone": "Europe/Berlin", "locale": "fr-FR",
                                          "custom_fields": {"company": "Old Co"}}),
            T0 + ms(1_000),
        )
    };
    let expected = |c: &str| herald_store::ContactRow {
        id: c.into(),
        email: Some("b@example.com".into()),
        phone: Some("+15551234567".into()),
        first_name: Some("Ann".into()),
        last_name: Some("Lee".into()),
        timezone: Some("Europe/Berlin".into()),
        custom_fields: Some(json!({"company": "Acme"}).to_string()),
        locale: Some("de-DE".into()),
    };

    // Across dispatches...
    accept(s, vec![first("c1"), second("c1")]).await;
    project_all(s, T0).await;
    let c1 = s.contact("c1".into()).await.unwrap().unwrap();
    assert_eq!(c1.email.as_deref(), Some("b@example.com"));
    assert_eq!(c1.phone, None);
    accept(s, vec![late("c1")]).await;
    project_all(s, T0).await;
    assert_eq!(s.contact("c1".into()).await.unwrap(), Some(expected("c1")));

    // ...and within one batch, in other arrival orders. (Details carry one time per contact,
    // not per field: a field an older event filled stays until a newer event sets it.)
    accept(s, vec![first("c2"), late("c2"), second("c2")]).await;
    accept(s, vec![second("c3"), first("c3"), late("c3")]).await;
    project_all(s, T0).await;
    assert_eq!(s.contact("c2".into()).await.unwrap(), Some(expected("c2")));
    assert_eq!(s.contact("c3".into()).await.unwrap(), Some(expected("c3")));

    // A newer event with the same field replaces it; equal times: the later arrival wins.
    accept(
        s,
        vec![signup(
            "c1-4",
            json!({"id": "c1", "first_name": "Anna"}),
            T0 + ms(3_000),
        )],
    )
    .await;
    project_all(s, T0).await;
    let c1 = s.contact("c1".into()).await.unwrap().unwrap();
    assert_eq!(
        (c1.first_name.as_deref(), c1.email.as_deref()),
        (Some("Anna"), Some("b@example.com"))
    );

    assert_eq!(s.contact("nobody".into()).await.unwrap(), None);
}

fn grant_event(id: &str, ty: &str, contact: &str, item: &str, time: Timestamp) -> NewEvent {
    let data = if ty.starts_with("offer") {
        json!({"contact": {"id": contact}, "offer": {"id": item}})
    } else {
        json!({"contact": {"id": contact}, "product": {"id": item}})
    };
    new_event(id, ty, time, data)
}

async fn grants_follow_event_time(db: &TestDb) {
    let s = &db.store;
    let g = |kind: &str, item: &str, active: bool, changed: Timestamp| herald_store::GrantRow {
        kind: kind.into(),
        item_id: item.into(),
        active,
        changed_ms: changed,
    };
    // One batch: a grant, then an older removal arriving late (must not undo it); a removal,
    // then an older grant arriving late.
    accept(
        s,
        vec![
            grant_event("g1", "offer_access_granted", "c1", "o_pro", T0 + ms(2_000)),
            grant_event("g2", "offer_access_removed", "c1", "o_pro", T0 + ms(1_000)),
            grant_event(
                "g3",
                "product_access_removed",
                "c1",
                "p_rust",
                T0 + ms(3_000),
            ),
            grant_event(
                "g4",
                "product_access_granted",
                "c1",
                "p_rust",
                T0 + ms(2_500),
            ),
            grant_event("g5", "offer_access_granted", "c2", "o_pro", T0),
        ],
    )
    .await;
    project_all(s, T0).await;
    assert_eq!(
        s.grants("c1".into()).await.unwrap(),
        [
            g("offer", "o_pro", true, T0 + ms(2_000)),
            g("product", "p_rust", false, T0 + ms(3_000))
        ]
    );

    // Across batches: a late older event is still ignored; a newer one applies; at equal times
    // the later arrival wins.
    accept(
        s,
        vec![grant_event(
            "g6",
            "offer_access_removed",
            "c1",
            "o_pro",
            T0 + ms(1_500),
        )],
    )
    .await;
    project_all(s, T0).await;
    accept(
        s,
        vec![
            grant_event(
                "g7",
                "offer_access_granted",
                "c1",
                "o_basic",
                T0 + ms(5_000),
            ),
            grant_event(
                "g8",
                "offer_access_removed",
                "c1",
                "o_basic",
                T0 + ms(5_000),
            ),
            grant_event(
                "g9",
                "product_access_granted",
                "c1",
                "p_rust",
                T0 + ms(4_000),
            ),
        ],
    )
    .await;
    project_all(s, T0).await;
    assert_eq!(
        s.grants("c1".into()).await.unwrap(),
        [
            g("offer", "o_basic", false, T0 + ms(5_000)),
            g("offer", "o_pro", true, T0 + ms(2_000)),
            g("product", "p_rust", true, T0 + ms(4_000)),
        ]
    );
    accept(
        s,
        vec![grant_event(
            "g10",
            "offer_access_removed",
            "c1",
            "o_pro",
            T0 + ms(6_000),
        )],
    )
    .await;
    project_all(s, T0).await;
    assert_eq!(
        s.grants("c1".into()).await.unwrap()[1],
        g("offer", "o_pro", false, T0 + ms(6_000))
    );
    // Other contacts are untouched; non-grant events make no grants.
    assert_eq!(
        s.grants("c2".into()).await.unwrap(),
        [g("offer", "o_pro", true, T0)]
    );
    accept(s, vec![contact_event("n1", "c3", T0)]).await;
    project_all(s, T0).await;
    assert_eq!(s.grants("c3".into()).await.unwrap(), []);
}

async fn catalogue(db: &TestDb) -> (Vec<Vec<String>>, Vec<Vec<String>>, Vec<Vec<String>>) {
    let products =
        strings(db.text_rows("SELECT id, title, url, CAST(updated_ms - 1700000000000 AS TEXT) FROM products ORDER BY id").await);
    let offers = strings(
        db.text_rows(
            "SELECT id, title, CAST(updated_ms - 1700000000000 AS TEXT) FROM offers ORDER BY id",
        )
        .await,
    );
    let offer_products = strings(
        db.text_rows(
            "SELECT offer_id, product_id FROM offer_products ORDER BY offer_id, product_id",
        )
        .await,
    );
    (products, offers, offer_products)
}

async fn catalogue_products_offers_and_offer_products(db: &TestDb) {
    let s = &db.store;
    accept(
        s,
        vec![
            lesson_event(
                "e1",
                "c1",
                json!({"id": "p1", "title": "Rust 101", "url": "https://s/p1"}),
                T0 + ms(2_000),
            ),
            // Older, later: keeps the newer title, fills nothing (nothing is missing).
            lesson_event(
                "e2",
                "c1",
                json!({"id": "p1", "title": "Old title", "url": "https://s/old"}),
                T0 + ms(1_000),
            ),
            offer_event(
                "e3",
                "c1",
                json!({"id": "o1", "product_ids": ["p1", "p2"]}),
                T0 + ms(3_000),
            ),
            // The offer created p2 without a title; an older event describing p2 fills it in.
            lesson_event(
                "e4",
                "c1",
                json!({"id": "p2", "title": "Async"}),
                T0 + ms(1_000),
            ),
            // An older offer event: its product list is ignored and p3 is not created; its title
            // fills the missing one.
            offer_event(
                "e5",
                "c1",
                json!({"id": "o1", "title": "Pro", "product_ids": ["p3"]}),
                T0 + ms(2_000),
            ),
        ],
    )
    .await;
    project_all(s, T0).await;
    let (products, offers, offer_products) = catalogue(db).await;
    assert_eq!(
        products,
        [
            row(&["p1", "Rust 101", "https://s/p1", "2000"]),
            row(&["p2", "Async", "NULL", "3000"])
        ]
    );
    assert_eq!(offers, [row(&["o1", "Pro", "3000"])]);
    assert_eq!(offer_products, [row(&["o1", "p1"]), row(&["o1", "p2"])]);

    // A newer offer event replaces the list (creating unknown products); a newer one without a
    // list keeps it; several in one batch: the last newer list wins.
    accept(
        s,
        vec![
            offer_event(
                "e6",
                "c2",
                json!({"id": "o1", "title": "Pro 2", "product_ids": ["p2", "p4"]}),
                T0 + ms(5_000),
            ),
            offer_event(
                "e7",
                "c2",
                json!({"id": "o2", "product_ids": ["p5"]}),
                T0 + ms(5_000),
            ),
            offer_event(
                "e8",
                "c2",
                json!({"id": "o2", "product_ids": ["p5", "p6"]}),
                T0 + ms(6_000),
            ),
            offer_event(
                "e9",
                "c2",
                json!({"id": "o2", "product_ids": ["p7"]}),
                T0 + ms(4_000),
            ),
        ],
    )
    .await;
    project_all(s, T0).await;
    accept(
        s,
        vec![offer_event(
            "e10",
            "c2",
            json!({"id": "o1", "title": "Pro 3"}),
            T0 + ms(7_000),
        )],
    )
    .await;
    project_all(s, T0).await;
    let (products, offers, offer_products) = catalogue(db).await;
    assert_eq!(
        products,
        [
            row(&["p1", "Rust 101", "https://s/p1", "2000"]),
            row(&["p2", "Async", "NULL", "3000"]),
            row(&["p4", "NULL", "NULL", "5000"]),
            row(&["p5", "NULL", "NULL", "5000"]),
            row(&["p6", "NULL", "NULL", "6000"]),
        ]
    );
    assert_eq!(
        offers,
        [row(&["o1", "Pro 3", "7000"]), row(&["o2", "NULL", "6000"])]
    );
    assert_eq!(
        offer_products,
        [
            row(&["o1", "p2"]),
            row(&["o1", "p4"]),
            row(&["o2", "p5"]),
            row(&["o2", "p6"])
        ]
    );

    // A product first named by an offer and described by a later event of the same batch.
    accept(
        s,
        vec![
            offer_event(
                "e11",
                "c3",
                json!({"id": "o3", "product_ids": ["p8"]}),
                T0 + ms(8_000),
            ),
            lesson_event(
                "e12",
                "c3",
                json!({"id": "p8", "title": "Eight", "url": "https://s/p8"}),
                T0 + ms(9_000),
            ),
            lesson_event(
                "e13",
                "c3",
                json!({"id": "p8", "title": "Eight (old)"}),
                T0 + ms(8_500),
            ),
        ],
    )
    .await;
    project_all(s, T0).await;
    let (products, _, _) = catalogue(db).await;
    assert_eq!(
        products.last().unwrap(),
        &row(&["p8", "Eight", "https://s/p8", "9000"])
    );
}

async fn contact_state_is_what_the_contact_holds_and_completed(db: &TestDb) {
    let s = &db.store;
    let contact = json!({"id": "c1"});
    let events = vec![
        new_event(
            "s1",
            "offer_access_granted",
            T0,
            json!({"contact": contact, "offer": {"id": "o_pro", "product_ids": ["p_a", "p_b"]}}),
        ),
        grant_event("s2", "offer_access_granted", "c1", "o_old", T0),
        grant_event("s3", "offer_access_removed", "c1", "o_old", T0 + ms(1)),
        grant_event("s4", "product_access_granted", "c1", "p_x", T0),
        grant_event("s5", "product_access_granted", "c1", "p_y", T0),
        grant_event("s6", "product_access_removed", "c1", "p_y", T0 + ms(1)),
        new_event(
            "s7",
            "lesson_completed",
            T0 + ms(2),
            json!({"contact": contact, "product": {"id": "p_a"}, "lesson": {"id": "l_1"}}),
        ),
        new_event(
            "s8",
            "category_completed",
            T0 + ms(3),
            json!({"contact": contact, "product": {"id": "p_a"}, "category": {"id": "cat_1"}}),
        ),
        new_event(
            "s9",
            "product_completed",
            T0 + ms(4),
            json!({"contact": contact, "product": {"id": "p_a"}}),
        ),
        contact_event("s10", "c2", T0),
    ];
    accept(s, events).await;

    // In the dispatch transaction, asked for, the planner sees the state its batch left.
    let seen = Mutex::new(None);
    let planner = |input: &DispatchInput| {
        *seen.lock().unwrap() = Some(input.states.clone());
        DispatchPlan::default()
    };
    let request = DispatchRequest {
        contact_states: true,
        ..DispatchRequest::new(100, &|| T0, Duration::MAX, &planner)
    };
    assert_eq!(s.dispatch(request).await.unwrap(), 10);
    let in_dispatch = seen
        .into_inner()
        .unwrap()
        .expect("the planner ran")
        .expect("states loaded when asked");

    let set = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect();
    let c1 = ContactState {
        offers: set(&["o_pro"]),
        products: set(&["p_a", "p_b", "p_x"]),
        completed_lessons: set(&["l_1"]),
        completed_products: set(&["p_a"]),
        completed_categories: set(&["cat_1"]),
    };
    assert_eq!(in_dispatch.get("c1"), Some(&c1));
    assert_eq!(in_dispatch.get("c2"), Some(&ContactState::default()));

    let stored = s
        .contact_states(vec!["c1".into(), "c2".into(), "c_unknown".into()])
        .await
        .unwrap();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored["c1"], c1);
    assert_eq!(stored["c2"], ContactState::default());
    assert_eq!(stored["c_unknown"], ContactState::default());

    // Not asked for, nothing is loaded.
    accept(s, vec![contact_event("s11", "c2", T0 + ms(5))]).await;
    let seen = Mutex::new(None);
    let planner = |input: &DispatchInput| {
        *seen.lock().unwrap() = Some(input.states.is_some());
        DispatchPlan::default()
    };
    s.dispatch(DispatchRequest::new(100, &|| T0, Duration::MAX, &planner))
        .await
        .unwrap();
    assert_eq!(seen.into_inner().unwrap(), Some(false));
}
