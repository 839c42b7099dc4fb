//! The TLS side of the HTTPS listeners: the certificate (configured, or a
//! self-signed one generated on first start and reused afterwards), the rustls
//! server configuration, and [`ServerTls`], which rebuilds that configuration
//! from its files on SIGHUP while the listeners serve.

use anyhow::{Context, Result};
use rustls::server::danger::ClientCertVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

/// Where a certificate and its key are.
#[derive(Debug, Clone)]
pub struct CertificateFiles {
    /// PEM certificate chain.
    pub certificate: PathBuf,
    /// PEM private key.
    pub private_key: PathBuf,
}

impl CertificateFiles {
    /// The self-signed pair kept in the data directory.
    pub fn self_signed_in(data_dir: &Path) -> CertificateFiles {
        let dir = data_dir.join("tls");
        CertificateFiles {
            certificate: dir.join("self-signed.crt"),
            private_key: dir.join("self-signed.key"),
        }
    }
}

/// Where the client-certificate verifier of the HTTPS listeners comes from
/// (`[auth.client_certificates]`).
#[derive(Debug, Clone)]
pub struct ClientCaFiles {
    /// PEM bundle of the CAs (`auth.client_certificates.ca_file`).
    pub ca_file: PathBuf,
    /// PEM CRLs (`auth.client_certificates.crl_files`).
    pub crl_files: Vec<PathBuf>,
    /// Refuse clients without a certificate (`auth.client_certificates.required`).
    pub required: bool,
}

/// The TLS configuration of the HTTPS listeners, replaceable while they serve.
///
/// Each new connection takes the configuration current at its accept; a reload
/// builds a whole new one from the files and swaps it in, so a connection never
/// sees half of each and connections already open keep the one they started with.
/// A reload that fails leaves the current configuration in place. (A lock around
/// an `Arc` rather than a lock-free swap: it is taken once per connection, for
/// the time of an `Arc` clone, and written once per SIGHUP.)
pub struct ServerTls {
    /// The server's certificate and key.
    files: CertificateFiles,
    /// True when `files` is the generated self-signed pair (no `tls.certificate`).
    self_signed: bool,
    /// The client CA bundle and CRLs, when client certificates are on.
    client_ca: Option<ClientCaFiles>,
    /// What new connections get.
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Reads every file once; an error names the file at fault.
    pub fn load(
        files: CertificateFiles,
        self_signed: bool,
        client_ca: Option<ClientCaFiles>,
    ) -> Result<ServerTls> {
        let config = build(&files, client_ca.as_ref())?;
        Ok(ServerTls {
            files,
            self_signed,
            client_ca,
            current: RwLock::new(config),
        })
    }

    /// What a new connection handshakes with: the configuration current now.
    pub fn config(&self) -> Arc<ServerConfig> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&current)
    }

    /// The certificate and key files served.
    pub fn files(&self) -> &CertificateFiles {
        &self.files
    }

    /// Reads the certificate, key, CA bundle and CRLs again and, when all of them
    /// are good, makes them what new connections get. On an error (which names the
    /// file) the configuration in use stays.
    pub fn reload(&self) -> Result<()> {
        let config = build(&self.files, self.client_ca.as_ref())?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// True when the certificate is the generated self-signed one: nobody renews
    /// it, so a reload has nothing new to find there.
    pub fn is_self_signed(&self) -> bool {
        self.self_signed
    }
}

/// The server configuration from the certificate files and, when client
/// certificates are on, the CA bundle and CRLs.
fn build(files: &CertificateFiles, client_ca: Option<&ClientCaFiles>) -> Result<Arc<ServerConfig>> {
    let verifier = client_ca
        .map(|ca| {
            crate::auth::certificate::client_verifier(&ca.ca_file, &ca.crl_files, ca.required)
                .context("auth.client_certificates")
        })
        .transpose()?;
    server_config(files, verifier)
}

/// Makes a self-signed certificate for localhost at `files`, unless one is there.
/// Returns true when a new one was made.
pub fn ensure_self_signed(files: &CertificateFiles) -> Result<bool> {
    if files.certificate.exists() && files.private_key.exists() {
        return Ok(false);
    }
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let certified = rcgen::generate_simple_self_signed(names)
        .context("cannot generate a self-signed certificate")?;
    if let Some(dir) = files.certificate.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_private(
        &files.private_key,
        certified.signing_key.serialize_pem().as_bytes(),
    )?;
    std::fs::write(&files.certificate, certified.cert.pem())
        .with_context(|| format!("cannot write {}", files.certificate.display()))?;
    Ok(true)
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The certificates of a PEM file, in file order; empty when it holds none.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificates from {}", path.display()))
}

/// Every certificate of a PEM file as a trust anchor (a CA, or a server
/// certificate trusted as it is); empty when the file holds none.
pub fn read_trust_anchors(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(path)? {
        roots
            .add(certificate)
            .with_context(|| format!("bad certificate in {}", path.display()))?;
    }
    Ok(roots)
}

/// The rustls configuration of the HTTPS listeners: HTTP/2 and HTTP/1.1 by ALPN.
/// Clients are asked for a certificate only when `client_verifier` is given
/// (see [`crate::auth::certificate::client_verifier`]).
pub fn server_config(
    files: &CertificateFiles,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>> {
    let chain = read_certificates(&files.certificate)?;
    if chain.is_empty() {
        anyhow::bail!("no certificate in {}", files.certificate.display());
    }
    let key = PrivateKeyDer::from_pem_file(&files.private_key)
        .with_context(|| format!("cannot read private key {}", files.private_key.display()))?;
    let builder =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
    let builder = match client_verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "certificate {} does not match key {}",
            files.certificate.display(),
            files.private_key.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The system's CA certificates (`/etc/ssl/certs` and the like, through
/// `rustls-native-certs`): what a client of a deployed server trusts. Fails when
/// none can be read.
pub fn system_roots() -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        anyhow::bail!(
            "no system CA certificate could be read ({:?})",
            found.errors
        );
    }
    Ok(roots)
}
