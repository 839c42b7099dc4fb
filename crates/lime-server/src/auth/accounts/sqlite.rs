//! An account database in an SQLite file, opened read-only through rusqlite.
//!
//! One connection serves every lookup, one at a time, on tokio's blocking
//! threads: a lookup is one indexed read, and the server never writes here.

use super::named_parameters::PositionalQuery;
use super::{
    AccountDatabaseOptions, AccountError, CHECK_DOMAIN, CHECK_USERNAME, PasswordRow,
    SpellingColumns,
};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

/// The file's one connection and the query in `?` form.
pub(super) struct SqliteAccounts {
    /// Shared with the blocking task of each lookup.
    shared: Arc<Shared>,
}

struct Shared {
    connection: Mutex<Connection>,
    query: PositionalQuery,
    /// Where each row holds the account's own spelling.
    spelling: SpellingColumns,
}

impl SqliteAccounts {
    /// Opens the file read-only and checks the query on it; `location` names the
    /// file in errors.
    pub async fn open(
        path: &Path,
        location: String,
        query: PositionalQuery,
        options: &AccountDatabaseOptions,
    ) -> Result<SqliteAccounts, AccountError> {
        let path = path.to_owned();
        let busy_timeout = options.timeout;
        let opened = tokio::task::spawn_blocking(move || {
            let cannot_open = |error: rusqlite::Error| AccountError::Connect {
                location: location.clone(),
                message: format!("cannot open: {error}"),
            };
            let connection = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(cannot_open)?;
            // The operator's tools may be writing: wait for their locks, within
            // the lookup's time-out.
            connection.busy_timeout(busy_timeout).map_err(cannot_open)?;
            let spelling = check(&connection, &query, &location)?;
            Ok(Shared {
                connection: Mutex::new(connection),
                query,
                spelling,
            })
        })
        .await
        .map_err(|error| AccountError::Query(format!("opening task failed: {error}")))??;
        Ok(SqliteAccounts {
            shared: Arc::new(opened),
        })
    }

    /// Where each row holds the account's own spelling.
    pub fn spelling(&self) -> SpellingColumns {
        self.shared.spelling
    }

    /// The rows the query returns for one account.
    pub async fn rows(
        &self,
        username: &str,
        domain: &str,
    ) -> Result<Vec<PasswordRow>, AccountError> {
        let shared = Arc::clone(&self.shared);
        let (username, domain) = (username.to_owned(), domain.to_owned());
        tokio::task::spawn_blocking(move || {
            let connection = shared
                .connection
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            fetch_rows(
                &connection,
                &shared.query,
                shared.spelling,
                &username,
                &domain,
            )
            .map_err(|error| AccountError::Query(error.to_string()))
        })
        .await
        .map_err(|error| AccountError::Query(format!("lookup task failed: {error}")))?
    }
}

/// Prepares the query (SQLite reports syntax errors and unknown tables or columns
/// then), finds its columns (two, then `username`), and runs it once.
fn check(
    connection: &Connection,
    query: &PositionalQuery,
    location: &str,
) -> Result<SpellingColumns, AccountError> {
    let refused = |error: rusqlite::Error| match error.sqlite_error_code() {
        // SQLITE_ERROR: what SQLite says of a query it does not understand.
        Some(ErrorCode::Unknown) | None => AccountError::BadQuery {
            reason: format!("the database refused it: {error}"),
        },
        // Not a database, unreadable, locked for longer than the time-out...
        Some(_) => AccountError::Connect {
            location: location.to_owned(),
            message: format!("cannot read: {error}"),
        },
    };
    let statement = connection.prepare_cached(&query.sql).map_err(refused)?;
    let spelling = SpellingColumns::find(statement.column_names())?;
    drop(statement);
    fetch_rows(connection, query, spelling, CHECK_USERNAME, CHECK_DOMAIN).map_err(refused)?;
    Ok(spelling)
}

fn fetch_rows(
    connection: &Connection,
    query: &PositionalQuery,
    spelling: SpellingColumns,
    username: &str,
    domain: &str,
) -> rusqlite::Result<Vec<PasswordRow>> {
    let mut statement = connection.prepare_cached(&query.sql)?;
    let values = query.values(username, domain);
    let rows = statement.query_map(rusqlite::params_from_iter(values), |row| {
        Ok(PasswordRow {
            password: text(row.get_ref(0)?)?,
            algorithm: text(row.get_ref(1)?)?,
            username: text(row.get_ref(spelling.username)?)?,
            domain: match spelling.domain {
                Some(index) => text(row.get_ref(index)?)?,
                None => None,
            },
        })
    })?;
    rows.collect()
}

/// A column as text: TEXT as it is, a BLOB read as UTF-8, a number in decimal.
fn text(value: ValueRef<'_>) -> rusqlite::Result<Option<String>> {
    Ok(match value {
        ValueRef::Null => None,
        ValueRef::Integer(number) => Some(number.to_string()),
        ValueRef::Real(number) => Some(number.to_string()),
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
            Some(std::str::from_utf8(bytes)?.to_owned())
        }
    })
}
