//! `herald replay --since TIME [--workflow ID]... [--dry-run]`: stored course events received
//! since TIME are matched again to the workflows on disk (only those named, when named), and each
//! match that has no run yet is stored as an enrollment that carries the original event. The
//! running herald processes start the runs under the usual enrollment rules. An (event,
//! workflow) pair that already started a run, or was replayed before, is left alone: replaying
//! twice, or over events that were handled, starts nothing twice.

use crate::config::Config;
use anyhow::{Context, Result, bail};
use herald_core::CourseEvent;
use herald_core::event::HERALD_SOURCE;
use herald_core::workflow::{CompiledWorkflow, ContactState};
use herald_engine::enrollment::store_enrollments;
use herald_engine::registry::{Sources, compile_all, read_bundles};
use herald_store::{ContactId, NewEvent, Store, Timestamp, WorkflowId};
use secrecy::ExposeSecret;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::ExitCode;

const PAGE: i64 = 1_000;

pub async fn replay(
    config: &Config,
    since: &str,
    only: &[String],
    dry_run: bool,
) -> Result<ExitCode> {
    let since = parse_since(since, chrono::Utc::now())?;
    let workflows = workflows(config, only)?;
    let store = Store::connect(config.database_url.expose_secret()).await?;
    println!(
        "events received since {} matched against: {}",
        since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        workflows
            .iter()
            .map(|w| w.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // First the count, so an operator sees what a replay would do before it does it.
    let mut read = 0u64;
    let mut per_workflow: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut to_enroll: HashSet<(i64, usize)> = HashSet::new();
    let mut after = 0;
    loop {
        let page = store
            .course_events_since(Timestamp::from_datetime(since), after, PAGE)
            .await?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        read += page.len() as u64;
        let contacts: Vec<ContactId> = page
            .iter()
            .map(|(_, e)| ContactId::from(e.contact_id()))
            .collect();
        let ran: HashSet<(i64, WorkflowId)> = store
            .runs_started_by_events(contacts.clone())
            .await?
            .into_iter()
            .collect();
        // Filters on the contact's state see the contact as it is now.
        let states = if workflows.iter().any(|w| w.reads_contact_state) {
            store.contact_states(contacts).await?
        } else {
            HashMap::new()
        };
        let no_state = ContactState::default();
        let mut candidates = Vec::new();
        for (seq, event) in &page {
            let state = states.get(event.contact_id()).unwrap_or(&no_state);
            for (i, wf) in workflows.iter().enumerate() {
                if !wf.trigger_matches(event, state) {
                    continue;
                }
                if ran.contains(&(*seq, WorkflowId::from(wf.id.as_str()))) {
                    per_workflow.entry(&wf.id).or_default().1 += 1;
                } else {
                    candidates.push((*seq, i, CourseEvent::replay_id(event, &wf.id)));
                }
            }
        }
        let replayed: HashSet<String> = store
            .stored_event_ids(
                HERALD_SOURCE.to_owned(),
                candidates.iter().map(|(_, _, id)| id.clone()).collect(),
            )
            .await?
            .into_iter()
            .collect();
        for (seq, i, id) in candidates {
            let counts = per_workflow.entry(&workflows[i].id).or_default();
            if replayed.contains(&id) {
                counts.1 += 1;
            } else {
                counts.0 += 1;
                to_enroll.insert((seq, i));
            }
        }
    }
    println!("{read} event(s) read");
    for (id, (new, ran)) in &per_workflow {
        println!("  {id}: {new} to replay, {ran} already started a run or were replayed");
    }
    if dry_run || to_enroll.is_empty() {
        println!(
            "{}",
            if dry_run {
                "dry run: nothing stored"
            } else {
                "nothing to replay"
            }
        );
        return Ok(ExitCode::SUCCESS);
    }

    let bar = indicatif::ProgressBar::new(to_enroll.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} enrollments stored {msg}")
            .expect("a valid progress template"),
    );
    let now = Timestamp::from_datetime(chrono::Utc::now());
    let mut after = 0;
    loop {
        let page = store
            .course_events_since(Timestamp::from_datetime(since), after, PAGE)
            .await?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        let mut events = Vec::new();
        for (seq, event) in &page {
            for (i, wf) in workflows.iter().enumerate() {
                if to_enroll.contains(&(*seq, i)) {
                    events.push(NewEvent {
                        event: CourseEvent::replayed(event, &wf.id),
                        received: now,
                    });
                }
            }
        }
        let stored = events.len() as u64;
        store_enrollments(&store, events).await?;
        bar.inc(stored);
    }
    bar.finish();
    println!(
        "stored {} enrollment(s); herald processes on this database start the runs (see GET /v1/runs)",
        to_enroll.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// The workflows on disk that are enabled and started by events, or those named.
fn workflows(config: &Config, only: &[String]) -> Result<Vec<CompiledWorkflow>> {
    let sources = Sources {
        workflows: config.workflows.clone(),
        templates: config.templates.clone(),
    };
    let custom: Vec<String> = config.custom_values.keys().cloned().collect();
    let compiled = match compile_all(read_bundles(&sources)?, &custom) {
        Ok((compiled, _)) => compiled,
        Err(diagnostics) => {
            for d in &diagnostics {
                eprintln!("{d}");
            }
            bail!("the workflows do not check (see `herald check`): nothing replayed");
        }
    };
    for id in only {
        let Some(wf) = compiled.iter().find(|w| &w.id == id) else {
            bail!("no workflow {id:?} in {}", config.workflows.display());
        };
        if wf.schedule().is_some() {
            bail!(
                "workflow {id:?} is started by a schedule, not by events: there is nothing to replay"
            );
        }
    }
    let chosen: Vec<CompiledWorkflow> = compiled
        .into_iter()
        .filter(|w| {
            w.schedule().is_none()
                && if only.is_empty() {
                    w.enabled
                } else {
                    only.contains(&w.id)
                }
        })
        .collect();
    if chosen.is_empty() {
        bail!(
            "no enabled workflow started by events in {}",
            config.workflows.display()
        );
    }
    Ok(chosen)
}

/// An RFC 3339 time, a date (midnight UTC), or a duration ago (`24h`, `7d`).
fn parse_since(
    text: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    let ago: herald_core::Duration = text.parse().with_context(|| {
        format!("--since {text:?}: give an RFC 3339 time (2026-12-01T09:00:00Z), a date (2026-12-01) or a duration ago (24h, 7d)")
    })?;
    chrono::TimeDelta::try_milliseconds(ago.as_millis())
        .and_then(|ago| now.checked_sub_signed(ago))
        .with_context(|| format!("--since {text:?} reaches before any time herald can hold"))
}

#[cfg(test)]
mod tests {
    use super::parse_since;

    #[test]
    fn since_takes_a_time_a_date_or_a_duration_ago() {
        let now = "2026-12-05T10:00:00Z".parse().unwrap();
        let at = |s: &str| parse_since(s, now).unwrap().to_rfc3339();
        assert_eq!(at("2026-12-01T09:00:00+01:00"), "2026-12-01T08:00:00+00:00");
        assert_eq!(at("2026-12-01"), "2026-12-01T00:00:00+00:00");
        assert_eq!(at("24h"), "2026-12-04T10:00:00+00:00");
        let e = parse_since("yesterday", now).unwrap_err().to_string();
        assert!(e.contains("--since \"yesterday\""), "{e}");
        // Found by fuzzing durations: an absurd duration is refused, not a panic.
        let e = parse_since("25555557555526w", now).unwrap_err().to_string();
        assert!(e.contains("before any time"), "{e}");
    }
}
