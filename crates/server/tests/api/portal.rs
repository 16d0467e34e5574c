//! The membership portal: only a session opens it; it greets the learner by first name
//! (escaped) and lists exactly the products of the contact's active grants, re-evaluated on every
//! request, so removing the last offer stops the links and narrows existing sessions at once.

use crate::helpers::*;
use crate::link_helpers::*;

both_backends!(
    portal_requires_a_session,
    portal_lists_exactly_the_granted_products,
    names_and_titles_are_escaped_on_the_portal,
    a_login_does_not_outdate_the_contact_details,
    removing_the_last_offer_revokes_links_and_ends_sessions,
);

async fn portal_requires_a_session(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend)).await else {
        return;
    };
    enroll(&app, "c_nosession", "Ann").await;
    let mut jar = Jar::new(&app);
    let cookies = [
        None,
        Some("herald_session=".to_owned()),
        Some("herald_session=not-a-session".to_owned()),
        Some(format!("herald_session={}", unknown_token())),
        Some(format!("other=1; herald_session={}; x=y", unknown_token())),
    ];
    for cookie in cookies {
        jar.cookie = cookie.clone();
        let p = jar.portal().await;
        assert_eq!(p.status, 401, "{cookie:?}: {p:?}");
        p.assert_private();
        assert!(p.body.contains("You are not signed in"), "{}", p.body);
        assert!(!p.body.contains("Rust 101"), "{}", p.body);
    }
    // A link token is not a session id.
    let token = app.mint_token("c_nosession").await;
    jar.cookie = Some(format!("herald_session={token}"));
    assert_eq!(jar.portal().await.status, 401);
}

async fn portal_lists_exactly_the_granted_products(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend)).await else {
        return;
    };
    let ann = enroll(&app, "c_portal", "Ann").await;
    app.accept_batch(&[
        grant_product(ann.clone(), "p_bonus", "Bonus Pack", T_GRANT),
        // In the catalogue, held by someone else only.
        product_seen(contact("c_else", "Eve"), "p_zig", "Zig Basics"),
        grant_product(contact("c_else", "Eve"), "p_go", "Go Fundamentals", T_GRANT),
        // Granted to Ann once, then removed.
        grant_product(ann.clone(), "p_old", "Old Course", T_GRANT),
    ])
    .await;
    app.accept(&at(
        event(
            "product_access_removed",
            serde_json::json!({"contact": ann.clone(), "product": product("p_old", "Old Course")}),
        ),
        T_LATER,
    ))
    .await;
    app.settle().await;

    let token = app.mint_token("c_portal").await;
    let mut jar = Jar::new(&app);
    jar.sign_in(&token).await;
    let p = jar.portal().await;
    assert_eq!(p.status, 200, "{p:?}");
    p.assert_private();
    assert!(p.body.contains("Welcome back, Ann!"), "{}", p.body);
    assert!(!p.body.contains("Staff view"), "{}", p.body);
    for (id, title) in [
        ("p_rust101", "Rust 101"),
        ("p_async", "Async Rust"),
        ("p_bonus", "Bonus Pack"),
    ] {
        let link = format!("<a href=\"https://school.example.com/p/{id}\">{title}</a>");
        assert!(p.body.contains(&link), "missing {link}: {}", p.body);
    }
    for other in ["Zig Basics", "Go Fundamentals", "Old Course"] {
        assert!(!p.body.contains(other), "{other} is not Ann's: {}", p.body);
    }
    // Works on a phone; has a log-out button.
    assert!(
        p.body
            .contains("name=\"viewport\" content=\"width=device-width"),
        "{}",
        p.body
    );
    assert!(
        p.body
            .contains("<form method=\"post\" action=\"/portal/logout\">"),
        "{}",
        p.body
    );
    assert!(p.body.contains("Log out"), "{}", p.body);
    assert_eq!(
        app.store
            .portal_products(Some("c_portal".into()))
            .await
            .unwrap()
            .len(),
        3
    );

    // The latest details of the contact are used.
    app.advance(std::time::Duration::from_secs(60));
    let mut renamed = ann.clone();
    renamed["first_name"] = "Annie".into();
    app.accept(&new_signup(renamed)).await;
    app.settle().await;
    let p = jar.portal().await;
    assert!(p.body.contains("Welcome back, Annie!"), "{}", p.body);

    // Another learner sees only their own products.
    let bob = enroll(&app, "c_bob", "Bob").await;
    app.accept(&grant_product(bob, "p_go", "Go Fundamentals", T_GRANT))
        .await;
    app.settle().await;
    let mut bobs = Jar::new(&app);
    bobs.sign_in(&app.mint_token("c_bob").await).await;
    let p = bobs.portal().await;
    assert!(
        p.body.contains("Welcome back, Bob!") && p.body.contains("Go Fundamentals"),
        "{}",
        p.body
    );
    assert!(!p.body.contains("Bonus Pack"), "{}", p.body);
}

async fn names_and_titles_are_escaped_on_the_portal(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend)).await else {
        return;
    };
    let c = enroll(&app, "c_xss", "<script>alert(1)</script>").await;
    let mut evil = product("p_evil", "<img src=x onerror=alert(2)>");
    evil["url"] = "javascript:alert(3)".into();
    app.accept(&at(
        event(
            "product_access_granted",
            serde_json::json!({"contact": c, "product": evil}),
        ),
        T_GRANT,
    ))
    .await;
    app.settle().await;
    let mut jar = Jar::new(&app);
    jar.sign_in(&app.mint_token("c_xss").await).await;
    let p = jar.portal().await;
    assert_eq!(p.status, 200);
    assert!(
        p.body
            .contains("Welcome back, &lt;script&gt;alert(1)&lt;/script&gt;!"),
        "{}",
        p.body
    );
    assert!(
        !p.body.contains("<script"),
        "the name is not escaped: {}",
        p.body
    );
    assert!(
        p.body.contains("&lt;img src=x onerror=alert(2)&gt;"),
        "{}",
        p.body
    );
    assert!(
        !p.body.contains("<img"),
        "the title is not escaped: {}",
        p.body
    );
    assert!(
        !p.body.contains("javascript:"),
        "a javascript: URL is linked: {}",
        p.body
    );
}

/// herald's own `user_login` event carries only the contact's id: it is no newer fact about the
/// contact's details than the platform's latest event, so a detail change stamped before the login
/// but delivered after it still wins ("latest details win").
async fn a_login_does_not_outdate_the_contact_details(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend)).await else {
        return;
    };
    let ann = enroll(&app, "c_rename", "Ann").await;
    let mut jar = Jar::new(&app);
    jar.sign_in(&app.mint_token("c_rename").await).await;
    app.settle().await;
    // The platform renamed Ann at 09:30 (before the 10:00 login); the event arrives now.
    let mut renamed = ann.clone();
    renamed["first_name"] = "Annie".into();
    app.accept(&at(new_signup(renamed), T_LATEST)).await;
    app.settle().await;
    let stored = app.store.contact("c_rename".into()).await.unwrap().unwrap();
    assert_eq!(
        stored.first_name.as_deref(),
        Some("Annie"),
        "a detail-less login event outdated the rename"
    );
    assert!(jar.portal().await.body.contains("Welcome back, Annie!"));
}

async fn removing_the_last_offer_revokes_links_and_ends_sessions(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend)).await else {
        return;
    };
    let basic = offer_with("o_basic", "Rust Basic", &["p_basics"]);
    let c = enroll(&app, "c_leaving", "Ann").await;
    app.accept_batch(&[
        product_seen(c.clone(), "p_basics", "Rust Basics"),
        grant_offer(c.clone(), basic.clone(), T_GRANT),
        grant_product(c.clone(), "p_bonus", "Bonus Pack", T_GRANT),
    ])
    .await;
    app.settle().await;
    let token = app.mint_token("c_leaving").await;
    let mut jar = Jar::new(&app);
    jar.sign_in(&token).await;
    let p = jar.portal().await;
    for title in ["Rust 101", "Async Rust", "Rust Basics", "Bonus Pack"] {
        assert!(p.body.contains(title), "missing {title}: {}", p.body);
    }

    // One of two offers removed: the link still works, its products leave the portal.
    app.accept(&remove_offer(c.clone(), basic.clone(), T_LATER))
        .await;
    app.settle().await;
    let p = jar.portal().await;
    assert_eq!(p.status, 200);
    assert!(!p.body.contains("Rust Basics"), "{}", p.body);
    assert!(
        p.body.contains("Rust 101") && p.body.contains("Bonus Pack"),
        "{}",
        p.body
    );
    assert_eq!(
        Jar::new(&app).open(&token).await.status,
        200,
        "another offer is still active"
    );

    // The last offer removed: links are revoked and sessions end.
    app.accept(&remove_offer(c.clone(), pro_offer(), T_LATEST))
        .await;
    app.settle().await;
    let mut other_device = Jar::new(&app);
    for p in [
        other_device.open(&token).await,
        other_device.redeem(&token).await,
    ] {
        assert_eq!(p.status, 403, "{p:?}");
        p.assert_private();
        assert!(p.body.contains("No active access"), "{}", p.body);
        assert!(p.set_cookie().is_none());
    }
    assert_eq!(other_device.portal().await.status, 401);
    assert_eq!(
        jar.portal().await.status,
        401,
        "the session opened before the removal ended with it"
    );
    assert_eq!(
        app.link_row(&token).await.map(|(_, revoked)| revoked),
        Some(true)
    );
    assert_eq!(
        app.store
            .portal_products(Some("c_leaving".into()))
            .await
            .unwrap()
            .iter()
            .map(|p| p.id.as_str())
            .collect::<Vec<_>>(),
        vec!["p_bonus"]
    );
    // A grant older than the removal, arriving late, does not bring the access back.
    app.accept(&grant_offer(c.clone(), pro_offer(), T_LATER))
        .await;
    app.settle().await;
    assert_eq!(Jar::new(&app).redeem(&token).await.status, 403);
    // A new grant does not bring the old link back either: it was revoked.
    app.accept(&grant_offer(c.clone(), pro_offer(), "2026-11-25T09:00:00Z"))
        .await;
    app.settle().await;
    let p = Jar::new(&app).redeem(&token).await;
    assert_eq!(p.status, 410, "{p:?}");
    assert!(p.body.contains("replaced"), "{}", p.body);
    // The refusal is audited with its reason.
    let audit = app
        .store
        .link_audit(Some("c_leaving".into()), 100)
        .await
        .unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.action == "refuse" && a.reason.as_deref() == Some("not_entitled")),
        "{audit:#?}"
    );
}
