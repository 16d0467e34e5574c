//! Durations, times of day, time zones and send windows on arbitrary text: `Duration` parsing
//! directly, and the time-of-day and zone parsers of the workflow compiler through the YAML they
//! are written in (`wait: 2d`, `wait: {until: ...}`, `timeout:`, `send_window: between:`,
//! `timezone:`). Nothing may panic; a parsed duration survives its display form; every deadline
//! and window opening lies at or after now.
//!
//! Input layout: the first byte picks the place in the workflow (modulo the number of places),
//! the rest is the text. One compile per run keeps the executions per second up.
#![no_main]

use chrono::{DateTime, Utc};
use herald_core::Duration;
use herald_core::workflow::{
    Instr, TimezoneChoice, WorkflowBundle, add_duration, compile, next_local_time,
    resolve_timezone,
};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

/// Ordinary instants and the edges of Berlin's and New York's daylight-saving changes in 2026.
const NOWS: [&str; 5] = [
    "2026-01-15T12:00:00Z",
    "2026-03-29T00:59:59Z",
    "2026-10-25T00:30:00Z",
    "2026-03-08T06:59:59Z",
    "2026-11-01T05:30:00Z",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let nows: Vec<DateTime<Utc>> = NOWS.iter().map(|s| s.parse().expect("valid")).collect();

    if let Ok(duration) = text.parse::<Duration>() {
        let shown = duration.to_string();
        assert_eq!(shown.parse::<Duration>(), Ok(duration), "{shown}");
        assert_eq!(duration.to_std().as_secs(), duration.as_secs());
        assert!(duration.as_millis() >= 0, "{duration:?} has negative milliseconds");
        for &now in &nows {
            assert!(add_duration(now, duration) >= now);
        }
    }

    // The text as a contact's time zone.
    let zone = resolve_timezone(&TimezoneChoice::Contact, Some(&text), chrono_tz::UTC);
    let nine = chrono::NaiveTime::from_hms_opt(9, 0, 0).expect("valid");
    for &now in &nows {
        assert!(next_local_time(now, nine, &[], zone) >= now);
    }

    let quoted = yaml_quoted(&text);
    let places = [
        format!("steps:\n  - wait: {quoted}\n"),
        format!("steps:\n  - wait: {{until: {quoted}, days: [mon, sat], timezone: Europe/Berlin}}\n"),
        format!("steps:\n  - wait: {{until: {quoted}}}\n"),
        format!("steps:\n  - wait: {{until: \"02:30\", timezone: {quoted}}}\n"),
        format!("steps:\n  - wait: {{event: lesson_completed, timeout: {quoted}}}\n"),
        format!("send_window:\n  between: [{quoted}, \"23:59\"]\nsteps:\n  - wait: 1d\n"),
        format!("send_window:\n  between: [\"00:00\", {quoted}]\nsteps:\n  - wait: 1d\n"),
        format!(
            "send_window:\n  between: [\"02:15\", \"03:30\"]\n  timezone: {quoted}\nsteps:\n  - wait: 1d\n"
        ),
        format!("send_window:\n  between: [\"09:00\", \"18:00\"]\n  days: [{quoted}]\nsteps:\n  - wait: 1d\n"),
    ];
    check(&places[usize::from(selector) % places.len()], &nows);
});

/// Compiles a workflow made of `rest` after a fixed name and trigger, and checks that every wait
/// and the send window, if it compiles, lie ahead of each `now`.
fn check(rest: &str, nows: &[DateTime<Utc>]) {
    let bundle = WorkflowBundle {
        id: "fuzz".into(),
        path: "workflows/fuzz.yaml".into(),
        yaml: format!("name: Fuzz\ntrigger: {{event: lesson_completed}}\n{rest}"),
        templates: BTreeMap::new(),
    };
    let Ok((workflow, _)) = compile(bundle, &[]) else {
        return;
    };
    for &now in nows {
        for tz in [chrono_tz::Europe::Berlin, chrono_tz::America::New_York] {
            if let Some(window) = &workflow.send_window {
                assert!(window.next_open(now, tz) >= now);
            }
            for instr in &workflow.program {
                if let Instr::Wait { wait, .. } = instr {
                    assert!(wait.deadline(now, None, tz) >= now);
                }
            }
        }
    }
}

/// `text` as a YAML double-quoted scalar: every character outside printable ASCII escaped, so
/// any string reaches the parser under test rather than tripping the YAML reader.
fn yaml_quoted(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if u32::from(c) <= 0xFFFF => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push_str(&format!("\\U{:08X}", u32::from(c))),
        }
    }
    out.push('"');
    out
}
