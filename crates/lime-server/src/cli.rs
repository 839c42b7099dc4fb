//! The command line: `serve`, `db ...`, `admin ...`, `probe`, `check-config`.

use crate::admin;
use crate::client::LimeClient;
use crate::config::Settings;
use crate::probe::Probe;
use crate::reload::Reload;
use crate::startup::{self, Application};
use crate::store::{self, SCHEMA_VERSION, SchemaState};
use crate::telemetry::Reopener;
use crate::{systemd, telemetry, tls};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use lime_protocol::Curve;
use std::net::SocketAddr;
use std::path::PathBuf;

/// LIME X3DH key server: the public-key directory behind Linphone's end-to-end
/// encrypted messaging.
#[derive(Debug, Parser)]
#[command(name = "lime-server", version, about, long_about = None)]
pub struct Cli {
    /// Config file (TOML). Default: /etc/lime-server/lime-server.toml when present,
    /// else built-in defaults (loopback, SQLite in ./lime-data, all five curves).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the key server.
    Serve(ServeArgs),
    /// Database management.
    #[command(subcommand)]
    Db(DbCommand),
    /// Load and check the config, print what it means, and exit.
    CheckConfig,
    /// Support tasks on the stores, and counting what they hold (beside running
    /// servers).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Smoke-test a deployed server from outside: register a throw-away device,
    /// upload one-time keys, fetch its bundle from a second throw-away device,
    /// delete both; each step with its latency. Exit status 0 when every step
    /// passed, 1 otherwise (the failing step named).
    Probe(ProbeArgs),
}

/// Options of `probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The server's X3DH URL, as in Linphone's lime_server_url
    /// (e.g. https://lime.example.org:25519/).
    pub url: String,
    /// The SIP identity user@domain whose throw-away devices are made; with
    /// --password-file, USER is the digest user name.
    #[arg(long, value_name = "USER@DOMAIN")]
    pub user: String,
    /// A file holding the digest password of --user (its first line).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["cert", "key"])]
    pub password_file: Option<PathBuf>,
    /// A PEM client certificate naming --user (with --key).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The PEM private key of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Trust the server certificate(s) of this PEM file (a CA, or a self-signed
    /// certificate as it is) instead of the system's CAs.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// The base algorithm of the throw-away devices.
    #[arg(long, value_name = "CURVE", default_value = "c25519")]
    pub curve: Curve,
}

/// `admin` sub-commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// One device, on every enabled curve.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Per curve: devices, one-time pre-keys stored and how many devices hold 0,
    /// 1-9, 10-99 or 100+ of them (and fewer than metrics.low_stock_threshold),
    /// recorded bundle requests (table Requests), schema version. Read-only; safe
    /// while servers run.
    Stats(StatsArgs),
}

/// `admin device` sub-commands.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// What the stores know about a device: the curves it is registered on, its
    /// signed pre-key id, its one-time pre-keys left, and the latest bundle
    /// requests it made and received. Exit status 1 when it is registered nowhere.
    Show(DeviceShowArgs),
    /// Delete a device and its keys from every curve it is registered on (its
    /// client registers again when it next starts). Asks first unless --yes.
    Delete(DeviceDeleteArgs),
}

/// Options of `admin device show`.
#[derive(Debug, Args)]
pub struct DeviceShowArgs {
    /// The device id, e.g. "sip:alice@example.org;gr=urn:uuid:..." (quote it).
    pub device: String,
    /// How many of the latest bundle requests to show each way.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub recent: u32,
    #[command(flatten)]
    pub databases: DbArgs,
}

/// Options of `admin device delete`.
#[derive(Debug, Args)]
pub struct DeviceDeleteArgs {
    /// The device id, e.g. "sip:alice@example.org;gr=urn:uuid:..." (quote it).
    pub device: String,
    /// Delete without asking.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub databases: DbArgs,
}

/// Options of `serve`; each overrides its config key.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:25519 (repeatable; replaces server.listen).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,
    /// Data directory: SQLite databases and self-signed certificate (storage.data_dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve plain HTTP instead of HTTPS on every listener (behind a reverse proxy,
    /// or for local tests).
    #[arg(long)]
    pub plain_http: bool,
    /// Allow non-loopback listeners with authentication off (server.insecure_no_auth).
    #[arg(long)]
    pub insecure_no_auth: bool,
    #[command(flatten)]
    pub store: StoreArg,
}

/// `--store URL`, shared by `serve` and the `db` commands.
#[derive(Debug, Args)]
pub struct StoreArg {
    /// Database of every enabled curve, a URL in which {curve} is replaced by the
    /// curve's name (sqlite://PATH, mysql://USER@HOST/lime_{curve},
    /// postgres://USER@HOST/lime_{curve}); replaces storage.url and storage.urls.
    /// Give the password with storage.password_file or storage.password_env, not here.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
}

impl StoreArg {
    fn apply(self, settings: &mut Settings) {
        if let Some(url) = self.store {
            settings.storage.url = Some(url);
            settings.storage.urls.clear();
        }
    }
}

/// `db` sub-commands.
#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Create a base algorithm's database schema; does nothing to one that exists
    /// (the counterpart of the original's `lime-createBase.php --curve`).
    Init(DbArgs),
    /// Bring existing databases to this server's schema version. Only adds
    /// (indexes, constraints, rows in Config): the PHP server keeps working on them.
    Migrate(DbArgs),
    /// Delete the recorded bundle requests (table Requests) older than the
    /// retention (limits.request_retention_secs), as the server does every
    /// limits.request_purge_interval_secs. Safe while servers run.
    PurgeRequests(PurgeArgs),
}

/// Options of `admin stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// One JSON object on standard output, for scripts, instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub databases: DbArgs,
}

/// Options of `db purge-requests`.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Keep the requests younger than this many seconds instead of
    /// limits.request_retention_secs.
    #[arg(long, value_name = "SECONDS")]
    pub retention_secs: Option<u64>,
    #[command(flatten)]
    pub databases: DbArgs,
}

/// Which databases a `db` command works on.
#[derive(Debug, Args)]
pub struct DbArgs {
    /// c25519, c448, c25519k512, c25519mlk512 or c448mlk1024 (repeatable;
    /// default: every curve enabled in the config).
    #[arg(long, value_name = "CURVE")]
    pub curve: Vec<Curve>,
    /// Data directory of the SQLite databases (storage.data_dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArg,
}

impl DbArgs {
    /// Applies the options to `settings`, validates them, and narrows the enabled
    /// curves to `--curve`'s, if given; returns the curves worked on.
    fn apply(&self, settings: &mut Settings) -> Result<Vec<Curve>> {
        if let Some(dir) = &self.data_dir {
            settings.storage.data_dir = dir.clone();
        }
        if let Some(url) = &self.store.store {
            settings.storage.url = Some(url.clone());
            settings.storage.urls.clear();
        }
        settings.validate()?;
        if !self.curve.is_empty() {
            settings.storage.curves = self.curve.iter().map(|c| c.name().to_owned()).collect();
        }
        Ok(settings.storage.enabled_curves())
    }
}

/// A single-threaded runtime, for the commands that are not `serve`.
fn current_thread_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let (mut settings, source) = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve(args) => {
            apply_serve_overrides(&mut settings, args);
            settings.validate()?;
            let log = telemetry::init(&settings.log)?;
            let reopener = settings.log.file.is_some().then(|| log.reopener());
            serve(settings, source, reopener)
        }
        Command::Db(command) => {
            let (DbCommand::Init(args)
            | DbCommand::Migrate(args)
            | DbCommand::PurgeRequests(PurgeArgs {
                databases: args, ..
            })) = &command;
            let curves = args.apply(&mut settings)?;
            match &command {
                DbCommand::PurgeRequests(purge) => {
                    let retention = purge
                        .retention_secs
                        .unwrap_or(settings.limits.request_retention_secs);
                    purge_requests(&settings, std::time::Duration::from_secs(retention))
                }
                _ => db(&settings, &curves, matches!(command, DbCommand::Migrate(_))),
            }
        }
        Command::Admin(AdminCommand::Stats(args)) => {
            args.databases.apply(&mut settings)?;
            current_thread_runtime()?.block_on(admin::stats(&settings, args.json))
        }
        Command::Admin(AdminCommand::Device(command)) => {
            let args = match &command {
                DeviceCommand::Show(show) => &show.databases,
                DeviceCommand::Delete(delete) => &delete.databases,
            };
            args.apply(&mut settings)?;
            current_thread_runtime()?.block_on(async {
                match &command {
                    DeviceCommand::Show(show) => {
                        admin::device_show(&settings, &show.device, show.recent).await
                    }
                    DeviceCommand::Delete(delete) => {
                        admin::device_delete(&settings, &delete.device, delete.yes).await
                    }
                }
            })
        }
        Command::Probe(args) => current_thread_runtime()?.block_on(probe(args)),
        Command::CheckConfig => {
            settings.validate()?;
            print_summary(&settings, source);
            Ok(())
        }
    }
}

fn apply_serve_overrides(settings: &mut Settings, args: ServeArgs) {
    if !args.listen.is_empty() {
        settings.server.listen = args.listen;
        settings.server.plain_http_listen.clear();
    }
    if args.plain_http {
        let tls_listeners = std::mem::take(&mut settings.server.listen);
        settings.server.plain_http_listen.extend(tls_listeners);
    }
    if let Some(dir) = args.data_dir {
        settings.storage.data_dir = dir;
    }
    if args.insecure_no_auth {
        settings.server.insecure_no_auth = true;
    }
    args.store.apply(settings);
}

fn serve(settings: Settings, source: Option<PathBuf>, log: Option<Reopener>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match &source {
            Some(path) => tracing::info!(config = %path.display(), "config loaded"),
            None => {
                tracing::info!("no config file: built-in defaults (see lime-server.example.toml)")
            }
        }
        if !settings.auth.is_enabled() {
            tracing::warn!(
                "authentication is OFF: any client can publish, replace or delete the keys of any \
                 device id it names. Use only on loopback, for tests, or behind a proxy that \
                 authenticates"
            );
        }
        let app = Application::build(&settings).await?;
        // SIGHUP reloads from now on (before READY: systemctl reload may follow at once).
        #[cfg(unix)]
        let reloads = Reload {
            tls: app.tls(),
            log,
        }
        .on_hangup()
        .context("cannot handle SIGHUP")?;
        // Listeners bound, stores open: a Type=notify unit counts as started now.
        systemd::notify_ready();
        let served = app
            .run_until(async {
                shutdown_signal().await;
                systemd::notify_stopping();
            })
            .await;
        #[cfg(unix)]
        reloads.abort();
        served
    })
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

/// `probe`: builds the client the options describe, then runs the probe.
async fn probe(args: ProbeArgs) -> Result<()> {
    let identity = match args.user.strip_prefix("sip:") {
        Some(rest) => format!("sip:{rest}"),
        None => format!("sip:{}", args.user),
    };
    let Some((username, _domain)) = identity["sip:".len()..].split_once('@') else {
        anyhow::bail!("--user {:?}: expected user@domain", args.user);
    };
    let roots = match &args.ca {
        Some(ca) => tls::read_trust_anchors(ca)?,
        None => tls::system_roots().context("give the server's CA with --ca")?,
    };
    let client = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => LimeClient::with_client_certificate_trusting(roots, cert, key)?,
        _ => LimeClient::trusting_roots(roots)?,
    };
    let client = match &args.password_file {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("--password-file: cannot read {}", file.display()))?;
            let password = text.lines().next().unwrap_or_default();
            client.with_digest(username, password, None)
        }
        None => client,
    };
    Probe {
        url: args.url,
        identity,
        curve: args.curve,
        client,
    }
    .run()
    .await
}

/// `db purge-requests`: deletes old bundle requests in every enabled store.
fn purge_requests(settings: &Settings, retention: std::time::Duration) -> Result<()> {
    current_thread_runtime()?.block_on(async {
        let stores = startup::open_stores(settings).await?;
        let mut failed = false;
        for (curve, result) in startup::purge_requests(&stores, retention).await {
            match result {
                Ok(rows) => println!(
                    "{curve}: {rows} bundle requests older than {}s deleted",
                    retention.as_secs()
                ),
                Err(error) => {
                    eprintln!("{curve}: {error}");
                    failed = true;
                }
            }
        }
        anyhow::ensure!(!failed, "some stores were not purged");
        Ok(())
    })
}

/// `db init` (or `db migrate` when `migrate`) on the databases of `curves`.
fn db(settings: &Settings, curves: &[Curve], migrate: bool) -> Result<()> {
    current_thread_runtime()?.block_on(async {
        for curve in curves {
            let location = settings.storage.location_with_password(*curve)?;
            let shown = settings.storage.location(*curve)?;
            if migrate {
                let migration = store::migrate(&location).await?;
                if migration.applied.is_empty() {
                    println!("{curve}: {shown} already at schema version {SCHEMA_VERSION}");
                }
                for step in &migration.applied {
                    println!("{curve}: {shown} added {step}");
                }
            } else {
                let what = match store::init(&location).await? {
                    SchemaState::Created => "created",
                    SchemaState::Present => "already present, left as it is",
                };
                println!("{curve}: {shown} {what}");
            }
        }
        Ok(())
    })
}

fn print_summary(settings: &Settings, source: Option<PathBuf>) {
    match source {
        Some(path) => println!("config file: {}", path.display()),
        None => println!("config file: none, built-in defaults"),
    }
    for addr in &settings.server.listen {
        println!("listen: https://{addr}");
    }
    for addr in &settings.server.plain_http_listen {
        println!("listen: http://{addr} (plain HTTP)");
    }
    println!("paths: {}", settings.server.paths.join(", "));
    match settings.metrics.listen {
        Some(addr) => println!(
            "metrics: http://{addr}/metrics (no authentication), stock counted every {}s",
            settings.metrics.stock_refresh_secs
        ),
        None => println!("metrics: off"),
    }
    match &settings.tls.certificate {
        Some(path) => println!("TLS certificate: {}", path.display()),
        None => println!(
            "TLS certificate: self-signed, in {}",
            settings.storage.data_dir.join("tls").display()
        ),
    }
    for curve in settings.storage.enabled_curves() {
        println!(
            "{curve}: sqlite {}",
            settings.storage.sqlite_path(curve).display()
        );
    }
    let auth = &settings.auth;
    if !auth.is_enabled() {
        println!("authentication: OFF (loopback, or behind a proxy that authenticates)");
    }
    if let Some(url) = &auth.digest.accounts_url {
        println!(
            "authentication: digest ({}), accounts in {}, realm {}",
            auth.digest.algorithms.join(", "),
            store::location::redact(url),
            auth.realm
                .as_deref()
                .unwrap_or("= the domain of each device id")
        );
    }
    if let Some(ca) = &auth.client_certificates.ca_file {
        let required = if auth.client_certificates.required {
            "required"
        } else {
            "optional"
        };
        println!(
            "authentication: client certificates ({required}), CA {}",
            ca.display()
        );
    }
    if auth.proxy.is_enabled() {
        println!(
            "authentication: certificates verified by the proxies {}",
            auth.proxy.trusted.join(", ")
        );
    }
    println!("config is valid");
}
