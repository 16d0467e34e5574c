//! Connections to the SMTP relay: herald's own small pool over lettre's `AsyncSmtpConnection`.
//!
//! lettre speaks SMTP here (EHLO, STARTTLS, AUTH, MAIL/RCPT/DATA, dot-stuffing); herald owns the
//! sockets. Why not lettre's pooled transport: it opens its sockets without `TCP_NODELAY`, and
//! lettre writes a message's content and its final `.` as two writes, so Nagle's algorithm holds
//! the `.` until the relay acknowledges the content, which a relay waiting for that `.` does only
//! when its delayed-ACK timer fires (about 40 ms on Linux). That capped each connection at about
//! 23 messages a second (487 emails/s over 32 connections in BENCHMARKS.md). It also sent a NOOP
//! before every reuse; this pool checks a connection only after it sat idle.

use crate::SendError;
use crate::email::SmtpConfigError;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use rustls::pki_types::ServerName;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Longest wait for the relay to accept a TCP connection (and TLS, greeting and EHLO).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one message may take from MAIL FROM to the relay's final reply; past it the attempt is
/// a transient failure and the connection is closed.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection idle longer than this is closed instead of reused (relays drop idle clients).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection idle longer than this is checked with NOOP before reuse; under load connections
/// come back within milliseconds and skip that round trip.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(5);
/// Longest wait for the relay's answer to that NOOP; no answer means a dead connection.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// How the connection to the relay is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Security {
    /// Plain text (`smtp://…?tls=none`), for a relay on the same host or network.
    Plain,
    /// STARTTLS when the relay offers it (`?tls=opportunistic`).
    StartTlsIfOffered,
    /// STARTTLS or no mail (`smtp://`, the default).
    StartTls,
    /// TLS from the first byte (`smtps://`).
    ImplicitTls,
}

/// Where and how to reach the relay, parsed once from `HERALD_SMTP_URL`.
pub(crate) struct Relay {
    /// Host name: what we connect to and the name the relay's certificate must carry.
    host: String,
    port: u16,
    security: Security,
    /// AUTH PLAIN/LOGIN credentials from the URL's user and password, if any.
    credentials: Option<Credentials>,
    /// Our EHLO name: the URL's path if set, else this machine's host name (lettre's default).
    hello: ClientId,
    /// TLS client settings and the certificate name to expect for `smtps://` (STARTTLS uses
    /// lettre's own), built once.
    implicit_tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Relay {
    /// Parses `smtp://[user:pass@]host[:port][/ehlo-name][?tls=required|opportunistic|none]` or
    /// `smtps://[user:pass@]host[:port][/ehlo-name]`.
    pub(crate) fn from_url(url: &str) -> Result<Self, SmtpConfigError> {
        let parsed = url::Url::parse(url).map_err(|e| SmtpConfigError::BadUrl(e.to_string()))?;
        let mut tls = None;
        for (key, value) in parsed.query_pairs() {
            match key.as_ref() {
                "tls" => tls = Some(value.into_owned()),
                other => {
                    return Err(SmtpConfigError::Unsupported(format!(
                        "unknown parameter {other:?}"
                    )));
                }
            }
        }
        let (security, default_port) = match (parsed.scheme(), tls.as_deref()) {
            ("smtp", None | Some("required")) => (Security::StartTls, 587),
            ("smtp", Some("opportunistic")) => (Security::StartTlsIfOffered, 587),
            ("smtp", Some("none")) => (Security::Plain, 25),
            ("smtps", None) => (Security::ImplicitTls, 465),
            (scheme, tls) => {
                return Err(SmtpConfigError::Unsupported(format!(
                    "scheme {scheme:?} with tls={tls:?}"
                )));
            }
        };
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| SmtpConfigError::Unsupported("the URL names no host".into()))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        let decode = |part: &str, what: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| SmtpConfigError::BadUrl(format!("the {what} is not valid UTF-8")))
        };
        let credentials = match parsed.password() {
            Some(password) => Some(Credentials::new(
                decode(parsed.username(), "user name")?,
                decode(password, "password")?,
            )),
            None => None,
        };
        let hello = match parsed.path().trim_matches('/') {
            "" => ClientId::default(),
            name => ClientId::Domain(name.to_owned()),
        };
        let implicit_tls = match security {
            Security::Plain => None,
            _ => {
                let name = ServerName::try_from(host.clone()).map_err(|e| {
                    SmtpConfigError::Unsupported(format!(
                        "host {host:?} cannot be checked against a TLS certificate ({e})"
                    ))
                })?;
                (security == Security::ImplicitTls).then(|| (implicit_tls_connector(), name))
            }
        };
        Ok(Self {
            port: parsed.port().unwrap_or(default_port),
            host,
            security,
            credentials,
            hello,
            implicit_tls,
        })
    }

    /// A TCP connection to the relay with Nagle's algorithm off: the reason this pool exists.
    async fn open_socket(&self) -> io::Result<TcpStream> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// Opens, secures and authenticates one connection.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let unreachable = |e: &dyn std::fmt::Display| {
            SendError::Transient(format!(
                "could not connect to the SMTP relay {}:{}: {e}",
                self.host, self.port
            ))
        };
        let tcp = self.open_socket().await.map_err(|e| unreachable(&e))?;
        let stream: Box<dyn AsyncTokioStream> = match &self.implicit_tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| unreachable(&e))?;
                Box::new(ImplicitTlsStream(tls))
            }
            None => Box::new(tcp),
        };
        // Whatever goes wrong before MAIL FROM (a 554 greeting, a refused AUTH after a password
        // change, a failed STARTTLS) is the relay's state, not this message's: it may pass later.
        let setup = |e: lettre::transport::smtp::Error| {
            SendError::Transient(format!(
                "SMTP relay {}:{} refused the connection: {e}",
                self.host, self.port
            ))
        };
        let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &self.hello)
            .await
            .map_err(setup)?;
        let starttls = match self.security {
            Security::StartTls => true,
            Security::StartTlsIfOffered => conn.can_starttls(),
            Security::Plain | Security::ImplicitTls => false,
        };
        if starttls {
            let parameters = TlsParameters::new(self.host.clone()).map_err(setup)?;
            conn.starttls(parameters, &self.hello)
                .await
                .map_err(setup)?;
        }
        if let Some(credentials) = &self.credentials {
            conn.auth(DEFAULT_MECHANISMS, credentials)
                .await
                .map_err(setup)?;
        }
        Ok(conn)
    }
}

/// TLS with the Mozilla roots webpki-roots carries (as lettre's STARTTLS uses) and ring.
fn implicit_tls_connector() -> tokio_rustls::TlsConnector {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A lettre error as a delivery outcome: 5xx replies are permanent (a 5.1.1 "no such mailbox"
/// among them told apart), everything else may pass later.
fn classify(e: lettre::transport::smtp::Error) -> SendError {
    let text = e.to_string();
    if !e.is_permanent() {
        SendError::Transient(text)
    } else if names_no_such_mailbox(&text) {
        SendError::NoSuchMailbox(text)
    } else {
        SendError::Permanent(text)
    }
}

/// Whether a reply's text carries the enhanced status 5.1.1 (bad destination mailbox).
fn names_no_such_mailbox(text: &str) -> bool {
    text.split(|c: char| c.is_whitespace() || c == ':' || c == '(' || c == ')')
        .any(|word| word == "5.1.1")
}

/// Why one exchange on one connection failed.
enum Failure {
    /// The connection broke without an SMTP reply (closed, reset, unreadable answer).
    Lost(lettre::transport::smtp::Error),
    /// Anything else, classified.
    Refused(SendError),
}

impl From<Failure> for SendError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Lost(e) => classify(e),
            Failure::Refused(e) => e,
        }
    }
}

/// Connections to one relay, reused across sends.
pub(crate) struct Pool {
    relay: Relay,
    /// At most this many connections are open at once: relays limit connections per client
    /// (Postfix: 50 by default), and a burst waits for a connection instead of opening more.
    open: Semaphore,
    /// Connections not in use, oldest first, each with the moment it was returned.
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
}

impl Pool {
    pub(crate) fn new(relay: Relay, max_connections: usize) -> Self {
        Self {
            relay,
            open: Semaphore::new(max_connections),
            idle: Mutex::new(Vec::with_capacity(max_connections)),
        }
    }

    /// Sends one message on a pooled connection (or a new one), and keeps the connection if the
    /// exchange left it usable.
    pub(crate) async fn send(&self, envelope: &Envelope, message: &[u8]) -> Result<(), SendError> {
        let _permit = self
            .open
            .acquire()
            .await
            .expect("the semaphore is never closed");
        if let Some(conn) = self.take_idle().await {
            match self.send_on(conn, envelope, message).await {
                // The relay dropped a connection we thought open (no reply, no SMTP status): once
                // more on a new one. Almost always it was gone before MAIL FROM; should it have
                // taken the message and lost only its reply to the final `.`, this is the
                // duplicate any retry risks (RFC 1047), with the same Message-ID.
                Err(Failure::Lost(_)) => {}
                done => return done.map_err(SendError::from),
            }
        }
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, self.relay.connect())
            .await
            .map_err(|_| {
                SendError::Transient(format!(
                    "the SMTP relay {}:{} did not answer within {CONNECT_TIMEOUT:?}",
                    self.relay.host, self.relay.port
                ))
            })??;
        self.send_on(conn, envelope, message)
            .await
            .map_err(SendError::from)
    }

    async fn send_on(
        &self,
        mut conn: AsyncSmtpConnection,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<(), Failure> {
        match tokio::time::timeout(SEND_TIMEOUT, conn.send(envelope, message)).await {
            Ok(Ok(_)) => {
                let mut idle = self.idle.lock().expect("not poisoned");
                // Under light load only the newest connections are reused; the oldest (first)
                // would otherwise stay open after the relay has given up on them.
                idle.retain(|(_, since)| since.elapsed() <= IDLE_TIMEOUT);
                idle.push((conn, Instant::now()));
                Ok(())
            }
            // lettre has closed the connection on any error.
            Ok(Err(e)) if e.status().is_none() && !e.is_client() => Err(Failure::Lost(e)),
            Ok(Err(e)) => Err(Failure::Refused(classify(e))),
            Err(_) => Err(Failure::Refused(SendError::Transient(format!(
                "the SMTP relay took longer than {SEND_TIMEOUT:?} to accept the message"
            )))),
        }
    }

    /// The most recently returned idle connection that is still usable. Stale ones are dropped
    /// (closing the socket) without a QUIT: a relay that went away would leave QUIT unanswered.
    async fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        loop {
            let (mut conn, since) = self.idle.lock().expect("not poisoned").pop()?;
            let idle_for = since.elapsed();
            if idle_for > IDLE_TIMEOUT {
                // The rest are older still.
                self.idle.lock().expect("not poisoned").clear();
                return None;
            }
            if idle_for <= CHECK_AFTER_IDLE
                || tokio::time::timeout(CHECK_TIMEOUT, conn.test_connected())
                    .await
                    .unwrap_or(false)
            {
                return Some(conn);
            }
        }
    }
}

/// An implicit-TLS stream in the shape lettre takes (`AsyncTokioStream` needs `peer_addr`).
#[derive(Debug)]
struct ImplicitTlsStream(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncTokioStream for ImplicitTlsStream {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

impl AsyncRead for ImplicitTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ImplicitTlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_5_1_1_reply_is_told_apart() {
        assert!(names_no_such_mailbox(
            "permanent error (550): 5.1.1 Mailbox unavailable"
        ));
        assert!(!names_no_such_mailbox(
            "permanent error (554): 5.7.1 Message rejected"
        ));
        assert!(!names_no_such_mailbox(
            "permanent error (550): 5.1.10 null MX"
        ));
    }

    #[test]
    fn url_forms_choose_security_port_and_credentials() {
        let relay = Relay::from_url("smtp://ann%40school:p%2Fss@mail.example.com").unwrap();
        assert_eq!((relay.security, relay.port), (Security::StartTls, 587));
        assert!(relay.credentials.is_some());
        let relay = Relay::from_url("smtps://mail.example.com/herald.example.com").unwrap();
        assert_eq!((relay.security, relay.port), (Security::ImplicitTls, 465));
        assert!(relay.implicit_tls.is_some());
        assert!(matches!(relay.hello, ClientId::Domain(ref d) if d == "herald.example.com"));
        let relay = Relay::from_url("smtp://127.0.0.1:2525?tls=none").unwrap();
        assert_eq!((relay.security, relay.port), (Security::Plain, 2525));
        assert!(relay.credentials.is_none() && relay.implicit_tls.is_none());
        let relay = Relay::from_url("smtp://[::1]?tls=opportunistic").unwrap();
        assert_eq!(
            (relay.host.as_str(), relay.security),
            ("::1", Security::StartTlsIfOffered)
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("http://mail.example.com", "scheme \"http\""),
            ("smtp://mail.example.com?tls=maybe", "tls=Some(\"maybe\")"),
            ("smtps://mail.example.com?tls=none", "scheme \"smtps\""),
            ("smtp://mail.example.com?foo=1", "unknown parameter \"foo\""),
            (
                "smtp://u:%FF@mail.example.com",
                "password is not valid UTF-8",
            ),
            ("::", "not a valid URL"),
        ] {
            let err = Relay::from_url(url).err().expect(url).to_string();
            assert!(err.contains(says), "{url}: {err}");
        }
    }

    #[tokio::test]
    async fn sockets_to_the_relay_have_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Relay::from_url(&format!("smtp://127.0.0.1:{port}?tls=none")).unwrap();
        let socket = relay.open_socket().await.unwrap();
        assert!(socket.nodelay().unwrap());
    }
}
