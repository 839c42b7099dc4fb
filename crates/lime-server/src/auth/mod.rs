//! Who sends a request, and whether they may: the [`Sender`] every handler acts
//! for, bound to an authenticated identity by the [`Authenticator`].
//!
//! The device id a request acts for is the one it names in `X-Lime-user-identity`
//! (or, for clients up to 5.x, `From`). With authentication on, the authenticated
//! identity must own it: the device id must start with `sip:<user>@<domain>;gr=`
//! ([`identity::owns_device`]). The identity comes from, in this order:
//!
//! 1. a TLS client certificate this server verified ([`certificate`]);
//! 2. a client certificate a trusted reverse proxy verified ([`proxy`]);
//! 3. HTTP Digest against the operator's account database ([`digest`],
//!    [`accounts`]), with failures throttled ([`throttle`]).
//!
//! A certificate that does not own the device id is refused outright: there is no
//! fall-back to digest. No certificate (while not required): digest.

pub mod accounts;
pub mod cause;
pub mod certificate;
pub mod digest;
pub mod identity;
pub mod offers;
pub mod proxy;
pub mod throttle;

use crate::config::AuthSettings;
use crate::config::FederationSettings;
use crate::error::RequestError;
use crate::federation::inbound::{AcceptedPeer, AcceptedPeers};
use crate::telemetry::clip;
use accounts::{AccountDatabase, AccountDatabaseOptions, PasswordAlgorithm};
use anyhow::Context;
use async_trait::async_trait;
use certificate::{CertificateIdentity, IdentityRule, PeerCertificate};
use digest::{Credentials, DigestAlgorithm, NonceKey, NonceState};
use http::HeaderMap;
use http::header::AUTHORIZATION;
use http::request::Parts;
use lime_protocol::DeviceId;
use proxy::{ProxyVerdict, TrustedProxies};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use throttle::Throttle;

pub use cause::{AuthCause, AuthMethod};
pub use throttle::LockoutKind;

/// Header newer clients put their device id in.
pub const IDENTITY_HEADER: &str = "x-lime-user-identity";

/// The device a request acts for, once let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    device_id: DeviceId,
    /// How it was authenticated (`digest sip:alice@example.org`), when it was.
    authenticated_as: Option<String>,
    /// The peer server that forwarded the request for a device of its domain
    /// (federation), when it is one.
    forwarded_by: Option<Arc<str>>,
}

impl Sender {
    /// The sender's device id (its GRUU).
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// How the sender was authenticated, for log lines; `None` with auth off.
    pub fn authenticated_as(&self) -> Option<&str> {
        self.authenticated_as.as_deref()
    }

    /// The peer server (its domains) that forwarded the request on behalf of
    /// the device, when it is one.
    pub fn forwarded_by(&self) -> Option<&str> {
        self.forwarded_by.as_deref()
    }

    fn authenticated(self, how: String) -> Sender {
        Sender {
            authenticated_as: Some(how),
            ..self
        }
    }

    fn forwarded(self, peer: &AcceptedPeer, how: String) -> Sender {
        Sender {
            authenticated_as: Some(how),
            forwarded_by: Some(peer.name.clone()),
            ..self
        }
    }
}

/// The device id a request claims, from its headers (not yet authenticated).
pub fn sender_from_headers(headers: &HeaderMap) -> Result<Sender, RequestError> {
    let (header, value) = [IDENTITY_HEADER, "from"]
        .into_iter()
        .find_map(|name| headers.get(name).map(|value| (name, value)))
        .ok_or(RequestError::MissingSender)?;
    let invalid = |reason: String| RequestError::InvalidSender { header, reason };
    let text = std::str::from_utf8(value.as_bytes())
        .map_err(|_| invalid("not valid UTF-8".into()))?
        .trim();
    if text.is_empty() {
        return Err(RequestError::MissingSender);
    }
    let device_id = DeviceId::new(text).map_err(|error| invalid(error.to_string()))?;
    Ok(Sender {
        device_id,
        authenticated_as: None,
        forwarded_by: None,
    })
}

/// The address a connection comes from, put in each request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress(pub SocketAddr);

/// True for a realm this server can put in a challenge: a domain name or address.
pub fn is_valid_realm(realm: &str) -> bool {
    !realm.is_empty()
        && realm.len() <= 253
        && realm
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b".-_:[]".contains(&byte))
}

/// How a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 401 with fresh digest challenges for `realm`.
    Challenge {
        /// The realm challenged.
        realm: String,
        /// The credentials were right but the nonce too old.
        stale: bool,
        /// The algorithms offered, in order: those the account can verify.
        algorithms: Vec<DigestAlgorithm>,
    },
    /// 403: the identity does not own the device id, or its certificate is refused.
    Forbidden,
    /// 429: too many failures; try again after this.
    LockedOut(Duration),
    /// 503: the account database does not answer.
    Unavailable,
}

/// A refused request and why, for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    /// How to answer.
    pub refusal: Refusal,
    /// Why, naming the identity and the device id when known.
    pub reason: String,
    /// Part of every client's normal flow (first challenge, stale nonce): logged at
    /// debug level, not as a warning.
    pub routine: bool,
    /// The method that refused, for the metrics.
    pub method: AuthMethod,
    /// Why, in a closed set, for the metrics.
    pub cause: AuthCause,
}

impl AuthFailure {
    fn forbidden(method: AuthMethod, cause: AuthCause, reason: String) -> AuthFailure {
        AuthFailure {
            refusal: Refusal::Forbidden,
            reason,
            routine: false,
            method,
            cause,
        }
    }

    fn challenge(
        realm: &str,
        stale: bool,
        algorithms: Vec<DigestAlgorithm>,
        (method, cause): (AuthMethod, AuthCause),
        reason: String,
    ) -> AuthFailure {
        AuthFailure {
            refusal: Refusal::Challenge {
                realm: realm.to_owned(),
                stale,
                algorithms,
            },
            reason,
            routine: false,
            method,
            cause,
        }
    }

    fn routine(self) -> AuthFailure {
        AuthFailure {
            routine: true,
            ..self
        }
    }
}

/// Digest authentication: the account database and the nonce key.
struct DigestAuthenticator {
    accounts: AccountDatabase,
    key: NonceKey,
    /// The configured algorithms, and which of them each account is offered.
    offers: offers::AlgorithmOffers,
}

/// Where digest credentials are checked: the account database for users, the
/// configured HA1s for peer servers. The rest of a digest check is the same
/// for both ([`Authenticator::check_digest`]).
#[async_trait]
trait Passwords: Send + Sync {
    /// Who logs in this way, for the metrics: users (`digest`) or peers (`peer`).
    fn method(&self) -> AuthMethod;

    /// The key of the nonces and opaque values.
    fn key(&self) -> &NonceKey;

    /// The algorithms credentials may use.
    fn configured(&self) -> &[DigestAlgorithm];

    /// The algorithms to challenge the owner of `device` with in `realm`.
    async fn offered(&self, device: &str, realm: &str) -> Vec<DigestAlgorithm>;

    /// What is wrong with the credentials' response (`None`: it is right), and
    /// the algorithms to challenge again with; a lookup failure is a refusal.
    /// The cause is `unknown_user`, `wrong_password`, or `algorithm_not_stored`
    /// (no password tested: not counted by the throttle).
    async fn verify(
        &self,
        credentials: &Credentials,
        realm: &str,
        method: &str,
        device: &str,
    ) -> Result<(Option<(AuthCause, &'static str)>, Vec<DigestAlgorithm>), AuthFailure>;
}

#[async_trait]
impl Passwords for DigestAuthenticator {
    fn method(&self) -> AuthMethod {
        AuthMethod::Digest
    }

    fn key(&self) -> &NonceKey {
        &self.key
    }

    fn configured(&self) -> &[DigestAlgorithm] {
        self.offers.configured()
    }

    /// Those the account of `device` can verify (every configured one when that
    /// is not known).
    async fn offered(&self, device: &str, realm: &str) -> Vec<DigestAlgorithm> {
        match offers::user_of(device) {
            Some(user) => self.offers.for_account(&self.accounts, user, realm).await,
            None => self.offers.configured().to_vec(),
        }
    }

    async fn verify(
        &self,
        credentials: &Credentials,
        realm: &str,
        method: &str,
        device: &str,
    ) -> Result<(Option<(AuthCause, &'static str)>, Vec<DigestAlgorithm>), AuthFailure> {
        let username = &credentials.username;
        let matches = |stored: &[accounts::StoredPassword]| {
            stored
                .iter()
                .any(|password| password_matches(credentials, password, realm, method))
        };
        // The account stores passwords, none of which serves the answer's
        // algorithm (when none serves any configured one, every one is offered:
        // a wrong password, as for an unknown user).
        let not_stored = |stored: &[accounts::StoredPassword]| {
            !offers::verifiable(stored, self.offers.configured()).contains(&credentials.algorithm)
        };
        let (mut stored, cached) = self.lookup(username, realm, device, false).await?;
        // The password may have changed since it was kept. Not when the kept ones
        // cannot check this algorithm: that answer, never counted, would otherwise
        // cost a query each time.
        if cached && !not_stored(&stored) && !matches(&stored) {
            stored = self.lookup(username, realm, device, true).await?.0;
        }
        self.offers.learn(username, realm, &stored);
        let algorithms = offers::verifiable(&stored, self.offers.configured());
        let problem = if stored.is_empty() {
            Some((AuthCause::UnknownUser, "an unknown user"))
        } else if matches(&stored) {
            None
        } else if not_stored(&stored) {
            // Tells nothing about the password, and nothing the challenge that
            // follows does not (it offers the account's algorithms).
            Some((
                AuthCause::AlgorithmNotStored,
                "an answer in an algorithm the account stores no password for",
            ))
        } else {
            Some((AuthCause::WrongPassword, "a wrong password"))
        };
        Ok((problem, algorithms))
    }
}

/// Peers log in with SHA-256 only, from the HA1 each was given.
const PEER_ALGORITHMS: &[DigestAlgorithm] = &[DigestAlgorithm::Sha256];

#[async_trait]
impl Passwords for (&AcceptedPeers, &NonceKey) {
    fn method(&self) -> AuthMethod {
        AuthMethod::Peer
    }

    fn key(&self) -> &NonceKey {
        self.1
    }

    fn configured(&self) -> &[DigestAlgorithm] {
        PEER_ALGORITHMS
    }

    async fn offered(&self, _device: &str, _realm: &str) -> Vec<DigestAlgorithm> {
        PEER_ALGORITHMS.to_vec()
    }

    async fn verify(
        &self,
        credentials: &Credentials,
        _realm: &str,
        method: &str,
        _device: &str,
    ) -> Result<(Option<(AuthCause, &'static str)>, Vec<DigestAlgorithm>), AuthFailure> {
        let problem = match self
            .0
            .by_username(&credentials.username)
            .and_then(|peer| peer.ha1())
        {
            None => Some((AuthCause::UnknownUser, "the user name of no accepted peer")),
            Some(ha1) if !credentials.response_matches(ha1, method) => {
                Some((AuthCause::WrongPassword, "a wrong HA1"))
            }
            Some(_) => None,
        };
        Ok((problem, PEER_ALGORITHMS.to_vec()))
    }
}

impl DigestAuthenticator {
    /// The stored passwords of `username` in `realm` (kept ones unless `fresh`),
    /// and whether they were kept ones; a database failure is a 503.
    async fn lookup(
        &self,
        username: &str,
        realm: &str,
        device: &str,
        fresh: bool,
    ) -> Result<(Vec<accounts::StoredPassword>, bool), AuthFailure> {
        self.accounts
            .cached_passwords(username, realm, fresh)
            .await
            .map_err(|error| AuthFailure {
                refusal: Refusal::Unavailable,
                reason: format!(
                    "account database: {error} (user {}, device id {})",
                    clip(username),
                    clip(device)
                ),
                routine: false,
                method: AuthMethod::Digest,
                cause: AuthCause::AccountDatabaseDown,
            })
    }
}

/// Decides whether a request's sender may act for the device id it names.
pub struct Authenticator {
    /// `auth.realm`
    realm: Option<String>,
    digest: Option<DigestAuthenticator>,
    certificates_required: bool,
    /// `auth.client_certificates.identity`: which names of a certificate count.
    certificate_identity: IdentityRule,
    proxies: Option<TrustedProxies>,
    /// `[[federation.accept_from]]`: the peer servers device ids of other
    /// domains must come from.
    peers: Option<AcceptedPeers>,
    throttle: Throttle,
    enabled: bool,
}

impl Authenticator {
    /// Authentication off: every request acts for the device id it names.
    pub fn off() -> Authenticator {
        Authenticator {
            realm: None,
            digest: None,
            certificates_required: false,
            certificate_identity: IdentityRule::default(),
            proxies: None,
            peers: None,
            throttle: Throttle::new(AuthSettings::default().throttle.policy()),
            enabled: false,
        }
    }

    /// From validated settings: connects to the account database when digest is on
    /// and checks its query; reads the accepted peers' credentials.
    pub async fn from_settings(
        settings: &AuthSettings,
        federation: &FederationSettings,
    ) -> anyhow::Result<Authenticator> {
        let digest = match settings.digest.accounts_url_with_password()? {
            None => None,
            Some(url) => {
                let options = AccountDatabaseOptions {
                    pool_size: settings.digest.accounts_pool_size,
                    connect_timeout: Duration::from_millis(settings.digest.accounts_timeout_ms),
                    timeout: Duration::from_millis(settings.digest.accounts_timeout_ms),
                    cache_time_to_live: Duration::from_secs(settings.digest.accounts_cache_secs),
                };
                let accounts =
                    AccountDatabase::connect(&url, &settings.digest.accounts_query, &options)
                        .await
                        .context("auth.digest.accounts_url / auth.digest.accounts_query")?;
                tracing::info!(accounts = %accounts.location(), "digest authentication on");
                Some(DigestAuthenticator {
                    accounts,
                    key: NonceKey::new(
                        settings.digest.nonce_secret()?.as_bytes(),
                        Duration::from_secs(settings.digest.nonce_lifetime_secs),
                    ),
                    offers: offers::AlgorithmOffers::new(
                        settings.digest.algorithms(),
                        Duration::from_secs(settings.digest.accounts_cache_secs),
                        settings.digest.challenge_lookups_per_sec,
                    ),
                })
            }
        };
        let throttle = settings.throttle.policy();
        if (throttle.max_tracked as u64) < throttle.entries_at_cap() {
            tracing::warn!(
                max_tracked = throttle.max_tracked,
                needed = throttle.entries_at_cap(),
                "auth.throttle.max_tracked holds fewer entries than failures at \
                 auth.throttle.max_failures_per_sec fill within the window or lock-out: \
                 a flood can make the throttle forget live counts early"
            );
        }
        Ok(Authenticator {
            realm: settings.realm.clone(),
            digest,
            certificates_required: settings.client_certificates.required,
            certificate_identity: settings.client_certificates.identity,
            proxies: TrustedProxies::from_settings(&settings.proxy),
            peers: AcceptedPeers::from_settings(federation, settings)
                .context("federation.accept_from")?,
            throttle: Throttle::new(settings.throttle.policy()),
            enabled: settings.is_enabled(),
        })
    }

    /// True when requests are authenticated.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Lets `sender` in when its authenticated identity owns its device id, or,
    /// for a device id of a domain we do not serve, when an accepted peer of its
    /// domain forwards it.
    pub async fn authenticate(
        &self,
        sender: Sender,
        request: &Parts,
    ) -> Result<Sender, AuthFailure> {
        let peer = request
            .extensions
            .get::<ClientAddress>()
            .map(|address| address.0.ip());
        if let Some(peers) = self
            .peers
            .as_ref()
            .filter(|peers| !peers.serves(sender.device_id()))
        {
            let client = peer.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            return self.peer_server(peers, sender, request, client).await;
        }
        if !self.enabled {
            return Ok(sender);
        }
        if let Some(PeerCertificate(identity)) = request.extensions.get::<PeerCertificate>() {
            return certificate_owner(
                sender,
                identity,
                self.certificate_identity,
                AuthMethod::Certificate,
            );
        }
        let mut client = peer;
        if let Some(proxies) = self
            .proxies
            .as_ref()
            .filter(|p| peer.is_some_and(|ip| p.trusts(ip)))
        {
            client = proxies.client_address(&request.headers).or(peer);
            match proxies.verdict(&request.headers) {
                ProxyVerdict::Verified(identity) => {
                    return certificate_owner(
                        sender,
                        &identity,
                        self.certificate_identity,
                        AuthMethod::Proxy,
                    );
                }
                ProxyVerdict::Refused(reason) => {
                    return Err(AuthFailure::forbidden(
                        AuthMethod::Proxy,
                        AuthCause::ProxyRefused,
                        format!("{reason} (device id {})", clip(sender.device_id().as_str())),
                    ));
                }
                ProxyVerdict::NoCertificate => {}
            }
        }
        if self.certificates_required {
            return Err(AuthFailure::forbidden(
                AuthMethod::None,
                AuthCause::CertificateRequired,
                format!(
                    "no client certificate, and auth.client_certificates.required is set (device id {})",
                    sender.device_id()
                ),
            ));
        }
        let Some(digest) = &self.digest else {
            return Err(AuthFailure::forbidden(
                AuthMethod::None,
                AuthCause::NoMethod,
                format!(
                    "no client certificate, and digest authentication is not configured (device id {})",
                    sender.device_id()
                ),
            ));
        };
        let client = client.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let device = sender.device_id().as_str().to_owned();
        let shown = clip(&device);
        let realm = match &self.realm {
            Some(realm) => realm.clone(),
            None => match identity::domain_of(&device).filter(|domain| is_valid_realm(domain)) {
                Some(domain) => domain.to_owned(),
                None => {
                    return Err(AuthFailure::forbidden(
                        AuthMethod::Digest,
                        AuthCause::NoDomain,
                        format!(
                            "device id {shown} has no domain to authenticate in (expected sip:user@domain;gr=...)"
                        ),
                    ));
                }
            },
        };
        let username = self
            .check_digest(digest, &device, request, client, &realm)
            .await?;
        // The account's own spelling: rows spelt otherwise were ignored (accounts).
        let owner = identity::user_uri(&username, &realm);
        if !identity::owns_device(&owner, &device) {
            return Err(AuthFailure::forbidden(
                AuthMethod::Digest,
                AuthCause::NotOwner,
                format!("{} (digest) does not own device id {shown}", clip(&owner)),
            ));
        }
        Ok(sender.authenticated(format!("digest {owner}")))
    }

    /// A request for a device id of a domain we do not serve: an accepted peer
    /// server's, proven by its certificate or by digest, acting for a device of
    /// its own domains. Anyone else: 403 (or a digest challenge).
    async fn peer_server(
        &self,
        peers: &AcceptedPeers,
        sender: Sender,
        request: &Parts,
        client: IpAddr,
    ) -> Result<Sender, AuthFailure> {
        let device = sender.device_id().as_str().to_owned();
        let shown = clip(&device);
        let acting_for = |peer: &Arc<AcceptedPeer>, sender: Sender, how: String| {
            if peer.acts_for(sender.device_id()) {
                Ok(sender.forwarded(peer, how))
            } else {
                Err(AuthFailure::forbidden(
                    AuthMethod::Peer,
                    AuthCause::NotOwner,
                    format!(
                        "{how} may act for devices of its domains ({}) only, not for device id {shown}",
                        peer.name
                    ),
                ))
            }
        };
        if let Some(PeerCertificate(identity)) = request.extensions.get::<PeerCertificate>() {
            return match peers.by_certificate(identity, self.certificate_identity) {
                Some(peer) => {
                    let how = format!("peer {} (client certificate)", peer.name);
                    acting_for(peer, sender, how)
                }
                None => Err(AuthFailure::forbidden(
                    AuthMethod::Peer,
                    AuthCause::NotPeer,
                    format!(
                        "device id {shown} is not of a domain this server serves, and the client \
                     certificate ({}) is no accepted peer's",
                        clip(&identity.describe())
                    ),
                )),
            };
        }
        let Some(key) = peers.nonce_key() else {
            return Err(AuthFailure::forbidden(
                AuthMethod::Peer,
                AuthCause::NoMethod,
                format!(
                    "device id {shown} is not of a domain this server serves, and no client \
                 certificate of an accepted peer came with it"
                ),
            ));
        };
        let username = self
            .check_digest(&(peers, key), &device, request, client, peers.realm())
            .await?;
        match peers.by_username(&username) {
            Some(peer) => {
                let how = format!("peer {} (digest)", peer.name);
                acting_for(peer, sender, how)
            }
            None => Err(AuthFailure::forbidden(
                AuthMethod::Peer,
                AuthCause::NotPeer,
                format!("digest user {} is no accepted peer's", clip(&username)),
            )),
        }
    }

    /// Digest, for users and peers alike: challenges a request without
    /// credentials with what `passwords` offers; checks the credentials of the
    /// others, each failure counted by the throttle (against the source only when
    /// it is worthless before any password is tested; not at all when the account
    /// stores no password for its algorithm). The user name whose password matched.
    async fn check_digest(
        &self,
        passwords: &dyn Passwords,
        device: &str,
        request: &Parts,
        client: IpAddr,
        realm: &str,
    ) -> Result<String, AuthFailure> {
        let shown = clip(device);
        let method = passwords.method();
        let challenge = |algorithms, cause, reason| {
            AuthFailure::challenge(realm, false, algorithms, (method, cause), reason)
        };
        let Some(header) = request.headers.get(AUTHORIZATION) else {
            let algorithms = passwords.offered(device, realm).await;
            return Err(challenge(
                algorithms,
                AuthCause::Challenged,
                format!("no credentials yet for device id {shown}: challenged"),
            )
            .routine());
        };
        let credentials = match std::str::from_utf8(header.as_bytes())
            .map_err(|_| "not UTF-8".to_owned())
            .and_then(|text| Credentials::parse(text).map_err(|error| error.to_string()))
        {
            Ok(credentials) => credentials,
            Err(reason) => {
                let algorithms = passwords.offered(device, realm).await;
                return Err(challenge(
                    algorithms,
                    AuthCause::BadAuthorization,
                    format!(
                        "unusable Authorization header ({}) for device id {shown}",
                        clip(&reason)
                    ),
                ));
            }
        };
        let username = credentials.username.clone();
        let user = clip(&username);
        if let Err(locked) = self
            .throttle
            .check(&username, realm, client, Instant::now())
        {
            return Err(AuthFailure {
                refusal: Refusal::LockedOut(locked.retry_after),
                reason: format!(
                    "{} is held back after repeated failures (user {user}, device id {shown}, from {client})",
                    locked.what
                ),
                routine: false,
                method,
                cause: AuthCause::LockedOut,
            });
        }
        let now = unix_now();
        let key = passwords.key();
        let nonce = key.check(&credentials.nonce, realm, now);
        // What makes the attempt worthless before any password is tested: it
        // counts against the source only.
        let untested = if credentials.realm != realm {
            Some((
                AuthCause::WrongRealm,
                format!("realm {:?}, expected {realm:?}", clip(&credentials.realm)),
            ))
        } else if nonce == NonceState::Forged {
            Some((
                AuthCause::ForgedNonce,
                "a nonce this server did not issue (altered, or for another realm)".to_owned(),
            ))
        } else if credentials
            .opaque
            .as_ref()
            .is_some_and(|opaque| *opaque != key.opaque(realm))
        {
            Some((AuthCause::AlteredOpaque, "an altered opaque".to_owned()))
        } else if !uri_matches(&credentials.uri, &request.uri) {
            Some((
                AuthCause::WrongUri,
                format!(
                    "uri {:?} that is not the request's {}",
                    clip(&credentials.uri),
                    clip(&request.uri.to_string())
                ),
            ))
        } else if !passwords.configured().contains(&credentials.algorithm) {
            Some((
                AuthCause::AlgorithmNotOffered,
                format!("algorithm {} that is not offered", credentials.algorithm),
            ))
        } else {
            None
        };
        let failed = |problem: &str| {
            format!(
                "digest authentication failed: user {user} from {client} sent {problem} (device id {shown})"
            )
        };
        if let Some((cause, problem)) = untested {
            let delay = self
                .throttle
                .failure_without_password(client, Instant::now());
            tokio::time::sleep(delay).await;
            let algorithms = passwords.offered(device, realm).await;
            return Err(challenge(algorithms, cause, failed(&problem)));
        }
        let (problem, algorithms) = passwords
            .verify(&credentials, realm, request.method.as_str(), device)
            .await?;
        if let Some((AuthCause::AlgorithmNotStored, problem)) = problem {
            // No password tested: counting it would let whoever spends the
            // challenge lookups (every algorithm offered past them) lock out
            // the accounts that store one hash kind. Their clients answer the
            // next challenge, offering what the account stores.
            return Err(challenge(
                algorithms,
                AuthCause::AlgorithmNotStored,
                format!(
                    "user {user} sent {problem} ({}, device id {shown}): challenged again with its algorithms",
                    credentials.algorithm
                ),
            )
            .routine());
        }
        if let Some((cause, problem)) = problem {
            let delay = self
                .throttle
                .failure(&username, realm, client, Instant::now());
            tokio::time::sleep(delay).await;
            return Err(challenge(algorithms, cause, failed(problem)));
        }
        self.throttle
            .success(&username, realm, client, Instant::now());
        if nonce == NonceState::Stale {
            return Err(AuthFailure::challenge(
                realm,
                true,
                algorithms,
                (method, AuthCause::StaleNonce),
                format!("stale nonce from user {user}: challenged again with stale=true"),
            )
            .routine());
        }
        Ok(username)
    }

    /// The `WWW-Authenticate` values of a challenge offering `algorithms`.
    pub fn challenges(
        &self,
        realm: &str,
        stale: bool,
        algorithms: &[DigestAlgorithm],
    ) -> Vec<String> {
        let key = match &self.digest {
            Some(digest) => Some(&digest.key),
            None => self.peers.as_ref().and_then(AcceptedPeers::nonce_key),
        };
        match key {
            Some(key) => digest::challenges(key, realm, algorithms, stale, unix_now()),
            None => Vec::new(),
        }
    }
}

/// Lets `sender` in when the certificate's identity, under `rule`, owns its
/// device id.
fn certificate_owner(
    sender: Sender,
    identity: &CertificateIdentity,
    rule: IdentityRule,
    method: AuthMethod,
) -> Result<Sender, AuthFailure> {
    let what = match method {
        AuthMethod::Proxy => "proxy-verified certificate",
        _ => "client certificate",
    };
    let device = sender.device_id().as_str();
    match identity.owner_of(device, rule) {
        Some(name) => {
            let how = format!("{what} {name}");
            Ok(sender.authenticated(how))
        }
        None => {
            // Say so when only the looser rule would have let it in.
            let common_name_ignored = identity.owner_of(device, IdentityRule::SanOrCn).is_some();
            Err(AuthFailure::forbidden(
                method,
                AuthCause::NotOwner,
                format!(
                    "{what} ({}) does not own device id {}{}",
                    clip(&identity.describe()),
                    clip(device),
                    if common_name_ignored {
                        "; its common name would, but auth.client_certificates.identity = \
                     \"san_else_cn\" ignores a common name beside a subjectAltName"
                    } else {
                        ""
                    }
                ),
            ))
        }
    }
}

/// Whether one stored password gives the client's response.
fn password_matches(
    credentials: &Credentials,
    stored: &accounts::StoredPassword,
    realm: &str,
    method: &str,
) -> bool {
    let algorithm = credentials.algorithm;
    let ha1 = match (stored.algorithm, algorithm) {
        (PasswordAlgorithm::ClearText, _) => {
            algorithm.ha1(&credentials.username, realm, &stored.secret)
        }
        (PasswordAlgorithm::Md5, DigestAlgorithm::Md5)
        | (PasswordAlgorithm::Sha256, DigestAlgorithm::Sha256) => {
            stored.secret.trim().to_ascii_lowercase()
        }
        _ => return false,
    };
    credentials.response_matches(&ha1, method)
}

/// Whether the digest `uri` names the request's target (origin or absolute form).
/// The origin form, which every client sends, is compared as it is, without
/// parsing or copying it.
fn uri_matches(digest_uri: &str, target: &http::Uri) -> bool {
    let target = target.path_and_query().map(|pq| pq.as_str());
    if digest_uri.starts_with('/') {
        return target == Some(digest_uri);
    }
    digest_uri
        .parse::<http::Uri>()
        .is_ok_and(|uri| uri.path_and_query().map(|pq| pq.as_str()) == target)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lime_protocol::ErrorCode;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, http::HeaderValue::from_bytes(value).unwrap());
        }
        map
    }

    #[test]
    fn the_digest_uri_names_the_request_target_in_origin_or_absolute_form() {
        let target: http::Uri = "/lime?x=1".parse().unwrap();
        assert!(uri_matches("/lime?x=1", &target));
        assert!(uri_matches("https://lime.example.org/lime?x=1", &target));
        assert!(!uri_matches("/lime", &target));
        assert!(!uri_matches("/lime?x=2", &target));
        assert!(!uri_matches("https://lime.example.org/other?x=1", &target));
        assert!(!uri_matches("not a uri", &target));
        assert!(!uri_matches("", &target));
    }

    #[test]
    fn identity_header_wins_over_from() {
        let sender = sender_from_headers(&headers(&[
            ("from", b"sip:old@example.org"),
            ("x-lime-user-identity", b"sip:new@example.org;gr=1"),
        ]))
        .unwrap();
        assert_eq!(sender.device_id().as_str(), "sip:new@example.org;gr=1");
    }

    #[test]
    fn from_is_used_when_alone() {
        let sender = sender_from_headers(&headers(&[("from", b"sip:a@example.org;gr=2")])).unwrap();
        assert_eq!(sender.device_id().as_str(), "sip:a@example.org;gr=2");
    }

    #[test]
    fn no_header_is_missing_sender() {
        let error = sender_from_headers(&HeaderMap::new()).unwrap_err();
        assert_eq!(error.code(), ErrorCode::MissingSenderId);
        let error = sender_from_headers(&headers(&[("from", b"  ")])).unwrap_err();
        assert_eq!(error.code(), ErrorCode::MissingSenderId);
    }

    #[test]
    fn non_utf8_sender_is_a_bad_request() {
        let error =
            sender_from_headers(&headers(&[("from", b"sip:\xff@example.org")])).unwrap_err();
        assert_eq!(error.code(), ErrorCode::BadRequest);
    }
}
