//! What the engine needs to know about its surroundings, resolved by the CLI from `herald.toml`
//! and `HERALD_*` variables.

use herald_channels::email::SmtpSender;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Where the engine is about to process one item, for [`FaultHook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Planning an event (inside the dispatch transaction).
    Dispatch,
    /// Advancing a claimed run.
    Step,
    /// Delivering a claimed message, before it is handed to its channel.
    Deliver,
}

/// Called with the stage and the item's contact id before each item is processed. Fault
/// injection for tests of the engine's resilience (a hook that panics for one contact); `None`
/// in production.
pub type FaultHook = Arc<dyn Fn(Stage, &str) + Send + Sync>;

#[derive(Clone)]
pub struct EngineConfig {
    /// Base of every link herald sends (`HERALD_PUBLIC_URL`).
    pub public_url: String,
    /// Default `From` (`HERALD_EMAIL_FROM`).
    pub email_from: String,
    /// Time zone for contacts without a valid one (`HERALD_TIMEZONE`).
    pub default_timezone: chrono_tz::Tz,
    /// Locale of dates and numbers for contacts without one (`HERALD_LOCALE`), as glibc names it.
    pub default_locale: String,
    /// `[custom_values]` of herald.toml: `<<name>>` → value.
    pub custom_values: BTreeMap<String, String>,
    /// Lifetime and uses of learner links, and the base of their URLs.
    pub links: crate::links::LinkPolicy,
    /// Signs unsubscribe links; `Application::build` loads it from the database.
    pub unsubscribe: crate::unsubscribe::UnsubscribeKey,
    /// `None`: emails go to the dev mailbox.
    pub smtp: Option<SmtpSender>,
    /// `None`: SMS go to the dev mailbox.
    pub sms: Option<herald_channels::sms::SmsSender>,
    /// Appended to the first SMS a contact receives.
    pub sms_opt_out_line: String,
    /// How long a claim is held before another worker may take the job over.
    pub lease: Duration,
    /// First retry delay; doubles per attempt up to `retry_cap`, with jitter.
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// Attempts after which a transiently failing message is marked failed.
    pub max_attempts: i64,
    /// How often idle workers look for due work when nothing wakes them.
    pub poll_interval: Duration,
    /// Rows per claim or dispatch transaction.
    pub batch_size: i64,
    /// Sends in flight at once.
    pub send_concurrency: usize,
    /// How long a loop may make no progress while its work is due before `/healthz` reports it
    /// stalled.
    pub stall_limit: Duration,
    /// Fault injection for tests; see [`FaultHook`].
    pub fault_hook: Option<FaultHook>,
}

impl EngineConfig {
    pub fn new(public_url: impl Into<String>) -> Self {
        let public_url: String = public_url.into();
        Self {
            links: crate::links::LinkPolicy {
                public_url: public_url.clone(),
                learner_ttl: Duration::from_secs(24 * 3600),
                learner_uses: 5,
                user_link_secret: None,
            },
            public_url,
            unsubscribe: crate::unsubscribe::UnsubscribeKey::new(Vec::new()),
            email_from: "herald <noreply@localhost>".into(),
            default_timezone: chrono_tz::UTC,
            default_locale: "en_US".into(),
            custom_values: BTreeMap::new(),
            smtp: None,
            sms: None,
            sms_opt_out_line: "Reply STOP to opt out".into(),
            lease: Duration::from_secs(60),
            retry_base: Duration::from_secs(10),
            retry_cap: Duration::from_secs(3_600),
            max_attempts: 8,
            poll_interval: Duration::from_millis(500),
            batch_size: 256,
            // One email in flight per connection the SMTP pool may open (see `email::POOL_SIZE`).
            send_concurrency: herald_channels::email::POOL_SIZE as usize,
            stall_limit: Duration::from_secs(60),
            fault_hook: None,
        }
    }

    /// Runs the fault hook, if one is set.
    pub fn fault_point(&self, stage: Stage, contact_id: &str) {
        if let Some(hook) = &self.fault_hook {
            hook(stage, contact_id);
        }
    }

    /// The host part of the public URL, used in generated `Message-ID`s.
    pub fn public_host(&self) -> String {
        url_host(&self.public_url).unwrap_or_else(|| "herald.localhost".into())
    }
}

fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host.split(':').next()?;
    (!host.is_empty()).then(|| host.to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn public_host() {
        assert_eq!(
            super::url_host("https://school.example.com:8443/x"),
            Some("school.example.com".into())
        );
        assert_eq!(
            super::url_host("http://127.0.0.1:8080"),
            Some("127.0.0.1".into())
        );
        assert_eq!(super::url_host("nonsense"), None);
    }
}
