//! Results: one object per scenario, the targets, the printed table and the machine.

use crate::arrival::Arrival;
use crate::herald::BackendKind;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// `A` … `G`; `F.pre`, `F.A`, `F.C` for the growth run.
    pub scenario: String,
    pub title: String,
    pub backend: String,
    /// The headline figure and its unit.
    pub value: f64,
    pub unit: String,
    /// Requests answered 202, and the others.
    pub requests_ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Events accepted.
    pub events: u64,
    /// Time the headline figure is measured over.
    pub duration_s: f64,
    /// HTTP response times (A, B, C, E), or post-to-SMTP latency (D).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// `value` divided by the same figure of `ratio_of` (A of E, F.A of A, F.C of C).
    pub ratio: Option<f64>,
    pub ratio_of: Option<String>,
    /// VmHWM of the herald process at the end of the scenario (a fresh process per scenario).
    pub peak_rss_mb: Option<f64>,
    /// CPU time over wall time: how many of the 2 cores each process used.
    pub herald_cpu_cores: Option<f64>,
    pub bench_cpu_cores: Option<f64>,
    /// Cores used by other processes on the machine meanwhile (the machine is shared).
    pub other_cpu_cores: Option<f64>,
    /// Delivery check: every event's email arrived exactly once.
    pub check: Option<Check>,
    pub target: String,
    pub met: Option<bool>,
    pub notes: Vec<String>,
}

impl ScenarioResult {
    pub fn new(scenario: &str, title: &str, backend: BackendKind, unit: &str) -> Self {
        Self {
            scenario: scenario.into(),
            title: title.into(),
            backend: backend.name().into(),
            value: 0.0,
            unit: unit.into(),
            requests_ok: 0,
            errors: 0,
            first_error: None,
            events: 0,
            duration_s: 0.0,
            p50_ms: None,
            p99_ms: None,
            max_ms: None,
            ratio: None,
            ratio_of: None,
            peak_rss_mb: None,
            herald_cpu_cores: None,
            bench_cpu_cores: None,
            other_cpu_cores: None,
            check: None,
            target: String::new(),
            met: None,
            notes: Vec::new(),
        }
    }
}

/// What arrived at the SMTP sink for the events `{prefix}-0 .. {prefix}-{expected-1}`.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub expected: u64,
    /// Messages carrying one of the expected event ids.
    pub arrived: u64,
    pub distinct_events: u64,
    /// Messages beyond the first for an event, or repeating a Message-ID.
    pub duplicates: u64,
    pub missing: u64,
    /// Messages whose subject carries no expected event id.
    pub unexpected: u64,
    /// Messages whose text and HTML parts both carry the event id and a login link.
    pub bodies_rendered: u64,
    pub exactly_once: bool,
}

impl Check {
    pub fn of(arrivals: &[Arrival], prefix: &str, expected: u64) -> Self {
        let mut per_event: HashMap<u64, u64> = HashMap::new();
        let mut message_ids = HashSet::new();
        let (mut arrived, mut unexpected, mut repeated_ids, mut bodies) = (0, 0, 0, 0);
        let want = format!("{prefix}-");
        for a in arrivals {
            let index = a
                .event_id
                .as_deref()
                .and_then(|e| e.strip_prefix(&want))
                .and_then(|i| i.parse::<u64>().ok());
            match index {
                Some(i) if i < expected => {
                    arrived += 1;
                    *per_event.entry(i).or_default() += 1;
                    if !message_ids.insert(a.message_id.clone()) {
                        repeated_ids += 1;
                    }
                    if a.body_mentions >= 2 && a.login_links >= 2 {
                        bodies += 1;
                    }
                }
                _ => unexpected += 1,
            }
        }
        let distinct = per_event.len() as u64;
        let duplicates = (arrived - distinct).max(repeated_ids);
        let missing = expected - distinct;
        Self {
            expected,
            arrived,
            distinct_events: distinct,
            duplicates,
            missing,
            unexpected,
            bodies_rendered: bodies,
            exactly_once: missing == 0 && duplicates == 0 && bodies == arrived,
        }
    }

    fn summary(&self) -> String {
        if self.exactly_once {
            format!("{} of {} exactly once", self.distinct_events, self.expected)
        } else {
            format!(
                "NOT exactly once: {} missing, {} duplicates, {} of {} bodies rendered, {} unexpected",
                self.missing, self.duplicates, self.bodies_rendered, self.arrived, self.unexpected
            )
        }
    }
}

/// The benchmark targets for this machine.
pub fn fill_targets(results: &mut [ScenarioResult], backend: BackendKind) {
    let sqlite = backend == BackendKind::Sqlite;
    for r in results.iter_mut() {
        let delivered = r.check.as_ref().is_none_or(|c| c.exactly_once) && r.errors == 0;
        let (target, met) = match r.scenario.as_str() {
            "A" if sqlite => (
                "≥ 10,000 /s and ≥ 40% of E".to_owned(),
                Some(r.value >= 10_000.0 && r.ratio.is_some_and(|x| x >= 0.4)),
            ),
            "A" => ("≥ 5,000 /s".to_owned(), Some(r.value >= 5_000.0)),
            "B" => {
                let t = if sqlite { 50_000.0 } else { 25_000.0 };
                (format!("≥ {} events/s", thousands(t)), Some(r.value >= t))
            }
            "C" => {
                let t = if sqlite { 3_000.0 } else { 2_000.0 };
                (
                    format!("≥ {} emails/s, exactly once", thousands(t)),
                    Some(r.value >= t && delivered),
                )
            }
            "D" => {
                let t = if sqlite { 50.0 } else { 100.0 };
                (
                    format!("p99 ≤ {t:.0} ms"),
                    Some(r.p99_ms.is_some_and(|p| p <= t) && delivered),
                )
            }
            "F.A" | "F.C" => (
                "≥ 0.8 of the empty run".to_owned(),
                r.ratio.map(|x| x >= 0.8 && delivered),
            ),
            "G" => ("≤ 150 MB".to_owned(), Some(r.value <= 150.0)),
            _ => (String::new(), None),
        };
        r.target = target;
        r.met = met;
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.digits$}"))
}

fn figure(r: &ScenarioResult) -> String {
    match r.unit.as_str() {
        "ms p99" => format!("p99 {} ms", opt(Some(r.value), 1)),
        "MB" => format!("{:.0} MB", r.value),
        unit => format!("{} {unit}", thousands(r.value)),
    }
}

/// One line per scenario, as it finishes.
pub fn line(r: &ScenarioResult) -> String {
    let mut s = format!("{:<5} {:<58} {}", r.scenario, r.title, figure(r));
    if r.p50_ms.is_some() {
        s += &format!(
            "  p50 {} / p99 {} / max {} ms",
            opt(r.p50_ms, 2),
            opt(r.p99_ms, 2),
            opt(r.max_ms, 1)
        );
    }
    if let (Some(x), Some(of)) = (r.ratio, &r.ratio_of) {
        s += &format!("  = {x:.2} × {of}");
    }
    if let Some(m) = r.peak_rss_mb {
        s += &format!("  RSS {m:.0} MB");
    }
    if let Some(c) = r.herald_cpu_cores {
        s += &format!("  herald CPU {c:.2}");
    }
    if let Some(c) = r.bench_cpu_cores {
        s += &format!("  bench CPU {c:.2}");
    }
    if let Some(c) = r.other_cpu_cores {
        s += &format!("  other CPU {c:.2}");
    }
    if r.errors > 0 {
        s += &format!(
            "\n      {} errors, first: {}",
            r.errors,
            r.first_error.as_deref().unwrap_or("?")
        );
    }
    if let Some(c) = &r.check {
        s += &format!("\n      delivery: {}", c.summary());
    }
    for n in &r.notes {
        s += &format!("\n      {n}");
    }
    s
}

/// The final table (Markdown, so it can go into BENCHMARKS.md as printed).
pub fn print_table(results: &[ScenarioResult], backend: BackendKind) {
    println!(
        "| scenario ({}) | figure | p50 / p99 / max ms | ratio | herald peak RSS | CPU cores: herald / bench / other | target | met |",
        backend.name()
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in results {
        let lat = if r.p50_ms.is_some() {
            format!(
                "{} / {} / {}",
                opt(r.p50_ms, 2),
                opt(r.p99_ms, 2),
                opt(r.max_ms, 1)
            )
        } else {
            "-".into()
        };
        let ratio = match (r.ratio, &r.ratio_of) {
            (Some(x), Some(of)) => format!("{x:.2} × {of}"),
            _ => "-".into(),
        };
        let mut fig = figure(r);
        if let Some(c) = &r.check {
            fig += if c.exactly_once {
                " (each exactly once)"
            } else {
                " (DELIVERY CHECK FAILED)"
            };
        }
        if r.errors > 0 {
            fig += &format!(" ({} errors)", r.errors);
        }
        let cpu = match (r.herald_cpu_cores, r.bench_cpu_cores, r.other_cpu_cores) {
            (None, None, None) => "-".into(),
            (h, b, o) => format!("{} / {} / {}", opt(h, 2), opt(b, 2), opt(o, 2)),
        };
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "| {} {} | {fig} | {lat} | {ratio} | {} | {cpu} | {} | {met} |",
            r.scenario,
            r.title,
            r.peak_rss_mb.map_or("-".into(), |m| format!("{m:.0} MB")),
            if r.target.is_empty() { "-" } else { &r.target },
        );
    }
}

/// `2 cores, AMD EPYC` from /proc.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {cpu}")
}

/// When a file was last modified, for the report.
pub fn modified(path: &Path) -> String {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map(|t| {
            chrono::DateTime::<chrono::Utc>::from(t)
                .format("built %Y-%m-%d %H:%M UTC")
                .to_string()
        })
        .unwrap_or_else(|_| "unknown build time".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn arrival(event: &str, mid: &str) -> Arrival {
        Arrival {
            at: Instant::now(),
            message_id: mid.into(),
            event_id: Some(event.into()),
            body_mentions: 2,
            login_links: 2,
            data_phase: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn exactly_once_check() {
        let ok = [arrival("c-0", "<1>"), arrival("c-1", "<2>")];
        assert!(Check::of(&ok, "c", 2).exactly_once);
        let dup = [
            arrival("c-0", "<1>"),
            arrival("c-0", "<1>"),
            arrival("c-1", "<2>"),
        ];
        let c = Check::of(&dup, "c", 2);
        assert_eq!((c.duplicates, c.missing, c.exactly_once), (1, 0, false));
        let missing = [arrival("c-0", "<1>"), arrival("x-1", "<2>")];
        let c = Check::of(&missing, "c", 2);
        assert_eq!((c.missing, c.unexpected, c.exactly_once), (1, 1, false));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}
