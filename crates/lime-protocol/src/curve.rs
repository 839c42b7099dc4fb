//! Base algorithms ("curves") and the sizes of the public material each one carries.

use std::fmt;
use std::str::FromStr;

/// A base algorithm, identified on the wire by byte 2 of every message.
///
/// The hybrid algorithms carry the concatenation of the EC public key and the KEM
/// public key as their pre-keys; the server stores and returns those bytes whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Curve {
    /// X25519 + Ed25519.
    C25519 = 1,
    /// X448 + Ed448.
    C448 = 2,
    /// X25519 + Kyber512 hybrid.
    C25519K512 = 3,
    /// X25519 + ML-KEM-512 hybrid.
    C25519Mlk512 = 4,
    /// X448 + ML-KEM-1024 hybrid.
    C448Mlk1024 = 5,
}

impl Curve {
    /// Every base algorithm of the protocol, in id order.
    pub const ALL: [Curve; 5] = [
        Curve::C25519,
        Curve::C448,
        Curve::C25519K512,
        Curve::C25519Mlk512,
        Curve::C448Mlk1024,
    ];

    /// The algorithm with wire id `id`, if there is one.
    pub fn from_id(id: u8) -> Option<Curve> {
        Curve::ALL.into_iter().find(|curve| curve.id() == id)
    }

    /// The wire id (byte 2 of the header).
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The lower-case name used in config files, on the command line and in
    /// database names (`c25519`, ..., the original's `lime-createBase.php --curve`).
    pub fn name(self) -> &'static str {
        match self {
            Curve::C25519 => "c25519",
            Curve::C448 => "c448",
            Curve::C25519K512 => "c25519k512",
            Curve::C25519Mlk512 => "c25519mlk512",
            Curve::C448Mlk1024 => "c448mlk1024",
        }
    }

    /// Size of the identity key Ik (EdDSA public key).
    pub fn identity_key_len(self) -> usize {
        match self {
            Curve::C25519 | Curve::C25519K512 | Curve::C25519Mlk512 => 32,
            Curve::C448 | Curve::C448Mlk1024 => 57,
        }
    }

    /// Size of a signed or one-time pre-key's public part.
    pub fn pre_key_len(self) -> usize {
        match self {
            Curve::C25519 => 32,
            Curve::C448 => 56,
            Curve::C25519K512 | Curve::C25519Mlk512 => 32 + 800,
            Curve::C448Mlk1024 => 56 + 1568,
        }
    }

    /// Size of the signed pre-key's EdDSA signature.
    pub fn signature_len(self) -> usize {
        match self {
            Curve::C25519 | Curve::C25519K512 | Curve::C25519Mlk512 => 64,
            Curve::C448 | Curve::C448Mlk1024 => 114,
        }
    }
}

impl fmt::Display for Curve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name given is not one of the five base algorithms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown curve `{0}` (expected one of c25519, c448, c25519k512, c25519mlk512, c448mlk1024)"
)]
pub struct UnknownCurveName(pub String);

impl FromStr for Curve {
    type Err = UnknownCurveName;

    fn from_str(name: &str) -> Result<Curve, UnknownCurveName> {
        Curve::ALL
            .into_iter()
            .find(|curve| curve.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| UnknownCurveName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip() {
        for curve in Curve::ALL {
            assert_eq!(Curve::from_id(curve.id()), Some(curve));
            assert_eq!(curve.name().parse::<Curve>(), Ok(curve));
        }
        assert_eq!(Curve::from_id(0), None);
        assert_eq!(Curve::from_id(6), None);
        assert!("c1".parse::<Curve>().is_err());
    }

    #[test]
    fn hybrid_pre_keys_are_ec_plus_kem() {
        assert_eq!(Curve::C25519K512.pre_key_len(), 832);
        assert_eq!(Curve::C25519Mlk512.pre_key_len(), 832);
        assert_eq!(Curve::C448Mlk1024.pre_key_len(), 1624);
    }
}
