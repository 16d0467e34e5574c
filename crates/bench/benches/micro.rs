//! Criterion micro-benchmarks of the hot pieces of an event's path: signature verification,
//! event validation, template rendering and a job claim (SQLite, on the real disk).
//!
//! `cargo bench -p herald-bench` (add `-- signature` etc. to pick some).

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use herald_core::event::{BodyKind, parse_body};
use herald_core::signature::{SignedHeaders, WebhookSecret, verify};
use herald_core::template::CustomValues;
use herald_core::workflow::{Instr, bundle_from, compile};
use herald_store::{
    Channel, DispatchInput, DispatchPlan, DispatchRequest, MessageId, MessageStatus, NewEvent,
    NewMessage, RunId, RunState, RunWrite, StepRecord, Store, Timestamp,
};
use std::hint::black_box;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

const EXAMPLE: &str = include_str!("../../../examples/offer_access_granted.json");

const WORKFLOW: &str = r#"name: Bench welcome
enabled: true
trigger:
  event: offer_access_granted
from: "Ada at Rust School <ada@school.example.com>"
steps:
  - id: welcome
    send_email:
      subject: "Welcome to {{offer.title}}, {{default contact.first_name 'there'}}! [{{event.id}}]"
      template: bench
"#;
const TXT: &str = "Hi {{default contact.first_name \"there\"}},\n\nwelcome to {{offer.title}}! Your courses are ready.\n\nevent {{event.id}} of {{event.time}}\n";
const HTML: &str = "<!doctype html>\n<html><body><p>Hi {{default contact.first_name \"there\"}},</p>\n<p>welcome to <b>{{offer.title}}</b>! Your courses are ready.</p>\n<p>event {{event.id}} of {{event.time}}</p></body></html>\n";

fn example_event(id: &str, contact: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).expect("example event is JSON");
    v["id"] = id.into();
    v["data"]["contact"]["id"] = contact.into();
    v.to_string()
}

fn signature(c: &mut Criterion) {
    let secret = WebhookSecret::from_bytes(vec![7u8; 32]).expect("a 32-byte key");
    let body = example_event("evt_1", "c_1");
    let ts = 1_790_000_000;
    let sig = secret.sign("msg_1", ts, body.as_bytes());
    let ts_text = ts.to_string();
    let secrets = vec![secret];
    let mut g = c.benchmark_group("signature");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("verify", |b| {
        b.iter(|| {
            let headers = SignedHeaders {
                id: Some("msg_1"),
                timestamp: Some(&ts_text),
                signature: Some(&sig),
            };
            verify(black_box(&secrets), headers, black_box(body.as_bytes()), ts)
                .expect("valid signature")
        })
    });
    g.finish();
}

fn validation(c: &mut Criterion) {
    let now = chrono::Utc::now();
    let one = example_event("evt_1", "c_1");
    let batch = format!(
        "[{}]",
        (0..100)
            .map(|i| example_event(&format!("evt_{i}"), &format!("c_{i}")))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut g = c.benchmark_group("event");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_body/single", |b| {
        b.iter(|| {
            parse_body(BodyKind::Single, black_box(one.as_bytes()), now).expect("valid event")
        })
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("parse_body/batch_100", |b| {
        b.iter(|| {
            parse_body(BodyKind::Batch, black_box(batch.as_bytes()), now).expect("valid batch")
        })
    });
    g.finish();
}

fn rendering(c: &mut Criterion) {
    let load = |name: &str| match name {
        "bench.txt.hbs" => Some(TXT.to_owned()),
        "bench.html.hbs" => Some(HTML.to_owned()),
        _ => None,
    };
    let bundle = bundle_from("bench", "workflows/bench.yaml", WORKFLOW, &load);
    let (wf, _) = compile(bundle, &[]).expect("the bench workflow compiles");
    let pc = wf
        .program
        .iter()
        .position(|i| matches!(i, Instr::SendEmail { .. }))
        .expect("a send step");
    let body = example_event("evt_1", "c_1");
    let event = parse_body(BodyKind::Single, body.as_bytes(), chrono::Utc::now())
        .expect("valid")
        .remove(0);
    let ctx = event.template_context();
    let custom = CustomValues::new();
    let mut g = c.benchmark_group("template");
    g.throughput(Throughput::Elements(1));
    g.bench_function("render_email/subject+text+html", |b| {
        b.iter(|| {
            wf.render_email(pc, black_box(&ctx), &custom)
                .expect("renders")
        })
    });
    g.bench_function("template_context", |b| {
        b.iter(|| black_box(&event).template_context())
    });
    g.finish();
}

/// A fixed instant the seeded rows count from.
const T0: Timestamp = Timestamp::from_millis(1_790_000_000_000);

/// A SQLite store (temporary file on disk, WAL, synchronous=FULL as herald runs it) holding
/// `n` runs, each with one queued email.
async fn seeded_store(n: usize) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let url = format!("sqlite://{}", dir.path().join("claim.db").display());
    let store = Store::connect(&url).await.expect("open the store");
    let now = chrono::Utc::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let events = chunk
            .iter()
            .map(|i| {
                let body = example_event(&format!("seed-{i}"), &format!("c_{i}"));
                let event = parse_body(BodyKind::Single, body.as_bytes(), now)
                    .expect("valid")
                    .remove(0);
                NewEvent {
                    event,
                    received: T0,
                }
            })
            .collect();
        store.accept_events(events).await.expect("store events");
    }
    let planner = |input: &DispatchInput| {
        let mut plan = DispatchPlan::default();
        for (seq, event) in &input.events {
            let run_id = RunId::fresh();
            let message_id = MessageId::fresh();
            plan.new_runs.push(RunWrite {
                run_id,
                workflow_id: "bench".into(),
                workflow_version: "v1".into(),
                contact_id: event.contact_id().into(),
                event_seq: *seq,
                state: RunState::Completed,
                reason: None,
                pc: 1,
                wait_event: None,
                due: None,
                steps: vec![StepRecord {
                    step_id: "welcome".into(),
                    kind: "send_email".into(),
                    outcome: "queued".into(),
                    at_ms: T0,
                }],
                messages: vec![NewMessage {
                    header_message_id: format!("<{message_id}@bench>"),
                    id: message_id,
                    step_id: "welcome".into(),
                    pc: 0,
                    channel: Channel::Email,
                    recipient: Some("ann@example.com".into()),
                    status: MessageStatus::Queued,
                    reason: None,
                    due: Some(T0),
                }],
            });
        }
        plan
    };
    while store
        .dispatch(DispatchRequest::new(1_000, &|| T0, Duration::MAX, &planner))
        .await
        .expect("dispatch")
        > 0
    {}
    (store, dir)
}

fn claim(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (store, _dir) = rt.block_on(seeded_store(10_000));
    // Each claim happens later than the previous one's 1 ms lease, so the same queue (10,000
    // due messages) is claimed again and again: the cost of one claim transaction, fsync included.
    let clock = AtomicI64::new(T0.millis() + 10);
    let mut g = c.benchmark_group("store");
    g.sample_size(30).measurement_time(Duration::from_secs(8));
    for limit in [1_i64, 100] {
        g.throughput(Throughput::Elements(limit as u64));
        g.bench_function(format!("sqlite_claim_messages/{limit}_of_10000"), |b| {
            b.to_async(&rt).iter_batched(
                || Timestamp::from_millis(clock.fetch_add(10, Ordering::Relaxed)),
                |now| {
                    let store = store.clone();
                    async move {
                        let claimed = store
                            .claim_messages(now, limit, Duration::from_millis(1))
                            .await
                            .expect("claim");
                        assert_eq!(claimed.len(), limit as usize);
                        claimed
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, signature, validation, rendering, claim);
criterion_main!(benches);
