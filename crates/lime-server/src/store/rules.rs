//! The protocol's storage rules, independent of any database: every backend runs
//! its SQL and asks these functions what the rows it read mean, so that SQLite,
//! MariaDB and PostgreSQL answer alike.

use crate::store::{BundleRequestLimit, OverLimit, Registered, StoreError, StoreLimits};
use crate::telemetry::clip;
use lime_protocol::{
    Curve, DeviceId, IdentityKey, KeyBundle, OneTimePreKey, Registration, SignedPreKey,
    WrongKeyLength,
};
use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// A device as stored: `SPk`, `SPk_sig` and `SPk_id` may be NULL in databases
/// written by old servers.
#[derive(Debug, Clone)]
pub struct StoredDevice {
    /// `Users.Uid`.
    pub uid: i64,
    /// `Users.Ik`.
    pub identity_key: Vec<u8>,
    /// `Users.SPk`, `Users.SPk_sig`, `Users.SPk_id`, when all three are set.
    pub signed_pre_key: Option<(Vec<u8>, Vec<u8>, u32)>,
}

impl StoredDevice {
    /// Builds the row from nullable columns as read.
    pub fn from_columns(
        uid: i64,
        identity_key: Vec<u8>,
        spk: Option<Vec<u8>>,
        spk_sig: Option<Vec<u8>>,
        spk_id: Option<u32>,
    ) -> StoredDevice {
        StoredDevice {
            uid,
            identity_key,
            signed_pre_key: spk
                .zip(spk_sig)
                .zip(spk_id)
                .map(|((spk, sig), id)| (spk, sig, id)),
        }
    }
}

/// registerUser for a device already stored: the same Ik and SPk is a retry that
/// succeeds and changes nothing; anything else is `user_already_in`.
pub fn reregistration(
    existing: &StoredDevice,
    registration: &Registration,
) -> Result<Registered, StoreError> {
    let spk = &registration.signed_pre_key;
    let same_keys = existing.identity_key == registration.identity_key.as_bytes()
        && existing
            .signed_pre_key
            .as_ref()
            .is_some_and(|(public, signature, id)| {
                public == spk.public() && signature == spk.signature() && *id == spk.id()
            });
    if same_keys {
        Ok(Registered::AlreadyWithSameKeys)
    } else {
        Err(StoreError::DeviceRegisteredWithOtherKeys)
    }
}

/// An uploaded one-time pre-key whose id the device already uses: skipped when the
/// bytes are the same (a retried upload), refused otherwise.
pub fn existing_one_time_pre_key(
    stored_public: &[u8],
    uploaded: &OneTimePreKey,
) -> Result<(), StoreError> {
    if stored_public == uploaded.public() {
        Ok(())
    } else {
        Err(StoreError::ConflictingOneTimePreKeyId(uploaded.id()))
    }
}

/// After an upload, the device holds `held` one-time pre-keys: within the limit?
pub fn one_time_pre_key_limit(held: u64, limits: &StoreLimits) -> Result<(), StoreError> {
    let limit = limits.max_one_time_pre_keys_per_device;
    if held > u64::from(limit) {
        Err(StoreError::TooManyOneTimePreKeys {
            would_hold: held,
            limit,
        })
    } else {
        Ok(())
    }
}

/// Registering one more device for a user that has `devices` already: within
/// `max_devices_per_user`?
pub fn device_limit(user: &str, devices: u64, limits: &StoreLimits) -> Result<(), StoreError> {
    let limit = limits.max_devices_per_user;
    if limit > 0 && devices >= u64::from(limit) {
        Err(StoreError::TooManyDevices {
            user: user.to_owned(),
            devices,
            limit,
        })
    } else {
        Ok(())
    }
}

/// The devices of one user, as a range of device ids: every id from `start`
/// (included, `sip:user@domain;gr=`) to `end` (excluded, `sip:user@domain;gr>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDevices<'a> {
    /// `sip:user@domain`, for messages.
    pub user: &'a str,
    /// `sip:user@domain;gr=`: every device id of the user starts with it.
    pub start: &'a str,
    /// The first id past them.
    pub end: String,
}

/// The range of the devices of `device`'s user; `None` when the device id is not
/// a GRUU (`sip:user@domain;gr=...`, as in test set-ups): such devices are not
/// counted.
pub fn user_devices(device: &DeviceId) -> Option<UserDevices<'_>> {
    let id = device.as_str();
    let user = &id[..id.find(';')?];
    if !crate::auth::identity::owns_device(user, id) {
        return None;
    }
    let start = &id[..user.len() + ";gr=".len()];
    Some(UserDevices {
        user,
        start,
        // ';gr=' ends with '=': the next byte value is '>'.
        end: format!("{user};gr>"),
    })
}

/// For each device asked for, the index of its first occurrence in the request
/// when it is a repeat; `None` for a first occurrence (the only one that may take
/// a one-time pre-key and counts against the bundle request limit).
pub fn repeats(devices: &[DeviceId]) -> Vec<Option<usize>> {
    let mut first = HashMap::with_capacity(devices.len());
    devices
        .iter()
        .enumerate()
        .map(|(index, device)| match first.entry(device) {
            Entry::Occupied(entry) => Some(*entry.get()),
            Entry::Vacant(entry) => {
                entry.insert(index);
                None
            }
        })
        .collect()
}

/// What a source gets of a target's bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// The bundle, with a one-time pre-key when one is left; recorded in
    /// `Requests` when the bundle request limit is on.
    Full,
    /// The bundle without a one-time pre-key.
    WithoutOneTimePreKey,
    /// No bundle.
    Refused,
}

impl Grant {
    /// True when a bundle is served.
    pub fn is_served(self) -> bool {
        self != Grant::Refused
    }
}

/// The identity a source device acts for, as the bundle request limits count it:
/// `sip:user@domain` for a GRUU, the device id itself for any other id (only
/// possible with authentication off: an authenticated identity owns GRUUs only).
#[derive(Debug, Clone)]
pub struct SourceIdentity<'a> {
    /// `sip:user@domain`, or the whole device id.
    pub identity: &'a str,
    /// Every device id the identity owns, when the source is a GRUU.
    pub devices: Option<UserDevices<'a>>,
}

impl<'a> SourceIdentity<'a> {
    /// The identity of `source`.
    pub fn of(source: &'a DeviceId) -> SourceIdentity<'a> {
        let devices = user_devices(source);
        SourceIdentity {
            identity: devices.as_ref().map_or(source.as_str(), |range| range.user),
            devices,
        }
    }

    /// The key of the identity's row in `lime_rs_identity_requests`: the first 16
    /// bytes of its SHA-256, so that identities of any length fit one key column.
    pub fn key(&self) -> [u8; 16] {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.identity.as_bytes());
        let mut key = [0; 16];
        key.copy_from_slice(&digest[..16]);
        key
    }
}

/// The bundles of one target received within the window, as `Requests` records
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Received {
    /// By the source device.
    pub by_device: u64,
    /// By all the devices of the source's identity (the source's included).
    pub by_identity: u64,
}

impl Received {
    /// From the two `COUNT(*)` a database answers, by device and by identity.
    pub fn from_counts(by_device: i64, by_identity: i64) -> Received {
        Received {
            by_device: by_device as u64,
            by_identity: by_identity as u64,
        }
    }

    /// By a source whose id is not a GRUU: its own identity.
    pub fn of_device(by_device: u64) -> Received {
        Received {
            by_device,
            by_identity: by_device,
        }
    }

    /// Whether both counts are below those of `bounds` (see
    /// [`full_grant_bounds`]).
    pub fn below(self, bounds: Received) -> bool {
        self.by_device < bounds.by_device && self.by_identity < bounds.by_identity
    }
}

/// The counts below which a first occurrence is granted in full, for an identity
/// that recorded `recorded` requests in this window: none when it reached its
/// cap. What a database checks when it counts and records in one statement; the
/// same rule as [`limit_reached`].
pub fn full_grant_bounds(recorded: u64, limit: &BundleRequestLimit) -> Received {
    if recorded >= u64::from(limit.max_recorded_per_identity) {
        return Received::of_device(0);
    }
    Received {
        by_device: u64::from(limit.max),
        by_identity: u64::from(limit.max_per_identity),
    }
}

/// The limit a source reached, named by its configuration key for log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitReached {
    /// `limits.max_bundle_requests`: bundles of the target for the source device.
    PerDevice,
    /// `limits.max_bundle_requests_per_identity`: bundles of the target for the
    /// source's identity.
    PerIdentity,
    /// `limits.max_recorded_requests_per_identity`: bundle requests recorded for
    /// the source's identity, all targets.
    RecordedPerIdentity,
}

impl LimitReached {
    /// The configuration key of the limit.
    pub fn key(self) -> &'static str {
        match self {
            LimitReached::PerDevice => "limits.max_bundle_requests",
            LimitReached::PerIdentity => "limits.max_bundle_requests_per_identity",
            LimitReached::RecordedPerIdentity => "limits.max_recorded_requests_per_identity",
        }
    }
}

/// The first limit a source past it has reached, if any: `received` bundles of
/// the target, `recorded` requests of its identity in this window.
pub fn limit_reached(
    received: Received,
    recorded: u64,
    limit: &BundleRequestLimit,
) -> Option<LimitReached> {
    if received.by_device >= u64::from(limit.max) {
        Some(LimitReached::PerDevice)
    } else if received.by_identity >= u64::from(limit.max_per_identity) {
        Some(LimitReached::PerIdentity)
    } else if recorded >= u64::from(limit.max_recorded_per_identity) {
        Some(LimitReached::RecordedPerIdentity)
    } else {
        None
    }
}

/// The grant of a first occurrence of `target` for `source`, and the log line of
/// a bundle withheld by a limit (debug: one per bundle, with source and target).
pub fn grant(
    source: &DeviceId,
    target: &DeviceId,
    received: Received,
    recorded: u64,
    limit: &BundleRequestLimit,
) -> Grant {
    let Some(reached) = limit_reached(received, recorded, limit) else {
        return Grant::Full;
    };
    let grant = match limit.over_limit {
        OverLimit::WithoutOneTimePreKey => Grant::WithoutOneTimePreKey,
        OverLimit::NoBundle => Grant::Refused,
    };
    crate::metrics::bundle_over_limit(reached, limit.over_limit);
    tracing::debug!(
        source = %clip(source.as_str()),
        target = %clip(target.as_str()),
        limit = %reached.key(),
        received_by_device = received.by_device,
        received_by_identity = received.by_identity,
        recorded_for_identity = recorded,
        "bundle request over the limit: {}",
        match grant {
            Grant::Refused => "no bundle (no_bundle), not recorded",
            _ => "bundle without a one-time pre-key, not recorded",
        }
    );
    grant
}

/// The grant of a repeat of a device whose first occurrence got `first`: never a
/// second one-time pre-key, never a bundle the first was refused.
pub fn repeat_grant(first: Grant) -> Grant {
    match first {
        Grant::Refused => Grant::Refused,
        _ => Grant::WithoutOneTimePreKey,
    }
}

/// The bundle of a stored device, with the one-time pre-key claimed for it (if
/// any); `None` for a device without a signed pre-key (flag 2). Keys of the wrong
/// size for the curve are a database fault: refused, never sent malformed.
pub fn key_bundle(
    curve: Curve,
    device: StoredDevice,
    one_time_pre_key: Option<(Vec<u8>, u32)>,
) -> Result<Option<KeyBundle>, StoreError> {
    let Some((public, signature, id)) = device.signed_pre_key else {
        return Ok(None);
    };
    Ok(Some(KeyBundle {
        identity_key: IdentityKey::new(curve, device.identity_key).map_err(corrupt)?,
        signed_pre_key: SignedPreKey::new(curve, public, signature, id).map_err(corrupt)?,
        one_time_pre_key: one_time_pre_key
            .map(|(public, id)| OneTimePreKey::new(curve, public, id))
            .transpose()
            .map_err(corrupt)?,
    }))
}

fn corrupt(error: WrongKeyLength) -> StoreError {
    StoreError::Backend(format!("stored key of the wrong size: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration() -> Registration {
        Registration {
            identity_key: IdentityKey::new(Curve::C25519, vec![1; 32]).unwrap(),
            signed_pre_key: SignedPreKey::new(Curve::C25519, vec![2; 32], vec![3; 64], 7).unwrap(),
            one_time_pre_keys: Vec::new(),
        }
    }

    fn stored(ik: u8, spk_id: Option<u32>) -> StoredDevice {
        StoredDevice::from_columns(
            1,
            vec![ik; 32],
            Some(vec![2; 32]),
            Some(vec![3; 64]),
            spk_id,
        )
    }

    #[test]
    fn same_keys_again_is_a_retry() {
        assert_eq!(
            reregistration(&stored(1, Some(7)), &registration()).unwrap(),
            Registered::AlreadyWithSameKeys
        );
    }

    #[test]
    fn other_keys_or_missing_spk_is_already_in() {
        for device in [stored(9, Some(7)), stored(1, Some(8)), stored(1, None)] {
            assert!(matches!(
                reregistration(&device, &registration()),
                Err(StoreError::DeviceRegisteredWithOtherKeys)
            ));
        }
    }

    #[test]
    fn only_the_first_occurrence_of_a_device_may_claim() {
        let ids: Vec<DeviceId> = ["a", "b", "a", "c", "b"]
            .iter()
            .map(|id| DeviceId::new(*id).unwrap())
            .collect();
        assert_eq!(repeats(&ids), [None, None, Some(0), None, Some(1)]);
    }

    #[test]
    fn grants_follow_each_limit_and_repeats_follow_their_first() {
        let limit = |over_limit| BundleRequestLimit {
            max: 2,
            max_per_identity: 3,
            max_recorded_per_identity: 100,
            window: std::time::Duration::from_secs(10),
            over_limit,
        };
        let (source, target) = (DeviceId::new("s").unwrap(), DeviceId::new("t").unwrap());
        let received = |by_device, by_identity| Received {
            by_device,
            by_identity,
        };
        let served = limit(OverLimit::WithoutOneTimePreKey);
        let grant_of = |received, recorded, limit: &BundleRequestLimit| {
            grant(&source, &target, received, recorded, limit)
        };
        assert_eq!(grant_of(received(1, 2), 99, &served), Grant::Full);
        assert_eq!(
            limit_reached(received(2, 2), 0, &served),
            Some(LimitReached::PerDevice)
        );
        assert_eq!(
            limit_reached(received(0, 3), 0, &served),
            Some(LimitReached::PerIdentity)
        );
        assert_eq!(
            limit_reached(received(0, 0), 100, &served),
            Some(LimitReached::RecordedPerIdentity)
        );
        assert_eq!(
            grant_of(received(2, 2), 0, &served),
            Grant::WithoutOneTimePreKey
        );
        let refused = limit(OverLimit::NoBundle);
        assert_eq!(grant_of(received(0, 3), 0, &refused), Grant::Refused);
        assert_eq!(grant_of(received(0, 0), 100, &refused), Grant::Refused);
        assert_eq!(repeat_grant(Grant::Full), Grant::WithoutOneTimePreKey);
        assert_eq!(repeat_grant(Grant::Refused), Grant::Refused);
    }

    #[test]
    fn the_bounds_a_database_checks_grant_what_the_limits_grant() {
        let limit = BundleRequestLimit {
            max: 2,
            max_per_identity: 3,
            max_recorded_per_identity: 4,
            window: std::time::Duration::from_secs(10),
            over_limit: OverLimit::NoBundle,
        };
        for by_device in 0..5 {
            for by_identity in by_device..6 {
                for recorded in 0..6 {
                    let received = Received {
                        by_device,
                        by_identity,
                    };
                    let bounds = full_grant_bounds(recorded, &limit);
                    assert_eq!(
                        received.below(bounds),
                        limit_reached(received, recorded, &limit).is_none(),
                        "{received:?} with {recorded} recorded"
                    );
                }
            }
        }
    }

    #[test]
    fn a_gruu_counts_for_its_user_and_any_other_id_for_itself() {
        let gruu = DeviceId::new("sip:alice@example.org;gr=urn:uuid:1").unwrap();
        let other = DeviceId::new("sip:alice@example.org;gr=urn:uuid:2").unwrap();
        let plain = DeviceId::new("alice").unwrap();
        assert_eq!(SourceIdentity::of(&gruu).identity, "sip:alice@example.org");
        assert_eq!(
            SourceIdentity::of(&gruu).key(),
            SourceIdentity::of(&other).key()
        );
        assert_eq!(SourceIdentity::of(&plain).identity, "alice");
        assert!(SourceIdentity::of(&plain).devices.is_none());
        assert_ne!(
            SourceIdentity::of(&gruu).key(),
            SourceIdentity::of(&plain).key()
        );
    }

    #[test]
    fn devices_of_a_user_share_a_prefix_and_other_ids_are_not_counted() {
        let id = DeviceId::new("sip:alice@example.org;gr=urn:uuid:1").unwrap();
        let range = user_devices(&id).unwrap();
        assert_eq!(range.user, "sip:alice@example.org");
        assert_eq!(range.start, "sip:alice@example.org;gr=");
        assert_eq!(range.end, "sip:alice@example.org;gr>");
        assert!(
            range.start < "sip:alice@example.org;gr=zzz"
                && "sip:alice@example.org;gr=zzz" < range.end.as_str()
        );
        for other in [
            "alice",
            "sip:alice@example.org",
            "sip:alice@example.org;transport=tls",
        ] {
            assert_eq!(
                user_devices(&DeviceId::new(other).unwrap()),
                None,
                "{other}"
            );
        }
        let limits = |max_devices_per_user| StoreLimits {
            max_one_time_pre_keys_per_device: 10,
            max_devices_per_user,
            bundle_requests: None,
        };
        assert!(device_limit("u", 2, &limits(3)).is_ok());
        assert!(matches!(
            device_limit("u", 3, &limits(3)),
            Err(StoreError::TooManyDevices {
                devices: 3,
                limit: 3,
                ..
            })
        ));
        assert!(device_limit("u", 1_000, &limits(0)).is_ok());
    }

    #[test]
    fn device_without_spk_has_no_bundle_and_wrong_sizes_are_refused() {
        assert_eq!(
            key_bundle(Curve::C25519, stored(1, None), None).unwrap(),
            None
        );
        assert!(key_bundle(Curve::C448, stored(1, Some(7)), None).is_err());
    }
}
