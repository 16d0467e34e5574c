//! A real browser (Debian's headless Chromium over WebDriver) follows the path of a learner: the
//! welcome email arrives over SMTP with `<<login_url>>` resolved, the link opens the "Continue"
//! page, the button leads to the portal with the granted products, and log-out ends the session.
//! Saves a screenshot to `target/test-output/portal.png`.

use crate::helpers::*;
use crate::link_helpers::*;
use fantoccini::{ClientBuilder, Locator};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

const WELCOME: &str = r#"
name: Welcome with a login link
trigger:
  event: offer_access_granted
steps:
  - id: welcome
    send_email:
      subject: "Welcome to {{offer.title}}, {{contact.first_name}}"
      text: "Hi {{contact.first_name}},\n\nyour courses are ready: <<login_url>>\n"
      html: "<p>Hi {{contact.first_name}},</p><p><a href=\"<<login_url>>\">Open your courses</a></p>"
"#;

/// `chromedriver` in a process group of its own; the group (with the browsers it started) is
/// killed on drop, so a failing test leaves nothing behind.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(out: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(out.join("chromedriver.log")).expect("chromedriver log");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("chromedriver exited at start: {status}");
            }
            if let Ok(r) = client.get(format!("{}/status", self.url())).send().await
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == json!(true)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The negative pid is the process group this test created; nothing else is in it.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `<workspace>/target/test-output`.
fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-output");
    std::fs::create_dir_all(&dir).expect("create target/test-output");
    dir
}

/// Whether the browser tools are here; under CI they must be.
fn browser_available() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "the browser test needs {missing:?} under CI=true (apt-get install chromium chromium-driver)"
        );
    }
    eprintln!("skipping browser test: {missing:?} not installed");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_follows_the_emailed_link_to_the_portal_in_chromium() {
    if !browser_available() {
        return;
    }
    let out = output_dir();
    let Some(app) = spawn_app(link_options(Backend::Sqlite).workflow("welcome", WELCOME)).await
    else {
        return;
    };
    let ann = contact("c_browser", "Ann");
    app.accept_batch(&[
        product_seen(ann.clone(), "p_rust101", "Rust 101"),
        product_seen(ann.clone(), "p_async", "Async Rust"),
        product_seen(contact("c_someone", "Eve"), "p_zig", "Zig Basics"),
        grant_offer(ann.clone(), pro_offer(), T_GRANT),
    ])
    .await;

    // The email, as the SMTP server received it.
    let mails = app.wait_for_mails(1).await;
    let email = mails[0].parse();
    assert_eq!(email.subject, "Welcome to Rust Pro, Ann");
    let token = token_in_mail(&app, &mails[0]);
    let emailed = format!("{}/l/{token}", app.options.public_url);
    assert!(email.text.as_deref().unwrap().contains(&emailed));
    // The public URL (http://herald.test) is configuration; the browser reaches this server.
    let link = emailed.replace(&app.options.public_url, &app.address);

    let (driver, browser, _profile) = chromium(&out).await;
    let result = drive(&browser, &app, &link, &token, &out).await;
    let _ = browser.close().await;
    drop(driver);
    result.unwrap_or_else(|e| panic!("browser step failed: {e}"));
}

/// chromedriver and a headless Chromium session on it, with a fresh profile (kept alive by the
/// returned folder).
async fn chromium(out: &Path) -> (Driver, fantoccini::Client, tempfile::TempDir) {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut driver = Driver::start(out);
    driver.wait_ready().await;
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1000,800",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        },
    });
    let caps = caps.as_object().unwrap().clone();
    let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no WebDriver session (see {}): {e}",
                out.join("chromedriver.log").display()
            )
        });
    (driver, browser, profile)
}

/// The team opens a contact's timeline on a phone: the page asks for the admin token (a wrong
/// one is refused), then shows what happened, each message's content with its sign-in link as a
/// marker, without horizontal scrolling. Saves `target/test-output/timeline-phone.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_team_reads_a_timeline_on_a_phone_in_chromium() {
    if !browser_available() {
        return;
    }
    let out = output_dir();
    let Some(app) = spawn_app(link_options(Backend::Sqlite).workflow("welcome", WELCOME)).await
    else {
        return;
    };
    app.accept(&grant_offer(
        contact("c_phone", "Ann"),
        pro_offer(),
        T_GRANT,
    ))
    .await;
    app.wait_for_mails(1).await;
    app.settle().await;

    let (driver, browser, _profile) = chromium(&out).await;
    let result = read_timeline(&browser, &app, &out).await;
    let _ = browser.close().await;
    drop(driver);
    result.unwrap_or_else(|e| panic!("browser step failed: {e}"));
}

async fn read_timeline(
    browser: &fantoccini::Client,
    app: &TestApp,
    out: &Path,
) -> Result<(), fantoccini::error::CmdError> {
    browser.set_window_size(390, 844).await?;
    browser
        .goto(&format!("{}/admin/contacts/c_phone/timeline", app.address))
        .await?;
    let submit = async |token: &str| -> Result<(), fantoccini::error::CmdError> {
        let field = browser.find(Locator::Css("input[name=token]")).await?;
        field.clear().await?;
        field.send_keys(token).await?;
        browser
            .find(Locator::Css("button[type=submit]"))
            .await?
            .click()
            .await?;
        Ok(())
    };
    submit("not-the-token").await?;
    // The answer is a new page: wait for it rather than read the form page still showing.
    let alert = browser
        .wait()
        .for_element(Locator::Css("[role=alert]"))
        .await?
        .text()
        .await?;
    assert_eq!(alert, "That is not the admin token.");
    submit(ADMIN_TOKEN).await?;
    // The list is on the timeline page only (the form page has a heading too).
    browser.wait().for_element(Locator::Css("ol")).await?;
    let heading = browser.find(Locator::Css("h1")).await?.text().await?;
    assert_eq!(heading, "Ann");
    let source = browser.source().await?;
    for expected in [
        "Run started",
        "welcome",
        "Message",
        "sent",
        "[sign-in link]",
    ] {
        assert!(source.contains(expected), "{expected:?} missing:\n{source}");
    }
    assert!(
        !source.contains("/l/"),
        "a working link on the page:\n{source}"
    );
    assert!(
        !browser.current_url().await?.as_str().contains("token"),
        "the token went into the URL"
    );
    let fits = browser
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth;",
            vec![],
        )
        .await?;
    assert_eq!(fits, json!(true), "the page scrolls sideways on a phone");
    std::fs::write(out.join("timeline-phone.png"), browser.screenshot().await?)
        .expect("write timeline-phone.png");
    Ok(())
}

async fn drive(
    browser: &fantoccini::Client,
    app: &TestApp,
    link: &str,
    token: &str,
    out: &Path,
) -> Result<(), fantoccini::error::CmdError> {
    browser.goto(link).await?;
    assert_eq!(browser.title().await?, "Continue to your courses");
    let heading = browser.find(Locator::Css("h1")).await?.text().await?;
    assert_eq!(heading, "Continue to your courses");
    // Opening the link used nothing and signed in no one.
    assert_eq!(app.link_row(token).await, Some((0, false)));
    assert!(
        browser.get_all_cookies().await?.is_empty(),
        "the GET set a cookie"
    );

    browser
        .find(Locator::Css("form button[type=submit]"))
        .await?
        .click()
        .await?;
    let at_portal = wait_until(async || {
        browser
            .current_url()
            .await
            .is_ok_and(|u| u.path() == "/portal")
    })
    .await;
    assert!(
        at_portal,
        "the Continue button did not lead to /portal: {:?}",
        browser.current_url().await?
    );
    browser
        .wait()
        .for_element(Locator::Css("ul.products"))
        .await?;
    assert_eq!(app.link_row(token).await, Some((1, false)));

    let heading = browser.find(Locator::Css("h1")).await?.text().await?;
    assert_eq!(heading, "Welcome back, Ann!");
    let mut products = Vec::new();
    for a in browser.find_all(Locator::Css("ul.products li a")).await? {
        products.push((a.text().await?, a.attr("href").await?.unwrap_or_default()));
    }
    assert_eq!(
        products,
        vec![
            (
                "Async Rust".to_owned(),
                "https://school.example.com/p/p_async".to_owned()
            ),
            (
                "Rust 101".to_owned(),
                "https://school.example.com/p/p_rust101".to_owned()
            ),
        ],
        "the portal lists exactly Ann's products"
    );
    assert!(!browser.source().await?.contains("Zig Basics"));

    // The session cookie: HttpOnly (invisible to scripts), SameSite=Lax, Path=/.
    let cookies = browser.get_all_cookies().await?;
    let session = cookies
        .iter()
        .find(|c| c.name() == "herald_session")
        .expect("a session cookie");
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(session.path(), Some("/"));
    assert_eq!(format!("{:?}", session.same_site()), "Some(Lax)");
    let script_view = browser.execute("return document.cookie", vec![]).await?;
    assert_eq!(
        script_view,
        json!(""),
        "a script can read the session cookie"
    );

    let png = browser.screenshot().await?;
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(out.join("portal.png"), &png).expect("write portal.png");

    // On a phone-sized window nothing needs horizontal scrolling.
    browser.set_window_size(390, 844).await?;
    let overflow = browser
        .execute(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
            vec![],
        )
        .await?;
    assert!(
        overflow.as_i64().is_some_and(|o| o <= 0),
        "the portal scrolls sideways on a phone: {overflow}"
    );
    std::fs::write(out.join("portal-phone.png"), browser.screenshot().await?)
        .expect("write portal-phone.png");
    browser.set_window_size(1000, 800).await?;

    // Log out: back to the sign-in page, and the portal stays closed.
    browser
        .find(Locator::Css("form[action='/portal/logout'] button"))
        .await?
        .click()
        .await?;
    let signed_out = wait_until(async || {
        browser
            .source()
            .await
            .is_ok_and(|s| s.contains("You are not signed in"))
    })
    .await;
    assert!(
        signed_out,
        "log-out did not end at the sign-in page: {}",
        browser.source().await?
    );
    browser.goto(&app.url("/portal")).await?;
    assert!(browser.source().await?.contains("You are not signed in"));
    Ok(())
}

async fn wait_until(mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
