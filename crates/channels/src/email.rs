//! Email over SMTP with lettre: a pooled async transport, multipart text + HTML, a `Message-ID`
//! fixed by the caller so that every retry of one message carries the same one.

use crate::SendError;
use crate::dkim::Dkim;
use crate::smtp_pool::{Pool, Relay};
use lettre::Message;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use std::sync::Arc;

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

/// Connections herald keeps to the relay at most; the engine sends as many emails at once.
pub const POOL_SIZE: u32 = 32;

/// A pooled SMTP client.
#[derive(Clone)]
pub struct SmtpSender {
    /// The connections to the relay; cloning shares them.
    pool: Arc<Pool>,
    /// Signs every message when configured.
    dkim: Option<Arc<Dkim>>,
}

impl SmtpSender {
    /// `smtp://` uses STARTTLS (required) unless `?tls=none` (plain, for local relays) or
    /// `?tls=opportunistic`; `smtps://` is TLS from the first byte.
    pub fn from_url(url: &str) -> Result<Self, SmtpConfigError> {
        let relay = Relay::from_url(url)?;
        Ok(Self {
            pool: Arc::new(Pool::new(relay, POOL_SIZE as usize)),
            dkim: None,
        })
    }

    /// Signs every message sent with this DKIM configuration.
    pub fn with_dkim(mut self, dkim: Dkim) -> Self {
        self.dkim = Some(Arc::new(dkim));
        self
    }

    /// Sends one email and classifies any failure.
    pub async fn send(&self, email: &OutgoingEmail) -> Result<(), SendError> {
        let mut message = build_message(email)?;
        if let Some(dkim) = &self.dkim {
            dkim.sign(&mut message);
        }
        self.pool
            .send(message.envelope(), &message.formatted())
            .await
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
    let text = email.text.as_deref().map(unix_line_breaks);
    let html = email.html.as_deref().map(unix_line_breaks);
    let built = match (text, html) {
        (Some(text), Some(html)) => {
            builder.multipart(MultiPart::alternative_plain_html(text, html))
        }
        (Some(text), None) => builder.singlepart(SinglePart::plain(text)),
        (None, Some(html)) => builder.singlepart(SinglePart::html(html)),
        (None, None) => builder.singlepart(SinglePart::plain(String::new())),
    };
    built.map_err(|e| SendError::Permanent(format!("could not build the message: {e}")))
}

/// Every line break as `\n`, which the encoder writes as CRLF: a bare CR from an event's
/// values must not reach the DATA stream, where SMTP servers read it differently (smuggling).
fn unix_line_breaks(part: &str) -> String {
    part.replace("\r\n", "\n").replace('\r', "\n")
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
    fn a_bare_carriage_return_never_reaches_the_data_stream() {
        let mut e = email();
        e.text = Some("Hi Ann\r.\rMAIL FROM:<x@evil.test>\r\nbye".into());
        e.html = Some("<p>a\rb</p>".into());
        let raw = build_message(&e).unwrap().formatted();
        for (i, byte) in raw.iter().enumerate() {
            if *byte == b'\r' {
                assert_eq!(
                    raw.get(i + 1),
                    Some(&b'\n'),
                    "bare CR at {i}: {:?}",
                    String::from_utf8_lossy(&raw)
                );
            }
        }
        // (A line of a lone dot is stuffed by lettre when it writes DATA.)
    }

    #[test]
    fn invalid_recipient_is_permanent() {
        let mut e = email();
        e.to = "not an address".into();
        assert!(matches!(build_message(&e), Err(SendError::Permanent(_))));
    }
}
