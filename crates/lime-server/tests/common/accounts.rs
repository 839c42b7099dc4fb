//! A SIP operator's account database for tests: the flexisip-account-manager
//! tables (`accounts`, `passwords`) on any backend, and accounts added to them.
//!
//! SQLite goes through rusqlite (a temporary file), the database servers through
//! sqlx (a fresh database from [`TestDatabase`], dropped with the fixture).

use super::backend::{Backend, TestDatabase};
use md5::Md5;
use sha2::{Digest, Sha256};
use sqlx::Connection;
use tempfile::TempDir;

/// The flexisip-account-manager tables, as SQLite writes them.
const SQLITE_SCHEMA: &str = "
    CREATE TABLE accounts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        username VARCHAR(64) NOT NULL,
        domain VARCHAR(64) NOT NULL,
        UNIQUE (username, domain)
    );
    CREATE TABLE passwords (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        password VARCHAR(255) NOT NULL,
        algorithm VARCHAR(10) NOT NULL DEFAULT 'MD5',
        UNIQUE (account_id, algorithm)
    );";

/// The same tables on MariaDB/MySQL.
const MARIADB_SCHEMA: &str = "
    CREATE TABLE accounts (
        id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
        username VARCHAR(64) NOT NULL,
        domain VARCHAR(64) NOT NULL,
        UNIQUE KEY accounts_username_domain_unique (username, domain)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
    CREATE TABLE passwords (
        id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
        account_id BIGINT UNSIGNED NOT NULL,
        password VARCHAR(255) NOT NULL,
        algorithm VARCHAR(10) NOT NULL DEFAULT 'MD5',
        UNIQUE KEY passwords_account_id_algorithm_unique (account_id, algorithm),
        FOREIGN KEY (account_id) REFERENCES accounts(id) ON DELETE CASCADE
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;";

/// The same tables on PostgreSQL.
const POSTGRES_SCHEMA: &str = "
    CREATE TABLE accounts (
        id BIGSERIAL PRIMARY KEY,
        username VARCHAR(64) NOT NULL,
        domain VARCHAR(64) NOT NULL,
        UNIQUE (username, domain)
    );
    CREATE TABLE passwords (
        id BIGSERIAL PRIMARY KEY,
        account_id BIGINT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        password VARCHAR(255) NOT NULL,
        algorithm VARCHAR(10) NOT NULL DEFAULT 'MD5',
        UNIQUE (account_id, algorithm)
    );";

/// An account database of its own for one test.
pub struct AccountsFixture {
    /// Its URL, as `AccountDatabase::connect` takes it: `sqlite://PATH`,
    /// `mysql://root@...` or `postgres://postgres@...` (no password).
    pub url: String,
    /// The backend it is on.
    pub backend: Backend,
    /// What the URL names, removed when the fixture is dropped.
    _database: Held,
}

/// Keeps a fixture's database alive.
enum Held {
    /// The directory holding `accounts.db`.
    Sqlite(TempDir),
    /// A database on a database server.
    Server(TestDatabase),
}

impl AccountsFixture {
    /// Creates an empty flexisip-account-manager-shaped database on `backend`:
    /// SQLite in a temporary file, MariaDB and PostgreSQL in a fresh database.
    /// Panics (the test fails) when the database server cannot be reached.
    pub async fn create(backend: Backend) -> AccountsFixture {
        let (url, database) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = format!("sqlite://{}", dir.path().join("accounts.db").display());
                (url, Held::Sqlite(dir))
            }
            Backend::Mariadb | Backend::Postgres => {
                let database = TestDatabase::empty(backend).await;
                (database.url.clone(), Held::Server(database))
            }
        };
        let fixture = AccountsFixture {
            url,
            backend,
            _database: database,
        };
        fixture
            .execute(match backend {
                Backend::Sqlite => SQLITE_SCHEMA,
                Backend::Mariadb => MARIADB_SCHEMA,
                Backend::Postgres => POSTGRES_SCHEMA,
            })
            .await;
        fixture
    }

    /// Adds an account with one password row per algorithm: `CLRTXT` stores the
    /// password, `MD5` and `SHA-256` the hex of H(username:domain:password) (the
    /// realm is the domain); any other name stores the password as it is, for
    /// rows the server must skip.
    pub async fn add_account(
        &self,
        username: &str,
        domain: &str,
        password: &str,
        algorithms: &[&str],
    ) {
        self.run(
            "INSERT INTO accounts (username, domain) VALUES (?, ?)",
            &[username, domain],
        )
        .await;
        for algorithm in algorithms {
            let secret = stored_secret(algorithm, username, domain, password);
            self.run(
                "INSERT INTO passwords (account_id, password, algorithm) \
                 SELECT id, ?, ? FROM accounts WHERE username = ? AND domain = ?",
                &[&secret, algorithm, username, domain],
            )
            .await;
        }
    }

    /// Runs SQL statements as they are (tables of a test's own, odd rows).
    pub async fn execute(&self, sql: &str) {
        let result = match self.backend {
            Backend::Sqlite => self.sqlite().execute_batch(sql).map_err(|e| e.to_string()),
            Backend::Mariadb => {
                let mut conn = self.mysql().await;
                let done = sqlx::raw_sql(sql).execute(&mut conn).await;
                done.map(drop).map_err(|e| e.to_string())
            }
            Backend::Postgres => {
                let mut conn = self.postgres().await;
                let done = sqlx::raw_sql(sql).execute(&mut conn).await;
                done.map(drop).map_err(|e| e.to_string())
            }
        };
        result.unwrap_or_else(|error| panic!("{:?} `{sql}`: {error}", self.backend));
    }

    /// Runs one statement with `?` placeholders, binding `values` in order.
    async fn run(&self, sql: &str, values: &[&str]) {
        let result = match self.backend {
            Backend::Sqlite => {
                let done = self
                    .sqlite()
                    .execute(sql, rusqlite::params_from_iter(values));
                done.map(drop).map_err(|e| e.to_string())
            }
            Backend::Mariadb => {
                let mut query = sqlx::query(sql);
                for value in values {
                    query = query.bind(*value);
                }
                let done = query.execute(&mut self.mysql().await).await;
                done.map(drop).map_err(|e| e.to_string())
            }
            Backend::Postgres => {
                let numbered = numbered_placeholders(sql);
                let mut query = sqlx::query(&numbered);
                for value in values {
                    query = query.bind(*value);
                }
                let done = query.execute(&mut self.postgres().await).await;
                done.map(drop).map_err(|e| e.to_string())
            }
        };
        result.unwrap_or_else(|error| panic!("{:?} `{sql}`: {error}", self.backend));
    }

    fn sqlite(&self) -> rusqlite::Connection {
        let path = self
            .url
            .strip_prefix("sqlite://")
            .expect("an sqlite:// URL");
        rusqlite::Connection::open(path)
            .unwrap_or_else(|error| panic!("SQLite file {path}: {error}"))
    }

    async fn mysql(&self) -> sqlx::MySqlConnection {
        sqlx::MySqlConnection::connect(&self.url)
            .await
            .unwrap_or_else(|error| panic!("MariaDB at {}: {error}", self.url))
    }

    async fn postgres(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.url)
            .await
            .unwrap_or_else(|error| panic!("PostgreSQL at {}: {error}", self.url))
    }
}

/// What the `password` column holds for `algorithm`: the password for `CLRTXT`,
/// the lowercase hex HA1 = H(username:realm:password) for `MD5` and `SHA-256`, the
/// password as it is for any other name.
pub fn stored_secret(algorithm: &str, username: &str, realm: &str, password: &str) -> String {
    let credentials = format!("{username}:{realm}:{password}");
    match algorithm {
        "MD5" => hex::encode(Md5::digest(credentials)),
        "SHA-256" => hex::encode(Sha256::digest(credentials)),
        _ => password.to_owned(),
    }
}

/// `?` placeholders as PostgreSQL's `$1`, `$2`, ... (the SQL here has no `?` in
/// its literals).
fn numbered_placeholders(sql: &str) -> String {
    let mut count = 0;
    sql.chars()
        .map(|c| match c {
            '?' => {
                count += 1;
                format!("${count}")
            }
            other => other.to_string(),
        })
        .collect()
}
