//! Reading the X3DH init out of a Double Ratchet message's bytes.

use anyhow::{Result, bail, ensure};
use lime_protocol::Curve;

/// The X3DH init a Double Ratchet message carries in its header when it opens a
/// session, as liblime writes it (`lime/src/lime_double_ratchet_protocol.cpp`,
/// DR protocol version 0x01):
///
/// ```text
/// version 0x01 | type (bit 0: X3DH init, bit 1: payload in DR message) | curve id
/// | [ haveOPk (0|1) | sender Ik | Ek | peer SPk id u32 | [peer OPk id u32] ]
/// | Ns u16 | PN u16 | DHs | ...
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X3dhInit {
    /// The sender's identity key.
    pub identity_key: Vec<u8>,
    /// The sender's ephemeral key.
    pub ephemeral_key: Vec<u8>,
    /// Id of the recipient's signed pre-key the session was opened with.
    pub signed_pre_key_id: u32,
    /// Id of the recipient's one-time pre-key used, if one was.
    pub one_time_pre_key_id: Option<u32>,
}

impl X3dhInit {
    /// Reads the X3DH init of a DR message of `curve`: `None` when the message
    /// carries none, an error when the bytes are not a DR message liblime writes.
    pub fn from_dr_message(curve: Curve, message: &[u8]) -> Result<Option<X3dhInit>> {
        const DR_VERSION: u8 = 0x01;
        const X3DH_INIT_FLAG: u8 = 0x01;
        let public_key_len = curve.pre_key_len();
        // Ns, PN and DHs follow the optional X3DH init in every DR header.
        let dr_header_tail = 2 + 2 + public_key_len;
        let [version, message_type, curve_id, rest @ ..] = message else {
            bail!("DR message of {} bytes has no header", message.len());
        };
        ensure!(
            *version == DR_VERSION,
            "DR message version {version:#04x}, expected 0x01"
        );
        ensure!(
            *curve_id == curve.id(),
            "DR message is for curve {curve_id}, expected {} ({curve})",
            curve.id()
        );
        if message_type & X3DH_INIT_FLAG == 0 {
            ensure!(
                rest.len() >= dr_header_tail,
                "DR message too short for its header"
            );
            return Ok(None);
        }
        let [have_opk, rest @ ..] = rest else {
            bail!("DR message ends before its X3DH init");
        };
        let with_opk = match have_opk {
            0 => false,
            1 => true,
            other => bail!("X3DH init haveOPk byte is {other}, expected 0 or 1"),
        };
        let ik_len = curve.identity_key_len();
        let init_len = ik_len + public_key_len + 4 + if with_opk { 4 } else { 0 };
        ensure!(
            rest.len() >= init_len + dr_header_tail,
            "DR message of {} bytes too short for an X3DH init{} and DR header",
            message.len(),
            if with_opk { " with OPk" } else { "" }
        );
        let (identity_key, rest) = rest.split_at(ik_len);
        let (ephemeral_key, rest) = rest.split_at(public_key_len);
        let read_u32 = |bytes: &[u8]| u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let signed_pre_key_id = read_u32(rest);
        let one_time_pre_key_id = with_opk.then(|| read_u32(&rest[4..]));
        Ok(Some(X3dhInit {
            identity_key: identity_key.to_vec(),
            ephemeral_key: ephemeral_key.to_vec(),
            signed_pre_key_id,
            one_time_pre_key_id,
        }))
    }
}
