//! A small X3DH client over HTTP(S): what the black-box tests, the liblime interop
//! test and the load generator use to talk to a server. Not used by the server.

use anyhow::{Context, Result};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lime_protocol::{RequestMessage, ResponseMessage};
use rustls::client::WantsClientCert;
use rustls::{ClientConfig, ConfigBuilder, RootCertStore};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use std::path::Path;
use std::sync::Arc;

/// An HTTP answer, as received.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    /// HTTP status code.
    pub status: u16,
    /// The Content-Type header, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Bytes,
}

/// An HTTP/1.1 keep-alive client (pooled connections) that trusts one server
/// certificate, or speaks plain HTTP. Cheap to clone.
#[derive(Clone)]
pub struct LimeClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl LimeClient {
    /// A client that trusts the PEM certificate(s) in `certificate` (and plain HTTP).
    pub fn trusting(certificate: &Path) -> Result<LimeClient> {
        let tls = tls_trusting(crate::tls::read_trust_anchors(certificate)?)?.with_no_client_auth();
        Ok(LimeClient::with_tls(tls))
    }

    /// A client for plain-HTTP servers only (HTTPS URLs fail: nothing is trusted).
    pub fn plain() -> Result<LimeClient> {
        let tls = tls_trusting(RootCertStore::empty())?.with_no_client_auth();
        Ok(LimeClient::with_tls(tls))
    }

    /// A client that trusts the PEM certificate(s) in `server_trust` and presents
    /// the client certificate chain in `certificate` (PEM, end-entity first) with
    /// its PEM `private_key`.
    pub fn with_client_certificate(
        server_trust: &Path,
        certificate: &Path,
        private_key: &Path,
    ) -> Result<LimeClient> {
        let chain = crate::tls::read_certificates(certificate)?;
        if chain.is_empty() {
            anyhow::bail!("no certificate in {}", certificate.display());
        }
        let key = PrivateKeyDer::from_pem_file(private_key)
            .with_context(|| format!("cannot read private key {}", private_key.display()))?;
        let tls = tls_trusting(crate::tls::read_trust_anchors(server_trust)?)?
            .with_client_auth_cert(chain, key)
            .with_context(|| {
                format!(
                    "certificate {} does not match key {}",
                    certificate.display(),
                    private_key.display()
                )
            })?;
        Ok(LimeClient::with_tls(tls))
    }

    fn with_tls(tls: ClientConfig) -> LimeClient {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let inner = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        LimeClient { inner }
    }

    /// POSTs `body` to `url` with `headers` (nothing added: the caller sets
    /// Content-Type and the sender header).
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<RawAnswer> {
        self.request("POST", url, headers, body).await
    }

    /// Sends any request; for tests of what is not a POST.
    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<RawAnswer> {
        let mut builder = http::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(Bytes::from(body)))?;
        let response = self
            .inner
            .request(request)
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        let body = response.into_body().collect().await?.to_bytes();
        Ok(RawAnswer {
            status,
            content_type,
            body,
        })
    }

    /// Sends one X3DH request as `sender` and parses the answer; fails unless it
    /// is an HTTP 200 with the X3DH content type.
    pub async fn send(
        &self,
        url: &str,
        sender: &str,
        message: &RequestMessage,
    ) -> Result<ResponseMessage> {
        let body = message.encode()?;
        let headers = [
            ("content-type", crate::http::X3DH_CONTENT_TYPE),
            (crate::auth::IDENTITY_HEADER, sender),
        ];
        let answer = self.post(url, &headers, body).await?;
        if answer.status != 200
            || answer.content_type.as_deref() != Some(crate::http::X3DH_CONTENT_TYPE)
        {
            anyhow::bail!(
                "{url} answered HTTP {} with Content-Type {:?}",
                answer.status,
                answer.content_type
            );
        }
        ResponseMessage::parse(&answer.body)
            .with_context(|| format!("unparsable answer from {url}"))
    }
}

/// A client TLS configuration trusting `roots`, waiting for its client-auth choice.
fn tls_trusting(roots: RootCertStore) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>> {
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots),
    )
}
