//! `lime-server admin device show|delete` as support uses them ("my messages
//! can't be decrypted"), against a running server's stores on each backend:
//! SQLite, and the machine's MariaDB and PostgreSQL whatever `LIME_TEST_BACKEND`
//! says.

mod common;

use common::backend::Backend;
use common::process::BIN;
use common::{TestApp, device_id, registration, spawn_app_on};
use lime_protocol::{Curve, Request, Response};
use std::io::Write;
use std::process::{Command, Output, Stdio};

/// `lime-server admin device ARGS...` on the app's stores, with `stdin` typed in.
fn admin_device(app: &TestApp, args: &[&str], stdin: &str) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(["admin", "device"])
        .args(args)
        .arg("--data-dir")
        .arg(&app.settings.storage.data_dir);
    if let Some(url) = &app.settings.storage.url {
        command.args(["--store", url]);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lime-server admin device");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn register(app: &TestApp, device: &str, curve: Curve, opks: u32) {
    let answer = app
        .ask(
            device,
            curve,
            Request::RegisterUser(registration(curve, opks, 1)),
        )
        .await;
    assert!(matches!(answer.response, Response::Done(_)), "{answer:?}");
}

async fn device_show_and_delete(backend: Backend) {
    let app = spawn_app_on(backend, |settings| {
        // Bundles served are recorded only under a bundle request limit.
        settings.limits.max_bundle_requests = 100;
    })
    .await;
    let alice = device_id("alice");
    let bob = device_id("bob");
    register(&app, &alice, Curve::C25519, 5).await;
    register(&app, &bob, Curve::C25519, 0).await;
    register(&app, &bob, Curve::C448, 0).await;
    let bundle = app
        .ask(
            &bob,
            Curve::C25519,
            Request::GetPeerBundle(vec![common::id(&alice)]),
        )
        .await;
    assert!(
        matches!(bundle.response, Response::PeerBundles(_)),
        "{bundle:?}"
    );

    let shown = admin_device(&app, &["show", &alice], "");
    let out = text(&shown);
    assert!(shown.status.success(), "{out}");
    assert!(out.contains("c25519: registered"), "{out}");
    assert!(out.contains("signed pre-key id 1"), "{out}");
    assert!(out.contains("age unknown"), "{out}");
    assert!(out.contains("4 one-time pre-keys"), "{out}");
    assert!(out.contains("c448: not registered"), "{out}");
    let as_target = out
        .split("as target")
        .nth(1)
        .expect("a section of requests as target");
    assert!(
        as_target.contains(&bob),
        "bob's request for alice's bundle: {out}"
    );
    assert!(as_target.contains(" UTC"), "with its time: {out}");

    let shown = text(&admin_device(&app, &["show", &bob], ""));
    assert!(shown.contains("c448: registered"), "{shown}");
    let as_source = shown.split("as source").nth(1).unwrap();
    let as_source = as_source.split("as target").next().unwrap();
    assert!(
        as_source.contains(&alice),
        "bob asked for alice's bundle: {shown}"
    );

    // Without --yes it asks; anything but yes keeps the device.
    let refused = admin_device(&app, &["delete", &alice], "n\n");
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("c25519"),
        "the question names the curves"
    );
    assert!(admin_device(&app, &["show", &alice], "").status.success());

    let deleted = admin_device(&app, &["delete", &alice], "yes\n");
    assert!(deleted.status.success(), "{}", text(&deleted));
    let gone = admin_device(&app, &["show", &alice], "");
    assert!(
        !gone.status.success(),
        "an unknown device is an error for scripts"
    );
    assert!(
        text(&gone).contains("not registered on any"),
        "{}",
        text(&gone)
    );

    let deleted = admin_device(&app, &["delete", "--yes", &bob], "");
    assert!(deleted.status.success(), "{}", text(&deleted));
    assert!(text(&deleted).contains("c448"), "{}", text(&deleted));
    assert!(app.probe.device_row(Curve::C448, &bob).await.is_none());
    assert!(app.probe.device_row(Curve::C25519, &bob).await.is_none());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn device_show_and_delete_on_sqlite() {
    device_show_and_delete(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn device_show_and_delete_on_mariadb() {
    device_show_and_delete(Backend::Mariadb).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn device_show_and_delete_on_postgres() {
    device_show_and_delete(Backend::Postgres).await;
}

#[test]
fn show_refuses_a_malformed_device_id() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args(["admin", "device", "show", "", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(text(&output).contains("device id"), "{}", text(&output));
}

#[test]
fn a_data_directory_without_databases_is_an_error_and_stays_empty() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args([
            "admin",
            "device",
            "show",
            "sip:a@example.org;gr=1",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let said = text(&output);
    assert!(said.contains("does not exist"), "{said}");
    assert!(said.contains(&dir.path().display().to_string()), "{said}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created"
    );
}
