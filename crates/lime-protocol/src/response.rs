//! Server-to-client messages: encode (server side) and parse (clients, tests, tools).

use crate::header::{HEADER_LEN, split_header, start_message};
use crate::reader::Reader;
use crate::request::{
    put_count, put_device_id, put_one_time_pre_key, read_device_id, read_identity_key,
    read_one_time_pre_key,
};
use crate::{
    Curve, DeviceId, EncodeError, ErrorCode, IdentityKey, MessageType, OneTimePreKey, ParseError,
    ParseErrorKind, SignedPreKey,
};

/// An answer with the curve byte it echoes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseMessage {
    /// Byte 2: the curve id of the request answered, even one the server does not know.
    pub curve_byte: u8,
    /// What is answered.
    pub response: Response,
}

/// What the server answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// Success of registerUser, deleteUser, postSPk or postOPks: the request's header alone.
    Done(MessageType),
    /// peerBundle (0x06): one entry per requested device, in request order.
    PeerBundles(Vec<PeerBundle>),
    /// selfOPks (0x08): ids of the sender's one-time pre-keys still on the server.
    SelfOneTimePreKeys(Vec<u32>),
    /// error (0xff).
    Error(ErrorAnswer),
}

/// An error answer: a code, and a short text meant for logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorAnswer {
    /// The error code.
    pub code: ErrorCode,
    /// Human-readable detail; may be empty.
    pub text: String,
}

/// One entry of a peerBundle answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerBundle {
    /// The device asked for.
    pub device_id: DeviceId,
    /// Its keys, or `None` (flag 2) when the device is unknown or has no SPk.
    pub bundle: Option<KeyBundle>,
}

/// The keys a peer needs to open a session with a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyBundle {
    /// The device's identity key.
    pub identity_key: IdentityKey,
    /// The device's current signed pre-key.
    pub signed_pre_key: SignedPreKey,
    /// A one-time pre-key, now deleted from the server (flag 1), or none (flag 0).
    pub one_time_pre_key: Option<OneTimePreKey>,
}

impl PeerBundle {
    /// The entry of a device that gets no bundle (flag 2).
    pub fn none(device_id: DeviceId) -> PeerBundle {
        PeerBundle {
            device_id,
            bundle: None,
        }
    }

    /// The wire flag: 0 bundle without OPk, 1 with OPk, 2 no bundle.
    pub fn flag(&self) -> u8 {
        match &self.bundle {
            Some(KeyBundle {
                one_time_pre_key: None,
                ..
            }) => 0,
            Some(KeyBundle {
                one_time_pre_key: Some(_),
                ..
            }) => 1,
            None => 2,
        }
    }
}

impl ResponseMessage {
    /// An error answer to a request whose curve byte was `curve_byte`.
    pub fn error(curve_byte: u8, code: ErrorCode, text: impl Into<String>) -> ResponseMessage {
        ResponseMessage {
            curve_byte,
            response: Response::Error(ErrorAnswer {
                code,
                text: text.into(),
            }),
        }
    }

    /// Encodes the answer as the bytes to send.
    ///
    /// Fails only for a list longer than a u16 count can say.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let curve_byte = self.curve_byte;
        match &self.response {
            Response::Done(kind) => Ok(start_message(*kind, curve_byte, 0)),
            Response::PeerBundles(bundles) => encode_peer_bundles(curve_byte, bundles),
            Response::SelfOneTimePreKeys(ids) => {
                let mut out = start_message(
                    MessageType::SelfOneTimePreKeys,
                    curve_byte,
                    2 + 4 * ids.len(),
                );
                put_count(&mut out, ids.len())?;
                for id in ids {
                    out.extend_from_slice(&id.to_be_bytes());
                }
                Ok(out)
            }
            Response::Error(answer) => {
                let text = answer.text.as_bytes();
                let mut out = start_message(MessageType::Error, curve_byte, 1 + text.len());
                out.push(answer.code.byte());
                out.extend_from_slice(text);
                Ok(out)
            }
        }
    }

    /// Parses an answer. Like request parsing: total, no panic, no allocation
    /// before the bytes are there. The curve must be known for peerBundle.
    pub fn parse(message: &[u8]) -> Result<ResponseMessage, ParseError> {
        let (kind, curve, body) = split_header(message)?;
        parse_body(kind, curve, body)
            .map(|response| ResponseMessage {
                curve_byte: curve.id(),
                response,
            })
            .map_err(|kind| ParseError {
                curve_byte: curve.id(),
                kind,
            })
    }
}

/// The largest peerBundle answer a getPeerBundle naming `devices` could get on
/// `curve`: every device with a bundle and a one-time pre-key. What such a
/// request can cost (the answer is built whole) is known from the request alone.
pub fn largest_peer_bundle_len(curve: Curve, devices: &[DeviceId]) -> u64 {
    // Per entry: id length (2), flag (1), Ik, SPk, SPk id (4), SPk signature,
    // OPk, OPk id (4); the id's own bytes are added per device.
    let entry = 2
        + 1
        + curve.identity_key_len()
        + curve.pre_key_len()
        + 4
        + curve.signature_len()
        + curve.pre_key_len()
        + 4;
    // The header and the 2-byte count.
    let start = (HEADER_LEN + 2) as u64;
    devices.iter().fold(start, |total, device| {
        total + (entry + device.as_str().len()) as u64
    })
}

fn encode_peer_bundles(curve_byte: u8, bundles: &[PeerBundle]) -> Result<Vec<u8>, EncodeError> {
    let body_len: usize = bundles
        .iter()
        .map(|entry| {
            let keys = entry.bundle.as_ref().map_or(0, |bundle| {
                bundle.identity_key.as_bytes().len()
                    + bundle.signed_pre_key.public().len()
                    + bundle.signed_pre_key.signature().len()
                    + 4
                    + bundle
                        .one_time_pre_key
                        .as_ref()
                        .map_or(0, |key| key.public().len() + 4)
            });
            2 + entry.device_id.as_str().len() + 1 + keys
        })
        .sum();
    let mut out = start_message(MessageType::PeerBundle, curve_byte, 2 + body_len);
    put_count(&mut out, bundles.len())?;
    for entry in bundles {
        put_device_id(&mut out, &entry.device_id);
        out.push(entry.flag());
        if let Some(bundle) = &entry.bundle {
            // peerBundle order: Ik, SPk, SPk_id, SPk_sig (the id before the signature,
            // unlike registerUser and postSPk).
            out.extend_from_slice(bundle.identity_key.as_bytes());
            out.extend_from_slice(bundle.signed_pre_key.public());
            out.extend_from_slice(&bundle.signed_pre_key.id().to_be_bytes());
            out.extend_from_slice(bundle.signed_pre_key.signature());
            if let Some(key) = &bundle.one_time_pre_key {
                put_one_time_pre_key(&mut out, key);
            }
        }
    }
    Ok(out)
}

fn parse_body(kind: MessageType, curve: Curve, body: &[u8]) -> Result<Response, ParseErrorKind> {
    let mut reader = Reader::new(body);
    let response = match kind {
        MessageType::RegisterUser
        | MessageType::DeleteUser
        | MessageType::PostSignedPreKey
        | MessageType::PostOneTimePreKeys => Response::Done(kind),
        MessageType::PeerBundle => Response::PeerBundles(read_peer_bundles(&mut reader, curve)?),
        MessageType::SelfOneTimePreKeys => {
            let count = reader.u16("OPk id count")?;
            reader.expect_records(count, 4, "OPk id list")?;
            let ids = (0..count)
                .map(|_| reader.u32("OPk_id"))
                .collect::<Result<_, _>>()?;
            Response::SelfOneTimePreKeys(ids)
        }
        MessageType::Error => {
            let byte = reader.u8("error code")?;
            let code = ErrorCode::from_byte(byte).ok_or(ParseErrorKind::UnknownErrorCode(byte))?;
            let text = String::from_utf8_lossy(reader.rest()).into_owned();
            return Ok(Response::Error(ErrorAnswer { code, text }));
        }
        MessageType::DeprecatedRegisterUser
        | MessageType::GetPeerBundle
        | MessageType::GetSelfOneTimePreKeys => return Err(ParseErrorKind::NotAnAnswer(kind)),
    };
    reader.finish()?;
    Ok(response)
}

fn read_peer_bundles(
    reader: &mut Reader<'_>,
    curve: Curve,
) -> Result<Vec<PeerBundle>, ParseErrorKind> {
    let count = reader.u16("bundle count")?;
    // Each entry takes at least its 2-byte length and its flag.
    let mut bundles = Vec::with_capacity(usize::from(count).min(reader.remaining() / 3));
    for _ in 0..count {
        let device_id = read_device_id(reader)?;
        let flag = reader.u8("bundle flag")?;
        let bundle = match flag {
            0 | 1 => {
                let identity_key = read_identity_key(reader, curve)?;
                let public = reader.vec(curve.pre_key_len(), "SPk")?;
                let id = reader.u32("SPk_id")?;
                let signature = reader.vec(curve.signature_len(), "SPk_sig")?;
                let one_time_pre_key = match flag {
                    1 => Some(read_one_time_pre_key(reader, curve)?),
                    _ => None,
                };
                Some(KeyBundle {
                    identity_key,
                    signed_pre_key: SignedPreKey::from_checked(public, signature, id),
                    one_time_pre_key,
                })
            }
            2 => None,
            other => return Err(ParseErrorKind::UnknownBundleFlag(other)),
        };
        bundles.push(PeerBundle { device_id, bundle });
    }
    Ok(bundles)
}
