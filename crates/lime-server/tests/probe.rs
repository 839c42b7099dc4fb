//! `lime-server probe URL` against our own server, as a monitoring system would
//! run it: with digest (an account database), with a client certificate, and
//! failing (a wrong password) with the step named and a non-zero exit.

mod common;

use common::auth::TestAuth;
use common::backend::Backend;
use common::process::BIN;
use common::{TestApp, spawn_app_authenticating};
use lime_protocol::Curve;
use std::path::Path;
use std::process::{Command, Output};

/// `lime-server probe URL ARGS...` trusting the app's self-signed certificate.
fn probe(app: &TestApp, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("probe")
        .arg(&app.base_url)
        .arg("--ca")
        .arg(app.certificate_file())
        .args(args)
        .output()
        .expect("run lime-server probe")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn password_file(dir: &Path, password: &str) -> String {
    let file = dir.join("probe-password");
    std::fs::write(&file, format!("{password}\n")).unwrap();
    file.to_str().unwrap().to_owned()
}

/// A server with digest on, its account database holding prober@example.org
/// (password "s3cret").
async fn digest_server_with_prober() -> TestApp {
    let app = spawn_app_authenticating(Backend::Sqlite, TestAuth::Digest, |_| {}).await;
    let accounts = app.auth.accounts.as_ref().unwrap();
    accounts
        .add_account("prober", "example.org", "s3cret", &["MD5", "SHA-256"])
        .await;
    app
}

const STEPS: [&str; 6] = [
    "registerUser (first device)",
    "postOPks (first device)",
    "registerUser (second device)",
    "getPeerBundle (second asks for the first)",
    "deleteUser (first device)",
    "deleteUser (second device)",
];

/// Every step passed with a latency, the verdict is OK, and nothing is left.
async fn assert_passed_and_left_nothing(app: &TestApp, output: &Output, curve: Curve) {
    let out = text(output);
    assert!(output.status.success(), "{out}");
    for step in STEPS {
        let line = out
            .lines()
            .find(|line| line.contains(step))
            .unwrap_or_else(|| panic!("no step {step:?}:\n{out}"));
        assert!(line.trim_start().starts_with("ok"), "{line}");
        assert!(line.ends_with(" ms"), "{line}");
    }
    assert!(out.contains("OK: "), "{out}");
    assert!(app.probe.device_ids(curve).await.is_empty(), "{out}");
    assert_eq!(app.probe.count_one_time_pre_keys(curve).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_with_digest_passes_every_step_and_leaves_nothing() {
    let app = digest_server_with_prober().await;
    let password = password_file(app.data_dir.path(), "s3cret");

    let output = probe(
        &app,
        &["--user", "prober@example.org", "--password-file", &password],
    );
    assert_passed_and_left_nothing(&app, &output, Curve::C25519).await;

    // Another curve, the identity spelt with its scheme.
    let output = probe(
        &app,
        &[
            "--user",
            "sip:prober@example.org",
            "--password-file",
            &password,
            "--curve",
            "c448mlk1024",
        ],
    );
    assert_passed_and_left_nothing(&app, &output, Curve::C448Mlk1024).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_with_a_client_certificate_passes_every_step() {
    let app = spawn_app_authenticating(Backend::Sqlite, TestAuth::Certificate, |_| {}).await;
    let pki = app.auth.pki.as_ref().unwrap();
    let issued = pki.issue(&["sip:prober@example.org"], &[], "prober");
    let output = probe(
        &app,
        &[
            "--user",
            "prober@example.org",
            "--cert",
            issued.certificate.to_str().unwrap(),
            "--key",
            issued.private_key.to_str().unwrap(),
        ],
    );
    assert_passed_and_left_nothing(&app, &output, Curve::C25519).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_fails_at_the_first_step_with_a_non_zero_exit() {
    let app = digest_server_with_prober().await;
    let password = password_file(app.data_dir.path(), "wrong");
    let output = probe(
        &app,
        &["--user", "prober@example.org", "--password-file", &password],
    );
    let out = text(&output);
    assert!(!output.status.success(), "{out}");
    let failed = out
        .lines()
        .find(|line| line.contains(STEPS[0]))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(failed.contains("FAILED"), "{failed}");
    assert!(failed.contains("401"), "the HTTP status is shown: {failed}");
    assert!(
        out.contains(&format!("step '{}' failed", STEPS[0])),
        "the verdict names the step: {out}"
    );
    assert!(!out.contains(STEPS[1]), "no step after the failure: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_cannot_be_reached_fails_the_probe() {
    let app = spawn_app_authenticating(Backend::Sqlite, TestAuth::Off, |_| {}).await;
    let kept = tempfile::tempdir().unwrap();
    let certificate = kept.path().join("server.pem");
    std::fs::copy(app.certificate_file(), &certificate).unwrap();
    let addr = app.addr;
    app.stop().await;
    let output = Command::new(BIN)
        .args([
            "probe",
            &format!("https://{addr}/"),
            "--user",
            "p@example.org",
            "--ca",
        ])
        .arg(certificate)
        .output()
        .unwrap();
    assert!(!output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("FAILED"), "{}", text(&output));
}
