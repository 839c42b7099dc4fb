//! The SQL of each store operation, run inside a transaction that
//! `transaction.rs` opened and will end. Functions here never commit: they
//! succeed, or fail and leave the transaction to be rolled back. What the rows
//! mean is decided by `rules`, as for every backend.
//!
//! A device is found through the unique index on `md5("UserId")` (see
//! `schema.rs`), with `"UserId" = $1` checked as well, so a digest collision can
//! never answer for another device.

use super::transaction::Failure;
use crate::store::claim::{self, ClaimQueries, ClaimTables, Recorded, Reservation};
use crate::store::in_doubt::{Claim, ClaimToken, ClaimedKey, Settled, TOKEN_LIFETIME};
use crate::store::rules::{self, Received, SourceIdentity, StoredDevice, UserDevices};
use crate::store::stats::{self, StoreStats};
use crate::store::{
    BundleRequest, ClaimRequest, Claimed, DeviceReport, PURGE_CHUNK, Registered, StoreError,
    StoreLimits,
};
use lime_protocol::{Curve, DeviceId, OneTimePreKey, Registration, SignedPreKey};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Each statement is prepared once per connection (sqlx caches it).
const FIND_DEVICE: &str = r#"SELECT "Uid", "Ik", "SPk", "SPk_sig", "SPk_id" FROM "Users"
    WHERE md5("UserId") = md5($1) AND "UserId" = $1"#;

/// The stored devices among the ids `$ids` (a text array), in one statement
/// through the same unique index (its md5s computed once, as an array the index
/// scan takes), with the ids themselves checked as well.
macro_rules! find_devices {
    ($ids:literal) => {
        concat!(
            r#"SELECT "UserId", "Uid", "Ik", "SPk", "SPk_sig", "SPk_id" FROM "Users"
    WHERE md5("UserId") = ANY (ARRAY(SELECT md5(id) FROM unnest("#,
            $ids,
            r#"::text[]) AS id))
    AND "UserId" = ANY ("#,
            $ids,
            r#"::text[])"#
        )
    };
}
const FIND_DEVICES: &str = find_devices!("$1");

/// Locks the device's row for the rest of the transaction, so that two uploads
/// for one device take turns and its key count is exact.
const LOCK_DEVICE: &str = r#"SELECT "Uid" FROM "Users"
    WHERE md5("UserId") = md5($1) AND "UserId" = $1 FOR NO KEY UPDATE"#;

/// Inserts the device unless it exists; when another transaction is inserting
/// it at the same moment, waits for that one and then inserts nothing.
const INSERT_DEVICE: &str = r#"INSERT INTO "Users" ("UserId", "Ik", "SPk", "SPk_sig", "SPk_id")
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT ((md5("UserId"))) DO NOTHING
    RETURNING "Uid""#;

const DELETE_DEVICE: &str =
    r#"DELETE FROM "Users" WHERE md5("UserId") = md5($1) AND "UserId" = $1"#;

const REPLACE_SIGNED_PRE_KEY: &str = r#"UPDATE "Users" SET "SPk" = $2, "SPk_sig" = $3, "SPk_id" = $4
    WHERE md5("UserId") = md5($1) AND "UserId" = $1"#;

/// Inserts a batch of keys in one statement, skipping ids the device already
/// uses; answers the ids inserted and how many keys the device held before (the
/// statement's snapshot does not see its own inserts).
const INSERT_ONE_TIME_PRE_KEYS: &str = r#"WITH inserted AS (
        INSERT INTO "OPk" ("Uid", "OPk", "OPk_id")
        SELECT $1, upload.key, upload.id FROM unnest($2::bytea[], $3::bigint[]) AS upload(key, id)
        ON CONFLICT ("Uid", "OPk_id") DO NOTHING
        RETURNING "OPk_id")
    SELECT (SELECT count(*) FROM "OPk" WHERE "Uid" = $1) AS held_before,
           ARRAY(SELECT "OPk_id" FROM inserted) AS inserted_ids"#;

const STORED_ONE_TIME_PRE_KEYS: &str =
    r#"SELECT "OPk_id", "OPk" FROM "OPk" WHERE "Uid" = $1 AND "OPk_id" = ANY($2)"#;

/// The one-time key claim: takes one of the device's keys (device `$uid`) that
/// no concurrent transaction holds, and deletes it, in one statement, when the
/// condition `$and` holds. `SKIP LOCKED` lets concurrent claims for one device
/// take different keys instead of queueing.
macro_rules! claim_one_time_pre_key {
    ($uid:literal, $and:literal) => {
        concat!(
            r#"DELETE FROM "OPk" WHERE "id" = (
        SELECT "id" FROM "OPk" WHERE "Uid" = "#,
            $uid,
            $and,
            r#" LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING "id", "Uid", "OPk", "OPk_id""#
        )
    };
}
const CLAIM_ONE_TIME_PRE_KEY: &str = claim_one_time_pre_key!("$1", "");

/// Beside a claim that took keys, in its transaction (see `store::in_doubt`).
const COUNT_USER_DEVICES: &str = r#"SELECT COUNT(*) FROM "Users" WHERE starts_with("UserId", $1)"#;

/// The one-time key claim of [`CLAIM_ONE_TIME_PRE_KEY`] for each device of $1
/// (distinct uids), in one statement.
const CLAIM_ONE_TIME_PRE_KEYS: &str = r#"DELETE FROM "OPk" WHERE "id" IN (
        SELECT "taken"."id" FROM unnest($1::bigint[]) AS "device" ("uid")
        CROSS JOIN LATERAL (SELECT "id" FROM "OPk" WHERE "Uid" = "device"."uid"
            LIMIT 1 FOR UPDATE SKIP LOCKED) AS "taken")
    RETURNING "id", "Uid", "OPk", "OPk_id""#;

/// A request of source $1 recorded for each target of $2.
const RECORD_REQUESTS: &str = r#"INSERT INTO "Requests" ("source", "target")
    SELECT $1, "target" FROM unnest($2::text[]) AS "target""#;

/// `count_bundle_requests` for each target of $1, by target, through the same
/// index.
const COUNT_BUNDLE_REQUESTS_BY_TARGET: &str = r#"SELECT "target", COUNT(*), COUNT(*)
    FROM "Requests"
    WHERE md5("target") = ANY (ARRAY(SELECT md5("id") FROM unnest($1::text[]) AS "id"))
    AND md5(split_part("source", ';gr=', 1)) = md5(split_part($2, ';gr=', 1))
    AND "target" = ANY ($1) AND "source" = $2 AND "at" > now() - make_interval(secs => $3)
    GROUP BY "target""#;

/// `count_identity_bundle_requests` for each target of $1, by target.
const COUNT_IDENTITY_BUNDLE_REQUESTS_BY_TARGET: &str = r#"SELECT "target",
        COUNT(*) FILTER (WHERE "source" = $2), COUNT(*) FROM "Requests"
    WHERE md5("target") = ANY (ARRAY(SELECT md5("id") FROM unnest($1::text[]) AS "id"))
    AND md5(split_part("source", ';gr=', 1)) = md5($3)
    AND "target" = ANY ($1) AND starts_with("source", $4) AND "at" > now() - make_interval(secs => $5)
    GROUP BY "target""#;

/// The bundles of target $1 that source $2 received within the window ($3
/// seconds), served by the index on `(md5(target), md5(identity), at)` where
/// the identity is what comes before `;gr=` (the whole id when there is none).
macro_rules! count_bundle_requests {
    () => {
        r#"SELECT COUNT(*) FROM "Requests"
    WHERE md5("target") = md5($1) AND md5(split_part("source", ';gr=', 1)) = md5(split_part($2, ';gr=', 1))
    AND "target" = $1 AND "source" = $2 AND "at" > now() - make_interval(secs => $3)"#
    };
}

/// The bundles of target $1 received within the window ($5 seconds) by source
/// $2 and by all the devices of its identity $3 (the device ids that start with
/// $4, `identity;gr=`), through the same index.
macro_rules! count_identity_bundle_requests {
    () => {
        r#"SELECT
        COUNT(*) FILTER (WHERE "source" = $2), COUNT(*) FROM "Requests"
    WHERE md5("target") = md5($1) AND md5(split_part("source", ';gr=', 1)) = md5($3)
    AND "target" = $1 AND starts_with("source", $4) AND "at" > now() - make_interval(secs => $5)"#
    };
}

/// A target's bundles counted by `$count` into the columns `$columns` of
/// "received"; the request recorded when `$below` holds, and then one of device
/// `$uid`'s one-time pre-keys taken (none when it is NULL): one statement,
/// answering the counts `$answer`, whether it recorded, and the key.
macro_rules! record_if_below {
    ($columns:literal, $count:ident, $below:literal, $uid:literal, $answer:literal) => {
        concat!(
            r#"WITH "received" "#,
            $columns,
            " AS (",
            $count!(),
            r#"), "recorded" AS (
        INSERT INTO "Requests" ("source", "target") SELECT $2, $1 FROM "received"
        WHERE "#,
            $below,
            r#" RETURNING 1), "claimed" AS ("#,
            claim_one_time_pre_key!($uid, r#" AND EXISTS (SELECT 1 FROM "recorded")"#),
            r#")
    SELECT "#,
            $answer,
            r#", EXISTS (SELECT 1 FROM "recorded"),
        "id", "Uid", "OPk", "OPk_id" FROM "received" LEFT JOIN "claimed" ON true"#
        )
    };
}

/// For a source whose id is not a GRUU: below $4 and $5 (the bounds by device
/// and by identity, which are the same count here), a key of device $6.
const RECORD_IF_BELOW: &str = record_if_below!(
    r#"("by_device")"#,
    count_bundle_requests,
    r#""by_device" < $4 AND "by_device" < $5"#,
    "$6",
    r#""by_device", "by_device""#
);

/// For a GRUU: below $6 (by device) and $7 (by identity), a key of device $8.
const RECORD_IF_BELOW_FOR_IDENTITY: &str = record_if_below!(
    r#"("by_device", "by_identity")"#,
    count_identity_bundle_requests,
    r#""by_device" < $6 AND "by_identity" < $7"#,
    "$8",
    r#""by_device", "by_identity""#
);

/// The identity's row, started afresh in a new window (fixed windows, aligned on
/// multiples of the window since the epoch, by the database's clock), locked
/// until the transaction ends: the claims of one identity take turns on every
/// server. Adds the $3 requests planned, and answers the count before them.
macro_rules! reserve_recorded {
    () => {
        r#"INSERT INTO "lime_rs_identity_requests" AS row
        ("identity", "window_start", "recorded")
    VALUES ($1, floor(extract(epoch FROM now()) / $2)::bigint * $2, $3)
    ON CONFLICT ("identity") DO UPDATE SET
        "recorded" = CASE WHEN row."window_start" = EXCLUDED."window_start"
            THEN row."recorded" ELSE 0 END + $3,
        "window_start" = EXCLUDED."window_start"
    RETURNING "recorded" - $3"#
    };
}

/// `reserve_recorded`, then the stored devices among the ids $4 (see
/// `find_devices!`; one row with only the count when none is stored), in one
/// statement. The devices are looked up in the statement's snapshot, taken
/// before the identity's row was locked: a registration committed while the
/// claim waited for the row is not seen, as if the claim had come first (a
/// client fetches bundles once its registration was answered).
const START_CLAIM: &str = concat!(
    r#"WITH "reserved" ("before") AS ("#,
    reserve_recorded!(),
    r#")
    SELECT "before", "found".* FROM "reserved" LEFT JOIN ("#,
    find_devices!("$4"),
    r#") AS "found" ON true"#
);

/// The row of a registering device's identity, inserted when missing (window 0,
/// which every claim takes for an old one) and locked until the transaction
/// ends: the registrations of one user take turns on every server, and each
/// counts the devices the others committed.
const LOCK_IDENTITY: &str = r#"INSERT INTO "lime_rs_identity_requests" AS row
        ("identity", "window_start", "recorded")
    VALUES ($1, 0, 0)
    ON CONFLICT ("identity") DO UPDATE SET "window_start" = row."window_start""#;

const UPDATE_RECORDED: &str =
    r#"UPDATE "lime_rs_identity_requests" SET "recorded" = $2 WHERE "identity" = $1"#;

const PURGE_REQUESTS: &str = r#"DELETE FROM "Requests" WHERE ctid IN (
    SELECT ctid FROM "Requests" WHERE "at" < now() - make_interval(secs => $1) LIMIT $2)"#;

const INSERT_CLAIM_TOKEN: &str = r#"INSERT INTO "lime_rs_claims" ("token") VALUES ($1)"#;

/// Settling a claim in doubt starts with inserting its token: this waits for the
/// claim's transaction if it is still open, and a conflict means it committed.
const FENCE_CLAIM_TOKEN: &str =
    r#"INSERT INTO "lime_rs_claims" ("token") VALUES ($1) ON CONFLICT DO NOTHING"#;

const DELETE_CLAIM_TOKEN: &str = r#"DELETE FROM "lime_rs_claims" WHERE "token" = $1"#;

/// Puts a claimed key back as it was, unless its device is gone or uses its
/// id again.
const RESTORE_ONE_TIME_PRE_KEY: &str = r#"INSERT INTO "OPk" ("id", "Uid", "OPk", "OPk_id")
    SELECT $1, "Uid", $2, $3 FROM "Users" WHERE "Uid" = $4
    ON CONFLICT DO NOTHING"#;

/// One batch of old tokens.
const PURGE_CLAIM_TOKENS: &str = r#"DELETE FROM "lime_rs_claims" WHERE "token" IN (
        SELECT "token" FROM "lime_rs_claims"
        WHERE "claimed_at" < now() - make_interval(secs => $1) LIMIT $2)"#;

/// The device's key ids, oldest first; one row with a NULL id for a device
/// without keys, no row for an unknown device.
const ONE_TIME_PRE_KEY_IDS: &str = r#"SELECT "OPk"."OPk_id" FROM "Users"
    LEFT JOIN "OPk" ON "OPk"."Uid" = "Users"."Uid"
    WHERE md5("Users"."UserId") = md5($1) AND "Users"."UserId" = $1
    ORDER BY "OPk"."id""#;

/// How many times registration looks again for a device that a concurrent
/// transaction inserted and then deleted before we could read it.
const REGISTRATION_ROUNDS: usize = 3;

async fn find_device(
    conn: &mut PgConnection,
    device: &DeviceId,
) -> Result<Option<StoredDevice>, Failure> {
    let row = sqlx::query(FIND_DEVICE)
        .bind(device.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|row| stored_device(&row)).transpose()
}

fn stored_device(row: &PgRow) -> Result<StoredDevice, Failure> {
    let spk_id = row
        .try_get::<Option<i64>, _>("SPk_id")?
        .map(|id| key_id(id, "SPk_id"))
        .transpose()?;
    Ok(StoredDevice::from_columns(
        row.try_get("Uid")?,
        row.try_get("Ik")?,
        row.try_get("SPk")?,
        row.try_get("SPk_sig")?,
        spk_id,
    ))
}

/// The stored devices among `devices` and `source`, by device id, read without
/// locking: one statement, whatever the number of devices.
async fn find_devices(
    conn: &mut PgConnection,
    devices: &[DeviceId],
    source: Option<&DeviceId>,
) -> Result<HashMap<String, StoredDevice>, Failure> {
    let rows = sqlx::query(FIND_DEVICES)
        .bind(device_ids(devices, source))
        .fetch_all(conn)
        .await?;
    stored_devices(&rows)
}

/// The ids of `devices` and `source`, as the text array of `find_devices!`.
fn device_ids<'d>(devices: &'d [DeviceId], source: Option<&'d DeviceId>) -> Vec<&'d str> {
    devices.iter().chain(source).map(DeviceId::as_str).collect()
}

/// The devices of rows of `find_devices!`, by device id (a row without one, of
/// `START_CLAIM`, is none).
fn stored_devices(rows: &[PgRow]) -> Result<HashMap<String, StoredDevice>, Failure> {
    let mut stored = HashMap::with_capacity(rows.len());
    for row in rows {
        if let Some(id) = row.try_get::<Option<String>, _>("UserId")? {
            stored.insert(id, stored_device(row)?);
        }
    }
    Ok(stored)
}

/// A u32 id stored in a BIGINT column (its CHECK keeps it in range).
fn key_id(stored: i64, column: &str) -> Result<u32, Failure> {
    u32::try_from(stored).map_err(|_| {
        Failure::Store(StoreError::Backend(format!(
            "stored {column} {stored} is not a u32"
        )))
    })
}

pub(super) async fn register_device(
    conn: &mut PgConnection,
    limits: StoreLimits,
    device: &DeviceId,
    registration: &Registration,
) -> Result<Registered, Failure> {
    let spk = &registration.signed_pre_key;
    // Read committed: the statements after the lock see what the registrations
    // before it committed.
    sqlx::query(LOCK_IDENTITY)
        .bind(SourceIdentity::of(device).key().as_slice())
        .execute(&mut *conn)
        .await?;
    for _ in 0..REGISTRATION_ROUNDS {
        if let Some(existing) = find_device(conn, device).await? {
            return Ok(rules::reregistration(&existing, registration)?);
        }
        if let Some(range) = rules::user_devices(device).filter(|_| limits.max_devices_per_user > 0)
        {
            let devices: i64 = sqlx::query_scalar(COUNT_USER_DEVICES)
                .bind(range.start)
                .fetch_one(&mut *conn)
                .await?;
            rules::device_limit(range.user, devices as u64, &limits)?;
        }
        let inserted = sqlx::query(INSERT_DEVICE)
            .bind(device.as_str())
            .bind(registration.identity_key.as_bytes())
            .bind(spk.public())
            .bind(spk.signature())
            .bind(i64::from(spk.id()))
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = inserted {
            let uid: i64 = row.try_get("Uid")?;
            insert_one_time_pre_keys(conn, limits, uid, &registration.one_time_pre_keys).await?;
            return Ok(Registered::New);
        }
        // Another server registered the device meanwhile and has committed:
        // read committed, the next statement sees its row, and the rules decide.
    }
    Err(Failure::Store(StoreError::Backend(format!(
        "device {device} kept appearing and disappearing during registration"
    ))))
}

pub(super) async fn delete_device(
    conn: &mut PgConnection,
    device: &DeviceId,
) -> Result<(), Failure> {
    // OPk rows go with it: ON DELETE CASCADE.
    sqlx::query(DELETE_DEVICE)
        .bind(device.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn replace_signed_pre_key(
    conn: &mut PgConnection,
    device: &DeviceId,
    key: &SignedPreKey,
) -> Result<(), Failure> {
    let changed = sqlx::query(REPLACE_SIGNED_PRE_KEY)
        .bind(device.as_str())
        .bind(key.public())
        .bind(key.signature())
        .bind(i64::from(key.id()))
        .execute(&mut *conn)
        .await?
        .rows_affected();
    match changed {
        0 => Err(StoreError::DeviceNotFound.into()),
        _ => Ok(()),
    }
}

pub(super) async fn add_one_time_pre_keys(
    conn: &mut PgConnection,
    limits: StoreLimits,
    device: &DeviceId,
    keys: &[OneTimePreKey],
) -> Result<(), Failure> {
    let uid: i64 = sqlx::query(LOCK_DEVICE)
        .bind(device.as_str())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StoreError::DeviceNotFound)?
        .try_get("Uid")?;
    insert_one_time_pre_keys(conn, limits, uid, keys).await
}

/// Inserts keys for device `uid`: a key identical to a stored one is skipped, an
/// id already used for other bytes fails, and so does going past the limit.
async fn insert_one_time_pre_keys(
    conn: &mut PgConnection,
    limits: StoreLimits,
    uid: i64,
    keys: &[OneTimePreKey],
) -> Result<(), Failure> {
    if keys.is_empty() {
        return Ok(());
    }
    let publics: Vec<&[u8]> = keys.iter().map(OneTimePreKey::public).collect();
    let ids: Vec<i64> = keys.iter().map(|key| i64::from(key.id())).collect();
    let row = sqlx::query(INSERT_ONE_TIME_PRE_KEYS)
        .bind(uid)
        .bind(&publics)
        .bind(&ids)
        .fetch_one(&mut *conn)
        .await?;
    let held_before: i64 = row.try_get("held_before")?;
    let inserted_ids: Vec<i64> = row.try_get("inserted_ids")?;

    // The keys not inserted (each inserted id accounts for one uploaded key)
    // had an id the device already used: compare them with what is stored.
    let mut inserted: HashMap<i64, usize> = HashMap::with_capacity(inserted_ids.len());
    for id in &inserted_ids {
        *inserted.entry(*id).or_default() += 1;
    }
    let skipped: Vec<&OneTimePreKey> = keys
        .iter()
        .filter(|key| match inserted.get_mut(&i64::from(key.id())) {
            Some(count) if *count > 0 => {
                *count -= 1;
                false
            }
            _ => true,
        })
        .collect();
    if !skipped.is_empty() {
        let skipped_ids: Vec<i64> = skipped.iter().map(|key| i64::from(key.id())).collect();
        let stored: HashMap<i64, Vec<u8>> = sqlx::query(STORED_ONE_TIME_PRE_KEYS)
            .bind(uid)
            .bind(&skipped_ids)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|row| Ok((row.try_get("OPk_id")?, row.try_get("OPk")?)))
            .collect::<Result<_, sqlx::Error>>()?;
        for key in skipped {
            let stored_public = stored.get(&i64::from(key.id())).ok_or_else(|| {
                StoreError::Backend(format!("OPk id {} neither inserted nor stored", key.id()))
            })?;
            rules::existing_one_time_pre_key(stored_public, key)?;
        }
    }

    let held = u64::try_from(held_before).unwrap_or(0) + inserted_ids.len() as u64;
    Ok(rules::one_time_pre_key_limit(held, &limits)?)
}

/// The bundles, and what the transaction took (see `store::claim`).
pub(super) async fn claim_key_bundles(
    conn: &mut PgConnection,
    curve: Curve,
    claims_table: bool,
    request: &ClaimRequest,
) -> Result<(Claimed, Claim), Failure> {
    let tables = ClaimTables {
        claims: claims_table,
        identities: true,
    };
    claim::claim_key_bundles(conn, curve, tables, request).await
}

impl ClaimQueries for PgConnection {
    type Error = Failure;

    /// The reservation and the look-up in one statement when both are asked.
    async fn start_claim(
        &mut self,
        reservation: Option<Reservation<'_>>,
        devices: &[DeviceId],
        source: Option<&DeviceId>,
    ) -> Result<(u64, HashMap<String, StoredDevice>), Failure> {
        let Some(reservation) = reservation else {
            return Ok((0, find_devices(self, devices, source).await?));
        };
        let rows = sqlx::query(START_CLAIM)
            .bind(reservation.identity.key().as_slice())
            .bind(reservation.window.as_secs() as i64)
            .bind(reservation.planned as i64)
            .bind(device_ids(devices, source))
            .fetch_all(&mut *self)
            .await?;
        let recorded: i64 = match rows.first() {
            Some(row) => row.try_get("before")?,
            None => {
                return Err(Failure::Store(StoreError::Backend(
                    "the reservation answered no row".into(),
                )));
            }
        };
        Ok((recorded as u64, stored_devices(&rows)?))
    }

    /// The count, the insert and the key in one statement.
    async fn record_if_below(
        &mut self,
        target: &DeviceId,
        source: &DeviceId,
        devices: Option<&UserDevices<'_>>,
        window: Duration,
        bounds: Received,
        claim_from: Option<i64>,
    ) -> Result<Recorded, Failure> {
        let (by_device, by_identity) = (bounds.by_device as i64, bounds.by_identity as i64);
        let query = match devices {
            None => sqlx::query(RECORD_IF_BELOW)
                .bind(target.as_str())
                .bind(source.as_str())
                .bind(window.as_secs_f64()),
            Some(user) => sqlx::query(RECORD_IF_BELOW_FOR_IDENTITY)
                .bind(target.as_str())
                .bind(source.as_str())
                .bind(user.user)
                .bind(user.start)
                .bind(window.as_secs_f64()),
        };
        let row = query
            .bind(by_device)
            .bind(by_identity)
            .bind(claim_from)
            .fetch_one(&mut *self)
            .await?;
        let key = match row.try_get::<Option<i64>, _>(3)? {
            Some(id) => Some(ClaimedKey {
                id,
                uid: row.try_get(4)?,
                public: row.try_get(5)?,
                key_id: key_id(row.try_get(6)?, "OPk_id")?,
            }),
            None => None,
        };
        Ok(Recorded {
            received: Received::from_counts(row.try_get(0)?, row.try_get(1)?),
            recorded: row.try_get(2)?,
            key,
        })
    }

    /// One by one, a device takes one statement (see `record_if_below`); in
    /// batches, a request takes three.
    const BATCH_FROM: usize = 3;

    async fn received_by_targets<'t>(
        &mut self,
        targets: &[&'t DeviceId],
        source: &DeviceId,
        devices: Option<&UserDevices<'_>>,
        window: Duration,
    ) -> Result<HashMap<&'t str, Received>, Failure> {
        let ids: Vec<&'t str> = targets.iter().map(|target| target.as_str()).collect();
        let query = match devices {
            None => sqlx::query(COUNT_BUNDLE_REQUESTS_BY_TARGET)
                .bind(&ids)
                .bind(source.as_str()),
            Some(user) => sqlx::query(COUNT_IDENTITY_BUNDLE_REQUESTS_BY_TARGET)
                .bind(&ids)
                .bind(source.as_str())
                .bind(user.user)
                .bind(user.start),
        };
        let rows = query
            .bind(window.as_secs_f64())
            .fetch_all(&mut *self)
            .await?;
        let requested: HashSet<&'t str> = ids.iter().copied().collect();
        let mut received = HashMap::with_capacity(rows.len());
        for row in rows {
            let target: &str = row.try_get(0)?;
            // Compared exactly: the row's target is one of the requested ids.
            if let Some(&id) = requested.get(target) {
                received.insert(id, Received::from_counts(row.try_get(1)?, row.try_get(2)?));
            }
        }
        Ok(received)
    }

    /// No statement for no device; one device's key through
    /// [`CLAIM_ONE_TIME_PRE_KEY`]: its plan costs less than the `LATERAL` join
    /// over an array of one (a request of one device with the limit off: 0.30
    /// ms of database CPU instead of 0.49 in the benchmarks).
    async fn claim_one_time_pre_keys(
        &mut self,
        uids: &[i64],
    ) -> Result<HashMap<i64, ClaimedKey>, Failure> {
        let query = match uids {
            [] => return Ok(HashMap::new()),
            [uid] => sqlx::query(CLAIM_ONE_TIME_PRE_KEY).bind(*uid),
            _ => sqlx::query(CLAIM_ONE_TIME_PRE_KEYS).bind(uids),
        };
        let rows = query.fetch_all(&mut *self).await?;
        rows.iter()
            .map(|row| claimed_key(row).map(|key| (key.uid, key)))
            .collect()
    }

    async fn record_requests(
        &mut self,
        targets: &[&DeviceId],
        source: &DeviceId,
    ) -> Result<(), Failure> {
        let ids: Vec<&str> = targets.iter().map(|target| target.as_str()).collect();
        sqlx::query(RECORD_REQUESTS)
            .bind(source.as_str())
            .bind(&ids)
            .execute(&mut *self)
            .await?;
        Ok(())
    }

    /// Claiming deleted them already, in the same statement.
    async fn delete_claimed_keys(&mut self, _keys: &[ClaimedKey]) -> Result<(), Failure> {
        Ok(())
    }

    async fn update_recorded(
        &mut self,
        identity: &SourceIdentity<'_>,
        recorded: u64,
    ) -> Result<(), Failure> {
        sqlx::query(UPDATE_RECORDED)
            .bind(identity.key().as_slice())
            .bind(recorded as i64)
            .execute(&mut *self)
            .await?;
        Ok(())
    }

    async fn insert_claim_token(&mut self, token: &ClaimToken) -> Result<(), Failure> {
        sqlx::query(INSERT_CLAIM_TOKEN)
            .bind(token.as_bytes())
            .execute(&mut *self)
            .await?;
        Ok(())
    }
}

/// A one-time pre-key as a claim statement returns it.
fn claimed_key(row: &PgRow) -> Result<ClaimedKey, Failure> {
    Ok(ClaimedKey {
        id: row.try_get("id")?,
        uid: row.try_get("Uid")?,
        public: row.try_get("OPk")?,
        key_id: key_id(row.try_get("OPk_id")?, "OPk_id")?,
    })
}

/// Deletes at most [`PURGE_CHUNK`] `Requests` rows older than `retention`.
pub(super) async fn purge_requests(
    conn: &mut PgConnection,
    retention: Duration,
) -> Result<u64, Failure> {
    Ok(sqlx::query(PURGE_REQUESTS)
        .bind(retention.as_secs_f64())
        .bind(PURGE_CHUNK as i64)
        .execute(&mut *conn)
        .await?
        .rows_affected())
}

/// Settles a claim whose COMMIT went unanswered (see `store::in_doubt`).
pub(super) async fn settle_claim(
    conn: &mut PgConnection,
    token: &ClaimToken,
    keys: &[ClaimedKey],
) -> Result<Settled, Failure> {
    let fenced = sqlx::query(FENCE_CLAIM_TOKEN)
        .bind(token.as_bytes())
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let settled = if fenced == 1 {
        Settled::RolledBack
    } else {
        let mut restored = 0;
        for key in keys {
            restored += sqlx::query(RESTORE_ONE_TIME_PRE_KEY)
                .bind(key.id)
                .bind(&key.public)
                .bind(i64::from(key.key_id))
                .bind(key.uid)
                .execute(&mut *conn)
                .await?
                .rows_affected();
        }
        Settled::Restored(restored)
    };
    sqlx::query(DELETE_CLAIM_TOKEN)
        .bind(token.as_bytes())
        .execute(&mut *conn)
        .await?;
    Ok(settled)
}

/// Deletes tokens older than `TOKEN_LIFETIME`, a batch per statement.
pub(super) async fn purge_claim_tokens(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    const BATCH: i64 = 1000;
    let mut purged = 0;
    loop {
        let deleted = sqlx::query(PURGE_CLAIM_TOKENS)
            .bind(TOKEN_LIFETIME.as_secs_f64())
            .bind(BATCH)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        purged += deleted;
        if deleted < BATCH as u64 {
            return Ok(purged);
        }
    }
}

/// [`StoreStats`] in one statement (see `store/stats.rs`).
pub(super) async fn stats(conn: &mut PgConnection, threshold: u32) -> Result<StoreStats, Failure> {
    let sql = stats::statement(|name| format!("\"{name}\""), "$1", "BIGINT");
    let row = sqlx::query(&sql)
        .bind(i64::from(threshold))
        .fetch_one(&mut *conn)
        .await?;
    let mut columns = [None; 9];
    for (index, column) in columns.iter_mut().enumerate() {
        *column = row.try_get::<Option<i64>, _>(index)?;
    }
    Ok(stats::from_columns(columns, threshold))
}

pub(super) async fn one_time_pre_key_ids(
    conn: &mut PgConnection,
    device: &DeviceId,
) -> Result<Vec<u32>, Failure> {
    let rows = sqlx::query(ONE_TIME_PRE_KEY_IDS)
        .bind(device.as_str())
        .fetch_all(&mut *conn)
        .await?;
    if rows.is_empty() {
        return Err(StoreError::DeviceNotFound.into());
    }
    let mut ids = Vec::with_capacity(rows.len());
    for row in &rows {
        if let Some(id) = row.try_get::<Option<i64>, _>("OPk_id")? {
            ids.push(key_id(id, "OPk_id")?);
        }
    }
    Ok(ids)
}

pub(super) async fn device_report(
    conn: &mut PgConnection,
    device: &DeviceId,
    recent: u32,
) -> Result<Option<DeviceReport>, Failure> {
    let found = sqlx::query(
        r#"SELECT "Uid", "SPk_id" FROM "Users"
           WHERE md5("UserId") = md5($1) AND "UserId" = $1"#,
    )
    .bind(device.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(found) = found else {
        return Ok(None);
    };
    let uid: i64 = found.try_get("Uid")?;
    let signed_pre_key_id = found
        .try_get::<Option<i64>, _>("SPk_id")?
        .map(|id| key_id(id, "SPk_id"))
        .transpose()?;
    let one_time_pre_keys: i64 =
        sqlx::query_scalar(r#"SELECT COUNT(*) FROM "OPk" WHERE "Uid" = $1"#)
            .bind(uid)
            .fetch_one(&mut *conn)
            .await?;
    let mut requests = Vec::new();
    for sql in [
        r#"SELECT "target", to_char("at" AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
           FROM "Requests" WHERE "source" = $1 ORDER BY "at" DESC LIMIT $2"#,
        r#"SELECT "source", to_char("at" AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
           FROM "Requests" WHERE md5("target") = md5($1) AND "target" = $1
           ORDER BY "at" DESC LIMIT $2"#,
    ] {
        let rows = sqlx::query(sql)
            .bind(device.as_str())
            .bind(i64::from(recent))
            .fetch_all(&mut *conn)
            .await?;
        let mut found = Vec::with_capacity(rows.len());
        for row in &rows {
            found.push(BundleRequest {
                peer: row.try_get(0)?,
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
