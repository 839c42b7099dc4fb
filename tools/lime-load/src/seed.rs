//! `seed`: fills one curve's SQLite store with synthetic devices, straight through
//! SQL (no server), in large transactions.
//!
//! The file is opened with `lime_server::store::sqlite::connect`, so the schema is
//! the server's own. Device `i` is [`crate::device_name`]`(i)`, with random Ik, SPk
//! and SPk_sig of the curve's sizes, SPk_id 1, and OPk ids `1..=M`.

use crate::{device_name, sqlite_path};
use anyhow::{Context, Result, bail};
use clap::Args;
use lime_protocol::Curve;
use lime_server::store::sqlite::{Synchronous, connect};
use rand::RngCore;
use rusqlite::{Connection, params};
use std::path::PathBuf;
use std::time::Instant;

/// Rows (devices and OPks) inserted per transaction.
const ROWS_PER_TRANSACTION: u64 = 250_000;

/// Options of `seed`.
#[derive(Debug, Args)]
pub struct SeedArgs {
    /// The server's data directory (created if absent); the store is
    /// `<DIR>/lime-<curve>.sqlite3`.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Base algorithm of the store to fill.
    #[arg(long, default_value = "c25519")]
    curve: Curve,
    /// Number of devices, named `sip:load-{0..N}@example.org;gr=...`.
    #[arg(long, value_name = "N")]
    devices: u64,
    /// One-time pre-keys per device.
    #[arg(long, value_name = "M")]
    opks_per_device: u32,
}

/// Seeds the store; refuses a store that already holds seeded devices.
pub fn run(args: &SeedArgs) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let path = sqlite_path(&args.data_dir, args.curve);
    let conn = connect(&path, Synchronous::Normal)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // A bulk load that can be redone from scratch: no fsync, a large page cache.
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -524288;")?;
    let already: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM Users WHERE UserId = ?1)",
        [device_name(0)],
        |row| row.get(0),
    )?;
    if already {
        bail!(
            "{} already holds seeded devices: delete it (and its -wal and -shm files) to seed again",
            path.display()
        );
    }

    let started = Instant::now();
    let rows_per_device = 1 + u64::from(args.opks_per_device);
    let devices_per_transaction = (ROWS_PER_TRANSACTION / rows_per_device).max(1);
    let mut first = 0;
    while first < args.devices {
        let end = (first + devices_per_transaction).min(args.devices);
        insert_devices(&conn, args.curve, first..end, args.opks_per_device)
            .with_context(|| format!("seeding devices {first}..{end} in {}", path.display()))?;
        first = end;
        eprint!(
            "\rseeded {first} / {} devices ({:.0} s)",
            args.devices,
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!();
    // The device the store-level runs ask as: a bundle's source must be registered.
    conn.execute(
        "INSERT OR IGNORE INTO Users (UserId, Ik, SPk, SPk_sig, SPk_id) \
         SELECT ?1, Ik, SPk, SPk_sig, SPk_id FROM Users WHERE UserId = ?2",
        params![crate::asker().as_str(), device_name(0)],
    )?;
    // Leave a self-contained file (nothing pending in the WAL), ready to be copied.
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    let size = std::fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0);
    println!(
        "{}: {} devices, {} OPks each, in {:.1} s; file {:.0} MiB",
        path.display(),
        args.devices,
        args.opks_per_device,
        started.elapsed().as_secs_f64(),
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// Inserts devices `range` with their OPks in one transaction.
fn insert_devices(
    conn: &Connection,
    curve: Curve,
    range: std::ops::Range<u64>,
    opks_per_device: u32,
) -> Result<()> {
    let mut rng = rand::rng();
    let mut identity_key = vec![0; curve.identity_key_len()];
    let mut signed_pre_key = vec![0; curve.pre_key_len()];
    let mut signature = vec![0; curve.signature_len()];
    let mut one_time_pre_key = vec![0; curve.pre_key_len()];
    let tx = conn.unchecked_transaction()?;
    {
        let mut insert_user = tx.prepare_cached(
            "INSERT INTO Users (UserId, Ik, SPk, SPk_sig, SPk_id) VALUES (?1, ?2, ?3, ?4, 1)",
        )?;
        let mut insert_opk =
            tx.prepare_cached("INSERT INTO OPk (Uid, OPk, OPk_id) VALUES (?1, ?2, ?3)")?;
        for index in range {
            rng.fill_bytes(&mut identity_key);
            rng.fill_bytes(&mut signed_pre_key);
            rng.fill_bytes(&mut signature);
            insert_user.execute(params![
                device_name(index),
                identity_key,
                signed_pre_key,
                signature
            ])?;
            let uid = tx.last_insert_rowid();
            for id in 1..=opks_per_device {
                rng.fill_bytes(&mut one_time_pre_key);
                insert_opk.execute(params![uid, one_time_pre_key, id])?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}
