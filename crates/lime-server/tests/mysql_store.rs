//! The MariaDB/MySQL store against the real server on this machine
//! (127.0.0.1:3306, root without password): each test creates its own database
//! `lime_t_<random>` and drops it at the end. A test that cannot reach the server
//! fails and says so.

use lime_protocol::{
    Curve, DeviceId, IdentityKey, OneTimePreKey, PeerBundle, Registration, SignedPreKey,
};
use lime_server::store::{
    self, KeyStore, Registered, SchemaState, ServerStoreOptions, SetupError, StoreError,
    StoreLimits,
};
mod common;

use common::again_past_timeouts;
use common::backend::{self, Backend};
use common::php;
use common::registrations;
use common::relay::{Relay, Trap};
use sqlx::{Connection, Executor, MySqlConnection, Row};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CURVE: Curve = Curve::C25519;

/// 1 when the database has our table of claim tokens, 0 otherwise.
const CLAIMS_TABLE_PRESENT: &str = "SELECT COUNT(*) FROM information_schema.TABLES \
     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'lime_rs_claims'";

/// A database of its own for one test, dropped at the end (even on panic).
struct TestDb {
    database: backend::TestDatabase,
    url: String,
}

impl TestDb {
    async fn new() -> TestDb {
        let database = backend::TestDatabase::empty(Backend::Mariadb).await;
        let url = database.url.clone();
        TestDb { database, url }
    }

    /// A database created with the original PHP server's script, as is.
    async fn original() -> TestDb {
        let db = TestDb::new().await;
        let mut conn = db.connect().await;
        php::create_schema(&mut conn).await;
        db
    }

    async fn connect(&self) -> MySqlConnection {
        MySqlConnection::connect(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// The store, with the asker registered (a bundle's source must be).
    async fn open(&self, timeout: Duration) -> Arc<dyn KeyStore> {
        let store = store::mysql::open(CURVE, &self.url, &options(timeout))
            .await
            .unwrap_or_else(|error| panic!("open {}: {error}", self.url));
        register_asker(&store).await;
        store
    }

    async fn count(&self, sql: &str) -> i64 {
        let mut conn = self.connect().await;
        sqlx::query_scalar(sql)
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"))
    }
}

fn options(timeout: Duration) -> ServerStoreOptions {
    ServerStoreOptions {
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
        timeout,
        limits: StoreLimits {
            max_one_time_pre_keys_per_device: 500,
            max_devices_per_user: 0,
            bundle_requests: None,
        },
    }
}

fn id(text: &str) -> DeviceId {
    DeviceId::new(text).unwrap()
}

/// The device asking for bundles in these tests (no request limit is set).
fn asker() -> DeviceId {
    DeviceId::new("sip:asker@example.org;gr=1").unwrap()
}

/// Registers the asker, always with the same keys (so that a store opened again
/// on the same database finds it registered): a bundle's source must be a
/// registered device.
async fn register_asker(store: &Arc<dyn KeyStore>) {
    store
        .register_device(asker(), registration(424_242, 0..0))
        .await
        .unwrap();
}

fn device(name: &str) -> DeviceId {
    id(&format!(
        "sip:{name}@example.org;gr=urn:uuid:00000000-0000-0000-0000-{:012x}",
        rand::random::<u64>() & 0xffff_ffff_ffff
    ))
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|index| (seed.wrapping_mul(31).wrapping_add(index as u64) % 251) as u8)
        .collect()
}

fn opk(id: u32) -> OneTimePreKey {
    OneTimePreKey::new(CURVE, bytes(u64::from(id) + 1000, 32), id).unwrap()
}

fn spk(id: u32) -> SignedPreKey {
    SignedPreKey::new(CURVE, bytes(u64::from(id), 32), bytes(7, 64), id).unwrap()
}

fn registration(seed: u64, opks: std::ops::Range<u32>) -> Registration {
    Registration {
        identity_key: IdentityKey::new(CURVE, bytes(seed, 32)).unwrap(),
        signed_pre_key: spk(1),
        one_time_pre_keys: opks.map(opk).collect(),
    }
}

/// Inserts a device the way the PHP server does.
async fn php_register(conn: &mut MySqlConnection, device: &DeviceId, opk_ids: &[u32]) {
    let spk = spk(5);
    let opks: Vec<(OneTimePreKey, u32)> = opk_ids.iter().map(|&id| (opk(id), id)).collect();
    let opks: Vec<(&[u8], u32)> = opks.iter().map(|(key, id)| (key.public(), *id)).collect();
    php::register_device(
        conn,
        device.as_str(),
        &bytes(99, 32),
        (spk.public(), spk.signature(), 5),
        &opks,
    )
    .await;
}

fn claimed_id(bundle: &PeerBundle) -> Option<u32> {
    bundle
        .bundle
        .as_ref()
        .and_then(|bundle| bundle.one_time_pre_key.as_ref())
        .map(OneTimePreKey::id)
}

#[tokio::test]
async fn init_creates_the_original_schema_with_our_additions_once() {
    let db = TestDb::new().await;
    assert_eq!(
        store::mysql::init(&db.url).await.unwrap(),
        SchemaState::Created
    );
    let mut conn = db.connect().await;
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT CONVERT(CONCAT(TABLE_NAME, '.', COLUMN_NAME) USING utf8mb4), \
         CONVERT(COLUMN_TYPE USING utf8mb4), CONVERT(IFNULL(COLLATION_NAME, '') USING utf8mb4) \
         FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() \
         ORDER BY TABLE_NAME, ORDINAL_POSITION",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let column = |name: &str| {
        columns
            .iter()
            .find(|(column, _, _)| column == name)
            .unwrap_or_else(|| panic!("no column {name}"))
            .clone()
    };
    assert_eq!(column("Users.Uid").1, "int(11)");
    assert_eq!(column("Users.SPk_id").1, "int(10) unsigned");
    assert_eq!(column("OPk.OPk_id").1, "int(10) unsigned");
    assert!(column("Users.UserId").2.ends_with("_bin"));
    assert_eq!(column("Requests.at").1, "timestamp");
    assert_eq!(column("Config.Name").1, "varchar(20)");
    assert_invisible_primary_keys(&mut conn).await;
    let engines: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT CONVERT(ENGINE USING utf8mb4) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(engines, ["InnoDB"]);
    let unique: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() \
         AND TABLE_NAME = 'OPk' AND INDEX_NAME = 'OPk_Uid_OPk_id' AND NON_UNIQUE = 0",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(unique, 2, "unique index on OPk(Uid, OPk_id)");
    assert_eq!(column("lime_rs_claims.token").1, "binary(16)");
    assert_eq!(column("lime_rs_claims.claimed_at").1, "timestamp");
    assert_eq!(column("lime_rs_identity_requests.identity").1, "binary(16)");
    let config: Vec<(String, i32)> =
        sqlx::query_as("SELECT CONVERT(Name USING utf8mb4), Value FROM Config ORDER BY Name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        config,
        [("lime_rs_schema".into(), 3), ("version".into(), 1)]
    );

    assert_eq!(
        store::mysql::init(&db.url).await.unwrap(),
        SchemaState::Present
    );
    assert!(
        store::mysql::migrate(&db.url)
            .await
            .unwrap()
            .applied
            .is_empty()
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM Config").await, 2);
    db.open(Duration::from_secs(5)).await.ping().await.unwrap();
}

/// `Requests` and `Config` have our invisible auto-increment primary key (which
/// a Galera cluster needs).
async fn assert_invisible_primary_keys(conn: &mut MySqlConnection) {
    let keys: Vec<(String, String)> = sqlx::query_as(
        "SELECT CONVERT(CONCAT(c.TABLE_NAME, '.', c.COLUMN_NAME) USING utf8mb4), \
         CONVERT(c.EXTRA USING utf8mb4) FROM information_schema.COLUMNS AS c \
         JOIN information_schema.STATISTICS AS s ON s.TABLE_SCHEMA = c.TABLE_SCHEMA \
         AND s.TABLE_NAME = c.TABLE_NAME AND s.COLUMN_NAME = c.COLUMN_NAME \
         WHERE c.TABLE_SCHEMA = DATABASE() AND s.INDEX_NAME = 'PRIMARY' \
         AND c.TABLE_NAME IN ('Requests', 'Config') ORDER BY c.TABLE_NAME",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(
        keys,
        [
            (
                "Config.lime_rs_id".into(),
                "auto_increment, INVISIBLE".into()
            ),
            (
                "Requests.lime_rs_id".into(),
                "auto_increment, INVISIBLE".into()
            )
        ]
    );
}

#[tokio::test]
async fn an_original_database_is_served_as_it_is() {
    let db = TestDb::original().await;
    let mut conn = db.connect().await;
    let alice = device("alice");
    let old = device("old");
    php_register(&mut conn, &alice, &[11, 12, 13]).await;
    sqlx::query("INSERT INTO Users(UserId,Ik) VALUES(?,?)")
        .bind(old.as_str())
        .bind(bytes(3, 32))
        .execute(&mut conn)
        .await
        .unwrap();

    let store = db.open(Duration::from_secs(5)).await;
    let bundles = store
        .claim_key_bundles(
            asker(),
            vec![alice.clone(), old.clone(), device("nobody"), alice.clone()],
        )
        .await
        .unwrap();
    assert_eq!(bundles.len(), 4);
    let first = bundles[0].bundle.as_ref().expect("alice has a bundle");
    assert_eq!(first.identity_key.as_bytes(), bytes(99, 32));
    assert_eq!(first.signed_pre_key, spk(5));
    assert_eq!(first.one_time_pre_key, Some(opk(11)), "oldest key first");
    assert_eq!(bundles[1].bundle, None, "no SPk: flag 2");
    assert_eq!(bundles[2].bundle, None, "unknown: flag 2");
    assert_eq!(bundles[3].flag(), 0, "a device named twice takes one key");
    assert_eq!(
        store.one_time_pre_key_ids(alice.clone()).await.unwrap(),
        [12, 13]
    );

    // New registrations and uploads on the unmigrated database.
    let bob = device("bob");
    assert_eq!(
        store
            .register_device(bob.clone(), registration(1, 0..5))
            .await
            .unwrap(),
        Registered::New
    );
    assert_eq!(
        store
            .register_device(bob.clone(), registration(1, 100..105))
            .await
            .unwrap(),
        Registered::AlreadyWithSameKeys
    );
    assert!(matches!(
        store
            .register_device(bob.clone(), registration(2, 0..0))
            .await,
        Err(StoreError::DeviceRegisteredWithOtherKeys)
    ));
    store
        .add_one_time_pre_keys(bob.clone(), vec![opk(4), opk(5), opk(6), opk(6)])
        .await
        .unwrap();
    assert_eq!(
        store.one_time_pre_key_ids(bob.clone()).await.unwrap(),
        [0, 1, 2, 3, 4, 5, 6]
    );
    store
        .add_one_time_pre_keys(alice.clone(), vec![opk(14)])
        .await
        .unwrap();
    store
        .replace_signed_pre_key(alice.clone(), spk(6))
        .await
        .unwrap();
    // The PHP server's own bundle query still reads what we wrote.
    let row = sqlx::query(php::BUNDLE_QUERY)
        .bind(alice.as_str())
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(row.get::<u32, _>("SPk_id"), 6);
    assert!(row.get::<Option<u32>, _>("OPk_id").is_some());
    // All of it without our table of claim tokens.
    assert_eq!(db.count(CLAIMS_TABLE_PRESENT).await, 0);
}

#[tokio::test]
async fn store_rules_hold() {
    let db = TestDb::new().await;
    store::mysql::init(&db.url).await.unwrap();
    let store = db.open(Duration::from_secs(5)).await;
    let carol = device("carol");
    let unknown = device("unknown");

    store.delete_device(unknown.clone()).await.unwrap();
    assert!(matches!(
        store.replace_signed_pre_key(unknown.clone(), spk(2)).await,
        Err(StoreError::DeviceNotFound)
    ));
    assert!(matches!(
        store
            .add_one_time_pre_keys(unknown.clone(), vec![opk(1)])
            .await,
        Err(StoreError::DeviceNotFound)
    ));
    assert!(matches!(
        store.add_one_time_pre_keys(unknown.clone(), vec![]).await,
        Err(StoreError::DeviceNotFound)
    ));
    assert!(matches!(
        store.one_time_pre_key_ids(unknown.clone()).await,
        Err(StoreError::DeviceNotFound)
    ));

    // Registration is all or nothing: a conflicting id inside it stores nothing.
    let mut bad = registration(5, 0..3);
    bad.one_time_pre_keys
        .push(OneTimePreKey::new(CURVE, bytes(1, 32), 1).unwrap());
    assert!(matches!(
        store.register_device(carol.clone(), bad).await,
        Err(StoreError::ConflictingOneTimePreKeyId(1))
    ));
    assert!(matches!(
        store.one_time_pre_key_ids(carol.clone()).await,
        Err(StoreError::DeviceNotFound)
    ));
    assert!(matches!(
        store
            .register_device(carol.clone(), registration(5, 0..501))
            .await,
        Err(StoreError::TooManyOneTimePreKeys {
            would_hold: 501,
            limit: 500
        })
    ));
    store
        .register_device(carol.clone(), registration(5, 0..3))
        .await
        .unwrap();

    // Uploads: identical keys skipped, a conflicting id refuses the whole upload.
    store
        .add_one_time_pre_keys(carol.clone(), vec![])
        .await
        .unwrap();
    store
        .add_one_time_pre_keys(carol.clone(), vec![opk(2), opk(3)])
        .await
        .unwrap();
    let conflicting = OneTimePreKey::new(CURVE, bytes(77, 32), 0).unwrap();
    assert!(matches!(
        store
            .add_one_time_pre_keys(carol.clone(), vec![opk(10), conflicting])
            .await,
        Err(StoreError::ConflictingOneTimePreKeyId(0))
    ));
    assert_eq!(
        store.one_time_pre_key_ids(carol.clone()).await.unwrap(),
        [0, 1, 2, 3]
    );
    assert!(matches!(
        store
            .add_one_time_pre_keys(carol.clone(), (100..597).map(opk).collect())
            .await,
        Err(StoreError::TooManyOneTimePreKeys {
            would_hold: 501,
            limit: 500
        })
    ));
    store
        .add_one_time_pre_keys(carol.clone(), (100..596).map(opk).collect())
        .await
        .unwrap();
    assert_eq!(
        store
            .one_time_pre_key_ids(carol.clone())
            .await
            .unwrap()
            .len(),
        500
    );

    // Same SPk posted again is not "unknown device" (rows matched, not changed).
    store
        .replace_signed_pre_key(carol.clone(), spk(1))
        .await
        .unwrap();
    // utf8_bin pads with spaces: 'x ' must not reach the device 'x'.
    let padded = id(&format!("{carol} "));
    assert!(matches!(
        store.replace_signed_pre_key(padded.clone(), spk(9)).await,
        Err(StoreError::DeviceNotFound)
    ));
    assert_eq!(
        store
            .claim_key_bundles(asker(), vec![padded])
            .await
            .unwrap()[0]
            .bundle,
        None
    );

    store.delete_device(carol.clone()).await.unwrap();
    assert_eq!(db.count("SELECT COUNT(*) FROM OPk").await, 0);
}

#[tokio::test]
async fn migrate_only_adds_is_idempotent_and_keeps_the_original_queries_working() {
    let db = TestDb::original().await;
    let mut conn = db.connect().await;
    let dave = device("dave");
    php_register(&mut conn, &dave, &[1, 2]).await;

    let migration = store::mysql::migrate(&db.url).await.unwrap();
    assert_eq!(
        migration.applied,
        [
            "unique index OPk(Uid, OPk_id)",
            "table lime_rs_claims",
            "index Requests(target, source, at)",
            "table lime_rs_identity_requests",
            "invisible primary key Requests.lime_rs_id",
            "invisible primary key Config.lime_rs_id",
            "Config ('lime_rs_schema', 3)"
        ]
    );
    assert_invisible_primary_keys(&mut conn).await;
    assert!(
        store::mysql::migrate(&db.url)
            .await
            .unwrap()
            .applied
            .is_empty()
    );
    assert_eq!(
        db.count("SELECT Value FROM Config WHERE Name = 'version'")
            .await,
        1
    );

    // The PHP server's queries on the migrated database.
    let row = sqlx::query(php::BUNDLE_QUERY)
        .bind(dave.as_str())
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(row.get::<u32, _>("SPk_id"), 5);
    assert_eq!(row.get::<Option<u32>, _>("OPk_id"), Some(1));
    php_register(&mut conn, &device("erin"), &[1, 2, 3]).await;
    let duplicate = sqlx::query(
        "INSERT INTO OPk(Uid, OPk, OPk_id) SELECT Uid, OPk, OPk_id FROM OPk WHERE OPk_id = 1 LIMIT 1",
    )
    .execute(&mut conn)
    .await;
    assert!(duplicate.is_err(), "the unique index guards OPk ids");
    // Statements without a column list do not see the invisible keys.
    sqlx::query("INSERT INTO Requests VALUES (?, ?, NOW())")
        .bind(device("erin").as_str())
        .bind(dave.as_str())
        .execute(&mut conn)
        .await
        .unwrap();
    let request = sqlx::query("SELECT * FROM Requests")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(request.columns().len(), 3, "source, target, at");
    sqlx::query("INSERT INTO Config VALUES ('php', 7)")
        .execute(&mut conn)
        .await
        .unwrap();
    let config = sqlx::query("SELECT * FROM Config WHERE Name = 'php'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(config.columns().len(), 2, "Name, Value");
    assert_eq!(config.get::<i32, _>("Value"), 7);

    let store = db.open(Duration::from_secs(5)).await;
    assert_eq!(
        claimed_id(&store.claim_key_bundles(asker(), vec![dave]).await.unwrap()[0]),
        Some(1)
    );
}

#[tokio::test]
async fn migrate_refuses_duplicate_key_ids_naming_the_device_and_changes_nothing() {
    let db = TestDb::original().await;
    let mut conn = db.connect().await;
    let frank = device("frank");
    php_register(&mut conn, &frank, &[7, 7, 8]).await;
    let error = store::mysql::migrate(&db.url).await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains(frank.as_str()), "{message}");
    assert!(message.contains("OPk_id 7"), "{message}");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM Config").await,
        1,
        "no version row added"
    );
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() \
             AND INDEX_NAME = 'OPk_Uid_OPk_id'"
        )
        .await,
        0
    );
    // Still served, unmigrated.
    let store = db.open(Duration::from_secs(5)).await;
    assert_eq!(store.one_time_pre_key_ids(frank).await.unwrap(), [7, 7, 8]);
}

#[tokio::test]
async fn open_checks_the_schema_and_hides_the_password() {
    let db = TestDb::new().await;
    let error = store::mysql::open(CURVE, &db.url, &options(Duration::from_secs(2)))
        .await
        .err()
        .expect("no Config table");
    assert!(error.to_string().contains("db init"), "{error}");

    store::mysql::init(&db.url).await.unwrap();
    let mut conn = db.connect().await;
    conn.execute("UPDATE Config SET Value = 99 WHERE Name = 'lime_rs_schema'")
        .await
        .unwrap();
    let error = store::mysql::open(CURVE, &db.url, &options(Duration::from_secs(2)))
        .await
        .err()
        .expect("newer schema");
    assert!(error.to_string().contains("newer"), "{error}");

    let missing = format!("{}/lime_t_does_not_exist", backend::MARIADB_ADMIN_URL);
    let error = store::mysql::open(CURVE, &missing, &options(Duration::from_secs(2)))
        .await
        .err()
        .expect("no such database");
    assert!(error.to_string().contains("CREATE DATABASE"), "{error}");
    assert!(matches!(
        store::mysql::init(&missing).await,
        Err(SetupError::Database { .. })
    ));

    let started = Instant::now();
    let error = store::mysql::open(
        CURVE,
        "mysql://lime:secret@127.0.0.1:1/lime",
        &options(Duration::from_secs(2)),
    )
    .await
    .err()
    .expect("nothing listens on port 1");
    let message = error.to_string();
    assert!(message.contains("lime:***@127.0.0.1:1"), "{message}");
    assert!(!message.contains("secret"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_from_two_servers_never_hand_out_a_key_twice() {
    let db = TestDb::new().await;
    store::mysql::init(&db.url).await.unwrap();
    let servers = [
        db.open(Duration::from_secs(10)).await,
        db.open(Duration::from_secs(10)).await,
    ];
    let grace = device("grace");
    let henry = device("henry");
    servers[0]
        .register_device(grace.clone(), registration(1, 0..300))
        .await
        .unwrap();
    servers[1]
        .register_device(henry.clone(), registration(2, 0..100))
        .await
        .unwrap();

    let mut tasks = Vec::new();
    for task in 0..16 {
        let server = servers[task % 2].clone();
        let (grace, henry) = (grace.clone(), henry.clone());
        tasks.push(tokio::spawn(async move {
            let mut claimed = Vec::new();
            for round in 0..30 {
                let devices = if (task + round) % 3 == 0 {
                    vec![grace.clone(), henry.clone(), grace.clone()]
                } else {
                    vec![grace.clone()]
                };
                for bundle in server.claim_key_bundles(asker(), devices).await.unwrap() {
                    if let Some(id) = claimed_id(&bundle) {
                        claimed.push((bundle.device_id.to_string(), id));
                    }
                }
            }
            claimed
        }));
    }
    let mut seen = HashSet::new();
    for task in tasks {
        for claim in task.await.unwrap() {
            assert!(seen.insert(claim.clone()), "{claim:?} handed out twice");
        }
    }
    // Every key went to exactly one bundle: claimed + left = stored.
    let left = servers[0].one_time_pre_key_ids(grace).await.unwrap().len()
        + servers[0].one_time_pre_key_ids(henry).await.unwrap().len();
    assert_eq!(seen.len() + left, 400);
    assert_eq!(db.count("SELECT COUNT(*) FROM OPk").await as usize, left);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_and_uploads_on_an_unmigrated_database_store_once() {
    let db = TestDb::original().await;
    let servers = [
        db.open(Duration::from_secs(10)).await,
        db.open(Duration::from_secs(10)).await,
    ];
    let ivan = device("ivan");
    let mut tasks = Vec::new();
    for task in 0..12 {
        let server = servers[task % 2].clone();
        let ivan = ivan.clone();
        tasks.push(tokio::spawn(async move {
            server
                .register_device(ivan.clone(), registration(4, 0..20))
                .await
                .unwrap();
            server
                .add_one_time_pre_keys(ivan, (20..40).map(opk).collect())
                .await
                .unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let not_the_asker = "SELECT COUNT(*) FROM Users WHERE UserId <> 'sip:asker@example.org;gr=1'";
    assert_eq!(db.count(not_the_asker).await, 1);
    assert_eq!(db.count("SELECT COUNT(*) FROM OPk").await, 40);
    assert_eq!(db.count("SELECT COUNT(DISTINCT OPk_id) FROM OPk").await, 40);

    // Different keys racing for one new device: exactly one wins.
    let judy = device("judy");
    let mut tasks = Vec::new();
    for task in 0..8u64 {
        let server = servers[(task % 2) as usize].clone();
        let judy = judy.clone();
        tasks.push(tokio::spawn(async move {
            server.register_device(judy, registration(task, 0..3)).await
        }));
    }
    let mut new = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(Registered::New) => new += 1,
            Err(StoreError::DeviceRegisteredWithOtherKeys) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(new, 1);
    assert_eq!(db.count(not_the_asker).await, 2);
    assert_eq!(db.count("SELECT COUNT(*) FROM OPk").await, 43);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_held_up_by_a_lock_times_out_and_changes_nothing() {
    let db = TestDb::new().await;
    store::mysql::init(&db.url).await.unwrap();
    let timeout = Duration::from_secs(1);
    // Set-up and checks go through `store`, with a longer time-out: on a loaded
    // machine they may take longer than 1 s. Only the calls under test go
    // through `impatient`.
    let store = db.open(Duration::from_secs(5)).await;
    let impatient = store::mysql::open(CURVE, &db.url, &options(timeout))
        .await
        .unwrap();
    let kate = device("kate");
    store
        .register_device(kate.clone(), registration(1, 0..5))
        .await
        .unwrap();

    // Another server holds the device row: an upload cannot go through.
    let mut other = db.connect().await;
    other.execute("BEGIN").await.unwrap();
    sqlx::query("SELECT Uid FROM Users WHERE UserId = ? FOR UPDATE")
        .bind(kate.as_str())
        .fetch_one(&mut other)
        .await
        .unwrap();
    let started = Instant::now();
    let answer = impatient
        .add_one_time_pre_keys(kate.clone(), vec![opk(50), opk(51)])
        .await;
    assert!(matches!(answer, Err(StoreError::Timeout(_))), "{answer:?}");
    assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
    other.execute("ROLLBACK").await.unwrap();

    // A table lock stops claims the same way.
    other.execute("LOCK TABLES OPk WRITE").await.unwrap();
    let started = Instant::now();
    let answer = impatient
        .claim_key_bundles(asker(), vec![kate.clone()])
        .await;
    assert!(matches!(answer, Err(StoreError::Timeout(_))), "{answer:?}");
    assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
    other.execute("UNLOCK TABLES").await.unwrap();

    // Nothing was changed, and the store that gave up serves again (a loaded
    // machine may still make it give up on a call for its 1 s alone: asked
    // again until it answers).
    assert_eq!(
        store.one_time_pre_key_ids(kate.clone()).await.unwrap(),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(
        claimed_id(
            &again_past_timeouts(|| impatient.claim_key_bundles(asker(), vec![kate.clone()]))
                .await
                .unwrap()[0]
        ),
        Some(0)
    );
    again_past_timeouts(|| impatient.ping()).await.unwrap();
    // Give the abandoned statements time to end on the server, then check again.
    tokio::time::sleep(timeout * 2).await;
    assert_eq!(
        store.one_time_pre_key_ids(kate).await.unwrap(),
        [1, 2, 3, 4]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_recovers_when_its_connections_are_killed() {
    let db = TestDb::new().await;
    store::mysql::init(&db.url).await.unwrap();
    let store = db.open(Duration::from_secs(5)).await;
    let liam = device("liam");
    store
        .register_device(liam.clone(), registration(1, 0..3))
        .await
        .unwrap();
    // Kill every connection of the store (as a database restart would).
    let mut admin = MySqlConnection::connect(backend::MARIADB_ADMIN_URL)
        .await
        .unwrap();
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = ? AND ID <> CONNECTION_ID()",
    )
    .bind(&db.database.name)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!ids.is_empty());
    for id in ids {
        let _ = admin.execute(format!("KILL {id}").as_str()).await;
    }
    store.ping().await.unwrap();
    assert_eq!(
        store.one_time_pre_key_ids(liam.clone()).await.unwrap(),
        [0, 1, 2]
    );
    store
        .add_one_time_pre_keys(liam.clone(), vec![opk(3)])
        .await
        .unwrap();
}

#[tokio::test]
async fn migrate_adds_the_claims_table_to_a_database_made_before_it() {
    let db = TestDb::new().await;
    store::mysql::init(&db.url).await.unwrap();
    let mut conn = db.connect().await;
    conn.execute("DROP TABLE lime_rs_claims").await.unwrap();

    // Served without it, claims included.
    let store = db.open(Duration::from_secs(5)).await;
    let alice = device("alice");
    store
        .register_device(alice.clone(), registration(1, 0..2))
        .await
        .unwrap();
    let bundles = store
        .claim_key_bundles(asker(), vec![alice.clone()])
        .await
        .unwrap();
    assert_eq!(claimed_id(&bundles[0]), Some(0));

    let migration = store::mysql::migrate(&db.url).await.unwrap();
    assert_eq!(migration.applied, ["table lime_rs_claims"]);
    assert_eq!(db.count(CLAIMS_TABLE_PRESENT).await, 1);
    assert!(
        store::mysql::migrate(&db.url)
            .await
            .unwrap()
            .applied
            .is_empty()
    );
    // A store opened now claims with a token.
    let store = db.open(Duration::from_secs(5)).await;
    let bundles = store
        .claim_key_bundles(asker(), vec![alice.clone()])
        .await
        .unwrap();
    assert_eq!(claimed_id(&bundles[0]), Some(1));
    assert_eq!(db.count("SELECT COUNT(*) FROM lime_rs_claims").await, 1);
}

/// A store reaching the database through `relay`, and a device holding keys 0..3.
async fn store_through(db: &TestDb, relay: &Relay) -> (Arc<dyn KeyStore>, DeviceId) {
    store::mysql::init(&db.url).await.unwrap();
    let store = store::mysql::open(
        CURVE,
        &relay.route(&db.url),
        &options(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    register_asker(&store).await;
    let alice = device("alice");
    store
        .register_device(alice.clone(), registration(1, 0..3))
        .await
        .unwrap();
    (store, alice)
}

/// The device's key ids, read directly (not through the relay).
async fn stored_key_ids(db: &TestDb, device: &DeviceId) -> Vec<u32> {
    let mut conn = db.connect().await;
    sqlx::query_scalar(
        "SELECT o.OPk_id FROM OPk AS o JOIN Users AS u ON u.Uid = o.Uid \
         WHERE u.UserId = ? ORDER BY o.id",
    )
    .bind(device.as_str())
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

/// Claims for `device` one at a time until none is left: the ids served.
async fn claim_all(store: &Arc<dyn KeyStore>, device: &DeviceId) -> Vec<u32> {
    let mut served = Vec::new();
    while let Some(id) = claimed_id(
        &store
            .claim_key_bundles(asker(), vec![device.clone()])
            .await
            .unwrap()[0],
    ) {
        served.push(id);
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_commit_answer_is_lost_puts_its_key_back() {
    let db = TestDb::new().await;
    let relay = Relay::start("127.0.0.1:3306").await;
    let (store, alice) = store_through(&db, &relay).await;

    relay.arm(Trap::AfterCommit);
    let claimed = store.claim_key_bundles(asker(), vec![alice.clone()]).await;
    assert!(relay.sprung(), "the claim's COMMIT went through the relay");
    assert!(
        matches!(claimed, Err(StoreError::Backend(_))),
        "{claimed:?}"
    );
    // The COMMIT happened: key 0 is gone, undelivered, and the token is stored.
    assert_eq!(stored_key_ids(&db, &alice).await, [1, 2]);
    assert_eq!(db.count("SELECT COUNT(*) FROM lime_rs_claims").await, 1);

    // Once the database answers again, with no request for the device, the key
    // is put back in its place and the token deleted.
    relay.restore();
    let started = Instant::now();
    while stored_key_ids(&db, &alice).await != [0, 1, 2] {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "key 0 not restored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM lime_rs_claims").await, 0);
    assert_eq!(
        store.one_time_pre_key_ids(alice.clone()).await.unwrap(),
        [0, 1, 2]
    );
    // Each key is served once.
    assert_eq!(claim_all(&store, &alice).await, [0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_cut_before_its_commit_restores_nothing_and_duplicates_nothing() {
    let db = TestDb::new().await;
    let relay = Relay::start("127.0.0.1:3306").await;
    let (store, alice) = store_through(&db, &relay).await;

    relay.arm(Trap::BeforeCommit);
    let claimed = store.claim_key_bundles(asker(), vec![alice.clone()]).await;
    assert!(relay.sprung(), "the claim's COMMIT reached the relay");
    assert!(
        matches!(claimed, Err(StoreError::Backend(_))),
        "{claimed:?}"
    );
    // The server rolls the claim back when it sees the connection closed.
    let started = Instant::now();
    while stored_key_ids(&db, &alice).await != [0, 1, 2] {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not rolled back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.restore();
    // Time for the store to settle the claim (it tries every second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stored_key_ids(&db, &alice).await, [0, 1, 2]);
    assert_eq!(db.count("SELECT COUNT(*) FROM lime_rs_claims").await, 0);
    assert_eq!(claim_all(&store, &alice).await, [0, 1, 2]);
}

/// 32 registrations of new devices at once, half for users of their own and
/// half for one user with room for 5 devices: none may fail on a deadlock, and
/// the user ends with exactly 5 devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_of_new_devices_never_fail_and_keep_the_device_limit() {
    let db = TestDb::new().await;
    store::mysql::init(&db.url).await.unwrap();
    let mut options = options(Duration::from_secs(20));
    options.pool_size = 32;
    options.limits.max_devices_per_user = 5;
    let servers: Vec<Arc<dyn KeyStore>> = vec![
        store::mysql::open(CURVE, &db.url, &options).await.unwrap(),
        store::mysql::open(CURVE, &db.url, &options).await.unwrap(),
    ];
    for round in 0..3u64 {
        let (shared_user, shared_new) =
            registrations::race_new_devices(&servers, round, |task| registration(task, 0..10))
                .await;
        assert_eq!(shared_new, 5, "round {round}");
        let shared = format!(
            "SELECT COUNT(*) FROM Users WHERE UserId LIKE 'sip:{shared_user}@example.org;gr=%'"
        );
        assert_eq!(db.count(&shared).await, 5, "round {round}");
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM Users").await, 3 * (16 + 5));
}
