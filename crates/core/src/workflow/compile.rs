//! Checking a parsed workflow and compiling it: every value is given its meaning (trigger names,
//! durations, time zones, field paths, templates), every problem becomes a [`Diagnostic`] with
//! file, line and column, and the steps are flattened into the program the engine runs.
//!
//! Which fields a workflow may use: `event.id|source|type|time`, anything under `contact`, and
//! the objects that at least one of its trigger's event types can carry
//! ([`EventType::possible_objects`]). A multi-trigger workflow may thus use `lesson.title` when
//! one of its triggers carries lessons; for the others it renders empty, so guard it with
//! `{{#if lesson}}`. A guard does not make a field that no trigger carries acceptable: the guarded
//! text could never appear, which is a mistake worth reporting.

use super::bundle::{
    DEFAULT_LAYOUT, NO_LAYOUT, TEMPLATES_LABEL, email_template_files, is_valid_template_name,
    sms_template_file,
};
use super::parse::{
    At, AudienceDoc, ConditionDoc, EventNames, Node, Pos, STEP_KINDS, SendEmailDoc, SendSmsDoc,
    SendWindowDoc, StepDoc, StepKind, TriggerDoc, WaitDoc, WhereDoc, parse_workflow,
};
use super::{
    Audience, CompiledWorkflow, Condition, Diagnostic, EventMatcher, FieldFilter, FieldTest,
    FilterSubject, Instr, Schedule, SendWindow, Severity, StateFact, TimezoneChoice, Trigger,
    WaitSpec, WorkflowBundle,
};
use crate::Duration;
use crate::event::EventType;
use crate::template::{EmailTemplates, LAYOUT_BODY, ParsedTemplate, TemplatePos, TemplateSet};
use chrono::{NaiveTime, Weekday};
use serde_json::Value;
use serde_saphyr::Spanned;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

/// The longest wait or timeout a workflow may ask for: longer is a typo, and could not be
/// placed on a calendar.
const LONGEST_WAIT: Duration = Duration::from_secs(3650 * 86_400);

/// Custom values every herald knows; others come from `[custom_values]`.
pub const BUILTIN_CUSTOM_VALUES: [&str; 2] = ["login_url", "unsubscribe_url"];

/// Checks and compiles a bundle. `custom_values` are the names configured under
/// `[custom_values]` (the built-ins `login_url` and `unsubscribe_url` are always known).
/// On success also returns the warnings.
pub fn compile(
    bundle: WorkflowBundle,
    custom_values: &[String],
) -> Result<(CompiledWorkflow, Vec<Diagnostic>), Vec<Diagnostic>> {
    let doc = match parse_workflow(&bundle.yaml) {
        Ok(doc) => doc,
        Err(e) => {
            return Err(vec![diagnostic(
                Severity::Error,
                &bundle.path,
                e.pos,
                e.message,
            )]);
        }
    };
    let mut c = Compiler::new(&bundle, custom_values);
    let name = doc.name.value.trim().to_owned();
    if name.is_empty() {
        c.error(doc.name.pos(), "`name` must not be empty");
    }
    let trigger = c.trigger(&doc.trigger);
    // Steps after an event wait may read `received` and `awaited.*`.
    let mut awaited = Vec::new();
    doc.visit_steps(&mut |step| {
        if let Some(StepKind::Wait(WaitDoc::Map(wait))) = step.kind.as_ref().map(|k| &k.value)
            && let Some(event) = wait
                .event
                .as_ref()
                .and_then(|e| EventType::from_trigger_name(&e.value))
            && !awaited.contains(&event)
        {
            awaited.push(event);
        }
    });
    if let Some(scope) = &c.trigger_scope {
        c.trigger_scope = Some(Rc::new(FieldScope {
            awaited,
            ..FieldScope::clone(scope)
        }));
    }
    let exit_when = doc.exit_when.as_ref().map(|m| {
        let events = c.event_names(&m.value.event);
        let scope = (!events.is_empty()).then(|| FieldScope::of(&events));
        let filters = c.filters(m.value.filters.as_ref(), scope.as_ref());
        EventMatcher { events, filters }
    });
    c.default_from = doc.from.as_ref().and_then(|f| c.sender(f));
    c.workflow_layout = doc.layout.clone();
    let send_window = doc.send_window.as_ref().and_then(|w| c.send_window(w));
    c.steps(&doc.steps, None);

    if c.diagnostics.iter().any(|d| d.severity == Severity::Error) {
        return Err(c.diagnostics);
    }
    let Compiler {
        diagnostics,
        program,
        templates,
        ..
    } = c;
    let reads_contact_state = matches!(&trigger, Trigger::Events(m) if m.reads_contact_state())
        || exit_when
            .as_ref()
            .is_some_and(EventMatcher::reads_contact_state)
        || program.iter().any(
            |i| matches!(i, Instr::Branch { condition, .. } if condition.reads_contact_state()),
        );
    let workflow = CompiledWorkflow {
        id: bundle.id.clone(),
        version: bundle.version(),
        name,
        enabled: doc.enabled,
        category: doc.category,
        trigger,
        re_entry: doc.re_entry,
        exit_when,
        send_window,
        program,
        bundle,
        templates,
        reads_contact_state,
    };
    Ok((workflow, diagnostics))
}

fn diagnostic(severity: Severity, file: &str, pos: Pos, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        severity,
        file: file.to_owned(),
        line: pos.line,
        column: pos.column,
        message: message.into(),
    }
}

/// The fields a set of event types can carry.
#[derive(Clone)]
struct FieldScope {
    events: Vec<EventType>,
    objects: BTreeSet<&'static str>,
    /// The events the workflow's steps wait for: `awaited.*` holds one of them.
    awaited: Vec<EventType>,
}

impl FieldScope {
    fn of(events: &[EventType]) -> Self {
        let objects = events
            .iter()
            .flat_map(|e| e.possible_objects().iter().copied())
            .collect();
        Self {
            events: events.to_vec(),
            objects,
            awaited: Vec::new(),
        }
    }

    /// What is wrong with `path` for these events, if anything: an error for a field that can
    /// never hold a value (or a near miss of one that can), a warning for a field herald does not
    /// know (a platform may send more than herald knows; it then renders as sent). `what` names
    /// the kind of reference for the message ("merge field", "field").
    fn problem(&self, path: &str, what: &str) -> Option<(Severity, String)> {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        let field = parts.next();
        let events = self
            .events
            .iter()
            .map(|e| e.trigger_name())
            .collect::<Vec<_>>()
            .join(", ");
        let objects = self.objects.iter().copied().collect::<Vec<_>>().join(", ");
        if matches!(root, "received" | "awaited") {
            if self.awaited.is_empty() {
                return Some((
                    Severity::Error,
                    format!(
                        "{what} `{path}` is set by a `wait: {{event: …}}` step, and this workflow has none"
                    ),
                ));
            }
            return match (root, field) {
                (_, None) => None,
                ("received", Some(_)) => Some((
                    Severity::Error,
                    format!("{what} `{path}` does not exist: `received` is true or false"),
                )),
                (_, Some(_)) => {
                    let rest = &path["awaited.".len()..];
                    FieldScope::of(&self.awaited)
                        .problem(rest, what)
                        .map(|(severity, message)| {
                            let message = message
                                .replacen(&format!("`{rest}`"), &format!("`{path}`"), 1)
                                .replace("did you mean `", "did you mean `awaited.");
                            (severity, message)
                        })
                }
            };
        }
        if root == "event" {
            return match (field, parts.next()) {
                (None, _) | (Some("id" | "source" | "type" | "time"), None) => None,
                _ => Some((
                    Severity::Error,
                    format!("{what} `{path}` does not exist: event has id, source, type and time"),
                )),
            };
        }
        if root == "contact" || self.objects.contains(root) {
            let (Some(field), Some(known)) = (field, known_fields(root)) else {
                return None;
            };
            if known.contains(&field) {
                return None;
            }
            let list = known.join(", ");
            return Some(match near_miss(field, known) {
                Some(meant) => (
                    Severity::Error,
                    format!(
                        "{what} `{path}` is not a field of {root}: did you mean `{root}.{meant}`? ({root} has {list})"
                    ),
                ),
                None => (
                    Severity::Warning,
                    format!(
                        "{what} `{path}` is not a field herald knows of {root} ({list}): it renders empty unless your platform sends it"
                    ),
                ),
            });
        }
        let every_object: BTreeSet<&str> = EventType::ALL
            .iter()
            .flat_map(|t| t.possible_objects().iter().copied())
            .collect();
        if every_object.contains(root) {
            return Some((
                Severity::Error,
                format!(
                    "{what} `{path}` can never be filled: {events} events carry {objects} (and event.*), never {root}"
                ),
            ));
        }
        let roots: Vec<&str> = self.objects.iter().copied().chain(["event"]).collect();
        Some(match near_miss(root, &roots) {
            Some(meant) => (
                Severity::Error,
                format!(
                    "unknown {what} `{path}`: did you mean `{meant}`? (fields start with event, {objects})"
                ),
            ),
            None => (
                Severity::Warning,
                format!(
                    "{what} `{path}` names an object herald does not know (fields start with event, {objects}): it renders empty unless your platform sends `{root}` in the event's data"
                ),
            ),
        })
    }
}

/// The fields herald knows of each object of an event's `data` (the product contract's
/// envelope); `contact.custom_fields.*` is open.
fn known_fields(object: &str) -> Option<&'static [&'static str]> {
    match object {
        "contact" => Some(&[
            "id",
            "email",
            "phone",
            "first_name",
            "last_name",
            "timezone",
            "custom_fields",
        ]),
        "offer" => Some(&["id", "title", "product_ids"]),
        "product" => Some(&["id", "title", "url"]),
        "category" | "lesson" => Some(&["id", "title"]),
        "workflow" => Some(&["id"]),
        _ => None,
    }
}

/// The known name `name` is most likely a typo of: at most two edits away (one for short
/// names), closest first.
fn near_miss<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    let limit = if name.len() <= 4 { 1 } else { 2 };
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(name, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, k)| k)
}

/// Where a template's text came from, to turn positions inside it into file positions.
enum Origin {
    /// A string in the workflow YAML.
    Inline(Node),
    /// A template file, by its label (`templates/welcome.html.hbs`).
    File(String),
}

struct Compiler<'a> {
    bundle: &'a WorkflowBundle,
    known_custom_values: BTreeSet<&'a str>,
    diagnostics: Vec<Diagnostic>,
    /// What the trigger's events carry; `None` when the trigger is broken (its fields go unchecked
    /// rather than each reported again).
    trigger_scope: Option<Rc<FieldScope>>,
    default_from: Option<String>,
    /// The workflow's `layout:`.
    workflow_layout: Option<At<String>>,
    /// Layouts checked so far, by name: each is checked (and reported) once.
    layouts: BTreeMap<String, (Option<ParsedTemplate>, Option<ParsedTemplate>)>,
    /// Checking a layout: `body` is the email it wraps, not an event field.
    in_layout: bool,
    /// Every step id so far, with where it was defined.
    step_ids: BTreeMap<String, Pos>,
    program: Vec<Instr>,
    templates: TemplateSet,
}

impl<'a> Compiler<'a> {
    fn new(bundle: &'a WorkflowBundle, custom_values: &'a [String]) -> Self {
        let known_custom_values = BUILTIN_CUSTOM_VALUES
            .into_iter()
            .chain(custom_values.iter().map(String::as_str))
            .collect();
        Self {
            bundle,
            known_custom_values,
            diagnostics: Vec::new(),
            trigger_scope: None,
            default_from: None,
            workflow_layout: None,
            layouts: BTreeMap::new(),
            in_layout: false,
            step_ids: BTreeMap::new(),
            program: Vec::new(),
            templates: TemplateSet::default(),
        }
    }

    fn error(&mut self, pos: impl Into<Pos>, message: impl Into<String>) {
        let d = diagnostic(Severity::Error, &self.bundle.path, pos.into(), message);
        self.diagnostics.push(d);
    }

    fn warning(&mut self, pos: impl Into<Pos>, message: impl Into<String>) {
        let d = diagnostic(Severity::Warning, &self.bundle.path, pos.into(), message);
        self.diagnostics.push(d);
    }

    // --- trigger, filters, exit_when ---------------------------------------------------------

    fn trigger(&mut self, trigger: &At<TriggerDoc>) -> Trigger {
        let t = &trigger.value;
        if let Some(schedule) = &t.schedule {
            return self.schedule_trigger(schedule, t);
        }
        if let Some(node) = &t.timezone {
            self.error(
                node.referenced,
                "`timezone` belongs to schedule triggers, not event triggers",
            );
        }
        if let Some(node) = &t.audience {
            self.error(
                node.referenced,
                "`audience` belongs to schedule triggers, not event triggers",
            );
        }
        let mut events = Vec::new();
        let mut filters = Vec::new();
        match &t.event {
            None => self.error(
                trigger.pos(),
                "a trigger needs `event:` (a trigger name or a list of them) or `schedule:` (a cron expression)",
            ),
            Some(names) => {
                events = self.event_names(names);
                if !events.is_empty() {
                    self.trigger_scope = Some(Rc::new(FieldScope::of(&events)));
                }
                let scope = self.trigger_scope.clone();
                filters = self.filters(t.filters.as_ref(), scope.as_deref());
            }
        }
        Trigger::Events(EventMatcher { events, filters })
    }

    /// `schedule:` with `timezone` and `audience`. Its runs see the contact only (no trigger
    /// event carries anything else), which is what templates are checked against.
    fn schedule_trigger(&mut self, schedule: &Spanned<String>, t: &TriggerDoc) -> Trigger {
        if let Some(names) = &t.event {
            self.error(
                names.referenced,
                "a trigger has either `event:` or `schedule:`, not both: make two workflows",
            );
        }
        if let Some((field, _)) = t.filters.as_ref().and_then(|w| w.0.first()) {
            self.error(
                field.referenced,
                "`where` filters events; a schedule picks its contacts with `audience`",
            );
        }
        self.trigger_scope = Some(Rc::new(FieldScope::of(&[EventType::Enrollment])));
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .year(croner::parser::Year::Disallowed)
            .build();
        let cron = parser
            .parse(schedule.value.trim())
            .map_err(|e| {
                self.error(
                    schedule.referenced,
                    format!(
                        "`{}` is not a 5-field cron expression (minute hour day-of-month month day-of-week, e.g. \"0 9 * * MON\"): {e}",
                        schedule.value
                    ),
                )
            })
            .ok();
        let timezone = match &t.timezone {
            None => None,
            Some(tz) if tz.value == "contact" => {
                self.error(
                    tz.referenced,
                    "a schedule ticks once for everyone: name one zone such as Europe/Berlin (leave it out for HERALD_TIMEZONE)",
                );
                None
            }
            Some(tz) => match tz.value.parse::<chrono_tz::Tz>() {
                Ok(zone) => Some(zone),
                Err(_) => {
                    self.error(
                        tz.referenced,
                        format!(
                            "unknown time zone `{}`: use an IANA name such as Europe/Berlin",
                            tz.value
                        ),
                    );
                    None
                }
            },
        };
        let audience = match &t.audience {
            Some(audience) => self.audience(audience),
            None => {
                self.error(
                    schedule.referenced,
                    "a schedule trigger needs `audience:` (offers, products, inactive_for); `audience: {}` is every contact",
                );
                Audience::default()
            }
        };
        match cron {
            Some(cron) => Trigger::Schedule(Box::new(Schedule {
                expression: schedule.value.trim().to_owned(),
                cron,
                timezone,
                audience,
            })),
            None => Trigger::Events(EventMatcher {
                events: Vec::new(),
                filters: Vec::new(),
            }),
        }
    }

    fn audience(&mut self, audience: &Spanned<AudienceDoc>) -> Audience {
        let a = &audience.value;
        let mut ids = |list: &Option<Spanned<Vec<Spanned<String>>>>, what: &str| {
            let Some(list) = list else { return Vec::new() };
            if list.value.is_empty() {
                self.error(
                    list.referenced,
                    format!("`{what}` lists nothing: leave it out, or name at least one id"),
                );
            }
            let mut out: Vec<String> = list
                .value
                .iter()
                .map(|id| id.value.trim().to_owned())
                .collect();
            out.sort();
            out.dedup();
            out
        };
        let offers = ids(&a.offers, "offers");
        let products = ids(&a.products, "products");
        let inactive_for = a
            .inactive_for
            .as_ref()
            .and_then(|d| self.duration(&d.value, d.referenced.into()));
        if offers.is_empty() && products.is_empty() {
            self.warning(
                audience.referenced,
                "this audience lists no offer or product: every contact herald knows is enrolled at each tick",
            );
        }
        Audience {
            offers,
            products,
            inactive_for,
        }
    }

    /// The event types named; unknown names are reported (and left out).
    fn event_names(&mut self, names: &Spanned<EventNames>) -> Vec<EventType> {
        if names.value.0.is_empty() {
            self.error(names.referenced, "list at least one event");
        }
        let mut events = Vec::new();
        for (name, at) in &names.value.0 {
            let event = self.event_type(name, at.unwrap_or(names.referenced).into());
            if let Some(event) = event.filter(|e| !events.contains(e)) {
                events.push(event);
            }
        }
        events
    }

    fn event_type(&mut self, name: &str, pos: Pos) -> Option<EventType> {
        let event = EventType::from_trigger_name(name);
        if event.is_none() {
            let valid = EventType::ALL.map(EventType::trigger_name).join(", ");
            self.error(
                pos,
                format!("unknown trigger `{name}`: valid triggers are {valid}"),
            );
        }
        event
    }

    /// `where:` filters. `scope` is `None` when the events are unknown (paths are then only
    /// checked for syntax).
    ///
    /// A `not` list may name an object the events never carry: it then always passes (a filter such
    /// as `product.id: {not: [p_free]}` on offer events is the README's own example). An any-of list on such a
    /// field would never match, so that is an error.
    fn filters(
        &mut self,
        filters: Option<&WhereDoc>,
        scope: Option<&FieldScope>,
    ) -> Vec<FieldFilter> {
        let any_event = FieldScope::of(&EventType::ALL);
        let mut out = Vec::new();
        for (field, values) in filters.map(|w| &w.0[..]).unwrap_or_default() {
            let subject = match StateFact::from_key(&field.value) {
                Some(fact) => FilterSubject::State(fact),
                None => {
                    let scope = if values.value.negated {
                        scope.map(|_| &any_event)
                    } else {
                        scope
                    };
                    self.field_path(field, scope);
                    FilterSubject::Field(field.value.clone())
                }
            };
            let pos = Pos::from(values.referenced);
            if let Some(bad) = values.value.values.iter().find(|v| !is_scalar(v)) {
                self.error(
                    pos,
                    format!("`where` values are strings, numbers or true/false, not {bad}"),
                );
            }
            if values.value.values.is_empty() && !values.value.negated {
                self.error(pos, "an empty list never matches: list at least one value");
            }
            out.push(FieldFilter {
                subject,
                negated: values.value.negated,
                values: values.value.values.clone(),
            });
        }
        out
    }

    /// Checks a field path of a filter or condition: its syntax, and that the events can carry it.
    fn field_path(&mut self, field: &Spanned<String>, scope: Option<&FieldScope>) {
        let path = &field.value;
        let well_formed = path.split('.').all(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
        if !well_formed {
            self.error(
                field.referenced,
                format!("`{path}` is not a field path: write dotted names such as offer.id or contact.custom_fields.company"),
            );
        } else if let Some((severity, problem)) = scope.and_then(|s| s.problem(path, "field")) {
            let d = diagnostic(
                severity,
                &self.bundle.path,
                field.referenced.into(),
                problem,
            );
            self.diagnostics.push(d);
        }
    }

    // --- send window and times ---------------------------------------------------------------

    fn send_window(&mut self, window: &At<SendWindowDoc>) -> Option<SendWindow> {
        let w = &window.value;
        let days = self.weekdays(w.days.as_ref());
        let timezone = self.timezone(w.timezone.as_ref());
        let [start, end] = &w.between.value[..] else {
            self.error(
                w.between.referenced,
                "`between` takes two times: [\"09:00\", \"18:00\"]",
            );
            return None;
        };
        let (start, end) = (self.time_of_day(start)?, self.time_of_day(end)?);
        if start >= end {
            self.error(
                w.between.referenced,
                "the window must open before it closes (windows across midnight are not supported)",
            );
            return None;
        }
        Some(SendWindow {
            days,
            between: (start, end),
            timezone,
        })
    }

    /// `days: [mon, fri]`; absent means every day.
    fn weekdays(&mut self, days: Option<&Spanned<Vec<Spanned<String>>>>) -> Vec<Weekday> {
        let Some(days) = days else { return Vec::new() };
        if days.value.is_empty() {
            self.error(
                days.referenced,
                "`days` lists no day: leave it out for every day",
            );
        }
        let mut out = Vec::new();
        for day in &days.value {
            match parse_weekday(&day.value) {
                Some(d) if !out.contains(&d) => out.push(d),
                Some(_) => {}
                None => self.error(
                    day.referenced,
                    format!(
                        "unknown weekday `{}`: use mon, tue, wed, thu, fri, sat, sun",
                        day.value
                    ),
                ),
            }
        }
        out
    }

    fn time_of_day(&mut self, time: &Spanned<String>) -> Option<NaiveTime> {
        let parsed = NaiveTime::parse_from_str(time.value.trim(), "%H:%M").ok();
        if parsed.is_none() {
            self.error(
                time.referenced,
                format!(
                    "`{}` is not a time of day: write HH:MM, e.g. \"09:00\"",
                    time.value
                ),
            );
        }
        parsed
    }

    /// `timezone:` absent or `contact`: the contact's own; else an IANA name.
    fn timezone(&mut self, tz: Option<&Spanned<String>>) -> TimezoneChoice {
        match tz {
            None => TimezoneChoice::Contact,
            Some(tz) if tz.value == "contact" => TimezoneChoice::Contact,
            Some(tz) => match tz.value.parse::<chrono_tz::Tz>() {
                Ok(zone) => TimezoneChoice::Fixed(zone),
                Err(_) => {
                    self.error(
                        tz.referenced,
                        format!("unknown time zone `{}`: use an IANA name such as Europe/Berlin, or `contact`", tz.value),
                    );
                    TimezoneChoice::Contact
                }
            },
        }
    }

    fn duration(&mut self, text: &str, pos: Pos) -> Option<Duration> {
        let duration: Duration = text
            .parse()
            .map_err(|e: crate::duration::DurationError| self.error(pos, e.to_string()))
            .ok()?;
        if duration > LONGEST_WAIT {
            self.error(
                pos,
                format!("{text:?} is too long to place on a calendar: at most 10 years (3650d)"),
            );
            return None;
        }
        Some(duration)
    }

    fn sender(&mut self, from: &At<String>) -> Option<String> {
        let text = from.value.trim();
        if text.contains('@') && !text.chars().any(char::is_control) {
            return Some(text.to_owned());
        }
        self.error(
            from.pos(),
            "`from` must be one email address, e.g. \"Ada <ada@school.example.com>\"",
        );
        None
    }

    // --- steps -------------------------------------------------------------------------------

    /// Compiles a step list. `parent` is the position id of the enclosing branch (`2.then`).
    fn steps(&mut self, steps: &[At<StepDoc>], parent: Option<&str>) {
        for (i, step) in steps.iter().enumerate() {
            let position = parent.map_or_else(|| i.to_string(), |p| format!("{p}.{i}"));
            self.step(step, &position);
        }
    }

    fn step(&mut self, step: &At<StepDoc>, position: &str) {
        let s = &step.value;
        for (pos, problem) in &s.problems {
            self.error(*pos, problem.clone());
        }
        let step_id = self.step_id(s.id.as_ref(), position, step.pos());
        let Some(kind) = &s.kind else {
            if s.problems.is_empty() {
                self.error(step.pos(), format!("a step needs one of {STEP_KINDS}"));
            }
            return;
        };
        if !matches!(kind.value, StepKind::If(_)) {
            for (key, branch) in [("then", &s.then), ("else", &s.otherwise)] {
                if let Some(branch) = branch {
                    self.error(branch.pos(), format!("`{key}` belongs to an `if` step"));
                }
            }
        }
        let pc = self.program.len();
        match &kind.value {
            StepKind::SendEmail(email) => {
                let uses_login_url = self.email(pc, email, kind.node);
                let from = email
                    .from
                    .as_ref()
                    .and_then(|f| self.sender(f))
                    .or_else(|| self.default_from.clone());
                self.program.push(Instr::SendEmail {
                    step_id,
                    from,
                    uses_login_url,
                });
            }
            StepKind::SendSms(sms) => {
                let uses_login_url = self.sms(pc, sms, kind.node);
                self.program.push(Instr::SendSms {
                    step_id,
                    uses_login_url,
                });
            }
            StepKind::Wait(wait) => {
                if let Some(wait) = self.wait(wait, kind.pos()) {
                    self.program.push(Instr::Wait { step_id, wait });
                }
            }
            StepKind::If(condition) => self.branch(step, step_id, condition, kind.pos(), position),
        }
    }

    /// `if`: `Branch` (to the else part when false), the then-steps, a `Jump` over the
    /// else-steps when there are any, then the else-steps.
    fn branch(
        &mut self,
        step: &At<StepDoc>,
        step_id: String,
        condition: &ConditionDoc,
        pos: Pos,
        position: &str,
    ) {
        let condition = self
            .condition(condition, pos)
            .unwrap_or(Condition::All(Vec::new()));
        let branch_pc = self.program.len();
        self.program.push(Instr::Branch {
            step_id,
            condition,
            else_pc: branch_pc,
        });
        match &step.value.then {
            Some(then) => self.steps(&then.value, Some(&format!("{position}.then"))),
            None => self.error(pos, "an `if` step needs `then:` (a list of steps)"),
        }
        let otherwise = step
            .value
            .otherwise
            .as_ref()
            .map(|o| &o.value[..])
            .unwrap_or_default();
        let jump_pc = (!otherwise.is_empty()).then(|| {
            self.program.push(Instr::Jump { to: 0 });
            self.program.len() - 1
        });
        let else_pc = self.program.len();
        self.steps(otherwise, Some(&format!("{position}.else")));
        let end = self.program.len();
        if let Some(Instr::Branch {
            else_pc: target, ..
        }) = self.program.get_mut(branch_pc)
        {
            *target = else_pc;
        }
        if let Some(Instr::Jump { to }) = jump_pc.and_then(|pc| self.program.get_mut(pc)) {
            *to = end;
        }
    }

    /// The step's id: its `id:`, else its position. Ids must be unique within the workflow.
    fn step_id(&mut self, id: Option<&At<String>>, position: &str, step_pos: Pos) -> String {
        let (step_id, pos) = match id {
            Some(id) => {
                let valid = !id.value.is_empty()
                    && id
                        .value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
                if !valid {
                    self.error(
                        id.pos(),
                        format!(
                            "step id `{}` may hold only letters, digits, _, - and .",
                            id.value
                        ),
                    );
                }
                (id.value.clone(), id.pos())
            }
            None => (position.to_owned(), step_pos),
        };
        if let Some(first) = self.step_ids.get(&step_id) {
            let line = first.line;
            self.error(
                pos,
                format!("step id `{step_id}` is already used by the step at line {line}"),
            );
        } else {
            self.step_ids.insert(step_id.clone(), pos);
        }
        step_id
    }

    fn wait(&mut self, wait: &WaitDoc, pos: Pos) -> Option<WaitSpec> {
        let m = match wait {
            WaitDoc::For(text) => return self.duration(text, pos).map(WaitSpec::For),
            WaitDoc::Map(m) => m,
        };
        match (&m.until, &m.event) {
            (Some(until), None) => {
                if let Some(timeout) = &m.timeout {
                    self.error(
                        timeout.referenced,
                        "`timeout` belongs to waiting for an event",
                    );
                }
                let at = self.time_of_day(until);
                let days = self.weekdays(m.days.as_ref());
                let timezone = self.timezone(m.timezone.as_ref());
                Some(WaitSpec::Until {
                    at: at?,
                    days,
                    timezone,
                })
            }
            (None, Some(event)) => {
                let misplaced = [
                    ("days", m.days.as_ref().map(|d| d.referenced)),
                    ("timezone", m.timezone.as_ref().map(|t| t.referenced)),
                ];
                for (key, at) in misplaced {
                    if let Some(at) = at {
                        self.error(
                            at,
                            format!("`{key}` belongs to waiting until a time of day"),
                        );
                    }
                }
                let event = self.event_type(&event.value, event.referenced.into());
                let Some(timeout) = &m.timeout else {
                    self.error(pos, "waiting for an event needs `timeout:` (e.g. 3d)");
                    return None;
                };
                let timeout = self.duration(&timeout.value, timeout.referenced.into());
                Some(WaitSpec::Event {
                    event: event?,
                    timeout: timeout?,
                })
            }
            (Some(_), Some(_)) => {
                self.error(
                    pos,
                    "wait either `until` a time or for an `event`, not both",
                );
                None
            }
            (None, None) => {
                self.error(pos, "`wait` takes a duration (2d), {until: \"09:00\"} or {event: NAME, timeout: 3d}");
                None
            }
        }
    }

    fn condition(&mut self, c: &ConditionDoc, pos: Pos) -> Option<Condition> {
        let tests: Vec<FieldTest> = [
            c.equals.clone().map(FieldTest::Equals),
            c.not_equals.clone().map(FieldTest::NotEquals),
            c.one_of.clone().map(FieldTest::In),
            c.contains.clone().map(FieldTest::Contains),
            c.exists.map(FieldTest::Exists),
            c.gt.clone().map(FieldTest::Gt),
            c.lt.clone().map(FieldTest::Lt),
        ]
        .into_iter()
        .flatten()
        .collect();
        let facts: Vec<(StateFact, &Spanned<Value>)> = [
            (StateFact::HoldsOffer, &c.holds_offer),
            (StateFact::HoldsProduct, &c.holds_product),
            (StateFact::CompletedLesson, &c.completed_lesson),
            (StateFact::CompletedProduct, &c.completed_product),
            (StateFact::CompletedCategory, &c.completed_category),
        ]
        .into_iter()
        .filter_map(|(fact, value)| Some((fact, value.as_ref()?)))
        .collect();
        let kinds = [
            c.all.is_some() || c.any.is_some(),
            c.not.is_some(),
            !facts.is_empty(),
            c.field.is_some() || !tests.is_empty(),
        ];
        if kinds.into_iter().filter(|k| *k).count() > 1 || facts.len() > 1 {
            self.error(pos, "a condition is one of `all`/`any`, `not`, a fact such as `holds_offer`, or `{field, test}`: put several inside `all` or `any`");
            return None;
        }
        if let Some(not) = &c.not {
            let inner = self.condition(&not.value, not.referenced.into())?;
            return Some(Condition::Not(Box::new(inner)));
        }
        if let Some((fact, value)) = facts.first() {
            let ids = self.fact_ids(fact.key(), value)?;
            return Some(Condition::State { fact: *fact, ids });
        }
        let group = match (&c.all, &c.any) {
            (Some(_), Some(_)) => {
                self.error(
                    pos,
                    "a condition takes `all` or `any`, not both: nest one inside the other",
                );
                return None;
            }
            (Some(list), None) => Some((list, true)),
            (None, Some(list)) => Some((list, false)),
            (None, None) => None,
        };
        if let Some((list, all)) = group {
            if list.is_empty() {
                self.error(pos, "list at least one condition");
            }
            let children = list
                .iter()
                .filter_map(|s| self.condition(&s.value, s.referenced.into()))
                .collect();
            return Some(if all {
                Condition::All(children)
            } else {
                Condition::Any(children)
            });
        }
        let Some(field) = &c.field else {
            self.error(pos, "a condition needs `field` and a test (equals, not_equals, in, contains, exists, gt, lt), a fact of the contact (holds_offer, holds_product, completed_lesson, completed_product, completed_category), or `all`/`any`/`not`");
            return None;
        };
        let scope = self.trigger_scope.clone();
        self.field_path(field, scope.as_deref());
        let test = match <[FieldTest; 1]>::try_from(tests) {
            Ok([test]) => test,
            Err(tests) => {
                let n = tests.len();
                self.error(pos, format!("a condition has exactly one test of equals, not_equals, in, contains, exists, gt, lt; this one has {n}"));
                return None;
            }
        };
        let bad_operand = match &test {
            FieldTest::Gt(v) | FieldTest::Lt(v) => !(v.is_number() || v.is_string()),
            FieldTest::Equals(v) | FieldTest::NotEquals(v) | FieldTest::Contains(v) => {
                !is_scalar(v)
            }
            FieldTest::In(values) => values.iter().any(|v| !is_scalar(v)),
            FieldTest::Exists(_) => false,
        };
        if bad_operand {
            self.error(pos, "compare with strings, numbers or true/false (gt and lt: numbers, or strings such as dates)");
        }
        Some(Condition::Test {
            field: field.value.clone(),
            test,
        })
    }

    /// The ids of a state fact: one id, or a list of them (any of them).
    fn fact_ids(&mut self, key: &str, value: &Spanned<Value>) -> Option<Vec<String>> {
        let items = match &value.value {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        let ids: Vec<String> = items
            .iter()
            .filter_map(|v| match v {
                Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect();
        if ids.is_empty() || ids.len() != items.len() {
            self.error(
                value.referenced,
                format!("`{key}` takes an id or a list of ids, such as `{key}: [id_1, id_2]`"),
            );
            return None;
        }
        Some(ids)
    }

    // --- messages and templates --------------------------------------------------------------

    /// Checks the templates of an email step and adds them at `pc`; returns whether they use
    /// `<<login_url>>`.
    ///
    /// A part that is missing or does not parse is reported and left out; the workflow then does
    /// not compile, so a partial set is never used.
    fn email(&mut self, pc: usize, email: &SendEmailDoc, node: Node) -> bool {
        let subject = self.inline_template(&email.subject);
        // A subject is shown in inbox lists and kept with the message: no link that signs in
        // or unsubscribes belongs there.
        for value in subject.iter().flat_map(|s| &s.custom_values) {
            if BUILTIN_CUSTOM_VALUES.contains(&value.name.as_str()) {
                let message = format!(
                    "`<<{}>>` in a subject: subjects show in inbox lists and are stored with the message; put the link in the body",
                    value.name
                );
                self.template_diagnostic(
                    Severity::Error,
                    &Origin::Inline(email.subject.node),
                    Some(value.pos),
                    message,
                );
            }
        }
        let (html, text) = match (&email.template, &email.html, &email.text) {
            (Some(name), None, None) => self.email_files(name),
            (Some(name), _, _) => {
                self.error(
                    name.pos(),
                    "use either `template` or inline `html`/`text`, not both",
                );
                return false;
            }
            (None, None, None) => {
                self.error(
                    node.pos,
                    "an email needs `template`, or inline `html` and/or `text`",
                );
                return false;
            }
            (None, html, text) => (
                html.as_ref().and_then(|h| {
                    let parsed = self.inline_template(h)?;
                    self.warn_unescaped(&parsed, &Origin::Inline(h.node));
                    Some(parsed)
                }),
                text.as_ref().and_then(|t| self.inline_template(t)),
            ),
        };
        let Some(subject) = subject else { return false };
        let (html_layout, text_layout) = self.layout(email.layout.as_ref());
        let email = EmailTemplates {
            subject,
            html,
            text,
            html_layout,
            text_layout,
        };
        let uses_login_url = email.parts().any(|p| p.uses_custom_value("login_url"));
        self.templates.insert_email(pc, email);
        uses_login_url
    }

    /// The bodies of `template: NAME`: `NAME.html.hbs` and/or `NAME.txt.hbs`, at least one.
    fn email_files(
        &mut self,
        name: &At<String>,
    ) -> (Option<ParsedTemplate>, Option<ParsedTemplate>) {
        if !self.valid_template_name(name) {
            return (None, None);
        }
        let [html_file, text_file] = email_template_files(&name.value);
        let (html_src, text_src) = (
            self.bundle.templates.get(&html_file),
            self.bundle.templates.get(&text_file),
        );
        if html_src.is_none() && text_src.is_none() {
            self.error(
                name.pos(),
                format!("template `{0}` not found: create {TEMPLATES_LABEL}/{html_file} and/or {TEMPLATES_LABEL}/{text_file}", name.value),
            );
            return (None, None);
        }
        let html = html_src.and_then(|src| {
            let parsed = self.file_template(&html_file, src)?;
            self.warn_unescaped(
                &parsed,
                &Origin::File(format!("{TEMPLATES_LABEL}/{html_file}")),
            );
            Some(parsed)
        });
        let text = text_src.and_then(|src| self.file_template(&text_file, src));
        (html, text)
    }

    /// The layout of an email step: the step's `layout:`, else the workflow's, else the default
    /// layout when its files exist; `none` for none.
    fn layout(
        &mut self,
        step: Option<&At<String>>,
    ) -> (Option<ParsedTemplate>, Option<ParsedTemplate>) {
        let chosen = step.or(self.workflow_layout.as_ref()).cloned();
        let name = chosen
            .as_ref()
            .map_or(DEFAULT_LAYOUT.to_owned(), |l| l.value.trim().to_owned());
        if name == NO_LAYOUT {
            return (None, None);
        }
        if let Some(checked) = self.layouts.get(&name) {
            return checked.clone();
        }
        if let Some(at) = &chosen
            && !self.valid_template_name(at)
        {
            return (None, None);
        }
        let [html_file, text_file] = email_template_files(&name);
        let (html_src, text_src) = (
            self.bundle.templates.get(&html_file),
            self.bundle.templates.get(&text_file),
        );
        if html_src.is_none() && text_src.is_none() {
            if let Some(at) = &chosen {
                self.error(
                    at.pos(),
                    format!("layout `{name}` not found: create {TEMPLATES_LABEL}/{html_file} and/or {TEMPLATES_LABEL}/{text_file} (or write `layout: none`)"),
                );
            }
            return (None, None);
        }
        self.in_layout = true;
        let check = |c: &mut Self, file: &str, src: &str, html: bool| {
            let parsed = c.file_template(file, src)?;
            let origin = Origin::File(format!("{TEMPLATES_LABEL}/{file}"));
            if !parsed.fields.iter().any(|f| f.name == LAYOUT_BODY) {
                let place = if html { "{{{body}}}" } else { "{{body}}" };
                c.template_diagnostic(
                    Severity::Error,
                    &origin,
                    None,
                    format!("a layout places the email with {place}, and this one does not"),
                );
            }
            if html {
                let mut shown = parsed.clone();
                shown.unescaped.retain(|r| r.name != LAYOUT_BODY);
                c.warn_unescaped(&shown, &origin);
            }
            Some(parsed)
        };
        let html = html_src.and_then(|src| check(self, &html_file, src, true));
        let text = text_src.and_then(|src| check(self, &text_file, src, false));
        self.in_layout = false;
        self.layouts.insert(name, (html.clone(), text.clone()));
        (html, text)
    }

    /// `{{{ … }}}` in HTML writes the value unescaped: an event's value (a name) could then
    /// carry markup or a script into the email.
    fn warn_unescaped(&mut self, parsed: &ParsedTemplate, origin: &Origin) {
        for raw in &parsed.unescaped {
            let message = format!(
                "`{{{{{{{0}}}}}}}` writes {0} into the HTML without escaping: a value from an event could carry markup; use `{{{{{0}}}}}` unless it is HTML you trust",
                raw.name
            );
            self.template_diagnostic(Severity::Warning, origin, Some(raw.pos), message);
        }
    }

    /// Checks the body of an SMS step and adds it at `pc`; returns whether it uses `<<login_url>>`.
    fn sms(&mut self, pc: usize, sms: &SendSmsDoc, node: Node) -> bool {
        let body = match (&sms.body, &sms.template) {
            (Some(body), None) => self.inline_template(body),
            (None, Some(name)) => {
                if !self.valid_template_name(name) {
                    return false;
                }
                let file = sms_template_file(&name.value);
                match self.bundle.templates.get(&file) {
                    Some(src) => self.file_template(&file, src),
                    None => {
                        self.error(
                            name.pos(),
                            format!(
                                "template `{}` not found: create {TEMPLATES_LABEL}/{file}",
                                name.value
                            ),
                        );
                        None
                    }
                }
            }
            (Some(_), Some(name)) => {
                self.error(name.pos(), "use either `body` or `template`, not both");
                None
            }
            (None, None) => {
                self.error(node.pos, "an SMS needs `body` or `template`");
                None
            }
        };
        let Some(body) = body else { return false };
        let uses_login_url = body.uses_custom_value("login_url");
        self.templates.insert_sms(pc, body);
        uses_login_url
    }

    fn valid_template_name(&mut self, name: &At<String>) -> bool {
        let valid = is_valid_template_name(&name.value);
        if !valid {
            self.error(
                name.pos(),
                format!(
                    "`{}` is not a template name: use letters, digits, _ and - only",
                    name.value
                ),
            );
        }
        valid
    }

    fn inline_template(&mut self, text: &At<String>) -> Option<ParsedTemplate> {
        self.template(&text.value, &Origin::Inline(text.node))
    }

    fn file_template(&mut self, file: &str, source: &str) -> Option<ParsedTemplate> {
        self.template(source, &Origin::File(format!("{TEMPLATES_LABEL}/{file}")))
    }

    /// Parses a template and checks what it refers to against the trigger and the custom values.
    fn template(&mut self, source: &str, origin: &Origin) -> Option<ParsedTemplate> {
        let parsed = match ParsedTemplate::parse(source) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.template_diagnostic(
                    Severity::Error,
                    origin,
                    e.pos,
                    format!("template does not parse: {}", e.message),
                );
                return None;
            }
        };
        for field in &parsed.fields {
            if self.in_layout && field.name == LAYOUT_BODY {
                continue;
            }
            if let Some((severity, problem)) = self
                .trigger_scope
                .as_deref()
                .and_then(|s| s.problem(&field.name, "merge field"))
            {
                self.template_diagnostic(severity, origin, Some(field.pos), problem);
            }
        }
        let removal_trigger = self
            .trigger_scope
            .as_ref()
            .is_some_and(|s| s.events.contains(&EventType::OfferAccessRemoved));
        for value in &parsed.custom_values {
            if !self.known_custom_values.contains(value.name.as_str()) {
                let known = self
                    .known_custom_values
                    .iter()
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ");
                let message = format!(
                    "unknown custom value `<<{}>>`: known are {known} (configure others under [custom_values])",
                    value.name
                );
                self.template_diagnostic(Severity::Error, origin, Some(value.pos), message);
            } else if value.name == "login_url" && removal_trigger {
                let message = "`<<login_url>>` in a workflow triggered by offer_access_removed: the contact may \
                               hold no active offer any more, and a message whose link cannot work is skipped";
                self.template_diagnostic(Severity::Warning, origin, Some(value.pos), message);
            }
        }
        for unsupported in &parsed.unsupported {
            self.template_diagnostic(
                Severity::Error,
                origin,
                Some(unsupported.pos),
                unsupported.name.clone(),
            );
        }
        Some(parsed)
    }

    fn template_diagnostic(
        &mut self,
        severity: Severity,
        origin: &Origin,
        pos: Option<TemplatePos>,
        message: impl Into<String>,
    ) {
        let (file, pos) = match origin {
            Origin::File(file) => (
                file.as_str(),
                pos.map_or(Pos::default(), |p| Pos {
                    line: p.line,
                    column: p.column,
                }),
            ),
            Origin::Inline(node) => (self.bundle.path.as_str(), inline_pos(*node, pos)),
        };
        let d = diagnostic(severity, file, pos, message);
        self.diagnostics.push(d);
    }
}

/// The file position of a position inside an inline template. Exact for one-line plain or quoted
/// strings and for block scalars (`|`); approximate where YAML folded lines or processed escapes.
fn inline_pos(node: Node, pos: Option<TemplatePos>) -> Pos {
    match pos {
        None => node.pos,
        Some(p) if p.line == 1 => Pos {
            line: node.pos.line,
            column: node.pos.column + usize::from(node.quoted) + p.column - 1,
        },
        Some(p) => Pos {
            line: node.pos.line + p.line - 1,
            column: node.pos.column + p.column - 1,
        },
    }
}

fn parse_weekday(day: &str) -> Option<Weekday> {
    Some(match day.to_ascii_lowercase().as_str() {
        "mon" => Weekday::Mon,
        "tue" => Weekday::Tue,
        "wed" => Weekday::Wed,
        "thu" => Weekday::Thu,
        "fri" => Weekday::Fri,
        "sat" => Weekday::Sat,
        "sun" => Weekday::Sun,
        _ => return None,
    })
}

fn is_scalar(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
}
