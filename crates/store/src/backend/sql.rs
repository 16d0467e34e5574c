//! What the backends share to run one read: a connection of either kind, a statement carrying
//! its text for each, typed parameters, and fetches that decode rows by column name (each type's
//! `sqlx::FromRow`). The reads themselves are written once, in [`super::read`], over this.

use crate::Result;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Arguments, Decode, FromRow, PgPool, Postgres, Sqlite, SqlitePool, Type};

/// Where a read runs: SQLite's reader pool or the PostgreSQL pool.
#[derive(Clone, Copy)]
pub(crate) enum Conn<'a> {
    Sqlite(&'a SqlitePool),
    Postgres(&'a PgPool),
}

/// One query in the dialect of each backend; the two take the same parameters in the same order.
#[derive(Clone, Copy)]
pub(crate) struct Statement {
    pub sqlite: &'static str,
    pub postgres: &'static str,
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
    Int(i64),
    Text(Option<&'a str>),
    /// A list of ids: a JSON array for SQLite's `json_each`, an array for PostgreSQL's `ANY`.
    Texts(&'a [String]),
}

/// A row type both backends can decode.
pub(crate) trait Decoded:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}
impl<T> Decoded for T where
    T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}

/// A single column's type both backends can decode.
pub(crate) trait Scalar:
    for<'r> Decode<'r, Sqlite>
    + Type<Sqlite>
    + for<'r> Decode<'r, Postgres>
    + Type<Postgres>
    + Send
    + Unpin
{
}
impl<T> Scalar for T where
    T: for<'r> Decode<'r, Sqlite>
        + Type<Sqlite>
        + for<'r> Decode<'r, Postgres>
        + Type<Postgres>
        + Send
        + Unpin
{
}

fn sqlite_args(params: &[Param<'_>]) -> Result<SqliteArguments> {
    let mut args = SqliteArguments::default();
    for p in params {
        match p {
            Param::Int(n) => args.add(*n),
            Param::Text(s) => args.add(*s),
            Param::Texts(items) => {
                args.add(super::sqlite::json_list(items.iter().map(String::as_str)))
            }
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(args)
}

fn pg_args(params: &[Param<'_>]) -> Result<PgArguments> {
    let mut args = PgArguments::default();
    for p in params {
        match p {
            Param::Int(n) => args.add(*n),
            Param::Text(s) => args.add(*s),
            Param::Texts(items) => args.add(*items),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(args)
}

impl Conn<'_> {
    pub(crate) async fn fetch_all<T: Decoded>(
        self,
        st: Statement,
        params: &[Param<'_>],
    ) -> Result<Vec<T>> {
        Ok(match self {
            Self::Sqlite(pool) => {
                sqlx::query_as_with(st.sqlite, sqlite_args(params)?)
                    .fetch_all(pool)
                    .await?
            }
            Self::Postgres(pool) => {
                sqlx::query_as_with(st.postgres, pg_args(params)?)
                    .fetch_all(pool)
                    .await?
            }
        })
    }

    pub(crate) async fn fetch_optional<T: Decoded>(
        self,
        st: Statement,
        params: &[Param<'_>],
    ) -> Result<Option<T>> {
        Ok(match self {
            Self::Sqlite(pool) => {
                sqlx::query_as_with(st.sqlite, sqlite_args(params)?)
                    .fetch_optional(pool)
                    .await?
            }
            Self::Postgres(pool) => {
                sqlx::query_as_with(st.postgres, pg_args(params)?)
                    .fetch_optional(pool)
                    .await?
            }
        })
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

    /// The first column of the one row the statement returns.
    pub(crate) async fn fetch_scalar<T: Scalar>(
        self,
        st: Statement,
        params: &[Param<'_>],
    ) -> Result<T> {
        Ok(match self {
            Self::Sqlite(pool) => {
                sqlx::query_scalar_with(st.sqlite, sqlite_args(params)?)
                    .fetch_one(pool)
                    .await?
            }
            Self::Postgres(pool) => {
                sqlx::query_scalar_with(st.postgres, pg_args(params)?)
                    .fetch_one(pool)
                    .await?
            }
        })
    }
}
