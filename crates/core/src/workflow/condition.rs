//! Evaluating `if` conditions against the event a run started with and the contact's state.

use super::{Condition, ContactState, FieldTest, loosely_equal};
use crate::event::CourseEvent;
use serde_json::Value;
use std::cmp::Ordering;

impl Condition {
    /// Whether the condition holds for `event` and a contact in `state`. A field the event does
    /// not carry (or carries as null) fails every test except `not_equals` and `exists: false`.
    pub fn evaluate(&self, event: &CourseEvent, state: &ContactState) -> bool {
        match self {
            Condition::All(conditions) => conditions.iter().all(|c| c.evaluate(event, state)),
            Condition::Any(conditions) => conditions.iter().any(|c| c.evaluate(event, state)),
            Condition::Not(condition) => !condition.evaluate(event, state),
            Condition::Test { field, test } => test.holds(event.field(field).as_ref()),
            Condition::State { fact, ids } => {
                let held = fact.ids(state);
                ids.iter().any(|id| held.contains(id))
            }
        }
    }
}

impl FieldTest {
    /// Whether the test holds for a field's value (`None`: the event does not carry it).
    pub fn holds(&self, actual: Option<&Value>) -> bool {
        let Some(actual) = actual else {
            return matches!(self, FieldTest::NotEquals(_) | FieldTest::Exists(false));
        };
        match self {
            FieldTest::Equals(want) => loosely_equal(actual, want),
            FieldTest::NotEquals(want) => !loosely_equal(actual, want),
            FieldTest::In(wanted) => wanted.iter().any(|want| loosely_equal(actual, want)),
            FieldTest::Contains(want) => contains(actual, want),
            FieldTest::Exists(exists) => *exists,
            FieldTest::Gt(bound) => compare(actual, bound) == Some(Ordering::Greater),
            FieldTest::Lt(bound) => compare(actual, bound) == Some(Ordering::Less),
        }
    }
}

/// A string contains a substring; an array contains an element.
fn contains(actual: &Value, want: &Value) -> bool {
    match actual {
        Value::String(haystack) => {
            scalar_text(want).is_some_and(|needle| haystack.contains(needle.as_str()))
        }
        Value::Array(items) => items.iter().any(|item| loosely_equal(item, want)),
        _ => false,
    }
}

/// Numerically when both sides are numbers (or strings that read as finite numbers), otherwise as
/// text, so that RFC 3339 times in the same offset compare in time order. `None` when a side is
/// not a scalar.
fn compare(actual: &Value, bound: &Value) -> Option<Ordering> {
    match (number(actual), number(bound)) {
        (Some(a), Some(b)) => a.partial_cmp(&b),
        _ => Some(scalar_text(actual)?.cmp(&scalar_text(bound)?)),
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventType;
    use crate::workflow::StateFact;
    use serde_json::json;

    fn event() -> CourseEvent {
        let data = json!({
            "contact": {"id": "c_1", "first_name": "Ann", "phone": null,
                        "custom_fields": {"score": "42", "tags": ["vip", "beta"], "joined": "2026-03-01T10:00:00Z", "level": 7}},
            "offer": {"id": "o_pro", "title": "Rust Pro", "product_ids": ["p_1", "p_2"]},
        });
        CourseEvent {
            id: "evt_1".into(),
            source: "https://school.example.com".into(),
            event_type: EventType::OfferAccessGranted,
            time: "2026-11-24T10:00:00Z".parse().unwrap(),
            time_raw: "2026-11-24T10:00:00Z".into(),
            data: data.as_object().unwrap().clone(),
        }
    }

    fn none() -> ContactState {
        ContactState::default()
    }

    fn test(field: &str, test: FieldTest) -> Condition {
        Condition::Test {
            field: field.into(),
            test,
        }
    }

    #[test]
    fn equality_is_loose_about_quoting() {
        let e = event();
        assert!(test("offer.id", FieldTest::Equals(json!("o_pro"))).evaluate(&e, &none()));
        assert!(!test("offer.id", FieldTest::Equals(json!("o_basic"))).evaluate(&e, &none()));
        assert!(
            test("contact.custom_fields.score", FieldTest::Equals(json!(42))).evaluate(&e, &none())
        );
        assert!(
            test("contact.custom_fields.level", FieldTest::Equals(json!("7")))
                .evaluate(&e, &none())
        );
        assert!(test("offer.id", FieldTest::NotEquals(json!("o_basic"))).evaluate(&e, &none()));
        assert!(!test("offer.id", FieldTest::NotEquals(json!("o_pro"))).evaluate(&e, &none()));
        assert!(
            test(
                "offer.id",
                FieldTest::In(vec![json!("o_basic"), json!("o_pro")])
            )
            .evaluate(&e, &none())
        );
        assert!(!test("offer.id", FieldTest::In(vec![json!("o_basic")])).evaluate(&e, &none()));
        assert!(
            test(
                "event.type",
                FieldTest::Equals(json!("course.offer_access_granted"))
            )
            .evaluate(&e, &none())
        );
    }

    #[test]
    fn a_missing_or_null_field_only_passes_not_equals_and_exists_false() {
        let e = event();
        for field in ["lesson.title", "contact.phone", "offer.nothing.deeper"] {
            let holds = |t: FieldTest| test(field, t).evaluate(&e, &none());
            assert!(!holds(FieldTest::Exists(true)), "{field}");
            assert!(holds(FieldTest::Exists(false)), "{field}");
            assert!(!holds(FieldTest::Equals(json!("x"))), "{field}");
            assert!(holds(FieldTest::NotEquals(json!("x"))), "{field}");
            assert!(!holds(FieldTest::In(vec![json!("x")])), "{field}");
            assert!(!holds(FieldTest::Contains(json!("x"))), "{field}");
            assert!(!holds(FieldTest::Gt(json!(0))), "{field}");
            assert!(!holds(FieldTest::Lt(json!(0))), "{field}");
        }
        assert!(test("contact.first_name", FieldTest::Exists(true)).evaluate(&e, &none()));
        assert!(!test("contact.first_name", FieldTest::Exists(false)).evaluate(&e, &none()));
    }

    #[test]
    fn contains_looks_into_strings_and_arrays() {
        let e = event();
        assert!(test("offer.title", FieldTest::Contains(json!("Pro"))).evaluate(&e, &none()));
        assert!(!test("offer.title", FieldTest::Contains(json!("pro"))).evaluate(&e, &none()));
        assert!(test("offer.product_ids", FieldTest::Contains(json!("p_2"))).evaluate(&e, &none()));
        assert!(!test("offer.product_ids", FieldTest::Contains(json!("p_"))).evaluate(&e, &none()));
        assert!(
            test(
                "contact.custom_fields.tags",
                FieldTest::Contains(json!("vip"))
            )
            .evaluate(&e, &none())
        );
        assert!(
            !test("contact.custom_fields.level", FieldTest::Contains(json!(7)))
                .evaluate(&e, &none())
        );
    }

    #[test]
    fn gt_and_lt_compare_numbers_numerically_and_dates_as_text() {
        let e = event();
        // "42" as text would sort below "5"; as numbers it is greater.
        assert!(test("contact.custom_fields.score", FieldTest::Gt(json!(5))).evaluate(&e, &none()));
        assert!(
            test("contact.custom_fields.score", FieldTest::Gt(json!("5"))).evaluate(&e, &none())
        );
        assert!(
            !test("contact.custom_fields.score", FieldTest::Lt(json!(42))).evaluate(&e, &none())
        );
        assert!(
            test("contact.custom_fields.level", FieldTest::Lt(json!(7.5))).evaluate(&e, &none())
        );
        assert!(
            test(
                "contact.custom_fields.joined",
                FieldTest::Gt(json!("2026-02-28T23:59:59Z"))
            )
            .evaluate(&e, &none())
        );
        assert!(
            test(
                "contact.custom_fields.joined",
                FieldTest::Lt(json!("2026-03-01T10:00:01Z"))
            )
            .evaluate(&e, &none())
        );
        assert!(test("event.time", FieldTest::Gt(json!("2026-11-01"))).evaluate(&e, &none()));
        // Arrays and objects are neither greater nor smaller.
        assert!(!test("offer.product_ids", FieldTest::Gt(json!("a"))).evaluate(&e, &none()));
        assert!(!test("offer.product_ids", FieldTest::Lt(json!("z"))).evaluate(&e, &none()));
    }

    #[test]
    fn all_and_any_nest() {
        let e = event();
        let yes = test("offer.id", FieldTest::Equals(json!("o_pro")));
        let no = test("lesson.id", FieldTest::Exists(true));
        assert!(
            Condition::All(vec![
                yes.clone(),
                Condition::Any(vec![no.clone(), yes.clone()])
            ])
            .evaluate(&e, &none())
        );
        assert!(!Condition::All(vec![yes.clone(), no.clone()]).evaluate(&e, &none()));
        assert!(
            !Condition::Any(vec![no.clone(), Condition::All(vec![no, yes])]).evaluate(&e, &none())
        );
    }

    #[test]
    fn state_facts_hold_for_any_listed_id_and_not_negates() {
        let e = event();
        let state = ContactState {
            offers: ["o_pro".to_string()].into(),
            completed_lessons: ["l_1".to_string()].into(),
            ..ContactState::default()
        };
        let fact = |fact: StateFact, ids: &[&str]| Condition::State {
            fact,
            ids: ids.iter().map(|s| s.to_string()).collect(),
        };
        assert!(fact(StateFact::HoldsOffer, &["o_basic", "o_pro"]).evaluate(&e, &state));
        assert!(!fact(StateFact::HoldsOffer, &["o_basic"]).evaluate(&e, &state));
        assert!(!fact(StateFact::HoldsProduct, &["o_pro"]).evaluate(&e, &state));
        assert!(fact(StateFact::CompletedLesson, &["l_1"]).evaluate(&e, &state));
        let lesson_2_missing = Condition::Not(Box::new(fact(StateFact::CompletedLesson, &["l_2"])));
        assert!(lesson_2_missing.evaluate(&e, &state));
        assert!(!lesson_2_missing.evaluate(
            &e,
            &ContactState {
                completed_lessons: ["l_2".to_string()].into(),
                ..ContactState::default()
            }
        ));
        // Without a loaded state the contact holds and completed nothing.
        assert!(!fact(StateFact::HoldsOffer, &["o_pro"]).evaluate(&e, &none()));
    }
}
