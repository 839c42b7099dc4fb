//! The error codes an X3DH `error` message (type 0xff) carries.

use std::fmt;

/// Error code of an X3DH error answer (first byte of its body).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    /// The request's Content-Type is not `x3dh/octet-stream`.
    BadContentType = 0x00,
    /// Curve id unknown or not enabled on this server.
    BadCurve = 0x01,
    /// No device id header.
    MissingSenderId = 0x02,
    /// Version byte is not 0x01.
    BadX3dhProtocolVersion = 0x03,
    /// Body shorter or longer than its counts and the curve's sizes say.
    BadSize = 0x04,
    /// registerUser for a device that exists with different keys.
    UserAlreadyIn = 0x05,
    /// postSPk, postOPks or getSelfOPks for an unknown device.
    UserNotFound = 0x06,
    /// Storage failed; nothing was changed.
    DbError = 0x07,
    /// Well-formed but meaningless.
    BadRequest = 0x08,
    /// Misconfiguration or internal error.
    ServerFailure = 0x09,
    /// A configured limit was reached.
    ResourceLimitReached = 0x0a,
}

impl ErrorCode {
    /// Every error code, in wire order.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadContentType,
        ErrorCode::BadCurve,
        ErrorCode::MissingSenderId,
        ErrorCode::BadX3dhProtocolVersion,
        ErrorCode::BadSize,
        ErrorCode::UserAlreadyIn,
        ErrorCode::UserNotFound,
        ErrorCode::DbError,
        ErrorCode::BadRequest,
        ErrorCode::ServerFailure,
        ErrorCode::ResourceLimitReached,
    ];

    /// The code with wire value `byte`, if there is one.
    pub fn from_byte(byte: u8) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|code| *code as u8 == byte)
    }

    /// The wire value.
    pub fn byte(self) -> u8 {
        self as u8
    }

    /// The protocol's name for the code, as used in logs and docs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadContentType => "bad_content_type",
            ErrorCode::BadCurve => "bad_curve",
            ErrorCode::MissingSenderId => "missing_senderId",
            ErrorCode::BadX3dhProtocolVersion => "bad_x3dh_protocol_version",
            ErrorCode::BadSize => "bad_size",
            ErrorCode::UserAlreadyIn => "user_already_in",
            ErrorCode::UserNotFound => "user_not_found",
            ErrorCode::DbError => "db_error",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::ServerFailure => "server_failure",
            ErrorCode::ResourceLimitReached => "resource_limit_reached",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_byte(code.byte()), Some(code));
        }
        assert_eq!(ErrorCode::from_byte(0x0b), None);
    }
}
