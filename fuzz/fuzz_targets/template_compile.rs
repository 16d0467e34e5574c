//! Template files and inline templates on arbitrary text: parsed as `herald check` parses them,
//! then rendered as an email (subject, HTML and text) the way the engine's built-in messages are.
//! Nothing may panic; every position reported points into the source, a `<<name>>` custom value at
//! its own text; text with nothing for handlebars to read renders as itself.
#![no_main]

use herald_core::template::{CustomValues, ParsedTemplate, render_standalone_email};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let source = String::from_utf8_lossy(data);
    let Ok(parsed) = ParsedTemplate::parse(&source) else {
        return;
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
        assert!(
            pos.line >= 1 && pos.column >= 1 && pos.line <= line_count,
            "{reference:?} is outside a source of {line_count} lines"
        );
    }
    for value in &parsed.custom_values {
        let line = source.split('\n').nth(value.pos.line - 1).unwrap_or_default();
        let at: String = line.chars().skip(value.pos.column - 1).collect();
        assert!(
            at.starts_with(&format!("<<{}>>", value.name)),
            "{value:?} does not point at its text"
        );
    }

    let context = json!({
        "contact": {"id": "c_1", "first_name": "Tom & Jerry <b>", "custom_fields": {"company": "Acme"}},
        "offer": {"id": "o_1", "title": "Rust\r\n Pro", "product_ids": ["p_1", "p_2"]},
        "lesson": {"id": "l_1", "title": "<<login_url>>"},
        "event": {"id": "evt_1", "type": "course.lesson_completed", "time": "2026-11-24T10:00:00Z"},
    });
    let custom = CustomValues::from([
        ("login_url".to_owned(), "https://herald.test/l/abc?a=1&b=2".to_owned()),
        ("support_email".to_owned(), "help@school.example.com".to_owned()),
    ]);
    let rendered = render_standalone_email(&source, Some(&source), Some(&source), &context, &custom);
    // Without `{`, `\` or `<` there is nothing to expand or escape: text and HTML are the source.
    if !source.contains(['{', '\\', '<']) {
        let email = rendered.expect("plain text renders");
        assert_eq!(email.text.as_deref(), Some(&*source));
        assert_eq!(email.html.as_deref(), Some(&*source));
        assert!(!email.subject.contains(['\r', '\n']));
    }
});
