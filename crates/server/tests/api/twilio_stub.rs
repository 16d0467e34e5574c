//! A Twilio-compatible SMS provider on loopback, in-process, for the SMS tests.
//!
//! It serves `POST /2010-04-01/Accounts/{sid}/Messages.json` and checks what Twilio checks: the
//! account in the path, HTTP basic auth `sid:token`, an `application/x-www-form-urlencoded` body
//! with `To` (E.164), `From` (the configured sender) and a non-empty `Body`. Every request is
//! recorded with what was wrong with it (tests assert there was nothing) and the answer given.
//! Answers are scripted: by default `201` with a fresh `sid`; `reply_next` queues others (`500`,
//! `429` with or without `Retry-After`, `400`, ..., or a delivery whose answer is lost). Like
//! Twilio, it deduplicates on `Idempotency-Key`: a key it delivered before gets that message's
//! sid again and delivers nothing new. `stop` takes the server down (connections
//! are refused) and `resume` brings it back on the same port. Every answer carries
//! `Connection: close`, so no pooled connection outlives a `stop`.

#![allow(dead_code)]

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The account herald is configured with (`HERALD_SMS_ACCOUNT_SID`).
pub const ACCOUNT_SID: &str = "AC5e2c3f1b0a9d8e7f6a5b4c3d2e1f0a9b";
/// `HERALD_SMS_AUTH_TOKEN`: basic auth outbound, the inbound signature key.
pub const AUTH_TOKEN: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a0";
/// `HERALD_SMS_FROM`.
pub const SMS_FROM: &str = "+15005550006";

/// One scripted answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// Seconds, sent as `Retry-After`.
    pub retry_after: Option<u64>,
    /// The message is accepted (delivered to the handset) but the answer says `status`: a
    /// response lost on the way back, as a timeout or a proxy's 502 would lose it.
    pub lose_answer: bool,
}

impl Reply {
    /// `201 Created` with a fresh message sid.
    pub const CREATED: Reply = Reply {
        status: 201,
        retry_after: None,
        lose_answer: false,
    };

    pub fn status(status: u16) -> Self {
        Self {
            status,
            retry_after: None,
            lose_answer: false,
        }
    }

    pub fn retry_after(status: u16, seconds: u64) -> Self {
        Self {
            status,
            retry_after: Some(seconds),
            lose_answer: false,
        }
    }

    /// Delivers the message, then answers `status` as if the answer was lost.
    pub fn lost_answer(status: u16) -> Self {
        Self {
            status,
            retry_after: None,
            lose_answer: true,
        }
    }
}

/// A request the stub received.
#[derive(Debug, Clone)]
pub struct SmsRequest {
    pub method: String,
    pub path: String,
    pub to: Option<String>,
    pub from: Option<String>,
    pub body: Option<String>,
    /// Every form field, in the order sent.
    pub form: Vec<(String, String)>,
    pub idempotency_key: Option<String>,
    /// What the stub found wrong with the request (empty for a well-formed one).
    pub problems: Vec<String>,
    /// What it answered.
    pub answered: u16,
    /// The sid of the message this request created or (a repeated Idempotency-Key) found.
    pub sid: Option<String>,
    /// Whether this request put a new message on its way to a handset.
    pub delivered: bool,
}

#[derive(Default)]
struct StubState {
    requests: Vec<SmsRequest>,
    script: VecDeque<Reply>,
    /// Answers every request with this once the script is empty (default `CREATED`).
    fallback: Option<Reply>,
    next_sid: u64,
    /// Idempotency-Key → sid of every message delivered, as Twilio deduplicates on it.
    delivered_keys: std::collections::HashMap<String, String>,
}

struct Inner {
    addr: SocketAddr,
    state: Mutex<StubState>,
    server: Mutex<Option<JoinHandle<()>>>,
}

/// Cheap to clone; clones share the server and its records.
#[derive(Clone)]
pub struct TwilioStub {
    inner: Arc<Inner>,
}

impl TwilioStub {
    /// Starts a stub on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Twilio stub");
        let addr = listener.local_addr().expect("stub address");
        let stub = Self {
            inner: Arc::new(Inner {
                addr,
                state: Mutex::new(StubState::default()),
                server: Mutex::new(None),
            }),
        };
        stub.serve(listener);
        stub
    }

    fn serve(&self, listener: TcpListener) {
        let app = Router::new().fallback(handle).with_state(self.clone());
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.inner.server.lock().unwrap() = Some(handle);
    }

    /// `HERALD_SMS_URL` (with a trailing slash, which herald must not double).
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.inner.addr)
    }

    /// The sender herald is configured with for this stub.
    pub fn sender(&self) -> herald_channels::sms::SmsSender {
        crate::helpers::install_crypto();
        herald_channels::sms::SmsSender::new(&self.base_url(), ACCOUNT_SID, AUTH_TOKEN, SMS_FROM)
            .expect("valid SMS configuration")
    }

    /// Answers the next requests with these, in order (then the fallback).
    pub fn reply_next(&self, replies: &[Reply]) {
        self.inner
            .state
            .lock()
            .unwrap()
            .script
            .extend(replies.iter().copied());
    }

    /// Answers every request with `reply` once the script is empty (`None`: 201 again).
    pub fn reply_always(&self, reply: Option<Reply>) {
        self.inner.state.lock().unwrap().fallback = reply;
    }

    /// Server down: stops listening (connections are refused).
    pub async fn stop(&self) {
        let handle = self.inner.server.lock().unwrap().take();
        if let Some(h) = handle {
            h.abort();
            let _ = h.await;
        }
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
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot rebind the Twilio stub on {}: {e}", self.inner.addr),
            }
        };
        self.serve(listener);
    }

    /// Every request so far, in order of arrival.
    pub fn requests(&self) -> Vec<SmsRequest> {
        self.inner.state.lock().unwrap().requests.clone()
    }

    pub fn count(&self) -> usize {
        self.inner.state.lock().unwrap().requests.len()
    }

    /// Requests that put a new message on its way to a handset.
    pub fn delivered(&self) -> Vec<SmsRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.delivered)
            .collect()
    }

    /// Fails the test if any request was malformed (wrong path, auth, form or sender).
    pub fn assert_well_formed(&self) {
        let bad: Vec<SmsRequest> = self
            .requests()
            .into_iter()
            .filter(|r| !r.problems.is_empty())
            .collect();
        assert!(
            bad.is_empty(),
            "herald sent malformed requests to the SMS provider: {bad:#?}"
        );
    }

    /// Waits until the stub has received at least `n` requests; returns all of them.
    pub async fn wait_for_requests(&self, n: usize) -> Vec<SmsRequest> {
        let ok = crate::helpers::eventually(async || self.count() >= n).await;
        if !ok {
            panic!(
                "expected {n} requests at the SMS provider, got {}: {:#?}",
                self.count(),
                self.requests()
            );
        }
        self.requests()
    }

    /// The answer to a well-formed request: (reply, sid, delivered).
    fn next_reply(&self, key: Option<&str>) -> (Reply, Option<String>, bool) {
        let mut st = self.inner.state.lock().unwrap();
        // A key seen before: the same message, not a new one.
        if let Some(sid) = key.and_then(|k| st.delivered_keys.get(k)) {
            return (Reply::CREATED, Some(sid.clone()), false);
        }
        let reply = st
            .script
            .pop_front()
            .or(st.fallback)
            .unwrap_or(Reply::CREATED);
        let delivered = (200..300).contains(&reply.status) || reply.lose_answer;
        let sid = delivered.then(|| {
            st.next_sid += 1;
            format!("SM{:032x}", 0x5eed_0000_u64 + st.next_sid)
        });
        if let (Some(k), Some(sid)) = (key, &sid) {
            st.delivered_keys.insert(k.to_owned(), sid.clone());
        }
        (reply, sid, delivered)
    }
}

/// Whether `s` is an E.164 number: `+`, then 2 to 15 digits, the first not 0.
pub fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (2..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// `application/x-www-form-urlencoded`, decoded here rather than by any crate herald uses.
pub fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, String> {
    fn decode(s: &str) -> Result<String, String> {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = s
                        .get(i + 1..i + 3)
                        .ok_or_else(|| format!("truncated escape in {s:?}"))?;
                    out.push(
                        u8::from_str_radix(hex, 16)
                            .map_err(|_| format!("bad escape %{hex} in {s:?}"))?,
                    );
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8"))
    }
    let text = std::str::from_utf8(body).map_err(|_| "form body is not UTF-8".to_owned())?;
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

async fn handle(
    State(stub): State<TwilioStub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut problems = Vec::new();
    let path = uri.path().to_owned();
    let expected_path = format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json");
    if method != Method::POST {
        problems.push(format!("method {method}, expected POST"));
    }
    if path != expected_path {
        problems.push(format!("path {path}, expected {expected_path}"));
    }
    let auth_ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .is_some_and(|raw| raw == format!("{ACCOUNT_SID}:{AUTH_TOKEN}").as_bytes());
    if !auth_ok {
        problems.push(format!(
            "basic auth is not {ACCOUNT_SID}:<token>: {:?}",
            headers.get(header::AUTHORIZATION)
        ));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        problems.push(format!("content-type {content_type:?}"));
    }
    let form = parse_form(&body).unwrap_or_else(|e| {
        problems.push(e);
        Vec::new()
    });
    let field = |name: &str| {
        let values: Vec<&String> = form
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect();
        values
            .first()
            .map(|v| (*v).clone())
            .filter(|_| values.len() == 1)
    };
    let (to, from, text) = (field("To"), field("From"), field("Body"));
    match &to {
        Some(t) if is_e164(t) => {}
        other => problems.push(format!("To is not one E.164 number: {other:?}")),
    }
    if from.as_deref() != Some(SMS_FROM) {
        problems.push(format!("From is {from:?}, expected {SMS_FROM}"));
    }
    if text.as_deref().is_none_or(str::is_empty) {
        problems.push("no Body".into());
    }
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);

    let (status, sid, retry_after, delivered) = if !auth_ok {
        (401, None, None, false)
    } else if !problems.is_empty() {
        (400, None, None, false)
    } else {
        let (reply, sid, delivered) = stub.next_reply(idempotency_key.as_deref());
        (reply.status, sid, reply.retry_after, delivered)
    };
    stub.inner.state.lock().unwrap().requests.push(SmsRequest {
        method: method.to_string(),
        path,
        to: to.clone(),
        from: from.clone(),
        body: text.clone(),
        form: form.clone(),
        idempotency_key,
        problems: problems.clone(),
        answered: status,
        sid: sid.clone(),
        delivered,
    });

    let code = StatusCode::from_u16(status).expect("valid status");
    let json = match sid.as_ref().filter(|_| (200..300).contains(&status)) {
        Some(sid) => serde_json::json!({
            "sid": sid, "account_sid": ACCOUNT_SID, "to": to, "from": from, "body": text,
            "status": "queued", "num_segments": "1",
        }),
        None => serde_json::json!({
            "code": 20000 + u32::from(status),
            "message": if problems.is_empty() { format!("Injected by the test stub ({status})") } else { problems.join("; ") },
            "status": status,
        }),
    };
    let mut response = (code, axum::Json(json)).into_response();
    let h = response.headers_mut();
    h.insert(header::CONNECTION, "close".parse().unwrap());
    if let Some(after) = retry_after {
        h.insert(header::RETRY_AFTER, after.to_string().parse().unwrap());
    }
    response
}

// ----- what the SMS and opt-out tests share -----

/// The line herald appends to the first SMS a contact receives (the default of
/// `EngineConfig.sms_opt_out_line`).
pub const OPT_OUT_LINE: &str = "Reply STOP to opt out";

/// A contact with an email address derived from its id, a first name and a phone.
pub fn sms_contact(id: &str, first_name: &str, phone: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "email": format!("{id}@example.com"),
        "first_name": first_name,
        "phone": phone,
    })
}

/// Twilio's request signature, written out from Twilio's documentation independently of
/// herald's code: take the full URL, append each POST field's name and value sorted by name,
/// HMAC-SHA1 it with the auth token, base64.
pub fn twilio_signature(auth_token: &str, url: &str, fields: &[(&str, &str)]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut sorted = fields.to_vec();
    sorted.sort();
    let mut data = url.to_owned();
    for (name, value) in sorted {
        data.push_str(name);
        data.push_str(value);
    }
    let mut mac =
        Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes()).expect("any key length");
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The fields of an inbound SMS webhook as Twilio posts them.
pub fn inbound_fields<'a>(from: &'a str, body: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("ToCountry", "US"),
        ("ToState", "CA"),
        ("SmsMessageSid", "SM7b2d5e0f9a8c4d3e2f1a0b9c8d7e6f5a"),
        ("NumMedia", "0"),
        ("ToCity", "SAN FRANCISCO"),
        ("FromZip", "94105"),
        ("SmsSid", "SM7b2d5e0f9a8c4d3e2f1a0b9c8d7e6f5a"),
        ("FromState", "CA"),
        ("SmsStatus", "received"),
        ("FromCity", "SAN FRANCISCO"),
        ("Body", body),
        ("FromCountry", "US"),
        ("To", SMS_FROM),
        ("MessagingServiceSid", "MG0f1e2d3c4b5a69788796a5b4c3d2e1f0"),
        ("ToZip", "94105"),
        ("NumSegments", "1"),
        ("MessageSid", "SM7b2d5e0f9a8c4d3e2f1a0b9c8d7e6f5a"),
        ("AccountSid", ACCOUNT_SID),
        ("From", from),
        ("ApiVersion", "2010-04-01"),
    ]
}

impl crate::helpers::TestApp {
    /// The URL Twilio is configured to call, as it signs it.
    pub fn inbound_url(&self) -> String {
        format!(
            "{}/v1/sms/inbound",
            self.options.public_url.trim_end_matches('/')
        )
    }

    /// Posts an inbound webhook form with this `X-Twilio-Signature` (none for `None`).
    pub async fn post_inbound(
        &self,
        fields: &[(&str, &str)],
        signature: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self.client.post(self.url("/v1/sms/inbound")).form(fields);
        if let Some(s) = signature {
            req = req.header("X-Twilio-Signature", s);
        }
        req.send().await.expect("POST /v1/sms/inbound")
    }

    /// An inbound SMS from `from` saying `body`, signed as Twilio would; asserts 200.
    pub async fn text_in(&self, from: &str, body: &str) {
        let fields = inbound_fields(from, body);
        let signature = twilio_signature(AUTH_TOKEN, &self.inbound_url(), &fields);
        let response = self.post_inbound(&fields, Some(&signature)).await;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, 200, "inbound SMS {body:?} from {from}: {text}");
    }

    /// The channels the contact is opted out of, sorted.
    pub async fn opted_out_channels(&self, contact_id: &str) -> Vec<herald_store::Channel> {
        let mut channels: Vec<_> = self
            .store
            .opt_outs(contact_id.into())
            .await
            .expect("store.opt_outs")
            .into_iter()
            .map(|o| o.channel)
            .collect();
        channels.sort_by_key(|c| c.as_str());
        channels
    }
}
