//! `raw-claims`: the reference rate. The store's own claim transaction
//! (`claim_key_bundles_in_transaction`: `BEGIN IMMEDIATE`, look the device up,
//! `DELETE ... RETURNING` one OPk, `COMMIT`) in a tight loop on the database file,
//! one random seeded device per transaction, with no server in front. Run it with
//! the server stopped: the two would fight over the write lock.

use crate::stats::{Flags, Latencies, cpu_count, load_average, machine_busy, ms, process_cpu};
use crate::{asker, device_name, sqlite_path};
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use lime_protocol::{Curve, DeviceId};
use lime_server::store::StoreLimits;
use lime_server::store::sqlite::{Synchronous, claim_key_bundles_in_transaction, connect};

/// The claim alone: the server runs it is compared with are started with
/// `limits.max_bundle_requests = 0` (no request accounting) too.
const NO_LIMITS: StoreLimits = StoreLimits {
    max_one_time_pre_keys_per_device: 65_535,
    max_devices_per_user: 0,
    bundle_requests: None,
};
use rand::Rng;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `raw-claims`.
#[derive(Debug, Args)]
pub struct RawArgs {
    /// The server's data directory; the store is `<DIR>/lime-<curve>.sqlite3`.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Base algorithm of the store.
    #[arg(long, default_value = "c25519")]
    curve: Curve,
    /// Number of seeded devices to pick from (devices 0..N).
    #[arg(long, value_name = "N")]
    devices: u64,
    /// Timed claims (transactions).
    #[arg(long, value_name = "R")]
    requests: u64,
    /// `PRAGMA synchronous` of the connection, as the server's
    /// `storage.sqlite_synchronous`.
    #[arg(long, value_enum, default_value_t = SynchronousArg::Full)]
    synchronous: SynchronousArg,
    /// Untimed claims first (page cache, statement cache).
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Extra `PRAGMA` for experiments, run after the connection is set up as the
    /// server's, e.g. `wal_autocheckpoint = 10000` (repeatable).
    #[arg(long, value_name = "SETTING")]
    pragma: Vec<String>,
}

/// `--synchronous` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum SynchronousArg {
    /// fsync at every commit (the server's default).
    Full,
    /// fsync at checkpoints only.
    Normal,
}

/// Runs the claims and prints the rate.
pub fn run(args: &RawArgs) -> Result<()> {
    if args.devices == 0 || args.requests == 0 {
        bail!("--devices and --requests must be at least 1");
    }
    let path = sqlite_path(&args.data_dir, args.curve);
    if !path.exists() {
        bail!(
            "{} does not exist: run `lime-load seed` first",
            path.display()
        );
    }
    let synchronous = match args.synchronous {
        SynchronousArg::Full => Synchronous::Full,
        SynchronousArg::Normal => Synchronous::Normal,
    };
    let conn =
        connect(&path, synchronous).with_context(|| format!("cannot open {}", path.display()))?;
    for setting in &args.pragma {
        conn.execute_batch(&format!("PRAGMA {setting}"))
            .with_context(|| format!("PRAGMA {setting}"))?;
    }
    let last = device_name(args.devices - 1);
    let seeded: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM Users WHERE UserId = ?1)",
        [&last],
        |row| row.get(0),
    )?;
    if !seeded {
        bail!(
            "{} has no device {last}: seed at least {} devices",
            path.display(),
            args.devices
        );
    }

    let load_before = load_average();
    let mut rng = rand::rng();
    let mut claim = |n: u64| -> Result<u8> {
        let device = DeviceId::new(device_name(rng.random_range(0..args.devices)))?;
        let bundles =
            claim_key_bundles_in_transaction(&conn, args.curve, &NO_LIMITS, &asker(), vec![device])
                .with_context(|| format!("claim {n} failed"))?;
        match bundles.as_slice() {
            [bundle] => Ok(bundle.flag()),
            other => bail!("claim {n} gave {} bundles, not 1", other.len()),
        }
    };
    for n in 0..args.warmup {
        claim(n)?;
    }

    let cpu_before = process_cpu(None)?;
    let machine_before = machine_busy()?;
    let started = Instant::now();
    let mut flags = Flags::default();
    let mut latencies = Vec::with_capacity(args.requests as usize);
    for n in 0..args.requests {
        let begun = Instant::now();
        let flag = claim(n)?;
        latencies.push(begun.elapsed());
        flags.add(flag);
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu(None)? - cpu_before;
    let machine = machine_busy()?.saturating_sub(machine_before);
    let latencies = Latencies::new(latencies)?;

    println!(
        "raw-claims: {} claims on {} (synchronous={:?}) in {:.2} s; load average before: {load_before}",
        args.requests,
        path.display(),
        args.synchronous,
        elapsed.as_secs_f64()
    );
    println!(
        "  rate: {:.0} claims/s",
        args.requests as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  latency: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        ms(latencies.percentile(50.0)),
        ms(latencies.percentile(90.0)),
        ms(latencies.percentile(99.0)),
        ms(latencies.percentile(99.9)),
        ms(latencies.percentile(100.0))
    );
    println!("  bundles: {flags}");
    println!(
        "  CPU: {:.3} ms/claim ({:.2} s in all)",
        ms(cpu) / args.requests as f64,
        cpu.as_secs_f64()
    );
    println!(
        "  machine: {:.0}% of {} CPUs busy; other processes {:.2} s CPU",
        100.0 * machine.as_secs_f64() / (elapsed.as_secs_f64() * cpu_count() as f64),
        cpu_count(),
        machine.saturating_sub(cpu).as_secs_f64()
    );
    Ok(())
}
