//! The PostgreSQL store: one database per base algorithm, the original server's
//! tables and columns with PostgreSQL types.
//!
//! Any number of server instances may share a database: every call is one
//! transaction on a pooled connection (`transaction.rs`: deadline, server-side
//! time-outs, rollback, retries), the SQL of each operation is in `queries.rs`,
//! and what rows mean is decided by `rules`, as for every backend. A one-time
//! pre-key is claimed by one `DELETE ... (SELECT ... FOR UPDATE SKIP LOCKED)
//! RETURNING` statement, so two instances never hand out the same key; a claim
//! whose COMMIT goes unanswered is settled later (`store::in_doubt`). The
//! tables and their versions are in `schema.rs`.

mod queries;
mod schema;
mod transaction;

use crate::store::in_doubt::{ClaimToken, ClaimedKey, InDoubtClaims, Reconcile, Settled};
use crate::store::location::redact;
use crate::store::{
    Claimed, DeviceReport, KeyStore, Migration, Registered, SchemaState, ServerStoreOptions,
    SetupError, SourceCheck, StoreError, StoreLimits, StoreStats,
};
use async_trait::async_trait;
use lime_protocol::{Curve, DeviceId, OneTimePreKey, Registration, SignedPreKey};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::Duration;
use transaction::Transactions;

/// How long `db init` and `db migrate` wait to connect (they have no options).
const SETUP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A base algorithm's keys in one PostgreSQL database.
pub struct PostgresStore {
    curve: Curve,
    limits: StoreLimits,
    /// The pool, and the time-out every call answers within.
    transactions: Transactions,
    /// Whether the database has the table of claim tokens (a database at
    /// version 1 made before it existed lacks it until `db migrate`).
    claims_table: bool,
    /// Claims whose COMMIT went unanswered, until settled.
    in_doubt: InDoubtClaims,
    /// This store, for the task that settles claims in doubt.
    this: Weak<PostgresStore>,
}

/// Connects to the database at `url`, checks its schema, and serves `curve` from it.
pub async fn open(
    curve: Curve,
    url: &str,
    options: &ServerStoreOptions,
) -> Result<Arc<dyn KeyStore>, SetupError> {
    let connect_options = connect_options(url)?;
    // One connection of its own first: an unreachable database or a missing
    // schema is reported now, with its real cause, not as a pool time-out later.
    let mut conn = connect(url, &connect_options, options.connect_timeout).await?;
    let checked = schema::check(&mut conn).await;
    let claims_table = match checked {
        Ok(()) => schema::has_claims_table(&mut conn)
            .await
            .map_err(Into::into),
        Err(error) => Err(error),
    };
    let _ = conn.close().await;
    let claims_table = claims_table.map_err(|error| setup_error(url, error.to_string()))?;
    if !claims_table {
        tracing::warn!(
            location = %redact(url),
            "database lacks the table \"lime_rs_claims\" (served anyway): run `lime-server db \
             migrate`; without it a one-time pre-key claimed when the connection breaks \
             during COMMIT may be lost"
        );
    }

    let pool = PgPoolOptions::new()
        .max_connections(options.pool_size.max(1))
        .acquire_timeout(options.timeout)
        // A ping before every request would cost a round trip; a connection
        // found dead instead fails its transaction before COMMIT, which is then
        // run again on another connection (see `transaction.rs`).
        .test_before_acquire(false)
        .connect_lazy_with(connect_options);
    Ok(Arc::new_cyclic(|this| PostgresStore {
        curve,
        limits: options.limits,
        transactions: Transactions::new(pool, options.pool_size.max(1), options.timeout),
        claims_table,
        in_doubt: InDoubtClaims::new(curve.name()),
        this: this.clone(),
    }))
}

/// Creates the schema when absent; leaves an existing one as it is.
pub async fn init(url: &str) -> Result<SchemaState, SetupError> {
    let mut conn = connect(url, &connect_options(url)?, SETUP_CONNECT_TIMEOUT).await?;
    let state = schema::init(&mut conn).await;
    let _ = conn.close().await;
    state.map_err(|error| setup_error(url, error.to_string()))
}

/// Brings an existing database to our schema version, only adding to it.
pub async fn migrate(url: &str) -> Result<Migration, SetupError> {
    let mut conn = connect(url, &connect_options(url)?, SETUP_CONNECT_TIMEOUT).await?;
    let migration = schema::migrate(&mut conn).await;
    let _ = conn.close().await;
    migration.map_err(|error| setup_error(url, error.to_string()))
}

fn connect_options(url: &str) -> Result<PgConnectOptions, SetupError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|error| setup_error(url, format!("not a usable PostgreSQL URL: {error}")))?;
    Ok(match options.get_application_name() {
        Some(_) => options,
        None => options.application_name("lime-server"),
    })
}

async fn connect(
    url: &str,
    options: &PgConnectOptions,
    within: Duration,
) -> Result<PgConnection, SetupError> {
    match tokio::time::timeout(within, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(sqlx::Error::Database(error))) if error.code().as_deref() == Some("3D000") => {
            Err(setup_error(
                url,
                format!(
                    "{error}: lime-server creates tables, not databases; create it first \
                     (e.g. `createdb -O <user> <database>`)"
                ),
            ))
        }
        Ok(Err(error)) => Err(setup_error(url, format!("cannot connect: {error}"))),
        Err(_) => Err(setup_error(
            url,
            format!("cannot connect: no answer within {within:?}"),
        )),
    }
}

fn setup_error(url: &str, message: String) -> SetupError {
    SetupError::Database {
        location: redact(url),
        message,
    }
}

impl PostgresStore {
    /// Purges old claim tokens in a task of its own, at most every few minutes.
    fn purge_claim_tokens_when_due(&self) {
        if !self.claims_table || !self.in_doubt.purge_due() {
            return;
        }
        let pool = self.transactions.pool().clone();
        let curve = self.curve.name();
        tokio::spawn(async move {
            let purged = async {
                let mut conn = pool.acquire().await?;
                queries::purge_claim_tokens(&mut conn).await
            };
            match tokio::time::timeout(Duration::from_secs(60), purged).await {
                Ok(Ok(purged)) => tracing::debug!(curve, purged, "old claim tokens purged"),
                Ok(Err(error)) => tracing::debug!(curve, %error, "claim tokens not purged"),
                Err(_) => tracing::debug!(curve, "claim tokens not purged within 60 s"),
            }
        });
    }
}

#[async_trait]
impl Reconcile for PostgresStore {
    fn in_doubt(&self) -> &InDoubtClaims {
        &self.in_doubt
    }

    async fn settle(&self, token: ClaimToken, keys: &[ClaimedKey]) -> Result<Settled, StoreError> {
        self.transactions
            .run(&(token, keys), |conn, (token, keys)| {
                Box::pin(queries::settle_claim(conn, token, keys))
            })
            .await
    }
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn register_device(
        &self,
        device: DeviceId,
        registration: Registration,
    ) -> Result<Registered, StoreError> {
        let limits = self.limits;
        self.transactions
            .run(
                &(device, registration),
                move |conn, (device, registration)| {
                    Box::pin(queries::register_device(conn, limits, device, registration))
                },
            )
            .await
    }

    async fn delete_device(&self, device: DeviceId) -> Result<(), StoreError> {
        self.transactions
            .run(&device, |conn, device| {
                Box::pin(queries::delete_device(conn, device))
            })
            .await
    }

    async fn replace_signed_pre_key(
        &self,
        device: DeviceId,
        key: SignedPreKey,
    ) -> Result<(), StoreError> {
        self.transactions
            .run(&(device, key), |conn, (device, key)| {
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
        self.transactions
            .run(&(device, keys), move |conn, (device, keys)| {
                Box::pin(queries::add_one_time_pre_keys(conn, limits, device, keys))
            })
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
        let claims_table = self.claims_table;
        self.purge_claim_tokens_when_due();
        let request = (
            self.limits.bundle_requests,
            (source, check),
            (devices, forwarded),
        );
        let claimed = self
            .transactions
            .run_to_commit(&request, move |conn, request| {
                Box::pin(queries::claim_key_bundles(
                    conn,
                    curve,
                    claims_table,
                    request,
                ))
            })
            .await;
        self.in_doubt.answer(self.this.clone(), claimed)
    }

    async fn purge_requests(&self, retention: Duration) -> Result<u64, StoreError> {
        crate::store::purge_in_chunks(|| {
            self.transactions.run(&retention, |conn, retention| {
                Box::pin(queries::purge_requests(conn, *retention))
            })
        })
        .await
    }

    async fn one_time_pre_key_ids(&self, device: DeviceId) -> Result<Vec<u32>, StoreError> {
        self.transactions
            .run(&device, |conn, device| {
                Box::pin(queries::one_time_pre_key_ids(conn, device))
            })
            .await
    }

    async fn device_report(
        &self,
        device: DeviceId,
        recent: u32,
    ) -> Result<Option<DeviceReport>, StoreError> {
        self.transactions
            .run(&(device, recent), |conn, (device, recent)| {
                Box::pin(queries::device_report(conn, device, *recent))
            })
            .await
    }

    async fn stats(&self, low_stock_threshold: u32) -> Result<StoreStats, StoreError> {
        self.transactions
            .run(&low_stock_threshold, |conn, threshold| {
                Box::pin(queries::stats(conn, *threshold))
            })
            .await
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    /// Ready means "can serve writes": a real write in a transaction that commits
    /// (the `version` row of `Config` up by one and back, nothing seen by anyone),
    /// so that a read-only (a standby, `default_transaction_read_only`), full or
    /// broken database is not ready.
    async fn ping(&self) -> Result<(), StoreError> {
        // Through the same path as every call: bounded, and a connection found
        // dead is replaced rather than reported as a database failure.
        self.transactions
            .run(&(), |conn, _| {
                Box::pin(async move {
                    for step in ["+ 1", "- 1"] {
                        sqlx::query(&format!(
                            r#"UPDATE "Config" SET "Value" = "Value" {step} WHERE "Name" = 'version'"#
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
