//! The SQL of each store operation, run inside the transaction `mod.rs` opened.
//! Functions here never commit: they succeed, or fail and leave the transaction
//! to be rolled back. Every decision about what rows mean is `rules`'s.
//!
//! Device ids are compared with `UserId = ?` (served by the original's prefix
//! index) and an exact check on top, because `utf8_bin` pads with spaces:
//! `'a' = 'a '` is true in MySQL. Where a database written by another server
//! holds a device twice, its lowest `Uid` is the device.
//!
//! Statements whose number of values varies (`IN (...)` lists, multi-row
//! `INSERT`) are cut in power-of-two sizes, so that a few prepared statements
//! serve every request size.

use super::Fault;
use crate::store::claim::{self, ClaimQueries, ClaimTables, Recorded, Reservation};
use crate::store::in_doubt::{Claim, ClaimToken, ClaimedKey, Settled};
use crate::store::rules::{self, Received, SourceIdentity, StoredDevice, UserDevices};
use crate::store::stats::{self, StoreStats};
use crate::store::{
    BundleRequest, ClaimRequest, Claimed, DeviceReport, PURGE_CHUNK, Registered, StoreError,
    StoreLimits,
};
use lime_protocol::{Curve, DeviceId, OneTimePreKey, Registration, SignedPreKey};
use sqlx::mysql::MySqlConnection;
use sqlx::{Executor, Row};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Most values in one `IN (...)` list or rows in one `INSERT`: far below the
/// protocol's 65,535 placeholders and `max_allowed_packet` with the largest keys.
const MAX_CHUNK: usize = 64;

/// The device's `Users` row (its first, see the module documentation).
const FIND_DEVICE: &str = "SELECT Uid, Ik, SPk, SPk_sig, SPk_id FROM Users \
     WHERE UserId = ? AND OCTET_LENGTH(UserId) = ? ORDER BY Uid LIMIT 1";

/// [`FIND_DEVICE`] locking the device's rows, or when it is unknown the index gap
/// where it would go, so that no other transaction can register it or write its
/// keys until this one ends.
const LOCK_DEVICE: &str = "SELECT Uid, Ik, SPk, SPk_sig, SPk_id FROM Users \
     WHERE UserId = ? AND OCTET_LENGTH(UserId) = ? ORDER BY Uid LIMIT 1 FOR UPDATE";

async fn lock_device(
    conn: &mut MySqlConnection,
    device: &DeviceId,
) -> Result<Option<StoredDevice>, Fault> {
    device_row(conn, LOCK_DEVICE, device).await
}

/// The device's `Users` row, read without locking.
async fn find_device(
    conn: &mut MySqlConnection,
    device: &DeviceId,
) -> Result<Option<StoredDevice>, Fault> {
    device_row(conn, FIND_DEVICE, device).await
}

/// The device as `sql` ([`FIND_DEVICE`] or [`LOCK_DEVICE`]) reads it.
async fn device_row(
    conn: &mut MySqlConnection,
    sql: &'static str,
    device: &DeviceId,
) -> Result<Option<StoredDevice>, Fault> {
    let row = sqlx::query(sql)
        .bind(device.as_str())
        .bind(device.as_str().len() as u64)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|row| stored_device(&row)).transpose()
}

fn stored_device(row: &sqlx::mysql::MySqlRow) -> Result<StoredDevice, Fault> {
    let uid: i32 = row.try_get("Uid")?;
    Ok(StoredDevice::from_columns(
        i64::from(uid),
        row.try_get("Ik")?,
        row.try_get("SPk")?,
        row.try_get("SPk_sig")?,
        row.try_get("SPk_id")?,
    ))
}

/// Locks the row of `device`'s identity (its user, or the device itself when
/// its id is not a GRUU) in `lime_rs_identity_requests`, inserting it when
/// missing, until the transaction ends: the registrations of one user take turns
/// on every server. Only that row is locked, never an index gap, so that two new
/// devices of different users do not deadlock. A new row starts in window 0,
/// which every claim takes for an old window.
///
/// The row is written, not only locked (`recorded` up by one, then down): a
/// Galera cluster replicates row changes, not locks, so only a written row makes
/// two registrations of one user through different nodes conflict at
/// certification, where one is rolled back and run again, counting the other's
/// device.
async fn lock_identity(conn: &mut MySqlConnection, device: &DeviceId) -> Result<(), Fault> {
    let identity = SourceIdentity::of(device).key();
    sqlx::query(
        "INSERT INTO lime_rs_identity_requests (identity, window_start, recorded) \
         VALUES (?, 0, 1) ON DUPLICATE KEY UPDATE recorded = recorded + 1",
    )
    .bind(identity.as_slice())
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE lime_rs_identity_requests SET recorded = recorded - 1 WHERE identity = ?")
        .bind(identity.as_slice())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// With `identities_table` (schema version 3), the user's identity row is
/// locked first: the reads that follow are the transaction's first consistent
/// reads, so its snapshot is taken after the lock was granted and sees every
/// device of the user that the registrations before it committed; the device
/// count is exact across instances. Before version 3 the device's rows (or the
/// index gap where it would go) are locked instead, as the original schema
/// allows, and two new devices may deadlock on that gap (run again, up to
/// `ROLLBACK_ATTEMPTS` times).
pub(super) async fn register_device(
    conn: &mut MySqlConnection,
    limits: StoreLimits,
    identities_table: bool,
    device: &DeviceId,
    registration: &Registration,
) -> Result<Registered, Fault> {
    let existing = if identities_table {
        lock_identity(conn, device).await?;
        find_device(conn, device).await?
    } else {
        lock_device(conn, device).await?
    };
    if let Some(existing) = existing {
        return Ok(rules::reregistration(&existing, registration)?);
    }
    if let Some(range) = rules::user_devices(device).filter(|_| limits.max_devices_per_user > 0) {
        let devices: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM Users WHERE UserId >= ? AND UserId < ?")
                .bind(range.start)
                .bind(&range.end)
                .fetch_one(&mut *conn)
                .await?;
        rules::device_limit(range.user, devices as u64, &limits)?;
    }
    let new_keys = keys_to_insert(&HashMap::new(), &registration.one_time_pre_keys)?;
    rules::one_time_pre_key_limit(new_keys.len() as u64, &limits)?;
    let spk = &registration.signed_pre_key;
    let uid =
        sqlx::query("INSERT INTO Users (UserId, Ik, SPk, SPk_sig, SPk_id) VALUES (?, ?, ?, ?, ?)")
            .bind(device.as_str())
            .bind(registration.identity_key.as_bytes())
            .bind(spk.public())
            .bind(spk.signature())
            .bind(spk.id())
            .execute(&mut *conn)
            .await?
            .last_insert_id() as i64;
    insert_one_time_pre_keys(conn, uid, &new_keys).await?;
    Ok(Registered::New)
}

pub(super) async fn delete_device(
    conn: &mut MySqlConnection,
    device: &DeviceId,
) -> Result<(), Fault> {
    // OPk rows go with it: the original's foreign key is ON DELETE CASCADE.
    sqlx::query("DELETE FROM Users WHERE UserId = ? AND OCTET_LENGTH(UserId) = ?")
        .bind(device.as_str())
        .bind(device.as_str().len() as u64)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn replace_signed_pre_key(
    conn: &mut MySqlConnection,
    device: &DeviceId,
    key: &SignedPreKey,
) -> Result<(), Fault> {
    // sqlx connects with CLIENT_FOUND_ROWS: rows matched, not rows changed, so
    // posting the same SPk again is not mistaken for an unknown device.
    let matched = sqlx::query(
        "UPDATE Users SET SPk = ?, SPk_sig = ?, SPk_id = ? \
         WHERE UserId = ? AND OCTET_LENGTH(UserId) = ?",
    )
    .bind(key.public())
    .bind(key.signature())
    .bind(key.id())
    .bind(device.as_str())
    .bind(device.as_str().len() as u64)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    match matched {
        0 => Err(StoreError::DeviceNotFound.into()),
        _ => Ok(()),
    }
}

pub(super) async fn add_one_time_pre_keys(
    conn: &mut MySqlConnection,
    limits: StoreLimits,
    device: &DeviceId,
    keys: &[OneTimePreKey],
) -> Result<(), Fault> {
    // The device row lock serialises uploads for a device, so that two uploads
    // of the same ids cannot both insert them even without the unique index.
    let uid = lock_device(conn, device)
        .await?
        .ok_or(StoreError::DeviceNotFound)?
        .uid;
    if keys.is_empty() {
        return Ok(());
    }
    let stored_ids: Vec<u32> = sqlx::query_scalar("SELECT OPk_id FROM OPk WHERE Uid = ?")
        .bind(uid)
        .fetch_all(&mut *conn)
        .await?;
    let stored_ids: HashSet<u32> = stored_ids.into_iter().collect();
    let reused: Vec<u32> = keys
        .iter()
        .map(OneTimePreKey::id)
        .filter(|id| stored_ids.contains(id))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let stored = stored_keys(conn, uid, &reused).await?;
    let new_keys = keys_to_insert(&stored, keys)?;
    rules::one_time_pre_key_limit((stored_ids.len() + new_keys.len()) as u64, &limits)?;
    insert_one_time_pre_keys(conn, uid, &new_keys).await
}

/// The stored bytes of the device's keys with these ids (the oldest, if an id is
/// stored twice).
async fn stored_keys(
    conn: &mut MySqlConnection,
    uid: i64,
    ids: &[u32],
) -> Result<HashMap<u32, Vec<u8>>, Fault> {
    let mut stored = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(MAX_CHUNK) {
        let size = chunk.len().next_power_of_two();
        let sql = format!(
            "SELECT OPk_id, OPk FROM OPk WHERE Uid = ? AND OPk_id IN ({}) ORDER BY id",
            placeholders(size)
        );
        let mut query = sqlx::query(&sql).bind(uid);
        for value in padded(chunk) {
            query = query.bind(*value);
        }
        for row in query.fetch_all(&mut *conn).await? {
            stored
                .entry(row.try_get::<u32, _>(0)?)
                .or_insert(row.try_get::<Vec<u8>, _>(1)?);
        }
    }
    Ok(stored)
}

/// The uploaded keys to insert: a key whose id is stored (or came earlier in the
/// upload) is skipped when its bytes are the same and refuses the upload when not.
fn keys_to_insert<'k>(
    stored: &HashMap<u32, Vec<u8>>,
    keys: &'k [OneTimePreKey],
) -> Result<Vec<&'k OneTimePreKey>, StoreError> {
    let mut uploaded: HashMap<u32, &[u8]> = HashMap::with_capacity(keys.len());
    let mut new_keys = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(public) = stored.get(&key.id()) {
            rules::existing_one_time_pre_key(public, key)?;
        } else if let Some(public) = uploaded.get(&key.id()) {
            rules::existing_one_time_pre_key(public, key)?;
        } else {
            uploaded.insert(key.id(), key.public());
            new_keys.push(key);
        }
    }
    Ok(new_keys)
}

/// Multi-row inserts (see [`insert_batches`]).
async fn insert_one_time_pre_keys(
    conn: &mut MySqlConnection,
    uid: i64,
    keys: &[&OneTimePreKey],
) -> Result<(), Fault> {
    for (sql, batch) in insert_batches("OPk (Uid, OPk, OPk_id)", "(?, ?, ?)", keys) {
        let mut query = sqlx::query(&sql);
        for key in batch {
            query = query.bind(uid).bind(key.public()).bind(key.id());
        }
        conn.execute(query).await?;
    }
    Ok(())
}

/// The bundles, and what the transaction took (see `store::claim`). Before `db
/// migrate` to version 3 there is no `lime_rs_identity_requests`: the requests
/// of an identity are then not capped (the server warned at start).
pub(super) async fn claim_key_bundles(
    conn: &mut MySqlConnection,
    curve: Curve,
    tables: ClaimTables,
    request: &ClaimRequest,
) -> Result<(Claimed, Claim), Fault> {
    claim::claim_key_bundles(conn, curve, tables, request).await
}

/// One key of a device, for [`claim_one_time_pre_key`].
macro_rules! claim_key {
    () => {
        "SELECT id, Uid, OPk, OPk_id FROM OPk WHERE Uid = ? LIMIT 1 FOR UPDATE SKIP LOCKED"
    };
}
const CLAIM_KEY: &str = claim_key!();
/// The same, as a part of a `UNION ALL`.
const CLAIM_KEY_PART: &str = concat!("(", claim_key!(), ")");

/// A row of [`CLAIM_KEY`].
fn claimed_key(row: &sqlx::mysql::MySqlRow) -> Result<ClaimedKey, Fault> {
    let id: i32 = row.try_get(0)?;
    let uid: i32 = row.try_get(1)?;
    Ok(ClaimedKey {
        id: i64::from(id),
        uid: i64::from(uid),
        public: row.try_get(2)?,
        key_id: row.try_get(3)?,
    })
}

/// `SKIP LOCKED` passes over keys that another transaction (another
/// request, another server) is claiming, so no key is handed out twice and
/// claims never wait for each other. The row stays locked until this
/// transaction deletes it and commits. No `ORDER BY`: any of the device's keys
/// will do, and an order the index in use does not give made InnoDB read and
/// lock every key of the device, so that concurrent claims skipped them all
/// and answered "no OPk left" while keys remained (seen in the benchmarks).
async fn claim_one_time_pre_key(
    conn: &mut MySqlConnection,
    uid: i64,
) -> Result<Option<ClaimedKey>, Fault> {
    let row = sqlx::query(CLAIM_KEY)
        .bind(uid)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(claimed_key).transpose()
}

impl ClaimQueries for MySqlConnection {
    type Error = Fault;

    /// A statement each: MySQL cannot read rows in the statement that writes
    /// the identity's.
    async fn start_claim(
        &mut self,
        reservation: Option<Reservation<'_>>,
        devices: &[DeviceId],
        source: Option<&DeviceId>,
    ) -> Result<(u64, HashMap<String, StoredDevice>), Fault> {
        let recorded = match reservation {
            Some(reservation) => reserve_recorded(self, reservation).await?,
            None => 0,
        };
        Ok((
            recorded,
            find_devices(self, devices.iter().chain(source)).await?,
        ))
    }

    /// A count, then the insert: `INSERT ... SELECT` would count under shared
    /// next-key locks at REPEATABLE READ, where claims of two identities for
    /// one target could deadlock on the gap between their ranges.
    async fn record_if_below(
        &mut self,
        target: &DeviceId,
        source: &DeviceId,
        devices: Option<&UserDevices<'_>>,
        window: Duration,
        bounds: Received,
        claim_from: Option<i64>,
    ) -> Result<Recorded, Fault> {
        let received = match devices {
            None => Received::of_device(received_by_device(self, target, source, window).await?),
            Some(user) => received_by_identity(self, target, source, user, window).await?,
        };
        let recorded = received.below(bounds);
        let mut key = None;
        if recorded {
            sqlx::query("INSERT INTO Requests (source, target) VALUES (?, ?)")
                .bind(source.as_str())
                .bind(target.as_str())
                .execute(&mut *self)
                .await?;
            if let Some(uid) = claim_from {
                key = claim_one_time_pre_key(self, uid).await?;
            }
        }
        Ok(Recorded {
            received,
            recorded,
            key,
        })
    }

    /// One statement per batch of devices (power-of-two sizes, at most
    /// [`MAX_CHUNK`]): a `UNION ALL` of [`claim_one_time_pre_key`]'s statement,
    /// once per device, each part skipping and locking as it does alone; a
    /// batch of one is that statement itself. MariaDB has no `LATERAL`, and
    /// one `SELECT ... FOR UPDATE SKIP LOCKED` over several devices' keys
    /// would lock every key of them.
    async fn claim_one_time_pre_keys(
        &mut self,
        uids: &[i64],
    ) -> Result<HashMap<i64, ClaimedKey>, Fault> {
        let mut keys = HashMap::with_capacity(uids.len());
        for batch in power_of_two_batches(uids) {
            if let [uid] = batch {
                keys.extend(
                    claim_one_time_pre_key(self, *uid)
                        .await?
                        .map(|key| (key.uid, key)),
                );
                continue;
            }
            let sql = vec![CLAIM_KEY_PART; batch.len()].join(" UNION ALL ");
            let mut query = sqlx::query(&sql);
            for uid in batch {
                query = query.bind(uid);
            }
            for row in query.fetch_all(&mut *self).await? {
                let key = claimed_key(&row)?;
                keys.insert(key.uid, key);
            }
        }
        Ok(keys)
    }

    /// A count and a record are a statement each per device, a key another:
    /// two devices take 6 one by one, 3 in batches.
    const BATCH_FROM: usize = 2;

    /// One statement per [`MAX_CHUNK`] targets, through the index on
    /// `Requests(target(100), source(100), at)`.
    async fn received_by_targets<'t>(
        &mut self,
        targets: &[&'t DeviceId],
        source: &DeviceId,
        devices: Option<&UserDevices<'_>>,
        window: Duration,
    ) -> Result<HashMap<&'t str, Received>, Fault> {
        received_by_targets(self, targets, source, devices, window).await
    }

    async fn record_requests(
        &mut self,
        targets: &[&DeviceId],
        source: &DeviceId,
    ) -> Result<(), Fault> {
        for (sql, batch) in insert_batches("Requests (source, target)", "(?, ?)", targets) {
            let mut query = sqlx::query(&sql);
            for target in batch {
                query = query.bind(source.as_str()).bind(target.as_str());
            }
            self.execute(query).await?;
        }
        Ok(())
    }

    async fn delete_claimed_keys(&mut self, keys: &[ClaimedKey]) -> Result<(), Fault> {
        let ids: Vec<i64> = keys.iter().map(|key| key.id).collect();
        delete_one_time_pre_keys(self, &ids).await
    }

    async fn update_recorded(
        &mut self,
        identity: &SourceIdentity<'_>,
        recorded: u64,
    ) -> Result<(), Fault> {
        sqlx::query("UPDATE lime_rs_identity_requests SET recorded = ? WHERE identity = ?")
            .bind(recorded)
            .bind(identity.key().as_slice())
            .execute(&mut *self)
            .await?;
        Ok(())
    }

    async fn insert_claim_token(&mut self, token: &ClaimToken) -> Result<(), Fault> {
        sqlx::query("INSERT INTO lime_rs_claims (token) VALUES (?)")
            .bind(token.as_bytes())
            .execute(&mut *self)
            .await?;
        Ok(())
    }
}

/// Reserves the requests of `reservation` (see [`ClaimQueries::start_claim`]) in
/// fixed windows, aligned on multiples of the window since the epoch, by the
/// database's clock. Assignments run left to right in MySQL: `recorded` is
/// decided before `window_start` changes. The count before the reservation comes
/// back as the statement's `LAST_INSERT_ID(expr)`, which the server answers with
/// the statement (0 for a new row).
async fn reserve_recorded(
    conn: &mut MySqlConnection,
    Reservation {
        identity,
        window,
        planned,
    }: Reservation<'_>,
) -> Result<u64, Fault> {
    let reserved = sqlx::query(
        "INSERT INTO lime_rs_identity_requests (identity, window_start, recorded) \
         VALUES (?, UNIX_TIMESTAMP() DIV ? * ?, LAST_INSERT_ID(0) + ?) \
         ON DUPLICATE KEY UPDATE \
         recorded = LAST_INSERT_ID(IF(window_start = VALUES(window_start), recorded, 0)) + ?, \
         window_start = VALUES(window_start)",
    )
    .bind(identity.key().as_slice())
    .bind(window.as_secs())
    .bind(window.as_secs())
    .bind(planned)
    .bind(planned)
    .execute(conn)
    .await?;
    Ok(reserved.last_insert_id())
}

/// The bundles of `target` that `source` received within `window`, served by
/// the index on `Requests(target(100), source(100), at)`.
async fn received_by_device(
    conn: &mut MySqlConnection,
    target: &DeviceId,
    source: &DeviceId,
    window: Duration,
) -> Result<u64, Fault> {
    let by_device: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM Requests \
         WHERE target = ? AND source = ? AND at > NOW() - INTERVAL ? SECOND",
    )
    .bind(target.as_str())
    .bind(source.as_str())
    .bind(window.as_secs())
    .fetch_one(conn)
    .await?;
    Ok(by_device as u64)
}

/// The bundles of `target` that `source`, and all the devices of its user,
/// received within `window`: one statement, through the same index (the user's
/// devices are a range of `source`).
async fn received_by_identity(
    conn: &mut MySqlConnection,
    target: &DeviceId,
    source: &DeviceId,
    devices: &UserDevices<'_>,
    window: Duration,
) -> Result<Received, Fault> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(source = ?), 0) AS SIGNED), COUNT(*) FROM Requests \
         WHERE target = ? AND source >= ? AND source < ? AND at > NOW() - INTERVAL ? SECOND",
    )
    .bind(source.as_str())
    .bind(target.as_str())
    .bind(devices.start)
    .bind(&devices.end)
    .bind(window.as_secs())
    .fetch_one(conn)
    .await?;
    Ok(Received::from_counts(row.try_get(0)?, row.try_get(1)?))
}

/// [`received_by_device`] or [`received_by_identity`] of many targets, grouped
/// by their exact spelling. `target IN (...)` matches as `target = ?` does, a
/// stored id with trailing spaces too (`utf8_bin` pads): each target's counts
/// are the sum of the groups that are its spelling but for trailing spaces.
async fn received_by_targets<'t>(
    conn: &mut MySqlConnection,
    targets: &[&'t DeviceId],
    source: &DeviceId,
    devices: Option<&UserDevices<'_>>,
    window: Duration,
) -> Result<HashMap<&'t str, Received>, Fault> {
    fn unpadded(id: &[u8]) -> &[u8] {
        let end = id
            .iter()
            .rposition(|&byte| byte != b' ')
            .map_or(0, |last| last + 1);
        &id[..end]
    }
    let mut by_spelling: HashMap<Vec<u8>, (i64, i64)> = HashMap::new();
    for chunk in targets.chunks(MAX_CHUNK) {
        let size = chunk.len().next_power_of_two();
        let sql = match devices {
            None => format!(
                "SELECT CAST(target AS BINARY), COUNT(*), COUNT(*) FROM Requests \
                 WHERE target IN ({}) AND source = ? AND at > NOW() - INTERVAL ? SECOND \
                 GROUP BY 1",
                placeholders(size)
            ),
            Some(_) => format!(
                "SELECT CAST(target AS BINARY), CAST(COALESCE(SUM(source = ?), 0) AS SIGNED), \
                 COUNT(*) FROM Requests WHERE target IN ({}) AND source >= ? AND source < ? \
                 AND at > NOW() - INTERVAL ? SECOND GROUP BY 1",
                placeholders(size)
            ),
        };
        let mut query = sqlx::query(&sql);
        if devices.is_some() {
            query = query.bind(source.as_str());
        }
        for target in padded(chunk) {
            query = query.bind(target.as_str());
        }
        query = match devices {
            None => query.bind(source.as_str()),
            Some(user) => query.bind(user.start).bind(&user.end),
        };
        for row in query.bind(window.as_secs()).fetch_all(&mut *conn).await? {
            let spelling: Vec<u8> = row.try_get(0)?;
            let counts = by_spelling.entry(unpadded(&spelling).to_vec()).or_default();
            counts.0 += row.try_get::<i64, _>(1)?;
            counts.1 += row.try_get::<i64, _>(2)?;
        }
    }
    Ok(targets
        .iter()
        .filter_map(|target| {
            let &(by_device, by_identity) =
                by_spelling.get(unpadded(target.as_str().as_bytes()))?;
            Some((
                target.as_str(),
                Received::from_counts(by_device, by_identity),
            ))
        })
        .collect())
}

/// Deletes at most [`PURGE_CHUNK`] `Requests` rows older than `retention`.
pub(super) async fn purge_requests(
    conn: &mut MySqlConnection,
    retention: Duration,
) -> Result<u64, Fault> {
    let deleted = sqlx::query("DELETE FROM Requests WHERE at < NOW() - INTERVAL ? SECOND LIMIT ?")
        .bind(retention.as_secs())
        .bind(PURGE_CHUNK)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(deleted)
}

/// Settles a claim whose COMMIT went unanswered (see `store::in_doubt`). Inserting
/// its token waits for the claim's transaction if it is still open; a duplicate
/// means it committed.
pub(super) async fn settle_claim(
    conn: &mut MySqlConnection,
    token: &ClaimToken,
    keys: &[ClaimedKey],
) -> Result<Settled, Fault> {
    let fenced = sqlx::query("INSERT IGNORE INTO lime_rs_claims (token) VALUES (?)")
        .bind(token.as_bytes())
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let settled = if fenced == 1 {
        Settled::RolledBack
    } else {
        let mut restored = 0;
        for key in keys {
            // Only while the device exists; IGNORE: its id taken again since.
            restored += sqlx::query(
                "INSERT IGNORE INTO OPk (id, Uid, OPk, OPk_id) \
                 SELECT ?, Uid, ?, ? FROM Users WHERE Uid = ?",
            )
            .bind(key.id)
            .bind(&key.public)
            .bind(key.key_id)
            .bind(key.uid)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        }
        Settled::Restored(restored)
    };
    sqlx::query("DELETE FROM lime_rs_claims WHERE token = ?")
        .bind(token.as_bytes())
        .execute(&mut *conn)
        .await?;
    Ok(settled)
}

/// Deletes tokens older than `TOKEN_LIFETIME`, by primary key in batches of
/// single statements, so that no gap of the table is locked against claims.
pub(super) async fn purge_claim_tokens(conn: &mut MySqlConnection) -> Result<u64, Fault> {
    const BATCH: usize = 256;
    let mut purged = 0;
    loop {
        let tokens: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT token FROM lime_rs_claims WHERE claimed_at < NOW() - INTERVAL ? SECOND LIMIT ?",
        )
        .bind(crate::store::in_doubt::TOKEN_LIFETIME.as_secs())
        .bind(BATCH as u64)
        .fetch_all(&mut *conn)
        .await?;
        if tokens.is_empty() {
            return Ok(purged);
        }
        let sql = format!(
            "DELETE FROM lime_rs_claims WHERE token IN ({})",
            placeholders(tokens.len())
        );
        let mut query = sqlx::query(&sql).persistent(false);
        for token in &tokens {
            query = query.bind(token);
        }
        purged += conn.execute(query).await?.rows_affected();
        if tokens.len() < BATCH {
            return Ok(purged);
        }
    }
}

async fn delete_one_time_pre_keys(conn: &mut MySqlConnection, ids: &[i64]) -> Result<(), Fault> {
    for chunk in ids.chunks(MAX_CHUNK) {
        let size = chunk.len().next_power_of_two();
        let sql = format!("DELETE FROM OPk WHERE id IN ({})", placeholders(size));
        let mut query = sqlx::query(&sql);
        for value in padded(chunk) {
            query = query.bind(*value);
        }
        let deleted = conn.execute(query).await?.rows_affected();
        if deleted != chunk.len() as u64 {
            // Cannot happen while the rows are locked; refuse rather than hand out
            // a key that may not have been removed.
            return Err(StoreError::Backend(format!(
                "claimed {} one-time pre-keys but deleted {deleted}",
                chunk.len()
            ))
            .into());
        }
    }
    Ok(())
}

/// The stored devices among `devices`, by device id, read without locking.
async fn find_devices(
    conn: &mut MySqlConnection,
    devices: impl Iterator<Item = &DeviceId>,
) -> Result<HashMap<String, StoredDevice>, Fault> {
    let distinct: Vec<&str> = devices
        .map(DeviceId::as_str)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut found = HashMap::with_capacity(distinct.len());
    for chunk in distinct.chunks(MAX_CHUNK) {
        let size = chunk.len().next_power_of_two();
        let sql = format!(
            "SELECT Uid, UserId, Ik, SPk, SPk_sig, SPk_id FROM Users WHERE UserId IN ({}) \
             ORDER BY Uid",
            placeholders(size)
        );
        let mut query = sqlx::query(&sql);
        for value in padded(chunk) {
            query = query.bind(*value);
        }
        for row in query.fetch_all(&mut *conn).await? {
            // Exact match only (see the module documentation); lowest Uid first.
            // sqlx reads a `utf8_bin` column as bytes.
            let user_id: Vec<u8> = row.try_get("UserId")?;
            let Some(user_id) = chunk.iter().find(|id| id.as_bytes() == user_id) else {
                continue;
            };
            if !found.contains_key(*user_id) {
                found.insert((*user_id).to_owned(), stored_device(&row)?);
            }
        }
    }
    Ok(found)
}

/// [`StoreStats`] in one statement (see `store/stats.rs`).
pub(super) async fn stats(conn: &mut MySqlConnection, threshold: u32) -> Result<StoreStats, Fault> {
    let sql = stats::statement(|name| format!("`{name}`"), "?", "SIGNED");
    let row = sqlx::query(&sql)
        .bind(threshold)
        .fetch_one(&mut *conn)
        .await?;
    let mut columns = [None; 9];
    for (index, column) in columns.iter_mut().enumerate() {
        *column = row.try_get::<Option<i64>, _>(index)?;
    }
    Ok(stats::from_columns(columns, threshold))
}

pub(super) async fn one_time_pre_key_ids(
    conn: &mut MySqlConnection,
    device: &DeviceId,
) -> Result<Vec<u32>, Fault> {
    // One statement: the device (no row: unknown) joined with its keys (one row
    // with a NULL id: none).
    let rows = sqlx::query(
        "SELECT o.OPk_id FROM \
         (SELECT Uid FROM Users WHERE UserId = ? AND OCTET_LENGTH(UserId) = ? \
          ORDER BY Uid LIMIT 1) AS u \
         LEFT JOIN OPk AS o ON o.Uid = u.Uid ORDER BY o.id",
    )
    .bind(device.as_str())
    .bind(device.as_str().len() as u64)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Err(StoreError::DeviceNotFound.into());
    }
    let mut ids = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(id) = row.try_get::<Option<u32>, _>(0)? {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// A multi-row `INSERT INTO {into} VALUES {row}, ...` for each batch of `rows`,
/// in power-of-two sizes (100 rows: 64 + 32 + 4), with the batch whose values it
/// takes.
fn insert_batches<'r, T>(
    into: &'r str,
    row: &'r str,
    rows: &'r [T],
) -> impl Iterator<Item = (String, &'r [T])> + 'r {
    power_of_two_batches(rows).map(move |batch| {
        let sql = format!(
            "INSERT INTO {into} VALUES {}",
            vec![row; batch.len()].join(", ")
        );
        (sql, batch)
    })
}

/// `rows` cut in batches of power-of-two sizes, at most [`MAX_CHUNK`] each (100
/// rows: 64 + 32 + 4), for statements whose parts cannot be padded.
fn power_of_two_batches<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let (batch, after) = rows.split_at(power_of_two_at_most(rows.len().min(MAX_CHUNK)));
        rows = after;
        Some(batch)
    })
}

/// The values of `chunk` for an `IN (...)` list of the next power-of-two size:
/// the last one repeated (see the module documentation).
fn padded<T>(chunk: &[T]) -> impl Iterator<Item = &T> {
    let last = chunk.len() - 1;
    (0..chunk.len().next_power_of_two()).map(move |index| &chunk[index.min(last)])
}

fn placeholders(count: usize) -> String {
    vec!["?"; count].join(", ")
}

fn power_of_two_at_most(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}

pub(super) async fn device_report(
    conn: &mut MySqlConnection,
    device: &DeviceId,
    recent: u32,
) -> Result<Option<DeviceReport>, Fault> {
    // The same device row as every other method: the first of its exact spelling.
    let found = sqlx::query(
        "SELECT Uid, SPk_id FROM Users WHERE UserId = ? AND OCTET_LENGTH(UserId) = ? \
         ORDER BY Uid LIMIT 1",
    )
    .bind(device.as_str())
    .bind(device.as_str().len() as u64)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(found) = found else {
        return Ok(None);
    };
    let uid: i32 = found.try_get(0)?;
    let signed_pre_key_id: Option<u32> = found.try_get(1)?;
    let one_time_pre_keys: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM OPk WHERE Uid = ?")
        .bind(uid)
        .fetch_one(&mut *conn)
        .await?;
    // sqlx's MySQL sessions are in UTC (time_zone '+00:00').
    let mut requests = Vec::new();
    for sql in [
        "SELECT target, CAST(DATE_FORMAT(at, '%Y-%m-%d %H:%i:%s') AS CHAR) FROM Requests \
         WHERE source = ? ORDER BY at DESC LIMIT ?",
        "SELECT source, CAST(DATE_FORMAT(at, '%Y-%m-%d %H:%i:%s') AS CHAR) FROM Requests \
         WHERE target = ? ORDER BY at DESC LIMIT ?",
    ] {
        let rows = sqlx::query(sql)
            .bind(device.as_str())
            .bind(recent)
            .fetch_all(&mut *conn)
            .await?;
        let mut found = Vec::with_capacity(rows.len());
        for row in rows {
            // Requests' columns are utf8_bin: sqlx sees them as BLOBs.
            let peer: Vec<u8> = row.try_get(0)?;
            found.push(BundleRequest {
                peer: String::from_utf8_lossy(&peer).into_owned(),
                at: row.try_get(1)?,
            });
        }
        requests.push(found);
    }
    let requests_as_target = requests.pop().unwrap_or_default();
    let requests_as_source = requests.pop().unwrap_or_default();
    Ok(Some(DeviceReport {
        signed_pre_key_id,
        one_time_pre_keys: u64::try_from(one_time_pre_keys).unwrap_or(0),
        requests_as_source,
        requests_as_target,
    }))
}
