//! One peer lime server our clients' bundle requests are forwarded to: its
//! connections (kept alive, HTTP/2 when it offers it), how we log in (digest
//! from an HA1, reusing its nonce while it is valid; and/or a client
//! certificate), and the check of what it answers.

use crate::auth::IDENTITY_HEADER;
use crate::auth::digest::{self, Challenge, DigestAlgorithm};
use crate::config::ForwardPeerSettings;
use crate::http::X3DH_CONTENT_TYPE;
use crate::telemetry::clip;
use anyhow::{Context, Result};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lime_protocol::response::largest_peer_bundle_len;
use lime_protocol::{
    Curve, DeviceId, PeerBundle, Request, RequestMessage, Response, ResponseMessage,
};
use rand::RngCore;
use rustls::ClientConfig;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a peer's devices got no bundle in one request.
#[derive(Debug, thiserror::Error)]
pub enum PeerFailure {
    /// No answer within `federation.timeout_ms`.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// The connection or the exchange failed.
    #[error("cannot reach it: {0}")]
    Unreachable(String),
    /// It refused our credentials.
    #[error("it refused us: HTTP {status}{challenge}")]
    Refused {
        /// Its answer's status.
        status: u16,
        /// What its challenge said, if any.
        challenge: String,
    },
    /// It answered something other than the bundles asked.
    #[error("its answer is not the bundles asked: {0}")]
    BadAnswer(String),
    /// It answered an X3DH error.
    #[error("it answered X3DH error {code}: {message}")]
    X3dhError {
        /// The error code's name.
        code: String,
        /// Its text, clipped.
        message: String,
    },
}

impl PeerFailure {
    /// The `outcome` label of the failure in `lime_federation_forwards_total`.
    pub fn label(&self) -> &'static str {
        match self {
            PeerFailure::TimedOut(_) => "timed_out",
            PeerFailure::Unreachable(_) => "unreachable",
            PeerFailure::Refused { .. } => "refused",
            PeerFailure::BadAnswer(_) => "bad_answer",
            PeerFailure::X3dhError { .. } => "x3dh_error",
        }
    }
}

/// A peer lime server.
pub struct ForwardPeer {
    /// Its domains joined, for log lines.
    name: String,
    /// `url`
    url: String,
    /// The path of `url`: the digest `uri`.
    path: String,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    login: Option<DigestLogin>,
}

/// Our digest login at a peer, and the challenge last received from it.
struct DigestLogin {
    username: String,
    /// Hex SHA-256 of `username:realm:password`.
    ha1: String,
    /// The challenge answered, and how many requests used its nonce.
    held: Mutex<Option<(Challenge, u32)>>,
}

impl ForwardPeer {
    /// A peer from validated settings; `our_domain` is the default digest user.
    pub fn from_settings(settings: &ForwardPeerSettings, our_domain: &str) -> Result<ForwardPeer> {
        let name = settings.domains.join(", ");
        let roots = match &settings.ca_file {
            Some(file) => crate::tls::read_trust_anchors(file)
                .with_context(|| format!("federation.forward_to ({name}): ca_file"))?,
            None => crate::tls::system_roots().with_context(|| {
                format!("federation.forward_to ({name}): no ca_file, and the system's")
            })?,
        };
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots);
        let tls = match (&settings.client_certificate, &settings.client_private_key) {
            (Some(certificate), Some(key)) => {
                let chain = crate::tls::read_certificates(certificate)?;
                if chain.is_empty() {
                    anyhow::bail!(
                        "federation.forward_to ({name}): no certificate in {}",
                        certificate.display()
                    );
                }
                let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
                    format!(
                        "federation.forward_to ({name}): cannot read client_private_key {}",
                        key.display()
                    )
                })?;
                builder.with_client_auth_cert(chain, key).with_context(|| {
                    format!(
                        "federation.forward_to ({name}): client_certificate {} does not match \
                         client_private_key",
                        certificate.display()
                    )
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        // Small requests and answers: without TCP_NODELAY each would wait for
        // the peer's delayed ACK (40 ms on Linux).
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        let uri: http::Uri = settings.url.parse()?;
        let login = settings.digest_ha1()?.map(|ha1| DigestLogin {
            username: settings
                .username
                .clone()
                .unwrap_or_else(|| our_domain.to_owned()),
            ha1,
            held: Mutex::new(None),
        });
        Ok(ForwardPeer {
            name,
            url: settings.url.clone(),
            path: uri
                .path_and_query()
                .map_or("/", |path| path.as_str())
                .to_owned(),
            client,
            login,
        })
    }

    /// Its domains, for log lines.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bundles of `devices` (all of this peer's domains) for `source`, from
    /// the peer, checked: exactly the devices asked, in order, keys of `curve`.
    pub async fn fetch(
        &self,
        curve: Curve,
        source: &DeviceId,
        devices: Vec<DeviceId>,
        timeout: Duration,
    ) -> Result<Vec<PeerBundle>, PeerFailure> {
        let largest = largest_peer_bundle_len(curve, &devices);
        let body = RequestMessage {
            curve,
            request: Request::GetPeerBundle(devices.clone()),
        }
        .encode()
        .map_err(|error| PeerFailure::BadAnswer(format!("cannot encode the request: {error}")))?;
        let fetched =
            match tokio::time::timeout(timeout, self.exchange(source, body, largest)).await {
                Err(_) => Err(PeerFailure::TimedOut(timeout)),
                Ok(answer) => answer.and_then(|answer| check_answer(curve, &devices, &answer)),
            };
        let outcome = match &fetched {
            Ok(_) => "ok",
            Err(failure) => failure.label(),
        };
        crate::metrics::forwarded(&self.name, outcome);
        fetched
    }

    /// POSTs `body` as `source`, logging in as needed; the answer's body, read
    /// up to `largest` bytes.
    async fn exchange(
        &self,
        source: &DeviceId,
        body: Vec<u8>,
        largest: u64,
    ) -> Result<Bytes, PeerFailure> {
        let body = Bytes::from(body);
        let mut answered_fresh_challenge = false;
        loop {
            let authorization = self.login.as_ref().and_then(|login| login.next(&self.path));
            let had_credentials = authorization.is_some();
            let response = self
                .client
                .request(self.request(source, body.clone(), authorization)?)
                .await
                .map_err(|error| PeerFailure::Unreachable(error_chain(&error)))?;
            let status = response.status();
            if status == http::StatusCode::UNAUTHORIZED {
                let challenge = self.login.as_ref().and_then(|login| {
                    login.take_challenge(response.headers().get_all(WWW_AUTHENTICATE))
                });
                // One more try with a new nonce: after a first 401, or a stale one.
                let retry = match &challenge {
                    Some(challenge) => {
                        !answered_fresh_challenge && (!had_credentials || challenge.stale)
                    }
                    None => false,
                };
                if retry {
                    answered_fresh_challenge = true;
                    continue;
                }
                return Err(PeerFailure::Refused {
                    status: status.as_u16(),
                    challenge: match (&self.login, challenge) {
                        (None, _) => " (no digest HA1 is configured for it)".to_owned(),
                        (Some(_), None) => {
                            " (no SHA-256 digest challenge we can answer)".to_owned()
                        }
                        (Some(_), Some(_)) => " (our digest credentials are wrong)".to_owned(),
                    },
                });
            }
            if status != http::StatusCode::OK {
                return Err(PeerFailure::Refused {
                    status: status.as_u16(),
                    challenge: String::new(),
                });
            }
            let content_type = response.headers().get(CONTENT_TYPE).cloned();
            if content_type.as_ref().map(|value| value.as_bytes())
                != Some(X3DH_CONTENT_TYPE.as_bytes())
            {
                return Err(PeerFailure::BadAnswer(format!(
                    "Content-Type {:?}",
                    content_type
                        .map(|value| clip(&String::from_utf8_lossy(value.as_bytes())).to_string())
                )));
            }
            let limit = usize::try_from(largest).unwrap_or(usize::MAX);
            return Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map(|collected| collected.to_bytes())
                .map_err(|error| {
                    PeerFailure::BadAnswer(format!(
                        "body unreadable or over {largest} bytes, the largest answer the request \
                         can get: {error}"
                    ))
                });
        }
    }

    fn request(
        &self,
        source: &DeviceId,
        body: Bytes,
        authorization: Option<String>,
    ) -> Result<http::Request<Full<Bytes>>, PeerFailure> {
        let mut builder = http::Request::builder()
            .method(http::Method::POST)
            .uri(&self.url)
            .header(CONTENT_TYPE, X3DH_CONTENT_TYPE)
            // The device we act for: the newer header, and From for older servers.
            .header(IDENTITY_HEADER, source.as_str())
            .header(http::header::FROM, source.as_str());
        if let Some(authorization) = authorization {
            builder = builder.header(http::header::AUTHORIZATION, authorization);
        }
        builder
            .body(Full::new(body))
            .map_err(|error| PeerFailure::Unreachable(format!("cannot build the request: {error}")))
    }
}

impl DigestLogin {
    /// The `Authorization` for the next request on the held nonce, if any.
    fn next(&self, path: &str) -> Option<String> {
        let mut held = self.held.lock().unwrap_or_else(|error| error.into_inner());
        let (challenge, count) = held.as_mut()?;
        *count += 1;
        let mut cnonce = [0u8; 16];
        rand::rng().fill_bytes(&mut cnonce);
        Some(digest::authorization(
            challenge,
            &self.username,
            &self.ha1,
            "POST",
            path,
            *count,
            &hex::encode(cnonce),
        ))
    }

    /// Keeps the SHA-256 challenge of a 401, if it offers one.
    fn take_challenge(
        &self,
        offered: http::header::GetAll<'_, http::HeaderValue>,
    ) -> Option<Challenge> {
        let challenge = offered
            .iter()
            .filter_map(|value| value.to_str().ok())
            .filter_map(|text| Challenge::parse(text).ok())
            .find(|challenge| challenge.algorithm == DigestAlgorithm::Sha256)?;
        *self.held.lock().unwrap_or_else(|error| error.into_inner()) = Some((challenge.clone(), 0));
        Some(challenge)
    }
}

/// The peer's answer, if it is exactly the bundles of `devices`, in order, of
/// `curve`.
fn check_answer(
    curve: Curve,
    devices: &[DeviceId],
    body: &[u8],
) -> Result<Vec<PeerBundle>, PeerFailure> {
    let message = ResponseMessage::parse(body)
        .map_err(|error| PeerFailure::BadAnswer(format!("unparsable: {error}")))?;
    if message.curve_byte != curve.id() {
        return Err(PeerFailure::BadAnswer(format!(
            "curve byte {} for a request of {curve}",
            message.curve_byte
        )));
    }
    let bundles = match message.response {
        Response::PeerBundles(bundles) => bundles,
        Response::Error(error) => {
            return Err(PeerFailure::X3dhError {
                code: error.code.to_string(),
                message: clip(&error.text).to_string(),
            });
        }
        Response::Done(_) | Response::SelfOneTimePreKeys(_) => {
            return Err(PeerFailure::BadAnswer("not a peerBundle message".into()));
        }
    };
    if bundles.len() != devices.len() {
        return Err(PeerFailure::BadAnswer(format!(
            "{} bundles for {} devices asked",
            bundles.len(),
            devices.len()
        )));
    }
    if let Some((asked, got)) = devices
        .iter()
        .zip(&bundles)
        .find(|(asked, got)| **asked != got.device_id)
    {
        return Err(PeerFailure::BadAnswer(format!(
            "device {} where {} was asked",
            clip(got.device_id.as_str()),
            clip(asked.as_str())
        )));
    }
    Ok(bundles)
}

/// An error and its causes, on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use lime_protocol::{ErrorCode, IdentityKey, KeyBundle, SignedPreKey};

    fn id(text: &str) -> DeviceId {
        DeviceId::new(text).unwrap()
    }

    fn bundle(curve: Curve) -> KeyBundle {
        KeyBundle {
            identity_key: IdentityKey::new(curve, vec![1; curve.identity_key_len()]).unwrap(),
            signed_pre_key: SignedPreKey::new(
                curve,
                vec![2; curve.pre_key_len()],
                vec![3; curve.signature_len()],
                7,
            )
            .unwrap(),
            one_time_pre_key: None,
        }
    }

    fn answer(curve_byte: u8, response: Response) -> Vec<u8> {
        ResponseMessage {
            curve_byte,
            response,
        }
        .encode()
        .unwrap()
    }

    fn bundles(curve: Curve, ids: &[&str]) -> Response {
        Response::PeerBundles(
            ids.iter()
                .map(|text| PeerBundle {
                    device_id: id(text),
                    bundle: Some(bundle(curve)),
                })
                .collect(),
        )
    }

    #[test]
    fn only_exactly_the_asked_bundles_are_taken() {
        let curve = Curve::C25519;
        let asked = [id("sip:b@b.test;gr=1"), id("sip:b@b.test;gr=2")];
        let good = answer(
            curve.id(),
            bundles(curve, &["sip:b@b.test;gr=1", "sip:b@b.test;gr=2"]),
        );
        assert_eq!(check_answer(curve, &asked, &good).unwrap().len(), 2);
        for (what, body) in [
            (
                "reordered",
                answer(
                    curve.id(),
                    bundles(curve, &["sip:b@b.test;gr=2", "sip:b@b.test;gr=1"]),
                ),
            ),
            (
                "missing",
                answer(curve.id(), bundles(curve, &["sip:b@b.test;gr=1"])),
            ),
            (
                "extra",
                answer(
                    curve.id(),
                    bundles(
                        curve,
                        &[
                            "sip:b@b.test;gr=1",
                            "sip:b@b.test;gr=2",
                            "sip:b@b.test;gr=3",
                        ],
                    ),
                ),
            ),
            ("truncated", good[..good.len() - 1].to_vec()),
            (
                "other curve",
                answer(
                    Curve::C448.id(),
                    bundles(Curve::C448, &["sip:b@b.test;gr=1", "sip:b@b.test;gr=2"]),
                ),
            ),
            (
                "an error",
                answer(
                    curve.id(),
                    Response::Error(lime_protocol::ErrorAnswer {
                        code: ErrorCode::DbError,
                        text: "down".into(),
                    }),
                ),
            ),
        ] {
            assert!(check_answer(curve, &asked, &body).is_err(), "{what}");
        }
    }

    #[test]
    fn a_challenge_is_answered_from_the_ha1_as_the_server_checks_it() {
        let login = DigestLogin {
            username: "a.test".into(),
            ha1: DigestAlgorithm::Sha256.ha1("a.test", "b.test", "secret"),
            held: Mutex::new(None),
        };
        assert_eq!(login.next("/lime"), None, "no challenge held yet");
        let mut headers = http::HeaderMap::new();
        headers.append(
            WWW_AUTHENTICATE,
            "Digest realm=\"b.test\", nonce=\"n1\", qop=\"auth\", algorithm=MD5"
                .parse()
                .unwrap(),
        );
        headers.append(
            WWW_AUTHENTICATE,
            "Digest realm=\"b.test\", nonce=\"n1\", opaque=\"o\", qop=\"auth\", algorithm=SHA-256"
                .parse()
                .unwrap(),
        );
        let challenge = login
            .take_challenge(headers.get_all(WWW_AUTHENTICATE))
            .unwrap();
        assert_eq!(challenge.algorithm, DigestAlgorithm::Sha256);
        for count in 1..=2 {
            let header = login.next("/lime").unwrap();
            let credentials = digest::Credentials::parse(&header).unwrap();
            assert_eq!(credentials.nonce_count, format!("{count:08x}"));
            assert_eq!(credentials.opaque.as_deref(), Some("o"));
            assert!(credentials.response_matches(&login.ha1, "POST"));
            assert!(!credentials.response_matches(&login.ha1, "GET"));
        }
    }
}
