//! Tests of checking and compiling whole workflow files: diagnostics with their exact positions,
//! the compiled program, and matching and rendering through the compiled result.

use super::*;
use crate::event::parse_event;
use serde_json::json;

const PATH: &str = "workflows/t.yaml";

/// Joins lines so that line `n` of the file is `lines[n - 1]`.
fn yaml(lines: &[&str]) -> String {
    lines.join("\n") + "\n"
}

fn bundle(yaml: &str, templates: &[(&str, &str)]) -> WorkflowBundle {
    let templates: BTreeMap<String, String> = templates
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    bundle_from("t", PATH, yaml, &|name| templates.get(name).cloned())
}

fn compiled_with(
    yaml: &str,
    templates: &[(&str, &str)],
    custom: &[&str],
) -> (CompiledWorkflow, Vec<Diagnostic>) {
    let custom: Vec<String> = custom.iter().map(|s| s.to_string()).collect();
    match compile(bundle(yaml, templates), &custom) {
        Ok(ok) => ok,
        Err(diags) => panic!("expected to compile, got:\n{}", render(&diags)),
    }
}

fn compiled(yaml: &str) -> CompiledWorkflow {
    compiled_with(yaml, &[], &[]).0
}

/// The diagnostics as `herald check` prints them.
fn errors_with(yaml: &str, templates: &[(&str, &str)]) -> Vec<String> {
    match compile(bundle(yaml, templates), &[]) {
        Ok(_) => panic!("expected diagnostics"),
        Err(diags) => diags.iter().map(ToString::to_string).collect(),
    }
}

fn errors(yaml: &str) -> Vec<String> {
    errors_with(yaml, &[])
}

fn render(diags: &[Diagnostic]) -> String {
    diags.iter().map(|d| format!("{d}\n")).collect()
}

/// Asserts exactly one diagnostic, starting with `prefix` (file:line:column: severity: message start).
#[track_caller]
fn assert_one(diags: &[String], prefix: &str) {
    assert!(
        diags.len() == 1 && diags[0].starts_with(prefix),
        "expected one diagnostic starting with\n  {prefix}\ngot\n  {diags:#?}"
    );
}

/// A minimal valid file with `steps` appended (each line already indented by the caller).
fn with_steps(trigger: &str, steps: &[&str]) -> String {
    let mut lines = vec!["name: T", trigger, "steps:"];
    lines.extend_from_slice(steps);
    yaml(&lines)
}

fn event(ty: &str, data: serde_json::Value) -> CourseEvent {
    let v = json!({"specversion": "1.0", "id": "e1", "source": "s", "type": format!("course.{ty}"), "time": "2026-11-24T10:00:00Z", "data": data});
    parse_event(0, v, "2026-11-24T10:00:00Z".parse().unwrap()).unwrap()
}

const SPEC_EXAMPLE: &str = r#"name: Welcome new members        # shown in logs and the admin API
enabled: true                     # false: a draft; loaded and checked, never triggered
trigger:
  event: [offer_access_granted, new_signup]   # one trigger name or a list (any of them)
  where:                          # optional; every key must match
    offer.id: [o_basic, o_pro]    # a list matches any of its values
    product.id: {not: [p_free]}   # none of these
re_entry: false                   # see below
exit_when:                        # optional goal: a matching event for the same contact ends the run
  event: product_completed
from: "Ada at Rust School <ada@school.example.com>"   # optional; per step too
send_window:                      # optional; sends outside it wait for the next opening
  days: [mon, tue, wed, thu, fri]
  between: ["09:00", "18:00"]
  timezone: contact               # the contact's timezone, else the configured default
steps:
  - send_email:
      subject: "Welcome, {{default contact.first_name 'there'}}!"
      template: welcome           # templates/welcome.html.hbs and/or templates/welcome.txt.hbs
  - wait: 2d                      # 30s, 15m, 4h, 2d, 1w
  - if:
      all:
        - { field: contact.phone, exists: true }
        - { field: offer.id, equals: o_pro }
    then:
      - send_sms:
          body: "Hi {{contact.first_name}}, your course is waiting: <<login_url>>"
    else:
      - send_email:
          subject: "Your course is waiting"
          text: "Jump back in: <<login_url>>"
"#;

const WELCOME: [(&str, &str); 2] = [
    (
        "welcome.html.hbs",
        "<p>Hi {{default contact.first_name \"there\"}}, welcome to <b>{{offer.title}}</b>.</p>",
    ),
    (
        "welcome.txt.hbs",
        "Hi {{default contact.first_name \"there\"}}, welcome to {{offer.title}}.",
    ),
];

#[test]
fn the_spec_example_compiles() {
    let (wf, warnings) = compiled_with(SPEC_EXAMPLE, &WELCOME, &[]);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        (wf.id.as_str(), wf.name.as_str(), wf.enabled, wf.re_entry),
        ("t", "Welcome new members", true, false)
    );
    assert_eq!(wf.version, wf.bundle.version());
    let Trigger::Events(m) = &wf.trigger else {
        panic!("an event trigger: {:?}", wf.trigger)
    };
    assert_eq!(
        m.events,
        [EventType::OfferAccessGranted, EventType::NewSignup]
    );
    assert_eq!(
        m.filters,
        [
            FieldFilter {
                subject: FilterSubject::Field("offer.id".into()),
                negated: false,
                values: vec![json!("o_basic"), json!("o_pro")]
            },
            FieldFilter {
                subject: FilterSubject::Field("product.id".into()),
                negated: true,
                values: vec![json!("p_free")]
            },
        ]
    );
    assert_eq!(
        wf.exit_when.as_ref().map(|m| m.events.clone()),
        Some(vec![EventType::ProductCompleted])
    );
    let window = wf.send_window.as_ref().unwrap();
    assert_eq!(window.days.len(), 5);
    assert_eq!(window.timezone, TimezoneChoice::Contact);
    let from = Some("Ada at Rust School <ada@school.example.com>".to_owned());
    assert_eq!(
        wf.program,
        [
            Instr::SendEmail {
                step_id: "0".into(),
                from: from.clone(),
                uses_login_url: false
            },
            Instr::Wait {
                step_id: "1".into(),
                wait: WaitSpec::For("2d".parse().unwrap())
            },
            Instr::Branch {
                step_id: "2".into(),
                condition: Condition::All(vec![
                    Condition::Test {
                        field: "contact.phone".into(),
                        test: FieldTest::Exists(true)
                    },
                    Condition::Test {
                        field: "offer.id".into(),
                        test: FieldTest::Equals(json!("o_pro"))
                    },
                ]),
                else_pc: 5,
            },
            Instr::SendSms {
                step_id: "2.then.0".into(),
                uses_login_url: true
            },
            Instr::Jump { to: 6 },
            Instr::SendEmail {
                step_id: "2.else.0".into(),
                from,
                uses_login_url: true
            },
        ]
    );
}

#[test]
fn renders_through_the_compiled_workflow() {
    let (wf, _) = compiled_with(SPEC_EXAMPLE, &WELCOME, &[]);
    let ctx = json!({"contact": {"id": "c", "first_name": "Ann & Bo\n"}, "offer": {"id": "o_pro", "title": "<Pro>"}});
    let custom: CustomValues =
        [("login_url".to_owned(), "https://h.test/l/t?x=1".to_owned())].into();
    let email = wf.render_email(0, &ctx, &custom).unwrap();
    // The line break in the name becomes a space: a subject is one line.
    assert_eq!(email.subject, "Welcome, Ann & Bo !");
    assert_eq!(
        email.html.as_deref(),
        Some("<p>Hi Ann &amp; Bo\n, welcome to <b>&lt;Pro&gt;</b>.</p>")
    );
    assert_eq!(
        email.text.as_deref(),
        Some("Hi Ann & Bo\n, welcome to <Pro>.")
    );
    assert_eq!(
        wf.render_sms(3, &ctx, &custom).unwrap(),
        "Hi Ann & Bo\n, your course is waiting: https://h.test/l/t?x=1"
    );
    let inline = wf.render_email(5, &ctx, &custom).unwrap();
    assert_eq!(
        (inline.html, inline.text.as_deref()),
        (None, Some("Jump back in: https://h.test/l/t?x=1"))
    );
    assert!(
        wf.render_email(1, &ctx, &custom).is_err(),
        "a wait step has no email"
    );
}

#[test]
fn filters_match_any_of_and_not_lists_with_missing_field_semantics() {
    let (wf, _) = compiled_with(SPEC_EXAMPLE, &WELCOME, &[]);
    let contact = json!({"id": "c_1"});
    let granted = |offer: &str, product: Option<&str>| {
        let mut data = json!({"contact": contact, "offer": {"id": offer}});
        if let Some(p) = product {
            data["product"] = json!({"id": p});
        }
        event("offer_access_granted", data)
    };
    assert!(
        wf.triggered_by(&granted("o_pro", None), &ContactState::default()),
        "a missing field passes a `not` list"
    );
    assert!(wf.triggered_by(
        &granted("o_basic", Some("p_paid")),
        &ContactState::default()
    ));
    assert!(!wf.triggered_by(&granted("o_pro", Some("p_free")), &ContactState::default()));
    assert!(!wf.triggered_by(&granted("o_other", None), &ContactState::default()));
    assert!(
        !wf.triggered_by(
            &event("new_signup", json!({"contact": contact})),
            &ContactState::default()
        ),
        "a missing field fails an any-of list"
    );
    assert!(wf.triggered_by(
        &event(
            "new_signup",
            json!({"contact": contact, "offer": {"id": "o_pro"}})
        ),
        &ContactState::default()
    ));
    assert!(!wf.triggered_by(
        &event(
            "user_login",
            json!({"contact": contact, "offer": {"id": "o_pro"}})
        ),
        &ContactState::default()
    ));
    assert!(wf.exits_on(
        &event(
            "product_completed",
            json!({"contact": contact, "product": {"id": "p"}})
        ),
        &ContactState::default()
    ));
    assert!(!wf.exits_on(&granted("o_pro", None), &ContactState::default()));

    let draft = compiled(
        &SPEC_EXAMPLE
            .replace("enabled: true", "enabled: false")
            .replace("template: welcome", "text: x"),
    );
    assert!(!draft.enabled);
    assert!(!draft.triggered_by(&granted("o_pro", None), &ContactState::default()));
}

#[test]
fn where_values_compare_loosely() {
    let wf = compiled(&yaml(&[
        "name: T",
        "trigger:",
        "  event: lesson_completed",
        "  where:",
        "    contact.custom_fields.level: 5",
        "    lesson.id: \"007\"",
        "steps: []",
    ]));
    let data = |level: serde_json::Value| json!({"contact": {"id": "c", "custom_fields": {"level": level}}, "product": {"id": "p"}, "lesson": {"id": "007"}});
    assert!(wf.triggered_by(
        &event("lesson_completed", data(json!("5"))),
        &ContactState::default()
    ));
    assert!(wf.triggered_by(
        &event("lesson_completed", data(json!(5))),
        &ContactState::default()
    ));
    assert!(!wf.triggered_by(
        &event("lesson_completed", data(json!(6))),
        &ContactState::default()
    ));
}

#[test]
fn nested_if_else_layout_and_step_ids() {
    let wf = compiled(&with_steps(
        "trigger: {event: offer_access_granted}",
        &[
            "  - send_email: {subject: a, text: a}",
            "  - if: {field: offer.id, equals: o_pro}",
            "    then:",
            "      - wait: 1d",
            "      - if: {any: [{field: contact.phone, exists: true}, {field: contact.email, exists: false}]}",
            "        then:",
            "          - send_sms: {body: \"hi <<login_url>>\"}",
            "    else:",
            "      - id: nudge",
            "        send_email: {subject: b, text: b, from: \"B <b@x.test>\"}",
            "  - wait: {until: \"09:00\", days: [mon, Fri], timezone: Europe/Berlin}",
            "  - wait: {event: lesson_completed, timeout: 3d}",
        ],
    ));
    let ids: Vec<(usize, Option<&str>)> = wf
        .program
        .iter()
        .enumerate()
        .map(|(pc, i)| match i {
            Instr::SendEmail { step_id, .. }
            | Instr::SendSms { step_id, .. }
            | Instr::Wait { step_id, .. }
            | Instr::Branch { step_id, .. } => (pc, Some(step_id.as_str())),
            Instr::Jump { .. } => (pc, None),
        })
        .collect();
    assert_eq!(
        ids,
        [
            (0, Some("0")),
            (1, Some("1")),
            (2, Some("1.then.0")),
            (3, Some("1.then.1")),
            (4, Some("1.then.1.then.0")),
            (5, None),
            (6, Some("nudge")),
            (7, Some("2")),
            (8, Some("3")),
        ]
    );
    assert!(matches!(wf.program[1], Instr::Branch { else_pc: 6, .. }));
    // The inner `if` has no else: false continues after its then-steps, no jump.
    assert!(matches!(wf.program[3], Instr::Branch { else_pc: 5, .. }));
    assert_eq!(wf.program[5], Instr::Jump { to: 7 });
    assert!(matches!(
        &wf.program[4],
        Instr::SendSms {
            uses_login_url: true,
            ..
        }
    ));
    assert!(
        matches!(&wf.program[6], Instr::SendEmail { from: Some(f), uses_login_url: false, .. } if f == "B <b@x.test>")
    );
    assert!(matches!(
        &wf.program[0],
        Instr::SendEmail { from: None, .. }
    ));
    let at = chrono::NaiveTime::from_hms_opt(9, 0, 0).unwrap();
    let until = WaitSpec::Until {
        at,
        days: vec![chrono::Weekday::Mon, chrono::Weekday::Fri],
        timezone: TimezoneChoice::Fixed(chrono_tz::Europe::Berlin),
    };
    assert_eq!(
        wf.program[7],
        Instr::Wait {
            step_id: "2".into(),
            wait: until
        }
    );
    let event_wait = WaitSpec::Event {
        event: EventType::LessonCompleted,
        timeout: "3d".parse().unwrap(),
    };
    assert_eq!(
        wf.program[8],
        Instr::Wait {
            step_id: "3".into(),
            wait: event_wait
        }
    );
}

#[test]
fn step_ids_must_be_unique() {
    let e = errors(&with_steps(
        "trigger: {event: new_signup}",
        &[
            "  - id: hello",
            "    wait: 1d",
            "  - wait: 2d",
            "  - id: hello",
            "    wait: 3d",
            "  - id: \"1\"",
            "    wait: 4d",
        ],
    ));
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e[0].starts_with(
            "workflows/t.yaml:7:9: error: step id `hello` is already used by the step at line 4"
        ),
        "{e:#?}"
    );
    assert!(
        e[1].starts_with(
            "workflows/t.yaml:9:9: error: step id `1` is already used by the step at line 6"
        ),
        "{e:#?}"
    );
}

// --- schema errors ---------------------------------------------------------------------------

#[test]
fn schema_errors_name_line_and_column() {
    let e = errors(&yaml(&[
        "name: T",
        "trigger: {event: new_signup}",
        "stepz: []",
    ]));
    assert_one(
        &e,
        "workflows/t.yaml:3:1: error: unknown field `stepz`, expected one of",
    );

    let e = errors(&yaml(&[
        "name: T",
        "enabled: maybe",
        "trigger: {event: new_signup}",
        "steps: []",
    ]));
    assert_one(&e, "workflows/t.yaml:2:10: error: invalid boolean");

    let e = errors(&yaml(&[
        "name: T",
        "name: U",
        "trigger: {event: new_signup}",
        "steps: []",
    ]));
    assert_one(
        &e,
        "workflows/t.yaml:2:1: error: duplicate mapping key `name`",
    );

    let e = errors(&yaml(&["name: T", "trigger: {event: new_signup}"]));
    assert_one(&e, "workflows/t.yaml:2:1: error: missing field `steps`");

    let e = errors(&with_steps(
        "trigger: {event: new_signup}",
        &["  - send_email:", "      subject: s", "      txt: t"],
    ));
    assert_one(
        &e,
        "workflows/t.yaml:6:7: error: unknown field `txt`, expected one of",
    );

    let e = errors(&yaml(&[
        "name: T",
        "trigger:",
        "  event: new_signup",
        "  where:",
        "    offer.id: {nto: [a]}",
        "steps: []",
    ]));
    assert_one(
        &e,
        "workflows/t.yaml:5:16: error: unknown field `nto`, expected one of not",
    );
}

#[test]
fn unknown_and_doubled_step_kinds() {
    let e = errors(&with_steps(
        "trigger: {event: new_signup}",
        &["  - wait: 1d", "  - id: x", "    send_mail: {subject: x}"],
    ));
    assert_one(
        &e,
        "workflows/t.yaml:6:5: error: unknown step kind `send_mail`: a step is one of send_email, send_sms, wait, if",
    );

    let e = errors(&with_steps(
        "trigger: {event: new_signup}",
        &["  - wait: 1d", "    send_sms: {body: x}"],
    ));
    assert_one(
        &e,
        "workflows/t.yaml:5:5: error: a step has exactly one kind, but `send_sms` follows another",
    );

    let e = errors(&with_steps(
        "trigger: {event: new_signup}",
        &["  - id: lonely", "  - wait: 1d", "    then: [{wait: 1d}]"],
    ));
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e[0].starts_with(
            "workflows/t.yaml:4:5: error: a step needs one of send_email, send_sms, wait, if"
        ),
        "{e:#?}"
    );
    assert!(
        e[1].starts_with("workflows/t.yaml:6:11: error: `then` belongs to an `if` step"),
        "{e:#?}"
    );
}

// --- triggers ---------------------------------------------------------------------------------

#[test]
fn unknown_triggers_list_the_valid_ones() {
    let e = errors(&yaml(&[
        "name: T",
        "trigger: {event: [new_signup, lesson_complete]}",
        "steps: []",
    ]));
    assert_one(
        &e,
        "workflows/t.yaml:2:31: error: unknown trigger `lesson_complete`: valid triggers are category_started, ",
    );
    assert!(e[0].ends_with("product_completed, user_login"), "{e:?}");

    let e = errors(&yaml(&[
        "name: T",
        "trigger:",
        "  event: signup",
        "exit_when: {event: finished}",
        "steps: []",
    ]));
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(e[0].starts_with("workflows/t.yaml:3:10: error: unknown trigger `signup`"));
    assert!(e[1].starts_with("workflows/t.yaml:4:20: error: unknown trigger `finished`"));
}

fn schedule(lines: &[&str]) -> Schedule {
    let wf = compiled_with(
        &yaml(lines),
        &[("weekly.html.hbs", "Hi {{contact.first_name}}")],
        &[],
    )
    .0;
    wf.schedule().cloned().expect("a schedule trigger")
}

fn at(text: &str) -> chrono::DateTime<chrono::Utc> {
    text.parse().expect("an RFC 3339 instant")
}

const WEEKLY: [&str; 9] = [
    "name: Weekly",
    "re_entry: true",
    "trigger:",
    "  schedule: \"0 9 * * MON\"",
    "  timezone: Europe/Berlin",
    "  audience: {offers: [o_pro, o_basic], products: [p_async], inactive_for: 7d}",
    "steps:",
    "  - send_email: {subject: Still there?, template: weekly}",
    "",
];

#[test]
fn a_schedule_trigger_compiles_with_its_zone_and_audience() {
    let s = schedule(&WEEKLY);
    assert_eq!(s.expression, "0 9 * * MON");
    assert_eq!(s.timezone, Some(chrono_tz::Europe::Berlin));
    assert_eq!(
        s.audience,
        Audience {
            offers: vec!["o_basic".into(), "o_pro".into()],
            products: vec!["p_async".into()],
            inactive_for: Some("7d".parse().unwrap()),
        }
    );
    // Monday 2026-11-30, 09:00 in Berlin is 08:00 UTC.
    let berlin = chrono_tz::UTC;
    let tick = s.latest_tick(at("2026-12-02T12:00:00Z"), berlin).unwrap();
    assert_eq!(tick.at, at("2026-11-30T08:00:00Z"));
    assert_eq!(tick.local, "2026-11-30T09:00");
    assert_eq!(
        s.latest_tick(at("2026-11-30T08:00:00Z"), berlin)
            .unwrap()
            .at,
        at("2026-11-30T08:00:00Z"),
        "a tick is due at its own instant"
    );
    assert_eq!(
        s.next_tick(at("2026-11-30T08:00:00Z"), berlin),
        Some(at("2026-12-07T08:00:00Z"))
    );
}

#[test]
fn a_schedule_without_a_zone_ticks_in_the_default_zone() {
    let mut lines = WEEKLY;
    lines[4] = "  # no zone";
    let s = schedule(&lines);
    assert_eq!(s.timezone, None);
    let tick = s
        .latest_tick(at("2026-12-02T12:00:00Z"), chrono_tz::America::New_York)
        .unwrap();
    assert_eq!(tick.at, at("2026-11-30T14:00:00Z"));
}

#[test]
fn a_schedule_tick_keeps_its_wall_clock_name_across_daylight_saving() {
    // 01:30 every day in New York: on 2026-11-01 the clocks go back at 02:00, so 01:30 happens
    // twice; both instants carry the same name, which is what makes it one tick.
    let mut lines = WEEKLY;
    lines[3] = "  schedule: \"30 1 * * *\"";
    lines[4] = "  timezone: America/New_York";
    let s = schedule(&lines);
    let default = chrono_tz::UTC;
    let first = s.latest_tick(at("2026-11-01T05:45:00Z"), default).unwrap();
    assert_eq!(first.local, "2026-11-01T01:30");
    let later = s.latest_tick(at("2026-11-01T06:45:00Z"), default).unwrap();
    assert_eq!(later.local, "2026-11-01T01:30", "{later:?}");
    // Spring forward (2026-03-08, 02:00 -> 03:00): 01:30 exists once.
    let spring = s.latest_tick(at("2026-03-08T12:00:00Z"), default).unwrap();
    assert_eq!(spring.local, "2026-03-08T01:30");
}

#[test]
fn schedule_triggers_are_checked() {
    let e = errors(&yaml(&[
        "name: T",
        "trigger:",
        "  schedule: \"0 9 * MON\"",
        "  timezone: Europe/Berlin",
        "  audience: {offers: [o_pro]}",
        "steps: []",
    ]));
    assert_one(
        &e,
        "workflows/t.yaml:3:13: error: `0 9 * MON` is not a 5-field cron expression",
    );

    let e = errors(&yaml(&[
        "name: T",
        "trigger:",
        "  schedule: \"0 9 * * MON\"",
        "  timezone: contact",
        "  audience: {offers: [o_pro], inactive_for: 7 days}",
        "steps: []",
    ]));
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(e[0].starts_with("workflows/t.yaml:4:13: error: a schedule ticks once for everyone"));
    assert!(e[1].starts_with("workflows/t.yaml:5:45: error:"), "{e:#?}");

    let e = errors(&yaml(&[
        "name: T",
        "trigger:",
        "  schedule: \"0 9 * * MON\"",
        "steps: []",
    ]));
    assert_one(
        &e,
        "workflows/t.yaml:3:13: error: a schedule trigger needs `audience:`",
    );

    let e = errors(&yaml(&[
        "name: T",
        "trigger:",
        "  event: new_signup",
        "  timezone: Europe/Berlin",
        "steps: []",
    ]));
    assert_one(
        &e,
        "workflows/t.yaml:4:13: error: `timezone` belongs to schedule triggers",
    );
}

#[test]
fn a_scheduled_run_sees_the_contact_only() {
    let e = errors_with(
        &yaml(&[
            "name: T",
            "trigger:",
            "  schedule: \"0 9 * * MON\"",
            "  audience: {offers: [o_pro]}",
            "steps:",
            "  - send_email: {subject: Hi, template: weekly}",
        ]),
        &[(
            "weekly.html.hbs",
            "{{offer.title}} for {{contact.first_name}}",
        )],
    );
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(e[0].contains("offer.title"), "{e:#?}");
}

#[test]
fn an_audience_of_everyone_is_a_warning() {
    let (_, warnings) = compiled_with(
        &yaml(&[
            "name: T",
            "trigger:",
            "  schedule: \"0 9 * * MON\"",
            "  audience: {}",
            "steps: []",
        ]),
        &[],
        &[],
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0]
            .to_string()
            .contains("every contact herald knows")
    );
}

#[test]
fn where_paths_must_be_well_formed_and_carried() {
    let e = errors(&yaml(&[
        "name: T",
        "trigger:",
        "  event: offer_access_granted",
        "  where:",
        "    lesson.id: l_1",
        "    \"offer..id\": x",
        "    offer.title: [[a]]",
        "    event.typ: x",
        "    offer.id: []",
        "    product.id: {not: [p_free]}",
        "    wat: {not: [1]}",
        "exit_when:",
        "  event: lesson_completed",
        "  where: {lesson.id: l_1, wat.id: 1}",
        "steps: []",
    ]));
    let expected = [
        "workflows/t.yaml:5:5: error: field `lesson.id` can never be filled: offer_access_granted events carry contact, offer (and event.*), never lesson",
        "workflows/t.yaml:6:5: error: `offer..id` is not a field path",
        "workflows/t.yaml:7:18: error: `where` values are strings, numbers or true/false, not [\"a\"]",
        "workflows/t.yaml:8:5: error: field `event.typ` does not exist: event has id, source, type and time",
        "workflows/t.yaml:9:15: error: an empty list never matches",
        "workflows/t.yaml:11:5: warning: field `wat` names an object herald does not know (fields start with event, category, contact, lesson, offer, product)",
        "workflows/t.yaml:14:27: warning: field `wat.id` names an object herald does not know",
    ];
    assert_eq!(e.len(), expected.len(), "{e:#?}");
    for (got, want) in e.iter().zip(expected) {
        assert!(
            got.starts_with(want),
            "\n got: {got}\nwant: {want}\nall: {e:#?}"
        );
    }
}

// --- values: durations, times, zones, days ------------------------------------------------------

#[test]
fn invalid_durations_times_zones_and_days() {
    let e = errors(&yaml(&[
        "name: T",
        "trigger: {event: new_signup}",
        "send_window:",
        "  days: [mon, tuesday]",
        "  between: [\"18:00\", \"09:00\"]",
        "  timezone: Europe/Berlinn",
        "steps:",
        "  - wait: 2 days",
        "  - wait: {event: lesson_completed, timeout: 3x}",
        "  - wait: {until: \"9h\", days: []}",
        "  - wait: {event: lesson_completed}",
        "  - wait: {until: \"09:00\", event: new_signup}",
    ]));
    let expected = [
        "workflows/t.yaml:4:15: error: unknown weekday `tuesday`: use mon, tue, wed, thu, fri, sat, sun",
        "workflows/t.yaml:6:13: error: unknown time zone `Europe/Berlinn`",
        "workflows/t.yaml:5:12: error: the window must open before it closes",
        "workflows/t.yaml:8:11: error: invalid duration \"2 days\"",
        "workflows/t.yaml:9:46: error: invalid duration \"3x\"",
        "workflows/t.yaml:10:19: error: `9h` is not a time of day",
        "workflows/t.yaml:10:31: error: `days` lists no day",
        "workflows/t.yaml:11:11: error: waiting for an event needs `timeout:`",
        "workflows/t.yaml:12:11: error: wait either `until` a time or for an `event`, not both",
    ];
    assert_eq!(e.len(), expected.len(), "{e:#?}");
    for (got, want) in e.iter().zip(expected) {
        assert!(
            got.starts_with(want),
            "\n got: {got}\nwant: {want}\nall: {e:#?}"
        );
    }
}

#[test]
fn conditions_need_exactly_one_test() {
    let e = errors(&with_steps(
        "trigger: {event: offer_access_granted}",
        &[
            "  - if: {field: offer.id, equals: a, in: [b]}",
            "    then: []",
            "  - if: {all: []}",
            "    then: []",
            "  - if: {any: [{field: lesson.id, exists: true}, {equals: x}]}",
            "    then: []",
            "  - if: {field: offer.id, gt: [1]}",
        ],
    ));
    let expected = [
        "workflows/t.yaml:4:9: error: a condition has exactly one test of equals, not_equals, in, contains, exists, gt, lt; this one has 2",
        "workflows/t.yaml:6:9: error: list at least one condition",
        "workflows/t.yaml:8:24: error: field `lesson.id` can never be filled",
        "workflows/t.yaml:8:50: error: a condition needs `field` and a test",
        "workflows/t.yaml:10:9: error: compare with strings, numbers or true/false",
        "workflows/t.yaml:10:9: error: an `if` step needs `then:`",
    ];
    assert_eq!(e.len(), expected.len(), "{e:#?}");
    for (got, want) in e.iter().zip(expected) {
        assert!(
            got.starts_with(want),
            "\n got: {got}\nwant: {want}\nall: {e:#?}"
        );
    }
}

#[test]
fn conditions_and_filters_on_the_contacts_state_compile() {
    let wf = compiled(&yaml(&[
        "name: T",
        "trigger:",
        "  event: lesson_completed",
        "  where:",
        "    holds_offer: {not: [o_pro]}",
        "    lesson.id: l_1",
        "steps:",
        "  - if:",
        "      any:",
        "        - holds_product: [p_1, p_2]",
        "        - not: {completed_lesson: l_2}",
        "        - completed_category: 7",
        "    then:",
        "      - send_email: {subject: s, text: t}",
    ]));
    assert!(wf.reads_contact_state);
    let Trigger::Events(m) = &wf.trigger else {
        panic!("an event trigger")
    };
    assert_eq!(
        m.filters[0],
        FieldFilter {
            subject: FilterSubject::State(StateFact::HoldsOffer),
            negated: true,
            values: vec![json!("o_pro")]
        }
    );
    let Instr::Branch { condition, .. } = &wf.program[0] else {
        panic!("a branch first: {:?}", wf.program)
    };
    assert_eq!(
        condition,
        &Condition::Any(vec![
            Condition::State {
                fact: StateFact::HoldsProduct,
                ids: vec!["p_1".into(), "p_2".into()]
            },
            Condition::Not(Box::new(Condition::State {
                fact: StateFact::CompletedLesson,
                ids: vec!["l_2".into()]
            })),
            Condition::State {
                fact: StateFact::CompletedCategory,
                ids: vec!["7".into()]
            },
        ])
    );
    let lesson = |id: &str| {
        event(
            "lesson_completed",
            json!({"contact": {"id": "c"}, "product": {"id": "p"}, "lesson": {"id": id}}),
        )
    };
    let pro = ContactState {
        offers: ["o_pro".to_string()].into(),
        ..ContactState::default()
    };
    assert!(wf.triggered_by(&lesson("l_1"), &ContactState::default()));
    assert!(!wf.triggered_by(&lesson("l_1"), &pro));
    assert!(!wf.triggered_by(&lesson("l_9"), &ContactState::default()));
    // A workflow reading only the event does not load the state.
    assert!(
        !compiled(&with_steps(
            "trigger: {event: new_signup}",
            &["  - wait: 1d"]
        ))
        .reads_contact_state
    );
}

#[test]
fn state_conditions_are_checked() {
    let e = errors(&with_steps(
        "trigger: {event: offer_access_granted}",
        &[
            "  - if: {holds_offer: o_1, completed_lesson: l_1}",
            "    then: []",
            "  - if: {holds_offer: []}",
            "    then: []",
            "  - if: {not: {holds_product: {id: p}}}",
            "    then: []",
            "  - if: {not: {field: offer.id, equals: a}, field: offer.id, exists: true}",
            "    then: []",
        ],
    ));
    let expected = [
        "workflows/t.yaml:4:9: error: a condition is one of `all`/`any`, `not`, a fact such as `holds_offer`, or `{field, test}`",
        "workflows/t.yaml:6:23: error: `holds_offer` takes an id or a list of ids",
        "workflows/t.yaml:8:31: error: `holds_product` takes an id or a list of ids",
        "workflows/t.yaml:10:9: error: a condition is one of",
    ];
    assert_eq!(e.len(), expected.len(), "{e:#?}");
    for (got, want) in e.iter().zip(expected) {
        assert!(
            got.starts_with(want),
            "\n got: {got}\nwant: {want}\nall: {e:#?}"
        );
    }
}

// --- templates ---------------------------------------------------------------------------------

#[test]
fn missing_template_files_point_at_the_reference() {
    let e = errors(&with_steps(
        "trigger: {event: new_signup}",
        &[
            "  - send_email:",
            "      subject: s",
            "      template: welcome",
            "  - send_sms: {template: nudge}",
            "  - send_sms: {template: ../x}",
        ],
    ));
    let expected = [
        "workflows/t.yaml:6:17: error: template `welcome` not found: create templates/welcome.html.hbs and/or templates/welcome.txt.hbs",
        "workflows/t.yaml:7:26: error: template `nudge` not found: create templates/nudge.sms.hbs",
        "workflows/t.yaml:8:26: error: `../x` is not a template name",
    ];
    assert_eq!(e.len(), expected.len(), "{e:#?}");
    for (got, want) in e.iter().zip(expected) {
        assert!(got.starts_with(want), "\n got: {got}\nwant: {want}");
    }
    // One body is enough.
    let yaml = with_steps(
        "trigger: {event: new_signup}",
        &["  - send_email: {subject: s, template: welcome}"],
    );
    compiled_with(&yaml, &[("welcome.txt.hbs", "hi")], &[]);
}

#[test]
fn email_and_sms_need_one_source_of_body() {
    let e = errors(&with_steps(
        "trigger: {event: new_signup}",
        &[
            "  - send_email: {subject: s}",
            "  - send_email: {subject: s, template: w, text: t}",
            "  - send_sms: {}",
            "  - send_sms: {body: b, template: w}",
        ],
    ));
    let expected = [
        "workflows/t.yaml:4:17: error: an email needs `template`, or inline `html` and/or `text`",
        "workflows/t.yaml:5:40: error: use either `template` or inline `html`/`text`, not both",
        "workflows/t.yaml:6:15: error: an SMS needs `body` or `template`",
        "workflows/t.yaml:7:35: error: use either `body` or `template`, not both",
    ];
    assert_eq!(e.len(), expected.len(), "{e:#?}");
    for (got, want) in e.iter().zip(expected) {
        assert!(
            got.starts_with(want),
            "\n got: {got}\nwant: {want}\nall: {e:#?}"
        );
    }
}

#[test]
fn template_syntax_errors_point_into_the_template() {
    let e = errors_with(
        &with_steps(
            "trigger: {event: new_signup}",
            &["  - send_email: {subject: s, template: welcome}"],
        ),
        &[(
            "welcome.html.hbs",
            "<p>\n  {{#if contact.first_name}}x\n</p>\n",
        )],
    );
    assert_one(
        &e,
        "templates/welcome.html.hbs:4:1: error: template does not parse: invalid handlebars syntax",
    );

    let e = errors(&with_steps(
        "trigger: {event: new_signup}",
        &[
            "  - send_email:",
            "      subject: \"Hi {{contact.first_name\"",
            "      text: x",
        ],
    ));
    assert_one(&e, "workflows/t.yaml:5:40: error: template does not parse");
}

#[test]
fn merge_fields_the_trigger_never_carries() {
    let steps = [
        "  - send_email:",
        "      subject: \"Done: {{lesson.title}}\"",
        "      template: welcome",
        "  - send_sms:",
        "      body: |",
        "        Hello {{contact.custom_fields.company}} {{event.type}}",
        "        {{#if lesson}}{{lesson.id}}{{/if}} {{#each offer.product_ids}}{{title}}{{/each}}",
        "  - send_sms: {body: 'x {{event.foo}} {{wat}}'}",
    ];
    let templates = [(
        "welcome.txt.hbs",
        "Hi {{contact.first_name}}\nYou finished {{lesson.title}}.\n",
    )];
    let e = errors_with(
        &with_steps("trigger: {event: offer_access_granted}", &steps),
        &templates,
    );
    let expected = [
        "workflows/t.yaml:5:23: error: merge field `lesson.title` can never be filled: offer_access_granted events carry contact, offer (and event.*), never lesson",
        "templates/welcome.txt.hbs:2:14: error: merge field `lesson.title` can never be filled",
        "workflows/t.yaml:10:9: error: merge field `lesson` can never be filled",
        "workflows/t.yaml:10:23: error: merge field `lesson.id` can never be filled",
        "workflows/t.yaml:11:25: error: merge field `event.foo` does not exist",
        "workflows/t.yaml:11:39: warning: merge field `wat` names an object herald does not know",
    ];
    assert_eq!(e.len(), expected.len(), "{e:#?}");
    for (got, want) in e.iter().zip(expected) {
        assert!(got.starts_with(want), "\n got: {got}\nwant: {want}");
    }

    // A second trigger that carries lessons makes the lesson fields acceptable.
    let yaml = with_steps(
        "trigger: {event: [offer_access_granted, lesson_completed]}",
        &steps[..7],
    );
    compiled_with(&yaml, &templates, &[]);
}

#[test]
fn custom_values_must_be_known() {
    let yaml = with_steps(
        "trigger: {event: new_signup}",
        &[
            "  - send_email:",
            "      subject: \"Hi\"",
            "      text: \"Write to <<support_email>> or <<login_url>> <<unsubscribe_url>>\"",
        ],
    );
    let e = errors(&yaml);
    assert_one(
        &e,
        "workflows/t.yaml:6:23: error: unknown custom value `<<support_email>>`: known are login_url, unsubscribe_url",
    );
    let (wf, warnings) = compiled_with(&yaml, &[], &["support_email"]);
    assert!(warnings.is_empty());
    assert!(matches!(
        wf.program[0],
        Instr::SendEmail {
            uses_login_url: true,
            ..
        }
    ));
}

#[test]
fn login_url_after_offer_access_removed_is_a_warning() {
    let yaml = with_steps(
        "trigger: {event: [offer_access_removed, product_access_removed]}",
        &["  - send_sms: {template: comeback}"],
    );
    let (wf, warnings) = compiled_with(
        &yaml,
        &[("comeback.sms.hbs", "Miss us?\nLog in: <<login_url>>")],
        &[],
    );
    let shown: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_one(
        &shown,
        "templates/comeback.sms.hbs:2:9: warning: `<<login_url>>` in a workflow triggered by offer_access_removed",
    );
    assert!(matches!(
        wf.program[0],
        Instr::SendSms {
            uses_login_url: true,
            ..
        }
    ));

    let (_, warnings) = compiled_with(
        &yaml.replace("offer_access_removed, ", ""),
        &[("comeback.sms.hbs", "<<login_url>>")],
        &[],
    );
    assert!(warnings.is_empty());
}

#[test]
fn unsupported_template_constructs_are_errors() {
    let e = errors(&with_steps(
        "trigger: {event: new_signup}",
        &["  - send_sms: {body: \"{{> footer}} {{upper contact.first_name}}\"}"],
    ));
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e[0].starts_with("workflows/t.yaml:4:23: error: partials are not supported"),
        "{e:?}"
    );
    assert!(
        e[1].starts_with("workflows/t.yaml:4:36: error: unknown helper `upper`"),
        "{e:?}"
    );
}

#[test]
fn from_addresses_default_and_are_checked() {
    let wf = compiled(&yaml(&[
        "name: T",
        "trigger: {event: new_signup}",
        "from: \"Ada <ada@x.test>\"",
        "steps:",
        "  - send_email: {subject: s, text: t}",
        "  - send_email: {subject: s, text: t, from: bo@x.test}",
    ]));
    assert!(
        matches!(&wf.program[0], Instr::SendEmail { from: Some(f), .. } if f == "Ada <ada@x.test>")
    );
    assert!(matches!(&wf.program[1], Instr::SendEmail { from: Some(f), .. } if f == "bo@x.test"));

    let e = errors(&yaml(&[
        "name: T",
        "trigger: {event: new_signup}",
        "from: nobody",
        "steps: []",
    ]));
    assert_one(
        &e,
        "workflows/t.yaml:3:7: error: `from` must be one email address",
    );
}

#[test]
fn compiled_workflows_can_be_shared_across_tasks() {
    fn shareable<T: Send + Sync>() {}
    shareable::<CompiledWorkflow>();
}

#[test]
fn an_empty_name_is_refused() {
    let e = errors(&yaml(&[
        "name: \" \"",
        "trigger: {event: new_signup}",
        "steps: []",
    ]));
    assert_one(&e, "workflows/t.yaml:1:7: error: `name` must not be empty");
}

#[test]
fn waits_and_timeouts_longer_than_ten_years_are_refused_where_written() {
    let e = errors(&with_steps(
        "trigger: {event: new_signup}",
        &[
            "  - wait: 10000000000000s",
            "  - wait: {event: lesson_completed, timeout: 3651d}",
            "  - wait: 3650d",
            "  - wait: 99999999999999999999999w",
        ],
    ));
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(
        e[0].starts_with("workflows/t.yaml:4:11: error: \"10000000000000s\" is too long to place on a calendar: at most 10 years (3650d)"),
        "{e:#?}"
    );
    assert!(
        e[1].starts_with("workflows/t.yaml:5:46: error: \"3651d\" is too long"),
        "{e:#?}"
    );
    assert!(
        e[2].starts_with("workflows/t.yaml:7:11: error: invalid duration"),
        "{e:#?}"
    );
}

#[test]
fn unescaped_values_in_html_are_a_warning() {
    let yaml = with_steps(
        "trigger: {event: new_signup}",
        &["  - send_email: {subject: Hi, template: hello}"],
    );
    let (_, warnings) = compiled_with(
        &yaml,
        &[
            (
                "hello.html.hbs",
                "<p>Hi {{contact.first_name}}</p>\n<p>{{{contact.last_name}}}</p>",
            ),
            ("hello.txt.hbs", "Hi {{{contact.first_name}}}"),
        ],
        &[],
    );
    let shown: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_one(
        &shown,
        "templates/hello.html.hbs:2:4: warning: `{{{contact.last_name}}}` writes contact.last_name into the HTML without escaping",
    );
    assert_eq!(shown.len(), 1, "plain text is not HTML: {shown:?}");
}

#[test]
fn category_is_marketing_unless_transactional() {
    let steps = ["  - send_email: {subject: Hi, text: Hello}"];
    let plain = compiled(&with_steps("trigger: {event: new_signup}", &steps));
    assert_eq!(plain.category, super::Category::Marketing);
    let tx = compiled(&with_steps(
        "category: transactional\ntrigger: {event: new_signup}",
        &steps,
    ));
    assert_eq!(tx.category, super::Category::Transactional);
    let e = errors(&with_steps(
        "category: newsletter\ntrigger: {event: new_signup}",
        &steps,
    ));
    assert!(
        e.len() == 1 && e[0].contains("newsletter") && e[0].contains("transactional"),
        "{e:?}"
    );
}

#[test]
fn the_diagram_shows_every_step_and_both_branches() {
    let yaml = with_steps(
        "trigger: {event: [offer_access_granted, new_signup]}",
        &[
            "  - id: hello",
            "    send_email: {subject: Hi, text: Hello}",
            "  - wait: 2d",
            "  - id: check",
            "    if: {field: offer.id, equals: o_pro}",
            "    then:",
            "      - id: pro_tip",
            "        send_sms: {body: \"Tip \\\"one\\\"\"}",
            "    else:",
            "      - wait: {event: lesson_completed, timeout: 3d}",
        ],
    );
    let diagram = compiled(&yaml).mermaid(&Default::default());
    for expected in [
        "flowchart TD",
        r#"start(["offer_access_granted or new_signup"]) --> s0"#,
        r#"s0["email: hello"]"#,
        r#"s1[/"wait 2d"/]"#,
        "s2 -->|yes| s3",
        r#"s3["SMS: pro_tip"]"#,
        r#"wait for lesson_completed, at most 3d"#,
        "done([done])",
    ] {
        assert!(
            diagram.contains(expected),
            "missing {expected:?} in:\n{diagram}"
        );
    }
    assert!(diagram.contains("s2 -->|no| s5"), "{diagram}");
}

#[test]
fn typos_in_field_names_are_caught_with_a_suggestion() {
    let steps = [
        "  - send_email:",
        "      subject: \"Hi {{contact.frist_name}}\"",
        "      text: \"{{offer.titel}} {{contcat.first_name}} {{contact.custom_fields.anything}}\"",
        "  - send_sms: {body: '{{offer.coupon}} {{coupon.code}} {{contact.last_name}}'}",
    ];
    let e = errors_with(
        &with_steps("trigger: {event: offer_access_granted}", &steps),
        &[],
    );
    let expected = [
        "workflows/t.yaml:5:20: error: merge field `contact.frist_name` is not a field of contact: did you mean `contact.first_name`?",
        "workflows/t.yaml:6:14: error: merge field `offer.titel` is not a field of offer: did you mean `offer.title`?",
        "workflows/t.yaml:6:30: error: unknown merge field `contcat.first_name`: did you mean `contact`?",
        "workflows/t.yaml:7:23: warning: merge field `offer.coupon` is not a field herald knows of offer (id, title, product_ids)",
        "workflows/t.yaml:7:40: warning: merge field `coupon.code` names an object herald does not know",
    ];
    assert_eq!(e.len(), expected.len(), "{e:#?}");
    for (got, want) in e.iter().zip(expected) {
        assert!(
            got.starts_with(want),
            "\n got: {got}\nwant: {want}\nall: {e:#?}"
        );
    }
}

#[test]
fn a_link_in_a_subject_is_refused() {
    let steps = ["  - send_email: {subject: \"Sign in: <<login_url>>\", text: \"Hi\"}"];
    let e = errors_with(
        &with_steps("trigger: {event: offer_access_granted}", &steps),
        &[],
    );
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(
        e[0].starts_with("workflows/t.yaml:4:37: error: `<<login_url>>` in a subject"),
        "{e:#?}"
    );
}

const LAYOUT_HTML: &str = "<div class=\"brand\">{{contact.first_name}}</div>{{{body}}}<footer><<unsubscribe_url>></footer>";
const LAYOUT_TEXT: &str = "{{body}}\n--\nSchool · <<unsubscribe_url>>";

fn layout_templates<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut t = vec![
        ("layout.html.hbs", LAYOUT_HTML),
        ("layout.txt.hbs", LAYOUT_TEXT),
        ("plain.txt.hbs", "{{body}} (plain)"),
    ];
    t.extend_from_slice(extra);
    t
}

fn render_layout_email(yaml: &str, pc: usize) -> crate::template::RenderedEmail {
    let (wf, warnings) = compiled_with(yaml, &layout_templates(&[]), &[]);
    assert!(warnings.is_empty(), "{warnings:?}");
    let event = event(
        "new_signup",
        json!({"contact": {"id": "c1", "first_name": "Ann <b>"}}),
    );
    let custom = crate::template::CustomValues::from([(
        "unsubscribe_url".to_owned(),
        "https://h.test/u/x?a=1".to_owned(),
    )]);
    wf.render_email(pc, &event.template_context(), &custom)
        .unwrap()
}

#[test]
fn the_default_layout_wraps_every_email() {
    let yaml = with_steps(
        "trigger: {event: new_signup}",
        &[
            "  - send_email: {subject: Hi, html: \"<p>Hi {{contact.first_name}}</p>\", text: \"Hi\"}",
        ],
    );
    let email = render_layout_email(&yaml, 0);
    assert_eq!(
        email.html.as_deref(),
        Some(
            "<div class=\"brand\">Ann &lt;b&gt;</div><p>Hi Ann &lt;b&gt;</p><footer>https://h.test/u/x?a&#x3D;1</footer>"
        ),
        "the body is placed as rendered, values escaped once (as everywhere in HTML)"
    );
    assert_eq!(
        email.text.as_deref(),
        Some("Hi\n--\nSchool · https://h.test/u/x?a=1")
    );
}

#[test]
fn a_workflow_or_step_chooses_its_layout_or_none() {
    let yaml = yaml(&[
        "name: T",
        "layout: plain",
        "trigger: {event: new_signup}",
        "steps:",
        "  - send_email: {subject: A, text: \"a\"}",
        "  - send_email: {subject: B, text: \"b\", layout: none}",
        "  - send_email: {subject: C, text: \"c\", layout: layout}",
    ]);
    assert_eq!(
        render_layout_email(&yaml, 0).text.as_deref(),
        Some("a (plain)")
    );
    assert_eq!(render_layout_email(&yaml, 1).text.as_deref(), Some("b"));
    assert_eq!(
        render_layout_email(&yaml, 2).text.as_deref(),
        Some("c\n--\nSchool · https://h.test/u/x?a=1")
    );
}

#[test]
fn layouts_are_checked_like_templates() {
    let missing = yaml(&[
        "name: T",
        "trigger: {event: new_signup}",
        "steps:",
        "  - send_email: {subject: A, text: \"a\", layout: brand}",
    ]);
    let e = errors_with(&missing, &layout_templates(&[]));
    assert_one(
        &e,
        "workflows/t.yaml:4:49: error: layout `brand` not found: create templates/brand.html.hbs",
    );

    let plain = with_steps(
        "trigger: {event: new_signup}",
        &["  - send_email: {subject: A, text: \"a\", layout: brand}"],
    );
    let e = errors_with(
        &plain,
        &[("brand.txt.hbs", "No body here, {{contact.frist_name}}")],
    );
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e.iter().any(|d| d
            .starts_with("templates/brand.txt.hbs:1:15: error: merge field `contact.frist_name`")),
        "{e:#?}"
    );
    assert!(
        e.iter()
            .any(|d| d.contains("a layout places the email with {{body}}")),
        "{e:#?}"
    );

    // A sign-in link in the layout makes every email of the workflow mint one.
    let (wf, _) = compiled_with(&plain, &[("brand.txt.hbs", "{{body}} <<login_url>>")], &[]);
    assert!(matches!(
        wf.program[0],
        Instr::SendEmail {
            uses_login_url: true,
            ..
        }
    ));
}

#[test]
fn steps_after_an_event_wait_read_received_and_awaited() {
    let steps = [
        "  - wait: {event: lesson_completed, timeout: 3d}",
        "  - if: {field: received, equals: true}",
        "    then:",
        "      - send_email: {subject: \"Great start on {{awaited.lesson.title}}\", text: \"{{awaited.event.time}}\"}",
        "    else:",
        "      - send_email: {subject: \"Lesson 1 is waiting\", text: \"{{awaited.lesson.titel}}\"}",
    ];
    let e = errors(&with_steps(
        "trigger: {event: offer_access_granted}",
        &steps,
    ));
    assert_one(
        &e,
        "workflows/t.yaml:9:61: error: merge field `awaited.lesson.titel` is not a field of lesson: did you mean `awaited.lesson.title`?",
    );
    let mut fixed = steps;
    fixed[5] = "      - send_email: {subject: \"Lesson 1 is waiting\", text: \"{{#if received}}?{{/if}}\"}";
    compiled(&with_steps(
        "trigger: {event: offer_access_granted}",
        &fixed,
    ));

    let e = errors(&with_steps(
        "trigger: {event: offer_access_granted}",
        &["  - if: {field: received, equals: true}", "    then: []"],
    ));
    assert_one(
        &e,
        "workflows/t.yaml:4:17: error: field `received` is set by a `wait: {event: …}` step, and this workflow has none",
    );
}

#[test]
fn format_date_formats_are_checked_by_herald_check() {
    let e = errors(&with_steps(
        "trigger: {event: new_signup}",
        &["  - send_email: {subject: \"Since {{format_date event.time '%Q'}}\", text: \"x\"}"],
    ));
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(e[0].contains("`%Q` is not a date format"), "{e:#?}");
    compiled(&with_steps(
        "trigger: {event: new_signup}",
        &["  - send_email: {subject: \"Since {{format_date event.time '%e %B'}}\", text: \"x\"}"],
    ));
}
