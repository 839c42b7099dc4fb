//! Several `lime-server` processes on one database, as behind a load balancer:
//! every one-time pre-key is still served at most once, by whichever server.
//!
//! Runs on the machine's MariaDB and PostgreSQL (SQLite is one machine's file: its
//! single-writer store is covered by `concurrency.rs`).

mod common;

use common::backend::{Backend, TestDatabases};
use common::process::ServerProcess;
use common::{device_id, id, registration};
use futures::stream::{self, StreamExt};
use lime_protocol::{Curve, MessageType, Request, RequestMessage, Response};
use lime_server::client::LimeClient;
use std::collections::HashSet;

/// Devices whose keys are fetched.
const TARGETS: u32 = 8;
/// One-time pre-keys each target uploads: 320 in all.
const OPKS_PER_TARGET: u32 = 40;
/// getPeerBundle requests, split evenly across the servers.
const REQUESTS: usize = 2_000;
/// Requests in flight at once.
const CONCURRENCY: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_on_one_mariadb_serve_each_one_time_key_once() {
    two_servers_serve_each_one_time_key_once(Backend::Mariadb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_on_one_postgres_serve_each_one_time_key_once() {
    two_servers_serve_each_one_time_key_once(Backend::Postgres).await;
}

async fn two_servers_serve_each_one_time_key_once(backend: Backend) {
    let curve = Curve::C25519;
    let (databases, url) = TestDatabases::create(backend, &Curve::ALL).await;
    let url = url.expect("a database server URL");
    let data_dir = tempfile::tempdir().unwrap();
    let data_dir = data_dir.path().to_str().unwrap();
    let servers: Vec<ServerProcess> = (0..2)
        .map(|_| {
            ServerProcess::start(&[
                "--plain-http",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data_dir,
                "--store",
                &url,
            ])
        })
        .collect();
    let urls: Vec<String> = servers
        .iter()
        .map(|server| format!("http://{}/", server.addr))
        .collect();
    let client = LimeClient::plain().unwrap();

    let targets: Vec<String> = (0..TARGETS).map(|_| device_id("target")).collect();
    for (n, target) in targets.iter().enumerate() {
        let message = RequestMessage {
            curve,
            request: Request::RegisterUser(registration(curve, OPKS_PER_TARGET, 1)),
        };
        let answer = client.send(&urls[n % 2], target, &message).await.unwrap();
        assert_eq!(
            answer.response,
            Response::Done(MessageType::RegisterUser),
            "{target}"
        );
    }

    // Each request asks for two targets, so that claims for one device race both
    // inside a server and across the two.
    let answers: Vec<Response> = stream::iter(0..REQUESTS)
        .map(|n| {
            let client = client.clone();
            let url = urls[n % 2].clone();
            let devices = vec![
                id(&targets[n % targets.len()]),
                id(&targets[(n / 2 + 3) % targets.len()]),
            ];
            async move {
                let message = RequestMessage {
                    curve,
                    request: Request::GetPeerBundle(devices),
                };
                client
                    .send(&url, "sip:asker@example.org;gr=x", &message)
                    .await
                    .unwrap()
                    .response
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;

    // A claim skips keys other transactions hold locked (SKIP LOCKED), so a burst
    // may leave a few keys behind with flag 0 answers: drain them one by one,
    // alternating servers, before counting.
    let mut answers = answers;
    for (n, target) in targets.iter().enumerate() {
        loop {
            let message = RequestMessage {
                curve,
                request: Request::GetPeerBundle(vec![id(target)]),
            };
            let answer = client
                .send(&urls[n % 2], "sip:asker@example.org;gr=x", &message)
                .await
                .unwrap();
            let drained = matches!(&answer.response, Response::PeerBundles(bundles)
                if bundles.iter().all(|entry| entry.flag() != 1));
            answers.push(answer.response);
            if drained {
                break;
            }
        }
    }

    let mut served = HashSet::new();
    for answer in answers {
        let Response::PeerBundles(bundles) = answer else {
            panic!("{backend:?}: expected peerBundle, got {answer:?}");
        };
        for entry in bundles {
            let bundle = entry.bundle.expect("every target has a bundle");
            if let Some(key) = bundle.one_time_pre_key {
                let first_time = served.insert((entry.device_id.as_str().to_owned(), key.id()));
                assert!(
                    first_time,
                    "{backend:?}: OPk {} of {} served twice",
                    key.id(),
                    entry.device_id
                );
            }
        }
    }
    assert_eq!(
        served.len(),
        (TARGETS * OPKS_PER_TARGET) as usize,
        "{backend:?}: every OPk that existed is served exactly once"
    );
    let probe_settings = {
        let mut settings = lime_server::config::Settings::default();
        settings.storage.url = Some(url.clone());
        settings
    };
    let probe = common::store_probe::StoreProbe::new(&probe_settings);
    assert_eq!(
        probe.count_one_time_pre_keys(curve).await,
        0,
        "{backend:?}: the store ends empty"
    );
    drop(servers);
    drop(databases);
}
