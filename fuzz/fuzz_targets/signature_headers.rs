//! The Standard Webhooks headers and secrets as received: arbitrary header strings, bodies and
//! secret text. Nothing may panic; what herald signs, herald verifies; a secret it accepts
//! survives its `whsec_` form.
//!
//! Input layout (newline-separated, so a crash file reads as the request it stands for):
//! `webhook-id`, `webhook-timestamp`, `webhook-signature`, secret text, then the raw body. A
//! missing line is a missing header.
#![no_main]

use herald_core::signature::{
    SignedHeaders, WebhookSecret, parse_secrets, verify, verify_signature_only,
};
use libfuzzer_sys::fuzz_target;

/// The first published Standard Webhooks test secret.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NOW: i64 = 1_614_265_330;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(5, |&b| b == b'\n');
    let mut header = || parts.next().map(|p| String::from_utf8_lossy(p).into_owned());
    let (id, timestamp, signature, secret_text) = (header(), header(), header(), header());
    let body = parts.next().unwrap_or_default();
    let secrets = vec![WebhookSecret::parse(SECRET).expect("the test secret parses")];

    let headers = SignedHeaders {
        id: id.as_deref(),
        timestamp: timestamp.as_deref(),
        signature: signature.as_deref(),
    };
    let fresh = headers.check_fresh(NOW);
    if fresh.is_ok() {
        let ts: i64 = timestamp.as_deref().unwrap_or_default().parse().expect("checked");
        assert!(NOW.abs_diff(ts) <= 300, "{ts} passed as fresh");
    }
    let verified = verify(&secrets, headers, body, NOW);
    if verified.is_ok() {
        assert!(fresh.is_ok());
        assert!(verify_signature_only(&secrets, headers, body).is_ok());
    }

    // What herald signs verifies, whatever other signatures the header carries.
    if let Some(id) = id.as_deref().filter(|id| !id.is_empty()) {
        let ts = NOW - 299;
        let signed = secrets[0].sign(id, ts, body);
        let list = format!("{} {signed}", signature.as_deref().unwrap_or_default());
        let ts_text = ts.to_string();
        let headers = SignedHeaders {
            id: Some(id),
            timestamp: Some(&ts_text),
            signature: Some(&list),
        };
        assert_eq!(verify(&secrets, headers, body, NOW), Ok(()));
    }

    if let Some(text) = secret_text.as_deref() {
        if let Ok(secret) = WebhookSecret::parse(text) {
            let again = WebhookSecret::parse(&secret.to_whsec()).expect("its own whsec_ form");
            assert_eq!(again.sign("msg", NOW, body), secret.sign("msg", NOW, body));
        }
        let _ = parse_secrets(text);
    }
});
