//! `POST /v1/sms/inbound`: the provider's webhook for texts learners send back. Twilio's form,
//! verified by `X-Twilio-Signature` (403 otherwise); STOP-like keywords opt the sender out of SMS,
//! START-like keywords back in.

use crate::AppState;
use crate::error::ApiError;
use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use herald_store::Channel;

const OPT_OUT: &[&str] = &[
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "REVOKE",
    "OPTOUT",
    "OPT OUT",
];
const OPT_IN: &[&str] = &["START", "YES", "UNSTOP"];

pub async fn inbound(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<impl IntoResponse, ApiError> {
    let Some(sms) = &state.engine.sms else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "inbound SMS needs HERALD_SMS_URL and HERALD_SMS_AUTH_TOKEN",
        ));
    };
    let url = format!(
        "{}/v1/sms/inbound",
        state.engine.public_url.trim_end_matches('/')
    );
    let signature = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !sms.verify_inbound(&url, &form, signature) {
        tracing::info!("inbound SMS refused: bad X-Twilio-Signature");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid X-Twilio-Signature",
        ));
    }
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_owned())
    };
    let (Some(from), Some(body)) = (field("From"), field("Body")) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "inbound SMS needs From and Body fields",
        ));
    };
    let keyword = body.to_uppercase();
    let opt_out = match keyword.as_str() {
        k if OPT_OUT.contains(&k) => Some(true),
        k if OPT_IN.contains(&k) => Some(false),
        _ => None,
    };
    if let Some(opt_out) = opt_out {
        let now = state.clock.now();
        for contact in state.store.contacts_by_phone(from).await? {
            state
                .store
                .set_opt_out(contact, Channel::Sms, opt_out, "sms_keyword".into(), now)
                .await?;
        }
        tracing::info!(opt_out, "inbound SMS keyword applied");
    }
    // An empty TwiML answer: herald sends no automatic reply (the provider's own STOP handling does).
    Ok((
        [(header::CONTENT_TYPE, "text/xml")],
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>",
    ))
}
