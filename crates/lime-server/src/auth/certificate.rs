//! Client-certificate authentication: which certificates the TLS handshake lets
//! in (issued by the configured CA, not revoked by the configured CRLs) and which
//! identities a let-in certificate names.
//!
//! The verifier runs inside the handshake, so a certificate that reaches the request
//! path has already been checked; this module then only reads names out of it.
//! Whether a name may act for a device id is [`identity::owns_device`]'s decision,
//! never this module's.

use super::identity;
use anyhow::{Context, Result};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The verifier of client certificates: issued (directly or through intermediates
/// the client sends) by a CA of the PEM bundle `ca_file`, and not revoked by the PEM
/// CRLs of `crl_files`. When `required` is false, a client that presents no
/// certificate is let in too (a certificate it does present must still be valid).
///
/// With CRLs configured, rustls checks every certificate of the chain below the
/// CA, and a certificate whose status no CRL gives is refused like a revoked one.
/// An out-of-date CRL (past its nextUpdate) is still used, as rustls does by
/// default: refusing every client the day a CRL is not refreshed would be an outage.
///
/// Every error names the file at fault.
pub fn client_verifier(
    ca_file: &Path,
    crl_files: &[PathBuf],
    required: bool,
) -> Result<Arc<dyn ClientCertVerifier>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = crate::tls::read_trust_anchors(ca_file)?;
    if roots.is_empty() {
        anyhow::bail!("no PEM CA certificate in {}", ca_file.display());
    }
    let roots = Arc::new(roots);
    let mut crls = Vec::new();
    for crl_file in crl_files {
        crls.extend(read_crls(crl_file, &roots, &provider)?);
    }
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider).with_crls(crls);
    let builder = if required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder.build().with_context(|| {
        format!(
            "cannot verify client certificates with CA {}",
            ca_file.display()
        )
    })
}

/// The CRLs of one PEM file. The verifier builder parses all CRLs at once and its
/// error does not say which one is bad, so each file is tried alone first.
fn read_crls(
    crl_file: &Path,
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let crls = CertificateRevocationListDer::pem_file_iter(crl_file)
        .and_then(|crls| crls.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read CRL {}", crl_file.display()))?;
    if crls.is_empty() {
        anyhow::bail!("no PEM CRL in {}", crl_file.display());
    }
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls.iter().cloned())
        .build()
        .with_context(|| format!("bad CRL in {}", crl_file.display()))?;
    Ok(crls)
}

/// Which names of a certificate are its identities: `auth.client_certificates.identity`.
///
/// A CA that puts `sip:mallory@...` in the subjectAltName and something else in the
/// common name certified mallory: RFC 6125 (6.4.4) reads the common name only when
/// the certificate has no subjectAltName identifier. The original PHP server read
/// both; that looser rule is kept for operators whose CA needs it, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityRule {
    /// The subjectAltName URI and DNS entries; the common name only when there are
    /// none (RFC 6125). The default.
    #[default]
    SanElseCn,
    /// Every subjectAltName URI and DNS entry, and the common name too, each owning
    /// its own devices (the PHP server's rule): a certificate whose CN and
    /// subjectAltName name two users acts for both.
    SanOrCn,
}

impl IdentityRule {
    /// The name `auth.client_certificates.identity` gives it.
    pub fn name(self) -> &'static str {
        match self {
            IdentityRule::SanElseCn => "san_else_cn",
            IdentityRule::SanOrCn => "san_or_cn",
        }
    }
}

/// The identities a verified client certificate names: its subjectAltName URI and
/// DNS entries, and its subject common name ([`IdentityRule`] says which count).
///
/// A name without a scheme is read as a SIP identity (`alice@example.org` is
/// `sip:alice@example.org`); a name with another scheme (`https:...`) is kept as it
/// is and owns no device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateIdentity {
    /// The subjectAltName URI and DNS entries, in certificate order.
    subject_alt_names: Vec<String>,
    /// The subject's first common name.
    common_name: Option<String>,
}

/// Why a certificate's names could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertificateIdentityError {
    /// The bytes are not one DER X.509 certificate.
    #[error("not a DER X.509 certificate: {0}")]
    NotX509(String),
    /// The subjectAltName extension is malformed or repeated.
    #[error("unreadable subjectAltName: {0}")]
    SubjectAltName(String),
}

impl CertificateIdentity {
    /// Reads the names of a DER certificate (the end-entity certificate a client
    /// presented).
    pub fn from_der(
        certificate: &CertificateDer<'_>,
    ) -> Result<CertificateIdentity, CertificateIdentityError> {
        let (rest, certificate) = X509Certificate::from_der(certificate)
            .map_err(|error| CertificateIdentityError::NotX509(error.to_string()))?;
        if !rest.is_empty() {
            return Err(CertificateIdentityError::NotX509(format!(
                "{} bytes after the certificate",
                rest.len()
            )));
        }
        let subject_alt_names = certificate
            .subject_alternative_name()
            .map_err(|error| CertificateIdentityError::SubjectAltName(error.to_string()))?
            .map(|extension| {
                extension
                    .value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::URI(name) | GeneralName::DNSName(name) => {
                            Some(as_identity(name))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        // A common name that is not a string type cannot name a SIP user: skipped.
        let common_name = certificate
            .subject()
            .iter_common_name()
            .next()
            .and_then(|common_name| common_name.as_str().ok())
            .map(as_identity);
        Ok(CertificateIdentity {
            subject_alt_names,
            common_name,
        })
    }

    /// The subjectAltName URI and DNS names, in certificate order, as identities.
    pub fn subject_alt_names(&self) -> &[String] {
        &self.subject_alt_names
    }

    /// The subject's common name as an identity, if it has one.
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }

    /// The identity of this certificate that owns `device_id` under `rule`: the
    /// first subjectAltName that does; else the common name if it does and the rule
    /// lets it count; else `None`.
    ///
    /// Under [`IdentityRule::SanElseCn`] the common name counts only for a
    /// certificate without subjectAltName URI or DNS entries. Under
    /// [`IdentityRule::SanOrCn`] it is a fallback per device id: a certificate with
    /// subjectAltName `sip:bob@example.org` and common name `sip:alice@example.org`
    /// owns the devices of both.
    pub fn owner_of(&self, device_id: &str, rule: IdentityRule) -> Option<&str> {
        self.names(rule)
            .find(|name| identity::owns_device(name, device_id))
    }

    /// The names that count under `rule`, as identities: the subjectAltNames,
    /// then the common name when the rule lets it count.
    pub fn names(&self, rule: IdentityRule) -> impl Iterator<Item = &str> {
        let common_name = match rule {
            IdentityRule::SanElseCn if !self.subject_alt_names.is_empty() => None,
            IdentityRule::SanElseCn | IdentityRule::SanOrCn => self.common_name.as_ref(),
        };
        self.subject_alt_names
            .iter()
            .chain(common_name)
            .map(String::as_str)
    }

    /// All names of the certificate, for log lines.
    pub fn describe(&self) -> String {
        let subject_alt_names = if self.subject_alt_names.is_empty() {
            "none".to_owned()
        } else {
            self.subject_alt_names.join(", ")
        };
        let common_name = self.common_name.as_deref().unwrap_or("none");
        format!("subjectAltName: {subject_alt_names}; CN: {common_name}")
    }
}

/// The verified certificate of the connection a request came on, put in the
/// request's extensions by the listener. Absent when the client presented none.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Arc<CertificateIdentity>);

/// A certificate name as an identity: `sip:` is added to a name without a scheme.
pub fn as_identity(name: &str) -> String {
    if has_scheme(name) {
        name.to_owned()
    } else {
        format!("sip:{name}")
    }
}

/// True when `name` starts with a URI scheme and its colon (RFC 3986:
/// `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) ":"`).
fn has_scheme(name: &str) -> bool {
    name.split_once(':').is_some_and(|(scheme, _)| {
        scheme.starts_with(|first: char| first.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::string::Ia5String;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    /// A self-signed certificate with these subjectAltNames and common name.
    fn certificate(
        subject_alt_names: Vec<SanType>,
        common_name: Option<&str>,
    ) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = subject_alt_names;
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(common_name) = common_name {
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(name: &str) -> SanType {
        SanType::URI(Ia5String::try_from(name).unwrap())
    }

    fn dns(name: &str) -> SanType {
        SanType::DnsName(Ia5String::try_from(name).unwrap())
    }

    fn identity_of(
        subject_alt_names: Vec<SanType>,
        common_name: Option<&str>,
    ) -> CertificateIdentity {
        CertificateIdentity::from_der(&certificate(subject_alt_names, common_name)).unwrap()
    }

    #[test]
    fn uri_and_dns_names_are_read_in_certificate_order() {
        let identity = identity_of(
            vec![
                dns("bob@example.org"),
                uri("sip:alice@example.org"),
                dns("carol@example.org"),
            ],
            Some("sip:dave@example.org"),
        );
        assert_eq!(
            identity.subject_alt_names(),
            [
                "sip:bob@example.org",
                "sip:alice@example.org",
                "sip:carol@example.org"
            ]
        );
        assert_eq!(identity.common_name(), Some("sip:dave@example.org"));
    }

    #[test]
    fn names_without_scheme_become_sip_identities() {
        let identity = identity_of(vec![dns("alice@example.org")], Some("bob@example.org"));
        assert_eq!(identity.subject_alt_names(), ["sip:alice@example.org"]);
        assert_eq!(identity.common_name(), Some("sip:bob@example.org"));
        assert_eq!(
            identity.owner_of("sip:alice@example.org;gr=1", IdentityRule::SanElseCn),
            Some("sip:alice@example.org")
        );
    }

    #[test]
    fn names_with_another_scheme_are_kept_and_own_nothing() {
        let identity = identity_of(
            vec![
                uri("https:alice@example.org"),
                uri("sips:alice@example.org"),
            ],
            None,
        );
        assert_eq!(
            identity.subject_alt_names(),
            ["https:alice@example.org", "sips:alice@example.org"]
        );
        assert_eq!(
            identity.owner_of("https:alice@example.org;gr=1", IdentityRule::SanElseCn),
            None
        );
        assert_eq!(
            identity.owner_of("sip:alice@example.org;gr=1", IdentityRule::SanElseCn),
            None
        );
    }

    #[test]
    fn other_kinds_of_subject_alt_name_are_ignored() {
        let identity = identity_of(
            vec![
                SanType::Rfc822Name(Ia5String::try_from("alice@example.org").unwrap()),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ],
            None,
        );
        assert!(identity.subject_alt_names().is_empty());
        assert_eq!(
            identity.owner_of("sip:alice@example.org;gr=1", IdentityRule::SanElseCn),
            None
        );
    }

    #[test]
    fn owner_is_the_first_subject_alt_name_that_owns_the_device() {
        let identity = identity_of(
            vec![uri("sip:bob@example.org"), uri("sip:alice@example.org")],
            Some("sip:alice@example.org"),
        );
        assert_eq!(
            identity.owner_of("sip:alice@example.org;gr=1", IdentityRule::SanElseCn),
            Some("sip:alice@example.org")
        );
        assert_eq!(
            identity.owner_of("sip:bob@example.org;gr=1", IdentityRule::SanElseCn),
            Some("sip:bob@example.org")
        );
        assert_eq!(
            identity.owner_of("sip:carol@example.org;gr=1", IdentityRule::SanElseCn),
            None
        );
    }

    #[test]
    fn common_name_owns_when_there_is_no_subject_alt_name() {
        let only_common_name = identity_of(vec![], Some("sip:alice@example.org"));
        for rule in [IdentityRule::SanElseCn, IdentityRule::SanOrCn] {
            assert_eq!(
                only_common_name.owner_of("sip:alice@example.org;gr=1", rule),
                Some("sip:alice@example.org")
            );
        }
        // An e-mail or IP subjectAltName is no SIP identity: the CN still counts.
        let with_email = identity_of(
            vec![SanType::Rfc822Name(
                Ia5String::try_from("mallory@example.org").unwrap(),
            )],
            Some("alice@example.org"),
        );
        assert_eq!(
            with_email.owner_of("sip:alice@example.org;gr=1", IdentityRule::SanElseCn),
            Some("sip:alice@example.org")
        );
    }

    #[test]
    fn common_name_is_ignored_when_the_san_names_someone_else() {
        let both = identity_of(
            vec![uri("sip:mallory@example.org")],
            Some("sip:alice@example.org"),
        );
        assert_eq!(
            both.owner_of("sip:alice@example.org;gr=1", IdentityRule::SanElseCn),
            None
        );
        assert_eq!(
            both.owner_of("sip:mallory@example.org;gr=1", IdentityRule::SanElseCn),
            Some("sip:mallory@example.org")
        );
        // Any URI or DNS subjectAltName hides the CN, even one that owns nothing.
        let other_scheme = identity_of(
            vec![uri("https://example.org/")],
            Some("sip:alice@example.org"),
        );
        assert_eq!(
            other_scheme.owner_of("sip:alice@example.org;gr=1", IdentityRule::SanElseCn),
            None
        );
    }

    #[test]
    fn looser_rule_is_an_explicit_option() {
        // The fallback is per device id: another user's subjectAltName does not hide it.
        let both = identity_of(vec![uri("sip:bob@example.org")], Some("alice@example.org"));
        assert_eq!(
            both.owner_of("sip:alice@example.org;gr=1", IdentityRule::SanOrCn),
            Some("sip:alice@example.org")
        );
        assert_eq!(
            both.owner_of("sip:bob@example.org;gr=1", IdentityRule::SanOrCn),
            Some("sip:bob@example.org")
        );
        assert_eq!(IdentityRule::default(), IdentityRule::SanElseCn);
    }

    #[test]
    fn certificate_without_names_owns_nothing() {
        let identity = identity_of(vec![], None);
        assert_eq!(identity.common_name(), None);
        assert_eq!(
            identity.owner_of("sip:alice@example.org;gr=1", IdentityRule::SanElseCn),
            None
        );
        assert_eq!(identity.describe(), "subjectAltName: none; CN: none");
    }

    #[test]
    fn describe_lists_every_name() {
        let identity = identity_of(
            vec![uri("sip:alice@example.org"), dns("bob@example.org")],
            Some("carol@example.org"),
        );
        assert_eq!(
            identity.describe(),
            "subjectAltName: sip:alice@example.org, sip:bob@example.org; CN: sip:carol@example.org"
        );
    }

    #[test]
    fn bytes_that_are_not_a_certificate_are_an_error() {
        let error =
            CertificateIdentity::from_der(&CertificateDer::from(vec![1, 2, 3])).unwrap_err();
        assert!(matches!(error, CertificateIdentityError::NotX509(_)));
        let mut trailing = certificate(vec![], None).to_vec();
        trailing.push(0);
        let error = CertificateIdentity::from_der(&CertificateDer::from(trailing)).unwrap_err();
        assert!(matches!(error, CertificateIdentityError::NotX509(_)));
    }

    #[test]
    fn scheme_detection() {
        assert!(has_scheme("sip:alice@example.org"));
        assert!(has_scheme("urn:uuid:1"));
        assert!(has_scheme("x-my.scheme+1:a"));
        assert!(!has_scheme("alice@example.org"));
        assert!(!has_scheme("alice@example.org:5060"));
        assert!(!has_scheme(":alice"));
        assert!(!has_scheme("1sip:alice"));
    }

    /// A PEM file holding `contents`, in a directory kept alive with it.
    fn file_with(contents: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.pem");
        std::fs::write(&path, contents).unwrap();
        (dir, path)
    }

    fn ca_pem() -> String {
        let mut params = CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    fn error_text(result: Result<Arc<dyn ClientCertVerifier>>) -> String {
        match result {
            Ok(_) => panic!("expected an error"),
            Err(error) => format!("{error:#}"),
        }
    }

    #[test]
    fn verifier_reads_a_ca_bundle() {
        let (_dir, ca) = file_with(&format!("{}{}", ca_pem(), ca_pem()));
        client_verifier(&ca, &[], true).unwrap();
        client_verifier(&ca, &[], false).unwrap();
    }

    #[test]
    fn missing_ca_file_is_named() {
        let missing = PathBuf::from("/nonexistent/ca.pem");
        let error = error_text(client_verifier(&missing, &[], true));
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }

    #[test]
    fn ca_file_without_certificate_is_named() {
        let (_dir, ca) = file_with("not PEM at all\n");
        let error = error_text(client_verifier(&ca, &[], true));
        assert!(error.contains("no PEM CA certificate"), "{error}");
        assert!(error.contains(&ca.display().to_string()), "{error}");
    }

    #[test]
    fn bad_crl_file_is_named() {
        let (_ca_dir, ca) = file_with(&ca_pem());
        let (_dir, empty) = file_with("");
        let error = error_text(client_verifier(&ca, std::slice::from_ref(&empty), true));
        assert!(error.contains("no PEM CRL"), "{error}");
        assert!(error.contains(&empty.display().to_string()), "{error}");

        let (_dir, garbage) = file_with("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n");
        let error = error_text(client_verifier(&ca, std::slice::from_ref(&garbage), true));
        assert!(error.contains("bad CRL"), "{error}");
        assert!(error.contains(&garbage.display().to_string()), "{error}");

        let missing = PathBuf::from("/nonexistent/crl.pem");
        let error = error_text(client_verifier(&ca, &[missing], true));
        assert!(error.contains("/nonexistent/crl.pem"), "{error}");
    }
}
