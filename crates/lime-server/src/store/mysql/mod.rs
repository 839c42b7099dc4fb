//! The MariaDB/MySQL store: serves the original PHP server's databases as they are.
//!
//! A pool of connections (sqlx) runs each store method as one InnoDB transaction
//! at REPEATABLE READ. Nothing here is a process-local lock: several server
//! instances may share the database.
//!
//! - One-time pre-keys are claimed with `SELECT ... FOR UPDATE SKIP LOCKED` and
//!   deleted in the same transaction (MariaDB 10.6+, MySQL 8.0+; checked at open).
//! - The original schema has no unique index on `Users.UserId` (a TEXT with a
//!   100-character prefix index) and none on `OPk(Uid, OPk_id)` before
//!   `db migrate`, so every upload first locks the device's `Users` rows with
//!   `SELECT ... FOR UPDATE`: two instances uploading the same key ids are
//!   serialised by InnoDB. A registration locks its user's row of
//!   `lime_rs_identity_requests` (schema version 3) instead: registrations of one
//!   user take turns on every server, so a device is stored once and the devices
//!   per user are counted exactly, and no index gap is locked, so that new
//!   devices of different users never deadlock. Before version 3 it locks the
//!   device's rows or the index gap where the device would go; two registrations
//!   may deadlock on that gap, and InnoDB then rolls one back whole and it is run
//!   again.
//! - Time-outs: the connection wait, `BEGIN` and every statement run within the
//!   store's time-out; past it the transaction is abandoned uncommitted and its
//!   connection closed rather than reused ([`StoreError::Timeout`], nothing
//!   changed). `COMMIT` is never abandoned that way: it has a bound of its own and
//!   its failure is a [`StoreError::Backend`] (outcome unknown), so that a
//!   `Timeout` always means nothing changed. A claim whose COMMIT goes unanswered
//!   is settled later, when the database answers again (`store::in_doubt`): its
//!   keys are put back if it had committed. Each connection's lock waits
//!   (`innodb_lock_wait_timeout`, `lock_wait_timeout`) are set to the time-out
//!   too, so that an abandoned statement does not hold locks for long.
//! - A transaction the database rolls back whole (error 1213: a statement chosen
//!   as InnoDB's deadlock victim, or, on a Galera cluster, a COMMIT refused by
//!   certification because another node's transaction wrote the same rows
//!   first) is run again, up to [`ROLLBACK_ATTEMPTS`] times within the time-out;
//!   every other COMMIT failure is "outcome unknown" as above. On a Galera node
//!   each connection sets `wsrep_sync_wait = 1`, so that its reads see what
//!   other nodes committed before them.

mod queries;
pub mod schema;

use crate::metrics::RetryAt;
use crate::store::claim::ClaimTables;
use crate::store::in_doubt::{
    CallError, ClaimToken, ClaimedKey, InDoubtClaims, Reconcile, Settled,
};
use crate::store::location::redact;
use crate::store::{
    Claimed, DeviceReport, KeyStore, Migration, Registered, SchemaState, ServerStoreOptions,
    SetupError, SourceCheck, StoreError, StoreLimits, StoreStats,
};
use async_trait::async_trait;
use lime_protocol::{Curve, DeviceId, OneTimePreKey, Registration, SignedPreKey};
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlDatabaseError};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, Executor, MySql, MySqlPool};
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::{Instant, timeout, timeout_at};

/// The work of one store method on a connection, as [`MysqlStore::run`] takes it.
type Work<'c, T> = Pin<Box<dyn Future<Output = Result<T, Fault>> + Send + 'c>>;

/// How many times a transaction the database rolled back (an InnoDB deadlock
/// victim, a Galera certification failure) is run in all, within the store's
/// time-out. On a Galera cluster under contention for the same one-time
/// pre-keys, several nodes' claims may lose to each other in a row.
const ROLLBACK_ATTEMPTS: u32 = 16;

/// A base algorithm's keys in a MariaDB/MySQL database.
pub struct MysqlStore {
    curve: Curve,
    limits: StoreLimits,
    /// Longest a method may take before its transaction is abandoned.
    timeout: Duration,
    pool: MySqlPool,
    /// The pool size: how many stale connections a method may meet in a row
    /// after the database restarted.
    pool_size: u32,
    /// Whether the database has the table of claim tokens (not before `db
    /// migrate`); without it, a claim whose COMMIT goes unanswered may lose keys.
    claims_table: bool,
    /// Whether the database has the table of bundle requests recorded per
    /// identity (not before `db migrate` to version 3); without it,
    /// `limits.max_recorded_requests_per_identity` is not enforced.
    identities_table: bool,
    /// Claims whose COMMIT went unanswered, until settled.
    in_doubt: InDoubtClaims,
    /// This store, for the task that settles claims in doubt.
    this: Weak<MysqlStore>,
}

/// Connects to the database at `url`, checks its schema, and serves `curve` from it.
pub async fn open(
    curve: Curve,
    url: &str,
    options: &ServerStoreOptions,
) -> Result<Arc<dyn KeyStore>, SetupError> {
    let pool = connect(url, options)?;
    let fail = setup_error(url);
    let mut conn = timeout(options.connect_timeout, pool.acquire())
        .await
        .map_err(|_| {
            fail(format!(
                "cannot connect within {:?}: is the database server running and reachable?",
                options.connect_timeout
            ))
        })?
        .map_err(|error| fail(connect_failure(&error)))?;
    let ours = schema::check(&mut conn).await.map_err(&fail)?;
    let claims_table = schema::has_claims_table(&mut conn).await.map_err(&fail)?;
    let identities_table = schema::has_identities_table(&mut conn)
        .await
        .map_err(&fail)?;
    match ours {
        None => tracing::warn!(
            location = %redact(url),
            "database has the original PHP server's schema without this server's additions \
             (served anyway); run `lime-server db migrate` to add them (among them the table \
             lime_rs_claims, without which a one-time pre-key claimed when the connection \
             breaks during COMMIT may be lost)"
        ),
        Some(version) if version < crate::store::SCHEMA_VERSION => tracing::warn!(
            location = %redact(url),
            version,
            "database schema is older than this server's (served anyway); run `lime-server db \
             migrate`: until then bundle requests are counted without the index by target, \
             and without the table lime_rs_identity_requests the rows one account adds to \
             Requests are not bounded (limits.max_recorded_requests_per_identity)"
        ),
        Some(_) if !claims_table => tracing::warn!(
            location = %redact(url),
            "database lacks the table lime_rs_claims (served anyway): run `lime-server db \
             migrate`; without it a one-time pre-key claimed when the connection breaks \
             during COMMIT may be lost"
        ),
        Some(_) => {}
    }
    if !schema::has_primary_keys(&mut conn).await.map_err(&fail)? {
        tracing::warn!(
            location = %redact(url),
            "tables Requests and Config have no primary key (served anyway): run `lime-server \
             db migrate` to add invisible ones; a Galera cluster needs a primary key on every \
             table"
        );
    }
    drop(conn);
    Ok(Arc::new_cyclic(|this| MysqlStore {
        curve,
        limits: options.limits,
        timeout: options.timeout,
        pool,
        pool_size: options.pool_size.max(1),
        claims_table,
        identities_table,
        in_doubt: InDoubtClaims::new(curve.name()),
        this: this.clone(),
    }))
}

/// Creates the schema when absent; leaves an existing one as it is.
pub async fn init(url: &str) -> Result<SchemaState, SetupError> {
    let mut conn = connect_one(url).await?;
    let state = schema::init(&mut conn).await.map_err(setup_error(url));
    let _ = conn.close().await;
    state
}

/// Brings an existing database to our schema version, only adding to it.
pub async fn migrate(url: &str) -> Result<Migration, SetupError> {
    let mut conn = connect_one(url).await?;
    let migration = schema::migrate(&mut conn).await.map_err(setup_error(url));
    let _ = conn.close().await;
    migration
}

/// The pool, not yet connected: every connection it opens is set up by
/// [`prepare_connection`].
fn connect(url: &str, options: &ServerStoreOptions) -> Result<MySqlPool, SetupError> {
    let connect_options = connect_options(url)?;
    let lock_wait = lock_wait_seconds(options.timeout);
    // Requests are bounded by `options.timeout` on top of the acquire time-out. A
    // stale connection met despite the pings is replaced and the method run again
    // (see `MysqlStore::run`).
    Ok(
        crate::store::pool_options(options.pool_size, options.connect_timeout)
            .after_connect(move |conn, _| Box::pin(prepare_connection(conn, lock_wait)))
            .connect_lazy_with(connect_options),
    )
}

/// Session settings every store connection needs.
async fn prepare_connection(conn: &mut MySqlConnection, lock_wait: u64) -> sqlx::Result<()> {
    // The registration race is settled by gap locks, which READ COMMITTED does
    // not take: whatever the server's default, store sessions use REPEATABLE READ.
    // A statement abandoned at the time-out keeps waiting on the server until its
    // lock wait ends: keep that wait as short as the time-out.
    let settings = format!(
        "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ; \
         SET SESSION innodb_lock_wait_timeout = {lock_wait}, SESSION lock_wait_timeout = {lock_wait}"
    );
    conn.execute(settings.as_str()).await?;
    // On a Galera node, a read waits until the node has applied every write
    // set committed anywhere in the cluster before it started: the limits count
    // what other nodes' instances recorded, and a registration sees a device
    // registered through another node. Without it a node's reads may lag.
    if on_galera(conn).await? {
        conn.execute("SET SESSION wsrep_sync_wait = 1").await?;
    }
    Ok(())
}

/// Whether the connection is to a node of a Galera cluster (`wsrep_on`; MySQL
/// does not know the variable).
async fn on_galera(conn: &mut MySqlConnection) -> sqlx::Result<bool> {
    match sqlx::query_scalar::<_, i64>("SELECT CAST(@@wsrep_on AS SIGNED)")
        .fetch_one(&mut *conn)
        .await
    {
        Ok(on) => Ok(on != 0),
        // ER_UNKNOWN_SYSTEM_VARIABLE
        Err(error) if mysql_error_number(&error) == Some(1193) => Ok(false),
        Err(error) => Err(error),
    }
}

/// Lock waits are whole seconds (at least 1 on MySQL).
fn lock_wait_seconds(timeout: Duration) -> u64 {
    (timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0)).max(1)
}

fn connect_options(url: &str) -> Result<MySqlConnectOptions, SetupError> {
    let options = MySqlConnectOptions::from_str(url)
        .map_err(|error| setup_error(url)(format!("bad URL: {error}")))?;
    if options.get_database().is_none_or(str::is_empty) {
        return Err(setup_error(url)(
            "the URL names no database: add /DATABASE after the host".into(),
        ));
    }
    Ok(options)
}

/// One connection for `db init` and `db migrate`.
async fn connect_one(url: &str) -> Result<MySqlConnection, SetupError> {
    let options = connect_options(url)?;
    let mut conn = timeout(
        Duration::from_secs(30),
        MySqlConnection::connect_with(&options),
    )
    .await
    .map_err(|_| setup_error(url)("cannot connect within 30 s".into()))?
    .map_err(|error| setup_error(url)(connect_failure(&error)))?;
    prepare_connection(&mut conn, 30)
        .await
        .map_err(|error| setup_error(url)(error.to_string()))?;
    Ok(conn)
}

fn setup_error(url: &str) -> impl Fn(String) -> SetupError + '_ {
    move |message| SetupError::Database {
        location: redact(url),
        message,
    }
}

/// What to tell an operator whose database refused the connection.
fn connect_failure(error: &sqlx::Error) -> String {
    match mysql_error_number(error) {
        // ER_BAD_DB_ERROR
        Some(1049) => format!(
            "{error}: the database does not exist; this server does not create databases: \
             create it (CREATE DATABASE name CHARACTER SET utf8 COLLATE utf8_bin), grant the \
             user access, then run `lime-server db init`"
        ),
        // ER_ACCESS_DENIED_ERROR, ER_DBACCESS_DENIED_ERROR
        Some(1045 | 1044) => format!("{error}: check the user, password and grants"),
        _ => format!("cannot connect: {error}"),
    }
}

/// The MySQL error number of a database error (e.g. 1213 for a deadlock).
fn mysql_error_number(error: &sqlx::Error) -> Option<u16> {
    error
        .as_database_error()
        .and_then(|error| error.try_downcast_ref::<MySqlDatabaseError>())
        .map(MySqlDatabaseError::number)
}

/// What a query can fail with: an answer for the client, or the database's error,
/// which [`MysqlStore::run`] sorts into retry, time-out and failure.
#[derive(Debug)]
pub(crate) enum Fault {
    Store(StoreError),
    Sql(sqlx::Error),
}

impl From<StoreError> for Fault {
    fn from(error: StoreError) -> Fault {
        Fault::Store(error)
    }
}

impl From<sqlx::Error> for Fault {
    fn from(error: sqlx::Error) -> Fault {
        Fault::Sql(error)
    }
}

/// How a method's work is wrapped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `BEGIN` ... `COMMIT`: for anything that writes or locks.
    Transaction,
    /// One statement on its own (autocommit): for a read that is one statement.
    Statement,
}

/// A pooled connection that is closed, not returned to the pool, unless the work
/// on it finished cleanly: a connection abandoned mid-transaction (time-out) or
/// broken must never serve another request.
struct Checkout {
    conn: Option<PoolConnection<MySql>>,
    clean: bool,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && !self.clean
        {
            // Dropping the detached connection closes its socket; the server
            // rolls back whatever was under way on it.
            drop(conn.detach());
        }
    }
}

/// What one attempt came to.
enum Attempt<T> {
    Done(Result<T, StoreError>),
    /// Nothing was done: run the whole work again.
    Again(Retry),
}

/// Why an attempt is run again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// A stale connection met before anything was done: on a fresh connection.
    StaleConnection,
    /// The database rolled the transaction back (error 1213) at `at`: a
    /// statement chosen as InnoDB's deadlock victim, or a COMMIT that failed a
    /// Galera node's certification (another node's transaction wrote the same
    /// rows first). Either way nothing it did remains.
    RolledBack(RetryAt),
}

impl MysqlStore {
    /// Runs `work` on a pooled connection as one transaction (or one statement),
    /// within the store's time-out; see the module documentation.
    async fn run<D, T, F>(&self, mode: Mode, data: D, work: F) -> Result<T, StoreError>
    where
        D: Sync,
        T: Send,
        F: for<'c> Fn(&'c mut MySqlConnection, &'c D) -> Work<'c, T> + Sync,
    {
        self.run_to_commit(mode, data, work)
            .await
            .map_err(CallError::into_store_error)
    }

    /// [`MysqlStore::run`], which also hands back the work's value when COMMIT
    /// went unanswered.
    async fn run_to_commit<D, T, F>(&self, mode: Mode, data: D, work: F) -> Result<T, CallError<T>>
    where
        D: Sync,
        T: Send,
        F: for<'c> Fn(&'c mut MySqlConnection, &'c D) -> Work<'c, T> + Sync,
    {
        let deadline = Instant::now() + self.timeout;
        let mut rolled_back = 0;
        let mut stale = 0;
        loop {
            let mut checkout = Checkout {
                conn: None,
                clean: false,
            };
            // Whatever is abandoned at the deadline leaves `checkout` not clean:
            // its connection is closed.
            let attempt = self
                .attempt(deadline, mode, &mut checkout, &data, &work)
                .await?;
            match attempt {
                Attempt::Done(result) => return result.map_err(CallError::Failed),
                Attempt::Again(Retry::StaleConnection) => {
                    stale += 1;
                    if stale > self.pool_size {
                        return Err(CallError::Failed(StoreError::Backend(
                            "every pooled connection is broken".into(),
                        )));
                    }
                }
                Attempt::Again(Retry::RolledBack(at)) => {
                    rolled_back += 1;
                    if rolled_back >= ROLLBACK_ATTEMPTS {
                        return Err(CallError::Failed(StoreError::Backend(format!(
                            "deadlock or certification failure, {ROLLBACK_ATTEMPTS} times in a row"
                        ))));
                    }
                    crate::metrics::store_retried("mysql", self.curve, at);
                    // Let the winner finish before trying again; the jitter
                    // keeps the losers of one conflict from meeting again.
                    let ceiling = 2 * u64::from(rolled_back.min(8));
                    let pause = rand::random_range(1..=ceiling);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
    }

    /// One try: acquire, begin, work (all before `deadline`), and commit or roll
    /// back. The `Err` case is a failure to report as is; `checkout` is marked
    /// clean when its connection may go back to the pool.
    async fn attempt<D, T, F>(
        &self,
        deadline: Instant,
        mode: Mode,
        checkout: &mut Checkout,
        data: &D,
        work: &F,
    ) -> Result<Attempt<T>, CallError<T>>
    where
        D: Sync,
        T: Send,
        F: for<'c> Fn(&'c mut MySqlConnection, &'c D) -> Work<'c, T> + Sync,
    {
        let timed_out = || CallError::Failed(StoreError::Timeout(self.timeout));
        let pooled = timeout_at(deadline, self.pool.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(|error| match error {
                sqlx::Error::PoolTimedOut => StoreError::Timeout(self.timeout),
                error => StoreError::Backend(format!("cannot connect: {error}")),
            })?;
        let conn: &mut MySqlConnection = checkout.conn.insert(pooled);
        if mode == Mode::Statement {
            let result = timeout_at(deadline, work(conn, data))
                .await
                .map_err(|_| timed_out())?;
            return Ok(match result {
                Ok(value) => {
                    checkout.clean = true;
                    Attempt::Done(Ok(value))
                }
                // A read that met a stale connection is simply read again.
                Err(Fault::Sql(error)) if is_connection_error(&error) => {
                    Attempt::Again(Retry::StaleConnection)
                }
                Err(fault) => {
                    checkout.clean = matches!(fault, Fault::Store(_));
                    Attempt::Done(Err(self.store_error(fault)))
                }
            });
        }
        let mut transaction = match timeout_at(deadline, conn.begin()).await {
            Err(_) => return Err(timed_out()),
            Ok(Ok(transaction)) => transaction,
            // Nothing was done yet: safe to start again elsewhere.
            Ok(Err(error)) if is_connection_error(&error) => {
                return Ok(Attempt::Again(Retry::StaleConnection));
            }
            Ok(Err(error)) => return Err(StoreError::Backend(error.to_string()).into()),
        };
        // Abandoned at the deadline: COMMIT was never sent, and closing the
        // connection rolls the transaction back.
        let worked = timeout_at(deadline, work(&mut transaction, data))
            .await
            .map_err(|_| timed_out())?;
        match worked {
            Ok(value) => {
                // Past this point the transaction is not abandoned at the
                // deadline: an unanswered COMMIT may have happened, so it is not
                // reported as a time-out.
                match timeout(self.timeout, transaction.commit()).await {
                    Ok(Ok(())) => {
                        checkout.clean = true;
                        Ok(Attempt::Done(Ok(value)))
                    }
                    // The one COMMIT failure whose outcome is known: Galera's
                    // certification refused the transaction and rolled it back
                    // (a claim's keys were not taken: the winner took them).
                    // The connection is fine; sqlx rolls back its side on
                    // next use.
                    Ok(Err(error)) if mysql_error_number(&error) == Some(1213) => {
                        checkout.clean = true;
                        Ok(Attempt::Again(Retry::RolledBack(RetryAt::Commit)))
                    }
                    Ok(Err(error)) => Err(CallError::CommitUnanswered {
                        value,
                        error: format!("COMMIT failed, its outcome is unknown: {error}"),
                    }),
                    Err(_) => Err(CallError::CommitUnanswered {
                        value,
                        error: format!(
                            "COMMIT not answered within {:?}; its outcome is unknown",
                            self.timeout
                        ),
                    }),
                }
            }
            Err(fault) => {
                let deadlock =
                    matches!(&fault, Fault::Sql(error) if mysql_error_number(error) == Some(1213));
                // Past the deadline the connection is closed instead, which rolls
                // back as well.
                let rolled_back = matches!(
                    timeout_at(deadline, transaction.rollback()).await,
                    Ok(Ok(()))
                );
                checkout.clean = rolled_back;
                if deadlock {
                    Ok(Attempt::Again(Retry::RolledBack(RetryAt::Statement)))
                } else {
                    Ok(Attempt::Done(Err(self.store_error(fault))))
                }
            }
        }
    }

    /// Purges old claim tokens in a task of its own, at most every few minutes.
    fn purge_claim_tokens_when_due(&self) {
        if !self.claims_table || !self.in_doubt.purge_due() {
            return;
        }
        let pool = self.pool.clone();
        let curve = self.curve.name();
        tokio::spawn(async move {
            let purged = async {
                let mut conn = pool.acquire().await?;
                queries::purge_claim_tokens(&mut conn)
                    .await
                    .map_err(|fault| match fault {
                        Fault::Sql(error) => error,
                        Fault::Store(error) => sqlx::Error::Protocol(error.to_string()),
                    })
            };
            match timeout(Duration::from_secs(60), purged).await {
                Ok(Ok(purged)) => tracing::debug!(curve, purged, "old claim tokens purged"),
                Ok(Err(error)) => tracing::debug!(curve, %error, "claim tokens not purged"),
                Err(_) => tracing::debug!(curve, "claim tokens not purged within 60 s"),
            }
        });
    }

    fn store_error(&self, fault: Fault) -> StoreError {
        match fault {
            Fault::Store(error) => error,
            // ER_LOCK_WAIT_TIMEOUT, ER_LOCK_WAIT_TIMEOUT for metadata (LOCK TABLES),
            // ER_STATEMENT_TIMEOUT: the database gave up waiting; rolled back.
            Fault::Sql(error) if matches!(mysql_error_number(&error), Some(1205 | 1969)) => {
                StoreError::Timeout(self.timeout)
            }
            Fault::Sql(error) => StoreError::Backend(error.to_string()),
        }
    }
}

/// The connection is unusable (closed by the server, network gone), as opposed to
/// an error the server answered with.
fn is_connection_error(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Io(_) | sqlx::Error::Protocol(_))
        // ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8.0.24+), ER_CONNECTION_KILLED (MariaDB)
        || matches!(mysql_error_number(error), Some(4031 | 1927))
}

#[async_trait]
impl KeyStore for MysqlStore {
    async fn register_device(
        &self,
        device: DeviceId,
        registration: Registration,
    ) -> Result<Registered, StoreError> {
        let (limits, identities_table) = (self.limits, self.identities_table);
        self.run(
            Mode::Transaction,
            (device, registration),
            move |conn, (device, registration)| {
                Box::pin(queries::register_device(
                    conn,
                    limits,
                    identities_table,
                    device,
                    registration,
                ))
            },
        )
        .await
    }

    async fn delete_device(&self, device: DeviceId) -> Result<(), StoreError> {
        self.run(Mode::Transaction, device, |conn, device| {
            Box::pin(queries::delete_device(conn, device))
        })
        .await
    }

    async fn replace_signed_pre_key(
        &self,
        device: DeviceId,
        key: SignedPreKey,
    ) -> Result<(), StoreError> {
        self.run(Mode::Transaction, (device, key), |conn, (device, key)| {
            Box::pin(queries::replace_signed_pre_key(conn, device, key))
        })
        .await
    }

    async fn add_one_time_pre_keys(
        &self,
        device: DeviceId,
        keys: Vec<OneTimePreKey>,
    ) -> Result<(), StoreError> {
        let limits = self.limits;
        self.run(
            Mode::Transaction,
            (device, keys),
            move |conn, (device, keys)| {
                Box::pin(queries::add_one_time_pre_keys(conn, limits, device, keys))
            },
        )
        .await
    }

    async fn claim_key_bundles_for(
        &self,
        source: DeviceId,
        check: SourceCheck,
        devices: Vec<DeviceId>,
        forwarded: Vec<DeviceId>,
    ) -> Result<Claimed, StoreError> {
        let curve = self.curve;
        let (claims_table, identities_table) = (self.claims_table, self.identities_table);
        let limit = self.limits.bundle_requests;
        self.purge_claim_tokens_when_due();
        let claimed = self
            .run_to_commit(
                Mode::Transaction,
                (limit, (source, check), (devices, forwarded)),
                move |conn, request| {
                    Box::pin(queries::claim_key_bundles(
                        conn,
                        curve,
                        ClaimTables {
                            claims: claims_table,
                            identities: identities_table,
                        },
                        request,
                    ))
                },
            )
            .await;
        self.in_doubt.answer(self.this.clone(), claimed)
    }

    async fn purge_requests(&self, retention: Duration) -> Result<u64, StoreError> {
        crate::store::purge_in_chunks(|| {
            self.run(Mode::Statement, retention, |conn, retention| {
                Box::pin(queries::purge_requests(conn, *retention))
            })
        })
        .await
    }

    async fn one_time_pre_key_ids(&self, device: DeviceId) -> Result<Vec<u32>, StoreError> {
        self.run(Mode::Statement, device, |conn, device| {
            Box::pin(queries::one_time_pre_key_ids(conn, device))
        })
        .await
    }

    async fn stats(&self, low_stock_threshold: u32) -> Result<StoreStats, StoreError> {
        self.run(Mode::Statement, low_stock_threshold, |conn, threshold| {
            Box::pin(queries::stats(conn, *threshold))
        })
        .await
    }

    fn backend(&self) -> &'static str {
        "mysql"
    }

    async fn device_report(
        &self,
        device: DeviceId,
        recent: u32,
    ) -> Result<Option<DeviceReport>, StoreError> {
        self.run(
            Mode::Transaction,
            (device, recent),
            |conn, (device, recent)| Box::pin(queries::device_report(conn, device, *recent)),
        )
        .await
    }

    /// Ready means "can serve writes": a real write in a transaction that commits
    /// (the `version` row of `Config` up by one and back, nothing seen by anyone),
    /// so that a read-only, full or broken database is not ready.
    async fn ping(&self) -> Result<(), StoreError> {
        self.run(Mode::Transaction, (), |conn, ()| {
            Box::pin(async move {
                for step in ["+ 1", "- 1"] {
                    sqlx::query(&format!(
                        "UPDATE `Config` SET `Value` = `Value` {step} WHERE `Name` = 'version'"
                    ))
                    .execute(&mut *conn)
                    .await?;
                }
                Ok(())
            })
        })
        .await
    }
}

#[async_trait]
impl Reconcile for MysqlStore {
    fn in_doubt(&self) -> &InDoubtClaims {
        &self.in_doubt
    }

    async fn settle(&self, token: ClaimToken, keys: &[ClaimedKey]) -> Result<Settled, StoreError> {
        self.run(Mode::Transaction, (token, keys), |conn, (token, keys)| {
            Box::pin(queries::settle_claim(conn, token, keys))
        })
        .await
    }
}
