//! The LIME X3DH key-server protocol (version 1): the wire format and nothing else.
//!
//! No I/O, no async. Parsing is total: any byte string gives a typed message or a
//! [`ParseError`] that maps to one X3DH error code, never a panic, and nothing is
//! allocated for a count before the bytes it counts are known to be there.
//!
//! - [`curve`]: the five base algorithms and their key sizes.
//! - [`error_code`]: the codes of an X3DH error answer.
//! - [`keys`]: device ids and public keys, valid by construction.
//! - [`header`]: the 3-byte header and the message types.
//! - [`request`]: client-to-server messages, parse and encode.
//! - [`response`]: server-to-client messages, encode and parse.
//! - [`error`]: why a message did not parse.

pub mod curve;
pub mod error;
pub mod error_code;
pub mod header;
pub mod keys;
mod reader;
pub mod request;
pub mod response;

pub use curve::{Curve, UnknownCurveName};
pub use error::{ParseError, ParseErrorKind};
pub use error_code::ErrorCode;
pub use header::{HEADER_LEN, MessageType, PROTOCOL_VERSION};
pub use keys::{
    DeviceId, IdentityKey, InvalidDeviceId, OneTimePreKey, SignedPreKey, WrongKeyLength,
};
pub use request::{Registration, Request, RequestMessage};
pub use response::{ErrorAnswer, KeyBundle, PeerBundle, Response, ResponseMessage};

/// A message that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A list longer than its u16 count can say.
    #[error("{0} entries do not fit a message (at most 65535)")]
    TooManyEntries(usize),
}
