//! The SQL of each store operation, run by the writer thread inside a transaction
//! it opened (see `mod.rs`). Functions here never commit: they succeed, or fail
//! and leave their savepoint to be rolled back.

use crate::store::rules::{self, StoredDevice};
use crate::store::stats::{self, StoreStats};
use crate::store::{BundleRequest, DeviceReport, PURGE_CHUNK, Registered, StoreError, StoreLimits};
use lime_protocol::{DeviceId, OneTimePreKey, Registration, SignedPreKey};
use rusqlite::{Connection, OptionalExtension, params};
use std::time::Duration;

pub(super) fn find_device(
    conn: &Connection,
    device: &DeviceId,
) -> Result<Option<StoredDevice>, StoreError> {
    let mut select =
        conn.prepare_cached("SELECT Uid, Ik, SPk, SPk_sig, SPk_id FROM Users WHERE UserId = ?1")?;
    let row = select
        .query_row([device.as_str()], |row| {
            Ok(StoredDevice::from_columns(
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })
        .optional()?;
    Ok(row)
}

pub(super) fn find_uid(conn: &Connection, device: &DeviceId) -> Result<i64, StoreError> {
    let mut select = conn.prepare_cached("SELECT Uid FROM Users WHERE UserId = ?1")?;
    select
        .query_row([device.as_str()], |row| row.get(0))
        .optional()?
        .ok_or(StoreError::DeviceNotFound)
}

pub(super) fn register_device(
    conn: &Connection,
    limits: &StoreLimits,
    device: &DeviceId,
    registration: &Registration,
) -> Result<Registered, StoreError> {
    if let Some(existing) = find_device(conn, device)? {
        return rules::reregistration(&existing, registration);
    }
    if let Some(range) = rules::user_devices(device).filter(|_| limits.max_devices_per_user > 0) {
        let devices: u64 = conn
            .prepare_cached("SELECT COUNT(*) FROM Users WHERE UserId >= ?1 AND UserId < ?2")?
            .query_row(params![range.start, range.end], |row| row.get(0))?;
        rules::device_limit(range.user, devices, limits)?;
    }
    let spk = &registration.signed_pre_key;
    conn.prepare_cached(
        "INSERT INTO Users (UserId, Ik, SPk, SPk_sig, SPk_id) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        device.as_str(),
        registration.identity_key.as_bytes(),
        spk.public(),
        spk.signature(),
        spk.id()
    ])?;
    let uid = conn.last_insert_rowid();
    insert_one_time_pre_keys(conn, limits, uid, &registration.one_time_pre_keys)?;
    Ok(Registered::New)
}

pub(super) fn delete_device(conn: &Connection, device: &DeviceId) -> Result<(), StoreError> {
    // OPk rows go with it: ON DELETE CASCADE, foreign keys are on for every connection.
    conn.prepare_cached("DELETE FROM Users WHERE UserId = ?1")?
        .execute([device.as_str()])?;
    Ok(())
}

pub(super) fn replace_signed_pre_key(
    conn: &Connection,
    device: &DeviceId,
    key: &SignedPreKey,
) -> Result<(), StoreError> {
    let changed = conn
        .prepare_cached("UPDATE Users SET SPk = ?1, SPk_sig = ?2, SPk_id = ?3 WHERE UserId = ?4")?
        .execute(params![
            key.public(),
            key.signature(),
            key.id(),
            device.as_str()
        ])?;
    match changed {
        0 => Err(StoreError::DeviceNotFound),
        _ => Ok(()),
    }
}

pub(super) fn add_one_time_pre_keys(
    conn: &Connection,
    limits: &StoreLimits,
    device: &DeviceId,
    keys: &[OneTimePreKey],
) -> Result<(), StoreError> {
    let uid = find_uid(conn, device)?;
    insert_one_time_pre_keys(conn, limits, uid, keys)
}

/// Inserts keys for device `uid`: a key identical to a stored one is skipped, an
/// id already used for other bytes fails, and so does going past the limit.
fn insert_one_time_pre_keys(
    conn: &Connection,
    limits: &StoreLimits,
    uid: i64,
    keys: &[OneTimePreKey],
) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO OPk (Uid, OPk, OPk_id) VALUES (?1, ?2, ?3) ON CONFLICT (Uid, OPk_id) DO NOTHING",
    )?;
    let mut stored_key =
        conn.prepare_cached("SELECT OPk FROM OPk WHERE Uid = ?1 AND OPk_id = ?2")?;
    for key in keys {
        if insert.execute(params![uid, key.public(), key.id()])? == 0 {
            let stored: Vec<u8> = stored_key.query_row(params![uid, key.id()], |row| row.get(0))?;
            rules::existing_one_time_pre_key(&stored, key)?;
        }
    }
    let held: u64 = conn
        .prepare_cached("SELECT COUNT(*) FROM OPk WHERE Uid = ?1")?
        .query_row([uid], |row| row.get(0))?;
    rules::one_time_pre_key_limit(held, limits)
}

/// Deletes at most [`PURGE_CHUNK`] `Requests` rows older than `retention`.
pub(super) fn purge_requests(conn: &Connection, retention: Duration) -> Result<u64, StoreError> {
    let deleted = conn
        .prepare_cached(
            "DELETE FROM Requests WHERE rowid IN \
             (SELECT rowid FROM Requests WHERE at < datetime('now', ?1) LIMIT ?2)",
        )?
        .execute(params![
            format!("-{} seconds", retention.as_secs()),
            PURGE_CHUNK
        ])?;
    Ok(deleted as u64)
}

pub(super) fn one_time_pre_key_ids(
    conn: &Connection,
    device: &DeviceId,
) -> Result<Vec<u32>, StoreError> {
    let uid = find_uid(conn, device)?;
    let mut select = conn.prepare_cached("SELECT OPk_id FROM OPk WHERE Uid = ?1 ORDER BY id")?;
    let ids = select
        .query_map([uid], |row| row.get(0))?
        .collect::<Result<Vec<u32>, _>>()?;
    Ok(ids)
}

/// [`StoreStats`] in one statement (see `store/stats.rs`).
pub(super) fn stats(conn: &Connection, threshold: u32) -> Result<StoreStats, StoreError> {
    let sql = stats::statement(|name| format!("\"{name}\""), "?1", "INTEGER");
    let columns = conn.prepare_cached(&sql)?.query_row([threshold], |row| {
        let mut columns = [None; 9];
        for (index, column) in columns.iter_mut().enumerate() {
            *column = row.get::<_, Option<i64>>(index)?;
        }
        Ok(columns)
    })?;
    Ok(stats::from_columns(columns, threshold))
}

pub(super) fn device_report(
    conn: &Connection,
    device: &DeviceId,
    recent: u32,
) -> Result<Option<DeviceReport>, StoreError> {
    let found = conn
        .prepare_cached("SELECT Uid, SPk_id FROM Users WHERE UserId = ?1")?
        .query_row([device.as_str()], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, Option<u32>>(1)?))
        })
        .optional()?;
    let Some((uid, signed_pre_key_id)) = found else {
        return Ok(None);
    };
    let one_time_pre_keys = conn
        .prepare_cached("SELECT COUNT(*) FROM OPk WHERE Uid = ?1")?
        .query_row([uid], |row| row.get::<_, u64>(0))?;
    let recent_requests = |sql: &str| -> Result<Vec<BundleRequest>, StoreError> {
        let mut select = conn.prepare_cached(sql)?;
        let rows = select.query_map(params![device.as_str(), recent], |row| {
            Ok(BundleRequest {
                peer: row.get(0)?,
                at: row.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    };
    Ok(Some(DeviceReport {
        signed_pre_key_id,
        one_time_pre_keys,
        requests_as_source: recent_requests(
            "SELECT target, CAST(at AS TEXT) FROM Requests WHERE source = ?1 \
             ORDER BY at DESC LIMIT ?2",
        )?,
        requests_as_target: recent_requests(
            "SELECT source, CAST(at AS TEXT) FROM Requests WHERE target = ?1 \
             ORDER BY at DESC LIMIT ?2",
        )?,
    }))
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        StoreError::Backend(error.to_string())
    }
}
