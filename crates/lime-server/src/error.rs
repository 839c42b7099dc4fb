//! Why a request failed, and the X3DH error code that tells the client.
//!
//! One type for the whole request path: the HTTP layer (content type, sender),
//! the parser and the handlers all fail with a [`RequestError`]. The text sent to
//! the client is short and safe; the log line (the `Display` form) is complete.

use crate::store::StoreError;
use crate::telemetry::clip;
use lime_protocol::{Curve, EncodeError, ErrorCode, ParseError};

/// A request that gets an X3DH error answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Content-Type is not `x3dh/octet-stream`.
    #[error("Content-Type is {:?}, expected x3dh/octet-stream", .0.as_deref().map(clip))]
    BadContentType(Option<String>),
    /// Neither `X-Lime-user-identity` nor `From` is present.
    #[error("no X-Lime-user-identity or From header")]
    MissingSender,
    /// The sender header is present but is not a device id.
    #[error("sender header {header} is not a device id: {reason}")]
    InvalidSender {
        /// The header read.
        header: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The body is not a valid request.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The curve is known but not served here.
    #[error("curve {0} is not enabled on this server")]
    CurveNotEnabled(Curve),
    /// A getPeerBundle whose answer could be larger than allowed.
    #[error(
        "getPeerBundle for {devices} devices could need a {bytes}-byte answer, over \
         limits.max_bundle_answer_bytes ({limit})"
    )]
    BundleAnswerTooLarge {
        /// How many devices were asked for.
        devices: usize,
        /// The largest answer they could need.
        bytes: u64,
        /// `limits.max_bundle_answer_bytes`.
        limit: u64,
    },
    /// A peer server sent something other than getPeerBundle (refused with a 403
    /// by the HTTP layer first).
    #[error("peer server {peer} may only send getPeerBundle, not {message:?}")]
    NotForPeers {
        /// The peer's domains.
        peer: String,
        /// What it sent.
        message: lime_protocol::MessageType,
    },
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The answer could not be encoded.
    #[error("cannot encode the answer: {0}")]
    Encode(#[from] EncodeError),
}

impl RequestError {
    /// The X3DH error code of the answer.
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::BadContentType(_) => ErrorCode::BadContentType,
            RequestError::MissingSender => ErrorCode::MissingSenderId,
            RequestError::InvalidSender { .. } => ErrorCode::BadRequest,
            RequestError::Parse(error) => error.code(),
            RequestError::CurveNotEnabled(_) => ErrorCode::BadCurve,
            RequestError::BundleAnswerTooLarge { .. } => ErrorCode::ResourceLimitReached,
            RequestError::NotForPeers { .. } => ErrorCode::BadRequest,
            RequestError::Store(StoreError::DeviceNotFound) => ErrorCode::UserNotFound,
            RequestError::Store(StoreError::DeviceRegisteredWithOtherKeys) => {
                ErrorCode::UserAlreadyIn
            }
            RequestError::Store(StoreError::ConflictingOneTimePreKeyId(_)) => ErrorCode::BadRequest,
            RequestError::Store(
                StoreError::TooManyOneTimePreKeys { .. } | StoreError::TooManyDevices { .. },
            ) => ErrorCode::ResourceLimitReached,
            RequestError::Store(StoreError::Backend(_) | StoreError::Timeout(_)) => {
                ErrorCode::DbError
            }
            RequestError::Encode(_) => ErrorCode::ServerFailure,
        }
    }

    /// The text sent to the client: the full reason for the client's own mistakes,
    /// nothing about the server's internals.
    pub fn client_text(&self) -> String {
        match self {
            RequestError::Store(StoreError::Backend(_) | StoreError::Timeout(_)) => {
                "database error, nothing was changed".into()
            }
            RequestError::Encode(_) => "internal error".into(),
            other => other.to_string(),
        }
    }

    /// True when the server, not the client, is at fault (logged as an error).
    pub fn is_server_fault(&self) -> bool {
        matches!(self.code(), ErrorCode::DbError | ErrorCode::ServerFailure)
    }
}
