//! The 3-byte header every message starts with, and the message types it names.

use crate::{Curve, ParseError, ParseErrorKind};
use std::fmt;

/// The only protocol version there is.
pub const PROTOCOL_VERSION: u8 = 0x01;

/// Size of the header: version, message type, curve id.
pub const HEADER_LEN: usize = 3;

/// Message type, byte 1 of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Pre-5.0 registration; refused with `bad_request`.
    DeprecatedRegisterUser = 0x01,
    /// Deletes the sender's device.
    DeleteUser = 0x02,
    /// Replaces the sender's signed pre-key.
    PostSignedPreKey = 0x03,
    /// Adds one-time pre-keys to the sender's device.
    PostOneTimePreKeys = 0x04,
    /// Asks for the key bundles of some devices.
    GetPeerBundle = 0x05,
    /// Answer to getPeerBundle.
    PeerBundle = 0x06,
    /// Asks which of the sender's one-time pre-keys are still on the server.
    GetSelfOneTimePreKeys = 0x07,
    /// Answer to getSelfOPks.
    SelfOneTimePreKeys = 0x08,
    /// Registers the sender's device with its keys.
    RegisterUser = 0x09,
    /// Error answer.
    Error = 0xff,
}

impl MessageType {
    const ALL: [MessageType; 10] = [
        MessageType::DeprecatedRegisterUser,
        MessageType::DeleteUser,
        MessageType::PostSignedPreKey,
        MessageType::PostOneTimePreKeys,
        MessageType::GetPeerBundle,
        MessageType::PeerBundle,
        MessageType::GetSelfOneTimePreKeys,
        MessageType::SelfOneTimePreKeys,
        MessageType::RegisterUser,
        MessageType::Error,
    ];

    /// The type with wire value `byte`, if there is one.
    pub fn from_byte(byte: u8) -> Option<MessageType> {
        MessageType::ALL
            .into_iter()
            .find(|kind| *kind as u8 == byte)
    }

    /// The wire value.
    pub fn byte(self) -> u8 {
        self as u8
    }

    /// The protocol's name for the type.
    pub fn name(self) -> &'static str {
        match self {
            MessageType::DeprecatedRegisterUser => "deprecated registerUser",
            MessageType::DeleteUser => "deleteUser",
            MessageType::PostSignedPreKey => "postSPk",
            MessageType::PostOneTimePreKeys => "postOPks",
            MessageType::GetPeerBundle => "getPeerBundle",
            MessageType::PeerBundle => "peerBundle",
            MessageType::GetSelfOneTimePreKeys => "getSelfOPks",
            MessageType::SelfOneTimePreKeys => "selfOPks",
            MessageType::RegisterUser => "registerUser",
            MessageType::Error => "error",
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Splits a message into its checked header and its body.
///
/// The version is checked first, then the curve, then the type, so that a message
/// wrong in several ways gets the error of its first wrong byte.
pub(crate) fn split_header(message: &[u8]) -> Result<(MessageType, Curve, &[u8]), ParseError> {
    let curve_byte = message.get(2).copied().unwrap_or(0);
    let fail = |kind| ParseError { curve_byte, kind };
    let [version, kind, curve, body @ ..] = message else {
        return Err(fail(ParseErrorKind::NoHeader(message.len())));
    };
    if *version != PROTOCOL_VERSION {
        return Err(fail(ParseErrorKind::BadVersion(*version)));
    }
    let curve = Curve::from_id(*curve).ok_or_else(|| fail(ParseErrorKind::UnknownCurve(*curve)))?;
    let kind =
        MessageType::from_byte(*kind).ok_or_else(|| fail(ParseErrorKind::UnknownType(*kind)))?;
    Ok((kind, curve, body))
}

/// Starts a message: the header, with room for `body_len` more bytes.
pub(crate) fn start_message(kind: MessageType, curve_byte: u8, body_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body_len);
    out.extend_from_slice(&[PROTOCOL_VERSION, kind.byte(), curve_byte]);
    out
}
