//! DKIM configured as an operator does it: `HERALD_DKIM_DOMAIN`, `HERALD_DKIM_SELECTOR` and a PEM
//! file in `HERALD_DKIM_KEY` (made by openssl); every email arrives signed for that domain. (The
//! signature itself is verified the way a receiver does in herald-channels' tests.)

use crate::harness::*;
use herald_test_support::smtp::SmtpSink;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_are_signed_with_the_configured_key() {
    let Some(site) = Site::new(false, &[("welcome", WELCOME_WITH_LINK)]).await else {
        return;
    };
    let key = site.root.path().join("dkim.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .status()
        .expect("openssl makes the test key (apt-get install openssl)");
    assert!(made.success());
    let sink = SmtpSink::start().await;
    let herald = Herald::start_with(
        &site,
        0,
        Role::Serve,
        &sink.url(),
        "5s",
        &[
            ("HERALD_DKIM_DOMAIN", "school.example.com".into()),
            ("HERALD_DKIM_SELECTOR", "herald2026".into()),
            ("HERALD_DKIM_KEY", key.display().to_string()),
        ],
    )
    .await;
    herald
        .post(&[grant("c_signed_1"), grant("c_signed_2")])
        .await;
    assert!(
        eventually(Duration::from_secs(20), async || sink.count() >= 2).await,
        "no email"
    );
    for mail in sink.received() {
        let email = mail.parse();
        let signature = email
            .header("DKIM-Signature")
            .expect("a DKIM-Signature header")
            .replace([' ', '\t', '\r', '\n'], "");
        assert!(signature.contains("d=school.example.com;"), "{signature}");
        assert!(signature.contains("s=herald2026;"), "{signature}");
        assert!(signature.contains("a=rsa-sha256;"), "{signature}");
    }
}
