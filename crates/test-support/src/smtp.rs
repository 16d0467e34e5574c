//! A real SMTP server on loopback, in-process: herald delivers to it exactly as it would to a
//! relay.
//!
//! It speaks enough RFC 5321 for lettre's pooled client: the 220 greeting, a multi-line EHLO
//! answer (PIPELINING, 8BITMIME, SMTPUTF8, SIZE), HELO, MAIL FROM, RCPT TO, DATA (dot-unstuffing,
//! `.` terminator), RSET, NOOP, VRFY, QUIT; many connections at once and many messages per
//! connection. Pipelined commands are answered together, with one write, so that a benchmark
//! measures herald rather than the sink. It records every accepted message (envelope, raw data,
//! when its final dot arrived, how long its content took) and every refusal, and it can be told
//! to answer the next N messages (or all) with a given code at RCPT or at the end of DATA, to hold
//! the answer to DATA (a message "in flight"), or to stop listening altogether (server down).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Where in the SMTP dialogue a fault is injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The answer to `RCPT TO`.
    Rcpt,
    /// The answer after the terminating `.` of `DATA`.
    Data,
}

/// A message the sink accepted (or refused at the end of DATA).
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    /// The `MAIL FROM` address, without angle brackets.
    pub mail_from: String,
    /// The `RCPT TO` addresses, without angle brackets.
    pub rcpt_to: Vec<String>,
    /// The message as transmitted, after dot-unstuffing, without the terminator.
    pub data: Vec<u8>,
    /// When the terminating `.` was read.
    pub arrived_at: Instant,
    /// From the sink's `354` answer to the terminating `.`: how long the client took to send the
    /// message content.
    pub data_phase: Duration,
}

/// A refused attempt.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub stage: Stage,
    pub code: u16,
    /// The recipient refused at RCPT.
    pub rcpt: Option<String>,
    /// The message refused at the end of DATA.
    pub mail: Option<ReceivedMail>,
}

/// A received message parsed with `mailparse`.
#[derive(Debug, Clone)]
pub struct Email {
    pub subject: String,
    pub from: String,
    pub to: String,
    pub message_id: String,
    /// The top-level MIME type (`multipart/alternative`, `text/plain`, ...).
    pub mime_type: String,
    /// The decoded text/plain part, if any.
    pub text: Option<String>,
    /// The decoded text/html part, if any.
    pub html: Option<String>,
    /// Every top-level header, decoded (name as sent, value).
    pub headers: Vec<(String, String)>,
}

impl Email {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl ReceivedMail {
    /// Parses the raw data; panics (failing the test) if it is not a well-formed message.
    pub fn parse(&self) -> Email {
        let parsed = mailparse::parse_mail(&self.data).unwrap_or_else(|e| {
            panic!(
                "the sink received a message mailparse cannot read: {e}\n{}",
                String::from_utf8_lossy(&self.data)
            )
        });
        use mailparse::MailHeaderMap;
        let get = |name: &str| parsed.headers.get_first_value(name).unwrap_or_default();
        let mut text = None;
        let mut html = None;
        collect_parts(&parsed, &mut text, &mut html);
        Email {
            subject: get("Subject"),
            from: get("From"),
            to: get("To"),
            message_id: get("Message-ID"),
            mime_type: parsed.ctype.mimetype.clone(),
            text,
            html,
            headers: parsed
                .headers
                .iter()
                .map(|h| (h.get_key(), h.get_value()))
                .collect(),
        }
    }

    /// The `Message-ID` header.
    pub fn message_id(&self) -> String {
        self.parse().message_id
    }
}

fn collect_parts(
    part: &mailparse::ParsedMail<'_>,
    text: &mut Option<String>,
    html: &mut Option<String>,
) {
    if part.subparts.is_empty() {
        let body = part.get_body().expect("decodable MIME part");
        match part.ctype.mimetype.as_str() {
            "text/plain" if text.is_none() => *text = Some(body),
            "text/html" if html.is_none() => *html = Some(body),
            _ => {}
        }
    } else {
        for p in &part.subparts {
            collect_parts(p, text, html);
        }
    }
}

#[derive(Debug, Clone)]
struct Fault {
    stage: Stage,
    code: u16,
    text: String,
    /// `None`: every message from now on.
    remaining: Option<usize>,
}

#[derive(Default)]
struct State {
    accepted: Vec<ReceivedMail>,
    refused: Vec<Refusal>,
    faults: Vec<Fault>,
    /// `Some(k)`: accept k more messages, then hold the answer to every later DATA until
    /// [`SmtpSink::release`].
    hold_after: Option<usize>,
    /// Messages whose DATA answer is being held right now.
    held: usize,
    /// Connections accepted since the start or the last [`SmtpSink::take`].
    connections: usize,
}

struct Inner {
    addr: SocketAddr,
    state: Mutex<State>,
    /// Bumped by `release`: held messages are then answered 250.
    release: watch::Sender<u64>,
    /// The accept loop while the server is up (aborting it closes every connection).
    server: Mutex<Option<JoinHandle<()>>>,
}

/// Cheap to clone; clones share the server and its records.
#[derive(Clone)]
pub struct SmtpSink {
    inner: Arc<Inner>,
}

enum Decision {
    Accept,
    Refuse(u16, String),
    Hold,
}

impl SmtpSink {
    /// Starts a sink on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the SMTP sink");
        let addr = listener.local_addr().expect("sink address");
        let inner = Arc::new(Inner {
            addr,
            state: Mutex::new(State::default()),
            release: watch::channel(0).0,
            server: Mutex::new(None),
        });
        let sink = Self { inner };
        sink.serve(listener);
        sink
    }

    fn serve(&self, listener: TcpListener) {
        let inner = self.inner.clone();
        let handle = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            inner.state.lock().unwrap().connections += 1;
                            connections.spawn(session(stream, inner.clone()));
                        }
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        *self.inner.server.lock().unwrap() = Some(handle);
    }

    pub fn port(&self) -> u16 {
        self.inner.addr.port()
    }

    /// The URL herald is configured with.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}?tls=none", self.port())
    }

    /// Server down: stops listening and closes every open connection.
    pub async fn stop(&self) {
        let handle = self.inner.server.lock().unwrap().take();
        if let Some(h) = handle {
            h.abort();
            let _ = h.await;
        }
        // Held sessions were aborted with the server.
        self.inner.state.lock().unwrap().held = 0;
    }

    /// Server up again on the same port.
    pub async fn resume(&self) {
        if self.inner.server.lock().unwrap().is_some() {
            return;
        }
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.inner.addr).await {
                Ok(l) => break l,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot rebind the SMTP sink on {}: {e}", self.inner.addr),
            }
        };
        self.serve(listener);
    }

    /// Answers the next `n` messages with `code` at `stage`.
    pub fn fail_next(&self, n: usize, stage: Stage, code: u16) {
        self.push_fault(stage, code, Some(n));
    }

    /// Answers every message from now on with `code` at `stage`, until [`Self::clear_faults`].
    pub fn fail_all(&self, stage: Stage, code: u16) {
        self.push_fault(stage, code, None);
    }

    fn push_fault(&self, stage: Stage, code: u16, remaining: Option<usize>) {
        let text = match code {
            421 => "4.3.2 Service not available, closing channel",
            450 | 451 => "4.3.0 Temporary local problem, try again later",
            452 => "4.3.1 Insufficient system storage",
            550 => "5.1.1 Mailbox unavailable",
            552 => "5.3.4 Message too big",
            554 => "5.7.1 Transaction failed",
            _ => "Injected by the test sink",
        };
        self.inner.state.lock().unwrap().faults.push(Fault {
            stage,
            code,
            text: text.into(),
            remaining,
        });
    }

    pub fn clear_faults(&self) {
        self.inner.state.lock().unwrap().faults.clear();
    }

    /// Accepts `k` more messages, then holds the answer to every further DATA (the messages stay
    /// in flight) until [`Self::release`]. A held message whose client goes away is not recorded.
    pub fn hold_after(&self, k: usize) {
        self.inner.state.lock().unwrap().hold_after = Some(k);
    }

    /// Stops holding: held messages are answered 250 and recorded, later ones accepted at once.
    pub fn release(&self) {
        self.inner.state.lock().unwrap().hold_after = None;
        self.inner.release.send_modify(|g| *g += 1);
    }

    /// Messages whose DATA answer is being held right now.
    pub fn held(&self) -> usize {
        self.inner.state.lock().unwrap().held
    }

    /// Every accepted message, in order of acceptance (since the last [`Self::take`]).
    pub fn received(&self) -> Vec<ReceivedMail> {
        self.inner.state.lock().unwrap().accepted.clone()
    }

    /// How many messages were accepted (since the last [`Self::take`]).
    pub fn count(&self) -> usize {
        self.inner.state.lock().unwrap().accepted.len()
    }

    /// Takes every accepted message and starts counting messages and connections from zero.
    pub fn take(&self) -> Vec<ReceivedMail> {
        let mut state = self.inner.state.lock().unwrap();
        state.connections = 0;
        std::mem::take(&mut state.accepted)
    }

    /// Every refused attempt, in order.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.inner.state.lock().unwrap().refused.clone()
    }

    /// Connections accepted since the start or the last [`Self::take`] (lettre pools them, so
    /// usually far fewer than messages).
    pub fn connections(&self) -> usize {
        self.inner.state.lock().unwrap().connections
    }

    /// Waits until `holds(accepted)` is true, checking every few milliseconds; gives up when no
    /// message arrived for `stall`, or after `timeout`. Whether it held.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        stall: Duration,
        mut holds: impl FnMut(&[ReceivedMail]) -> bool,
    ) -> bool {
        let start = Instant::now();
        let mut last_count = self.count();
        let mut last_progress = Instant::now();
        loop {
            let count = {
                let state = self.inner.state.lock().unwrap();
                if holds(&state.accepted) {
                    return true;
                }
                state.accepted.len()
            };
            if count != last_count {
                last_count = count;
                last_progress = Instant::now();
            }
            if start.elapsed() >= timeout || last_progress.elapsed() >= stall {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until at least `n` messages were accepted (see [`Self::wait_until`]).
    pub async fn wait_for_count(&self, n: usize, timeout: Duration, stall: Duration) -> bool {
        self.wait_until(timeout, stall, |accepted| accepted.len() >= n)
            .await
    }
}

fn decide(inner: &Inner, stage: Stage) -> Decision {
    let mut st = inner.state.lock().unwrap();
    if let Some(f) = st
        .faults
        .iter_mut()
        .find(|f| f.stage == stage && f.remaining != Some(0))
    {
        if let Some(n) = f.remaining.as_mut() {
            *n -= 1;
        }
        return Decision::Refuse(f.code, f.text.clone());
    }
    if stage == Stage::Data {
        match st.hold_after.as_mut() {
            Some(0) => return Decision::Hold,
            Some(k) => *k -= 1,
            None => {}
        }
    }
    Decision::Accept
}

/// Strips `<` `>` and any ESMTP parameters from the argument of MAIL FROM / RCPT TO.
fn path_arg(arg: &str) -> String {
    let arg = arg.trim();
    let path = arg.split_whitespace().next().unwrap_or("");
    path.trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned()
}

async fn session(stream: TcpStream, inner: Arc<Inner>) {
    let _ = session_inner(stream, inner).await;
}

async fn session_inner(stream: TcpStream, inner: Arc<Inner>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (reader, writer) = stream.into_split();
    let mut r = BufReader::with_capacity(64 * 1024, reader);
    let mut w = BufWriter::with_capacity(16 * 1024, writer);
    w.write_all(b"220 sink.herald.test ESMTP herald test sink\r\n")
        .await?;
    w.flush().await?;
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    let mut line = Vec::new();
    loop {
        // A pipelining client sends several commands at once: answer them all, then flush.
        if r.buffer().is_empty() {
            w.flush().await?;
        }
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let cmd = String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_owned();
        let upper = cmd.to_ascii_uppercase();
        let verb = upper.split_whitespace().next().unwrap_or("").to_owned();
        match verb.as_str() {
            "EHLO" => {
                w.write_all(b"250-sink.herald.test greets you\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 10485760\r\n")
                    .await?
            }
            "HELO" => w.write_all(b"250 sink.herald.test\r\n").await?,
            "MAIL" if upper.starts_with("MAIL FROM:") => {
                from = Some(path_arg(&cmd["MAIL FROM:".len()..]));
                rcpts.clear();
                w.write_all(b"250 2.1.0 Ok\r\n").await?;
            }
            "RCPT" if upper.starts_with("RCPT TO:") => {
                let to = path_arg(&cmd["RCPT TO:".len()..]);
                if from.is_none() {
                    w.write_all(b"503 5.5.1 Error: need MAIL command\r\n").await?;
                    continue;
                }
                match decide(&inner, Stage::Rcpt) {
                    Decision::Refuse(code, text) => {
                        inner.state.lock().unwrap().refused.push(Refusal {
                            stage: Stage::Rcpt,
                            code,
                            rcpt: Some(to),
                            mail: None,
                        });
                        w.write_all(format!("{code} {text}\r\n").as_bytes()).await?;
                    }
                    _ => {
                        rcpts.push(to);
                        w.write_all(b"250 2.1.5 Ok\r\n").await?;
                    }
                }
            }
            "DATA" => {
                if from.is_none() || rcpts.is_empty() {
                    w.write_all(b"503 5.5.1 Error: need RCPT command\r\n").await?;
                    continue;
                }
                w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                w.flush().await?;
                let data_start = Instant::now();
                let mut data = Vec::new();
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(()); // client went away mid-DATA: nothing delivered
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                    // Dot-unstuffing (RFC 5321 §4.5.2).
                    let start = usize::from(line.starts_with(b".."));
                    data.extend_from_slice(&line[start..]);
                }
                let arrived_at = Instant::now();
                let mail = ReceivedMail {
                    mail_from: from.take().unwrap_or_default(),
                    rcpt_to: std::mem::take(&mut rcpts),
                    data,
                    arrived_at,
                    data_phase: arrived_at - data_start,
                };
                // Subscribe before deciding, so a release between the two is not missed.
                let mut released = inner.release.subscribe();
                match decide(&inner, Stage::Data) {
                    Decision::Refuse(code, text) => {
                        inner.state.lock().unwrap().refused.push(Refusal {
                            stage: Stage::Data,
                            code,
                            rcpt: None,
                            mail: Some(mail),
                        });
                        w.write_all(format!("{code} {text}\r\n").as_bytes()).await?;
                    }
                    Decision::Accept => {
                        // Recorded once the answer is out, as a relay would have taken it.
                        w.write_all(b"250 2.0.0 Ok: queued\r\n").await?;
                        w.flush().await?;
                        inner.state.lock().unwrap().accepted.push(mail);
                    }
                    Decision::Hold => {
                        inner.state.lock().unwrap().held += 1;
                        let mut probe = [0u8; 1];
                        let outcome = tokio::select! {
                            biased;
                            // The client sends nothing while it waits for our answer, so any read
                            // result means it went away (a crash): the message was not delivered.
                            _ = r.read(&mut probe) => None,
                            _ = released.changed() => Some(()),
                        };
                        inner.state.lock().unwrap().held -= 1;
                        if outcome.is_none() {
                            return Ok(());
                        }
                        w.write_all(b"250 2.0.0 Ok: queued\r\n").await?;
                        w.flush().await?;
                        inner.state.lock().unwrap().accepted.push(mail);
                    }
                }
            }
            "RSET" => {
                from = None;
                rcpts.clear();
                w.write_all(b"250 2.0.0 Ok\r\n").await?;
            }
            "NOOP" => w.write_all(b"250 2.0.0 Ok\r\n").await?,
            "VRFY" => w.write_all(b"252 2.0.0 Cannot VRFY user\r\n").await?,
            "QUIT" => {
                w.write_all(b"221 2.0.0 Bye\r\n").await?;
                w.flush().await?;
                return Ok(());
            }
            _ => w.write_all(b"500 5.5.2 Error: command not recognized\r\n").await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn expect(
        reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
        prefix: &str,
    ) -> String {
        let mut answer = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            answer.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                break;
            }
        }
        assert!(
            answer.starts_with(prefix),
            "expected {prefix}, got {answer:?}"
        );
        answer
    }

    #[tokio::test]
    async fn records_a_pipelined_message() {
        let sink = SmtpSink::start().await;
        let stream = TcpStream::connect(("127.0.0.1", sink.port()))
            .await
            .unwrap();
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        expect(&mut reader, "220").await;
        write.write_all(b"EHLO client\r\n").await.unwrap();
        assert!(expect(&mut reader, "250-").await.contains("PIPELINING"));
        write
            .write_all(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
            .await
            .unwrap();
        expect(&mut reader, "250").await;
        expect(&mut reader, "250").await;
        expect(&mut reader, "354").await;
        write
            .write_all(b"Subject: Hi\r\n\r\nbody\r\n..dot-stuffed\r\n.\r\n")
            .await
            .unwrap();
        expect(&mut reader, "250").await;
        write.write_all(b"RSET\r\nNOOP\r\nQUIT\r\n").await.unwrap();
        expect(&mut reader, "250").await;
        expect(&mut reader, "250").await;
        expect(&mut reader, "221").await;
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!((sink.count(), sink.connections()), (1, 1));
        let received = sink.take();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].mail_from, "a@b.c");
        assert_eq!(received[0].rcpt_to, ["d@e.f"]);
        assert_eq!(
            received[0].data,
            b"Subject: Hi\r\n\r\nbody\r\n.dot-stuffed\r\n"
        );
        assert_eq!((sink.count(), sink.connections()), (0, 0));
    }
}
