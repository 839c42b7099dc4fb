//! A test PKI for client-certificate stories: a CA the server trusts (with its
//! CRL), an unrelated CA it does not, and client certificates issued by either,
//! all as PEM files in a temporary directory.

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber, date_time_ymd,
};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tempfile::TempDir;

/// A client certificate and its key, as PEM files.
pub struct IssuedCertificate {
    /// The PEM certificate (the end-entity certificate alone).
    pub certificate: PathBuf,
    /// The PEM private key.
    pub private_key: PathBuf,
    /// Its serial number, what a CRL lists.
    pub serial: u64,
}

/// Two CAs and the files of what they issued. Dropping it removes the files.
pub struct TestPki {
    /// Holds every PEM file for the life of the test.
    dir: TempDir,
    /// The CA the server trusts; it also signs the CRL.
    ca: CertifiedIssuer<'static, KeyPair>,
    /// A CA the server knows nothing about.
    other_ca: CertifiedIssuer<'static, KeyPair>,
    /// The serials the CRL lists.
    revoked: Mutex<Vec<u64>>,
    /// The serial of the next certificate issued, unique across both CAs.
    next_serial: AtomicU64,
}

impl TestPki {
    /// A trusted CA with an empty CRL, and an unrelated second CA.
    pub fn new() -> TestPki {
        let pki = TestPki {
            dir: tempfile::tempdir().expect("temporary directory"),
            ca: certificate_authority("LIME test CA"),
            other_ca: certificate_authority("Unrelated test CA"),
            revoked: Mutex::new(Vec::new()),
            next_serial: AtomicU64::new(1000),
        };
        std::fs::write(pki.ca_file(), pki.ca.pem()).expect("write CA");
        pki.write_crl(&[]);
        pki
    }

    /// The PEM certificate of the CA the server trusts.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The PEM CRL of the trusted CA, listing every revoked serial so far.
    pub fn crl_file(&self) -> PathBuf {
        self.dir.path().join("crl.pem")
    }

    /// A client certificate (clientAuth) from the trusted CA, with these URI and DNS
    /// subjectAltNames (URIs first) and this subject common name.
    pub fn issue(
        &self,
        san_uris: &[&str],
        san_dns: &[&str],
        common_name: &str,
    ) -> IssuedCertificate {
        self.issue_by(&self.ca, san_uris, san_dns, common_name)
    }

    /// A client certificate from the CA the server does not trust.
    pub fn issue_by_other_ca(&self, san_uris: &[&str], common_name: &str) -> IssuedCertificate {
        self.issue_by(&self.other_ca, san_uris, &[], common_name)
    }

    /// A server certificate (serverAuth) from the trusted CA for these IP
    /// addresses and DNS names: what a client trusting [`TestPki::ca_file`]
    /// accepts from a server at one of them.
    pub fn issue_server(&self, ips: &[std::net::IpAddr], dns: &[&str]) -> IssuedCertificate {
        let sans = ips
            .iter()
            .map(|ip| SanType::IpAddress(*ip))
            .chain(dns.iter().map(|name| SanType::DnsName(ia5(name))))
            .collect();
        self.issue_with(
            &self.ca,
            sans,
            "lime-server test",
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// Lists `certificate` in the trusted CA's CRL and rewrites the CRL file. A
    /// verifier reads the CRL when built: revoke before building it.
    pub fn revoke(&self, certificate: &IssuedCertificate) {
        let mut revoked = self.revoked.lock().expect("revoked serials");
        revoked.push(certificate.serial);
        self.write_crl(&revoked);
    }

    fn issue_by(
        &self,
        issuer: &CertifiedIssuer<'static, KeyPair>,
        san_uris: &[&str],
        san_dns: &[&str],
        common_name: &str,
    ) -> IssuedCertificate {
        let sans = san_uris
            .iter()
            .map(|uri| SanType::URI(ia5(uri)))
            .chain(san_dns.iter().map(|dns| SanType::DnsName(ia5(dns))))
            .collect();
        self.issue_with(
            issuer,
            sans,
            common_name,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn issue_with(
        &self,
        issuer: &CertifiedIssuer<'static, KeyPair>,
        sans: Vec<SanType>,
        common_name: &str,
        purpose: ExtendedKeyUsagePurpose,
    ) -> IssuedCertificate {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let mut params = CertificateParams::default();
        params.serial_number = Some(SerialNumber::from(serial));
        params.subject_alt_names = sans;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![purpose];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("client key");
        let certificate = params.signed_by(&key, issuer).expect("client certificate");

        let issued = IssuedCertificate {
            certificate: self.dir.path().join(format!("issued-{serial}.pem")),
            private_key: self.dir.path().join(format!("issued-{serial}.key")),
            serial,
        };
        std::fs::write(&issued.certificate, certificate.pem()).expect("write certificate");
        std::fs::write(&issued.private_key, key.serialize_pem()).expect("write key");
        issued
    }

    fn write_crl(&self, revoked: &[u64]) {
        let revoked_certs = revoked
            .iter()
            .map(|serial| RevokedCertParams {
                serial_number: SerialNumber::from(*serial),
                revocation_time: date_time_ymd(2025, 1, 1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect();
        let crl = CertificateRevocationListParams {
            this_update: date_time_ymd(2025, 1, 1),
            next_update: date_time_ymd(2049, 12, 31),
            crl_number: SerialNumber::from(revoked.len() as u64 + 1),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.ca)
        .expect("CRL");
        std::fs::write(self.crl_file(), crl.pem().expect("CRL PEM")).expect("write CRL");
    }
}

/// A name as a certificate's subjectAltName holds it.
fn ia5(name: &str) -> Ia5String {
    Ia5String::try_from(name).expect("ASCII name")
}

/// A self-signed CA that may sign certificates and CRLs.
fn certificate_authority(common_name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let key = KeyPair::generate().expect("CA key");
    CertifiedIssuer::self_signed(params, key).expect("CA certificate")
}
