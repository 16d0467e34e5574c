//! Request bodies as the platform (or anyone) posts them to `/v1/events`: arbitrary bytes parsed
//! as one event and as a batch. Nothing may panic, and an accepted body re-posted as herald
//! stores it (`CourseEvent::to_json`) must be accepted as the same events.
#![no_main]

use chrono::{DateTime, Utc};
use herald_core::event::{BodyKind, CourseEvent, parse_body};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    // Whole seconds, so the receipt time survives its millisecond text form.
    let now = DateTime::<Utc>::from_timestamp(1_795_000_000, 0).expect("a valid instant");
    for kind in [BodyKind::Single, BodyKind::Batch] {
        let Ok(events) = parse_body(kind, body, now) else {
            continue;
        };
        for event in &events {
            // Everything downstream relies on these holding for an accepted event.
            let _ = event.contact_id();
            let _ = event.template_context();
            let _ = event.field("contact.custom_fields.company");
        }
        let stored = match kind {
            BodyKind::Single => events[0].to_json(),
            BodyKind::Batch => Value::Array(events.iter().map(CourseEvent::to_json).collect()),
        };
        let reparsed = parse_body(kind, stored.to_string().as_bytes(), now)
            .unwrap_or_else(|e| panic!("a stored event is refused when re-posted: {e}"));
        assert_eq!(reparsed.len(), events.len());
        for (again, first) in reparsed.iter().zip(&events) {
            assert_eq!(
                (&again.id, &again.source, again.event_type, again.time, &again.time_raw),
                (&first.id, &first.source, first.event_type, first.time, &first.time_raw)
            );
            assert!(
                same_json(&Value::Object(again.data.clone()), &Value::Object(first.data.clone())),
                "data changed on the round trip"
            );
        }
    }
});

/// JSON equality, except that floats need only agree to a relative 1e-15: serde_json's default
/// float parsing may land one unit in the last place away, which is not herald's concern.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            x == y || (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}
