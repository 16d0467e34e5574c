//! What the backends share to run a statement: a connection of either kind, a statement carrying
//! its text for each, typed parameters, and fetches that decode rows by column name (each type's
//! `sqlx::FromRow`, and on SQLite's writer connection its `FromSqliteRow`, derived from the same
//! attributes). The domain operations are written once over this.

use super::sqlite::{FromSqliteRow, WriterConnection};
use crate::{Result, Timestamp};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{
    Arguments, Decode, Executor, FromRow, PgConnection, PgPool, Postgres, Sqlite, SqlitePool, Type,
};
use std::collections::HashMap;
use std::future::{Future, ready};
use std::hash::Hash;

/// A database handle of either backend: a pool ([`Conn`], where reads run) or a connection inside
/// a write transaction ([`Tx`]). The fetches below are written once for every pair.
pub(crate) enum On<S, P> {
    Sqlite(S),
    Postgres(P),
}

/// Where a read runs: SQLite's reader pool or the PostgreSQL pool.
pub(crate) type Conn<'a> = On<&'a SqlitePool, &'a PgPool>;

/// A write transaction's connection: SQLite's writer connection (inside its group's
/// transaction) or a PostgreSQL transaction. Each statement borrows it through [`Tx::at`].
pub(crate) type Tx<'a> = On<&'a mut WriterConnection, &'a mut PgConnection>;

impl Clone for Conn<'_> {
    fn clone(&self) -> Self {
        *self
    }
}
impl Copy for Conn<'_> {}

impl Tx<'_> {
    /// The transaction again, for one statement.
    pub(crate) fn at(&mut self) -> Tx<'_> {
        match self {
            Self::Sqlite(c) => On::Sqlite(&mut **c),
            Self::Postgres(c) => On::Postgres(&mut **c),
        }
    }

    /// Serialises count-then-record of one contact's link resends across processes (PostgreSQL's
    /// advisory lock; SQLite's one writer already does).
    pub(crate) async fn lock_resends(&mut self, contact_id: &str) -> Result<()> {
        if let Self::Postgres(conn) = self {
            sqlx::query(
                "SELECT pg_advisory_xact_lock(hashtextextended('herald.resend:' || $1, 0))",
            )
            .bind(contact_id)
            .execute(&mut **conn)
            .await?;
        }
        Ok(())
    }

    /// Stores events inside this transaction, as the intake does (each backend's event insert:
    /// one statement per batch).
    pub(crate) async fn insert_events(
        &mut self,
        events: &[&crate::NewEvent],
    ) -> Result<Vec<crate::Accepted>> {
        match self {
            Self::Sqlite(conn) => super::sqlite::events::insert_event_rows(conn, events),
            Self::Postgres(conn) => {
                super::postgres::events::insert_event_rows(&mut **conn, events).await
            }
        }
    }

    /// Which rows of a batch an insert stored (a conflict stores none), given each row's key:
    /// on PostgreSQL the statement returns the keys of the rows it stored; on SQLite's writer it
    /// runs once per row without `RETURNING` (which would open and truncate a statement journal
    /// for every row) and a row was stored when its run changed one. Of several rows with one
    /// key, SQLite marks the one stored (the first, a later one conflicting with it) and
    /// PostgreSQL the first occurrence of each key it returns.
    pub(crate) async fn inserted(
        &mut self,
        st: Statement,
        params: &[Param<'_>],
        keys: &[&str],
    ) -> Result<Vec<bool>> {
        match self {
            Self::Sqlite(conn) => conn.changed_rows(st.sqlite, params),
            Self::Postgres(conn) => {
                let stored: Vec<String> = sqlx::query_scalar_with(st.postgres, pg_args(params)?)
                    .fetch_all(&mut **conn)
                    .await?;
                Ok(super::stored_in_order(
                    keys.iter().copied(),
                    stored.iter().map(String::as_str).collect(),
                ))
            }
        }
    }

    /// Splits keyed writes into the batches one upsert statement can take, in order, each
    /// applying its writes in order: SQLite's writer runs a statement once per row, one after
    /// the other, so the whole batch is one; PostgreSQL refuses to touch a row twice in one statement, so
    /// batch `k` holds the `k`-th write of every key.
    pub(crate) fn rounds<K: Eq + Hash, T>(
        &self,
        items: impl IntoIterator<Item = (K, T)>,
    ) -> Vec<Vec<T>> {
        match self {
            Self::Sqlite(_) => {
                let all: Vec<T> = items.into_iter().map(|(_, item)| item).collect();
                if all.is_empty() {
                    Vec::new()
                } else {
                    vec![all]
                }
            }
            Self::Postgres(_) => {
                let mut seen: HashMap<K, usize> = HashMap::new();
                let mut out: Vec<Vec<T>> = Vec::new();
                for (key, item) in items {
                    let round = seen.entry(key).or_insert(0);
                    if *round == out.len() {
                        out.push(Vec::new());
                    }
                    out[*round].push(item);
                    *round += 1;
                }
                out
            }
        }
    }

    /// Serialises this transaction with every process's dispatch pass: on PostgreSQL by the
    /// dispatchers' transaction-scoped advisory lock; on SQLite the one writer already does.
    pub(crate) async fn lock_dispatch(&mut self) -> Result<()> {
        if let Self::Postgres(conn) = self {
            sqlx::query(super::postgres::LOCK_DISPATCH)
                .execute(&mut **conn)
                .await?;
        }
        Ok(())
    }
}

/// One query in the dialect of each backend; the two take the same parameters in the same order.
#[derive(Clone, Copy)]
pub(crate) struct Statement {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

impl Statement {
    /// A query both backends read alike: `$n` parameters, bound by number on SQLite (by sqlx and
    /// by the writer's connection) as on PostgreSQL.
    pub(crate) const fn portable(sql: &'static str) -> Self {
        Self {
            sqlite: sql,
            postgres: sql,
        }
    }
}

/// The [`Statement`] of the constant of this name in both backends' SQL modules.
macro_rules! statement {
    ($module:ident :: $name:ident) => {
        $crate::backend::sql::Statement {
            sqlite: $crate::backend::sqlite::$module::$name,
            postgres: $crate::backend::postgres::$module::$name,
        }
    };
}
pub(crate) use statement;

/// A bound value.
pub(crate) enum Param<'a> {
    Bool(bool),
    Int(i64),
    OptInt(Option<i64>),
    Text(Option<&'a str>),
    /// A list of ids: a JSON array for SQLite's `json_each`, an array for PostgreSQL's `ANY`
    /// (made by [`text_list`]).
    Texts(Vec<&'a str>),
    /// A list of numbers, bound as [`Param::Texts`] is.
    Ints(&'a [i64]),
    /// Rows, given column by column, so that a batch is one statement: on PostgreSQL one array
    /// per column (read with `UNNEST`); on SQLite's writer connection one value per column, the
    /// statement being run once per row, in order (prepared once, on the writer's own thread,
    /// so a run costs a bind and a step). Either way it stands for one parameter per column in
    /// the statement's `$n` numbering.
    Rows(&'a [Column<'a>]),
}

impl From<Timestamp> for Param<'_> {
    fn from(at: Timestamp) -> Self {
        Self::Int(at.millis())
    }
}

impl From<Option<Timestamp>> for Param<'_> {
    fn from(at: Option<Timestamp>) -> Self {
        Self::OptInt(at.map(Timestamp::millis))
    }
}

/// One column of [`Param::Rows`].
pub(crate) enum Column<'a> {
    Texts(Vec<Option<&'a str>>),
    Ints(Vec<Option<i64>>),
    Bools(Vec<bool>),
}

impl<'a> Column<'a> {
    /// The text column of `items` that `f` reads.
    pub(crate) fn texts<T: 'a, S: AsRef<str> + ?Sized + 'a>(
        items: impl IntoIterator<Item = &'a T>,
        f: impl Fn(&'a T) -> Option<&'a S>,
    ) -> Self {
        Self::Texts(items.into_iter().map(|i| f(i).map(AsRef::as_ref)).collect())
    }

    /// The number column of `items` that `f` reads.
    pub(crate) fn ints<T: 'a>(
        items: impl IntoIterator<Item = &'a T>,
        f: impl Fn(&'a T) -> Option<i64>,
    ) -> Self {
        Self::Ints(items.into_iter().map(f).collect())
    }

    /// The time column of `items` that `f` reads.
    pub(crate) fn times<T: 'a>(
        items: impl IntoIterator<Item = &'a T>,
        f: impl Fn(&'a T) -> Option<Timestamp>,
    ) -> Self {
        Self::Ints(
            items
                .into_iter()
                .map(|i| f(i).map(Timestamp::millis))
                .collect(),
        )
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Texts(v) => v.len(),
            Self::Ints(v) => v.len(),
            Self::Bools(v) => v.len(),
        }
    }
}

/// A `LIMIT` the same on both: a negative limit means no limit (SQLite's reading; PostgreSQL
/// refuses a negative one).
pub(crate) fn limit_param(limit: i64) -> Param<'static> {
    Param::Int(if limit < 0 { i64::MAX } else { limit })
}

/// A list of texts or ids, bound as one parameter.
pub(crate) fn text_list<S: AsRef<str>>(items: &[S]) -> Param<'_> {
    Param::Texts(items.iter().map(AsRef::as_ref).collect())
}

/// A text parameter that is never NULL.
pub(crate) fn text(s: &str) -> Param<'_> {
    Param::Text(Some(s))
}

/// A row type both backends can decode.
pub(crate) trait Decoded:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + FromSqliteRow + Send + Unpin
{
}
impl<T> Decoded for T where
    T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + FromSqliteRow + Send + Unpin
{
}

/// A single column's type both backends can decode.
pub(crate) trait Scalar:
    for<'r> Decode<'r, Sqlite>
    + Type<Sqlite>
    + for<'r> Decode<'r, Postgres>
    + Type<Postgres>
    + rusqlite::types::FromSql
    + Send
    + Unpin
{
}
impl<T> Scalar for T where
    T: for<'r> Decode<'r, Sqlite>
        + Type<Sqlite>
        + for<'r> Decode<'r, Postgres>
        + Type<Postgres>
        + rusqlite::types::FromSql
        + Send
        + Unpin
{
}

fn sqlite_args(params: &[Param<'_>]) -> Result<SqliteArguments> {
    // Batches are written, and only the writer's connection writes; herald's own mistake, not a
    // rejection of the rows (a protocol error is not one).
    if params.iter().any(|p| matches!(p, Param::Rows(_))) {
        return Err(sqlx::Error::Protocol(
            "a batch of rows is bound on SQLite's writer connection only".into(),
        )
        .into());
    }
    let mut args = SqliteArguments::default();
    for p in params {
        match p {
            Param::Bool(b) => args.add(*b),
            Param::Int(n) => args.add(*n),
            Param::OptInt(n) => args.add(*n),
            Param::Text(s) => args.add(*s),
            Param::Texts(items) => args.add(super::sqlite::json_list(items.iter().copied())),
            Param::Ints(items) => args.add(serde_json::Value::from(*items).to_string()),
            Param::Rows(_) => unreachable!("refused above"),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(args)
}

fn pg_args(params: &[Param<'_>]) -> Result<PgArguments> {
    let mut args = PgArguments::default();
    for p in params {
        match p {
            Param::Bool(b) => args.add(*b),
            Param::Int(n) => args.add(*n),
            Param::OptInt(n) => args.add(*n),
            Param::Text(s) => args.add(*s),
            Param::Texts(items) => args.add(items),
            Param::Ints(items) => args.add(*items),
            Param::Rows(columns) => {
                for column in *columns {
                    match column {
                        Column::Texts(v) => args.add(v),
                        Column::Ints(v) => args.add(v),
                        Column::Bools(v) => args.add(v),
                    }
                    .map_err(sqlx::Error::Encode)?;
                }
                Ok(())
            }
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(args)
}

/// SQLite's half of a handle: the reader pool (sqlx) or the writer's connection (rusqlite, whose
/// statements run at once on the writer's thread: their futures are ready when made).
pub(crate) trait SqliteSide {
    fn execute(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<u64>> + Send;
    fn fetch_all<T: Decoded>(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Vec<T>>> + Send;
    fn fetch_optional<T: Decoded>(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Option<T>>> + Send;
    fn fetch_scalars<T: Scalar>(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Vec<T>>> + Send;
    fn fetch_optional_scalar<T: Scalar>(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Option<T>>> + Send;
}

impl SqliteSide for &SqlitePool {
    fn execute(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<u64>> + Send {
        let args = sqlite_args(params);
        async move {
            Ok(sqlx::query_with(sql, args?)
                .execute(self)
                .await?
                .rows_affected())
        }
    }

    fn fetch_all<T: Decoded>(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Vec<T>>> + Send {
        let args = sqlite_args(params);
        async move { Ok(sqlx::query_as_with(sql, args?).fetch_all(self).await?) }
    }

    fn fetch_optional<T: Decoded>(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Option<T>>> + Send {
        let args = sqlite_args(params);
        async move { Ok(sqlx::query_as_with(sql, args?).fetch_optional(self).await?) }
    }

    fn fetch_scalars<T: Scalar>(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Vec<T>>> + Send {
        let args = sqlite_args(params);
        async move { Ok(sqlx::query_scalar_with(sql, args?).fetch_all(self).await?) }
    }

    fn fetch_optional_scalar<T: Scalar>(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Option<T>>> + Send {
        let args = sqlite_args(params);
        async move {
            Ok(sqlx::query_scalar_with(sql, args?)
                .fetch_optional(self)
                .await?)
        }
    }
}

impl SqliteSide for &mut WriterConnection {
    fn execute(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<u64>> + Send {
        ready(WriterConnection::execute(self, sql, params))
    }

    fn fetch_all<T: Decoded>(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Vec<T>>> + Send {
        ready(WriterConnection::fetch_all(self, sql, params))
    }

    fn fetch_optional<T: Decoded>(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Option<T>>> + Send {
        ready(WriterConnection::fetch_optional(self, sql, params))
    }

    fn fetch_scalars<T: Scalar>(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Vec<T>>> + Send {
        ready(WriterConnection::fetch_scalars(self, sql, params))
    }

    fn fetch_optional_scalar<T: Scalar>(
        self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Option<T>>> + Send {
        ready(WriterConnection::fetch_optional_scalar(self, sql, params))
    }
}

/// Runs `$statement` with `$params` on either backend: `$method` of [`SqliteSide`] on SQLite,
/// `$query` (`query_as_with`, `query_scalar_with`) then `$fetch` on PostgreSQL.
macro_rules! on_either {
    ($on:expr, $method:ident, $query:ident, $fetch:ident, $statement:expr, $params:expr) => {
        match $on {
            On::Sqlite(e) => e.$method($statement.sqlite, $params).await?,
            On::Postgres(e) => {
                sqlx::$query($statement.postgres, pg_args($params)?)
                    .$fetch(e)
                    .await?
            }
        }
    };
}

impl<'e, S, P> On<S, P>
where
    S: SqliteSide,
    P: Executor<'e, Database = Postgres>,
{
    /// Runs a statement that returns no rows; how many rows it changed.
    pub(crate) async fn execute(self, st: Statement, params: &[Param<'_>]) -> Result<u64> {
        Ok(match self {
            On::Sqlite(e) => e.execute(st.sqlite, params).await?,
            On::Postgres(e) => sqlx::query_with(st.postgres, pg_args(params)?)
                .execute(e)
                .await?
                .rows_affected(),
        })
    }

    pub(crate) async fn fetch_all<T: Decoded>(
        self,
        st: Statement,
        params: &[Param<'_>],
    ) -> Result<Vec<T>> {
        Ok(on_either!(
            self,
            fetch_all,
            query_as_with,
            fetch_all,
            st,
            params
        ))
    }

    pub(crate) async fn fetch_optional<T: Decoded>(
        self,
        st: Statement,
        params: &[Param<'_>],
    ) -> Result<Option<T>> {
        Ok(on_either!(
            self,
            fetch_optional,
            query_as_with,
            fetch_optional,
            st,
            params
        ))
    }

    /// The one row the statement returns.
    pub(crate) async fn fetch_one<T: Decoded>(
        self,
        st: Statement,
        params: &[Param<'_>],
    ) -> Result<T> {
        Ok(self
            .fetch_optional(st, params)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?)
    }

    /// The first column of every row.
    pub(crate) async fn fetch_scalars<T: Scalar>(
        self,
        st: Statement,
        params: &[Param<'_>],
    ) -> Result<Vec<T>> {
        Ok(on_either!(
            self,
            fetch_scalars,
            query_scalar_with,
            fetch_all,
            st,
            params
        ))
    }

    /// The first column of the row the statement returns, if any.
    pub(crate) async fn fetch_optional_scalar<T: Scalar>(
        self,
        st: Statement,
        params: &[Param<'_>],
    ) -> Result<Option<T>> {
        Ok(on_either!(
            self,
            fetch_optional_scalar,
            query_scalar_with,
            fetch_optional,
            st,
            params
        ))
    }

    /// The first column of the one row the statement returns.
    pub(crate) async fn fetch_scalar<T: Scalar>(
        self,
        st: Statement,
        params: &[Param<'_>],
    ) -> Result<T> {
        Ok(self
            .fetch_optional_scalar(st, params)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?)
    }
}
