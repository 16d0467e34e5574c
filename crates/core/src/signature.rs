//! Standard Webhooks signatures (standardwebhooks.com): HMAC-SHA256 over
//! `{webhook-id}.{webhook-timestamp}.{raw body}`, base64, `v1,` prefix. Written here rather than
//! taken from the `standardwebhooks` crate because that crate reads the wall clock inside
//! `verify`, accepts an empty secret, and refuses non-UTF-8 bodies.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// How far a `webhook-timestamp` may be from our clock, either way.
pub const TOLERANCE_SECS: i64 = 300;

/// Secrets are pasted by people: accept them with or without padding, and with non-zero trailing
/// bits (the published unpadded vector secrets have them), as the reference libraries do.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// A verification key: the decoded bytes of a `whsec_…` secret.
#[derive(Clone)]
pub struct WebhookSecret {
    /// Raw key bytes; never displayed (see the `Debug` impl).
    key: Vec<u8>,
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error(
        "webhook secret must start with \"whsec_\" followed by base64 (generate one with `herald serve --dev`)"
    )]
    MissingPrefix,
    #[error("webhook secret is not valid base64 after \"whsec_\"")]
    NotBase64,
    #[error(
        "webhook secret must decode to 24 to 64 bytes (as Standard Webhooks asks), this one has {0}: generate one with `herald serve --dev` or `openssl rand -base64 32`"
    )]
    BadLength(usize),
}

/// Why a request's signature was refused. Kept coarse on purpose: the HTTP answer must not help
/// an attacker tell which part was wrong, but logs and tests can.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is more than 5 minutes away from the server clock")]
    TimestampOutOfTolerance,
    #[error("no signature in webhook-signature matches")]
    NoMatch,
}

impl WebhookSecret {
    /// Parses `whsec_` + base64 (padding optional).
    pub fn parse(secret: &str) -> Result<Self, SecretError> {
        let b64 = secret
            .trim()
            .strip_prefix("whsec_")
            .ok_or(SecretError::MissingPrefix)?;
        let key = LENIENT.decode(b64).map_err(|_| SecretError::NotBase64)?;
        Self::from_bytes(key)
    }

    /// Builds a secret from raw key bytes (used by `serve --dev` to generate one).
    pub fn from_bytes(key: Vec<u8>) -> Result<Self, SecretError> {
        // Standard Webhooks asks for 24–64 bytes (its published vectors use 24); `serve --dev`
        // generates 32.
        if !(24..=64).contains(&key.len()) {
            return Err(SecretError::BadLength(key.len()));
        }
        Ok(Self { key })
    }

    /// The `whsec_…` form of this secret.
    pub fn to_whsec(&self) -> String {
        format!("whsec_{}", STANDARD.encode(&self.key))
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `v1,<base64>` signature of a message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self
            .mac(id, &timestamp.to_string(), body)
            .finalize()
            .into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }
}

/// Parses a comma-separated list of `whsec_` secrets (rotation: several may be valid at once).
pub fn parse_secrets(list: &str) -> Result<Vec<WebhookSecret>, SecretError> {
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(WebhookSecret::parse)
        .collect()
}

/// The three Standard Webhooks headers of a request, as received.
#[derive(Debug, Clone, Copy)]
pub struct SignedHeaders<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

impl<'a> SignedHeaders<'a> {
    /// What can be checked before the body is read: the three headers are present and the
    /// timestamp is within [`TOLERANCE_SECS`] of `now_unix`. A request refused here costs no
    /// body read.
    pub fn check_fresh(&self, now_unix: i64) -> Result<(), SignatureError> {
        let (_, _, _, ts) = self.fields()?;
        // abs_diff: a timestamp of i64::MIN or MAX must be refused, not overflow.
        if now_unix.abs_diff(ts) > TOLERANCE_SECS.unsigned_abs() {
            return Err(SignatureError::TimestampOutOfTolerance);
        }
        Ok(())
    }

    /// (id, timestamp as sent, signatures, timestamp).
    fn fields(&self) -> Result<(&'a str, &'a str, &'a str, i64), SignatureError> {
        let present = |v: Option<&'a str>, name| {
            v.filter(|s| !s.is_empty())
                .ok_or(SignatureError::MissingHeader(name))
        };
        let id = present(self.id, "webhook-id")?;
        let ts_raw = present(self.timestamp, "webhook-timestamp")?;
        let sigs = present(self.signature, "webhook-signature")?;
        let ts: i64 = ts_raw.parse().map_err(|_| SignatureError::BadTimestamp)?;
        Ok((id, ts_raw, sigs, ts))
    }
}

/// Checks that some signature in the header was made with some secret over this exact body, and
/// that the timestamp is within [`TOLERANCE_SECS`] of `now_unix`.
pub fn verify(
    secrets: &[WebhookSecret],
    headers: SignedHeaders<'_>,
    body: &[u8],
    now_unix: i64,
) -> Result<(), SignatureError> {
    headers.check_fresh(now_unix)?;
    verify_signature_only(secrets, headers, body).map(drop)
}

/// The signature check without the clock check; returns the id and timestamp it covered.
pub fn verify_signature_only<'a>(
    secrets: &[WebhookSecret],
    headers: SignedHeaders<'a>,
    body: &[u8],
) -> Result<(&'a str, i64), SignatureError> {
    let (id, ts_raw, sigs, ts) = headers.fields()?;
    let candidates: Vec<Vec<u8>> = sigs
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b64| STANDARD.decode(b64).ok())
        .filter(|tag| tag.len() == 32)
        .collect();
    for secret in secrets {
        let expected = secret.mac(id, ts_raw, body).finalize().into_bytes();
        // Every candidate is compared, in constant time, so timing reveals nothing.
        let hit = candidates.iter().fold(0u8, |acc, c| {
            acc | c.as_slice().ct_eq(expected.as_slice()).unwrap_u8()
        });
        if hit == 1 {
            return Ok((id, ts));
        }
    }
    Err(SignatureError::NoMatch)
}

#[cfg(test)]
mod tests {
    //! The test vectors published with the Standard Webhooks specification.
    use super::*;

    const V1_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const V1_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const V1_TS: &str = "1614265330";
    const V1_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const V1_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> SignedHeaders<'a> {
        SignedHeaders {
            id: Some(id),
            timestamp: Some(ts),
            signature: Some(sig),
        }
    }

    fn secrets(s: &str) -> Vec<WebhookSecret> {
        vec![WebhookSecret::parse(s).unwrap()]
    }

    #[test]
    fn vector_v1_signs_and_verifies() {
        let s = secrets(V1_SECRET);
        assert_eq!(s[0].sign(V1_ID, 1614265330, V1_BODY), V1_SIG);
        assert!(verify_signature_only(&s, headers(V1_ID, V1_TS, V1_SIG), V1_BODY).is_ok());
        assert!(verify(&s, headers(V1_ID, V1_TS, V1_SIG), V1_BODY, 1614265330).is_ok());
    }

    #[test]
    fn vector_v1_negative() {
        let bad = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=";
        assert_eq!(
            verify_signature_only(&secrets(V1_SECRET), headers(V1_ID, V1_TS, bad), V1_BODY),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn vector_v2() {
        let s = secrets("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let sig = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
        assert_eq!(
            s[0].sign("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553, body),
            sig
        );
        assert!(
            verify_signature_only(
                &s,
                headers("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", "1649367553", sig),
                body
            )
            .is_ok()
        );
    }

    #[test]
    fn several_signatures_pass_when_any_is_valid() {
        let decoy = "Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
        let with = format!("v1,{decoy} v2,{decoy} {V1_SIG} v1,{decoy}");
        let without = format!("v1,{decoy} v2,{decoy} v1,{decoy}");
        let s = secrets(V1_SECRET);
        assert!(verify_signature_only(&s, headers(V1_ID, V1_TS, &with), V1_BODY).is_ok());
        assert!(verify_signature_only(&s, headers(V1_ID, V1_TS, &without), V1_BODY).is_err());
    }

    #[test]
    fn refuses_what_the_vectors_say_to_refuse() {
        let s = secrets(V1_SECRET);
        let full = SignedHeaders {
            id: Some(V1_ID),
            timestamp: Some(V1_TS),
            signature: Some(V1_SIG),
        };
        for h in [
            SignedHeaders { id: None, ..full },
            SignedHeaders {
                timestamp: None,
                ..full
            },
            SignedHeaders {
                signature: None,
                ..full
            },
            headers(V1_ID, V1_TS, "v1,"),
            headers(V1_ID, V1_TS, &V1_SIG[..8]),
            headers(V1_ID, "hello", V1_SIG),
        ] {
            assert!(verify(&s, h, V1_BODY, 1614265330).is_err(), "{h:?}");
        }
        let ts: i64 = V1_TS.parse().unwrap();
        assert_eq!(
            verify(&s, full, V1_BODY, ts + 301),
            Err(SignatureError::TimestampOutOfTolerance)
        );
        assert_eq!(
            verify(&s, full, V1_BODY, ts - 301),
            Err(SignatureError::TimestampOutOfTolerance)
        );
        assert!(verify(&s, full, V1_BODY, ts + 300).is_ok());
        // Far-apart clocks are refused, not an arithmetic overflow.
        for now in [i64::MIN, i64::MAX] {
            assert_eq!(
                verify(&s, full, V1_BODY, now),
                Err(SignatureError::TimestampOutOfTolerance)
            );
        }
        assert!(WebhookSecret::parse("").is_err());
        assert!(WebhookSecret::parse("whsec_").is_err());
    }

    #[test]
    fn secrets_without_padding_work() {
        let unpadded = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwBrs").unwrap();
        let padded = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwBrs=").unwrap();
        assert_eq!(unpadded.key, padded.key);
        let unpadded = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwBr").unwrap();
        let padded = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwBr==").unwrap();
        assert_eq!(unpadded.key, padded.key);
    }

    #[test]
    fn rotation_accepts_any_configured_secret() {
        let list = parse_secrets(&format!(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD,{V1_SECRET}"
        ))
        .unwrap();
        assert!(verify_signature_only(&list, headers(V1_ID, V1_TS, V1_SIG), V1_BODY).is_ok());
    }

    #[test]
    fn secrets_under_24_bytes_are_refused() {
        assert_eq!(
            WebhookSecret::from_bytes(vec![7; 23]).unwrap_err(),
            SecretError::BadLength(23)
        );
        assert!(WebhookSecret::from_bytes(vec![7; 24]).is_ok());
        assert_eq!(
            WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS").unwrap_err(),
            SecretError::BadLength(23)
        );
    }
}
