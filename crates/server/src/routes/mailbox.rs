//! `/dev/mailbox`: what herald would have sent, when no provider is configured.

use crate::AppState;
use crate::error::ApiError;
use crate::html::{escape, linkify, page as html_page};
use axum::Json;
use axum::extract::State;
use axum::response::Html;
use herald_store::MailboxItem;

const SHOWN: i64 = 200;

pub async fn json(State(state): State<AppState>) -> Result<Json<Vec<MailboxItem>>, ApiError> {
    Ok(Json(state.store.mailbox(SHOWN).await?))
}

pub async fn page(State(state): State<AppState>) -> Result<Html<String>, ApiError> {
    let items = state.store.mailbox(SHOWN).await?;
    let mut body = format!(
        "<h1>Dev mailbox</h1><p>{} most recent messages. Nothing here was sent.</p>",
        items.len()
    );
    for m in &items {
        let when = m.created_ms.to_datetime().to_rfc3339();
        body.push_str(&format!(
            "<article><h2>{}</h2><p><b>{}</b> to {}{} · {}</p>",
            escape(m.subject.as_deref().unwrap_or("(SMS)")),
            m.channel.as_str(),
            escape(&m.recipient),
            m.sender
                .as_deref()
                .map(|s| format!(" from {}", escape(s)))
                .unwrap_or_default(),
            escape(&when),
        ));
        if let Some(text) = &m.text_body {
            body.push_str(&format!("<pre>{}</pre>", linkify(text)));
        }
        if let Some(html) = &m.html_body {
            // Sandboxed: the message's HTML cannot run scripts or touch this page.
            body.push_str(&format!(
                "<details><summary>HTML part</summary><iframe sandbox=\"allow-popups allow-popups-to-escape-sandbox\" style=\"width:100%;height:20rem;border:1px solid #ccc\" srcdoc=\"{}\"></iframe></details>",
                escape(html)
            ));
        }
        body.push_str("</article><hr>");
    }
    Ok(Html(html_page("herald dev mailbox", &body)))
}
