//! The writer's connection: rusqlite, driven on the writer's own thread. A statement runs there
//! and then, with no hand-off to another thread, and is prepared once and kept; a batch
//! ([`Param::Rows`]) runs its statement once per row, so its text never changes with its size.
//!
//! Statements are the same text sqlx runs on the readers: parameters are numbered `$n` (or
//! anonymous `?`) and bound by that number, as sqlx does on SQLite, except that a parameter
//! with no value is an error here rather than NULL. Rows are decoded by column name
//! (`#[derive(FromSqliteRow)]`, which reads the same `#[sqlx(...)]` attributes as
//! `sqlx::FromRow`).

use crate::backend::sql::{Column, Param};
use crate::{Result, StoreError};
use rusqlite::config::DbConfig;
use rusqlite::types::FromSql;
use rusqlite::{Connection, OpenFlags, Row};
use std::path::Path;
use std::time::Duration;

pub(crate) use herald_store_derive::FromSqliteRow;

/// Prepared statements kept: more than herald's writer ever runs, so none is prepared twice.
const STATEMENTS_KEPT: usize = 256;

/// A row type the writer's connection can decode.
pub(crate) trait FromSqliteRow: Sized {
    fn from_sqlite_row(row: &Row<'_>) -> rusqlite::Result<Self>;
}

/// Tuples read their columns in order, as sqlx's tuples do.
macro_rules! tuple_rows {
    ($($t:ident $i:tt),+) => {
        impl<$($t: FromSql),+> FromSqliteRow for ($($t,)+) {
            fn from_sqlite_row(row: &Row<'_>) -> rusqlite::Result<Self> {
                Ok(($(row.get::<_, $t>($i)?,)+))
            }
        }
    };
}
tuple_rows!(A 0);
tuple_rows!(A 0, B 1);
tuple_rows!(A 0, B 1, C 2);
tuple_rows!(A 0, B 1, C 2, D 3);

/// The column `column` read as `S` and converted to `T` (`#[sqlx(try_from = "S")]`).
pub(crate) fn converted<S, T>(row: &Row<'_>, column: &str) -> rusqlite::Result<T>
where
    S: FromSql,
    T: TryFrom<S>,
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let index = row.as_ref().column_index(column)?;
    let stored = row.get_ref(index)?.data_type();
    T::try_from(row.get::<_, S>(index)?)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, stored, Box::new(e)))
}

pub(crate) struct WriterConnection(Connection);

impl WriterConnection {
    /// Opens (creating it if missing) the database file for writing: WAL with
    /// `synchronous=FULL`, so a commit is on disk when it returns.
    pub(super) fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Database(sqlx::Error::Configuration(
                format!(
                    "{} could not be put in WAL mode (it stays {mode}); herald needs WAL to read \
                     beside its writer",
                    path.display()
                )
                .into(),
            )));
        }
        // The WAL is copied back into the database every 4,000 pages (16 MB) rather than
        // SQLite's 1,000: a page that many small commits rewrite is copied once per checkpoint,
        // and the checkpoint runs on this thread, inside a COMMIT.
        conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;
             PRAGMA cache_size = -32000; PRAGMA wal_autocheckpoint = 4000;",
        )?;
        // A kept statement is planned once. Without the planner's stability guarantee SQLite
        // plans again whenever a parameter it read while planning (a bound `LIMIT`) is bound
        // anew, which is every run of the claims and of dispatch's batch read.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        conn.set_prepared_statement_cache_capacity(STATEMENTS_KEPT);
        Ok(Self(conn))
    }

    /// Runs one statement that takes no parameters and returns no rows (`BEGIN`, `SAVEPOINT`,
    /// `COMMIT`, ...), kept prepared like the others: each unit runs a few.
    pub(crate) fn command(&mut self, sql: &str) -> Result<()> {
        logged(sql, || {
            self.0.prepare_cached(sql)?.raw_execute()?;
            Ok(())
        })
    }

    /// Runs a statement; how many rows it changed. Rows it returns are read and dropped.
    pub(crate) fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        logged(sql, || {
            Ok(self.each_row(sql, params, |_| Ok(true))?.iter().sum())
        })
    }

    /// Runs a statement once per row of its batch; whether each run changed a row.
    pub(crate) fn changed_rows(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<bool>> {
        logged(sql, || {
            Ok(self
                .each_row(sql, params, |_| Ok(true))?
                .into_iter()
                .map(|n| n > 0)
                .collect())
        })
    }

    /// Every row, decoded.
    pub(crate) fn fetch_all<T: FromSqliteRow>(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<T>> {
        self.decoded(sql, params, usize::MAX)
    }

    /// The first row, decoded, if there is one.
    pub(crate) fn fetch_optional<T: FromSqliteRow>(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<T>> {
        Ok(self.decoded(sql, params, 1)?.pop())
    }

    /// The first `most` rows, decoded (the statement is reset after them, as it is when kept).
    fn decoded<T: FromSqliteRow>(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        most: usize,
    ) -> Result<Vec<T>> {
        logged(sql, || {
            let mut decoded = Vec::new();
            self.each_row(sql, params, |row| {
                decoded.push(T::from_sqlite_row(row)?);
                Ok(decoded.len() < most)
            })?;
            Ok(decoded)
        })
    }

    /// The first column of every row.
    pub(crate) fn fetch_scalars<T: FromSql>(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<T>> {
        Ok(self
            .fetch_all::<(T,)>(sql, params)?
            .into_iter()
            .map(|(t,)| t)
            .collect())
    }

    /// The first column of the first row, if there is one.
    pub(crate) fn fetch_optional_scalar<T: FromSql>(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<T>> {
        Ok(self.fetch_optional::<(T,)>(sql, params)?.map(|(t,)| t))
    }

    /// Runs the statement, prepared once and kept, once for each row of its [`Param::Rows`] (or
    /// once if it has none), handing each returned row to `row` until that says stop; how many
    /// rows each run changed. Every run of a batch is made: a run's write is done at its first
    /// step (`RETURNING` rows included), so once `row` has said stop each later run is stepped
    /// once and its rows are not read.
    fn each_row(
        &self,
        sql: &str,
        params: &[Param<'_>],
        mut row: impl FnMut(&Row<'_>) -> Result<bool>,
    ) -> Result<Vec<u64>> {
        let mut statement = self.0.prepare_cached(sql)?;
        let bound = Bindings::of(&statement, params)?;
        // What does not change from row to row is bound once (a binding outlives a reset).
        for (index, param) in &bound.fixed {
            bind(&mut statement, *index, param)?;
        }
        let mut changed = Vec::with_capacity(bound.rows);
        let mut more = true;
        for at in 0..bound.rows {
            for (index, column) in &bound.columns {
                column.bind(&mut statement, *index, at)?;
            }
            let mut rows = statement.raw_query();
            while let Some(r) = rows.next()? {
                if more {
                    more = row(r)?;
                }
                if !more {
                    break;
                }
            }
            changed.push(self.0.changes());
        }
        Ok(changed)
    }
}

/// What each of a statement's parameters is bound to. Parameters are numbered over the values
/// of `params`, one per [`Param`] except that [`Param::Rows`] stands for one per column (the
/// value of the row being run), as on PostgreSQL it stands for one array per column; `$n` and
/// `?n` name the n-th value, an anonymous `?` the next one. Two batches in one statement run in
/// step, row by row, and must be as long as each other.
struct Bindings<'p> {
    /// (parameter index, value) of the values that are the same for every row.
    fixed: Vec<(usize, &'p Param<'p>)>,
    /// (parameter index, column) of the batch's columns.
    columns: Vec<(usize, &'p Column<'p>)>,
    /// How many times the statement runs: the rows of its batch, or once.
    rows: usize,
}

impl<'p> Bindings<'p> {
    fn of(statement: &rusqlite::Statement<'_>, params: &'p [Param<'p>]) -> Result<Self> {
        enum Value<'p> {
            Fixed(&'p Param<'p>),
            Column(&'p Column<'p>),
        }
        let mut values = Vec::with_capacity(params.len());
        let mut rows = None;
        for param in params {
            match param {
                Param::Rows(columns) => {
                    for column in *columns {
                        // Ragged columns are herald's mistake, not the rows': not a rejection.
                        if let Some(n) = rows.filter(|n| *n != column.len()) {
                            return Err(
                                rusqlite::Error::InvalidParameterCount(column.len(), n).into()
                            );
                        }
                        rows = Some(column.len());
                        values.push(Value::Column(column));
                    }
                }
                fixed => values.push(Value::Fixed(fixed)),
            }
        }
        let mut bound = Self {
            fixed: Vec::new(),
            columns: Vec::new(),
            rows: rows.unwrap_or(1),
        };
        let mut anonymous = 0;
        for index in 1..=statement.parameter_count() {
            let number = match statement.parameter_name(index) {
                Some(name) => name
                    .strip_prefix(['$', '?'])
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| rusqlite::Error::InvalidParameterName(name.to_owned()))?,
                None => {
                    anonymous += 1;
                    anonymous
                }
            };
            match values.get(number.wrapping_sub(1)) {
                Some(Value::Fixed(param)) => bound.fixed.push((index, *param)),
                Some(Value::Column(column)) => bound.columns.push((index, *column)),
                None => {
                    return Err(rusqlite::Error::InvalidParameterCount(values.len(), number).into());
                }
            }
        }
        Ok(bound)
    }
}

impl Column<'_> {
    /// Binds row `row` of this column as the statement's parameter `index`.
    fn bind(
        &self,
        statement: &mut rusqlite::Statement<'_>,
        index: usize,
        row: usize,
    ) -> Result<()> {
        match self {
            Self::Texts(v) => statement.raw_bind_parameter(index, v[row]),
            Self::Ints(v) => statement.raw_bind_parameter(index, v[row]),
            Self::Bools(v) => statement.raw_bind_parameter(index, v[row]),
        }?;
        Ok(())
    }
}

/// Where the writer's statements are logged, with their execution time, at debug level
/// (`HERALD_LOG=warn,herald_store::sqlite_writer=debug`), as sqlx logs the readers' under
/// `sqlx::query`.
const STATEMENT_LOG: &str = "herald_store::sqlite_writer";

/// Runs a statement's `work`, logging it when its log is on (the clock is read only then).
fn logged<T>(sql: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
    if !tracing::enabled!(target: STATEMENT_LOG, tracing::Level::DEBUG) {
        return work();
    }
    let started = std::time::Instant::now();
    let outcome = work();
    tracing::debug!(
        target: STATEMENT_LOG,
        elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        ok = outcome.is_ok(),
        "{sql}"
    );
    outcome
}

fn bind(statement: &mut rusqlite::Statement<'_>, index: usize, param: &Param<'_>) -> Result<()> {
    match param {
        Param::Bool(b) => statement.raw_bind_parameter(index, b),
        Param::Int(n) => statement.raw_bind_parameter(index, n),
        Param::OptInt(n) => statement.raw_bind_parameter(index, n),
        Param::Text(s) => statement.raw_bind_parameter(index, s),
        Param::Texts(items) => {
            statement.raw_bind_parameter(index, super::json_list(items.iter().copied()))
        }
        Param::Ints(items) => {
            statement.raw_bind_parameter(index, serde_json::Value::from(*items).to_string())
        }
        Param::Rows(_) => unreachable!("a batch is bound column by column (`Bindings`)"),
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sql::{Column, text};

    #[derive(Debug, PartialEq, FromSqliteRow)]
    struct Inner {
        note: Option<String>,
    }

    #[derive(Debug, PartialEq, FromSqliteRow)]
    struct Decoded {
        #[sqlx(rename = "run")]
        id: crate::RunId,
        at_ms: crate::Timestamp,
        #[sqlx(try_from = "String")]
        state: herald_core::status::RunState,
        active: bool,
        #[sqlx(flatten)]
        inner: Inner,
        #[sqlx(skip)]
        unread: Vec<u8>,
    }

    fn open() -> (WriterConnection, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let conn = WriterConnection::open(&dir.path().join("c.db")).unwrap();
        (conn, dir)
    }

    #[test]
    fn rows_are_decoded_by_column_name_as_sqlx_attributes_say() {
        let (mut conn, _dir) = open();
        // Columns in another order than the fields, and one the type does not read.
        let row: Decoded = conn
            .fetch_optional(
                "SELECT 'x' AS extra, 1 AS active, 'waiting_event' AS state, NULL AS note, 'r1' AS run,
                        42 AS at_ms",
                &[],
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            row,
            Decoded {
                id: "r1".into(),
                at_ms: crate::Timestamp::from_millis(42),
                state: herald_core::status::RunState::WaitingEvent,
                active: true,
                inner: Inner { note: None },
                unread: Vec::new(),
            }
        );
    }

    #[test]
    fn a_value_the_type_refuses_is_a_rejection_naming_it() {
        let (mut conn, _dir) = open();
        let err = conn
            .fetch_all::<Decoded>(
                "SELECT 1 AS active, 'sleeping' AS state, NULL AS note, 'r1' AS run, 42 AS at_ms",
                &[],
            )
            .unwrap_err();
        assert!(err.is_rejection(), "{err}");
        assert!(err.to_string().contains("sleeping"), "{err}");
        let missing = conn
            .fetch_all::<Decoded>("SELECT 1 AS active", &[])
            .unwrap_err();
        assert!(missing.to_string().contains("run"), "{missing}");
    }

    #[derive(Debug, PartialEq, sqlx::FromRow, FromSqliteRow)]
    struct Both {
        id: crate::RunId,
        at_ms: crate::Timestamp,
        due_ms: Option<crate::Timestamp>,
        #[sqlx(try_from = "String")]
        state: herald_core::status::RunState,
        active: bool,
        attempts: i64,
        note: Option<String>,
        flag: bool,
    }

    #[tokio::test]
    async fn the_writer_decodes_a_row_as_the_readers_sqlx_decodes_it() {
        use sqlx::ConnectOptions;
        let (mut conn, dir) = open();
        conn.command(
            "CREATE TABLE r (id TEXT NOT NULL, at_ms INTEGER NOT NULL, due_ms INTEGER,
             state TEXT NOT NULL, active INTEGER NOT NULL, attempts INTEGER NOT NULL, note TEXT)",
        )
        .unwrap();
        let columns = [
            Column::Texts(vec![Some("r1"), Some("r2")]),
            Column::Ints(vec![Some(1_700_000_000_123), Some(-5)]),
            Column::Ints(vec![None, Some(i64::MAX)]),
            Column::Texts(vec![Some("active"), Some("waiting_event")]),
            Column::Bools(vec![true, false]),
            Column::Ints(vec![Some(0), Some(3)]),
            Column::Texts(vec![None, Some("Grüße, \"quoted\" ✓")]),
        ];
        conn.execute(
            "INSERT INTO r VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[Param::Rows(&columns)],
        )
        .unwrap();
        // A flag computed in the statement, as claims and lease checks compute theirs.
        let sql = "SELECT *, attempts > 0 AS flag FROM r ORDER BY id";
        let written: Vec<Both> = conn.fetch_all(sql, &[]).unwrap();
        let mut reader = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("c.db"))
            .connect()
            .await
            .unwrap();
        let read: Vec<Both> = sqlx::query_as(sql).fetch_all(&mut reader).await.unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(written, read);
    }

    #[test]
    fn parameters_are_bound_by_their_number_and_a_missing_one_is_an_error() {
        let (mut conn, _dir) = open();
        let row: (String, i64, String) = conn
            .fetch_optional(
                "SELECT $2 || $2, $1, $3",
                &[Param::Int(7), text("b"), Param::Text(Some("c"))],
            )
            .unwrap()
            .unwrap();
        assert_eq!(row, ("bb".to_owned(), 7, "c".to_owned()));
        let anonymous: Option<(i64, i64)> = conn
            .fetch_optional("SELECT ?, ?", &[Param::Int(1), Param::Int(2)])
            .unwrap();
        assert_eq!(anonymous, Some((1, 2)));
        let missing = conn
            .fetch_scalars::<i64>("SELECT $2", &[Param::Int(1)])
            .unwrap_err();
        assert!(
            !missing.is_rejection(),
            "a statement of herald's own is wrong: {missing}"
        );
    }

    #[test]
    fn statements_are_logged_with_their_time_only_when_asked() {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (mut conn, _dir) = open();
        let logged = |filter: &str, conn: &mut WriterConnection| {
            let lines = Lines::default();
            let sink = lines.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(move || sink.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                conn.fetch_scalars::<i64>("SELECT 40 + $1", &[Param::Int(2)])
                    .unwrap()
            });
            String::from_utf8(lines.0.lock().unwrap().clone()).unwrap()
        };
        let on = logged("warn,herald_store::sqlite_writer=debug", &mut conn);
        assert!(on.contains("SELECT 40 + $1"), "{on}");
        assert!(on.contains("elapsed_us="), "{on}");
        assert_eq!(logged("warn", &mut conn), "");
    }

    #[test]
    fn a_batch_runs_once_per_row_in_order_numbered_as_on_postgres() {
        let (mut conn, _dir) = open();
        conn.command(
            "CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER, ok INTEGER NOT NULL, at INTEGER)",
        )
        .unwrap();
        let columns = [
            Column::Texts(vec![Some("a"), Some("b"), Some("a")]),
            Column::Ints(vec![Some(1), None, Some(3)]),
            Column::Bools(vec![true, false, true]),
        ];
        // The batch's columns are $1..$3, the parameter after it $4; a later row sees an
        // earlier one's write.
        let upsert = "INSERT INTO t VALUES ($1, $2, $3, $4)
                      ON CONFLICT (id) DO UPDATE SET n = t.n * 10 + excluded.n
                      RETURNING id, n";
        let returned: Vec<(String, Option<i64>)> = conn
            .fetch_all(upsert, &[Param::Rows(&columns), Param::Int(7)])
            .unwrap();
        assert_eq!(
            returned,
            [
                ("a".into(), Some(1)),
                ("b".into(), None),
                ("a".into(), Some(13))
            ]
        );
        let changed = conn
            .execute(
                "UPDATE t SET at = $2 WHERE id = $1",
                &[
                    Param::Rows(&[Column::Texts(vec![Some("a"), Some("b"), Some("z")])]),
                    Param::Int(9),
                ],
            )
            .unwrap();
        assert_eq!(changed, 2, "changes are summed over the rows");
        let ids: Vec<String> = conn
            .fetch_scalars(
                "SELECT id FROM t WHERE id IN (SELECT value FROM json_each($1)) AND ok AND at = 9
                 ORDER BY id",
                &[Param::Texts(vec!["a", "b", "z"])],
            )
            .unwrap();
        assert_eq!(ids, ["a"]);
        let none = conn
            .execute(
                upsert,
                &[
                    Param::Rows(&[
                        Column::Texts(vec![]),
                        Column::Ints(vec![]),
                        Column::Bools(vec![]),
                    ]),
                    Param::Int(7),
                ],
            )
            .unwrap();
        assert_eq!(none, 0, "an empty batch runs nothing");
        // The same statement again, taken from the kept ones: a row it refuses fails it.
        let insert = "INSERT INTO t (id, n, ok) VALUES ($1, $2, $3)";
        let err = conn.execute(insert, &[Param::Rows(&columns)]).unwrap_err();
        assert!(
            err.is_rejection(),
            "a duplicate key is the row's fault: {err}"
        );
        let ragged = [
            Column::Texts(vec![Some("c")]),
            Column::Ints(vec![]),
            Column::Bools(vec![true]),
        ];
        let err = conn.execute(insert, &[Param::Rows(&ragged)]).unwrap_err();
        assert!(
            !err.is_rejection(),
            "ragged columns are herald's own mistake: {err}"
        );
    }

    #[test]
    fn a_batch_says_which_rows_it_stored() {
        let (mut conn, _dir) = open();
        conn.command("CREATE TABLE k (id TEXT PRIMARY KEY)")
            .unwrap();
        let insert = "INSERT INTO k VALUES ($1) ON CONFLICT DO NOTHING";
        let first = [Column::Texts(vec![Some("a"), Some("b"), Some("a")])];
        assert_eq!(
            conn.changed_rows(insert, &[Param::Rows(&first)]).unwrap(),
            [true, true, false]
        );
        let second = [Column::Texts(vec![Some("b"), Some("c")])];
        assert_eq!(
            conn.changed_rows(insert, &[Param::Rows(&second)]).unwrap(),
            [false, true]
        );
    }

    #[test]
    fn reading_one_row_of_a_batch_still_writes_every_row() {
        let (mut conn, _dir) = open();
        conn.command("CREATE TABLE w (id TEXT PRIMARY KEY)")
            .unwrap();
        let ids = [Column::Texts(vec![Some("a"), Some("b"), Some("c")])];
        let first: Option<String> = conn
            .fetch_optional_scalar(
                "INSERT INTO w VALUES ($1) RETURNING id",
                &[Param::Rows(&ids)],
            )
            .unwrap();
        assert_eq!(first.as_deref(), Some("a"));
        let all: Vec<String> = conn
            .fetch_scalars("SELECT id FROM w ORDER BY id", &[])
            .unwrap();
        assert_eq!(all, ["a", "b", "c"]);
    }

    #[test]
    fn a_kept_statement_is_not_planned_again_for_a_new_limit() {
        let (mut conn, _dir) = open();
        let sql = "SELECT value FROM json_each('[1,2,3]') ORDER BY value LIMIT $1";
        for limit in [1, 2, 3, 1] {
            let values: Vec<i64> = conn.fetch_scalars(sql, &[Param::Int(limit)]).unwrap();
            assert_eq!(values.len(), limit as usize);
        }
        let statement = conn.0.prepare_cached(sql).unwrap();
        assert_eq!(
            statement.get_status(rusqlite::StatementStatus::RePrepare),
            0
        );
    }
}
