//! The SIP operator's account database: where HTTP Digest authentication finds a
//! user's stored passwords.
//!
//! This module only looks passwords up, with the operator's query (by default the
//! flexisip-account-manager schema, [`DEFAULT_ACCOUNTS_QUERY`]); it computes no
//! digest and decides nothing. It never writes to the database, and never logs a
//! password or an unredacted URL.
//!
//! - `named_parameters.rs`: `:username` / `:domain` in the query -> `?` or `$n`.
//! - `server.rs`: MariaDB/MySQL and PostgreSQL, through a sqlx pool.
//! - `sqlite.rs`: an SQLite file, read-only, through rusqlite.

mod cache;
mod named_parameters;
mod server;
mod sqlite;

use crate::store::StoreLocation;
use named_parameters::{Placeholders, translate};
use sqlx::{MySql, Postgres};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The query shipped by default: the flexisip-account-manager schema.
pub const DEFAULT_ACCOUNTS_QUERY: &str = "SELECT passwords.password, passwords.algorithm FROM accounts JOIN passwords ON passwords.account_id = accounts.id WHERE accounts.username = :username AND accounts.domain = :domain";

/// The user name the query is checked with at start: no account has it.
const CHECK_USERNAME: &str = "lime-server: query check, no such user";

/// The domain the query is checked with at start.
const CHECK_DOMAIN: &str = "lime-server.invalid";

/// How a stored password is kept: the `algorithm` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordAlgorithm {
    /// `CLRTXT`: the password itself.
    ClearText,
    /// `MD5`: the hex of MD5(username:realm:password).
    Md5,
    /// `SHA-256`: the hex of SHA-256(username:realm:password).
    Sha256,
}

impl PasswordAlgorithm {
    /// Every algorithm, in the order of their names' conventional listing.
    pub const ALL: [PasswordAlgorithm; 3] = [
        PasswordAlgorithm::ClearText,
        PasswordAlgorithm::Md5,
        PasswordAlgorithm::Sha256,
    ];

    /// The name the `algorithm` column holds, canonically spelt.
    pub fn name(self) -> &'static str {
        match self {
            PasswordAlgorithm::ClearText => "CLRTXT",
            PasswordAlgorithm::Md5 => "MD5",
            PasswordAlgorithm::Sha256 => "SHA-256",
        }
    }
}

impl FromStr for PasswordAlgorithm {
    type Err = UnknownAlgorithm;

    /// Reads a column value: surrounding spaces and letter case do not matter.
    fn from_str(text: &str) -> Result<PasswordAlgorithm, UnknownAlgorithm> {
        let text = text.trim();
        PasswordAlgorithm::ALL
            .into_iter()
            .find(|algorithm| algorithm.name().eq_ignore_ascii_case(text))
            .ok_or_else(|| UnknownAlgorithm(text.to_owned()))
    }
}

impl fmt::Display for PasswordAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An `algorithm` value that is none of `CLRTXT`, `MD5` and `SHA-256`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown password algorithm {0:?} (expected CLRTXT, MD5 or SHA-256)")]
pub struct UnknownAlgorithm(pub String);

/// One stored password row.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredPassword {
    /// How `secret` is kept.
    pub algorithm: PasswordAlgorithm,
    /// For `Md5`/`Sha256`, the hex HA1 = H(username:realm:password), in either
    /// letter case; for `ClearText`, the password itself.
    pub secret: String,
}

impl fmt::Debug for StoredPassword {
    /// The secret stays out of logs and panic messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredPassword")
            .field("algorithm", &self.algorithm)
            .field("secret", &"***")
            .finish()
    }
}

/// How the account database is used.
#[derive(Debug, Clone)]
pub struct AccountDatabaseOptions {
    /// Most connections a database-server pool opens (SQLite uses one).
    pub pool_size: u32,
    /// Longest wait to open a connection.
    pub connect_timeout: Duration,
    /// Longest a lookup may take, waiting for a connection included.
    pub timeout: Duration,
    /// How long the passwords of an account found are kept; zero: looked up on
    /// every request.
    pub cache_time_to_live: Duration,
}

/// What looking passwords up can fail with. Messages never hold a password.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The URL names no supported database.
    #[error("account database URL {url:?}: {reason}")]
    BadUrl {
        /// The URL, password hidden.
        url: String,
        /// Why it is refused.
        reason: String,
    },
    /// The query cannot be used: a missing `:username`, an unknown `:name`, too few
    /// columns, or the database refused it.
    #[error("account query is not usable: {reason}")]
    BadQuery {
        /// What is wrong with it.
        reason: String,
    },
    /// The database cannot be reached or opened.
    #[error("account database {location}: {message}")]
    Connect {
        /// Where, password hidden.
        location: String,
        /// What went wrong.
        message: String,
    },
    /// A lookup failed in the database or its driver.
    #[error("account lookup failed: {0}")]
    Query(String),
    /// A lookup took longer than its time-out.
    #[error("account lookup gave no answer within {0:?}")]
    Timeout(Duration),
}

/// What the start-up check says of a query returning fewer than two columns.
fn too_few_columns(columns: usize) -> AccountError {
    AccountError::BadQuery {
        reason: format!(
            "it returns {columns} column(s); its first two must be the password and its algorithm"
        ),
    }
}

/// One row as the query returned it, before its algorithm is read.
struct PasswordRow {
    /// The first column: the password or its HA1 (`None`: NULL).
    password: Option<String>,
    /// The second column: the algorithm's name (`None`: NULL).
    algorithm: Option<String>,
}

/// The operator's account database, connected and its query checked.
pub struct AccountDatabase {
    /// Where it is, for logs and errors (shown with the password hidden).
    location: StoreLocation,
    /// The backend and the query in its positional form.
    backend: Backend,
    /// Longest a lookup may take.
    timeout: Duration,
    /// Accounts looked up lately, when kept.
    cache: Option<cache::PasswordCache>,
}

/// The database, on its backend.
enum Backend {
    Sqlite(sqlite::SqliteAccounts),
    Mysql(server::ServerAccounts<MySql>),
    Postgres(server::ServerAccounts<Postgres>),
}

impl Backend {
    async fn rows(&self, username: &str, domain: &str) -> Result<Vec<PasswordRow>, AccountError> {
        match self {
            Backend::Sqlite(accounts) => accounts.rows(username, domain).await,
            Backend::Mysql(accounts) => accounts.rows(username, domain).await,
            Backend::Postgres(accounts) => accounts.rows(username, domain).await,
        }
    }
}

impl AccountDatabase {
    /// Connects and checks the query by running it once (with a user name no
    /// account has): a bad URL, an unreachable database, or a query with a syntax
    /// error or too few columns stops the server at start with a clear message.
    pub async fn connect(
        url: &str,
        query: &str,
        options: &AccountDatabaseOptions,
    ) -> Result<AccountDatabase, AccountError> {
        let location = StoreLocation::parse_url(url).map_err(|error| AccountError::BadUrl {
            url: error.url,
            reason: error.reason.into(),
        })?;
        let query = translate(
            query,
            match location {
                StoreLocation::Postgres(_) => Placeholders::Numbered,
                StoreLocation::Sqlite(_) | StoreLocation::Mysql(_) => Placeholders::QuestionMarks,
            },
        )?;
        let shown = location.to_string();
        let backend = match &location {
            StoreLocation::Sqlite(path) => {
                Backend::Sqlite(sqlite::SqliteAccounts::open(path, shown, query, options).await?)
            }
            StoreLocation::Mysql(url) => {
                Backend::Mysql(server::ServerAccounts::open(url, shown, query, options).await?)
            }
            StoreLocation::Postgres(url) => {
                Backend::Postgres(server::ServerAccounts::open(url, shown, query, options).await?)
            }
        };
        tracing::info!(location = %location, "account database connected, query checked");
        Ok(AccountDatabase {
            location,
            backend,
            timeout: options.timeout,
            cache: (!options.cache_time_to_live.is_zero())
                .then(|| cache::PasswordCache::new(options.cache_time_to_live)),
        })
    }

    /// The password rows of one account, in the order the query returns them.
    /// Rows whose algorithm is none of the three are skipped with a warning. An
    /// unknown account has none.
    pub async fn passwords(
        &self,
        username: &str,
        domain: &str,
    ) -> Result<Vec<StoredPassword>, AccountError> {
        let rows = tokio::time::timeout(self.timeout, self.backend.rows(username, domain))
            .await
            .map_err(|_| AccountError::Timeout(self.timeout))??;
        tracing::debug!(
            username,
            domain,
            rows = rows.len(),
            "account passwords looked up"
        );
        Ok(rows
            .into_iter()
            .filter_map(|row| self.stored_password(row, username, domain))
            .collect())
    }

    /// Like [`AccountDatabase::passwords`], from what was looked up within the
    /// cache's time-to-live unless `fresh`; what the database answers is kept.
    /// Also says whether the rows came from the cache (a password that does not
    /// match them is checked against the database again).
    pub async fn cached_passwords(
        &self,
        username: &str,
        domain: &str,
        fresh: bool,
    ) -> Result<(Vec<StoredPassword>, bool), AccountError> {
        let now = std::time::Instant::now();
        let kept = match (&self.cache, fresh) {
            (Some(cache), false) => cache.get(username, domain, now),
            _ => None,
        };
        if let Some(rows) = kept {
            return Ok((rows, true));
        }
        let rows = self.passwords(username, domain).await?;
        if let Some(cache) = &self.cache {
            cache.put(username, domain, &rows, now);
        }
        Ok((rows, false))
    }

    /// Where the database is, password hidden, for logs.
    pub fn location(&self) -> String {
        self.location.to_string()
    }

    /// Reads one row, or warns and skips it (naming its algorithm, never its
    /// password).
    fn stored_password(
        &self,
        row: PasswordRow,
        username: &str,
        domain: &str,
    ) -> Option<StoredPassword> {
        let (Some(secret), Some(algorithm)) = (row.password, row.algorithm) else {
            tracing::warn!(
                location = %self.location, username, domain,
                "account database row with a NULL password or algorithm skipped"
            );
            return None;
        };
        match algorithm.parse() {
            Ok(algorithm) => Some(StoredPassword { algorithm, secret }),
            Err(UnknownAlgorithm(algorithm)) => {
                tracing::warn!(
                    location = %self.location, username, domain, algorithm,
                    "account database row with an unknown algorithm skipped \
                     (expected CLRTXT, MD5 or SHA-256)"
                );
                None
            }
        }
    }
}

impl fmt::Debug for AccountDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountDatabase")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_read_their_column_names() {
        assert_eq!("CLRTXT".parse(), Ok(PasswordAlgorithm::ClearText));
        assert_eq!("MD5".parse(), Ok(PasswordAlgorithm::Md5));
        assert_eq!("SHA-256".parse(), Ok(PasswordAlgorithm::Sha256));
    }

    #[test]
    fn algorithms_ignore_case_and_surrounding_spaces() {
        assert_eq!(" md5\t".parse(), Ok(PasswordAlgorithm::Md5));
        assert_eq!("sha-256 ".parse(), Ok(PasswordAlgorithm::Sha256));
        assert_eq!("ClrTxt".parse(), Ok(PasswordAlgorithm::ClearText));
    }

    #[test]
    fn other_algorithms_are_refused_by_name() {
        assert_eq!(
            "SHA-512".parse::<PasswordAlgorithm>(),
            Err(UnknownAlgorithm("SHA-512".into()))
        );
        assert!("SHA256".parse::<PasswordAlgorithm>().is_err());
        assert!("".parse::<PasswordAlgorithm>().is_err());
    }

    #[test]
    fn names_are_canonical_and_round_trip() {
        for algorithm in PasswordAlgorithm::ALL {
            assert_eq!(algorithm.name().parse(), Ok(algorithm));
            assert_eq!(algorithm.to_string(), algorithm.name());
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let stored = StoredPassword {
            algorithm: PasswordAlgorithm::ClearText,
            secret: "hunter2".into(),
        };
        let shown = format!("{stored:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("ClearText") && shown.contains("***"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn a_bad_url_is_refused_with_its_password_hidden() {
        let options = AccountDatabaseOptions {
            pool_size: 1,
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            cache_time_to_live: Duration::ZERO,
        };
        let error =
            AccountDatabase::connect("redis://u:secret@host/0", DEFAULT_ACCOUNTS_QUERY, &options)
                .await
                .unwrap_err();
        assert!(matches!(error, AccountError::BadUrl { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains("u:***@host") && !message.contains("secret"),
            "{message}"
        );
    }
}
