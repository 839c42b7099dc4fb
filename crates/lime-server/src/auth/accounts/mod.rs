//! The SIP operator's account database: where HTTP Digest authentication finds a
//! user's stored passwords.
//!
//! This module only looks passwords up, with the operator's query (by default the
//! flexisip-account-manager schema, [`DEFAULT_ACCOUNTS_QUERY`]); it computes no
//! digest and decides nothing. It never writes to the database, and never logs a
//! password or an unredacted URL.
//!
//! The name a client authenticates with becomes its identity (`sip:NAME@REALM`),
//! so it must be the account's own spelling: a database that compares names
//! without case, accents or trailing spaces (MariaDB's default collations) would
//! otherwise give `ALICE`, `alicé` and `alice ` alice's passwords, and each a device
//! namespace of its own. The query returns the stored `username` (and `domain`),
//! and rows not spelt exactly as asked are ignored: the client gets "unknown user".
//!
//! - `named_parameters.rs`: `:username` / `:domain` in the query -> `?` or `$n`.
//! - `server.rs`: MariaDB/MySQL and PostgreSQL, through a sqlx pool.
//! - `sqlite.rs`: an SQLite file, read-only, through rusqlite.

mod cache;
mod named_parameters;
mod server;
mod sqlite;

use crate::store::StoreLocation;
use crate::telemetry::clip;
use named_parameters::{Placeholders, translate};
use sqlx::{MySql, Postgres};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The query shipped by default: the flexisip-account-manager schema. Its third
/// and fourth columns are the account's own spelling of its name and domain.
pub const DEFAULT_ACCOUNTS_QUERY: &str = "SELECT passwords.password, passwords.algorithm, accounts.username, accounts.domain FROM accounts JOIN passwords ON passwords.account_id = accounts.id WHERE accounts.username = :username AND accounts.domain = :domain";

/// The default of earlier versions, without the stored spelling. Operators copied
/// it from the example configuration: it is read as [`DEFAULT_ACCOUNTS_QUERY`].
const PREVIOUS_DEFAULT_ACCOUNTS_QUERY: &str = "SELECT passwords.password, passwords.algorithm FROM accounts JOIN passwords ON passwords.account_id = accounts.id WHERE accounts.username = :username AND accounts.domain = :domain";

/// The column holding the account's stored user name: required.
const USERNAME_COLUMN: &str = "username";

/// The column holding the account's stored domain: compared when present.
const DOMAIN_COLUMN: &str = "domain";

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

/// Where the query returns the account's own spelling of its name and domain,
/// found by column name when the query is checked at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SpellingColumns {
    /// The index of the `username` column.
    username: usize,
    /// The index of the `domain` column, if the query returns one.
    domain: Option<usize>,
}

impl SpellingColumns {
    /// Finds the columns by name (letter case aside) among the query's result
    /// columns, after the password and algorithm: fewer than two columns, or no
    /// `username` column, make the query unusable.
    fn find<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<SpellingColumns, AccountError> {
        let names: Vec<&str> = names.into_iter().collect();
        if names.len() < 2 {
            return Err(AccountError::BadQuery {
                reason: format!(
                    "it returns {} column(s); its first two must be the password and its algorithm",
                    names.len()
                ),
            });
        }
        let position = |wanted: &str| {
            (2..names.len()).find(|&index| names[index].eq_ignore_ascii_case(wanted))
        };
        let username = position(USERNAME_COLUMN).ok_or_else(|| AccountError::BadQuery {
            reason: format!(
                "it returns no `{USERNAME_COLUMN}` column (columns: {}). After the password \
                 and algorithm, return the account's user name as the database stores it, \
                 e.g. `accounts.username` (and `accounts.domain`): a database comparing \
                 names without case or accents would otherwise let `ALICE` or `alicé` act \
                 as an identity of their own with alice's password",
                names.join(", ")
            ),
        })?;
        Ok(SpellingColumns {
            username,
            domain: position(DOMAIN_COLUMN),
        })
    }
}

/// One row as the query returned it, before its algorithm is read.
struct PasswordRow {
    /// The first column: the password or its HA1 (`None`: NULL).
    password: Option<String>,
    /// The second column: the algorithm's name (`None`: NULL).
    algorithm: Option<String>,
    /// The `username` column: the account's own spelling (`None`: NULL).
    username: Option<String>,
    /// The `domain` column, when the query returns one (`None`: NULL or absent).
    domain: Option<String>,
}

impl PasswordRow {
    /// True when the row is spelt exactly as asked, byte for byte: its username
    /// always, its domain when the query returns one.
    fn spelt_as(&self, username: &str, domain: &str, columns: SpellingColumns) -> bool {
        self.username.as_deref() == Some(username)
            && (columns.domain.is_none() || self.domain.as_deref() == Some(domain))
    }
}

/// The operator's account database, connected and its query checked.
pub struct AccountDatabase {
    /// Where it is, for logs and errors (shown with the password hidden).
    location: StoreLocation,
    /// The backend and the query in its positional form.
    backend: Backend,
    /// Longest a lookup may take.
    timeout: Duration,
    /// Where the rows' own spelling is.
    spelling: SpellingColumns,
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

    fn spelling(&self) -> SpellingColumns {
        match self {
            Backend::Sqlite(accounts) => accounts.spelling(),
            Backend::Mysql(accounts) => accounts.spelling(),
            Backend::Postgres(accounts) => accounts.spelling(),
        }
    }
}

impl AccountDatabase {
    /// Connects and checks the query by running it once (with a user name no
    /// account has): a bad URL, an unreachable database, or a query with a syntax
    /// error, too few columns or no `username` column stops the server at start
    /// with a clear message. The previous default query is read as the current one.
    pub async fn connect(
        url: &str,
        query: &str,
        options: &AccountDatabaseOptions,
    ) -> Result<AccountDatabase, AccountError> {
        let location = StoreLocation::parse_url(url).map_err(|error| AccountError::BadUrl {
            url: error.url,
            reason: error.reason.into(),
        })?;
        let query = if query.trim() == PREVIOUS_DEFAULT_ACCOUNTS_QUERY {
            tracing::info!(
                "auth.digest.accounts_query is the previous default: using the current \
                 default, which also returns the account's own spelling of its name"
            );
            DEFAULT_ACCOUNTS_QUERY
        } else {
            query
        };
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
            spelling: backend.spelling(),
            backend,
            timeout: options.timeout,
            cache: (!options.cache_time_to_live.is_zero())
                .then(|| cache::PasswordCache::new(options.cache_time_to_live)),
        })
    }

    /// The password rows of one account, in the order the query returns them.
    /// Rows whose stored username (or domain) is not spelt exactly as asked are
    /// ignored; rows whose algorithm is none of the three are skipped with a
    /// warning. An unknown account has none.
    pub async fn passwords(
        &self,
        username: &str,
        domain: &str,
    ) -> Result<Vec<StoredPassword>, AccountError> {
        let rows = tokio::time::timeout(self.timeout, self.backend.rows(username, domain))
            .await
            .map_err(|_| AccountError::Timeout(self.timeout))??;
        let found = rows.len();
        let (rows, spelt_otherwise): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .partition(|row| row.spelt_as(username, domain, self.spelling));
        if let Some(row) = spelt_otherwise.first() {
            // Debug only: a client can ask for any spelling, as often as it likes.
            tracing::debug!(
                username = %clip(username),
                domain = %clip(domain),
                stored_username = %clip(row.username.as_deref().unwrap_or("NULL")),
                stored_domain = %clip(row.domain.as_deref().unwrap_or("-")),
                rows = spelt_otherwise.len(),
                "account rows spelt otherwise than the client's name ignored"
            );
        }
        tracing::debug!(
            username = %clip(username),
            domain = %clip(domain),
            rows = found,
            kept = rows.len(),
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
                    location = %self.location, username, domain, algorithm = %clip(&algorithm),
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

    #[test]
    fn spelling_columns_are_found_by_name_after_the_first_two() {
        let columns = SpellingColumns::find(["password", "algorithm", "Domain", "USERNAME"]);
        assert_eq!(
            columns.unwrap(),
            SpellingColumns {
                username: 3,
                domain: Some(2)
            }
        );
        let columns = SpellingColumns::find(["secret", "kind", "username"]).unwrap();
        assert_eq!(columns.domain, None);
        // The first two are the password and algorithm, whatever their names.
        let error = SpellingColumns::find(["username", "algorithm"]).unwrap_err();
        assert!(
            error.to_string().contains("no `username` column"),
            "{error}"
        );
    }

    #[test]
    fn a_query_without_username_or_with_too_few_columns_is_refused() {
        let error = SpellingColumns::find(["password", "algorithm", "login"]).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("no `username` column"), "{message}");
        assert!(message.contains("password, algorithm, login"), "{message}");
        let error = SpellingColumns::find(["password"]).unwrap_err();
        assert!(error.to_string().contains("1 column"), "{error}");
    }

    #[test]
    fn only_rows_spelt_exactly_as_asked_count() {
        let row = |username: Option<&str>, domain: Option<&str>| PasswordRow {
            password: Some("x".into()),
            algorithm: Some("MD5".into()),
            username: username.map(str::to_owned),
            domain: domain.map(str::to_owned),
        };
        let with_domain = SpellingColumns {
            username: 2,
            domain: Some(3),
        };
        let without_domain = SpellingColumns {
            username: 2,
            domain: None,
        };
        let alice = row(Some("alice"), Some("example.org"));
        assert!(alice.spelt_as("alice", "example.org", with_domain));
        for (username, domain) in [
            ("ALICE", "example.org"),
            ("alicé", "example.org"),
            ("alice ", "example.org"),
            ("alice", "EXAMPLE.ORG"),
            ("alice", "example.org "),
        ] {
            assert!(
                !alice.spelt_as(username, domain, with_domain),
                "{username:?}@{domain:?}"
            );
        }
        // Without a domain column, the domain is the query's business.
        assert!(row(Some("alice"), None).spelt_as("alice", "EXAMPLE.ORG", without_domain));
        assert!(!row(None, Some("example.org")).spelt_as("alice", "example.org", with_domain));
        assert!(!row(Some("alice"), None).spelt_as("alice", "example.org", with_domain));
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
