//! Three `lime-server` instances on a three-node MariaDB Galera cluster, one per
//! node (the high-availability deployment of docs/operators.md): every one-time
//! pre-key is served at most once across instances and nodes, none is lost, the
//! limits hold across nodes within their documented margin, and when a node is
//! killed its instance answers `db_error` (and `/ready` 503) until the node is
//! back while the other two keep serving.
//!
//! One test, in stages, on one cluster (`scripts/galera-cluster.sh`, SQL ports
//! 3311-3313 unless taken): starting a cluster takes ~15 s, the whole ~1 min.

mod common;

use common::galera::GaleraCluster;
use common::process::{self, ServerProcess};
use common::scrape::{self, Scrape};
use common::served::ServedKeys;
use common::store_probe::StoreProbe;
use common::{device_id, id, registration};
use futures::stream::{self, StreamExt};
use lime_protocol::{Curve, DeviceId, ErrorCode, MessageType, Request, RequestMessage, Response};
use lime_server::client::LimeClient;
use lime_server::config::Settings;
use lime_server::store::{
    self, BundleRequestLimit, KeyStore, OverLimit, ServerStoreOptions, StoreLimits, StoreLocation,
};
use sqlx::{Connection, MySqlConnection};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CURVE: Curve = Curve::C25519;
const NODES: usize = 3;
/// The database the instances share, replicated on every node.
const DATABASE: &str = "lime_galera";
/// Devices whose keys are fetched, and the one-time pre-keys each uploads.
const TARGETS: usize = 6;
const OPKS_PER_TARGET: u32 = 60;
/// getPeerBundle requests (two targets each) while all nodes are up, and in
/// flight at once, spread over the instances.
const REQUESTS: usize = 120;
const CONCURRENCY: usize = 36;
/// The device that fetches bundles (no request limit on the instances).
const ASKER: &str = "sip:asker@example.org;gr=x";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_servers_on_a_galera_cluster_serve_each_key_once_and_survive_a_lost_node() {
    let started = Instant::now();
    let cluster = GaleraCluster::start(NODES);
    let urls: Vec<String> = (1..=NODES)
        .map(|node| cluster.url(node, DATABASE))
        .collect();
    init_on_first_node(&cluster, &urls).await;
    for url in &urls {
        assert_schema_replicated(url).await;
    }

    registrations_across_nodes_never_fail(&urls).await;
    limits_hold_across_nodes(&urls).await;

    let data_dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[storage]\ncurves = [\"{}\"]\n[limits]\nmax_bundle_requests = 0\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
        CURVE.name()
    );
    let stores: Vec<&str> = urls.iter().map(String::as_str).collect();
    let servers = process::start_plain_servers(data_dir.path(), &config, &stores);
    let instances = process::plain_urls(&servers);
    let client = LimeClient::plain().unwrap();
    // The keys of the devices of the stages above stay in the store.
    let before = probe(&urls[0]).count_one_time_pre_keys(CURVE).await as usize;
    let targets = register_targets(&client, &instances).await;

    // All nodes up: every request answered, no key twice, none lost.
    let mut served = ServedKeys::default();
    let answers = fetch_bundles(&client, &instances, &targets, REQUESTS).await;
    for (instance, answer) in answers {
        served.record(answer, format!("instance {instance}"));
    }
    let uploaded = before + TARGETS * OPKS_PER_TARGET as usize;
    for url in &urls {
        wait_for_stored(url, uploaded - served.len(), Duration::from_secs(10)).await;
    }
    let retries = commit_retries(&servers);
    eprintln!(
        "all nodes up: {} keys served by {REQUESTS} requests, {retries} claims run again after \
         a certification failure at COMMIT",
        served.len()
    );

    // Node 3 killed under load: its instance answers db_error and is not ready,
    // the two others keep serving.
    let lost = 3;
    let load = {
        let (client, instances, targets) = (client.clone(), instances.clone(), targets.clone());
        tokio::spawn(async move { fetch_bundles(&client, &instances, &targets, 60).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill_node(lost);
    let mut answers = load.await.unwrap();
    let lost_server = &servers[lost - 1];
    wait_until_ready_is(lost_server, 503, Duration::from_secs(20));
    // The survivors notice the loss within evs.inactive_timeout (3 s here; more
    // on a loaded machine): wait (bounded) until both are a cluster of two.
    wait_for_cluster_size(&urls[..lost - 1], NODES - 1, Duration::from_secs(30)).await;
    answers.extend(fetch_bundles(&client, &instances, &targets, 30).await);
    let mut lost_instance_failed = 0;
    for (instance, answer) in answers {
        match answer {
            Response::Error(error) => {
                assert_eq!(error.code, ErrorCode::DbError, "instance {instance}");
                if instance == lost - 1 {
                    lost_instance_failed += 1;
                }
            }
            answer => served.record(answer, format!("instance {instance}, node {lost} down")),
        }
    }
    assert!(
        lost_instance_failed > 0,
        "the instance on the killed node answered db_error"
    );
    // After the loss was noticed, the two others answer every request.
    let survivors = [instances[0].clone(), instances[1].clone()];
    for (instance, answer) in fetch_bundles(&client, &survivors, &targets, 30).await {
        served.record(answer, format!("surviving instance {instance}"));
    }

    // The node rejoins (IST), its instance is ready again and serves.
    cluster.start_node(lost);
    wait_until_ready_is(lost_server, 200, Duration::from_secs(30));
    let only_lost = [instances[lost - 1].clone()];
    for (_, answer) in fetch_bundles(&client, &only_lost, &targets, 10).await {
        served.record(
            answer,
            format!("instance {} after its node rejoined", lost - 1),
        );
    }
    // A claim whose COMMIT went unanswered when the node died is settled by its
    // instance in the background: the counts converge within seconds.
    for url in &urls {
        wait_for_stored(url, uploaded - served.len(), Duration::from_secs(20)).await;
    }
    // Claims of the same targets through three nodes at once: some lost at
    // certification (8 to 30 per run here), and were run again rather than answered
    // db_error (which the checks above would have failed on).
    let retries = commit_retries(&servers);
    assert!(
        retries > 0.0,
        "no certification failure was counted as retried"
    );
    eprintln!(
        "{} keys served in all; {retries} claims run again after a certification failure; {:?}",
        served.len(),
        started.elapsed()
    );
    drop(servers);
    drop(cluster);
}

/// `db init` through node 1; the other nodes get the database and its schema
/// by replication.
async fn init_on_first_node(cluster: &GaleraCluster, urls: &[String]) {
    let admin = cluster.url(1, "");
    let mut conn = MySqlConnection::connect(admin.trim_end_matches('/'))
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "CREATE DATABASE {DATABASE} CHARACTER SET utf8 COLLATE utf8_bin"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let location = StoreLocation::parse(&urls[0], CURVE).unwrap();
    store::init(&location).await.unwrap();
}

/// On a node: every table of the schema is there, each with a primary key (the
/// original's `Requests` and `Config` get our invisible one).
async fn assert_schema_replicated(url: &str) {
    let mut conn = MySqlConnection::connect(url).await.unwrap();
    // DDL is applied on the other nodes a little after node 1 answered: wait
    // for it, as the store does.
    sqlx::raw_sql("SET SESSION wsrep_sync_wait = 1")
        .execute(&mut conn)
        .await
        .unwrap();
    let tables: Vec<(String, i64)> = sqlx::query_as(
        "SELECT CONVERT(t.TABLE_NAME USING utf8mb4), \
         (SELECT COUNT(*) FROM information_schema.STATISTICS AS s \
          WHERE s.TABLE_SCHEMA = t.TABLE_SCHEMA AND s.TABLE_NAME = t.TABLE_NAME \
          AND s.INDEX_NAME = 'PRIMARY') \
         FROM information_schema.TABLES AS t WHERE t.TABLE_SCHEMA = DATABASE() \
         ORDER BY t.TABLE_NAME",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let names: Vec<&str> = tables.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "Config",
            "lime_rs_claims",
            "lime_rs_identity_requests",
            "OPk",
            "Requests",
            "Users"
        ],
        "{url}"
    );
    for (table, key_columns) in tables {
        assert!(key_columns > 0, "{url}: {table} has no primary key");
    }
}

/// A store of the instance on each node, opened in-process.
async fn stores_on_every_node(urls: &[String], limits: StoreLimits) -> Vec<Arc<dyn KeyStore>> {
    let options = ServerStoreOptions {
        pool_size: 32,
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(20),
        limits,
    };
    let mut stores = Vec::new();
    for url in urls {
        stores.push(
            store::mysql::open(CURVE, url, &options)
                .await
                .unwrap_or_else(|error| panic!("open {url}: {error}")),
        );
    }
    stores
}

fn no_limits() -> StoreLimits {
    StoreLimits {
        max_one_time_pre_keys_per_device: 1_000,
        max_devices_per_user: 0,
        bundle_requests: None,
    }
}

/// 32 registrations of new devices at once, spread over the three nodes, half
/// of them of one user with room for 5 devices: none fails, and the user ends
/// with exactly 5 devices (the registrations of one user write its identity row,
/// so certification makes them take turns across nodes).
async fn registrations_across_nodes_never_fail(urls: &[String]) {
    const MAX_DEVICES: u32 = 5;
    let limits = StoreLimits {
        max_devices_per_user: MAX_DEVICES,
        ..no_limits()
    };
    let stores = stores_on_every_node(urls, limits).await;
    for round in 0..2u64 {
        let (user, shared_new) =
            common::registrations::race_new_devices(&stores, round, |_| registration(CURVE, 4, 1))
                .await;
        eprintln!("round {round}: {user} got {shared_new} devices (limit {MAX_DEVICES})");
        assert_eq!(
            shared_new, MAX_DEVICES as usize,
            "round {round}: devices of {user}"
        );
    }
}

/// Concurrent writes through the three nodes against the per-device and
/// per-identity limits:
/// - one-time pre-keys of one device: each node's upload fits the limit alone;
///   together they may pass it by what the other nodes uploaded at the same
///   instant (the documented margin), never more;
/// - the bundles of one target that the devices of one account receive: their
///   claims all write the account's row of `lime_rs_identity_requests`, so
///   certification lets one per instant through and the limit is exact.
async fn limits_hold_across_nodes(urls: &[String]) {
    const MAX_OPKS: u32 = 30;
    const UPLOAD: u32 = 20;
    const PER_IDENTITY: u32 = 3;
    let limits = StoreLimits {
        max_one_time_pre_keys_per_device: MAX_OPKS,
        max_devices_per_user: 0,
        bundle_requests: Some(BundleRequestLimit {
            max: 5,
            max_per_identity: PER_IDENTITY,
            max_recorded_per_identity: 1_000,
            window: Duration::from_secs(600),
            over_limit: OverLimit::WithoutOneTimePreKey,
        }),
    };
    let stores = stores_on_every_node(urls, limits).await;

    let target = id(&device_id("target"));
    stores[0]
        .register_device(target.clone(), registration(CURVE, 4, 1))
        .await
        .unwrap();
    let uploads = stores.iter().enumerate().map(|(node, store)| {
        let (store, target) = (store.clone(), target.clone());
        async move {
            let first = 100 * (node as u32 + 1);
            let keys = (first..first + UPLOAD)
                .map(|key| common::one_time_pre_key(CURVE, key))
                .collect();
            store.add_one_time_pre_keys(target, keys).await
        }
    });
    let uploads = futures::future::join_all(uploads).await;
    let stored = stores[0]
        .one_time_pre_key_ids(target.clone())
        .await
        .unwrap()
        .len() as u32;
    let accepted = uploads.iter().filter(|upload| upload.is_ok()).count() as u32;
    eprintln!("one-time pre-keys: {accepted} uploads of {UPLOAD} accepted, {stored} stored");
    for upload in &uploads {
        assert!(
            matches!(
                upload,
                Ok(()) | Err(store::StoreError::TooManyOneTimePreKeys { .. })
            ),
            "{upload:?}"
        );
    }
    assert!(accepted >= 1, "the first upload fits");
    assert_eq!(stored, 4 + accepted * UPLOAD, "what was accepted is stored");
    assert!(
        stored <= MAX_OPKS + (NODES as u32 - 1) * UPLOAD,
        "{stored} keys: past the limit by more than the margin"
    );

    let account = device_id("mallory");
    let user = account.split(';').next().unwrap().to_owned();
    let devices: Vec<DeviceId> = (0..6)
        .map(|n| id(&format!("{user};gr=urn:uuid:{n}")))
        .collect();
    for (n, device) in devices.iter().enumerate() {
        stores[n % NODES]
            .register_device(device.clone(), registration(CURVE, 0, 1))
            .await
            .unwrap();
    }
    let claims = (0..4 * devices.len()).map(|n| {
        let (store, source, target) = (
            stores[n % NODES].clone(),
            devices[n % devices.len()].clone(),
            target.clone(),
        );
        async move { store.claim_key_bundles(source, vec![target]).await }
    });
    let mut with_key = 0;
    for claim in futures::future::join_all(claims).await {
        let bundles = claim.expect("no claim fails");
        if bundles[0]
            .bundle
            .as_ref()
            .is_some_and(|bundle| bundle.one_time_pre_key.is_some())
        {
            with_key += 1;
        }
    }
    assert_eq!(with_key, PER_IDENTITY, "one-time keys the account got");
}

/// Registers the targets (spread over the instances) and the asker.
async fn register_targets(client: &LimeClient, instances: &[String]) -> Vec<String> {
    let targets: Vec<String> = (0..TARGETS).map(|_| device_id("target")).collect();
    let devices = targets
        .iter()
        .map(|target| (target.as_str(), OPKS_PER_TARGET))
        .chain([(ASKER, 0)]);
    for (n, (device, opks)) in devices.enumerate() {
        let message = RequestMessage {
            curve: CURVE,
            request: Request::RegisterUser(registration(CURVE, opks, 1)),
        };
        let answer = client
            .send(&instances[n % instances.len()], device, &message)
            .await
            .unwrap();
        assert_eq!(
            answer.response,
            Response::Done(MessageType::RegisterUser),
            "{device}"
        );
    }
    targets
}

/// `requests` getPeerBundle requests of two targets each, round robin over
/// `instances`, [`CONCURRENCY`] at once: each answer with its instance's index.
async fn fetch_bundles(
    client: &LimeClient,
    instances: &[String],
    targets: &[String],
    requests: usize,
) -> Vec<(usize, Response)> {
    stream::iter(0..requests)
        .map(|n| {
            let client = client.clone();
            let instance = n % instances.len();
            let url = instances[instance].clone();
            let devices = vec![
                id(&targets[n % targets.len()]),
                id(&targets[(n / 2 + 3) % targets.len()]),
            ];
            async move {
                let message = RequestMessage {
                    curve: CURVE,
                    request: Request::GetPeerBundle(devices),
                };
                let answer = client.send(&url, ASKER, &message).await;
                (instance, answer.unwrap().response)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

fn probe(url: &str) -> StoreProbe {
    let mut settings = Settings::default();
    settings.storage.url = Some(url.to_owned());
    StoreProbe::new(&settings)
}

/// Waits until the node at `url` stores `expected` one-time pre-keys.
async fn wait_for_stored(url: &str, expected: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let stored = probe(url).count_one_time_pre_keys(CURVE).await;
        if stored == expected as u64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url}: {stored} keys stored after {timeout:?}, not {expected} = uploaded - served"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until every node at `urls` is in a primary component of `size` nodes.
async fn wait_for_cluster_size(urls: &[String], size: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for url in urls {
        loop {
            let seen = async {
                let mut conn = MySqlConnection::connect(url).await.ok()?;
                let rows: Vec<(String, String)> = sqlx::query_as(
                    "SELECT CONVERT(VARIABLE_NAME USING utf8mb4), \
                     CONVERT(VARIABLE_VALUE USING utf8mb4) \
                     FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME IN \
                     ('WSREP_CLUSTER_SIZE', 'WSREP_CLUSTER_STATUS', 'WSREP_READY')",
                )
                .fetch_all(&mut conn)
                .await
                .ok()?;
                Some(rows)
            }
            .await
            .unwrap_or_default();
            let value = |name: &str| {
                seen.iter()
                    .find(|(variable, _)| variable.eq_ignore_ascii_case(name))
                    .map(|(_, value)| value.as_str())
            };
            if value("wsrep_cluster_size") == Some(&size.to_string())
                && value("wsrep_cluster_status") == Some("Primary")
                && value("wsrep_ready") == Some("ON")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{url}: not in a primary cluster of {size} after {timeout:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Waits until the instance's `/ready` answers `status`.
fn wait_until_ready_is(server: &ServerProcess, status: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (answered, body) = scrape::get(server.addr, "/ready");
        if answered == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/ready still {answered} after {timeout:?}: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Claims the instances ran again after a certification failure at COMMIT.
fn commit_retries(servers: &[ServerProcess]) -> f64 {
    servers
        .iter()
        .map(|server| {
            Scrape::at(server.metrics_addr()).value(
                "lime_store_retries_total",
                &[
                    ("backend", "mysql"),
                    ("curve", CURVE.name()),
                    ("at", "commit"),
                ],
            )
        })
        .sum()
}
