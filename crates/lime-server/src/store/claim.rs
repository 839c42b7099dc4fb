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

    /// The requests recorded for `identity` in the current window of `window`,
    /// its row locked until the transaction ends (so that the claims of one
    /// identity take turns on every server), started afresh in a new window.
    fn recorded_in_window(
        &mut self,
        identity: &SourceIdentity<'_>,
        window: Duration,
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

    /// The bundles of `target` that `source` received within `window`.
    fn received_by_device(
        &mut self,
        target: &DeviceId,
        source: &DeviceId,
        window: Duration,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// The bundles of `target` that `source`, and all the devices of its user,
    /// received within `window`.
    fn received_by_identity(
        &mut self,
        target: &DeviceId,
        source: &DeviceId,
        devices: &UserDevices<'_>,
        window: Duration,
    ) -> impl Future<Output = Result<Received, Self::Error>> + Send;

    /// Records one granted request in `Requests`.
    fn record_bundle_request(
        &mut self,
        source: &DeviceId,
        target: &DeviceId,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

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

    /// Stores the identity's count of recorded requests.
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
    // The identity's row first: it is locked until the end of the transaction,
    // so that the claims of one identity take turns on every server and each
    // counts what the others recorded (a locking statement: the transaction's
    // snapshot, where there is one, is taken later, after the lock was granted).
    let counts_recorded = limit.is_some() && tables.identities;
    let mut recorded = match limit {
        Some(limit) if counts_recorded => {
            queries.recorded_in_window(&identity, limit.window).await?
        }
        _ => 0,
    };
    let recorded_before = recorded;
    if *check == SourceCheck::Registered && !queries.device_exists(source).await? {
        return Err(StoreError::DeviceNotFound.into());
    }
    let all: Vec<DeviceId> = devices.iter().chain(forwarded).cloned().collect();
    let repeats = rules::repeats(&all);
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
                let received = match &identity.devices {
                    None => {
                        let by_device = queries
                            .received_by_device(device_id, source, limit.window)
                            .await?;
                        Received {
                            by_device,
                            by_identity: by_device,
                        }
                    }
                    Some(user) => {
                        queries
                            .received_by_identity(device_id, source, user, limit.window)
                            .await?
                    }
                };
                let grant = rules::grant(source, device_id, received, recorded, limit);
                if grant == Grant::Full {
                    queries.record_bundle_request(source, device_id).await?;
                    if counts_recorded {
                        recorded += 1;
                    }
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
    if recorded != recorded_before {
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
