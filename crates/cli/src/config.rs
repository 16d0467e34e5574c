//! Configuration: `herald.toml` (optional) overridden by `HERALD_*` variables, with the names and
//! defaults of SPEC §8.

use anyhow::{Context, Result, bail};
use figment2::Figment;
use figment2::providers::{Env, Format, Serialized, Toml};
use herald_core::Duration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub database_url: String,
    pub listen: String,
    /// Default: `http://` + listen.
    pub public_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub admin_token: Option<String>,
    pub workflows: PathBuf,
    pub templates: PathBuf,
    pub smtp_url: Option<String>,
    pub email_from: String,
    pub sms_url: Option<String>,
    pub sms_account_sid: Option<String>,
    pub sms_auth_token: Option<String>,
    pub sms_from: Option<String>,
    /// Appended to the first SMS a contact receives.
    pub sms_opt_out_line: String,
    pub learner_link_ttl: Duration,
    pub learner_link_uses: u32,
    pub timezone: String,
    /// `[custom_values]`: `<<name>>` → value.
    pub custom_values: BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "sqlite://herald.db".into(),
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            webhook_secret: None,
            admin_token: None,
            workflows: "workflows".into(),
            templates: "templates".into(),
            smtp_url: None,
            email_from: "herald <noreply@localhost>".into(),
            sms_url: None,
            sms_account_sid: None,
            sms_auth_token: None,
            sms_from: None,
            sms_opt_out_line: "Reply STOP to opt out".into(),
            learner_link_ttl: Duration::from_secs(24 * 3600),
            learner_link_uses: 5,
            timezone: "UTC".into(),
            custom_values: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Defaults, then the TOML file, then `HERALD_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let explicit = file.is_some();
        let file = file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("herald.toml"));
        if explicit && !file.exists() {
            bail!("configuration file {} does not exist", file.display());
        }
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(&file))
            .merge(Env::prefixed("HERALD_").ignore(&["log", "log_format"]))
            .extract()
            .with_context(|| {
                format!(
                    "invalid configuration (from {} and HERALD_* variables)",
                    file.display()
                )
            })?;
        config.timezone()?;
        Ok(config)
    }

    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
            .trim_end_matches('/')
            .to_owned()
    }

    pub fn timezone(&self) -> Result<chrono_tz::Tz> {
        self.timezone.parse().map_err(|_| {
            anyhow::anyhow!(
                "HERALD_TIMEZONE {:?} is not an IANA time zone such as Europe/Berlin",
                self.timezone
            )
        })
    }
}

/// Logs to stderr; `HERALD_LOG` sets the filter (default `info`), `HERALD_LOG_FORMAT=json` selects
/// JSON lines.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("HERALD_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
