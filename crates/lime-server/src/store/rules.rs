//! The protocol's storage rules, independent of any database: every backend runs
//! its SQL and asks these functions what the rows it read mean, so that SQLite,
//! MariaDB and PostgreSQL answer alike.

use crate::store::{Registered, StoreError, StoreLimits};
use lime_protocol::{
    Curve, DeviceId, IdentityKey, KeyBundle, OneTimePreKey, Registration, SignedPreKey,
    WrongKeyLength,
};
use std::collections::HashSet;

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

/// For each device asked for, whether it may take a one-time pre-key: only its
/// first occurrence in the request does.
pub fn may_claim(devices: &[DeviceId]) -> Vec<bool> {
    let mut seen = HashSet::with_capacity(devices.len());
    devices.iter().map(|device| seen.insert(device)).collect()
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
        assert_eq!(may_claim(&ids), [true, true, false, true, false]);
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
