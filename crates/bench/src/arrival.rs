//! What the bench reads from each message the SMTP sink accepted: its `Message-ID`, the event id
//! the bench workflow puts in the subject (`[evt-id]`), and what the body carries, so that a
//! scenario can check that every event's email arrived exactly once and measure the time from
//! post to arrival.

use herald_test_support::smtp::ReceivedMail;
use std::time::{Duration, Instant};

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
    /// From the sink's `354` answer to the terminating `.`: how long the client took to send the
    /// message content.
    pub data_phase: Duration,
}

impl Arrival {
    pub fn of(mail: &ReceivedMail) -> Self {
        let mut message_id = String::new();
        let mut subject = String::new();
        // The header being read (folded lines appended), taken when the next one starts.
        let mut header: Vec<u8> = Vec::new();
        let mut rest = mail.data.as_slice();
        let mut body: &[u8] = &[];
        while !rest.is_empty() {
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| i + 1);
            let (line, after) = rest.split_at(end);
            rest = after;
            let line = trim_eol(line);
            if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
                header.extend_from_slice(line);
                continue;
            }
            take_header(&header, &mut message_id, &mut subject);
            header.clear();
            if line.is_empty() {
                body = rest;
                break;
            }
            header.extend_from_slice(line);
        }
        let event_id = subject.rfind('[').and_then(|open| {
            subject[open + 1..]
                .find(']')
                .map(|close| subject[open + 1..open + 1 + close].to_owned())
        });
        let body_mentions = match &event_id {
            Some(id) if !id.is_empty() => count_occurrences(body, id.as_bytes()),
            _ => 0,
        };
        Arrival {
            at: mail.arrived_at,
            message_id,
            event_id,
            body_mentions,
            login_links: count_occurrences(body, b"/l/"),
            data_phase: mail.data_phase,
        }
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && (line[end - 1] == b'\n' || line[end - 1] == b'\r') {
        end -= 1;
    }
    &line[..end]
}

fn take_header(header: &[u8], message_id: &mut String, subject: &mut String) {
    let text = String::from_utf8_lossy(header);
    if let Some((name, value)) = text.split_once(':') {
        if name.eq_ignore_ascii_case("message-id") {
            *message_id = value.trim().to_owned();
        } else if name.eq_ignore_ascii_case("subject") {
            *subject = value.trim().to_owned();
        }
    }
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

    #[test]
    fn reads_the_event_id_and_what_the_body_carries() {
        let at = Instant::now();
        let mail = ReceivedMail {
            mail_from: "a@b.c".into(),
            rcpt_to: vec!["d@e.f".into()],
            data: b"Subject: Hi\r\n [evt-1]\r\nMessage-ID: <m1@x>\r\n\r\nbody evt-1 http://h/l/t1\r\n.evt-1 again\r\n".to_vec(),
            arrived_at: at,
            data_phase: Duration::from_millis(3),
        };
        let arrival = Arrival::of(&mail);
        assert_eq!(arrival.message_id, "<m1@x>");
        assert_eq!(arrival.event_id.as_deref(), Some("evt-1"));
        assert_eq!(arrival.body_mentions, 2);
        assert_eq!(arrival.login_links, 1);
        assert_eq!(
            (arrival.at, arrival.data_phase),
            (at, Duration::from_millis(3))
        );
    }
}
