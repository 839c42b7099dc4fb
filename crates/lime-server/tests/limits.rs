//! Abuse limits, black-box, on the backend `LIME_TEST_BACKEND` names
//! (`scripts/test.sh` runs this file on SQLite and on MariaDB): one-time keys per
//! device (the real client's own test-suite scenario), devices per user, the
//! key-bundle request limitation in both of its modes, and the purge of recorded
//! requests by the server and by `lime-server db purge-requests`.

mod common;

use common::process::BIN;
use common::{TestApp, device_id, one_time_pre_key, registration, spawn_app_with};
use lime_protocol::{Curve, ErrorCode, MessageType, Request, Response};
use lime_server::config::Settings;
use lime_server::store::OverLimit;
use std::time::Duration;

const CURVE: Curve = Curve::C25519;

/// The bundle request window of these tests, in seconds.
const WINDOW_SECS: u64 = 2;

/// The answer's error code, if it is an error.
fn error_code(response: &Response) -> Option<ErrorCode> {
    match response {
        Response::Error(error) => Some(error.code),
        _ => None,
    }
}

async fn register(app: &TestApp, device: &str, opks: u32) -> Response {
    app.ask(
        device,
        CURVE,
        Request::RegisterUser(registration(CURVE, opks, 1)),
    )
    .await
    .response
}

async fn post_opks(app: &TestApp, device: &str, first_id: u32, count: u32) -> Response {
    let keys = (first_id..first_id + count)
        .map(|id| one_time_pre_key(CURVE, id))
        .collect();
    app.ask(device, CURVE, Request::PostOneTimePreKeys(keys))
        .await
        .response
}

async fn stored_opk_ids(app: &TestApp, device: &str) -> usize {
    match app
        .ask(device, CURVE, Request::GetSelfOneTimePreKeys)
        .await
        .response
    {
        Response::SelfOneTimePreKeys(ids) => ids.len(),
        other => panic!("getSelfOPks of {device}: {other:?}"),
    }
}

fn done(response: &Response, kind: MessageType, what: &str) {
    assert_eq!(response, &Response::Done(kind), "{what}");
}

// --- One-time pre-keys per device ---------------------------------------------------

/// liblime's own test suite, against a server configured with 200: registering
/// with 500 fails, with 100 succeeds, +100 succeeds (200 stored), +100 fails and
/// the server still holds exactly 200.
#[tokio::test]
async fn one_time_pre_keys_per_device_follow_the_client_suite() {
    let app = spawn_app_with(|settings| settings.limits.max_opks_per_device = 200).await;
    let device = device_id("opks");
    let response = register(&app, &device, 500).await;
    assert_eq!(
        error_code(&response),
        Some(ErrorCode::ResourceLimitReached),
        "500 OPks: {response:?}"
    );
    assert!(
        app.probe.device_row(CURVE, &device).await.is_none(),
        "a refused registration stores nothing"
    );
    done(
        &register(&app, &device, 100).await,
        MessageType::RegisterUser,
        "100 OPks",
    );
    done(
        &post_opks(&app, &device, 101, 100).await,
        MessageType::PostOneTimePreKeys,
        "+100",
    );
    assert_eq!(stored_opk_ids(&app, &device).await, 200);
    let response = post_opks(&app, &device, 201, 100).await;
    assert_eq!(
        error_code(&response),
        Some(ErrorCode::ResourceLimitReached),
        "+100 past 200: {response:?}"
    );
    assert_eq!(stored_opk_ids(&app, &device).await, 200);
    assert_eq!(app.stored_one_time_pre_keys(CURVE).await, 200);
    app.stop().await;
}

// --- Devices per user ----------------------------------------------------------------

/// `sip:USER@example.org;gr=urn:uuid:N`: devices of one user.
fn device_of(user: &str, n: u32) -> String {
    format!("{user};gr=urn:uuid:{n:032x}")
}

#[tokio::test]
async fn one_device_more_than_allowed_per_user_is_refused() {
    let app = spawn_app_with(|settings| settings.limits.max_devices_per_user = 2).await;
    let alice = format!(
        "sip:{}",
        &device_id("alice")[4..].split(';').next().unwrap()
    );
    let bob = format!("sip:{}", &device_id("bob")[4..].split(';').next().unwrap());
    for n in 1..=2 {
        done(
            &register(&app, &device_of(&alice, n), 1).await,
            MessageType::RegisterUser,
            &format!("alice's device {n}"),
        );
    }
    let third = register(&app, &device_of(&alice, 3), 1).await;
    assert_eq!(
        error_code(&third),
        Some(ErrorCode::ResourceLimitReached),
        "alice's third device: {third:?}"
    );
    assert!(
        app.probe
            .device_row(CURVE, &device_of(&alice, 3))
            .await
            .is_none()
    );
    done(
        &register(&app, &device_of(&bob, 1), 1).await,
        MessageType::RegisterUser,
        "bob is counted apart",
    );
    // A device deleted makes room.
    done(
        &app.ask(&device_of(&alice, 1), CURVE, Request::DeleteUser)
            .await
            .response,
        MessageType::DeleteUser,
        "alice deletes device 1",
    );
    done(
        &register(&app, &device_of(&alice, 3), 1).await,
        MessageType::RegisterUser,
        "alice's third device once the first is gone",
    );
    app.stop().await;
}

#[tokio::test]
async fn device_ids_that_are_not_gruus_are_not_counted() {
    let app = spawn_app_with(|settings| settings.limits.max_devices_per_user = 1).await;
    let user = device_id("plain").replace(";gr=", ";x=");
    for n in 0..3 {
        done(
            &register(&app, &format!("{user}-{n}"), 1).await,
            MessageType::RegisterUser,
            "not a GRUU",
        );
    }
    app.stop().await;
}

// --- Key-bundle request limitation ----------------------------------------------------

fn limited(over_limit: OverLimit) -> impl FnOnce(&mut Settings) {
    move |settings| {
        settings.limits.max_bundle_requests = 5;
        settings.limits.bundle_request_window_secs = WINDOW_SECS;
        settings.limits.bundle_request_over_limit = over_limit;
    }
}

/// The flag of `target`'s bundle as `source` gets it.
async fn fetch(app: &TestApp, source: &str, target: &str) -> u8 {
    let request = Request::GetPeerBundle(vec![common::id(target)]);
    match app.ask(source, CURVE, request).await.response {
        Response::PeerBundles(bundles) => bundles[0].flag(),
        other => panic!("getPeerBundle of {target} by {source}: {other:?}"),
    }
}

/// Five fetches served with a one-time key, the sixth `over_limit`'s way, another
/// source unaffected, and a key again once the window has passed.
async fn sixth_fetch_within_the_window(over_limit: OverLimit, sixth_flag: u8) {
    let app = spawn_app_with(limited(over_limit)).await;
    let (source, other, target) = (device_id("source"), device_id("other"), device_id("target"));
    done(
        &register(&app, &target, 20).await,
        MessageType::RegisterUser,
        "target",
    );
    for fetch_number in 1..=5 {
        assert_eq!(
            fetch(&app, &source, &target).await,
            1,
            "fetch {fetch_number} within the limit"
        );
    }
    assert_eq!(
        fetch(&app, &source, &target).await,
        sixth_flag,
        "sixth fetch"
    );
    assert_eq!(fetch(&app, &other, &target).await, 1, "another source");
    // Served bundles are recorded; a refused one is not.
    let recorded = app.probe.requests(CURVE).await;
    let by_source = recorded.iter().filter(|(s, _)| *s == source).count();
    assert_eq!(by_source, if sixth_flag == 2 { 5 } else { 6 });
    tokio::time::sleep(Duration::from_millis(WINDOW_SECS * 1_000 + 1_500)).await;
    assert_eq!(
        fetch(&app, &source, &target).await,
        1,
        "once the window has passed"
    );
    app.stop().await;
}

#[tokio::test]
async fn past_the_bundle_limit_bundles_come_without_a_one_time_key() {
    sixth_fetch_within_the_window(OverLimit::WithoutOneTimePreKey, 0).await;
}

#[tokio::test]
async fn past_the_bundle_limit_no_bundle_is_served() {
    sixth_fetch_within_the_window(OverLimit::NoBundle, 2).await;
}

#[tokio::test]
async fn a_device_named_twice_counts_once_and_repeats_follow_its_fate() {
    let app = spawn_app_with(limited(OverLimit::NoBundle)).await;
    let (source, target) = (device_id("source"), device_id("target"));
    done(
        &register(&app, &target, 20).await,
        MessageType::RegisterUser,
        "target",
    );
    let twice = Request::GetPeerBundle(vec![common::id(&target), common::id(&target)]);
    for round in 1..=6 {
        let flags: Vec<u8> = match app.ask(&source, CURVE, twice.clone()).await.response {
            Response::PeerBundles(bundles) => bundles.iter().map(|b| b.flag()).collect(),
            other => panic!("{other:?}"),
        };
        let expected = if round <= 5 { [1, 0] } else { [2, 2] };
        assert_eq!(flags, expected, "round {round}");
    }
    app.stop().await;
}

// --- Purge -------------------------------------------------------------------------------

/// Records one old and one young request for the purge to sort out.
async fn old_and_young_requests(app: &TestApp) -> (String, String) {
    let (old, young) = (device_id("old"), device_id("young"));
    let target = device_id("target");
    app.probe.insert_request(CURVE, &old, &target, 1_000).await;
    app.probe.insert_request(CURVE, &young, &target, 10).await;
    (old, young)
}

fn sources(requests: &[(String, String)]) -> Vec<&str> {
    requests.iter().map(|(source, _)| source.as_str()).collect()
}

#[tokio::test]
async fn the_server_purges_old_requests_periodically() {
    let app = spawn_app_with(|settings| {
        settings.limits.max_bundle_requests = 5;
        settings.limits.bundle_request_window_secs = 60;
        settings.limits.request_retention_secs = 100;
        settings.limits.request_purge_interval_secs = 1;
    })
    .await;
    let (old, young) = old_and_young_requests(&app).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let requests = app.probe.requests(CURVE).await;
        if !sources(&requests).contains(&old.as_str()) {
            assert_eq!(sources(&requests), [young.as_str()], "the young row stays");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old request is still there after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn db_purge_requests_deletes_only_what_is_past_the_retention() {
    let app = spawn_app_with(|settings| settings.limits.request_purge_interval_secs = 0).await;
    let (old, young) = old_and_young_requests(&app).await;
    let mut command = std::process::Command::new(BIN);
    command
        .args([
            "db",
            "purge-requests",
            "--curve",
            "c25519",
            "--retention-secs",
            "100",
        ])
        .arg("--data-dir")
        .arg(&app.settings.storage.data_dir);
    if let Some(url) = &app.settings.storage.url {
        command.args(["--store", url]);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("lime-server runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("c25519: 1 bundle requests older than 100s deleted"),
        "{stdout}"
    );
    let requests = app.probe.requests(CURVE).await;
    assert_eq!(
        sources(&requests),
        [young.as_str()],
        "{old} purged, {young} kept"
    );
    app.stop().await;
}
