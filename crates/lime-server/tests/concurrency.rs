//! One-time means once, whatever the concurrency: many clients asking for the same
//! device's bundle at the same time get each of its one-time pre-keys at most once,
//! and retries racing each other store keys once.
//!
//! Tasks start together behind a barrier, each with its own requests in flight at
//! once over a clone of the harness client (its own pooled connections), on a
//! multi-thread runtime so that requests really overlap in the server.

mod common;

use common::{device_id, id, one_time_pre_key, registration, spawn_app, spawn_app_with};
use futures::future::join_all;
use lime_protocol::{
    Curve, MessageType, OneTimePreKey, Request, RequestMessage, Response, ResponseMessage,
};
use lime_server::config::LimitSettings;
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::Barrier;

/// One-time pre-keys the claimed device holds.
const OPKS: u32 = 20;
/// Tasks sending at the same time.
const TASKS: usize = 8;
/// Requests each task has in flight at once.
const REQUESTS_PER_TASK: usize = 8;

/// Sends `message` `TASKS` x `REQUESTS_PER_TASK` times at once, each task as its own
/// sender, and returns every answer.
async fn send_all_at_once(
    app: &common::TestApp,
    message: &RequestMessage,
    sender: impl Fn(usize) -> String,
) -> Vec<ResponseMessage> {
    let start = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let client = app.client.clone();
        let url = app.base_url.clone();
        let message = message.clone();
        let start = start.clone();
        let sender = sender(task);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let requests = (0..REQUESTS_PER_TASK).map(|_| client.send(&url, &sender, &message));
            join_all(requests)
                .await
                .into_iter()
                .map(|answer| answer.expect("every request is answered"))
                .collect::<Vec<_>>()
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.extend(task.await.expect("the task does not panic"));
    }
    answers
}

/// Every request asks for all of `targets`. With `limit` (the shipped bundle
/// request limit, which the suites otherwise turn off) a request of several
/// targets, a group's, is claimed in batches on the database servers.
async fn each_opk_is_served_once_to_concurrent_requests(
    curve: Curve,
    targets: &[&str],
    limit: bool,
) {
    let app = spawn_app_with(|settings| {
        if limit {
            settings.limits.max_bundle_requests = LimitSettings::default().max_bundle_requests;
        }
    })
    .await;
    let targets: Vec<String> = targets.iter().map(|name| device_id(name)).collect();
    let mut uploaded = Vec::new();
    for target in &targets {
        let keys = registration(curve, OPKS, 1);
        let answer = app
            .ask(target, curve, Request::RegisterUser(keys.clone()))
            .await;
        assert_eq!(answer.response, Response::Done(MessageType::RegisterUser));
        uploaded.push(keys);
    }

    let ask_for_targets = RequestMessage {
        curve,
        request: Request::GetPeerBundle(targets.iter().map(|target| id(target)).collect()),
    };
    // Registered first, as liblime registers a device before it fetches.
    let askers: Vec<String> = (0..TASKS)
        .map(|task| device_id(&format!("asker{task}")))
        .collect();
    for asker in &askers {
        let answer = app
            .ask(
                asker,
                curve,
                Request::RegisterUser(registration(curve, 0, 1)),
            )
            .await;
        assert_eq!(answer.response, Response::Done(MessageType::RegisterUser));
    }
    let answers = send_all_at_once(&app, &ask_for_targets, |task| askers[task].clone()).await;
    assert_eq!(answers.len(), TASKS * REQUESTS_PER_TASK);

    let mut served: Vec<Vec<OneTimePreKey>> = vec![Vec::new(); targets.len()];
    let mut without_opk = vec![0; targets.len()];
    for answer in answers {
        assert_eq!(answer.curve_byte, curve.id());
        let Response::PeerBundles(bundles) = answer.response else {
            panic!("{curve}: expected peerBundle, got {answer:?}");
        };
        assert_eq!(bundles.len(), targets.len(), "{curve}");
        for (index, (target, keys)) in targets.iter().zip(&uploaded).enumerate() {
            assert_eq!(bundles[index].device_id.as_str(), target);
            let bundle = bundles[index]
                .bundle
                .as_ref()
                .unwrap_or_else(|| panic!("{curve}: {target}'s bundle has flag 2"));
            assert_eq!(bundle.identity_key, keys.identity_key, "{curve}");
            assert_eq!(bundle.signed_pre_key, keys.signed_pre_key, "{curve}");
            match &bundle.one_time_pre_key {
                Some(opk) => served[index].push(opk.clone()),
                None => without_opk[index] += 1,
            }
        }
    }

    for (index, (target, keys)) in targets.iter().zip(&uploaded).enumerate() {
        let served = &served[index];
        let ids: HashSet<u32> = served.iter().map(OneTimePreKey::id).collect();
        assert_eq!(
            ids.len(),
            served.len(),
            "{curve}: an OPk of {target} was served twice"
        );
        assert_eq!(
            served.len(),
            OPKS as usize,
            "{curve}: every OPk of {target} is served once"
        );
        for opk in served {
            assert!(
                keys.one_time_pre_keys.contains(opk),
                "{curve}: OPk {} is not one {target} uploaded (id or bytes)",
                opk.id()
            );
        }
        assert_eq!(
            without_opk[index],
            TASKS * REQUESTS_PER_TASK - OPKS as usize,
            "{curve}: the rest of {target}'s have flag 0"
        );
        let answer = app.ask(target, curve, Request::GetSelfOneTimePreKeys).await;
        assert_eq!(answer.response, Response::SelfOneTimePreKeys(Vec::new()));
    }
    assert_eq!(app.stored_one_time_pre_keys(curve).await, 0, "{curve}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn c25519_each_opk_is_served_once_to_64_concurrent_bundle_requests() {
    each_opk_is_served_once_to_concurrent_requests(Curve::C25519, &["bob"], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn c448mlk1024_each_opk_is_served_once_to_64_concurrent_bundle_requests() {
    each_opk_is_served_once_to_concurrent_requests(Curve::C448Mlk1024, &["bob"], false).await;
}

/// A group's request: three devices, the limit on, so that both database
/// servers claim it in batches (MariaDB: the keys in two statements, PostgreSQL
/// in one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn c25519_each_opk_of_a_group_is_served_once_to_64_concurrent_group_requests() {
    each_opk_is_served_once_to_concurrent_requests(Curve::C25519, &["bob", "carol", "dave"], true)
        .await;
}

/// The same without the limit: every key of a group's request taken at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn c25519_each_opk_of_a_group_is_served_once_to_concurrent_group_requests_without_the_limit()
{
    each_opk_is_served_once_to_concurrent_requests(Curve::C25519, &["bob", "carol", "dave"], false)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_of_one_registration_register_the_device_once() {
    for curve in [Curve::C25519, Curve::C25519Mlk512] {
        let app = spawn_app().await;
        let alice = device_id("alice");
        let register = RequestMessage {
            curve,
            request: Request::RegisterUser(registration(curve, 5, 1)),
        };
        let answers = send_all_at_once(&app, &register, |_| alice.clone()).await;
        for answer in answers {
            assert_eq!(answer.curve_byte, curve.id());
            assert_eq!(
                answer.response,
                Response::Done(MessageType::RegisterUser),
                "{curve}: a retry of the same registration succeeds"
            );
        }
        let answer = app.ask(&alice, curve, Request::GetSelfOneTimePreKeys).await;
        let Response::SelfOneTimePreKeys(mut ids) = answer.response else {
            panic!("{curve}: expected selfOPks, got {answer:?}");
        };
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2, 3, 4, 5], "{curve}");
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 5, "{curve}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_of_one_opk_upload_store_each_key_once() {
    for curve in [Curve::C25519, Curve::C25519Mlk512] {
        let app = spawn_app().await;
        let alice = device_id("alice");
        let answer = app
            .ask(
                &alice,
                curve,
                Request::RegisterUser(registration(curve, 2, 1)),
            )
            .await;
        assert_eq!(answer.response, Response::Done(MessageType::RegisterUser));
        let upload = RequestMessage {
            curve,
            request: Request::PostOneTimePreKeys(
                (3..=6)
                    .map(|opk_id| one_time_pre_key(curve, opk_id))
                    .collect(),
            ),
        };
        let answers = send_all_at_once(&app, &upload, |_| alice.clone()).await;
        for answer in answers {
            assert_eq!(
                answer.response,
                Response::Done(MessageType::PostOneTimePreKeys),
                "{curve}: a retried upload succeeds"
            );
        }
        let answer = app.ask(&alice, curve, Request::GetSelfOneTimePreKeys).await;
        let Response::SelfOneTimePreKeys(mut ids) = answer.response else {
            panic!("{curve}: expected selfOPks, got {answer:?}");
        };
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2, 3, 4, 5, 6], "{curve}");
        assert_eq!(app.stored_one_time_pre_keys(curve).await, 6, "{curve}");
    }
}
