//! The embedded SQLite store: one database file per base algorithm.
//!
//! SQLite has one writer at a time, so each store owns one connection on a
//! dedicated thread and feeds it jobs through a channel (`writer.rs`: group
//! commit, each job in a savepoint, long claims in steps). One-time pre-keys are
//! claimed by that single writer, so a claim is atomic; `BEGIN IMMEDIATE` keeps it
//! so even if another process opens the same file. WAL checkpoints run on a thread
//! of their own beside the writer (`checkpoint.rs`). The bundle request limit is
//! counted in memory by the writer (`request_counts.rs`), so a server that serves
//! a file with the limit on locks it (`FILE.lock`): a second server on the same
//! file would count apart, and is refused at start.

mod checkpoint;
mod claim;
mod queries;
mod request_counts;
pub mod schema;
#[cfg(target_os = "linux")]
mod writeback;
mod writer;

pub use checkpoint::MAX_WAL_FRAMES;
pub use claim::{CLAIM_STEP_DEVICES, CLAIM_STEP_DEVICES_ALONE};

use crate::store::{
    Claimed, DeviceReport, KeyStore, Migration, Registered, SchemaState, SourceCheck, StoreError,
    StoreLimits, StoreStats, purge_in_chunks,
};
use async_trait::async_trait;
use checkpoint::Checkpointer;
use claim::{BundleClaim, SharedCounts};
use lime_protocol::{Curve, DeviceId, OneTimePreKey, PeerBundle, Registration, SignedPreKey};
use request_counts::RequestCounts;
use rusqlite::Connection;
use serde::Deserialize;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use writer::{Job, OneStep, PendingJob, Work};

/// How hard SQLite works to keep a commit through a power cut
/// (`PRAGMA synchronous`). With `normal`, a power cut (not a crash) may undo the
/// last commits, and so hand out again one-time pre-keys already served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync at every commit: nothing committed is lost. The default.
    #[default]
    Full,
    /// fsync at checkpoints only: faster, may lose the last commits on power loss.
    Normal,
}

impl Synchronous {
    /// The value of `PRAGMA synchronous`.
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

/// How a SQLite store is opened and run.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The database file.
    pub path: PathBuf,
    /// `PRAGMA synchronous`.
    pub synchronous: Synchronous,
    /// Most jobs run in one transaction.
    pub max_batch: usize,
    /// A job not started within this time is answered with a time-out, undone.
    pub timeout: Duration,
    /// Limits enforced inside transactions.
    pub limits: StoreLimits,
    /// True for `serve`: with the bundle request limit on, the file is locked
    /// against a second server (whose counts would be apart). Commands that
    /// never claim (admin, purge) leave it false, to run beside the server.
    pub serves: bool,
}

/// A base algorithm's keys in one SQLite file, served by one writer thread.
pub struct SqliteStore {
    curve: Curve,
    limits: StoreLimits,
    /// How long a job may wait for the writer before it is answered with a time-out.
    timeout: Duration,
    /// Jobs for the writer thread; closing it stops the thread.
    jobs: mpsc::Sender<Box<dyn Job>>,
    /// The bundle request limit's counts, when it is on.
    counts: Option<SharedCounts>,
    /// Held while the store serves (see [`SqliteOptions::serves`]).
    _lock: Option<File>,
}

impl SqliteStore {
    /// Opens (creating it when absent) the database, checks its schema and starts
    /// its writer thread.
    pub fn open(curve: Curve, options: &SqliteOptions) -> Result<SqliteStore, OpenError> {
        let fail = |error| OpenError::Sqlite(options.path.clone(), error);
        let (conn, _) = open_connection(&options.path, options.synchronous)?;
        let (counts, lock) = match &options.limits.bundle_requests {
            Some(limit) => {
                let lock = match options.serves {
                    true => Some(lock_for_serving(&options.path)?),
                    false => None,
                };
                let counts = RequestCounts::load(&conn, limit.window)
                    .map_err(|error| OpenError::Counts(options.path.clone(), error))?;
                tracing::debug!(%curve, bundles = counts.len(), "SQLite: bundle requests of the last window counted");
                (Some(Arc::new(Mutex::new(counts))), lock)
            }
            None => (None, None),
        };
        // Waiting for another process's lock counts against the jobs' time-out.
        conn.busy_timeout(options.timeout).map_err(fail)?;
        let checkpoints =
            checkpoint::connect(&options.path, options.synchronous.pragma()).map_err(fail)?;
        let checkpointer = Checkpointer::start(checkpoints, format!("sqlite-ckpt-{curve}"))
            .map_err(|error| OpenError::Thread(error.to_string()))?;
        let (jobs, queue) = mpsc::channel(4096);
        let max_batch = options.max_batch.max(1);
        std::thread::Builder::new()
            .name(format!("sqlite-{curve}"))
            .spawn(move || {
                // The WAL hook records on the writer's own thread.
                if let Err(error) = checkpoint::prepare_writer(&conn) {
                    tracing::error!(%error, "SQLite: cannot turn off automatic checkpoints");
                }
                writer::run_writer(conn, queue, max_batch, checkpointer)
            })
            .map_err(|error| OpenError::Thread(error.to_string()))?;
        Ok(SqliteStore {
            curve,
            limits: options.limits,
            timeout: options.timeout,
            jobs,
            counts,
            _lock: lock,
        })
    }

    /// Runs `work` on the writer thread, inside a transaction, and waits for the
    /// commit. The writer does not start the work past the time-out; once started,
    /// it is waited for, so that its answer is never lost.
    async fn execute<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.execute_in_steps(OneStep::new(work)).await
    }

    /// Runs `work` on the writer thread, one step per transaction (see
    /// `writer.rs`), and waits for its last step's commit.
    async fn execute_in_steps<T, W>(&self, work: W) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: Work<Output = Result<T, StoreError>>,
    {
        let (job, answer) = PendingJob::new(work, self.timeout);
        let job: Box<dyn Job> = job;
        self.jobs
            .send(job)
            .await
            .map_err(|_| StoreError::Backend("SQLite writer thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Backend("SQLite writer thread dropped the job".into()))?
    }
}

/// Locks `path` for this server alone: `FILE.lock` beside it, held until the
/// store is dropped (or the process ends).
fn lock_for_serving(path: &Path) -> Result<File, OpenError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let fail = |error: std::io::Error| OpenError::Lock(lock_path.clone(), error.to_string());
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(fail)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::InUse(path.to_owned())),
        Err(std::fs::TryLockError::Error(error)) => Err(fail(error)),
    }
}

/// Creates the database file and its schema if absent (`lime-server db init`).
pub fn init_database(path: &Path) -> Result<SchemaState, OpenError> {
    open_connection(path, Synchronous::Full).map(|(_, state)| state)
}

/// Brings an existing database to our schema version (`lime-server db migrate`).
pub fn migrate_database(path: &Path) -> Result<Migration, OpenError> {
    if !path.exists() {
        return Err(OpenError::Missing(path.to_owned()));
    }
    let conn = Connection::open(path).map_err(|error| OpenError::Sqlite(path.to_owned(), error))?;
    schema::migrate(&conn).map_err(|error| OpenError::Schema(path.to_owned(), error))
}

/// A connection set up exactly as the store's own (WAL, `synchronous`, foreign
/// keys, schema checked): for tools and benchmarks that measure the database
/// without the server in front.
pub fn connect(path: &Path, synchronous: Synchronous) -> Result<Connection, OpenError> {
    open_connection(path, synchronous).map(|(conn, _)| conn)
}

/// The getPeerBundle claim as the store runs it, in a transaction of its own: the
/// reference ("raw") rate the server's throughput is compared with.
pub fn claim_key_bundles_in_transaction(
    conn: &Connection,
    curve: Curve,
    limits: &StoreLimits,
    source: &DeviceId,
    devices: Vec<DeviceId>,
) -> Result<Vec<PeerBundle>, StoreError> {
    let limit = match limits.bundle_requests {
        Some(limit) => {
            let counts = RequestCounts::load(conn, limit.window)?;
            Some((limit, Arc::new(Mutex::new(counts))))
        }
        None => None,
    };
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let claim = BundleClaim::new(
        curve,
        limit,
        (source.clone(), SourceCheck::Registered),
        (devices, Vec::new()),
    );
    match claim.run_whole(conn) {
        Ok(claimed) => {
            conn.execute_batch("COMMIT")?;
            Ok(claimed.bundles)
        }
        Err(error) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}

fn open_connection(
    path: &Path,
    synchronous: Synchronous,
) -> Result<(Connection, SchemaState), OpenError> {
    let fail = |error: rusqlite::Error| OpenError::Sqlite(path.to_owned(), error);
    // SQLite takes an empty file for a new database and would fill it with an
    // empty schema: a file truncated by a full disk or a failed copy would be
    // served as if no device had ever registered. Only a file SQLite creates here
    // may start empty.
    if path
        .metadata()
        .is_ok_and(|metadata| metadata.is_file() && metadata.len() == 0)
    {
        return Err(OpenError::EmptyFile(path.to_owned()));
    }
    let conn = Connection::open(path).map_err(fail)?;
    let synchronous = synchronous.pragma();
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; PRAGMA foreign_keys = ON;"
    ))
    .map_err(fail)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(fail)?;
    let state =
        schema::ensure_schema(&conn).map_err(|error| OpenError::Schema(path.to_owned(), error))?;
    Ok((conn, state))
}

/// Why a SQLite store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// SQLite refused the file.
    #[error("SQLite database {0}: {1}")]
    Sqlite(PathBuf, rusqlite::Error),
    /// The file is not a database this server can serve.
    #[error("SQLite database {0}: {1}")]
    Schema(PathBuf, schema::SchemaError),
    /// The file exists and is empty: not a database.
    #[error(
        "SQLite database {0} is an empty file, not a database (truncated by a full disk or a \
         failed copy?): restore it, or remove it to start with no devices"
    )]
    EmptyFile(PathBuf),
    /// `db migrate` on a file that does not exist.
    #[error("SQLite database {0} does not exist (db init creates it)")]
    Missing(PathBuf),
    /// The writer thread could not be started.
    #[error("cannot start the SQLite writer thread: {0}")]
    Thread(String),
    /// The bundle requests of the last window could not be read.
    #[error("SQLite database {0}: cannot count the bundle requests of the last window: {1}")]
    Counts(PathBuf, StoreError),
    /// The lock file could not be opened or locked.
    #[error("SQLite lock file {0}: {1}")]
    Lock(PathBuf, String),
    /// Another server serves the file with the bundle request limit on.
    #[error(
        "SQLite database {0} is served by another lime-server (its .lock file is held): \
         the bundle request limit is counted by one server per file; stop the other one, \
         or give this one a database of its own"
    )]
    InUse(PathBuf),
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn register_device(
        &self,
        device: DeviceId,
        registration: Registration,
    ) -> Result<Registered, StoreError> {
        let limits = self.limits;
        self.execute(move |conn| queries::register_device(conn, &limits, &device, &registration))
            .await
    }

    async fn delete_device(&self, device: DeviceId) -> Result<(), StoreError> {
        self.execute(move |conn| queries::delete_device(conn, &device))
            .await
    }

    async fn replace_signed_pre_key(
        &self,
        device: DeviceId,
        key: SignedPreKey,
    ) -> Result<(), StoreError> {
        self.execute(move |conn| queries::replace_signed_pre_key(conn, &device, &key))
            .await
    }

    async fn add_one_time_pre_keys(
        &self,
        device: DeviceId,
        keys: Vec<OneTimePreKey>,
    ) -> Result<(), StoreError> {
        let limits = self.limits;
        self.execute(move |conn| queries::add_one_time_pre_keys(conn, &limits, &device, &keys))
            .await
    }

    async fn claim_key_bundles_for(
        &self,
        source: DeviceId,
        check: SourceCheck,
        devices: Vec<DeviceId>,
        forwarded: Vec<DeviceId>,
    ) -> Result<Claimed, StoreError> {
        let claim = BundleClaim::new(
            self.curve,
            self.limits.bundle_requests.zip(self.counts.clone()),
            (source, check),
            (devices, forwarded),
        );
        self.execute_in_steps(claim).await
    }

    async fn purge_requests(&self, retention: Duration) -> Result<u64, StoreError> {
        purge_in_chunks(|| self.execute(move |conn| queries::purge_requests(conn, retention))).await
    }

    async fn one_time_pre_key_ids(&self, device: DeviceId) -> Result<Vec<u32>, StoreError> {
        self.execute(move |conn| queries::one_time_pre_key_ids(conn, &device))
            .await
    }

    async fn stats(&self, low_stock_threshold: u32) -> Result<StoreStats, StoreError> {
        self.execute(move |conn| queries::stats(conn, low_stock_threshold))
            .await
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn device_report(
        &self,
        device: DeviceId,
        recent: u32,
    ) -> Result<Option<DeviceReport>, StoreError> {
        self.execute(move |conn| queries::device_report(conn, &device, recent))
            .await
    }

    /// Ready means "can serve writes": a real write committed by the writer like
    /// any request's (the `version` row of `Config` up by one and back, nothing
    /// seen by anyone), so that a read-only, full or broken file is not ready.
    async fn ping(&self) -> Result<(), StoreError> {
        self.execute(|conn| {
            for step in ["+ 1", "- 1"] {
                conn.execute(
                    &format!("UPDATE Config SET Value = Value {step} WHERE Name = 'version'"),
                    [],
                )?;
            }
            Ok(())
        })
        .await
    }
}

/// Opens the store for `curve` and wraps it for [`crate::store::Stores`].
pub fn open_shared(curve: Curve, options: &SqliteOptions) -> Result<Arc<dyn KeyStore>, OpenError> {
    Ok(Arc::new(SqliteStore::open(curve, options)?))
}
