//! The bundle claim of the SQL stores (MariaDB/MySQL and PostgreSQL), written
//! once: which devices are looked up, how each request is granted under the
//! limit, what is recorded, which one-time pre-keys are taken. Each backend
//! brings its statements through [`ClaimQueries`]; nothing here knows SQL, and
//! nothing here commits (the backend's transaction wraps the whole claim, and
//! runs it again when the database asks for that). SQLite's synchronous store
//! keeps its own loop.

use crate::store::in_doubt::{Claim, ClaimToken, ClaimedKey};
use crate::store::rules::{self, Grant, Received, SourceIdentity, StoredDevice, UserDevices};
use crate::store::{ClaimRequest, Claimed, SourceCheck, StoreError};
use lime_protocol::{Curve, DeviceId, PeerBundle};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

/// The statements of a claim, run on one connection inside its transaction.
pub(crate) trait ClaimQueries: Send {
    /// The backend's failure: a store answer or a database error.
    type Error: From<StoreError> + Send;

    /// Reserves `planned` requests in the count of `identity` for the current
    /// window of `window` (started afresh in a new window), and answers the
    /// count before them. Its row stays locked until the transaction ends, so
    /// that the claims of one identity take turns on every server and each
    /// counts what the others recorded. One statement: a claim whose devices
    /// are all granted in full needs no other write of the count.
    fn reserve_recorded(
        &mut self,
        identity: &SourceIdentity<'_>,
        window: Duration,
        planned: u64,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// Whether `device` is registered.
    fn device_exists(
        &mut self,
        device: &DeviceId,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// The stored devices among `devices`, by device id, read without locking.
    fn find_devices(
        &mut self,
        devices: &[DeviceId],
    ) -> impl Future<Output = Result<HashMap<String, StoredDevice>, Self::Error>> + Send;

    /// The bundles of `target` received within `window` by `source` and by the
    /// devices of its user (`devices`, when its id is a GRUU), and whether the
    /// request was recorded in `Requests`: it is when they are
    /// [`Received::below`] `bounds`.
    fn record_if_below(
        &mut self,
        target: &DeviceId,
        source: &DeviceId,
        devices: Option<&UserDevices<'_>>,
        window: Duration,
        bounds: Received,
    ) -> impl Future<Output = Result<(Received, bool), Self::Error>> + Send;

    /// Takes one of device `uid`'s one-time pre-keys that no concurrent claim
    /// holds, if any is left.
    fn claim_one_time_pre_key(
        &mut self,
        uid: i64,
    ) -> impl Future<Output = Result<Option<ClaimedKey>, Self::Error>> + Send;

    /// Deletes the claimed keys, when claiming did not delete them already.
    fn delete_claimed_keys(
        &mut self,
        keys: &[ClaimedKey],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Stores the identity's count of recorded requests, when fewer were
    /// granted in full than [`ClaimQueries::reserve_recorded`] reserved.
    fn update_recorded(
        &mut self,
        identity: &SourceIdentity<'_>,
        recorded: u64,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Inserts the claim's token beside the claim (see `store::in_doubt`).
    fn insert_claim_token(
        &mut self,
        token: &ClaimToken,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The tables of our own that a database has (MariaDB's may predate them).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClaimTables {
    /// `lime_rs_claims`: a claim that took keys inserts a token.
    pub claims: bool,
    /// `lime_rs_identity_requests`: an identity's recorded requests are counted.
    /// Without it they are not capped (the server warned at start).
    pub identities: bool,
}

/// The bundles, and what the transaction took: with `tables.claims`, a fresh
/// token is inserted beside the claim (see `store::in_doubt`).
pub(crate) async fn claim_key_bundles<Q: ClaimQueries>(
    queries: &mut Q,
    curve: Curve,
    tables: ClaimTables,
    (limit, (source, check), (devices, forwarded)): &ClaimRequest,
) -> Result<(Claimed, Claim), Q::Error> {
    let limit = limit.as_ref();
    let identity = SourceIdentity::of(source);
    let all: Vec<DeviceId> = devices.iter().chain(forwarded).cloned().collect();
    let repeats = rules::repeats(&all);
    // The identity's row first: it is locked until the end of the transaction,
    // so that the claims of one identity take turns on every server and each
    // counts what the others recorded (a locking statement: the transaction's
    // snapshot, where there is one, is taken later, after the lock was granted).
    // Every first occurrence of a device is reserved as if granted in full, so
    // that the usual claim writes the count only there; a rollback undoes it.
    let counts_recorded = limit.is_some() && tables.identities;
    let planned = repeats.iter().filter(|repeat| repeat.is_none()).count() as u64;
    let mut recorded = match limit {
        Some(limit) if counts_recorded => {
            queries
                .reserve_recorded(&identity, limit.window, planned)
                .await?
        }
        _ => 0,
    };
    let reserved = recorded + planned;
    if *check == SourceCheck::Registered && !queries.device_exists(source).await? {
        return Err(StoreError::DeviceNotFound.into());
    }
    let stored = queries.find_devices(devices).await?;
    let mut claimed = Vec::new();
    let mut grants = Vec::with_capacity(all.len());
    let mut answer = Claimed::default();
    for (index, (device_id, repeat)) in all.iter().zip(repeats).enumerate() {
        // A device a peer holds is granted as one held here would be.
        let held = index < devices.len();
        let device = stored
            .get(device_id.as_str())
            .filter(|device| held && device.signed_pre_key.is_some());
        let grant = match (held && device.is_none(), repeat, limit) {
            (true, _, _) => Grant::Refused,
            (false, Some(first), _) => rules::repeat_grant(grants[first]),
            (false, None, None) => Grant::Full,
            (false, None, Some(limit)) => {
                let bounds = rules::full_grant_bounds(recorded, limit);
                let (received, stored) = queries
                    .record_if_below(
                        device_id,
                        source,
                        identity.devices.as_ref(),
                        limit.window,
                        bounds,
                    )
                    .await?;
                let grant = rules::grant(source, device_id, received, recorded, limit);
                debug_assert_eq!(stored, grant == Grant::Full, "recorded as granted");
                if stored && counts_recorded {
                    recorded += 1;
                }
                grant
            }
        };
        grants.push(grant);
        if !held {
            answer.forward.push(grant == Grant::Full);
            continue;
        }
        let bundle = match device {
            Some(device) if grant.is_served() => {
                let one_time_pre_key = if grant == Grant::Full {
                    let key = queries.claim_one_time_pre_key(device.uid).await?;
                    let public = key.as_ref().map(|key| (key.public.clone(), key.key_id));
                    claimed.extend(key);
                    public
                } else {
                    None
                };
                rules::key_bundle(curve, device.clone(), one_time_pre_key)?
            }
            _ => None,
        };
        answer.bundles.push(PeerBundle {
            device_id: device_id.clone(),
            bundle,
        });
    }
    queries.delete_claimed_keys(&claimed).await?;
    if counts_recorded && recorded != reserved {
        queries.update_recorded(&identity, recorded).await?;
    }
    let token = if tables.claims && !claimed.is_empty() {
        let token = ClaimToken::new();
        queries.insert_claim_token(&token).await?;
        Some(token)
    } else {
        None
    };
    Ok((
        answer,
        Claim {
            token,
            keys: claimed,
        },
    ))
}
