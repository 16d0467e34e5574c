//! Configuration: `herald.toml` (optional) overridden by `HERALD_*` variables, with the names and
//! defaults the README lists. A variable's value is the string written (a phone number
//! `+15005550006` or a token `007` stays as written); only settings that are numbers by meaning
//! are parsed as numbers. Secrets are `SecretString`s, which never print their value.

use anyhow::{Context, Result, anyhow, bail};
use figment2::providers::{Format, Toml};
use figment2::value::{Dict, Map, Tag, Value};
use figment2::{Figment, Metadata, Profile, Provider};
use herald_core::Duration;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What every configuration variable's name starts with.
const PREFIX: &str = "HERALD_";
/// The name of [`Variables`]' figment metadata.
const VARIABLES: &str = "environment variable";
/// Variables the logger reads (see [`init_tracing`]); not settings.
const LOGGING: [&str; 2] = ["HERALD_LOG", "HERALD_LOG_FORMAT"];

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// May carry a password.
    #[serde(deserialize_with = "secret")]
    pub database_url: SecretString,
    pub listen: String,
    /// Default: `http://` + listen.
    pub public_url: Option<String>,
    #[serde(deserialize_with = "optional_secret")]
    pub webhook_secret: Option<SecretString>,
    #[serde(deserialize_with = "optional_secret")]
    pub admin_token: Option<SecretString>,
    pub workflows: PathBuf,
    pub templates: PathBuf,
    /// May carry a password.
    #[serde(deserialize_with = "optional_secret")]
    pub smtp_url: Option<SecretString>,
    pub email_from: String,
    pub sms_url: Option<String>,
    pub sms_account_sid: Option<String>,
    #[serde(deserialize_with = "optional_secret")]
    pub sms_auth_token: Option<SecretString>,
    pub sms_from: Option<String>,
    /// DKIM: the signing domain (`d=`), the selector (`s=`) and the file with the RSA private key
    /// (PEM, PKCS#1 or PKCS#8); all three or none.
    pub dkim_domain: Option<String>,
    pub dkim_selector: Option<String>,
    pub dkim_key: Option<PathBuf>,
    /// Comma-separated CIDRs of the proxies in front of herald whose `X-Forwarded-For` /
    /// `Forwarded` name the client (for per-client rate limits).
    pub trusted_proxies: Option<String>,
    /// Appended to the first SMS a contact receives.
    pub sms_opt_out_line: String,
    pub learner_link_ttl: Duration,
    #[serde(deserialize_with = "count")]
    pub learner_link_uses: u32,
    pub timezone: String,
    /// Locale of dates and numbers in templates for contacts without `contact.locale`.
    pub locale: String,
    /// How long an engine loop may make no progress while work is due before `/healthz` says so.
    pub stall_limit: Duration,
    /// How long a claimed message or run is held by one process before another may take it over
    /// (renewed while a send is in flight): how soon work of a killed process resumes.
    pub lease: Duration,
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
            trusted_proxies: None,
            dkim_domain: None,
            dkim_selector: None,
            dkim_key: None,
            sms_opt_out_line: "Reply STOP to opt out".into(),
            learner_link_ttl: Duration::from_secs(24 * 3600),
            learner_link_uses: 5,
            timezone: "UTC".into(),
            locale: "en_US".into(),
            stall_limit: Duration::from_secs(60),
            lease: Duration::from_secs(60),
            custom_values: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Defaults, then the TOML file, then the process's `HERALD_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut vars = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().filter(|n| n.starts_with(PREFIX)) else {
                continue;
            };
            let value = value.into_string().map_err(|_| {
                anyhow!("{name} is not valid UTF-8: set it to UTF-8 text or unset it")
            })?;
            vars.push((name.to_owned(), value));
        }
        Self::from_sources(file, vars)
    }

    /// Defaults, then the TOML file (`herald.toml` in the working folder unless one is named),
    /// then `vars`, `(name, value)` pairs of which only the `HERALD_*` ones count.
    pub fn from_sources(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        let explicit = file.is_some();
        let file = file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("herald.toml"));
        if explicit && !file.exists() {
            bail!("configuration file {} does not exist", file.display());
        }
        check_syntax(&file)?;
        let config: Config = Figment::from(Toml::file(&file))
            .merge(Variables::new(vars))
            .extract()
            .map_err(|e| anyhow!(describe(e)))
            .context("invalid configuration")?;
        config.timezone()?;
        config.locale()?;
        config.check_database_url()?;
        Ok(config)
    }

    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
            .trim_end_matches('/')
            .to_owned()
    }

    /// The DKIM signer, when configured; an error names what is missing or wrong.
    pub fn dkim(&self) -> Result<Option<herald_channels::dkim::Dkim>> {
        match (&self.dkim_domain, &self.dkim_selector, &self.dkim_key) {
            (None, None, None) => Ok(None),
            (Some(domain), Some(selector), Some(key)) => {
                let pem = std::fs::read_to_string(key)
                    .map_err(|e| anyhow!("HERALD_DKIM_KEY: cannot read {}: {e}", key.display()))?;
                Ok(Some(herald_channels::dkim::Dkim::new(
                    domain, selector, &pem,
                )?))
            }
            _ => {
                let missing: Vec<&str> = [
                    (self.dkim_domain.is_none(), "HERALD_DKIM_DOMAIN"),
                    (self.dkim_selector.is_none(), "HERALD_DKIM_SELECTOR"),
                    (self.dkim_key.is_none(), "HERALD_DKIM_KEY"),
                ]
                .into_iter()
                .filter_map(|(absent, name)| absent.then_some(name))
                .collect();
                Err(anyhow!(
                    "DKIM needs HERALD_DKIM_DOMAIN, HERALD_DKIM_SELECTOR and HERALD_DKIM_KEY together; missing: {}",
                    missing.join(", ")
                ))
            }
        }
    }

    pub fn trusted_proxies(&self) -> Result<Vec<ipnet::IpNet>> {
        let list = self.trusted_proxies.as_deref().unwrap_or_default();
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                // A bare address is a network of one.
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        anyhow!(
                            "HERALD_TRUSTED_PROXIES: {s:?} is not an address or a CIDR such as 10.0.0.0/8"
                        )
                    })
            })
            .collect()
    }

    pub fn timezone(&self) -> Result<chrono_tz::Tz> {
        self.timezone.parse().map_err(|_| {
            anyhow!(
                "HERALD_TIMEZONE {:?} is not an IANA time zone such as Europe/Berlin",
                self.timezone
            )
        })
    }

    /// The configured locale, by its normalised name (`de_DE`).
    pub fn locale(&self) -> Result<String> {
        herald_core::locale::parse_locale(&self.locale)
            .map(|l| l.to_string())
            .ok_or_else(|| {
                anyhow!(
                    "HERALD_LOCALE {:?} is not a locale herald knows: write a language and country such as en_US, de-DE or pt_BR",
                    self.locale
                )
            })
    }

    /// The store quotes a URL it cannot use whole, password included, so the scheme is checked
    /// here first, by a message that leaves the value out.
    fn check_database_url(&self) -> Result<()> {
        let url = self.database_url.expose_secret();
        if ["sqlite:", "postgres://", "postgresql://"]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            return Ok(());
        }
        bail!(
            "HERALD_DATABASE_URL (database_url in herald.toml) must start with sqlite:// or \
             postgres://, such as sqlite://herald.db or postgres://USER:PASSWORD@HOST/DB \
             (the value set is not shown: it may hold a password)"
        )
    }
}

/// The TOML parser's own message quotes the offending line, which may hold a secret; this one
/// gives its place only. A file that cannot be read is left to figment, which names it.
fn check_syntax(file: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Ok(());
    };
    let Err(e) = text.parse::<toml_edit::DocumentMut>() else {
        return Ok(());
    };
    let before = e
        .span()
        .and_then(|span| text.get(..span.start))
        .unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .unwrap_or_default()
        .chars()
        .count()
        + 1;
    bail!(
        "{} line {line}, column {column} is not valid TOML: {} (the line is not shown: it may hold a secret)",
        file.display(),
        e.message().trim_end()
    )
}

/// Each problem on a line of its own, led by the variable (`HERALD_LEARNER_LINK_USES: …`) or the
/// file's key (`learner_link_uses in herald.toml: …`) it is about.
fn describe(errors: figment2::Error) -> String {
    errors
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let place = match &e.metadata {
                Some(md) if md.name == VARIABLES => md.interpolate(&Profile::Default, &e.path),
                Some(Metadata {
                    source: Some(source),
                    ..
                }) => format!("{key} in {source}"),
                _ => key,
            };
            format!("{place}: {}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `HERALD_*` variables as figment data, every value the string written: figment's own `Env`
/// provider guesses types, turning `+15005550006` or `007` into an integer.
struct Variables(Dict);

impl Variables {
    fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(
            vars.into_iter()
                .filter(|(name, _)| !LOGGING.contains(&name.as_str()))
                .filter_map(|(name, value)| {
                    let key = name.strip_prefix(PREFIX)?.to_ascii_lowercase();
                    (!key.is_empty()).then_some((key, Value::String(Tag::Default, value)))
                })
                .collect(),
        )
    }
}

impl Provider for Variables {
    fn metadata(&self) -> Metadata {
        // Keys back to variable names, for errors.
        Metadata::named(VARIABLES)
            .interpolater(|_, keys| format!("{PREFIX}{}", keys.join(".").to_ascii_uppercase()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment2::Error> {
        Ok(Profile::Default.collect(self.0.clone()))
    }
}

/// Any string. serde's own message for anything else quotes the value it found; this one does
/// not, since the value is a secret.
fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    match <Value as Deserialize>::deserialize(d)? {
        Value::String(_, text) => Ok(text.into()),
        _ => Err(de::Error::custom(
            "expected text (in herald.toml, in quotes); the value set is not shown as it is secret",
        )),
    }
}

fn optional_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    secret(d).map(Some)
}

/// A count of 1 or more: a TOML integer, or the digits of a variable.
fn count<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    struct Count;

    impl Visitor<'_> for Count {
        type Value = u32;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number of 1 or more")
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<u32, E> {
            u32::try_from(n)
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| E::custom(format!("{n} is out of range: write 1 to {}", u32::MAX)))
        }

        fn visit_i64<E: de::Error>(self, n: i64) -> Result<u32, E> {
            match u64::try_from(n) {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(E::custom(format!(
                    "{n} is out of range: write 1 to {}",
                    u32::MAX
                ))),
            }
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<u32, E> {
            match text.trim().parse::<u64>() {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(E::custom(format!(
                    "{text:?} is not a whole number: write digits, such as 5"
                ))),
            }
        }
    }

    d.deserialize_any(Count)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const ADMIN_TOKEN: &str = "0012345678";
    const SMS_AUTH_TOKEN: &str = "000111222";

    /// Loads from `toml` (written to a temporary herald.toml) and `vars`, never the process's
    /// environment, so tests running in parallel cannot disturb one another.
    fn load(toml: &str, vars: &[(&str, &str)]) -> Result<Config> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        Config::from_sources(
            Some(file.path()),
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn error(toml: &str, vars: &[(&str, &str)]) -> String {
        format!(
            "{:#}",
            load(toml, vars).expect_err("the configuration is refused")
        )
    }

    #[test]
    fn the_default_locale_is_read_as_people_write_it_and_checked() {
        assert_eq!(load("", &[]).unwrap().locale().unwrap(), "en_US");
        assert_eq!(
            load("", &[("HERALD_LOCALE", "de-DE")])
                .unwrap()
                .locale()
                .unwrap(),
            "de_DE"
        );
        assert_eq!(
            load("locale = \"fr\"", &[]).unwrap().locale().unwrap(),
            "fr_FR"
        );
        let err = error("", &[("HERALD_LOCALE", "klingon")]);
        assert!(
            err.contains("HERALD_LOCALE \"klingon\" is not a locale herald knows"),
            "{err}"
        );
    }

    #[test]
    fn a_phone_number_stays_as_written() {
        let config = load("", &[("HERALD_SMS_FROM", "+15005550006")]).unwrap();
        assert_eq!(config.sms_from.as_deref(), Some("+15005550006"));
    }

    #[test]
    fn all_digit_tokens_stay_text() {
        let config = load(
            "",
            &[
                ("HERALD_ADMIN_TOKEN", ADMIN_TOKEN),
                ("HERALD_SMS_AUTH_TOKEN", SMS_AUTH_TOKEN),
                ("HERALD_SMS_ACCOUNT_SID", "007"),
            ],
        )
        .unwrap();
        assert_eq!(config.admin_token.unwrap().expose_secret(), ADMIN_TOKEN);
        assert_eq!(
            config.sms_auth_token.unwrap().expose_secret(),
            SMS_AUTH_TOKEN
        );
        assert_eq!(config.sms_account_sid.as_deref(), Some("007"));
    }

    #[test]
    fn a_count_parses_from_a_variable_or_a_toml_integer() {
        assert_eq!(load("", &[]).unwrap().learner_link_uses, 5);
        assert_eq!(
            load("", &[("HERALD_LEARNER_LINK_USES", "007")])
                .unwrap()
                .learner_link_uses,
            7
        );
        assert_eq!(
            load("learner_link_uses = 3", &[])
                .unwrap()
                .learner_link_uses,
            3
        );
        // The variable overrides the file.
        assert_eq!(
            load(
                "learner_link_uses = 3",
                &[("HERALD_LEARNER_LINK_USES", "9")]
            )
            .unwrap()
            .learner_link_uses,
            9
        );
    }

    #[test]
    fn a_bad_count_names_its_variable() {
        let err = error("", &[("HERALD_LEARNER_LINK_USES", "five")]);
        assert!(
            err.contains("HERALD_LEARNER_LINK_USES: \"five\" is not a whole number"),
            "{err}"
        );
        let err = error("", &[("HERALD_LEARNER_LINK_USES", "0")]);
        assert!(
            err.contains("HERALD_LEARNER_LINK_USES") && err.contains("out of range"),
            "{err}"
        );
        let err = error("learner_link_uses = -2", &[]);
        assert!(
            err.contains("learner_link_uses") && err.contains("out of range"),
            "{err}"
        );
    }

    #[test]
    fn dkim_needs_all_three_settings_and_a_readable_key() {
        let config = load("", &[("HERALD_DKIM_DOMAIN", "school.example.com")]).unwrap();
        let err = config.dkim().unwrap_err().to_string();
        assert!(
            err.contains("HERALD_DKIM_SELECTOR") && err.contains("HERALD_DKIM_KEY"),
            "{err}"
        );
        let config = load(
            "",
            &[
                ("HERALD_DKIM_DOMAIN", "school.example.com"),
                ("HERALD_DKIM_SELECTOR", "s1"),
                ("HERALD_DKIM_KEY", "/nonexistent/dkim.pem"),
            ],
        )
        .unwrap();
        let err = config.dkim().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/dkim.pem"), "{err}");
        assert!(load("", &[]).unwrap().dkim().unwrap().is_none());
    }

    #[test]
    fn trusted_proxies_are_addresses_or_cidrs() {
        let config = load(
            "",
            &[("HERALD_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7,::1")],
        )
        .unwrap();
        let nets: Vec<String> = config
            .trusted_proxies()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.168.1.7/32", "::1/128"]);
        let config = load("", &[("HERALD_TRUSTED_PROXIES", "10.0.0.0/8,proxy.local")]).unwrap();
        let err = config.trusted_proxies().unwrap_err().to_string();
        assert!(
            err.contains("HERALD_TRUSTED_PROXIES") && err.contains("proxy.local"),
            "{err}"
        );
    }

    #[test]
    fn toml_values_keep_their_types_and_durations_stay_text() {
        let config = load(
            "listen = \"0.0.0.0:9000\"\nlearner_link_ttl = \"2h\"\n[custom_values]\ncoupon = \"SPRING\"\n",
            &[("HERALD_STALL_LIMIT", "90s"), ("HERALD_LEASE", "5s")],
        )
        .unwrap();
        assert_eq!(config.listen, "0.0.0.0:9000");
        assert_eq!(config.learner_link_ttl, Duration::from_secs(2 * 3600));
        assert_eq!(config.stall_limit, Duration::from_secs(90));
        assert_eq!(config.lease, Duration::from_secs(5));
        assert_eq!(config.custom_values["coupon"], "SPRING");
    }

    #[test]
    fn logging_and_foreign_variables_are_not_settings() {
        let config = load(
            "",
            &[
                ("HERALD_LOG", "debug"),
                ("HERALD_LOG_FORMAT", "json"),
                ("SMS_FROM", "+1"),
                ("HERALD_TEST_DATABASE_URL", "postgres://x"),
            ],
        )
        .unwrap();
        assert_eq!(config.sms_from, None);
    }

    #[test]
    fn debug_shows_no_secret() {
        let config = load(
            "",
            &[
                ("HERALD_ADMIN_TOKEN", ADMIN_TOKEN),
                ("HERALD_SMS_AUTH_TOKEN", SMS_AUTH_TOKEN),
                (
                    "HERALD_WEBHOOK_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
                (
                    "HERALD_SMTP_URL",
                    "smtp://ada:smtp-pass@mail.example.com:587",
                ),
                ("HERALD_DATABASE_URL", "postgres://herald:db-pass@db/herald"),
            ],
        )
        .unwrap();
        let debug = format!("{config:?}");
        for secret in [
            ADMIN_TOKEN,
            SMS_AUTH_TOKEN,
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "smtp-pass",
            "db-pass",
        ] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("REDACTED"), "{debug}");
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_named_not_printed() {
        let err = error("admin_token = 4242424242", &[]);
        assert!(err.contains("admin_token in "), "{err}");
        assert!(!err.contains("4242424242"), "{err}");
    }

    #[test]
    fn a_toml_syntax_error_gives_its_place_not_its_line() {
        let err = error("# settings\nadmin_token = s3cr3t\"\n", &[]);
        assert!(err.contains("line 2, column 15 is not valid TOML"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn an_unusable_database_url_is_named_not_printed() {
        let err = error(
            "",
            &[("HERALD_DATABASE_URL", "mysql://herald:db-pass@db/herald")],
        );
        assert!(err.contains("HERALD_DATABASE_URL"), "{err}");
        assert!(!err.contains("db-pass"), "{err}");
    }

    #[test]
    fn a_named_file_must_exist() {
        let err = Config::from_sources(Some(Path::new("/nonexistent/herald.toml")), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/herald.toml"), "{err}");
    }
}
