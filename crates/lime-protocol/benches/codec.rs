//! Parse + encode cost of the two heaviest messages: registerUser with 100 OPks and
//! a peerBundle answer for 10 devices. Run: `cargo bench -p lime-protocol`.

use criterion::{Criterion, criterion_group, criterion_main};
use lime_protocol::{
    Curve, DeviceId, IdentityKey, KeyBundle, OneTimePreKey, PeerBundle, Registration, Request,
    RequestMessage, Response, ResponseMessage, SignedPreKey,
};
use std::hint::black_box;

fn register_user(curve: Curve) -> RequestMessage {
    RequestMessage {
        curve,
        request: Request::RegisterUser(Registration {
            identity_key: IdentityKey::new(curve, vec![7; curve.identity_key_len()]).unwrap(),
            signed_pre_key: SignedPreKey::new(
                curve,
                vec![8; curve.pre_key_len()],
                vec![9; curve.signature_len()],
                1,
            )
            .unwrap(),
            one_time_pre_keys: (0..100)
                .map(|id| {
                    OneTimePreKey::new(curve, vec![id as u8; curve.pre_key_len()], id).unwrap()
                })
                .collect(),
        }),
    }
}

fn peer_bundle(curve: Curve) -> ResponseMessage {
    let bundles = (0..10)
        .map(|n| PeerBundle {
            device_id: DeviceId::new(format!("sip:user{n}@example.org;gr=urn:uuid:0000-{n}"))
                .unwrap(),
            bundle: Some(KeyBundle {
                identity_key: IdentityKey::new(curve, vec![1; curve.identity_key_len()]).unwrap(),
                signed_pre_key: SignedPreKey::new(
                    curve,
                    vec![2; curve.pre_key_len()],
                    vec![3; curve.signature_len()],
                    n,
                )
                .unwrap(),
                one_time_pre_key: Some(
                    OneTimePreKey::new(curve, vec![4; curve.pre_key_len()], n).unwrap(),
                ),
            }),
        })
        .collect();
    ResponseMessage {
        curve_byte: curve.id(),
        response: Response::PeerBundles(bundles),
    }
}

fn codec(c: &mut Criterion) {
    for curve in [Curve::C25519, Curve::C448Mlk1024] {
        let register = register_user(curve).encode().unwrap();
        c.bench_function(
            &format!("registerUser 100 OPks {curve}: parse+encode"),
            |b| {
                b.iter(|| {
                    let message = RequestMessage::parse(black_box(&register)).unwrap();
                    black_box(message.encode().unwrap())
                })
            },
        );
        let bundle = peer_bundle(curve).encode().unwrap();
        c.bench_function(
            &format!("peerBundle 10 devices {curve}: parse+encode"),
            |b| {
                b.iter(|| {
                    let message = ResponseMessage::parse(black_box(&bundle)).unwrap();
                    black_box(message.encode().unwrap())
                })
            },
        );
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
