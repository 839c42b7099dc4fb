//! The TLS side of the HTTPS listeners: the certificate (configured, or a
//! self-signed one generated on first start and reused afterwards) and the rustls
//! server configuration.

use anyhow::{Context, Result};
use rustls::server::danger::ClientCertVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
