//! What herald asks of the kernel for its memory.

#[cfg(target_os = "linux")]
use crate::harness::*;
#[cfg(target_os = "linux")]
use herald_test_support::smtp::SmtpSink;

/// herald turns transparent huge pages off for itself, so that on a host whose THP setting is
/// `always` its allocator's arenas are not backed by 2 MiB pages that count whole in its RSS.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_runs_without_transparent_huge_pages() {
    // A kernel without THP reports 0 for every process, which would prove nothing.
    if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
        eprintln!("SKIPPED: this kernel has no transparent huge pages to turn off");
        return;
    }
    let Some(site) = Site::new(false, &[]).await else {
        return;
    };
    let sink = SmtpSink::start().await;
    let herald = Herald::start(&site, 0, Role::Serve, &sink.url(), "5s").await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", herald.pid())).unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .expect("Linux reports THP_enabled in /proc/PID/status");
    assert_eq!(thp.trim(), "0", "herald's THP_enabled");
}
