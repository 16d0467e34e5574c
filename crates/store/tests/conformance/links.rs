//! Magic links and the portal: checking, redeeming and refusing links, sessions, resends, the
//! portal's products.

use super::*;
use herald_store::{LinkHolder, LinkKind, LinkRefusal, NewLink, NewSession};

conformance! {
    magic_links_check_redeem_and_refuse,
    magic_links_regenerate_sessions_and_site_values,
    link_resends_are_rate_limited,
    portal_products_follow_active_grants,
}

fn learner_link(
    hash: &str,
    contact: &str,
    message: Option<&str>,
    max_uses: Option<i64>,
    expires: Option<Timestamp>,
) -> NewLink {
    NewLink {
        token_hash: hash.into(),
        kind: LinkKind::Learner,
        contact_id: Some(contact.into()),
        message_id: message.map(Into::into),
        max_uses,
        expires,
    }
}

fn user_link(hash: &str) -> NewLink {
    NewLink {
        token_hash: hash.into(),
        kind: LinkKind::User,
        contact_id: None,
        message_id: None,
        max_uses: None,
        expires: None,
    }
}

fn learner(contact: &str) -> LinkHolder {
    LinkHolder {
        kind: LinkKind::Learner,
        contact_id: Some(contact.into()),
    }
}

fn session(id: &str, expires: Timestamp) -> NewSession {
    NewSession {
        id_hash: id.into(),
        expires,
    }
}

fn audit_lines(
    rows: Vec<herald_store::LinkAuditRow>,
) -> Vec<(String, Option<String>, Option<String>)> {
    rows.into_iter()
        .map(|r| (r.action, r.contact_id.map(String::from), r.reason))
        .collect()
}

async fn magic_links_check_redeem_and_refuse(db: &TestDb) {
    let s = &db.store;
    accept(
        s,
        vec![granted("g1", "c1", T0), contact_event("n2", "c2", T0)],
    )
    .await;
    project_all(s, T0).await;
    assert!(s.has_active_offer("c1".into()).await.unwrap());
    assert!(!s.has_active_offer("c2".into()).await.unwrap());

    s.mint_link(
        learner_link("h1", "c1", Some("m1"), Some(1), Some(T0 + ms(1_000))),
        T0,
    )
    .await
    .unwrap();
    // Checking is read-only.
    for _ in 0..2 {
        assert_eq!(
            s.check_link("h1".into(), T0).await.unwrap(),
            Ok(learner("c1"))
        );
    }
    assert_eq!(
        s.check_link("nope".into(), T0).await.unwrap(),
        Err((LinkRefusal::Unknown, None))
    );

    // Redeeming counts a use, starts a session and stores a login event, in one go.
    let redeemed = s
        .redeem_link(
            "h1".into(),
            T0 + ms(1),
            session("s1", T0 + ms(5_000)),
            SOURCE.into(),
        )
        .await
        .unwrap();
    assert_eq!(redeemed, Ok(learner("c1")));
    assert_eq!(
        s.session("s1".into(), T0 + ms(2)).await.unwrap(),
        Some(learner("c1"))
    );
    assert_eq!(
        s.session("s1".into(), T0 + ms(5_000)).await.unwrap(),
        None,
        "expired session"
    );
    assert_eq!(s.session("other".into(), T0 + ms(2)).await.unwrap(), None);
    let logins = Mutex::new(Vec::new());
    s.dispatch(DispatchRequest::new(
        10,
        &|| T0,
        Duration::MAX,
        &|input: &DispatchInput| {
            logins
                .lock()
                .unwrap()
                .extend(input.events.iter().map(|(_, e)| {
                    (
                        e.event_type.trigger_name(),
                        e.contact_id().to_owned(),
                        e.source.clone(),
                    )
                }));
            DispatchPlan::default()
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        logins.into_inner().unwrap(),
        [("user_login", "c1".to_owned(), SOURCE.to_owned())]
    );

    // Used up; refusals are audited (newest first) and store no event.
    let again = s
        .redeem_link(
            "h1".into(),
            T0 + ms(2),
            session("s2", T0 + ms(5_000)),
            SOURCE.into(),
        )
        .await
        .unwrap();
    assert_eq!(again, Err((LinkRefusal::UsedUp, Some("c1".into()))));
    assert_eq!(
        s.check_link("h1".into(), T0 + ms(2)).await.unwrap(),
        Err((LinkRefusal::UsedUp, Some("c1".into())))
    );
    assert_eq!(s.session("s2".into(), T0 + ms(3)).await.unwrap(), None);
    assert_eq!(s.undispatched_count().await.unwrap(), 0);
    let unknown = s
        .redeem_link(
            "nope".into(),
            T0 + ms(2),
            session("s3", T0 + ms(5_000)),
            SOURCE.into(),
        )
        .await
        .unwrap();
    assert_eq!(unknown, Err((LinkRefusal::Unknown, None)));
    assert_eq!(
        audit_lines(s.link_audit(Some("c1".into()), 10).await.unwrap()),
        [
            (
                "refuse".to_owned(),
                Some("c1".to_owned()),
                Some("used_up".to_owned())
            ),
            ("redeem".to_owned(), Some("c1".to_owned()), None),
            ("mint".to_owned(), Some("c1".to_owned()), None),
        ]
    );
    let all_audit = s.link_audit(None, 10).await.unwrap();
    assert_eq!(
        (
            all_audit.len(),
            all_audit[0].kind.as_str(),
            all_audit[0].action.as_str()
        ),
        (4, "unknown", "refuse")
    );
    assert_eq!(s.link_audit(None, 1).await.unwrap().len(), 1);

    // Expired; not entitled (no active offer); unlimited uses.
    s.mint_link(learner_link("h2", "c1", None, None, Some(T0 + ms(10))), T0)
        .await
        .unwrap();
    assert_eq!(
        s.check_link("h2".into(), T0 + ms(9)).await.unwrap(),
        Ok(learner("c1"))
    );
    let expired = s
        .redeem_link(
            "h2".into(),
            T0 + ms(10),
            session("s4", T0 + ms(5_000)),
            SOURCE.into(),
        )
        .await
        .unwrap();
    assert_eq!(expired, Err((LinkRefusal::Expired, Some("c1".into()))));
    s.mint_link(learner_link("h3", "c2", None, Some(5), None), T0)
        .await
        .unwrap();
    assert_eq!(
        s.check_link("h3".into(), T0).await.unwrap(),
        Err((LinkRefusal::NotEntitled, Some("c2".into())))
    );
    let refused = s
        .redeem_link(
            "h3".into(),
            T0,
            session("s5", T0 + ms(5_000)),
            SOURCE.into(),
        )
        .await
        .unwrap();
    assert_eq!(refused, Err((LinkRefusal::NotEntitled, Some("c2".into()))));
    s.mint_link(learner_link("h4", "c1", None, None, None), T0)
        .await
        .unwrap();
    for i in 0..3 {
        let id = format!("s_many_{i}");
        assert_eq!(
            s.redeem_link("h4".into(), T0, session(&id, T0 + ms(5_000)), SOURCE.into())
                .await
                .unwrap(),
            Ok(learner("c1"))
        );
    }

    // Re-minting for the same message revokes that message's earlier link.
    s.mint_link(
        learner_link("h1b", "c1", Some("m1"), Some(1), Some(T0 + ms(1_000))),
        T0 + ms(3),
    )
    .await
    .unwrap();
    assert_eq!(
        s.check_link("h1".into(), T0 + ms(3)).await.unwrap(),
        Err((LinkRefusal::Revoked, Some("c1".into())))
    );
    assert_eq!(
        s.check_link("h1b".into(), T0 + ms(3)).await.unwrap(),
        Ok(learner("c1"))
    );

    // Losing the offer makes the contact's links refuse.
    accept(
        s,
        vec![new_event(
            "r1",
            "offer_access_removed",
            T0 + ms(1),
            json!({"contact": {"id": "c1"}, "offer": {"id": "o_pro"}}),
        )],
    )
    .await;
    project_all(s, T0).await;
    assert_eq!(
        s.check_link("h4".into(), T0 + ms(4)).await.unwrap(),
        Err((LinkRefusal::NotEntitled, Some("c1".into())))
    );
}

async fn magic_links_regenerate_sessions_and_site_values(db: &TestDb) {
    let s = &db.store;
    accept(s, vec![granted("g1", "c1", T0), granted("g2", "c2", T0)]).await;
    project_all(s, T0).await;
    s.mint_link(learner_link("a1", "c1", Some("m1"), None, None), T0)
        .await
        .unwrap();
    s.mint_link(learner_link("a2", "c1", Some("m2"), None, None), T0)
        .await
        .unwrap();
    s.mint_link(learner_link("b1", "c2", None, None, None), T0)
        .await
        .unwrap();
    s.regenerate_link(user_link("u1"), None, T0).await.unwrap();
    assert_eq!(
        s.check_link("u1".into(), T0).await.unwrap(),
        Ok(LinkHolder {
            kind: LinkKind::User,
            contact_id: None
        })
    );

    // Regenerating a learner's link revokes all of theirs and nobody else's.
    s.regenerate_link(learner_link("a3", "c1", None, None, None), None, T0 + ms(1))
        .await
        .unwrap();
    for old in ["a1", "a2"] {
        assert_eq!(
            s.check_link(old.into(), T0 + ms(2)).await.unwrap(),
            Err((LinkRefusal::Revoked, Some("c1".into())))
        );
    }
    assert_eq!(
        s.check_link("a3".into(), T0 + ms(2)).await.unwrap(),
        Ok(learner("c1"))
    );
    assert_eq!(
        s.check_link("b1".into(), T0 + ms(2)).await.unwrap(),
        Ok(learner("c2"))
    );
    assert_eq!(
        s.check_link("u1".into(), T0 + ms(2)).await.unwrap(),
        Ok(LinkHolder {
            kind: LinkKind::User,
            contact_id: None
        })
    );
    let revoked = s
        .redeem_link(
            "a1".into(),
            T0 + ms(2),
            session("x", T0 + ms(100)),
            SOURCE.into(),
        )
        .await
        .unwrap();
    assert_eq!(revoked, Err((LinkRefusal::Revoked, Some("c1".into()))));

    // Regenerating the user link revokes only the user link; a user redemption stores no event.
    s.regenerate_link(
        user_link("u2"),
        Some(("user_link_generation".into(), "2".into())),
        T0 + ms(3),
    )
    .await
    .unwrap();
    assert_eq!(
        s.site_value("user_link_generation".into(), "0".into())
            .await
            .unwrap(),
        "2",
        "the site value is written with the link"
    );
    assert_eq!(
        s.check_link("u1".into(), T0 + ms(4)).await.unwrap(),
        Err((LinkRefusal::Revoked, None))
    );
    assert_eq!(
        s.check_link("a3".into(), T0 + ms(4)).await.unwrap(),
        Ok(learner("c1"))
    );
    let staff = s
        .redeem_link(
            "u2".into(),
            T0 + ms(4),
            session("staff", T0 + ms(100)),
            SOURCE.into(),
        )
        .await
        .unwrap();
    assert_eq!(
        staff,
        Ok(LinkHolder {
            kind: LinkKind::User,
            contact_id: None
        })
    );
    assert_eq!(s.undispatched_count().await.unwrap(), 0);
    assert_eq!(
        s.session("staff".into(), T0 + ms(5)).await.unwrap(),
        Some(LinkHolder {
            kind: LinkKind::User,
            contact_id: None
        })
    );
    s.end_session("staff".into(), T0 + ms(6)).await.unwrap();
    assert_eq!(s.session("staff".into(), T0 + ms(7)).await.unwrap(), None);
    s.end_session("staff".into(), T0 + ms(8)).await.unwrap();

    // Site values: created once with the default, then only set explicitly.
    assert_eq!(
        s.site_value("user_key".into(), "first".into())
            .await
            .unwrap(),
        "first"
    );
    assert_eq!(
        s.site_value("user_key".into(), "second".into())
            .await
            .unwrap(),
        "first"
    );
    s.set_site_value("user_key".into(), "third".into())
        .await
        .unwrap();
    assert_eq!(
        s.site_value("user_key".into(), "fourth".into())
            .await
            .unwrap(),
        "third"
    );
    s.set_site_value("other".into(), "x".into()).await.unwrap();
    assert_eq!(s.site_value("other".into(), "y".into()).await.unwrap(), "x");
}

async fn link_resends_are_rate_limited(db: &TestDb) {
    let s = &db.store;
    // At most 2 per short window and 3 per day.
    let allow = |now: Timestamp, short_since: Timestamp| {
        s.allow_link_resend("c1".into(), now, short_since, 2, T0, 3)
    };
    assert!(allow(T0 + ms(100), T0).await.unwrap());
    assert!(allow(T0 + ms(101), T0).await.unwrap());
    assert!(
        !allow(T0 + ms(102), T0).await.unwrap(),
        "third in the short window"
    );
    assert!(
        allow(T0 + ms(300), T0 + ms(200)).await.unwrap(),
        "a new short window"
    );
    assert!(
        !allow(T0 + ms(301), T0 + ms(301)).await.unwrap(),
        "the day's budget is spent"
    );
    assert!(
        s.allow_link_resend("c2".into(), T0 + ms(302), T0, 2, T0, 3)
            .await
            .unwrap(),
        "per contact"
    );
    let actions: Vec<String> = s
        .link_audit(Some("c1".into()), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .collect();
    assert_eq!(
        actions,
        [
            "resend_refused",
            "resend",
            "resend_refused",
            "resend",
            "resend"
        ]
    );

    // Concurrent requests of one contact never exceed the budget.
    let other = db.open_another().await;
    let mut tasks = Vec::new();
    for k in 0..8 {
        let store = if k % 2 == 0 { s.clone() } else { other.clone() };
        tasks.push(tokio::spawn(async move {
            store
                .allow_link_resend("c3".into(), T0 + ms(500), T0, 3, T0, 10)
                .await
                .unwrap()
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += usize::from(t.await.unwrap());
    }
    assert_eq!(allowed, 3);
}

async fn portal_products_follow_active_grants(db: &TestDb) {
    let s = &db.store;
    accept(
        s,
        vec![
            offer_event(
                "o1",
                "c1",
                json!({"id": "o_pro", "title": "Pro", "product_ids": ["p_b", "p_a"]}),
                T0,
            ),
            lesson_event(
                "l1",
                "c1",
                json!({"id": "p_a", "title": "Zeta course", "url": "https://s/a"}),
                T0,
            ),
            lesson_event(
                "l2",
                "c1",
                json!({"id": "p_b", "title": "Alpha course"}),
                T0,
            ),
            new_event(
                "pg",
                "product_access_granted",
                T0,
                json!({"contact": {"id": "c1"}, "product": {"id": "p_c"}}),
            ),
            new_event(
                "pr",
                "product_access_granted",
                T0,
                json!({"contact": {"id": "c1"}, "product": {"id": "p_d", "title": "Gone"}}),
            ),
            new_event(
                "pr2",
                "product_access_removed",
                T0 + ms(1),
                json!({"contact": {"id": "c1"}, "product": {"id": "p_d"}}),
            ),
            offer_event(
                "o2",
                "c2",
                json!({"id": "o_other", "product_ids": ["p_e"]}),
                T0,
            ),
            new_event(
                "o2r",
                "offer_access_removed",
                T0 + ms(1),
                json!({"contact": {"id": "c2"}, "offer": {"id": "o_other"}}),
            ),
        ],
    )
    .await;
    project_all(s, T0).await;
    let ids =
        |rows: Vec<herald_store::ProductRow>| rows.into_iter().map(|p| p.id).collect::<Vec<_>>();
    // Ordered by title (else id), bytewise.
    let mine = s.portal_products(Some("c1".into())).await.unwrap();
    assert_eq!(ids(mine.clone()), ["p_b", "p_a", "p_c"]);
    assert_eq!(
        mine[1],
        herald_store::ProductRow {
            id: "p_a".into(),
            title: Some("Zeta course".into()),
            url: Some("https://s/a".into())
        }
    );
    assert!(
        s.portal_products(Some("c2".into()))
            .await
            .unwrap()
            .is_empty(),
        "a removed offer shows nothing"
    );
    assert!(
        s.portal_products(Some("nobody".into()))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ids(s.portal_products(None).await.unwrap()),
        ["p_b", "p_d", "p_a", "p_c", "p_e"]
    );
}
