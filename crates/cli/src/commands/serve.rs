//! `herald serve` and `herald worker`.

use super::DEV_SECRET_FILE;
use crate::config::Config;
use anyhow::{Context, Result, bail};
use herald_channels::email::SmtpSender;
use herald_core::signature::{WebhookSecret, parse_secrets};
use herald_engine::{Clock, EngineConfig, Registry, Sources};
use herald_server::{Application, Settings};
use secrecy::ExposeSecret;
use std::process::ExitCode;
use std::sync::Arc;

pub async fn serve(config: Config, dev: bool) -> Result<ExitCode> {
    let secrets = webhook_secrets(&config, dev)?;
    if dev && !listens_on_loopback_only(&config.listen) {
        tracing::warn!(listen = %config.listen, "--dev on an address other machines can reach: anyone who reaches it can read the dev mailbox and its sign-in links");
    }
    run(config, Some(secrets), dev).await
}

/// `herald serve` without the HTTP listener: the same application, keys and reload.
pub async fn worker(config: Config) -> Result<ExitCode> {
    run(config, None, false).await
}

/// Whether `listen` (host:port) binds only loopback addresses.
fn listens_on_loopback_only(listen: &str) -> bool {
    let host = listen
        .rsplit_once(':')
        .map_or(listen, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Builds the application (with HTTP when `http` carries the webhook secrets) and runs it until
/// SIGTERM or Ctrl-C; SIGHUP reloads the workflows.
async fn run(config: Config, http: Option<Vec<WebhookSecret>>, dev: bool) -> Result<ExitCode> {
    let serving = http.is_some();
    let settings = Settings {
        database_url: config.database_url.expose_secret().to_owned(),
        listen: serving.then(|| config.listen.clone()),
        secrets: http.unwrap_or_default(),
        sources: sources(&config),
        engine: engine_config(&config)?,
        clock: Clock::System,
        admin_token: config
            .admin_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned()),
        redeem_per_minute: 30,
        trusted_proxies: config.trusted_proxies()?,
        event_requests_in_flight: herald_server::MAX_EVENT_REQUESTS_IN_FLIGHT,
        dev,
    };
    let mailbox = settings.engine.smtp.is_none();
    let app = Application::build(settings).await?;
    if serving {
        tracing::info!(listen = %config.listen, public_url = %config.public_url(), "herald is serving");
    } else {
        tracing::info!("herald worker running");
    }
    if mailbox && dev {
        eprintln!(
            "No HERALD_SMTP_URL: emails go to the dev mailbox at {}/dev/mailbox",
            config.public_url()
        );
    } else if mailbox {
        eprintln!(
            "No HERALD_SMTP_URL: emails are kept in the dev mailbox; read them with `herald mailbox` \
             (or run `herald serve --dev` for the page)"
        );
    }
    let reloader = tokio::spawn(reload_on_sighup(
        app.state().registry.clone(),
        app.state().clock.clone(),
    ));
    let watcher = reload_on_file_change(
        app.state().registry.clone(),
        app.state().clock.clone(),
        &sources(&config),
    )?;
    app.run(shutdown_signal()).await?;
    reloader.abort();
    watcher.abort();
    tracing::info!("herald stopped");
    Ok(ExitCode::SUCCESS)
}

fn sources(config: &Config) -> Sources {
    Sources {
        workflows: config.workflows.clone(),
        templates: config.templates.clone(),
    }
}

pub fn engine_config(config: &Config) -> Result<EngineConfig> {
    let mut engine = EngineConfig::new(config.public_url());
    engine.email_from = config.email_from.clone();
    engine.default_timezone = config.timezone()?;
    engine.default_locale = config.locale()?;
    engine.custom_values = config.custom_values.clone();
    engine.links.learner_ttl = config.learner_link_ttl.to_std();
    engine.links.learner_uses = i64::from(config.learner_link_uses);
    engine.links.user_link_secret = config.admin_token.clone();
    engine.stall_limit = config.stall_limit.to_std();
    engine.lease = config.lease.to_std();
    engine.smtp = config
        .smtp_url
        .as_ref()
        .map(|url| SmtpSender::from_url(url.expose_secret()))
        .transpose()
        .context("HERALD_SMTP_URL")?;
    if let Some(dkim) = config.dkim()? {
        match engine.smtp.take() {
            Some(smtp) => engine.smtp = Some(smtp.with_dkim(dkim)),
            None => tracing::warn!(
                "DKIM is configured but HERALD_SMTP_URL is not: the dev mailbox is not signed"
            ),
        }
    }
    engine.sms_opt_out_line = config.sms_opt_out_line.clone();
    engine.sms = match &config.sms_url {
        Some(url) => Some(herald_channels::sms::SmsSender::new(
            url,
            config.sms_account_sid.as_deref().unwrap_or_default(),
            config
                .sms_auth_token
                .as_ref()
                .map(ExposeSecret::expose_secret)
                .unwrap_or_default(),
            config.sms_from.as_deref().unwrap_or_default(),
        )?),
        None => None,
    };
    Ok(engine)
}

/// The configured secrets; with `--dev` and none configured, the one kept in
/// [`DEV_SECRET_FILE`] (generated on first use).
fn webhook_secrets(config: &Config, dev: bool) -> Result<Vec<WebhookSecret>> {
    if let Some(list) = &config.webhook_secret {
        let secrets = parse_secrets(list.expose_secret()).context("HERALD_WEBHOOK_SECRET")?;
        if secrets.is_empty() {
            bail!(
                "HERALD_WEBHOOK_SECRET is empty: set one or more whsec_… secrets, comma-separated"
            );
        }
        return Ok(secrets);
    }
    if !dev {
        bail!(
            "HERALD_WEBHOOK_SECRET is not set: herald refuses unsigned events. Set it to a whsec_… secret shared \
             with your course platform, or run `herald serve --dev` to generate one for local use"
        );
    }
    let secret = match std::fs::read_to_string(DEV_SECRET_FILE) {
        Ok(s) => WebhookSecret::parse(&s)
            .with_context(|| format!("{DEV_SECRET_FILE} holds no valid secret; delete it"))?,
        Err(_) => {
            let mut key = vec![0u8; 32];
            getrandom::fill(&mut key)
                .map_err(|e| anyhow::anyhow!("OS random source failed: {e}"))?;
            let secret = WebhookSecret::from_bytes(key)?;
            write_private(DEV_SECRET_FILE, &secret.to_whsec())?;
            secret
        }
    };
    eprintln!(
        "Development webhook secret (kept in {DEV_SECRET_FILE}, used by `herald send-event`):\n  HERALD_WEBHOOK_SECRET={}",
        secret.to_whsec()
    );
    Ok(vec![secret])
}

fn write_private(path: &str, contents: &str) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(path)
        .with_context(|| format!("cannot create {path}"))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
    tracing::info!("shutting down: finishing requests and batches in flight");
}

/// How long the files must be still before a reload: an editor's save (or a deploy copying
/// several files) becomes one reload.
const FILE_CHANGE_SETTLE: std::time::Duration = std::time::Duration::from_millis(300);

/// A change to a file in the workflows or templates folder reloads them, as SIGHUP does: a set
/// that does not check is refused whole and the running set stays.
fn reload_on_file_change(
    registry: Arc<Registry>,
    clock: Clock,
    sources: &Sources,
) -> Result<tokio::task::JoinHandle<()>> {
    use notify::{EventKind, RecursiveMode, Watcher, event::ModifyKind};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
        // Only writes, creations, removals and renames of workflow and template files count:
        // reading them (as every reload does) or touching their metadata must not set off a
        // reload, or reloads would set off each other forever.
        let Ok(event) = result else { return };
        let changed = matches!(
            event.kind,
            EventKind::Create(_)
                | EventKind::Remove(_)
                | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any)
        );
        let ours = event.paths.iter().any(|p| {
            p.extension()
                .is_some_and(|x| x == "yaml" || x == "yml" || x == "hbs")
        });
        if changed && ours {
            let _ = tx.send(());
        }
    })
    .context("cannot watch the workflow files")?;
    for dir in [&sources.workflows, &sources.templates] {
        if dir.is_dir() {
            watcher
                .watch(dir, RecursiveMode::Recursive)
                .with_context(|| format!("cannot watch {}", dir.display()))?;
        }
    }
    Ok(tokio::spawn(async move {
        // The watcher stops when dropped: it lives as long as this task.
        let _watcher = watcher;
        while rx.recv().await.is_some() {
            // Quiet for a moment first, then one reload for everything that changed meanwhile.
            loop {
                tokio::time::sleep(FILE_CHANGE_SETTLE).await;
                let mut more = false;
                while rx.try_recv().is_ok() {
                    more = true;
                }
                if !more {
                    break;
                }
            }
            match registry.reload(clock.now()).await {
                Ok(warnings) => {
                    for w in warnings {
                        tracing::warn!(%w, "workflow warning");
                    }
                    tracing::info!("workflow files changed: reloaded");
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "workflow files changed but do not check; the running set stays"
                ),
            }
        }
    }))
}

/// `kill -HUP`: reload workflows and templates; a set that does not check is refused as a whole
/// and the running set stays.
async fn reload_on_sighup(registry: Arc<Registry>, clock: Clock) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            match registry.reload(clock.now()).await {
                Ok(warnings) => {
                    for w in warnings {
                        tracing::warn!(%w, "workflow warning");
                    }
                    tracing::info!("workflows reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "workflow reload refused; the running set stays")
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (registry, clock);
}

#[cfg(test)]
mod tests {
    use super::listens_on_loopback_only;

    #[test]
    fn loopback_addresses_are_told_apart() {
        for local in [
            "127.0.0.1:8080",
            "localhost:8080",
            "[::1]:8080",
            "127.0.0.2:1",
        ] {
            assert!(listens_on_loopback_only(local), "{local}");
        }
        for open in [
            "0.0.0.0:8080",
            "[::]:8080",
            "192.168.1.5:8080",
            "herald.example.com:80",
        ] {
            assert!(!listens_on_loopback_only(open), "{open}");
        }
    }
}
