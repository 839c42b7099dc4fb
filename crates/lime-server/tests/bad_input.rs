//! The bad input battery: each case sends something a client should not, checks the
//! exact answer (HTTP status, content type, X3DH error code, echoed curve byte), then
//! checks with [`assert_still_serving`] that the server still serves and that no key
//! was lost, changed or added.
//!
//! Every test first registers a sentinel device on each enabled curve and sends its
//! bad input as that sentinel where a sender is needed, so that a bad request taken
//! for a good one would show as a change to the sentinel's keys.

mod common;

use common::{TestApp, device_id, id, one_time_pre_key, registration, spawn_app, spawn_app_with};
use futures::stream::{self, StreamExt};
use lime_protocol::{
    Curve, DeviceId, ErrorCode, MessageType, PeerBundle, Registration, Request, RequestMessage,
    Response, ResponseMessage,
};
use lime_server::client::RawAnswer;
use lime_server::http::X3DH_CONTENT_TYPE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The header a sender's device id is sent in.
const IDENTITY: &str = "x-lime-user-identity";

/// The device that asks for others' bundles; it is never registered.
const ASKER: &str = "sip:asker@example.org;gr=urn:uuid:asker";

/// `request` sent by the asker, registered just before (as liblime registers a
/// device before it fetches anyone's bundle) and deleted just after, so that the
/// store holds only what the test put there.
async fn asker_asks(app: &TestApp, curve: Curve, request: Request) -> ResponseMessage {
    let registration = Request::RegisterUser(registration(curve, 0, 1));
    let registered = app.ask(ASKER, curve, registration).await.response;
    assert_eq!(
        registered,
        Response::Done(MessageType::RegisterUser),
        "{curve}"
    );
    let answer = app.ask(ASKER, curve, request).await;
    let deleted = app.ask(ASKER, curve, Request::DeleteUser).await.response;
    assert_eq!(deleted, Response::Done(MessageType::DeleteUser), "{curve}");
    answer
}

/// A device registered before the bad input; it must come out of it untouched.
struct Sentinel {
    curve: Curve,
    device: String,
    keys: Registration,
}

/// Registers a sentinel with 3 OPks on every curve the app serves, in curve order.
async fn sentinels(app: &TestApp) -> Vec<Sentinel> {
    let mut sentinels = Vec::new();
    for curve in app.settings.storage.enabled_curves() {
        let device = device_id("sentinel");
        let keys = registration(curve, 3, 1);
        let answer = app
            .ask(&device, curve, Request::RegisterUser(keys.clone()))
            .await;
        assert_eq!(
            answer.response,
            Response::Done(MessageType::RegisterUser),
            "{curve}: sentinel registration"
        );
        sentinels.push(Sentinel {
            curve,
            device,
            keys,
        });
    }
    sentinels
}

/// The sentinel of `curve`.
fn sentinel(sentinels: &[Sentinel], curve: Curve) -> &Sentinel {
    sentinels
        .iter()
        .find(|sentinel| sentinel.curve == curve)
        .unwrap_or_else(|| panic!("no sentinel on {curve}"))
}

/// After bad input: every store holds exactly its sentinel with the keys it
/// registered (nothing lost, changed, duplicated or added), the sentinel's
/// getSelfOPks is unchanged, and a fresh device registers and is served a bundle.
async fn assert_still_serving(app: &TestApp, sentinels: &[Sentinel]) {
    for sentinel in sentinels {
        let curve = sentinel.curve;
        let answer = app
            .ask(&sentinel.device, curve, Request::GetSelfOneTimePreKeys)
            .await;
        assert_eq!(
            answer.response,
            Response::SelfOneTimePreKeys(vec![1, 2, 3]),
            "{curve}: the sentinel's OPks"
        );
        assert_store_holds_only(app, sentinel).await;

        let fresh = device_id("fresh");
        let keys = registration(curve, 1, 1);
        let answer = app
            .ask(&fresh, curve, Request::RegisterUser(keys.clone()))
            .await;
        assert_eq!(answer.response, Response::Done(MessageType::RegisterUser));
        let answer = app
            .ask(&fresh, curve, Request::GetPeerBundle(vec![id(&fresh)]))
            .await;
        let Response::PeerBundles(bundles) = answer.response else {
            panic!("{curve}: expected peerBundle, got {answer:?}");
        };
        let [
            PeerBundle {
                device_id,
                bundle: Some(bundle),
            },
        ] = &bundles[..]
        else {
            panic!("{curve}: expected one bundle for {fresh}, got {bundles:?}");
        };
        assert_eq!(device_id.as_str(), fresh);
        assert_eq!(bundle.identity_key, keys.identity_key);
        assert_eq!(bundle.signed_pre_key, keys.signed_pre_key);
        assert_eq!(
            bundle.one_time_pre_key.as_ref(),
            Some(&keys.one_time_pre_keys[0])
        );
        let answer = app.ask(&fresh, curve, Request::DeleteUser).await;
        assert_eq!(answer.response, Response::Done(MessageType::DeleteUser));
        assert_store_holds_only(app, sentinel).await;
    }
}

/// Reads the store directly: one device, the sentinel, with exactly its keys.
async fn assert_store_holds_only(app: &TestApp, sentinel: &Sentinel) {
    let curve = sentinel.curve;
    assert_eq!(
        app.probe.device_ids(curve).await,
        std::slice::from_ref(&sentinel.device),
        "{curve}: the store holds the sentinel and nothing else"
    );
    let keys = &sentinel.keys;
    let spk = &keys.signed_pre_key;
    let expected = (
        keys.identity_key.as_bytes().to_vec(),
        Some(spk.public().to_vec()),
        Some(spk.signature().to_vec()),
        Some(spk.id()),
    );
    assert_eq!(
        app.probe.device_row(curve, &sentinel.device).await,
        Some(expected),
        "{curve}: the sentinel's Ik, SPk, SPk_sig and SPk_id"
    );
    let registered: Vec<(u32, Vec<u8>)> = keys
        .one_time_pre_keys
        .iter()
        .map(|key| (key.id(), key.public().to_vec()))
        .collect();
    assert_eq!(
        app.probe.one_time_pre_keys(curve).await,
        registered,
        "{curve}: the sentinel's OPks, byte for byte"
    );
}

/// POSTs `body` as `sender` with the X3DH content type.
async fn post_as(app: &TestApp, sender: &str, body: Vec<u8>) -> RawAnswer {
    app.post_raw(
        &[("content-type", X3DH_CONTENT_TYPE), (IDENTITY, sender)],
        body,
    )
    .await
}

/// Checks an answer is the X3DH error `code` with curve byte `curve_byte`, sent as
/// HTTP 200 with the X3DH content type. Read byte by byte: the curve byte may name
/// no curve.
fn assert_x3dh_error(answer: &RawAnswer, curve_byte: u8, code: ErrorCode, case: &str) {
    assert_eq!(answer.status, 200, "{case}: HTTP status");
    assert_eq!(
        answer.content_type.as_deref(),
        Some(X3DH_CONTENT_TYPE),
        "{case}: Content-Type"
    );
    let body = &answer.body[..];
    assert!(body.len() >= 4, "{case}: error answer too short: {body:?}");
    let text = std::str::from_utf8(&body[4..]).unwrap_or("<not UTF-8>");
    assert_eq!(
        body[..3],
        [0x01, MessageType::Error.byte(), curve_byte],
        "{case}: error header (version, type 0xff, the request's curve byte)"
    );
    assert_eq!(
        ErrorCode::from_byte(body[3]),
        Some(code),
        "{case}: error code (text: {text})"
    );
    assert!(
        std::str::from_utf8(&body[4..]).is_ok(),
        "{case}: the error text is UTF-8"
    );
}

/// A valid encoded request.
fn encode(curve: Curve, request: Request) -> Vec<u8> {
    RequestMessage { curve, request }.encode().unwrap()
}

/// One valid message of each request type on `curve`, sent by a registered device.
fn one_of_each_request(curve: Curve) -> Vec<(MessageType, Vec<u8>)> {
    [
        Request::RegisterUser(registration(curve, 2, 10)),
        Request::DeleteUser,
        Request::PostSignedPreKey(common::signed_pre_key(curve, 9)),
        Request::PostOneTimePreKeys(vec![
            one_time_pre_key(curve, 10),
            one_time_pre_key(curve, 11),
        ]),
        Request::GetPeerBundle(vec![
            id("sip:peer@example.org"),
            id("sip:other@example.org"),
        ]),
        Request::GetSelfOneTimePreKeys,
    ]
    .into_iter()
    .map(|request| (request.message_type(), encode(curve, request)))
    .collect()
}

/// Sends every proper prefix of `message` (0 bytes up to one short of whole) as
/// `sender`, eight at a time, and checks each is answered `bad_size`.
async fn assert_every_prefix_is_bad_size(app: &TestApp, sender: &str, message: &[u8], what: &str) {
    stream::iter(0..message.len())
        .map(|cut| async move {
            let answer = post_as(app, sender, message[..cut].to_vec()).await;
            let curve_byte = if cut > 2 { message[2] } else { 0 };
            let case = format!("{what} cut to {cut} of {} bytes", message.len());
            assert_x3dh_error(&answer, curve_byte, ErrorCode::BadSize, &case);
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
}

/// Starts a server with one plain-HTTP listener, for requests written byte by byte.
async fn spawn_plain_app() -> TestApp {
    spawn_app_with(|s| {
        s.server.listen = Vec::new();
        s.server.plain_http_listen = vec!["127.0.0.1:0".parse().unwrap()];
    })
    .await
}

/// An HTTP/1.1 answer read off the socket.
struct HttpReply {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl HttpReply {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| &value[..])
    }

    fn as_raw_answer(&self) -> RawAnswer {
        RawAnswer {
            status: self.status,
            content_type: self
                .header("content-type")
                .map(|value| String::from_utf8_lossy(value).into_owned()),
            www_authenticate: Vec::new(),
            body: self.body.clone().into(),
        }
    }
}

/// Writes `request` (head and body, byte for byte) to a plain-HTTP app on a new
/// connection and reads one answer. The server may close without reading all of an
/// over-long body, so a reset after the whole answer has arrived is not a failure.
async fn exchange(app: &TestApp, request: &[u8]) -> HttpReply {
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    // The server may answer before reading everything: a failed write is fine as
    // long as an answer can be read.
    let _ = stream.write_all(request).await;
    let mut received = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(reply) = parse_reply(&received) {
            return reply;
        }
        match stream.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(error) => panic!("connection failed before a whole answer: {error}"),
        }
    }
    parse_reply(&received).unwrap_or_else(|| {
        panic!(
            "incomplete HTTP answer: {:?}",
            String::from_utf8_lossy(&received)
        )
    })
}

/// A whole HTTP/1.1 answer with a Content-Length body, once all of it is there.
fn parse_reply(received: &[u8]) -> Option<HttpReply> {
    let head_end = received.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&received[..head_end]).expect("ASCII answer head");
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, Vec<u8>)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_owned(), value.trim().as_bytes().to_vec()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map(|(_, value)| std::str::from_utf8(value).unwrap().parse().unwrap())
        .unwrap_or(0);
    let body = received.get(head_end + 4..head_end + 4 + length)?.to_vec();
    Some(HttpReply {
        status,
        headers,
        body,
    })
}

/// The head of a POST to `/` with a Content-Length, `extra` header lines included
/// (each ending in CRLF), closing the connection after the answer.
fn post_head(extra: &[u8], body_len: usize) -> Vec<u8> {
    [
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".as_slice(),
        extra,
        format!("Content-Length: {body_len}\r\n\r\n").as_bytes(),
    ]
    .concat()
}

// ---- headers and bodies too short to be messages --------------------------------

#[tokio::test]
async fn empty_body_is_bad_size() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    let answer = post_as(&app, &sentinels[0].device, Vec::new()).await;
    assert_x3dh_error(&answer, 0, ErrorCode::BadSize, "empty body");
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn one_and_two_byte_bodies_are_bad_size() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for body in [&[0x01][..], &[0x01, 0x09], &[0xff], &[0x01, 0x07]] {
        let answer = post_as(&app, &sentinels[0].device, body.to_vec()).await;
        assert_x3dh_error(&answer, 0, ErrorCode::BadSize, &format!("body {body:?}"));
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn wrong_protocol_version_is_bad_x3dh_protocol_version() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let sender = &sentinel(&sentinels, curve).device;
        for (kind, message) in one_of_each_request(curve) {
            for version in [0x00, 0x02, 0xff] {
                let mut body = message.clone();
                body[0] = version;
                let answer = post_as(&app, sender, body).await;
                let case = format!("{curve} {kind} with version {version:#04x}");
                assert_x3dh_error(
                    &answer,
                    curve.id(),
                    ErrorCode::BadX3dhProtocolVersion,
                    &case,
                );
            }
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn unknown_message_type_is_bad_request() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let sender = &sentinel(&sentinels, curve).device;
        for kind in [0x00, 0x0a, 0x10, 0x80, 0xfe] {
            for body in [vec![], vec![0x00, 0x01, 0x02]] {
                let message = [[0x01, kind, curve.id()].as_slice(), &body].concat();
                let answer = post_as(&app, sender, message).await;
                let case = format!("{curve} type {kind:#04x}");
                assert_x3dh_error(&answer, curve.id(), ErrorCode::BadRequest, &case);
            }
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn answer_types_sent_as_requests_are_bad_request() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let sender = &sentinel(&sentinels, curve).device;
        let answers = [
            MessageType::PeerBundle,
            MessageType::SelfOneTimePreKeys,
            MessageType::Error,
        ];
        for kind in answers {
            // Each with a body that would be a valid answer of its type.
            let body: &[u8] = match kind {
                MessageType::Error => &[0x04],
                _ => &[0x00, 0x00],
            };
            let message = [[0x01, kind.byte(), curve.id()].as_slice(), body].concat();
            let answer = post_as(&app, sender, message).await;
            let case = format!("{curve} {kind} as a request");
            assert_x3dh_error(&answer, curve.id(), ErrorCode::BadRequest, &case);
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn deprecated_register_user_0x01_is_bad_request() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let fresh = device_id("old-client");
        // The body of a current registerUser under the old type byte.
        let mut message = encode(curve, Request::RegisterUser(registration(curve, 2, 1)));
        message[1] = 0x01;
        let answer = post_as(&app, &fresh, message).await;
        let case = format!("{curve} deprecated registerUser");
        assert_x3dh_error(&answer, curve.id(), ErrorCode::BadRequest, &case);
        let answer = post_as(&app, &fresh, vec![0x01, 0x01, curve.id()]).await;
        assert_x3dh_error(&answer, curve.id(), ErrorCode::BadRequest, &case);
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn unknown_curve_is_bad_curve_and_its_byte_is_echoed() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for unknown in [0x00, 0x06, 0x07, 0x80, 0xff] {
        for (kind, mut message) in one_of_each_request(Curve::C25519) {
            message[2] = unknown;
            let answer = post_as(&app, &sentinels[0].device, message).await;
            let case = format!("{kind} on curve {unknown:#04x}");
            assert_x3dh_error(&answer, unknown, ErrorCode::BadCurve, &case);
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn curve_not_enabled_is_bad_curve() {
    let app = spawn_app_with(|s| s.storage.curves = vec!["c25519".into()]).await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL.into_iter().filter(|c| *c != Curve::C25519) {
        for (kind, message) in one_of_each_request(curve) {
            let answer = post_as(&app, &sentinels[0].device, message).await;
            let case = format!("{kind} on {curve}, not enabled");
            assert_x3dh_error(&answer, curve.id(), ErrorCode::BadCurve, &case);
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

// ---- headers --------------------------------------------------------------------

#[tokio::test]
async fn wrong_content_type_is_bad_content_type() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let fresh = device_id("fresh");
        let message = encode(curve, Request::RegisterUser(registration(curve, 1, 1)));
        let wrong = [
            "application/octet-stream",
            "text/plain",
            "x3dh/octet-streams",
            "x3dh",
            "x3dh/octet-stream-v2",
            "",
        ];
        for content_type in wrong {
            let headers = [("content-type", content_type), (IDENTITY, fresh.as_str())];
            let answer = app.post_raw(&headers, message.clone()).await;
            let case = format!("{curve} Content-Type {content_type:?}");
            assert_x3dh_error(&answer, curve.id(), ErrorCode::BadContentType, &case);
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn missing_content_type_is_bad_content_type() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let fresh = device_id("fresh");
        let message = encode(curve, Request::RegisterUser(registration(curve, 1, 1)));
        let answer = app.post_raw(&[(IDENTITY, fresh.as_str())], message).await;
        let case = format!("{curve} without Content-Type");
        assert_x3dh_error(&answer, curve.id(), ErrorCode::BadContentType, &case);
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn missing_sender_header_is_missing_sender_id() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        for (kind, message) in one_of_each_request(curve) {
            let headers: [&[(&str, &str)]; 4] = [
                &[("content-type", X3DH_CONTENT_TYPE)],
                &[("content-type", X3DH_CONTENT_TYPE), (IDENTITY, "")],
                &[("content-type", X3DH_CONTENT_TYPE), ("from", "   ")],
                &[
                    ("content-type", X3DH_CONTENT_TYPE),
                    ("x-lime-user", "sip:a@b"),
                ],
            ];
            for headers in headers {
                let answer = app.post_raw(headers, message.clone()).await;
                let case = format!("{curve} {kind} with headers {headers:?}");
                assert_x3dh_error(&answer, curve.id(), ErrorCode::MissingSenderId, &case);
            }
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

// ---- bodies cut short, counts that lie, trailing bytes --------------------------

/// Curves whose messages are cut at every length: the smallest and the largest.
const CUT_CURVES: [Curve; 2] = [Curve::C25519, Curve::C448Mlk1024];

#[tokio::test]
async fn register_user_cut_at_any_length_is_bad_size() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in CUT_CURVES {
        let fresh = device_id("fresh");
        let message = encode(curve, Request::RegisterUser(registration(curve, 2, 1)));
        let what = format!("{curve} registerUser");
        assert_every_prefix_is_bad_size(&app, &fresh, &message, &what).await;
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn post_spk_cut_at_any_length_is_bad_size() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in CUT_CURVES {
        let sender = &sentinel(&sentinels, curve).device;
        let spk = common::signed_pre_key(curve, 2);
        let message = encode(curve, Request::PostSignedPreKey(spk));
        let what = format!("{curve} postSPk");
        assert_every_prefix_is_bad_size(&app, sender, &message, &what).await;
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn post_opks_cut_at_any_length_is_bad_size() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in CUT_CURVES {
        let sender = &sentinel(&sentinels, curve).device;
        let keys = vec![one_time_pre_key(curve, 4), one_time_pre_key(curve, 5)];
        let message = encode(curve, Request::PostOneTimePreKeys(keys));
        let what = format!("{curve} postOPks");
        assert_every_prefix_is_bad_size(&app, sender, &message, &what).await;
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn get_peer_bundle_cut_at_any_length_is_bad_size() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in CUT_CURVES {
        let sentinel = sentinel(&sentinels, curve);
        let devices = vec![id(&sentinel.device), id("sip:peer@example.org;gr=x")];
        let message = encode(curve, Request::GetPeerBundle(devices));
        let what = format!("{curve} getPeerBundle");
        assert_every_prefix_is_bad_size(&app, &sentinel.device, &message, &what).await;
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn opk_count_other_than_the_keys_sent_is_bad_size() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let sender = &sentinel(&sentinels, curve).device;
        let fresh = device_id("fresh");
        let keys = vec![one_time_pre_key(curve, 4), one_time_pre_key(curve, 5)];
        let post = encode(curve, Request::PostOneTimePreKeys(keys));
        let post_count_at = 3;
        let register = encode(curve, Request::RegisterUser(registration(curve, 2, 10)));
        let register_count_at =
            3 + curve.identity_key_len() + curve.pre_key_len() + curve.signature_len() + 4;
        let cases = [
            ("postOPks", sender.as_str(), &post, post_count_at),
            ("registerUser", fresh.as_str(), &register, register_count_at),
        ];
        for (what, sender, message, count_at) in cases {
            for count in [0u16, 1, 3, 4, u16::MAX] {
                let mut body = message.clone();
                body[count_at..count_at + 2].copy_from_slice(&count.to_be_bytes());
                let answer = post_as(&app, sender, body).await;
                let case = format!("{curve} {what} with count {count} for 2 keys");
                assert_x3dh_error(&answer, curve.id(), ErrorCode::BadSize, &case);
            }
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn device_count_larger_than_the_ids_sent_is_bad_size() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let sentinel = sentinel(&sentinels, curve);
        let message = encode(curve, Request::GetPeerBundle(vec![id(&sentinel.device)]));
        for count in [2u16, 3, u16::MAX] {
            let mut body = message.clone();
            body[3..5].copy_from_slice(&count.to_be_bytes());
            let answer = post_as(&app, &sentinel.device, body).await;
            let case = format!("{curve} getPeerBundle with count {count} for 1 id");
            assert_x3dh_error(&answer, curve.id(), ErrorCode::BadSize, &case);
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn get_peer_bundle_with_count_0_is_bad_request() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let sender = &sentinel(&sentinels, curve).device;
        let header = [0x01, MessageType::GetPeerBundle.byte(), curve.id()];
        let answer = post_as(&app, sender, [&header[..], &[0, 0]].concat()).await;
        let case = format!("{curve} getPeerBundle with count 0");
        assert_x3dh_error(&answer, curve.id(), ErrorCode::BadRequest, &case);
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn device_id_length_running_past_the_end_is_bad_size() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let sentinel = sentinel(&sentinels, curve);
        let message = encode(curve, Request::GetPeerBundle(vec![id(&sentinel.device)]));
        let real_len = sentinel.device.len() as u16;
        for len in [real_len + 1, real_len + 100, u16::MAX] {
            let mut body = message.clone();
            body[5..7].copy_from_slice(&len.to_be_bytes());
            let answer = post_as(&app, &sentinel.device, body).await;
            let case = format!("{curve} device id length {len} for {real_len} bytes");
            assert_x3dh_error(&answer, curve.id(), ErrorCode::BadSize, &case);
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn trailing_bytes_after_a_complete_message_are_bad_size() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        // Sent as the sentinel: a deleteUser or postSPk taken despite its trailing
        // bytes would show in its keys.
        let sender = &sentinel(&sentinels, curve).device;
        for (kind, message) in one_of_each_request(curve) {
            for garbage in [&[0x00][..], &[0xff; 4], &[0x01, kind.byte(), curve.id()]] {
                let body = [&message[..], garbage].concat();
                let answer = post_as(&app, sender, body).await;
                let case = format!("{curve} {kind} followed by {garbage:?}");
                assert_x3dh_error(&answer, curve.id(), ErrorCode::BadSize, &case);
            }
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

// ---- bodies too large ------------------------------------------------------------

#[tokio::test]
async fn body_over_the_default_1_mib_cap_is_refused_with_413() {
    let app = spawn_app().await;
    assert_eq!(app.settings.server.max_body_bytes, 1024 * 1024);
    let sentinels = sentinels(&app).await;
    let curve = Curve::C448Mlk1024;
    let fresh = device_id("fresh");
    // 700 OPks of 1628 bytes: a valid registerUser of about 1.1 MiB.
    let message = encode(curve, Request::RegisterUser(registration(curve, 700, 1)));
    assert!(message.len() > 1024 * 1024);
    let answer = post_as(&app, &fresh, message).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_ne!(answer.content_type.as_deref(), Some(X3DH_CONTENT_TYPE));
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn body_over_a_small_cap_is_refused_with_413_and_one_at_the_cap_is_served() {
    const CAP: usize = 256;
    // One curve, so that the sentinel (245 bytes of registerUser) fits under the cap.
    let app = spawn_app_with(|s| {
        s.server.max_body_bytes = CAP;
        s.storage.curves = vec!["c25519".into()];
    })
    .await;
    let sentinels = sentinels(&app).await;
    let curve = Curve::C25519;
    let fresh = device_id("fresh");
    let register = encode(curve, Request::RegisterUser(registration(curve, 4, 1)));
    assert!(register.len() > CAP);
    let answer = post_as(&app, &fresh, register).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_ne!(answer.content_type.as_deref(), Some(X3DH_CONTENT_TYPE));

    // A getPeerBundle of exactly the cap (3 header + 2 count + 2 length + the id),
    // from a registered device.
    let small = encode(curve, Request::RegisterUser(registration(curve, 0, 1)));
    assert_eq!(post_as(&app, &fresh, small).await.status, 200);
    let peer = format!("sip:{}", "p".repeat(CAP - 7 - 4));
    let at_cap = encode(curve, Request::GetPeerBundle(vec![id(&peer)]));
    assert_eq!(at_cap.len(), CAP);
    let answer = post_as(&app, &fresh, at_cap.clone()).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.body.get(..3),
        Some(&[0x01, MessageType::PeerBundle.byte(), curve.id()][..])
    );

    let over_cap = [&at_cap[..], &[0]].concat();
    let answer = post_as(&app, &fresh, over_cap).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    let delete = encode(curve, Request::DeleteUser);
    assert_eq!(post_as(&app, &fresh, delete).await.status, 200);
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn chunked_body_over_the_cap_is_refused_with_413() {
    let app = spawn_plain_app().await;
    let sentinels = sentinels(&app).await;
    let curve = Curve::C448Mlk1024;
    let fresh = device_id("fresh");
    let message = encode(curve, Request::RegisterUser(registration(curve, 700, 1)));
    let mut request = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: {X3DH_CONTENT_TYPE}\r\n{IDENTITY}: {fresh}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for chunk in message.chunks(64 * 1024) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let reply = exchange(&app, &request).await;
    assert_eq!(reply.status, 413);
    assert_still_serving(&app, &sentinels).await;
}

// ---- device ids --------------------------------------------------------------------

#[tokio::test]
async fn non_utf8_device_id_in_get_peer_bundle_is_bad_request() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let sentinel = sentinel(&sentinels, curve);
        let good = sentinel.device.as_bytes();
        let bad_ids: [&[u8]; 3] = [b"sip:\xff\xfe@example.org", b"\xc3", b"sip:a@b\xed\xa0\x80"];
        for bad in bad_ids {
            // The bad id between two good ones: the good one before must not be served.
            let mut body = vec![0x01, MessageType::GetPeerBundle.byte(), curve.id(), 0, 3];
            for device in [good, bad, good] {
                body.extend_from_slice(&(device.len() as u16).to_be_bytes());
                body.extend_from_slice(device);
            }
            let answer = post_as(&app, &sentinel.device, body).await;
            let case = format!("{curve} device id {bad:?}");
            assert_x3dh_error(&answer, curve.id(), ErrorCode::BadRequest, &case);
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn device_id_with_a_nul_in_get_peer_bundle_is_bad_request() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let sentinel = sentinel(&sentinels, curve);
        let good = sentinel.device.as_bytes();
        let with_nul = [good, b"\0"].concat();
        let mut body = vec![0x01, MessageType::GetPeerBundle.byte(), curve.id(), 0, 2];
        for device in [good, &with_nul[..]] {
            body.extend_from_slice(&(device.len() as u16).to_be_bytes());
            body.extend_from_slice(device);
        }
        let answer = post_as(&app, &sentinel.device, body).await;
        assert_x3dh_error(
            &answer,
            curve.id(),
            ErrorCode::BadRequest,
            &format!("{curve} NUL in id"),
        );
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn empty_device_id_in_get_peer_bundle_is_bad_request() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let sender = &sentinel(&sentinels, curve).device;
        let body = vec![
            0x01,
            MessageType::GetPeerBundle.byte(),
            curve.id(),
            0,
            1,
            0,
            0,
        ];
        let answer = post_as(&app, sender, body).await;
        let case = format!("{curve} empty device id");
        assert_x3dh_error(&answer, curve.id(), ErrorCode::BadRequest, &case);
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn non_utf8_sender_header_is_bad_request() {
    let app = spawn_plain_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let message = encode(curve, Request::RegisterUser(registration(curve, 1, 1)));
        for header in ["X-Lime-user-identity", "From"] {
            let line = [header.as_bytes(), b": sip:\xff\xfe@example.org;gr=1\r\n"].concat();
            let extra = [
                format!("Content-Type: {X3DH_CONTENT_TYPE}\r\n").as_bytes(),
                &line[..],
            ]
            .concat();
            let request = [post_head(&extra, message.len()), message.clone()].concat();
            let reply = exchange(&app, &request).await;
            let case = format!("{curve} non-UTF-8 {header}");
            assert_x3dh_error(
                &reply.as_raw_answer(),
                curve.id(),
                ErrorCode::BadRequest,
                &case,
            );
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn utf8_sender_header_beyond_ascii_is_an_ordinary_device_id() {
    let app = spawn_plain_app().await;
    let sentinels = sentinels(&app).await;
    let curve = Curve::C25519;
    let device = "sip:zoë-αβγ-日本@example.org;gr=urn:uuid:1";
    let message = encode(curve, Request::RegisterUser(registration(curve, 1, 1)));
    let extra = format!("Content-Type: {X3DH_CONTENT_TYPE}\r\nX-Lime-user-identity: {device}\r\n");
    let request = [post_head(extra.as_bytes(), message.len()), message].concat();
    let reply = exchange(&app, &request).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.body,
        [0x01, MessageType::RegisterUser.byte(), curve.id()]
    );

    // The body names it in UTF-8 too: the same device.
    let answer = asker_asks(&app, curve, Request::GetPeerBundle(vec![id(device)])).await;
    let Response::PeerBundles(bundles) = answer.response else {
        panic!("expected peerBundle, got {answer:?}");
    };
    assert_eq!(bundles[0].flag(), 1);
    let body = encode(curve, Request::DeleteUser);
    let extra = format!("Content-Type: {X3DH_CONTENT_TYPE}\r\nFrom: {device}\r\n");
    let reply = exchange(
        &app,
        &[post_head(extra.as_bytes(), body.len()), body].concat(),
    )
    .await;
    assert_eq!(
        reply.body,
        [0x01, MessageType::DeleteUser.byte(), curve.id()]
    );
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn unknown_device_id_of_65535_bytes_gets_flag_2() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let sentinel = sentinel(&sentinels, curve);
        let long = format!("sip:{}", "x".repeat(65_535 - 4));
        // The sentinel's own id with a long tail must not find the sentinel.
        let padded = format!(
            "{}{}",
            sentinel.device,
            " ".repeat(65_535 - sentinel.device.len())
        );
        let devices = vec![id(&long), id(&padded)];
        let answer = asker_asks(&app, curve, Request::GetPeerBundle(devices.clone())).await;
        assert_eq!(answer.curve_byte, curve.id());
        let Response::PeerBundles(bundles) = answer.response else {
            panic!("{curve}: expected peerBundle, got {answer:?}");
        };
        let answered: Vec<&DeviceId> = bundles.iter().map(|b| &b.device_id).collect();
        assert_eq!(answered, devices.iter().collect::<Vec<_>>(), "{curve}");
        assert!(bundles.iter().all(|b| b.flag() == 2), "{curve}");
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn sender_of_65535_bytes_registers_and_is_served() {
    // A head this long is over the default server.max_header_bytes (16 KiB, 431):
    // raised here to reach the device-id rule itself.
    let app = spawn_app_with(|settings| settings.server.max_header_bytes = 128 * 1024).await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let long = format!("{}-{}", device_id("long"), "y".repeat(65_535));
        let long = &long[..65_535];
        let keys = registration(curve, 1, 1);
        // Through a header this long, the answer must be a clean refusal or the
        // right answer, never a dropped connection.
        let body = encode(curve, Request::RegisterUser(keys.clone()));
        let answer = post_as(&app, long, body).await;
        assert_eq!(answer.status, 200, "{curve}: {answer:?}");
        assert_eq!(
            answer.body,
            [0x01, MessageType::RegisterUser.byte(), curve.id()][..]
        );

        let answer = asker_asks(&app, curve, Request::GetPeerBundle(vec![id(long)])).await;
        let Response::PeerBundles(bundles) = answer.response else {
            panic!("{curve}: expected peerBundle, got {answer:?}");
        };
        assert_eq!(bundles[0].device_id.as_str(), long);
        let bundle = bundles[0].bundle.as_ref().expect("a bundle");
        assert_eq!(
            bundle.one_time_pre_key.as_ref(),
            Some(&keys.one_time_pre_keys[0])
        );

        let answer = app.ask(long, curve, Request::DeleteUser).await;
        assert_eq!(answer.response, Response::Done(MessageType::DeleteUser));
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn sender_longer_than_65535_bytes_is_bad_request() {
    // Over the default server.max_header_bytes too: raised to reach the device-id rule.
    let app = spawn_app_with(|settings| settings.server.max_header_bytes = 128 * 1024).await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let too_long = format!("sip:{}", "z".repeat(65_536 - 4));
        let body = encode(curve, Request::RegisterUser(registration(curve, 1, 1)));
        let answer = post_as(&app, &too_long, body).await;
        let case = format!("{curve} sender of 65536 bytes");
        assert_x3dh_error(&answer, curve.id(), ErrorCode::BadRequest, &case);
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn device_ids_with_quotes_and_sql_are_ordinary_ids() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    let hostile = [
        "sip:a'; DROP TABLE Users; --@x",
        "sip:b\"); DELETE FROM OPk; --@x",
        "sip:c' OR '1'='1@x",
        "sip:d\\'; UPDATE Users SET Ik = x'00'; --@x",
        "sip:%@x",
        "sip:_@x",
    ];
    for curve in Curve::ALL {
        let mut registered = Vec::new();
        for (n, device) in hostile.iter().enumerate() {
            let keys = registration(curve, 2, 1 + 10 * n as u32);
            let answer = app
                .ask(device, curve, Request::RegisterUser(keys.clone()))
                .await;
            assert_eq!(
                answer.response,
                Response::Done(MessageType::RegisterUser),
                "{curve}: register {device}"
            );
            registered.push(keys);
        }
        let devices: Vec<DeviceId> = hostile.iter().map(|device| id(device)).collect();
        let answer = asker_asks(&app, curve, Request::GetPeerBundle(devices.clone())).await;
        let Response::PeerBundles(bundles) = answer.response else {
            panic!("{curve}: expected peerBundle, got {answer:?}");
        };
        for ((bundle, keys), device) in bundles.iter().zip(&registered).zip(&devices) {
            assert_eq!(&bundle.device_id, device);
            let served = bundle.bundle.as_ref().expect("a bundle");
            assert_eq!(served.identity_key, keys.identity_key, "{curve}: {device}");
            let opk = served.one_time_pre_key.as_ref().expect("an OPk");
            assert!(keys.one_time_pre_keys.contains(opk), "{curve}: {device}");
        }
        for (device, keys) in hostile.iter().zip(&registered) {
            let answer = app.ask(device, curve, Request::GetSelfOneTimePreKeys).await;
            let Response::SelfOneTimePreKeys(ids) = answer.response else {
                panic!("{curve}: {device}: {answer:?}");
            };
            assert_eq!(ids.len(), 1, "{curve}: {device} has one OPk left");
            assert!(keys.one_time_pre_keys.iter().any(|k| k.id() == ids[0]));
            let answer = app.ask(device, curve, Request::DeleteUser).await;
            assert_eq!(answer.response, Response::Done(MessageType::DeleteUser));
        }
        assert!(
            app.probe.tables_intact(curve).await,
            "{curve}: the tables survive"
        );
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn like_wildcards_in_a_device_id_match_no_other_device() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    for curve in Curve::ALL {
        let sentinel = &sentinel(&sentinels, curve).device;
        let wildcards = [
            "%".to_owned(),
            "sip:%".to_owned(),
            sentinel.replace("sentinel", "sentine_"),
            sentinel.to_uppercase(),
            format!("{sentinel} "),
            format!(" {sentinel}"),
            sentinel[..sentinel.len() - 1].to_owned(),
        ];
        let devices: Vec<DeviceId> = wildcards.iter().map(|w| id(w)).collect();
        let answer = asker_asks(&app, curve, Request::GetPeerBundle(devices.clone())).await;
        let Response::PeerBundles(bundles) = answer.response else {
            panic!("{curve}: expected peerBundle, got {answer:?}");
        };
        let answered: Vec<DeviceId> = bundles.iter().map(|b| b.device_id.clone()).collect();
        assert_eq!(answered, devices, "{curve}: ids echoed as sent");
        for bundle in &bundles {
            assert_eq!(
                bundle.flag(),
                2,
                "{curve}: {:?} is no device",
                bundle.device_id
            );
        }
        // Nor can they act for the sentinel. (Not sent as senders: ids with a NUL,
        // which no header can carry, or with spaces at their ends, which HTTP trims.)
        let senders = wildcards
            .iter()
            .filter(|w| !w.contains('\0') && w.trim() == w.as_str());
        for wildcard in senders {
            let answer = app.ask(wildcard, curve, Request::DeleteUser).await;
            assert_eq!(answer.response, Response::Done(MessageType::DeleteUser));
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

// ---- not X3DH at all ------------------------------------------------------------------

#[tokio::test]
async fn methods_other_than_post_are_405_with_allow_post() {
    let app = spawn_plain_app().await;
    let sentinels = sentinels(&app).await;
    for path in ["/", "/lime-server/lime-server.php"] {
        for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            let body = encode(Curve::C25519, Request::DeleteUser);
            let request = [
                format!(
                    "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
                     Content-Type: {X3DH_CONTENT_TYPE}\r\n{IDENTITY}: {}\r\n\
                     Content-Length: {}\r\n\r\n",
                    sentinels[0].device,
                    body.len()
                )
                .into_bytes(),
                body,
            ]
            .concat();
            let reply = exchange(&app, &request).await;
            assert_eq!(reply.status, 405, "{method} {path}");
            assert_eq!(reply.header("allow"), Some(&b"POST"[..]), "{method} {path}");
        }
    }
    assert_still_serving(&app, &sentinels).await;
}

#[tokio::test]
async fn unknown_path_is_404() {
    let app = spawn_app().await;
    let sentinels = sentinels(&app).await;
    let base = app.base_url.trim_end_matches('/');
    for path in [
        "/x3dh",
        "/lime-server/",
        "/lime-server/lime-server.php/extra",
        "/lime-server.php",
        "//",
    ] {
        let body = encode(Curve::C25519, Request::DeleteUser);
        let headers = [
            ("content-type", X3DH_CONTENT_TYPE),
            (IDENTITY, sentinels[0].device.as_str()),
        ];
        let answer = app
            .client
            .post(&format!("{base}{path}"), &headers, body)
            .await
            .unwrap();
        assert_eq!(answer.status, 404, "{path}");
        assert_ne!(
            answer.content_type.as_deref(),
            Some(X3DH_CONTENT_TYPE),
            "{path}"
        );
    }
    assert_still_serving(&app, &sentinels).await;
}
