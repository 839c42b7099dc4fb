//! Device ids and public keys: newtypes that are valid once they exist.
//!
//! Key constructors check the length against the curve, so a key that reaches the
//! store or an encoder always has the size the protocol gives for its curve.

use crate::Curve;
use std::fmt;

/// A device id (the device's GRUU, e.g. `sip:alice@example.org;gr=urn:uuid:...`):
/// non-empty UTF-8 of at most 65,535 bytes (its length travels as a u16), without
/// NUL characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

/// Why a byte string is not a device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDeviceId {
    /// Zero bytes long.
    #[error("device id is empty")]
    Empty,
    /// Longer than a u16 length can say.
    #[error("device id is {0} bytes, more than 65535")]
    TooLong(usize),
    /// Not valid UTF-8 (the original stores device ids as utf8 text).
    #[error("device id is not valid UTF-8")]
    NotUtf8,
    /// Contains a NUL character, which no GRUU has and some databases cannot store.
    #[error("device id contains a NUL character")]
    ContainsNul,
}

impl DeviceId {
    /// Checks and wraps a device id received as bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<DeviceId, InvalidDeviceId> {
        let text = std::str::from_utf8(bytes).map_err(|_| InvalidDeviceId::NotUtf8)?;
        DeviceId::new(text)
    }

    /// Checks and wraps a device id given as text.
    pub fn new(text: impl Into<String>) -> Result<DeviceId, InvalidDeviceId> {
        let text = text.into();
        if text.is_empty() {
            return Err(InvalidDeviceId::Empty);
        }
        if text.len() > usize::from(u16::MAX) {
            return Err(InvalidDeviceId::TooLong(text.len()));
        }
        if text.contains('\0') {
            return Err(InvalidDeviceId::ContainsNul);
        }
        Ok(DeviceId(text))
    }

    /// The device id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Length in bytes; fits a u16 by construction.
    pub(crate) fn wire_len(&self) -> u16 {
        // Cannot truncate: `new` refuses anything longer than u16::MAX.
        self.0.len() as u16
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A key or signature whose length does not match its curve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is {actual} bytes, {curve} wants {expected}")]
pub struct WrongKeyLength {
    /// Which key ("Ik", "SPk", "SPk_sig", "OPk").
    pub what: &'static str,
    /// The curve whose size was expected.
    pub curve: Curve,
    /// The size the curve gives.
    pub expected: usize,
    /// The size found.
    pub actual: usize,
}

fn check_len(
    what: &'static str,
    curve: Curve,
    expected: usize,
    bytes: &[u8],
) -> Result<(), WrongKeyLength> {
    if bytes.len() == expected {
        Ok(())
    } else {
        Err(WrongKeyLength {
            what,
            curve,
            expected,
            actual: bytes.len(),
        })
    }
}

/// A device's public identity key Ik (EdDSA).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdentityKey(Vec<u8>);

impl IdentityKey {
    /// Wraps `bytes` if they have the curve's Ik size.
    pub fn new(curve: Curve, bytes: Vec<u8>) -> Result<IdentityKey, WrongKeyLength> {
        check_len("Ik", curve, curve.identity_key_len(), &bytes)?;
        Ok(IdentityKey(bytes))
    }

    /// Wraps bytes the parser has already read with the curve's size.
    pub(crate) fn from_checked(bytes: Vec<u8>) -> IdentityKey {
        IdentityKey(bytes)
    }

    /// The public key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A signed pre-key: public key, Ik's signature over it, and the id the device gave it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SignedPreKey {
    public: Vec<u8>,
    signature: Vec<u8>,
    id: u32,
}

impl SignedPreKey {
    /// Wraps the parts if the key and the signature have the curve's sizes.
    pub fn new(
        curve: Curve,
        public: Vec<u8>,
        signature: Vec<u8>,
        id: u32,
    ) -> Result<SignedPreKey, WrongKeyLength> {
        check_len("SPk", curve, curve.pre_key_len(), &public)?;
        check_len("SPk_sig", curve, curve.signature_len(), &signature)?;
        Ok(SignedPreKey::from_checked(public, signature, id))
    }

    /// Wraps parts the parser has already read with the curve's sizes.
    pub(crate) fn from_checked(public: Vec<u8>, signature: Vec<u8>, id: u32) -> SignedPreKey {
        SignedPreKey {
            public,
            signature,
            id,
        }
    }

    /// The public key bytes.
    pub fn public(&self) -> &[u8] {
        &self.public
    }

    /// The EdDSA signature made with Ik over the public key bytes.
    pub fn signature(&self) -> &[u8] {
        &self.signature
    }

    /// The device's id for this key (SPk_id).
    pub fn id(&self) -> u32 {
        self.id
    }
}

/// A one-time pre-key: public key and the id the device gave it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OneTimePreKey {
    public: Vec<u8>,
    id: u32,
}

impl OneTimePreKey {
    /// Wraps the parts if the key has the curve's size.
    pub fn new(curve: Curve, public: Vec<u8>, id: u32) -> Result<OneTimePreKey, WrongKeyLength> {
        check_len("OPk", curve, curve.pre_key_len(), &public)?;
        Ok(OneTimePreKey::from_checked(public, id))
    }

    /// Wraps parts the parser has already read with the curve's size.
    pub(crate) fn from_checked(public: Vec<u8>, id: u32) -> OneTimePreKey {
        OneTimePreKey { public, id }
    }

    /// The public key bytes.
    pub fn public(&self) -> &[u8] {
        &self.public
    }

    /// The device's id for this key (OPk_id).
    pub fn id(&self) -> u32 {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_checks() {
        assert_eq!(DeviceId::from_bytes(b""), Err(InvalidDeviceId::Empty));
        assert_eq!(
            DeviceId::from_bytes(&[0xff, 0xfe]),
            Err(InvalidDeviceId::NotUtf8)
        );
        assert!(DeviceId::new("x".repeat(65_535)).is_ok());
        assert_eq!(DeviceId::new("sip:a\0b"), Err(InvalidDeviceId::ContainsNul));
        assert_eq!(
            DeviceId::new("x".repeat(65_536)),
            Err(InvalidDeviceId::TooLong(65_536))
        );
    }

    #[test]
    fn key_lengths_follow_the_curve() {
        assert!(IdentityKey::new(Curve::C448, vec![0; 57]).is_ok());
        let err = IdentityKey::new(Curve::C448, vec![0; 32]).unwrap_err();
        assert_eq!(err.expected, 57);
        assert!(SignedPreKey::new(Curve::C25519, vec![0; 32], vec![0; 64], 1).is_ok());
        assert!(SignedPreKey::new(Curve::C25519, vec![0; 32], vec![0; 63], 1).is_err());
        assert!(OneTimePreKey::new(Curve::C448Mlk1024, vec![0; 1624], 1).is_ok());
    }
}
