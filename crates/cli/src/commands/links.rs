//! `herald links regenerate --contact ID` and `herald links user [--regenerate]`.

use super::serve::engine_config;
use crate::cli::LinksAction;
use crate::config::Config;
use anyhow::{Result, bail};
use herald_engine::Clock;
use secrecy::ExposeSecret;
use std::process::ExitCode;

pub async fn links(config: &Config, action: LinksAction) -> Result<ExitCode> {
    let store = herald_store::Store::connect(config.database_url.expose_secret()).await?;
    let policy = engine_config(config)?.links;
    let now = Clock::System.now();
    let url = match action {
        LinksAction::Regenerate { contact } => {
            if store.contact(contact.as_str().into()).await?.is_none() {
                bail!("no contact {contact:?}: herald learns contacts from course events");
            }
            policy.regenerate_learner(&store, &contact, now).await?
        }
        LinksAction::User { regenerate } => policy.user_link(&store, regenerate, now).await?,
    };
    println!("{url}");
    Ok(ExitCode::SUCCESS)
}
