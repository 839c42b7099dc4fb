//! `idle`: what idle keep-alive connections cost the server in memory.
//!
//! Reads the server's resident memory, opens N connections (each its own
//! [`LimeClient`], so its own TCP and TLS session), sends one getPeerBundle on
//! each so that TLS and HTTP are set up as a real client's, holds them all open
//! and idle, and reads the resident memory again. The server's
//! `server.idle_timeout_ms` must be longer than the set-up and the hold, and its
//! `server.max_connections` at least N; this process needs N open files.

use crate::bundles::{client_for, count_connections, register_device, url_port};
use crate::stats::process_rss_kib;
use anyhow::{Context, Result, bail};
use clap::Args;
use lime_protocol::{Curve, DeviceId, Request, RequestMessage};
use lime_server::client::LimeClient;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Options of `idle`.
#[derive(Debug, Args)]
pub struct IdleArgs {
    /// The server's X3DH URL, e.g. https://127.0.0.1:25519/.
    #[arg(long)]
    url: String,
    /// PEM certificate to trust for https:// URLs.
    #[arg(long, value_name = "CERT")]
    ca: Option<PathBuf>,
    /// Base algorithm of the one request sent on each connection.
    #[arg(long, default_value = "c25519")]
    curve: Curve,
    /// Idle connections to open and hold.
    #[arg(long, value_name = "N")]
    connections: usize,
    /// How long to hold them once all are open, in seconds (less than the server's
    /// idle time-out, and than this client's 90 s pool time-out).
    #[arg(long, value_name = "S", default_value_t = 10)]
    hold_secs: u64,
    /// Connections set up at once.
    #[arg(long, value_name = "P", default_value_t = 64)]
    parallel: usize,
    /// The server's process id, whose VmRSS is read.
    #[arg(long, value_name = "PID")]
    server_pid: u32,
    /// Device id the requests are sent as (registered first).
    #[arg(
        long,
        default_value = "sip:load-idle@example.org;gr=urn:uuid:00000000-0000-0000-0000-ffffffffffff"
    )]
    sender: String,
}

/// Opens the connections, holds them, prints the server's memory.
pub fn run(args: &IdleArgs) -> Result<()> {
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let port = url_port(&args.url)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let rss_before = process_rss_kib(args.server_pid)?;
    let clients = (0..args.connections.max(1))
        .map(|_| client_for(&args.url, args.ca.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    runtime.block_on(async {
        // The registration's own connection is the first client's, counted below.
        register_device(&clients[0], &args.url, &args.sender, args.curve).await?;
        // With 0 connections, the registration's is closed too.
        let clients = if args.connections == 0 {
            drop(clients);
            Vec::new()
        } else {
            clients
        };
        let started = Instant::now();
        let clients = set_up(args, clients).await?;
        let set_up_time = started.elapsed();
        let rss_open = process_rss_kib(args.server_pid)?;
        tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
        let rss_held = process_rss_kib(args.server_pid)?;
        let open = count_connections(port)
            .map(|count| count.to_string())
            .unwrap_or_else(|error| format!("unknown ({error:#})"));
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "idle: {} connections to {} set up in {:.2} s ({} at once), held {} s; {open} open at the end",
            args.connections,
            args.url,
            set_up_time.as_secs_f64(),
            args.parallel,
            args.hold_secs
        );
        println!(
            "  server RSS: {:.1} MiB before any connection, {:.1} MiB with {} just set up, {:.1} MiB after {} s idle",
            mib(rss_before),
            mib(rss_open),
            args.connections,
            mib(rss_held),
            args.hold_secs
        );
        if args.connections > 0 {
            println!(
                "  per idle connection: {:.1} KiB (after the hold, against before any connection)",
                rss_held.saturating_sub(rss_before) as f64 / args.connections as f64
            );
        }
        drop(clients);
        Ok(())
    })
}

/// Sends one request on each client, `--parallel` at a time; the clients back,
/// each holding its connection.
async fn set_up(args: &IdleArgs, clients: Vec<LimeClient>) -> Result<Vec<LimeClient>> {
    let permits = Arc::new(Semaphore::new(args.parallel));
    // A device nobody registered: the answer is a peerBundle "no bundle", which
    // claims nothing, after the whole request path (and its database look-up).
    let message = Arc::new(RequestMessage {
        curve: args.curve,
        request: Request::GetPeerBundle(vec![DeviceId::new(
            "sip:load-idle-nobody@example.org;gr=urn:uuid:0",
        )?]),
    });
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let permits = permits.clone();
            let message = message.clone();
            let url = args.url.clone();
            let sender = args.sender.clone();
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await?;
                client
                    .send(&url, &sender, &message)
                    .await
                    .context("the request that sets a connection up failed")?;
                anyhow::Ok(client)
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(tasks.len());
    for task in tasks {
        clients.push(task.await.context("a set-up task panicked")??);
    }
    Ok(clients)
}
