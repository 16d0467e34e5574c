//! Building a [`WorkflowBundle`] from files, the template files a workflow refers to, and the
//! version hash of a bundle.

use super::WorkflowBundle;
use super::parse::{StepKind, parse_workflow};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The folder name template files are reported under in diagnostics (`templates/welcome.html.hbs`).
pub const TEMPLATES_LABEL: &str = "templates";

/// The layout every email is wrapped in when `templates/layout.html.hbs` or `layout.txt.hbs`
/// exists and the workflow or step names no other (`layout: none` for none).
pub const DEFAULT_LAYOUT: &str = "layout";

/// The layout name that means no layout.
pub const NO_LAYOUT: &str = "none";

/// File names of an email template `name`: the HTML body and the text body; either may be absent.
pub(super) fn email_template_files(name: &str) -> [String; 2] {
    [format!("{name}.html.hbs"), format!("{name}.txt.hbs")]
}

/// File name of an SMS template `name`.
pub(super) fn sms_template_file(name: &str) -> String {
    format!("{name}.sms.hbs")
}

/// Whether `name` may name a template: letters, digits, `_` and `-` only, so that a workflow
/// cannot make herald read files outside the templates folder.
pub(super) fn is_valid_template_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Builds a bundle from a workflow's YAML, loading every template file it refers to with
/// `load_template` (called with a file name such as `welcome.html.hbs`; `None` when the file does
/// not exist). Missing files are simply absent, so [`super::compile`] reports them with the file,
/// line and column of the reference. YAML that does not parse yields a bundle without templates;
/// `compile` reports the YAML error.
pub fn bundle_from(
    id: &str,
    path: &str,
    yaml: &str,
    load_template: &dyn Fn(&str) -> Option<String>,
) -> WorkflowBundle {
    let mut files = Vec::new();
    let email_files = |files: &mut Vec<(String, String)>, name: &str| {
        if name == NO_LAYOUT {
            return;
        }
        files.extend(
            email_template_files(name)
                .into_iter()
                .map(|f| (name.to_owned(), f)),
        );
    };
    if let Ok(doc) = parse_workflow(yaml) {
        // The default layout, when there is one, wraps every email.
        email_files(&mut files, DEFAULT_LAYOUT);
        if let Some(layout) = &doc.layout {
            email_files(&mut files, &layout.value);
        }
        doc.visit_steps(&mut |step| match step.kind.as_ref().map(|k| &k.value) {
            Some(StepKind::SendEmail(email)) => {
                if let Some(name) = &email.template {
                    email_files(&mut files, &name.value);
                }
                if let Some(layout) = &email.layout {
                    email_files(&mut files, &layout.value);
                }
            }
            Some(StepKind::SendSms(sms)) => {
                if let Some(name) = &sms.template {
                    files.push((name.value.clone(), sms_template_file(&name.value)));
                }
            }
            _ => {}
        });
    }
    let templates = files
        .into_iter()
        .filter(|(name, _)| is_valid_template_name(name))
        .filter_map(|(_, file)| load_template(&file).map(|text| (file, text)))
        .collect::<BTreeMap<_, _>>();
    WorkflowBundle {
        id: id.to_owned(),
        path: path.to_owned(),
        yaml: yaml.to_owned(),
        templates,
    }
}

impl WorkflowBundle {
    /// The content hash a run is pinned to: the first 16 hex digits of SHA-256 over the id, the
    /// YAML and the templates (sorted by file name, each length-prefixed so no two bundles share
    /// an encoding). The path is left out: moving the folder does not make a new version.
    pub fn version(&self) -> String {
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        field(self.id.as_bytes());
        field(self.yaml.as_bytes());
        for (name, text) in &self.templates {
            field(name.as_bytes());
            field(text.as_bytes());
        }
        hasher
            .finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "name: x\ntrigger: {event: new_signup}\nsteps:\n  - send_email: {subject: hi, template: welcome}\n  - if: {field: contact.phone, exists: true}\n    then:\n      - send_sms: {template: nudge}\n      - send_email: {subject: hi, template: ../../etc/passwd}\n";

    fn load(files: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let files: BTreeMap<String, String> = files
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| files.get(name).cloned()
    }

    #[test]
    fn loads_referenced_templates_including_nested_steps_and_skips_missing_ones() {
        let loader = load(&[
            ("welcome.html.hbs", "<p>hi</p>"),
            ("nudge.sms.hbs", "hey"),
            ("unused.txt.hbs", "x"),
        ]);
        let b = bundle_from("w", "workflows/w.yaml", YAML, &loader);
        assert_eq!(
            b.templates.keys().collect::<Vec<_>>(),
            ["nudge.sms.hbs", "welcome.html.hbs"]
        );
        assert_eq!(b.id, "w");
        assert_eq!(b.path, "workflows/w.yaml");
    }

    #[test]
    fn never_asks_for_a_path_outside_the_templates_folder() {
        let asked = std::cell::RefCell::new(Vec::new());
        let loader = |name: &str| {
            asked.borrow_mut().push(name.to_owned());
            None
        };
        bundle_from("w", "w.yaml", YAML, &loader);
        assert!(
            asked.borrow().iter().all(|n| !n.contains('/')),
            "{:?}",
            asked.borrow()
        );
        // welcome.html/txt, nudge.sms, and the default layout's two files.
        assert_eq!(asked.borrow().len(), 5);
    }

    #[test]
    fn unparsable_yaml_gives_a_bundle_without_templates() {
        let b = bundle_from("w", "w.yaml", "name: [", &|_| Some("x".into()));
        assert!(b.templates.is_empty());
        assert_eq!(b.yaml, "name: [");
    }

    #[test]
    fn version_changes_with_any_template_and_not_with_the_path() {
        let loader = load(&[("welcome.html.hbs", "<p>hi</p>")]);
        let a = bundle_from("w", "workflows/w.yaml", YAML, &loader);
        let v = a.version();
        assert_eq!(v.len(), 16);
        assert!(v.chars().all(|c| c.is_ascii_hexdigit()));

        let mut moved = a.clone();
        moved.path = "elsewhere/w.yaml".into();
        assert_eq!(moved.version(), v);

        let mut edited = a.clone();
        edited
            .templates
            .insert("welcome.html.hbs".into(), "<p>hello</p>".into());
        assert_ne!(edited.version(), v);

        let mut renamed = a.clone();
        renamed.id = "w2".into();
        assert_ne!(renamed.version(), v);

        // Length prefixes: moving text from the YAML into a template name is a different bundle.
        let mut shifted = a.clone();
        shifted.yaml.push('x');
        assert_ne!(shifted.version(), v);
    }
}
