//! A small X3DH client over HTTP(S): what the black-box tests, the liblime interop
//! test, the load generator and `lime-server probe` use to talk to a server. Not
//! used by the server.

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
    /// The `WWW-Authenticate` headers, in order.
    pub www_authenticate: Vec<String>,
    /// The body.
    pub body: Bytes,
}

/// An HTTP/1.1 keep-alive client (pooled connections) that trusts one server
/// certificate, or speaks plain HTTP. Cheap to clone.
#[derive(Clone)]
pub struct LimeClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Answers digest challenges when set.
    login: Option<Arc<DigestLogin>>,
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

    /// A client that trusts `roots` (see [`crate::tls::system_roots`]).
    pub fn trusting_roots(roots: RootCertStore) -> Result<LimeClient> {
        Ok(LimeClient::with_tls(
            tls_trusting(roots)?.with_no_client_auth(),
        ))
    }

    /// A client that trusts the PEM certificate(s) in `server_trust` and presents
    /// the client certificate chain in `certificate` (PEM, end-entity first) with
    /// its PEM `private_key`.
    pub fn with_client_certificate(
        server_trust: &Path,
        certificate: &Path,
        private_key: &Path,
    ) -> Result<LimeClient> {
        let roots = crate::tls::read_trust_anchors(server_trust)?;
        LimeClient::with_client_certificate_trusting(roots, certificate, private_key)
    }

    /// Like [`LimeClient::with_client_certificate`], trusting `roots`.
    pub fn with_client_certificate_trusting(
        roots: RootCertStore,
        certificate: &Path,
        private_key: &Path,
    ) -> Result<LimeClient> {
        let chain = crate::tls::read_certificates(certificate)?;
        if chain.is_empty() {
            anyhow::bail!("no certificate in {}", certificate.display());
        }
        let key = PrivateKeyDer::from_pem_file(private_key)
            .with_context(|| format!("cannot read private key {}", private_key.display()))?;
        let tls = tls_trusting(roots)?
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
        LimeClient { inner, login: None }
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

    /// Sends any request; for tests of what is not a POST. With a digest login, a
    /// 401 is answered once, and its challenge kept for the next requests unless
    /// the login is [challenged each time](LimeClient::with_digest_challenged_each_time).
    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<RawAnswer> {
        let Some(login) = &self.login else {
            return self.request_once(method, url, headers, body, None).await;
        };
        let authorization = match login.reuse_nonce {
            true => login.authorization(method, url)?,
            false => None,
        };
        let answer = self
            .request_once(method, url, headers, body.clone(), authorization)
            .await?;
        if answer.status != 401 {
            return Ok(answer);
        }
        login.take_challenge(&answer.www_authenticate)?;
        let authorization = login.authorization(method, url)?;
        self.request_once(method, url, headers, body, authorization)
            .await
    }

    async fn request_once(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        authorization: Option<String>,
    ) -> Result<RawAnswer> {
        let mut builder = http::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        if let Some(authorization) = authorization {
            builder = builder.header(http::header::AUTHORIZATION, authorization);
        }
        let request = builder.body(Full::new(Bytes::from(body)))?;
        let response = self
            .inner
            .request(request)
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let text =
            |value: &http::HeaderValue| String::from_utf8_lossy(value.as_bytes()).into_owned();
        let content_type = response.headers().get(CONTENT_TYPE).map(text);
        let www_authenticate = response
            .headers()
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .map(text)
            .collect();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(RawAnswer {
            status,
            content_type,
            www_authenticate,
            body,
        })
    }

    /// This client, answering digest challenges as `username` with `password`.
    /// `algorithm` ("MD5", "SHA-256") picks among the challenges offered; `None`
    /// takes the first, as Linphone does.
    pub fn with_digest(
        &self,
        username: &str,
        password: &str,
        algorithm: Option<&str>,
    ) -> LimeClient {
        self.with_login(username, password, algorithm, true)
    }

    /// Like [`LimeClient::with_digest`], but each request is first sent without
    /// credentials and answered after its 401, on the same connection: what
    /// Linphone (liblinphone 5.1, belle-sip) does, never reusing a nonce.
    pub fn with_digest_challenged_each_time(
        &self,
        username: &str,
        password: &str,
        algorithm: Option<&str>,
    ) -> LimeClient {
        self.with_login(username, password, algorithm, false)
    }

    fn with_login(
        &self,
        username: &str,
        password: &str,
        algorithm: Option<&str>,
        reuse_nonce: bool,
    ) -> LimeClient {
        LimeClient {
            inner: self.inner.clone(),
            login: Some(Arc::new(DigestLogin {
                username: username.to_owned(),
                password: password.to_owned(),
                algorithm: algorithm.map(str::to_owned),
                reuse_nonce,
                challenge: std::sync::Mutex::new(None),
            })),
        }
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

/// A digest user name and password, and the last challenge received (answered
/// with the `digest_auth` crate: an implementation independent of the server's).
struct DigestLogin {
    username: String,
    password: String,
    algorithm: Option<String>,
    /// Answer the next requests with the last challenge (false: send each one
    /// without credentials first, as Linphone does).
    reuse_nonce: bool,
    challenge: std::sync::Mutex<Option<digest_auth::WwwAuthenticateHeader>>,
}

impl DigestLogin {
    /// Keeps the challenge to answer from a 401's `WWW-Authenticate` values.
    fn take_challenge(&self, offered: &[String]) -> Result<()> {
        let wanted = |challenge: &&String| match &self.algorithm {
            None => true,
            Some(name) => challenge.split(',').any(|param| {
                param
                    .trim()
                    .eq_ignore_ascii_case(&format!("algorithm={name}"))
            }),
        };
        let chosen = offered.iter().find(wanted).with_context(|| {
            format!(
                "no digest challenge for {:?} in {offered:?}",
                self.algorithm
            )
        })?;
        let parsed = digest_auth::parse(chosen)
            .map_err(|error| anyhow::anyhow!("unreadable challenge {chosen:?}: {error}"))?;
        *self.challenge.lock().unwrap_or_else(|e| e.into_inner()) = Some(parsed);
        Ok(())
    }

    /// The `Authorization` value for a request, once a challenge was received.
    fn authorization(&self, method: &str, url: &str) -> Result<Option<String>> {
        let mut challenge = self.challenge.lock().unwrap_or_else(|e| e.into_inner());
        let Some(challenge) = challenge.as_mut() else {
            return Ok(None);
        };
        let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
        let path = uri.path_and_query().map_or("/", |path| path.as_str());
        let mut context =
            digest_auth::AuthContext::new(self.username.as_str(), self.password.as_str(), path);
        context.method = digest_auth::HttpMethod::from(method.to_owned());
        let answer = challenge
            .respond(&context)
            .map_err(|error| anyhow::anyhow!("cannot answer the digest challenge: {error}"))?;
        Ok(Some(answer.to_header_string()))
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
