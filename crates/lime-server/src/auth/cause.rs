//! Why authentication refused a request, in closed sets: the method that decided
//! and the reason, as `lime_auth_failures_total` labels them. The log line says
//! the same in full ([`AuthFailure::reason`](super::AuthFailure)).

/// The method that refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A TLS client certificate this server verified.
    Certificate,
    /// A reverse proxy's verdict headers.
    Proxy,
    /// HTTP Digest against the account database.
    Digest,
    /// A peer lime server (federation), by its certificate or digest.
    Peer,
    /// None could be used (no certificate while one is required, or no method
    /// configured for a client without one).
    None,
}

impl AuthMethod {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            AuthMethod::Certificate => "certificate",
            AuthMethod::Proxy => "proxy",
            AuthMethod::Digest => "digest",
            AuthMethod::Peer => "peer",
            AuthMethod::None => "none",
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthCause {
    /// No credentials yet: challenged (every digest client's first request).
    Challenged,
    /// The right password with an expired nonce: challenged again (`stale=true`).
    StaleNonce,
    /// An `Authorization` header that cannot be parsed.
    BadAuthorization,
    /// Digest for another realm.
    WrongRealm,
    /// A nonce this server did not issue.
    ForgedNonce,
    /// An opaque value that is not ours.
    AlteredOpaque,
    /// A digest `uri` that is not the request's.
    WrongUri,
    /// A digest algorithm not offered.
    AlgorithmNotOffered,
    /// No such account.
    UnknownUser,
    /// An answer in a configured algorithm the account stores no password for
    /// (an MD5-only account answered in SHA-256): it tests no password, so it is
    /// challenged again with the account's algorithms and not counted.
    AlgorithmNotStored,
    /// A wrong password.
    WrongPassword,
    /// Refused untried by the throttle (429).
    LockedOut,
    /// The authenticated identity does not own the device id (403).
    NotOwner,
    /// The device id names no domain to authenticate in.
    NoDomain,
    /// A certificate or digest user name of no accepted peer server.
    NotPeer,
    /// The proxy said the client's certificate was refused.
    ProxyRefused,
    /// No client certificate while `auth.client_certificates.required` is set.
    CertificateRequired,
    /// No client certificate and no digest configured.
    NoMethod,
    /// The account database did not answer (503).
    AccountDatabaseDown,
}

impl AuthCause {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            AuthCause::Challenged => "challenged",
            AuthCause::StaleNonce => "stale_nonce",
            AuthCause::BadAuthorization => "bad_authorization",
            AuthCause::WrongRealm => "wrong_realm",
            AuthCause::ForgedNonce => "forged_nonce",
            AuthCause::AlteredOpaque => "altered_opaque",
            AuthCause::WrongUri => "wrong_uri",
            AuthCause::AlgorithmNotOffered => "algorithm_not_offered",
            AuthCause::UnknownUser => "unknown_user",
            AuthCause::AlgorithmNotStored => "algorithm_not_stored",
            AuthCause::WrongPassword => "wrong_password",
            AuthCause::LockedOut => "locked_out",
            AuthCause::NotOwner => "not_owner",
            AuthCause::NoDomain => "no_domain",
            AuthCause::NotPeer => "not_peer",
            AuthCause::ProxyRefused => "proxy_refused",
            AuthCause::CertificateRequired => "certificate_required",
            AuthCause::NoMethod => "no_method",
            AuthCause::AccountDatabaseDown => "account_database_down",
        }
    }
}
