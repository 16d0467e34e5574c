//! The `herald` binary: parses the command line and configuration, then hands off to a command.

mod cli;
mod commands;
mod config;

use clap::Parser;

/// mimalloc rather than glibc's malloc: allocation was a sixth of herald's CPU under load (see
/// BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    config::init_tracing();
    // reqwest is built without a default TLS provider; pick ring once for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match commands::run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
