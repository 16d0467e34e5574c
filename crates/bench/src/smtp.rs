//! A real SMTP server on loopback, inside the bench process: herald delivers to it exactly as it
//! would to a relay. It speaks what lettre's pooled client uses (the 220 greeting, a multi-line
//! EHLO answer with PIPELINING, HELO, MAIL, RCPT, DATA with dot-unstuffing and the `.`
//! terminator, RSET, NOOP, QUIT), over any number of connections, and it records, for every
//! message, when it arrived, its `Message-ID` and the event id the bench workflow puts in the
//! subject (`[evt-id]`), so that a scenario can check that every event's email arrived exactly
//! once and measure the time from post to arrival.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One accepted message.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// When the terminating `.` of DATA was read.
    pub at: Instant,
    pub message_id: String,
    /// The text between the last `[` and `]` of the subject.
    pub event_id: Option<String>,
    /// How often the event id occurs in the message after the headers (the text and HTML parts
    /// each carry it once when both rendered it).
    pub body_mentions: u32,
    /// How many learner links (`/l/`) the message carries after the headers (the bench
    /// workflow puts `<<login_url>>` in both parts).
    pub login_links: u32,
    /// From our `354` answer to the terminating `.`: how long the client took to send the
    /// message content.
    pub data_phase: Duration,
}

#[derive(Default)]
struct Shared {
    arrivals: Mutex<Vec<Arrival>>,
    count: AtomicU64,
    connections: AtomicU64,
}

pub struct SmtpSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl SmtpSink {
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accept_shared.connections.fetch_add(1, Ordering::Relaxed);
                let conn_shared = accept_shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, conn_shared).await;
                });
            }
        });
        Ok(Self { addr, shared, task })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Messages received since the last [`SmtpSink::take`].
    pub fn count(&self) -> u64 {
        self.shared.count.load(Ordering::Acquire)
    }

    /// Connections accepted since the last [`SmtpSink::take`].
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Takes every recorded arrival and starts counting from zero.
    pub fn take(&self) -> Vec<Arrival> {
        let mut arrivals = self.shared.arrivals.lock().expect("sink lock");
        self.shared.count.store(0, Ordering::Release);
        self.shared.connections.store(0, Ordering::Relaxed);
        std::mem::take(&mut *arrivals)
    }

    /// A copy of the arrivals so far (keeps them).
    pub fn snapshot(&self) -> Vec<Arrival> {
        self.shared.arrivals.lock().expect("sink lock").clone()
    }

    /// Waits until `pred(arrivals)` holds, checking every few milliseconds; gives up when nothing
    /// new arrived for `stall` or after `timeout`. Returns whether it held.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        stall: Duration,
        mut pred: impl FnMut(&[Arrival]) -> bool,
    ) -> bool {
        let start = Instant::now();
        let mut last_count = self.count();
        let mut last_progress = Instant::now();
        loop {
            {
                let arrivals = self.shared.arrivals.lock().expect("sink lock");
                if pred(&arrivals) {
                    return true;
                }
            }
            let count = self.count();
            if count != last_count {
                last_count = count;
                last_progress = Instant::now();
            }
            if start.elapsed() >= timeout || last_progress.elapsed() >= stall {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until at least `n` messages arrived (see [`SmtpSink::wait_until`]).
    pub async fn wait_for_count(&self, n: u64, timeout: Duration, stall: Duration) -> bool {
        let start = Instant::now();
        let mut last_count = self.count();
        let mut last_progress = Instant::now();
        loop {
            let count = self.count();
            if count >= n {
                return true;
            }
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
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (read, write) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, read);
    let mut writer = BufWriter::with_capacity(16 * 1024, write);
    writer
        .write_all(b"220 herald-bench ESMTP sink ready\r\n")
        .await?;
    writer.flush().await?;
    let mut line = Vec::with_capacity(1024);
    let mut in_mail = false;
    let mut recipients = 0usize;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb: [u8; 4] = match line.get(..4) {
            Some(v) => [v[0], v[1], v[2], v[3]].map(|b| b.to_ascii_uppercase()),
            None => *b"    ",
        };
        let answer: &[u8] = match &verb {
            b"EHLO" => b"250-herald-bench greets you\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 10485760\r\n",
            b"HELO" => b"250 herald-bench\r\n",
            b"MAIL" => {
                in_mail = true;
                recipients = 0;
                b"250 2.1.0 OK\r\n"
            }
            b"RCPT" if in_mail => {
                recipients += 1;
                b"250 2.1.5 OK\r\n"
            }
            b"RCPT" => b"503 5.5.1 MAIL first\r\n",
            b"DATA" if recipients > 0 => {
                writer.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                writer.flush().await?;
                let data_start = Instant::now();
                let mut arrival = read_data(&mut reader, &mut line).await?;
                arrival.data_phase = arrival.at - data_start;
                {
                    let mut arrivals = shared.arrivals.lock().expect("sink lock");
                    arrivals.push(arrival);
                    shared.count.fetch_add(1, Ordering::Release);
                }
                in_mail = false;
                recipients = 0;
                b"250 2.0.0 OK queued\r\n"
            }
            b"DATA" => b"503 5.5.1 RCPT first\r\n",
            b"RSET" => {
                in_mail = false;
                recipients = 0;
                b"250 2.0.0 OK\r\n"
            }
            b"NOOP" => b"250 2.0.0 OK\r\n",
            b"QUIT" => {
                writer.write_all(b"221 2.0.0 Bye\r\n").await?;
                writer.flush().await?;
                return Ok(());
            }
            _ => b"502 5.5.2 Command not recognized\r\n",
        };
        writer.write_all(answer).await?;
        // With pipelining the client may have sent several commands at once: answer them all,
        // then flush.
        if reader.buffer().is_empty() {
            writer.flush().await?;
        }
    }
}

/// Reads a DATA section up to the `.` line, dot-unstuffing, and extracts what the bench checks.
async fn read_data(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    line: &mut Vec<u8>,
) -> std::io::Result<Arrival> {
    let mut headers = true;
    let mut message_id = String::new();
    let mut subject = String::new();
    // The header being read (folded lines appended), flushed when the next one starts.
    let mut current: Vec<u8> = Vec::new();
    let mut body: Vec<u8> = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed inside DATA",
            ));
        }
        if line.as_slice() == b".\r\n" || line.as_slice() == b".\n" {
            break;
        }
        let content: &[u8] = if line.starts_with(b"..") {
            &line[1..]
        } else {
            &line[..]
        };
        if headers {
            let trimmed = trim_eol(content);
            if trimmed.is_empty() {
                take_header(&mut current, &mut message_id, &mut subject);
                headers = false;
            } else if trimmed[0] == b' ' || trimmed[0] == b'\t' {
                current.extend_from_slice(trimmed);
            } else {
                take_header(&mut current, &mut message_id, &mut subject);
                current.extend_from_slice(trimmed);
            }
        } else {
            body.extend_from_slice(content);
        }
    }
    let at = Instant::now();
    let event_id = subject.rfind('[').and_then(|open| {
        subject[open + 1..]
            .find(']')
            .map(|close| subject[open + 1..open + 1 + close].to_owned())
    });
    let body_mentions = match &event_id {
        Some(id) if !id.is_empty() => count_occurrences(&body, id.as_bytes()),
        _ => 0,
    };
    Ok(Arrival {
        at,
        message_id,
        event_id,
        body_mentions,
        login_links: count_occurrences(&body, b"/l/"),
        data_phase: Duration::ZERO,
    })
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && (line[end - 1] == b'\n' || line[end - 1] == b'\r') {
        end -= 1;
    }
    &line[..end]
}

fn take_header(current: &mut Vec<u8>, message_id: &mut String, subject: &mut String) {
    if current.is_empty() {
        return;
    }
    let text = String::from_utf8_lossy(current);
    if let Some((name, value)) = text.split_once(':') {
        if name.eq_ignore_ascii_case("message-id") {
            *message_id = value.trim().to_owned();
        } else if name.eq_ignore_ascii_case("subject") {
            *subject = value.trim().to_owned();
        }
    }
    current.clear();
}

fn count_occurrences(haystack: &[u8], needle: &[u8]) -> u32 {
    if needle.is_empty() || haystack.len() < needle.len() {
        return 0;
    }
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

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
        let sink = SmtpSink::start().await.unwrap();
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
            .write_all(b"Subject: Hi\r\n [evt-1]\r\nMessage-ID: <m1@x>\r\n\r\nbody evt-1 http://h/l/t1\r\n..evt-1 again\r\n.\r\n")
            .await
            .unwrap();
        expect(&mut reader, "250").await;
        write.write_all(b"RSET\r\nNOOP\r\nQUIT\r\n").await.unwrap();
        expect(&mut reader, "250").await;
        expect(&mut reader, "250").await;
        expect(&mut reader, "221").await;
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        let arrivals = sink.take();
        assert_eq!(arrivals.len(), 1);
        assert_eq!(arrivals[0].message_id, "<m1@x>");
        assert_eq!(arrivals[0].event_id.as_deref(), Some("evt-1"));
        assert_eq!(arrivals[0].body_mentions, 2);
        assert_eq!(arrivals[0].login_links, 1);
        assert_eq!(sink.count(), 0);
    }
}
