//! Federation between domains: three servers, for a.test, b.test and c.test, on
//! ephemeral ports. A forwards to B with HTTP Digest (the original PHP server's
//! scheme: user = our domain, realm = the peer's domain, SHA-256 HA1) and to C
//! with a client certificate; B forwards back to A. Users of one domain fetch
//! bundles of the others' users from their own server.
//!
//! The stories use our client, and the last one the real client: liblime's own
//! multi-domain scenario (upstream's "Multidomains" suite).

mod common;

use common::auth::TestAuth;
use common::backend::Backend;
use common::liblime::{EncryptionPolicy, LimeDevice, X3dhInit, describe_exchanges};
use common::{TestApp, random_hex, registration, spawn_app_authenticating};
use lime_protocol::{Curve, DeviceId, Request, RequestMessage, Response, ResponseMessage};
use lime_server::client::LimeClient;
use lime_server::config::{AcceptedPeerSettings, ForwardPeerSettings, Settings};
use lime_server::tls::CertificateFiles;
use sha2::Digest;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const A: &str = "a.test";
const B: &str = "b.test";
const C: &str = "c.test";
/// The name in the client certificate A presents to C.
const A_CERTIFICATE_NAME: &str = "lime.a.test";
const CURVE: Curve = Curve::C25519;

/// The HA1 the original lime-server's README has an operator compute for a peer:
/// hex of SHA-256 of `user:realm:password`, the user being the domain that logs
/// in and the realm the domain it logs in to. Computed here independently of the
/// server's code.
fn original_ha1(user: &str, realm: &str, password: &str) -> String {
    hex::encode(sha2::Sha256::digest(format!("{user}:{realm}:{password}")))
}

/// A device id of `domain`, unique to this run.
fn device(name: &str, domain: &str) -> String {
    format!(
        "sip:{name}-{}@{domain};gr=urn:uuid:{}",
        random_hex(4),
        random_hex(16)
    )
}

fn id(text: &str) -> DeviceId {
    DeviceId::new(text).unwrap()
}

/// A free loopback port, for a server its peers must know before it starts.
///
/// The port is let go before the server binds it, so it is taken below the
/// kernel's ephemeral range (32768 and up, `net.ipv4.ip_local_port_range`): a port
/// from `bind(0)` could meanwhile be handed to another suite's server or to an
/// outgoing connection's local end, both of which the kernel picks from that range
/// (a CI run once failed so, "Address already in use").
fn reserve_port() -> SocketAddr {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..1000)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], rng.random_range(20_000..32_000))))
        .find(|addr| std::net::TcpListener::bind(addr).is_ok())
        .expect("a free loopback port between 20000 and 32000")
}

/// The three servers and the files they share.
struct Domains {
    a: TestApp,
    b: TestApp,
    c: TestApp,
    /// Secrets and certificates made before the servers start.
    files: TempDir,
}

/// Changes to one server's settings.
type Configure = Box<dyn FnOnce(&mut Settings) + Send>;

/// What a test changes in the three-domain set-up.
#[derive(Default)]
struct Options {
    /// The password A uses at B (B always expects "a-at-b").
    a_password_at_b: Option<&'static str>,
    /// Changes to B's settings, last.
    b: Option<Configure>,
    /// Changes to A's settings, last.
    a: Option<Configure>,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write test file");
    path
}

async fn three_domains(options: Options) -> Domains {
    let files = tempfile::tempdir().expect("temporary directory");
    let dir = files.path().to_owned();
    let nonce = write(&dir, "nonce-secret", &random_hex(32));
    // The HA1s as each side keeps them.
    let b_expects_a = write(&dir, "b-expects-a", &original_ha1(A, B, "a-at-b"));
    let a_at_b = write(
        &dir,
        "a-at-b",
        &original_ha1(A, B, options.a_password_at_b.unwrap_or("a-at-b")),
    );
    let a_expects_b = write(&dir, "a-expects-b", &original_ha1(B, A, "b-at-a"));
    let b_at_a = write(&dir, "b-at-a", &original_ha1(B, A, "b-at-a"));
    // A's address and certificate, known to B before A starts.
    let a_addr = reserve_port();
    let a_tls = CertificateFiles::self_signed_in(&dir.join("a"));
    lime_server::tls::ensure_self_signed(&a_tls).expect("A's certificate");

    // C: users with client certificates; accepts A by its certificate.
    let c = spawn_app_authenticating(Backend::from_env(), TestAuth::Certificate, |s| {
        s.limits.max_bundle_requests = 100;
        s.federation.domains = vec![C.into()];
        s.federation.accept_from = vec![AcceptedPeerSettings {
            domains: vec![A.into()],
            certificate_identity: Some(A_CERTIFICATE_NAME.into()),
            ..AcceptedPeerSettings::default()
        }];
    })
    .await;
    let a_certificate =
        c.auth
            .pki
            .as_ref()
            .expect("C's CA")
            .issue(&[], &[A_CERTIFICATE_NAME], A_CERTIFICATE_NAME);

    // B: users without authentication; accepts A by digest; forwards to A.
    let b_configure = options.b;
    let (a_url, a_ca) = (format!("https://{a_addr}/"), a_tls.certificate.clone());
    let (nonce_b, b_expects_a2, b_at_a2) = (nonce.clone(), b_expects_a.clone(), b_at_a.clone());
    let b = spawn_app_authenticating(Backend::from_env(), TestAuth::Off, move |s| {
        s.limits.max_bundle_requests = 100;
        s.federation.domains = vec![B.into()];
        s.auth.digest.nonce_secret_file = Some(nonce_b);
        s.federation.accept_from = vec![AcceptedPeerSettings {
            domains: vec![A.into()],
            digest_ha1_file: Some(b_expects_a2),
            ..AcceptedPeerSettings::default()
        }];
        s.federation.forward_to = vec![ForwardPeerSettings {
            domains: vec![A.into()],
            url: a_url,
            digest_ha1_file: Some(b_at_a2),
            ca_file: Some(a_ca),
            ..ForwardPeerSettings::default()
        }];
        if let Some(configure) = b_configure {
            configure(s);
        }
    })
    .await;

    // A: forwards to B (digest) and C (certificate); accepts B by digest.
    let a_configure = options.a;
    let (b_url, b_ca) = (b.base_url.clone(), b.certificate_file());
    let (c_url, c_ca) = (c.base_url.clone(), c.certificate_file());
    let a = spawn_app_authenticating(Backend::from_env(), TestAuth::Off, move |s| {
        s.limits.max_bundle_requests = 100;
        s.server.listen = vec![a_addr];
        s.tls.certificate = Some(a_tls.certificate.clone());
        s.tls.private_key = Some(a_tls.private_key.clone());
        s.federation.domains = vec![A.into()];
        s.auth.digest.nonce_secret_file = Some(nonce);
        s.federation.accept_from = vec![AcceptedPeerSettings {
            domains: vec![B.into()],
            digest_ha1_file: Some(a_expects_b),
            ..AcceptedPeerSettings::default()
        }];
        s.federation.forward_to = vec![
            ForwardPeerSettings {
                domains: vec![B.into()],
                url: b_url,
                digest_ha1_file: Some(a_at_b),
                ca_file: Some(b_ca),
                ..ForwardPeerSettings::default()
            },
            ForwardPeerSettings {
                domains: vec![C.into()],
                url: c_url,
                client_certificate: Some(a_certificate.certificate.clone()),
                client_private_key: Some(a_certificate.private_key.clone()),
                ca_file: Some(c_ca),
                ..ForwardPeerSettings::default()
            },
        ];
        if let Some(configure) = a_configure {
            configure(s);
        }
    })
    .await;
    Domains { a, b, c, files }
}

/// Registers `device` on `app` with `opks` one-time pre-keys.
async fn register(app: &TestApp, device: &str, opks: u32) {
    let answer = app
        .ask(
            device,
            CURVE,
            Request::RegisterUser(registration(CURVE, opks, 1)),
        )
        .await;
    assert!(
        matches!(answer.response, Response::Done(_)),
        "registering {device}: {:?}",
        answer.response
    );
}

/// The bundles `asker` gets from `app` for `devices`, with their flags.
async fn bundles(app: &TestApp, asker: &str, devices: &[&str]) -> Vec<(String, u8)> {
    let answer = app
        .ask(
            asker,
            CURVE,
            Request::GetPeerBundle(devices.iter().map(|device| id(device)).collect()),
        )
        .await;
    match answer.response {
        Response::PeerBundles(bundles) => bundles
            .iter()
            .map(|bundle| (bundle.device_id.as_str().to_owned(), bundle.flag()))
            .collect(),
        other => panic!("getPeerBundle from {asker}: {other:?}"),
    }
}

async fn opks_of(app: &TestApp, device: &str) -> usize {
    server_opk_ids(app, device).await.len()
}

/// The `Requests` rows `app` recorded with `source` as the source.
async fn requests_from(app: &TestApp, source: &str) -> usize {
    let rows = app.probe.requests(CURVE).await;
    rows.iter().filter(|(from, _)| from == source).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_request_is_answered_in_the_asked_order_from_each_domain() {
    let domains = three_domains(Options::default()).await;
    let (a, b, c) = (&domains.a, &domains.b, &domains.c);
    let alice = device("alice", A);
    let dave = device("dave", A);
    let bob = device("bob", B);
    let bob2 = device("bob2", B);
    let claire = device("claire", C);
    let eve = device("eve", "unknown.test");
    register(a, &alice, 0).await;
    register(a, &dave, 3).await;
    register(b, &bob, 3).await;
    register(b, &bob2, 0).await;
    register(c, &claire, 3).await;

    let asked = [bob.as_str(), &dave, &claire, &eve, &bob2];
    let answer = bundles(a, &alice, &asked).await;
    assert_eq!(
        answer,
        vec![
            (bob.clone(), 1),
            (dave.clone(), 1),
            (claire.clone(), 1),
            (eve.clone(), 2),
            (bob2.clone(), 0),
        ],
        "asked {asked:?}"
    );
    // Each one-time key left the server that held it.
    assert_eq!(opks_of(b, &bob).await, 2);
    assert_eq!(opks_of(c, &claire).await, 2);
    assert_eq!(opks_of(a, &dave).await, 2);
    // B (bob, bob2) and C recorded the bundles for alice, the original requester.
    assert_eq!(requests_from(b, &alice).await, 2);
    assert_eq!(requests_from(c, &alice).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_unknown_to_its_own_server_is_not_forwarded() {
    let domains = three_domains(Options::default()).await;
    let bob = device("bob", B);
    register(&domains.b, &bob, 3).await;
    let stranger = device("stranger", A);
    let answer = domains
        .a
        .ask(&stranger, CURVE, Request::GetPeerBundle(vec![id(&bob)]))
        .await;
    assert!(
        matches!(&answer.response, Response::Error(error) if error.code == lime_protocol::ErrorCode::UserNotFound),
        "{:?}",
        answer.response
    );
    assert_eq!(opks_of(&domains.b, &bob).await, 3, "nothing was taken at B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_is_down_or_silent_costs_its_own_devices_only_within_the_time_out() {
    // B's URL points at a port that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}/", silent.local_addr().unwrap());
    let domains = three_domains(Options {
        a: Some(Box::new(move |s: &mut Settings| {
            s.federation.timeout_ms = 1500;
            s.federation.forward_to[0].url = silent_url;
        })),
        ..Options::default()
    })
    .await;
    let alice = device("alice", A);
    let claire = device("claire", C);
    let bob = device("bob", B);
    register(&domains.a, &alice, 0).await;
    register(&domains.c, &claire, 3).await;
    register(&domains.b, &bob, 3).await;
    // A connects to C beforehand, outside the request under test: only B's
    // silence is to fit in the time-out, not C's TLS handshake on a loaded machine.
    let warm = device("warm", C);
    register(&domains.c, &warm, 5).await;
    for attempt in 1..=5 {
        let answer = bundles(&domains.a, &alice, &[&warm]).await;
        if answer == vec![(warm.clone(), 1)] {
            break;
        }
        assert!(attempt < 5, "A never got a bundle from C: {answer:?}");
    }
    let started = Instant::now();
    let answer = bundles(&domains.a, &alice, &[&bob, &claire]).await;
    let took = started.elapsed();
    assert_eq!(answer, vec![(bob.clone(), 2), (claire.clone(), 1)]);
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    assert_eq!(opks_of(&domains.b, &bob).await, 3);

    // C down altogether: connection refused.
    let c_url = domains.c.base_url.clone();
    domains.c.stop().await;
    let answer = bundles(&domains.a, &alice, &[&claire]).await;
    assert_eq!(answer, vec![(claire, 2)], "C at {c_url} is down");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ha1_is_refused_by_the_peer_and_only_its_devices_go_without() {
    let domains = three_domains(Options {
        a_password_at_b: Some("not the password B gave"),
        ..Options::default()
    })
    .await;
    let alice = device("alice", A);
    let bob = device("bob", B);
    let claire = device("claire", C);
    register(&domains.a, &alice, 0).await;
    register(&domains.b, &bob, 3).await;
    register(&domains.c, &claire, 3).await;
    let answer = bundles(&domains.a, &alice, &[&bob, &claire]).await;
    assert_eq!(answer, vec![(bob.clone(), 2), (claire, 1)]);
    assert_eq!(opks_of(&domains.b, &bob).await, 3, "B served nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_is_no_peers_is_refused() {
    // A certificate C's CA issued to a name no accepted peer has.
    let domains = three_domains(Options::default()).await;
    let impostor = domains.c.auth.pki.as_ref().unwrap().issue(
        &[],
        &["lime.elsewhere.test"],
        "lime.elsewhere.test",
    );
    let client = LimeClient::with_client_certificate(
        &domains.c.certificate_file(),
        &impostor.certificate,
        &impostor.private_key,
    )
    .unwrap();
    let alice = device("alice", A);
    let claire = device("claire", C);
    register(&domains.c, &claire, 3).await;
    let answer = post_as(
        &client,
        &domains.c.base_url,
        &alice,
        Request::GetPeerBundle(vec![id(&claire)]),
    )
    .await;
    assert_eq!(answer.status, 403, "a certificate of no accepted peer");
    assert_eq!(opks_of(&domains.c, &claire).await, 3);
}

/// POSTs `request` as `sender` with `client`; the raw answer.
async fn post_as(
    client: &LimeClient,
    url: &str,
    sender: &str,
    request: Request,
) -> lime_server::client::RawAnswer {
    let body = RequestMessage {
        curve: CURVE,
        request,
    }
    .encode()
    .unwrap();
    client
        .post(
            url,
            &[
                ("content-type", "x3dh/octet-stream"),
                ("x-lime-user-identity", sender),
            ],
            body,
        )
        .await
        .expect("the server answers")
}

/// A client that logs in to B as peer A, with the password B gave A.
fn peer_a_at_b(domains: &Domains) -> LimeClient {
    LimeClient::trusting(&domains.b.certificate_file())
        .unwrap()
        .with_digest(A, "a-at-b", Some("SHA-256"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_may_act_only_for_its_own_domain_and_only_ask_for_bundles() {
    let domains = three_domains(Options::default()).await;
    let b = &domains.b;
    let bob = device("bob", B);
    register(b, &bob, 3).await;
    let peer = peer_a_at_b(&domains);

    // On behalf of a device of its domain: served.
    let alice = device("alice", A);
    let answer = post_as(
        &peer,
        &b.base_url,
        &alice,
        Request::GetPeerBundle(vec![id(&bob)]),
    )
    .await;
    assert_eq!(answer.status, 200);
    let message = ResponseMessage::parse(&answer.body).unwrap();
    assert!(matches!(&message.response, Response::PeerBundles(bundles) if bundles[0].flag() == 1));

    // On behalf of a device of another domain: 403.
    let claire = device("claire", C);
    let answer = post_as(
        &peer,
        &b.base_url,
        &claire,
        Request::GetPeerBundle(vec![id(&bob)]),
    )
    .await;
    assert_eq!(answer.status, 403, "acting for a device of c.test");

    // Anything but getPeerBundle: 403, and nothing changes.
    for request in [
        Request::RegisterUser(registration(CURVE, 2, 1)),
        Request::PostOneTimePreKeys(vec![common::one_time_pre_key(CURVE, 99)]),
        Request::PostSignedPreKey(common::signed_pre_key(CURVE, 9)),
        Request::GetSelfOneTimePreKeys,
        Request::DeleteUser,
    ] {
        let what = format!("{:?}", request.message_type());
        let answer = post_as(&peer, &b.base_url, &alice, request).await;
        assert_eq!(answer.status, 403, "{what} from a peer");
    }
    assert_eq!(
        b.probe.device_ids(CURVE).await.len(),
        1,
        "only bob is registered at B"
    );
    assert_eq!(opks_of(b, &bob).await, 2);

    // A stranger naming a device of a.test without credentials is challenged,
    // and with a wrong password refused.
    let stranger = LimeClient::trusting(&b.certificate_file()).unwrap();
    let answer = post_as(
        &stranger,
        &b.base_url,
        &alice,
        Request::GetPeerBundle(vec![id(&bob)]),
    )
    .await;
    assert_eq!(answer.status, 401);
    let wrong = stranger.with_digest(A, "guess", Some("SHA-256"));
    let answer = post_as(
        &wrong,
        &b.base_url,
        &alice,
        Request::GetPeerBundle(vec![id(&bob)]),
    )
    .await;
    assert_eq!(answer.status, 401);
    assert_eq!(opks_of(b, &bob).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_is_never_forwarded_again() {
    // B also forwards to C; A asks B (as a peer) for a device of C.
    let domains = three_domains(Options::default()).await;
    let claire = device("claire", C);
    register(&domains.c, &claire, 3).await;
    let alice = device("alice", A);
    let peer = peer_a_at_b(&domains);
    let answer = post_as(
        &peer,
        &domains.b.base_url,
        &alice,
        Request::GetPeerBundle(vec![id(&claire)]),
    )
    .await;
    assert_eq!(answer.status, 200);
    match ResponseMessage::parse(&answer.body).unwrap().response {
        Response::PeerBundles(bundles) => assert_eq!(bundles[0].flag(), 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(opks_of(&domains.c, &claire).await, 3, "C was not asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_limit_at_the_peer_counts_each_original_requester() {
    let domains = three_domains(Options {
        b: Some(Box::new(|s: &mut Settings| {
            s.limits.max_bundle_requests = 1;
            s.limits.max_bundle_requests_per_identity = 1;
        })),
        ..Options::default()
    })
    .await;
    let bob = device("bob", B);
    register(&domains.b, &bob, 10).await;
    let alice = device("alice", A);
    let dave = device("dave", A);
    register(&domains.a, &alice, 0).await;
    register(&domains.a, &dave, 0).await;
    // Two users behind A: each has a count of their own at B.
    assert_eq!(
        bundles(&domains.a, &alice, &[&bob]).await,
        vec![(bob.clone(), 1)]
    );
    assert_eq!(
        bundles(&domains.a, &dave, &[&bob]).await,
        vec![(bob.clone(), 1)]
    );
    // alice past her limit at B stays past it.
    for _ in 0..3 {
        assert_eq!(
            bundles(&domains.a, &alice, &[&bob]).await,
            vec![(bob.clone(), 0)]
        );
    }
    assert_eq!(opks_of(&domains.b, &bob).await, 8);
    assert_eq!(requests_from(&domains.b, &alice).await, 1);
    assert_eq!(requests_from(&domains.b, &dave).await, 1);
}

/// A peer that answers what it is told to, over plain HTTP.
async fn fake_peer(answer: Vec<u8>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                // Read the head and the body the Content-Length announces.
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    let Ok(read) = socket.read(&mut buffer).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..read]);
                    let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|line| line.strip_prefix("content-length:"))
                            .and_then(|value| value.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: x3dh/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    answer.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&answer).await;
            });
        }
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_answering_other_devices_or_broken_keys_gets_nothing_served() {
    let bob = device("bob", B);
    let bob2 = device("bob2", B);
    let entry = |device: &str| lime_protocol::PeerBundle {
        device_id: id(device),
        bundle: Some(lime_protocol::KeyBundle {
            identity_key: lime_protocol::IdentityKey::new(CURVE, vec![1; CURVE.identity_key_len()])
                .unwrap(),
            signed_pre_key: common::signed_pre_key(CURVE, 3),
            one_time_pre_key: Some(common::one_time_pre_key(CURVE, 4)),
        }),
    };
    let encode = |entries: Vec<lime_protocol::PeerBundle>| {
        ResponseMessage {
            curve_byte: CURVE.id(),
            response: Response::PeerBundles(entries),
        }
        .encode()
        .unwrap()
    };
    let good = encode(vec![entry(&bob), entry(&bob2)]);
    let cases = [
        ("the right answer", good.clone(), true),
        ("reordered", encode(vec![entry(&bob2), entry(&bob)]), false),
        ("missing", encode(vec![entry(&bob)]), false),
        (
            "extra",
            encode(vec![entry(&bob), entry(&bob2), entry(&device("eve", B))]),
            false,
        ),
        ("truncated keys", good[..good.len() - 5].to_vec(), false),
    ];
    for (what, body, served) in cases {
        let (url, fake) = fake_peer(body).await;
        let domains = three_domains(Options {
            a: Some(Box::new(move |s: &mut Settings| {
                s.federation.forward_to[0].url = url;
            })),
            ..Options::default()
        })
        .await;
        let alice = device("alice", A);
        let claire = device("claire", C);
        register(&domains.a, &alice, 0).await;
        register(&domains.c, &claire, 1).await;
        let answer = bundles(&domains.a, &alice, &[&bob, &claire, &bob2]).await;
        let flag = if served { 1 } else { 2 };
        assert_eq!(
            answer,
            vec![
                (bob.clone(), flag),
                (claire.clone(), 1),
                (bob2.clone(), flag)
            ],
            "{what}"
        );
        fake.abort();
    }
}

/// liblime's own multi-domain scenario: alice@a.test sends one message to
/// bob@b.test, claire@c.test and dave@a.test, fetching every bundle from A; each
/// decrypts it, and the X3DH init of each names the one-time key that the
/// peer's own server served and no longer holds. Then bob replies through B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liblime_alice_writes_to_three_domains_through_her_own_server() {
    let domains = three_domains(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (&domains.a, &domains.b, &domains.c);
    let mut alice = lime_user(a, dir.path(), "alice", A).await;
    let mut bob = lime_user(b, dir.path(), "bob", B).await;
    let mut claire = lime_user(c, dir.path(), "claire", C).await;
    let mut dave = lime_user(a, dir.path(), "dave", A).await;
    let held = [
        (b, bob.device_id.clone()),
        (c, claire.device_id.clone()),
        (a, dave.device_id.clone()),
    ];
    let mut before = Vec::new();
    for (app, device) in &held {
        before.push(server_opk_ids(app, device).await);
    }

    let text = b"One message for three domains.";
    let recipients = [bob.device_id.as_str(), &claire.device_id, &dave.device_id];
    let sent = alice
        .encrypt(
            "sip:group@a.test",
            &recipients,
            text,
            EncryptionPolicy::CipherMessage,
        )
        .await
        .expect("alice encrypts to bob, claire and dave");
    let exchanges = alice.manager.last_operation_exchanges().to_vec();
    for ((app, device), before) in held.iter().zip(&before) {
        let dr = sent.dr_message_for(device).unwrap();
        let init = match X3dhInit::from_dr_message(CURVE, dr) {
            Ok(Some(init)) => init,
            other => panic!("{device}: no X3DH init ({other:?})"),
        };
        let opk = init.one_time_pre_key_id.unwrap_or_else(|| {
            panic!(
                "{device}: session opened without a one-time key; exchanges:\n{}",
                describe_exchanges(&exchanges)
            )
        });
        assert!(
            before.contains(&opk),
            "{device}: OPk {opk} was never its own ({before:?})"
        );
        let after = server_opk_ids(app, device).await;
        assert!(
            !after.contains(&opk) && after.len() == before.len() - 1,
            "{device}: its server still holds OPk {opk} ({after:?})"
        );
    }
    for (recipient, name) in [
        (&mut bob, "bob"),
        (&mut claire, "claire"),
        (&mut dave, "dave"),
    ] {
        let dr = sent.dr_message_for(&recipient.device_id).unwrap().to_vec();
        let decrypted = recipient
            .decrypt(
                "sip:group@a.test",
                &alice.device_id,
                &dr,
                &sent.cipher_message,
            )
            .unwrap_or_else(|error| panic!("{name} decrypts: {error:#}"));
        assert_eq!(decrypted.plaintext, text, "{name} read another text");
    }

    // bob replies to alice; his session exists, so force a fresh one through B
    // by forgetting alice's device: B fetches her bundle from A.
    bob.delete_peer_device(&alice.device_id).unwrap();
    let alice_before = server_opk_ids(a, &alice.device_id).await;
    let reply = b"Got it, from b.test.";
    let sent = bob
        .encrypt(
            &format!("sip:alice@{A}"),
            &[&alice.device_id],
            reply,
            EncryptionPolicy::DrMessage,
        )
        .await
        .expect("bob encrypts to alice through B");
    let dr = sent.dr_message_for(&alice.device_id).unwrap().to_vec();
    let init = X3dhInit::from_dr_message(CURVE, &dr)
        .unwrap()
        .expect("a new session");
    let opk = init
        .one_time_pre_key_id
        .expect("bob got one of alice's one-time keys");
    assert!(alice_before.contains(&opk));
    assert!(!server_opk_ids(a, &alice.device_id).await.contains(&opk));
    let decrypted = alice
        .decrypt(
            &format!("sip:alice@{A}"),
            &bob.device_id,
            &dr,
            &sent.cipher_message,
        )
        .expect("alice decrypts bob's reply");
    assert_eq!(decrypted.plaintext, reply);
    drop(domains.files);
}

/// A new liblime user `name` of `domain`, registered on `app` with 5 one-time keys.
async fn lime_user(app: &TestApp, dir: &Path, name: &str, domain: &str) -> LimeDevice {
    let device_id = device(name, domain);
    let db = dir.join(format!("{name}.sqlite3"));
    let client = app.client_for(&device_id).await;
    LimeDevice::create(&db, client, &app.base_url, device_id, CURVE, 5)
        .await
        .unwrap_or_else(|error| panic!("creating {name}: {error:#}"))
}

/// The ids of `device`'s one-time keys its server holds.
async fn server_opk_ids(app: &TestApp, device: &str) -> Vec<u32> {
    match app
        .ask(device, CURVE, Request::GetSelfOneTimePreKeys)
        .await
        .response
    {
        Response::SelfOneTimePreKeys(ids) => ids,
        other => panic!("getSelfOPks of {device}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_nonce_at_the_peer_is_answered_with_its_new_challenge() {
    let domains = three_domains(Options {
        b: Some(Box::new(|s: &mut Settings| {
            s.auth.digest.nonce_lifetime_secs = 1;
        })),
        ..Options::default()
    })
    .await;
    let alice = device("alice", A);
    let bob = device("bob", B);
    register(&domains.a, &alice, 0).await;
    register(&domains.b, &bob, 10).await;
    // A's first forward is challenged, and answered.
    fetch_within_a_nonce_lifetime(&domains, &alice, &bob, false, "the first forward").await;
    // A keeps B's nonce; once it is stale, B says so and A answers again.
    fetch_within_a_nonce_lifetime(&domains, &alice, &bob, true, "on a stale nonce").await;
}

/// alice (at A) fetches bob's bundle from B, whose nonces live 1 s: A answers
/// B's new challenge once, and B takes one of bob's keys. `stale`: first waits
/// until the nonce A keeps is stale.
///
/// Nonces are counted in whole seconds: a new one answered less than 1 s after
/// it was issued is fresh, later it may rightly be stale too. So a fetch that
/// fails after taking longer than that is made again (5 times at most).
async fn fetch_within_a_nonce_lifetime(
    domains: &Domains,
    alice: &str,
    bob: &str,
    stale: bool,
    what: &str,
) {
    for attempt in 1..=5 {
        if stale {
            tokio::time::sleep(Duration::from_millis(2_100)).await;
        }
        let before = opks_of(&domains.b, bob).await;
        let started = Instant::now();
        let answer = bundles(&domains.a, alice, &[bob]).await;
        let took = started.elapsed();
        let expected = vec![(bob.to_owned(), 1)];
        if answer != expected && took >= Duration::from_secs(1) && attempt < 5 {
            eprintln!("{what}: {answer:?} after {took:?}, past a nonce's lifetime: again");
            continue;
        }
        assert_eq!(answer, expected, "{what}, in {took:?}");
        assert_eq!(
            opks_of(&domains.b, bob).await,
            before - 1,
            "{what}: one of bob's keys taken"
        );
        return;
    }
}

/// A, run as operators run it (a process with a config file), configured with a
/// wrong HA1 for B and a certificate C's CA never issued: B's and C's devices get
/// no bundle, and A's log says which peer failed and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_peer_is_logged_with_the_reason() {
    let domains = three_domains(Options::default()).await;
    let dir = domains.files.path();
    let wrong_ha1 = write(dir, "wrong", &original_ha1(A, B, "wrong password"));
    let foreign = domains
        .c
        .auth
        .pki
        .as_ref()
        .unwrap()
        .issue_by_other_ca(&[], A_CERTIFICATE_NAME);
    let quoted = |path: &Path| format!("{:?}", path.display().to_string());
    let config = format!(
        "[server]\nlisten = []\nplain_http_listen = [\"127.0.0.1:0\"]\n\
         [storage]\ndata_dir = {data}\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [federation]\ndomains = [\"{A}\"]\ntimeout_ms = 2000\n\
         [[federation.forward_to]]\ndomains = [\"{B}\"]\nurl = \"{b_url}\"\n\
         digest_ha1_file = {ha1}\nca_file = {b_ca}\n\
         [[federation.forward_to]]\ndomains = [\"{C}\"]\nurl = \"{c_url}\"\n\
         client_certificate = {cert}\nclient_private_key = {key}\nca_file = {c_ca}\n",
        data = quoted(&dir.join("a-process")),
        b_url = domains.b.base_url,
        ha1 = quoted(&wrong_ha1),
        b_ca = quoted(&domains.b.certificate_file()),
        c_url = domains.c.base_url,
        cert = quoted(&foreign.certificate),
        key = quoted(&foreign.private_key),
        c_ca = quoted(&domains.c.certificate_file()),
    );
    let config_file = write(dir, "a.toml", &config);
    let server =
        common::process::ServerProcess::start(&["--config", config_file.to_str().unwrap()]);
    let url = format!("http://{}/", server.addr);
    let client = LimeClient::plain().unwrap();
    let alice = device("alice", A);
    let bob = device("bob", B);
    let claire = device("claire", C);
    register(&domains.b, &bob, 3).await;
    register(&domains.c, &claire, 3).await;
    let registered = client
        .send(
            &url,
            &alice,
            &RequestMessage {
                curve: CURVE,
                request: Request::RegisterUser(registration(CURVE, 0, 1)),
            },
        )
        .await
        .unwrap();
    assert!(matches!(registered.response, Response::Done(_)));
    let answer = client
        .send(
            &url,
            &alice,
            &RequestMessage {
                curve: CURVE,
                request: Request::GetPeerBundle(vec![id(&bob), id(&claire)]),
            },
        )
        .await
        .unwrap();
    match answer.response {
        Response::PeerBundles(bundles) => {
            assert_eq!(
                bundles.iter().map(|b| b.flag()).collect::<Vec<_>>(),
                vec![2, 2]
            );
        }
        other => panic!("{other:?}"),
    }
    let log = server.wait_for_log(
        "not two peer failures logged",
        Duration::from_secs(10),
        |log| log.matches("federation: peer failed").count() >= 2,
    );
    let failed: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("federation: peer failed"))
        .collect();
    assert!(
        failed
            .iter()
            .any(|line| line.contains(B) && line.contains("our digest credentials are wrong")),
        "no line says B refused our HA1:\n{log}"
    );
    assert!(
        failed
            .iter()
            .any(|line| line.contains(C) && line.contains("cannot reach it")),
        "no line says C refused our certificate:\n{log}"
    );
    assert_eq!(opks_of(&domains.b, &bob).await, 3);
    assert_eq!(opks_of(&domains.c, &claire).await, 3);
    // And the failures are counted, by peer and outcome.
    let scrape = get_metrics(&server.metrics_addr().to_string()).await;
    for (peer, outcome) in [(B, "refused"), (C, "unreachable")] {
        let series =
            format!("lime_federation_forwards_total{{peer=\"{peer}\",outcome=\"{outcome}\"}} 1");
        assert!(scrape.contains(&series), "no {series} in:\n{scrape}");
    }
}

/// The body of `GET /metrics` on `addr`, over plain HTTP/1.1.
async fn get_metrics(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

/// Against a peer that limits nothing (or counts only the peer, as the
/// original PHP server does), our own limits still hold for each of our users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarding_server_applies_its_own_limits_to_its_users_first() {
    let domains = three_domains(Options {
        a: Some(Box::new(|s: &mut Settings| {
            s.limits.max_bundle_requests = 1;
            s.limits.max_bundle_requests_per_identity = 1;
        })),
        b: Some(Box::new(|s: &mut Settings| {
            s.limits.max_bundle_requests = 0;
        })),
        ..Options::default()
    })
    .await;
    let (a, b) = (&domains.a, &domains.b);
    let bob = device("bob", B);
    let bob2 = device("bob2", B);
    register(b, &bob, 10).await;
    register(b, &bob2, 10).await;
    let alice = device("alice", A);
    let dave = device("dave", A);
    register(a, &alice, 0).await;
    register(a, &dave, 0).await;
    assert_eq!(bundles(a, &alice, &[&bob]).await, vec![(bob.clone(), 1)]);
    // Past A's limit: not forwarded, so B keeps its keys.
    assert_eq!(bundles(a, &alice, &[&bob]).await, vec![(bob.clone(), 2)]);
    assert_eq!(opks_of(b, &bob).await, 9);
    // Another user of A has a count of their own.
    assert_eq!(bundles(a, &dave, &[&bob]).await, vec![(bob.clone(), 1)]);
    // A device named twice is forwarded once: the repeat gets its bundle without
    // a one-time key, as a device held here would.
    assert_eq!(
        bundles(a, &dave, &[&bob2, &bob2]).await,
        vec![(bob2.clone(), 1), (bob2.clone(), 0)]
    );
    assert_eq!(opks_of(b, &bob2).await, 9);
    assert_eq!(
        requests_from(a, &alice).await,
        1,
        "A recorded alice's bundle"
    );
}
