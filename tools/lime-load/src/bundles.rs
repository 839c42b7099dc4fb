//! `bundles`: getPeerBundle load against a running server.
//!
//! C tasks, each with its own [`LimeClient`] and so its own keep-alive connection,
//! send getPeerBundle requests for one random seeded device each until R requests
//! have been sent in all. Each task first sends one untimed request (TCP and TLS
//! set-up); the clock starts when every connection is up. After the run the tool
//! counts the TCP connections it holds to the server, to show that C connections
//! (and no more) carried the load.
//!
//! With `--rate N`, the timed requests are paced instead: N a second in all, each
//! connection sending at its own fixed interval (C/N s, the connections' starts
//! spread over one interval), as many clients that each send now and then would.
//! A request that could not be sent on time because the one before it was still
//! waiting for its answer counts its latency from when it should have been sent,
//! so a stall is counted in every request it held up (no coordinated omission).
//!
//! With `--background-connections B`, B more connections send requests of
//! `--background-per-request` devices back to back for as long as the timed
//! requests last, reported apart: what large requests do to small ones behind them.

use crate::device_name;
use crate::stats::{
    Flags, Latencies, cpu_count, load_average, machine_busy, ms, process_cpu, process_tree_cpu,
};
use anyhow::{Context, Result, bail};
use clap::Args;
use lime_protocol::{Curve, DeviceId, Request, RequestMessage, Response};
use lime_server::client::LimeClient;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Barrier;

/// Options of `bundles`.
#[derive(Debug, Args)]
pub struct BundlesArgs {
    /// The server's X3DH URL, e.g. https://127.0.0.1:25519/ (http:// for a
    /// plain-HTTP listener). Several, comma-separated: the connections are spread
    /// over them in turn (instances of one service, e.g. on a Galera cluster).
    #[arg(long, value_delimiter = ',', required = true)]
    url: Vec<String>,
    /// PEM certificate to trust for https:// URLs, e.g.
    /// <data_dir>/tls/self-signed.crt.
    #[arg(long, value_name = "CERT")]
    ca: Option<PathBuf>,
    /// Base algorithm of the requests.
    #[arg(long, default_value = "c25519")]
    curve: Curve,
    /// Number of seeded devices to pick from (devices 0..N).
    #[arg(long, value_name = "N")]
    devices: u64,
    /// Devices asked for in each request (distinct, picked at random).
    #[arg(long, value_name = "K", default_value_t = 1)]
    per_request: u64,
    /// Concurrent connections, one task each.
    #[arg(long, value_name = "C", default_value_t = 1)]
    connections: usize,
    /// Timed requests in all (the per-connection warm-up requests not counted).
    #[arg(long, value_name = "R")]
    requests: u64,
    /// Send the timed requests at N a second in all, each connection at its own
    /// fixed interval, rather than back to back: the latency of a server that is
    /// not saturated, without the queueing of a closed loop.
    #[arg(long, value_name = "N")]
    rate: Option<f64>,
    /// The server's process id: report its CPU time per request.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Device id the requests are sent as.
    #[arg(
        long,
        default_value = "sip:load-client@example.org;gr=urn:uuid:00000000-0000-0000-0000-ffffffffffff"
    )]
    sender: String,
    /// Distinct senders, each a user of its own: connection `i` sends as sender
    /// `i % S` (`sip:load-client-<k>@example.org;gr=...`; 1: `--sender` alone).
    /// One identity's claims take turns on a database server (its row is locked
    /// for the bundle request limit): this tells that from what a claim costs.
    #[arg(long, value_name = "S", default_value_t = 1, conflicts_with = "digest")]
    senders: usize,
    /// Answer digest challenges as USER:PASSWORD (each connection reusing its
    /// nonce, every request sent with credentials).
    #[arg(long, value_name = "USER:PASSWORD")]
    digest: Option<String>,
    /// With --digest, send each request without credentials first and answer its
    /// 401, on the same connection, as Linphone does (it never reuses a nonce):
    /// each timed request is then a pair of HTTP requests.
    #[arg(long, requires = "digest")]
    challenged_each_time: bool,
    /// Process id of the database server (MariaDB's, or PostgreSQL's first
    /// process): its CPU time and its descendants' is reported per request, apart
    /// from other processes'.
    #[arg(long, value_name = "PID")]
    db_pid: Option<u32>,
    /// Connections that send requests of --background-per-request devices back to
    /// back while the timed requests run; reported apart, not counted in R.
    #[arg(long, value_name = "B", default_value_t = 0)]
    background_connections: usize,
    /// Devices asked for in each background request.
    #[arg(long, value_name = "K", default_value_t = 1000)]
    background_per_request: u64,
    /// A file whose size is sampled every 100 ms during the timed requests, e.g.
    /// the store's `-wal` file: its largest size and its size at the end are
    /// reported (absent counts as 0).
    #[arg(long, value_name = "FILE")]
    watch_size: Option<PathBuf>,
}

/// What one task measured.
struct TaskReport {
    latencies: Vec<Duration>,
    flags: Flags,
    errors: u64,
    first_error: Option<String>,
    /// Kept alive until the connections have been counted.
    client: LimeClient,
}

/// Runs the load and prints the figures.
pub fn run(args: &BundlesArgs) -> Result<()> {
    if args.connections == 0 || args.devices == 0 || args.requests == 0 || args.per_request == 0 {
        bail!("--connections, --devices, --per-request and --requests must be at least 1");
    }
    if args.per_request > args.devices
        || (args.background_connections > 0 && args.background_per_request > args.devices)
    {
        bail!(
            "--per-request or --background-per-request is more than --devices: the devices of a request are distinct"
        );
    }
    if args.senders == 0 {
        bail!("--senders must be at least 1");
    }
    if args
        .rate
        .is_some_and(|rate| !(rate.is_finite() && rate > 0.0))
    {
        bail!("--rate must be a number of requests a second above 0");
    }
    if args.background_connections > 0 && args.background_per_request == 0 {
        bail!("--background-per-request must be at least 1");
    }
    let ports = args
        .url
        .iter()
        .map(|url| url_port(url))
        .collect::<Result<Vec<_>>>()?;
    let clients = (0..args.connections + args.background_connections)
        .map(|index| client_for(in_turn::<String>(&args.url, index), args.ca.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    let clients = match &args.digest {
        None => clients,
        Some(login) => {
            let (user, password) = login
                .split_once(':')
                .context("--digest takes USER:PASSWORD")?;
            clients
                .iter()
                .map(|client| match args.challenged_each_time {
                    true => client.with_digest_challenged_each_time(user, password, None),
                    false => client.with_digest(user, password, None),
                })
                .collect()
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(load(args, clients, &ports))
}

/// What connection `index` uses of `items` (URLs, senders): each in turn.
fn in_turn<T>(items: &[T], index: usize) -> &T {
    &items[index % items.len()]
}

async fn load(args: &BundlesArgs, mut clients: Vec<LimeClient>, ports: &[u16]) -> Result<()> {
    let load_before = load_average();
    let shared = Arc::new(Shared {
        urls: args.url.clone(),
        senders: sender_ids(&args.sender, args.senders),
        curve: args.curve,
        devices: args.devices,
        requests: args.requests,
        interval: args
            .rate
            .map(|rate| Duration::from_secs_f64(args.connections as f64 / rate)),
        connections: args.connections,
        sent: AtomicU64::new(0),
        timed_done: AtomicBool::new(false),
        start: Barrier::new(clients.len() + 1),
    });
    register_senders(&shared, &clients).await?;
    let background_clients = clients.split_off(args.connections);
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(index, client)| {
            tokio::spawn(connection_task(
                shared.clone(),
                (client, index),
                Role::Timed(args.per_request),
            ))
        })
        .collect();
    let background_tasks: Vec<_> = background_clients
        .into_iter()
        .enumerate()
        .map(|(index, client)| {
            tokio::spawn(connection_task(
                shared.clone(),
                (client, args.connections + index),
                Role::Background(args.background_per_request),
            ))
        })
        .collect();

    // Every task has its connection up (or has failed) once this returns.
    shared.start.wait().await;
    let started = Instant::now();
    let watcher = args
        .watch_size
        .clone()
        .map(|file| tokio::spawn(watch_size(file, shared.clone())));
    let server_cpu_before = args
        .server_pid
        .map(|pid| process_cpu(Some(pid)))
        .transpose()?;
    let client_cpu_before = process_cpu(None)?;
    let db_cpu_before = args.db_pid.map(process_tree_cpu).transpose()?;
    let machine_before = machine_busy()?;

    let mut reports = Vec::with_capacity(tasks.len());
    for task in tasks {
        reports.push(task.await.context("a load task panicked")??);
    }
    let elapsed = started.elapsed();
    shared.timed_done.store(true, Ordering::Relaxed);
    let server_cpu = match (args.server_pid, server_cpu_before) {
        (Some(pid), Some(before)) => Some(process_cpu(Some(pid))? - before),
        _ => None,
    };
    let client_cpu = process_cpu(None)? - client_cpu_before;
    let db_cpu = match (args.db_pid, db_cpu_before) {
        (Some(pid), Some((before, _))) => {
            let (now, processes) = process_tree_cpu(pid)?;
            Some((now.saturating_sub(before), processes))
        }
        _ => None,
    };
    let machine = machine_busy()?.saturating_sub(machine_before);
    let watched = match watcher {
        Some(task) => Some(task.await.context("the file watcher panicked")?),
        None => None,
    };
    let mut background = Vec::with_capacity(background_tasks.len());
    for task in background_tasks {
        background.push(task.await.context("a background task panicked")??);
    }
    let open = ports
        .iter()
        .map(|port| count_connections(*port))
        .sum::<Result<usize>>()
        .map(|count| count.to_string())
        .unwrap_or_else(|error| format!("unknown ({error:#})"));

    let mut flags = Flags::default();
    let mut errors = 0;
    let mut first_error = None;
    let mut latencies = Vec::with_capacity(args.requests as usize);
    let mut clients = Vec::with_capacity(reports.len());
    for report in reports {
        flags.merge(report.flags);
        errors += report.errors;
        first_error = first_error.or(report.first_error);
        latencies.extend(report.latencies);
        clients.push(report.client);
    }
    drop(clients);
    let done = latencies.len() as u64;
    let latencies = Latencies::new(latencies)?;
    let background = Background::merge(background);
    let devices_asked =
        done * args.per_request + background.requests() * args.background_per_request;

    println!(
        "bundles: {done} requests of {} devices ({} {}) over {} connections ({open} open at the end) in {:.2} s; load average before: {load_before}",
        args.per_request,
        args.curve,
        args.url.join(","),
        args.connections,
        elapsed.as_secs_f64()
    );
    println!(
        "  rate: {:.0} requests/s{}",
        done as f64 / elapsed.as_secs_f64(),
        match args.rate {
            Some(rate) => format!(
                " (paced: {rate:.0} offered, latency counted from each request's scheduled time)"
            ),
            None => String::new(),
        }
    );
    println!(
        "  latency: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        ms(latencies.percentile(50.0)),
        ms(latencies.percentile(90.0)),
        ms(latencies.percentile(99.0)),
        ms(latencies.percentile(99.9)),
        ms(latencies.percentile(100.0))
    );
    println!("  bundles: {flags}; errors {errors}");
    if let (Some(pid), Some(cpu)) = (args.server_pid, server_cpu) {
        println!(
            "  server CPU: {:.3} ms/request (pid {pid}, {:.2} s in all)",
            ms(cpu) / done as f64,
            cpu.as_secs_f64()
        );
        if devices_asked != done {
            println!(
                "  server CPU per device asked: {:.4} ms ({devices_asked} devices, background included)",
                ms(cpu) / devices_asked as f64
            );
        }
    }
    if let (Some(pid), Some((cpu, processes))) = (args.db_pid, db_cpu) {
        println!(
            "  database CPU: {:.3} ms/request (pid {pid} and its children, {processes} processes, {:.2} s in all)",
            ms(cpu) / done as f64,
            cpu.as_secs_f64()
        );
    }
    println!(
        "  client CPU: {:.3} ms/request (this process, {:.2} s in all)",
        ms(client_cpu) / done as f64,
        client_cpu.as_secs_f64()
    );
    // What else ran meanwhile: the figures are only as good as this is small.
    let others = machine
        .saturating_sub(client_cpu)
        .saturating_sub(server_cpu.unwrap_or_default())
        .saturating_sub(db_cpu.map(|(cpu, _)| cpu).unwrap_or_default());
    println!(
        "  machine: {:.0}% of {} CPUs busy; other processes {:.2} s CPU{}",
        100.0 * machine.as_secs_f64() / (elapsed.as_secs_f64() * cpu_count() as f64),
        cpu_count(),
        others.as_secs_f64(),
        if server_cpu.is_none() {
            " (server included: no --server-pid)"
        } else {
            ""
        }
    );
    if let (Some(file), Some(largest)) = (&args.watch_size, watched) {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        println!(
            "  file size: largest {:.1} MiB during the run, {:.1} MiB at the end ({}, sampled every 100 ms)",
            mib(largest),
            mib(file_size(file)),
            file.display()
        );
    }
    if let Some(error) = first_error {
        println!("  first error: {error}");
    }
    let errors = errors + background.errors;
    if args.background_connections > 0 {
        background.print(args)?;
    }
    if errors > 0 {
        bail!("{errors} requests did not get a peerBundle answer");
    }
    Ok(())
}

/// The largest size `file` had, sampled every 100 ms until the timed requests
/// are done.
async fn watch_size(file: PathBuf, shared: Arc<Shared>) -> u64 {
    let mut largest = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !shared.timed_done.load(Ordering::Relaxed) {
        tick.tick().await;
        largest = largest.max(file_size(&file));
    }
    largest.max(file_size(&file))
}

/// The size of `file` in bytes; 0 when it does not exist (a WAL not created yet).
fn file_size(file: &std::path::Path) -> u64 {
    std::fs::metadata(file).map_or(0, |meta| meta.len())
}

/// What the background connections measured, all together.
struct Background {
    latencies: Vec<Duration>,
    flags: Flags,
    errors: u64,
    first_error: Option<String>,
}

impl Background {
    fn merge(reports: Vec<TaskReport>) -> Background {
        let mut merged = Background {
            latencies: Vec::new(),
            flags: Flags::default(),
            errors: 0,
            first_error: None,
        };
        for report in reports {
            merged.latencies.extend(report.latencies);
            merged.flags.merge(report.flags);
            merged.errors += report.errors;
            merged.first_error = merged.first_error.or(report.first_error);
        }
        merged
    }

    fn requests(&self) -> u64 {
        self.latencies.len() as u64
    }

    fn print(self, args: &BundlesArgs) -> Result<()> {
        let done = self.requests();
        println!(
            "  background: {done} requests of {} devices over {} connections, sent back to back during the timed requests",
            args.background_per_request, args.background_connections
        );
        if done == 0 {
            println!("  background latency: none completed");
        } else {
            let latencies = Latencies::new(self.latencies)?;
            println!(
                "  background latency: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                ms(latencies.percentile(50.0)),
                ms(latencies.percentile(99.0)),
                ms(latencies.percentile(100.0))
            );
        }
        println!(
            "  background bundles: {}; errors {}",
            self.flags, self.errors
        );
        if let Some(error) = self.first_error {
            println!("  background first error: {error}");
        }
        Ok(())
    }
}

/// What the tasks share.
struct Shared {
    /// Connection `i` sends to `urls[i % urls.len()]`.
    urls: Vec<String>,
    /// Connection `i` sends as `senders[i % senders.len()]`.
    senders: Vec<String>,
    curve: Curve,
    devices: u64,
    requests: u64,
    /// With `--rate`: the time between one connection's timed requests.
    interval: Option<Duration>,
    /// Timed connections (their starts are spread over one interval).
    connections: usize,
    /// Timed requests started so far, all tasks together.
    sent: AtomicU64,
    /// Set once every timed request is answered: the background tasks stop.
    timed_done: AtomicBool,
    /// Passed when every task has its connection up.
    start: Barrier,
}

/// What a connection sends: timed requests of K devices until R are sent in all,
/// or background requests of K devices until the timed ones are done.
#[derive(Clone, Copy)]
enum Role {
    Timed(u64),
    Background(u64),
}

/// One connection's loop: a warm-up request, the start barrier, then requests
/// until its [`Role`] says stop.
async fn connection_task(
    shared: Arc<Shared>,
    (client, index): (LimeClient, usize),
    role: Role,
) -> Result<TaskReport> {
    let url = in_turn(&shared.urls, index).to_owned();
    let sender = in_turn(&shared.senders, index).clone();
    let per_request = match role {
        Role::Timed(count) | Role::Background(count) => count,
    };
    let mut rng = StdRng::from_rng(&mut rand::rng());
    let warm_up = get_bundle(&shared, (&client, &url, &sender), per_request, &mut rng).await;
    // Wait even when the warm-up failed: the main task waits for everyone.
    shared.start.wait().await;
    warm_up.context("warm-up request (connection set-up) failed")?;

    let mut report = TaskReport {
        latencies: Vec::new(),
        flags: Flags::default(),
        errors: 0,
        first_error: None,
        client,
    };
    let more = || match role {
        Role::Timed(_) => shared.sent.fetch_add(1, Ordering::Relaxed) < shared.requests,
        Role::Background(_) => !shared.timed_done.load(Ordering::Relaxed),
    };
    let mut pace = match (role, shared.interval) {
        (Role::Timed(_), Some(interval)) => Some(Pace::new(interval, index, shared.connections)),
        _ => None,
    };
    while more() {
        let sent = match &mut pace {
            Some(pace) => pace.next_send().await,
            None => Instant::now(),
        };
        let answer = get_bundle(
            &shared,
            (&report.client, &url, &sender),
            per_request,
            &mut rng,
        )
        .await;
        report.latencies.push(sent.elapsed());
        match answer {
            Ok(flags) => flags.into_iter().for_each(|flag| report.flags.add(flag)),
            Err(error) => {
                report.errors += 1;
                report
                    .first_error
                    .get_or_insert_with(|| format!("{error:#}"));
            }
        }
    }
    Ok(report)
}

/// One paced connection's schedule (`--rate`).
struct Pace {
    interval: Duration,
    /// When the next request is due.
    due: Instant,
}

impl Pace {
    /// Connection `index` of `connections`, its first request due a share of one
    /// interval from now, so that the connections do not send all at once.
    fn new(interval: Duration, index: usize, connections: usize) -> Pace {
        let offset = interval.mul_f64(index as f64 / connections as f64);
        Pace {
            interval,
            due: Instant::now() + offset,
        }
    }

    /// Waits until the next request is due; what its latency counts from. When
    /// it is already due (the answer before it came late), that is when it was
    /// due: the time it waited on its connection is the server's. Otherwise it
    /// is now, after the wait: the timer's own lateness is the client's.
    async fn next_send(&mut self) -> Instant {
        let due = self.due;
        self.due += self.interval;
        if Instant::now() >= due {
            return due;
        }
        tokio::time::sleep_until(due.into()).await;
        Instant::now()
    }
}

/// Sends one getPeerBundle for `per_request` distinct random seeded devices; the
/// flags of the bundles, or why the answer is not their peerBundle.
async fn get_bundle(
    shared: &Shared,
    (client, url, sender): (&LimeClient, &str, &str),
    per_request: u64,
    rng: &mut StdRng,
) -> Result<Vec<u8>> {
    // Distinct indexes without rejection: a request may ask for most of the devices.
    let devices = rand::seq::index::sample(rng, shared.devices as usize, per_request as usize)
        .into_iter()
        .map(|index| DeviceId::new(device_name(index as u64)))
        .collect::<Result<Vec<_>, _>>()?;
    let asked = devices.len();
    let message = RequestMessage {
        curve: shared.curve,
        request: Request::GetPeerBundle(devices),
    };
    let answer = client.send(url, sender, &message).await?;
    match answer.response {
        Response::PeerBundles(bundles) if bundles.len() == asked => {
            Ok(bundles.iter().map(|bundle| bundle.flag()).collect())
        }
        Response::PeerBundles(bundles) => {
            bail!("peerBundle with {} entries, not {asked}", bundles.len())
        }
        other => bail!("answer is not a peerBundle: {other:?}"),
    }
}

/// A client of its own connection pool for `url`: trusting `ca`, which an
/// https:// URL needs, or plain HTTP.
pub fn client_for(url: &str, ca: Option<&std::path::Path>) -> Result<LimeClient> {
    match (ca, url.starts_with("https://")) {
        (Some(ca), _) => LimeClient::trusting(ca),
        (None, false) => LimeClient::plain(),
        (None, true) => bail!("an https:// URL needs --ca <certificate to trust>"),
    }
}

/// The port of `url` (explicit, or 443 / 80 by scheme).
pub fn url_port(url: &str) -> Result<u16> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("{url}: not an http:// or https:// URL"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rsplit_once(':') {
        Some((_, port)) if !port.ends_with(']') => port
            .parse()
            .with_context(|| format!("{url}: bad port {port:?}")),
        _ => match scheme {
            "https" => Ok(443),
            "http" => Ok(80),
            _ => bail!("{url}: not an http:// or https:// URL"),
        },
    }
}

/// Established TCP connections this process holds to remote port `port`: its
/// socket inodes (`/proc/self/fd`) matched against `/proc/self/net/tcp{,6}`.
pub fn count_connections(port: u16) -> Result<usize> {
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd").context("cannot list /proc/self/fd")? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue; // closed meanwhile
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let wanted_port = format!("{port:04X}");
    let mut count = 0;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text =
            std::fs::read_to_string(table).with_context(|| format!("cannot read {table}"))?;
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) =
                (fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let established = *state == "01";
            let to_port = remote.rsplit(':').next() == Some(wanted_port.as_str());
            if established && to_port && inodes.contains(*inode) {
                count += 1;
            }
        }
    }
    Ok(count)
}

/// Registers the senders (a bundle's source must be a registered device); one
/// registered by an earlier run is left as it is.
async fn register_senders(shared: &Shared, clients: &[LimeClient]) -> Result<()> {
    let client = clients.first().context("no connection")?;
    for sender in &shared.senders {
        register_device(client, &shared.urls[0], sender, shared.curve).await?;
    }
    Ok(())
}

/// The device ids of `count` senders: `sender` alone for 1, else one user each.
fn sender_ids(sender: &str, count: usize) -> Vec<String> {
    if count == 1 {
        return vec![sender.to_owned()];
    }
    (0..count)
        .map(|k| {
            format!("sip:load-client-{k}@example.org;gr=urn:uuid:00000000-0000-0000-0000-{k:012x}")
        })
        .collect()
}

/// Registers `device` with no OPks at `url`; one already registered is left as it is.
pub async fn register_device(
    client: &LimeClient,
    url: &str,
    device: &str,
    curve: Curve,
) -> Result<()> {
    let registration =
        crate::server_db::random_registration(curve, 0, &mut StdRng::from_rng(&mut rand::rng()))?;
    let message = RequestMessage {
        curve,
        request: Request::RegisterUser(registration),
    };
    match client.send(url, device, &message).await?.response {
        Response::Done(_) => Ok(()),
        Response::Error(error) if error.code == lime_protocol::ErrorCode::UserAlreadyIn => Ok(()),
        other => bail!("registering {device}: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::{Pace, url_port};
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn a_paced_request_held_up_by_the_one_before_counts_from_when_it_was_due() {
        let interval = Duration::from_millis(10);
        let due = Instant::now() - Duration::from_secs(1);
        let mut pace = Pace { interval, due };
        assert_eq!(pace.next_send().await, due);
        assert_eq!(pace.next_send().await, due + interval);
    }

    #[tokio::test]
    async fn a_paced_request_not_yet_due_waits_and_counts_from_when_it_is_sent() {
        let interval = Duration::from_millis(10);
        // Connection 1 of 2: due half an interval after it is made.
        let first_due = Instant::now() + interval / 2;
        let mut pace = Pace::new(interval, 1, 2);
        let sent = pace.next_send().await;
        assert!(sent >= first_due, "counted from before it was due");
        assert!(Instant::now() >= first_due, "did not wait until it was due");
        assert!(
            pace.due >= first_due + interval,
            "the next one is due an interval later"
        );
    }

    #[test]
    fn ports_of_urls() {
        assert_eq!(url_port("https://127.0.0.1:25519/").unwrap(), 25519);
        assert_eq!(url_port("http://localhost:8080").unwrap(), 8080);
        assert_eq!(url_port("https://[::1]:9000/x").unwrap(), 9000);
        assert_eq!(url_port("https://example.org/").unwrap(), 443);
        assert_eq!(url_port("http://[::1]/").unwrap(), 80);
        assert!(url_port("example.org").is_err());
    }
}
