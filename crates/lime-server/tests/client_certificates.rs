//! Client certificates at the TLS level: which certificates the handshake lets in
//! with `auth::certificate::client_verifier`, and which identities the server then
//! reads from them. The full server is not involved: a tokio-rustls acceptor built
//! with `tls::server_config` accepts one connection and reports what it saw.
//!
//! With TLS 1.3 the client may finish its side of the handshake before the server
//! has judged the client's certificate, so the server's accept is the verdict; the
//! client is only checked to see a refusal by its first read at the latest.

mod common;

use bytes::Bytes;
use common::pki::{IssuedCertificate, TestPki};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use lime_server::auth::certificate::{CertificateIdentity, IdentityRule, client_verifier};
use lime_server::client::LimeClient;
use lime_server::tls::{self, CertificateFiles};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const ALICE: &str = "sip:alice@example.org";
const ALICE_DEVICE: &str = "sip:alice@example.org;gr=1";
const BOB: &str = "sip:bob@example.org";
const BOB_DEVICE: &str = "sip:bob@example.org;gr=1";

/// The default rule: a common name counts only without subjectAltName.
const SAN_ELSE_CN: IdentityRule = IdentityRule::SanElseCn;

/// Whether the server requires a client certificate or only checks one presented.
#[derive(Clone, Copy)]
enum ClientAuth {
    Required,
    Optional,
}

/// What each side of one connection saw.
struct Handshake {
    /// The server's accept: the names in the client's certificate (`None` when it
    /// presented none), or why it refused the client.
    server: Result<Option<CertificateIdentity>, String>,
    /// The client's connect and first read: `Ok` when the server let it in.
    client: Result<(), String>,
}

impl Handshake {
    /// The names the server read, failing the test if it refused the client.
    fn accepted(self) -> Option<CertificateIdentity> {
        let identity = self.server.expect("the server should accept the client");
        self.client.expect("the client should be let in");
        identity
    }

    /// Why the server refused the client, failing the test if it did not.
    fn refused(self) -> String {
        let Err(reason) = self.server else {
            panic!("the server should refuse the client");
        };
        assert!(
            self.client.is_err(),
            "the client should see the refusal ({reason})"
        );
        reason
    }
}

/// A TLS server (self-signed certificate for localhost) verifying client
/// certificates against `pki`'s CA and CRL.
struct TlsServer {
    acceptor: TlsAcceptor,
    listener: TcpListener,
    addr: SocketAddr,
    /// The certificate clients trust the server by.
    certificate: CertificateFiles,
    /// Holds the server's certificate files.
    _dir: TempDir,
}

impl TlsServer {
    async fn start(pki: &TestPki, client_auth: ClientAuth) -> TlsServer {
        let dir = tempfile::tempdir().unwrap();
        let certificate = CertificateFiles::self_signed_in(dir.path());
        tls::ensure_self_signed(&certificate).unwrap();
        let required = matches!(client_auth, ClientAuth::Required);
        let verifier = client_verifier(&pki.ca_file(), &[pki.crl_file()], required).unwrap();
        let config = tls::server_config(&certificate, Some(verifier)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TlsServer {
            acceptor: TlsAcceptor::from(config),
            addr: listener.local_addr().unwrap(),
            listener,
            certificate,
            _dir: dir,
        }
    }

    /// Accepts one connection: the names of the client's certificate, or why the
    /// handshake failed. Ends the connection cleanly once accepted.
    async fn accept_one(&self) -> Result<Option<CertificateIdentity>, String> {
        let (tcp, _) = self.listener.accept().await.map_err(|e| e.to_string())?;
        let mut stream = self.acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let identity = peer_identity(stream.get_ref().1);
        // close_notify: the client's read ends with Ok, not an unexpected EOF.
        let _ = stream.shutdown().await;
        Ok(identity)
    }
}

/// The names in the certificate the client presented, if any.
fn peer_identity(connection: &rustls::ServerConnection) -> Option<CertificateIdentity> {
    let end_entity = connection.peer_certificates()?.first()?;
    Some(CertificateIdentity::from_der(end_entity).expect("readable client certificate"))
}

/// Connects to `server` presenting `client_certificate` (or none) and reads until
/// the server ends the connection.
async fn connect(
    server: &TlsServer,
    client_certificate: Option<&IssuedCertificate>,
) -> Result<(), String> {
    let config = client_config(&server.certificate, client_certificate);
    let tcp = TcpStream::connect(server.addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .await
        .map_err(|e| format!("first read: {e}"))?;
    Ok(())
}

fn client_config(
    server_certificate: &CertificateFiles,
    client_certificate: Option<&IssuedCertificate>,
) -> ClientConfig {
    let roots = tls::read_trust_anchors(&server_certificate.certificate).unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    match client_certificate {
        None => builder.with_no_client_auth(),
        Some(issued) => {
            let chain = tls::read_certificates(&issued.certificate).unwrap();
            let key = PrivateKeyDer::from_pem_file(&issued.private_key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    }
}

/// One connection to a fresh server verifying against `pki`: what each side saw.
async fn handshake(
    pki: &TestPki,
    client_auth: ClientAuth,
    client_certificate: Option<&IssuedCertificate>,
) -> Handshake {
    let server = TlsServer::start(pki, client_auth).await;
    let (server, client) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(server.accept_one(), connect(&server, client_certificate))
    })
    .await
    .expect("the handshake should end within 10 s");
    Handshake { server, client }
}

#[tokio::test]
async fn valid_certificate_is_let_in_and_owns_its_devices() {
    let pki = TestPki::new();
    let alice = pki.issue(&[ALICE], &[], "Alice");

    let identity = handshake(&pki, ClientAuth::Required, Some(&alice))
        .await
        .accepted()
        .expect("the server should see the certificate");

    assert_eq!(identity.owner_of(ALICE_DEVICE, SAN_ELSE_CN), Some(ALICE));
    assert_eq!(identity.owner_of(BOB_DEVICE, SAN_ELSE_CN), None);
}

#[tokio::test]
async fn dns_name_without_scheme_is_a_sip_identity() {
    let pki = TestPki::new();
    let alice = pki.issue(&[], &["alice@example.org"], "Alice");

    let identity = handshake(&pki, ClientAuth::Required, Some(&alice))
        .await
        .accepted()
        .unwrap();

    assert_eq!(identity.owner_of(ALICE_DEVICE, SAN_ELSE_CN), Some(ALICE));
}

#[tokio::test]
async fn revoked_certificate_is_refused() {
    let pki = TestPki::new();
    let revoked = pki.issue(&[ALICE], &[], "Alice");
    let still_valid = pki.issue(&[BOB], &[], "Bob");
    pki.revoke(&revoked);

    let reason = handshake(&pki, ClientAuth::Required, Some(&revoked))
        .await
        .refused();
    assert!(reason.contains("Revoked"), "{reason}");

    let identity = handshake(&pki, ClientAuth::Required, Some(&still_valid))
        .await
        .accepted()
        .unwrap();
    assert_eq!(identity.owner_of(BOB_DEVICE, SAN_ELSE_CN), Some(BOB));
}

#[tokio::test]
async fn certificate_of_another_ca_is_refused() {
    let pki = TestPki::new();
    let stranger = pki.issue_by_other_ca(&[ALICE], "Alice");

    let reason = handshake(&pki, ClientAuth::Required, Some(&stranger))
        .await
        .refused();
    assert!(reason.contains("UnknownIssuer"), "{reason}");
}

#[tokio::test]
async fn no_certificate_is_refused_when_required() {
    let pki = TestPki::new();

    handshake(&pki, ClientAuth::Required, None).await.refused();
}

#[tokio::test]
async fn no_certificate_is_let_in_when_optional() {
    let pki = TestPki::new();

    let identity = handshake(&pki, ClientAuth::Optional, None).await.accepted();

    assert!(identity.is_none());
}

#[tokio::test]
async fn optional_certificates_are_still_verified() {
    let pki = TestPki::new();
    let revoked = pki.issue(&[ALICE], &[], "Alice");
    pki.revoke(&revoked);
    let stranger = pki.issue_by_other_ca(&[ALICE], "Alice");

    handshake(&pki, ClientAuth::Optional, Some(&revoked))
        .await
        .refused();
    handshake(&pki, ClientAuth::Optional, Some(&stranger))
        .await
        .refused();
    let alice = pki.issue(&[ALICE], &[], "Alice");
    let identity = handshake(&pki, ClientAuth::Optional, Some(&alice))
        .await
        .accepted()
        .unwrap();
    assert_eq!(identity.owner_of(ALICE_DEVICE, SAN_ELSE_CN), Some(ALICE));
}

#[tokio::test]
async fn identity_only_in_common_name_owns_its_devices() {
    let pki = TestPki::new();
    let alice = pki.issue(&[], &[], ALICE);

    let identity = handshake(&pki, ClientAuth::Required, Some(&alice))
        .await
        .accepted()
        .unwrap();

    assert!(identity.subject_alt_names().is_empty());
    assert_eq!(identity.owner_of(ALICE_DEVICE, SAN_ELSE_CN), Some(ALICE));
}

/// RFC 6125: beside a subjectAltName, the common name names nobody, by default.
#[tokio::test]
async fn common_name_is_ignored_when_the_san_names_someone_else() {
    let pki = TestPki::new();
    let certificate = pki.issue(&[BOB], &[], "alice@example.org");

    let identity = handshake(&pki, ClientAuth::Required, Some(&certificate))
        .await
        .accepted()
        .unwrap();

    assert_eq!(identity.owner_of(BOB_DEVICE, SAN_ELSE_CN), Some(BOB));
    assert_eq!(identity.owner_of(ALICE_DEVICE, SAN_ELSE_CN), None);
}

/// Under the PHP server's rule, kept by name, the common name is the fallback for
/// each device id that no subjectAltName owns.
#[tokio::test]
async fn looser_rule_is_an_explicit_option() {
    let pki = TestPki::new();
    let certificate = pki.issue(&[BOB], &[], "alice@example.org");

    let identity = handshake(&pki, ClientAuth::Required, Some(&certificate))
        .await
        .accepted()
        .unwrap();

    assert_eq!(
        identity.owner_of(BOB_DEVICE, IdentityRule::SanOrCn),
        Some(BOB)
    );
    assert_eq!(
        identity.owner_of(ALICE_DEVICE, IdentityRule::SanOrCn),
        Some(ALICE)
    );
    assert_eq!(
        identity.owner_of("sip:carol@example.org;gr=1", IdentityRule::SanOrCn),
        None
    );
}

#[tokio::test]
async fn names_of_another_user_own_nothing_of_alice() {
    let pki = TestPki::new();
    let certificate = pki.issue(
        &[BOB, "https://alice.example.org/"],
        &["alice@example.org.evil.com"],
        "Bob",
    );

    let identity = handshake(&pki, ClientAuth::Required, Some(&certificate))
        .await
        .accepted()
        .unwrap();

    assert_eq!(identity.owner_of(ALICE_DEVICE, SAN_ELSE_CN), None);
    assert_eq!(identity.owner_of(BOB_DEVICE, SAN_ELSE_CN), Some(BOB));
}

/// `LimeClient::with_client_certificate` presents its certificate over HTTPS: a
/// one-connection HTTP server answers with the owner of Alice's device it reads
/// from the connection's certificate.
#[tokio::test]
async fn lime_client_presents_its_client_certificate() {
    let pki = TestPki::new();
    let alice = pki.issue(&[ALICE], &[], "Alice");
    let server = TlsServer::start(&pki, ClientAuth::Required).await;
    let client = LimeClient::with_client_certificate(
        &server.certificate.certificate,
        &alice.certificate,
        &alice.private_key,
    )
    .unwrap();
    let url = format!("https://127.0.0.1:{}/", server.addr.port());

    let serve_one = async {
        let (tcp, _) = server.listener.accept().await.unwrap();
        let stream = server.acceptor.accept(tcp).await.unwrap();
        let owner = peer_identity(stream.get_ref().1)
            .and_then(|identity| {
                identity
                    .owner_of(ALICE_DEVICE, SAN_ELSE_CN)
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let service = service_fn(move |_request: hyper::Request<hyper::body::Incoming>| {
            let owner = owner.clone();
            async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(owner)))) }
        });
        // The client keeps the connection for reuse: the answer is all we wait for.
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    };
    let answer = tokio::select! {
        answer = client.request("GET", &url, &[], Vec::new()) => answer.unwrap(),
        () = serve_one => panic!("the server ended before answering"),
    };

    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, ALICE.as_bytes());
}

#[test]
fn lime_client_refuses_a_key_that_does_not_match_its_certificate() {
    let pki = TestPki::new();
    let alice = pki.issue(&[ALICE], &[], "Alice");
    let bob = pki.issue(&[BOB], &[], "Bob");

    let Err(error) =
        LimeClient::with_client_certificate(&pki.ca_file(), &alice.certificate, &bob.private_key)
    else {
        panic!("a mismatched key should be refused");
    };

    let error = format!("{error:#}");
    assert!(
        error.contains(&alice.certificate.display().to_string()),
        "{error}"
    );
}
