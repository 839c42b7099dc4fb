//! The operator's account database, looked up as digest authentication will, on
//! each backend: an SQLite file, the machine's MariaDB (127.0.0.1:3306, root
//! without password) and PostgreSQL (127.0.0.1:5432, postgres, trust). Each test
//! makes its own database; one that cannot reach a server fails and says so.

mod common;

use common::accounts::{AccountsFixture, stored_secret};
use common::backend::Backend;
use lime_server::auth::accounts::{
    AccountDatabase, AccountDatabaseOptions, AccountError, DEFAULT_ACCOUNTS_QUERY,
    PasswordAlgorithm, StoredPassword,
};
use std::time::Duration;

/// Runs each story once per backend: `sqlite::name`, `mariadb::name`,
/// `postgres::name`.
macro_rules! on_every_backend {
    ($($story:ident),* $(,)?) => {
        on_backend!(sqlite, Sqlite, $($story),*);
        on_backend!(mariadb, Mariadb, $($story),*);
        on_backend!(postgres, Postgres, $($story),*);
    };
}

macro_rules! on_backend {
    ($module:ident, $backend:ident, $($story:ident),*) => {
        mod $module {
            $(
                #[tokio::test]
                async fn $story() {
                    super::$story(super::Backend::$backend).await;
                }
            )*
        }
    };
}

on_every_backend!(
    md5_and_sha256_rows_are_both_returned,
    clear_text_row_gives_the_password,
    unknown_username_has_no_passwords,
    username_in_another_domain_has_no_passwords,
    custom_query_reads_other_tables,
    binary_password_column_is_read_as_text,
    query_with_syntax_error_fails_at_connect,
    query_with_one_column_fails_at_connect,
    unreachable_database_fails_at_connect_with_its_location,
    rows_with_unknown_algorithm_are_skipped,
    username_in_another_spelling_has_no_passwords,
    domain_in_another_spelling_has_no_passwords,
    case_insensitive_custom_query_gives_another_spelling_nothing,
    query_without_a_username_column_fails_at_connect,
    previous_default_query_is_read_as_the_current_one,
);

fn options() -> AccountDatabaseOptions {
    AccountDatabaseOptions {
        pool_size: 2,
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
        cache_time_to_live: Duration::ZERO,
    }
}

async fn connect(fixture: &AccountsFixture, query: &str) -> AccountDatabase {
    AccountDatabase::connect(&fixture.url, query, &options())
        .await
        .unwrap_or_else(|error| panic!("{:?} at {}: {error}", fixture.backend, fixture.url))
}

/// The passwords sorted by algorithm: without ORDER BY, row order is the
/// database's choice.
async fn sorted_passwords(
    accounts: &AccountDatabase,
    username: &str,
    domain: &str,
) -> Vec<StoredPassword> {
    let mut passwords = accounts.passwords(username, domain).await.unwrap();
    passwords.sort_by_key(|stored| stored.algorithm.name());
    passwords
}

fn stored(algorithm: PasswordAlgorithm, secret: impl Into<String>) -> StoredPassword {
    StoredPassword {
        algorithm,
        secret: secret.into(),
    }
}

async fn md5_and_sha256_rows_are_both_returned(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    fixture
        .add_account("alice", "example.org", "s3cret", &["MD5", "SHA-256"])
        .await;
    let accounts = connect(&fixture, DEFAULT_ACCOUNTS_QUERY).await;

    let passwords = sorted_passwords(&accounts, "alice", "example.org").await;

    assert_eq!(
        passwords,
        [
            stored(
                PasswordAlgorithm::Md5,
                stored_secret("MD5", "alice", "example.org", "s3cret")
            ),
            stored(
                PasswordAlgorithm::Sha256,
                stored_secret("SHA-256", "alice", "example.org", "s3cret")
            ),
        ]
    );
}

async fn clear_text_row_gives_the_password(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    fixture
        .add_account("bob", "example.org", "p@ss:word", &["CLRTXT"])
        .await;
    let accounts = connect(&fixture, DEFAULT_ACCOUNTS_QUERY).await;

    let passwords = accounts.passwords("bob", "example.org").await.unwrap();

    assert_eq!(
        passwords,
        [stored(PasswordAlgorithm::ClearText, "p@ss:word")]
    );
}

async fn unknown_username_has_no_passwords(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    fixture
        .add_account("alice", "example.org", "s3cret", &["MD5"])
        .await;
    let accounts = connect(&fixture, DEFAULT_ACCOUNTS_QUERY).await;

    let passwords = accounts.passwords("mallory", "example.org").await.unwrap();

    assert_eq!(passwords, []);
}

async fn username_in_another_domain_has_no_passwords(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    fixture
        .add_account("alice", "example.org", "s3cret", &["MD5"])
        .await;
    let accounts = connect(&fixture, DEFAULT_ACCOUNTS_QUERY).await;

    let passwords = accounts.passwords("alice", "example.com").await.unwrap();

    assert_eq!(passwords, []);
}

async fn custom_query_reads_other_tables(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    fixture
        .execute(
            "CREATE TABLE sip_users (login VARCHAR(64) NOT NULL, alias VARCHAR(64) NOT NULL, \
                 realm VARCHAR(64) NOT NULL, ha1 VARCHAR(128) NOT NULL, \
                 hash_kind VARCHAR(16) NOT NULL, note VARCHAR(64) NOT NULL);
             INSERT INTO sip_users VALUES \
                 ('carol', 'c.smith', 'example.org', 'c0ffee', 'md5', 'active'), \
                 ('carol', 'c.smith', 'example.net', 'beef', 'MD5', 'active'), \
                 ('carol', 'c.smith', 'example.org', 'hidden', 'CLRTXT', ':username');",
        )
        .await;
    // `:username` three times, `:domain` once, and a literal that looks like a
    // name. The stored spelling is whichever name matched: an alias is the
    // operator's choice, made in the query.
    let query = "SELECT ha1, hash_kind, \
                 CASE WHEN login = :username THEN login ELSE alias END AS username \
                 FROM sip_users \
                 WHERE (login = :username OR alias = :username) AND realm = :domain \
                 AND note <> ':username'";
    let accounts = connect(&fixture, query).await;

    let by_login = accounts.passwords("carol", "example.org").await.unwrap();
    let by_alias = accounts.passwords("c.smith", "example.org").await.unwrap();

    assert_eq!(by_login, [stored(PasswordAlgorithm::Md5, "c0ffee")]);
    assert_eq!(by_alias, by_login);
}

async fn binary_password_column_is_read_as_text(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    let (column_type, bytes_of): (&str, fn(&str) -> String) = match backend {
        Backend::Sqlite => ("BLOB", |text| format!("CAST('{text}' AS BLOB)")),
        Backend::Mariadb => ("VARBINARY(128)", |text| format!("'{text}'")),
        Backend::Postgres => ("BYTEA", |text| format!("convert_to('{text}', 'UTF8')")),
    };
    fixture
        .execute(&format!(
            "CREATE TABLE binary_users (login VARCHAR(64) NOT NULL, \
                 secret {column_type} NOT NULL, kind {column_type} NOT NULL);
             INSERT INTO binary_users VALUES ('dave', {}, {});",
            bytes_of("0123abcd"),
            bytes_of("SHA-256"),
        ))
        .await;
    let query = "SELECT secret, kind, login AS username FROM binary_users WHERE login = :username";
    let accounts = connect(&fixture, query).await;

    let passwords = accounts.passwords("dave", "any.example").await.unwrap();

    assert_eq!(passwords, [stored(PasswordAlgorithm::Sha256, "0123abcd")]);
}

async fn query_with_syntax_error_fails_at_connect(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    let query = "SELECT password, algorithm FRM passwords WHERE account_id = :username";

    let error = AccountDatabase::connect(&fixture.url, query, &options())
        .await
        .unwrap_err();

    assert!(matches!(error, AccountError::BadQuery { .. }), "{error:?}");
    assert!(
        error.to_string().contains("account query is not usable"),
        "{error}"
    );
}

async fn query_with_one_column_fails_at_connect(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    let query = "SELECT username FROM accounts WHERE username = :username";

    let error = AccountDatabase::connect(&fixture.url, query, &options())
        .await
        .unwrap_err();

    assert!(matches!(error, AccountError::BadQuery { .. }), "{error:?}");
    assert!(error.to_string().contains("1 column"), "{error}");
}

async fn unreachable_database_fails_at_connect_with_its_location(backend: Backend) {
    let missing_dir = tempfile::tempdir().unwrap();
    let missing_file = missing_dir.path().join("absent.db");
    let (url, location) = match backend {
        Backend::Sqlite => {
            let url = format!("sqlite://{}", missing_file.display());
            (url.clone(), url)
        }
        Backend::Mariadb => (
            "mariadb://root:hunter2@127.0.0.1:1/x".to_owned(),
            "mysql://root:***@127.0.0.1:1/x".to_owned(),
        ),
        Backend::Postgres => (
            "postgres://postgres:hunter2@127.0.0.1:1/x".to_owned(),
            "postgres://postgres:***@127.0.0.1:1/x".to_owned(),
        ),
    };

    let error = AccountDatabase::connect(&url, DEFAULT_ACCOUNTS_QUERY, &options())
        .await
        .unwrap_err();

    assert!(matches!(error, AccountError::Connect { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&location), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

async fn rows_with_unknown_algorithm_are_skipped(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    fixture
        .add_account("erin", "example.org", "s3cret", &["SHA-512", "MD5"])
        .await;
    let accounts = connect(&fixture, DEFAULT_ACCOUNTS_QUERY).await;

    let passwords = accounts.passwords("erin", "example.org").await.unwrap();

    assert_eq!(
        passwords,
        [stored(
            PasswordAlgorithm::Md5,
            stored_secret("MD5", "erin", "example.org", "s3cret")
        )]
    );
}

/// SQLite has no sleep: the time-out is shown on the database servers only.
#[tokio::test]
async fn mariadb_lookup_past_its_time_out_is_a_timeout() {
    lookup_past_its_time_out_is_a_timeout(
        Backend::Mariadb,
        "SELECT 'x', 'MD5', 'fast' AS username FROM DUAL \
         WHERE SLEEP(IF(:username = 'slow', 3, 0)) = 0",
    )
    .await;
}

#[tokio::test]
async fn postgres_lookup_past_its_time_out_is_a_timeout() {
    lookup_past_its_time_out_is_a_timeout(
        Backend::Postgres,
        "SELECT 'x', 'MD5', 'fast' AS username \
         FROM pg_sleep(CASE WHEN :username = 'slow' THEN 3 ELSE 0 END)",
    )
    .await;
}

/// A query that sleeps for the user `slow` only (not for the start-up check).
async fn lookup_past_its_time_out_is_a_timeout(backend: Backend, sleepy_query: &str) {
    let fixture = AccountsFixture::create(backend).await;
    // Half the slow query's 3 s: the start-up check and the fast lookup, which go
    // through the same pool, must fit in it too on a loaded machine.
    let options = AccountDatabaseOptions {
        timeout: Duration::from_millis(1_500),
        ..options()
    };
    let accounts = AccountDatabase::connect(&fixture.url, sleepy_query, &options)
        .await
        .unwrap();

    let error = accounts.passwords("slow", "example.org").await.unwrap_err();
    let fast = accounts.passwords("fast", "example.org").await.unwrap();

    assert!(matches!(error, AccountError::Timeout(_)), "{error:?}");
    assert_eq!(fast, [stored(PasswordAlgorithm::Md5, "x")]);
}

/// MariaDB's default collations (utf8mb4_unicode_ci here, utf8mb4_general_ci
/// elsewhere) ignore case, accents and trailing spaces: `ALICE`, `alicé` and
/// `alice ` find alice's row. The identity would be the client's spelling, a
/// device namespace of its own: only the account's own spelling gets passwords.
async fn username_in_another_spelling_has_no_passwords(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    fixture
        .add_account("alice", "example.org", "s3cret", &["CLRTXT"])
        .await;
    let accounts = connect(&fixture, DEFAULT_ACCOUNTS_QUERY).await;

    for spelling in ["ALICE", "Alice", "alicé", "alice ", "álice"] {
        let passwords = accounts.passwords(spelling, "example.org").await.unwrap();
        assert_eq!(passwords, [], "{backend:?}: {spelling:?}");
    }
    let passwords = accounts.passwords("alice", "example.org").await.unwrap();
    assert_eq!(passwords, [stored(PasswordAlgorithm::ClearText, "s3cret")]);
}

/// Without `auth.realm`, the realm is the device id's domain: another spelling of
/// the domain would be another namespace too.
async fn domain_in_another_spelling_has_no_passwords(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    fixture
        .add_account("alice", "example.org", "s3cret", &["CLRTXT"])
        .await;
    let accounts = connect(&fixture, DEFAULT_ACCOUNTS_QUERY).await;

    for domain in ["EXAMPLE.ORG", "Example.org", "example.org ", "exámple.org"] {
        let passwords = accounts.passwords("alice", domain).await.unwrap();
        assert_eq!(passwords, [], "{backend:?}: {domain:?}");
    }
}

/// An operator's query that compares names without case, on any backend: the
/// `username` column it returns is what decides.
async fn case_insensitive_custom_query_gives_another_spelling_nothing(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    fixture
        .add_account("alice", "example.org", "s3cret", &["CLRTXT"])
        .await;
    let comparison = match backend {
        Backend::Sqlite => "accounts.username = :username COLLATE NOCASE",
        Backend::Mariadb => "accounts.username = :username",
        Backend::Postgres => "lower(accounts.username) = lower(:username)",
    };
    let query = format!(
        "SELECT passwords.password, passwords.algorithm, accounts.username \
         FROM accounts JOIN passwords ON passwords.account_id = accounts.id \
         WHERE {comparison}"
    );
    let accounts = connect(&fixture, &query).await;

    let other = accounts.passwords("ALICE", "example.org").await.unwrap();
    let own = accounts.passwords("alice", "example.org").await.unwrap();

    assert_eq!(other, []);
    assert_eq!(own, [stored(PasswordAlgorithm::ClearText, "s3cret")]);
}

/// Without the stored spelling the server cannot tell `ALICE` from `alice`: the
/// query is refused at start, saying what to add.
async fn query_without_a_username_column_fails_at_connect(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    let query = "SELECT passwords.password, passwords.algorithm, accounts.id \
                 FROM accounts JOIN passwords ON passwords.account_id = accounts.id \
                 WHERE accounts.username = :username";

    let error = AccountDatabase::connect(&fixture.url, query, &options())
        .await
        .unwrap_err();

    assert!(matches!(error, AccountError::BadQuery { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("username"), "{message}");
}

/// The query this server shipped as its default (two columns) is still accepted
/// where operators copied it from the example configuration: it is read as the
/// current default, which returns the stored spelling.
async fn previous_default_query_is_read_as_the_current_one(backend: Backend) {
    let fixture = AccountsFixture::create(backend).await;
    fixture
        .add_account("alice", "example.org", "s3cret", &["CLRTXT"])
        .await;
    let previous = "SELECT passwords.password, passwords.algorithm FROM accounts \
                    JOIN passwords ON passwords.account_id = accounts.id \
                    WHERE accounts.username = :username AND accounts.domain = :domain";
    let accounts = connect(&fixture, previous).await;

    let other = accounts.passwords("ALICE", "example.org").await.unwrap();
    let own = accounts.passwords("alice", "example.org").await.unwrap();

    assert_eq!(other, []);
    assert_eq!(own, [stored(PasswordAlgorithm::ClearText, "s3cret")]);
}

/// What an operator sees when the server starts with a query that returns no
/// stored spelling: the key, and what to add.
#[tokio::test]
async fn start_up_error_names_the_key_of_a_query_without_username() {
    let fixture = AccountsFixture::create(Backend::Sqlite).await;
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "a nonce secret long enough\n").unwrap();
    let mut settings = lime_server::config::Settings::default();
    let digest = &mut settings.auth.digest;
    digest.accounts_url = Some(fixture.url.clone());
    digest.accounts_query =
        "SELECT password, algorithm FROM passwords WHERE account_id = :username".into();
    digest.nonce_secret_file = Some(secret.path().to_owned());
    settings.validate().unwrap();

    let error =
        match lime_server::auth::Authenticator::from_settings(&settings.auth, &settings.federation)
            .await
        {
            Ok(_) => panic!("a query without username must not start"),
            Err(error) => format!("{error:#}"),
        };

    assert!(error.contains("auth.digest.accounts_query"), "{error}");
    assert!(error.contains("no `username` column"), "{error}");
    assert!(error.contains("accounts.username"), "{error}");
}
