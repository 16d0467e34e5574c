//! `herald-bench`: starts the real `herald` release binary on a fresh database with a loopback
//! SMTP sink, drives it with signed events and reports the benchmark scenarios (see
//! BENCHMARKS.md): A single-event ingest, B batched ingest, C end to end, D latency at a fixed
//! rate, E the bare-HTTP ceiling, F growth after many stored events, G peak memory.
//!
//! ```sh
//! cargo run --release -p herald-bench -- --backend sqlite --out bench.json
//! ```
//!
//! Without `--herald-bin` it first runs `cargo build --release -p herald` in this workspace, so
//! it never measures a stale binary.

mod arrival;
mod ceiling;
mod herald;
mod load;
mod report;

use anyhow::{Context, Result, bail};
use arrival::Arrival;
use clap::Parser;
use herald::{BackendKind, Database, Herald, Sources, StartSpec};
use herald_core::signature::WebhookSecret;
use herald_test_support::smtp::SmtpSink;
use load::{Client, Outcome, Post};
use report::{Check, ScenarioResult};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "herald-bench",
    about = "Benchmarks the herald release binary (see BENCHMARKS.md)"
)]
struct Args {
    /// Database backend of the herald under test.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BackendKind,
    /// Where to write the JSON results (an array, one object per scenario).
    #[arg(long, default_value = "bench.json")]
    out: PathBuf,
    /// A short smoke run (seconds instead of minutes; small counts).
    #[arg(long)]
    quick: bool,
    /// The herald binary; default: target/release/herald of this workspace, built (or brought
    /// up to date) by `cargo build --release -p herald` first.
    #[arg(long)]
    herald_bin: Option<PathBuf>,
    /// PostgreSQL server (a fresh database is created on it per scenario and dropped after).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pg_url: String,
    /// Requests in flight for scenarios A, C and E.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Event type posted in A and B: `offer` (each starts a run that sends an email, the
    /// default) or `lesson` (stored and projected, starts nothing: ingest without the engine's
    /// delivery work, for diagnosis).
    #[arg(long, value_enum, default_value = "offer")]
    ingest_events: IngestEvents,
    /// Batches of 100 in flight for scenario B.
    #[arg(long, default_value_t = 16)]
    batch_concurrency: usize,
    /// Posts per second in scenario D, whose latency target is stated at the default, 500; a
    /// higher rate shows whether the engine keeps pace with a steady stream.
    #[arg(long, default_value_t = 500.0)]
    d_rate: f64,
    /// Events stored before scenario F (default 1,000,000; 20,000 with --quick).
    #[arg(long)]
    preload: Option<u64>,
    /// A command to attach to each herald process once it is healthy, stopped with SIGINT when
    /// the scenario ends; `{pid}` and `{label}` (the scenario) are replaced. E.g.
    /// `perf record -e cpu-clock -g -p {pid} -o /tmp/herald-{label}.perf`.
    #[arg(long)]
    attach: Option<String>,
    /// `HERALD_LOG` of the herald under test; its log is kept (and its path printed) when this
    /// is not `warn`.
    #[arg(long, default_value = "warn")]
    herald_log: String,
    /// herald processes sharing the database in scenario C (PostgreSQL only), posts spread
    /// over them in turn, as behind a load balancer.
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Run only these scenarios (comma-separated letters, e.g. `E,A,C`).
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum IngestEvents {
    Offer,
    Lesson,
}

/// An event of the chosen kind with its own id and contact.
fn ingest_event(kind: IngestEvents, id: &str, time: &str) -> String {
    match kind {
        IngestEvents::Offer => load::offer_event(id, &format!("c-{id}"), time),
        IngestEvents::Lesson => load::lesson_event(id, &format!("c-{id}"), time),
    }
}

/// How long and how much each scenario runs.
struct Plan {
    /// Length of the closed-loop ingest runs (A, B, E, F.A).
    burst: Duration,
    /// Events posted in C and F.C.
    c_events: u64,
    /// Scenario D: rate and length.
    d_rate: f64,
    d_secs: f64,
    preload: u64,
    /// Longest wait for emails to arrive after the last post.
    drain_timeout: Duration,
    /// Longest time the preload of F may take (ingest + dispatch catch-up).
    preload_timeout: Duration,
}

impl Plan {
    fn new(args: &Args) -> Self {
        if args.quick {
            Plan {
                burst: Duration::from_millis(1_500),
                c_events: 2_000,
                d_rate: args.d_rate,
                d_secs: 2.0,
                preload: args.preload.unwrap_or(20_000),
                drain_timeout: Duration::from_secs(60),
                preload_timeout: Duration::from_secs(120),
            }
        } else {
            Plan {
                burst: Duration::from_secs(5),
                c_events: 20_000,
                d_rate: args.d_rate,
                d_secs: 10.0,
                preload: args.preload.unwrap_or(1_000_000),
                drain_timeout: Duration::from_secs(120),
                preload_timeout: Duration::from_secs(170),
            }
        }
    }
}

struct Bench {
    args: Args,
    plan: Plan,
    binary: PathBuf,
    sources: Sources,
    sink: SmtpSink,
    secret: WebhookSecret,
    /// Event time of every posted event.
    time: String,
    results: Vec<ScenarioResult>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // reqwest is built with `rustls-no-provider`: pick ring before any client exists.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("herald-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode> {
    let started = Instant::now();
    let binary = match &args.herald_bin {
        Some(b) => b.clone(),
        None => build_release_herald()?,
    };
    if !binary.exists() {
        bail!("{} does not exist", binary.display());
    }
    let mut key = vec![0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
    let secret = WebhookSecret::from_bytes(key)?;
    if args.processes == 0 || (args.processes > 1 && args.backend != BackendKind::Postgres) {
        bail!("--processes takes 1, or more on PostgreSQL (SQLite is one process's database)");
    }
    let plan = Plan::new(&args);
    let sink = SmtpSink::start().await;
    let machine = report::machine();
    println!("herald-bench: {} on {machine}", args.backend.name());
    println!(
        "herald binary: {} ({})",
        binary.display(),
        report::modified(&binary)
    );
    println!(
        "SMTP sink on 127.0.0.1:{}; {} run\n",
        sink.port(),
        if args.quick { "quick" } else { "full" }
    );
    let mut bench = Bench {
        plan,
        binary,
        sources: Sources::write()?,
        sink,
        secret,
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        results: Vec::new(),
        args,
    };
    let wanted = |s: &str| bench_wants(&bench.args, s);
    let (we, wa, wb, wc, wd, wf) = (
        wanted("E"),
        wanted("A"),
        wanted("B"),
        wanted("C"),
        wanted("D"),
        wanted("F"),
    );
    if we {
        let r = bench.scenario_e().await?;
        bench.push(r);
    }
    if wa {
        let r = bench.scenario_a("A", "a", None).await?;
        bench.push(r);
    }
    if wb {
        let r = bench.scenario_b().await?;
        bench.push(r);
    }
    if wc {
        let r = bench.scenario_c("C", "c", None).await?;
        bench.push(r);
    }
    if wd {
        let r = bench.scenario_d().await?;
        bench.push(r);
    }
    if wf {
        bench.scenario_f().await?;
    }
    bench.finish_g();
    let total = started.elapsed();
    report::fill_targets(&mut bench.results, bench.args.backend);
    println!();
    report::print_table(&bench.results, bench.args.backend);
    println!(
        "\nwhole run: {:.0} s{}",
        total.as_secs_f64(),
        if total > Duration::from_secs(300) {
            " (over the 5-minute budget)"
        } else {
            ""
        }
    );
    let json = serde_json::to_string_pretty(&bench.results)?;
    std::fs::write(&bench.args.out, json + "\n")
        .with_context(|| format!("write {}", bench.args.out.display()))?;
    println!("results written to {}", bench.args.out.display());
    Ok(ExitCode::SUCCESS)
}

fn bench_wants(args: &Args, scenario: &str) -> bool {
    args.only
        .as_ref()
        .is_none_or(|list| list.iter().any(|s| s.trim().eq_ignore_ascii_case(scenario)))
}

/// `target/release/herald` of the workspace this crate lives in (or of `CARGO_TARGET_DIR`).
/// Builds this workspace's release `herald` (quick when it is current) and returns its path.
fn build_release_herald() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", "herald"])
        .current_dir(&workspace)
        .status()
        .context("could not run cargo to build the herald release binary")?;
    if !status.success() {
        bail!("`cargo build --release -p herald` failed ({status})");
    }
    Ok(default_binary())
}

fn default_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("release/herald")
}

/// How long herald's SMTP client took from the sink's `354` to the final `.`, per message.
fn data_phase_note(arrivals: &[Arrival]) -> String {
    let mut d: Vec<u64> = arrivals
        .iter()
        .map(|a| a.data_phase.as_micros() as u64)
        .collect();
    d.sort_unstable();
    format!(
        "SMTP content phase (sink's 354 to the final dot) p50 {:.2} ms, p99 {:.2} ms",
        ms(load::quantile(&d, 0.5)).unwrap_or(f64::NAN),
        ms(load::quantile(&d, 0.99)).unwrap_or(f64::NAN)
    )
}

/// When the slowest 1 % of D's events were posted, as a count per second of the run: whether
/// the tail is the start (connections opened, first plans) or spread over the run.
fn slowest_by_second(timed: &[(u64, Instant)], start: Instant) -> String {
    let mut by_latency: Vec<&(u64, Instant)> = timed.iter().collect();
    by_latency.sort_unstable_by_key(|(latency, _)| std::cmp::Reverse(*latency));
    let slowest = &by_latency[..timed.len().div_ceil(100)];
    let mut per_second = std::collections::BTreeMap::new();
    for (_, sent) in slowest {
        *per_second
            .entry(sent.saturating_duration_since(start).as_secs())
            .or_insert(0) += 1;
    }
    let counts: Vec<String> = per_second
        .iter()
        .map(|(second, n)| format!("{second}s: {n}"))
        .collect();
    format!(
        "the slowest 1 % ({}) by second of posting: {}",
        slowest.len(),
        counts.join(", ")
    )
}

/// The herald processes of one scenario on one database: posts go to each in turn.
struct Fleet {
    first: Herald,
    others: Vec<Herald>,
}

impl Fleet {
    fn all(&self) -> impl Iterator<Item = &Herald> {
        std::iter::once(&self.first).chain(&self.others)
    }

    fn client(&self, secret: &WebhookSecret, connections: usize) -> Result<Arc<Client>> {
        let urls = self.all().map(Herald::events_url).collect();
        Ok(Arc::new(Client::spread(urls, secret.clone(), connections)?))
    }

    /// CPU seconds of every process since the last mark.
    fn cpu_since_mark(&mut self) -> f64 {
        self.first.cpu_since_mark()
            + self
                .others
                .iter_mut()
                .map(Herald::cpu_since_mark)
                .sum::<f64>()
    }

    /// The largest peak memory of the processes.
    fn peak_rss(&self) -> Option<u64> {
        self.all().filter_map(Herald::peak_rss).max()
    }

    fn note(&self, r: &mut ScenarioResult) {
        if !self.others.is_empty() {
            r.notes.push(format!(
                "{} herald processes on one database, posts spread over them in turn (CPU summed, memory the largest)",
                self.others.len() + 1
            ));
        }
    }
}

/// CPU time used so far by the bench process and by the whole machine.
struct CpuMark {
    bench: f64,
    machine: f64,
}

impl CpuMark {
    fn now() -> Self {
        Self {
            bench: herald::proc_cpu_seconds(std::process::id()).unwrap_or(0.0),
            machine: machine_busy_seconds(),
        }
    }

    /// Fills the bench's cores and those used by everything else on the machine (neither herald
    /// nor the bench: other work sharing the 2 cores) over `wall` seconds.
    fn finish(&self, r: &mut ScenarioResult, wall: f64) {
        let bench = herald::proc_cpu_seconds(std::process::id()).unwrap_or(self.bench) - self.bench;
        let machine = machine_busy_seconds() - self.machine;
        r.bench_cpu_cores = Some(bench / wall);
        let herald = r.herald_cpu_cores.unwrap_or(0.0) * wall;
        r.other_cpu_cores = Some(((machine - bench - herald) / wall).max(0.0));
    }
}

/// Busy CPU time of the whole machine (all of /proc/stat's `cpu` line but idle and iowait).
fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: f64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0);
    (total - idle) / 100.0
}

fn mb(bytes: Option<u64>) -> Option<f64> {
    bytes.map(|b| b as f64 / (1024.0 * 1024.0))
}

fn ms(us: Option<u64>) -> Option<f64> {
    us.map(|u| u as f64 / 1000.0)
}

impl Bench {
    fn push(&mut self, r: ScenarioResult) {
        println!("{}", report::line(&r));
        self.results.push(r);
    }

    fn client(&self, url: String, connections: usize) -> Result<Arc<Client>> {
        Ok(Arc::new(Client::new(
            url,
            self.secret.clone(),
            connections,
        )?))
    }

    /// Request `i` is one offer grant `{prefix}-{i}` of its own contact.
    fn single_maker(&self, prefix: &str) -> Arc<dyn Fn(u64) -> Post + Send + Sync> {
        self.single_maker_of(prefix, IngestEvents::Offer)
    }

    fn single_maker_of(
        &self,
        prefix: &str,
        kind: IngestEvents,
    ) -> Arc<dyn Fn(u64) -> Post + Send + Sync> {
        let (prefix, time) = (prefix.to_owned(), self.time.clone());
        Arc::new(move |i| {
            let id = format!("{prefix}-{i}");
            let body = ingest_event(kind, &id, &time);
            Post {
                webhook_id: format!("msg_{id}"),
                content_type: load::SINGLE,
                body,
            }
        })
    }

    /// What the bench reads from each message the sink accepted since the scenario started.
    fn arrivals(&self) -> Vec<Arrival> {
        self.sink.received().iter().map(Arrival::of).collect()
    }

    async fn start_herald(&self, db: &Database, label: &str) -> Result<Herald> {
        let h = Herald::start(StartSpec {
            binary: &self.binary,
            database_url: &db.url,
            sources: &self.sources,
            smtp_port: self.sink.port(),
            webhook_secret: &self.secret.to_whsec(),
            attach: self.args.attach.as_deref(),
            label,
            log_filter: &self.args.herald_log,
        })
        .await?;
        self.sink.take();
        Ok(h)
    }

    /// `--processes` herald processes on `db` for a scenario that runs on its own database
    /// (`spread`), else one.
    async fn start_fleet(&self, db: &Database, id: &str, spread: bool) -> Result<Fleet> {
        let n = if spread { self.args.processes } else { 1 };
        let mut others = Vec::new();
        for p in 1..n {
            others.push(self.start_herald(db, &format!("{id}{p}")).await?);
        }
        let first = self.start_herald(db, id).await?;
        Ok(Fleet { first, others })
    }

    async fn stop_fleet(&self, fleet: Fleet, r: &mut ScenarioResult) -> Result<()> {
        for other in fleet.others {
            let problems = other.log_problems();
            if let Some(first) = problems.first() {
                r.notes.push(format!(
                    "another process logged {} warnings/errors, first: {first}",
                    problems.len()
                ));
            }
            other.stop(Duration::from_secs(10)).await?;
        }
        self.stop_herald(fleet.first, r).await
    }

    /// Reads what the scenario left in herald's log, stops it and forgets the sink's arrivals.
    async fn stop_herald(&self, h: Herald, r: &mut ScenarioResult) -> Result<()> {
        let problems = h.log_problems();
        if !problems.is_empty() {
            r.notes.push(format!(
                "herald logged {} warnings/errors, first: {}",
                problems.len(),
                problems[0]
            ));
        }
        h.stop(Duration::from_secs(10)).await?;
        self.sink.take();
        Ok(())
    }

    fn record_load(r: &mut ScenarioResult, out: &mut Outcome, per_request: u64) {
        out.latencies_us.sort_unstable();
        r.requests_ok = out.ok;
        r.errors = out.errors;
        r.first_error = out.first_error.clone();
        r.events = out.ok * per_request;
        r.duration_s = out.elapsed.as_secs_f64();
        r.p50_ms = ms(load::quantile(&out.latencies_us, 0.50));
        r.p99_ms = ms(load::quantile(&out.latencies_us, 0.99));
        r.max_ms = ms(out.latencies_us.last().copied());
    }

    async fn scenario_e(&mut self) -> Result<ScenarioResult> {
        let ceiling = ceiling::Ceiling::start().await?;
        let client = self.client(ceiling.url.clone(), self.args.concurrency)?;
        let cpu0 = CpuMark::now();
        let mut out = load::closed_loop(
            client,
            self.args.concurrency,
            u64::MAX,
            self.plan.burst,
            self.single_maker("e"),
        )
        .await;
        let mut r = ScenarioResult::new(
            "E",
            "ceiling: bare axum 202, same load generator",
            self.args.backend,
            "posts/s",
        );
        Self::record_load(&mut r, &mut out, 1);
        r.value = out.rate(1);
        cpu0.finish(&mut r, out.elapsed.as_secs_f64().max(1e-9));
        r.notes.push(format!(
            "{} requests in flight; server and load generator share the bench process",
            self.args.concurrency
        ));
        let _ = tokio::time::timeout(Duration::from_secs(5), ceiling.stop()).await;
        Ok(r)
    }

    /// Single-event posts at saturation for `plan.burst` on a fresh herald (A), or on the
    /// database `on` (F.A), which is left with its emails drained.
    async fn scenario_a(
        &mut self,
        id: &str,
        prefix: &str,
        on: Option<&Database>,
    ) -> Result<ScenarioResult> {
        let fresh = match on {
            None => Some(Database::create(self.args.backend, &self.args.pg_url, prefix).await?),
            Some(_) => None,
        };
        let db = on.or(fresh.as_ref()).expect("a database");
        // F.A waits for its emails afterwards, so it always posts offer grants.
        let kind = if on.is_none() {
            self.args.ingest_events
        } else {
            IngestEvents::Offer
        };
        let mut h = self.start_fleet(db, id, on.is_none()).await?;
        let client = h.client(&self.secret, self.args.concurrency)?;
        h.cpu_since_mark();
        let cpu0 = CpuMark::now();
        let mut out = load::closed_loop(
            client,
            self.args.concurrency,
            u64::MAX,
            self.plan.burst,
            self.single_maker_of(prefix, kind),
        )
        .await;
        let wall = out.elapsed.as_secs_f64().max(1e-9);
        let mut r = ScenarioResult::new(
            id,
            "ingest: signed single-event posts at saturation",
            self.args.backend,
            "posts/s",
        );
        Self::record_load(&mut r, &mut out, 1);
        r.value = out.rate(1);
        r.herald_cpu_cores = Some(h.cpu_since_mark() / wall);
        cpu0.finish(&mut r, wall);
        r.peak_rss_mb = mb(h.peak_rss());
        h.note(&mut r);
        if kind == IngestEvents::Lesson {
            r.title = "ingest: single lesson_completed posts (start no run)".into();
            r.notes.push(format!(
                "{} in flight; --ingest-events lesson: the engine only projects them",
                self.args.concurrency
            ));
        } else {
            r.notes.push(format!(
                "{} in flight; the engine runs alongside: {} of the {} emails had reached the SMTP sink when posting stopped",
                self.args.concurrency,
                self.sink.count(),
                out.ok
            ));
        }
        if let Some(e) = self.results.iter().find(|x| x.scenario == "E") {
            r.ratio = Some(r.value / e.value);
            r.ratio_of = Some("E".into());
        }
        if on.is_some() {
            // Let the engine finish this burst's emails so that the next scenario starts idle.
            let began = Instant::now();
            let drained = self
                .sink
                .wait_for_count(
                    out.ok as usize,
                    self.plan.drain_timeout,
                    Duration::from_secs(30),
                )
                .await;
            r.notes.push(format!(
                "then {} of {} emails arrived {:.1} s after the last post{}",
                self.sink.count(),
                out.ok,
                began.elapsed().as_secs_f64(),
                if drained { "" } else { " (gave up waiting)" }
            ));
        }
        r.peak_rss_mb = mb(h.peak_rss()).or(r.peak_rss_mb);
        self.stop_fleet(h, &mut r).await?;
        if let Some(db) = fresh {
            db.drop_now().await?;
        }
        Ok(r)
    }

    async fn scenario_b(&mut self) -> Result<ScenarioResult> {
        let db = Database::create(self.args.backend, &self.args.pg_url, "b").await?;
        let mut h = self.start_herald(&db, "B").await?;
        let conc = self.args.batch_concurrency;
        let client = self.client(h.events_url(), conc)?;
        let time = self.time.clone();
        let kind = self.args.ingest_events;
        let make: Arc<dyn Fn(u64) -> Post + Send + Sync> = Arc::new(move |i| {
            let body = load::batch((0..100).map(|j| {
                let id = format!("b-{i}-{j}");
                ingest_event(kind, &id, &time)
            }));
            Post {
                webhook_id: format!("msg_b_{i}"),
                content_type: load::BATCH,
                body,
            }
        });
        h.cpu_since_mark();
        let cpu0 = CpuMark::now();
        let mut out = load::closed_loop(client, conc, u64::MAX, self.plan.burst, make).await;
        let wall = out.elapsed.as_secs_f64().max(1e-9);
        let mut r = ScenarioResult::new(
            "B",
            "ingest: batches of 100 events",
            self.args.backend,
            "events/s",
        );
        Self::record_load(&mut r, &mut out, 100);
        r.value = out.rate(100);
        r.herald_cpu_cores = Some(h.cpu_since_mark() / wall);
        cpu0.finish(&mut r, wall);
        r.peak_rss_mb = mb(h.peak_rss());
        r.notes.push(format!(
            "{conc} batches in flight; p50/p99 are per batch request"
        ));
        if kind == IngestEvents::Lesson {
            r.title = "ingest: batches of 100 lesson_completed (start no run)".into();
        }
        self.stop_herald(h, &mut r).await?;
        db.drop_now().await?;
        Ok(r)
    }

    /// `plan.c_events` single posts as fast as they are taken, then waits for every email: the
    /// rate is emails over the time from the first post to the last email; each event's email
    /// must arrive exactly once.
    async fn scenario_c(
        &mut self,
        id: &str,
        prefix: &str,
        on: Option<&Database>,
    ) -> Result<ScenarioResult> {
        let fresh = match on {
            None => Some(Database::create(self.args.backend, &self.args.pg_url, prefix).await?),
            Some(_) => None,
        };
        let db = on.or(fresh.as_ref()).expect("a database");
        let mut h = self.start_fleet(db, id, on.is_none()).await?;
        let n = self.plan.c_events;
        let client = h.client(&self.secret, self.args.concurrency)?;
        h.cpu_since_mark();
        let cpu0 = CpuMark::now();
        let start = Instant::now();
        let mut out = load::closed_loop(
            client,
            self.args.concurrency,
            n,
            self.plan.drain_timeout,
            self.single_maker(prefix),
        )
        .await;
        let posted = start.elapsed();
        let all = self
            .sink
            .wait_for_count(
                out.ok as usize,
                self.plan.drain_timeout,
                Duration::from_secs(30),
            )
            .await;
        // A short grace period in which a duplicate would show up.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let wall = start.elapsed().as_secs_f64();
        let arrivals = self.arrivals();
        let mut r = ScenarioResult::new(
            id,
            "end to end: emails/s, first post to last email",
            self.args.backend,
            "emails/s",
        );
        Self::record_load(&mut r, &mut out, 1);
        let check = Check::of(&arrivals, prefix, n);
        let last = arrivals
            .iter()
            .filter(|a| {
                a.event_id
                    .as_deref()
                    .is_some_and(|e| e.starts_with(&format!("{prefix}-")))
            })
            .map(|a| a.at)
            .max();
        let span = last
            .map(|l| l.saturating_duration_since(start))
            .unwrap_or(posted);
        r.duration_s = span.as_secs_f64();
        r.value = check.distinct_events as f64 / span.as_secs_f64().max(1e-9);
        r.herald_cpu_cores = Some(h.cpu_since_mark() / wall);
        cpu0.finish(&mut r, wall);
        r.peak_rss_mb = mb(h.peak_rss());
        h.note(&mut r);
        r.notes.push(format!(
            "{n} single posts, {} in flight, all posted after {:.2} s ({:.0} posts/s); herald opened {} SMTP connections for them",
            self.args.concurrency,
            posted.as_secs_f64(),
            out.ok as f64 / posted.as_secs_f64().max(1e-9),
            self.sink.connections()
        ));
        r.notes.push(data_phase_note(&arrivals));
        if !all {
            r.notes
                .push("gave up waiting for the remaining emails".into());
        }
        r.check = Some(check);
        self.stop_fleet(h, &mut r).await?;
        if let Some(db) = fresh {
            db.drop_now().await?;
        }
        Ok(r)
    }

    async fn scenario_d(&mut self) -> Result<ScenarioResult> {
        let db = Database::create(self.args.backend, &self.args.pg_url, "d").await?;
        let mut h = self.start_herald(&db, "D").await?;
        let count = (self.plan.d_rate * self.plan.d_secs).round() as u64;
        let client = self.client(h.events_url(), self.args.concurrency)?;
        h.cpu_since_mark();
        let cpu0 = CpuMark::now();
        let start = Instant::now();
        let out = load::open_loop(
            client,
            self.plan.d_rate,
            count,
            self.args.concurrency,
            self.single_maker("d"),
        )
        .await;
        let all = self
            .sink
            .wait_for_count(
                out.ok as usize,
                Duration::from_secs(60),
                Duration::from_secs(20),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let wall = start.elapsed().as_secs_f64();
        let arrivals = self.arrivals();
        // (latency, when the post was sent) of each event that arrived.
        let timed: Vec<(u64, Instant)> = arrivals
            .iter()
            .filter_map(|a| {
                let i: usize = a.event_id.as_deref()?.strip_prefix("d-")?.parse().ok()?;
                let sent = (*out.sent_at.get(i)?)?;
                Some((
                    a.at.saturating_duration_since(sent).as_micros() as u64,
                    sent,
                ))
            })
            .collect();
        let mut latencies: Vec<u64> = timed.iter().map(|(l, _)| *l).collect();
        latencies.sort_unstable();
        let mut http = out.latencies_us.clone();
        http.sort_unstable();
        let mut r = ScenarioResult::new(
            "D",
            &format!(
                "latency post -> SMTP arrival at {:.0} events/s",
                self.plan.d_rate
            ),
            self.args.backend,
            "ms p99",
        );
        r.requests_ok = out.ok;
        r.errors = out.errors;
        r.first_error = out.first_error.clone();
        r.events = out.ok;
        r.duration_s = out.elapsed.as_secs_f64();
        r.p50_ms = ms(load::quantile(&latencies, 0.50));
        r.p99_ms = ms(load::quantile(&latencies, 0.99));
        r.max_ms = ms(latencies.last().copied());
        r.value = r.p99_ms.unwrap_or(f64::NAN);
        r.herald_cpu_cores = Some(h.cpu_since_mark() / wall);
        cpu0.finish(&mut r, wall);
        r.peak_rss_mb = mb(h.peak_rss());
        r.notes.push(format!(
            "{count} posts over {:.1} s (open loop; {} could not start on time); HTTP answer p50 {:.2} ms, p99 {:.2} ms; \
             herald opened {} SMTP connections",
            out.elapsed.as_secs_f64(),
            out.late,
            ms(load::quantile(&http, 0.5)).unwrap_or(f64::NAN),
            ms(load::quantile(&http, 0.99)).unwrap_or(f64::NAN),
            self.sink.connections()
        ));
        r.notes.push(data_phase_note(&arrivals));
        r.notes.push(slowest_by_second(&timed, start));
        if !all {
            r.notes
                .push("gave up waiting for the remaining emails".into());
        }
        r.check = Some(Check::of(&arrivals, "d", count));
        self.stop_herald(h, &mut r).await?;
        db.drop_now().await?;
        Ok(r)
    }

    /// Fills a database with `plan.preload` events through the API (batches of 1,000
    /// `lesson_completed` events over 100,000 contacts; they start no run), waits until the
    /// dispatcher has caught up, then runs A and C again on it, each on a freshly started herald.
    async fn scenario_f(&mut self) -> Result<()> {
        let db = Database::create(self.args.backend, &self.args.pg_url, "f").await?;
        let mut h = self.start_herald(&db, "F.pre").await?;
        let preload = self.plan.preload;
        let batches = preload.div_ceil(1_000);
        let time = self.time.clone();
        let make: Arc<dyn Fn(u64) -> Post + Send + Sync> = Arc::new(move |i| {
            let body = load::batch((0..1_000).map(|j| {
                let n = i * 1_000 + j;
                load::lesson_event(&format!("p-{n}"), &format!("c-p-{}", n % 100_000), &time)
            }));
            Post {
                webhook_id: format!("msg_p_{i}"),
                content_type: load::BATCH,
                body,
            }
        });
        let conc = 4;
        let client = self.client(h.events_url(), conc)?;
        let start = Instant::now();
        h.cpu_since_mark();
        let out = load::closed_loop(
            client.clone(),
            conc,
            batches,
            self.plan.preload_timeout,
            make,
        )
        .await;
        let stored = out.ok * 1_000;
        let ingest_s = out.elapsed.as_secs_f64();
        // The dispatcher takes events in order: once the email of an event posted after the
        // preload arrives, every preloaded event has been dispatched.
        let sentinel = Post {
            webhook_id: "msg_f_sentinel".into(),
            content_type: load::SINGLE,
            body: load::offer_event("f-sentinel", "c-f-sentinel", &self.time),
        };
        let sentinel_ok = client.post(sentinel).await;
        let remaining = self
            .plan
            .preload_timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(30));
        let caught_up = sentinel_ok.is_ok()
            && self
                .sink
                .wait_until(remaining, remaining, |received| {
                    received
                        .iter()
                        .any(|m| Arrival::of(m).event_id.as_deref() == Some("f-sentinel"))
                })
                .await;
        let total_s = start.elapsed().as_secs_f64();
        let preload_cpu = h.cpu_since_mark();
        let preload_rss = h.peak_rss();
        let mut pre = ScenarioResult::new(
            "F.pre",
            "growth: preload through the API",
            self.args.backend,
            "events/s",
        );
        pre.requests_ok = out.ok;
        pre.errors = out.errors + u64::from(sentinel_ok.is_err());
        pre.first_error = out.first_error.clone().or(sentinel_ok.err());
        pre.events = stored;
        pre.duration_s = total_s;
        pre.value = stored as f64 / total_s.max(1e-9);
        pre.herald_cpu_cores = Some(preload_cpu / total_s.max(1e-9));
        pre.peak_rss_mb = mb(preload_rss);
        pre.notes.push(format!(
            "{stored} lesson_completed events in batches of 1,000 ({conc} in flight) stored in {ingest_s:.1} s ({:.0} events/s); \
             dispatcher caught up after {total_s:.1} s{}",
            stored as f64 / ingest_s.max(1e-9),
            if caught_up { "" } else { " (NOT caught up: gave up waiting)" }
        ));
        if stored < preload {
            pre.notes.push(format!(
                "only {stored} of the {preload} events were stored within the time bound"
            ));
        }
        if let Some(bytes) = db.sqlite_bytes() {
            pre.notes
                .push(format!("database file {:.0} MB", bytes as f64 / 1e6));
        }
        self.stop_herald(h, &mut pre).await?;
        self.push(pre);

        let mut fa = self.scenario_a("F.A", "fa", Some(&db)).await?;
        fa.title = format!("growth: A with {stored} events stored");
        fa.ratio = self
            .results
            .iter()
            .find(|x| x.scenario == "A")
            .map(|a| fa.value / a.value);
        fa.ratio_of = fa.ratio.map(|_| "A".into());
        self.push(fa);
        let mut fc = self.scenario_c("F.C", "fc", Some(&db)).await?;
        fc.title = format!("growth: C with {stored} events stored");
        fc.ratio = self
            .results
            .iter()
            .find(|x| x.scenario == "C")
            .map(|c| fc.value / c.value);
        fc.ratio_of = fc.ratio.map(|_| "C".into());
        self.push(fc);
        db.drop_now().await?;
        Ok(())
    }

    /// G: the largest peak resident memory of herald over the scenarios.
    fn finish_g(&mut self) {
        let peak = self
            .results
            .iter()
            .filter_map(|r| r.peak_rss_mb.map(|m| (m, r.scenario.clone())))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((m, during)) = peak {
            let mut g = ScenarioResult::new(
                "G",
                "peak RSS of the herald process (VmHWM)",
                self.args.backend,
                "MB",
            );
            g.value = m;
            g.peak_rss_mb = Some(m);
            let per: HashMap<&str, f64> = self
                .results
                .iter()
                .filter_map(|r| r.peak_rss_mb.map(|m| (r.scenario.as_str(), m)))
                .collect();
            let mut per: Vec<_> = per.into_iter().collect();
            per.sort_by(|a, b| a.0.cmp(b.0));
            g.notes.push(format!(
                "highest during {during}; per scenario: {}",
                per.iter()
                    .map(|(s, m)| format!("{s} {m:.0} MB"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            self.push(g);
        }
    }
}
