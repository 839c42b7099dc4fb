//! Cost of one getPeerBundle claim transaction on the SQLite store
//! (`claim_key_bundles_in_transaction`: `BEGIN IMMEDIATE`, device lookup,
//! `DELETE ... RETURNING` of one OPk, `COMMIT`), for a random device among 1,000
//! and among 1,000,000: the two figures should be close, since every step is an
//! index lookup.
//!
//! Run: `cargo bench -p lime-server --bench claim` (the 1,000,000-device group
//! spends about a minute seeding its database first).
//!
//! The figure is the database work of the transaction, not the disk: the connection
//! runs with `PRAGMA synchronous = NORMAL` (no fsync per commit) and without
//! automatic WAL checkpoints; the WAL is checkpointed, with the claimed OPks put
//! back, every few hundred claims outside the timed part, so every timed claim finds
//! an OPk (flag 1). Checkpoints cost as much again on this kind of machine, and
//! more with a larger file: `lime-load raw-claims` measures the claim with them
//! (docs/benchmarks.md).

use criterion::{Criterion, criterion_group, criterion_main};
use lime_protocol::{Curve, DeviceId, PeerBundle};
use lime_server::store::StoreLimits;
use lime_server::store::sqlite::{Synchronous, claim_key_bundles_in_transaction, connect};

/// The claim alone, without bundle request accounting.
const NO_LIMITS: StoreLimits = StoreLimits {
    max_one_time_pre_keys_per_device: 65_535,
    max_devices_per_user: 0,
    bundle_requests: None,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rusqlite::{Connection, params};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// The device that asks for bundles, registered with the seeded devices.
const ASKER: &str = "sip:asker@example.org;gr=1";

const CURVE: Curve = Curve::C25519;

/// Claims timed between two put-backs: few enough that no device runs out of
/// OPks in between (criterion's warm-up asks for up to hundreds of thousands of
/// iterations in one call).
const CHUNK: u64 = 256;

fn device_name(index: u64) -> String {
    format!("sip:load-{index}@example.org;gr=urn:uuid:00000000-0000-0000-0000-{index:012}")
}

/// A fresh database in a temporary directory with `devices` devices holding
/// `opks_per_device` OPks each.
fn seeded(devices: u64, opks_per_device: u32) -> (tempfile::TempDir, Connection) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("lime-c25519.sqlite3");
    let conn = connect(&path, Synchronous::Normal).expect("open database");
    conn.execute_batch("PRAGMA synchronous = OFF")
        .expect("pragma");
    let mut rng = StdRng::seed_from_u64(1);
    let mut key = [0u8; 64];
    let tx = conn.unchecked_transaction().expect("begin");
    {
        let mut user = tx
            .prepare(
                "INSERT INTO Users (UserId, Ik, SPk, SPk_sig, SPk_id) VALUES (?1, ?2, ?3, ?4, 1)",
            )
            .expect("prepare");
        let mut opk = tx
            .prepare("INSERT INTO OPk (Uid, OPk, OPk_id) VALUES (?1, ?2, ?3)")
            .expect("prepare");
        for index in 0..devices {
            rng.fill_bytes(&mut key);
            user.execute(params![
                device_name(index),
                &key[..32],
                &key[32..],
                &key[..]
            ])
            .expect("insert device");
            let uid = tx.last_insert_rowid();
            for id in 1..=opks_per_device {
                rng.fill_bytes(&mut key[..32]);
                opk.execute(params![uid, &key[..32], id])
                    .expect("insert OPk");
            }
        }
    }
    // The device that asks (a bundle's source must be a registered device).
    tx.execute(
        "INSERT INTO Users (UserId, Ik, SPk, SPk_sig, SPk_id) VALUES (?1, ?2, ?3, ?4, 1)",
        params![ASKER, &key[..32], &key[32..], &key[..]],
    )
    .expect("insert the asker");
    tx.commit().expect("commit");
    // The bulk load on disk (the checkpoint's fsync), so that no timed claim pays
    // for writing it; from here on, checkpoints happen only in `put_back`.
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0")
        .expect("pragma");
    checkpoint(&conn);
    (dir, conn)
}

/// Times `iters` claims of random devices, putting the claimed OPks back after
/// every [`CHUNK`] claims, outside the timed part.
fn claims(conn: &Connection, rng: &mut StdRng, devices: u64, iters: u64) -> Duration {
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    let asker = DeviceId::new(ASKER).expect("device id");
    while done < iters {
        let chunk = CHUNK.min(iters - done);
        let mut claimed = Vec::with_capacity(chunk as usize);
        let started = Instant::now();
        for _ in 0..chunk {
            let index = rng.random_range(0..devices);
            let device = DeviceId::new(device_name(index)).expect("device id");
            let bundles =
                claim_key_bundles_in_transaction(conn, CURVE, &NO_LIMITS, &asker, vec![device])
                    .expect("claim");
            claimed.push(black_box(bundles));
        }
        elapsed += started.elapsed();
        put_back(conn, claimed);
        done += chunk;
    }
    elapsed
}

/// Copies the WAL into the database file and empties it.
fn checkpoint(conn: &Connection) {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
}

/// Stores the claimed OPks again, so the next claims find as many as the first,
/// and checkpoints.
fn put_back(conn: &Connection, claimed: Vec<Vec<PeerBundle>>) {
    let tx = conn.unchecked_transaction().expect("begin");
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO OPk (Uid, OPk, OPk_id) SELECT Uid, ?2, ?3 FROM Users WHERE UserId = ?1",
            )
            .expect("prepare");
        for bundle in claimed.into_iter().flatten() {
            let opk = bundle
                .bundle
                .and_then(|keys| keys.one_time_pre_key)
                .expect("every timed claim finds an OPk");
            insert
                .execute(params![bundle.device_id.as_str(), opk.public(), opk.id()])
                .expect("put OPk back");
        }
    }
    tx.commit().expect("commit");
    checkpoint(conn);
}

fn bench_devices(c: &mut Criterion, group_name: &str, devices: u64, opks_per_device: u32) {
    let (_dir, conn) = seeded(devices, opks_per_device);
    let mut rng = StdRng::seed_from_u64(2);
    let mut group = c.benchmark_group(group_name);
    group.bench_function("claim_one_bundle", |b| {
        b.iter_custom(|iters| claims(&conn, &mut rng, devices, iters))
    });
    group.finish();
}

fn claim_1k_devices(c: &mut Criterion) {
    // 256 claims over 1,000 devices: a device is picked a few times at most.
    bench_devices(c, "claim_1k_devices", 1_000, 16);
}

fn claim_1m_devices(c: &mut Criterion) {
    // 256 claims over 1,000,000 devices: hardly ever the same device twice.
    bench_devices(c, "claim_1m_devices", 1_000_000, 2);
}

criterion_group!(benches, claim_1k_devices, claim_1m_devices);
criterion_main!(benches);
