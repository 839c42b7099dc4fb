//! Who sends a request: the [`Sender`] every handler acts for.
//!
//! Authentication is not implemented yet: the sender is the device id the request
//! claims in its `X-Lime-user-identity` header (or, for clients up to 5.x, `From`),
//! and the server warns at start that anyone can act for any device. This module is
//! the seam where digest or client-certificate authentication will check that the
//! authenticated user owns the claimed device id.

pub mod accounts;

use crate::error::RequestError;
use http::HeaderMap;
use lime_protocol::DeviceId;

/// Header newer clients put their device id in.
pub const IDENTITY_HEADER: &str = "x-lime-user-identity";

/// The device a request acts for, once let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    device_id: DeviceId,
}

impl Sender {
    /// The sender's device id (its GRUU).
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }
}

/// Builds the sender from the request headers. With authentication off, the
/// claimed device id is taken as it is.
pub fn sender_from_headers(headers: &HeaderMap) -> Result<Sender, RequestError> {
    let (header, value) = [IDENTITY_HEADER, "from"]
        .into_iter()
        .find_map(|name| headers.get(name).map(|value| (name, value)))
        .ok_or(RequestError::MissingSender)?;
    let invalid = |reason: String| RequestError::InvalidSender { header, reason };
    let text = std::str::from_utf8(value.as_bytes())
        .map_err(|_| invalid("not valid UTF-8".into()))?
        .trim();
    if text.is_empty() {
        return Err(RequestError::MissingSender);
    }
    let device_id = DeviceId::new(text).map_err(|error| invalid(error.to_string()))?;
    Ok(Sender { device_id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lime_protocol::ErrorCode;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, http::HeaderValue::from_bytes(value).unwrap());
        }
        map
    }

    #[test]
    fn identity_header_wins_over_from() {
        let sender = sender_from_headers(&headers(&[
            ("from", b"sip:old@example.org"),
            ("x-lime-user-identity", b"sip:new@example.org;gr=1"),
        ]))
        .unwrap();
        assert_eq!(sender.device_id().as_str(), "sip:new@example.org;gr=1");
    }

    #[test]
    fn from_is_used_when_alone() {
        let sender = sender_from_headers(&headers(&[("from", b"sip:a@example.org;gr=2")])).unwrap();
        assert_eq!(sender.device_id().as_str(), "sip:a@example.org;gr=2");
    }

    #[test]
    fn no_header_is_missing_sender() {
        let error = sender_from_headers(&HeaderMap::new()).unwrap_err();
        assert_eq!(error.code(), ErrorCode::MissingSenderId);
        let error = sender_from_headers(&headers(&[("from", b"  ")])).unwrap_err();
        assert_eq!(error.code(), ErrorCode::MissingSenderId);
    }

    #[test]
    fn non_utf8_sender_is_a_bad_request() {
        let error =
            sender_from_headers(&headers(&[("from", b"sip:\xff@example.org")])).unwrap_err();
        assert_eq!(error.code(), ErrorCode::BadRequest);
    }
}
