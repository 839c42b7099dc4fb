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
use std::time::{Duration, Instant};

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
///
/// The window is counted in whole seconds (a request made at 12:00:00.9 is out of
/// a 2 s window at 12:00:02.0): all six fetches fall within it only if they take
/// less than `WINDOW_SECS - 1` s. On a machine too slow for that, the sixth may
/// rightly be served; the story is then told again with new devices.
async fn sixth_fetch_within_the_window(over_limit: OverLimit, sixth_flag: u8) {
    let app = spawn_app_with(limited(over_limit)).await;
    let surely_within = Duration::from_secs(WINDOW_SECS - 1);
    let mut attempt = 0;
    let (source, target, fifth_answered) = loop {
        attempt += 1;
        let (source, other, target) =
            (device_id("source"), device_id("other"), device_id("target"));
        for (device, opks) in [(&target, 20), (&source, 0), (&other, 0)] {
            done(
                &register(&app, device, opks).await,
                MessageType::RegisterUser,
                device,
            );
        }
        let first_fetch = Instant::now();
        for fetch_number in 1..=5 {
            assert_eq!(
                fetch(&app, &source, &target).await,
                1,
                "fetch {fetch_number} within the limit"
            );
        }
        let fifth_answered = Instant::now();
        let sixth = fetch(&app, &source, &target).await;
        let took = first_fetch.elapsed();
        if sixth != sixth_flag && took >= surely_within && attempt < 5 {
            eprintln!("six fetches took {took:?}, past what the window surely holds: again");
            continue;
        }
        assert_eq!(sixth, sixth_flag, "sixth fetch, {took:?} after the first");
        assert_eq!(fetch(&app, &other, &target).await, 1, "another source");
        // Bundles served within the limit are recorded; past it, nothing is.
        let recorded = app.probe.requests(CURVE).await;
        let by_source = recorded.iter().filter(|(s, _)| *s == source).count();
        assert_eq!(by_source, 5);
        break (source, target, fifth_answered);
    };
    // The five recorded requests were all made before the fifth answer.
    let window_passed = Duration::from_millis(WINDOW_SECS * 1_000 + 1_500);
    tokio::time::sleep(window_passed.saturating_sub(fifth_answered.elapsed())).await;
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
    // A long window: all six rounds are within it however slow the machine.
    let app = spawn_app_with(|settings| {
        limited(OverLimit::NoBundle)(settings);
        settings.limits.bundle_request_window_secs = 600;
    })
    .await;
    let (source, target) = (device_id("source"), device_id("target"));
    for (device, opks) in [(&target, 20), (&source, 0)] {
        done(
            &register(&app, device, opks).await,
            MessageType::RegisterUser,
            device,
        );
    }
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

/// `count` target devices registered, with 5 one-time pre-keys each.
async fn registered_targets(app: &TestApp, count: usize) -> Vec<String> {
    let targets: Vec<String> = (0..count).map(|_| device_id("target")).collect();
    for target in &targets {
        done(
            &register(app, target, 5).await,
            MessageType::RegisterUser,
            target,
        );
    }
    targets
}

/// The flags of `targets`' bundles as `source` gets them in one request.
async fn fetch_all(app: &TestApp, source: &str, targets: &[String]) -> Vec<u8> {
    let request = Request::GetPeerBundle(targets.iter().map(|t| common::id(t)).collect());
    match app.ask(source, CURVE, request).await.response {
        Response::PeerBundles(bundles) => bundles.iter().map(|b| b.flag()).collect(),
        other => panic!("getPeerBundle by {source}: {other:?}"),
    }
}

/// `sip:NAME-xxxxxxxx@example.org`: a user of its own.
fn user(name: &str) -> String {
    device_id(name).split(';').next().unwrap().to_owned()
}

/// The requests recorded for sources of `user`.
async fn recorded_by(app: &TestApp, user: &str) -> usize {
    let prefix = format!("{user};gr=");
    let requests = app.probe.requests(CURVE).await;
    requests
        .iter()
        .filter(|(s, _)| s.starts_with(&prefix))
        .count()
}

/// liblime registers a device before it fetches anyone's bundle: a source that is
/// not a registered device (a device id made up for the request) gets
/// `user_not_found`, as postOPks and getSelfOPks from such a device do, and takes
/// nothing. Bundle request limit on or off.
#[tokio::test]
async fn unregistered_source_gets_no_bundle() {
    for max_bundle_requests in [0, 5] {
        let app = spawn_app_with(|settings| {
            settings.limits.max_bundle_requests = max_bundle_requests;
        })
        .await;
        let target = device_id("target");
        done(
            &register(&app, &target, 50).await,
            MessageType::RegisterUser,
            "target",
        );
        let mallory = user("mallory");
        for n in 0..20 {
            let request = Request::GetPeerBundle(vec![common::id(&target)]);
            let answer = app.ask(&device_of(&mallory, n), CURVE, request).await;
            assert_eq!(
                error_code(&answer.response),
                Some(ErrorCode::UserNotFound),
                "fetch {n} from an unregistered device: {:?}",
                answer.response
            );
        }
        assert_eq!(
            app.stored_one_time_pre_keys(CURVE).await,
            50,
            "nothing taken"
        );
        assert!(
            app.probe.requests(CURVE).await.is_empty(),
            "nothing recorded"
        );
        // Registered, the same device is served.
        done(
            &register(&app, &device_of(&mallory, 0), 0).await,
            MessageType::RegisterUser,
            "mallory registers",
        );
        assert_eq!(fetch(&app, &device_of(&mallory, 0), &target).await, 1);
        app.stop().await;
    }
}

/// The story of issue 9: one account fetching a victim's bundle from ever new
/// device ids. Each is registered (then deleted, so that the devices-per-user
/// limit never stops it): the account still takes at most
/// `max_bundle_requests_per_identity` of the victim's one-time keys per window.
#[tokio::test]
async fn one_identity_takes_at_most_n_one_time_keys_of_a_target_with_fresh_device_ids() {
    const PER_IDENTITY: u32 = 3;
    let app = spawn_app_with(|settings| {
        limited(OverLimit::WithoutOneTimePreKey)(settings);
        settings.limits.bundle_request_window_secs = 600;
        settings.limits.max_bundle_requests_per_identity = PER_IDENTITY;
    })
    .await;
    let (target, mallory) = (device_id("victim"), user("mallory"));
    done(
        &register(&app, &target, 50).await,
        MessageType::RegisterUser,
        "victim",
    );
    let mut with_key = 0;
    for n in 0..20 {
        let device = device_of(&mallory, n);
        done(
            &register(&app, &device, 0).await,
            MessageType::RegisterUser,
            &device,
        );
        if fetch(&app, &device, &target).await == 1 {
            with_key += 1;
        }
        done(
            &app.ask(&device, CURVE, Request::DeleteUser).await.response,
            MessageType::DeleteUser,
            &device,
        );
    }
    assert_eq!(with_key, PER_IDENTITY, "one-time keys mallory got");
    assert_eq!(
        stored_opk_ids(&app, &target).await,
        50 - PER_IDENTITY as usize,
        "the victim's keys left"
    );
    // Another account is counted apart.
    let alice = device_of(&user("alice"), 1);
    done(
        &register(&app, &alice, 0).await,
        MessageType::RegisterUser,
        "alice",
    );
    assert_eq!(fetch(&app, &alice, &target).await, 1, "alice gets a key");
    app.stop().await;
}

/// Past the limit a source gets a bundle without a one-time key, and the
/// `Requests` table does not grow: only bundles served within the limit are
/// recorded.
#[tokio::test]
async fn requests_over_the_limit_are_not_recorded() {
    // A long window: all 30 fetches are within it however slow the machine.
    let app = spawn_app_with(|settings| {
        limited(OverLimit::WithoutOneTimePreKey)(settings);
        settings.limits.bundle_request_window_secs = 600;
    })
    .await;
    let (source, target) = (device_id("source"), device_id("target"));
    for (device, opks) in [(&target, 50), (&source, 0)] {
        done(
            &register(&app, device, opks).await,
            MessageType::RegisterUser,
            device,
        );
    }
    let mut flags = Vec::new();
    for _ in 0..30 {
        flags.push(fetch(&app, &source, &target).await);
    }
    assert_eq!(flags.iter().filter(|flag| **flag == 1).count(), 5);
    assert_eq!(flags.iter().filter(|flag| **flag == 0).count(), 25);
    assert_eq!(app.probe.requests(CURVE).await.len(), 5, "rows recorded");
    app.stop().await;
}

/// Rows per account are bounded across all targets: past
/// `max_recorded_requests_per_identity` within a window, the account's devices
/// (any of them) get bundles the over-limit way, and nothing more is recorded.
#[tokio::test]
async fn rows_per_source_are_bounded() {
    const CAP: u32 = 4;
    let app = spawn_app_with(|settings| {
        limited(OverLimit::WithoutOneTimePreKey)(settings);
        settings.limits.bundle_request_window_secs = 600;
        settings.limits.max_recorded_requests_per_identity = CAP;
    })
    .await;
    let targets = registered_targets(&app, 6).await;
    let mallory = user("mallory");
    let (first, second) = (device_of(&mallory, 1), device_of(&mallory, 2));
    let alice = device_of(&user("alice"), 1);
    for device in [&first, &second, &alice] {
        done(
            &register(&app, device, 0).await,
            MessageType::RegisterUser,
            device,
        );
    }
    assert_eq!(fetch_all(&app, &first, &targets).await, [1, 1, 1, 1, 0, 0]);
    for round in 0..5 {
        for device in [&first, &second] {
            let flags = fetch_all(&app, device, &targets).await;
            assert_eq!(flags, [0; 6], "round {round}, {device}");
        }
    }
    assert_eq!(recorded_by(&app, &mallory).await, CAP as usize);
    assert_eq!(
        fetch_all(&app, &alice, &targets).await,
        [1, 1, 1, 1, 0, 0],
        "another account has a budget of its own"
    );
    assert_eq!(app.probe.requests(CURVE).await.len(), 2 * CAP as usize);
    app.stop().await;
}

/// The rows recorded for an identity are counted per window: in the next one,
/// its devices get one-time keys again, up to the cap.
#[tokio::test]
async fn rows_per_identity_are_counted_afresh_in_each_window() {
    let app = spawn_app_with(|settings| {
        limited(OverLimit::WithoutOneTimePreKey)(settings);
        settings.limits.max_recorded_requests_per_identity = 2;
    })
    .await;
    let targets = registered_targets(&app, 3).await;
    let source = device_of(&user("mallory"), 1);
    done(
        &register(&app, &source, 0).await,
        MessageType::RegisterUser,
        &source,
    );
    assert_eq!(fetch_all(&app, &source, &targets).await, [1, 1, 0]);
    tokio::time::sleep(Duration::from_millis(WINDOW_SECS * 1_000 + 1_500)).await;
    assert_eq!(fetch_all(&app, &source, &targets).await, [1, 1, 0]);
    app.stop().await;
}

/// Only bundles served in full count against the identity's cap: in one
/// request, a device that is not registered, a repeat and a target past its own
/// limit leave the identity's budget to its next requests (the database servers
/// reserve every device of a request at first, and give back what was not
/// granted).
#[tokio::test]
async fn what_a_request_was_not_granted_stays_in_the_identity_budget() {
    let app = spawn_app_with(|settings| {
        limited(OverLimit::WithoutOneTimePreKey)(settings);
        settings.limits.bundle_request_window_secs = 600;
        settings.limits.max_bundle_requests = 1;
        settings.limits.max_recorded_requests_per_identity = 4;
    })
    .await;
    let targets = registered_targets(&app, 5).await;
    let mallory = user("mallory");
    let source = device_of(&mallory, 1);
    done(
        &register(&app, &source, 0).await,
        MessageType::RegisterUser,
        &source,
    );
    let (first, unknown) = (targets[0].clone(), device_id("unknown"));
    let request = [first.clone(), unknown, first.clone()];
    assert_eq!(fetch_all(&app, &source, &request).await, [1, 2, 0]);
    assert_eq!(
        fetch_all(&app, &source, &[first]).await,
        [0],
        "past its limit"
    );
    assert_eq!(
        fetch_all(&app, &source, &targets[1..4]).await,
        [1, 1, 1],
        "three more within the cap of four"
    );
    assert_eq!(
        fetch_all(&app, &source, &targets[4..]).await,
        [0],
        "the cap"
    );
    assert_eq!(recorded_by(&app, &mallory).await, 4);
    app.stop().await;
}

/// A group's request asks for many devices at once (the database servers count
/// and record its targets in batches): each target's grant still follows its own
/// counts, by the source device and by its identity, as in requests of one
/// device, and each grant in full takes one of that target's keys.
#[tokio::test]
async fn each_target_of_a_group_request_is_counted_on_its_own() {
    let app = spawn_app_with(|settings| {
        limited(OverLimit::WithoutOneTimePreKey)(settings);
        settings.limits.bundle_request_window_secs = 600;
        settings.limits.max_bundle_requests = 2;
        settings.limits.max_bundle_requests_per_identity = 3;
    })
    .await;
    let targets = registered_targets(&app, 5).await;
    let mallory = user("mallory");
    let (first, second) = (device_of(&mallory, 1), device_of(&mallory, 2));
    for device in [&first, &second] {
        done(
            &register(&app, device, 0).await,
            MessageType::RegisterUser,
            device,
        );
    }
    assert_eq!(fetch_all(&app, &first, &targets[..1]).await, [1]);
    assert_eq!(fetch_all(&app, &first, &targets[..4]).await, [1, 1, 1, 1]);
    assert_eq!(
        fetch_all(&app, &first, &targets[..4]).await,
        [0, 1, 1, 1],
        "the first target past the device's limit of 2"
    );
    assert_eq!(
        fetch_all(&app, &second, &targets).await,
        [1, 1, 1, 1, 1],
        "another device of the account: each target below the account's 3"
    );
    assert_eq!(
        fetch_all(&app, &second, &targets).await,
        [0, 0, 0, 0, 1],
        "the account's limit, but for the last target"
    );
    assert_eq!(recorded_by(&app, &mallory).await, 1 + 4 + 3 + 5 + 1);
    for (index, target) in targets.iter().enumerate() {
        let left = if index < 4 { 5 - 3 } else { 5 - 2 };
        assert_eq!(
            stored_opk_ids(&app, target).await,
            left,
            "keys left of target {index}"
        );
    }
    app.stop().await;
}

// --- Log lines ------------------------------------------------------------------------------

/// `lime-server serve` as operators run it, at debug, its log written to a file.
struct LoggingServer {
    child: std::process::Child,
    log: std::path::PathBuf,
    url: String,
    _dir: tempfile::TempDir,
}

impl LoggingServer {
    fn start(limits: &str) -> LoggingServer {
        let dir = tempfile::tempdir().unwrap();
        let (config, log) = (dir.path().join("lime.toml"), dir.path().join("log"));
        std::fs::write(&config, format!("[limits]\n{limits}")).unwrap();
        let child = std::process::Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--plain-http", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env("RUST_LOG", "lime_server=debug")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start lime-server serve");
        // Killed when dropped, even if it never listens.
        let mut server = LoggingServer {
            child,
            log,
            url: String::new(),
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&server.log).unwrap_or_default();
            let addr = text
                .lines()
                .filter(|line| line.contains("listening"))
                .flat_map(str::split_whitespace)
                .find_map(|field| field.strip_prefix("addr="));
            if let Some(addr) = addr {
                server.url = format!("http://{addr}/");
                return server;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not listening:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn ask(&self, sender: &str, request: Request) -> Response {
        let client = lime_server::client::LimeClient::plain().unwrap();
        let message = lime_protocol::RequestMessage {
            curve: CURVE,
            request,
        };
        client
            .send(&self.url, sender, &message)
            .await
            .unwrap()
            .response
    }

    /// The log lines that contain every one of `words`.
    fn lines_with(&self, words: &[&str]) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .filter(|line| words.iter().all(|word| line.contains(word)))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for LoggingServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Operators see at debug every getPeerBundle and getSelfOPks, each bundle
/// served without a one-time key or not served, and the limit that withheld
/// one, with source and target.
#[tokio::test]
async fn bundle_requests_and_their_limits_are_logged_at_debug() {
    for (mode, withheld) in [
        (
            "without_one_time_pre_key",
            "bundle served without a one-time pre-key (",
        ),
        ("no_bundle", "no bundle (device unknown"),
    ] {
        let server = LoggingServer::start(&format!(
            "max_bundle_requests = 1\nbundle_request_over_limit = \"{mode}\"\n"
        ));
        let (source, target, unknown) = (
            device_id("source"),
            device_id("target"),
            device_id("unknown"),
        );
        for (device, opks) in [(&target, 5), (&source, 0)] {
            let request = Request::RegisterUser(registration(CURVE, opks, 1));
            done(
                &server.ask(device, request).await,
                MessageType::RegisterUser,
                device,
            );
        }
        let fetch = || Request::GetPeerBundle(vec![common::id(&target), common::id(&unknown)]);
        for _ in 0..2 {
            assert!(matches!(
                server.ask(&source, fetch()).await,
                Response::PeerBundles(_)
            ));
        }
        let own = server.ask(&target, Request::GetSelfOneTimePreKeys).await;
        assert_eq!(own, Response::SelfOneTimePreKeys(vec![2, 3, 4, 5]));
        // The lines may reach the file a moment after the answers: wait (bounded)
        // for the last one of them, then count them all.
        let deadline = Instant::now() + Duration::from_secs(20);
        while server
            .lines_with(&["DEBUG", "getSelfOPks answered", &target])
            .is_empty()
            || server
                .lines_with(&["DEBUG", "getPeerBundle answered", &source])
                .len()
                < 2
        {
            assert!(Instant::now() < deadline, "{mode}: the lines never came");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let answered = server.lines_with(&["DEBUG", "getPeerBundle answered", &source]);
        assert_eq!(answered.len(), 2, "{mode}: {answered:?}");
        assert_eq!(
            server
                .lines_with(&["DEBUG", withheld, &source, &target])
                .len(),
            1,
            "{mode}"
        );
        assert_eq!(
            server
                .lines_with(&["DEBUG", "no bundle (device unknown", &source, &unknown])
                .len(),
            2,
            "{mode}: the unknown device, twice"
        );
        let over = server.lines_with(&[
            "DEBUG",
            "over the limit",
            "limit=limits.max_bundle_requests",
            &source,
            &target,
        ]);
        assert_eq!(over.len(), 1, "{mode}: {over:?}");
        assert_eq!(
            server
                .lines_with(&["DEBUG", "getSelfOPks answered", &target])
                .len(),
            1,
            "{mode}"
        );
    }
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
