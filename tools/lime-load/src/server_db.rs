//! Database-server benchmarks (MariaDB/MySQL, PostgreSQL), beside the SQLite ones:
//!
//! - `seed-db`: creates the schema at `--store` when absent (`store::init`) and
//!   registers devices `0..N` ([`crate::device_name`]) with M OPks each through the
//!   store's own `KeyStore::register_device`, from several tasks at once.
//! - `raw-db-claims`: the store's own claim transaction
//!   (`KeyStore::claim_key_bundles`, one random seeded device) in a loop from C
//!   tasks on a store opened with a pool of C connections, no server in front: the
//!   reference ("raw") rate.
//! - `register`: registerUser with K random OPks per request through a running
//!   server, from C keep-alive connections; requests/s.
//!
//! `--store` is a URL as the server's `storage.url` (`{curve}` is replaced by the
//! curve's name), e.g. `mysql://root@127.0.0.1:3306/lime_bench_{curve}`.

use crate::stats::{Latencies, cpu_count, load_average, machine_busy, ms, process_cpu};
use crate::{asker, device_name};
use anyhow::{Context, Result, bail};
use clap::Args;
use lime_protocol::{
    Curve, DeviceId, IdentityKey, OneTimePreKey, Registration, Request, RequestMessage, Response,
    SignedPreKey,
};
use lime_server::client::LimeClient;
use lime_server::store::{
    self, KeyStore, ServerStoreOptions, StoreError, StoreLimits, StoreLocation,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Barrier;

/// Options of `seed-db`.
#[derive(Debug, Args)]
pub struct SeedDbArgs {
    /// Database URL, `{curve}` replaced by the curve's name.
    #[arg(long, value_name = "URL")]
    store: String,
    /// Base algorithm of the store to fill.
    #[arg(long, default_value = "c25519")]
    curve: Curve,
    /// Number of devices, named `sip:load-{0..N}@example.org;gr=...`.
    #[arg(long, value_name = "N")]
    devices: u64,
    /// One-time pre-keys per device.
    #[arg(long, value_name = "M")]
    opks_per_device: u32,
    /// Concurrent registrations (and pool size).
    #[arg(long, value_name = "C", default_value_t = 16)]
    connections: usize,
}

/// Options of `raw-db-claims`.
#[derive(Debug, Args)]
pub struct RawDbArgs {
    /// Database URL, `{curve}` replaced by the curve's name.
    #[arg(long, value_name = "URL")]
    store: String,
    /// Base algorithm of the store.
    #[arg(long, default_value = "c25519")]
    curve: Curve,
    /// Number of seeded devices to pick from (devices 0..N).
    #[arg(long, value_name = "N")]
    devices: u64,
    /// Timed claims (transactions) in all.
    #[arg(long, value_name = "R")]
    requests: u64,
    /// Concurrent tasks; the store's pool has as many connections.
    #[arg(long, value_name = "C", default_value_t = 1)]
    connections: usize,
}

/// Options of `register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The server's X3DH URL (http:// for a plain-HTTP listener).
    #[arg(long)]
    url: String,
    /// PEM certificate to trust for https:// URLs.
    #[arg(long, value_name = "CERT")]
    ca: Option<PathBuf>,
    /// Plain HTTP (no certificate needed); the URL must be http://.
    #[arg(long)]
    plain: bool,
    /// Base algorithm of the requests.
    #[arg(long, default_value = "c25519")]
    curve: Curve,
    /// Timed registerUser requests in all (one new device each).
    #[arg(long, value_name = "R")]
    requests: u64,
    /// Concurrent connections, one task each.
    #[arg(long, value_name = "C", default_value_t = 1)]
    connections: usize,
    /// One-time pre-keys per registerUser.
    #[arg(long, value_name = "K", default_value_t = 100)]
    opks: u32,
}

/// The store at `template` for `curve`, with a pool of `pool_size` connections.
async fn open_store(template: &str, curve: Curve, pool_size: u32) -> Result<Arc<dyn KeyStore>> {
    let location = StoreLocation::parse(template, curve)?;
    let limits = StoreLimits {
        max_one_time_pre_keys_per_device: 65_535,
        max_devices_per_user: 0,
        bundle_requests: None,
    };
    let server_options = ServerStoreOptions {
        pool_size,
        connect_timeout: Duration::from_secs(10),
        timeout: Duration::from_secs(30),
        limits,
    };
    let sqlite_options = store::sqlite::SqliteOptions {
        path: PathBuf::new(),
        synchronous: store::sqlite::Synchronous::Full,
        max_batch: 64,
        timeout: Duration::from_secs(30),
        limits,
        serves: false,
    };
    Ok(store::open(curve, &location, &sqlite_options, &server_options).await?)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Random keys of `curve`'s sizes, with `opks` OPks of ids `1..=opks`.
pub(crate) fn random_registration(
    curve: Curve,
    opks: u32,
    rng: &mut impl RngCore,
) -> Result<Registration> {
    let mut bytes = |len: usize| {
        let mut out = vec![0; len];
        rng.fill_bytes(&mut out);
        out
    };
    let identity_key = IdentityKey::new(curve, bytes(curve.identity_key_len()))?;
    let signed_pre_key = SignedPreKey::new(
        curve,
        bytes(curve.pre_key_len()),
        bytes(curve.signature_len()),
        1,
    )?;
    let one_time_pre_keys = (1..=opks)
        .map(|id| OneTimePreKey::new(curve, bytes(curve.pre_key_len()), id))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Registration {
        identity_key,
        signed_pre_key,
        one_time_pre_keys,
    })
}

/// Runs `work(n)` for `n` in `0..requests` from `connections` tasks (each first
/// running `warm_up` once, untimed, then waiting for the others); the latencies
/// and the elapsed time of the timed part.
async fn drive<S, W, F>(
    connections: usize,
    requests: u64,
    states: Vec<S>,
    work: W,
) -> Result<(Vec<Duration>, Duration, u64, Option<String>)>
where
    S: Send + Sync + 'static,
    W: Fn(Arc<S>, u64) -> F + Send + Sync + 'static,
    F: Future<Output = Result<()>> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(connections + 1));
    let work = Arc::new(work);
    let tasks: Vec<_> = states
        .into_iter()
        .map(|state| {
            let (next, barrier, work) = (next.clone(), barrier.clone(), work.clone());
            tokio::spawn(async move {
                let state = Arc::new(state);
                // Warm-up (connection set-up): numbered past the timed requests.
                let warm_up = work(state.clone(), u64::MAX).await;
                barrier.wait().await;
                warm_up.context("warm-up request failed")?;
                let mut latencies = Vec::new();
                let mut first_error = None;
                let mut errors = 0u64;
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= requests {
                        break;
                    }
                    let begun = Instant::now();
                    let result = work(state.clone(), n).await;
                    latencies.push(begun.elapsed());
                    if let Err(error) = result {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{error:#}"));
                    }
                }
                anyhow::Ok((latencies, errors, first_error))
            })
        })
        .collect();
    barrier.wait().await;
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut first_error = None;
    let mut errors = 0;
    for task in tasks {
        let (mine, failed, error) = task.await.context("a load task panicked")??;
        latencies.extend(mine);
        errors += failed;
        first_error = first_error.or(error);
    }
    Ok((latencies, started.elapsed(), errors, first_error))
}

/// Prints the rate, latency, CPU and machine lines of a run.
fn report(
    what: &str,
    unit: &str,
    latencies: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
    cpu: Duration,
    machine: Duration,
) -> Result<()> {
    // The rate counts the requests that succeeded; the latencies, all.
    let done = latencies.len() as u64 - errors;
    let latencies = Latencies::new(latencies)?;
    println!("{what} in {:.2} s; errors {errors}", elapsed.as_secs_f64());
    println!(
        "  rate: {:.0} {unit}/s",
        done as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  latency: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        ms(latencies.percentile(50.0)),
        ms(latencies.percentile(90.0)),
        ms(latencies.percentile(99.0)),
        ms(latencies.percentile(99.9)),
        ms(latencies.percentile(100.0))
    );
    println!(
        "  client CPU: {:.3} ms/{unit} (this process, {:.2} s in all)",
        ms(cpu) / done as f64,
        cpu.as_secs_f64()
    );
    println!(
        "  machine: {:.0}% of {} CPUs busy; other processes {:.2} s CPU (database and server included)",
        100.0 * machine.as_secs_f64() / (elapsed.as_secs_f64() * cpu_count() as f64),
        cpu_count(),
        machine.saturating_sub(cpu).as_secs_f64()
    );
    Ok(())
}

/// `seed-db`.
pub fn seed(args: &SeedDbArgs) -> Result<()> {
    if args.connections == 0 || args.devices == 0 {
        bail!("--connections and --devices must be at least 1");
    }
    runtime()?.block_on(async {
        let location = StoreLocation::parse(&args.store, args.curve)?;
        let state = store::init(&location).await?;
        eprintln!("{location}: schema {state:?}");
        let store = open_store(&args.store, args.curve, args.connections as u32).await?;
        // The device the store-level runs ask as: a bundle's source must be registered.
        let registration =
            random_registration(args.curve, 0, &mut StdRng::from_rng(&mut rand::rng()))?;
        match store.register_device(asker(), registration).await {
            Ok(_) | Err(StoreError::DeviceRegisteredWithOtherKeys) => {}
            Err(error) => return Err(error.into()),
        }
        let started = Instant::now();
        let (curve, opks) = (args.curve, args.opks_per_device);
        let states = (0..args.connections).map(|_| store.clone()).collect();
        let (_, _, _, error) = drive(args.connections, args.devices, states, move |store, n| {
            async move {
                if n >= u64::MAX / 2 {
                    return Ok(()); // no warm-up
                }
                let registration =
                    random_registration(curve, opks, &mut StdRng::from_rng(&mut rand::rng()))?;
                // A database failure (e.g. MariaDB deadlocks between concurrent
                // registrations on a fresh table) is retried: the same keys again
                // are harmless.
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match store
                        .register_device(DeviceId::new(device_name(n))?, registration.clone())
                        .await
                    {
                        Ok(_) => return Ok(()),
                        Err(StoreError::DeviceRegisteredWithOtherKeys) => bail!(
                            "device {n} is already registered: drop and recreate the database to seed again"
                        ),
                        Err(error) if attempt < 20 => {
                            eprintln!("device {n}, attempt {attempt}: {error}; retrying");
                        }
                        Err(error) => return Err(error.into()),
                    }
                }
            }
        })
        .await?;
        if let Some(error) = error {
            bail!("seeding failed: {error}");
        }
        println!(
            "{location}: {} devices, {} OPks each, in {:.1} s",
            args.devices,
            args.opks_per_device,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })
}

/// `raw-db-claims`.
pub fn raw_claims(args: &RawDbArgs) -> Result<()> {
    if args.connections == 0 || args.devices == 0 || args.requests == 0 {
        bail!("--connections, --devices and --requests must be at least 1");
    }
    runtime()?.block_on(async {
        let store = open_store(&args.store, args.curve, args.connections as u32).await?;
        let last = DeviceId::new(device_name(args.devices - 1))?;
        if store.one_time_pre_key_ids(last).await.is_err() {
            bail!("no device {} : seed at least {} devices", device_name(args.devices - 1), args.devices);
        }
        let load_before = load_average();
        let flags = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
        let devices = args.devices;
        let states = (0..args.connections).map(|_| store.clone()).collect();
        let cpu_before = process_cpu(None)?;
        let machine_before = machine_busy()?;
        let counted = flags.clone();
        let (latencies, elapsed, errors, error) =
            drive(args.connections, args.requests, states, move |store, n| {
                let flags = counted.clone();
                async move {
                    let device = DeviceId::new(device_name(rand::rng().random_range(0..devices)))?;
                    let bundles = store.claim_key_bundles(asker(), vec![device]).await?;
                    match bundles.as_slice() {
                        [bundle] if n < u64::MAX / 2 => {
                            flags[usize::from(bundle.flag()).min(2)].fetch_add(1, Ordering::Relaxed);
                            Ok(())
                        }
                        [_] => Ok(()),
                        other => bail!("claim gave {} bundles, not 1", other.len()),
                    }
                }
            })
            .await?;
        let cpu = process_cpu(None)? - cpu_before;
        let machine = machine_busy()?.saturating_sub(machine_before);
        report(
            &format!(
                "raw-db-claims: {} claims on {} from {} tasks (pool {}); load average before: {load_before}",
                latencies.len(),
                StoreLocation::parse(&args.store, args.curve)?,
                args.connections,
                args.connections
            ),
            "claims",
            latencies,
            errors,
            elapsed,
            cpu,
            machine,
        )?;
        let [zero, one, two] = [0, 1, 2].map(|i| flags[i].load(Ordering::Relaxed));
        println!("  bundles: flag 1 (with OPk) {one}, flag 0 (no OPk left) {zero}, flag 2 (no bundle) {two}");
        if let Some(error) = error {
            bail!("some claims failed, the first: {error}");
        }
        Ok(())
    })
}

/// What one `register` connection holds.
struct RegisterState {
    client: LimeClient,
    url: String,
    curve: Curve,
    opks: u32,
    /// Distinguishes this run's devices from earlier runs'.
    run: u64,
    /// This connection's number (warm-up device names).
    index: usize,
}

/// `register`.
pub fn register(args: &RegisterArgs) -> Result<()> {
    if args.connections == 0 || args.requests == 0 {
        bail!("--connections and --requests must be at least 1");
    }
    let https = args.url.starts_with("https://");
    let run: u64 = rand::rng().random();
    let states = (0..args.connections)
        .map(|index| {
            let client = match (&args.ca, https, args.plain) {
                (Some(ca), true, _) => LimeClient::trusting(ca)?,
                (_, false, _) => LimeClient::plain()?,
                (None, true, _) => bail!("an https:// URL needs --ca <certificate to trust>"),
            };
            Ok(RegisterState {
                client,
                url: args.url.clone(),
                curve: args.curve,
                opks: args.opks,
                run,
                index,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    runtime()?.block_on(async {
        let load_before = load_average();
        let cpu_before = process_cpu(None)?;
        let machine_before = machine_busy()?;
        let (latencies, elapsed, errors, error) =
            drive(args.connections, args.requests, states, |state, n| async move {
                let name = if n >= u64::MAX / 2 {
                    format!("sip:reg-{:016x}-w{}@example.org", state.run, state.index)
                } else {
                    format!("sip:reg-{:016x}-{n}@example.org", state.run)
                };
                let registration = random_registration(
                    state.curve,
                    state.opks,
                    &mut StdRng::from_rng(&mut rand::rng()),
                )?;
                let message = RequestMessage {
                    curve: state.curve,
                    request: Request::RegisterUser(registration),
                };
                let answer = state.client.send(&state.url, &name, &message).await?;
                match answer.response {
                    Response::Done(_) => Ok(()),
                    // The warm-up only sets the connection up: its answer is not counted.
                    _ if n >= u64::MAX / 2 => Ok(()),
                    other => bail!("registerUser answered {other:?}"),
                }
            })
            .await?;
        let cpu = process_cpu(None)? - cpu_before;
        let machine = machine_busy()?.saturating_sub(machine_before);
        report(
            &format!(
                "register: {} registerUser with {} OPks ({} {}) over {} connections; load average before: {load_before}",
                latencies.len(),
                args.opks,
                args.curve,
                args.url,
                args.connections
            ),
            "requests",
            latencies,
            errors,
            elapsed,
            cpu,
            machine,
        )?;
        if let Some(error) = error {
            // Reported, not fatal: failures (e.g. db_error on deadlocks) are a finding.
            println!("  first error: {error}");
        }
        Ok(())
    })
}
