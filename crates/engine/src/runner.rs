//! Advancing a run: a pure interpreter over a workflow's compiled program. Given where a run
//! stands, its event and the time, it walks forward until the run waits or ends, and says what
//! to write: the new state, the history and the messages queued. No I/O here, so the dispatcher
//! can run a new run's first steps inside its own transaction, and tests can drive it directly.

use chrono::{DateTime, Utc};
use herald_core::CourseEvent;
use herald_core::workflow::{self, CompiledWorkflow, ContactState, Instr, WaitSpec};
use herald_store::{
    Channel, ContactRow, MessageId, MessageStatus, NewMessage, RunState, StepRecord, Timestamp,
};

/// Everything the interpreter reads besides the workflow.
pub struct RunContext<'a> {
    /// The trigger event, with the contact's latest details laid over it.
    pub event: &'a CourseEvent,
    /// What the contact holds and has completed; loaded only for a workflow whose conditions read
    /// it ([`CompiledWorkflow::reads_contact_state`]), empty otherwise.
    pub state: &'a ContactState,
    pub now: DateTime<Utc>,
    pub default_timezone: chrono_tz::Tz,
    /// Host for generated `Message-ID`s.
    pub message_host: &'a str,
}

/// Where a run stands after advancing.
#[derive(Debug, Clone)]
pub struct Advanced {
    pub state: RunState,
    pub pc: usize,
    pub wait_event: Option<String>,
    pub due: Option<Timestamp>,
    pub steps: Vec<StepRecord>,
    pub messages: Vec<NewMessage>,
}

/// Runs the program from `pc` until a wait or the end.
pub fn advance(wf: &CompiledWorkflow, mut pc: usize, ctx: &RunContext<'_>) -> Advanced {
    let now = Timestamp::from_datetime(ctx.now);
    let mut steps = Vec::new();
    let mut messages = Vec::new();
    let record = |steps: &mut Vec<StepRecord>, step_id: &str, kind: &str, outcome: String| {
        steps.push(StepRecord {
            step_id: step_id.to_owned(),
            kind: kind.to_owned(),
            outcome,
            at_ms: now,
        });
    };
    let contact_tz = ctx.event.field("contact.timezone");
    let contact_tz = contact_tz.as_ref().and_then(|v| v.as_str());
    while let Some(instr) = wf.program.get(pc) {
        match instr {
            Instr::SendEmail { step_id, .. } | Instr::SendSms { step_id, .. } => {
                let channel = if matches!(instr, Instr::SendEmail { .. }) {
                    Channel::Email
                } else {
                    Channel::Sms
                };
                let (recipient, problem) = recipient(channel, ctx.event);
                let due = wf.send_window.as_ref().map_or(ctx.now, |w| {
                    w.next_open(
                        ctx.now,
                        workflow::resolve_timezone(&w.timezone, contact_tz, ctx.default_timezone),
                    )
                });
                let id = MessageId::fresh();
                let message = NewMessage {
                    id: id.clone(),
                    step_id: step_id.clone(),
                    pc: pc as i64,
                    channel,
                    recipient,
                    header_message_id: format!("<{id}@{}>", ctx.message_host),
                    status: if problem.is_some() {
                        MessageStatus::Skipped
                    } else {
                        MessageStatus::Queued
                    },
                    reason: problem.clone(),
                    due: problem.is_none().then(|| Timestamp::from_datetime(due)),
                };
                let kind = if channel == Channel::Email {
                    "send_email"
                } else {
                    "send_sms"
                };
                let outcome = match &problem {
                    Some(p) => format!("skipped: {p}"),
                    None if due > ctx.now => format!(
                        "queued message {id} for the send window at {}",
                        due.to_rfc3339()
                    ),
                    None => format!("queued message {id}"),
                };
                record(&mut steps, step_id, kind, outcome);
                messages.push(message);
                pc += 1;
            }
            Instr::Wait { step_id, wait } => {
                pc += 1;
                let (due, wait_event) = match wait {
                    WaitSpec::For(d) => (workflow::add_duration(ctx.now, *d), None),
                    WaitSpec::Until { at, days, timezone } => {
                        let tz =
                            workflow::resolve_timezone(timezone, contact_tz, ctx.default_timezone);
                        (workflow::next_local_time(ctx.now, *at, days, tz), None)
                    }
                    WaitSpec::Event { event, timeout } => (
                        workflow::add_duration(ctx.now, *timeout),
                        Some(event.trigger_name().to_owned()),
                    ),
                };
                let outcome = match &wait_event {
                    Some(e) => format!("waiting for {e} until {}", due.to_rfc3339()),
                    None => format!("waiting until {}", due.to_rfc3339()),
                };
                record(&mut steps, step_id, "wait", outcome);
                if due > ctx.now || wait_event.is_some() {
                    let state = if wait_event.is_some() {
                        RunState::WaitingEvent
                    } else {
                        RunState::Active
                    };
                    return Advanced {
                        state,
                        pc,
                        wait_event,
                        due: Some(Timestamp::from_datetime(due)),
                        steps,
                        messages,
                    };
                }
            }
            Instr::Branch {
                step_id,
                condition,
                else_pc,
            } => {
                let taken = condition.evaluate(ctx.event, ctx.state);
                record(
                    &mut steps,
                    step_id,
                    "if",
                    if taken { "then".into() } else { "else".into() },
                );
                pc = if taken { pc + 1 } else { *else_pc };
            }
            Instr::Jump { to } => pc = *to,
        }
    }
    Advanced {
        state: RunState::Completed,
        pc,
        wait_event: None,
        due: None,
        steps,
        messages,
    }
}

/// A run simulated from its start: every step as the engine would take it, with its time.
#[derive(Debug, Clone, Default)]
pub struct Simulated {
    pub steps: Vec<StepRecord>,
    pub messages: Vec<NewMessage>,
    /// The program counters of the steps taken, for marking the path in a diagram.
    pub taken: std::collections::BTreeSet<usize>,
}

/// Runs `wf` for `event` from `start` to its end as the engine would, assuming no awaited event
/// comes (each event wait runs to its timeout) and every message goes when it is due: what
/// `herald preview` shows. Pure; a workflow that never ends stops after 10,000 waits.
pub fn simulate(
    wf: &CompiledWorkflow,
    event: &CourseEvent,
    state: &ContactState,
    start: DateTime<Utc>,
    default_timezone: chrono_tz::Tz,
) -> Simulated {
    let mut out = Simulated::default();
    let (mut now, mut pc) = (start, 0);
    for _ in 0..10_000 {
        let ctx = RunContext {
            event,
            state,
            now,
            default_timezone,
            message_host: "preview.invalid",
        };
        let advanced = advance(wf, pc, &ctx);
        for step in &advanced.steps {
            out.taken.extend(
                wf.program
                    .iter()
                    .position(|i| i.step_id() == Some(step.step_id.as_str())),
            );
        }
        out.steps.extend(advanced.steps);
        out.messages.extend(advanced.messages);
        match (advanced.state, advanced.due) {
            (RunState::Active | RunState::WaitingEvent, Some(due)) => {
                now = due.to_datetime().max(now);
                pc = advanced.pc;
            }
            _ => break,
        }
    }
    out
}

/// The address a message goes to, or why there is none (then the message is skipped and the run
/// goes on).
fn recipient(channel: Channel, event: &CourseEvent) -> (Option<String>, Option<String>) {
    let field = if channel == Channel::Email {
        "contact.email"
    } else {
        "contact.phone"
    };
    let value = event
        .field(field)
        .and_then(|v| v.as_str().map(str::to_owned))
        .filter(|s| !s.trim().is_empty());
    match (channel, value) {
        (Channel::Email, None) => (None, Some("contact has no email address".into())),
        (Channel::Sms, None) => (None, Some("contact has no phone number".into())),
        (Channel::Email, Some(v)) if !valid_email(&v) => {
            (Some(v), Some("contact's email address is invalid".into()))
        }
        (Channel::Sms, Some(v)) if !valid_e164(&v) => (
            Some(v),
            Some("contact's phone number is not in E.164 form (+15551234567)".into()),
        ),
        (_, Some(v)) => (Some(v), None),
    }
}

fn valid_email(s: &str) -> bool {
    s.parse::<herald_channels::email::Address>().is_ok()
}

/// E.164: a plus sign, a non-zero digit, at most 15 digits in all.
pub fn valid_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (2..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// The event a run's steps read, for a workflow that waits for events: its trigger event with
/// `received` (whether the last event wait got its event, not its timeout) and `awaited` (that
/// event's objects and `event.*`), as conditions and templates name them.
pub fn with_wait_outcome(
    wf: &CompiledWorkflow,
    mut event: CourseEvent,
    awaited: Option<&CourseEvent>,
) -> CourseEvent {
    if wf.waits_for_events() {
        event.data.insert(
            "received".into(),
            serde_json::Value::Bool(awaited.is_some()),
        );
        if let Some(awaited) = awaited {
            event
                .data
                .insert("awaited".into(), awaited.template_context());
        }
    }
    event
}

/// Lays the contact's latest stored details over the event's `contact` object, so that a message
/// sent days after the trigger goes to the current address.
pub fn with_latest_contact(event: &CourseEvent, contact: &ContactRow) -> CourseEvent {
    let mut event = event.clone();
    if contact.id.is_empty() {
        return event;
    }
    if let Some(serde_json::Value::Object(c)) = event.data.get_mut("contact") {
        let fields = [
            ("email", &contact.email),
            ("phone", &contact.phone),
            ("first_name", &contact.first_name),
            ("last_name", &contact.last_name),
            ("timezone", &contact.timezone),
            ("locale", &contact.locale),
        ];
        for (key, value) in fields {
            if let Some(v) = value {
                c.insert(key.into(), serde_json::Value::String(v.clone()));
            }
        }
        if let Some(cf) = contact
            .custom_fields
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
        {
            c.insert("custom_fields".into(), cf);
        }
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest wait the check allows, from the last day chrono can represent: the due time
    /// saturates instead of overflowing (a run must never panic its loop).
    #[test]
    fn a_wait_past_the_end_of_time_saturates() {
        let yaml = "name: W\ntrigger: {event: new_signup}\nsteps:\n  - wait: 3650d\n  - wait: {event: lesson_completed, timeout: 3650d}\n";
        let bundle = herald_core::workflow::bundle_from("w", "workflows/w.yaml", yaml, &|_| None);
        let (wf, _) = herald_core::workflow::compile(bundle, &[]).expect("checks");
        let body = br#"{"specversion":"1.0","id":"e1","source":"s","type":"course.new_signup","time":"2026-11-24T10:00:00Z","data":{"contact":{"id":"c1"}}}"#;
        let event =
            herald_core::event::parse_body(herald_core::event::BodyKind::Single, body, Utc::now())
                .unwrap()
                .remove(0);
        let now = DateTime::<Utc>::MAX_UTC - chrono::TimeDelta::days(1);
        let ctx = RunContext {
            event: &event,
            state: &ContactState::default(),
            now,
            default_timezone: chrono_tz::UTC,
            message_host: "h",
        };
        for pc in [0, 1] {
            let advanced = advance(&wf, pc, &ctx);
            let due = advanced.due.expect("a due time");
            assert!(
                due >= Timestamp::from_datetime(now),
                "pc {pc}: due {due} before now"
            );
        }
    }

    #[test]
    fn e164() {
        assert!(valid_e164("+15551234567"));
        for bad in [
            "15551234567",
            "+0555",
            "+1",
            "+1555123456789012",
            "+1555-123",
            "",
        ] {
            assert!(!valid_e164(bad), "{bad}");
        }
    }
}
