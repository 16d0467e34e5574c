//! The built-in "here is your new sign-in link" email, overridable by `templates/login_link.*`.

use crate::AppState;
use herald_channels::email::OutgoingEmail;
use herald_core::template::{CustomValues, render_standalone_email};
use herald_store::{Channel, ContactId, MailboxItem};

const SUBJECT: &str = "Your new sign-in link";
const DEFAULT_TEXT: &str = "Hi {{default contact.first_name \"there\"}},\n\nhere is your new sign-in link:\n\n<<login_url>>\n\nIt signs you in with one click. If you did not ask for it, you can ignore this email.\n";
const DEFAULT_HTML: &str = "<p>Hi {{default contact.first_name \"there\"}},</p><p>here is your new sign-in link:</p><p><a href=\"<<login_url>>\">Continue to your courses</a></p><p>If you did not ask for it, you can ignore this email.</p>";

#[derive(Debug, thiserror::Error)]
pub enum LoginMailError {
    #[error(transparent)]
    Store(#[from] herald_store::StoreError),
    #[error("login_link template: {0}")]
    Template(String),
    #[error(transparent)]
    Send(#[from] herald_channels::SendError),
}

/// Mints a fresh link for the contact and emails it to the address on file (if any).
pub async fn send_new_link(state: &AppState, contact_id: &ContactId) -> Result<(), LoginMailError> {
    let Some(contact) = state.store.contact(contact_id.clone()).await? else {
        return Ok(());
    };
    let Some(to) = contact.email.clone().filter(|e| !e.is_empty()) else {
        return Ok(());
    };
    let now = state.clock.now();
    let url = state
        .engine
        .links
        .mint_learner(&state.store, contact_id, now)
        .await?;
    let read = |ext: &str| {
        std::fs::read_to_string(state.templates.join(format!("login_link.{ext}.hbs"))).ok()
    };
    let (text_src, html_src) = (
        read("txt").unwrap_or_else(|| DEFAULT_TEXT.into()),
        read("html").unwrap_or_else(|| DEFAULT_HTML.into()),
    );
    let mut custom: CustomValues = state.engine.custom_values.clone();
    custom.insert("login_url".into(), url);
    let context = serde_json::json!({ "contact": contact });
    let rendered =
        render_standalone_email(SUBJECT, Some(&html_src), Some(&text_src), &context, &custom)
            .map_err(|e| LoginMailError::Template(e.to_string()))?;
    let id = uuid::Uuid::now_v7();
    let email = OutgoingEmail {
        from: state.engine.email_from.clone(),
        to,
        subject: rendered.subject,
        text: rendered.text,
        html: rendered.html,
        message_id: format!("<{id}@{}>", state.engine.public_host()),
        headers: Vec::new(),
    };
    match &state.engine.smtp {
        Some(smtp) => smtp.send(&email).await?,
        None => {
            let item = MailboxItem {
                id: id.to_string(),
                message_id: Some(email.message_id),
                channel: Channel::Email,
                sender: Some(email.from),
                recipient: email.to,
                subject: Some(email.subject),
                text_body: email.text,
                html_body: email.html,
                created_ms: now,
            };
            state.store.add_to_mailbox(item).await?;
        }
    }
    Ok(())
}
