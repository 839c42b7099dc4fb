//! Where keys live: the [`KeyStore`] trait and its backends.
//!
//! A store keeps one base algorithm's devices and keys, in tables named and shaped
//! like the original PHP server's (`Users`, `OPk`, `Requests`, `Config`). It sees
//! typed keys, never protocol bytes. Every method is one transaction: it happens
//! whole or not at all (a large claim on SQLite runs in steps, and is undone
//! whole when one fails). Invariant: a one-time pre-key leaves a store only inside
//! [`KeyStore::claim_key_bundles`], in the same transaction that deletes it.

pub(crate) mod claim;
pub mod in_doubt;
pub mod location;
pub mod mysql;
pub mod postgres;
pub mod rules;
pub mod sqlite;
pub mod stats;

use async_trait::async_trait;
use lime_protocol::{Curve, DeviceId, OneTimePreKey, PeerBundle, Registration, SignedPreKey};
pub use location::StoreLocation;
pub use stats::{OneTimePreKeyStock, StoreStats};
use std::sync::Arc;
use std::time::Duration;

/// The version of this server's schema additions, kept in `Config` as
/// `('lime_rs_schema', N)` beside the original's `('version', 1)`, which is left
/// as it is so that the PHP server keeps working on a migrated database.
pub const SCHEMA_VERSION: i64 = 3;

/// Most `Requests` rows one purge transaction deletes.
pub const PURGE_CHUNK: u64 = 10_000;

/// The `Config.Name` of [`SCHEMA_VERSION`].
pub const SCHEMA_VERSION_NAME: &str = "lime_rs_schema";

/// What `db init` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaState {
    /// The tables were created just now.
    Created,
    /// The tables were there already and were left as they are.
    Present,
}

/// What `db migrate` did: the steps applied, none when the schema was current.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migration {
    /// One line per step applied, e.g. "unique index OPk(Uid, OPk_id)".
    pub applied: Vec<String>,
}

/// A connection idle for longer than this is pinged before it is used: firewalls
/// and the server's `wait_timeout` close idle connections silently.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(60);

/// A sqlx pool of at most `pool_size` connections, opened as needed and waited for
/// at most `acquire_timeout`. sqlx pings every connection when it comes back to
/// the pool; a second ping on the way out would cost every request a round trip,
/// so only connections idle for long are pinged before use.
pub fn pool_options<DB: sqlx::Database>(
    pool_size: u32,
    acquire_timeout: Duration,
) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(pool_size.max(1))
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// How a database-server store (MariaDB/MySQL, PostgreSQL) is run.
#[derive(Debug, Clone)]
pub struct ServerStoreOptions {
    /// Most connections the pool opens.
    pub pool_size: u32,
    /// Longest wait to open a connection.
    pub connect_timeout: Duration,
    /// Longest a request may take, waiting for a connection included; past it the
    /// client gets `db_error`.
    pub timeout: Duration,
    /// Limits enforced inside transactions.
    pub limits: StoreLimits,
}

/// A store that cannot be opened, created or migrated.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// SQLite refused.
    #[error(transparent)]
    Sqlite(#[from] sqlite::OpenError),
    /// A database server refused or failed (the location hides any password).
    #[error("{location}: {message}")]
    Database {
        /// Where, password hidden.
        location: String,
        /// What went wrong.
        message: String,
    },
}

/// What a store can fail with. The domain variants are answers the client gets;
/// [`StoreError::Backend`] is a database failure, logged in full and answered
/// with `db_error`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The device is not registered.
    #[error("device is not registered")]
    DeviceNotFound,
    /// registerUser for a device registered with other keys.
    #[error("device is already registered with other keys")]
    DeviceRegisteredWithOtherKeys,
    /// A one-time pre-key id the device already uses, with a different key.
    #[error("OPk id {0} is already used by this device for another key")]
    ConflictingOneTimePreKeyId(u32),
    /// The user already has as many devices as allowed.
    #[error("user {user} already has {devices} devices, the limit is {limit}")]
    TooManyDevices {
        /// `sip:user@domain`.
        user: String,
        /// Devices it has.
        devices: u64,
        /// The configured limit.
        limit: u32,
    },
    /// The device would hold more one-time pre-keys than allowed.
    #[error("device would hold {would_hold} one-time pre-keys, the limit is {limit}")]
    TooManyOneTimePreKeys {
        /// How many it would hold after the request.
        would_hold: u64,
        /// The configured limit.
        limit: u32,
    },
    /// The database failed; nothing was changed.
    #[error("database error: {0}")]
    Backend(String),
    /// The request could not start within the store's time-out; nothing was changed.
    #[error("database busy: the request could not start within {0:?}")]
    Timeout(std::time::Duration),
}

/// The answer to a registerUser that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// The device is new and now stored with its keys.
    New,
    /// The device was already stored with exactly these keys; nothing changed.
    AlreadyWithSameKeys,
}

/// What a store knows about one device, for support (`admin device show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    /// The id of its signed pre-key; `None` when it has none stored. (The
    /// original schema keeps no date for it: its age is unknown.)
    pub signed_pre_key_id: Option<u32>,
    /// One-time pre-keys it has left.
    pub one_time_pre_keys: u64,
    /// The latest bundles it asked for (`Requests` rows with it as source),
    /// newest first.
    pub requests_as_source: Vec<BundleRequest>,
    /// The latest bundles of it served to others (rows with it as target),
    /// newest first.
    pub requests_as_target: Vec<BundleRequest>,
}

/// One recorded bundle request (a `Requests` row) seen from one of its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleRequest {
    /// The other device: the target of a request it made, the source of one made
    /// for it.
    pub peer: String,
    /// When, UTC, as `YYYY-MM-DD HH:MM:SS`; `None` when the row has no time.
    pub at: Option<String>,
}

/// Limits a store enforces inside its transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most one-time pre-keys one device may hold on the server.
    pub max_one_time_pre_keys_per_device: u32,
    /// Most devices of one user (`sip:user@domain;gr=...`); 0: no limit.
    pub max_devices_per_user: u32,
    /// Key-bundle request limitation, when on.
    pub bundle_requests: Option<BundleRequestLimit>,
}

/// How many key bundles of one target device a source may receive, counted per
/// source device and per identity (`sip:user@domain`, the part of a device id
/// before `;gr=`: an identity owns every device id with that prefix), and how
/// many bundle requests one identity may have recorded in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleRequestLimit {
    /// Bundles of one target one source device may receive within `window`.
    pub max: u32,
    /// Bundles of one target all the devices of one identity may receive within
    /// `window`, however many device ids it registers or deletes.
    pub max_per_identity: u32,
    /// Bundle requests recorded in `Requests` for one identity within a window
    /// (fixed, aligned on multiples of `window` since the epoch), across all
    /// targets: what bounds the rows one account adds to the table.
    pub max_recorded_per_identity: u32,
    /// The sliding window, counted by the database's clock in whole seconds.
    pub window: Duration,
    /// What a source past the limit gets.
    pub over_limit: OverLimit,
}

/// What a source past its bundle request limit gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverLimit {
    /// The bundle, without a one-time pre-key (flag 0).
    WithoutOneTimePreKey,
    /// No bundle (flag 2).
    NoBundle,
}

/// Whether the source of a bundle claim must be a device registered in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceCheck {
    /// Our own client: registered here, else `user_not_found` (liblime registers
    /// before it fetches; a made-up source id would otherwise be a fresh budget
    /// under every limit counted per device).
    Registered,
    /// A device of a peer server's domain, forwarded by that authenticated peer:
    /// not registered here; the peer vouches for it.
    VouchedByPeer,
}

/// A bundle claim as the database-server stores run it: their limit, the source
/// and its check, the devices held here and those to forward.
pub(crate) type ClaimRequest = (
    Option<BundleRequestLimit>,
    (DeviceId, SourceCheck),
    (Vec<DeviceId>, Vec<DeviceId>),
);

/// What a bundle claim gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claimed {
    /// The bundles of the devices held here, in their order.
    pub bundles: Vec<PeerBundle>,
    /// For each device held by a peer server, in its order: whether the source
    /// is within the bundle request limits for it (not a repeat, not past a
    /// limit), so that it may be asked of the peer.
    pub forward: Vec<bool>,
}

/// One base algorithm's key directory.
///
/// Time-outs are the store's business, not its caller's: a store answers within
/// its configured time-out (plus the duration of a transaction already under way),
/// and [`StoreError::Timeout`] means nothing was changed. A caller must not give
/// up on a call by dropping it, because a store cannot promise that a transaction
/// it already started is rolled back then: a one-time pre-key could leave the store
/// with nobody to receive it.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Stores a new device with its keys, all or nothing. The same device with
    /// the same Ik and SPk is a retry: success, nothing changes.
    async fn register_device(
        &self,
        device: DeviceId,
        registration: Registration,
    ) -> Result<Registered, StoreError>;

    /// Deletes a device and its one-time pre-keys; an unknown device is not an error.
    async fn delete_device(&self, device: DeviceId) -> Result<(), StoreError>;

    /// Replaces the device's signed pre-key.
    async fn replace_signed_pre_key(
        &self,
        device: DeviceId,
        key: SignedPreKey,
    ) -> Result<(), StoreError>;

    /// Adds one-time pre-keys to a device, all or nothing. A key identical to one
    /// the device already has (same id, same bytes) is skipped, so a retried upload
    /// is harmless; the same id with other bytes refuses the whole upload.
    async fn add_one_time_pre_keys(
        &self,
        device: DeviceId,
        keys: Vec<OneTimePreKey>,
    ) -> Result<(), StoreError>;

    /// The key bundles of `devices` for `source`, in their order, each taking (and
    /// deleting) one one-time pre-key when the device has one left: one
    /// transaction for all (on SQLite, one per step of up to
    /// [`sqlite::CLAIM_STEP_DEVICES_ALONE`] devices, cut to
    /// [`sqlite::CLAIM_STEP_DEVICES`] when other requests wait; answered after
    /// the last, undone when a step fails: see `store/sqlite/claim.rs`). No bundle for a device that is unknown or has no
    /// signed pre-key. A device named twice takes at most one one-time pre-key.
    /// With a bundle request limit, each bundle served is recorded in `Requests`
    /// and a source past the limit for a target gets what `OverLimit` says.
    /// `source` must be a device registered in this store unless `check` says a
    /// peer server vouches for it (federation: a device of the peer's domain);
    /// the limits count it either way. `forwarded` are devices held by peer
    /// servers that `source` asks for through us (federation): the same limits
    /// apply to them, in the same transaction, and [`Claimed::forward`] says which
    /// may be asked of their peer (recorded in `Requests` like a bundle served).
    async fn claim_key_bundles_for(
        &self,
        source: DeviceId,
        check: SourceCheck,
        devices: Vec<DeviceId>,
        forwarded: Vec<DeviceId>,
    ) -> Result<Claimed, StoreError>;

    /// [`KeyStore::claim_key_bundles_for`] a source registered here, for devices
    /// held here.
    async fn claim_key_bundles(
        &self,
        source: DeviceId,
        devices: Vec<DeviceId>,
    ) -> Result<Vec<PeerBundle>, StoreError> {
        let claimed = self
            .claim_key_bundles_for(source, SourceCheck::Registered, devices, Vec::new())
            .await?;
        Ok(claimed.bundles)
    }

    /// Deletes the `Requests` rows older than `retention`, at most
    /// [`PURGE_CHUNK`] per transaction so that writers are never held up for long;
    /// returns how many.
    async fn purge_requests(&self, retention: Duration) -> Result<u64, StoreError>;

    /// Ids of the device's one-time pre-keys still stored, oldest first.
    async fn one_time_pre_key_ids(&self, device: DeviceId) -> Result<Vec<u32>, StoreError>;

    /// Checks that the database answers (for readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// What the store holds ([`StoreStats`]), devices under `low_stock_threshold`
    /// one-time pre-keys counted apart: one read-only statement, for
    /// `admin stats` and the metrics' stock gauges, never on a request.
    async fn stats(&self, low_stock_threshold: u32) -> Result<StoreStats, StoreError>;

    /// The backend's name, a metric label: `sqlite`, `mysql` or `postgres`.
    fn backend(&self) -> &'static str;

    /// What support needs to know about `device` ([`DeviceReport`]), with at most
    /// `recent` bundle requests each way; `None` when it is not registered.
    /// Changes nothing. `Requests` has no index by source: the requests it made
    /// cost a scan of the table (bounded by `limits.request_retention_secs`).
    async fn device_report(
        &self,
        device: DeviceId,
        recent: u32,
    ) -> Result<Option<DeviceReport>, StoreError>;
}

/// Runs `chunk` (one transaction deleting at most [`PURGE_CHUNK`] rows) until a
/// chunk deletes fewer; returns the rows deleted in all.
pub(crate) async fn purge_in_chunks<F, Fut>(mut chunk: F) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0;
    loop {
        let deleted = chunk().await?;
        total += deleted;
        if deleted < PURGE_CHUNK {
            return Ok(total);
        }
    }
}

/// The stores of the enabled base algorithms.
#[derive(Clone, Default)]
pub struct Stores {
    by_curve: [Option<Arc<dyn KeyStore>>; 5],
}

impl Stores {
    /// Adds the store serving `curve`.
    pub fn insert(&mut self, curve: Curve, store: Arc<dyn KeyStore>) {
        self.by_curve[Self::slot(curve)] = Some(store);
    }

    /// The store serving `curve`, if the curve is enabled.
    pub fn get(&self, curve: Curve) -> Option<&Arc<dyn KeyStore>> {
        self.by_curve[Self::slot(curve)].as_ref()
    }

    /// The enabled curves and their stores.
    pub fn iter(&self) -> impl Iterator<Item = (Curve, &Arc<dyn KeyStore>)> {
        Curve::ALL
            .into_iter()
            .filter_map(|curve| self.get(curve).map(|store| (curve, store)))
    }

    fn slot(curve: Curve) -> usize {
        usize::from(curve.id() - 1)
    }
}

/// Opens the store of `curve` at `location`, ready to serve. A database server
/// is connected to and its schema checked; an SQLite file is created if absent.
pub async fn open(
    curve: Curve,
    location: &StoreLocation,
    sqlite_options: &sqlite::SqliteOptions,
    server_options: &ServerStoreOptions,
) -> Result<Arc<dyn KeyStore>, SetupError> {
    match location {
        StoreLocation::Sqlite(path) => {
            let options = sqlite::SqliteOptions {
                path: path.clone(),
                ..sqlite_options.clone()
            };
            Ok(sqlite::open_shared(curve, &options)?)
        }
        StoreLocation::Mysql(url) => mysql::open(curve, url, server_options).await,
        StoreLocation::Postgres(url) => postgres::open(curve, url, server_options).await,
    }
}

/// Creates the schema at `location` when absent; leaves an existing one as it is.
pub async fn init(location: &StoreLocation) -> Result<SchemaState, SetupError> {
    match location {
        StoreLocation::Sqlite(path) => {
            if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|error| SetupError::Database {
                    location: location.to_string(),
                    message: format!("cannot create {}: {error}", dir.display()),
                })?;
            }
            Ok(sqlite::init_database(path)?)
        }
        StoreLocation::Mysql(url) => mysql::init(url).await,
        StoreLocation::Postgres(url) => postgres::init(url).await,
    }
}

/// Brings the database at `location` to [`SCHEMA_VERSION`], only adding to it.
pub async fn migrate(location: &StoreLocation) -> Result<Migration, SetupError> {
    match location {
        StoreLocation::Sqlite(path) => Ok(sqlite::migrate_database(path)?),
        StoreLocation::Mysql(url) => mysql::migrate(url).await,
        StoreLocation::Postgres(url) => postgres::migrate(url).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn purges_go_on_until_a_chunk_is_not_full() {
        let mut chunks = vec![PURGE_CHUNK, PURGE_CHUNK, 3].into_iter();
        let mut calls = 0;
        let total = purge_in_chunks(|| {
            calls += 1;
            let deleted = chunks.next().expect("no chunk after a short one");
            async move { Ok(deleted) }
        })
        .await
        .unwrap();
        assert_eq!((total, calls), (2 * PURGE_CHUNK + 3, 3));
        let mut calls = 0;
        let total = purge_in_chunks(|| {
            calls += 1;
            async { Ok(0) }
        })
        .await
        .unwrap();
        assert_eq!((total, calls), (0, 1));
    }
}
