//! The YAML schema of a workflow file, as serde types with source positions.
//!
//! These types describe only the *shape* of the file (serde-saphyr rejects unknown keys, duplicate
//! keys and wrong types, with line and column). What the values mean (trigger names, durations,
//! time zones, field paths, templates) is checked afterwards by [`super::compile`], so that one
//! run of `herald check` reports every such problem rather than the first.

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_saphyr::{Location, MessageFormatter, Spanned, UserMessageFormatter};
use std::fmt;

/// A 1-based line and column in a source file; `0:0` when unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl From<Location> for Pos {
    fn from(loc: Location) -> Self {
        Self {
            line: loc.line() as usize,
            column: loc.column() as usize,
        }
    }
}

/// Where a value sits in the YAML: its position, and whether it is a quoted scalar (so text
/// inside it starts one column later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Node {
    pub pos: Pos,
    pub quoted: bool,
}

/// A value with the position of its YAML node.
#[derive(Debug, Clone)]
pub struct At<T> {
    pub value: T,
    pub node: Node,
}

impl<T> At<T> {
    pub fn pos(&self) -> Pos {
        self.node.pos
    }
}

/// A YAML error that stops parsing: the file does not fit the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    pub pos: Pos,
    pub message: String,
}

/// Parses a workflow file into its document tree.
pub fn parse_workflow(yaml: &str) -> Result<WorkflowDoc, SchemaError> {
    let options = serde_saphyr::options! {
        // The Norway problem: `equals: no` compares with the text "no", not `false`.
        strict_booleans: true,
        // `equals: 0755` and `equals: 1_000` compare as the text written, not as numbers.
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        with_snippet: false,
        // A workflow is a short hand-written file: budgets far below the library's defaults.
        budget: serde_saphyr::budget! {
            max_documents: 1,
            max_depth: 64,
            max_nodes: 20_000,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_total_scalar_bytes: 4 * 1024 * 1024,
        },
    };
    let raw: RawWorkflowDoc =
        serde_saphyr::from_str_with_options(yaml, options).map_err(|e| SchemaError {
            pos: e.location().map(Pos::from).unwrap_or_default(),
            // The formatter leaves control characters to the caller: keep the message one line.
            message: UserMessageFormatter
                .format_message(&e)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect(),
        })?;
    Ok(raw.resolve(yaml))
}

/// A top-level workflow file.
#[derive(Debug)]
pub struct WorkflowDoc {
    pub name: At<String>,
    pub enabled: bool,
    pub category: super::Category,
    pub trigger: At<TriggerDoc>,
    pub re_entry: bool,
    pub exit_when: Option<At<MatcherDoc>>,
    pub from: Option<At<String>>,
    /// The layout of every email of the workflow (`none` for none).
    pub layout: Option<At<String>>,
    pub send_window: Option<At<SendWindowDoc>>,
    pub steps: Vec<At<StepDoc>>,
}

/// `trigger:`: `event` (with `where`), or `schedule` (with `timezone` and `audience`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerDoc {
    pub event: Option<Spanned<EventNames>>,
    #[serde(rename = "where")]
    pub filters: Option<WhereDoc>,
    pub schedule: Option<Spanned<String>>,
    pub timezone: Option<Spanned<String>>,
    pub audience: Option<Spanned<AudienceDoc>>,
}

/// A schedule's `audience:`: holders of any listed offer or product, optionally only those
/// inactive for a while.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudienceDoc {
    pub offers: Option<Spanned<Vec<Spanned<String>>>>,
    pub products: Option<Spanned<Vec<Spanned<String>>>>,
    pub inactive_for: Option<Spanned<String>>,
}

/// `exit_when:` (and the shape of an event trigger): event names plus optional filters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatcherDoc {
    pub event: Spanned<EventNames>,
    #[serde(rename = "where")]
    pub filters: Option<WhereDoc>,
}

/// `event: name` or `event: [a, b]`; each name with its position when written as a list.
#[derive(Debug)]
pub struct EventNames(pub Vec<(String, Option<Location>)>);

/// `where:` entries in file order: field path and accepted values.
#[derive(Debug, Default)]
pub struct WhereDoc(pub Vec<(Spanned<String>, Spanned<FilterValues>)>);

/// One `where` value: a scalar or list (any of them), or `{not: [...]}` (none of them).
#[derive(Debug)]
pub struct FilterValues {
    pub negated: bool,
    pub values: Vec<Value>,
}

/// `send_window:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendWindowDoc {
    pub days: Option<Spanned<Vec<Spanned<String>>>>,
    pub between: Spanned<Vec<Spanned<String>>>,
    pub timezone: Option<Spanned<String>>,
}

/// One step: an optional `id`, exactly one kind, and for `if` its `then`/`else` lists.
#[derive(Debug)]
pub struct StepDoc {
    /// Keys that make no step (an unknown kind, a second kind), with what to say about them.
    pub problems: Vec<(Pos, String)>,
    pub id: Option<At<String>>,
    pub kind: Option<At<StepKind>>,
    pub then: Option<At<Vec<At<StepDoc>>>>,
    pub otherwise: Option<At<Vec<At<StepDoc>>>>,
}

#[derive(Debug)]
pub enum StepKind {
    SendEmail(SendEmailDoc),
    SendSms(SendSmsDoc),
    Wait(WaitDoc),
    If(Box<ConditionDoc>),
}

/// `send_email:`.
#[derive(Debug)]
pub struct SendEmailDoc {
    pub subject: At<String>,
    pub template: Option<At<String>>,
    pub html: Option<At<String>>,
    pub text: Option<At<String>>,
    pub from: Option<At<String>>,
    /// The layout of this email (`none` for none), over the workflow's.
    pub layout: Option<At<String>>,
}

/// `send_sms:`.
#[derive(Debug)]
pub struct SendSmsDoc {
    pub body: Option<At<String>>,
    pub template: Option<At<String>>,
}

/// `wait:` in its three forms.
#[derive(Debug)]
pub enum WaitDoc {
    /// `wait: 2d`.
    For(String),
    /// `wait: {until: ..., days: ..., timezone: ...}` or `wait: {event: ..., timeout: ...}`.
    Map(Box<WaitMapDoc>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitMapDoc {
    pub until: Option<Spanned<String>>,
    pub days: Option<Spanned<Vec<Spanned<String>>>>,
    pub timezone: Option<Spanned<String>>,
    pub event: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

/// One `if` condition: `{all: [...]}`, `{any: [...]}`, `{not: ...}`, `{field, <test>}` or a fact
/// of the contact's state (`{holds_offer: o_pro}`). Which combinations make sense is checked
/// later, with the condition's position.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionDoc {
    pub all: Option<Vec<Spanned<ConditionDoc>>>,
    pub any: Option<Vec<Spanned<ConditionDoc>>>,
    pub not: Option<Box<Spanned<ConditionDoc>>>,
    pub holds_offer: Option<Spanned<Value>>,
    pub holds_product: Option<Spanned<Value>>,
    pub completed_lesson: Option<Spanned<Value>>,
    pub completed_product: Option<Spanned<Value>>,
    pub completed_category: Option<Spanned<Value>>,
    pub field: Option<Spanned<String>>,
    pub equals: Option<Value>,
    pub not_equals: Option<Value>,
    #[serde(rename = "in")]
    pub one_of: Option<Vec<Value>>,
    pub contains: Option<Value>,
    pub exists: Option<bool>,
    pub gt: Option<Value>,
    pub lt: Option<Value>,
}

impl WorkflowDoc {
    /// Calls `f` on every step, nested ones included, in file order.
    pub fn visit_steps<'a>(&'a self, f: &mut dyn FnMut(&'a StepDoc)) {
        fn walk<'a>(steps: &'a [At<StepDoc>], f: &mut dyn FnMut(&'a StepDoc)) {
            for step in steps {
                f(&step.value);
                for branch in [&step.value.then, &step.value.otherwise]
                    .into_iter()
                    .flatten()
                {
                    walk(&branch.value, f);
                }
            }
        }
        walk(&self.steps, f);
    }
}

// ---------------------------------------------------------------------------------------------
// Raw serde shapes. Strings that later become templates are `Spanned` so their text positions can
// be resolved against the source (quoted or not) once parsing is done; `resolve` does that.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflowDoc {
    name: Spanned<String>,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    #[serde(default)]
    category: super::Category,
    trigger: Spanned<TriggerDoc>,
    #[serde(default)]
    re_entry: bool,
    exit_when: Option<Spanned<MatcherDoc>>,
    from: Option<Spanned<String>>,
    layout: Option<Spanned<String>>,
    send_window: Option<Spanned<SendWindowDoc>>,
    steps: Vec<Spanned<RawStepDoc>>,
}

fn enabled_by_default() -> bool {
    true
}

struct RawStepDoc {
    /// Unknown or repeated step kinds, kept (not raised) so they are reported at their key.
    problems: Vec<(Location, String)>,
    id: Option<Spanned<String>>,
    kind: Option<Spanned<RawStepKind>>,
    then: Option<Spanned<Vec<Spanned<RawStepDoc>>>>,
    otherwise: Option<Spanned<Vec<Spanned<RawStepDoc>>>>,
}

enum RawStepKind {
    SendEmail(Box<RawSendEmailDoc>),
    SendSms(RawSendSmsDoc),
    Wait(WaitDoc),
    If(Box<ConditionDoc>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSendEmailDoc {
    subject: Spanned<String>,
    template: Option<Spanned<String>>,
    html: Option<Spanned<String>>,
    text: Option<Spanned<String>>,
    from: Option<Spanned<String>>,
    layout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSendSmsDoc {
    body: Option<Spanned<String>>,
    template: Option<Spanned<String>>,
}

/// Turns serde-saphyr locations into [`At`] values, noting quoted scalars.
struct Resolver<'a> {
    yaml: &'a str,
}

impl Resolver<'_> {
    fn at<T>(&self, s: Spanned<T>) -> At<T> {
        At {
            node: self.node(s.referenced),
            value: s.value,
        }
    }

    fn node(&self, loc: Location) -> Node {
        let quoted = loc
            .span()
            .byte_offset()
            .and_then(|o| self.yaml.get(usize::try_from(o).ok()?..))
            .is_some_and(|rest| rest.starts_with(['"', '\'']));
        Node {
            pos: loc.into(),
            quoted,
        }
    }

    fn steps(&self, steps: Vec<Spanned<RawStepDoc>>) -> Vec<At<StepDoc>> {
        steps.into_iter().map(|s| self.step(s)).collect()
    }

    fn step(&self, s: Spanned<RawStepDoc>) -> At<StepDoc> {
        let node = self.node(s.referenced);
        let raw = s.value;
        let branch = |b: Spanned<Vec<Spanned<RawStepDoc>>>| {
            let at = self.at(b);
            At {
                value: self.steps(at.value),
                node: at.node,
            }
        };
        let kind = raw.kind.map(|k| {
            let at = self.at(k);
            let value = match at.value {
                RawStepKind::SendEmail(e) => StepKind::SendEmail(SendEmailDoc {
                    subject: self.at(e.subject),
                    template: e.template.map(|t| self.at(t)),
                    html: e.html.map(|t| self.at(t)),
                    text: e.text.map(|t| self.at(t)),
                    from: e.from.map(|t| self.at(t)),
                    layout: e.layout.map(|t| self.at(t)),
                }),
                RawStepKind::SendSms(m) => StepKind::SendSms(SendSmsDoc {
                    body: m.body.map(|t| self.at(t)),
                    template: m.template.map(|t| self.at(t)),
                }),
                RawStepKind::Wait(w) => StepKind::Wait(w),
                RawStepKind::If(c) => StepKind::If(c),
            };
            At {
                value,
                node: at.node,
            }
        });
        let value = StepDoc {
            problems: raw
                .problems
                .into_iter()
                .map(|(loc, message)| (loc.into(), message))
                .collect(),
            id: raw.id.map(|i| self.at(i)),
            kind,
            then: raw.then.map(branch),
            otherwise: raw.otherwise.map(branch),
        };
        At { value, node }
    }
}

impl RawWorkflowDoc {
    fn resolve(self, yaml: &str) -> WorkflowDoc {
        let r = Resolver { yaml };
        WorkflowDoc {
            name: r.at(self.name),
            enabled: self.enabled,
            category: self.category,
            trigger: r.at(self.trigger),
            re_entry: self.re_entry,
            exit_when: self.exit_when.map(|m| r.at(m)),
            from: self.from.map(|f| r.at(f)),
            layout: self.layout.map(|l| r.at(l)),
            send_window: self.send_window.map(|w| r.at(w)),
            steps: r.steps(self.steps),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-written visitors, where a derive would lose positions (untagged enums do) or give a poor
// message (an unknown step kind should say which kinds exist).

/// The kinds of step, for messages.
pub const STEP_KINDS: &str = "send_email, send_sms, wait, if";

impl<'de> Deserialize<'de> for RawStepDoc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StepVisitor;
        impl<'de> Visitor<'de> for StepVisitor {
            type Value = RawStepDoc;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a step: a mapping with one of {STEP_KINDS}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawStepDoc, A::Error> {
                let mut step = RawStepDoc {
                    id: None,
                    kind: None,
                    then: None,
                    otherwise: None,
                    problems: Vec::new(),
                };
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let kind = match key.value.as_str() {
                        "id" => {
                            step.id = Some(map.next_value()?);
                            continue;
                        }
                        "then" => {
                            step.then = Some(map.next_value()?);
                            continue;
                        }
                        "else" => {
                            step.otherwise = Some(map.next_value()?);
                            continue;
                        }
                        kind @ ("send_email" | "send_sms" | "wait" | "if")
                            if step.kind.is_some() =>
                        {
                            let problem = format!(
                                "a step has exactly one kind, but `{kind}` follows another: start a new list \
                                 item (`- {kind}: ...`)"
                            );
                            step.problems.push((key.referenced, problem));
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                        "send_email" => map
                            .next_value::<Spanned<RawSendEmailDoc>>()?
                            .map(|e| RawStepKind::SendEmail(Box::new(e))),
                        "send_sms" => map
                            .next_value::<Spanned<RawSendSmsDoc>>()?
                            .map(RawStepKind::SendSms),
                        "wait" => map.next_value::<Spanned<WaitDoc>>()?.map(RawStepKind::Wait),
                        "if" => map
                            .next_value::<Spanned<ConditionDoc>>()?
                            .map(|c| RawStepKind::If(Box::new(c))),
                        other => {
                            let problem = format!(
                                "unknown step kind `{other}`: a step is one of {STEP_KINDS} (an `if` with \
                                 then/else), and may have an `id`"
                            );
                            step.problems.push((key.referenced, problem));
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    step.kind = Some(kind);
                }
                Ok(step)
            }
        }
        d.deserialize_map(StepVisitor)
    }
}

trait SpannedMap<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Spanned<U>;
}

impl<T> SpannedMap<T> for Spanned<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Spanned<U> {
        Spanned::new(f(self.value), self.referenced, self.defined)
    }
}

impl<'de> Deserialize<'de> for EventNames {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NamesVisitor;
        impl<'de> Visitor<'de> for NamesVisitor {
            type Value = EventNames;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an event name or a list of event names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EventNames, E> {
                Ok(EventNames(vec![(v.to_owned(), None)]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EventNames, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<Spanned<String>>()? {
                    names.push((name.value, Some(name.referenced)));
                }
                Ok(EventNames(names))
            }
        }
        d.deserialize_any(NamesVisitor)
    }
}

impl<'de> Deserialize<'de> for WhereDoc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct WhereVisitor;
        impl<'de> Visitor<'de> for WhereVisitor {
            type Value = WhereDoc;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of field paths to values, e.g. `offer.id: [o_basic, o_pro]`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WhereDoc, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(WhereDoc(entries))
            }
        }
        d.deserialize_map(WhereVisitor)
    }
}

impl<'de> Deserialize<'de> for FilterValues {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct NotDoc {
            not: OneOrMany,
        }
        struct FilterVisitor;
        impl<'de> Visitor<'de> for FilterVisitor {
            type Value = FilterValues;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value, a list of values, or {not: [values]}")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FilterValues, A::Error> {
                let not = NotDoc::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(FilterValues {
                    negated: true,
                    values: not.not.0,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<FilterValues, A::Error> {
                OneOrManyVisitor.visit_seq(seq).map(|v| FilterValues {
                    negated: false,
                    values: v.0,
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FilterValues, E> {
                Ok(FilterValues {
                    negated: false,
                    values: vec![Value::from(v)],
                })
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<FilterValues, E> {
                Ok(FilterValues {
                    negated: false,
                    values: vec![Value::from(v)],
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<FilterValues, E> {
                Ok(FilterValues {
                    negated: false,
                    values: vec![Value::from(v)],
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<FilterValues, E> {
                Ok(FilterValues {
                    negated: false,
                    values: vec![Value::from(v)],
                })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<FilterValues, E> {
                Ok(FilterValues {
                    negated: false,
                    values: vec![Value::from(v)],
                })
            }
        }
        d.deserialize_any(FilterVisitor)
    }
}

/// A scalar or a list of them, as JSON values.
struct OneOrMany(Vec<Value>);

struct OneOrManyVisitor;

impl<'de> Visitor<'de> for OneOrManyVisitor {
    type Value = OneOrMany;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a value or a list of values")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
        let mut values = Vec::new();
        while let Some(v) = seq.next_element::<Value>()? {
            values.push(v);
        }
        Ok(OneOrMany(values))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
        Ok(OneOrMany(vec![Value::from(v)]))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<OneOrMany, E> {
        Ok(OneOrMany(vec![Value::from(v)]))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<OneOrMany, E> {
        Ok(OneOrMany(vec![Value::from(v)]))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<OneOrMany, E> {
        Ok(OneOrMany(vec![Value::from(v)]))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<OneOrMany, E> {
        Ok(OneOrMany(vec![Value::from(v)]))
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OneOrManyVisitor)
    }
}

impl<'de> Deserialize<'de> for WaitDoc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct WaitVisitor;
        impl<'de> Visitor<'de> for WaitVisitor {
            type Value = WaitDoc;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration (30s, 15m, 4h, 2d, 1w), {until: \"09:00\"} or {event: NAME, timeout: DURATION}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WaitDoc, E> {
                Ok(WaitDoc::For(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<WaitDoc, A::Error> {
                WaitMapDoc::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|m| WaitDoc::Map(Box::new(m)))
            }
        }
        d.deserialize_any(WaitVisitor)
    }
}
