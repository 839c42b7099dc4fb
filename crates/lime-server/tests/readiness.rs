//! Readiness means "can serve writes": `/ready` makes a real write in each store,
//! so a database that answers reads but refuses writes (read-only, full, broken)
//! is not ready. And an empty SQLite file is not a new database: the server
//! refuses to start on one, naming it.
//!
//! The read-only conditions are real ones, not a flag the server itself sets:
//! SQLite files made immutable (`chattr +i`, which stops root too, even through
//! the file descriptors the server already holds), and a PostgreSQL database
//! whose sessions are read-only (`default_transaction_read_only`, as on a standby).

mod common;

use common::backend::{Backend, POSTGRES_ADMIN_URL};
use common::immutable::{Immutable, sqlite_files};
use common::{TestApp, spawn_app_on};
use lime_protocol::Curve;
use lime_server::config::Settings;
use lime_server::startup::Application;
use sqlx::Connection;
use std::time::Duration;

/// `GET /ready`: its status and text.
async fn ready(app: &TestApp) -> (u16, String) {
    let answer = app
        .client
        .request("GET", &format!("{}ready", app.base_url), &[], Vec::new())
        .await
        .expect("the server answers /ready");
    (
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
    )
}

#[tokio::test]
async fn a_sqlite_database_that_cannot_be_written_is_not_ready_and_is_again_once_it_can() {
    let app = spawn_app_on(Backend::Sqlite, |settings| {
        settings.storage.curves = vec!["c25519".into()];
    })
    .await;
    let (status, text) = ready(&app).await;
    assert_eq!(status, 200, "{text}");

    let database = app.settings.storage.sqlite_path(Curve::C25519);
    let immutable = Immutable::make(sqlite_files(&database));
    let (status, text) = ready(&app).await;
    assert_eq!(
        status, 503,
        "a database that refuses writes is not ready: {text}"
    );
    assert!(text.contains("c25519"), "{text}");

    drop(immutable);
    let (status, text) = ready(&app).await;
    assert_eq!(status, 200, "writable again, ready again: {text}");
    app.stop().await;
}

#[tokio::test]
async fn an_empty_sqlite_file_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
    settings.storage.data_dir = dir.path().to_owned();
    settings.storage.curves = vec!["c25519".into()];
    let database = settings.storage.sqlite_path(Curve::C25519);
    std::fs::write(&database, b"").unwrap();
    let error = match Application::build(&settings).await {
        Ok(_) => panic!("the server started on an empty database file"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains(&database.display().to_string()) && error.contains("empty"),
        "{error}"
    );
    assert_eq!(
        std::fs::metadata(&database).unwrap().len(),
        0,
        "the file is left as it was"
    );

    // A file that does not exist is a new database, made and served.
    std::fs::remove_file(&database).unwrap();
    let app = Application::build(&settings).await;
    assert!(app.is_ok(), "{:?}", app.err());
}

#[tokio::test]
async fn a_postgres_database_whose_sessions_are_read_only_is_not_ready() {
    let app = spawn_app_on(Backend::Postgres, |settings| {
        settings.storage.curves = vec!["c25519".into()];
    })
    .await;
    let (status, text) = ready(&app).await;
    assert_eq!(status, 200, "{text}");

    let url = app
        .settings
        .storage
        .url
        .as_deref()
        .expect("a database URL")
        .replace("{curve}", "c25519");
    let name = url.rsplit('/').next().unwrap().to_owned();
    let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL)
        .await
        .expect("PostgreSQL at the test machine's server");
    // What a standby or an operator's read-only switch looks like: new sessions
    // are read-only; the server's are cut, so it opens new ones.
    switch_sessions(&mut admin, &name, "on").await;
    let (status, text) = ready(&app).await;
    assert_eq!(status, 503, "a read-only database is not ready: {text}");

    switch_sessions(&mut admin, &name, "off").await;
    let (status, text) = ready(&app).await;
    assert_eq!(status, 200, "writable again, ready again: {text}");
    app.stop().await;
}

/// Sets `default_transaction_read_only` of database `name` to `read_only` for
/// new sessions, ends its sessions, and waits (bounded) until they are gone: a
/// session ending is a signal its backend acts on a moment later, on a loaded
/// machine more than a moment. (A connection found dead is replaced once by the
/// server's pool.)
async fn switch_sessions(admin: &mut sqlx::PgConnection, name: &str, read_only: &str) {
    sqlx::raw_sql(&format!(
        "ALTER DATABASE \"{name}\" SET default_transaction_read_only = {read_only}"
    ))
    .execute(&mut *admin)
    .await
    .unwrap();
    let ended: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(name)
    .fetch_all(&mut *admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid")
        .bind(&ended)
        .execute(&mut *admin)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
                .bind(&ended)
                .fetch_one(&mut *admin)
                .await
                .unwrap();
        if left == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} of the ended sessions of {name} still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_writable_database_is_ready_on_every_backend() {
    // MariaDB has no read-only switch of one database that would not touch the
    // other tests sharing its server: here the write itself is shown to succeed,
    // again and again.
    for backend in [Backend::Sqlite, Backend::Mariadb, Backend::Postgres] {
        let app = spawn_app_on(backend, |settings| {
            settings.storage.curves = vec!["c25519".into()];
        })
        .await;
        for _ in 0..3 {
            let (status, text) = ready(&app).await;
            assert_eq!(status, 200, "{backend:?}: {text}");
        }
        app.stop().await;
    }
}
