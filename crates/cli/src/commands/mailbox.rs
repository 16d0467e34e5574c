//! `herald mailbox`: the dev mailbox, newest first.

use crate::config::Config;
use anyhow::Result;
use secrecy::ExposeSecret;
use std::process::ExitCode;

pub async fn mailbox(config: &Config, limit: i64) -> Result<ExitCode> {
    let store = herald_store::Store::connect(config.database_url.expose_secret()).await?;
    let items = store.mailbox(limit).await?;
    if items.is_empty() {
        println!("The dev mailbox is empty.");
    }
    for m in items {
        let when = m.created_ms.to_datetime().to_rfc3339();
        println!("── {} {} → {}", when, m.channel.as_str(), m.recipient);
        if let Some(from) = &m.sender {
            println!("From: {from}");
        }
        if let Some(subject) = &m.subject {
            println!("Subject: {subject}");
        }
        if let Some(text) = &m.text_body {
            println!("\n{text}\n");
        } else if m.html_body.is_some() {
            println!("\n(HTML only; see /dev/mailbox)\n");
        }
    }
    Ok(ExitCode::SUCCESS)
}
