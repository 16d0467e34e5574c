//! Magic links, sessions, the portal's reads and site values, written once for both backends.
//! Where SQLite relies on its single writer, PostgreSQL takes a row lock (the counting `UPDATE`
//! of a redemption) or an advisory lock (a contact's resend budget). The statements that take a
//! batch of message links are in each backend's `links.rs`; storing the login event is each
//! backend's event insert (`events.rs`).

use super::Backend;
use super::sql::{Column, Param, Statement, Tx, limit_param, statement, text, text_list};
use crate::backend::sqlite::FromSqliteRow;
use crate::{
    ContactId, LinkAuditRow, LinkHolder, LinkKind, LinkRefusal, MessageId, NewLink, NewSession,
    ProductRow, Result, Timestamp,
};
use std::collections::HashSet;

type Checked = std::result::Result<LinkHolder, (LinkRefusal, Option<ContactId>)>;

const HAS_ACTIVE_OFFER: Statement = Statement::portable(
    "SELECT EXISTS (SELECT 1 FROM grants WHERE contact_id = $1 AND kind = 'offer' AND active)",
);
/// A retried send re-mints: the earlier token of that message is revoked (kept, so a copy that
/// did arrive says "replaced" rather than "unknown").
const REVOKE_MESSAGE_LINK: Statement = Statement::portable(
    "UPDATE magic_links SET revoked_ms = COALESCE(revoked_ms, $1), message_id = NULL
     WHERE message_id = $2",
);
const INSERT_LINK: Statement = Statement::portable(
    "INSERT INTO magic_links (token_hash, kind, contact_id, message_id, max_uses, expires_ms, created_ms)
     VALUES ($1, $2, $3, $4, $5, $6, $7)",
);
const AUDIT: Statement = Statement::portable(
    "INSERT INTO link_audit (at_ms, kind, contact_id, action, reason) VALUES ($1, $2, $3, $4, $5)",
);
/// The live links of a kind and contact (`NULL`: the site's staff link).
const REVOKE_LINKS: Statement = Statement {
    sqlite: "UPDATE magic_links SET revoked_ms = $1 WHERE revoked_ms IS NULL AND kind = $2
               AND (($3 IS NULL AND contact_id IS NULL) OR contact_id = $3)",
    postgres: "UPDATE magic_links SET revoked_ms = $1 WHERE revoked_ms IS NULL AND kind = $2
                 AND (($3::text IS NULL AND contact_id IS NULL) OR contact_id = $3)",
};
/// A session opened with a revoked link ends with it (a leaked staff link, a learner who asked
/// for a fresh one).
const END_SESSIONS: Statement = Statement {
    sqlite: "UPDATE sessions SET ended_ms = $1 WHERE ended_ms IS NULL AND kind = $2
               AND (($3 IS NULL AND contact_id IS NULL) OR contact_id = $3)",
    postgres: "UPDATE sessions SET ended_ms = $1 WHERE ended_ms IS NULL AND kind = $2
                 AND (($3::text IS NULL AND contact_id IS NULL) OR contact_id = $3)",
};
const SET_SITE_VALUE: Statement = Statement::portable(
    "INSERT INTO site (name, value) VALUES ($1, $2)
     ON CONFLICT (name) DO UPDATE SET value = excluded.value",
);
const DEFAULT_SITE_VALUE: Statement = Statement::portable(
    "INSERT INTO site (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
);
const SITE_VALUE: Statement = Statement::portable("SELECT value FROM site WHERE name = $1");
/// Counts the use if the link opens the portal now; the row it locks makes concurrent
/// redemptions of a one-use link queue, and the second sees the count the first left.
const REDEEM: Statement = Statement::portable(
    "UPDATE magic_links AS l SET uses = uses + 1
     WHERE token_hash = $1 AND revoked_ms IS NULL
       AND (expires_ms IS NULL OR expires_ms > $2)
       AND (max_uses IS NULL OR uses < max_uses)
       AND (kind = 'user' OR EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = l.contact_id AND g.kind = 'offer' AND g.active))
     RETURNING kind, contact_id",
);
const LINK_KIND: Statement =
    Statement::portable("SELECT kind FROM magic_links WHERE token_hash = $1");
const START_SESSION: Statement = Statement::portable(
    "INSERT INTO sessions (id_hash, kind, contact_id, created_ms, expires_ms) VALUES ($1, $2, $3, $4, $5)",
);
const SESSION: Statement = Statement::portable(
    "SELECT kind, contact_id FROM sessions WHERE id_hash = $1 AND ended_ms IS NULL AND expires_ms > $2",
);
const END_SESSION: Statement = Statement::portable(
    "UPDATE sessions SET ended_ms = $1 WHERE id_hash = $2 AND ended_ms IS NULL",
);
/// Ordered by the titles' bytes on both (PostgreSQL's "C" collation is SQLite's default).
const CATALOGUE: Statement = Statement {
    sqlite: "SELECT id, title, url FROM products ORDER BY COALESCE(title, id), id",
    postgres: "SELECT id, title, url FROM products
               ORDER BY COALESCE(title, id) COLLATE \"C\", id COLLATE \"C\"",
};
const HELD_PRODUCTS: Statement = Statement {
    sqlite: "SELECT p.id, p.title, p.url FROM products p WHERE p.id IN (
               SELECT op.product_id FROM grants g JOIN offer_products op ON op.offer_id = g.item_id
                WHERE g.contact_id = $1 AND g.kind = 'offer' AND g.active
               UNION
               SELECT g.item_id FROM grants g WHERE g.contact_id = $1 AND g.kind = 'product' AND g.active)
             ORDER BY COALESCE(p.title, p.id), p.id",
    postgres: "SELECT p.id, p.title, p.url FROM products p WHERE p.id IN (
                 SELECT op.product_id FROM grants g JOIN offer_products op ON op.offer_id = g.item_id
                  WHERE g.contact_id = $1 AND g.kind = 'offer' AND g.active
                 UNION
                 SELECT g.item_id FROM grants g WHERE g.contact_id = $1 AND g.kind = 'product' AND g.active)
               ORDER BY COALESCE(p.title, p.id) COLLATE \"C\", p.id COLLATE \"C\"",
};
const RESENDS: Statement = Statement::portable(
    "SELECT COALESCE(SUM(CASE WHEN at_ms >= $1 THEN 1 ELSE 0 END), 0) AS short, COUNT(*) AS day
     FROM link_audit WHERE contact_id = $2 AND action = 'resend' AND at_ms >= $3",
);
const LINK_AUDIT: Statement = Statement {
    sqlite: "SELECT at_ms, kind, contact_id, action, reason FROM link_audit
             WHERE ($1 IS NULL OR contact_id = $1) ORDER BY id DESC LIMIT $2",
    postgres: "SELECT at_ms, kind, contact_id, action, reason FROM link_audit
               WHERE ($1::text IS NULL OR contact_id = $1) ORDER BY id DESC LIMIT $2",
};
const CLASSIFY: Statement = Statement::portable(
    "SELECT l.kind, l.contact_id, l.revoked_ms, l.expires_ms, l.uses, l.max_uses,
            EXISTS (SELECT 1 FROM grants g WHERE g.contact_id = l.contact_id AND g.kind = 'offer' AND g.active)
              AS entitled
     FROM magic_links l WHERE l.token_hash = $1",
);

pub(crate) async fn has_active_offer(backend: &Backend, contact_id: ContactId) -> Result<bool> {
    backend
        .reader()
        .fetch_scalar(HAS_ACTIVE_OFFER, &[text(&contact_id)])
        .await
}

pub(crate) async fn mint_link(backend: &Backend, link: NewLink, now: Timestamp) -> Result<()> {
    backend
        .write("mint a link", (link, now), |mut tx, (link, now)| {
            Box::pin(async move {
                if let Some(message_id) = &link.message_id {
                    let params = [Param::from(*now), text(message_id)];
                    tx.at().execute(REVOKE_MESSAGE_LINK, &params).await?;
                }
                insert_link(&mut tx, link, *now).await
            })
        })
        .await
}

pub(crate) async fn mint_message_links(
    backend: &Backend,
    links: Vec<NewLink>,
    now: Timestamp,
) -> Result<Vec<bool>> {
    if links.is_empty() {
        return Ok(Vec::new());
    }
    backend
        .write("mint message links", (links, now), |tx, (links, now)| {
            Box::pin(mint_message_links_on(tx, links, *now))
        })
        .await
}

/// Stores the links of messages being sent whose contact holds an active offer grant, with
/// their audit; returns, per link, whether it was.
async fn mint_message_links_on(
    mut tx: Tx<'_>,
    links: &[NewLink],
    now: Timestamp,
) -> Result<Vec<bool>> {
    let contacts: Vec<&ContactId> = links.iter().filter_map(|l| l.contact_id.as_ref()).collect();
    let entitled: HashSet<ContactId> = tx
        .at()
        .fetch_scalars(statement!(links::ENTITLED), &[text_list(&contacts)])
        .await?
        .into_iter()
        .collect();
    let (minted, kept) = crate::model::split_entitled(links, &entitled);
    if kept.is_empty() {
        return Ok(minted);
    }
    // A retried send re-mints: the earlier token of that message is revoked (kept, so a copy
    // that did arrive says "replaced" rather than "unknown").
    let messages: Vec<String> = kept
        .iter()
        .filter_map(|l| l.message_id.as_ref().map(MessageId::to_string))
        .collect();
    tx.at()
        .execute(
            statement!(links::REVOKE_MESSAGES_LINKS),
            &[Param::from(now), text_list(&messages)],
        )
        .await?;
    let kept = kept.iter().copied();
    let columns = [
        Column::texts(kept.clone(), |l| Some(&l.token_hash)),
        Column::texts(kept.clone(), |l| Some(l.kind.as_str())),
        Column::texts(kept.clone(), |l| l.contact_id.as_deref()),
        Column::texts(kept.clone(), |l| l.message_id.as_ref()),
        Column::ints(kept.clone(), |l| l.max_uses),
        Column::times(kept.clone(), |l| l.expires),
    ];
    tx.at()
        .execute(
            statement!(links::INSERT_LINKS),
            &[Param::Rows(&columns), Param::from(now)],
        )
        .await?;
    let [_, kinds, contacts, ..] = columns;
    tx.at()
        .execute(
            statement!(links::AUDIT_MINTS),
            &[Param::Rows(&[kinds, contacts]), Param::from(now)],
        )
        .await?;
    Ok(minted)
}

pub(crate) async fn regenerate_link(
    backend: &Backend,
    link: NewLink,
    site_value: Option<(String, String)>,
    now: Timestamp,
) -> Result<()> {
    let args = (link, site_value, now);
    backend
        .write(
            "regenerate a link",
            args,
            |mut tx, (link, site_value, now)| {
                Box::pin(async move {
                    let params = [
                        Param::from(*now),
                        text(link.kind.as_str()),
                        Param::Text(link.contact_id.as_deref()),
                    ];
                    tx.at().execute(REVOKE_LINKS, &params).await?;
                    tx.at().execute(END_SESSIONS, &params).await?;
                    insert_link(&mut tx, link, *now).await?;
                    if let Some((name, value)) = site_value {
                        tx.at()
                            .execute(SET_SITE_VALUE, &[text(name), text(value)])
                            .await?;
                    }
                    Ok(())
                })
            },
        )
        .await
}

pub(crate) async fn check_link(
    backend: &Backend,
    token_hash: String,
    now: Timestamp,
) -> Result<Checked> {
    let row = backend
        .reader()
        .fetch_optional(CLASSIFY, &[text(&token_hash)])
        .await?;
    Ok(classify(row, now))
}

pub(crate) async fn redeem_link(
    backend: &Backend,
    token_hash: String,
    now: Timestamp,
    session: NewSession,
    login_source: String,
) -> Result<Checked> {
    let args = (token_hash, now, session, login_source);
    backend
        .write(
            "redeem a link",
            args,
            |mut tx, (token_hash, now, session, login_source)| {
                Box::pin(
                    async move { redeem(&mut tx, token_hash, *now, session, login_source).await },
                )
            },
        )
        .await
}

async fn redeem(
    tx: &mut Tx<'_>,
    token_hash: &str,
    now: Timestamp,
    session: &NewSession,
    login_source: &str,
) -> Result<Checked> {
    let redeemed: Option<HolderRow> = tx
        .at()
        .fetch_optional(REDEEM, &[text(token_hash), Param::from(now)])
        .await?;
    let Some(HolderRow { kind, contact_id }) = redeemed else {
        let row = tx
            .at()
            .fetch_optional(CLASSIFY, &[text(token_hash)])
            .await?;
        let (reason, contact) = match classify(row, now) {
            Err((r, c)) => (r, c),
            // Refused a moment ago but valid now: a race with a concurrent change; refuse as
            // unknown.
            Ok(_) => (LinkRefusal::Unknown, None),
        };
        let kind: Option<String> = tx
            .at()
            .fetch_optional_scalar(LINK_KIND, &[text(token_hash)])
            .await?;
        let entry = Audit {
            kind: kind.as_deref().unwrap_or("unknown"),
            contact_id: contact.as_deref(),
            action: "refuse",
            reason: Some(reason.as_str()),
        };
        entry.record(tx, now).await?;
        return Ok(Err((reason, contact)));
    };
    let params = [
        text(&session.id_hash),
        text(kind.as_str()),
        Param::Text(contact_id.as_deref()),
        Param::from(now),
        Param::from(session.expires),
    ];
    tx.at().execute(START_SESSION, &params).await?;
    let entry = Audit {
        kind: kind.as_str(),
        contact_id: contact_id.as_deref(),
        action: "redeem",
        reason: None,
    };
    entry.record(tx, now).await?;
    if let (LinkKind::Learner, Some(contact)) = (kind, &contact_id) {
        // The login enters the event stream in the same transaction as the redemption.
        let event = crate::login_event(login_source, contact, now);
        tx.insert_events(&[&event]).await?;
    }
    Ok(Ok(LinkHolder { kind, contact_id }))
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct HolderRow {
    #[sqlx(try_from = "String")]
    kind: LinkKind,
    contact_id: Option<ContactId>,
}

pub(crate) async fn session(
    backend: &Backend,
    id_hash: String,
    now: Timestamp,
) -> Result<Option<LinkHolder>> {
    let row: Option<HolderRow> = backend
        .reader()
        .fetch_optional(SESSION, &[text(&id_hash), Param::from(now)])
        .await?;
    Ok(row.map(|r| LinkHolder {
        kind: r.kind,
        contact_id: r.contact_id,
    }))
}

pub(crate) async fn end_session(backend: &Backend, id_hash: String, now: Timestamp) -> Result<()> {
    backend
        .write("end a session", (id_hash, now), |tx, (id_hash, now)| {
            Box::pin(async move {
                let params = [Param::from(*now), text(id_hash)];
                tx.execute(END_SESSION, &params).await?;
                Ok(())
            })
        })
        .await
}

pub(crate) async fn portal_products(
    backend: &Backend,
    contact_id: Option<ContactId>,
) -> Result<Vec<ProductRow>> {
    match &contact_id {
        None => backend.reader().fetch_all(CATALOGUE, &[]).await,
        Some(contact) => {
            backend
                .reader()
                .fetch_all(HELD_PRODUCTS, &[text(contact)])
                .await
        }
    }
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct Resends {
    short: i64,
    day: i64,
}

pub(crate) async fn allow_link_resend(
    backend: &Backend,
    contact_id: ContactId,
    now: Timestamp,
    short_since: Timestamp,
    max_short: i64,
    day_since: Timestamp,
    max_day: i64,
) -> Result<bool> {
    let args = (
        contact_id,
        now,
        (short_since, max_short, day_since, max_day),
    );
    backend
        .write(
            "count a resend",
            args,
            |mut tx, (contact_id, now, limits)| {
                Box::pin(async move {
                    let (short_since, max_short, day_since, max_day) = *limits;
                    tx.lock_resends(contact_id).await?;
                    let params = [
                        Param::from(short_since),
                        text(contact_id),
                        Param::from(day_since),
                    ];
                    let sent: Resends = tx.at().fetch_one(RESENDS, &params).await?;
                    let allowed = sent.short < max_short && sent.day < max_day;
                    let entry = Audit {
                        kind: LinkKind::Learner.as_str(),
                        contact_id: Some(contact_id),
                        action: if allowed { "resend" } else { "resend_refused" },
                        reason: (!allowed).then_some("rate_limited"),
                    };
                    entry.record(&mut tx, *now).await?;
                    Ok(allowed)
                })
            },
        )
        .await
}

pub(crate) async fn site_value(backend: &Backend, name: String, default: String) -> Result<String> {
    backend
        .write(
            "read a site value",
            (name, default),
            |mut tx, (name, default)| {
                Box::pin(async move {
                    tx.at()
                        .execute(DEFAULT_SITE_VALUE, &[text(name), text(default)])
                        .await?;
                    tx.fetch_scalar(SITE_VALUE, &[text(name)]).await
                })
            },
        )
        .await
}

pub(crate) async fn set_site_value(backend: &Backend, name: String, value: String) -> Result<()> {
    backend
        .write("set a site value", (name, value), |tx, (name, value)| {
            Box::pin(async move {
                tx.execute(SET_SITE_VALUE, &[text(name), text(value)])
                    .await?;
                Ok(())
            })
        })
        .await
}

pub(crate) async fn link_audit(
    backend: &Backend,
    contact_id: Option<ContactId>,
    limit: i64,
) -> Result<Vec<LinkAuditRow>> {
    let params = [Param::Text(contact_id.as_deref()), limit_param(limit)];
    backend.reader().fetch_all(LINK_AUDIT, &params).await
}

async fn insert_link(tx: &mut Tx<'_>, link: &NewLink, now: Timestamp) -> Result<()> {
    let params = [
        text(&link.token_hash),
        text(link.kind.as_str()),
        Param::Text(link.contact_id.as_deref()),
        Param::Text(link.message_id.as_ref().map(MessageId::as_str)),
        Param::OptInt(link.max_uses),
        Param::from(link.expires),
        Param::from(now),
    ];
    tx.at().execute(INSERT_LINK, &params).await?;
    let entry = Audit {
        kind: link.kind.as_str(),
        contact_id: link.contact_id.as_deref(),
        action: "mint",
        reason: None,
    };
    entry.record(tx, now).await
}

/// One line of the link audit trail.
struct Audit<'a> {
    kind: &'a str,
    contact_id: Option<&'a str>,
    action: &'a str,
    reason: Option<&'a str>,
}

impl Audit<'_> {
    async fn record(&self, tx: &mut Tx<'_>, now: Timestamp) -> Result<()> {
        let params = [
            Param::from(now),
            text(self.kind),
            Param::Text(self.contact_id),
            text(self.action),
            Param::Text(self.reason),
        ];
        tx.at().execute(AUDIT, &params).await?;
        Ok(())
    }
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct LinkState {
    #[sqlx(try_from = "String")]
    kind: LinkKind,
    contact_id: Option<ContactId>,
    revoked_ms: Option<Timestamp>,
    expires_ms: Option<Timestamp>,
    uses: i64,
    max_uses: Option<i64>,
    entitled: bool,
}

/// Why a link would or would not open the portal now, in the order a learner should hear it.
fn classify(link: Option<LinkState>, now: Timestamp) -> Checked {
    let Some(link) = link else {
        return Err((LinkRefusal::Unknown, None));
    };
    // No access at all is the reason that matters most (a learner whose last offer was
    // removed, whose links were revoked with it, is told that, not that a link was replaced).
    let refusal = if link.kind == LinkKind::Learner && !link.entitled {
        Some(LinkRefusal::NotEntitled)
    } else if link.revoked_ms.is_some() {
        Some(LinkRefusal::Revoked)
    } else if link.expires_ms.is_some_and(|e| e <= now) {
        Some(LinkRefusal::Expired)
    } else if link.max_uses.is_some_and(|m| link.uses >= m) {
        Some(LinkRefusal::UsedUp)
    } else {
        None
    };
    match refusal {
        Some(r) => Err((r, link.contact_id)),
        None => Ok(LinkHolder {
            kind: link.kind,
            contact_id: link.contact_id,
        }),
    }
}
