//! SMS through a Twilio-compatible HTTP API: `POST {base}/2010-04-01/Accounts/{sid}/Messages.json`
//! with basic auth `sid:token` and form fields `To`, `From`, `Body`; success is a 2xx with a JSON
//! `sid`. Also the GSM-7/UCS-2 segment arithmetic and Twilio's inbound signature.

use crate::SendError;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// A configured provider account.
#[derive(Clone)]
pub struct SmsSender {
    /// Shares its connection pool between clones.
    client: reqwest::Client,
    /// The `Messages.json` endpoint, built once from the base URL and account.
    endpoint: String,
    account_sid: String,
    /// Used for basic auth and for checking inbound signatures; never logged.
    auth_token: String,
    from: String,
}

impl std::fmt::Debug for SmsSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsSender")
            .field("endpoint", &self.endpoint)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("SMS provider configuration: {0}")]
pub struct SmsConfigError(String);

impl SmsSender {
    pub fn new(
        base_url: &str,
        account_sid: &str,
        auth_token: &str,
        from: &str,
    ) -> Result<Self, SmsConfigError> {
        for (name, value) in [
            ("HERALD_SMS_ACCOUNT_SID", account_sid),
            ("HERALD_SMS_AUTH_TOKEN", auth_token),
            ("HERALD_SMS_FROM", from),
        ] {
            if value.trim().is_empty() {
                return Err(SmsConfigError(format!(
                    "{name} must be set when HERALD_SMS_URL is"
                )));
            }
        }
        let base = url::Url::parse(base_url)
            .map_err(|e| SmsConfigError(format!("HERALD_SMS_URL is not a URL: {e}")))?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .map_err(|e| SmsConfigError(e.to_string()))?;
        Ok(Self {
            client,
            endpoint: format!(
                "{}/2010-04-01/Accounts/{account_sid}/Messages.json",
                base.as_str().trim_end_matches('/')
            ),
            account_sid: account_sid.to_owned(),
            auth_token: auth_token.to_owned(),
            from: from.to_owned(),
        })
    }

    /// Sends one SMS; returns the provider's message sid. `idempotency_key` is the same on every
    /// retry of one message, for providers that deduplicate on it.
    pub async fn send(
        &self,
        to: &str,
        body: &str,
        idempotency_key: &str,
    ) -> Result<String, SendError> {
        let response = self
            .client
            .post(&self.endpoint)
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            .header("Idempotency-Key", idempotency_key)
            .form(&[("To", to), ("From", self.from.as_str()), ("Body", body)])
            .send()
            .await
            .map_err(|e| {
                SendError::Transient(format!("SMS provider unreachable: {}", without_url(e)))
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        let detail = provider_message(&text);
        if status.is_success() {
            return serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("sid").and_then(|s| s.as_str()).map(str::to_owned))
                .ok_or_else(|| {
                    SendError::Transient(format!(
                        "SMS provider answered {status} without a message sid"
                    ))
                });
        }
        let reason = format!("SMS provider answered {status}: {detail}");
        Err(match (status.as_u16(), retry_after) {
            (429 | 503, Some(after)) => SendError::RetryAfter(reason, after),
            (429, None) | (500..=599, _) => SendError::Transient(reason),
            _ => SendError::Permanent(reason),
        })
    }

    /// Checks `X-Twilio-Signature`: base64 HMAC-SHA1 with the auth token over the full URL
    /// followed by every form field's name and value, sorted by name.
    pub fn verify_inbound(&self, url: &str, form: &[(String, String)], signature: &str) -> bool {
        let expected = twilio_signature(&self.auth_token, url, form);
        bool::from(expected.as_bytes().ct_eq(signature.trim().as_bytes()))
    }
}

/// Twilio's request signature (see `verify_inbound`).
pub fn twilio_signature(auth_token: &str, url: &str, form: &[(String, String)]) -> String {
    let mut fields: Vec<&(String, String)> = form.iter().collect();
    fields.sort();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(url.as_bytes());
    for (k, v) in fields {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    STANDARD.encode(mac.finalize().into_bytes())
}

/// A provider's error message, short, from its JSON body if it has one.
fn provider_message(body: &str) -> String {
    let msg = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| body.to_owned());
    msg.chars().take(200).collect()
}

/// reqwest errors print the URL, which holds the account sid; keep only the kind.
fn without_url(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else {
        e.without_url().to_string()
    }
}

/// How an SMS body is encoded, and how many segments it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gsm7,
    Ucs2,
}

/// GSM 03.38 basic character set.
const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
/// GSM 03.38 extension table: each takes two septets.
const GSM7_EXTENSION: &str = "^{}\\[~]|€\u{000C}";

/// The encoding and segment count of a body: GSM-7 160 per message or 153 per segment when
/// concatenated (extension characters count double); one character outside GSM-7 makes the
/// whole message UCS-2, 70 or 67 per segment (characters outside the BMP count double).
pub fn segments(body: &str) -> (Encoding, usize) {
    let mut septets = 0usize;
    let mut gsm = true;
    for c in body.chars() {
        if GSM7_BASIC.contains(c) {
            septets += 1;
        } else if GSM7_EXTENSION.contains(c) {
            septets += 2;
        } else {
            gsm = false;
            break;
        }
    }
    if gsm {
        return (Encoding::Gsm7, count(septets, 160, 153));
    }
    let units: usize = body.chars().map(char::len_utf16).sum();
    (Encoding::Ucs2, count(units, 70, 67))
}

fn count(units: usize, single: usize, multi: usize) -> usize {
    if units <= single {
        1
    } else {
        units.div_ceil(multi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm7_segments() {
        assert_eq!(segments(""), (Encoding::Gsm7, 1));
        assert_eq!(segments(&"a".repeat(160)), (Encoding::Gsm7, 1));
        assert_eq!(segments(&"a".repeat(161)), (Encoding::Gsm7, 2));
        assert_eq!(segments(&"a".repeat(306)), (Encoding::Gsm7, 2));
        assert_eq!(segments(&"a".repeat(307)), (Encoding::Gsm7, 3));
        // Extension characters take two septets: 80 € is 160 septets, 81 is 162.
        assert_eq!(segments(&"€".repeat(80)), (Encoding::Gsm7, 1));
        assert_eq!(segments(&"€".repeat(81)), (Encoding::Gsm7, 2));
    }

    #[test]
    fn one_non_gsm_character_makes_it_ucs2() {
        let mut body = "a".repeat(69);
        body.push('ł');
        assert_eq!(segments(&body), (Encoding::Ucs2, 1));
        body.push('a');
        assert_eq!(segments(&body), (Encoding::Ucs2, 2));
        assert_eq!(segments(&"😀".repeat(35)), (Encoding::Ucs2, 1));
        assert_eq!(segments(&"😀".repeat(36)), (Encoding::Ucs2, 2));
    }

    /// Twilio's documented example (www.twilio.com/docs/usage/security#validating-requests):
    /// auth token 12345, this URL and these fields sign to 0/KCTR6DLpKmkAf8muzZqo1nDgQ=.
    #[test]
    fn twilio_documented_signature_example() {
        let form: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            twilio_signature("12345", url, &form),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
    }
}
