//! Behind a TLS-terminating reverse proxy (Apache or nginx, as the PHP server was
//! deployed): the proxy verifies the client certificate and passes its verdict and
//! the certificate on in request headers. Those headers are believed only from the
//! configured proxy addresses; from anyone else they are ignored.

use super::certificate::CertificateIdentity;
use crate::config::ProxySettings;
use crate::telemetry::clip;
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

    /// The client's address as the proxy saw it: the last entry of the last
    /// header line, which is what the proxy appended (nginx's
    /// `$proxy_add_x_forwarded_for` and Apache add an entry to the line; HAProxy's
    /// `option forwardfor` adds a line). Whatever the client sent comes before it.
    pub fn client_address(&self, headers: &HeaderMap) -> Option<IpAddr> {
        let value = headers
            .get_all(&self.client_address_header)
            .iter()
            .next_back()?
            .to_str()
            .ok()?;
        value.rsplit(',').next()?.trim().parse().ok()
    }

    /// The proxy's verdict on the client certificate.
    ///
    /// A request carrying the verdict or the certificate header more than once is
    /// refused: a proxy that appends (HAProxy `add-header`, Apache `RequestHeader
    /// add`) instead of replacing lets a client put its own `SUCCESS` and someone
    /// else's (public) certificate before the proxy's, and nobody can tell which
    /// copy the proxy wrote.
    pub fn verdict(&self, headers: &HeaderMap) -> ProxyVerdict {
        for name in [&self.verify_header, &self.certificate_header] {
            let copies = headers.get_all(name).iter().count();
            if copies > 1 {
                return ProxyVerdict::Refused(format!(
                    "the request carries {name} {copies} times: the proxy must replace this \
                     header, not append to what the client sent"
                ));
            }
        }
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
                "the proxy did not verify the client certificate ({}: {})",
                self.verify_header,
                clip(other)
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
    // Two certificates in one value: a proxy joined the client's copy and its own
    // (Apache's `RequestHeader append`).
    if text[end..].contains(BEGIN) {
        return Err(
            "more than one certificate in the header: the proxy must replace \
                    this header, not append to what the client sent"
                .to_owned(),
        );
    }
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

    /// Headers in this order; a name given twice is sent twice.
    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
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
    fn the_client_address_is_in_the_last_forwarded_line() {
        let proxies = proxies();
        let forwarded = headers(&[
            ("x-forwarded-for", "203.0.113.9, 192.0.2.200"),
            ("x-forwarded-for", "198.51.100.4"),
        ]);
        assert_eq!(
            proxies.client_address(&forwarded),
            Some("198.51.100.4".parse().unwrap())
        );
        let unreadable_last = headers(&[
            ("x-forwarded-for", "198.51.100.4"),
            ("x-forwarded-for", "unknown"),
        ]);
        assert_eq!(proxies.client_address(&unreadable_last), None);
    }

    #[test]
    fn a_repeated_verdict_or_certificate_header_is_refused() {
        let proxies = proxies();
        let certified =
            rcgen::generate_simple_self_signed(vec!["alice@example.org".into()]).unwrap();
        let pem = certified.cert.pem().replace('\n', " ");
        for repeated in [
            headers(&[
                ("x-ssl-client-verify", "SUCCESS"),
                ("x-ssl-client-cert", &pem),
                ("x-ssl-client-verify", "NONE"),
            ]),
            headers(&[
                ("x-ssl-client-verify", "SUCCESS"),
                ("x-ssl-client-verify", "SUCCESS"),
                ("x-ssl-client-cert", &pem),
            ]),
            headers(&[
                ("x-ssl-client-cert", &pem),
                ("x-ssl-client-verify", "SUCCESS"),
                ("x-ssl-client-cert", &pem),
            ]),
            headers(&[
                ("x-ssl-client-verify", "NONE"),
                ("x-ssl-client-cert", &pem),
                ("x-ssl-client-cert", &pem),
            ]),
        ] {
            match proxies.verdict(&repeated) {
                ProxyVerdict::Refused(reason) => assert!(
                    reason.contains("x-ssl-client-") && reason.contains("2 times"),
                    "{reason}"
                ),
                other => panic!("{repeated:?}: {other:?}"),
            }
        }
        let once = headers(&[
            ("x-ssl-client-verify", "SUCCESS"),
            ("x-ssl-client-cert", &pem),
        ]);
        assert!(matches!(proxies.verdict(&once), ProxyVerdict::Verified(_)));
    }

    #[test]
    fn a_header_holding_two_certificates_is_refused() {
        let pem = |name: &str| {
            rcgen::generate_simple_self_signed(vec![name.into()])
                .unwrap()
                .cert
                .pem()
        };
        let joined = format!(
            "{}, {}",
            pem("alice@example.org"),
            pem("mallory@example.org")
        );
        let error = certificate_from_header(joined.as_bytes()).unwrap_err();
        assert!(error.contains("more than one certificate"), "{error}");
    }

    #[test]
    fn a_refused_verdict_is_cut_in_the_reason() {
        let proxies = proxies();
        let long = format!("FAILED:{}", "x".repeat(10_000));
        match proxies.verdict(&headers(&[("x-ssl-client-verify", &long)])) {
            ProxyVerdict::Refused(reason) => assert!(reason.len() < 500, "{}", reason.len()),
            other => panic!("{other:?}"),
        }
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
