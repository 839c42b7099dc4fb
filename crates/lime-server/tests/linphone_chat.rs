//! Linphone's own stack end to end, story 3: alice's liblinphone sends bob an
//! encrypted message through a conference focus, with the keys from our server,
//! and bob's liblinphone decrypts it; bob answers and alice decrypts.
//!
//! Everything that encrypts and decrypts is the real thing: two devices run by
//! liblinphone (tests/common/linphone.rs), each with its own LIME database,
//! fetching keys over HTTPS with digest from our server (in-process, on the
//! backend `LIME_TEST_BACKEND` names); the one-to-one chat room is the apps' kind
//! (backend FlexisipChat, LIME encryption), held by a minimal focus
//! (tests/linphone/focus.py) in the registrar's process, which relays what it
//! gets and sees only ciphertext.

mod common;

use common::auth::{TestAuth, password_of};
use common::backend::Backend;
use common::linphone::{Account, Challenge, Device, DriverRun, Finished, Registrar, Secret};
use common::{TestApp, spawn_app_authenticating};
use lime_protocol::{Curve, Request, Response};
use serde_json::Value;
use std::time::Duration;

/// liblinphone 5.1 makes its LIME users on Curve25519.
const CURVE: Curve = Curve::C25519;
const DOMAIN: &str = "example.org";
/// One-time pre-keys liblime uploads with a new user.
const FIRST_OPKS: usize = 100;
/// Bounds each device's whole run: registering, the room, both messages (about
/// two seconds when all goes well).
const RUN_SECS: u64 = 60;
/// The conference factory the focus answers at.
const FACTORY: &str = "sip:conference-factory@example.org";
const TEXT: &str = "Hello bob, this is alice: ünïcödé and all";
const ANSWER: &str = "Hi alice, bob here";

/// A device of `username` (password [`password_of`]) registering at `registrar`,
/// using our server for its keys and the focus for its chat rooms.
fn device(app: &TestApp, registrar: &Registrar, username: &str) -> Device {
    let account = Account {
        username: username.to_owned(),
        domain: DOMAIN.to_owned(),
        secret: Secret::Password(password_of(username)),
        registrar_port: registrar.port,
    };
    // The server's self-signed certificate is for localhost.
    let url = format!("https://localhost:{}/", app.addr.port());
    let device = Device::create(username, &account, &url, &app.certificate_file(), "");
    // Requests outside a dialog (to the factory, to the room) go to the registrar
    // too: the domain does not resolve.
    let route = format!("<sip:127.0.0.1:{};transport=tcp>", registrar.port);
    device.set_config("proxy_0", "reg_route", &route);
    device.set_config("proxy_0", "conference_factory_uri", FACTORY);
    device
}

/// bob's one-time pre-key ids on the server, as he would ask for them.
async fn one_time_pre_key_ids(app: &TestApp, device_id: &str) -> Vec<u32> {
    match app
        .ask(device_id, CURVE, Request::GetSelfOneTimePreKeys)
        .await
        .response
    {
        Response::SelfOneTimePreKeys(mut ids) => {
            ids.sort_unstable();
            ids
        }
        other => panic!("getSelfOPks as {device_id}: {other:?}"),
    }
}

/// The id of the LIME user a run created, waiting for it (bounded).
async fn created_user(run: &DriverRun, name: &str) -> String {
    let user = run
        .events
        .wait_for(Duration::from_secs(RUN_SECS), |event| {
            event["event"] == "lime_user"
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "{name}: no LIME user within {RUN_SECS} s: {:?}",
                run.events.all()
            )
        });
    assert_eq!(user["ok"], Value::Bool(true), "{name}: {user}");
    user["user"].as_str().expect("a user id").to_owned()
}

/// The messages a run received, decrypted: (text, sender, secured).
fn received(run: &Finished) -> Vec<(String, String, bool)> {
    run.named("message_received")
        .into_iter()
        .map(|event| {
            (
                event["text"].as_str().unwrap_or_default().to_owned(),
                event["from"].as_str().unwrap_or_default().to_owned(),
                event["secured"] == Value::Bool(true),
            )
        })
        .collect()
}

/// Asserts a run's command went all the way.
fn assert_done(run: &Finished, name: &str) {
    let done = run.named("done");
    assert!(
        done.len() == 1 && done[0]["reached"] == Value::Bool(true),
        "{name} did not finish: {}",
        run.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_and_bob_talk_encrypted_with_keys_from_our_server() {
    let app = spawn_app_authenticating(Backend::from_env(), TestAuth::Digest, |settings| {
        settings.storage.curves = vec!["c25519".to_owned()];
        // The deployed default, under which the server records who fetched whose
        // bundle (the suites' default turns it off).
        settings.limits.max_bundle_requests = 10;
    })
    .await;
    let registrar = Registrar::start(DOMAIN, Challenge::None, &[], &["focus"]);
    let alice_aor = format!("sip:alice@{DOMAIN}");
    let bob_aor = format!("sip:bob@{DOMAIN}");
    // The accounts (an MD5 and a SHA-256 row each), and our own clients for them.
    app.client_for(&alice_aor).await;
    app.client_for(&bob_aor).await;

    // bob first: his LIME user must be on the server before alice asks for it.
    let mut bob = device(&app, &registrar, "bob");
    let bob_run = bob.spawn("chat-answer", RUN_SECS, &[ANSWER]);
    let bob_id = created_user(&bob_run, "bob").await;
    let bob_keys_before = one_time_pre_key_ids(&app, &bob_id).await;
    assert_eq!(bob_keys_before.len(), FIRST_OPKS);
    assert!(app.probe.requests(CURVE).await.is_empty());

    let mut alice = device(&app, &registrar, "alice");
    let alice_run = alice.spawn("chat-send", RUN_SECS, &[&bob_aor, TEXT]);
    let alice_id = created_user(&alice_run, "alice").await;
    let alice_done = alice_run.finish().await;
    let bob_done = bob_run.finish().await;
    assert_done(&alice_done, "alice");
    assert_done(&bob_done, "bob");

    // bob's liblinphone decrypted alice's text, from alice's device; alice's
    // decrypted bob's answer.
    assert_eq!(
        received(&bob_done),
        [(TEXT.to_owned(), format!("<{alice_id}>"), true)],
        "{}",
        bob_done.describe()
    );
    assert_eq!(
        received(&alice_done),
        [(ANSWER.to_owned(), format!("<{bob_id}>"), true)],
        "{}",
        alice_done.describe()
    );
    assert!(bob_done.named("message_undecryptable").is_empty());
    assert!(alice_done.named("message_undecryptable").is_empty());

    // alice fetched bob's bundle from our server: one of his one-time pre-keys
    // is gone, and the server recorded her request. bob answered on the session
    // her message opened: no bundle of hers fetched.
    let bob_keys_after = one_time_pre_key_ids(&app, &bob_id).await;
    let used: Vec<&u32> = bob_keys_before
        .iter()
        .filter(|id| !bob_keys_after.contains(id))
        .collect();
    assert_eq!(used.len(), 1, "one one-time pre-key of bob's used");
    assert_eq!(bob_keys_after.len(), FIRST_OPKS - 1);
    assert_eq!(
        app.probe.count_one_time_pre_keys(CURVE).await,
        2 * FIRST_OPKS as u64 - 1,
        "in the store: alice's all, bob's but one"
    );
    assert_eq!(
        one_time_pre_key_ids(&app, &alice_id).await.len(),
        FIRST_OPKS
    );
    assert_eq!(
        app.probe.requests(CURVE).await,
        [(alice_id.clone(), bob_id.clone())]
    );

    // The focus relayed both messages (and the delivery notifications) as
    // LIME's multipart, the texts nowhere in clear.
    let relayed = registrar.events.named("relayed");
    let from = |device: &str| {
        relayed
            .iter()
            .filter(|event| event["sender"] == device)
            .count()
    };
    assert!(from(&alice_id) >= 1 && from(&bob_id) >= 1, "{relayed:?}");
    for event in &relayed {
        let content_type = event["content_type"].as_str().unwrap_or_default();
        assert!(
            content_type.starts_with("multipart/encrypted")
                && content_type.contains("application/lime"),
            "{event}"
        );
        let body = event["body"].as_str().unwrap_or_default();
        assert!(!body.contains(TEXT) && !body.contains(ANSWER), "{event}");
    }
    app.stop().await;
}
