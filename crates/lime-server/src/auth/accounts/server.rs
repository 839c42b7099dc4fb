//! An account database on a database server (MariaDB/MySQL or PostgreSQL), through
//! a sqlx pool. The same code serves both: only the placeholders differ, and they
//! are written before this module sees the query.

use super::named_parameters::PositionalQuery;
use super::{
    AccountDatabaseOptions, AccountError, CHECK_DOMAIN, CHECK_USERNAME, PasswordRow,
    SpellingColumns,
};
use sqlx::{
    Column, ColumnIndex, ConnectOptions, Connection, Database, Decode, Encode, Executor,
    IntoArguments, Pool, Row, Statement, Type,
};
use tokio::time::timeout;

/// The pool and the query in the backend's positional form.
pub(super) struct ServerAccounts<DB: Database> {
    /// Opens connections as lookups need them, up to the configured size.
    pool: Pool<DB>,
    query: PositionalQuery,
    /// Where each row holds the account's own spelling.
    spelling: SpellingColumns,
}

impl<DB> ServerAccounts<DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'c> &'c Pool<DB>: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'r> Option<String>: Decode<'r, DB> + Type<DB>,
    for<'r> Option<Vec<u8>>: Decode<'r, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    /// Connects once on a connection of its own, so that an unreachable database
    /// is reported with its real cause (not as a pool time-out), checks the query
    /// on it, then makes the pool. `location` names the database in errors.
    pub async fn open(
        url: &str,
        location: String,
        query: PositionalQuery,
        options: &AccountDatabaseOptions,
    ) -> Result<ServerAccounts<DB>, AccountError> {
        let connect_options = url
            .parse::<<DB::Connection as Connection>::Options>()
            .map_err(|error| AccountError::BadUrl {
                url: location.clone(),
                reason: error.to_string(),
            })?;
        let cannot = |message: String| AccountError::Connect {
            location: location.clone(),
            message,
        };
        let mut conn = timeout(options.connect_timeout, connect_options.connect())
            .await
            .map_err(|_| {
                cannot(format!(
                    "cannot connect within {:?}: is the database server running and reachable?",
                    options.connect_timeout
                ))
            })?
            .map_err(|error| cannot(format!("cannot connect: {error}")))?;
        let checked = timeout(options.timeout, check::<DB>(&mut conn, &query, &location)).await;
        let _ = conn.close().await;
        let spelling = checked.map_err(|_| {
            cannot(format!(
                "the query gave no answer within {:?}",
                options.timeout
            ))
        })??;
        // Lookups are bounded by `options.timeout` on top of the acquire time-out.
        let pool = crate::store::pool_options::<DB>(options.pool_size, options.connect_timeout)
            .connect_lazy_with(connect_options);
        Ok(ServerAccounts {
            pool,
            query,
            spelling,
        })
    }

    /// Where each row holds the account's own spelling.
    pub fn spelling(&self) -> SpellingColumns {
        self.spelling
    }

    /// The rows the query returns for one account.
    pub async fn rows(
        &self,
        username: &str,
        domain: &str,
    ) -> Result<Vec<PasswordRow>, AccountError> {
        fetch_rows(&self.pool, &self.query, self.spelling, username, domain)
            .await
            .map_err(|error| AccountError::Query(error.to_string()))
    }
}

/// Prepares the query (the database reports syntax errors and unknown tables or
/// columns then), finds its columns (two, then `username`), and runs it once.
async fn check<DB>(
    conn: &mut DB::Connection,
    query: &PositionalQuery,
    location: &str,
) -> Result<SpellingColumns, AccountError>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'r> Option<String>: Decode<'r, DB> + Type<DB>,
    for<'r> Option<Vec<u8>>: Decode<'r, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    let refused = |error: sqlx::Error| match error {
        // The database answered, and refused the query.
        sqlx::Error::Database(error) => AccountError::BadQuery {
            reason: format!("the database refused it: {error}"),
        },
        other => AccountError::Connect {
            location: location.to_owned(),
            message: format!("checking the query: {other}"),
        },
    };
    let statement = conn.prepare(&query.sql).await.map_err(refused)?;
    let spelling = SpellingColumns::find(statement.columns().iter().map(|column| column.name()))?;
    fetch_rows(&mut *conn, query, spelling, CHECK_USERNAME, CHECK_DOMAIN)
        .await
        .map_err(refused)?;
    Ok(spelling)
}

async fn fetch_rows<'c, DB, E>(
    executor: E,
    query: &PositionalQuery,
    spelling: SpellingColumns,
    username: &str,
    domain: &str,
) -> sqlx::Result<Vec<PasswordRow>>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'r> Option<String>: Decode<'r, DB> + Type<DB>,
    for<'r> Option<Vec<u8>>: Decode<'r, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    let mut statement = sqlx::query::<DB>(&query.sql);
    for value in query.values(username, domain) {
        statement = statement.bind(value);
    }
    statement
        .fetch_all(executor)
        .await?
        .iter()
        .map(|row| {
            Ok(PasswordRow {
                password: text(row, 0)?,
                algorithm: text(row, 1)?,
                username: text(row, spelling.username)?,
                domain: match spelling.domain {
                    Some(index) => text(row, index)?,
                    None => None,
                },
            })
        })
        .collect()
}

/// A column as text; a binary one (MySQL's VARBINARY, BLOB, or a `_bin`
/// collation) read as UTF-8.
fn text<'r, R>(row: &'r R, index: usize) -> sqlx::Result<Option<String>>
where
    R: Row,
    usize: ColumnIndex<R>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    Option<Vec<u8>>: Decode<'r, R::Database> + Type<R::Database>,
{
    match row.try_get::<Option<String>, _>(index) {
        Err(sqlx::Error::ColumnDecode { .. }) => row
            .try_get::<Option<Vec<u8>>, _>(index)?
            .map(|bytes| {
                String::from_utf8(bytes).map_err(|error| sqlx::Error::ColumnDecode {
                    index: index.to_string(),
                    source: Box::new(error),
                })
            })
            .transpose(),
        text => text,
    }
}
