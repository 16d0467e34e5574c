//! The load generator: signed posts over keep-alive connections with bounded concurrency, closed
//! loop (as fast as answers come back) or open loop (a fixed rate), always bounded in count and
//! time, loopback only.

use herald_core::signature::WebhookSecret;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const SOURCE: &str = "https://school.example.com";
pub const SINGLE: &str = "application/cloudevents+json";
pub const BATCH: &str = "application/cloudevents-batch+json";

/// An `offer_access_granted` event as in `examples/offer_access_granted.json`, with its own id
/// and contact: it starts one run of the bench workflow, which sends one email.
pub fn offer_event(id: &str, contact: &str, time: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"{SOURCE}","type":"course.offer_access_granted","time":"{time}","data":{{"contact":{{"id":"{contact}","email":"{contact}@example.com","phone":"+15551234567","first_name":"Ann","last_name":"Lee","timezone":"Europe/Berlin"}},"offer":{{"id":"o_pro","title":"Rust Pro","product_ids":["p_rust101","p_async"]}}}}}}"#
    )
}

/// A `lesson_completed` event as in `examples/lesson_completed.json`: stored and projected, but
/// it starts no run of the bench workflow (used to fill the database for scenario F).
pub fn lesson_event(id: &str, contact: &str, time: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"{SOURCE}","type":"course.lesson_completed","time":"{time}","data":{{"contact":{{"id":"{contact}","email":"{contact}@example.com","first_name":"Ann"}},"product":{{"id":"p_rust101","title":"Rust 101","url":"https://school.example.com/p/rust-101"}},"category":{{"id":"cat_w1","title":"Week 1"}},"lesson":{{"id":"l_own","title":"Ownership"}}}}}}"#
    )
}

/// A JSON array of events.
pub fn batch(events: impl Iterator<Item = String>) -> String {
    let mut out = String::from("[");
    for (i, e) in events.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&e);
    }
    out.push(']');
    out
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// One request to make: its `webhook-id`, content type and body.
pub struct Post {
    pub webhook_id: String,
    pub content_type: &'static str,
    pub body: String,
}

/// A signing HTTP client for one endpoint.
pub struct Client {
    http: reqwest::Client,
    /// Where posts go, in turn (several herald processes behind one imagined load balancer).
    urls: Vec<String>,
    next: std::sync::atomic::AtomicUsize,
    secret: WebhookSecret,
}

impl Client {
    pub fn new(url: String, secret: WebhookSecret, connections: usize) -> anyhow::Result<Self> {
        Self::spread(vec![url], secret, connections)
    }

    /// A client whose posts go to each of `urls` in turn.
    pub fn spread(
        urls: Vec<String>,
        secret: WebhookSecret,
        connections: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!urls.is_empty(), "no URL to post to");
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            http,
            urls,
            next: std::sync::atomic::AtomicUsize::new(0),
            secret,
        })
    }

    /// Signs (Standard Webhooks) and posts; returns the status code, or an error text.
    pub async fn post(&self, post: Post) -> Result<u16, String> {
        let ts = unix_now();
        let signature = self.secret.sign(&post.webhook_id, ts, post.body.as_bytes());
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let response = self
            .http
            .post(&self.urls[turn % self.urls.len()])
            .header("content-type", post.content_type)
            .header("webhook-id", post.webhook_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(post.body)
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("reading the answer failed: {e}"))?;
        if status == 202 {
            Ok(status)
        } else {
            Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ))
        }
    }
}

/// What a run of posts did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Requests answered 202.
    pub ok: u64,
    /// Requests that failed or were answered otherwise.
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the first request's start to the last answer.
    pub elapsed: Duration,
    /// Response times of the accepted requests, microseconds.
    pub latencies_us: Vec<u64>,
    /// When each request (by index) was sent, for open-loop runs.
    pub sent_at: Vec<Option<Instant>>,
    /// Open loop: requests that could not start on time because `max_in_flight` were pending.
    pub late: u64,
}

impl Outcome {
    pub fn rate(&self, per_request: u64) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            (self.ok * per_request) as f64 / secs
        } else {
            0.0
        }
    }
}

/// Sends requests `0..max_requests` as fast as answers come back, `concurrency` at a time, and
/// stops starting new ones after `max_time`.
pub async fn closed_loop(
    client: Arc<Client>,
    concurrency: usize,
    max_requests: u64,
    max_time: Duration,
    make: Arc<dyn Fn(u64) -> Post + Send + Sync>,
) -> Outcome {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + max_time;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, next, make) = (client.clone(), next.clone(), make.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            let mut last_end = start;
            loop {
                if Instant::now() >= deadline {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= max_requests {
                    break;
                }
                let post = make(i);
                let began = Instant::now();
                let result = client.post(post).await;
                last_end = Instant::now();
                match result {
                    Ok(_) => {
                        out.ok += 1;
                        out.latencies_us.push((last_end - began).as_micros() as u64);
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(e);
                    }
                }
            }
            out.elapsed = last_end - start;
            out
        }));
    }
    let mut total = Outcome::default();
    for w in workers {
        let Ok(out) = w.await else {
            total.errors += 1;
            continue;
        };
        total.ok += out.ok;
        total.errors += out.errors;
        if total.first_error.is_none() {
            total.first_error = out.first_error;
        }
        total.elapsed = total.elapsed.max(out.elapsed);
        total.latencies_us.extend(out.latencies_us);
    }
    total
}

/// Starts request `i` at `start + i / rate` for `count` requests, each on its own task, with at
/// most `max_in_flight` pending (a request that finds none free waits, and counts as late).
pub async fn open_loop(
    client: Arc<Client>,
    rate: f64,
    count: u64,
    max_in_flight: usize,
    make: Arc<dyn Fn(u64) -> Post + Send + Sync>,
) -> Outcome {
    let permits = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = Vec::with_capacity(count as usize);
    let mut sent_at = Vec::with_capacity(count as usize);
    let mut late = 0;
    for i in 0..count {
        tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                late += 1;
                permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore open")
            }
        };
        let post = make(i);
        let client = client.clone();
        let began = Instant::now();
        sent_at.push(Some(began));
        tasks.push(tokio::spawn(async move {
            let result = client.post(post).await;
            drop(permit);
            (result, began.elapsed(), Instant::now())
        }));
    }
    let mut total = Outcome {
        late,
        ..Outcome::default()
    };
    let mut last_end = start;
    for t in tasks {
        match t.await {
            Ok((Ok(_), took, end)) => {
                total.ok += 1;
                total.latencies_us.push(took.as_micros() as u64);
                last_end = last_end.max(end);
            }
            Ok((Err(e), _, end)) => {
                total.errors += 1;
                total.first_error.get_or_insert(e);
                last_end = last_end.max(end);
            }
            Err(e) => {
                total.errors += 1;
                total.first_error.get_or_insert(e.to_string());
            }
        }
    }
    total.elapsed = last_end - start;
    total.sent_at = sent_at;
    total
}

/// The `q` quantile (0..=1) of unsorted samples, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_valid_course_events() {
        let now = chrono::Utc::now();
        let time = "2026-11-24T10:00:00Z";
        let one = offer_event("e1", "c1", time);
        let parsed = herald_core::event::parse_body(
            herald_core::event::BodyKind::Single,
            one.as_bytes(),
            now,
        )
        .unwrap();
        assert_eq!(parsed[0].contact_id(), "c1");
        let many = batch((0..3).map(|i| lesson_event(&format!("l{i}"), "c2", time)));
        let parsed = herald_core::event::parse_body(
            herald_core::event::BodyKind::Batch,
            many.as_bytes(),
            now,
        )
        .unwrap();
        assert_eq!(parsed.len(), 3);
    }

    #[test]
    fn quantiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(50));
        assert_eq!(quantile(&v, 0.99), Some(99));
        assert_eq!(quantile(&v, 1.0), Some(100));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
