//! Behind a TLS-terminating reverse proxy (Apache or nginx, as the PHP server was
//! deployed): the proxy verifies the client certificate and passes its verdict and
//! the certificate on in request headers. Those headers are believed only from the
//! configured proxy addresses; from anyone else they are ignored.

use super::certificate::CertificateIdentity;
use crate::config::ProxySettings;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use rustls_pki_types::CertificateDer;
use std::net::IpAddr;

/// The proxies believed and the headers they fill.
#[derive(Debug, Clone)]
pub struct TrustedProxies {
    networks: Vec<IpNet>,
    verify_header: HeaderName,
    certificate_header: HeaderName,
    client_address_header: HeaderName,
}

/// What the proxy says of the client's certificate.
#[derive(Debug)]
pub enum ProxyVerdict {
    /// Verified by the proxy; here is who it names.
    Verified(CertificateIdentity),
    /// The client sent none.
    NoCertificate,
    /// The proxy refused it, or its headers do not make sense: refuse the request.
    Refused(String),
}

impl TrustedProxies {
    /// From validated settings; `None` when no proxy is trusted.
    pub fn from_settings(settings: &ProxySettings) -> Option<TrustedProxies> {
        if !settings.is_enabled() {
            return None;
        }
        let header = |name: &str| {
            HeaderName::from_bytes(name.as_bytes()).expect("header names are validated")
        };
        Some(TrustedProxies {
            networks: settings.trusted_networks(),
            verify_header: header(&settings.verify_header),
            certificate_header: header(&settings.certificate_header),
            client_address_header: header(&settings.client_address_header),
        })
    }

    /// True when requests from `peer` come through a trusted proxy.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.networks.iter().any(|network| network.contains(&peer))
    }

    /// The client's address as the proxy saw it: the last entry it appended.
    pub fn client_address(&self, headers: &HeaderMap) -> Option<IpAddr> {
        let value = headers.get(&self.client_address_header)?.to_str().ok()?;
        value.rsplit(',').next()?.trim().parse().ok()
    }

    /// The proxy's verdict on the client certificate.
    pub fn verdict(&self, headers: &HeaderMap) -> ProxyVerdict {
        let verify = headers
            .get(&self.verify_header)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).trim().to_owned());
        match verify.as_deref() {
            None | Some("") | Some("NONE") => ProxyVerdict::NoCertificate,
            Some("SUCCESS") => {
                let Some(value) = headers.get(&self.certificate_header) else {
                    return ProxyVerdict::Refused(format!(
                        "the proxy verified a client certificate but sent none in {}",
                        self.certificate_header
                    ));
                };
                match certificate_from_header(value.as_bytes())
                    .and_then(|der| CertificateIdentity::from_der(&der).map_err(|e| e.to_string()))
                {
                    Ok(identity) => ProxyVerdict::Verified(identity),
                    Err(reason) => ProxyVerdict::Refused(format!(
                        "the certificate in {} cannot be read: {reason}",
                        self.certificate_header
                    )),
                }
            }
            Some(other) => ProxyVerdict::Refused(format!(
                "the proxy did not verify the client certificate ({}: {other})",
                self.verify_header
            )),
        }
    }
}

/// A PEM certificate as proxies put it in a header: URL-escaped (nginx's
/// `$ssl_client_escaped_cert`), or with its line breaks turned into spaces.
fn certificate_from_header(value: &[u8]) -> Result<CertificateDer<'static>, String> {
    let text = percent_encoding::percent_decode(value)
        .decode_utf8()
        .map_err(|_| "not UTF-8".to_owned())?;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = text.find(BEGIN).ok_or("no BEGIN CERTIFICATE line")? + BEGIN.len();
    let end = start + text[start..].find(END).ok_or("no END CERTIFICATE line")?;
    let body: String = text[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD
        .decode(body)
        .map(CertificateDer::from)
        .map_err(|error| format!("bad base64: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies() -> TrustedProxies {
        TrustedProxies::from_settings(&ProxySettings {
            trusted: vec!["10.0.0.0/24".into(), "192.0.2.7".into()],
            ..ProxySettings::default()
        })
        .unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn only_configured_networks_are_trusted() {
        let proxies = proxies();
        assert!(proxies.trusts("10.0.0.200".parse().unwrap()));
        assert!(proxies.trusts("192.0.2.7".parse().unwrap()));
        assert!(!proxies.trusts("192.0.2.8".parse().unwrap()));
        assert!(!proxies.trusts("10.0.1.1".parse().unwrap()));
        assert!(TrustedProxies::from_settings(&ProxySettings::default()).is_none());
    }

    #[test]
    fn the_client_address_is_the_last_forwarded_entry() {
        let proxies = proxies();
        let forwarded = headers(&[("x-forwarded-for", "203.0.113.9, 198.51.100.4")]);
        assert_eq!(
            proxies.client_address(&forwarded),
            Some("198.51.100.4".parse().unwrap())
        );
        assert_eq!(proxies.client_address(&HeaderMap::new()), None);
    }

    #[test]
    fn verdicts_follow_the_verify_header() {
        let proxies = proxies();
        assert!(matches!(
            proxies.verdict(&HeaderMap::new()),
            ProxyVerdict::NoCertificate
        ));
        assert!(matches!(
            proxies.verdict(&headers(&[("x-ssl-client-verify", "NONE")])),
            ProxyVerdict::NoCertificate
        ));
        assert!(matches!(
            proxies.verdict(&headers(&[(
                "x-ssl-client-verify",
                "FAILED:certificate revoked"
            )])),
            ProxyVerdict::Refused(_)
        ));
        assert!(matches!(
            proxies.verdict(&headers(&[("x-ssl-client-verify", "SUCCESS")])),
            ProxyVerdict::Refused(_)
        ));
    }

    #[test]
    fn certificates_are_read_escaped_or_with_spaces() {
        let certified =
            rcgen::generate_simple_self_signed(vec!["sip:alice@example.org".into()]).unwrap();
        let pem = certified.cert.pem();
        let der = certified.cert.der().to_vec();
        let escaped: String =
            percent_encoding::utf8_percent_encode(&pem, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        let spaced = pem.replace('\n', " ");
        for value in [escaped, spaced] {
            assert_eq!(
                certificate_from_header(value.as_bytes()).unwrap().as_ref(),
                der.as_slice()
            );
        }
        assert!(certificate_from_header(b"garbage").is_err());
    }
}
