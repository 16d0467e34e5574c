//! Email over SMTP with lettre: a pooled async transport, multipart text + HTML, a `Message-ID`
//! fixed by the caller so that every retry of one message carries the same one.

use crate::SendError;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::time::Duration;

/// An email address as lettre validates it; the engine checks recipients with it before queueing.
pub use lettre::Address;

/// A rendered email ready to go.
#[derive(Debug, Clone)]
pub struct OutgoingEmail {
    pub from: String,
    pub to: String,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    /// `<id@host>`, the same on every attempt.
    pub message_id: String,
    /// Extra headers (`List-Unsubscribe`, ...), name and value.
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SmtpConfigError {
    #[error("HERALD_SMTP_URL is not a valid URL: {0}")]
    BadUrl(String),
    #[error(
        "HERALD_SMTP_URL: {0} (use smtp://user:pass@host:587, smtps://user:pass@host:465 or smtp://host:2525?tls=none)"
    )]
    Unsupported(String),
}

/// Connections kept open to the relay. lettre closes a returned connection when the pool is full,
/// so this must be at least the engine's sends in flight, or every burst reconnects (the benchmark
/// saw 11,106 connections for 20,000 emails with 16 here and 64 in flight).
pub const POOL_SIZE: u32 = 32;

/// A pooled SMTP client.
#[derive(Clone)]
pub struct SmtpSender {
    /// lettre's transport owns the connection pool; cloning shares it.
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl SmtpSender {
    /// `smtp://` uses STARTTLS (required) unless `?tls=none` (plain, for local relays) or
    /// `?tls=opportunistic`; `smtps://` is TLS from the first byte.
    pub fn from_url(url: &str) -> Result<Self, SmtpConfigError> {
        let mut parsed =
            url::Url::parse(url).map_err(|e| SmtpConfigError::BadUrl(e.to_string()))?;
        let tls = parsed
            .query_pairs()
            .find(|(k, _)| k == "tls")
            .map(|(_, v)| v.into_owned());
        let rest: Vec<(String, String)> = parsed
            .query_pairs()
            .filter(|(k, _)| k != "tls")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if !rest.is_empty() {
            return Err(SmtpConfigError::Unsupported(format!(
                "unknown parameter {:?}",
                rest[0].0
            )));
        }
        let lettre_tls = match (parsed.scheme(), tls.as_deref()) {
            ("smtp", None | Some("required")) => Some("required"),
            ("smtp", Some("opportunistic")) => Some("opportunistic"),
            ("smtp", Some("none")) => None,
            ("smtps", None) => None,
            (scheme, tls) => {
                return Err(SmtpConfigError::Unsupported(format!(
                    "scheme {scheme:?} with tls={tls:?}"
                )));
            }
        };
        match lettre_tls {
            Some(t) => parsed.set_query(Some(&format!("tls={t}"))),
            None => parsed.set_query(None),
        }
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(parsed.as_str())
            .map_err(|e| SmtpConfigError::Unsupported(e.to_string()))?
            .timeout(Some(Duration::from_secs(30)))
            .pool_config(
                PoolConfig::new()
                    .max_size(POOL_SIZE)
                    .idle_timeout(Duration::from_secs(60)),
            )
            .build();
        Ok(Self { transport })
    }

    /// Sends one email and classifies any failure.
    pub async fn send(&self, email: &OutgoingEmail) -> Result<(), SendError> {
        let message = build_message(email)?;
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(SendError::Permanent(e.to_string())),
            Err(e) => Err(SendError::Transient(e.to_string())),
        }
    }
}

/// Builds the MIME message: multipart/alternative when both parts exist.
pub fn build_message(email: &OutgoingEmail) -> Result<Message, SendError> {
    let from: Mailbox = email
        .from
        .parse()
        .map_err(|e| SendError::Permanent(format!("invalid From {:?}: {e}", email.from)))?;
    let to: Mailbox = email
        .to
        .parse()
        .map_err(|e| SendError::Permanent(format!("invalid recipient address: {e}")))?;
    let mut builder = Message::builder()
        .from(from)
        .to(to)
        .subject(email.subject.clone())
        .message_id(Some(email.message_id.clone()));
    for (name, value) in &email.headers {
        let name = HeaderName::new_from_ascii(name.clone())
            .map_err(|_| SendError::Permanent(format!("invalid header name {name:?}")))?;
        builder = builder.raw_header(HeaderValue::new(name, value.clone()));
    }
    let built = match (&email.text, &email.html) {
        (Some(text), Some(html)) => builder.multipart(MultiPart::alternative_plain_html(
            text.clone(),
            html.clone(),
        )),
        (Some(text), None) => builder.singlepart(SinglePart::plain(text.clone())),
        (None, Some(html)) => builder.singlepart(SinglePart::html(html.clone())),
        (None, None) => builder.singlepart(SinglePart::plain(String::new())),
    };
    built.map_err(|e| SendError::Permanent(format!("could not build the message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email() -> OutgoingEmail {
        OutgoingEmail {
            from: "Ada <ada@school.example.com>".into(),
            to: "ann@example.com".into(),
            subject: "Welcome".into(),
            text: Some("Hi Ann".into()),
            html: Some("<p>Hi Ann</p>".into()),
            message_id: "<m1@herald.test>".into(),
            headers: vec![("List-Unsubscribe".into(), "<https://h.test/u/x>".into())],
        }
    }

    #[test]
    fn builds_multipart_alternative_with_fixed_message_id() {
        let raw = String::from_utf8(build_message(&email()).unwrap().formatted()).unwrap();
        assert!(raw.contains("Message-ID: <m1@herald.test>"), "{raw}");
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(
            raw.contains("List-Unsubscribe: <https://h.test/u/x>"),
            "{raw}"
        );
    }

    #[test]
    fn invalid_recipient_is_permanent() {
        let mut e = email();
        e.to = "not an address".into();
        assert!(matches!(build_message(&e), Err(SendError::Permanent(_))));
    }

    // lettre's pool spawns its reaper on the runtime, so building a transport needs one.
    #[tokio::test]
    async fn url_forms() {
        for ok in [
            "smtp://user:pass@localhost:587",
            "smtps://user:pass@localhost:465",
            "smtp://localhost:2525?tls=none",
        ] {
            assert!(SmtpSender::from_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://localhost",
            "smtp://localhost?tls=maybe",
            "smtp://localhost?foo=1",
            "::",
        ] {
            assert!(SmtpSender::from_url(bad).is_err(), "{bad}");
        }
    }
}
