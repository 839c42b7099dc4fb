//! The bundle claim of the SQL stores (MariaDB/MySQL and PostgreSQL), written
//! once: which devices are looked up, how each request is granted under the
//! limit, what is recorded, which one-time pre-keys are taken. Each backend
//! brings its statements through [`ClaimQueries`]; nothing here knows SQL, and
//! nothing here commits (the backend's transaction wraps the whole claim, and
//! runs it again when the database asks for that). SQLite's synchronous store
//! keeps its own loop.

use crate::store::in_doubt::{Claim, ClaimToken, ClaimedKey};
use crate::store::rules::{self, Grant, Received, SourceIdentity, StoredDevice, UserDevices};
use crate::store::{BundleRequestLimit, ClaimRequest, Claimed, SourceCheck, StoreError};
use lime_protocol::{Curve, DeviceId, PeerBundle};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

/// The statements of a claim, run on one connection inside its transaction.
pub(crate) trait ClaimQueries: Send {
    /// The backend's failure: a store answer or a database error.
    type Error: From<StoreError> + Send;

    /// A claim's first statements. With a `reservation`, reserves its
    /// `planned` requests in the count of its identity for the current window
    /// (started afresh in a new window), and answers the count before them (0
    /// without one). The identity's row stays locked until the transaction ends,
    /// so that the claims of one identity take turns on every server and each
    /// counts what the others recorded; a claim whose devices are all granted in
    /// full needs no other write of the count. Then the stored devices among
    /// `devices` and `source` (the source of a claim that must be registered,
    /// looked up in the same statement), by device id, read without locking.
    fn start_claim(
        &mut self,
        reservation: Option<Reservation<'_>>,
        devices: &[DeviceId],
        source: Option<&DeviceId>,
    ) -> impl Future<Output = Result<(u64, HashMap<String, StoredDevice>), Self::Error>> + Send;

    /// The bundles of `target` received within `window` by `source` and by the
    /// devices of its user (`devices`, when its id is a GRUU); the request
    /// recorded in `Requests` when they are [`Received::below`] `bounds`, and
    /// then, for a device held here (`claim_from`, its uid), one of its
    /// one-time pre-keys taken as [`ClaimQueries::claim_one_time_pre_keys`]
    /// takes them.
    fn record_if_below(
        &mut self,
        target: &DeviceId,
        source: &DeviceId,
        devices: Option<&UserDevices<'_>>,
        window: Duration,
        bounds: Received,
        claim_from: Option<i64>,
    ) -> impl Future<Output = Result<Recorded, Self::Error>> + Send;

    /// From how many devices counted under the limit a request is claimed in
    /// batches ([`ClaimQueries::received_by_targets`], then
    /// [`ClaimQueries::claim_one_time_pre_keys`] and
    /// [`ClaimQueries::record_requests`]) rather than one device at a time
    /// ([`ClaimQueries::record_if_below`]): where the batches take fewer
    /// statements.
    const BATCH_FROM: usize;

    /// What [`ClaimQueries::record_if_below`] counts, for each of `targets`
    /// (distinct) at once: by the requested id; a target received by none may
    /// be left out.
    fn received_by_targets<'t>(
        &mut self,
        targets: &[&'t DeviceId],
        source: &DeviceId,
        devices: Option<&UserDevices<'_>>,
        window: Duration,
    ) -> impl Future<Output = Result<HashMap<&'t str, Received>, Self::Error>> + Send;

    /// For each device of `uids` (distinct, maybe none), one of its one-time
    /// pre-keys that no concurrent claim holds, if any is left: by uid, a
    /// device with none left is left out.
    fn claim_one_time_pre_keys(
        &mut self,
        uids: &[i64],
    ) -> impl Future<Output = Result<HashMap<i64, ClaimedKey>, Self::Error>> + Send;

    /// Records in `Requests` a request of `source` for each of `targets`.
    fn record_requests(
        &mut self,
        targets: &[&DeviceId],
        source: &DeviceId,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Deletes the claimed keys, when claiming did not delete them already.
    fn delete_claimed_keys(
        &mut self,
        keys: &[ClaimedKey],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Stores the identity's count of recorded requests, when fewer were
    /// granted in full than [`ClaimQueries::start_claim`] reserved.
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

/// What a claim reserves in its identity's count of recorded requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reservation<'a> {
    pub identity: &'a SourceIdentity<'a>,
    /// The limit's window.
    pub window: Duration,
    /// The devices that may be granted in full: the first occurrence of each.
    pub planned: u64,
}

/// What [`ClaimQueries::record_if_below`] found and did.
#[derive(Debug)]
pub(crate) struct Recorded {
    /// The target's bundles received by the source and its identity.
    pub received: Received,
    /// Whether the request was recorded (granted in full).
    pub recorded: bool,
    /// The one-time pre-key taken, if any.
    pub key: Option<ClaimedKey>,
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
    let reservation = match limit {
        Some(limit) if counts_recorded => Some(Reservation {
            identity: &identity,
            window: limit.window,
            planned,
        }),
        _ => None,
    };
    let must_be_registered = (*check == SourceCheck::Registered).then_some(source);
    let (mut recorded, stored) = queries
        .start_claim(reservation, devices, must_be_registered)
        .await?;
    if must_be_registered.is_some_and(|source| !stored.contains_key(source.as_str())) {
        return Err(StoreError::DeviceNotFound.into());
    }
    let reserved = recorded + planned;
    let asked: Vec<Asked> = all
        .iter()
        .zip(repeats)
        .enumerate()
        .map(|(index, (device_id, repeat))| {
            // A device a peer holds is granted as one held here would be.
            let held = index < devices.len();
            let device = stored
                .get(device_id.as_str())
                .filter(|device| held && device.signed_pre_key.is_some());
            Asked {
                id: device_id,
                repeat,
                held,
                device,
            }
        })
        .collect();
    let counted = Counted {
        source,
        identity: &identity,
        counts_recorded,
    };
    let decided = match limit {
        None => decide_without_limit(queries, &asked).await?,
        Some(limit) if planned as usize >= Q::BATCH_FROM => {
            decide_in_batches(queries, &asked, limit, &counted, &mut recorded).await?
        }
        Some(limit) => decide_one_by_one(queries, &asked, limit, &counted, &mut recorded).await?,
    };
    let mut claimed = Vec::new();
    let mut answer = Claimed::default();
    for (asked, (grant, key)) in asked.iter().zip(decided) {
        if !asked.held {
            answer.forward.push(grant == Grant::Full);
            continue;
        }
        let one_time_pre_key = key.as_ref().map(|key| (key.public.clone(), key.key_id));
        claimed.extend(key);
        let bundle = match asked.device {
            Some(device) if grant.is_served() => {
                rules::key_bundle(curve, device.clone(), one_time_pre_key)?
            }
            _ => None,
        };
        answer.bundles.push(PeerBundle {
            device_id: asked.id.clone(),
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

/// A device of a request, as the claim found it.
struct Asked<'a> {
    id: &'a DeviceId,
    /// The index of its first occurrence, when it is a repeat.
    repeat: Option<usize>,
    /// Held here (not a peer's, forwarded).
    held: bool,
    /// Its stored row, when it is held here and has a signed pre-key.
    device: Option<&'a StoredDevice>,
}

impl Asked<'_> {
    /// Held here but not stored (or without a signed pre-key): refused.
    fn unknown(&self) -> bool {
        self.held && self.device.is_none()
    }
}

/// Who the limit counts for.
struct Counted<'a> {
    source: &'a DeviceId,
    identity: &'a SourceIdentity<'a>,
    /// Whether the identity's recorded requests are counted.
    counts_recorded: bool,
}

/// Each device's grant and the key taken for it without the limit: every device
/// held here and stored is granted in full, its key taken with the others'
/// ([`ClaimQueries::claim_one_time_pre_keys`]).
async fn decide_without_limit<Q: ClaimQueries>(
    queries: &mut Q,
    asked: &[Asked<'_>],
) -> Result<Vec<(Grant, Option<ClaimedKey>)>, Q::Error> {
    let uids: Vec<i64> = asked
        .iter()
        .filter(|asked| !asked.unknown() && asked.repeat.is_none())
        .filter_map(|asked| asked.device.map(|device| device.uid))
        .collect();
    let mut keys = queries.claim_one_time_pre_keys(&uids).await?;
    Ok(asked
        .iter()
        .map(
            |asked| match (asked.unknown(), asked.repeat, asked.device) {
                (true, _, _) => (Grant::Refused, None),
                (false, Some(_), _) => (rules::repeat_grant(Grant::Full), None),
                (false, None, device) => (
                    Grant::Full,
                    device.and_then(|device| keys.remove(&device.uid)),
                ),
            },
        )
        .collect())
}

/// Each device's grant and the key taken for it, one device at a time, with the
/// limit on: a target's counts and record in [`ClaimQueries::record_if_below`].
async fn decide_one_by_one<Q: ClaimQueries>(
    queries: &mut Q,
    asked: &[Asked<'_>],
    limit: &BundleRequestLimit,
    counted: &Counted<'_>,
    recorded: &mut u64,
) -> Result<Vec<(Grant, Option<ClaimedKey>)>, Q::Error> {
    let mut decided: Vec<(Grant, Option<ClaimedKey>)> = Vec::with_capacity(asked.len());
    for asked in asked {
        let uid = asked.device.map(|device| device.uid);
        let (grant, key) = match (asked.unknown(), asked.repeat) {
            (true, _) => (Grant::Refused, None),
            (false, Some(first)) => (rules::repeat_grant(decided[first].0), None),
            (false, None) => {
                let bounds = rules::full_grant_bounds(*recorded, limit);
                let done = queries
                    .record_if_below(
                        asked.id,
                        counted.source,
                        counted.identity.devices.as_ref(),
                        limit.window,
                        bounds,
                        uid,
                    )
                    .await?;
                let grant = rules::grant(counted.source, asked.id, done.received, *recorded, limit);
                debug_assert_eq!(done.recorded, grant == Grant::Full, "recorded as granted");
                if done.recorded && counted.counts_recorded {
                    *recorded += 1;
                }
                (grant, done.key)
            }
        };
        decided.push((grant, key));
    }
    Ok(decided)
}

/// [`decide_one_by_one`] with the limit on, in batches: every target's counts
/// read at once (a request's own records cannot change them: its targets are
/// distinct), the grants decided in order as one by one, then the keys of the
/// devices granted in full taken and their requests recorded.
async fn decide_in_batches<Q: ClaimQueries>(
    queries: &mut Q,
    asked: &[Asked<'_>],
    limit: &BundleRequestLimit,
    counted: &Counted<'_>,
    recorded: &mut u64,
) -> Result<Vec<(Grant, Option<ClaimedKey>)>, Q::Error> {
    let targets: Vec<&DeviceId> = asked
        .iter()
        .filter(|asked| !asked.unknown() && asked.repeat.is_none())
        .map(|asked| asked.id)
        .collect();
    let received = queries
        .received_by_targets(
            &targets,
            counted.source,
            counted.identity.devices.as_ref(),
            limit.window,
        )
        .await?;
    let mut grants: Vec<Grant> = Vec::with_capacity(asked.len());
    let (mut to_record, mut to_claim) = (Vec::new(), Vec::new());
    for asked in asked {
        let grant = match (asked.unknown(), asked.repeat) {
            (true, _) => Grant::Refused,
            (false, Some(first)) => rules::repeat_grant(grants[first]),
            (false, None) => {
                let received = received.get(asked.id.as_str()).copied().unwrap_or_default();
                let grant = rules::grant(counted.source, asked.id, received, *recorded, limit);
                if grant == Grant::Full {
                    to_record.push(asked.id);
                    to_claim.extend(asked.device.map(|device| device.uid));
                    if counted.counts_recorded {
                        *recorded += 1;
                    }
                }
                grant
            }
        };
        grants.push(grant);
    }
    let mut keys = queries.claim_one_time_pre_keys(&to_claim).await?;
    queries.record_requests(&to_record, counted.source).await?;
    Ok(asked
        .iter()
        .zip(grants)
        .map(|(asked, grant)| {
            let key = match (asked.repeat, grant, asked.device) {
                (None, Grant::Full, Some(device)) => keys.remove(&device.uid),
                _ => None,
            };
            (grant, key)
        })
        .collect())
}
