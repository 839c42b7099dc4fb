//! Client-to-server messages: parse (server side) and encode (clients, tests, tools).

use crate::header::{split_header, start_message};
use crate::reader::Reader;
use crate::{
    Curve, DeviceId, EncodeError, IdentityKey, MessageType, OneTimePreKey, ParseError,
    ParseErrorKind, SignedPreKey,
};

/// A request with the curve it was made for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestMessage {
    /// The base algorithm of the request (byte 2).
    pub curve: Curve,
    /// What is asked.
    pub request: Request,
}

/// What a client asks of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// registerUser (0x09): publish a new device with its keys.
    RegisterUser(Registration),
    /// deleteUser (0x02): remove the sender's device and its one-time pre-keys.
    DeleteUser,
    /// postSPk (0x03): replace the sender's signed pre-key.
    PostSignedPreKey(SignedPreKey),
    /// postOPks (0x04): add one-time pre-keys to the sender's device.
    PostOneTimePreKeys(Vec<OneTimePreKey>),
    /// getPeerBundle (0x05): the key bundles of these devices, in this order.
    GetPeerBundle(Vec<DeviceId>),
    /// getSelfOPks (0x07): ids of the sender's one-time pre-keys still on the server.
    GetSelfOneTimePreKeys,
}

/// The keys a registerUser publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The device's identity key.
    pub identity_key: IdentityKey,
    /// The device's first signed pre-key.
    pub signed_pre_key: SignedPreKey,
    /// The device's first batch of one-time pre-keys (may be empty).
    pub one_time_pre_keys: Vec<OneTimePreKey>,
}

impl Request {
    /// The message type that carries this request.
    pub fn message_type(&self) -> MessageType {
        match self {
            Request::RegisterUser(_) => MessageType::RegisterUser,
            Request::DeleteUser => MessageType::DeleteUser,
            Request::PostSignedPreKey(_) => MessageType::PostSignedPreKey,
            Request::PostOneTimePreKeys(_) => MessageType::PostOneTimePreKeys,
            Request::GetPeerBundle(_) => MessageType::GetPeerBundle,
            Request::GetSelfOneTimePreKeys => MessageType::GetSelfOneTimePreKeys,
        }
    }
}

impl RequestMessage {
    /// Parses one request. Any byte string gives a request or an error, never a panic;
    /// nothing is allocated for a count before the bytes it counts are known to be there.
    pub fn parse(message: &[u8]) -> Result<RequestMessage, ParseError> {
        let (kind, curve, body) = split_header(message)?;
        parse_body(kind, curve, body)
            .map(|request| RequestMessage { curve, request })
            .map_err(|kind| ParseError {
                curve_byte: curve.id(),
                kind,
            })
    }

    /// Encodes the request as the bytes to post.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let curve = self.curve;
        let kind = self.request.message_type();
        let opk_len = curve.pre_key_len() + 4;
        match &self.request {
            Request::RegisterUser(registration) => {
                let keys = &registration.one_time_pre_keys;
                let body_len = curve.identity_key_len() + spk_len(curve) + 2 + keys.len() * opk_len;
                let mut out = start_message(kind, curve.id(), body_len);
                out.extend_from_slice(registration.identity_key.as_bytes());
                put_signed_pre_key(&mut out, &registration.signed_pre_key);
                put_one_time_pre_keys(&mut out, keys)?;
                Ok(out)
            }
            Request::DeleteUser | Request::GetSelfOneTimePreKeys => {
                Ok(start_message(kind, curve.id(), 0))
            }
            Request::PostSignedPreKey(key) => {
                let mut out = start_message(kind, curve.id(), spk_len(curve));
                put_signed_pre_key(&mut out, key);
                Ok(out)
            }
            Request::PostOneTimePreKeys(keys) => {
                let mut out = start_message(kind, curve.id(), 2 + keys.len() * opk_len);
                put_one_time_pre_keys(&mut out, keys)?;
                Ok(out)
            }
            Request::GetPeerBundle(devices) => {
                let ids_len: usize = devices.iter().map(|id| 2 + id.as_str().len()).sum();
                let mut out = start_message(kind, curve.id(), 2 + ids_len);
                put_count(&mut out, devices.len())?;
                for device in devices {
                    put_device_id(&mut out, device);
                }
                Ok(out)
            }
        }
    }
}

fn parse_body(kind: MessageType, curve: Curve, body: &[u8]) -> Result<Request, ParseErrorKind> {
    let mut reader = Reader::new(body);
    let request = match kind {
        MessageType::RegisterUser => {
            let identity_key = read_identity_key(&mut reader, curve)?;
            let signed_pre_key = read_signed_pre_key(&mut reader, curve)?;
            let one_time_pre_keys = read_one_time_pre_keys(&mut reader, curve)?;
            Request::RegisterUser(Registration {
                identity_key,
                signed_pre_key,
                one_time_pre_keys,
            })
        }
        MessageType::DeleteUser => Request::DeleteUser,
        MessageType::PostSignedPreKey => {
            Request::PostSignedPreKey(read_signed_pre_key(&mut reader, curve)?)
        }
        MessageType::PostOneTimePreKeys => {
            Request::PostOneTimePreKeys(read_one_time_pre_keys(&mut reader, curve)?)
        }
        MessageType::GetPeerBundle => Request::GetPeerBundle(read_device_ids(&mut reader)?),
        MessageType::GetSelfOneTimePreKeys => Request::GetSelfOneTimePreKeys,
        MessageType::DeprecatedRegisterUser => {
            return Err(ParseErrorKind::DeprecatedRegisterUser);
        }
        MessageType::PeerBundle | MessageType::SelfOneTimePreKeys | MessageType::Error => {
            return Err(ParseErrorKind::NotARequest(kind));
        }
    };
    reader.finish()?;
    Ok(request)
}

/// Size of SPk, SPk_sig and SPk_id together.
pub(crate) fn spk_len(curve: Curve) -> usize {
    curve.pre_key_len() + curve.signature_len() + 4
}

pub(crate) fn read_identity_key(
    reader: &mut Reader<'_>,
    curve: Curve,
) -> Result<IdentityKey, ParseErrorKind> {
    let bytes = reader.vec(curve.identity_key_len(), "Ik")?;
    Ok(IdentityKey::from_checked(bytes))
}

/// Reads SPk, SPk_sig, SPk_id: the order of registerUser and postSPk.
fn read_signed_pre_key(
    reader: &mut Reader<'_>,
    curve: Curve,
) -> Result<SignedPreKey, ParseErrorKind> {
    let public = reader.vec(curve.pre_key_len(), "SPk")?;
    let signature = reader.vec(curve.signature_len(), "SPk_sig")?;
    let id = reader.u32("SPk_id")?;
    Ok(SignedPreKey::from_checked(public, signature, id))
}

pub(crate) fn read_one_time_pre_key(
    reader: &mut Reader<'_>,
    curve: Curve,
) -> Result<OneTimePreKey, ParseErrorKind> {
    let public = reader.vec(curve.pre_key_len(), "OPk")?;
    let id = reader.u32("OPk_id")?;
    Ok(OneTimePreKey::from_checked(public, id))
}

/// Reads a u16 count and exactly that many (OPk, OPk_id); the count is checked
/// against the bytes left before the list is allocated.
fn read_one_time_pre_keys(
    reader: &mut Reader<'_>,
    curve: Curve,
) -> Result<Vec<OneTimePreKey>, ParseErrorKind> {
    let count = reader.u16("OPk count")?;
    reader.expect_records(count, curve.pre_key_len() + 4, "OPk list")?;
    (0..count)
        .map(|_| read_one_time_pre_key(reader, curve))
        .collect()
}

/// Reads a u16 count and that many (len u16, device id).
fn read_device_ids(reader: &mut Reader<'_>) -> Result<Vec<DeviceId>, ParseErrorKind> {
    let count = reader.u16("device count")?;
    if count == 0 {
        return Err(ParseErrorKind::EmptyBundleRequest);
    }
    // Each entry takes at least its 2-byte length: never reserve more than fits.
    let mut devices = Vec::with_capacity(usize::from(count).min(reader.remaining() / 2));
    for _ in 0..count {
        devices.push(read_device_id(reader)?);
    }
    Ok(devices)
}

pub(crate) fn read_device_id(reader: &mut Reader<'_>) -> Result<DeviceId, ParseErrorKind> {
    let len = reader.u16("device id length")?;
    let bytes = reader.bytes(usize::from(len), "device id")?;
    DeviceId::from_bytes(bytes).map_err(ParseErrorKind::InvalidDeviceId)
}

/// Writes a list's u16 count; a list longer than a u16 can count cannot be encoded.
pub(crate) fn put_count(out: &mut Vec<u8>, count: usize) -> Result<(), EncodeError> {
    let count = u16::try_from(count).map_err(|_| EncodeError::TooManyEntries(count))?;
    out.extend_from_slice(&count.to_be_bytes());
    Ok(())
}

pub(crate) fn put_device_id(out: &mut Vec<u8>, device: &DeviceId) {
    out.extend_from_slice(&device.wire_len().to_be_bytes());
    out.extend_from_slice(device.as_str().as_bytes());
}

fn put_signed_pre_key(out: &mut Vec<u8>, key: &SignedPreKey) {
    out.extend_from_slice(key.public());
    out.extend_from_slice(key.signature());
    out.extend_from_slice(&key.id().to_be_bytes());
}

pub(crate) fn put_one_time_pre_key(out: &mut Vec<u8>, key: &OneTimePreKey) {
    out.extend_from_slice(key.public());
    out.extend_from_slice(&key.id().to_be_bytes());
}

fn put_one_time_pre_keys(out: &mut Vec<u8>, keys: &[OneTimePreKey]) -> Result<(), EncodeError> {
    put_count(out, keys.len())?;
    for key in keys {
        put_one_time_pre_key(out, key);
    }
    Ok(())
}
