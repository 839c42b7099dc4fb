//! The X3DH protocol as a client sees it: every request type and every error code
//! the server can produce, each story run on all five base algorithms, over HTTPS
//! against a real server with its own fresh stores.
//!
//! `server_failure` is the one code missing: the server sends it only for an answer
//! it cannot encode (a list longer than 65535), which no valid request can cause.

mod common;

use common::{
    TestApp, device_id, id, one_time_pre_key, random_bytes, registration, signed_pre_key,
    spawn_app, spawn_app_with,
};
use lime_protocol::{
    Curve, ErrorCode, IdentityKey, KeyBundle, MessageType, OneTimePreKey, PeerBundle, Registration,
    Request, RequestMessage, Response, ResponseMessage, SignedPreKey,
};
use lime_server::http::X3DH_CONTENT_TYPE;
use std::collections::HashSet;

/// The device that asks for others' bundles; it never needs to be registered.
const ASKER: &str = "sip:asker@example.org;gr=urn:uuid:asker";

/// Sends `request` as `sender` and returns the answer, once checked to echo the
/// request's curve (the harness already checked HTTP 200 and the content type).
async fn ask(app: &TestApp, sender: &str, curve: Curve, request: Request) -> Response {
    let answer = app.ask(sender, curve, request).await;
    assert_eq!(
        answer.curve_byte,
        curve.id(),
        "{curve}: the answer must carry the request's curve byte"
    );
    answer.response
}

/// Sends a request that must succeed with the bare header of its own type.
async fn expect_done(app: &TestApp, sender: &str, curve: Curve, request: Request) {
    let kind = request.message_type();
    let response = ask(app, sender, curve, request).await;
    assert_eq!(
        response,
        Response::Done(kind),
        "{curve}: {kind} as {sender} must succeed"
    );
}

/// Sends a request that must fail with `code`.
async fn expect_error(
    app: &TestApp,
    sender: &str,
    curve: Curve,
    request: Request,
    code: ErrorCode,
) {
    let kind = request.message_type();
    match ask(app, sender, curve, request).await {
        Response::Error(answer) => assert_eq!(
            answer.code, code,
            "{curve}: {kind} as {sender}: expected {code}, got {} ({})",
            answer.code, answer.text
        ),
        other => panic!("{curve}: {kind} as {sender}: expected {code}, got {other:?}"),
    }
}

/// Registers `device` with random keys and OPks with ids `1..=opks`.
async fn register(app: &TestApp, curve: Curve, device: &str, opks: u32) -> Registration {
    let registration = registration(curve, opks, 1);
    expect_done(
        app,
        device,
        curve,
        Request::RegisterUser(registration.clone()),
    )
    .await;
    registration
}

/// The ids getSelfOPks lists for `device`, sorted (the protocol gives no order).
async fn self_opk_ids(app: &TestApp, curve: Curve, device: &str) -> Vec<u32> {
    match ask(app, device, curve, Request::GetSelfOneTimePreKeys).await {
        Response::SelfOneTimePreKeys(mut ids) => {
            ids.sort_unstable();
            ids
        }
        other => panic!("{curve}: getSelfOPks as {device}: expected selfOPks, got {other:?}"),
    }
}

/// Registers the device that asks for bundles, as liblime does before it fetches
/// any (a source that is not registered gets `user_not_found`); once per curve.
async fn register_asker(app: &TestApp, curve: Curve) {
    let request = Request::RegisterUser(registration(curve, 0, 1));
    match ask(app, ASKER, curve, request).await {
        Response::Done(MessageType::RegisterUser) => {}
        Response::Error(error) if error.code == ErrorCode::UserAlreadyIn => {}
        other => panic!("{curve}: registering the asker: {other:?}"),
    }
}

/// getPeerBundle for `devices` by the (registered) asker; checks that the answer
/// lists them in request order.
async fn peer_bundles(app: &TestApp, curve: Curve, devices: &[&str]) -> Vec<PeerBundle> {
    register_asker(app, curve).await;
    let request = Request::GetPeerBundle(devices.iter().map(|device| id(device)).collect());
    match ask(app, ASKER, curve, request).await {
        Response::PeerBundles(bundles) => {
            let answered: Vec<&str> = bundles.iter().map(|b| b.device_id.as_str()).collect();
            assert_eq!(
                answered, devices,
                "{curve}: peerBundle must answer every device asked, in request order"
            );
            bundles
        }
        other => panic!("{curve}: getPeerBundle: expected peerBundle, got {other:?}"),
    }
}

/// The keys of a bundle that must have them (flag 0 or 1), checked against what the
/// device registered.
fn keys_of<'a>(
    curve: Curve,
    bundle: &'a PeerBundle,
    identity_key: &IdentityKey,
    signed_pre_key: &SignedPreKey,
) -> &'a KeyBundle {
    let keys = bundle.bundle.as_ref().unwrap_or_else(|| {
        panic!(
            "{curve}: {} must have a bundle, got flag 2",
            bundle.device_id
        )
    });
    assert_eq!(
        &keys.identity_key, identity_key,
        "{curve}: bundle of {} carries another Ik",
        bundle.device_id
    );
    assert_eq!(
        &keys.signed_pre_key, signed_pre_key,
        "{curve}: bundle of {} carries another SPk (public, signature or id)",
        bundle.device_id
    );
    keys
}

/// The flags of bundles, in order.
fn flags(bundles: &[PeerBundle]) -> Vec<u8> {
    bundles.iter().map(PeerBundle::flag).collect()
}

/// The OPk of the registration with id `opk_id`.
fn uploaded(registration: &Registration, opk_id: u32) -> &OneTimePreKey {
    registration
        .one_time_pre_keys
        .iter()
        .find(|key| key.id() == opk_id)
        .unwrap_or_else(|| panic!("no OPk {opk_id} was uploaded"))
}

/// Checks an HTTP answer is an X3DH message (200, x3dh/octet-stream) and parses it.
fn x3dh_answer(raw: &lime_server::client::RawAnswer) -> ResponseMessage {
    assert_eq!(raw.status, 200, "every X3DH answer is HTTP 200");
    assert_eq!(raw.content_type.as_deref(), Some(X3DH_CONTENT_TYPE));
    ResponseMessage::parse(&raw.body).expect("the answer is a valid X3DH message")
}

// ---- registerUser -------------------------------------------------------------

#[tokio::test]
async fn register_user_then_get_self_opks_lists_exactly_the_ids() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let mut keys = registration(curve, 0, 0);
        keys.one_time_pre_keys = [0, 7, 42, u32::MAX]
            .map(|opk_id| one_time_pre_key(curve, opk_id))
            .to_vec();
        expect_done(&app, &alice, curve, Request::RegisterUser(keys)).await;
        assert_eq!(
            self_opk_ids(&app, curve, &alice).await,
            [0, 7, 42, u32::MAX]
        );
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 4, "{curve}");

        let bob = device_id("bob");
        register(&app, curve, &bob, 0).await;
        assert_eq!(self_opk_ids(&app, curve, &bob).await, Vec::<u32>::new());
    }
}

#[tokio::test]
async fn register_user_again_with_the_same_keys_succeeds_and_changes_nothing() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let first = register(&app, curve, &alice, 3).await;
        expect_done(&app, &alice, curve, Request::RegisterUser(first.clone())).await;
        assert_eq!(self_opk_ids(&app, curve, &alice).await, [1, 2, 3]);
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 3, "{curve}");

        // A retry is recognised by Ik and SPk; OPks it carries are not added.
        let mut retry = first.clone();
        retry.one_time_pre_keys = (10..13)
            .map(|opk_id| one_time_pre_key(curve, opk_id))
            .collect();
        expect_done(&app, &alice, curve, Request::RegisterUser(retry)).await;
        assert_eq!(self_opk_ids(&app, curve, &alice).await, [1, 2, 3]);
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 3, "{curve}");

        let bundles = peer_bundles(&app, curve, &[&alice]).await;
        keys_of(
            curve,
            &bundles[0],
            &first.identity_key,
            &first.signed_pre_key,
        );
    }
}

#[tokio::test]
async fn register_user_with_other_keys_for_a_registered_device_is_user_already_in() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let first = register(&app, curve, &alice, 2).await;
        let spk = &first.signed_pre_key;
        let other_identity_key = Registration {
            identity_key: IdentityKey::new(curve, random_bytes(curve.identity_key_len())).unwrap(),
            ..first.clone()
        };
        let other_public = SignedPreKey::new(
            curve,
            random_bytes(curve.pre_key_len()),
            spk.signature().to_vec(),
            spk.id(),
        )
        .unwrap();
        let other_signature = SignedPreKey::new(
            curve,
            spk.public().to_vec(),
            random_bytes(curve.signature_len()),
            spk.id(),
        )
        .unwrap();
        let other_id =
            SignedPreKey::new(curve, spk.public().to_vec(), spk.signature().to_vec(), 2).unwrap();
        let mut attempts = vec![other_identity_key];
        for signed_pre_key in [other_public, other_signature, other_id] {
            attempts.push(Registration {
                signed_pre_key,
                ..first.clone()
            });
        }
        for attempt in attempts {
            expect_error(
                &app,
                &alice,
                curve,
                Request::RegisterUser(attempt),
                ErrorCode::UserAlreadyIn,
            )
            .await;
        }
        // The device keeps its first keys and OPks.
        assert_eq!(self_opk_ids(&app, curve, &alice).await, [1, 2]);
        let bundles = peer_bundles(&app, curve, &[&alice]).await;
        keys_of(
            curve,
            &bundles[0],
            &first.identity_key,
            &first.signed_pre_key,
        );
    }
}

#[tokio::test]
async fn devices_are_registered_per_curve() {
    let app = spawn_app().await;
    let alice = device_id("alice");
    let first = register(&app, Curve::C25519, &alice, 2).await;
    for curve in Curve::ALL.into_iter().filter(|c| *c != Curve::C25519) {
        expect_error(
            &app,
            &alice,
            curve,
            Request::GetSelfOneTimePreKeys,
            ErrorCode::UserNotFound,
        )
        .await;
        assert_eq!(flags(&peer_bundles(&app, curve, &[&alice]).await), [2]);
        // Same device id, another curve: a separate registration with its own keys.
        register(&app, curve, &alice, 1).await;
        assert_eq!(self_opk_ids(&app, curve, &alice).await, [1]);
    }
    assert_eq!(self_opk_ids(&app, Curve::C25519, &alice).await, [1, 2]);
    let bundles = peer_bundles(&app, Curve::C25519, &[&alice]).await;
    keys_of(
        Curve::C25519,
        &bundles[0],
        &first.identity_key,
        &first.signed_pre_key,
    );
}

// ---- postSPk ------------------------------------------------------------------

#[tokio::test]
async fn post_spk_replaces_the_signed_pre_key_in_new_bundles() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let first = register(&app, curve, &alice, 2).await;
        let renewed = signed_pre_key(curve, 77);
        expect_done(
            &app,
            &alice,
            curve,
            Request::PostSignedPreKey(renewed.clone()),
        )
        .await;
        assert_eq!(
            self_opk_ids(&app, curve, &alice).await,
            [1, 2],
            "{curve}: postSPk leaves the OPks alone"
        );

        let bundles = peer_bundles(&app, curve, &[&alice]).await;
        let keys = keys_of(curve, &bundles[0], &first.identity_key, &renewed);
        assert_eq!(
            keys.signed_pre_key.id(),
            77,
            "{curve}: SPk_id is the new one"
        );

        // The device now stands for the new SPk: a retry of the first registration
        // no longer matches, one with the new SPk does.
        expect_error(
            &app,
            &alice,
            curve,
            Request::RegisterUser(first.clone()),
            ErrorCode::UserAlreadyIn,
        )
        .await;
        let current = Registration {
            signed_pre_key: renewed,
            ..first
        };
        expect_done(&app, &alice, curve, Request::RegisterUser(current)).await;
    }
}

#[tokio::test]
async fn post_spk_for_unknown_device_is_user_not_found() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let ghost = device_id("ghost");
        expect_error(
            &app,
            &ghost,
            curve,
            Request::PostSignedPreKey(signed_pre_key(curve, 1)),
            ErrorCode::UserNotFound,
        )
        .await;
        assert_eq!(
            flags(&peer_bundles(&app, curve, &[&ghost]).await),
            [2],
            "{curve}: postSPk must not create the device"
        );
    }
}

// ---- postOPks -----------------------------------------------------------------

#[tokio::test]
async fn post_opks_adds_to_the_device_opks() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        register(&app, curve, &alice, 2).await;
        let batch: Vec<_> = (3..=5)
            .map(|opk_id| one_time_pre_key(curve, opk_id))
            .collect();
        expect_done(&app, &alice, curve, Request::PostOneTimePreKeys(batch)).await;
        assert_eq!(self_opk_ids(&app, curve, &alice).await, [1, 2, 3, 4, 5]);
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 5, "{curve}");
    }
}

#[tokio::test]
async fn post_opks_with_count_0_succeeds_and_changes_nothing() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        register(&app, curve, &alice, 2).await;
        expect_done(&app, &alice, curve, Request::PostOneTimePreKeys(Vec::new())).await;
        assert_eq!(self_opk_ids(&app, curve, &alice).await, [1, 2]);
    }
}

#[tokio::test]
async fn post_opks_for_unknown_device_is_user_not_found() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let ghost = device_id("ghost");
        expect_error(
            &app,
            &ghost,
            curve,
            Request::PostOneTimePreKeys(vec![one_time_pre_key(curve, 1)]),
            ErrorCode::UserNotFound,
        )
        .await;
        // An empty upload for an unknown device is refused the same way.
        expect_error(
            &app,
            &ghost,
            curve,
            Request::PostOneTimePreKeys(Vec::new()),
            ErrorCode::UserNotFound,
        )
        .await;
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 0, "{curve}");
    }
}

#[tokio::test]
async fn post_opks_skips_a_key_identical_to_one_the_device_has() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let first = register(&app, curve, &alice, 3).await;
        let retry = vec![uploaded(&first, 2).clone(), one_time_pre_key(curve, 4)];
        expect_done(&app, &alice, curve, Request::PostOneTimePreKeys(retry)).await;
        assert_eq!(self_opk_ids(&app, curve, &alice).await, [1, 2, 3, 4]);
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 4, "{curve}");
    }
}

#[tokio::test]
async fn post_opks_reusing_an_id_for_other_bytes_is_bad_request_and_stores_nothing() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let first = register(&app, curve, &alice, 3).await;
        let upload = vec![one_time_pre_key(curve, 4), one_time_pre_key(curve, 2)];
        expect_error(
            &app,
            &alice,
            curve,
            Request::PostOneTimePreKeys(upload),
            ErrorCode::BadRequest,
        )
        .await;
        assert_eq!(self_opk_ids(&app, curve, &alice).await, [1, 2, 3]);
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 3, "{curve}");
        // OPk 2 still has the bytes it was registered with.
        assert_served_opks_are_the_uploaded_ones(&app, curve, &alice, &first, 3).await;
    }
}

#[tokio::test]
async fn post_opks_repeating_a_key_inside_one_message_stores_it_once() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        register(&app, curve, &alice, 1).await;
        let key = one_time_pre_key(curve, 2);
        let upload = vec![key.clone(), key.clone(), one_time_pre_key(curve, 3), key];
        expect_done(&app, &alice, curve, Request::PostOneTimePreKeys(upload)).await;
        assert_eq!(self_opk_ids(&app, curve, &alice).await, [1, 2, 3]);
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 3, "{curve}");
    }
}

#[tokio::test]
async fn post_opks_repeating_an_id_with_other_bytes_inside_one_message_is_bad_request() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        register(&app, curve, &alice, 1).await;
        let upload = vec![
            one_time_pre_key(curve, 2),
            one_time_pre_key(curve, 3),
            one_time_pre_key(curve, 2),
        ];
        expect_error(
            &app,
            &alice,
            curve,
            Request::PostOneTimePreKeys(upload),
            ErrorCode::BadRequest,
        )
        .await;
        assert_eq!(
            self_opk_ids(&app, curve, &alice).await,
            [1],
            "{curve}: nothing of the refused upload is stored"
        );
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 1, "{curve}");
    }
}

#[tokio::test]
async fn register_user_repeating_an_opk_stores_it_once() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let mut keys = registration(curve, 2, 1);
        let repeated = keys.one_time_pre_keys[0].clone();
        keys.one_time_pre_keys.push(repeated);
        expect_done(&app, &alice, curve, Request::RegisterUser(keys)).await;
        assert_eq!(self_opk_ids(&app, curve, &alice).await, [1, 2]);
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 2, "{curve}");
    }
}

#[tokio::test]
async fn register_user_repeating_an_opk_id_with_other_bytes_is_bad_request_and_registers_nothing() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let mut keys = registration(curve, 2, 1);
        keys.one_time_pre_keys.push(one_time_pre_key(curve, 1));
        expect_error(
            &app,
            &alice,
            curve,
            Request::RegisterUser(keys),
            ErrorCode::BadRequest,
        )
        .await;
        expect_error(
            &app,
            &alice,
            curve,
            Request::GetSelfOneTimePreKeys,
            ErrorCode::UserNotFound,
        )
        .await;
        assert_eq!(flags(&peer_bundles(&app, curve, &[&alice]).await), [2]);
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 0, "{curve}");
        // The refused registration left no trace: the device registers afresh.
        register(&app, curve, &alice, 1).await;
    }
}

// ---- getPeerBundle ------------------------------------------------------------

#[tokio::test]
async fn get_peer_bundle_answers_in_request_order_and_each_served_opk_leaves_the_server() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let bob = device_id("bob");
        let carol = device_id("carol");
        let dave = device_id("dave");
        let bob_keys = register(&app, curve, &bob, 2).await;
        let carol_keys = register(&app, curve, &carol, 1).await;

        let bundles = peer_bundles(&app, curve, &[&carol, &dave, &bob]).await;
        assert_eq!(flags(&bundles), [1, 2, 1], "{curve}");

        let carol_bundle = keys_of(
            curve,
            &bundles[0],
            &carol_keys.identity_key,
            &carol_keys.signed_pre_key,
        );
        let carol_opk = carol_bundle.one_time_pre_key.as_ref().unwrap();
        assert_eq!(carol_opk, uploaded(&carol_keys, 1), "{curve}");

        let bob_bundle = keys_of(
            curve,
            &bundles[2],
            &bob_keys.identity_key,
            &bob_keys.signed_pre_key,
        );
        let bob_opk = bob_bundle.one_time_pre_key.as_ref().unwrap();
        assert_eq!(bob_opk, uploaded(&bob_keys, bob_opk.id()), "{curve}");

        // Served once, then gone.
        assert_eq!(self_opk_ids(&app, curve, &carol).await, Vec::<u32>::new());
        let bob_left = self_opk_ids(&app, curve, &bob).await;
        assert_eq!(bob_left.len(), 1, "{curve}: bob had 2 OPks, one was served");
        assert!(!bob_left.contains(&bob_opk.id()), "{curve}: {bob_left:?}");
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 1, "{curve}");
    }
}

#[tokio::test]
async fn bundle_has_flag_0_once_the_device_opks_run_out() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let bob = device_id("bob");
        let keys = register(&app, curve, &bob, 1).await;
        let first = peer_bundles(&app, curve, &[&bob]).await;
        assert_eq!(flags(&first), [1], "{curve}");
        for _ in 0..2 {
            let next = peer_bundles(&app, curve, &[&bob]).await;
            assert_eq!(flags(&next), [0], "{curve}");
            keys_of(curve, &next[0], &keys.identity_key, &keys.signed_pre_key);
        }

        // Refilled, the device serves OPks again.
        let refill = vec![one_time_pre_key(curve, 2)];
        expect_done(
            &app,
            &bob,
            curve,
            Request::PostOneTimePreKeys(refill.clone()),
        )
        .await;
        let refilled = peer_bundles(&app, curve, &[&bob]).await;
        assert_eq!(
            refilled[0]
                .bundle
                .as_ref()
                .unwrap()
                .one_time_pre_key
                .as_ref(),
            Some(&refill[0]),
            "{curve}"
        );
    }
}

#[tokio::test]
async fn bundle_for_unknown_device_has_flag_2() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let ghost = device_id("ghost");
        let other = device_id("other");
        let bundles = peer_bundles(&app, curve, &[&ghost, &other]).await;
        assert_eq!(flags(&bundles), [2, 2], "{curve}");
    }
}

#[tokio::test]
async fn device_named_twice_in_one_request_gives_at_most_one_opk() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let bob = device_id("bob");
        let carol = device_id("carol");
        let bob_keys = register(&app, curve, &bob, 3).await;
        register(&app, curve, &carol, 0).await;

        let bundles = peer_bundles(&app, curve, &[&bob, &carol, &bob, &bob]).await;
        assert_eq!(flags(&bundles), [1, 0, 0, 0], "{curve}");
        for bundle in [&bundles[2], &bundles[3]] {
            keys_of(
                curve,
                bundle,
                &bob_keys.identity_key,
                &bob_keys.signed_pre_key,
            );
        }
        assert_eq!(self_opk_ids(&app, curve, &bob).await.len(), 2, "{curve}");
    }
}

#[tokio::test]
async fn device_without_signed_pre_key_gets_flag_2_and_keeps_its_opks() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        // What a database written by an old server may hold: a device with its Ik and
        // OPks but no SPk yet.
        let old = device_id("old");
        let identity_key = random_bytes(curve.identity_key_len());
        let old_opk = one_time_pre_key(curve, 9);
        app.probe
            .insert_device_without_signed_pre_key(
                curve,
                &old,
                &identity_key,
                (old_opk.public(), old_opk.id()),
            )
            .await;
        let bob = device_id("bob");
        register(&app, curve, &bob, 1).await;

        let bundles = peer_bundles(&app, curve, &[&old, &bob]).await;
        assert_eq!(flags(&bundles), [2, 1], "{curve}");
        assert_eq!(
            self_opk_ids(&app, curve, &old).await,
            [9],
            "{curve}: no OPk is taken for a device that gets no bundle"
        );

        // Once it posts an SPk, it is served like any device.
        let spk = signed_pre_key(curve, 3);
        expect_done(&app, &old, curve, Request::PostSignedPreKey(spk.clone())).await;
        let bundles = peer_bundles(&app, curve, &[&old]).await;
        let identity_key = IdentityKey::new(curve, identity_key).unwrap();
        let keys = keys_of(curve, &bundles[0], &identity_key, &spk);
        assert_eq!(keys.one_time_pre_key.as_ref(), Some(&old_opk), "{curve}");
    }
}

// ---- deleteUser and getSelfOPks -----------------------------------------------

#[tokio::test]
async fn delete_user_removes_the_device_and_its_opks() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let bob = device_id("bob");
        register(&app, curve, &alice, 3).await;
        register(&app, curve, &bob, 1).await;
        expect_done(&app, &alice, curve, Request::DeleteUser).await;

        assert_eq!(flags(&peer_bundles(&app, curve, &[&alice]).await), [2]);
        expect_error(
            &app,
            &alice,
            curve,
            Request::GetSelfOneTimePreKeys,
            ErrorCode::UserNotFound,
        )
        .await;
        assert_eq!(
            app.stored_one_time_pre_keys(curve).await,
            1,
            "{curve}: alice's OPks go with her, bob's stay"
        );
        assert_eq!(self_opk_ids(&app, curve, &bob).await, [1]);
        // Gone for good: the same id registers afresh with new keys.
        register(&app, curve, &alice, 1).await;
    }
}

#[tokio::test]
async fn delete_user_of_unknown_device_succeeds() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let ghost = device_id("ghost");
        expect_done(&app, &ghost, curve, Request::DeleteUser).await;
        expect_done(&app, &ghost, curve, Request::DeleteUser).await;
    }
}

#[tokio::test]
async fn get_self_opks_for_unknown_device_is_user_not_found() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        expect_error(
            &app,
            &device_id("ghost"),
            curve,
            Request::GetSelfOneTimePreKeys,
            ErrorCode::UserNotFound,
        )
        .await;
    }
}

// ---- limits and configuration -------------------------------------------------

#[tokio::test]
async fn post_opks_past_the_per_device_limit_is_resource_limit_reached_and_stores_nothing() {
    let app = spawn_app_with(|s| s.limits.max_opks_per_device = 10).await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let first = register(&app, curve, &alice, 6).await;
        let up_to_limit: Vec<_> = (7..=10)
            .map(|opk_id| one_time_pre_key(curve, opk_id))
            .collect();
        expect_done(
            &app,
            &alice,
            curve,
            Request::PostOneTimePreKeys(up_to_limit),
        )
        .await;
        let full: Vec<u32> = (1..=10).collect();

        let past_limit = vec![one_time_pre_key(curve, 11), one_time_pre_key(curve, 12)];
        expect_error(
            &app,
            &alice,
            curve,
            Request::PostOneTimePreKeys(past_limit),
            ErrorCode::ResourceLimitReached,
        )
        .await;
        assert_eq!(self_opk_ids(&app, curve, &alice).await, full, "{curve}");
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 10, "{curve}");

        // A retry of keys already held adds nothing, so it is within the limit.
        let retry = vec![uploaded(&first, 1).clone()];
        expect_done(&app, &alice, curve, Request::PostOneTimePreKeys(retry)).await;

        // One served, one more fits.
        assert_eq!(flags(&peer_bundles(&app, curve, &[&alice]).await), [1]);
        let one_more = vec![one_time_pre_key(curve, 11)];
        expect_done(&app, &alice, curve, Request::PostOneTimePreKeys(one_more)).await;
        assert_eq!(self_opk_ids(&app, curve, &alice).await.len(), 10, "{curve}");
    }
}

#[tokio::test]
async fn register_user_past_the_per_device_limit_is_resource_limit_reached_and_registers_nothing() {
    let app = spawn_app_with(|s| s.limits.max_opks_per_device = 10).await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        expect_error(
            &app,
            &alice,
            curve,
            Request::RegisterUser(registration(curve, 11, 1)),
            ErrorCode::ResourceLimitReached,
        )
        .await;
        expect_error(
            &app,
            &alice,
            curve,
            Request::GetSelfOneTimePreKeys,
            ErrorCode::UserNotFound,
        )
        .await;
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 0, "{curve}");
        register(&app, curve, &alice, 10).await;
    }
}

#[tokio::test]
async fn every_request_on_a_curve_not_enabled_is_bad_curve() {
    let app = spawn_app_with(|s| s.storage.curves = vec!["c25519".into()]).await;
    let alice = device_id("alice");
    register(&app, Curve::C25519, &alice, 1).await;
    for curve in Curve::ALL.into_iter().filter(|c| *c != Curve::C25519) {
        let requests = [
            Request::RegisterUser(registration(curve, 1, 1)),
            Request::DeleteUser,
            Request::PostSignedPreKey(signed_pre_key(curve, 2)),
            Request::PostOneTimePreKeys(vec![one_time_pre_key(curve, 2)]),
            Request::GetPeerBundle(vec![id(&alice)]),
            Request::GetSelfOneTimePreKeys,
        ];
        for request in requests {
            expect_error(&app, &alice, curve, request, ErrorCode::BadCurve).await;
        }
    }
    assert_eq!(self_opk_ids(&app, Curve::C25519, &alice).await, [1]);
}

/// A server on `app`'s stores that gives up on its store after 300 ms. Set-up and
/// checks go through `app`: on a loaded machine a request can take longer than
/// that without any lock, and only the request under test may fail for it. Its
/// bundle request limit is off: a SQLite file is served by one server with the
/// limit on (it counts in memory), and that is `app`.
async fn impatient_beside(app: &TestApp) -> TestApp {
    app.spawn_beside(|s| {
        s.storage.timeout_ms = 300;
        s.limits.max_bundle_requests = 0;
    })
    .await
}

#[tokio::test]
async fn store_that_does_not_answer_in_time_is_db_error_and_registers_nothing() {
    let app = spawn_app().await;
    let impatient = impatient_beside(&app).await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let lock = app.probe.lock_for_writing(curve).await;
        expect_error(
            &impatient,
            &alice,
            curve,
            Request::RegisterUser(registration(curve, 2, 1)),
            ErrorCode::DbError,
        )
        .await;
        lock.release().await;
        // db_error promises that nothing changed. This request queues behind the
        // failed one on the same server, so it sees whatever that one left; the
        // store may still be too slow for 300 ms, so it is asked again until it
        // answers something else.
        let mut answer = None;
        for _ in 0..20 {
            match ask(&impatient, &alice, curve, Request::GetSelfOneTimePreKeys).await {
                Response::Error(error) if error.code == ErrorCode::DbError => continue,
                other => {
                    answer = Some(other);
                    break;
                }
            }
        }
        match answer {
            Some(Response::Error(error)) => {
                assert_eq!(
                    error.code,
                    ErrorCode::UserNotFound,
                    "{curve}: {}",
                    error.text
                )
            }
            other => panic!("{curve}: getSelfOPks after the failed registration: {other:?}"),
        }
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 0, "{curve}");
    }
}

#[tokio::test]
async fn store_that_does_not_answer_in_time_is_db_error_and_serves_no_opk() {
    let app = spawn_app().await;
    let impatient = impatient_beside(&app).await;
    for curve in Curve::ALL {
        let bob = device_id("bob");
        register(&app, curve, &bob, 2).await;
        let lock = app.probe.lock_for_writing(curve).await;
        expect_error(
            &impatient,
            ASKER,
            curve,
            Request::GetPeerBundle(vec![id(&bob)]),
            ErrorCode::DbError,
        )
        .await;
        lock.release().await;
        // An OPk taken for an answer nobody received would be lost to bob.
        assert_eq!(self_opk_ids(&app, curve, &bob).await, [1, 2], "{curve}");
    }
}

// ---- transport ----------------------------------------------------------------

#[tokio::test]
async fn every_answer_is_an_http_200_x3dh_message_echoing_the_curve() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let requests = [
            (
                Request::RegisterUser(registration(curve, 2, 1)),
                MessageType::RegisterUser,
            ),
            (
                Request::PostSignedPreKey(signed_pre_key(curve, 2)),
                MessageType::PostSignedPreKey,
            ),
            (
                Request::PostOneTimePreKeys(vec![one_time_pre_key(curve, 3)]),
                MessageType::PostOneTimePreKeys,
            ),
            (
                Request::GetSelfOneTimePreKeys,
                MessageType::SelfOneTimePreKeys,
            ),
            (
                Request::GetPeerBundle(vec![id(&alice)]),
                MessageType::PeerBundle,
            ),
            (Request::DeleteUser, MessageType::DeleteUser),
            // Now unknown: an error answer.
            (Request::GetSelfOneTimePreKeys, MessageType::Error),
        ];
        for (request, answer_type) in requests {
            let body = RequestMessage { curve, request }.encode().unwrap();
            let raw = app
                .post_raw(
                    &[
                        ("content-type", X3DH_CONTENT_TYPE),
                        ("x-lime-user-identity", &alice),
                    ],
                    body,
                )
                .await;
            let header = [0x01, answer_type.byte(), curve.id()];
            assert_eq!(
                raw.body.get(..3),
                Some(&header[..]),
                "{curve}: answer header for {answer_type}"
            );
            let done = [
                MessageType::RegisterUser,
                MessageType::PostSignedPreKey,
                MessageType::PostOneTimePreKeys,
                MessageType::DeleteUser,
            ];
            if done.contains(&answer_type) {
                assert_eq!(raw.body.len(), 3, "{curve}: success is the bare header");
            }
            x3dh_answer(&raw);
        }
    }
}

/// HTTP headers, as `post_raw` takes them.
type Headers<'a> = &'a [(&'a str, &'a str)];

#[tokio::test]
async fn malformed_requests_get_their_error_code_on_every_curve() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let valid = RequestMessage {
            curve,
            request: Request::GetSelfOneTimePreKeys,
        }
        .encode()
        .unwrap();
        let x3dh = ("content-type", X3DH_CONTENT_TYPE);
        let sender = ("x-lime-user-identity", alice.as_str());
        let with_version_2 = [&[0x02], &valid[1..]].concat();
        let with_garbage = [&valid[..], &[0x00]].concat();
        let deprecated = [0x01, 0x01, curve.id()].to_vec();
        let empty_bundle_request = [0x01, MessageType::GetPeerBundle.byte(), curve.id(), 0, 0];
        let cases: [(Headers, Vec<u8>, ErrorCode); 6] = [
            (
                &[("content-type", "application/octet-stream"), sender],
                valid.clone(),
                ErrorCode::BadContentType,
            ),
            (&[x3dh], valid.clone(), ErrorCode::MissingSenderId),
            (
                &[x3dh, sender],
                with_version_2,
                ErrorCode::BadX3dhProtocolVersion,
            ),
            (&[x3dh, sender], with_garbage, ErrorCode::BadSize),
            (&[x3dh, sender], deprecated, ErrorCode::BadRequest),
            (
                &[x3dh, sender],
                empty_bundle_request.to_vec(),
                ErrorCode::BadRequest,
            ),
        ];
        for (headers, body, code) in cases {
            let answer = x3dh_answer(&app.post_raw(headers, body).await);
            assert_eq!(answer.curve_byte, curve.id(), "{curve}: {code}");
            match answer.response {
                Response::Error(error) => assert_eq!(error.code, code, "{curve}: {}", error.text),
                other => panic!("{curve}: expected {code}, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn legacy_php_path_serves_like_the_root() {
    let app = spawn_app().await;
    let legacy = format!("{}lime-server/lime-server.php", app.base_url);
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let send = |request: Request| {
            let message = RequestMessage { curve, request };
            let client = app.client.clone();
            let url = legacy.clone();
            let sender = alice.clone();
            async move { client.send(&url, &sender, &message).await.unwrap() }
        };
        let keys = registration(curve, 2, 1);
        let answer = send(Request::RegisterUser(keys.clone())).await;
        assert_eq!(answer.curve_byte, curve.id());
        assert_eq!(answer.response, Response::Done(MessageType::RegisterUser));
        // What the legacy path stored, the root path sees, and the other way round.
        assert_eq!(self_opk_ids(&app, curve, &alice).await, [1, 2]);
        expect_done(
            &app,
            &alice,
            curve,
            Request::PostOneTimePreKeys(vec![one_time_pre_key(curve, 3)]),
        )
        .await;
        let answer = send(Request::GetSelfOneTimePreKeys).await;
        assert_eq!(answer.response, Response::SelfOneTimePreKeys(vec![1, 2, 3]));

        let answer = send(Request::GetPeerBundle(vec![id(&alice)])).await;
        let Response::PeerBundles(bundles) = answer.response else {
            panic!("{curve}: expected peerBundle, got {answer:?}");
        };
        keys_of(curve, &bundles[0], &keys.identity_key, &keys.signed_pre_key);
        assert_eq!(flags(&bundles), [1]);

        let answer = send(Request::DeleteUser).await;
        assert_eq!(answer.response, Response::Done(MessageType::DeleteUser));
        let answer = send(Request::GetSelfOneTimePreKeys).await;
        assert!(
            matches!(&answer.response, Response::Error(e) if e.code == ErrorCode::UserNotFound),
            "{curve}: {answer:?}"
        );
    }
}

#[tokio::test]
async fn from_header_names_the_sender_when_x_lime_user_identity_is_absent() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let alice = device_id("alice");
        let body = RequestMessage {
            curve,
            request: Request::RegisterUser(registration(curve, 2, 1)),
        }
        .encode()
        .unwrap();
        let raw = app
            .post_raw(
                &[("content-type", X3DH_CONTENT_TYPE), ("from", &alice)],
                body,
            )
            .await;
        assert_eq!(
            x3dh_answer(&raw).response,
            Response::Done(MessageType::RegisterUser),
            "{curve}"
        );
        assert_eq!(self_opk_ids(&app, curve, &alice).await, [1, 2]);
    }
}

#[tokio::test]
async fn x_lime_user_identity_wins_over_from() {
    let app = spawn_app().await;
    for curve in Curve::ALL {
        let claimed = device_id("claimed");
        let from = device_id("from");
        let body = RequestMessage {
            curve,
            request: Request::RegisterUser(registration(curve, 1, 1)),
        }
        .encode()
        .unwrap();
        let raw = app
            .post_raw(
                &[
                    ("content-type", X3DH_CONTENT_TYPE),
                    ("from", &from),
                    ("x-lime-user-identity", &claimed),
                ],
                body,
            )
            .await;
        assert_eq!(
            x3dh_answer(&raw).response,
            Response::Done(MessageType::RegisterUser),
            "{curve}"
        );
        assert_eq!(self_opk_ids(&app, curve, &claimed).await, [1]);
        expect_error(
            &app,
            &from,
            curve,
            Request::GetSelfOneTimePreKeys,
            ErrorCode::UserNotFound,
        )
        .await;
    }
}

// ---- helpers that read the whole story ----------------------------------------

/// Takes `count` bundles of `device` and checks that each OPk served is one that
/// was uploaded, byte for byte, and that none is served twice.
async fn assert_served_opks_are_the_uploaded_ones(
    app: &TestApp,
    curve: Curve,
    device: &str,
    registration: &Registration,
    count: usize,
) {
    let mut served = HashSet::new();
    for _ in 0..count {
        let bundles = peer_bundles(app, curve, &[device]).await;
        let keys = keys_of(
            curve,
            &bundles[0],
            &registration.identity_key,
            &registration.signed_pre_key,
        );
        let opk = keys
            .one_time_pre_key
            .as_ref()
            .unwrap_or_else(|| panic!("{curve}: {device} ran out of OPks early"));
        assert_eq!(opk, uploaded(registration, opk.id()), "{curve}");
        assert!(
            served.insert(opk.id()),
            "{curve}: OPk {} served twice",
            opk.id()
        );
    }
}
