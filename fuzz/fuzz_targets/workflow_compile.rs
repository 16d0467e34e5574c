//! `herald check` and loading on arbitrary files: each input is compiled once as a workflow's YAML
//! (with a fixed set of template files) and once as the text of every template file of a fixed,
//! valid workflow, loaded as the registry does (`bundle_from`, then `compile`). Nothing may
//! panic; a workflow that compiles is also matched against an event and its messages rendered.
//!
//! What does not depend on the input (the event, the fixed templates, which template files the
//! fixed workflow loads) is built once: rebuilding it for every input took a third of the time.
#![no_main]

use chrono::{DateTime, Utc};
use herald_core::event::{BodyKind, CourseEvent, parse_body};
use herald_core::template::CustomValues;
use herald_core::workflow::{ContactState, Instr, WorkflowBundle, bundle_from, compile};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::LazyLock;

/// Uses every kind of step, an email template and an SMS template.
const WORKFLOW: &str = r#"name: Fuzz
trigger:
  event: [lesson_completed, offer_access_granted]
exit_when:
  event: product_completed
send_window:
  days: [mon, tue, wed, thu, fri]
  between: ["09:00", "18:00"]
steps:
  - send_email:
      subject: "Hi {{default contact.first_name 'there'}}"
      template: welcome
  - wait: 2d
  - if:
      any:
        - { field: contact.phone, exists: true }
        - { field: lesson.title, equals: Ownership }
    then:
      - send_sms: {template: nudge}
    else:
      - wait: {until: "09:00", days: [mon], timezone: contact}
  - wait: {event: lesson_completed, timeout: 3d}
"#;

const EVENT: &str = r#"{"specversion": "1.0", "id": "evt_1", "source": "https://school.example.com",
  "type": "course.lesson_completed", "time": "2026-11-24T10:00:00+01:00",
  "data": {"contact": {"id": "c_1", "email": "ann@example.com", "first_name": "Ann", "phone": "+15551234567"},
           "product": {"id": "p_1", "title": "Rust 101"}, "lesson": {"id": "l_1", "title": "Ownership"},
           "offer": {"id": "o_1", "title": "Pro", "product_ids": ["p_1"]}}}"#;

/// Everything each input is checked against.
struct Fixed {
    now: DateTime<Utc>,
    event: CourseEvent,
    state: ContactState,
    context: Value,
    custom: CustomValues,
    /// The template files an input workflow can load.
    templates: BTreeMap<&'static str, String>,
    /// `WORKFLOW` as `bundle_from` loads it; an input becomes the text of each of its templates.
    workflow: WorkflowBundle,
}

static FIXED: LazyLock<Fixed> = LazyLock::new(|| {
    let now: DateTime<Utc> = "2026-11-24T12:00:00Z".parse().expect("a valid instant");
    let mut events = parse_body(BodyKind::Single, EVENT.as_bytes(), now).expect("a valid event");
    let event = events.remove(0);
    let mut state = ContactState::default();
    state.apply(&event);
    let context = event.template_context();
    let custom = CustomValues::from([
        (
            "login_url".to_owned(),
            "https://herald.test/l/abc?a=1&b=2".to_owned(),
        ),
        (
            "unsubscribe_url".to_owned(),
            "https://herald.test/u/xyz".to_owned(),
        ),
        (
            "support_email".to_owned(),
            "help@school.example.com".to_owned(),
        ),
    ]);
    let templates = BTreeMap::from([
        (
            "welcome.html.hbs",
            "<p>Hi {{contact.first_name}}, <<support_email>></p>".to_owned(),
        ),
        (
            "welcome.txt.hbs",
            "Hi {{contact.first_name}}, <<login_url>>".to_owned(),
        ),
        (
            "nudge.sms.hbs",
            "Back to {{lesson.title}}? <<login_url>>".to_owned(),
        ),
    ]);
    // Loading depends on the YAML alone: which files it asks for, not what they hold.
    let load = |name: &str| templates.contains_key(name).then(String::new);
    let workflow = bundle_from("fuzz", "workflows/fuzz.yaml", WORKFLOW, &load);
    assert!(
        workflow
            .templates
            .keys()
            .map(String::as_str)
            .eq(templates.keys().copied()),
        "WORKFLOW loads every fixed template file: {:?}",
        workflow.templates.keys()
    );
    Fixed {
        now,
        event,
        state,
        context,
        custom,
        templates,
        workflow,
    }
});

fuzz_target!(|data: &[u8]| {
    let fixed = &*FIXED;
    let text = String::from_utf8_lossy(data);
    let load = |name: &str| fixed.templates.get(name).cloned();
    check(
        fixed,
        bundle_from("fuzz", "workflows/fuzz.yaml", &text, &load),
    );
    let mut as_templates = fixed.workflow.clone();
    for template in as_templates.templates.values_mut() {
        *template = text.to_string();
    }
    check(fixed, as_templates);
});

fn check(fixed: &Fixed, bundle: WorkflowBundle) {
    let _ = bundle.version();
    let Ok((workflow, _warnings)) = compile(bundle, &["support_email".to_owned()]) else {
        return;
    };
    let Fixed {
        now,
        event,
        state,
        context,
        custom,
        ..
    } = fixed;
    let now = *now;
    let _ = workflow.triggered_by(event, state);
    let _ = workflow.exits_on(event, state);
    if let Some(schedule) = workflow.schedule() {
        if let Some(tick) = schedule.latest_tick(now, chrono_tz::UTC) {
            assert!(tick.at <= now, "{tick:?} is after {now}");
        }
        if let Some(next) = schedule.next_tick(now, chrono_tz::UTC) {
            assert!(next > now, "{next} is not after {now}");
        }
    }
    if let Some(window) = &workflow.send_window {
        assert!(window.next_open(now, chrono_tz::Europe::Berlin) >= now);
    }
    for (pc, instr) in workflow.program.iter().enumerate() {
        match instr {
            Instr::SendEmail { .. } => {
                let _ = workflow.render_email(pc, context, custom);
            }
            Instr::SendSms { .. } => {
                let _ = workflow.render_sms(pc, context, custom);
            }
            Instr::Wait { wait, .. } => {
                assert!(wait.deadline(now, Some("Europe/Berlin"), chrono_tz::UTC) >= now);
            }
            Instr::Branch { else_pc, .. } => assert!(*else_pc <= workflow.program.len()),
            Instr::Jump { to } => assert!(*to <= workflow.program.len()),
        }
    }
}
