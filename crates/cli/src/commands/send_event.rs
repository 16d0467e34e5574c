//! `herald send-event FILE`: sign and post events like a course platform.

use super::DEV_SECRET_FILE;
use crate::config::Config;
use anyhow::{Context, Result, bail};
use herald_core::signature::parse_secrets;
use secrecy::{ExposeSecret, SecretString};
use std::path::Path;
use std::process::ExitCode;

pub async fn send_event(config: &Config, file: &Path, url: Option<String>) -> Result<ExitCode> {
    let body = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    let content_type = if value.is_array() {
        "application/cloudevents-batch+json"
    } else {
        "application/cloudevents+json"
    };
    let (secret_list, origin): (SecretString, &str) = match &config.webhook_secret {
        Some(s) => (s.clone(), "HERALD_WEBHOOK_SECRET"),
        None => (
            std::fs::read_to_string(DEV_SECRET_FILE)
                .with_context(|| {
                    format!("no HERALD_WEBHOOK_SECRET and no {DEV_SECRET_FILE}: set the secret herald was started with")
                })?
                .into(),
            DEV_SECRET_FILE,
        ),
    };
    let secret = parse_secrets(secret_list.expose_secret())
        .context(origin)?
        .into_iter()
        .next()
        .with_context(|| format!("{origin} is empty"))?;
    let msg_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let timestamp = chrono::Utc::now().timestamp();
    let base = url.unwrap_or_else(|| config.public_url());
    let endpoint = format!("{}/v1/events", base.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .post(&endpoint)
        .header("content-type", content_type)
        .header("webhook-id", &msg_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", secret.sign(&msg_id, timestamp, &body))
        .body(body)
        .send()
        .await
        .with_context(|| {
            format!("cannot reach herald at {endpoint}; is `herald serve` running?")
        })?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    println!("{} {}", status.as_u16(), text);
    if !status.is_success() {
        bail!("herald refused the event(s) with {status}");
    }
    Ok(ExitCode::SUCCESS)
}
