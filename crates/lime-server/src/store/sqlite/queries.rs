//! The SQL of each store operation, run by the writer thread inside a transaction
//! it opened (see `mod.rs`). Functions here never commit: they succeed, or fail
//! and leave their savepoint to be rolled back.

use crate::store::{Registered, StoreError, StoreLimits};
use lime_protocol::{
    Curve, DeviceId, IdentityKey, KeyBundle, OneTimePreKey, PeerBundle, Registration, SignedPreKey,
};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashSet;

/// A stored device row, keys as stored (`SPk` may be NULL in databases written by
/// old servers).
struct DeviceRow {
    uid: i64,
    identity_key: Vec<u8>,
    signed_pre_key: Option<(Vec<u8>, Vec<u8>, u32)>,
}

fn find_device(conn: &Connection, device: &DeviceId) -> Result<Option<DeviceRow>, StoreError> {
    let mut select =
        conn.prepare_cached("SELECT Uid, Ik, SPk, SPk_sig, SPk_id FROM Users WHERE UserId = ?1")?;
    let row = select
        .query_row([device.as_str()], |row| {
            let spk: Option<Vec<u8>> = row.get(2)?;
            let sig: Option<Vec<u8>> = row.get(3)?;
            let id: Option<u32> = row.get(4)?;
            Ok(DeviceRow {
                uid: row.get(0)?,
                identity_key: row.get(1)?,
                signed_pre_key: spk.zip(sig).zip(id).map(|((spk, sig), id)| (spk, sig, id)),
            })
        })
        .optional()?;
    Ok(row)
}

fn find_uid(conn: &Connection, device: &DeviceId) -> Result<i64, StoreError> {
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
    let spk = &registration.signed_pre_key;
    if let Some(existing) = find_device(conn, device)? {
        let same_keys = existing.identity_key == registration.identity_key.as_bytes()
            && existing
                .signed_pre_key
                .as_ref()
                .is_some_and(|(public, signature, id)| {
                    public == spk.public() && signature == spk.signature() && *id == spk.id()
                });
        return if same_keys {
            Ok(Registered::AlreadyWithSameKeys)
        } else {
            Err(StoreError::DeviceRegisteredWithOtherKeys)
        };
    }
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
            if stored != key.public() {
                return Err(StoreError::ConflictingOneTimePreKeyId(key.id()));
            }
        }
    }
    let held: u64 = conn
        .prepare_cached("SELECT COUNT(*) FROM OPk WHERE Uid = ?1")?
        .query_row([uid], |row| row.get(0))?;
    let limit = limits.max_one_time_pre_keys_per_device;
    if held > u64::from(limit) {
        return Err(StoreError::TooManyOneTimePreKeys {
            would_hold: held,
            limit,
        });
    }
    Ok(())
}

pub(super) fn claim_key_bundles(
    conn: &Connection,
    curve: Curve,
    devices: Vec<DeviceId>,
) -> Result<Vec<PeerBundle>, StoreError> {
    // A device named twice in one request takes at most one OPk: only its first
    // occurrence claims one.
    let first_occurrence: Vec<bool> = {
        let mut seen = HashSet::with_capacity(devices.len());
        devices.iter().map(|device| seen.insert(device)).collect()
    };
    let mut claim = conn.prepare_cached(
        "DELETE FROM OPk WHERE id = (SELECT id FROM OPk WHERE Uid = ?1 LIMIT 1) RETURNING OPk, OPk_id",
    )?;
    let mut bundles = Vec::with_capacity(devices.len());
    for (device_id, may_claim) in devices.into_iter().zip(first_occurrence) {
        let Some(DeviceRow {
            uid,
            identity_key,
            signed_pre_key: Some((public, signature, id)),
        }) = find_device(conn, &device_id)?
        else {
            bundles.push(PeerBundle {
                device_id,
                bundle: None,
            });
            continue;
        };
        let one_time_pre_key = if may_claim {
            claim
                .query_row([uid], |row| {
                    Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, u32>(1)?))
                })
                .optional()?
                .map(|(public, id)| OneTimePreKey::new(curve, public, id))
                .transpose()
                .map_err(corrupt)?
        } else {
            None
        };
        let bundle = KeyBundle {
            identity_key: IdentityKey::new(curve, identity_key).map_err(corrupt)?,
            signed_pre_key: SignedPreKey::new(curve, public, signature, id).map_err(corrupt)?,
            one_time_pre_key,
        };
        bundles.push(PeerBundle {
            device_id,
            bundle: Some(bundle),
        });
    }
    Ok(bundles)
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

/// A stored key of the wrong size: the database holds something this curve's
/// clients cannot use. Refuse rather than send a malformed bundle.
fn corrupt(error: lime_protocol::WrongKeyLength) -> StoreError {
    StoreError::Backend(format!("stored key of the wrong size: {error}"))
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        StoreError::Backend(error.to_string())
    }
}
