//! Message templates: handlebars with separate escaping for HTML (escaped) and for subject, text
//! and SMS (not HTML-escaped), a `default` helper, and `<<name>>` custom values resolved as part of
//! the template (never by scanning rendered text).
//!
//! A custom value is rewritten, in the parsed template, from literal text into a lookup of a
//! reserved root key ([`CUSTOM_VALUES_KEY`]) that only the renderer fills. So `<<login_url>>`
//! written by the marketer becomes a link, while a contact whose first name is the text
//! `<<login_url>>` is rendered as that text.

use handlebars::template::{Parameter, Template, TemplateElement};
use handlebars::{
    Context, Handlebars, Helper, HelperDef, Path, PathSeg, RenderContext, ScopedJson,
    TemplateErrorReason, html_escape, no_escape,
};
use regex::Regex;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::LazyLock;

/// Values for `<<name>>` placeholders at render time: the configured `[custom_values]` plus the
/// built-ins the engine supplies per message (`login_url`, `unsubscribe_url`).
pub type CustomValues = BTreeMap<String, String>;

/// The root key of the render context under which custom values are looked up. Whatever an event
/// carries under this key is overwritten at render time.
pub const CUSTOM_VALUES_KEY: &str = "__custom";

/// Helpers herald templates may call: handlebars' built-ins plus `default`, `format_date` and
/// `format_number`.
pub const KNOWN_HELPERS: [&str; 20] = [
    "if",
    "unless",
    "each",
    "with",
    "lookup",
    "raw",
    "log",
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "and",
    "or",
    "not",
    "len",
    "default",
    "format_date",
    "format_number",
];

/// The custom values under which the engine passes `HERALD_TIMEZONE` and `HERALD_LOCALE` to
/// `format_date` and `format_number` (for a contact without its own). Not `<<name>>`s a template
/// can write.
const DEFAULT_TIMEZONE_VALUE: &str = "__default_timezone";
const DEFAULT_LOCALE_VALUE: &str = "__default_locale";

/// Gives the date and number helpers the time zone and locale of contacts without their own.
pub fn insert_contact_defaults(custom: &mut CustomValues, timezone: &str, locale: &str) {
    custom.insert(DEFAULT_TIMEZONE_VALUE.into(), timezone.into());
    custom.insert(DEFAULT_LOCALE_VALUE.into(), locale.into());
}

/// The locale of the contact being rendered for (`contact.locale`), else the configured default,
/// else POSIX (English names, a plain `.` and no grouping).
fn render_locale(ctx: &Context) -> chrono::Locale {
    let root = ctx.data();
    [
        root.pointer("/contact/locale"),
        root.pointer(&format!("/{CUSTOM_VALUES_KEY}/{DEFAULT_LOCALE_VALUE}")),
    ]
    .into_iter()
    .flatten()
    .find_map(|l| crate::locale::parse_locale(l.as_str()?))
    .unwrap_or(chrono::Locale::POSIX)
}

/// Block helpers whose body sees another context (an element, an object) rather than the event.
const SCOPING_HELPERS: [&str; 2] = ["each", "with"];

/// `<<name>>` with a name as configuration keys are written.
static CUSTOM_VALUE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"<<([A-Za-z_][A-Za-z0-9_]*)>>").expect("a valid regex literal"));

/// A rendered email.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RenderedEmail {
    /// One line: line breaks from values are removed.
    pub subject: String,
    pub html: Option<String>,
    pub text: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("template {template}: {message}")]
pub struct RenderError {
    pub template: String,
    pub message: String,
}

/// A 1-based line and column inside a template's source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplatePos {
    pub line: usize,
    pub column: usize,
}

/// A name a template refers to, with where: a merge field (`lesson.title`), a custom value
/// (`login_url`) or, for [`ParsedTemplate::unsupported`], a description of the construct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRef {
    pub name: String,
    pub pos: TemplatePos,
}

/// A template source that is not valid handlebars.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateSyntaxError {
    pub message: String,
    /// Where the parser gave up, when it says.
    pub pos: Option<TemplatePos>,
}

/// A parsed template with its custom values rewritten, and what it refers to, for checking.
#[derive(Debug, Clone)]
pub struct ParsedTemplate {
    template: Template,
    /// Merge fields read from the event context, as dotted paths (`contact.first_name`). Paths
    /// inside `{{#each}}`/`{{#with}}` bodies are relative to another value and are not listed.
    pub fields: Vec<TemplateRef>,
    /// `<<name>>` custom values.
    pub custom_values: Vec<TemplateRef>,
    /// Constructs herald cannot render: partials, decorators, unknown helpers.
    pub unsupported: Vec<TemplateRef>,
    /// `{{{ … }}}`: values written without HTML escaping (the expression as written).
    pub unescaped: Vec<TemplateRef>,
}

impl ParsedTemplate {
    /// Parses `source` and rewrites its `<<name>>` custom values.
    pub fn parse(source: &str) -> Result<Self, TemplateSyntaxError> {
        let mut template = Template::compile(source).map_err(|e| TemplateSyntaxError {
            message: match e.reason() {
                // The parser's own text lists grammar rules, which tells a marketer nothing.
                TemplateErrorReason::InvalidSyntax(_) => {
                    "invalid handlebars syntax: check the {{...}} here, and that every {{#block}} has its {{/block}}"
                        .to_owned()
                }
                reason => reason.to_string(),
            },
            pos: e.pos().map(|(line, column)| TemplatePos { line, column }),
        })?;
        let mut walker = Walker::new(source);
        walker.template(&mut template, false, TemplatePos { line: 1, column: 1 })?;
        let Walker {
            fields,
            custom_values,
            unsupported,
            unescaped,
            ..
        } = walker;
        Ok(Self {
            template,
            fields,
            custom_values,
            unsupported,
            unescaped,
        })
    }

    /// Whether the template uses the custom value `<<name>>`.
    pub fn uses_custom_value(&self, name: &str) -> bool {
        self.custom_values.iter().any(|r| r.name == name)
    }
}

/// Walks a parsed template: collects what it refers to and rewrites custom values in its text.
struct Walker<'s> {
    source: &'s str,
    /// Byte offset from which the next custom value is searched in `source`, to report positions.
    search_from: usize,
    fields: Vec<TemplateRef>,
    custom_values: Vec<TemplateRef>,
    unsupported: Vec<TemplateRef>,
    unescaped: Vec<TemplateRef>,
}

impl<'s> Walker<'s> {
    fn new(source: &'s str) -> Self {
        Self {
            source,
            search_from: 0,
            fields: Vec::new(),
            custom_values: Vec::new(),
            unsupported: Vec::new(),
            unescaped: Vec::new(),
        }
    }

    /// `scoped`: inside an `each`/`with` body, where relative paths do not name event fields.
    fn template(
        &mut self,
        t: &mut Template,
        scoped: bool,
        outer: TemplatePos,
    ) -> Result<(), TemplateSyntaxError> {
        // Chained `{{else if}}` bodies come without positions; keep mappings only when aligned.
        let aligned = t.mapping.len() == t.elements.len();
        let mut elements = Vec::with_capacity(t.elements.len());
        let mut mapping = Vec::with_capacity(t.mapping.len());
        for (i, mut element) in std::mem::take(&mut t.elements).into_iter().enumerate() {
            let at = t.mapping.get(i).filter(|_| aligned);
            let pos = at.map_or(outer, |m| TemplatePos {
                line: m.0,
                column: m.1,
            });
            match element {
                TemplateElement::RawString(text) => {
                    for (piece, piece_pos) in self.raw_text(text, pos)? {
                        elements.push(piece);
                        if let Some(m) = at {
                            let mut m = m.clone();
                            (m.0, m.1) = (piece_pos.line, piece_pos.column);
                            mapping.push(m);
                        }
                    }
                    continue;
                }
                TemplateElement::Expression(ref ht) => {
                    self.expression(&ht.name, &ht.params, ht.hash.values(), scoped, pos);
                }
                TemplateElement::HtmlExpression(ref ht) => {
                    self.expression(&ht.name, &ht.params, ht.hash.values(), scoped, pos);
                    let name = match &ht.name {
                        Parameter::Path(path) => path_text(path),
                        Parameter::Name(name) => name.clone(),
                        other => format!("{other:?}"),
                    };
                    self.unescaped.push(TemplateRef { name, pos });
                }
                TemplateElement::HelperBlock(ref mut ht) => {
                    self.expression(&ht.name, &ht.params, ht.hash.values(), scoped, pos);
                    let scopes = ht
                        .name
                        .as_name()
                        .is_some_and(|n| SCOPING_HELPERS.contains(&n));
                    if let Some(body) = ht.template.as_mut() {
                        self.template(body, scoped || scopes, pos)?;
                    }
                    if let Some(inverse) = ht.inverse.as_mut() {
                        self.template(inverse, scoped, pos)?;
                    }
                }
                TemplateElement::DecoratorExpression(_) | TemplateElement::DecoratorBlock(_) => {
                    self.unsupported.push(TemplateRef {
                        name: "decorators are not supported".into(),
                        pos,
                    });
                }
                TemplateElement::PartialExpression(_) | TemplateElement::PartialBlock(_) => {
                    self.unsupported.push(TemplateRef {
                        name: "partials are not supported: a herald template is self-contained"
                            .into(),
                        pos,
                    });
                }
                // Comments (and element kinds a later handlebars may add) read nothing.
                _ => {}
            }
            elements.push(element);
            if let Some(m) = at {
                mapping.push(m.clone());
            }
        }
        t.elements = elements;
        t.mapping = mapping;
        Ok(())
    }

    /// Splits literal text around its `<<name>>` custom values, each becoming a lookup of
    /// `__custom.name`, and records where they are.
    fn raw_text(
        &mut self,
        text: String,
        pos: TemplatePos,
    ) -> Result<Vec<(TemplateElement, TemplatePos)>, TemplateSyntaxError> {
        if !CUSTOM_VALUE.is_match(&text) {
            return Ok(vec![(TemplateElement::RawString(text), pos)]);
        }
        let mut pieces = Vec::new();
        let mut rest_start = 0;
        for found in CUSTOM_VALUE.captures_iter(&text) {
            let (whole, name) = (&found[0], &found[1]);
            let start = found.get(0).map_or(0, |m| m.start());
            if start > rest_start {
                pieces.push((
                    TemplateElement::RawString(text[rest_start..start].to_owned()),
                    pos,
                ));
            }
            let at = self.locate(whole, pos);
            self.custom_values.push(TemplateRef {
                name: name.to_owned(),
                pos: at,
            });
            let lookup = Template::compile(&format!("{{{{{CUSTOM_VALUES_KEY}.{name}}}}}"))
                .map_err(|e| TemplateSyntaxError {
                    message: e.reason().to_string(),
                    pos: Some(at),
                })?;
            pieces.extend(lookup.elements.into_iter().map(|e| (e, at)));
            rest_start = start + whole.len();
        }
        if rest_start < text.len() {
            pieces.push((
                TemplateElement::RawString(text[rest_start..].to_owned()),
                pos,
            ));
        }
        Ok(pieces)
    }

    /// The position of the next occurrence of `needle` in the source, from the start of the line
    /// where its text element begins (handlebars may trim the element's leading whitespace).
    fn locate(&mut self, needle: &str, element: TemplatePos) -> TemplatePos {
        let line_start = self
            .source
            .split_inclusive('\n')
            .take(element.line.saturating_sub(1))
            .map(str::len)
            .sum();
        let from = self.search_from.max(line_start);
        match self.source.get(from..).and_then(|rest| rest.find(needle)) {
            Some(offset) => {
                let at = from + offset;
                self.search_from = at + needle.len();
                let before = &self.source[..at];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                TemplatePos { line, column }
            }
            None => element,
        }
    }

    /// A `{{...}}`: a value lookup, or a helper call with parameters.
    fn expression<'a>(
        &mut self,
        name: &Parameter,
        params: &'a [Parameter],
        hash: impl Iterator<Item = &'a Parameter>,
        scoped: bool,
        pos: TemplatePos,
    ) {
        match name {
            Parameter::Name(helper) if !KNOWN_HELPERS.contains(&helper.as_str()) => {
                self.unsupported.push(TemplateRef {
                    name: format!(
                        "unknown helper `{helper}`: available are {}",
                        KNOWN_HELPERS.join(", ")
                    ),
                    pos,
                });
            }
            Parameter::Name(helper) if helper == "format_date" || helper == "format_number" => {
                let problem = if helper == "format_date" {
                    format_date_problem(params)
                } else {
                    format_number_problem(params)
                };
                if let Some(problem) = problem {
                    self.unsupported.push(TemplateRef { name: problem, pos });
                }
            }
            Parameter::Path(path) if params.is_empty() => self.path(path, scoped, pos),
            Parameter::Path(path) => {
                self.unsupported.push(TemplateRef {
                    name: format!("unknown helper `{}`", path_text(path)),
                    pos,
                });
            }
            _ => {}
        }
        for param in params.iter().chain(hash) {
            self.parameter(param, scoped, pos);
        }
    }

    fn parameter(&mut self, param: &Parameter, scoped: bool, pos: TemplatePos) {
        match param {
            Parameter::Path(path) => self.path(path, scoped, pos),
            Parameter::Subexpression(sub) => {
                if let TemplateElement::Expression(ht) = sub.as_element() {
                    self.expression(&ht.name, &ht.params, ht.hash.values(), scoped, pos);
                }
            }
            // Helper names and literals read nothing from the event.
            _ => {}
        }
    }

    fn path(&mut self, path: &Path, scoped: bool, pos: TemplatePos) {
        if let Some(name) = event_field(path, scoped) {
            self.fields.push(TemplateRef { name, pos });
        }
    }
}

/// The event field a path reads, as a dotted path; `None` for paths that read something else:
/// `@index` and other locals, `../x`, `this`, and relative paths inside a scoping block.
fn event_field(path: &Path, scoped: bool) -> Option<String> {
    let Path::Relative((segs, raw)) = path else {
        return None;
    };
    // `@root.x` always reads the event; `../x`, and `x` inside each/with, read something else.
    let rooted = raw.starts_with("@root");
    let climbs = segs.iter().any(|s| matches!(s, PathSeg::Ruled(_)));
    if !rooted && (climbs || scoped) {
        return None;
    }
    let names: Vec<&str> = segs
        .iter()
        .filter_map(|s| match s {
            PathSeg::Named(n) => Some(n.as_str()),
            _ => None,
        })
        .collect();
    (!names.is_empty()).then(|| names.join("."))
}

fn path_text(path: &Path) -> String {
    match path {
        Path::Relative((_, raw)) => raw.clone(),
        Path::Local((_, _, raw)) => raw.clone(),
    }
}

/// `{{default value "fallback"}}`: the value when present and not blank, else the fallback.
/// Returned as a value (not written), so the registry's escaping applies to it like to `{{value}}`.
struct DefaultHelper;

impl HelperDef for DefaultHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, handlebars::RenderError> {
        let blank = |v: &Value| v.is_null() || v.as_str().is_some_and(|s| s.trim().is_empty());
        let value = h.param(0).map(|p| p.value()).filter(|v| !blank(v));
        let chosen = value.or_else(|| h.param(1).map(|p| p.value()));
        Ok(ScopedJson::Derived(chosen.cloned().unwrap_or(Value::Null)))
    }
}

fn registry(escape: fn(&str) -> String) -> Handlebars<'static> {
    let mut r = Handlebars::new();
    // Missing fields render empty: `herald check` has already refused fields an event can never
    // carry, and an optional one being absent must not stop a message.
    r.set_strict_mode(false);
    r.register_escape_fn(escape);
    r.register_helper("default", Box::new(DefaultHelper));
    r.register_helper("format_date", Box::new(FormatDateHelper));
    r.register_helper("format_number", Box::new(FormatNumberHelper));
    r
}

/// What kind of message the templates at one program counter make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessageKind {
    Email {
        html: bool,
        text: bool,
        html_layout: bool,
        text_layout: bool,
    },
    Sms,
}

impl MessageKind {
    fn has_html_layout(&self) -> bool {
        matches!(
            self,
            Self::Email {
                html_layout: true,
                ..
            }
        )
    }

    fn has_text_layout(&self) -> bool {
        matches!(
            self,
            Self::Email {
                text_layout: true,
                ..
            }
        )
    }
}

/// The compiled templates of one workflow version, keyed by the program counter of their step.
///
/// Two registries, because escaping is per registry: HTML bodies escape values; subject, text and
/// SMS do not (handlebars' HTML escaping would also turn `=` in URLs into `&#x3D;`).
#[derive(Debug)]
pub struct TemplateSet {
    escaped: Handlebars<'static>,
    plain: Handlebars<'static>,
    messages: BTreeMap<usize, MessageKind>,
}

impl Default for TemplateSet {
    fn default() -> Self {
        Self {
            escaped: registry(html_escape),
            plain: registry(no_escape),
            messages: BTreeMap::new(),
        }
    }
}

/// The parts of one email, each already parsed; at least one of `html` and `text` is present.
/// A layout part wraps the body part of its kind: it places the rendered body with
/// `{{{body}}}`.
#[derive(Debug, Clone)]
pub struct EmailTemplates {
    pub subject: ParsedTemplate,
    pub html: Option<ParsedTemplate>,
    pub text: Option<ParsedTemplate>,
    pub html_layout: Option<ParsedTemplate>,
    pub text_layout: Option<ParsedTemplate>,
}

impl EmailTemplates {
    /// Every part, for checking.
    pub fn parts(&self) -> impl Iterator<Item = &ParsedTemplate> {
        std::iter::once(&self.subject)
            .chain(&self.html)
            .chain(&self.text)
            .chain(&self.html_layout)
            .chain(&self.text_layout)
    }
}

/// The name a layout places the rendered body under.
pub const LAYOUT_BODY: &str = "body";

impl TemplateSet {
    /// Adds the email of the send step at `pc`.
    pub fn insert_email(&mut self, pc: usize, email: EmailTemplates) {
        let kind = MessageKind::Email {
            html: email.html.is_some(),
            text: email.text.is_some(),
            html_layout: email.html.is_some() && email.html_layout.is_some(),
            text_layout: email.text.is_some() && email.text_layout.is_some(),
        };
        if let Some(layout) = email.html_layout.filter(|_| kind.has_html_layout()) {
            self.escaped
                .register_template(&part_name(pc, "html_layout"), layout.template);
        }
        if let Some(layout) = email.text_layout.filter(|_| kind.has_text_layout()) {
            self.plain
                .register_template(&part_name(pc, "text_layout"), layout.template);
        }
        self.plain
            .register_template(&part_name(pc, "subject"), email.subject.template);
        if let Some(html) = email.html {
            self.escaped
                .register_template(&part_name(pc, "html"), html.template);
        }
        if let Some(text) = email.text {
            self.plain
                .register_template(&part_name(pc, "text"), text.template);
        }
        self.messages.insert(pc, kind);
    }

    /// Adds the SMS body of the send step at `pc`.
    pub fn insert_sms(&mut self, pc: usize, body: ParsedTemplate) {
        self.plain
            .register_template(&part_name(pc, "sms"), body.template);
        self.messages.insert(pc, MessageKind::Sms);
    }

    /// Renders the email of the send step at `pc` for an event context (see
    /// [`crate::CourseEvent::template_context`]) and the message's custom values.
    pub fn render_email(
        &self,
        pc: usize,
        context: &Value,
        custom: &CustomValues,
    ) -> Result<RenderedEmail, RenderError> {
        let Some(&MessageKind::Email {
            html,
            text,
            html_layout,
            text_layout,
        }) = self.messages.get(&pc)
        else {
            return Err(self.not_a(pc, "an email"));
        };
        let context = with_custom_values(context, custom);
        let subject = self.render(&self.plain, pc, "subject", &context)?;
        let part = |registry, name: &str, layout: bool| -> Result<String, RenderError> {
            let body = self.render(registry, pc, name, &context)?;
            if !layout {
                return Ok(body);
            }
            let mut wrapped = context.clone();
            if let Value::Object(map) = &mut wrapped {
                map.insert(LAYOUT_BODY.into(), Value::String(body));
            }
            self.render(registry, pc, &format!("{name}_layout"), &wrapped)
        };
        Ok(RenderedEmail {
            subject: one_line(&subject),
            html: html
                .then(|| part(&self.escaped, "html", html_layout))
                .transpose()?,
            text: text
                .then(|| part(&self.plain, "text", text_layout))
                .transpose()?,
        })
    }

    /// Renders the SMS body of the send step at `pc`.
    pub fn render_sms(
        &self,
        pc: usize,
        context: &Value,
        custom: &CustomValues,
    ) -> Result<String, RenderError> {
        if self.messages.get(&pc) != Some(&MessageKind::Sms) {
            return Err(self.not_a(pc, "an SMS"));
        }
        self.render(&self.plain, pc, "sms", &with_custom_values(context, custom))
    }

    fn render(
        &self,
        registry: &Handlebars<'static>,
        pc: usize,
        part: &str,
        context: &Value,
    ) -> Result<String, RenderError> {
        let name = part_name(pc, part);
        registry.render(&name, context).map_err(|e| RenderError {
            template: format!("step {pc} {part}"),
            message: e.to_string(),
        })
    }

    fn not_a(&self, pc: usize, what: &str) -> RenderError {
        RenderError {
            template: format!("step {pc}"),
            message: format!("is not {what} step"),
        }
    }
}

/// Renders an email from template sources given at run time (the engine's built-in messages,
/// such as the login-link email), with the same escaping, helpers and custom values as workflow
/// emails.
pub fn render_standalone_email(
    subject_src: &str,
    html_src: Option<&str>,
    text_src: Option<&str>,
    context: &Value,
    custom: &CustomValues,
) -> Result<RenderedEmail, RenderError> {
    let parse = |part: &str, src: &str| {
        ParsedTemplate::parse(src).map_err(|e| RenderError {
            template: part.to_owned(),
            message: e.to_string(),
        })
    };
    let email = EmailTemplates {
        subject: parse("subject", subject_src)?,
        html: html_src.map(|s| parse("html", s)).transpose()?,
        text: text_src.map(|s| parse("text", s)).transpose()?,
        html_layout: None,
        text_layout: None,
    };
    let mut set = TemplateSet::default();
    set.insert_email(0, email);
    set.render_email(0, context, custom)
}

fn part_name(pc: usize, part: &str) -> String {
    format!("{pc}.{part}")
}

/// The render context: the event's, with the custom values under their reserved key.
/// What is wrong with a `format_date` call, if anything: it takes a time and a format in quotes.
fn format_date_problem(params: &[Parameter]) -> Option<String> {
    let usage =
        "format_date takes a time and a format in quotes: {{format_date event.time \"%e %B %Y\"}}";
    match params {
        [_, Parameter::Literal(Value::String(format))] => chrono::format::StrftimeItems::new(
            format,
        )
        .parse()
        .is_err()
        .then(|| {
            format!("`{format}` is not a date format: use strftime fields such as %e %B %Y, %H:%M")
        }),
        _ => Some(usage.to_owned()),
    }
}

/// What is wrong with a `format_number` call, if anything: a value, and optionally how many
/// decimals (0 to 10).
fn format_number_problem(params: &[Parameter]) -> Option<String> {
    let usage =
        "format_number takes a number and optionally its decimals: {{format_number offer.price 2}}";
    match params {
        [_] => None,
        [_, Parameter::Literal(Value::Number(n))] if n.as_u64().is_some_and(|d| d <= 10) => None,
        _ => Some(usage.to_owned()),
    }
}

/// `{{format_date TIME "FORMAT"}}`: an RFC 3339 time (`event.time`, `awaited.event.time`) in the
/// contact's time zone (else `HERALD_TIMEZONE`), formatted with strftime fields, names of months
/// and days in the contact's locale (else `HERALD_LOCALE`). A value that is not a time renders
/// empty, like a missing field.
struct FormatDateHelper;

impl HelperDef for FormatDateHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, handlebars::RenderError> {
        let time = h
            .param(0)
            .and_then(|p| p.value().as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let format = h
            .param(1)
            .and_then(|p| p.value().as_str())
            .unwrap_or_default();
        let Some(time) = time else {
            return Ok(ScopedJson::Derived(Value::Null));
        };
        // Checked when the template was compiled; an unusable format renders nothing rather than
        // failing the message.
        let Ok(items) = chrono::format::StrftimeItems::new(format).parse() else {
            return Ok(ScopedJson::Derived(Value::Null));
        };
        let root = ctx.data();
        let zone = [
            root.pointer("/contact/timezone"),
            root.pointer(&format!("/{CUSTOM_VALUES_KEY}/{DEFAULT_TIMEZONE_VALUE}")),
        ]
        .into_iter()
        .flatten()
        .find_map(|z| z.as_str()?.parse::<chrono_tz::Tz>().ok())
        .unwrap_or(chrono_tz::UTC);
        let local = time.with_timezone(&zone);
        let text = local
            .format_localized_with_items(items.iter(), render_locale(ctx))
            .to_string();
        Ok(ScopedJson::Derived(Value::String(text)))
    }
}

/// `{{format_number VALUE [DECIMALS]}}`: a number (or a string that reads as one, as platforms
/// send prices) with the decimal point and digit grouping of the contact's locale (else
/// `HERALD_LOCALE`). A value that is not a number renders empty, like a missing field.
struct FormatNumberHelper;

impl HelperDef for FormatNumberHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, handlebars::RenderError> {
        let value = h.param(0).and_then(|p| match p.value() {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        });
        let Some(value) = value.filter(|v| v.is_finite()) else {
            return Ok(ScopedJson::Derived(Value::Null));
        };
        let decimals = h
            .param(1)
            .and_then(|p| p.value().as_u64())
            .map(|d| d.min(10) as usize);
        let text = crate::locale::format_number(value, decimals, render_locale(ctx));
        Ok(ScopedJson::Derived(Value::String(text)))
    }
}

fn with_custom_values(context: &Value, custom: &CustomValues) -> Value {
    let mut context = match context {
        Value::Object(map) => map.clone(),
        _ => serde_json::Map::new(),
    };
    let values = custom
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    context.insert(CUSTOM_VALUES_KEY.to_owned(), Value::Object(values));
    Value::Object(context)
}

/// A subject is one header line: every line break, with the blanks around it, becomes one space.
fn one_line(s: &str) -> String {
    s.split(['\r', '\n', '\u{85}', '\u{2028}', '\u{2029}'])
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn custom(pairs: &[(&str, &str)]) -> CustomValues {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ctx() -> Value {
        json!({
            "contact": {"id": "c_1", "first_name": "Tom & Jerry <script>alert(1)</script>"},
            "offer": {"id": "o_1", "title": "Rust\r\n  Pro"},
            "event": {"type": "course.offer_access_granted"},
        })
    }

    fn email(
        subject: &str,
        html: Option<&str>,
        text: Option<&str>,
        context: &Value,
    ) -> RenderedEmail {
        render_standalone_email(
            subject,
            html,
            text,
            context,
            &custom(&[("login_url", "https://x.test/l/abc?a=1&b=2")]),
        )
        .unwrap()
    }

    #[test]
    fn html_escapes_values_and_text_subject_do_not() {
        let e = email(
            "Hi {{contact.first_name}}",
            Some("<p>{{contact.first_name}}</p>"),
            Some("{{contact.first_name}}"),
            &ctx(),
        );
        assert_eq!(
            e.html.as_deref(),
            Some("<p>Tom &amp; Jerry &lt;script&gt;alert(1)&lt;/script&gt;</p>")
        );
        assert_eq!(
            e.text.as_deref(),
            Some("Tom & Jerry <script>alert(1)</script>")
        );
        assert_eq!(e.subject, "Hi Tom & Jerry <script>alert(1)</script>");
    }

    #[test]
    fn custom_values_resolve_in_the_template_not_in_values() {
        let mut context = ctx();
        context["contact"]["first_name"] = json!("<<login_url>>");
        let e = email(
            "{{contact.first_name}}",
            Some("<a href=\"<<login_url>>\">{{contact.first_name}}</a>"),
            Some("{{contact.first_name}}: <<login_url>>"),
            &context,
        );
        assert_eq!(
            e.text.as_deref(),
            Some("<<login_url>>: https://x.test/l/abc?a=1&b=2")
        );
        assert_eq!(e.subject, "<<login_url>>");
        // In HTML the link is attribute-escaped (browsers decode it) and the name stays text.
        assert_eq!(
            e.html.as_deref(),
            Some(
                "<a href=\"https://x.test/l/abc?a&#x3D;1&amp;b&#x3D;2\">&lt;&lt;login_url&gt;&gt;</a>"
            )
        );
    }

    #[test]
    fn an_event_cannot_supply_custom_values() {
        let mut context = ctx();
        context[CUSTOM_VALUES_KEY] =
            json!({"login_url": "https://evil.test", "support_email": "evil@x"});
        let e = email(
            "s",
            None,
            Some("<<login_url>> <<support_email>>."),
            &context,
        );
        assert_eq!(e.text.as_deref(), Some("https://x.test/l/abc?a=1&b=2 ."));
    }

    #[test]
    fn default_helper_falls_back_on_missing_and_blank_values() {
        let text = "{{default contact.first_name \"there\"}}|{{default contact.last_name 'x'}}|{{default offer.title 'y'}}";
        let mut context = ctx();
        context["contact"]["first_name"] = json!("  ");
        let e = email("s", None, Some(text), &context);
        assert_eq!(e.text.as_deref(), Some("there|x|Rust\r\n  Pro"));
        // The chosen value is escaped in HTML like any other.
        context["contact"]["first_name"] = json!("A&B");
        let e = email(
            "s",
            Some("{{default contact.first_name 'there'}}"),
            None,
            &context,
        );
        assert_eq!(e.html.as_deref(), Some("A&amp;B"));
    }

    #[test]
    fn subject_is_one_line() {
        let e = email(
            "  Welcome to {{offer.title}}\n\n  today\r\n",
            None,
            Some("x"),
            &ctx(),
        );
        assert_eq!(e.subject, "Welcome to Rust Pro today");
        assert_eq!(one_line("a\u{2028}b"), "a b");
    }

    #[test]
    fn missing_fields_render_empty_and_bad_input_never_panics() {
        let e = email(
            "[{{lesson.title}}]",
            None,
            Some("{{#each offer.title}}{{this}}{{/each}}|{{lookup 5 6}}|"),
            &ctx(),
        );
        assert_eq!(e.subject, "[]");
        assert_eq!(e.text.as_deref(), Some("||"));
        // A helper missing its argument is an error to record, not a crash.
        let err = render_standalone_email(
            "{{#each}}{{/each}}",
            None,
            Some("x"),
            &json!(null),
            &custom(&[]),
        )
        .unwrap_err();
        assert_eq!(err.template, "step 0 subject");
    }

    #[test]
    fn reports_syntax_errors_with_positions() {
        let err = ParsedTemplate::parse("Hello\n  {{contact.first_name").unwrap_err();
        assert_eq!(
            err.pos,
            Some(TemplatePos {
                line: 2,
                column: 23
            })
        );
        assert!(
            err.message.contains("invalid handlebars syntax"),
            "{}",
            err.message
        );
        assert!(render_standalone_email("{{#if a}}", None, None, &ctx(), &custom(&[])).is_err());
    }

    #[test]
    fn collects_fields_custom_values_and_unsupported_constructs() {
        let src = "Hi {{default contact.first_name 'there'}},\n{{#if lesson}}{{lesson.title}}{{else if @root.offer}}{{/if}}\n\
                   {{#each offer.product_ids}}{{this}} {{title}} {{@index}} {{../event.id}} {{@root.product.url}}{{/each}}\n\
                   {{!-- <<not_a_value>> --}}  <<login_url>> and <<support_email>>, {{> footer}} {{shout contact.id}}";
        let t = ParsedTemplate::parse(src).unwrap();
        let fields: Vec<_> = t
            .fields
            .iter()
            .map(|f| (f.name.as_str(), f.pos.line, f.pos.column))
            .collect();
        assert_eq!(
            fields,
            [
                ("contact.first_name", 1, 4),
                ("lesson", 2, 1),
                ("lesson.title", 2, 15),
                ("offer", 2, 1),
                ("offer.product_ids", 3, 1),
                ("product.url", 3, 74),
                ("contact.id", 4, 79),
            ]
        );
        let customs: Vec<_> = t
            .custom_values
            .iter()
            .map(|f| (f.name.as_str(), f.pos.line, f.pos.column))
            .collect();
        assert_eq!(customs, [("login_url", 4, 29), ("support_email", 4, 47)]);
        assert!(t.uses_custom_value("login_url"));
        assert!(!t.uses_custom_value("not_a_value"));
        let unsupported: Vec<_> = t
            .unsupported
            .iter()
            .map(|u| (u.name.split(':').next().unwrap(), u.pos.line))
            .collect();
        assert_eq!(
            unsupported,
            [
                ("partials are not supported", 4),
                ("unknown helper `shout`", 4)
            ]
        );
    }

    #[test]
    fn template_set_renders_by_program_counter_and_refuses_the_wrong_kind() {
        let mut set = TemplateSet::default();
        set.insert_sms(
            3,
            ParsedTemplate::parse("Hi {{contact.id}} <<login_url>>").unwrap(),
        );
        let c = custom(&[("login_url", "https://x.test/?a=b")]);
        assert_eq!(
            set.render_sms(3, &ctx(), &c).unwrap(),
            "Hi c_1 https://x.test/?a=b"
        );
        assert!(set.render_email(3, &ctx(), &c).is_err());
        assert!(set.render_sms(4, &ctx(), &c).is_err());
    }

    #[test]
    fn format_date_shows_a_time_in_the_contacts_zone_or_the_default_one() {
        let template = "{{format_date event.time \"%A %e %B %Y, %H:%M\"}}";
        let render = |contact: Value, zone: Option<&str>| {
            let mut values = custom(&[]);
            if let Some(zone) = zone {
                values.insert(DEFAULT_TIMEZONE_VALUE.into(), zone.into());
            }
            let context = json!({"contact": contact, "event": {"time": "2026-03-08T13:30:00Z"}});
            render_standalone_email(template, None, Some(template), &context, &values)
                .unwrap()
                .subject
        };
        assert_eq!(
            render(
                json!({"timezone": "America/New_York"}),
                Some("Europe/Berlin")
            ),
            "Sunday  8 March 2026, 09:30",
            "the contact's zone, after the clocks went forward"
        );
        assert_eq!(
            render(json!({}), Some("Europe/Berlin")),
            "Sunday  8 March 2026, 14:30"
        );
        assert_eq!(
            render(json!({"timezone": "Mars/Olympus"}), None),
            "Sunday  8 March 2026, 13:30"
        );
        let not_a_time = json!({"event": {"time": "soon"}});
        let e =
            render_standalone_email(template, None, Some("x"), &not_a_time, &custom(&[])).unwrap();
        assert_eq!(e.subject, "", "a value that is not a time renders empty");
    }

    /// What the template check reports about `source`.
    fn problems(source: &str) -> Vec<String> {
        ParsedTemplate::parse(source)
            .unwrap()
            .unsupported
            .into_iter()
            .map(|r| r.name)
            .collect()
    }

    #[test]
    fn format_date_is_checked() {
        assert_eq!(
            problems("{{format_date event.time \"%d.%m.%Y\"}}"),
            Vec::<String>::new()
        );
        assert!(problems("{{format_date event.time \"%Q\"}}")[0].contains("not a date format"));
        assert!(problems("{{format_date event.time}}")[0].contains("takes a time and a format"));
        assert!(problems("{{format_date event.time lesson.title}}")[0].contains("in quotes"));
    }

    #[test]
    fn dates_and_numbers_speak_the_contacts_locale_or_the_default_one() {
        let template = "{{format_date event.time \"%A %e %B\"}} · {{format_number offer.price 2}} · {{format_number offer.seats}}";
        let render = |contact: Value, default_locale: &str| {
            let mut values = custom(&[]);
            insert_contact_defaults(&mut values, "UTC", default_locale);
            let context = json!({
                "contact": contact,
                "event": {"time": "2026-03-08T13:30:00Z"},
                "offer": {"price": "1234.5", "seats": 12000},
            });
            render_standalone_email(template, None, Some(template), &context, &values)
                .unwrap()
                .subject
        };
        assert_eq!(
            render(json!({"locale": "de-DE"}), "en_US"),
            "Sonntag  8 März · 1.234,50 · 12.000"
        );
        assert_eq!(
            render(json!({}), "fr_FR"),
            "dimanche  8 mars · 1\u{202f}234,50 · 12\u{202f}000"
        );
        assert_eq!(
            render(json!({"locale": "tlh"}), "en_US"),
            "Sunday  8 March · 1,234.50 · 12,000",
            "an unknown contact locale falls back to the default"
        );
        let not_a_number = json!({"offer": {"price": "free"}});
        let e = render_standalone_email(
            "{{format_number offer.price}}",
            None,
            Some("x"),
            &not_a_number,
            &custom(&[]),
        )
        .unwrap();
        assert_eq!(e.subject, "", "a value that is not a number renders empty");
    }

    #[test]
    fn format_number_is_checked() {
        assert!(problems("{{format_number offer.price}}").is_empty());
        assert!(problems("{{format_number offer.price 2}}").is_empty());
        for bad in [
            "{{format_number offer.price 11}}",
            "{{format_number offer.price \"2\"}}",
            "{{format_number offer.price 2 3}}",
        ] {
            assert!(
                problems(bad)[0].contains("format_number takes a number"),
                "{bad}: {:?}",
                problems(bad)
            );
        }
    }
}
