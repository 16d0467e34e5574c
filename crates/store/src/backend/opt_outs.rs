//! Opt-outs, the suppression list and erasure, written once for both backends.

use super::Backend;
use super::sql::{Param, Statement, Tx, text, text_list};
use crate::backend::sqlite::FromSqliteRow;
use crate::erasure::{AddressKey, Erased};
use crate::{Channel, ContactId, OptOutRow, Result, SuppressionRow, Timestamp};

pub(crate) const OPT_OUT: Statement = Statement::portable(
    "INSERT INTO opt_outs (contact_id, channel, source, at_ms) VALUES ($1, $2, $3, $4)
     ON CONFLICT DO NOTHING",
);
const OPT_IN: Statement =
    Statement::portable("DELETE FROM opt_outs WHERE contact_id = $1 AND channel = $2");
const CONTACTS_BY_EMAIL: Statement =
    Statement::portable("SELECT id FROM contacts WHERE lower(email) = lower($1) ORDER BY id");
const OPT_OUT_EMAILS: Statement = Statement {
    sqlite: "INSERT INTO opt_outs (contact_id, channel, source, at_ms)
             SELECT value, 'email', $2, $3 FROM json_each($1) WHERE true ON CONFLICT DO NOTHING",
    postgres: "INSERT INTO opt_outs (contact_id, channel, source, at_ms)
               SELECT id, 'email', $2, $3 FROM UNNEST($1::text[]) AS u(id) ON CONFLICT DO NOTHING",
};
const SUPPRESS_ADDRESS: Statement = Statement::portable(
    "INSERT INTO suppressed_addresses (address_hash, channel, source, at_ms) VALUES ($1, $2, $3, $4)
     ON CONFLICT DO NOTHING",
);
const SUPPRESSION_LIST: Statement = Statement::portable(
    "SELECT o.contact_id, c.email, c.phone, o.channel, o.source, o.at_ms
     FROM opt_outs o LEFT JOIN contacts c ON c.id = o.contact_id
     ORDER BY o.at_ms, o.contact_id, o.channel",
);
const CONTACT_ADDRESSES: Statement =
    Statement::portable("SELECT email, phone FROM contacts WHERE id = $1");
const OPT_OUTS: Statement = Statement::portable(
    "SELECT channel, source, at_ms FROM opt_outs WHERE contact_id = $1 ORDER BY channel",
);
const CONTACTS_BY_PHONE: Statement =
    Statement::portable("SELECT id FROM contacts WHERE phone = $1 ORDER BY id");
/// What erasing a contact deletes, children first (steps before their runs); each takes the
/// contact's id.
const ERASE: [Statement; 10] = [
    Statement::portable(
        "DELETE FROM run_steps WHERE run_id IN (SELECT id FROM runs WHERE contact_id = $1)",
    ),
    Statement::portable("DELETE FROM messages WHERE contact_id = $1"),
    Statement::portable("DELETE FROM runs WHERE contact_id = $1"),
    Statement::portable("DELETE FROM events WHERE contact_id = $1"),
    Statement::portable("DELETE FROM magic_links WHERE contact_id = $1"),
    Statement::portable("DELETE FROM sessions WHERE contact_id = $1"),
    Statement::portable("DELETE FROM link_audit WHERE contact_id = $1"),
    Statement::portable("DELETE FROM opt_outs WHERE contact_id = $1"),
    Statement::portable("DELETE FROM grants WHERE contact_id = $1"),
    Statement::portable("DELETE FROM contacts WHERE id = $1"),
];
const ERASE_MAILBOX: Statement =
    Statement::portable("DELETE FROM mailbox WHERE recipient = $1 OR recipient = $2");

pub(crate) async fn set_opt_out(
    backend: &Backend,
    contact_id: ContactId,
    channel: Channel,
    opted_out: bool,
    source: String,
    now: Timestamp,
) -> Result<bool> {
    let args = (contact_id, channel, opted_out, source, now);
    backend
        .write(
            "set an opt-out",
            args,
            |tx, (contact_id, channel, opted_out, source, now)| {
                Box::pin(async move {
                    let changed = if *opted_out {
                        let params = [
                            text(contact_id),
                            text(channel.as_str()),
                            text(source),
                            Param::from(*now),
                        ];
                        tx.execute(OPT_OUT, &params).await?
                    } else {
                        tx.execute(OPT_IN, &[text(contact_id), text(channel.as_str())])
                            .await?
                    };
                    Ok(changed > 0)
                })
            },
        )
        .await
}

/// Opts out every contact with one of these email addresses (each with the source that reported
/// it) and, with `key`, keeps the address's hash so that a later contact with it stays
/// suppressed. Returns the contacts opted out.
pub(crate) async fn suppress_email_addresses(
    backend: &Backend,
    addresses: Vec<(String, String)>,
    key: Option<AddressKey>,
    now: Timestamp,
) -> Result<Vec<ContactId>> {
    let args = (addresses, key, now);
    backend
        .write(
            "suppress addresses",
            args,
            |mut tx, (addresses, key, now)| {
                Box::pin(async move {
                    let mut opted_out = Vec::new();
                    for (address, source) in addresses {
                        let ids: Vec<ContactId> = tx
                            .at()
                            .fetch_scalars(CONTACTS_BY_EMAIL, &[text(address)])
                            .await?;
                        let params = [text_list(&ids), text(source), Param::from(*now)];
                        tx.at().execute(OPT_OUT_EMAILS, &params).await?;
                        if let Some(key) = key {
                            let hash = key.hash(Channel::Email, address);
                            let params = [
                                text(&hash),
                                text(Channel::Email.as_str()),
                                text(source),
                                Param::from(*now),
                            ];
                            tx.at().execute(SUPPRESS_ADDRESS, &params).await?;
                        }
                        opted_out.extend(ids);
                    }
                    Ok(opted_out)
                })
            },
        )
        .await
}

pub(crate) async fn suppression_list(backend: &Backend) -> Result<Vec<SuppressionRow>> {
    backend.reader().fetch_all(SUPPRESSION_LIST, &[]).await
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct Addresses {
    email: Option<String>,
    phone: Option<String>,
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct OptOutSource {
    #[sqlx(try_from = "String")]
    channel: Channel,
    source: String,
}

/// Deletes everything stored about the contact; the addresses it had opted out stay suppressed
/// as hashes. `None` for an unknown contact.
pub(crate) async fn erase_contact(
    backend: &Backend,
    contact_id: ContactId,
    key: AddressKey,
    now: Timestamp,
) -> Result<Option<Erased>> {
    let args = (contact_id, key, now);
    backend
        .write("erase a contact", args, |mut tx, (contact_id, key, now)| {
            Box::pin(async move { erase(&mut tx, contact_id, key, *now).await })
        })
        .await
}

async fn erase(
    tx: &mut Tx<'_>,
    contact_id: &str,
    key: &AddressKey,
    now: Timestamp,
) -> Result<Option<Erased>> {
    let Some(addresses) = tx
        .at()
        .fetch_optional::<Addresses>(CONTACT_ADDRESSES, &[text(contact_id)])
        .await?
    else {
        return Ok(None);
    };
    let mut erased = Erased::default();
    let opted_out: Vec<OptOutSource> = tx.at().fetch_all(OPT_OUTS, &[text(contact_id)]).await?;
    for OptOutSource { channel, source } in opted_out {
        let address = match channel {
            Channel::Email => addresses.email.as_deref(),
            Channel::Sms => addresses.phone.as_deref(),
        };
        if let Some(address) = address.filter(|a| !a.trim().is_empty()) {
            let hash = key.hash(channel, address);
            let params = [
                text(&hash),
                text(channel.as_str()),
                text(&source),
                Param::from(now),
            ];
            erased.suppressed_addresses += tx.at().execute(SUPPRESS_ADDRESS, &params).await?;
        }
    }
    let mut removed = Vec::with_capacity(ERASE.len());
    for statement in ERASE {
        removed.push(tx.at().execute(statement, &[text(contact_id)]).await?);
    }
    (erased.messages, erased.runs, erased.events) = (removed[1], removed[2], removed[3]);
    let recipients = [
        text(addresses.email.as_deref().unwrap_or_default()),
        text(addresses.phone.as_deref().unwrap_or_default()),
    ];
    tx.at().execute(ERASE_MAILBOX, &recipients).await?;
    Ok(Some(erased))
}

pub(crate) async fn opt_outs(backend: &Backend, contact_id: ContactId) -> Result<Vec<OptOutRow>> {
    backend
        .reader()
        .fetch_all(OPT_OUTS, &[text(&contact_id)])
        .await
}

/// Ids of the contacts whose phone is this E.164 number (inbound SMS keywords).
pub(crate) async fn contacts_by_phone(backend: &Backend, phone: String) -> Result<Vec<ContactId>> {
    backend
        .reader()
        .fetch_scalars(CONTACTS_BY_PHONE, &[text(&phone)])
        .await
}
