//! Workflows as marketers write them (`workflows/*.yaml`), compiled into a form the engine runs.
//!
//! A [`WorkflowBundle`] is the source: the YAML text plus every template file it references. It is
//! what gets stored with each version, so a run is pinned to exactly the text that started it.
//! [`compile`] checks a bundle and produces a [`CompiledWorkflow`]: the trigger and filters, and
//! the steps flattened into a small program ([`Instr`]) whose program counter is the run's cursor.
//!
//! Submodules: `parse` (the YAML schema), `compile` (checks and compilation), `bundle` (building
//! bundles, version hash), `condition` (evaluating `if`), `time` (waits and send windows).

mod bundle;
mod compile;
mod condition;
mod diagram;
mod parse;
mod time;

#[cfg(test)]
mod tests;

pub use bundle::{TEMPLATES_LABEL, bundle_from};
pub use compile::{BUILTIN_CUSTOM_VALUES, compile};
pub use time::{add_duration, next_local_time, resolve_timezone};

use crate::Duration;
use crate::event::{CourseEvent, EventType};
use crate::template::{CustomValues, RenderError, RenderedEmail, TemplateSet};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The source of one workflow version: what `herald check` checks and what a run is pinned to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkflowBundle {
    /// The file name without `.yaml`: the workflow's id.
    pub id: String,
    /// Where the YAML came from (for diagnostics), e.g. `workflows/welcome.yaml`.
    pub path: String,
    pub yaml: String,
    /// Template files this workflow references, by file name (`welcome.html.hbs`), with their
    /// folder-relative contents. Templates are part of the version: editing one pins new runs only.
    pub templates: BTreeMap<String, String>,
}

/// A problem found while checking a workflow, pointing at the file, line and column to fix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// File the problem is in (the workflow YAML or a template file).
    pub file: String,
    /// 1-based; 0 when the problem has no position (e.g. a missing file).
    pub line: usize,
    /// 1-based; 0 when unknown.
    pub column: usize,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {sev}: {}",
                self.file, self.line, self.column, self.message
            )
        } else {
            write!(f, "{}: {sev}: {}", self.file, self.message)
        }
    }
}

/// What a workflow's messages are, for a contact's opt-outs: unsubscribe and STOP suppress
/// marketing only; transactional messages (receipts, access, sign-in) still go out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    #[default]
    Marketing,
    Transactional,
}

/// A checked workflow version, ready to match events and run.
#[derive(Debug)]
pub struct CompiledWorkflow {
    pub id: String,
    /// Content hash of the bundle (hex): the version a run is pinned to.
    pub version: String,
    pub name: String,
    /// `false`: a draft, loaded and checked but never triggered.
    pub enabled: bool,
    pub category: Category,
    pub trigger: Trigger,
    /// `true`: a contact may run this workflow again once an earlier run has ended.
    pub re_entry: bool,
    /// A matching event for the same contact ends the run (the goal was reached).
    pub exit_when: Option<EventMatcher>,
    pub send_window: Option<SendWindow>,
    /// The steps, flattened; a run's cursor is an index into this.
    pub program: Vec<Instr>,
    /// The source, kept so the version can be stored and reloaded exactly.
    pub bundle: WorkflowBundle,
    /// The compiled templates of every send step of this version.
    pub templates: TemplateSet,
    /// Whether a filter or condition reads the contact's state ([`ContactState`]): only then is
    /// it loaded for this workflow's runs.
    pub reads_contact_state: bool,
}

/// What starts a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    /// Any of these event types, when `filter` matches.
    Events(EventMatcher),
    /// Every tick of a cron schedule, one run per contact in the audience.
    Schedule(Box<Schedule>),
}

/// `trigger: {schedule: "0 9 * * MON", timezone: Europe/Berlin, audience: {...}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The 5-field cron expression as written.
    pub expression: String,
    pub cron: croner::Cron,
    /// `None`: `HERALD_TIMEZONE`.
    pub timezone: Option<chrono_tz::Tz>,
    pub audience: Audience,
}

/// Who a schedule's tick (or an operator's enrollment by audience) enrolls: contacts holding an
/// active grant of any listed offer or product (a product also through an offer that includes
/// it), and with `inactive_for`, only those with no course event for that long. Nothing listed
/// means every contact herald knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audience {
    pub offers: Vec<String>,
    pub products: Vec<String>,
    pub inactive_for: Option<Duration>,
}

/// One tick of a schedule: when it is, and its wall-clock time in the schedule's zone, which
/// names it (a wall-clock time repeated when the clocks go back is one tick, not two).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    pub at: DateTime<Utc>,
    pub local: String,
}

impl Schedule {
    /// The zone the expression is read in.
    pub fn zone(&self, default_timezone: chrono_tz::Tz) -> chrono_tz::Tz {
        self.timezone.unwrap_or(default_timezone)
    }

    /// The latest tick at or before `now`.
    pub fn latest_tick(&self, now: DateTime<Utc>, default_timezone: chrono_tz::Tz) -> Option<Tick> {
        let zone = self.zone(default_timezone);
        let at = self
            .cron
            .find_previous_occurrence(&now.with_timezone(&zone), true)
            .ok()?;
        Some(Tick {
            at: at.with_timezone(&Utc),
            local: at.naive_local().format("%Y-%m-%dT%H:%M").to_string(),
        })
    }

    /// The first tick after `now`.
    pub fn next_tick(
        &self,
        now: DateTime<Utc>,
        default_timezone: chrono_tz::Tz,
    ) -> Option<DateTime<Utc>> {
        let zone = self.zone(default_timezone);
        self.cron
            .find_next_occurrence(&now.with_timezone(&zone), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// A set of event types plus `where` filters.
#[derive(Debug, Clone, PartialEq)]
pub struct EventMatcher {
    pub events: Vec<EventType>,
    pub filters: Vec<FieldFilter>,
}

/// One `where` entry: `offer.id: [o_basic, o_pro]`, `product.id: {not: [p_free]}` or
/// `holds_offer: [o_pro]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldFilter {
    pub subject: FilterSubject,
    /// `false` for an any-of list, `true` for a `not` list.
    pub negated: bool,
    pub values: Vec<Value>,
}

/// What a `where` entry looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterSubject {
    /// A field path of the event, such as `offer.id`.
    Field(String),
    /// A fact of the contact's state: the entry holds when the state lists one of the values.
    State(StateFact),
}

/// What herald knows of a contact beyond the event in hand, as its stored events left it: the
/// offers and products it holds now (a product also through an offer that includes it) and the
/// lessons, products and categories it has completed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContactState {
    pub offers: BTreeSet<String>,
    pub products: BTreeSet<String>,
    pub completed_lessons: BTreeSet<String>,
    pub completed_products: BTreeSet<String>,
    pub completed_categories: BTreeSet<String>,
}

/// One kind of fact in a [`ContactState`], named as conditions and filters write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFact {
    HoldsOffer,
    HoldsProduct,
    CompletedLesson,
    CompletedProduct,
    CompletedCategory,
}

impl StateFact {
    pub const ALL: [StateFact; 5] = [
        Self::HoldsOffer,
        Self::HoldsProduct,
        Self::CompletedLesson,
        Self::CompletedProduct,
        Self::CompletedCategory,
    ];

    /// The key in YAML: `holds_offer: o_pro`.
    pub fn key(self) -> &'static str {
        match self {
            Self::HoldsOffer => "holds_offer",
            Self::HoldsProduct => "holds_product",
            Self::CompletedLesson => "completed_lesson",
            Self::CompletedProduct => "completed_product",
            Self::CompletedCategory => "completed_category",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.key() == key)
    }

    /// The ids this fact is about, in `state`.
    pub fn ids_mut(self, state: &mut ContactState) -> &mut BTreeSet<String> {
        match self {
            Self::HoldsOffer => &mut state.offers,
            Self::HoldsProduct => &mut state.products,
            Self::CompletedLesson => &mut state.completed_lessons,
            Self::CompletedProduct => &mut state.completed_products,
            Self::CompletedCategory => &mut state.completed_categories,
        }
    }

    pub fn ids(self, state: &ContactState) -> &BTreeSet<String> {
        match self {
            Self::HoldsOffer => &state.offers,
            Self::HoldsProduct => &state.products,
            Self::CompletedLesson => &state.completed_lessons,
            Self::CompletedProduct => &state.completed_products,
            Self::CompletedCategory => &state.completed_categories,
        }
    }
}

impl ContactState {
    /// Applies what `event` itself says of its contact: an offer or product granted or removed, a
    /// lesson, product or category completed (how `herald preview` sees a contact it has no
    /// stored state for).
    pub fn apply(&mut self, event: &CourseEvent) {
        let id = |object: &str| {
            event
                .object(object)
                .and_then(|o| o.get("id"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let (set, object, granted) = match event.event_type {
            EventType::OfferAccessGranted => (&mut self.offers, "offer", true),
            EventType::OfferAccessRemoved => (&mut self.offers, "offer", false),
            EventType::ProductAccessGranted => (&mut self.products, "product", true),
            EventType::ProductAccessRemoved => (&mut self.products, "product", false),
            EventType::LessonCompleted => (&mut self.completed_lessons, "lesson", true),
            EventType::ProductCompleted => (&mut self.completed_products, "product", true),
            EventType::CategoryCompleted => (&mut self.completed_categories, "category", true),
            _ => return,
        };
        if let Some(id) = id(object) {
            if granted {
                set.insert(id);
            } else {
                set.remove(&id);
            }
        }
    }

    /// Records that the contact completed the item an event of `trigger` names (`lesson_completed`
    /// with lesson `id`, ...); other triggers are ignored.
    pub fn add_completion(&mut self, trigger: &str, id: String) {
        let set = match trigger {
            "lesson_completed" => &mut self.completed_lessons,
            "product_completed" => &mut self.completed_products,
            "category_completed" => &mut self.completed_categories,
            _ => return,
        };
        set.insert(id);
    }
}

/// `send_window`: sends outside it wait for its next opening.
#[derive(Debug, Clone, PartialEq)]
pub struct SendWindow {
    /// Allowed weekdays; empty means every day.
    pub days: Vec<chrono::Weekday>,
    /// Local opening and closing time (start < end).
    pub between: (chrono::NaiveTime, chrono::NaiveTime),
    pub timezone: TimezoneChoice,
}

/// Which time zone a time-of-day refers to.
#[derive(Debug, Clone, PartialEq)]
pub enum TimezoneChoice {
    /// The contact's own, else the configured default.
    Contact,
    Fixed(chrono_tz::Tz),
}

/// One instruction of a compiled workflow. `step_id` is the YAML `id:` or the step's position
/// (`1`, `3.then.0`), and with the run it keys the at-most-once send guarantee. Execution starts at
/// 0 and the run is complete when the program counter reaches `program.len()`.
#[derive(Debug, Clone, PartialEq)]
pub enum Instr {
    SendEmail {
        step_id: String,
        from: Option<String>,
        uses_login_url: bool,
    },
    SendSms {
        step_id: String,
        uses_login_url: bool,
    },
    Wait {
        step_id: String,
        wait: WaitSpec,
    },
    /// Evaluate `condition`; when false, continue at `else_pc`.
    Branch {
        step_id: String,
        condition: Condition,
        else_pc: usize,
    },
    /// Unconditional jump (the end of a `then` list skips the `else` list).
    Jump {
        to: usize,
    },
}

impl Instr {
    /// The step this instruction is (a jump is no step).
    pub fn step_id(&self) -> Option<&str> {
        match self {
            Self::SendEmail { step_id, .. }
            | Self::SendSms { step_id, .. }
            | Self::Wait { step_id, .. }
            | Self::Branch { step_id, .. } => Some(step_id),
            Self::Jump { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum WaitSpec {
    /// `wait: 2d`.
    For(crate::Duration),
    /// `wait: {until: "09:00", days: [...], timezone: contact}`: the next such local time.
    Until {
        at: chrono::NaiveTime,
        days: Vec<chrono::Weekday>,
        timezone: TimezoneChoice,
    },
    /// `wait: {event: lesson_completed, timeout: 3d}`: the contact's next such event, or the timeout.
    Event {
        event: EventType,
        timeout: crate::Duration,
    },
}

/// `if` conditions: `all`/`any`/`not` of field tests and facts of the contact's state.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Test {
        field: String,
        test: FieldTest,
    },
    /// `holds_offer: [o_pro, o_vip]`: the contact's state lists any of `ids`.
    State {
        fact: StateFact,
        ids: Vec<String>,
    },
}

impl Condition {
    /// Whether evaluating this condition needs the contact's state.
    pub fn reads_contact_state(&self) -> bool {
        match self {
            Self::All(cs) | Self::Any(cs) => cs.iter().any(Self::reads_contact_state),
            Self::Not(c) => c.reads_contact_state(),
            Self::Test { .. } => false,
            Self::State { .. } => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum FieldTest {
    Equals(Value),
    NotEquals(Value),
    In(Vec<Value>),
    Contains(Value),
    Exists(bool),
    Gt(Value),
    Lt(Value),
}

impl CompiledWorkflow {
    /// Whether `event` should start a run of this workflow (enabled, trigger and filters), for a
    /// contact in `state`.
    pub fn triggered_by(&self, event: &CourseEvent, state: &ContactState) -> bool {
        self.enabled && self.trigger_matches(event, state)
    }

    /// Whether `event` matches the trigger and its filters, enabled or not (where the enabled
    /// state is decided elsewhere, e.g. shared between processes).
    pub fn trigger_matches(&self, event: &CourseEvent, state: &ContactState) -> bool {
        match &self.trigger {
            Trigger::Events(m) => m.matches(event, state),
            Trigger::Schedule(_) => false,
        }
    }

    /// Whether a step waits for an event (`wait: {event: …}`): its later steps can then read
    /// `received` and `awaited.*`.
    pub fn waits_for_events(&self) -> bool {
        self.program.iter().any(|i| {
            matches!(
                i,
                Instr::Wait {
                    wait: WaitSpec::Event { .. },
                    ..
                }
            )
        })
    }

    /// The schedule, for a workflow a schedule starts.
    pub fn schedule(&self) -> Option<&Schedule> {
        match &self.trigger {
            Trigger::Schedule(s) => Some(s),
            Trigger::Events(_) => None,
        }
    }

    /// Whether `event` ends a run of this workflow for its contact (`exit_when`).
    pub fn exits_on(&self, event: &CourseEvent, state: &ContactState) -> bool {
        self.exit_when
            .as_ref()
            .is_some_and(|m| m.matches(event, state))
    }

    /// Renders the email of the send step at `pc` for an event context.
    pub fn render_email(
        &self,
        pc: usize,
        context: &Value,
        custom: &CustomValues,
    ) -> Result<RenderedEmail, RenderError> {
        self.templates.render_email(pc, context, custom)
    }

    /// Renders the SMS body of the send step at `pc`.
    pub fn render_sms(
        &self,
        pc: usize,
        context: &Value,
        custom: &CustomValues,
    ) -> Result<String, RenderError> {
        self.templates.render_sms(pc, context, custom)
    }
}

impl EventMatcher {
    /// Type in the list and every filter passes. A field the event does not carry fails an
    /// any-of list and passes a `not` list.
    pub fn matches(&self, event: &CourseEvent, state: &ContactState) -> bool {
        self.events.contains(&event.event_type)
            && self.filters.iter().all(|f| f.matches(event, state))
    }

    /// Whether a filter reads the contact's state.
    pub fn reads_contact_state(&self) -> bool {
        self.filters
            .iter()
            .any(|f| matches!(f.subject, FilterSubject::State(_)))
    }
}

impl FieldFilter {
    pub fn matches(&self, event: &CourseEvent, state: &ContactState) -> bool {
        let found = match &self.subject {
            FilterSubject::Field(field) => event
                .field(field)
                .is_some_and(|v| self.values.iter().any(|want| loosely_equal(&v, want))),
            FilterSubject::State(fact) => {
                let ids = fact.ids(state);
                self.values.iter().any(|want| {
                    ids.iter()
                        .any(|id| loosely_equal(&Value::from(id.as_str()), want))
                })
            }
        };
        found != self.negated
    }
}

/// YAML `o_pro` and JSON `"o_pro"` are equal, and so are YAML `5` and JSON `"5"`: marketers
/// should not have to think about quoting.
pub fn loosely_equal(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::String(a), Value::Number(b)) | (Value::Number(b), Value::String(a)) => {
            a == &b.to_string()
        }
        (Value::String(a), Value::Bool(b)) | (Value::Bool(b), Value::String(a)) => {
            a == &b.to_string()
        }
        _ => actual == expected,
    }
}
