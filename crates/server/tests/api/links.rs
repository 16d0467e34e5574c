//! Learner and user magic links: scanner-safe GET/HEAD, POST redemption with a use
//! limit across devices, expiry, "Email me a new link", regeneration, entitlement, the admin API,
//! rate limiting, cookies, audit, `<<login_url>>` at send time, and tokens kept out of logs and
//! the database.

use crate::helpers::*;
use crate::link_helpers::*;
use herald_store::MessageStatus;
use reqwest::Method;
use std::time::Duration;

both_backends!(
    get_and_head_change_nothing,
    devices_share_a_link_up_to_its_use_limit,
    concurrent_redemptions_never_exceed_the_use_limit,
    expired_link_is_refused_and_offers_a_new_one,
    new_link_goes_to_the_address_on_file_at_most_once_per_ten_minutes_and_five_a_day,
    unknown_links_are_refused_and_new_link_reveals_nothing,
    regenerating_revokes_every_older_link,
    link_of_a_contact_without_an_offer_is_refused,
    login_url_for_a_contact_without_an_offer_is_skipped,
    login_url_in_a_name_stays_literal_and_one_link_is_minted,
    a_retried_send_keeps_one_working_link_per_message,
    tokens_never_reach_the_logs_or_the_database,
    session_cookie_attributes_over_http,
    session_cookie_is_host_prefixed_and_secure_under_https,
    redemption_is_rate_limited_per_client_address,
    user_link_opens_the_staff_view_and_regenerates,
    the_staff_link_cannot_be_derived_from_the_database_alone,
    admin_link_endpoints_require_the_token,
    redemption_emits_user_login_which_triggers_workflows,
    mints_redemptions_and_refusals_are_audited,
    cross_site_form_posts_are_refused,
    rate_limits_follow_the_client_named_by_a_trusted_proxy,
    no_new_link_for_a_contact_whose_offer_was_removed,
    an_unsubscribed_learner_still_gets_the_sign_in_email_they_ask_for,
);

/// Sends one email carrying `<<login_url>>` when an offer is granted.
const WELCOME_WITH_LINK: &str = r#"
name: Welcome with a login link
trigger:
  event: offer_access_granted
steps:
  - id: welcome
    send_email:
      subject: "Your courses, {{contact.first_name}}"
      text: "Hi {{contact.first_name}}, open your courses: <<login_url>>"
      html: "<p>Hi {{contact.first_name}}, <a href=\"<<login_url>>\">open your courses</a>.</p>"
"#;

/// The learner gets the welcome email; returns its token.
async fn welcome_token(app: &TestApp, id: &str, first_name: &str) -> String {
    let before = app.sink().count();
    enroll(app, id, first_name).await;
    let mails = app.wait_for_mails(before + 1).await;
    token_in_mail(app, &mails[before])
}

async fn get_and_head_change_nothing(backend: Backend) {
    let opts = link_options(backend).learner_links(Duration::from_secs(3600), 1);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    enroll(&app, "c_scan", "Ann").await;
    let token = app.mint_token("c_scan").await;
    assert_eq!(app.link_row(&token).await, Some((0, false)));

    // A mail scanner fetches the link twice and probes it with HEAD.
    let mut scanner = Jar::new(&app);
    for _ in 0..2 {
        let p = scanner.open(&token).await;
        assert_eq!(p.status, 200, "{p:?}");
        p.assert_private();
        assert!(
            p.header("content-type")
                .is_some_and(|c| c.starts_with("text/html")),
            "{p:?}"
        );
        assert!(p.body.contains("Continue to your courses"), "{}", p.body);
        assert!(
            p.body
                .contains(&format!("<form method=\"post\" action=\"/l/{token}\">")),
            "{}",
            p.body
        );
        assert_eq!(
            p.body.matches("<button").count(),
            1,
            "one button: {}",
            p.body
        );
        assert!(
            p.set_cookie().is_none(),
            "GET must not start a session: {p:?}"
        );
    }
    let p = scanner.head(&format!("/l/{token}")).await;
    assert_eq!(p.status, 200, "{p:?}");
    p.assert_private();
    assert!(p.body.is_empty(), "HEAD has no body");
    assert!(
        p.set_cookie().is_none(),
        "HEAD must not start a session: {p:?}"
    );
    assert!(scanner.cookie.is_none());
    assert_eq!(
        scanner.portal().await.status,
        401,
        "the scanner has no session"
    );
    assert_eq!(
        app.link_row(&token).await,
        Some((0, false)),
        "GET/HEAD changed the link"
    );

    // The learner clicks afterwards: the only allowed use is still there.
    let mut learner = Jar::new(&app);
    let p = learner.sign_in(&token).await;
    p.assert_private();
    assert_eq!(app.link_row(&token).await, Some((1, false)));
    let portal = learner.portal().await;
    assert_eq!(portal.status, 200, "{portal:?}");
    assert!(
        portal.body.contains("Welcome back, Ann!"),
        "{}",
        portal.body
    );
    // The use limit (1) is reached now; GET says so without counting.
    let p = scanner.open(&token).await;
    assert_eq!(p.status, 410, "{p:?}");
    assert_eq!(app.link_row(&token).await, Some((1, false)));
}

async fn devices_share_a_link_up_to_its_use_limit(backend: Backend) {
    let opts = link_options(backend).learner_links(Duration::from_secs(24 * 3600), 2);
    let Some(app) = spawn_app(opts.workflow("welcome", WELCOME_WITH_LINK)).await else {
        return;
    };
    let token = welcome_token(&app, "c_multi", "Ann").await;

    let mut phone = Jar::new(&app);
    let mut laptop = Jar::new(&app);
    phone.sign_in(&token).await;
    laptop.sign_in(&token).await;
    assert_ne!(
        phone.cookie, laptop.cookie,
        "each device gets a session of its own"
    );
    for jar in [&mut phone, &mut laptop] {
        let p = jar.portal().await;
        assert_eq!(p.status, 200, "{p:?}");
        assert!(
            p.body.contains("Rust 101") && p.body.contains("Async Rust"),
            "{}",
            p.body
        );
    }

    // A third device is one use too many.
    let mut tablet = Jar::new(&app);
    let p = tablet.redeem(&token).await;
    assert_eq!(p.status, 410, "{p:?}");
    p.assert_private();
    assert!(
        p.set_cookie().is_none(),
        "a refused link starts no session: {p:?}"
    );
    assert!(p.body.contains("used up"), "{}", p.body);
    assert!(
        p.offers_new_link(&token),
        "a used-up link offers a new one: {}",
        p.body
    );
    let p = tablet.open(&token).await;
    assert_eq!(p.status, 410);
    assert!(p.offers_new_link(&token), "{}", p.body);
    assert_eq!(tablet.portal().await.status, 401);
    assert_eq!(app.link_row(&token).await, Some((2, false)));

    // The sessions already started are unaffected.
    assert_eq!(phone.portal().await.status, 200);
    assert_eq!(laptop.portal().await.status, 200);
}

async fn concurrent_redemptions_never_exceed_the_use_limit(backend: Backend) {
    let opts = link_options(backend).learner_links(Duration::from_secs(3600), 2);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    enroll(&app, "c_race", "Ann").await;
    let token = app.mint_token("c_race").await;
    let url = app.url(&format!("/l/{token}"));
    let client = no_redirect_client();
    let attempts = (0..8).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            client
                .post(&url)
                .send()
                .await
                .expect("POST")
                .status()
                .as_u16()
        })
    });
    let mut statuses = Vec::new();
    for a in attempts {
        statuses.push(a.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        vec![303, 303, 410, 410, 410, 410, 410, 410],
        "exactly the allowed uses succeed"
    );
    assert_eq!(app.link_row(&token).await, Some((2, false)));
}

async fn expired_link_is_refused_and_offers_a_new_one(backend: Backend) {
    let opts = link_options(backend).learner_links(Duration::from_secs(3600), 5);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    enroll(&app, "c_exp", "Ann").await;
    let token = app.mint_token("c_exp").await;

    app.advance(Duration::from_secs(59 * 60));
    let mut jar = Jar::new(&app);
    assert_eq!(
        jar.open(&token).await.status,
        200,
        "still valid before its TTL"
    );

    app.advance(Duration::from_secs(2 * 60));
    let p = jar.open(&token).await;
    assert_eq!(p.status, 410, "{p:?}");
    p.assert_private();
    assert!(p.body.contains("expired"), "{}", p.body);
    assert!(
        p.offers_new_link(&token),
        "an expired link offers a new one: {}",
        p.body
    );
    let p = jar.redeem(&token).await;
    assert_eq!(p.status, 410, "{p:?}");
    assert!(p.set_cookie().is_none(), "{p:?}");
    assert!(p.offers_new_link(&token), "{}", p.body);
    assert_eq!(jar.portal().await.status, 401);
    assert_eq!(
        app.link_row(&token).await,
        Some((0, false)),
        "a refused POST uses nothing"
    );
}

async fn new_link_goes_to_the_address_on_file_at_most_once_per_ten_minutes_and_five_a_day(
    backend: Backend,
) {
    let opts = link_options(backend).learner_links(Duration::from_secs(3600), 5);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    enroll(&app, "c_renew", "Ann").await;
    let token = app.mint_token("c_renew").await;
    app.advance(Duration::from_secs(2 * 3600));
    let mut jar = Jar::new(&app);
    assert_eq!(jar.redeem(&token).await.status, 410);

    // The form cannot redirect the link elsewhere: an address typed in is ignored.
    let path = format!("/l/{token}/new-link");
    let p = jar
        .post_form(&path, "email=mallory%40evil.test&to=mallory%40evil.test")
        .await;
    assert_eq!(p.status, 200, "{p:?}");
    p.assert_private();
    assert!(p.body.contains("Check your inbox"), "{}", p.body);
    assert!(
        !p.body.contains("c_renew@example.com"),
        "the page reveals the address: {}",
        p.body
    );
    assert!(p.set_cookie().is_none());
    // The mail was accepted by the SMTP server before the page was answered.
    let mails = app.wait_for_mails(1).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(
        mails[0].rcpt_to,
        vec!["c_renew@example.com".to_owned()],
        "sent to the address on file only"
    );
    let email = mails[0].parse();
    assert!(email.to.contains("c_renew@example.com"), "{email:?}");
    assert!(!String::from_utf8_lossy(&mails[0].data).contains("evil.test"));
    let fresh = token_in_mail(&app, &mails[0]);
    assert_ne!(fresh, token);
    let html = email.html.clone().expect("an HTML part");
    assert_eq!(
        link_tokens(&app.options.public_url, &html),
        vec![fresh.clone()],
        "{html}"
    );
    assert_eq!(jar.open(&fresh).await.status, 200);
    Jar::new(&app).sign_in(&fresh).await;

    // Within 10 minutes: the same answer, no second email.
    app.advance(Duration::from_secs(9 * 60));
    let again = jar.post(&path).await;
    assert_eq!(again.status, 200);
    assert_eq!(
        again.body, p.body,
        "the answer must not reveal whether a mail went out"
    );
    expect_mail_count(&app, 1, "a second new link within 10 minutes").await;

    // Every 11 minutes one more, up to five a day.
    for n in 2..=5 {
        app.advance(Duration::from_secs(11 * 60));
        assert_eq!(jar.post(&path).await.status, 200);
        expect_mail_count(&app, n, &format!("new link #{n}")).await;
    }
    app.advance(Duration::from_secs(11 * 60));
    assert_eq!(jar.post(&path).await.status, 200);
    expect_mail_count(&app, 5, "a sixth new link on the same day").await;
    // A day later the allowance is back.
    app.advance(Duration::from_secs(24 * 3600));
    assert_eq!(jar.post(&path).await.status, 200);
    expect_mail_count(&app, 6, "the next day allows a new link again").await;
    // Each mail carried a distinct, working link.
    let tokens: std::collections::BTreeSet<String> = app
        .sink()
        .received()
        .iter()
        .map(|m| token_in_mail(&app, m))
        .collect();
    assert_eq!(tokens.len(), 6);
}

async fn unknown_links_are_refused_and_new_link_reveals_nothing(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend)).await else {
        return;
    };
    enroll(&app, "c_known", "Ann").await;
    let mut jar = Jar::new(&app);
    let unknown = unknown_token();
    for p in [jar.open(&unknown).await, jar.redeem(&unknown).await] {
        assert_eq!(p.status, 404, "{p:?}");
        p.assert_private();
        assert!(p.body.contains("not valid"), "{}", p.body);
        assert!(!p.offers_new_link(&unknown), "{}", p.body);
        assert!(p.set_cookie().is_none());
    }
    // Not even token-shaped.
    for path in ["/l/short", "/l/%3Cscript%3E", &format!("/l/{}x", unknown)] {
        let p = jar.get(path).await;
        assert_eq!(p.status, 404, "{path}: {p:?}");
        assert!(!p.body.contains("<script>"), "{}", p.body);
        assert_eq!(jar.post(path).await.status, 404, "{path}");
    }
    // "Email me a new link" for an unknown link: the same answer as for a real one, no mail.
    let p = jar.post(&format!("/l/{unknown}/new-link")).await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("Check your inbox"), "{}", p.body);
    assert_eq!(jar.post("/l/short/new-link").await.status, 200);
    expect_mail_count(&app, 0, "a new link for an unknown link").await;
    assert_eq!(jar.portal().await.status, 401);
}

async fn regenerating_revokes_every_older_link(backend: Backend) {
    let opts = link_options(backend).workflow("welcome", WELCOME_WITH_LINK);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let from_email = welcome_token(&app, "c_regen", "Ann").await;
    let mut before = Jar::new(&app);
    before.sign_in(&from_email).await;
    assert_eq!(before.portal().await.status, 200);
    let first = app.mint_token("c_regen").await;
    assert_eq!(
        before.portal().await.status,
        401,
        "a session opened with a revoked link ends with it"
    );
    let second = app.mint_token("c_regen").await;
    assert_ne!(first, second);

    let mut jar = Jar::new(&app);
    for old in [&from_email, &first] {
        let p = jar.open(old).await;
        assert_eq!(p.status, 410, "{p:?}");
        p.assert_private();
        assert!(p.body.contains("replaced"), "{}", p.body);
        assert!(
            !p.offers_new_link(old),
            "a revoked link offers no new one: {}",
            p.body
        );
        let p = jar.redeem(old).await;
        assert_eq!(p.status, 410, "{p:?}");
        assert!(p.set_cookie().is_none());
    }
    assert_eq!(app.link_row(&from_email).await, Some((1, true)));
    assert_eq!(app.link_row(&first).await, Some((0, true)));
    assert_eq!(jar.portal().await.status, 401);
    jar.sign_in(&second).await;
    assert_eq!(jar.portal().await.status, 200);

    // Another contact's links and sessions are untouched by this regeneration.
    let other = welcome_token(&app, "c_other", "Bob").await;
    let mut bob = Jar::new(&app);
    bob.sign_in(&other).await;
    app.mint_token("c_regen").await;
    assert_eq!(bob.portal().await.status, 200);
    Jar::new(&app).sign_in(&other).await;

    // Unknown contact: 404.
    let r = app
        .admin_request(
            Method::POST,
            "/v1/contacts/c_nobody/magic-link",
            Some(ADMIN_TOKEN),
        )
        .await;
    expect_error(r, 404).await;
}

async fn link_of_a_contact_without_an_offer_is_refused(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend)).await else {
        return;
    };
    app.accept(&new_signup(contact("c_free", "Ann"))).await;
    app.settle().await;
    let token = app.mint_token("c_free").await;
    let mut jar = Jar::new(&app);
    for p in [jar.open(&token).await, jar.redeem(&token).await] {
        assert_eq!(p.status, 403, "{p:?}");
        p.assert_private();
        assert!(p.body.contains("No active access"), "{}", p.body);
        assert!(!p.offers_new_link(&token), "{}", p.body);
        assert!(p.set_cookie().is_none());
    }
    assert_eq!(app.link_row(&token).await, Some((0, false)));
}

async fn login_url_for_a_contact_without_an_offer_is_skipped(backend: Backend) {
    let wf = r#"
name: Signup nudge
trigger:
  event: new_signup
steps:
  - id: nudge
    send_email:
      subject: "Your account"
      text: "Sign in: <<login_url>>"
  - id: plain
    send_email:
      subject: "Plain"
      text: "No link here."
"#;
    let Some(app) = spawn_app(link_options(backend).workflow("nudge", wf)).await else {
        return;
    };
    app.accept(&new_signup(contact("c_nolink", "Ann"))).await;
    app.settle().await;
    let rows = app.messages_of("c_nolink").await;
    let nudge = rows
        .iter()
        .find(|m| m.step_id == "nudge")
        .expect("the nudge message is recorded");
    assert_eq!(nudge.status, MessageStatus::Skipped, "{nudge:?}");
    let reason = nudge.reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("offer") && reason.contains("login_url"),
        "the reason says why: {reason}"
    );
    // The run went on: the next step was sent.
    let plain = rows
        .iter()
        .find(|m| m.step_id == "plain")
        .expect("the run went on");
    assert_eq!(plain.status, MessageStatus::Sent, "{plain:?}");
    let mails = app.wait_for_mails(1).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].parse().subject, "Plain");
    // No link was minted for nothing.
    let audit = app
        .store
        .link_audit(Some("c_nolink".into()), 100)
        .await
        .unwrap();
    assert!(audit.iter().all(|a| a.action != "mint"), "{audit:?}");
    assert!(table_dump(&app, "magic_links").await.is_empty());

    // A contact whose only offer was removed is skipped as well.
    let wf2 = WELCOME_WITH_LINK.replace("offer_access_granted", "lesson_completed");
    let Some(app) = spawn_app(link_options(backend).workflow("lesson", &wf2)).await else {
        return;
    };
    let c = contact("c_gone", "Ann");
    app.accept_batch(&[
        grant_offer(c.clone(), pro_offer(), T_GRANT),
        remove_offer(c.clone(), pro_offer(), T_LATER),
    ])
    .await;
    app.settle().await;
    app.accept(&lesson_completed(c, "p_rust101", "Ownership"))
        .await;
    app.settle().await;
    let rows = app.messages_of("c_gone").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].status, MessageStatus::Skipped, "{rows:?}");
    expect_mail_count(&app, 0, "a message with a link that cannot work").await;
}

async fn login_url_in_a_name_stays_literal_and_one_link_is_minted(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend).workflow("welcome", WELCOME_WITH_LINK)).await
    else {
        return;
    };
    enroll(&app, "c_sly", "<<login_url>>").await;
    let mails = app.wait_for_mails(1).await;
    let email = mails[0].parse();
    let text = email.text.clone().expect("text part");
    let tokens = link_tokens(&app.options.public_url, &text);
    assert_eq!(
        tokens.len(),
        1,
        "exactly one link, where the template puts it:\n{text}"
    );
    assert_eq!(
        text.trim_end(),
        format!(
            "Hi <<login_url>>, open your courses: {}/l/{}",
            app.options.public_url, tokens[0]
        ),
        "the name must stay literal"
    );
    assert_eq!(email.subject, "Your courses, <<login_url>>");
    let html = email.html.clone().expect("html part");
    assert!(
        html.contains("Hi &lt;&lt;login_url&gt;&gt;, <a href="),
        "{html}"
    );
    assert_eq!(
        link_tokens(&app.options.public_url, &html),
        tokens,
        "the HTML part carries the same single link"
    );
    // One link per message.
    let mints = app
        .store
        .link_audit(Some("c_sly".into()), 100)
        .await
        .unwrap();
    assert_eq!(
        mints.iter().filter(|a| a.action == "mint").count(),
        1,
        "{mints:?}"
    );
    assert_eq!(table_dump(&app, "magic_links").await.len(), 1);
    Jar::new(&app).sign_in(&tokens[0]).await;
}

async fn a_retried_send_keeps_one_working_link_per_message(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend).workflow("welcome", WELCOME_WITH_LINK)).await
    else {
        return;
    };
    app.sink()
        .fail_next(1, herald_test_support::smtp::Stage::Data, 451);
    enroll(&app, "c_retry", "Ann").await;
    wait_for("the first attempt to be refused", async || {
        app.sink().refusals().len() == 1
    })
    .await;
    app.advance(Duration::from_secs(5));
    let mails = app.wait_for_mails(1).await;
    let delivered = token_in_mail(&app, &mails[0]);
    let refused = app.sink().refusals()[0]
        .mail
        .clone()
        .expect("the refused message");
    let first = token_in_mail(&app, &refused);
    assert_ne!(first, delivered, "each attempt renders a fresh link");
    assert_eq!(
        refused.message_id(),
        mails[0].message_id(),
        "one message, retried"
    );
    // One working link per message: the retry revoked the earlier attempt's link (kept, so a
    // copy that did arrive says "replaced").
    assert_eq!(
        query_rows(
            &app,
            "SELECT COUNT(*) FROM magic_links WHERE revoked_ms IS NULL"
        )
        .await,
        vec![vec!["1".to_owned()]]
    );
    let p = Jar::new(&app).redeem(&first).await;
    assert_eq!(p.status, 410, "the undelivered link still works: {p:?}");
    assert!(p.set_cookie().is_none());
    Jar::new(&app).sign_in(&delivered).await;
}

async fn tokens_never_reach_the_logs_or_the_database(backend: Backend) {
    let logs = LogCapture::start();
    let opts = link_options(backend)
        .learner_links(Duration::from_secs(3600), 2)
        .workflow("welcome", WELCOME_WITH_LINK);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let token = welcome_token(&app, "c_secret", "Ann").await;

    // Exercise every path that sees the token: show, HEAD, redeem, portal, refusal, new link.
    let mut a = Jar::new(&app);
    let mut b = Jar::new(&app);
    a.open(&token).await;
    a.head(&format!("/l/{token}")).await;
    a.sign_in(&token).await;
    b.sign_in(&token).await;
    assert_eq!(Jar::new(&app).redeem(&token).await.status, 410);
    a.portal().await;
    app.advance(Duration::from_secs(2 * 3600));
    assert_eq!(a.redeem(&token).await.status, 410);
    a.post(&format!("/l/{token}/new-link")).await;
    let mails = app.wait_for_mails(2).await;
    let renewed = token_in_mail(&app, &mails[1]);
    let admin_minted = app.mint_token("c_secret").await;
    let user_url = app.admin_url(Method::GET, "/v1/links/user").await;
    let user_token = token_of_url(&app, &user_url);
    Jar::new(&app).sign_in(&user_token).await;
    app.settle().await;
    let session = a
        .cookie
        .clone()
        .expect("a session")
        .split_once('=')
        .unwrap()
        .1
        .to_owned();

    let secrets = [&token, &renewed, &admin_minted, &user_token, &session];
    let text = logs.text();
    assert!(
        text.contains("magic link redeemed"),
        "the capture recorded nothing useful:\n{text}"
    );
    assert!(
        text.contains("magic link refused"),
        "the capture missed the refusals"
    );
    for s in secrets {
        let leaks: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(s.as_str()) || l.contains(&s[..20]))
            .collect();
        assert!(
            leaks.is_empty(),
            "a token or session id appears in the logs:\n{}",
            leaks.join("\n")
        );
    }
    drop(logs);

    // The database holds hashes only.
    let hashes: Vec<String> = query_rows(&app, "SELECT token_hash FROM magic_links")
        .await
        .concat();
    assert!(hashes.len() >= 4, "{hashes:?}");
    for s in [&token, &renewed, &admin_minted, &user_token] {
        assert!(
            hashes.contains(&herald_engine::links::hash(s)),
            "the token's SHA-256 is stored: {hashes:?}"
        );
    }
    let sessions: Vec<String> = query_rows(&app, "SELECT id_hash FROM sessions")
        .await
        .concat();
    assert!(
        sessions.contains(&herald_engine::links::hash(&session)),
        "the session id's SHA-256 is stored"
    );
    for table in [
        "magic_links",
        "link_audit",
        "sessions",
        "events",
        "messages",
    ] {
        let rows = table_dump(&app, table).await;
        for row in &rows {
            for value in row {
                for s in secrets {
                    assert!(
                        !value.contains(s.as_str()),
                        "{table} holds a raw token or session id: {row:?}"
                    );
                }
            }
        }
    }
    if backend == Backend::Sqlite {
        // Every byte of the database files, WAL included.
        for entry in std::fs::read_dir(app.env.root.path()).unwrap() {
            let path = entry.unwrap().path();
            if !path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("herald.db")
            {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            for s in secrets {
                assert!(
                    !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                    "{} holds a raw token or session id",
                    path.display()
                );
            }
        }
    }
}

async fn session_cookie_attributes_over_http(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend)).await else {
        return;
    };
    enroll(&app, "c_cookie", "Ann").await;
    let token = app.mint_token("c_cookie").await;
    let mut jar = Jar::new(&app);
    let p = jar.sign_in(&token).await;
    let cookie = p.set_cookie().unwrap().to_owned();
    let attrs: Vec<&str> = cookie.split(';').map(str::trim).collect();
    let (name, value) = attrs[0].split_once('=').unwrap();
    assert_eq!(name, "herald_session", "{cookie}");
    assert_eq!(
        value.len(),
        43,
        "the session id is 256 random bits: {cookie}"
    );
    assert_ne!(value, token, "the session id is not the link token");
    assert!(attrs.contains(&"HttpOnly"), "{cookie}");
    assert!(attrs.contains(&"SameSite=Lax"), "{cookie}");
    assert!(attrs.contains(&"Path=/"), "{cookie}");
    assert!(
        !attrs.iter().any(|a| a.eq_ignore_ascii_case("Secure")),
        "http public URL: no Secure: {cookie}"
    );
    assert!(
        !attrs
            .iter()
            .any(|a| a.to_ascii_lowercase().starts_with("domain")),
        "{cookie}"
    );
    assert_eq!(jar.portal().await.status, 200);

    // Log out ends the session on the server, not only in the browser.
    let kept = jar.cookie.clone();
    let p = jar.post("/portal/logout").await;
    assert_eq!(p.status, 303);
    assert_eq!(p.header("location"), Some("/portal"));
    let cleared = p.set_cookie().expect("logout clears the cookie");
    assert!(
        cleared.starts_with("herald_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    assert_eq!(jar.portal().await.status, 401);
    jar.cookie = kept;
    assert_eq!(
        jar.portal().await.status,
        401,
        "the old session id still opens the portal after logout"
    );
}

async fn session_cookie_is_host_prefixed_and_secure_under_https(backend: Backend) {
    let opts = link_options(backend)
        .public_url("https://learn.herald.test")
        .workflow("welcome", WELCOME_WITH_LINK);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    // Links in emails are built on the public URL.
    let token = welcome_token(&app, "c_tls", "Ann").await;
    let mut jar = Jar::new(&app);
    let p = jar.sign_in(&token).await;
    let cookie = p.set_cookie().unwrap().to_owned();
    let attrs: Vec<&str> = cookie.split(';').map(str::trim).collect();
    let (name, value) = attrs[0].split_once('=').unwrap();
    assert_eq!(name, "__Host-herald_session", "{cookie}");
    assert!(attrs.contains(&"Secure"), "{cookie}");
    assert!(
        attrs.contains(&"Path=/"),
        "__Host- requires Path=/: {cookie}"
    );
    assert!(
        attrs.contains(&"HttpOnly") && attrs.contains(&"SameSite=Lax"),
        "{cookie}"
    );
    assert!(
        !attrs
            .iter()
            .any(|a| a.to_ascii_lowercase().starts_with("domain")),
        "__Host- forbids Domain: {cookie}"
    );
    assert_eq!(jar.portal().await.status, 200);
    // The unprefixed name (which a sibling domain could plant) is not accepted.
    let mut planted = Jar::new(&app);
    planted.cookie = Some(format!("herald_session={value}"));
    assert_eq!(planted.portal().await.status, 401);
    let p = jar.post("/portal/logout").await;
    let cleared = p.set_cookie().expect("logout clears the cookie");
    assert!(
        cleared.starts_with("__Host-herald_session=;") && cleared.contains("Secure"),
        "{cleared}"
    );
}

async fn redemption_is_rate_limited_per_client_address(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend).redeem_per_minute(3)).await else {
        return;
    };
    enroll(&app, "c_rate", "Ann").await;
    let token = app.mint_token("c_rate").await;
    let mut jar = Jar::new(&app);
    for i in 0..3 {
        assert_eq!(
            jar.redeem(&unknown_token()).await.status,
            404,
            "attempt {i}"
        );
    }
    let p = jar.redeem(&token).await;
    assert_eq!(p.status, 429, "the 4th attempt within a minute: {p:?}");
    assert!(p.set_cookie().is_none());
    assert_eq!(jar.post(&format!("/l/{token}/new-link")).await.status, 429);
    assert_eq!(
        app.link_row(&token).await,
        Some((0, false)),
        "a limited attempt uses nothing"
    );
    // Views of a link's page (what mail scanners fetch) are counted apart, ten times as many.
    for i in 0..30 {
        assert_eq!(jar.open(&unknown_token()).await.status, 404, "view {i}");
    }
    assert_eq!(jar.open(&token).await.status, 429, "the 31st view");
    // Other endpoints are not limited.
    assert_eq!(jar.get("/healthz").await.status, 200);
    assert_eq!(jar.portal().await.status, 401);
    // Another client address is not affected, and its views spend none of its redemptions.
    let other: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut elsewhere = Jar::from_address(&app, other);
    for _ in 0..30 {
        assert_eq!(elsewhere.open(&token).await.status, 200);
    }
    elsewhere.sign_in(&token).await;
}

/// Behind a trusted proxy every request comes from the proxy: the client it names is the one
/// counted, so two learners behind it have their own budgets; from anyone else the header is
/// ignored (a client could write it to dodge the limit).
async fn rate_limits_follow_the_client_named_by_a_trusted_proxy(backend: Backend) {
    let opts = link_options(backend)
        .redeem_per_minute(3)
        .trusted_proxy("127.0.0.1/32");
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    enroll(&app, "c_proxied", "Ann").await;
    let token = app.mint_token("c_proxied").await;
    let mut ann = Jar::behind_proxy(&app, "203.0.113.1");
    for _ in 0..3 {
        assert_eq!(ann.redeem(&unknown_token()).await.status, 404);
    }
    assert_eq!(
        ann.redeem(&token).await.status,
        429,
        "Ann's budget is spent"
    );
    let mut bo = Jar::behind_proxy(&app, "203.0.113.2");
    bo.sign_in(&token).await;

    // Not from the trusted proxy (127.0.0.2): X-Forwarded-For is ignored, so a new name in it
    // each time buys nothing.
    let forger = reqwest::Client::builder()
        .no_proxy()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    for i in 0..4 {
        let status = forger
            .post(app.url(&format!("/l/{}", unknown_token())))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        let expected = if i < 3 { 404 } else { 429 };
        assert_eq!(status, expected, "attempt {i}");
    }
}

async fn user_link_opens_the_staff_view_and_regenerates(backend: Backend) {
    let on_login = one_email_workflow("user_login", "Hello again", true);
    let Some(app) = spawn_app(link_options(backend).workflow("on_login", &on_login)).await else {
        return;
    };
    enroll(&app, "c_learner", "Ann").await;
    // A product nobody holds is in the catalogue too.
    app.accept(&product_seen(
        contact("c_browser", "Bea"),
        "p_zig",
        "Zig Basics",
    ))
    .await;
    app.settle().await;

    let url = app.admin_url(Method::GET, "/v1/links/user").await;
    assert_eq!(
        app.admin_url(Method::GET, "/v1/links/user").await,
        url,
        "the user link is stable"
    );
    let token = token_of_url(&app, &url);
    let mut staff = Jar::new(&app);
    let p = staff.open(&token).await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("staff view"), "{}", p.body);
    // Not limited to five uses like a learner link.
    for _ in 0..6 {
        staff.sign_in(&token).await;
    }
    let portal = staff.portal().await;
    assert_eq!(portal.status, 200, "{portal:?}");
    assert!(portal.body.contains("Staff view"), "{}", portal.body);
    for title in ["Rust 101", "Async Rust", "Zig Basics"] {
        assert!(
            portal.body.contains(title),
            "staff see every product, missing {title}: {}",
            portal.body
        );
    }
    assert!(!portal.body.contains("Welcome back"), "{}", portal.body);

    let new_url = app
        .admin_url(Method::POST, "/v1/links/user/regenerate")
        .await;
    assert_ne!(new_url, url);
    assert_eq!(
        staff.portal().await.status,
        401,
        "a staff session ends when its link is regenerated"
    );

    assert_eq!(app.admin_url(Method::GET, "/v1/links/user").await, new_url);
    let p = Jar::new(&app).open(&token).await;
    assert_eq!(p.status, 410, "the old user link is revoked: {p:?}");
    assert!(!p.offers_new_link(&token), "{}", p.body);
    assert_eq!(Jar::new(&app).redeem(&token).await.status, 410);
    let mut again = Jar::new(&app);
    again.sign_in(&token_of_url(&app, &new_url)).await;
    assert!(again.portal().await.body.contains("Staff view"));
    // Staff logins are not learner logins: no user_login event, no workflow.
    app.settle().await;
    expect_mail_count(&app, 0, "a staff login triggered a user_login workflow").await;
}

/// Someone who reads the database (a leaked backup) finds the site key and generation the staff
/// link is derived from, but not the admin token it is also keyed with. A process with another
/// admin token (the token was rotated) shows a new, working link and the old one stops.
async fn the_staff_link_cannot_be_derived_from_the_database_alone(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend).admin_token("first-admin-token")).await else {
        return;
    };
    let url = app.admin_url(Method::GET, "/v1/links/user").await;
    let token = token_of_url(&app, &url);
    let key = app
        .store
        .site_value("user_link_key".into(), String::new())
        .await
        .unwrap();
    let generation: u64 = app
        .store
        .site_value("user_link_generation".into(), String::new())
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(!key.is_empty() && generation > 0);
    // What the database alone gives (the derivation without a secret).
    let from_database = {
        use base64::Engine as _;
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(key.as_bytes());
        h.update(b"/user-link/");
        h.update(generation.to_be_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize())
    };
    assert_ne!(token, from_database);
    assert_eq!(
        Jar::new(&app).open(&from_database).await.status,
        404,
        "the database-only derivation is no link"
    );
    let mut staff = Jar::new(&app);
    staff.sign_in(&token).await;
    assert!(staff.portal().await.body.contains("Staff view"));

    let rotated = app
        .another_process(link_options(backend).admin_token("second-admin-token"))
        .await;
    let new_url = rotated.admin_url(Method::GET, "/v1/links/user").await;
    assert_ne!(new_url, url);
    assert_eq!(
        rotated.admin_url(Method::GET, "/v1/links/user").await,
        new_url,
        "stable under the new token"
    );
    let mut again = Jar::new(&rotated);
    again.sign_in(&token_of_url(&rotated, &new_url)).await;
    assert!(again.portal().await.body.contains("Staff view"));
    assert_eq!(
        Jar::new(&app).open(&token).await.status,
        410,
        "the old link is revoked"
    );
}

async fn admin_link_endpoints_require_the_token(backend: Backend) {
    let endpoints = [
        (Method::POST, "/v1/contacts/c_adm/magic-link"),
        (Method::GET, "/v1/links/user"),
        (Method::POST, "/v1/links/user/regenerate"),
    ];
    // Admin API off (no token configured): refused whatever is sent.
    let Some(off) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    off.accept(&offer_granted(contact("c_adm", "Ann"), "o_pro"))
        .await;
    off.settle().await;
    for (method, path) in &endpoints {
        for token in [None, Some(""), Some(ADMIN_TOKEN)] {
            let r = off.admin_request(method.clone(), path, token).await;
            expect_error(r, 401).await;
        }
    }
    drop(off);

    let Some(app) = spawn_app(link_options(backend)).await else {
        return;
    };
    enroll(&app, "c_adm", "Ann").await;
    for (method, path) in &endpoints {
        let longer = format!("{ADMIN_TOKEN}x");
        for token in [
            None,
            Some("wrong"),
            Some(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
            Some(longer.as_str()),
        ] {
            let r = app.admin_request(method.clone(), path, token).await;
            expect_error(r, 401).await;
        }
        // Basic auth or a bare token is not a bearer token.
        let r = app
            .client
            .request(method.clone(), app.url(path))
            .header("authorization", ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        expect_error(r, 401).await;
    }
    assert!(
        app.store.link_audit(None, 100).await.unwrap().is_empty(),
        "a refused admin call minted a link"
    );
    for (method, path) in &endpoints {
        let url = app.admin_url(method.clone(), path).await;
        token_of_url(&app, &url);
    }
}

async fn redemption_emits_user_login_which_triggers_workflows(backend: Backend) {
    let wf = r#"
name: Hello on login
trigger:
  event: user_login
re_entry: true
steps:
  - id: hello
    send_email:
      subject: "Good to see you, {{contact.first_name}}"
      text: "You signed in at {{event.time}}."
"#;
    let Some(app) = spawn_app(link_options(backend).workflow("on_login", wf)).await else {
        return;
    };
    enroll(&app, "c_login", "Ann").await;
    let token = app.mint_token("c_login").await;
    // Viewing the page is not a login.
    Jar::new(&app).open(&token).await;
    app.settle().await;
    expect_mail_count(&app, 0, "a GET counted as a login").await;

    Jar::new(&app).sign_in(&token).await;
    let mails = app.wait_for_mails(1).await;
    let email = mails[0].parse();
    assert_eq!(email.subject, "Good to see you, Ann");
    assert_eq!(mails[0].rcpt_to, vec!["c_login@example.com".to_owned()]);
    assert!(
        email.text.unwrap().contains("2026-11-24T10:00:00"),
        "the login's time is the redemption's"
    );
    let runs = app.runs_of("c_login").await;
    assert_eq!(
        runs.iter().filter(|r| r.workflow_id == "on_login").count(),
        1,
        "{runs:?}"
    );

    // A refused redemption is no login.
    app.mint_token("c_login").await;
    assert_eq!(Jar::new(&app).redeem(&token).await.status, 410);
    app.settle().await;
    expect_mail_count(&app, 1, "a refused redemption counted as a login").await;
}

async fn mints_redemptions_and_refusals_are_audited(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend)).await else {
        return;
    };
    enroll(&app, "c_audit", "Ann").await;
    let first = app.mint_token("c_audit").await;
    Jar::new(&app).sign_in(&first).await;
    // Looking is not auditable activity; refusals and redemptions are.
    Jar::new(&app).open(&first).await;
    let second = app.mint_token("c_audit").await;
    assert_eq!(Jar::new(&app).redeem(&first).await.status, 410);
    Jar::new(&app).sign_in(&second).await;
    assert_eq!(Jar::new(&app).redeem(&unknown_token()).await.status, 404);

    let rows = app
        .store
        .link_audit(Some("c_audit".into()), 100)
        .await
        .unwrap();
    let mut actions: Vec<(String, Option<String>)> = rows
        .iter()
        .map(|r| (r.action.clone(), r.reason.clone()))
        .collect();
    actions.reverse(); // oldest first
    assert_eq!(
        actions,
        vec![
            ("mint".into(), None),
            ("redeem".into(), None),
            ("mint".into(), None),
            ("refuse".into(), Some("revoked".into())),
            ("redeem".into(), None),
        ],
        "{rows:#?}"
    );
    assert!(
        rows.iter()
            .all(|r| r.kind == "learner" && r.contact_id.as_deref() == Some("c_audit")),
        "{rows:#?}"
    );
    assert!(
        rows.iter().all(|r| r.at_ms == START),
        "audit times follow the clock: {rows:#?}"
    );
    let all = app.store.link_audit(None, 100).await.unwrap();
    assert!(
        all.iter().any(|r| r.action == "refuse"
            && r.reason.as_deref() == Some("unknown")
            && r.contact_id.is_none()),
        "a refused unknown link is audited: {all:#?}"
    );
    for row in table_dump(&app, "link_audit").await {
        for value in row {
            for t in [&first, &second] {
                assert!(!value.contains(t.as_str()), "the audit trail holds a token");
            }
        }
    }
}

/// A hostile page cannot sign a learner into the portal of the link it holds, nor sign them out:
/// cross-site form posts are refused before anything changes.
async fn cross_site_form_posts_are_refused(backend: Backend) {
    let Some(app) = spawn_app(link_options(backend).workflow("welcome", WELCOME_WITH_LINK)).await
    else {
        return;
    };
    let token = welcome_token(&app, "c_csrf", "Ann").await;
    let path = format!("/l/{token}");
    for (origin, site) in [
        (Some("https://evil.example"), Some("cross-site")),
        (None, Some("cross-site")),
        (Some("https://evil.example"), None),
        (Some("null"), None),
    ] {
        let mut jar = Jar::new(&app);
        let p = jar.post_from(&path, origin, site).await;
        assert_eq!(p.status, 403, "{origin:?} {site:?}: {p:?}");
        assert!(
            p.set_cookie().is_none(),
            "no session from a cross-site post"
        );
        p.assert_private();
    }
    assert_eq!(
        app.link_row(&token).await,
        Some((0, false)),
        "refused posts spend no use"
    );

    // herald's own page (same origin), and clients that are not browsers, go through.
    let mut jar = Jar::new(&app);
    let p = jar
        .post_from(&path, Some(PUBLIC_URL), Some("same-origin"))
        .await;
    assert_eq!(p.status, 303, "{p:?}");
    assert!(jar.cookie.is_some());
    let p = jar
        .post_from(
            "/portal/logout",
            Some("https://evil.example"),
            Some("cross-site"),
        )
        .await;
    assert_eq!(p.status, 403, "no cross-site logout: {p:?}");
    assert_eq!(jar.portal().await.status, 200, "still signed in");
    let p = jar.post_from("/portal/logout", None, None).await;
    assert_eq!(p.status, 303, "{p:?}");
}

/// "Email me a new link" sends nothing (and mints nothing) once the contact holds no offer: that
/// link could not open the portal.
async fn no_new_link_for_a_contact_whose_offer_was_removed(backend: Backend) {
    let opts = link_options(backend).learner_links(Duration::from_secs(3600), 5);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    let c = enroll(&app, "c_gone", "Ann").await;
    let token = app.mint_token("c_gone").await;
    app.advance(Duration::from_secs(2 * 3600));
    app.accept(&remove_offer(c, pro_offer(), "2026-11-24T10:30:00Z"))
        .await;
    app.settle().await;
    let links_before = table_dump(&app, "magic_links").await.len();
    let p = Jar::new(&app).post(&format!("/l/{token}/new-link")).await;
    assert_eq!(
        p.status, 200,
        "the page is the same whatever happened: {p:?}"
    );
    assert!(p.body.contains("Check your inbox"), "{}", p.body);
    expect_mail_count(&app, 0, "a link sent to a contact without an offer").await;
    assert_eq!(table_dump(&app, "magic_links").await.len(), links_before);
}

/// Unsubscribing stops marketing email, never the sign-in email a learner asks for.
async fn an_unsubscribed_learner_still_gets_the_sign_in_email_they_ask_for(backend: Backend) {
    let opts = link_options(backend).learner_links(Duration::from_secs(3600), 5);
    let Some(app) = spawn_app(opts).await else {
        return;
    };
    enroll(&app, "c_unsub", "Ann").await;
    let token = app.mint_token("c_unsub").await;
    let changed = app
        .store
        .set_opt_out(
            "c_unsub".into(),
            herald_store::Channel::Email,
            true,
            "unsubscribe_link".into(),
            app.clock.now(),
        )
        .await
        .unwrap();
    assert!(changed);
    app.advance(Duration::from_secs(2 * 3600));
    let mut jar = Jar::new(&app);
    assert_eq!(jar.redeem(&token).await.status, 410);
    let p = jar.post(&format!("/l/{token}/new-link")).await;
    assert_eq!(p.status, 200, "{p:?}");
    let mails = app.wait_for_mails(1).await;
    assert_eq!(mails[0].rcpt_to, ["c_unsub@example.com"]);
    let fresh = token_in_mail(&app, &mails[0]);
    assert_eq!(
        jar.redeem(&fresh).await.status,
        303,
        "the new link signs in"
    );
}
