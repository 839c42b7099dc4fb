//! The PostgreSQL store against the machine's PostgreSQL (127.0.0.1:5432, user
//! postgres, trust).
//! Each test makes its own database `lime_t_<random>` and drops it when it ends.
//! A PostgreSQL that cannot be reached fails the test, it never passes silently.

use lime_protocol::{Curve, DeviceId, IdentityKey, OneTimePreKey, Registration, SignedPreKey};
use lime_server::store::{
    KeyStore, Migration, Registered, SchemaState, ServerStoreOptions, StoreError, StoreLimits,
    postgres,
};
mod common;

use common::again_past_timeouts;
use common::backend::{self, Backend};
use common::registrations;
use common::relay::{Relay, Trap};
use sqlx::{Connection, PgConnection, Row};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

const CURVE: Curve = Curve::C25519;
/// A database of its own for one test, dropped (connections and all) at the end.
struct TestDatabase {
    _database: backend::TestDatabase,
    url: String,
}

impl TestDatabase {
    /// An empty database, no schema.
    async fn empty() -> TestDatabase {
        let database = backend::TestDatabase::empty(Backend::Postgres).await;
        let url = database.url.clone();
        TestDatabase {
            _database: database,
            url,
        }
    }

    /// A database with our schema (`db init`).
    async fn initialised() -> TestDatabase {
        let database = TestDatabase::empty().await;
        assert_eq!(
            postgres::init(&database.url).await.unwrap(),
            SchemaState::Created
        );
        database
    }

    async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.unwrap()
    }

    /// The store, with the asker registered (a bundle's source must be).
    async fn open(&self, timeout: Duration) -> Arc<dyn KeyStore> {
        let store = postgres::open(CURVE, &self.url, &options(timeout))
            .await
            .unwrap();
        register_asker(&store).await;
        store
    }

    async fn scalar(&self, sql: &str) -> i64 {
        let mut conn = self.connect().await;
        let value = sqlx::query(sql).fetch_one(&mut conn).await.unwrap().get(0);
        let _ = conn.close().await;
        value
    }
}

fn options(timeout: Duration) -> ServerStoreOptions {
    ServerStoreOptions {
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
        timeout,
        limits: StoreLimits {
            max_one_time_pre_keys_per_device: 50,
            max_devices_per_user: 0,
            bundle_requests: None,
        },
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// The device asking for bundles in these tests (no request limit is set).
fn asker() -> DeviceId {
    DeviceId::new("sip:asker@example.org;gr=1").unwrap()
}

/// Registers the asker, always with the same keys (so that a store opened again
/// on the same database finds it registered): a bundle's source must be a
/// registered device.
async fn register_asker(store: &Arc<dyn KeyStore>) {
    store
        .register_device(asker(), registration(42, Vec::new()))
        .await
        .unwrap();
}

fn device(name: &str) -> DeviceId {
    DeviceId::new(format!("sip:{name}@example.org;gr=urn:uuid:1")).unwrap()
}

fn one_time_pre_key(byte: u8, id: u32) -> OneTimePreKey {
    OneTimePreKey::new(CURVE, vec![byte; 32], id).unwrap()
}

fn one_time_pre_keys(ids: std::ops::Range<u32>) -> Vec<OneTimePreKey> {
    ids.map(|id| one_time_pre_key(id as u8, id)).collect()
}

fn registration(ik: u8, one_time_pre_keys: Vec<OneTimePreKey>) -> Registration {
    Registration {
        identity_key: IdentityKey::new(CURVE, vec![ik; 32]).unwrap(),
        signed_pre_key: SignedPreKey::new(CURVE, vec![2; 32], vec![3; 64], 7).unwrap(),
        one_time_pre_keys,
    }
}

#[tokio::test]
async fn init_creates_the_original_tables_once_and_leaves_them_afterwards() {
    let database = TestDatabase::initialised().await;
    let mut conn = database.connect().await;
    let columns: Vec<(String, String)> = sqlx::query(
        "SELECT table_name::text, column_name::text FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name NOT LIKE 'lime_rs_%' \
         ORDER BY table_name, ordinal_position",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect();
    let expected = [
        ("Config", "Name"),
        ("Config", "Value"),
        ("OPk", "id"),
        ("OPk", "Uid"),
        ("OPk", "OPk"),
        ("OPk", "OPk_id"),
        ("Requests", "source"),
        ("Requests", "target"),
        ("Requests", "at"),
        ("Users", "Uid"),
        ("Users", "UserId"),
        ("Users", "Ik"),
        ("Users", "SPk"),
        ("Users", "SPk_sig"),
        ("Users", "SPk_id"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(table, column)| (table.to_string(), column.to_string()))
        .collect();
    assert_eq!(columns, expected);
    let claims_columns: Vec<(String, String)> = sqlx::query(
        "SELECT column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name = 'lime_rs_claims' ORDER BY ordinal_position",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect();
    assert_eq!(
        claims_columns,
        [
            ("token".to_owned(), "bytea".to_owned()),
            (
                "claimed_at".to_owned(),
                "timestamp with time zone".to_owned()
            )
        ]
    );
    let config: Vec<(String, i32)> =
        sqlx::query(r#"SELECT "Name", "Value" FROM "Config" ORDER BY "Name""#)
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
    assert_eq!(
        config,
        [("lime_rs_schema".to_owned(), 3), ("version".to_owned(), 1)]
    );

    let store = database.open(TIMEOUT).await;
    store
        .register_device(device("alice"), registration(1, one_time_pre_keys(0..3)))
        .await
        .unwrap();
    assert_eq!(
        postgres::init(&database.url).await.unwrap(),
        SchemaState::Present
    );
    assert_eq!(
        database
            .scalar(
                r#"SELECT count(*) FROM "Users" WHERE "UserId" <> 'sip:asker@example.org;gr=1'"#
            )
            .await,
        1
    );
    assert_eq!(database.scalar(r#"SELECT count(*) FROM "OPk""#).await, 3);
    assert_eq!(
        postgres::migrate(&database.url).await.unwrap(),
        Migration::default()
    );
    let _ = conn.close().await;
}

#[tokio::test]
async fn migrate_adds_what_an_older_layout_lacks_once_and_refuses_a_newer_one() {
    let database = TestDatabase::initialised().await;
    let mut conn = database.connect().await;
    // The layout before our additions: no indexes, no ('lime_rs_schema', N).
    sqlx::Executor::execute(
        &mut conn,
        r#"DROP INDEX "Users_UserId_md5"; DROP INDEX "OPk_Uid_OPk_id";
           DELETE FROM "Config" WHERE "Name" = 'lime_rs_schema'"#,
    )
    .await
    .unwrap();
    let refused = postgres::open(CURVE, &database.url, &options(TIMEOUT))
        .await
        .err()
        .expect("an unmigrated database must be refused")
        .to_string();
    assert!(refused.contains("db migrate"), "{refused}");

    let first = postgres::migrate(&database.url).await.unwrap();
    assert_eq!(first.applied.len(), 3, "{first:?}");
    assert_eq!(
        postgres::migrate(&database.url).await.unwrap(),
        Migration::default()
    );
    database.open(TIMEOUT).await;

    sqlx::Executor::execute(
        &mut conn,
        r#"UPDATE "Config" SET "Value" = 99 WHERE "Name" = 'lime_rs_schema'"#,
    )
    .await
    .unwrap();
    let newer = postgres::migrate(&database.url)
        .await
        .unwrap_err()
        .to_string();
    assert!(newer.contains("newer"), "{newer}");
    assert!(
        postgres::open(CURVE, &database.url, &options(TIMEOUT))
            .await
            .is_err()
    );
    let _ = conn.close().await;
}

#[tokio::test]
async fn open_says_what_is_missing_and_never_shows_the_password() {
    let database = TestDatabase::empty().await;
    let no_schema = postgres::open(CURVE, &database.url, &options(TIMEOUT))
        .await
        .err()
        .expect("a database without tables must be refused")
        .to_string();
    assert!(no_schema.contains("db init"), "{no_schema}");
    let no_migrate = postgres::migrate(&database.url)
        .await
        .unwrap_err()
        .to_string();
    assert!(no_migrate.contains("db init"), "{no_migrate}");

    let missing = format!("{}_missing", database.url);
    let error = postgres::init(&missing).await.unwrap_err().to_string();
    assert!(error.contains("create it first"), "{error}");

    let unreachable = "postgres://lime:secret@127.0.0.1:1/lime";
    let error = postgres::open(CURVE, unreachable, &options(TIMEOUT))
        .await
        .err()
        .expect("nothing listens on port 1")
        .to_string();
    assert!(
        error.contains("postgres://lime:***@127.0.0.1:1/lime"),
        "{error}"
    );
    assert!(!error.contains("secret"), "{error}");
}

#[tokio::test]
async fn registration_is_idempotent_and_all_or_nothing() {
    let database = TestDatabase::initialised().await;
    let store = database.open(TIMEOUT).await;
    let alice = device("alice");
    assert_eq!(
        store
            .register_device(alice.clone(), registration(1, one_time_pre_keys(0..3)))
            .await
            .unwrap(),
        Registered::New
    );
    assert_eq!(
        store
            .register_device(alice.clone(), registration(1, one_time_pre_keys(10..20)))
            .await
            .unwrap(),
        Registered::AlreadyWithSameKeys
    );
    assert!(matches!(
        store
            .register_device(alice.clone(), registration(9, Vec::new()))
            .await,
        Err(StoreError::DeviceRegisteredWithOtherKeys)
    ));
    assert_eq!(store.one_time_pre_key_ids(alice).await.unwrap(), [0, 1, 2]);

    // Same OPk id twice with other bytes: nothing of the device is stored.
    let bob = device("bob");
    let conflicting = vec![one_time_pre_key(1, 5), one_time_pre_key(2, 5)];
    assert!(matches!(
        store
            .register_device(bob.clone(), registration(1, conflicting))
            .await,
        Err(StoreError::ConflictingOneTimePreKeyId(5))
    ));
    assert!(matches!(
        store.one_time_pre_key_ids(bob.clone()).await,
        Err(StoreError::DeviceNotFound)
    ));
    // Past the per-device limit: refused whole too.
    assert!(matches!(
        store
            .register_device(bob.clone(), registration(1, one_time_pre_keys(0..51)))
            .await,
        Err(StoreError::TooManyOneTimePreKeys {
            would_hold: 51,
            limit: 50
        })
    ));
    // The same key twice is one key.
    let repeated = vec![one_time_pre_key(1, 5), one_time_pre_key(1, 5)];
    store
        .register_device(bob.clone(), registration(1, repeated))
        .await
        .unwrap();
    assert_eq!(store.one_time_pre_key_ids(bob).await.unwrap(), [5]);
    assert_eq!(
        database
            .scalar(
                r#"SELECT count(*) FROM "Users" WHERE "UserId" <> 'sip:asker@example.org;gr=1'"#
            )
            .await,
        2
    );
}

#[tokio::test]
async fn uploads_skip_identical_keys_and_refuse_conflicts_and_excess_whole() {
    let database = TestDatabase::initialised().await;
    let store = database.open(TIMEOUT).await;
    let alice = device("alice");
    store
        .register_device(alice.clone(), registration(1, one_time_pre_keys(0..10)))
        .await
        .unwrap();

    // A retried upload (same ids, same bytes) plus new keys: the new ones are added.
    store
        .add_one_time_pre_keys(alice.clone(), one_time_pre_keys(5..15))
        .await
        .unwrap();
    let ids: Vec<u32> = (0..15).collect();
    assert_eq!(
        store.one_time_pre_key_ids(alice.clone()).await.unwrap(),
        ids
    );

    // An id in use with other bytes refuses the whole upload.
    let mut upload = one_time_pre_keys(20..25);
    upload.push(one_time_pre_key(99, 3));
    assert!(matches!(
        store.add_one_time_pre_keys(alice.clone(), upload).await,
        Err(StoreError::ConflictingOneTimePreKeyId(3))
    ));
    // So does going past the limit.
    assert!(matches!(
        store
            .add_one_time_pre_keys(alice.clone(), one_time_pre_keys(100..136))
            .await,
        Err(StoreError::TooManyOneTimePreKeys {
            would_hold: 51,
            limit: 50
        })
    ));
    assert_eq!(
        store.one_time_pre_key_ids(alice.clone()).await.unwrap(),
        ids
    );
    store
        .add_one_time_pre_keys(alice.clone(), one_time_pre_keys(100..135))
        .await
        .unwrap();
    store
        .add_one_time_pre_keys(alice, Vec::new())
        .await
        .unwrap();

    let nobody = device("nobody");
    for keys in [Vec::new(), one_time_pre_keys(0..2)] {
        assert!(matches!(
            store.add_one_time_pre_keys(nobody.clone(), keys).await,
            Err(StoreError::DeviceNotFound)
        ));
    }
    let spk = SignedPreKey::new(CURVE, vec![4; 32], vec![5; 64], 8).unwrap();
    assert!(matches!(
        store.replace_signed_pre_key(nobody.clone(), spk).await,
        Err(StoreError::DeviceNotFound)
    ));
    assert!(matches!(
        store.one_time_pre_key_ids(nobody.clone()).await,
        Err(StoreError::DeviceNotFound)
    ));
    store.delete_device(nobody).await.unwrap();
}

#[tokio::test]
async fn bundles_take_each_key_once_and_a_repeated_device_takes_one() {
    let database = TestDatabase::initialised().await;
    let store = database.open(TIMEOUT).await;
    let (alice, bob, carol) = (device("alice"), device("bob"), device("carol"));
    store
        .register_device(alice.clone(), registration(1, one_time_pre_keys(0..2)))
        .await
        .unwrap();
    store
        .register_device(bob.clone(), registration(1, Vec::new()))
        .await
        .unwrap();
    // A device without SPk, as old servers could leave one.
    let mut conn = database.connect().await;
    sqlx::query(r#"INSERT INTO "Users" ("UserId", "Ik") VALUES ($1, $2)"#)
        .bind(carol.as_str())
        .bind(vec![1u8; 32])
        .execute(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;

    let asked = vec![
        alice.clone(),
        device("unknown"),
        alice.clone(),
        bob.clone(),
        carol.clone(),
    ];
    let bundles = store
        .claim_key_bundles(asker(), asked.clone())
        .await
        .unwrap();
    let flags: Vec<u8> = bundles.iter().map(|bundle| bundle.flag()).collect();
    assert_eq!(flags, [1, 2, 0, 0, 2]);
    assert_eq!(
        bundles
            .iter()
            .map(|b| b.device_id.clone())
            .collect::<Vec<_>>(),
        asked
    );
    let first = bundles[0].bundle.clone().unwrap();
    assert_eq!(first.identity_key.as_bytes(), [1; 32]);
    assert_eq!(first.signed_pre_key.id(), 7);
    let taken = first.one_time_pre_key.unwrap();
    assert_eq!(
        store
            .one_time_pre_key_ids(alice.clone())
            .await
            .unwrap()
            .len(),
        1
    );

    let again = store
        .claim_key_bundles(asker(), vec![alice.clone()])
        .await
        .unwrap();
    let other = again[0].bundle.clone().unwrap().one_time_pre_key.unwrap();
    assert_ne!(taken.id(), other.id());
    let none_left = store
        .claim_key_bundles(asker(), vec![alice.clone()])
        .await
        .unwrap();
    assert_eq!(none_left[0].flag(), 0);

    // A new SPk is served; deleting the device takes its keys with it.
    let spk = SignedPreKey::new(CURVE, vec![4; 32], vec![5; 64], 8).unwrap();
    store
        .replace_signed_pre_key(bob.clone(), spk)
        .await
        .unwrap();
    let bundles = store
        .claim_key_bundles(asker(), vec![bob.clone()])
        .await
        .unwrap();
    assert_eq!(bundles[0].bundle.as_ref().unwrap().signed_pre_key.id(), 8);
    store
        .add_one_time_pre_keys(bob.clone(), one_time_pre_keys(0..4))
        .await
        .unwrap();
    store.delete_device(bob.clone()).await.unwrap();
    assert_eq!(database.scalar(r#"SELECT count(*) FROM "OPk""#).await, 0);
    assert_eq!(
        store.claim_key_bundles(asker(), vec![bob]).await.unwrap()[0].flag(),
        2
    );
    store.ping().await.unwrap();
}

#[tokio::test]
async fn a_device_id_of_65535_bytes_registers_and_is_found() {
    let database = TestDatabase::initialised().await;
    let store = database.open(TIMEOUT).await;
    let prefix = "sip:long@example.org;gr=";
    let long = |last: char| {
        let mut id = String::from(prefix);
        id.extend(std::iter::repeat_n('x', 65_534 - prefix.len()));
        id.push(last);
        DeviceId::new(id).unwrap()
    };
    let (first, second) = (long('a'), long('b'));
    assert_eq!(first.as_str().len(), 65_535);
    for id in [&first, &second] {
        assert_eq!(
            store
                .register_device(id.clone(), registration(1, one_time_pre_keys(0..2)))
                .await
                .unwrap(),
            Registered::New
        );
    }
    assert_eq!(
        store
            .register_device(first.clone(), registration(1, Vec::new()))
            .await
            .unwrap(),
        Registered::AlreadyWithSameKeys
    );
    let bundles = store
        .claim_key_bundles(asker(), vec![first.clone()])
        .await
        .unwrap();
    assert_eq!(bundles[0].flag(), 1);
    assert_eq!(bundles[0].device_id, first);
    assert_eq!(
        store
            .one_time_pre_key_ids(first.clone())
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        store
            .one_time_pre_key_ids(second.clone())
            .await
            .unwrap()
            .len(),
        2
    );
    store.delete_device(first.clone()).await.unwrap();
    assert!(matches!(
        store.one_time_pre_key_ids(first).await,
        Err(StoreError::DeviceNotFound)
    ));
    assert_eq!(store.one_time_pre_key_ids(second).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_claiming_at_once_never_hand_out_the_same_key() {
    const DEVICES: u32 = 8;
    const KEYS: u32 = 40;
    let database = TestDatabase::initialised().await;
    // Two stores with two pools: two server instances on one database.
    let servers = [database.open(TIMEOUT).await, database.open(TIMEOUT).await];
    let devices: Vec<DeviceId> = (0..DEVICES).map(|n| device(&format!("d{n}"))).collect();
    for device in &devices {
        servers[0]
            .register_device(device.clone(), registration(1, one_time_pre_keys(0..KEYS)))
            .await
            .unwrap();
    }

    let mut tasks = Vec::new();
    for task in 0..32usize {
        let store = servers[task % 2].clone();
        let devices = devices.clone();
        tasks.push(tokio::spawn(async move {
            let mut claimed = Vec::new();
            for round in 0..30usize {
                // Several devices per request, in an order of this task's own.
                let asked: Vec<DeviceId> = (0..3)
                    .map(|k| devices[(task + round * 3 + k) % devices.len()].clone())
                    .collect();
                for bundle in store.claim_key_bundles(asker(), asked).await.unwrap() {
                    if let Some(key) = bundle.bundle.and_then(|b| b.one_time_pre_key) {
                        claimed.push((bundle.device_id.as_str().to_owned(), key.id()));
                    }
                }
            }
            claimed
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    let distinct: HashSet<&(String, u32)> = claimed.iter().collect();
    assert_eq!(distinct.len(), claimed.len(), "a key was handed out twice");

    // What was handed out and what is left are exactly what was uploaded.
    let mut remaining = 0;
    for device in &devices {
        let left = servers[1]
            .one_time_pre_key_ids(device.clone())
            .await
            .unwrap();
        for id in &left {
            assert!(!distinct.contains(&(device.as_str().to_owned(), *id)));
        }
        remaining += left.len();
    }
    assert_eq!(claimed.len() + remaining, (DEVICES * KEYS) as usize);
    assert!(!claimed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_registering_one_device_at_once_store_it_once() {
    let database = TestDatabase::initialised().await;
    let servers = [database.open(TIMEOUT).await, database.open(TIMEOUT).await];
    for round in 0..20u8 {
        let same_keys = round % 2 == 0;
        let device = device(&format!("race{round}"));
        let mut attempts = Vec::new();
        for server in &servers {
            let (store, device) = (server.clone(), device.clone());
            let ik = if same_keys {
                1
            } else {
                2 + attempts.len() as u8
            };
            attempts.push(tokio::spawn(async move {
                store
                    .register_device(device, registration(ik, one_time_pre_keys(0..5)))
                    .await
            }));
        }
        let mut new = 0;
        for attempt in attempts {
            match attempt.await.unwrap() {
                Ok(Registered::New) => new += 1,
                Ok(Registered::AlreadyWithSameKeys) => assert!(same_keys),
                Err(StoreError::DeviceRegisteredWithOtherKeys) => assert!(!same_keys),
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert_eq!(new, 1, "round {round}");
        assert_eq!(
            servers[0].one_time_pre_key_ids(device).await.unwrap().len(),
            5
        );
    }
    assert_eq!(
        database
            .scalar(
                r#"SELECT count(*) FROM "Users" WHERE "UserId" <> 'sip:asker@example.org;gr=1'"#
            )
            .await,
        20
    );
}

#[tokio::test]
async fn a_call_held_up_past_its_timeout_reports_timeout_and_changes_nothing() {
    let database = TestDatabase::initialised().await;
    let timeout = Duration::from_millis(400);
    // Set-up and checks go through `store`, with the usual time-out: on a loaded
    // machine they may take longer than 400 ms. Only the calls under test go
    // through `impatient`.
    let store = database.open(TIMEOUT).await;
    let impatient = postgres::open(CURVE, &database.url, &options(timeout))
        .await
        .unwrap();
    let alice = device("alice");
    store
        .register_device(alice.clone(), registration(1, one_time_pre_keys(0..3)))
        .await
        .unwrap();

    let mut locker = database.connect().await;
    sqlx::Executor::execute(
        &mut locker,
        r#"BEGIN; LOCK TABLE "OPk" IN ACCESS EXCLUSIVE MODE"#,
    )
    .await
    .unwrap();
    // Each call answers about when its time-out says (with slack for a loaded
    // machine: this checks that it answers, not how fast).
    let bound = timeout + Duration::from_secs(2);
    let started = std::time::Instant::now();
    let claimed = impatient
        .claim_key_bundles(asker(), vec![alice.clone()])
        .await;
    assert!(
        matches!(claimed, Err(StoreError::Timeout(_))),
        "{claimed:?}"
    );
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    let started = std::time::Instant::now();
    let registered = impatient
        .register_device(device("bob"), registration(1, one_time_pre_keys(0..3)))
        .await;
    assert!(
        matches!(registered, Err(StoreError::Timeout(_))),
        "{registered:?}"
    );
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    let started = std::time::Instant::now();
    let added = impatient
        .add_one_time_pre_keys(alice.clone(), one_time_pre_keys(3..5))
        .await;
    assert!(matches!(added, Err(StoreError::Timeout(_))), "{added:?}");
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    sqlx::Executor::execute(&mut locker, "COMMIT")
        .await
        .unwrap();
    let _ = locker.close().await;

    // Nothing was claimed, registered or added, and the store serves again.
    assert_eq!(
        store.one_time_pre_key_ids(alice.clone()).await.unwrap(),
        [0, 1, 2]
    );
    assert!(matches!(
        store.one_time_pre_key_ids(device("bob")).await,
        Err(StoreError::DeviceNotFound)
    ));
    assert_eq!(
        database
            .scalar(
                r#"SELECT count(*) FROM "Users" WHERE "UserId" <> 'sip:asker@example.org;gr=1'"#
            )
            .await,
        1
    );
    // The store that gave up serves again. A loaded machine may still make it
    // give up on a call for its 400 ms alone: asked again until it answers.
    let bundles = again_past_timeouts(|| impatient.claim_key_bundles(asker(), vec![alice.clone()]))
        .await
        .unwrap();
    assert_eq!(bundles[0].flag(), 1);
    again_past_timeouts(|| impatient.ping()).await.unwrap();
}

#[tokio::test]
async fn connections_ended_by_the_server_are_replaced_without_failing_a_call() {
    let database = TestDatabase::initialised().await;
    let store = database.open(TIMEOUT).await;
    let alice = device("alice");
    store
        .register_device(alice.clone(), registration(1, one_time_pre_keys(0..20)))
        .await
        .unwrap();
    // Fill the pool with connections.
    let calls = (0..8).map(|_| store.one_time_pre_key_ids(alice.clone()));
    for answer in futures::future::join_all(calls).await {
        answer.unwrap();
    }
    // What a database restart does to them.
    let terminated = database
        .scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await;
    assert!(terminated > 0);
    for _ in 0..10 {
        store
            .claim_key_bundles(asker(), vec![alice.clone()])
            .await
            .unwrap();
    }
    assert_eq!(store.one_time_pre_key_ids(alice).await.unwrap().len(), 10);
}

#[tokio::test]
async fn the_store_serves_again_once_the_database_is_back() {
    let database = TestDatabase::initialised().await;
    let relay = Relay::start("127.0.0.1:5432").await;
    let url = relay.route(&database.url);
    let timeout = Duration::from_secs(1);
    // Set-up and checks go through `direct`, with the usual time-out: on a loaded
    // machine they may take longer than 1 s.
    let direct = database.open(TIMEOUT).await;
    let store = postgres::open(CURVE, &url, &options(timeout))
        .await
        .unwrap();
    register_asker(&direct).await;
    let alice = device("alice");
    direct
        .register_device(alice.clone(), registration(1, one_time_pre_keys(0..20)))
        .await
        .unwrap();
    // Connections in the store's pool, for the cut to end (a call that gives up
    // on its 1 s alone, on a loaded machine, is made again).
    let calls = (0..8).map(|_| again_past_timeouts(|| store.one_time_pre_key_ids(alice.clone())));
    for answer in futures::future::join_all(calls).await {
        answer.unwrap();
    }

    relay.cut().await;
    let started = std::time::Instant::now();
    match store.claim_key_bundles(asker(), vec![alice.clone()]).await {
        Err(StoreError::Backend(_) | StoreError::Timeout(_)) => {}
        other => panic!("the database is unreachable, yet: {other:?}"),
    }
    assert!(store.ping().await.is_err());
    // Two calls, each bounded by its time-out (slack for a loaded machine).
    let bound = 2 * timeout + Duration::from_secs(3);
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());

    relay.restore();
    // Served again (asked again while a call gives up on its 1 s alone).
    for _ in 0..5 {
        again_past_timeouts(|| store.claim_key_bundles(asker(), vec![alice.clone()]))
            .await
            .unwrap();
    }
    again_past_timeouts(|| store.ping()).await.unwrap();
    assert_eq!(direct.one_time_pre_key_ids(alice).await.unwrap().len(), 15);
}

#[tokio::test]
async fn migrate_adds_the_claims_table_to_a_database_made_before_it() {
    let database = TestDatabase::initialised().await;
    let mut conn = database.connect().await;
    sqlx::Executor::execute(&mut conn, r#"DROP TABLE "lime_rs_claims""#)
        .await
        .unwrap();

    // Served without it, claims included.
    let store = database.open(TIMEOUT).await;
    let alice = device("alice");
    store
        .register_device(alice.clone(), registration(1, one_time_pre_keys(0..2)))
        .await
        .unwrap();
    let bundles = store
        .claim_key_bundles(asker(), vec![alice.clone()])
        .await
        .unwrap();
    assert_eq!(bundles[0].flag(), 1);

    let migration = postgres::migrate(&database.url).await.unwrap();
    assert_eq!(migration.applied, ["table lime_rs_claims"]);
    assert_eq!(
        postgres::migrate(&database.url).await.unwrap(),
        Migration::default()
    );
    // A store opened now claims with a token.
    let store = database.open(TIMEOUT).await;
    store
        .claim_key_bundles(asker(), vec![alice.clone()])
        .await
        .unwrap();
    assert_eq!(
        database
            .scalar(r#"SELECT count(*) FROM "lime_rs_claims""#)
            .await,
        1
    );
    assert!(store.one_time_pre_key_ids(alice).await.unwrap().is_empty());
    let _ = conn.close().await;
}

/// A store reaching the database through `relay`, and a device holding keys 0..3.
async fn store_through(database: &TestDatabase, relay: &Relay) -> (Arc<dyn KeyStore>, DeviceId) {
    let store = postgres::open(
        CURVE,
        &relay.route(&database.url),
        &options(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    register_asker(&store).await;
    let alice = device("alice");
    store
        .register_device(alice.clone(), registration(1, one_time_pre_keys(0..3)))
        .await
        .unwrap();
    (store, alice)
}

/// The device's key ids, read directly (not through the relay).
async fn stored_key_ids(database: &TestDatabase, device: &DeviceId) -> Vec<i64> {
    let mut conn = database.connect().await;
    let ids = sqlx::query_scalar(
        r#"SELECT o."OPk_id" FROM "OPk" AS o JOIN "Users" AS u ON u."Uid" = o."Uid"
           WHERE u."UserId" = $1 ORDER BY o."id""#,
    )
    .bind(device.as_str())
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
    ids
}

/// Claims for `device` one at a time until none is left: the ids served.
async fn claim_all(store: &Arc<dyn KeyStore>, device: &DeviceId) -> Vec<u32> {
    let mut served = Vec::new();
    loop {
        let bundles = store
            .claim_key_bundles(asker(), vec![device.clone()])
            .await
            .unwrap();
        match bundles[0]
            .bundle
            .as_ref()
            .unwrap()
            .one_time_pre_key
            .as_ref()
        {
            Some(key) => served.push(key.id()),
            None => return served,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_commit_answer_is_lost_puts_its_key_back() {
    let database = TestDatabase::initialised().await;
    let relay = Relay::start("127.0.0.1:5432").await;
    let (store, alice) = store_through(&database, &relay).await;

    relay.arm(Trap::AfterCommit);
    let claimed = store.claim_key_bundles(asker(), vec![alice.clone()]).await;
    assert!(relay.sprung(), "the claim's COMMIT went through the relay");
    assert!(
        matches!(claimed, Err(StoreError::Backend(_))),
        "{claimed:?}"
    );
    // The COMMIT happened: key 0 is gone, undelivered, and the token is stored.
    assert_eq!(stored_key_ids(&database, &alice).await, [1, 2]);
    assert_eq!(
        database
            .scalar(r#"SELECT count(*) FROM "lime_rs_claims""#)
            .await,
        1
    );

    // Once the database answers again, with no request for the device, the key
    // is put back in its place and the token deleted.
    relay.restore();
    let started = std::time::Instant::now();
    while stored_key_ids(&database, &alice).await != [0, 1, 2] {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "key 0 not restored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        database
            .scalar(r#"SELECT count(*) FROM "lime_rs_claims""#)
            .await,
        0
    );
    assert_eq!(
        store.one_time_pre_key_ids(alice.clone()).await.unwrap(),
        [0, 1, 2]
    );
    // Each key is served once.
    assert_eq!(claim_all(&store, &alice).await, [0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_cut_before_its_commit_restores_nothing_and_duplicates_nothing() {
    let database = TestDatabase::initialised().await;
    let relay = Relay::start("127.0.0.1:5432").await;
    let (store, alice) = store_through(&database, &relay).await;

    relay.arm(Trap::BeforeCommit);
    let claimed = store.claim_key_bundles(asker(), vec![alice.clone()]).await;
    assert!(relay.sprung(), "the claim's COMMIT reached the relay");
    assert!(
        matches!(claimed, Err(StoreError::Backend(_))),
        "{claimed:?}"
    );
    // The server rolls the claim back when it sees the connection closed.
    let started = std::time::Instant::now();
    while stored_key_ids(&database, &alice).await != [0, 1, 2] {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not rolled back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.restore();
    // Time for the store to settle the claim (it tries every second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stored_key_ids(&database, &alice).await, [0, 1, 2]);
    assert_eq!(
        database
            .scalar(r#"SELECT count(*) FROM "lime_rs_claims""#)
            .await,
        0
    );
    assert_eq!(claim_all(&store, &alice).await, [0, 1, 2]);
}

/// 32 registrations of new devices at once, half for users of their own and
/// half for one user with room for 5 devices: none fails, and the user ends with
/// exactly 5 devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_of_new_devices_never_fail_and_keep_the_device_limit() {
    let database = TestDatabase::initialised().await;
    let mut options = options(Duration::from_secs(20));
    options.pool_size = 16;
    options.limits.max_devices_per_user = 5;
    let servers: Vec<Arc<dyn KeyStore>> = vec![
        postgres::open(CURVE, &database.url, &options)
            .await
            .unwrap(),
        postgres::open(CURVE, &database.url, &options)
            .await
            .unwrap(),
    ];
    for round in 0..3u64 {
        let (shared_user, shared_new) = registrations::race_new_devices(&servers, round, |task| {
            registration(task as u8, one_time_pre_keys(0..10))
        })
        .await;
        assert_eq!(shared_new, 5, "round {round}");
        let shared = format!(
            r#"SELECT COUNT(*) FROM "Users" WHERE "UserId" LIKE 'sip:{shared_user}@example.org;gr=%'"#
        );
        assert_eq!(database.scalar(&shared).await, 5, "round {round}");
    }
    assert_eq!(
        database.scalar(r#"SELECT COUNT(*) FROM "Users""#).await,
        3 * (16 + 5)
    );
}
