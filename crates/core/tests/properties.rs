//! Properties of herald's edges on generated input: request bodies, webhook headers and secrets,
//! workflow files, templates, durations and times of day. The same checks the libFuzzer targets
//! in `fuzz/` make (see fuzz/README.md), here under plain `cargo test` so that a machine without
//! nightly checks them too: nothing panics, and where cheap, a round trip holds.
//!
//! Case counts are modest so the file runs in seconds; `PROPTEST_CASES=10000` runs longer.
//! Inputs the fuzzer found are plain tests at the end.

use chrono::{DateTime, LocalResult, NaiveTime, TimeDelta, TimeZone, Timelike, Utc, Weekday};
use chrono_tz::Tz;
use herald_core::Duration;
use herald_core::event::{BodyKind, CourseEvent, EventType, parse_body};
use herald_core::signature::{
    SecretError, SignatureError, SignedHeaders, WebhookSecret, parse_secrets, verify,
    verify_signature_only,
};
use herald_core::template::{CustomValues, ParsedTemplate, render_standalone_email};
use herald_core::workflow::{
    CompiledWorkflow, Instr, TimezoneChoice, WaitSpec, WorkflowBundle, add_duration, bundle_from,
    compile, next_local_time, resolve_timezone,
};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// `cases` cases, or `PROPTEST_CASES` when set. Failures are not written to a file: a failing
/// case is printed, and each one the fuzzer found is a test at the end of this file.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn now() -> DateTime<Utc> {
    "2026-11-24T12:00:00Z".parse().expect("a valid instant")
}

/// Instants from 2000 to 2100, whole seconds.
fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    (946_684_800i64..4_102_444_800)
        .prop_map(|secs| DateTime::from_timestamp(secs, 0).expect("in range"))
}

/// Zones with daylight-saving gaps and folds, half-hour changes and odd offsets.
fn zone() -> impl Strategy<Value = Tz> {
    select(vec![
        chrono_tz::UTC,
        chrono_tz::Europe::Berlin,
        chrono_tz::America::New_York,
        chrono_tz::America::Santiago,
        chrono_tz::Australia::Lord_Howe,
        chrono_tz::Asia::Kathmandu,
    ])
}

/// Inserts each `(where, what)` into `text` at a character boundary.
fn splice(mut text: String, inserts: Vec<(Index, String)>) -> String {
    for (at, piece) in inserts {
        let boundaries: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        text.insert_str(*at.get(&boundaries), &piece);
    }
    text
}

// --- event bodies -----------------------------------------------------------------------------

/// Mostly ordinary identifiers, sometimes anything (control characters, very long text).
fn id_text() -> impl Strategy<Value = String> {
    prop_oneof![
        30 => "[a-z_0-9]{1,12}",
        1 => any::<String>(),
        1 => "[a-z]{0,4}[\\x00-\\x1f\\x7f][a-z]{0,4}",
        1 => "[a-z]{257,300}",
    ]
}

/// Mostly ordinary text, sometimes with a line break, tab or another control character.
fn free_text() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => "[A-Za-z ]{0,12}",
        1 => any::<String>(),
        1 => "[a-z]{0,4}[\\x00-\\x1f\\x7f][a-z]{0,4}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        free_text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::from),
            btree_map(free_text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `{"id": ..., "title": ...}`, as offers, products, categories and lessons are sent.
fn course_object() -> impl Strategy<Value = Value> {
    (id_text(), option::of(free_text())).prop_map(|(id, title)| json!({"id": id, "title": title}))
}

/// Events that are mostly valid, with every part sometimes wrong.
fn event_json() -> impl Strategy<Value = Value> {
    let event_type = prop_oneof![
        18 => select(EventType::ALL.to_vec()).prop_map(|t| json!(t.cloudevent_type())),
        1 => free_text().prop_map(Value::from),
        1 => Just(json!(5)),
    ];
    let time = prop_oneof![
        Just(None),
        Just(Some(json!(null))),
        Just(Some(json!("2026-11-24T10:00:00+01:00"))),
        instant().prop_map(|t| Some(json!(t.to_rfc3339()))),
        free_text().prop_map(|t| Some(json!(t))),
    ];
    let contact = (
        id_text(),
        option::of(id_text()),
        option::of(free_text()),
        option::of(json_value()),
    )
        .prop_map(|(id, email, first_name, custom_fields)| {
            json!({"id": id, "email": email, "first_name": first_name, "custom_fields": custom_fields})
        });
    let objects = vec(option::weighted(0.9, course_object()), 4);
    (
        prop_oneof![19 => Just(json!("1.0")), 1 => json_value()],
        id_text(),
        id_text(),
        event_type,
        time,
        contact,
        objects,
        option::of(json_value()),
    )
        .prop_map(
            |(spec, id, source, event_type, time, contact, objects, extension)| {
                let mut data = json!({"contact": contact});
                for (name, object) in ["offer", "product", "category", "lesson"]
                    .iter()
                    .zip(objects)
                {
                    if let Some(object) = object {
                        data[*name] = object;
                    }
                }
                let mut event = json!({"specversion": spec, "id": id, "source": source,
                    "type": event_type, "data": data});
                if let Some(time) = time {
                    event["time"] = time;
                }
                if let Some(extension) = extension {
                    event["subject"] = extension;
                }
                event
            },
        )
}

/// JSON equality, except that floats need only agree to a relative 1e-15 (serde_json's default
/// float parsing may land one unit in the last place away).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// Parses `body` as both kinds; an accepted body, stored and re-posted, gives the same events.
fn check_body(body: &[u8]) -> Result<(), TestCaseError> {
    for kind in [BodyKind::Single, BodyKind::Batch] {
        let Ok(events) = parse_body(kind, body, now()) else {
            continue;
        };
        for event in &events {
            let _ = event.contact_id();
            let _ = event.template_context();
        }
        let stored = match kind {
            BodyKind::Single => events[0].to_json(),
            BodyKind::Batch => Value::Array(events.iter().map(CourseEvent::to_json).collect()),
        };
        let reparsed = parse_body(kind, stored.to_string().as_bytes(), now());
        prop_assert!(reparsed.is_ok(), "a stored event is refused: {reparsed:?}");
        for (again, first) in reparsed.unwrap_or_default().iter().zip(&events) {
            prop_assert_eq!(
                (
                    &again.id,
                    &again.source,
                    again.event_type,
                    again.time,
                    &again.time_raw
                ),
                (
                    &first.id,
                    &first.source,
                    first.event_type,
                    first.time,
                    &first.time_raw
                )
            );
            prop_assert!(same_json(
                &Value::Object(again.data.clone()),
                &Value::Object(first.data.clone())
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_bytes_are_answered_not_panicked_on(body in vec(any::<u8>(), 0..512)) {
        check_body(&body)?;
    }

    #[test]
    fn generated_events_and_batches_survive_storage(events in vec(event_json(), 1..4)) {
        check_body(events[0].to_string().as_bytes())?;
        check_body(Value::Array(events).to_string().as_bytes())?;
    }

    #[test]
    fn damaged_event_json_is_answered_not_panicked_on(
        event in event_json(),
        damage in vec((any::<Index>(), "[\\[\\]{}\",:\\\\0-9a-z\\x00]{1,3}"), 1..4),
    ) {
        check_body(splice(event.to_string(), damage).as_bytes())?;
    }
}

#[test]
fn the_event_generator_makes_mostly_valid_events() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = event_json();
    let accepted = (0..200)
        .filter(|_| {
            let event = strategy.new_tree(&mut runner).expect("a value").current();
            parse_body(BodyKind::Single, event.to_string().as_bytes(), now()).is_ok()
        })
        .count();
    // Else the round-trip properties above would rarely get past the refusal.
    assert!(accepted >= 40, "only {accepted} of 200 accepted");
}

// --- signatures -------------------------------------------------------------------------------

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Header values: anything, numbers, or lists of `v1,` signatures.
fn header() -> impl Strategy<Value = Option<String>> {
    option::of(prop_oneof![
        any::<String>(),
        "-?[0-9]{1,20}",
        "(v[0-9],[A-Za-z0-9+/=]{0,48} ?){0,3}",
    ])
}

fn headers<'a>(id: &'a str, timestamp: &'a str, signature: &'a str) -> SignedHeaders<'a> {
    SignedHeaders {
        id: Some(id),
        timestamp: Some(timestamp),
        signature: Some(signature),
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_headers_are_answered_not_panicked_on(
        id in header(),
        timestamp in header(),
        signature in header(),
        body in vec(any::<u8>(), 0..64),
        now in any::<i64>(),
    ) {
        let secrets = vec![WebhookSecret::parse(SECRET).expect("the test secret")];
        let headers = SignedHeaders {
            id: id.as_deref(),
            timestamp: timestamp.as_deref(),
            signature: signature.as_deref(),
        };
        let fresh = headers.check_fresh(now);
        if fresh.is_ok() {
            let ts: i64 = timestamp.as_deref().unwrap_or_default().parse().expect("checked");
            prop_assert!(now.abs_diff(ts) <= 300);
        }
        if verify(&secrets, headers, &body, now).is_ok() {
            prop_assert!(fresh.is_ok());
            prop_assert!(verify_signature_only(&secrets, headers, &body).is_ok());
        }
    }

    #[test]
    fn what_is_signed_verifies_and_nothing_else_does(
        id in any::<String>().prop_filter("an id is required", |id| !id.is_empty()),
        timestamp in -1_000_000_000_000i64..1_000_000_000_000,
        skew in -300i64..=300,
        body in vec(any::<u8>(), 0..64),
        others in header(),
        key in vec(any::<u8>(), 24..=64),
    ) {
        let secret = WebhookSecret::from_bytes(key).expect("24 to 64 bytes");
        let signed = secret.sign(&id, timestamp, &body);
        let list = format!("{} {signed}", others.unwrap_or_default());
        let ts = timestamp.to_string();
        let secrets = [secret];
        prop_assert_eq!(verify(&secrets, headers(&id, &ts, &list), &body, timestamp + skew), Ok(()));
        prop_assert_eq!(
            verify(&secrets, headers(&id, &ts, &list), &body, timestamp + 301),
            Err(SignatureError::TimestampOutOfTolerance)
        );
        let mut changed = body.clone();
        changed.push(b' ');
        prop_assert_eq!(
            verify_signature_only(&secrets, headers(&id, &ts, &list), &changed),
            Err(SignatureError::NoMatch)
        );
        let other_id = format!("{id}x");
        prop_assert_eq!(
            verify_signature_only(&secrets, headers(&other_id, &ts, &list), &body),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn secrets_survive_their_whsec_form_padded_or_not(key in vec(any::<u8>(), 0..80)) {
        let length = key.len();
        let Ok(secret) = WebhookSecret::from_bytes(key) else {
            prop_assert!(!(24..=64).contains(&length));
            return Ok(());
        };
        let whsec = secret.to_whsec();
        let expected = secret.sign("msg", 1, b"body");
        for text in [whsec.clone(), whsec.trim_end_matches('=').to_owned(), format!("  {whsec}\n")] {
            let again = WebhookSecret::parse(&text);
            prop_assert!(again.is_ok(), "{text:?}: {again:?}");
            prop_assert_eq!(again.expect("checked").sign("msg", 1, b"body"), expected.clone());
        }
        let list = parse_secrets(&format!("{whsec}, ,{SECRET}"));
        prop_assert_eq!(list.map(|l| l.len()), Ok(2));
    }

    #[test]
    fn any_secret_text_is_answered_not_panicked_on(
        text in prop_oneof![any::<String>(), "(whsec_)?[A-Za-z0-9+/=, ]{0,100}"],
    ) {
        if let Err(SecretError::BadLength(n)) = WebhookSecret::parse(&text) {
            prop_assert!(!(24..=64).contains(&n));
        }
        let _ = parse_secrets(&text);
    }
}

// --- workflows --------------------------------------------------------------------------------

const WELCOME_YAML: &str = include_str!("../../../workflows/welcome.yaml");
const LESSON_YAML: &str = include_str!("../../../workflows/lesson-completed.yaml");
const WELCOME_HTML: &str = include_str!("../../../templates/welcome.html.hbs");
const WELCOME_TEXT: &str = include_str!("../../../templates/welcome.txt.hbs");

/// Uses every kind of step, an email template and an SMS template.
const FIXED_WORKFLOW: &str = r#"name: Fixed
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

fn lesson_event() -> CourseEvent {
    let body = json!({"specversion": "1.0", "id": "evt_1", "source": "https://school.example.com",
        "type": "course.lesson_completed", "time": "2026-11-24T10:00:00+01:00",
        "data": {"contact": {"id": "c_1", "first_name": "Ann", "phone": "+15551234567"},
                 "product": {"id": "p_1", "title": "Rust 101"},
                 "lesson": {"id": "l_1", "title": "Ownership"},
                 "offer": {"id": "o_1", "title": "Pro", "product_ids": ["p_1"]}}});
    parse_body(BodyKind::Single, body.to_string().as_bytes(), now())
        .expect("a valid event")
        .remove(0)
}

fn custom_values() -> CustomValues {
    CustomValues::from([
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
    ])
}

/// Loads and compiles as the registry does; a workflow that compiles is matched against an event,
/// and its messages rendered and its waits placed, all without panicking.
fn check_workflow(yaml: &str, templates: &BTreeMap<&str, String>) -> Option<CompiledWorkflow> {
    let load = |name: &str| templates.get(name).cloned();
    let bundle = bundle_from("prop", "workflows/prop.yaml", yaml, &load);
    let _ = bundle.version();
    let (workflow, _warnings) = compile(bundle, &["support_email".to_owned()]).ok()?;
    let event = lesson_event();
    let _ = workflow.triggered_by(&event, &herald_core::workflow::ContactState::default());
    let _ = workflow.exits_on(&event, &herald_core::workflow::ContactState::default());
    if let Some(window) = &workflow.send_window {
        assert!(window.next_open(now(), chrono_tz::Europe::Berlin) >= now());
    }
    let context = event.template_context();
    for (pc, instr) in workflow.program.iter().enumerate() {
        match instr {
            Instr::SendEmail { .. } => {
                let _ = workflow.render_email(pc, &context, &custom_values());
            }
            Instr::SendSms { .. } => {
                let _ = workflow.render_sms(pc, &context, &custom_values());
            }
            Instr::Wait { wait, .. } => {
                assert!(wait.deadline(now(), Some("Europe/Berlin"), chrono_tz::UTC) >= now());
            }
            Instr::Branch { else_pc, .. } => assert!(*else_pc <= workflow.program.len()),
            Instr::Jump { to } => assert!(*to <= workflow.program.len()),
        }
    }
    Some(workflow)
}

fn fixed_templates() -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("welcome.html.hbs", WELCOME_HTML.to_owned()),
        ("welcome.txt.hbs", WELCOME_TEXT.to_owned()),
        (
            "nudge.sms.hbs",
            "Back to {{lesson.title}}? <<login_url>>".to_owned(),
        ),
    ])
}

/// Pieces of workflow YAML, valid and not, for splicing into real files.
fn yaml_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "\n",
            "  ",
            "- ",
            ": ",
            "[",
            "]",
            "{",
            "}",
            ",",
            "\"",
            "'",
            "|\n",
            ">\n",
            "&a ",
            "*a",
            "<<: *a\n",
            "? ",
            "!!str ",
            "!!binary ",
            "---\n",
            "...\n",
            "#",
            "~",
            "null",
            "send_email:",
            "send_sms: {body: hi}",
            "wait: 2d",
            "wait: {until: \"09:00\"}",
            "if: {field: contact.phone, exists: true}",
            "then:",
            "else:",
            "id: x",
            "steps:",
            "template: welcome",
            "send_window: {between: [\"09:00\", \"18:00\"]}",
            "event: lesson_completed",
            "where: {offer.id: [o_1]}",
            "{{",
            "}}",
            "<<login_url>>",
            "\t",
            "\u{feff}",
            "\u{85}",
            "\r",
        ])
        .prop_map(str::to_owned),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn damaged_workflow_files_are_answered_not_panicked_on(
        seed in select(vec![WELCOME_YAML, LESSON_YAML, FIXED_WORKFLOW]),
        damage in vec((any::<Index>(), yaml_piece()), 0..6),
    ) {
        check_workflow(&splice(seed.to_owned(), damage), &fixed_templates());
    }

    #[test]
    fn any_text_as_a_workflow_file_is_answered_not_panicked_on(
        yaml in prop_oneof![any::<String>(), vec(yaml_piece(), 0..20).prop_map(|p| p.concat())],
    ) {
        check_workflow(&yaml, &fixed_templates());
    }

    #[test]
    fn any_template_file_is_answered_not_panicked_on(source in template_source()) {
        let templates = fixed_templates().into_keys().map(|name| (name, source.clone())).collect();
        check_workflow(FIXED_WORKFLOW, &templates);
    }
}

#[test]
fn the_real_workflows_compile_with_the_fixed_templates() {
    for yaml in [WELCOME_YAML, LESSON_YAML, FIXED_WORKFLOW] {
        assert!(check_workflow(yaml, &fixed_templates()).is_some(), "{yaml}");
    }
}

// --- templates --------------------------------------------------------------------------------

/// Pieces of handlebars, valid and not.
fn template_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(vec![
            "{{", "}}", "{{{", "}}}", "{{#if ", "{{#each ", "{{#with ", "{{/if}}", "{{/each}}",
            "{{/with}}", "{{else}}", "{{else if ", "{{^}}", "{{~", "~}}", "{{!-- ", " --}}",
            "{{! x }}", "{{> footer}}", "{{#> layout}}", "{{#*inline \"p\"}}", "{{/inline}}",
            "{{*decorator}}", "{{{{raw}}}}", "{{{{/raw}}}}", "\\{{", "\\\\", "contact.first_name",
            "offer.product_ids", "lesson.title", "this", "@index", "@root.offer", "../event.id",
            "lookup ", "default ", "eq ", "len ", "(", ")", "=", "\"x\"", "'y'", "5", "<<", ">>",
            "<<login_url>>", "<<support_email>>", "<<nope>>", "<<", "\n", " ", "é", "\u{2028}",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn template_source() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => any::<String>(),
        4 => vec(template_piece(), 0..16).prop_map(|p| p.concat()),
        1 => (select(vec![WELCOME_HTML, WELCOME_TEXT]), vec((any::<Index>(), template_piece()), 0..4))
            .prop_map(|(seed, damage)| splice(seed.to_owned(), damage)),
    ]
}

fn render_context() -> Value {
    json!({
        "contact": {"id": "c_1", "first_name": "Tom & Jerry <b>", "custom_fields": {"company": "Acme"}},
        "offer": {"id": "o_1", "title": "Rust\r\n Pro", "product_ids": ["p_1", "p_2"]},
        "lesson": {"id": "l_1", "title": "<<login_url>>"},
        "event": {"id": "evt_1", "type": "course.lesson_completed", "time": "2026-11-24T10:00:00Z"},
    })
}

/// Parses and renders `source`: every position points into it, a custom value at its own text.
fn check_template(source: &str) -> Result<(), TestCaseError> {
    let Ok(parsed) = ParsedTemplate::parse(source) else {
        return Ok(());
    };
    let line_count = source.split('\n').count();
    for reference in parsed
        .fields
        .iter()
        .chain(&parsed.custom_values)
        .chain(&parsed.unsupported)
        .chain(&parsed.unescaped)
    {
        let pos = reference.pos;
        prop_assert!(
            pos.line >= 1 && pos.column >= 1 && pos.line <= line_count,
            "{reference:?} is outside a source of {line_count} lines"
        );
    }
    for value in &parsed.custom_values {
        let line = source
            .split('\n')
            .nth(value.pos.line - 1)
            .unwrap_or_default();
        let at: String = line.chars().skip(value.pos.column - 1).collect();
        prop_assert!(
            at.starts_with(&format!("<<{}>>", value.name)),
            "{value:?} does not point at its text"
        );
    }
    let _ = render_standalone_email(
        source,
        Some(source),
        Some(source),
        &render_context(),
        &custom_values(),
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_template_is_answered_not_panicked_on(source in template_source()) {
        check_template(&source)?;
    }

    #[test]
    fn text_with_nothing_to_expand_renders_as_itself(source in "[^{<\\\\]{0,40}") {
        let email = render_standalone_email(
            &source,
            Some(&source),
            Some(&source),
            &render_context(),
            &custom_values(),
        );
        prop_assert!(email.is_ok(), "{email:?}");
        let email = email.expect("checked");
        prop_assert_eq!(email.text.as_deref(), Some(&*source));
        prop_assert_eq!(email.html.as_deref(), Some(&*source));
        prop_assert!(!email.subject.contains(['\r', '\n']));
    }

    #[test]
    fn a_custom_value_renders_as_given_and_is_not_expanded_again(
        before in "[^{<\\\\]{0,10}",
        value in any::<String>(),
        after in "[^{<\\\\]{0,10}",
    ) {
        let custom = CustomValues::from([("login_url".to_owned(), value.clone())]);
        let source = format!("{before}<<login_url>>{after}");
        let email = render_standalone_email("s", None, Some(&source), &render_context(), &custom);
        prop_assert!(email.is_ok(), "{email:?}");
        prop_assert_eq!(email.expect("checked").text, Some(format!("{before}{value}{after}")));
    }
}

// --- durations, times of day and send windows -------------------------------------------------

const UNITS: [(&str, u64); 5] = [
    ("s", 1),
    ("m", 60),
    ("h", 3_600),
    ("d", 86_400),
    ("w", 604_800),
];

/// `text` as a YAML double-quoted scalar, everything outside printable ASCII escaped, so that any
/// string reaches the parser under test rather than tripping the YAML reader.
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

/// The places of a workflow where a duration, time of day, zone or weekday is written, with
/// `text` in it; the same nine as the `durations` fuzz target.
fn workflow_with(place: usize, text: &str) -> String {
    let q = yaml_quoted(text);
    let rest = match place % 9 {
        0 => format!("steps:\n  - wait: {q}\n"),
        1 => {
            format!("steps:\n  - wait: {{until: {q}, days: [mon, sat], timezone: Europe/Berlin}}\n")
        }
        2 => format!("steps:\n  - wait: {{until: {q}}}\n"),
        3 => format!("steps:\n  - wait: {{until: \"02:30\", timezone: {q}}}\n"),
        4 => format!("steps:\n  - wait: {{event: lesson_completed, timeout: {q}}}\n"),
        5 => format!("send_window:\n  between: [{q}, \"23:59\"]\nsteps:\n  - wait: 1d\n"),
        6 => format!("send_window:\n  between: [\"00:00\", {q}]\nsteps:\n  - wait: 1d\n"),
        7 => format!(
            "send_window:\n  between: [\"02:15\", \"03:30\"]\n  timezone: {q}\nsteps:\n  - wait: 1d\n"
        ),
        _ => format!(
            "send_window:\n  between: [\"09:00\", \"18:00\"]\n  days: [{q}]\nsteps:\n  - wait: 1d\n"
        ),
    };
    format!("name: T\ntrigger: {{event: lesson_completed}}\n{rest}")
}

fn compile_yaml(yaml: String) -> Option<CompiledWorkflow> {
    let bundle = WorkflowBundle {
        id: "t".into(),
        path: "workflows/t.yaml".into(),
        yaml,
        templates: BTreeMap::new(),
    };
    compile(bundle, &[]).ok().map(|(workflow, _)| workflow)
}

/// Text for durations, times of day, zones and weekdays: near misses and anything.
fn time_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,21}[smhdwy]?",
        " ?[0-9]{1,3}:[0-9]{1,3}(:[0-9]{2})? ?",
        "[+-]?[0-9.]{1,4}[smhd ]{0,2}",
        select(vec![
            "Europe/Berlin",
            "contact",
            "UTC",
            "mon",
            "Sun",
            "Mars/Olympus",
            "24:00",
            "23:60"
        ])
        .prop_map(str::to_owned),
        any::<String>(),
    ]
}

fn weekdays() -> impl Strategy<Value = Vec<Weekday>> {
    proptest::sample::subsequence(
        vec![
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
            Weekday::Thu,
            Weekday::Fri,
            Weekday::Sat,
            Weekday::Sun,
        ],
        0..=7,
    )
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_duration_survives_its_display_form(secs in any::<u64>()) {
        let duration = Duration::from_secs(secs);
        prop_assert_eq!(duration.to_string().parse::<Duration>(), Ok(duration));
        prop_assert_eq!(format!(" {duration}\n").parse::<Duration>(), Ok(duration));
    }

    #[test]
    fn a_number_and_unit_parse_to_their_product(n in any::<u64>(), unit in 0..UNITS.len()) {
        let (suffix, size) = UNITS[unit];
        let parsed = format!("{n}{suffix}").parse::<Duration>().ok();
        prop_assert_eq!(parsed, n.checked_mul(size).map(Duration::from_secs));
    }

    #[test]
    fn any_duration_text_is_answered_not_panicked_on(text in time_text()) {
        if let Ok(duration) = text.parse::<Duration>() {
            prop_assert_eq!(duration.to_string().parse::<Duration>(), Ok(duration));
            prop_assert!(add_duration(now(), duration) >= now());
        }
    }

    #[test]
    fn any_text_in_a_time_place_compiles_or_is_refused(place in 0usize..9, text in time_text()) {
        let Some(workflow) = compile_yaml(workflow_with(place, &text)) else {
            return Ok(());
        };
        for tz in [chrono_tz::Europe::Berlin, chrono_tz::America::New_York] {
            if let Some(window) = &workflow.send_window {
                prop_assert!(window.next_open(now(), tz) >= now());
            }
            for instr in &workflow.program {
                if let Instr::Wait { wait, .. } = instr {
                    prop_assert!(wait.deadline(now(), None, tz) >= now());
                }
            }
        }
    }

    #[test]
    fn a_time_of_day_compiles_to_itself(hour in 0u32..24, minute in 0u32..60) {
        let text = format!("{hour:02}:{minute:02}");
        let workflow = compile_yaml(workflow_with(2, &text));
        let at = NaiveTime::from_hms_opt(hour, minute, 0).expect("in range");
        let program = workflow.map(|w| w.program);
        let Some([Instr::Wait { wait: WaitSpec::Until { at: compiled, .. }, .. }]) = program.as_deref() else {
            return Err(TestCaseError::fail(format!("{text} did not compile to one wait: {program:?}")));
        };
        prop_assert_eq!(*compiled, at);
    }

    #[test]
    fn a_wait_compiles_to_its_duration_up_to_ten_years(n in 0u64..4000, unit in 0..UNITS.len()) {
        let (suffix, size) = UNITS[unit];
        let program = compile_yaml(workflow_with(0, &format!("{n}{suffix}"))).map(|w| w.program);
        let ten_years = 3650 * 86_400;
        match program.as_deref() {
            Some([Instr::Wait { wait: WaitSpec::For(d), .. }]) => {
                prop_assert_eq!(d.as_secs(), n * size);
                prop_assert!(n * size <= ten_years);
            }
            None => prop_assert!(n * size > ten_years),
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        }
    }

    #[test]
    fn the_next_local_time_is_ahead_on_an_allowed_day_at_that_time(
        now in instant(),
        hour in 0u32..24,
        minute in 0u32..60,
        days in weekdays(),
        tz in zone(),
    ) {
        let at = NaiveTime::from_hms_opt(hour, minute, 0).expect("in range");
        let next = next_local_time(now, at, &days, tz);
        prop_assert!(next >= now);
        prop_assert!(next - now <= TimeDelta::days(8), "{next} is more than a week after {now}");
        let local = next.with_timezone(&tz);
        // A time a daylight-saving gap skips moves to the end of the gap, on the same date.
        let skipped = matches!(tz.from_local_datetime(&local.date_naive().and_time(at)), LocalResult::None);
        prop_assert!(local.time() == at || skipped, "{local} for {at}");
        prop_assert!(days.is_empty() || days.contains(&chrono::Datelike::weekday(&local)));
    }

    #[test]
    fn a_send_window_opens_now_or_ahead(
        now in instant(),
        open in 0u32..(24 * 60 - 1),
        length in 1u32..(24 * 60),
        days in weekdays(),
        tz in zone(),
    ) {
        let close = (open + length).min(24 * 60 - 1);
        let hm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
        let days_yaml = if days.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = days.iter().map(|d| d.to_string().to_lowercase()).collect();
            format!("  days: [{}]\n", names.join(", "))
        };
        let yaml = format!(
            "name: T\ntrigger: {{event: lesson_completed}}\nsend_window:\n  between: [\"{}\", \"{}\"]\n{days_yaml}steps:\n  - wait: 1d\n",
            hm(open),
            hm(close),
        );
        let workflow = compile_yaml(yaml.clone());
        let Some(window) = workflow.as_ref().and_then(|w| w.send_window.as_ref()) else {
            return Err(TestCaseError::fail(format!("did not compile:\n{yaml}")));
        };
        prop_assert_eq!(&window.days, &days);
        let next = window.next_open(now, tz);
        prop_assert!(next >= now);
        prop_assert!(next - now <= TimeDelta::days(8));
        if next == now {
            let local = now.with_timezone(&tz);
            let minute = local.hour() * 60 + local.minute();
            prop_assert!((open..close).contains(&minute), "open at {local}");
        }
    }

    #[test]
    fn any_contact_zone_resolves(text in prop_oneof![any::<String>(), "[A-Za-z_/+-]{0,20}"], now in instant()) {
        let zone = resolve_timezone(&TimezoneChoice::Contact, Some(&text), chrono_tz::UTC);
        let nine = NaiveTime::from_hms_opt(9, 0, 0).expect("in range");
        prop_assert!(next_local_time(now, nine, &[], zone) >= now);
    }
}

// --- regressions found by the fuzz targets ----------------------------------------------------

#[test]
fn an_absurdly_long_duration_has_positive_milliseconds() {
    // fuzz/artifacts/durations: "25555557555526w" is more seconds than an i64 holds.
    let d: Duration = "25555557555526w".parse().expect("fits in u64 seconds");
    assert_eq!(d.as_millis(), i64::MAX);
}
