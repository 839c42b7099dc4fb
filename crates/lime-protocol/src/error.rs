//! Why a byte string is not a valid message, and which X3DH error code says so.

use crate::{ErrorCode, InvalidDeviceId, MessageType};

/// A message that could not be parsed.
///
/// Carries the request's curve byte (0 when the message is too short to have one)
/// because every answer, errors included, must echo it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct ParseError {
    /// Byte 2 of the message, or 0 when there is none.
    pub curve_byte: u8,
    /// What is wrong.
    pub kind: ParseErrorKind,
}

impl ParseError {
    /// The X3DH error code that answers this error.
    pub fn code(&self) -> ErrorCode {
        self.kind.code()
    }
}

/// What is wrong with a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    /// Fewer than the 3 header bytes.
    #[error("message is {0} bytes, shorter than the 3-byte header")]
    NoHeader(usize),
    /// Byte 0 is not 0x01.
    #[error("protocol version {0:#04x}, expected 0x01")]
    BadVersion(u8),
    /// Byte 2 names no base algorithm.
    #[error("unknown curve id {0}")]
    UnknownCurve(u8),
    /// Byte 1 names no message type.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// Type 0x01, which only pre-5.0 clients send.
    #[error("deprecated registerUser (0x01) is not served, registerUser (0x09) replaces it")]
    DeprecatedRegisterUser,
    /// A server-to-client type sent as a request.
    #[error("{0} is an answer, not a request")]
    NotARequest(MessageType),
    /// A client-to-server type received as an answer.
    #[error("{0} is a request, not an answer")]
    NotAnAnswer(MessageType),
    /// The message ends inside a field.
    #[error("message ends inside {0}")]
    Truncated(&'static str),
    /// Bytes remain after a complete message.
    #[error("{0} bytes after the end of the message")]
    TrailingBytes(usize),
    /// getPeerBundle with a count of 0.
    #[error("getPeerBundle asks for no device")]
    EmptyBundleRequest,
    /// A device id in the body is not one.
    #[error("{0}")]
    InvalidDeviceId(InvalidDeviceId),
    /// A peerBundle entry flag other than 0, 1 or 2.
    #[error("key bundle flag {0} is not 0, 1 or 2")]
    UnknownBundleFlag(u8),
    /// An error answer with a code the protocol does not define.
    #[error("unknown error code {0:#04x}")]
    UnknownErrorCode(u8),
}

impl ParseErrorKind {
    /// The X3DH error code that answers this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseErrorKind::NoHeader(_)
            | ParseErrorKind::Truncated(_)
            | ParseErrorKind::TrailingBytes(_) => ErrorCode::BadSize,
            ParseErrorKind::BadVersion(_) => ErrorCode::BadX3dhProtocolVersion,
            ParseErrorKind::UnknownCurve(_) => ErrorCode::BadCurve,
            ParseErrorKind::UnknownType(_)
            | ParseErrorKind::DeprecatedRegisterUser
            | ParseErrorKind::NotARequest(_)
            | ParseErrorKind::NotAnAnswer(_)
            | ParseErrorKind::EmptyBundleRequest
            | ParseErrorKind::InvalidDeviceId(_)
            | ParseErrorKind::UnknownBundleFlag(_)
            | ParseErrorKind::UnknownErrorCode(_) => ErrorCode::BadRequest,
        }
    }
}
