//! The SQLite store directly: its WAL checkpointed beside the writer and kept
//! bounded, and large claims run in steps (a small request is not held up behind
//! a group's 1,000-device claim; nothing lost or served twice across steps, even
//! when a step fails; the bundle request limits exact across steps, counted
//! again when the server starts, by one server per file).

mod common;

use common::{id, registration};
use futures::future::join_all;
use lime_protocol::{Curve, DeviceId, PeerBundle};
use lime_server::store::sqlite::{
    CLAIM_STEP_DEVICES, CLAIM_STEP_DEVICES_ALONE, MAX_WAL_FRAMES, OpenError, SqliteOptions,
    SqliteStore, Synchronous, connect,
};
use lime_server::store::{BundleRequestLimit, KeyStore, OverLimit, StoreLimits};
use rusqlite::Connection;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

const CURVE: Curve = Curve::C25519;

/// A store on a fresh file, and the directory that keeps it.
struct TestStore {
    store: Arc<SqliteStore>,
    path: PathBuf,
    _dir: TempDir,
}

/// How the tests open a store of `path`, as `serve` does when `serves`.
fn options(
    path: &Path,
    limits: StoreLimits,
    synchronous: Synchronous,
    serves: bool,
) -> SqliteOptions {
    SqliteOptions {
        path: path.to_owned(),
        synchronous,
        max_batch: 64,
        timeout: Duration::from_secs(30),
        limits,
        serves,
    }
}

impl TestStore {
    fn open(limits: StoreLimits, synchronous: Synchronous) -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lime-c25519.sqlite3");
        lime_server::store::sqlite::init_database(&path).unwrap();
        let options = options(&path, limits, synchronous, true);
        TestStore {
            store: Arc::new(SqliteStore::open(CURVE, &options).unwrap()),
            path,
            _dir: dir,
        }
    }

    /// A connection of the test's own to the store's file.
    fn side_connection(&self) -> Connection {
        connect(&self.path, Synchronous::Normal).unwrap()
    }

    /// Registers `devices` devices with `keys` one-time pre-keys each (ids 1..).
    async fn register(&self, devices: &[DeviceId], keys: u32) {
        let registered = devices.iter().map(|device| {
            self.store
                .register_device(device.clone(), registration(CURVE, keys, 1))
        });
        for result in join_all(registered).await {
            result.unwrap();
        }
    }

    /// A device registered without one-time pre-keys, to ask for bundles.
    async fn asker(&self) -> DeviceId {
        let asker = devices("asker", 1).remove(0);
        self.register(std::slice::from_ref(&asker), 0).await;
        asker
    }

    /// The ids of the one-time pre-keys `device` has left.
    async fn keys_left(&self, device: &DeviceId) -> Vec<u32> {
        self.store
            .one_time_pre_key_ids(device.clone())
            .await
            .unwrap()
    }

    /// The size of the `-wal` file, 0 when absent.
    fn wal_bytes(&self) -> u64 {
        file_len(&wal_path(&self.path))
    }
}

fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |metadata| metadata.len())
}

fn no_limits() -> StoreLimits {
    StoreLimits {
        max_one_time_pre_keys_per_device: 5_000,
        max_devices_per_user: 0,
        bundle_requests: None,
    }
}

fn limits(max: u32, max_per_identity: u32, max_recorded: u32) -> StoreLimits {
    StoreLimits {
        bundle_requests: Some(BundleRequestLimit {
            max,
            max_per_identity,
            max_recorded_per_identity: max_recorded,
            window: Duration::from_secs(3600),
            over_limit: OverLimit::WithoutOneTimePreKey,
        }),
        ..no_limits()
    }
}

/// Devices `name0`, `name1`, ... of users of their own.
fn devices(name: &str, count: usize) -> Vec<DeviceId> {
    (0..count)
        .map(|n| id(&format!("sip:{name}{n}@example.org;gr=urn:uuid:{n:08}")))
        .collect()
}

/// The one-time pre-keys an answer delivered, as (device, key id).
fn keys_served(bundles: &[PeerBundle]) -> Vec<(String, u32)> {
    bundles
        .iter()
        .filter_map(|peer| {
            let key = peer.bundle.as_ref()?.one_time_pre_key.as_ref()?;
            Some((peer.device_id.as_str().to_owned(), key.id()))
        })
        .collect()
}

fn page_size(conn: &Connection) -> u64 {
    conn.query_row("PRAGMA page_size", [], |row| row.get(0))
        .unwrap()
}

/// Under a steady load of claims (32 at a time, each its own job, for long
/// enough to write several times the bound in WAL frames), the `-wal` file never
/// grows past the hard bound and one batch: a PASSIVE checkpoint alone never
/// catches up with a writer that keeps appending, so without the writer's part
/// (letting the checkpointer finish, or restarting the WAL itself) the file grows
/// with every commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wal_stays_bounded_under_steady_claims() {
    let test = TestStore::open(no_limits(), Synchronous::Normal);
    let targets = devices("target", 200);
    test.register(&targets, 1_000).await;
    let asker = devices("asker", 1);
    test.register(&asker, 0).await;
    let frame = page_size(&test.side_connection()) + 24;
    // Slack: the frames of the batch that passed the bound (at most 64 claims of
    // a few pages each) before the writer restarts the WAL.
    let bound = 32 + (u64::from(MAX_WAL_FRAMES) + 2_000) * frame;
    let store = test.store.clone();
    let load = tokio::spawn(async move {
        let mut claims = 0u64;
        let mut rounds = 0usize;
        let started = Instant::now();
        while claims < 40_000 && started.elapsed() < Duration::from_secs(120) {
            let round = (0..32).map(|n| {
                let target = targets[(rounds * 32 + n) % targets.len()].clone();
                store.claim_key_bundles(asker[0].clone(), vec![target])
            });
            for result in join_all(round).await {
                assert_eq!(keys_served(&result.unwrap()).len(), 1);
            }
            claims += 32;
            rounds += 1;
        }
        claims
    });
    let mut largest = 0;
    while !load.is_finished() {
        largest = largest.max(test.wal_bytes());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let claims = load.await.unwrap();
    largest = largest.max(test.wal_bytes());
    eprintln!(
        "{claims} claims: largest WAL {largest} bytes ({} frames), bound {bound}",
        largest / frame
    );
    assert!(
        largest <= bound,
        "the WAL reached {largest} bytes ({} frames) in {claims} claims: past {bound}",
        largest / frame
    );
}

/// The WAL is copied into the database file by the checkpointer while the writer
/// is held (its next transaction waits for a lock the test holds), with far
/// fewer frames in the WAL than SQLite's automatic checkpoint waits for: it is
/// not the writer that checkpoints, and it does not wait for 1,000 pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_is_checkpointed_beside_a_held_writer() {
    let test = TestStore::open(no_limits(), Synchronous::Full);
    let side = test.side_connection();
    let before = file_len(&test.path);
    // Four devices of 1,000 keys: a few hundred pages in four commits.
    test.register(&devices("stock", 4), 1_000).await;
    let frame = page_size(&side) + 24;
    let wal_frames = test.wal_bytes().saturating_sub(32) / frame;
    assert!(
        (50..1_000).contains(&wal_frames),
        "{wal_frames} frames in the WAL"
    );
    // Hold the write lock: the writer's next transaction waits for it.
    side.execute_batch("BEGIN IMMEDIATE").unwrap();
    let store = test.store.clone();
    let held = tokio::spawn(async move { store.ping().await });
    let grown = Instant::now();
    while file_len(&test.path) <= before + 50 * page_size(&side) {
        assert!(
            grown.elapsed() < Duration::from_secs(10),
            "the database file is still {} bytes (was {before}): nothing checkpointed",
            file_len(&test.path)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!held.is_finished(), "the writer was not held");
    side.execute_batch("ROLLBACK").unwrap();
    held.await.unwrap().unwrap();
}

/// A 1,000-device claim queued first, a 1-device claim right behind it: the
/// small one is answered first, since the large one ends its step after
/// [`CLAIM_STEP_DEVICES`] devices when another job waits, and the small one gets
/// in then.
/// (Both futures are polled by one task, the large one first whenever both are
/// ready: answered in the same transaction, the large one would win.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_claim_is_answered_before_a_large_one_queued_ahead() {
    const { assert!(CLAIM_STEP_DEVICES < 500) };
    let test = TestStore::open(no_limits(), Synchronous::Full);
    let group = devices("member", 1_000);
    test.register(&group, 2).await;
    let askers = devices("asker", 2);
    test.register(&askers, 0).await;
    let large = test
        .store
        .claim_key_bundles(askers[0].clone(), group.clone());
    let small = test
        .store
        .claim_key_bundles(askers[1].clone(), vec![group[999].clone()]);
    tokio::pin!(large, small);
    // The large claim is polled (queued) first.
    let first = tokio::select! {
        biased;
        answer = &mut large => ("large", answer.unwrap()),
        answer = &mut small => ("small", answer.unwrap()),
    };
    assert_eq!(first.0, "small", "the large claim was answered first");
    assert_eq!(keys_served(&first.1).len(), 1);
    let large = large.await.unwrap();
    assert_eq!(large.len(), 1_000);
    assert_eq!(keys_served(&large).len(), 1_000);
}

/// Two 1,000-device claims and a stream of small ones for the same devices, all
/// at once: every key served at most once, and every key either served or
/// still stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_in_steps_serve_each_key_once() {
    let test = TestStore::open(limits(10, 10, 100_000), Synchronous::Normal);
    let group = devices("member", 1_000);
    test.register(&group, 3).await;
    let askers = devices("asker", 50);
    test.register(&askers, 0).await;
    let mut claims = Vec::new();
    for (n, asker) in askers.iter().enumerate() {
        let wanted = match n {
            0 | 1 => group.clone(),
            _ => group.iter().skip(n * 7).step_by(97).cloned().collect(),
        };
        let store = test.store.clone();
        let asker = asker.clone();
        claims.push(tokio::spawn(async move {
            store.claim_key_bundles(asker, wanted).await
        }));
    }
    let mut served = Vec::new();
    for claim in join_all(claims).await {
        served.extend(keys_served(&claim.unwrap().unwrap()));
    }
    let unique: HashSet<_> = served.iter().cloned().collect();
    assert_eq!(unique.len(), served.len(), "a key was served twice");
    for device in &group {
        let left = test.keys_left(device).await;
        let taken: Vec<u32> = served
            .iter()
            .filter(|(served_to, _)| served_to == device.as_str())
            .map(|(_, key)| *key)
            .collect();
        assert_eq!(
            left.len() + taken.len(),
            3,
            "{device}: {left:?} left, {taken:?} served"
        );
        assert!(taken.iter().all(|key| !left.contains(key)));
    }
}

/// A claim alone whose second step fails (a trigger refuses to delete one
/// device's key) answers an error and leaves the store as it was: the keys its
/// first step took are back with their ids, their `Requests` rows gone and no
/// longer counted; the same claim then succeeds in full (it could not, were the
/// first step's 500 bundles still counted against the identity's 1,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_puts_back_what_earlier_steps_took() {
    let test = TestStore::open(limits(10, 10, 1_000), Synchronous::Full);
    let group = devices("member", 1_000);
    test.register(&group, 2).await;
    let asker = test.asker().await;
    let side = test.side_connection();
    let failing = &group[CLAIM_STEP_DEVICES_ALONE + 10];
    side.execute(
        &format!(
            "CREATE TRIGGER fail_claim BEFORE DELETE ON OPk \
             WHEN old.Uid = (SELECT Uid FROM Users WHERE UserId = '{failing}') \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        ),
        [],
    )
    .unwrap();
    let answer = test
        .store
        .claim_key_bundles(asker.clone(), group.clone())
        .await;
    assert!(answer.is_err(), "{answer:?}");
    for device in &group {
        let left = test.keys_left(device).await;
        assert_eq!(left, vec![1, 2], "{device}");
    }
    let count = |sql: &str| -> i64 { side.query_row(sql, [], |row| row.get(0)).unwrap() };
    assert_eq!(count("SELECT COUNT(*) FROM Requests"), 0);
    side.execute_batch("DROP TRIGGER fail_claim").unwrap();
    let bundles = test.store.claim_key_bundles(asker, group).await.unwrap();
    let served: HashMap<_, _> = keys_served(&bundles).into_iter().collect();
    assert_eq!(served.len(), 1_000);
    assert!(served.values().all(|key| *key == 1));
    assert_eq!(count("SELECT COUNT(*) FROM Requests"), 1_000);
}

/// Two devices of one identity claim the same 600 targets at once, in steps
/// that interleave: per identity one key per target (`max_per_identity = 1`),
/// and 500 requests recorded in all (`max_recorded_per_identity`), exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_stay_exact_across_interleaved_steps() {
    let test = TestStore::open(limits(1, 1, 500), Synchronous::Normal);
    let targets = devices("target", 600);
    test.register(&targets, 5).await;
    let alice: Vec<DeviceId> = (1..=2)
        .map(|n| id(&format!("sip:alice@example.org;gr=urn:uuid:{n:08}")))
        .collect();
    test.register(&alice, 0).await;
    let claims = alice.iter().map(|device| {
        test.store
            .claim_key_bundles(device.clone(), targets.clone())
    });
    let mut per_target: HashMap<String, usize> = HashMap::new();
    let mut served = 0;
    for answer in join_all(claims).await {
        for (target, _) in keys_served(&answer.unwrap()) {
            *per_target.entry(target).or_default() += 1;
            served += 1;
        }
    }
    assert_eq!(served, 500, "keys served to the identity");
    assert!(per_target.values().all(|&keys| keys == 1), "{per_target:?}");
    let side = test.side_connection();
    let recorded: i64 = side
        .query_row("SELECT COUNT(*) FROM Requests", [], |row| row.get(0))
        .unwrap();
    assert_eq!(recorded, 500);
}

/// The limit is counted in memory by the server that serves the file: started
/// again, it counts what the last window recorded; a second server on the same
/// file is refused (it would count apart), a command beside it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counts_outlive_a_restart_and_one_server_serves_a_file() {
    let test = TestStore::open(limits(1, 1, 100), Synchronous::Full);
    let targets = devices("target", 2);
    test.register(&targets, 3).await;
    let asker = test.asker().await;
    let first = test
        .store
        .claim_key_bundles(asker.clone(), targets[..1].to_vec())
        .await
        .unwrap();
    assert_eq!(keys_served(&first).len(), 1);

    let path = test.path.clone();
    let reopen = |serves| {
        SqliteStore::open(
            CURVE,
            &options(&path, limits(1, 1, 100), Synchronous::Full, serves),
        )
    };
    match reopen(true) {
        Err(error @ OpenError::InUse(_)) => {
            assert!(
                error.to_string().contains("served by another lime-server"),
                "{error}"
            )
        }
        other => panic!("a second server on the file: {:?}", other.err()),
    }
    drop(reopen(false).expect("a command beside the server"));

    let TestStore { store, _dir, .. } = test;
    drop(store);
    let again = reopen(true).unwrap();
    let answer = again
        .claim_key_bundles(asker, targets.clone())
        .await
        .unwrap();
    let served: Vec<String> = keys_served(&answer)
        .into_iter()
        .map(|(device, _)| device)
        .collect();
    assert_eq!(
        served,
        [targets[1].to_string()],
        "the first target was counted again"
    );
}
