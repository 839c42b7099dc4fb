//! What a store holds, counted (`KeyStore::stats`) and shown by
//! `lime-server admin stats`, on each backend: SQLite, and the machine's MariaDB
//! and PostgreSQL (whatever `LIME_TEST_BACKEND` says), each test on databases of
//! its own with known contents.

mod common;

use common::backend::{Backend, TestDatabases};
use common::process::BIN;
use common::{id, one_time_pre_key, registration};
use lime_protocol::Curve;
use lime_server::store::{
    self, BundleRequestLimit, KeyStore, OneTimePreKeyStock, OverLimit, ServerStoreOptions,
    StoreLimits, StoreLocation, StoreStats,
};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

const CURVE: Curve = Curve::C25519;

/// The test's store of [`CURVE`], what keeps its database alive, and the URL
/// template (`{curve}`) that names its databases (a `sqlite://` one in `dir`).
struct TestStore {
    store: Arc<dyn KeyStore>,
    url: String,
    _databases: TestDatabases,
    _dir: TempDir,
}

fn limits() -> StoreLimits {
    StoreLimits {
        max_one_time_pre_keys_per_device: 500,
        max_devices_per_user: 0,
        bundle_requests: Some(BundleRequestLimit {
            max: 10,
            max_per_identity: 10,
            max_recorded_per_identity: 1000,
            window: Duration::from_secs(3600),
            over_limit: OverLimit::WithoutOneTimePreKey,
        }),
    }
}

async fn open(backend: Backend) -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let (databases, url) = TestDatabases::create(backend, &[CURVE]).await;
    let url = url.unwrap_or_else(|| format!("sqlite://{}/{{curve}}.db", dir.path().display()));
    let location = StoreLocation::parse(&url, CURVE).unwrap();
    if backend == Backend::Sqlite {
        store::init(&location).await.unwrap();
    }
    let sqlite_options = store::sqlite::SqliteOptions {
        path: Default::default(),
        synchronous: store::sqlite::Synchronous::Normal,
        max_batch: 16,
        timeout: Duration::from_secs(5),
        limits: limits(),
        serves: true,
    };
    let server_options = ServerStoreOptions {
        pool_size: 2,
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
        limits: limits(),
    };
    let store = store::open(CURVE, &location, &sqlite_options, &server_options)
        .await
        .unwrap_or_else(|error| panic!("open {location}: {error}"));
    TestStore {
        store,
        url,
        _databases: databases,
        _dir: dir,
    }
}

fn device(n: usize) -> String {
    format!("sip:stats{n}@example.org;gr=urn:uuid:{n:08}")
}

/// Six devices holding 0, 0, 5, 10, 99 and 100 one-time pre-keys, then one
/// getPeerBundle by the first for the third and fourth (one key each taken, two
/// `Requests` rows): 0, 0, 4, 9, 99, 100 left.
async fn fill(store: &dyn KeyStore) {
    for (n, held) in [0, 0, 5, 10, 99, 100].into_iter().enumerate() {
        store
            .register_device(id(&device(n)), registration(CURVE, 0, 1))
            .await
            .unwrap();
        let keys: Vec<_> = (1..=held).map(|key| one_time_pre_key(CURVE, key)).collect();
        if !keys.is_empty() {
            store
                .add_one_time_pre_keys(id(&device(n)), keys)
                .await
                .unwrap();
        }
    }
    let bundles = store
        .claim_key_bundles(id(&device(0)), vec![id(&device(2)), id(&device(3))])
        .await
        .unwrap();
    assert!(bundles.iter().all(|bundle| bundle.flag() == 1));
}

/// The schema version a store of `backend` reports: SQLite's is its own.
fn schema_version(backend: &str) -> i64 {
    match backend {
        "sqlite" => store::sqlite::schema::SCHEMA_VERSION,
        _ => store::SCHEMA_VERSION,
    }
}

fn expected(backend: &str, threshold: u32, below_threshold: u64) -> StoreStats {
    StoreStats {
        devices: 6,
        one_time_pre_keys: 4 + 9 + 99 + 100,
        stock: OneTimePreKeyStock {
            none: 2,
            from_1_to_9: 2,
            from_10_to_99: 1,
            from_100: 1,
        },
        below_threshold,
        threshold,
        bundle_request_rows: 2,
        schema_version: Some(schema_version(backend)),
    }
}

async fn counts_devices_keys_stock_and_requests(backend: Backend) {
    let test = open(backend).await;
    let empty = test.store.stats(10).await.unwrap();
    assert_eq!(
        empty,
        StoreStats {
            threshold: 10,
            schema_version: Some(schema_version(test.store.backend())),
            ..StoreStats::default()
        }
    );
    fill(test.store.as_ref()).await;
    assert_eq!(
        test.store.stats(10).await.unwrap(),
        expected(test.store.backend(), 10, 4)
    );
    assert_eq!(
        test.store.stats(1).await.unwrap(),
        expected(test.store.backend(), 1, 2)
    );
    assert_eq!(
        test.store.stats(100).await.unwrap(),
        expected(test.store.backend(), 100, 5)
    );
}

#[tokio::test]
async fn sqlite_counts_devices_keys_stock_and_requests() {
    counts_devices_keys_stock_and_requests(Backend::Sqlite).await;
}

#[tokio::test]
async fn mariadb_counts_devices_keys_stock_and_requests() {
    counts_devices_keys_stock_and_requests(Backend::Mariadb).await;
}

#[tokio::test]
async fn postgres_counts_devices_keys_stock_and_requests() {
    counts_devices_keys_stock_and_requests(Backend::Postgres).await;
}

/// `lime-server admin stats` on the test's database, as an operator runs it.
fn admin_stats(test: &TestStore, extra: &[&str]) -> String {
    let config = test._dir.path().join("lime-server.toml");
    std::fs::write(&config, "[metrics]\nlow_stock_threshold = 10\n").unwrap();
    let output = Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "admin", "stats"])
        .args(["--store", &test.url, "--curve", CURVE.name()])
        .args(extra)
        .output()
        .expect("run lime-server admin stats");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

async fn admin_stats_shows_the_counts(backend: Backend) {
    let test = open(backend).await;
    fill(test.store.as_ref()).await;

    let json: serde_json::Value = serde_json::from_str(&admin_stats(&test, &["--json"])).unwrap();
    let curve = &json["curves"][0];
    assert_eq!(curve["curve"], "c25519", "{json}");
    assert_eq!(curve["backend"], test.store.backend(), "{json}");
    assert_eq!(curve["devices"], 6, "{json}");
    assert_eq!(curve["one_time_pre_keys"], 212, "{json}");
    assert_eq!(
        curve["stock"],
        serde_json::json!({"none": 2, "from_1_to_9": 2, "from_10_to_99": 1, "from_100": 1}),
        "{json}"
    );
    assert_eq!(curve["below_threshold"], 4, "{json}");
    assert_eq!(curve["threshold"], 10, "{json}");
    assert_eq!(curve["bundle_request_rows"], 2, "{json}");
    let version = schema_version(test.store.backend());
    assert_eq!(curve["schema_version"], version, "{json}");
    assert_eq!(json["curves"].as_array().unwrap().len(), 1, "{json}");

    let table = admin_stats(&test, &[]);
    let row = table
        .lines()
        .find(|line| line.starts_with("c25519"))
        .unwrap_or_else(|| panic!("no c25519 row in:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "c25519",
            test.store.backend(),
            "6",
            "212",
            "2",
            "2",
            "1",
            "1",
            "4",
            "2",
            &version.to_string()
        ],
        "{table}"
    );
}

#[tokio::test]
async fn sqlite_admin_stats_shows_the_counts() {
    admin_stats_shows_the_counts(Backend::Sqlite).await;
}

#[tokio::test]
async fn mariadb_admin_stats_shows_the_counts() {
    admin_stats_shows_the_counts(Backend::Mariadb).await;
}

#[tokio::test]
async fn postgres_admin_stats_shows_the_counts() {
    admin_stats_shows_the_counts(Backend::Postgres).await;
}
