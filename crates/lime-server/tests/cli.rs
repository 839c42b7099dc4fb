//! The `lime-server` binary as an operator uses it: help, check-config, db init and
//! the first run of `serve` with no config.

mod common;

use common::process::{BIN, ServerProcess};
use std::path::Path;
use std::process::{Command, Output};

fn lime_server(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run lime-server")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn example_config() -> String {
    format!(
        "{}/../../lime-server.example.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["db", "--help"],
        &["db", "init", "--help"],
        &["admin", "--help"],
        &["admin", "stats", "--help"],
        &["check-config", "--help"],
        &["admin", "device", "show", "--help"],
        &["admin", "device", "delete", "--help"],
        &["probe", "--help"],
    ] {
        let output = lime_server(args);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        assert!(stdout(&output).contains("Usage:"), "{args:?}");
    }
}

#[test]
fn the_shipped_example_config_is_valid_and_matches_the_defaults() {
    let output = lime_server(&["--config", &example_config(), "check-config"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let with_example = stdout(&output);
    assert!(with_example.contains("config is valid"));
    assert!(with_example.contains("listen: https://127.0.0.1:25519"));
    assert!(with_example.contains("metrics: off"), "{with_example}");
    // The example documents the defaults: same summary as no file at all.
    let text = std::fs::read_to_string(example_config()).unwrap();
    let example: lime_server::config::Settings = toml::from_str(&text).unwrap();
    assert_eq!(
        format!("{example:?}"),
        format!("{:?}", lime_server::config::Settings::default())
    );
}

#[test]
fn unknown_key_stops_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:1\"]\nmax_conections = 3\n",
    )
    .unwrap();
    let output = lime_server(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("max_conections"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bad_value_stops_with_the_key_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[storage]\ncurves = [\"c25519\", \"p256\"]\n").unwrap();
    let output = lime_server(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("storage.curves") && message.contains("p256"),
        "{message}"
    );
}

#[test]
fn missing_config_file_is_an_error_naming_it() {
    let output = lime_server(&["--config", "/nonexistent/lime.toml", "check-config"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("/nonexistent/lime.toml"));
}

#[test]
fn db_init_creates_the_database_once_and_leaves_it_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let first = lime_server(&["db", "init", "--curve", "c448", "--data-dir", data]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stdout(&first).contains("created"), "{}", stdout(&first));
    let file = dir.path().join("lime-c448.sqlite3");
    let conn = rusqlite::Connection::open(&file).unwrap();
    conn.execute(
        "INSERT INTO Users (UserId, Ik) VALUES ('sip:kept@example.org', x'00')",
        [],
    )
    .unwrap();
    drop(conn);

    let second = lime_server(&["db", "init", "--curve", "c448", "--data-dir", data]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stdout(&second).contains("already present"),
        "{}",
        stdout(&second)
    );
    let conn = rusqlite::Connection::open(&file).unwrap();
    let users: i64 = conn
        .query_row("SELECT COUNT(*) FROM Users", [], |row| row.get(0))
        .unwrap();
    assert_eq!(users, 1, "db init must not touch an existing database");
    assert!(!dir.path().join("lime-c25519.sqlite3").exists());
}

#[test]
fn db_init_refuses_an_unknown_curve() {
    let dir = tempfile::tempdir().unwrap();
    let output = lime_server(&[
        "db",
        "init",
        "--curve",
        "c1",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("c1"));
}

#[test]
fn serve_refuses_a_public_listener_without_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let output = lime_server(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("server.listen") && message.contains("insecure"),
        "{message}"
    );
}

/// Starts `serve` on an ephemeral port of loopback with `data_dir`.
fn start_serving(data_dir: &Path, extra: &[&str]) -> (ServerProcess, String) {
    let data_dir = data_dir.to_str().unwrap();
    let mut args = vec!["--listen", "127.0.0.1:0", "--data-dir", data_dir];
    args.extend(extra);
    let server = ServerProcess::start(&args);
    let log = server.log.clone();
    (server, log)
}

#[test]
fn first_run_makes_a_self_signed_certificate_and_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let (server, log) = start_serving(dir.path(), &[]);
    assert!(
        log.contains("authentication is OFF"),
        "no warning about authentication:\n{log}"
    );
    assert!(log.contains("self-signed"), "{log}");
    assert!(log.contains("scheme=\"https\""), "{log}");
    drop(server);
    let certificate = dir.path().join("tls/self-signed.crt");
    let first = std::fs::read(&certificate).expect("certificate written on first start");
    for curve in [
        "c25519",
        "c448",
        "c25519k512",
        "c25519mlk512",
        "c448mlk1024",
    ] {
        assert!(
            dir.path().join(format!("lime-{curve}.sqlite3")).exists(),
            "{curve}"
        );
    }

    let (server, log) = start_serving(dir.path(), &[]);
    assert!(
        !log.contains("generated a self-signed"),
        "regenerated:\n{log}"
    );
    drop(server);
    assert_eq!(std::fs::read(&certificate).unwrap(), first);
}

#[test]
fn plain_http_flag_serves_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, log) = start_serving(dir.path(), &["--plain-http"]);
    assert!(log.contains("scheme=\"http\""), "{log}");
    assert!(
        !dir.path().join("tls").exists(),
        "no certificate needed without TLS"
    );
}
