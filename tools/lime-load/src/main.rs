//! lime-load: the benchmark tooling of lime-server.
//!
//! - `seed`: fills a curve's SQLite store directly with synthetic devices and
//!   one-time pre-keys (the server's own schema, plain SQL in large transactions).
//! - `bundles`: getPeerBundle load against a running server over HTTP(S), from C
//!   concurrent keep-alive connections; requests/s, latency, server CPU per request.
//! - `raw-claims`: the server's claim transaction in a tight loop directly on the
//!   database file (server stopped): the reference ("raw") rate.
//! - `seed-db`, `raw-db-claims`, `register`: the same for MariaDB/PostgreSQL stores,
//!   and registerUser load (`server_db.rs`).
//! - `idle`: the server's resident memory with N idle keep-alive connections.
//!
//! The subcommands agree on device names ([`device_name`]), so `bundles` and `raw-claims`
//! ask for devices that `seed` created. `docs/benchmarks.md` has the procedure.

mod bundles;
mod idle;
mod raw;
mod seed;
mod server_db;
mod stats;

use clap::{Parser, Subcommand};
use lime_protocol::Curve;
use std::path::{Path, PathBuf};

/// Load generator and raw-database reference for lime-server benchmarks.
#[derive(Debug, Parser)]
#[command(name = "lime-load", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fill a curve's SQLite store with synthetic devices and one-time pre-keys.
    Seed(seed::SeedArgs),
    /// getPeerBundle load against a running server.
    Bundles(bundles::BundlesArgs),
    /// The claim transaction in a tight loop on the database file (server stopped).
    RawClaims(raw::RawArgs),
    /// Fill a MariaDB/PostgreSQL store through the KeyStore API.
    SeedDb(server_db::SeedDbArgs),
    /// The store's claim transaction in a loop on a database server, C tasks.
    RawDbClaims(server_db::RawDbArgs),
    /// registerUser (K OPks each) load against a running server.
    Register(server_db::RegisterArgs),
    /// The server's memory with N idle keep-alive connections open.
    Idle(idle::IdleArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Seed(args) => seed::run(&args),
        Command::Bundles(args) => bundles::run(&args),
        Command::RawClaims(args) => raw::run(&args),
        Command::SeedDb(args) => server_db::seed(&args),
        Command::RawDbClaims(args) => server_db::raw_claims(&args),
        Command::Register(args) => server_db::register(&args),
        Command::Idle(args) => idle::run(&args),
    }
}

/// The device id of seeded device `index`: `sip:load-{index}@example.org;gr=...`.
/// Deterministic, so every subcommand names the same devices.
pub fn device_name(index: u64) -> String {
    format!("sip:load-{index}@example.org;gr=urn:uuid:00000000-0000-0000-0000-{index:012}")
}

/// The device that asks for bundles in the store-level runs (the server-level runs
/// send their own `--sender`).
pub fn asker() -> lime_protocol::DeviceId {
    lime_protocol::DeviceId::new("sip:load-asker@example.org;gr=urn:uuid:0").expect("a device id")
}

/// The SQLite file of `curve` in the server's data directory (the server's own
/// naming: `lime-<curve>.sqlite3`).
pub fn sqlite_path(data_dir: &Path, curve: Curve) -> PathBuf {
    data_dir.join(format!("lime-{}.sqlite3", curve.name()))
}
