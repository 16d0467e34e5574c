//! `herald check`: every workflow and template, with file, line and column for each problem.

use crate::config::Config;
use anyhow::Result;
use herald_core::workflow::Severity;
use herald_engine::registry::{Sources, compile_all, read_bundles};
use std::process::ExitCode;

pub fn check(config: &Config) -> Result<ExitCode> {
    let sources = Sources {
        workflows: config.workflows.clone(),
        templates: config.templates.clone(),
    };
    let bundles = read_bundles(&sources)?;
    let count = bundles.len();
    let custom: Vec<String> = config.custom_values.keys().cloned().collect();
    match compile_all(bundles, &custom) {
        Ok((workflows, warnings)) => {
            for w in &warnings {
                println!("{w}");
            }
            for wf in &workflows {
                let state = if wf.enabled { "enabled" } else { "draft" };
                println!(
                    "ok  {} ({}, version {}, {} steps)",
                    wf.id,
                    state,
                    wf.version,
                    wf.program.len()
                );
            }
            println!("{count} workflow(s) checked, {} warning(s)", warnings.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(diagnostics) => {
            for d in &diagnostics {
                eprintln!("{d}");
            }
            let errors = diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .count();
            eprintln!("{errors} error(s) in {count} workflow(s)");
            Ok(ExitCode::FAILURE)
        }
    }
}
