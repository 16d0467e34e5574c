//! The `herald` binary: parses the command line and configuration, then hands off to a command.

mod cli;
mod commands;
mod config;

use clap::Parser;

/// mimalloc rather than glibc's malloc: allocation was a sixth of herald's CPU under load (see
/// BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before the runtime's threads and their heaps exist: the flag covers later faults only.
    no_transparent_huge_pages();
    let args = cli::Cli::parse();
    config::init_tracing();
    // reqwest is built without a default TLS provider; pick ring once for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(commands::run(args)));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Asks the kernel not to back herald's memory with transparent huge pages. Where THP is
/// `always`, the allocator's arenas would get 2 MiB pages that count whole in RSS however little
/// of them is used (BENCHMARKS.md measured tens of MB); mimalloc's `no_thp` feature only stops it
/// asking for them itself. Best effort: a kernel without the flag changes nothing.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
