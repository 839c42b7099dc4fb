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

/// Databases made for one test, one per curve, dropped with this value.
pub struct TestDatabases {
    backend: Backend,
    names: Vec<String>,
}

impl TestDatabases {
    /// Makes an empty database per curve with our schema (`db init`), and returns
    /// the URL template (`{curve}` in it) that names them. SQLite needs nothing.
    pub async fn create(backend: Backend, curves: &[Curve]) -> (TestDatabases, Option<String>) {
        let prefix = format!("lime_t_{:08x}", rand::rng().next_u32());
        let template = match backend {
            Backend::Sqlite => {
                return (
                    TestDatabases {
                        backend,
                        names: Vec::new(),
                    },
                    None,
                );
            }
            Backend::Mariadb => format!("{MARIADB_ADMIN_URL}/{prefix}_{{curve}}"),
            Backend::Postgres => format!("postgres://postgres@127.0.0.1:5432/{prefix}_{{curve}}"),
        };
        let mut databases = TestDatabases {
            backend,
            names: Vec::new(),
        };
        for curve in curves {
            let name = format!("{prefix}_{}", curve.name());
            admin(backend, &format!("CREATE DATABASE {name}")).await;
            // Owned from here: dropped even if what follows panics.
            databases.names.push(name);
        }
        for curve in curves {
            let location = StoreLocation::parse(&template, *curve).unwrap();
            store::init(&location)
                .await
                .unwrap_or_else(|error| panic!("db init {location}: {error}"));
        }
        (databases, Some(template))
    }
}

impl Drop for TestDatabases {
    fn drop(&mut self) {
        if self.names.is_empty() {
            return;
        }
        let backend = self.backend;
        let names = std::mem::take(&mut self.names);
        // Drop runs inside the test's runtime: drop the databases from a thread of
        // our own, with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                for name in names {
                    let sql = match backend {
                        Backend::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                        _ => format!("DROP DATABASE IF EXISTS {name}"),
                    };
                    admin(backend, &sql).await;
                }
            });
        });
        let _ = dropped.join();
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
