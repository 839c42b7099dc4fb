//! Encode/parse round trips and the "parse never panics" property, over every
//! curve and message type.

use lime_protocol::{
    Curve, DeviceId, ErrorAnswer, ErrorCode, IdentityKey, KeyBundle, MessageType, OneTimePreKey,
    ParseErrorKind, PeerBundle, Registration, Request, RequestMessage, Response, ResponseMessage,
    SignedPreKey,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn curve() -> impl Strategy<Value = Curve> {
    prop::sample::select(Curve::ALL.to_vec())
}

fn bytes(len: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), len)
}

fn device_id() -> impl Strategy<Value = DeviceId> {
    "[a-z0-9:;=@.'\" -]{1,80}".prop_map(|text| DeviceId::new(text).unwrap())
}

fn identity_key(curve: Curve) -> impl Strategy<Value = IdentityKey> {
    bytes(curve.identity_key_len()).prop_map(move |key| IdentityKey::new(curve, key).unwrap())
}

fn signed_pre_key(curve: Curve) -> impl Strategy<Value = SignedPreKey> {
    (
        bytes(curve.pre_key_len()),
        bytes(curve.signature_len()),
        any::<u32>(),
    )
        .prop_map(move |(key, sig, id)| SignedPreKey::new(curve, key, sig, id).unwrap())
}

fn one_time_pre_key(curve: Curve) -> impl Strategy<Value = OneTimePreKey> {
    (bytes(curve.pre_key_len()), any::<u32>())
        .prop_map(move |(key, id)| OneTimePreKey::new(curve, key, id).unwrap())
}

fn request(curve: Curve) -> impl Strategy<Value = Request> {
    prop_oneof![
        (
            identity_key(curve),
            signed_pre_key(curve),
            vec(one_time_pre_key(curve), 0..6)
        )
            .prop_map(|(identity_key, signed_pre_key, one_time_pre_keys)| {
                Request::RegisterUser(Registration {
                    identity_key,
                    signed_pre_key,
                    one_time_pre_keys,
                })
            }),
        Just(Request::DeleteUser),
        signed_pre_key(curve).prop_map(Request::PostSignedPreKey),
        vec(one_time_pre_key(curve), 0..6).prop_map(Request::PostOneTimePreKeys),
        vec(device_id(), 1..6).prop_map(Request::GetPeerBundle),
        Just(Request::GetSelfOneTimePreKeys),
    ]
}

fn request_message() -> impl Strategy<Value = RequestMessage> {
    curve().prop_flat_map(|curve| {
        request(curve).prop_map(move |request| RequestMessage { curve, request })
    })
}

fn peer_bundle(curve: Curve) -> impl Strategy<Value = PeerBundle> {
    let bundle = (
        identity_key(curve),
        signed_pre_key(curve),
        prop::option::of(one_time_pre_key(curve)),
    )
        .prop_map(
            |(identity_key, signed_pre_key, one_time_pre_key)| KeyBundle {
                identity_key,
                signed_pre_key,
                one_time_pre_key,
            },
        );
    (device_id(), prop::option::of(bundle))
        .prop_map(|(device_id, bundle)| PeerBundle { device_id, bundle })
}

fn response(curve: Curve) -> impl Strategy<Value = Response> {
    prop_oneof![
        prop::sample::select(vec![
            MessageType::RegisterUser,
            MessageType::DeleteUser,
            MessageType::PostSignedPreKey,
            MessageType::PostOneTimePreKeys,
        ])
        .prop_map(Response::Done),
        vec(peer_bundle(curve), 0..5).prop_map(Response::PeerBundles),
        vec(any::<u32>(), 0..50).prop_map(Response::SelfOneTimePreKeys),
        (prop::sample::select(ErrorCode::ALL.to_vec()), "[ -~]{0,40}")
            .prop_map(|(code, text)| Response::Error(ErrorAnswer { code, text })),
    ]
}

fn response_message() -> impl Strategy<Value = ResponseMessage> {
    curve().prop_flat_map(|curve| {
        response(curve).prop_map(move |response| ResponseMessage {
            curve_byte: curve.id(),
            response,
        })
    })
}

proptest! {
    #[test]
    fn every_request_survives_encode_then_parse(message in request_message()) {
        let bytes = message.encode().unwrap();
        prop_assert_eq!(RequestMessage::parse(&bytes), Ok(message));
    }

    #[test]
    fn every_response_survives_encode_then_parse(message in response_message()) {
        let bytes = message.encode().unwrap();
        prop_assert_eq!(ResponseMessage::parse(&bytes), Ok(message));
    }

    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..300)) {
        let _ = RequestMessage::parse(&bytes);
        let _ = ResponseMessage::parse(&bytes);
    }

    #[test]
    fn parsing_arbitrary_bodies_after_a_valid_header_never_panics(
        kind in 0u8..=255, curve in 1u8..=5, body in vec(any::<u8>(), 0..300)
    ) {
        let mut bytes = vec![1, kind, curve];
        bytes.extend(body);
        let _ = RequestMessage::parse(&bytes);
        let _ = ResponseMessage::parse(&bytes);
    }

    #[test]
    fn every_cut_of_a_request_is_bad_size(message in request_message(), cut in any::<prop::sample::Index>()) {
        let bytes = message.encode().unwrap();
        let len = cut.index(bytes.len());
        if len >= 3 {
            let error = RequestMessage::parse(&bytes[..len]).unwrap_err();
            prop_assert_eq!(error.code(), ErrorCode::BadSize, "cut at {} of {}: {}", len, bytes.len(), error);
            prop_assert_eq!(error.curve_byte, message.curve.id());
        }
    }

    #[test]
    fn trailing_bytes_after_a_request_are_bad_size(message in request_message(), extra in vec(any::<u8>(), 1..10)) {
        let mut bytes = message.encode().unwrap();
        bytes.extend(extra);
        let error = RequestMessage::parse(&bytes).unwrap_err();
        prop_assert_eq!(error.code(), ErrorCode::BadSize);
    }
}

#[test]
fn header_errors_map_to_their_codes() {
    let code = |bytes: &[u8]| RequestMessage::parse(bytes).unwrap_err().code();
    assert_eq!(code(b""), ErrorCode::BadSize);
    assert_eq!(code(&[1]), ErrorCode::BadSize);
    assert_eq!(code(&[1, 7]), ErrorCode::BadSize);
    assert_eq!(code(&[2, 7, 1]), ErrorCode::BadX3dhProtocolVersion);
    assert_eq!(code(&[1, 7, 6]), ErrorCode::BadCurve);
    assert_eq!(code(&[1, 7, 0]), ErrorCode::BadCurve);
    assert_eq!(code(&[1, 0x0a, 1]), ErrorCode::BadRequest);
    assert_eq!(code(&[1, 0x01, 1]), ErrorCode::BadRequest);
    assert_eq!(code(&[1, 0x06, 1]), ErrorCode::BadRequest);
    assert_eq!(code(&[1, 0x05, 1, 0, 0]), ErrorCode::BadRequest);
}

#[test]
fn error_echoes_the_curve_byte_even_unknown() {
    let error = RequestMessage::parse(&[1, 7, 42]).unwrap_err();
    assert_eq!(error.curve_byte, 42);
    assert!(matches!(error.kind, ParseErrorKind::UnknownCurve(42)));
}

#[test]
fn a_huge_count_with_no_data_is_bad_size_without_allocating() {
    // 65535 OPks announced, none there: refused before any list is built.
    let error = RequestMessage::parse(&[1, 4, 5, 0xff, 0xff]).unwrap_err();
    assert_eq!(error.kind, ParseErrorKind::Truncated("OPk list"));
    let error = RequestMessage::parse(&[1, 5, 1, 0xff, 0xff, 0, 1, b'a']).unwrap_err();
    assert_eq!(error.code(), ErrorCode::BadSize);
}

#[test]
fn device_id_running_past_the_end_is_bad_size() {
    let error = RequestMessage::parse(&[1, 5, 1, 0, 1, 0, 9, b'a', b'b']).unwrap_err();
    assert_eq!(error.kind, ParseErrorKind::Truncated("device id"));
}

#[test]
fn non_utf8_device_id_is_bad_request() {
    let error = RequestMessage::parse(&[1, 5, 1, 0, 1, 0, 2, 0xff, 0xfe]).unwrap_err();
    assert_eq!(error.code(), ErrorCode::BadRequest);
}

#[test]
fn peer_bundle_puts_the_spk_id_before_its_signature() {
    let curve = Curve::C25519;
    let message = ResponseMessage {
        curve_byte: 1,
        response: Response::PeerBundles(vec![PeerBundle {
            device_id: DeviceId::new("d").unwrap(),
            bundle: Some(KeyBundle {
                identity_key: IdentityKey::new(curve, vec![1; 32]).unwrap(),
                signed_pre_key: SignedPreKey::new(curve, vec![2; 32], vec![3; 64], 0x0a0b0c0d)
                    .unwrap(),
                one_time_pre_key: None,
            }),
        }]),
    };
    let bytes = message.encode().unwrap();
    // header 3, count 2, len 2, "d" 1, flag 1, Ik 32, SPk 32, then SPk_id.
    let spk_id_at = 3 + 2 + 2 + 1 + 1 + 32 + 32;
    assert_eq!(&bytes[spk_id_at..spk_id_at + 4], &[0x0a, 0x0b, 0x0c, 0x0d]);
    assert_eq!(bytes[spk_id_at + 4], 3);
    assert_eq!(bytes.len(), spk_id_at + 4 + 64);
}

#[test]
fn more_than_65535_ids_cannot_be_encoded() {
    let message = ResponseMessage {
        curve_byte: 1,
        response: Response::SelfOneTimePreKeys(vec![0; 65_536]),
    };
    assert!(message.encode().is_err());
}
