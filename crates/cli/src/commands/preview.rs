//! `herald preview WORKFLOW --event FILE [--diagram]`: the path this event takes through the
//! workflow (branches evaluated, each step's time in the contact's time zone, waits and send
//! windows applied, an awaited event assumed not to come), every send step rendered for the
//! event (those off the path marked so), and, asked, the workflow as a Mermaid flowchart with the
//! path marked. Conditions on the contact's state see what the event says (an offer it grants, a
//! lesson it completes) plus the facts given with `--assume`. Sends nothing.

use crate::config::Config;
use anyhow::{Context, Result, bail};
use herald_core::event::{BodyKind, parse_body};
use herald_core::workflow::{self, ContactState, Instr, StateFact, TimezoneChoice};
use herald_engine::registry::{Sources, read_bundles};
use herald_engine::runner;
use herald_store::{MessageStatus, Timestamp};
use std::path::Path;
use std::process::ExitCode;

pub fn preview(
    config: &Config,
    id: &str,
    event_file: &Path,
    diagram: bool,
    assume: &[String],
) -> Result<ExitCode> {
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
    let body = std::fs::read(event_file)
        .with_context(|| format!("cannot read {}", event_file.display()))?;
    let event = parse_body(BodyKind::Single, &body, chrono::Utc::now())
        .map_err(|e| anyhow::anyhow!("{}: {e}", event_file.display()))?
        .remove(0);
    let mut state = ContactState::default();
    state.apply(&event);
    for fact in assume {
        assume_fact(&mut state, fact)?;
    }
    if !wf.triggered_by(&event, &state) {
        println!(
            "note: this event would not trigger {id} (trigger or `where` does not match, or the workflow is a draft); the path below is what a run would do"
        );
    }
    let default_zone = config.timezone()?;
    let contact_zone = event.field("contact.timezone");
    let zone = workflow::resolve_timezone(
        &TimezoneChoice::Contact,
        contact_zone.as_ref().and_then(|v| v.as_str()),
        default_zone,
    );
    let run = runner::simulate(&wf, &event, &state, event.time, default_zone);
    let local = |at: Timestamp| {
        at.to_datetime()
            .with_timezone(&zone)
            .format("%a %Y-%m-%d %H:%M")
            .to_string()
    };

    println!("── the path of this event (times in {zone}, starting at the event's time)");
    for step in &run.steps {
        println!(
            "{}  {:<12} {:<10} {}",
            local(step.at_ms),
            step.step_id,
            step.kind,
            step.outcome
        );
    }
    if wf.program.iter().any(|i| {
        matches!(
            i,
            Instr::Wait {
                wait: workflow::WaitSpec::Event { .. },
                ..
            }
        )
    }) {
        println!("(an awaited event is assumed not to come: each such wait runs to its timeout)");
    }
    println!();

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
    herald_core::template::insert_contact_defaults(
        &mut custom,
        default_zone.name(),
        &config.locale()?,
    );
    // Every send step is rendered (a branch this event does not take is shown too, marked).
    for (pc, instr) in wf.program.iter().enumerate() {
        let (Instr::SendEmail { step_id, .. } | Instr::SendSms { step_id, .. }) = instr else {
            continue;
        };
        let on_path = run.messages.iter().find(|m| m.pc as usize == pc);
        let when = match on_path.map(|m| (m.status, m.due, m.reason.as_deref())) {
            Some((MessageStatus::Queued, Some(due), _)) => format!("goes {}", local(due)),
            Some((_, _, reason)) => format!("skipped: {}", reason.unwrap_or("no address")),
            None => "not on this event's path".to_owned(),
        };
        let to = on_path.and_then(|m| m.recipient.as_deref()).unwrap_or("-");
        match instr {
            Instr::SendEmail { from, .. } => {
                let email = wf.render_email(pc, &context, &custom)?;
                println!("── step {step_id}: send_email, {when}");
                println!("From: {}", from.as_deref().unwrap_or(&config.email_from));
                println!("To: {to}");
                println!("Subject: {}", email.subject);
                if let Some(text) = email.text {
                    println!("\n[text]\n{text}");
                }
                if let Some(html) = email.html {
                    println!("\n[html]\n{html}");
                }
                println!();
            }
            _ => {
                println!(
                    "── step {step_id}: send_sms, {when}\nTo: {to}\n{}\n",
                    wf.render_sms(pc, &context, &custom)?
                );
            }
        }
    }
    if diagram {
        println!(
            "── {id} as a Mermaid flowchart, this event's path marked\n```mermaid\n{}```",
            wf.mermaid(&run.taken)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Adds `--assume FACT=ID` to the contact's state.
fn assume_fact(state: &mut ContactState, fact: &str) -> Result<()> {
    let known = || {
        StateFact::ALL
            .iter()
            .map(|f| f.key())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (key, id) = fact
        .split_once('=')
        .with_context(|| format!("--assume {fact:?}: write FACT=ID, such as holds_offer=o_pro"))?;
    let Some(kind) = StateFact::from_key(key.trim()) else {
        bail!(
            "--assume {fact:?}: unknown fact {key:?}; the facts are {}",
            known()
        );
    };
    let id = id.trim();
    if id.is_empty() {
        bail!("--assume {fact:?}: name an id after the `=`");
    }
    kind.ids_mut(state).insert(id.to_owned());
    Ok(())
}
