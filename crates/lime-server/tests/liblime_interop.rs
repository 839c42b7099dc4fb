//! The real client against our server: Debian's liblime 5.1 driven through FFI
//! (`common::liblime`), its X3DH traffic posted to the server over HTTPS.
//!
//! Each story runs for both curves liblime 5.1 knows. Users register, fetch each
//! other's key bundles (with a one-time pre-key, served once), exchange messages
//! both ways and to a group, refill their one-time pre-keys and delete
//! themselves; and a device the server lost registers again on its next update.
//! With the bundle request limit on, a sender past it cannot open a session until
//! the window has passed. What the server says is checked beside liblime, with
//! `TestApp::send`.
//!
//! `LIME_TEST_AUTH=digest` or `=certificate` runs the same stories with
//! authentication on (`scripts/test.sh` does both): liblime's posts then answer
//! digest challenges, or present a client certificate. Which certificates let
//! liblime register is checked here whatever `LIME_TEST_AUTH` says.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::auth::{TestAuth, user_and_domain};
use common::backend::Backend;
use common::liblime::{EncryptionPolicy, Exchange, LimeDevice, X3dhInit, describe_exchanges};
use common::pki::{IssuedCertificate, TestPki};
use common::{TestApp, spawn_app, spawn_app_authenticating, spawn_app_with};
use lime_protocol::{Curve, DeviceId, ErrorCode, KeyBundle, Request, RequestMessage, Response};
use lime_server::client::LimeClient;
use lime_server::store::OverLimit;

/// One-time pre-keys each user uploads when created: few, so a refill is easy to provoke.
const INITIAL_OPKS: u16 = 5;
/// Bundles of one device a sender may receive within the window, in `bundle_request_limit`.
const MAX_BUNDLE_REQUESTS: u32 = 5;
/// The window of that limit, in seconds: short, since the story waits it out, yet
/// long enough for liblime's six steps on a loaded machine.
const BUNDLE_REQUEST_WINDOW_SECS: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c25519_alice_bob_and_carol_exchange_messages_through_the_server() {
    conversation(Curve::C25519).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c448_alice_bob_and_carol_exchange_messages_through_the_server() {
    conversation(Curve::C448).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c25519_sender_past_the_bundle_request_limit_gets_no_session_until_the_window_passes() {
    bundle_request_limit(Curve::C25519).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c25519_device_lost_by_the_server_registers_again_on_update() {
    lost_device_recovers(Curve::C25519).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c448_device_lost_by_the_server_registers_again_on_update() {
    lost_device_recovers(Curve::C448).await;
}

/// alice and bob talk, alice refills her OPks, carol joins a group message, bob leaves.
async fn conversation(curve: Curve) {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().expect("temp dir for the liblime databases");

    // 1. Two users, each on their own manager and database.
    let mut alice = new_device(&app, dir.path(), "alice", curve).await;
    let mut bob = new_device(&app, dir.path(), "bob", curve).await;
    let bob_opks = server_opk_ids(&app, curve, &bob.device_id).await;
    assert_eq!(
        bob_opks.len(),
        usize::from(INITIAL_OPKS),
        "step 1: bob registered {INITIAL_OPKS} OPks, the server holds {bob_opks:?}"
    );
    assert_authentication_enforced(&app, curve, &bob.device_id).await;

    // 2. alice writes to bob: liblime fetches bob's bundle and opens the session
    //    with one of his OPks, which leaves the server.
    let bob_user = "sip:bob@example.org";
    let hello = b"Hello bob, alice here.";
    let sent = alice
        .encrypt(
            bob_user,
            &[&bob.device_id],
            hello,
            EncryptionPolicy::DrMessage,
        )
        .await
        .expect("step 2: alice encrypts to bob");
    let to_bob = sent
        .dr_message_for(&bob.device_id)
        .expect("step 2: alice's message to bob");
    let bundle = served_bundle(alice.manager.last_operation_exchanges(), &bob.device_id);
    let init = x3dh_init(curve, to_bob, "step 2: alice's first message to bob");
    assert_eq!(
        init.identity_key,
        alice.identity_key().expect("alice's identity key"),
        "step 2: the X3DH init does not carry alice's identity key"
    );
    assert_eq!(
        init.signed_pre_key_id,
        bundle.signed_pre_key.id(),
        "step 2: the X3DH init names another SPk than the one the server served"
    );
    let opk_id = init.one_time_pre_key_id.unwrap_or_else(|| {
        panic!(
            "step 2: alice opened the session without an OPk although bob had {} on the server; exchanges:\n{}",
            bob_opks.len(),
            describe_exchanges(alice.manager.last_operation_exchanges())
        )
    });
    assert_eq!(
        Some(opk_id),
        bundle.one_time_pre_key.as_ref().map(|key| key.id()),
        "step 2: the X3DH init names another OPk than the one the server served"
    );
    assert!(
        bob_opks.contains(&opk_id),
        "step 2: OPk {opk_id} was never one of bob's ({bob_opks:?})"
    );
    let bob_opks_left = server_opk_ids(&app, curve, &bob.device_id).await;
    assert!(
        !bob_opks_left.contains(&opk_id) && bob_opks_left.len() == bob_opks.len() - 1,
        "step 2: after serving OPk {opk_id}, bob's OPks on the server are {bob_opks_left:?} (were {bob_opks:?})"
    );
    let received = bob
        .decrypt(bob_user, &alice.device_id, to_bob, &sent.cipher_message)
        .expect("step 2: bob decrypts alice's message");
    assert_eq!(
        received.plaintext, hello,
        "step 2: bob read another plaintext"
    );

    // 3. bob answers in the session alice opened.
    let alice_user = "sip:alice@example.org";
    let reply = b"Hi alice, bob here. Loud and clear.";
    let sent = bob
        .encrypt(
            alice_user,
            &[&alice.device_id],
            reply,
            EncryptionPolicy::CipherMessage,
        )
        .await
        .expect("step 3: bob encrypts to alice");
    let to_alice = sent
        .dr_message_for(&alice.device_id)
        .expect("step 3: bob's message to alice");
    let received = alice
        .decrypt(alice_user, &bob.device_id, to_alice, &sent.cipher_message)
        .expect("step 3: alice decrypts bob's reply");
    assert_eq!(
        received.plaintext, reply,
        "step 3: alice read another plaintext"
    );

    // 4. alice's update finds fewer OPks on the server than her low limit and uploads more.
    let alice_opks = server_opk_ids(&app, curve, &alice.device_id).await;
    let low_limit = u16::try_from(alice_opks.len()).expect("a few OPks") + 3;
    let batch = 4;
    alice
        .update(low_limit, batch)
        .await
        .expect("step 4: alice's update");
    let alice_opks_now = server_opk_ids(&app, curve, &alice.device_id).await;
    assert!(
        alice_opks_now.len() >= usize::from(low_limit)
            && alice_opks.iter().all(|id| alice_opks_now.contains(id)),
        "step 4: after an update with low limit {low_limit}, alice's OPks on the server are {alice_opks_now:?} (were {alice_opks:?}); exchanges:\n{}",
        describe_exchanges(alice.manager.last_operation_exchanges())
    );

    // 5. carol joins; alice writes to bob and carol in a conference.
    let mut carol = new_device(&app, dir.path(), "carol", curve).await;
    let conference = "sip:conference-factory@conference.example.org";
    let to_all = b"Welcome carol! Hello bob.";
    let sent = alice
        .encrypt(
            conference,
            &[&bob.device_id, &carol.device_id],
            to_all,
            EncryptionPolicy::CipherMessage,
        )
        .await
        .expect("step 5: alice encrypts to bob and carol");
    let to_carol = sent
        .dr_message_for(&carol.device_id)
        .expect("step 5: alice's message to carol");
    let init = x3dh_init(curve, to_carol, "step 5: alice's first message to carol");
    assert!(
        init.one_time_pre_key_id.is_some(),
        "step 5: alice opened the session with carol without an OPk; exchanges:\n{}",
        describe_exchanges(alice.manager.last_operation_exchanges())
    );
    for recipient in [&mut bob, &mut carol] {
        let dr_message = sent
            .dr_message_for(&recipient.device_id)
            .expect("step 5: alice's group message");
        let received = recipient
            .decrypt(
                conference,
                &alice.device_id,
                dr_message,
                &sent.cipher_message,
            )
            .unwrap_or_else(|error| {
                panic!(
                    "step 5: {} decrypts the group message: {error:#}",
                    recipient.device_id
                )
            });
        assert_eq!(
            received.plaintext, to_all,
            "step 5: {} read another plaintext",
            recipient.device_id
        );
    }

    // 6. bob deletes himself: the server has no bundle for him any more.
    bob.delete().await.expect("step 6: bob deletes his user");
    assert!(
        !bob.manager
            .is_user(&bob.device_id)
            .expect("lime_ffi_is_user"),
        "step 6: bob is still a local user after deleting himself"
    );
    let flag = bundle_flag(&app, curve, &alice.device_id, &bob.device_id).await;
    assert_eq!(flag, 2, "step 6: bundle for deleted bob has flag {flag}");
}

/// The server loses bob; his next update gets user_not_found and registers him
/// again with the same identity, after which alice can open a session with him.
async fn lost_device_recovers(curve: Curve) {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().expect("temp dir for the liblime databases");
    let mut alice = new_device(&app, dir.path(), "alice", curve).await;
    let mut bob = new_device(&app, dir.path(), "bob", curve).await;

    app.delete_device_in_store(curve, &bob.device_id).await;
    let flag = bundle_flag(&app, curve, &alice.device_id, &bob.device_id).await;
    assert_eq!(
        flag, 2,
        "bundle for bob after removing him from the store has flag {flag}"
    );

    // liblime logs the user_not_found answer as an error: expected here.
    bob.update(INITIAL_OPKS, INITIAL_OPKS)
        .await
        .expect("bob's update after the server lost him");
    let exchanges = bob.manager.last_operation_exchanges();
    let lost = exchanges.iter().any(|exchange| {
        exchange.request_name() == "getSelfOPks"
            && matches!(
                exchange.answer().map(|answer| answer.response),
                Some(Response::Error(error)) if error.code == ErrorCode::UserNotFound
            )
    });
    let registered = exchanges.iter().any(|exchange| {
        exchange.request_name() == "registerUser"
            && matches!(
                exchange.answer().map(|answer| answer.response),
                Some(Response::Done(_))
            )
    });
    assert!(
        lost && registered,
        "bob's update should meet user_not_found on getSelfOPks and register again; exchanges:\n{}",
        describe_exchanges(exchanges)
    );
    let bob_opks = server_opk_ids(&app, curve, &bob.device_id).await;
    assert!(
        !bob_opks.is_empty(),
        "bob registered again without OPks; exchanges:\n{}",
        describe_exchanges(exchanges)
    );

    let bob_user = "sip:bob@example.org";
    let hello = b"Are you back, bob?";
    let sent = alice
        .encrypt(
            bob_user,
            &[&bob.device_id],
            hello,
            EncryptionPolicy::DrMessage,
        )
        .await
        .expect("alice encrypts to bob after his recovery");
    let to_bob = sent
        .dr_message_for(&bob.device_id)
        .expect("alice's message to recovered bob");
    let init = x3dh_init(curve, to_bob, "alice's first message to recovered bob");
    assert!(
        init.one_time_pre_key_id
            .is_some_and(|opk_id| bob_opks.contains(&opk_id)),
        "alice's session with recovered bob should use one of his new OPks {bob_opks:?}, X3DH init names {:?}",
        init.one_time_pre_key_id
    );
    let received = bob
        .decrypt(bob_user, &alice.device_id, to_bob, &sent.cipher_message)
        .expect("recovered bob decrypts alice's message");
    assert_eq!(
        received.plaintext, hello,
        "recovered bob read another plaintext"
    );
}

/// The server gives one sender at most `MAX_BUNDLE_REQUESTS` bundles of one device
/// per window, and then none (`no_bundle`). alice forgets bob's device after each
/// message, so that each one fetches his bundle again: the first five open a
/// session with an OPk, the sixth finds no bundle, and once the window has passed
/// alice opens a session with an OPk again, which bob reads.
///
/// The window is counted in whole seconds: the six fetches surely fall within it
/// only if they take less than `BUNDLE_REQUEST_WINDOW_SECS - 1` s, and liblime
/// writes its own databases at every step. On a machine too slow for that, the
/// sixth may rightly get a bundle; the story is then told again with new devices.
async fn bundle_request_limit(curve: Curve) {
    let app = spawn_app_with(|settings| {
        settings.limits.max_bundle_requests = MAX_BUNDLE_REQUESTS;
        settings.limits.bundle_request_window_secs = BUNDLE_REQUEST_WINDOW_SECS;
        settings.limits.bundle_request_over_limit = OverLimit::NoBundle;
    })
    .await;
    // One OPk for each session alice opens, and some to spare.
    let bob_opks = u16::try_from(2 * MAX_BUNDLE_REQUESTS).expect("a few OPks");
    let bob_user = "sip:bob@example.org";
    let surely_within = Duration::from_secs(BUNDLE_REQUEST_WINDOW_SECS - 1);
    let mut attempt = 0;
    let (_dir, mut alice, mut bob, fifth_done) = loop {
        attempt += 1;
        let dir = tempfile::tempdir().expect("temp dir for the liblime databases");
        let mut alice = new_device(&app, dir.path(), "alice", curve).await;
        let mut bob = new_device_with_opks(&app, dir.path(), "bob", curve, bob_opks).await;

        // 1. Five messages, each opening a session with one of bob's OPks.
        let first_fetch = Instant::now();
        for n in 1..=MAX_BUNDLE_REQUESTS {
            let step = format!("message {n}");
            if n > 1 {
                alice
                    .delete_peer_device(&bob.device_id)
                    .unwrap_or_else(|error| panic!("{step}: alice forgets bob: {error:#}"));
            }
            let plaintext = format!("Message {n} to bob.").into_bytes();
            opens_session_with_one_time_key(&mut alice, &mut bob, bob_user, &plaintext, &step)
                .await;
        }
        let fifth_done = Instant::now();

        // 2. The sixth fetch within the window gets no bundle (flag 2). liblime
        //    5.1 accepts the call, then reports the whole encryption failed: bob
        //    was its only recipient. No OPk left the server.
        alice
            .delete_peer_device(&bob.device_id)
            .expect("message 6: alice forgets bob");
        let refused = alice
            .encrypt(
                bob_user,
                &[&bob.device_id],
                b"Message 6 to bob.",
                EncryptionPolicy::DrMessage,
            )
            .await;
        let took = first_fetch.elapsed();
        let exchanges = alice.manager.last_operation_exchanges();
        let flags = peer_bundle_flags(exchanges, &bob.device_id);
        if flags != [2] && took >= surely_within && attempt < 4 {
            eprintln!(
                "message 6 came {took:?} after the first fetch, past what the window surely \
                 holds: again, with new devices"
            );
            continue;
        }
        assert!(
            exchanges.len() == 1 && flags == [2],
            "message 6, {took:?} after the first fetch: one getPeerBundle, answered with flag 2; exchanges:\n{}",
            describe_exchanges(exchanges)
        );
        match refused {
            Err(error)
                if format!("{error:#}")
                    .contains("All recipients failed to provide a key bundle") => {}
            other => panic!(
                "message 6: liblime should report \"All recipients failed to provide a key bundle\", got {other:?}"
            ),
        }
        let bob_opks_left = server_opk_ids(&app, curve, &bob.device_id).await;
        assert_eq!(
            bob_opks_left.len(),
            usize::from(bob_opks) - MAX_BUNDLE_REQUESTS as usize,
            "message 6: bob's OPks on the server are {bob_opks_left:?}"
        );
        break (dir, alice, bob, fifth_done);
    };

    // 3. Once the window has passed, bob's bundle comes with an OPk again. The
    //    five bundles it counts were all served before the fifth message was read.
    let window_passed =
        Duration::from_secs(BUNDLE_REQUEST_WINDOW_SECS) + Duration::from_millis(1_500);
    tokio::time::sleep(window_passed.saturating_sub(fifth_done.elapsed())).await;
    opens_session_with_one_time_key(
        &mut alice,
        &mut bob,
        bob_user,
        b"Message 7 to bob, after the window.",
        "message 7",
    )
    .await;
}

/// alice encrypts `plaintext` to bob, which fetches bob's bundle once (flag 1) and
/// opens a session with its OPk; bob decrypts it. `step` names the step in failures.
async fn opens_session_with_one_time_key(
    alice: &mut LimeDevice,
    bob: &mut LimeDevice,
    bob_user: &str,
    plaintext: &[u8],
    step: &str,
) {
    let curve = alice.curve;
    let sent = alice
        .encrypt(
            bob_user,
            &[&bob.device_id],
            plaintext,
            EncryptionPolicy::DrMessage,
        )
        .await
        .unwrap_or_else(|error| panic!("{step}: alice encrypts to bob: {error:#}"));
    let exchanges = alice.manager.last_operation_exchanges();
    assert_eq!(
        peer_bundle_flags(exchanges, &bob.device_id),
        [1],
        "{step}: alice fetches bob's bundle once, with an OPk; exchanges:\n{}",
        describe_exchanges(exchanges)
    );
    let served = served_bundle(exchanges, &bob.device_id)
        .one_time_pre_key
        .map(|key| key.id());
    let to_bob = sent
        .dr_message_for(&bob.device_id)
        .unwrap_or_else(|error| panic!("{step}: {error:#}"));
    let init = x3dh_init(curve, to_bob, step);
    assert_eq!(
        init.one_time_pre_key_id, served,
        "{step}: the X3DH init names another OPk than the one the server served"
    );
    let received = bob
        .decrypt(bob_user, &alice.device_id, to_bob, &sent.cipher_message)
        .unwrap_or_else(|error| panic!("{step}: bob decrypts: {error:#}"));
    assert_eq!(
        received.plaintext, plaintext,
        "{step}: bob read another plaintext"
    );
}

/// The flags of the bundles for `device` in the getPeerBundle answers of `exchanges`.
fn peer_bundle_flags(exchanges: &[Exchange], device: &str) -> Vec<u8> {
    exchanges
        .iter()
        .filter(|exchange| exchange.request_name() == "getPeerBundle")
        .filter_map(Exchange::answer)
        .flat_map(|answer| match answer.response {
            Response::PeerBundles(bundles) => bundles,
            _ => Vec::new(),
        })
        .filter(|bundle| bundle.device_id.as_str() == device)
        .map(|bundle| bundle.flag())
        .collect()
}

/// With `LIME_TEST_AUTH` on, checks that the stories really ran authenticated: the
/// same request without credentials is refused.
async fn assert_authentication_enforced(app: &TestApp, curve: Curve, device: &str) {
    let body = RequestMessage {
        curve,
        request: Request::GetSelfOneTimePreKeys,
    }
    .encode()
    .unwrap();
    let headers = [("content-type", "x3dh/octet-stream"), ("from", device)];
    let answer = app.client.post(&app.base_url, &headers, body).await;
    match app.auth.mode {
        TestAuth::Off => assert_eq!(answer.unwrap().status, 200),
        TestAuth::Digest => assert_eq!(answer.unwrap().status, 401, "no credentials"),
        TestAuth::Certificate => assert!(answer.is_err(), "no certificate: {answer:?}"),
    }
}

/// Creates user `name` with a fresh GRUU on its own manager and database in `dir`.
async fn new_device(app: &TestApp, dir: &Path, name: &str, curve: Curve) -> LimeDevice {
    new_device_with_opks(app, dir, name, curve, INITIAL_OPKS).await
}

/// Like [`new_device`], uploading `opks` one-time pre-keys.
async fn new_device_with_opks(
    app: &TestApp,
    dir: &Path,
    name: &str,
    curve: Curve,
    opks: u16,
) -> LimeDevice {
    let device_id = common::device_id(name);
    let db = dir.join(format!("{name}.sqlite3"));
    LimeDevice::create(
        &db,
        app.client_for(&device_id).await,
        &app.base_url,
        device_id,
        curve,
        opks,
    )
    .await
    .unwrap_or_else(|error| panic!("creating {name} ({curve}): {error:#}"))
}

/// The ids of `device`'s OPks still on the server (getSelfOPks sent as `device`).
async fn server_opk_ids(app: &TestApp, curve: Curve, device: &str) -> Vec<u32> {
    let request = RequestMessage {
        curve,
        request: Request::GetSelfOneTimePreKeys,
    };
    let answer = app.send(device, &request).await;
    assert_eq!(
        answer.curve_byte,
        curve.id(),
        "getSelfOPks answer for {device}: curve byte"
    );
    match answer.response {
        Response::SelfOneTimePreKeys(ids) => ids,
        other => panic!("getSelfOPks for {device}: the server answered {other:?}"),
    }
}

/// The flag of the bundle the server gives `asker` for `device`.
async fn bundle_flag(app: &TestApp, curve: Curve, asker: &str, device: &str) -> u8 {
    let device_id = DeviceId::new(device).expect("a GRUU is a valid device id");
    let request = RequestMessage {
        curve,
        request: Request::GetPeerBundle(vec![device_id.clone()]),
    };
    let answer = app.send(asker, &request).await;
    assert_eq!(
        answer.curve_byte,
        curve.id(),
        "getPeerBundle answer for {device}: curve byte"
    );
    match answer.response {
        Response::PeerBundles(bundles)
            if bundles.len() == 1 && bundles[0].device_id == device_id =>
        {
            bundles[0].flag()
        }
        other => panic!("getPeerBundle for {device}: the server answered {other:?}"),
    }
}

/// The key bundle for `device` that the server gave liblime in `exchanges`.
fn served_bundle(exchanges: &[Exchange], device: &str) -> KeyBundle {
    exchanges
        .iter()
        .filter_map(Exchange::answer)
        .find_map(|answer| match answer.response {
            Response::PeerBundles(bundles) => bundles
                .into_iter()
                .find(|bundle| bundle.device_id.as_str() == device)
                .and_then(|bundle| bundle.bundle),
            _ => None,
        })
        .unwrap_or_else(|| {
            panic!(
                "liblime got no key bundle for {device}; exchanges:\n{}",
                describe_exchanges(exchanges)
            )
        })
}

/// The X3DH init of a session-opening DR message, or a panic saying what is wrong.
fn x3dh_init(curve: Curve, dr_message: &[u8], what: &str) -> X3dhInit {
    match X3dhInit::from_dr_message(curve, dr_message) {
        Ok(Some(init)) => init,
        Ok(None) => panic!("{what} carries no X3DH init"),
        Err(error) => panic!("{what} is not a liblime DR message: {error:#}"),
    }
}

/// liblime registering through a server that requires client certificates, each
/// user presenting `certificate` (issued for it by `issue`), with the CRL listing
/// the certificates `issue` revoked. Returns whether the server holds the device.
async fn registers_with_certificate(
    name: &str,
    issue: impl FnOnce(&TestPki, &str) -> IssuedCertificate,
) -> bool {
    let pki = TestPki::new();
    let device_id = common::device_id(name);
    let (user, domain) = user_and_domain(&device_id);
    let certificate = issue(&pki, &format!("sip:{user}@{domain}"));
    let (ca, crl) = (pki.ca_file(), pki.crl_file());
    let app = spawn_app_authenticating(Backend::from_env(), TestAuth::Off, move |settings| {
        let certificates = &mut settings.auth.client_certificates;
        certificates.ca_file = Some(ca);
        certificates.crl_files = vec![crl];
        certificates.required = true;
    })
    .await;
    let client = LimeClient::with_client_certificate(
        &app.certificate_file(),
        &certificate.certificate,
        &certificate.private_key,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let created = LimeDevice::create(
        &dir.path().join("lime.sqlite3"),
        client,
        &app.base_url,
        device_id.clone(),
        Curve::C25519,
        INITIAL_OPKS,
    )
    .await;
    let stored = app
        .probe
        .device_row(Curve::C25519, &device_id)
        .await
        .is_some();
    assert_eq!(
        created.is_ok(),
        stored,
        "{name}: liblime says {:?}, the server holds the device: {stored}",
        created.err()
    );
    app.stop().await;
    stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_valid_registers() {
    assert!(
        registers_with_certificate("valid", |pki, owner| pki.issue(&[owner], &[], "valid")).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_identity_only_in_common_name_registers() {
    assert!(registers_with_certificate("cn", |pki, owner| pki.issue(&[], &[], owner)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_revoked_is_refused() {
    assert!(
        !registers_with_certificate("revoked", |pki, owner| {
            let certificate = pki.issue(&[owner], &[], "revoked");
            pki.revoke(&certificate);
            certificate
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_of_another_ca_is_refused() {
    assert!(
        !registers_with_certificate("foreign", |pki, owner| pki
            .issue_by_other_ca(&[owner], "foreign"))
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_with_another_identity_in_san_is_refused() {
    assert!(
        !registers_with_certificate("mallory", |pki, _| {
            pki.issue(&["sip:mallory@example.org"], &[], "mallory")
        })
        .await
    );
}
