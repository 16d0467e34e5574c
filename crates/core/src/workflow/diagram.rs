//! A workflow as a Mermaid flowchart (`herald preview --diagram`): one node per step of the
//! compiled program, edges as a run moves, `if` with its yes/no branches. Mermaid is plain text
//! that GitHub, GitLab and most wikis draw, so a marketer can paste it anywhere.

use super::{CompiledWorkflow, Condition, FieldTest, Instr, TimezoneChoice, WaitSpec};
use std::fmt::Write;

impl CompiledWorkflow {
    /// The workflow as a Mermaid flowchart; the steps at the program counters in `taken` (the
    /// path one event takes, see `herald preview`) are marked.
    pub fn mermaid(&self, taken: &std::collections::BTreeSet<usize>) -> String {
        let end = self.program.len();
        let node = |pc: usize| {
            if pc >= end {
                "done".to_owned()
            } else {
                format!("s{pc}")
            }
        };
        let mut out = String::from("flowchart TD\n");
        let trigger = match &self.trigger {
            super::Trigger::Events(m) => m
                .events
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" or "),
            super::Trigger::Schedule(s) => format!("schedule: {}", s.expression),
        };
        let _ = writeln!(out, "    start([{}]) --> {}", quote(&trigger), node(0));
        for (pc, instr) in self.program.iter().enumerate() {
            match instr {
                Instr::SendEmail { step_id, .. } => {
                    let _ = writeln!(out, "    s{pc}[{}]", quote(&format!("email: {step_id}")));
                    let _ = writeln!(out, "    s{pc} --> {}", node(pc + 1));
                }
                Instr::SendSms { step_id, .. } => {
                    let _ = writeln!(out, "    s{pc}[{}]", quote(&format!("SMS: {step_id}")));
                    let _ = writeln!(out, "    s{pc} --> {}", node(pc + 1));
                }
                Instr::Wait { wait, .. } => {
                    let _ = writeln!(out, "    s{pc}[/{}/]", quote(&wait_label(wait)));
                    let _ = writeln!(out, "    s{pc} --> {}", node(pc + 1));
                }
                Instr::Branch {
                    condition, else_pc, ..
                } => {
                    let _ = writeln!(out, "    s{pc}{{{}}}", quote(&condition_label(condition)));
                    let _ = writeln!(out, "    s{pc} -->|yes| {}", node(pc + 1));
                    let _ = writeln!(out, "    s{pc} -->|no| {}", node(*else_pc));
                }
                Instr::Jump { to } => {
                    // A jump is not a step: its node passes straight on.
                    let _ = writeln!(out, "    s{pc}(( )) --> {}", node(*to));
                }
            }
        }
        out.push_str("    done([done])\n");
        if !taken.is_empty() {
            let nodes: Vec<String> = taken.iter().map(|pc| node(*pc)).collect();
            out.push_str("    classDef taken fill:#d3f9d8,stroke:#2b8a3e,stroke-width:2px\n");
            let _ = writeln!(out, "    class start,{},done taken", nodes.join(","));
        }
        out
    }
}

/// A label in Mermaid's quoted form (`"` written as `#quot;`).
fn quote(label: &str) -> String {
    format!("\"{}\"", label.replace('"', "#quot;"))
}

fn wait_label(wait: &WaitSpec) -> String {
    match wait {
        WaitSpec::For(d) => format!("wait {d}"),
        WaitSpec::Until { at, days, timezone } => {
            let days = if days.is_empty() || days.len() == 7 {
                "any day".to_owned()
            } else {
                days.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let zone = match timezone {
                TimezoneChoice::Contact => "the contact's time".to_owned(),
                TimezoneChoice::Fixed(tz) => tz.to_string(),
            };
            format!("wait until {} ({days}, {zone})", at.format("%H:%M"))
        }
        WaitSpec::Event { event, timeout } => format!("wait for {event}, at most {timeout}"),
    }
}

fn condition_label(c: &Condition) -> String {
    let join = |cs: &[Condition], word: &str| {
        cs.iter()
            .map(condition_label)
            .collect::<Vec<_>>()
            .join(&format!(" {word} "))
    };
    match c {
        Condition::All(cs) => join(cs, "and"),
        Condition::Any(cs) => format!("({})", join(cs, "or")),
        Condition::Not(c) => format!("not ({})", condition_label(c)),
        Condition::State { fact, ids } => format!("{} {}", fact.key(), ids.join(" or ")),
        Condition::Test { field, test } => match test {
            FieldTest::Equals(v) => format!("{field} = {v}"),
            FieldTest::NotEquals(v) => format!("{field} ≠ {v}"),
            FieldTest::In(vs) => format!(
                "{field} in {}",
                vs.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            FieldTest::Contains(v) => format!("{field} contains {v}"),
            FieldTest::Exists(true) => format!("{field} is set"),
            FieldTest::Exists(false) => format!("{field} is not set"),
            FieldTest::Gt(v) => format!("{field} > {v}"),
            FieldTest::Lt(v) => format!("{field} < {v}"),
        },
    }
}
