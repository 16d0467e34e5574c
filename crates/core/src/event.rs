//! Course events as the platform posts them: CloudEvents 1.0 in structured JSON mode, one event or
//! a batch. Parsing here is the edge of the system: what comes out is a [`CourseEvent`] whose
//! required fields are known to be present and well-typed, so nothing downstream re-checks them.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use std::fmt;

/// The `source` of the events herald writes itself.
pub const HERALD_SOURCE: &str = "herald";

/// The most events one batch request may carry.
pub const MAX_BATCH: usize = 1_000;
/// Upper bound on identifiers (event id, source, contact id, ...): generous for real ids, small
/// enough that a hostile client cannot make us index megabyte keys.
pub const MAX_ID_LEN: usize = 256;

/// The twelve course event types (the workflow trigger name is the part after `course.`), and
/// the one herald writes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    CategoryStarted,
    CategoryCompleted,
    LessonStarted,
    LessonCompleted,
    NewSignup,
    OfferAccessGranted,
    OfferAccessRemoved,
    ProductAccessGranted,
    ProductAccessRemoved,
    ProductStarted,
    ProductCompleted,
    UserLogin,
    /// `herald.enrollment`: herald enrolls `data.contact` in the workflow `data.workflow.id`
    /// (an operator's enrollment, a schedule's tick). Not in [`EventType::ALL`]: never accepted
    /// from the platform, never a trigger, an `exit_when` or an awaited event.
    Enrollment,
}

impl EventType {
    pub const ALL: [EventType; 12] = [
        Self::CategoryStarted,
        Self::CategoryCompleted,
        Self::LessonStarted,
        Self::LessonCompleted,
        Self::NewSignup,
        Self::OfferAccessGranted,
        Self::OfferAccessRemoved,
        Self::ProductAccessGranted,
        Self::ProductAccessRemoved,
        Self::ProductStarted,
        Self::ProductCompleted,
        Self::UserLogin,
    ];

    /// The name used in workflow triggers, e.g. `lesson_completed`.
    pub fn trigger_name(self) -> &'static str {
        match self {
            Self::CategoryStarted => "category_started",
            Self::CategoryCompleted => "category_completed",
            Self::LessonStarted => "lesson_started",
            Self::LessonCompleted => "lesson_completed",
            Self::NewSignup => "new_signup",
            Self::OfferAccessGranted => "offer_access_granted",
            Self::OfferAccessRemoved => "offer_access_removed",
            Self::ProductAccessGranted => "product_access_granted",
            Self::ProductAccessRemoved => "product_access_removed",
            Self::ProductStarted => "product_started",
            Self::ProductCompleted => "product_completed",
            Self::UserLogin => "user_login",
            Self::Enrollment => "enrollment",
        }
    }

    /// The CloudEvents `type`, e.g. `course.lesson_completed`.
    pub fn cloudevent_type(self) -> String {
        match self {
            Self::Enrollment => ENROLLMENT_TYPE.to_owned(),
            course => format!("course.{}", course.trigger_name()),
        }
    }

    pub fn from_trigger_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.trigger_name() == name)
    }

    pub fn from_cloudevent_type(ty: &str) -> Option<Self> {
        ty.strip_prefix("course.").and_then(Self::from_trigger_name)
    }

    /// The objects of `data` this type must carry (besides `contact`, which every type needs).
    pub fn required_objects(self) -> &'static [&'static str] {
        match self {
            Self::CategoryStarted | Self::CategoryCompleted => &["product", "category"],
            Self::LessonStarted | Self::LessonCompleted => &["product", "lesson"],
            Self::NewSignup | Self::UserLogin => &[],
            Self::Enrollment => &["workflow"],
            Self::OfferAccessGranted | Self::OfferAccessRemoved => &["offer"],
            Self::ProductAccessGranted
            | Self::ProductAccessRemoved
            | Self::ProductStarted
            | Self::ProductCompleted => &["product"],
        }
    }

    /// Every object of `data` an event of this type may carry: what a template of a workflow
    /// triggered by it can rely on being there (`herald check` uses this).
    pub fn possible_objects(self) -> &'static [&'static str] {
        match self {
            Self::CategoryStarted | Self::CategoryCompleted => {
                &["contact", "product", "category", "offer"]
            }
            Self::LessonStarted | Self::LessonCompleted => {
                &["contact", "product", "lesson", "category", "offer"]
            }
            Self::NewSignup => &["contact", "offer"],
            Self::UserLogin => &["contact"],
            Self::Enrollment => &["contact", "workflow"],
            Self::OfferAccessGranted | Self::OfferAccessRemoved => &["contact", "offer"],
            Self::ProductAccessGranted
            | Self::ProductAccessRemoved
            | Self::ProductStarted
            | Self::ProductCompleted => &["contact", "product", "offer"],
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.trigger_name())
    }
}

/// A validated course event.
#[derive(Debug, Clone, PartialEq)]
pub struct CourseEvent {
    /// The producer's id; with `source` it identifies the event for deduplication.
    pub id: String,
    /// The producer, a URI-reference such as the school's URL.
    pub source: String,
    pub event_type: EventType,
    /// When the event happened; grants follow this, not arrival order.
    pub time: DateTime<Utc>,
    /// `time` exactly as received, because `{{event.time}}` renders it unchanged.
    pub time_raw: String,
    /// The event's `data` object, validated against its type.
    pub data: Map<String, Value>,
}

/// Why an event was refused, naming the event (its index in a batch) and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{}", self.describe())]
pub struct EventError {
    /// Position of the event in the request (0 for a single event); `None` when the body as a
    /// whole is unreadable.
    pub index: Option<usize>,
    /// The offending field as a dotted path (`data.contact.id`), when one is to blame.
    pub field: Option<String>,
    pub message: String,
}

impl EventError {
    fn body(message: impl Into<String>) -> Self {
        Self {
            index: None,
            field: None,
            message: message.into(),
        }
    }
    fn field(index: usize, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            index: Some(index),
            field: Some(field.into()),
            message: message.into(),
        }
    }
    fn describe(&self) -> String {
        match (&self.index, &self.field) {
            (Some(i), Some(f)) => format!("event {i}, field {f}: {}", self.message),
            (Some(i), None) => format!("event {i}: {}", self.message),
            (None, _) => self.message.clone(),
        }
    }
}

/// Whether the request body holds one event or a JSON array of them (by `Content-Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Single,
    Batch,
}

/// Parses and validates a request body. `received_at` stands in for a missing `time`.
pub fn parse_body(
    kind: BodyKind,
    body: &[u8],
    received_at: DateTime<Utc>,
) -> Result<Vec<CourseEvent>, EventError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| EventError::body(format!("body is not valid JSON: {e}")))?;
    match kind {
        BodyKind::Single => Ok(vec![parse_event(0, value, received_at)?]),
        BodyKind::Batch => {
            let Value::Array(items) = value else {
                return Err(EventError::body(
                    "a batch body must be a JSON array of events",
                ));
            };
            if items.is_empty() {
                return Err(EventError::body("a batch must hold at least one event"));
            }
            if items.len() > MAX_BATCH {
                return Err(EventError::body(format!(
                    "a batch holds at most {MAX_BATCH} events, this one has {}",
                    items.len()
                )));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| parse_event(i, v, received_at))
                .collect()
        }
    }
}

/// The CloudEvents `type` of [`EventType::Enrollment`].
pub const ENROLLMENT_TYPE: &str = "herald.enrollment";

/// Validates one event envelope and its `data` against the rules of its type.
pub fn parse_event(
    index: usize,
    value: Value,
    received_at: DateTime<Utc>,
) -> Result<CourseEvent, EventError> {
    parse_event_of(index, value, received_at, EventType::from_cloudevent_type)
}

/// Reads back an event herald stored: a course event, or one herald wrote itself.
pub fn parse_stored_event(value: Value) -> Result<CourseEvent, EventError> {
    parse_event_of(0, value, DateTime::UNIX_EPOCH, |ty| match ty {
        ENROLLMENT_TYPE => Some(EventType::Enrollment),
        course => EventType::from_cloudevent_type(course),
    })
}

fn parse_event_of(
    index: usize,
    value: Value,
    received_at: DateTime<Utc>,
    event_type: fn(&str) -> Option<EventType>,
) -> Result<CourseEvent, EventError> {
    let err = |field: &str, msg: &str| EventError::field(index, field, msg);
    let Value::Object(mut obj) = value else {
        return Err(EventError {
            index: Some(index),
            field: None,
            message: "an event must be a JSON object".into(),
        });
    };
    // First, so that a control character is named as such rather than as, say, an unknown type.
    refuse_control_characters(&obj, "", Scope::Envelope)
        .map_err(|(field, msg)| err(&field, &msg))?;
    match obj.get("specversion") {
        Some(Value::String(v)) if v == "1.0" => {}
        Some(Value::String(_)) => {
            return Err(err(
                "specversion",
                "only CloudEvents 1.0 is supported: set \"1.0\"",
            ));
        }
        Some(_) => return Err(err("specversion", "must be the string \"1.0\"")),
        None => return Err(err("specversion", "is required: set \"1.0\"")),
    }
    let id = required_id(&obj, "id").map_err(|m| err("id", &m))?;
    let source = required_id(&obj, "source").map_err(|m| err("source", &m))?;
    let ty = match obj.get("type") {
        Some(Value::String(t)) => event_type(t).ok_or_else(|| {
            err("type", &format!("unknown event type {t:?}: expected one of course.lesson_completed, course.offer_access_granted, ..."))
        })?,
        Some(_) => return Err(err("type", "must be a string")),
        None => return Err(err("type", "is required")),
    };
    let (time, time_raw) = match obj.get("time") {
        None | Some(Value::Null) => (
            received_at,
            received_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        ),
        Some(Value::String(t)) => {
            let parsed = DateTime::parse_from_rfc3339(t).map_err(|_| {
                err(
                    "time",
                    "must be an RFC 3339 timestamp such as 2026-11-24T10:00:00Z",
                )
            })?;
            (parsed.with_timezone(&Utc), t.clone())
        }
        Some(_) => return Err(err("time", "must be an RFC 3339 timestamp string")),
    };
    if let Some(ct) = obj.get("datacontenttype")
        && !matches!(ct, Value::String(s) if s.starts_with("application/json"))
    {
        return Err(err(
            "datacontenttype",
            "must be application/json when present",
        ));
    }
    let data = match obj.remove("data") {
        Some(Value::Object(d)) => d,
        Some(_) => return Err(err("data", "must be a JSON object")),
        None => return Err(err("data", "is required")),
    };
    validate_data(ty, &data).map_err(|(field, msg)| err(&format!("data.{field}"), &msg))?;
    Ok(CourseEvent {
        id,
        source,
        event_type: ty,
        time,
        time_raw,
        data,
    })
}

fn required_id(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) if s.is_empty() => Err("must not be empty".into()),
        Some(Value::String(s)) if s.len() > MAX_ID_LEN => {
            Err(format!("is longer than {MAX_ID_LEN} bytes"))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err("must be a string".into()),
        None => Err("is required".into()),
    }
}

type FieldError = (String, String);

/// Where in an event a string sits, which decides its [`Class`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// CloudEvents attributes: identifiers, like every key.
    Envelope,
    /// `data`: a string is text unless its key names or addresses something.
    Data,
    /// `custom_fields` (at any depth): whatever the learner or the school typed, so text.
    CustomFields,
}

/// What a string may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Ids, addresses, time zones, URLs, keys: no control character (U+0000–U+001F, U+007F).
    Identifier,
    /// Names, titles, notes: tab, line feed and carriage return, no other C0 control.
    Text,
}

impl Class {
    fn in_data(key: &str) -> Self {
        match key {
            "id" | "email" | "phone" | "timezone" | "url" | "product_ids" => Self::Identifier,
            _ => Self::Text,
        }
    }

    fn refused(self, s: &str) -> Option<char> {
        s.chars().find(|&c| match self {
            Self::Identifier => c.is_ascii_control(),
            Self::Text => c < ' ' && !matches!(c, '\t' | '\n' | '\r'),
        })
    }

    fn message(self, c: char) -> String {
        let rule = match self {
            Self::Identifier => {
                "identifiers, addresses, URLs and CloudEvents attributes may hold none"
            }
            Self::Text => {
                "text may hold tab, line feed and carriage return but no other control character"
            }
        };
        format!("{}: {rule}; remove it", control_character(c))
    }
}

fn control_character(c: char) -> String {
    format!("contains a control character (U+{:04X})", u32::from(c))
}

/// Control characters never belong in course data, and some databases cannot store them (U+0000
/// in PostgreSQL text): refused at the edge, in every string and key of the event, so no stored
/// event can block a queue.
fn refuse_control_characters(
    obj: &Map<String, Value>,
    path: &str,
    scope: Scope,
) -> Result<(), FieldError> {
    for (key, value) in obj {
        let shown = |key: &str| {
            if path.is_empty() {
                key.to_owned()
            } else {
                format!("{path}.{key}")
            }
        };
        if let Some(c) = Class::Identifier.refused(key) {
            // Named escaped (`\0`), so the field path stays printable.
            return Err((
                shown(&key.escape_debug().to_string()),
                format!(
                    "the key {}: keys may hold none; remove it",
                    control_character(c)
                ),
            ));
        }
        let (class, inner) = match scope {
            Scope::Envelope if key == "data" => (Class::Identifier, Scope::Data),
            Scope::Envelope => (Class::Identifier, Scope::Envelope),
            Scope::Data if key == "custom_fields" => (Class::Text, Scope::CustomFields),
            Scope::Data => (Class::in_data(key), Scope::Data),
            Scope::CustomFields => (Class::Text, Scope::CustomFields),
        };
        refuse_in_value(value, &shown(key), class, inner)?;
    }
    Ok(())
}

/// `class` applies to the strings `value` is or holds in arrays; objects classify their own.
fn refuse_in_value(
    value: &Value,
    field: &str,
    class: Class,
    scope: Scope,
) -> Result<(), FieldError> {
    match value {
        Value::String(s) => match class.refused(s) {
            Some(c) => Err((field.to_owned(), class.message(c))),
            None => Ok(()),
        },
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| refuse_in_value(v, &format!("{field}[{i}]"), class, scope)),
        Value::Object(o) => refuse_control_characters(o, field, scope),
        _ => Ok(()),
    }
}

fn validate_data(ty: EventType, data: &Map<String, Value>) -> Result<(), FieldError> {
    let contact =
        object(data, "contact")?.ok_or_else(|| ("contact".to_owned(), "is required".to_owned()))?;
    let contact_id = required_id(contact, "id").map_err(|m| ("contact.id".to_owned(), m))?;
    debug_assert!(!contact_id.is_empty());
    for key in ["email", "phone", "first_name", "last_name", "timezone"] {
        optional_string(contact, "contact", key)?;
    }
    if let Some(v) = contact.get("custom_fields")
        && !v.is_object()
        && !v.is_null()
    {
        return Err(("contact.custom_fields".into(), "must be an object".into()));
    }
    for name in ["offer", "product", "category", "lesson"] {
        let required = ty.required_objects().contains(&name);
        match object(data, name)? {
            Some(o) => {
                required_id(o, "id").map_err(|m| (format!("{name}.id"), m))?;
                for key in ["title", "url"] {
                    optional_string(o, name, key)?;
                }
            }
            None if required => {
                return Err((
                    name.into(),
                    format!("is required for {}", ty.cloudevent_type()),
                ));
            }
            None => {}
        }
    }
    if ty == EventType::Enrollment {
        let workflow = object(data, "workflow")?
            .ok_or_else(|| ("workflow".to_owned(), "is required".to_owned()))?;
        required_id(workflow, "id").map_err(|m| ("workflow.id".to_owned(), m))?;
    }
    if let Some(offer) = object(data, "offer")?
        && let Some(ids) = offer.get("product_ids")
    {
        let ok = ids.as_array().is_some_and(|a| {
            a.iter().all(|v| {
                v.as_str()
                    .is_some_and(|s| !s.is_empty() && s.len() <= MAX_ID_LEN)
            })
        });
        if !ok {
            return Err((
                "offer.product_ids".into(),
                "must be an array of product id strings".into(),
            ));
        }
    }
    Ok(())
}

fn object<'a>(
    data: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, FieldError> {
    match data.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err((key.into(), "must be an object".into())),
    }
}

fn optional_string(obj: &Map<String, Value>, parent: &str, key: &str) -> Result<(), FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
        Some(_) => Err((format!("{parent}.{key}"), "must be a string".into())),
    }
}

impl CourseEvent {
    /// The `herald.enrollment` event that enrolls `contact_id` in `workflow_id`. `id` makes it
    /// unique in the `herald` source: a repeated request with the same id enrolls once.
    pub fn enrollment(
        id: String,
        workflow_id: &str,
        contact_id: &str,
        origin: &str,
        now: DateTime<Utc>,
    ) -> Self {
        let mut data = Map::new();
        data.insert("contact".into(), serde_json::json!({ "id": contact_id }));
        data.insert("workflow".into(), serde_json::json!({ "id": workflow_id }));
        data.insert("enrollment".into(), serde_json::json!({ "origin": origin }));
        Self {
            id,
            source: HERALD_SOURCE.to_owned(),
            event_type: EventType::Enrollment,
            time: now,
            time_raw: now.to_rfc3339_opts(SecondsFormat::Millis, true),
            data,
        }
    }

    /// The enrollment event that replays `original` into `workflow_id`: it carries the original's
    /// data and time (so the run renders as the original would have), and names the original.
    pub fn replayed(original: &CourseEvent, workflow_id: &str) -> Self {
        let id = Self::replay_id(original, workflow_id);
        let mut event = Self::enrollment(
            id,
            workflow_id,
            original.contact_id(),
            "replay",
            original.time,
        );
        let mut data = original.data.clone();
        data.insert("workflow".into(), event.data["workflow"].clone());
        data.insert(
            "enrollment".into(),
            serde_json::json!({
                "origin": "replay",
                "event": {"source": original.source, "id": original.id, "type": original.event_type.cloudevent_type()},
            }),
        );
        event.data = data;
        event.time_raw = original.time_raw.clone();
        event
    }

    /// The id of [`CourseEvent::replayed`]: one per original event and workflow.
    pub fn replay_id(original: &CourseEvent, workflow_id: &str) -> String {
        Self::enrollment_id("replay", &[workflow_id, &original.source, &original.id])
    }

    /// An enrollment event id made from what it enrolls for (`prefix` and `parts`, e.g. a
    /// schedule's workflow, tick and contact): the same parts give the same id, so storing it
    /// again is a duplicate, whoever stores it. Hashed, so it stays short whatever the parts.
    pub fn enrollment_id(prefix: &str, parts: &[&str]) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for part in parts {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        let digest = hash.finalize();
        let hex: String = digest[..20].iter().map(|b| format!("{b:02x}")).collect();
        format!("{prefix}_{hex}")
    }

    /// The workflow an enrollment event enrolls its contact in.
    pub fn enrolls_in(&self) -> Option<&str> {
        match self.event_type {
            EventType::Enrollment => self.object("workflow")?.get("id")?.as_str(),
            _ => None,
        }
    }

    /// The contact's id; validation guarantees it is present.
    pub fn contact_id(&self) -> &str {
        self.data["contact"]["id"]
            .as_str()
            .expect("validated contact.id")
    }

    /// The object `name` of `data` (`contact`, `offer`, ...), if the event carries it.
    pub fn object(&self, name: &str) -> Option<&Map<String, Value>> {
        self.data.get(name).and_then(Value::as_object)
    }

    /// The value at a dotted path such as `offer.id`, `contact.custom_fields.company` or
    /// `event.type`: the same names workflows use in `where` filters and conditions.
    pub fn field(&self, path: &str) -> Option<Value> {
        if let Some(rest) = path.strip_prefix("event.") {
            return match rest {
                "id" => Some(Value::String(self.id.clone())),
                "source" => Some(Value::String(self.source.clone())),
                "type" => Some(Value::String(self.event_type.cloudevent_type())),
                "time" => Some(Value::String(self.time_raw.clone())),
                _ => None,
            };
        }
        let mut parts = path.split('.');
        let mut cur = self.data.get(parts.next()?)?;
        for p in parts {
            cur = cur.get(p)?;
        }
        (!cur.is_null()).then(|| cur.clone())
    }

    /// The handlebars context: every object of `data` plus `event` (id, source, type, time).
    pub fn template_context(&self) -> Value {
        let mut ctx = self.data.clone();
        ctx.insert(
            "event".into(),
            serde_json::json!({
                "id": self.id,
                "source": self.source,
                "type": self.event_type.cloudevent_type(),
                "time": self.time_raw,
            }),
        );
        Value::Object(ctx)
    }

    /// The CloudEvents JSON of this event, as stored and as `herald send-event` posts it.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.event_type.cloudevent_type(),
            "time": self.time_raw,
            "data": self.data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    fn lesson_event() -> Value {
        json!({
            "specversion": "1.0", "id": "evt_1", "source": "https://school.example.com",
            "type": "course.lesson_completed", "time": "2026-11-24T10:00:00+01:00",
            "data": {
                "contact": {"id": "c_1", "email": "ann@example.com", "first_name": "Ann"},
                "product": {"id": "p_1", "title": "Rust 101"},
                "lesson": {"id": "l_1", "title": "Ownership"}
            }
        })
    }

    fn parse(v: Value) -> Result<CourseEvent, EventError> {
        parse_body(BodyKind::Single, v.to_string().as_bytes(), now()).map(|mut v| v.remove(0))
    }

    /// `lesson_event` with a custom field and an offer: a string in every place the rules tell
    /// apart.
    fn full_event() -> Value {
        let mut v = lesson_event();
        let contact = &mut v["data"]["contact"];
        contact["phone"] = json!("+15551234567");
        contact["last_name"] = json!("Lee");
        contact["timezone"] = json!("Europe/Berlin");
        contact["custom_fields"] = json!({"company": "Acme", "url": "x"});
        v["data"]["product"]["url"] = json!("https://school.example.com/p/1");
        v["data"]["offer"] = json!({"id": "o_1", "title": "Pro", "product_ids": ["p_1"]});
        v
    }

    /// Parses `full_event` with `text` at `pointer` (a JSON pointer): `None` when accepted, else
    /// the error, which must be about a control character at event 0.
    fn with_text_at(pointer: &str, text: &str) -> Option<EventError> {
        let mut v = full_event();
        *v.pointer_mut(pointer).expect("the pointer exists") = json!(text);
        let e = parse(v).err()?;
        assert_eq!(e.index, Some(0), "{e}");
        assert!(e.message.contains("control character"), "{e}");
        assert!(e.message.ends_with("remove it"), "{e}");
        Some(e)
    }

    fn refused_field(pointer: &str, text: &str) -> String {
        let e = with_text_at(pointer, text).unwrap_or_else(|| panic!("{pointer}: {text:?} passed"));
        e.field.expect("a field is named")
    }

    #[test]
    fn nul_in_first_name_is_refused() {
        let e = with_text_at("/data/contact/first_name", "Ann\u{0}").unwrap();
        assert_eq!(e.field.as_deref(), Some("data.contact.first_name"));
        assert_eq!(
            e.to_string(),
            "event 0, field data.contact.first_name: contains a control character (U+0000): \
             text may hold tab, line feed and carriage return but no other control character; \
             remove it"
        );
    }

    #[test]
    fn nul_in_identifiers_is_refused() {
        assert_eq!(refused_field("/id", "evt\u{0}1"), "id");
        assert_eq!(refused_field("/source", "https://school\u{0}"), "source");
        assert_eq!(
            refused_field("/data/contact/id", "c\u{0}1"),
            "data.contact.id"
        );
        // Named as a control character, not as an unknown type.
        assert_eq!(
            refused_field("/type", "course.lesson_completed\u{0}"),
            "type"
        );
        let e = with_text_at("/data/contact/id", "c\u{0}1").unwrap();
        assert!(
            e.message
                .starts_with("contains a control character (U+0000): identifiers"),
            "{e}"
        );
    }

    #[test]
    fn nul_in_a_custom_field_value_or_key_is_refused() {
        assert_eq!(
            refused_field("/data/contact/custom_fields/company", "Ac\u{0}me"),
            "data.contact.custom_fields.company"
        );
        let mut v = full_event();
        v["data"]["contact"]["custom_fields"] = json!({"com\u{0}pany": "Acme"});
        let e = parse(v).unwrap_err();
        assert_eq!(e.index, Some(0));
        assert_eq!(
            e.field.as_deref(),
            Some("data.contact.custom_fields.com\\0pany")
        );
        assert!(
            e.message
                .starts_with("the key contains a control character (U+0000)"),
            "{e}"
        );
    }

    #[test]
    fn strings_nested_anywhere_in_data_are_checked() {
        let mut v = full_event();
        v["data"]["order"] = json!({"items": [{"id": "i_1", "note": "gift\u{0}"}]});
        let e = parse(v).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("data.order.items[0].note"));

        let mut v = full_event();
        v["data"]["order"] = json!({"items": [{"id": "i\n1"}]});
        let e = parse(v).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("data.order.items[0].id"));

        let mut v = full_event();
        v["subject"] = json!("an extension\u{0}");
        assert_eq!(parse(v).unwrap_err().field.as_deref(), Some("subject"));
    }

    #[test]
    fn text_may_hold_tab_and_line_breaks() {
        assert!(with_text_at("/data/contact/first_name", "Ann\tMarie").is_none());
        assert!(with_text_at("/data/contact/first_name", "Ann\nMarie\r\n").is_none());
        assert!(with_text_at("/data/lesson/title", "Part 1\nOwnership").is_none());
        // A custom field is text whatever its name.
        assert!(with_text_at("/data/contact/custom_fields/url", "a\nb").is_none());
        // DEL is not among the characters text may not hold.
        assert!(with_text_at("/data/lesson/title", "Own\u{7f}ership").is_none());
        // Other C0 controls are refused in text.
        assert_eq!(
            refused_field("/data/lesson/title", "Own\u{8}ership"),
            "data.lesson.title"
        );
        assert_eq!(
            refused_field("/data/offer/title", "Pro\u{1f}"),
            "data.offer.title"
        );
    }

    #[test]
    fn identifiers_and_addresses_hold_no_control_character() {
        let cases = [
            (
                "/data/contact/email",
                "ann@example.com\u{1f}",
                "data.contact.email",
            ),
            ("/id", "evt\u{7f}", "id"),
            ("/data/product/id", "p\u{7f}1", "data.product.id"),
            ("/data/product/id", "p\t1", "data.product.id"),
            ("/data/contact/phone", "+1555\n", "data.contact.phone"),
            (
                "/data/contact/timezone",
                "Europe/Berlin\r",
                "data.contact.timezone",
            ),
            (
                "/data/product/url",
                "https://x.example/\n",
                "data.product.url",
            ),
            (
                "/data/offer/product_ids/0",
                "p\u{0}1",
                "data.offer.product_ids[0]",
            ),
            ("/data/lesson/id", "l\u{1}", "data.lesson.id"),
        ];
        for (pointer, text, field) in cases {
            assert_eq!(refused_field(pointer, text), field, "{pointer}");
        }
        let e = with_text_at("/data/contact/email", "ann@example.com\u{1f}").unwrap();
        assert!(e.message.contains("(U+001F)"), "{e}");
        let e = with_text_at("/id", "evt\u{7f}").unwrap();
        assert!(e.message.contains("(U+007F)"), "{e}");
    }

    #[test]
    fn a_control_character_refuses_the_batch_naming_its_index() {
        let mut bad = lesson_event();
        bad["data"]["contact"]["last_name"] = json!("Lee\u{0}");
        let body = json!([lesson_event(), lesson_event(), bad]).to_string();
        let e = parse_body(BodyKind::Batch, body.as_bytes(), now()).unwrap_err();
        assert_eq!(
            (e.index, e.field.as_deref()),
            (Some(2), Some("data.contact.last_name"))
        );
    }

    #[test]
    fn accepts_a_valid_event_and_keeps_time_as_received() {
        let e = parse(lesson_event()).unwrap();
        assert_eq!(e.event_type, EventType::LessonCompleted);
        assert_eq!(e.contact_id(), "c_1");
        assert_eq!(e.time_raw, "2026-11-24T10:00:00+01:00");
        assert_eq!(
            e.time,
            "2026-11-24T09:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(e.field("lesson.title"), Some(json!("Ownership")));
        assert_eq!(
            e.field("event.type"),
            Some(json!("course.lesson_completed"))
        );
        assert_eq!(e.field("offer.id"), None);
    }

    #[test]
    fn names_the_missing_field_per_type() {
        let mut v = lesson_event();
        v["data"].as_object_mut().unwrap().remove("lesson");
        let e = parse(v).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("data.lesson"));
        assert_eq!(e.index, Some(0));

        let mut v = lesson_event();
        v["data"]["contact"].as_object_mut().unwrap().remove("id");
        assert_eq!(
            parse(v).unwrap_err().field.as_deref(),
            Some("data.contact.id")
        );
    }

    #[test]
    fn refuses_wrong_types_unknown_types_and_bad_json() {
        let mut v = lesson_event();
        v["data"]["contact"]["email"] = json!(42);
        assert_eq!(
            parse(v).unwrap_err().field.as_deref(),
            Some("data.contact.email")
        );

        let mut v = lesson_event();
        v["type"] = json!("course.lesson_exploded");
        assert_eq!(parse(v).unwrap_err().field.as_deref(), Some("type"));

        let mut v = lesson_event();
        v["time"] = json!("yesterday");
        assert_eq!(parse(v).unwrap_err().field.as_deref(), Some("time"));

        let e = parse_body(BodyKind::Single, b"{not json", now()).unwrap_err();
        assert_eq!(e.index, None);
    }

    #[test]
    fn batch_names_the_index_of_the_bad_event() {
        let mut bad = lesson_event();
        bad["id"] = json!("");
        let body = json!([lesson_event(), bad]).to_string();
        let e = parse_body(BodyKind::Batch, body.as_bytes(), now()).unwrap_err();
        assert_eq!((e.index, e.field.as_deref()), (Some(1), Some("id")));
        assert!(e.to_string().contains("event 1, field id"));
    }

    #[test]
    fn batch_limits() {
        assert!(parse_body(BodyKind::Batch, b"[]", now()).is_err());
        assert!(
            parse_body(
                BodyKind::Batch,
                lesson_event().to_string().as_bytes(),
                now()
            )
            .is_err()
        );
        let many = Value::Array(vec![lesson_event(); MAX_BATCH + 1]).to_string();
        assert!(
            parse_body(BodyKind::Batch, many.as_bytes(), now())
                .unwrap_err()
                .message
                .contains("at most 1000")
        );
    }

    #[test]
    fn missing_time_is_the_receipt_time() {
        let mut v = lesson_event();
        v.as_object_mut().unwrap().remove("time");
        assert_eq!(parse(v).unwrap().time, now());
    }

    #[test]
    fn every_type_round_trips_its_trigger_name() {
        for t in EventType::ALL {
            assert_eq!(
                EventType::from_cloudevent_type(&t.cloudevent_type()),
                Some(t)
            );
        }
    }
}
