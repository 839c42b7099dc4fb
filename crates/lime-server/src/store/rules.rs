//! The protocol's storage rules, independent of any database: every backend runs
//! its SQL and asks these functions what the rows it read mean, so that SQLite,
//! MariaDB and PostgreSQL answer alike.

use crate::store::{BundleRequestLimit, OverLimit, Registered, StoreError, StoreLimits};
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
    /// The bundle, with a one-time pre-key when one is left.
    Full,
    /// The bundle without a one-time pre-key.
    WithoutOneTimePreKey,
    /// No bundle.
    Refused,
}

impl Grant {
    /// True when the bundle is served (and so recorded in `Requests`).
    pub fn is_served(self) -> bool {
        self != Grant::Refused
    }
}

/// The grant of a first occurrence, for a source that received `received`
/// bundles of the target within the window.
pub fn grant(received: u64, limit: Option<&BundleRequestLimit>) -> Grant {
    match limit {
        Some(limit) if received >= u64::from(limit.max) => match limit.over_limit {
            OverLimit::WithoutOneTimePreKey => Grant::WithoutOneTimePreKey,
            OverLimit::NoBundle => Grant::Refused,
        },
        _ => Grant::Full,
    }
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
    fn grants_follow_the_limit_and_repeats_follow_their_first() {
        let limit = |over_limit| BundleRequestLimit {
            max: 2,
            window: std::time::Duration::from_secs(10),
            over_limit,
        };
        assert_eq!(grant(5, None), Grant::Full);
        let served = limit(OverLimit::WithoutOneTimePreKey);
        assert_eq!(grant(1, Some(&served)), Grant::Full);
        assert_eq!(grant(2, Some(&served)), Grant::WithoutOneTimePreKey);
        let refused = limit(OverLimit::NoBundle);
        assert_eq!(grant(2, Some(&refused)), Grant::Refused);
        assert_eq!(repeat_grant(Grant::Full), Grant::WithoutOneTimePreKey);
        assert_eq!(repeat_grant(Grant::Refused), Grant::Refused);
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
