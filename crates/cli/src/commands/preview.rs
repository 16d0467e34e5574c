//! `herald preview WORKFLOW --event FILE [--diagram]`: render every send step for an event (and,
//! asked, draw the workflow as a Mermaid flowchart); send nothing.

use crate::config::Config;
use anyhow::{Context, Result, bail};
use herald_core::event::{BodyKind, parse_body};
use herald_core::workflow::{self, Instr};
use herald_engine::registry::{Sources, read_bundles};
use std::path::Path;
use std::process::ExitCode;

pub fn preview(config: &Config, id: &str, event_file: &Path, diagram: bool) -> Result<ExitCode> {
    let sources = Sources {
        workflows: config.workflows.clone(),
        templates: config.templates.clone(),
    };
    let bundle = read_bundles(&sources)?
        .into_iter()
        .find(|b| b.id == id)
        .with_context(|| format!("no workflow {id:?} in {}", config.workflows.display()))?;
    let custom_names: Vec<String> = config.custom_values.keys().cloned().collect();
    let wf = match workflow::compile(bundle, &custom_names) {
        Ok((wf, _)) => wf,
        Err(diagnostics) => {
            for d in diagnostics {
                eprintln!("{d}");
            }
            bail!("workflow {id} does not check");
        }
    };
    if diagram {
        println!(
            "── {id} as a Mermaid flowchart\n```mermaid\n{}```\n",
            wf.mermaid()
        );
    }
    let body = std::fs::read(event_file)
        .with_context(|| format!("cannot read {}", event_file.display()))?;
    let event = parse_body(BodyKind::Single, &body, chrono::Utc::now())
        .map_err(|e| anyhow::anyhow!("{}: {e}", event_file.display()))?
        .remove(0);
    if !wf.triggered_by(&event) {
        println!(
            "note: this event would not trigger {id} (trigger or `where` does not match, or the workflow is a draft)"
        );
    }
    let context = event.template_context();
    let mut custom = config.custom_values.clone();
    custom.insert(
        "login_url".into(),
        format!("{}/l/PREVIEW-TOKEN", config.public_url()),
    );
    custom.insert(
        "unsubscribe_url".into(),
        format!("{}/u/PREVIEW-TOKEN", config.public_url()),
    );
    for (pc, instr) in wf.program.iter().enumerate() {
        match instr {
            Instr::SendEmail { step_id, from, .. } => {
                let email = wf.render_email(pc, &context, &custom)?;
                println!("── step {step_id}: send_email");
                println!("From: {}", from.as_deref().unwrap_or(&config.email_from));
                println!("Subject: {}", email.subject);
                if let Some(text) = email.text {
                    println!("\n[text]\n{text}");
                }
                if let Some(html) = email.html {
                    println!("\n[html]\n{html}");
                }
                println!();
            }
            Instr::SendSms { step_id, .. } => {
                println!(
                    "── step {step_id}: send_sms\n{}\n",
                    wf.render_sms(pc, &context, &custom)?
                );
            }
            _ => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}
