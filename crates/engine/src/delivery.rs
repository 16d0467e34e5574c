//! Delivering queued messages: render at send time (so `<<login_url>>` is minted when the message
//! goes, not when the run started), send through SMTP or into the dev mailbox, and classify the
//! outcome for the retry policy.

use crate::Clock;
use crate::config::EngineConfig;
use crate::registry::Registry;
use crate::runner::{with_latest_contact, with_wait_outcome};
use herald_channels::SendError;
use herald_channels::email::OutgoingEmail;
use herald_core::template::insert_contact_defaults;
use herald_core::workflow::{Category, CompiledWorkflow, Instr};
use herald_store::{Channel, ClaimedMessage, DeliveryResult, MailboxItem, MessageOutcome};
use std::sync::Arc;
use std::time::Duration;

pub struct Delivery {
    pub config: EngineConfig,
    pub registry: Arc<Registry>,
    pub clock: Clock,
}

/// The `<<login_url>>` of a message being sent, minted for the whole claim before any send.
#[derive(Debug, Clone)]
pub enum LoginLink {
    /// The message does not use `<<login_url>>` (or is not going to be sent).
    Unused,
    Minted(String),
    /// The contact holds no active offer grant: the link could not work.
    NotEntitled,
    /// Storing the link failed; the send is retried.
    Failed(String),
}

/// Whether the contact's opt-out stops this message: it stops marketing only.
fn suppressed(m: &ClaimedMessage, wf: &CompiledWorkflow) -> bool {
    m.opted_out && wf.category == Category::Marketing
}

impl Delivery {
    /// Whether the send step of this message renders `<<login_url>>`, so a link must be minted
    /// for it. Messages that will not be sent (cancelled, suppressed, no recipient) need none.
    pub fn needs_login_link(&self, m: &ClaimedMessage) -> bool {
        if m.run_state.stops_sends() || m.recipient.is_none() {
            return false;
        }
        let snapshot = self.registry.snapshot();
        snapshot
            .version(&m.workflow_id, &m.workflow_version)
            .is_some_and(|wf| {
                !suppressed(m, wf)
                    && matches!(
                        wf.program.get(m.pc as usize),
                        Some(
                            Instr::SendEmail {
                                uses_login_url: true,
                                ..
                            } | Instr::SendSms {
                                uses_login_url: true,
                                ..
                            }
                        )
                    )
            })
    }

    /// Renders and sends one claimed message; never fails, every problem becomes an outcome.
    pub async fn deliver(&self, m: ClaimedMessage, login: LoginLink) -> MessageOutcome {
        let mut outcome = MessageOutcome {
            message_id: m.id.clone(),
            lease_token: m.lease_token.clone(),
            subject: None,
            segments: None,
            result: DeliveryResult::Sent { provider_id: None },
            mailbox: None,
        };
        if m.run_state.stops_sends() {
            outcome.result = DeliveryResult::Cancelled {
                reason: format!("run {} before the message was sent", m.run_state.as_str()),
            };
            return outcome;
        }
        let snapshot = self.registry.snapshot();
        let Some(wf) = snapshot.version(&m.workflow_id, &m.workflow_version) else {
            outcome.result = DeliveryResult::Failed {
                reason: format!(
                    "workflow version {}@{} is not loaded",
                    m.workflow_id, m.workflow_version
                ),
            };
            return outcome;
        };
        let Some(recipient) = m.recipient.clone() else {
            outcome.result = DeliveryResult::Skipped {
                reason: "no recipient".into(),
            };
            return outcome;
        };
        if suppressed(&m, wf) {
            let channel = m.channel.as_str();
            outcome.result = DeliveryResult::Suppressed {
                reason: format!("contact opted out of {channel}"),
            };
            return outcome;
        }
        let event = with_wait_outcome(
            wf,
            with_latest_contact(&m.event, &m.contact),
            m.awaited.as_ref(),
        );
        let context = event.template_context();
        let mut custom = self.config.custom_values.clone();
        let unsubscribe_url = self
            .config
            .unsubscribe
            .url(&self.config.public_url, event.contact_id());
        custom.insert("unsubscribe_url".into(), unsubscribe_url.clone());
        insert_contact_defaults(
            &mut custom,
            self.config.default_timezone.name(),
            &self.config.default_locale,
        );
        let pc = m.pc as usize;
        match login {
            LoginLink::Unused => {}
            LoginLink::Minted(url) => {
                custom.insert("login_url".into(), url);
            }
            LoginLink::NotEntitled => {
                outcome.result = DeliveryResult::Skipped {
                    reason: "contact holds no active offer grant, so <<login_url>> could not work"
                        .into(),
                };
                return outcome;
            }
            LoginLink::Failed(e) => {
                outcome.result = self.classify(
                    Err(SendError::Transient(format!(
                        "could not mint the login link: {e}"
                    ))),
                    m.attempts,
                );
                return outcome;
            }
        }
        match (m.channel, wf.program.get(pc)) {
            (Channel::Email, Some(Instr::SendEmail { from, .. })) => {
                let rendered = match wf.render_email(pc, &context, &custom) {
                    Ok(r) => r,
                    Err(e) => {
                        outcome.result = DeliveryResult::Failed {
                            reason: e.to_string(),
                        };
                        return outcome;
                    }
                };
                outcome.subject = Some(rendered.subject.clone());
                let email = OutgoingEmail {
                    from: from
                        .clone()
                        .unwrap_or_else(|| self.config.email_from.clone()),
                    to: recipient,
                    subject: rendered.subject,
                    text: rendered.text,
                    html: rendered.html,
                    message_id: m.header_message_id.clone(),
                    // RFC 8058 one-click unsubscribe on every workflow email.
                    headers: vec![
                        ("List-Unsubscribe".into(), format!("<{unsubscribe_url}>")),
                        (
                            "List-Unsubscribe-Post".into(),
                            "List-Unsubscribe=One-Click".into(),
                        ),
                    ],
                };
                match &self.config.smtp {
                    Some(smtp) => {
                        let started = std::time::Instant::now();
                        let sent = smtp.send(&email).await;
                        crate::telemetry::send_latency("email", started.elapsed().as_secs_f64());
                        outcome.result = self.classify(sent, m.attempts);
                    }
                    None => outcome.mailbox = Some(self.mailbox_copy(&m, Channel::Email, email)),
                }
            }
            (Channel::Sms, Some(Instr::SendSms { .. })) => match wf
                .render_sms(pc, &context, &custom)
            {
                Ok(mut body) => {
                    if m.first_on_channel && !self.config.sms_opt_out_line.is_empty() {
                        body = format!("{body}\n{}", self.config.sms_opt_out_line);
                    }
                    outcome.segments = Some(herald_channels::sms::segments(&body).1 as i64);
                    match &self.config.sms {
                        Some(sms) => {
                            let started = std::time::Instant::now();
                            let sent = sms.send(&recipient, &body, m.id.as_str()).await;
                            crate::telemetry::send_latency("sms", started.elapsed().as_secs_f64());
                            outcome.result = match sent {
                                Ok(sid) => DeliveryResult::Sent {
                                    provider_id: Some(sid),
                                },
                                Err(e) => self.classify(Err(e), m.attempts),
                            };
                        }
                        None => {
                            let copy = OutgoingEmail {
                                from: String::new(),
                                to: recipient,
                                subject: String::new(),
                                text: Some(body),
                                html: None,
                                message_id: m.header_message_id.clone(),
                                headers: Vec::new(),
                            };
                            outcome.mailbox = Some(self.mailbox_copy(&m, Channel::Sms, copy));
                        }
                    }
                }
                Err(e) => {
                    outcome.result = DeliveryResult::Failed {
                        reason: e.to_string(),
                    }
                }
            },
            _ => {
                outcome.result = DeliveryResult::Failed {
                    reason: format!(
                        "step {} of {}@{} is not a send step",
                        m.step_id, m.workflow_id, m.workflow_version
                    ),
                };
            }
        }
        outcome
    }

    fn mailbox_copy(&self, m: &ClaimedMessage, channel: Channel, e: OutgoingEmail) -> MailboxItem {
        let email = channel == Channel::Email;
        MailboxItem {
            id: m.id.to_string(),
            message_id: email.then_some(e.message_id),
            channel,
            sender: email.then_some(e.from),
            recipient: e.to,
            subject: email.then_some(e.subject),
            text_body: e.text,
            html_body: e.html,
            created_ms: self.clock.now(),
        }
    }

    /// Transient failures retry with exponential backoff and full jitter up to the cap, until
    /// `max_attempts`; permanent ones fail at once.
    fn classify(&self, result: Result<(), SendError>, attempts_before: i64) -> DeliveryResult {
        match result {
            Ok(()) => DeliveryResult::Sent { provider_id: None },
            Err(SendError::Permanent(reason)) => DeliveryResult::Failed { reason },
            Err(SendError::NoSuchMailbox(reason)) => DeliveryResult::Bounced {
                reason: format!("bounced: {reason}"),
            },
            Err(SendError::Transient(reason)) => {
                self.retry(attempts_before, reason, Duration::ZERO)
            }
            // A provider's Retry-After is honoured: never sooner, even when the backoff is shorter.
            Err(SendError::RetryAfter(reason, after)) => self.retry(attempts_before, reason, after),
        }
    }

    fn retry(&self, attempts_before: i64, reason: String, at_least: Duration) -> DeliveryResult {
        let attempt = attempts_before + 1;
        if attempt >= self.config.max_attempts {
            return DeliveryResult::Failed {
                reason: format!("gave up after {attempt} attempts: {reason}"),
            };
        }
        let delay = backoff(&self.config, attempt).max(at_least);
        DeliveryResult::Retry {
            due: self.clock.now() + delay,
            reason,
        }
    }
}

/// The delay before retry number `attempt` (1-based): `base · 2^(attempt-1)` capped, then a random
/// point in its upper half, so that a burst of failures does not retry in lockstep.
pub fn backoff(config: &EngineConfig, attempt: i64) -> std::time::Duration {
    let exp = config
        .retry_base
        .saturating_mul(1u32 << (attempt - 1).clamp(0, 20));
    let capped = exp.min(config.retry_cap);
    capped / 2 + capped.mul_f64(fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let cfg = EngineConfig::new("http://localhost");
        for attempt in 1..=12 {
            let d = backoff(&cfg, attempt);
            let full = cfg
                .retry_base
                .saturating_mul(1 << (attempt - 1))
                .min(cfg.retry_cap);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} not within [{:?}, {full:?}]",
                full / 2
            );
        }
        assert!(backoff(&cfg, 40) <= cfg.retry_cap);
    }
}

/// What an operator reads of a message: its content rendered again from its pinned version, its
/// event and the contact's current details. Sign-in and unsubscribe links appear as markers,
/// never as working links.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReviewedContent {
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
}

/// The marker that stands for a learner's sign-in link in reviewed content.
pub const LOGIN_LINK_MARKER: &str = "[sign-in link]";
/// The marker that stands for the unsubscribe link in reviewed content.
pub const UNSUBSCRIBE_LINK_MARKER: &str = "[unsubscribe link]";

pub fn render_for_review(
    source: &herald_store::MessageSource,
    workflows: &crate::registry::Snapshot,
    config: &EngineConfig,
) -> Result<ReviewedContent, String> {
    let wf = workflows
        .version(&source.workflow_id, &source.workflow_version)
        .ok_or_else(|| {
            format!(
                "workflow version {}@{} is not loaded",
                source.workflow_id, source.workflow_version
            )
        })?;
    let event = with_wait_outcome(
        wf,
        with_latest_contact(&source.event, &source.contact),
        source.awaited.as_ref(),
    );
    let context = event.template_context();
    let mut custom = config.custom_values.clone();
    custom.insert("login_url".into(), LOGIN_LINK_MARKER.into());
    custom.insert("unsubscribe_url".into(), UNSUBSCRIBE_LINK_MARKER.into());
    insert_contact_defaults(
        &mut custom,
        config.default_timezone.name(),
        &config.default_locale,
    );
    let pc = source.pc as usize;
    match source.channel {
        Channel::Email => {
            let r = wf
                .render_email(pc, &context, &custom)
                .map_err(|e| e.to_string())?;
            Ok(ReviewedContent {
                subject: Some(r.subject),
                text: r.text,
                html: r.html,
            })
        }
        Channel::Sms => Ok(ReviewedContent {
            subject: None,
            text: Some(
                wf.render_sms(pc, &context, &custom)
                    .map_err(|e| e.to_string())?,
            ),
            html: None,
        }),
    }
}
