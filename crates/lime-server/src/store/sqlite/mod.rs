//! The embedded SQLite store: one database file per base algorithm.
//!
//! SQLite has one writer at a time, so each store owns one connection on a
//! dedicated thread and feeds it jobs through a channel. The thread runs the jobs
//! that are waiting together in one transaction (group commit), each inside its own
//! savepoint: a job that fails rolls back alone, and no job's answer is sent before
//! the transaction that holds it has committed. One-time pre-keys are claimed by
//! that single writer, so a claim is atomic; `BEGIN IMMEDIATE` keeps it so even if
//! another process opens the same file.

mod queries;
pub mod schema;

use crate::store::{
    Claimed, DeviceReport, KeyStore, Migration, Registered, SchemaState, SourceCheck, StoreError,
    StoreLimits, StoreStats, purge_in_chunks,
};
use async_trait::async_trait;
use lime_protocol::{Curve, DeviceId, OneTimePreKey, PeerBundle, Registration, SignedPreKey};
use rusqlite::Connection;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

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
}

/// A base algorithm's keys in one SQLite file, served by one writer thread.
pub struct SqliteStore {
    curve: Curve,
    limits: StoreLimits,
    /// How long a job may wait for the writer before it is answered with a time-out.
    timeout: Duration,
    /// Jobs for the writer thread; closing it stops the thread.
    jobs: mpsc::Sender<Box<dyn Job>>,
}

impl SqliteStore {
    /// Opens (creating it when absent) the database, checks its schema and starts
    /// its writer thread.
    pub fn open(curve: Curve, options: &SqliteOptions) -> Result<SqliteStore, OpenError> {
        let (conn, _) = open_connection(&options.path, options.synchronous)?;
        // Waiting for another process's lock counts against the jobs' time-out.
        conn.busy_timeout(options.timeout)
            .map_err(|error| OpenError::Sqlite(options.path.clone(), error))?;
        let (jobs, queue) = mpsc::channel(4096);
        let max_batch = options.max_batch.max(1);
        std::thread::Builder::new()
            .name(format!("sqlite-{curve}"))
            .spawn(move || run_writer(conn, queue, max_batch))
            .map_err(|error| OpenError::Thread(error.to_string()))?;
        Ok(SqliteStore {
            curve,
            limits: options.limits,
            timeout: options.timeout,
            jobs,
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
        let (reply, answer) = oneshot::channel();
        let job = Box::new(PendingJob {
            work: Some(work),
            deadline: Instant::now() + self.timeout,
            timeout: self.timeout,
            result: None,
            reply,
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| StoreError::Backend("SQLite writer thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Backend("SQLite writer thread dropped the job".into()))?
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
    conn.execute_batch("BEGIN IMMEDIATE")?;
    match queries::claim_key_bundles(
        conn,
        curve,
        limits.bundle_requests.as_ref(),
        (source, SourceCheck::Registered),
        (devices, Vec::new()),
    ) {
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
    let synchronous = match synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
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
        let (curve, limit) = (self.curve, self.limits.bundle_requests);
        self.execute(move |conn| {
            queries::claim_key_bundles(
                conn,
                curve,
                limit.as_ref(),
                (&source, check),
                (devices, forwarded),
            )
        })
        .await
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

/// A unit of work for the writer thread, type-erased so one queue carries them all.
trait Job: Send {
    /// The caller stopped waiting (its request timed out): skip the work, so that
    /// nothing is claimed for an answer nobody will read.
    fn abandoned(&self) -> bool;
    /// Runs the work, unless its deadline has passed; `false` when it failed (or
    /// was not run) and its savepoint must be rolled back.
    fn run(&mut self, conn: &Connection, now: Instant) -> bool;
    /// Sends the answer once the transaction's fate is known.
    fn finish(self: Box<Self>, committed: &Result<(), String>);
}

struct PendingJob<T, F> {
    work: Option<F>,
    /// Past it, the work is not started.
    deadline: Instant,
    /// The time-out the deadline came from, for the error.
    timeout: Duration,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for PendingJob<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
{
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn run(&mut self, conn: &Connection, now: Instant) -> bool {
        let result = match self.work.take() {
            _ if now > self.deadline => Err(StoreError::Timeout(self.timeout)),
            Some(work) => work(conn),
            None => Err(StoreError::Backend("job run twice".into())),
        };
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, committed: &Result<(), String>) {
        let answer = match (committed, self.result) {
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::Backend("job was not run".into())),
            (Err(error), _) => Err(StoreError::Backend(error.clone())),
        };
        // The caller may have given up meanwhile; nothing else to tell it.
        let _ = self.reply.send(answer);
    }
}

fn run_writer(conn: Connection, mut queue: mpsc::Receiver<Box<dyn Job>>, max_batch: usize) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        batch.retain(|job| !job.abandoned());
        if batch.is_empty() {
            continue;
        }
        let committed = run_batch(&conn, &mut batch);
        if let Err(error) = &committed {
            tracing::error!(%error, jobs = batch.len(), "SQLite transaction failed, rolled back");
        }
        for job in batch.drain(..) {
            job.finish(&committed);
        }
    }
}

/// Runs the jobs in one transaction, each in a savepoint; commits what succeeded.
fn run_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), String> {
    let result = (|| -> rusqlite::Result<()> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        for job in batch.iter_mut() {
            conn.execute_batch("SAVEPOINT job")?;
            if !job.run(conn, Instant::now()) {
                conn.execute_batch("ROLLBACK TO job")?;
            }
            conn.execute_batch("RELEASE job")?;
        }
        conn.execute_batch("COMMIT")
    })();
    result.map_err(|error| {
        if !conn.is_autocommit() {
            // Leave the connection clean for the next batch; its own failure
            // changes nothing for this batch's answers.
            let _ = conn.execute_batch("ROLLBACK");
        }
        error.to_string()
    })
}

/// Opens the store for `curve` and wraps it for [`crate::store::Stores`].
pub fn open_shared(curve: Curve, options: &SqliteOptions) -> Result<Arc<dyn KeyStore>, OpenError> {
    Ok(Arc::new(SqliteStore::open(curve, options)?))
}
