//! Configuration: `herald.toml` (optional) overridden by `HERALD_*` variables, with the names and
//! defaults the README lists. Every variable is read as the string written (a phone number
//! `+15005550006` or an all-digit token stays as written); only settings that are numbers by
//! meaning are parsed as numbers. Secrets are a type that never prints its value.

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
    pub webhook_secret: Option<Secret>,
    pub admin_token: Option<Secret>,
    pub workflows: PathBuf,
    pub templates: PathBuf,
    /// May carry a password.
    pub smtp_url: Option<Secret>,
    pub email_from: String,
    pub sms_url: Option<String>,
    pub sms_account_sid: Option<String>,
    pub sms_auth_token: Option<Secret>,
    pub sms_from: Option<String>,
    /// Appended to the first SMS a contact receives.
    pub sms_opt_out_line: String,
    pub learner_link_ttl: Duration,
    #[serde(deserialize_with = "number_or_numeric_string")]
    pub learner_link_uses: u32,
    pub timezone: String,
    /// How long an engine loop may make no progress while work is due before `/healthz` says so.
    pub stall_limit: Duration,
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
            stall_limit: Duration::from_secs(60),
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
            .merge(
                Env::prefixed("HERALD_")
                    .ignore(&["log", "log_format"])
                    .parser(|v: &str| figment2::value::Value::from(v.to_owned())),
            )
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

/// A configured secret: its `Debug` and `Display` never show the value, so neither logs nor
/// error messages can leak it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A count from TOML (a number) or from a variable (a string of digits).
fn number_or_numeric_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Count {
        Number(u32),
        Text(String),
    }
    match Count::deserialize(d)? {
        Count::Number(n) => Ok(n),
        Count::Text(t) => t
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{t:?} is not a whole number"))),
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
