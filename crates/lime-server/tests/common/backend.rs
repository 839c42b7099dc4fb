//! Which store backend the black-box tests run on, and the databases each test
//! makes for itself on a database server (and drops when it ends).
//!
//! One test code for every backend: `LIME_TEST_BACKEND` picks it (`sqlite`, the
//! default, `mariadb` or `postgres`); `scripts/test.sh` runs the suites once per
//! backend. The servers are the machine's own: MariaDB on 127.0.0.1:3306 (root, no
//! password) and PostgreSQL on 127.0.0.1:5432 (postgres, trust).

use lime_protocol::Curve;
use lime_server::store::{self, StoreLocation};
use rand::RngCore;
use sqlx::Connection;

/// MariaDB as root, no database selected: where test databases are made.
pub const MARIADB_ADMIN_URL: &str = "mysql://root@127.0.0.1:3306";

/// PostgreSQL as postgres, without a database.
pub const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432";

/// PostgreSQL's maintenance database: where test databases are made.
pub const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A store backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One SQLite file per curve in the test's data directory.
    Sqlite,
    /// One MariaDB database per curve.
    Mariadb,
    /// One PostgreSQL database per curve.
    Postgres,
}

impl Backend {
    /// The backend named by `LIME_TEST_BACKEND` (SQLite when unset).
    pub fn from_env() -> Backend {
        match std::env::var("LIME_TEST_BACKEND").as_deref() {
            Err(_) | Ok("") | Ok("sqlite") => Backend::Sqlite,
            Ok("mariadb") | Ok("mysql") => Backend::Mariadb,
            Ok("postgres") | Ok("postgresql") => Backend::Postgres,
            Ok(other) => {
                panic!("LIME_TEST_BACKEND={other:?}: expected sqlite, mariadb or postgres")
            }
        }
    }
}

/// One empty database on a database server, made for one test and dropped with
/// this value (even when the test panics).
pub struct TestDatabase {
    backend: Backend,
    /// Its name, `lime_t_<random>...`.
    pub name: String,
    /// Its URL, as root (MariaDB) or postgres (PostgreSQL), without password.
    pub url: String,
}

impl TestDatabase {
    /// Makes an empty database named `name` on `backend`'s server.
    pub async fn create(backend: Backend, name: String) -> TestDatabase {
        admin(backend, &format!("CREATE DATABASE {name}")).await;
        let url = format!("{}/{name}", server_url(backend));
        TestDatabase { backend, name, url }
    }

    /// Makes an empty database with a random name.
    pub async fn empty(backend: Backend) -> TestDatabase {
        TestDatabase::create(backend, format!("lime_t_{:016x}", rand::rng().next_u64())).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        drop_databases(self.backend, vec![std::mem::take(&mut self.name)]);
    }
}

/// Drops the databases `names` on `backend`'s server, all at once: PostgreSQL
/// forces a checkpoint for each `DROP DATABASE`, and concurrent drops share one,
/// where one after the other each waits for its own (about a second each under
/// load, five times per server started on PostgreSQL).
fn drop_databases(backend: Backend, names: Vec<String>) {
    let statements: Vec<String> = names
        .iter()
        .map(|name| match backend {
            Backend::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            _ => format!("DROP DATABASE IF EXISTS {name}"),
        })
        .collect();
    // Drop runs inside the test's runtime: drop the databases from a thread of
    // our own, with a runtime of its own.
    let dropped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(futures::future::join_all(
            statements.iter().map(|sql| admin(backend, sql)),
        ));
    })
    .join();
    if dropped.is_err() {
        eprintln!("could not drop test databases {}", names.join(", "));
    }
}

/// Databases made for one test app, one per curve, with our schema (`db init`).
pub struct TestDatabases {
    backend: Backend,
    /// Dropped with this value, all at once.
    names: Vec<String>,
}

impl TestDatabases {
    /// Makes a database per curve with our schema, and returns the URL template
    /// (`{curve}` in it) that names them. SQLite needs nothing. The databases are
    /// made and set up concurrently (PostgreSQL takes a fraction of a second to
    /// copy its template for each).
    pub async fn create(backend: Backend, curves: &[Curve]) -> (TestDatabases, Option<String>) {
        let mut databases = TestDatabases {
            backend,
            names: Vec::new(),
        };
        if backend == Backend::Sqlite {
            return (databases, None);
        }
        let prefix = format!("lime_t_{:08x}", rand::rng().next_u32());
        let base = server_url(backend);
        let template = format!("{base}/{prefix}_{{curve}}");
        // Owned before they exist: dropped (if they exist) even if what follows
        // panics.
        databases.names = curves
            .iter()
            .map(|curve| format!("{prefix}_{}", curve.name()))
            .collect();
        futures::future::join_all(databases.names.iter().zip(curves).map(
            |(name, curve)| async move {
                admin(backend, &format!("CREATE DATABASE {name}")).await;
                let location = StoreLocation::parse(&format!("{base}/{name}"), *curve).unwrap();
                store::init(&location)
                    .await
                    .unwrap_or_else(|error| panic!("db init {location}: {error}"));
            },
        ))
        .await;
        (databases, Some(template))
    }
}

impl Drop for TestDatabases {
    fn drop(&mut self) {
        if !self.names.is_empty() {
            drop_databases(self.backend, std::mem::take(&mut self.names));
        }
    }
}

/// The URL of `backend`'s server, without a database.
fn server_url(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => panic!("SQLite files need no database server"),
        Backend::Mariadb => MARIADB_ADMIN_URL,
        Backend::Postgres => POSTGRES_URL,
    }
}

/// Runs one statement as the database server's administrator.
pub async fn admin(backend: Backend, sql: &str) {
    let result = match backend {
        Backend::Sqlite => return,
        Backend::Mariadb => match sqlx::MySqlConnection::connect(MARIADB_ADMIN_URL).await {
            Ok(mut conn) => sqlx::raw_sql(sql).execute(&mut conn).await.map(|_| ()),
            Err(error) => Err(error),
        },
        Backend::Postgres => match sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await {
            Ok(mut conn) => sqlx::raw_sql(sql).execute(&mut conn).await.map(|_| ()),
            Err(error) => Err(error),
        },
    };
    if let Err(error) = result {
        panic!(
            "{backend:?} at the test machine's server: `{sql}` failed: {error} \
             (scripts/test.sh starts MariaDB and PostgreSQL when they are stopped)"
        );
    }
}
