//! What one getPeerBundle may cost: its answer's size, reckoned before any claim
//! (`limits.max_bundle_answer_bytes`), not a count of devices. A group as large as
//! real ones (liblime's own test suite builds 1,183 devices; 5,000 here) is served
//! on every curve by default; a request whose answer could be larger is refused
//! with `resource_limit_reached`, the key named, nothing claimed.

mod common;

use common::process::{ServerProcess, start_plain_with_config};
use common::{TestApp, device_id, id, registration, spawn_app_with};
use futures::StreamExt;
use lime_protocol::{Curve, ErrorCode, Request, RequestMessage, Response};
use lime_server::client::LimeClient;

/// The group size the default must serve on every curve.
const GROUP: usize = 5_000;

/// The device that asks for the group's bundles.
const ASKER: &str = "sip:asker@example.org;gr=urn:uuid:asker";

/// Registers `count` devices on `curve` (one OPk each), a few at a time, and the
/// asker (without OPks: a getPeerBundle's source must be registered).
async fn register_group(app: &TestApp, curve: Curve, count: usize) -> Vec<String> {
    let answer = app
        .ask(
            ASKER,
            curve,
            Request::RegisterUser(registration(curve, 0, 1)),
        )
        .await;
    assert!(
        matches!(answer.response, Response::Done(_)),
        "{curve}: register the asker: {:?}",
        answer.response
    );
    let devices: Vec<String> = (0..count).map(|_| device_id("member")).collect();
    futures::stream::iter(devices.iter())
        .for_each_concurrent(32, |device| async move {
            let answer = app
                .ask(
                    device,
                    curve,
                    Request::RegisterUser(registration(curve, 1, 1)),
                )
                .await;
            assert!(
                matches!(answer.response, Response::Done(_)),
                "{curve}: register {device}: {:?}",
                answer.response
            );
        })
        .await;
    devices
}

async fn a_group_of_5000_is_served_whole(curve: Curve) {
    let app = spawn_app_with(|settings| {
        settings.storage.curves = vec![curve.name().to_owned()];
        settings.limits.max_devices_per_user = 0;
    })
    .await;
    let group = register_group(&app, curve, GROUP).await;
    let asked = group.iter().map(|device| id(device)).collect();
    let answer = app.ask(ASKER, curve, Request::GetPeerBundle(asked)).await;
    let Response::PeerBundles(bundles) = answer.response else {
        panic!("{curve}: expected peerBundle, got {:?}", answer.response);
    };
    assert_eq!(bundles.len(), GROUP, "{curve}");
    assert!(
        bundles.iter().all(|bundle| bundle.flag() == 1),
        "{curve}: every member's bundle comes with its one-time pre-key"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_5000_devices_is_served_on_c448mlk1024_the_largest_curve() {
    a_group_of_5000_is_served_whole(Curve::C448Mlk1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_5000_devices_is_served_on_c25519() {
    a_group_of_5000_is_served_whole(Curve::C25519).await;
}

#[tokio::test]
async fn a_bundle_request_whose_answer_could_pass_the_bound_is_refused_and_claims_nothing() {
    // Room for 3 C448MLK1024 bundles with ~80-byte device ids, not 4.
    let app = spawn_app_with(|settings| {
        settings.limits.max_bundle_answer_bytes = 3 * (3_430 + 90);
    })
    .await;
    let curve = Curve::C448Mlk1024;
    let group = register_group(&app, curve, 4).await;
    let four = group.iter().map(|device| id(device)).collect();
    let answer = app.ask(ASKER, curve, Request::GetPeerBundle(four)).await;
    match answer.response {
        Response::Error(error) => {
            assert_eq!(error.code, ErrorCode::ResourceLimitReached);
            assert!(
                error.text.contains("limits.max_bundle_answer_bytes"),
                "{}",
                error.text
            );
        }
        other => panic!("expected resource_limit_reached, got {other:?}"),
    }
    assert_eq!(
        app.stored_one_time_pre_keys(curve).await,
        4,
        "nothing claimed"
    );
    // Three fit, whatever their keys: served.
    let three = group[..3].iter().map(|device| id(device)).collect();
    let answer = app.ask(ASKER, curve, Request::GetPeerBundle(three)).await;
    assert!(
        matches!(answer.response, Response::PeerBundles(ref bundles) if bundles.len() == 3),
        "{:?}",
        answer.response
    );
    app.stop().await;
}

#[tokio::test]
async fn the_refusal_of_a_too_large_bundle_request_names_the_limit_in_the_log() {
    let (server, _data) = start_plain_with_config(
        ServerProcess::start,
        "[limits]\nmax_bundle_answer_bytes = 10000\n[storage]\ncurves = [\"c448mlk1024\"]\n",
    );
    let asked = (0..10).map(|_| id(&device_id("member"))).collect();
    let message = RequestMessage {
        curve: Curve::C448Mlk1024,
        request: Request::GetPeerBundle(asked),
    };
    let sender = ASKER;
    let answer = LimeClient::plain()
        .unwrap()
        .send(&format!("http://{}/", server.addr), sender, &message)
        .await
        .unwrap();
    assert!(
        matches!(&answer.response, Response::Error(error) if error.code == ErrorCode::ResourceLimitReached),
        "{:?}",
        answer.response
    );
    server.wait_for_log(
        "no refusal naming the limit in the log",
        std::time::Duration::from_secs(10),
        |log| log.contains("limits.max_bundle_answer_bytes") && log.contains("request refused"),
    );
}
