//! One module per command.

mod check;
mod links;
mod mailbox;
mod preview;
mod replay;
mod send_event;
mod serve;

use crate::cli::{Cli, Command};
use crate::config::Config;
use anyhow::Result;
use secrecy::ExposeSecret;
use std::process::ExitCode;

/// Where `serve --dev` keeps the webhook secret it generated, so that restarts and
/// `herald send-event` use the same one.
pub const DEV_SECRET_FILE: &str = "herald-dev.secret";

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve { dev } => serve::serve(config, dev).await,
        Command::Worker => serve::worker(config).await,
        Command::Check => check::check(&config),
        Command::Preview {
            workflow,
            event,
            diagram,
            assume,
        } => preview::preview(&config, &workflow, &event, diagram, &assume),
        Command::SendEvent { file, url } => send_event::send_event(&config, &file, url).await,
        Command::Links { action } => links::links(&config, action).await,
        Command::Migrate => {
            let url = config.database_url.expose_secret();
            herald_store::Store::connect(url).await?;
            println!("database {} is migrated", herald_server::redact_url(url));
            Ok(ExitCode::SUCCESS)
        }
        Command::Mailbox { limit } => mailbox::mailbox(&config, limit).await,
        Command::Replay {
            since,
            workflow,
            dry_run,
        } => replay::replay(&config, &since, &workflow, dry_run).await,
    }
}
