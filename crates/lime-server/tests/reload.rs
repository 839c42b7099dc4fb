//! SIGHUP on a running `lime-server serve` process, as `systemctl reload` and
//! logrotate's `postrotate` send it: the TLS certificate and key and the client
//! CA's CRL are read again for new connections while connections already open keep
//! going, a broken file is refused with the old one still served, and the log file
//! is reopened after a rename.

mod common;

use bytes::Bytes;
use common::pki::{IssuedCertificate, TestPki};
use common::process::{BIN, ServerProcess};
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A self-signed server certificate for localhost, as PEM.
struct ServerCertificate {
    certificate_pem: String,
    key_pem: String,
}

impl ServerCertificate {
    fn new() -> ServerCertificate {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        ServerCertificate {
            certificate_pem: certified.cert.pem(),
            key_pem: certified.signing_key.serialize_pem(),
        }
    }

    fn der(&self) -> Vec<u8> {
        CertificateDer::from_pem_slice(self.certificate_pem.as_bytes())
            .expect("PEM certificate")
            .to_vec()
    }

    /// Puts it at the paths the server reads, each file replaced by a rename as
    /// certbot's renewals are (no reader ever sees half a file).
    fn install(&self, dir: &Path) {
        replace(&dir.join("server.pem"), &self.certificate_pem);
        replace(&dir.join("server.key"), &self.key_pem);
    }
}

fn replace(path: &Path, contents: &str) {
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// A TLS client trusting `certificates` (each as it is), optionally presenting a
/// client certificate.
fn client_config(
    certificates: &[&ServerCertificate],
    client: Option<&IssuedCertificate>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates {
        roots.add(CertificateDer::from(certificate.der())).unwrap();
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(issued) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(&issued.certificate).unwrap()],
                PrivateKeyDer::from_pem_file(&issued.private_key).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One HTTP/1.1 keep-alive connection over TLS, with the certificate the server
/// presented in its handshake.
struct Connection {
    served: Vec<u8>,
    sender: SendRequest<Empty<Bytes>>,
}

impl Connection {
    async fn open(addr: SocketAddr, config: Arc<ClientConfig>) -> anyhow::Result<Connection> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost")?;
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        let served = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|certificate| certificate.to_vec())
            .unwrap_or_default();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(Connection { served, sender })
    }

    /// GET /health on this connection: its status.
    async fn health(&mut self) -> anyhow::Result<u16> {
        let request = http::Request::get("/health")
            .header("host", "localhost")
            .body(Empty::new())?;
        Ok(self.sender.send_request(request).await?.status().as_u16())
    }
}

/// Sends SIGHUP and waits (30 s at most) until the server has logged one more
/// line containing `outcome` than before.
fn hang_up_and_wait_for(server: &ServerProcess, outcome: &str) {
    let before = server.log_so_far().matches(outcome).count();
    server.hang_up();
    server.wait_for_log(
        &format!("no {outcome:?} after SIGHUP"),
        Duration::from_secs(30),
        |log| log.matches(outcome).count() > before,
    );
}

/// Sends SIGHUP, waits for the refusal line and checks it names `file`.
fn hang_up_and_see_refused(server: &ServerProcess, file: &str) {
    hang_up_and_wait_for(server, "TLS not reloaded");
    let log = server.log_so_far();
    let refusal = log
        .lines()
        .rfind(|line| line.contains("TLS not reloaded"))
        .unwrap();
    assert!(refusal.contains(file), "the error names {file}: {refusal}");
}

/// A TLS server on loopback serving `dir/server.pem` and `dir/server.key`, with
/// `extra` TOML appended to its config.
fn start_tls_server(dir: &Path, extra: &str) -> ServerProcess {
    let config = dir.join("lime-server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n\
             [storage]\ndata_dir = \"{data}\"\ncurves = [\"c25519\"]\n\
             [tls]\ncertificate = \"{dir}/server.pem\"\nprivate_key = \"{dir}/server.key\"\n\
             {extra}",
            data = dir.join("data").display(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    ServerProcess::start(&["--config", config.to_str().unwrap()])
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_serves_a_renewed_certificate_to_new_connections_and_keeps_open_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (old, renewed) = (ServerCertificate::new(), ServerCertificate::new());
    old.install(dir.path());
    let mut server = start_tls_server(dir.path(), "");
    let trust_both = client_config(&[&old, &renewed], None);

    let mut kept_alive = Connection::open(server.addr, trust_both.clone())
        .await
        .unwrap();
    assert_eq!(kept_alive.served, old.der());
    assert_eq!(kept_alive.health().await.unwrap(), 200);

    renewed.install(dir.path());
    hang_up_and_wait_for(&server, "TLS reloaded");

    assert!(server.is_running(), "SIGHUP must not end the server");
    let mut fresh = Connection::open(server.addr, trust_both.clone())
        .await
        .unwrap();
    assert_eq!(
        fresh.served,
        renewed.der(),
        "a new connection gets the new certificate"
    );
    assert_eq!(fresh.health().await.unwrap(), 200);
    assert_eq!(
        kept_alive.health().await.unwrap(),
        200,
        "the connection opened before the reload goes on"
    );
    assert_eq!(kept_alive.served, old.der());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_certificate_or_key_is_refused_and_the_old_ones_stay_served() {
    let dir = tempfile::tempdir().unwrap();
    let current = ServerCertificate::new();
    current.install(dir.path());
    let server = start_tls_server(dir.path(), "");
    let trust = client_config(&[&current], None);

    let certificate = dir.path().join("server.pem");
    replace(
        &certificate,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    );
    hang_up_and_see_refused(&server, &certificate.display().to_string());
    let mut connection = Connection::open(server.addr, trust.clone()).await.unwrap();
    assert_eq!(
        connection.served,
        current.der(),
        "the old certificate is still served"
    );
    assert_eq!(connection.health().await.unwrap(), 200);

    // A good certificate with somebody else's key: refused too, naming both files.
    let other = ServerCertificate::new();
    replace(&certificate, &current.certificate_pem);
    replace(&dir.path().join("server.key"), &other.key_pem);
    hang_up_and_see_refused(&server, "server.key");
    let connection = Connection::open(server.addr, trust).await.unwrap();
    assert_eq!(connection.served, current.der());
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reads_the_crl_again_and_a_broken_crl_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let server_certificate = ServerCertificate::new();
    server_certificate.install(dir.path());
    let pki = TestPki::new();
    let alice = pki.issue(&["sip:alice@example.org"], &[], "alice");
    let server = start_tls_server(
        dir.path(),
        &format!(
            "[auth.client_certificates]\nca_file = \"{}\"\ncrl_files = [\"{}\"]\nrequired = true\n",
            pki.ca_file().display(),
            pki.crl_file().display()
        ),
    );
    let as_alice = client_config(&[&server_certificate], Some(&alice));
    let addr = server.addr;
    let let_in = |config: Arc<ClientConfig>| async move {
        match Connection::open(addr, config).await {
            Ok(mut connection) => connection.health().await.is_ok_and(|status| status == 200),
            Err(_) => false,
        }
    };
    let mut kept_alive = Connection::open(server.addr, as_alice.clone())
        .await
        .unwrap();
    assert_eq!(kept_alive.health().await.unwrap(), 200);

    // A CRL that does not parse: refused, naming the file; alice still let in.
    let good_crl = std::fs::read_to_string(pki.crl_file()).unwrap();
    replace(
        &pki.crl_file(),
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    );
    hang_up_and_see_refused(&server, &pki.crl_file().display().to_string());
    assert!(
        let_in(as_alice.clone()).await,
        "the old CRL is still in use"
    );
    replace(&pki.crl_file(), &good_crl);

    // Alice's certificate revoked: new connections refused, hers kept.
    pki.revoke(&alice);
    hang_up_and_wait_for(&server, "TLS reloaded");
    assert!(
        !let_in(as_alice.clone()).await,
        "a revoked certificate is refused"
    );
    assert_eq!(kept_alive.health().await.unwrap(), 200);
}

/// A server logging to `log_file`, its config and data in `dir`.
fn start_logging_server(dir: &Path, log_file: PathBuf) -> (ServerProcess, PathBuf) {
    let config = dir.join("lime-server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n\
             [storage]\ndata_dir = \"{}\"\ncurves = [\"c25519\"]\n\
             [log]\nfile = \"{}\"\n",
            dir.join("data").display(),
            log_file.display(),
        ),
    )
    .unwrap();
    let server =
        ServerProcess::start_logging_to(&["--config", config.to_str().unwrap()], &log_file);
    (server, log_file)
}

/// Waits (30 s at most) until `path` holds `text`; returns what it holds.
fn wait_for_text(path: &Path, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let written = std::fs::read_to_string(path).unwrap_or_default();
        if written.contains(text) {
            return written;
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} in {}:\n{written}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_log_file_is_reopened_on_sighup_after_logrotate_renamed_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, log_file) =
        start_logging_server(dir.path(), dir.path().join("lime-server.log"));
    assert!(server.log.contains("store opened"), "{}", server.log);

    // What logrotate does without copytruncate: rename, then postrotate's SIGHUP.
    let rotated = dir.path().join("lime-server.log.1");
    std::fs::rename(&log_file, &rotated).unwrap();
    server.hang_up();

    let new = wait_for_text(&log_file, "TLS reloaded");
    assert!(new.contains("log file reopened"), "{new}");
    assert!(
        new.contains("self-signed"),
        "the generated certificate has nothing to renew, and the log says so: {new}"
    );
    assert!(
        !new.contains("listening"),
        "earlier lines stay in the old file: {new}"
    );
    let old = wait_for_text(&rotated, "SIGHUP");
    assert!(old.contains("listening"), "{old}");
    assert!(
        !old.contains("log file reopened"),
        "later lines go to the new file: {old}"
    );
    assert!(server.is_running());

    // And again: a second rotation works the same.
    std::fs::rename(&log_file, dir.path().join("lime-server.log.2")).unwrap();
    server.hang_up();
    wait_for_text(&log_file, "log file reopened");
}

#[test]
fn a_log_file_that_cannot_be_reopened_is_kept_and_the_error_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let (mut server, log_file) = start_logging_server(dir.path(), logs.join("lime-server.log"));
    // The directory gone: the path cannot be opened again.
    let moved = dir.path().join("moved");
    std::fs::rename(&logs, &moved).unwrap();
    server.hang_up();
    let kept = wait_for_text(&moved.join("lime-server.log"), "TLS reloaded");
    let error = kept
        .lines()
        .find(|line| line.contains("cannot reopen the log file"))
        .unwrap_or_else(|| panic!("{kept}"));
    assert!(error.contains(&log_file.display().to_string()), "{error}");
    assert!(server.is_running());
}

#[test]
fn a_log_file_that_cannot_be_opened_stops_the_start_naming_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let log_file = dir.path().join("no-such-directory").join("lime-server.log");
    let config = dir.path().join("lime-server.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = \"{}\"\n[log]\nfile = \"{}\"\n",
            dir.path().join("data").display(),
            log_file.display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(BIN)
        .args([
            "--config",
            config.to_str().unwrap(),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("log.file"), "{stderr}");
    assert!(stderr.contains(&log_file.display().to_string()), "{stderr}");
}
