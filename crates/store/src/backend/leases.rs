//! Leases, written once for both backends: claiming due rows under a fresh lease, and keeping,
//! of the results handed back, those whose lease still holds.

use super::Backend;
use super::sql::{Conn, Decoded, Param, Statement, Tx, limit_param, text, text_list};
use crate::backend::sqlite::FromSqliteRow;
use crate::{LeaseToken, Result, Timestamp};
use std::collections::HashMap;
use std::time::Duration;

/// Leases up to `limit` rows due at `now` for `lease` to a fresh token and reads them;
/// returns the token with the rows.
/// `claim` takes (lease until, token, now, limit). On PostgreSQL it locks, leases and reads in one
/// statement, committed without waiting for the WAL flush (a lease a server crash loses is one
/// that lapses; see `PgStore::relaxed`); SQLite's `RETURNING` cannot join, so there it returns
/// the ids and `sqlite_read` (given them as a JSON array) reads the rows, in the same
/// transaction.
pub(crate) async fn claim<T: Decoded + 'static>(
    backend: &Backend,
    what: &'static str,
    claim: Statement,
    sqlite_read: &'static str,
    (now, limit, lease): (Timestamp, i64, Duration),
) -> Result<(LeaseToken, Vec<T>)> {
    let token = LeaseToken::fresh();
    let rows = match backend {
        Backend::Sqlite(b) => {
            let token = token.clone();
            b.writer
                .run(move |conn| {
                    Box::pin(async move {
                        let params = claim_params(&token, now, limit, lease);
                        let ids: Vec<String> =
                            Tx::Sqlite(&mut *conn).fetch_scalars(claim, &params).await?;
                        if ids.is_empty() {
                            return Ok(Vec::new());
                        }
                        conn.fetch_all(sqlite_read, &[text_list(&ids)])
                    })
                })
                .await?
        }
        Backend::Postgres(b) => {
            let params = claim_params(&token, now, limit, lease);
            super::postgres::retrying!(what, Conn::Postgres(&b.relaxed).fetch_all(claim, &params))?
        }
    };
    Ok((token, rows))
}

fn claim_params(token: &LeaseToken, now: Timestamp, limit: i64, lease: Duration) -> [Param<'_>; 4] {
    [
        Param::from(now + lease),
        text(token),
        Param::from(now),
        limit_param(limit),
    ]
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct LeaseRow {
    id: String,
    lease_token: Option<LeaseToken>,
}

/// Of `items`, in order, those whose row still holds the lease the item carries (`key`: row id
/// and lease token), read inside the writing transaction by `leases` (given the ids; on
/// PostgreSQL it locks the rows until the transaction ends). `lost` is told of each other one.
/// As if applied one by one: writing a result clears its row's lease, so a second result for
/// the same row is dropped like one under a lost lease.
pub(crate) async fn under_current_lease<'a, T>(
    tx: Tx<'_>,
    leases: Statement,
    items: &'a [T],
    key: impl Fn(&'a T) -> (&'a str, &'a LeaseToken),
    lost: impl Fn(&T),
) -> Result<Vec<&'a T>> {
    let ids: Vec<&str> = items.iter().map(|i| key(i).0).collect();
    let rows: Vec<LeaseRow> = tx.fetch_all(leases, &[text_list(&ids)]).await?;
    let mut held: HashMap<String, Option<LeaseToken>> =
        rows.into_iter().map(|r| (r.id, r.lease_token)).collect();
    let mut kept = Vec::with_capacity(items.len());
    for item in items {
        let (id, token) = key(item);
        match held.get_mut(id) {
            Some(lease) if lease.as_ref() == Some(token) => {
                *lease = None;
                kept.push(item);
            }
            _ => lost(item),
        }
    }
    Ok(kept)
}
