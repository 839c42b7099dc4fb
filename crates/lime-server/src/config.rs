//! Typed settings, loaded once from one TOML file and checked before anything starts.
//!
//! Every key has a default, so no file at all gives a working loopback server.
//! Unknown keys and bad values stop the start with the key's name and why.
//! `lime-server.example.toml` at the repository root documents every key.

use crate::auth::digest::DigestAlgorithm;
use crate::auth::throttle::ThrottlePolicy;
use crate::connection::ConnectionLimits;
use crate::store::sqlite::Synchronous;
use crate::store::{BundleRequestLimit, OverLimit, StoreLimits, StoreLocation};
use lime_protocol::Curve;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/lime-server/lime-server.toml";

/// Everything the server is configured with.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Listeners and HTTP behaviour.
    pub server: ServerSettings,
    /// Certificate of the TLS listeners.
    pub tls: TlsSettings,
    /// Where and how keys are stored.
    pub storage: StorageSettings,
    /// Abuse limits.
    pub limits: LimitSettings,
    /// Who may act for which device.
    pub auth: AuthSettings,
    /// Key bundles of other domains' devices, fetched from their lime servers, and
    /// the peer servers that may ask for ours.
    pub federation: FederationSettings,
    /// Log output.
    pub log: LogSettings,
    /// The Prometheus scrape listener and the stock gauges.
    pub metrics: MetricsSettings,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Addresses served over HTTPS.
    pub listen: Vec<SocketAddr>,
    /// Addresses served over plain HTTP (behind a TLS-terminating reverse proxy).
    pub plain_http_listen: Vec<SocketAddr>,
    /// URL paths that accept X3DH requests.
    pub paths: Vec<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The bytes of request bodies held at once, all requests together; a body
    /// that does not fit is refused (503, Retry-After). At least `max_body_bytes`.
    pub max_buffered_body_bytes: usize,
    /// Largest request head (HTTP/1: request line and headers; HTTP/2: the header
    /// list as RFC 9113 counts it), in bytes; over it: 431. 8192 to 1 MiB.
    pub max_header_bytes: usize,
    /// Most connections served at once; more are accepted and closed at once
    /// (plain HTTP: after a 503). At most 1,000,000.
    pub max_connections: u32,
    /// Longest TLS handshake, in milliseconds, from accept.
    pub tls_handshake_timeout_ms: u64,
    /// Longest wait for a request's headers, in milliseconds: from the connection's
    /// start (after TLS), or from the first byte after an idle spell, until the
    /// headers are whole. Past it the connection is closed without an answer.
    pub header_read_timeout_ms: u64,
    /// Longest wait for a request's body, in milliseconds, from the end of its
    /// headers; past it the client gets a 408 and the connection is closed.
    pub body_read_timeout_ms: u64,
    /// How long a keep-alive connection may stay with no request in progress, in
    /// milliseconds, before it is closed; also bounds how long a client may take
    /// to read its answer.
    pub idle_timeout_ms: u64,
    /// Allow listeners on non-loopback addresses with authentication off.
    pub insecure_no_auth: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 25519))],
            plain_http_listen: Vec::new(),
            paths: vec!["/".into(), "/lime-server/lime-server.php".into()],
            max_body_bytes: 1024 * 1024,
            max_buffered_body_bytes: 32 * 1024 * 1024,
            max_header_bytes: 16 * 1024,
            max_connections: 10_000,
            tls_handshake_timeout_ms: 10_000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            insecure_no_auth: false,
        }
    }
}

impl ServerSettings {
    /// The time limits of every connection.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            tls_handshake_timeout: Duration::from_millis(self.tls_handshake_timeout_ms),
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_header_bytes: self.max_header_bytes,
        }
    }
}

/// The least `server.max_header_bytes`: hyper's smallest HTTP/1 read buffer.
const MIN_MAX_HEADER_BYTES: usize = 8 * 1024;

/// The most `server.max_header_bytes`: 1 MiB.
const MAX_MAX_HEADER_BYTES: usize = 1024 * 1024;

/// The most `server.max_body_bytes`: 64 MiB (a reservation of the body budget is
/// counted in `u32`; no X3DH request comes near).
const MAX_MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// `[tls]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// PEM certificate chain; absent: a self-signed certificate in the data directory.
    pub certificate: Option<PathBuf>,
    /// PEM private key of `certificate`.
    pub private_key: Option<PathBuf>,
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// Directory of the SQLite databases and the self-signed certificate.
    pub data_dir: PathBuf,
    /// Base algorithms served, by name.
    pub curves: Vec<String>,
    /// Longest wait for the database before answering `db_error`, in milliseconds.
    pub timeout_ms: u64,
    /// SQLite `PRAGMA synchronous`: "full" or "normal".
    pub sqlite_synchronous: Synchronous,
    /// Most requests committed together in one SQLite transaction.
    pub sqlite_max_batch: usize,
    /// Database of every enabled curve: a URL in which `{curve}` is replaced by the
    /// curve's name. Absent: `sqlite://<data_dir>/lime-{curve}.sqlite3`.
    pub url: Option<String>,
    /// Database of one curve, by curve name, overriding `url`.
    pub urls: BTreeMap<String, String>,
    /// Most connections per database server (MariaDB, PostgreSQL).
    pub pool_size: u32,
    /// Longest wait to open a connection to a database server, in milliseconds.
    pub connect_timeout_ms: u64,
    /// File holding the database password, for server URLs given without one.
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the database password, for server URLs given
    /// without one (read when `password_file` is not set).
    pub password_env: Option<String>,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            data_dir: PathBuf::from("lime-data"),
            curves: Curve::ALL
                .iter()
                .map(|curve| curve.name().to_owned())
                .collect(),
            timeout_ms: 5_000,
            sqlite_synchronous: Synchronous::Full,
            sqlite_max_batch: 64,
            url: None,
            urls: BTreeMap::new(),
            pool_size: 16,
            connect_timeout_ms: 5_000,
            password_file: None,
            password_env: None,
        }
    }
}

impl StorageSettings {
    /// The SQLite file of one base algorithm when no URL names its database.
    pub fn sqlite_path(&self, curve: Curve) -> PathBuf {
        self.data_dir.join(format!("lime-{}.sqlite3", curve.name()))
    }

    /// Where the database of `curve` is, without its password.
    pub fn location(&self, curve: Curve) -> Result<StoreLocation, ConfigError> {
        let (key, url) = match (self.urls.get(curve.name()), &self.url) {
            (Some(url), _) => ("storage.urls", url),
            (None, Some(url)) => ("storage.url", url),
            (None, None) => return Ok(StoreLocation::Sqlite(self.sqlite_path(curve))),
        };
        StoreLocation::parse(url, curve).map_err(|error| invalid(key, error.to_string()))
    }

    /// The database password from `password_file` or `password_env`, if either is set.
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        read_secret(
            ("storage.password_file", &self.password_file),
            ("storage.password_env", &self.password_env),
        )
    }

    /// Where the database of `curve` is, with the configured password filled in.
    pub fn location_with_password(&self, curve: Curve) -> Result<StoreLocation, ConfigError> {
        Ok(self
            .location(curve)?
            .with_password(self.password()?.as_deref()))
    }

    /// The enabled curves (valid once [`Settings::validate`] passed).
    pub fn enabled_curves(&self) -> Vec<Curve> {
        self.curves
            .iter()
            .filter_map(|name| name.parse().ok())
            .collect()
    }
}

/// `limits.max_bundle_answer_bytes` by default: 20 MiB. A C448MLK1024 bundle with
/// its one-time pre-key is 3,430 bytes plus its device id, so this serves 5,000
/// devices with ids of up to 764 bytes on the largest curve (liblime's ids are
/// about 80), and 5,000 devices on any curve.
pub const DEFAULT_MAX_BUNDLE_ANSWER_BYTES: u64 = 20 * 1024 * 1024;

/// The least `limits.max_bundle_answer_bytes` accepted: room for one bundle of
/// any curve, with a device id of a few hundred bytes.
const MIN_MAX_BUNDLE_ANSWER_BYTES: u64 = 8 * 1024;

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Most one-time pre-keys one device may hold; 0: no limit but the protocol's
    /// 65535 (the most one selfOPks answer can list).
    pub max_opks_per_device: u32,
    /// Most devices one user (`sip:user@domain` before `;gr=`) may register; 0: no limit.
    pub max_devices_per_user: u32,
    /// Largest answer one getPeerBundle may need, in bytes, reckoned before any
    /// claim as if every device asked for had a bundle with a one-time pre-key:
    /// bounds what one request costs without refusing a real group.
    pub max_bundle_answer_bytes: u64,
    /// Replaced by `max_bundle_answer_bytes`: set, it stops the start with a
    /// message naming the new key.
    pub max_devices_per_bundle_request: Option<serde::de::IgnoredAny>,
    /// Most key bundles of one target device one source device may receive within
    /// `bundle_request_window_secs`; 0: no limit (and nothing recorded).
    pub max_bundle_requests: u32,
    /// Most key bundles of one target device all the devices of one identity
    /// (`sip:user@domain`, whatever device ids it uses) may receive within the window.
    pub max_bundle_requests_per_identity: u32,
    /// Most bundle requests recorded for one identity within a window, across all
    /// targets: past it, its devices get bundles the over-limit way, unrecorded.
    pub max_recorded_requests_per_identity: u32,
    /// The sliding window of `max_bundle_requests`, in seconds.
    pub bundle_request_window_secs: u64,
    /// What a source past `max_bundle_requests` gets.
    pub bundle_request_over_limit: OverLimit,
    /// How long bundle requests are kept in the `Requests` table, in seconds.
    pub request_retention_secs: u64,
    /// How often this server purges `Requests` of rows older than the retention, in
    /// seconds; 0: never (purge with `lime-server db purge-requests`).
    pub request_purge_interval_secs: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_opks_per_device: 1_000,
            max_devices_per_user: 100,
            max_bundle_answer_bytes: DEFAULT_MAX_BUNDLE_ANSWER_BYTES,
            max_devices_per_bundle_request: None,
            max_bundle_requests: 10,
            max_bundle_requests_per_identity: 10,
            max_recorded_requests_per_identity: 10_000,
            bundle_request_window_secs: 3_600,
            bundle_request_over_limit: OverLimit::WithoutOneTimePreKey,
            request_retention_secs: 14 * 24 * 3_600,
            request_purge_interval_secs: 24 * 3_600,
        }
    }
}

impl LimitSettings {
    /// The limits the stores enforce.
    pub fn store_limits(&self) -> StoreLimits {
        let max_opks = match self.max_opks_per_device {
            0 => u32::from(u16::MAX),
            limit => limit,
        };
        StoreLimits {
            max_one_time_pre_keys_per_device: max_opks,
            max_devices_per_user: self.max_devices_per_user,
            bundle_requests: (self.max_bundle_requests > 0).then(|| BundleRequestLimit {
                max: self.max_bundle_requests,
                max_per_identity: self.max_bundle_requests_per_identity,
                max_recorded_per_identity: self.max_recorded_requests_per_identity,
                window: Duration::from_secs(self.bundle_request_window_secs),
                over_limit: self.bundle_request_over_limit,
            }),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_opks_per_device > u32::from(u16::MAX) {
            return Err(invalid(
                "limits.max_opks_per_device",
                format!(
                    "{} is over 65535, the most one selfOPks answer can list (0: that limit only)",
                    self.max_opks_per_device
                ),
            ));
        }
        if self.max_devices_per_bundle_request.is_some() {
            return Err(invalid(
                "limits.max_devices_per_bundle_request",
                "this key is gone: getPeerBundle is now bounded by the size of its answer, \
                 limits.max_bundle_answer_bytes (default 20 MiB: 5,000 devices on any curve); \
                 remove the old key",
            ));
        }
        if self.max_bundle_answer_bytes < MIN_MAX_BUNDLE_ANSWER_BYTES {
            return Err(invalid(
                "limits.max_bundle_answer_bytes",
                format!(
                    "must be at least {MIN_MAX_BUNDLE_ANSWER_BYTES} (one C448MLK1024 bundle \
                     with a long device id)"
                ),
            ));
        }
        if self.max_bundle_requests > 0 {
            for (key, value) in [
                (
                    "limits.bundle_request_window_secs",
                    self.bundle_request_window_secs,
                ),
                (
                    "limits.max_bundle_requests_per_identity",
                    u64::from(self.max_bundle_requests_per_identity),
                ),
                (
                    "limits.max_recorded_requests_per_identity",
                    u64::from(self.max_recorded_requests_per_identity),
                ),
            ] {
                if value == 0 {
                    return Err(invalid(
                        key,
                        "must be at least 1 while limits.max_bundle_requests is on",
                    ));
                }
            }
            if self.request_retention_secs < self.bundle_request_window_secs {
                return Err(invalid(
                    "limits.request_retention_secs",
                    format!(
                        "{} is shorter than limits.bundle_request_window_secs ({}): requests \
                         still counted would be purged",
                        self.request_retention_secs, self.bundle_request_window_secs
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `[auth]`: who may act for which device. Each method is on once configured:
/// digest when `digest.accounts_url` is set, client certificates when
/// `client_certificates.ca_file` is set, proxy-verified certificates when
/// `proxy.trusted` lists an address. None configured: authentication is off.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// The digest realm, and the only domain device ids may be in. Absent: each
    /// request's realm is the domain of its device id (one server, many domains).
    pub realm: Option<String>,
    /// HTTP Digest against the operator's account database.
    pub digest: DigestSettings,
    /// TLS client certificates, verified by this server.
    pub client_certificates: ClientCertificateSettings,
    /// Client certificates verified by a TLS-terminating reverse proxy.
    pub proxy: ProxySettings,
    /// Failed-authentication throttling.
    pub throttle: ThrottleSettings,
}

impl AuthSettings {
    /// True when at least one authentication method is configured.
    pub fn is_enabled(&self) -> bool {
        self.digest.is_enabled() || self.client_certificates.is_enabled() || self.proxy.is_enabled()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(realm) = &self.realm
            && !crate::auth::is_valid_realm(realm)
        {
            return Err(invalid(
                "auth.realm",
                format!("{realm:?} is not a domain name"),
            ));
        }
        let digest = &self.digest;
        if digest.is_enabled() {
            if !digest.accounts_query.contains(":username") {
                return Err(invalid(
                    "auth.digest.accounts_query",
                    "the query must use :username (and may use :domain)",
                ));
            }
            digest.nonce_secret()?;
            digest.accounts_url_with_password()?;
            let algorithms = digest.algorithms();
            for name in &digest.algorithms {
                name.parse::<DigestAlgorithm>()
                    .map_err(|reason| invalid("auth.digest.algorithms", reason))?;
            }
            if algorithms.is_empty() {
                return Err(invalid("auth.digest.algorithms", "at least one is needed"));
            }
            if algorithms.len() == 2 && algorithms[0] == algorithms[1] {
                return Err(invalid(
                    "auth.digest.algorithms",
                    "an algorithm is listed twice",
                ));
            }
            for (key, value) in [
                (
                    "auth.digest.nonce_lifetime_secs",
                    digest.nonce_lifetime_secs,
                ),
                (
                    "auth.digest.accounts_timeout_ms",
                    digest.accounts_timeout_ms,
                ),
                (
                    "auth.digest.accounts_pool_size",
                    u64::from(digest.accounts_pool_size),
                ),
            ] {
                if value == 0 {
                    return Err(invalid(key, "must be at least 1"));
                }
            }
        }
        let certificates = &self.client_certificates;
        if !certificates.is_enabled()
            && (certificates.required || !certificates.crl_files.is_empty())
        {
            return Err(invalid(
                "auth.client_certificates.ca_file",
                "client certificates are configured (required or crl_files) without the CA to verify them",
            ));
        }
        let proxy = &self.proxy;
        for text in &proxy.trusted {
            parse_network(text).map_err(|reason| invalid("auth.proxy.trusted", reason))?;
        }
        for (key, name) in [
            ("auth.proxy.verify_header", &proxy.verify_header),
            ("auth.proxy.certificate_header", &proxy.certificate_header),
            (
                "auth.proxy.client_address_header",
                &proxy.client_address_header,
            ),
        ] {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(invalid(key, format!("{name:?} is not a header name")));
            }
        }
        let throttle = &self.throttle;
        for (key, value) in [
            ("auth.throttle.window_secs", throttle.window_secs),
            ("auth.throttle.lockout_secs", throttle.lockout_secs),
            ("auth.throttle.max_tracked", throttle.max_tracked as u64),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// `[auth.digest]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DigestSettings {
    /// The account database (sqlite://, mysql://, postgres://); setting it turns
    /// digest authentication on.
    pub accounts_url: Option<String>,
    /// Returns (password, algorithm, username[, domain]) rows for `:username` and
    /// `:domain`; the `username` and `domain` columns are the account's own
    /// spelling, which the client's must match exactly.
    pub accounts_query: String,
    /// File holding the account database password, for a URL given without one.
    pub accounts_password_file: Option<PathBuf>,
    /// Environment variable holding it (read when the file is not set).
    pub accounts_password_env: Option<String>,
    /// Most connections to the account database.
    pub accounts_pool_size: u32,
    /// Longest wait for the account database, in milliseconds.
    pub accounts_timeout_ms: u64,
    /// How long an account's passwords are kept after a lookup, in seconds; 0:
    /// looked up on every request.
    pub accounts_cache_secs: u64,
    /// File holding the secret nonces are made with (the same on every instance).
    pub nonce_secret_file: Option<PathBuf>,
    /// Environment variable holding it (read when the file is not set).
    pub nonce_secret_env: Option<String>,
    /// How long a nonce is good for, in seconds.
    pub nonce_lifetime_secs: u64,
    /// Challenges offered, in order: "SHA-256", "MD5".
    pub algorithms: Vec<String>,
    /// Account lookups a second, at most, to offer a challenge only the algorithms
    /// the account can verify; past it, every algorithm is offered. 0: never looked
    /// up (every algorithm offered).
    pub challenge_lookups_per_sec: u32,
}

impl Default for DigestSettings {
    fn default() -> Self {
        DigestSettings {
            accounts_url: None,
            accounts_query: crate::auth::accounts::DEFAULT_ACCOUNTS_QUERY.to_owned(),
            accounts_password_file: None,
            accounts_password_env: None,
            accounts_pool_size: 4,
            accounts_timeout_ms: 2_000,
            accounts_cache_secs: 30,
            nonce_secret_file: None,
            nonce_secret_env: None,
            nonce_lifetime_secs: 300,
            algorithms: vec!["SHA-256".into(), "MD5".into()],
            challenge_lookups_per_sec: 100,
        }
    }
}

impl DigestSettings {
    /// True when an account database is configured.
    pub fn is_enabled(&self) -> bool {
        self.accounts_url.is_some()
    }

    /// The challenge algorithms, in order (valid once validated).
    pub fn algorithms(&self) -> Vec<DigestAlgorithm> {
        self.algorithms
            .iter()
            .filter_map(|name| name.parse().ok())
            .collect()
    }

    /// The account database URL with its configured password filled in.
    pub fn accounts_url_with_password(&self) -> Result<Option<String>, ConfigError> {
        let Some(url) = &self.accounts_url else {
            return Ok(None);
        };
        let password = read_secret(
            (
                "auth.digest.accounts_password_file",
                &self.accounts_password_file,
            ),
            (
                "auth.digest.accounts_password_env",
                &self.accounts_password_env,
            ),
        )?;
        Ok(Some(crate::store::location::with_password(
            url,
            password.as_deref(),
        )))
    }

    /// The nonce secret; an error names the key when it is missing or too short.
    pub fn nonce_secret(&self) -> Result<String, ConfigError> {
        let secret = read_secret(
            ("auth.digest.nonce_secret_file", &self.nonce_secret_file),
            ("auth.digest.nonce_secret_env", &self.nonce_secret_env),
        )?
        .ok_or_else(|| {
            invalid(
                "auth.digest.nonce_secret_file",
                "digest authentication needs a nonce secret (the same on every instance): \
                 set auth.digest.nonce_secret_file or auth.digest.nonce_secret_env",
            )
        })?;
        if secret.len() < 16 {
            return Err(invalid(
                "auth.digest.nonce_secret_file",
                "the nonce secret is shorter than 16 bytes",
            ));
        }
        Ok(secret)
    }
}

/// `[auth.client_certificates]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ClientCertificateSettings {
    /// PEM bundle of the CAs client certificates are verified against; setting it
    /// turns client certificates on for the HTTPS listeners.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate revocation lists of those CAs.
    pub crl_files: Vec<PathBuf>,
    /// Refuse TLS connections without a client certificate (no digest fallback).
    pub required: bool,
    /// Which names of a certificate are its identity, for TLS client certificates
    /// and proxy-verified ones alike: `"san_else_cn"` (RFC 6125: the CN only when
    /// there is no subjectAltName URI or DNS entry) or `"san_or_cn"` (the PHP
    /// server's rule: the CN counts beside the subjectAltName).
    pub identity: crate::auth::certificate::IdentityRule,
}

impl ClientCertificateSettings {
    /// True when a CA is configured.
    pub fn is_enabled(&self) -> bool {
        self.ca_file.is_some()
    }
}

/// `[auth.proxy]`: a TLS-terminating reverse proxy (Apache, nginx) that verifies
/// client certificates and passes them on in request headers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// Addresses or networks (`10.0.0.1`, `10.0.0.0/24`) of the proxies whose
    /// headers are believed; empty: off. Headers from anyone else are ignored.
    pub trusted: Vec<String>,
    /// The proxy's verdict: `SUCCESS` is a verified certificate; absent or `NONE`,
    /// no certificate (digest applies); anything else is refused.
    pub verify_header: String,
    /// The verified client certificate, PEM (nginx `$ssl_client_escaped_cert`,
    /// Apache `%{SSL_CLIENT_CERT}s`).
    pub certificate_header: String,
    /// The client's own address, as the proxy saw it (last entry), for throttling.
    pub client_address_header: String,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            trusted: Vec::new(),
            verify_header: "X-SSL-Client-Verify".into(),
            certificate_header: "X-SSL-Client-Cert".into(),
            client_address_header: "X-Forwarded-For".into(),
        }
    }
}

impl ProxySettings {
    /// True when a proxy is trusted.
    pub fn is_enabled(&self) -> bool {
        !self.trusted.is_empty()
    }

    /// The trusted networks (valid once validated); a bare address is a /32 or /128.
    pub fn trusted_networks(&self) -> Vec<ipnet::IpNet> {
        self.trusted
            .iter()
            .filter_map(|text| parse_network(text).ok())
            .collect()
    }
}

fn parse_network(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is not an address or network"))
}

/// `[auth.throttle]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleSettings {
    /// Failures for one user@realm from one address within `window_secs` that lock
    /// that pair out; from several addresses, that pace the user. 0: never.
    pub max_failures_per_user: u32,
    /// Failures from one client address (IPv6: one /64) within `window_secs` that
    /// lock it out; 0: never.
    pub max_failures_per_address: u32,
    /// Failed authentications per second for the whole instance; past it, attempts
    /// from addresses a user has not authenticated from are refused (429). 0: no cap.
    pub max_failures_per_sec: u32,
    /// Most entries the throttle keeps (failure counts; and, as many, addresses
    /// proven for a user); the least recently used is dropped first.
    pub max_tracked: usize,
    /// Failures older than this many seconds are forgotten.
    pub window_secs: u64,
    /// Seconds a lock-out lasts.
    pub lockout_secs: u64,
    /// Milliseconds added to the answer of a failure, times the failures so far.
    pub delay_step_ms: u64,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            max_failures_per_user: 5,
            max_failures_per_address: 30,
            max_failures_per_sec: 50,
            max_tracked: 100_000,
            window_secs: 300,
            lockout_secs: 300,
            delay_step_ms: 200,
        }
    }
}

impl ThrottleSettings {
    /// The policy the throttle applies.
    pub fn policy(&self) -> ThrottlePolicy {
        ThrottlePolicy {
            max_failures_per_user: self.max_failures_per_user,
            max_failures_per_address: self.max_failures_per_address,
            max_failures_per_sec: self.max_failures_per_sec,
            max_tracked: self.max_tracked,
            window: Duration::from_secs(self.window_secs),
            lockout: Duration::from_secs(self.lockout_secs),
            delay_step: Duration::from_millis(self.delay_step_ms),
        }
    }
}

/// Reads a secret from the file of `file_key`, else from the environment variable
/// of `env_key`; `None` when neither is set.
fn read_secret(
    (file_key, file): (&'static str, &Option<PathBuf>),
    (env_key, env): (&'static str, &Option<String>),
) -> Result<Option<String>, ConfigError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|error| {
            invalid(file_key, format!("cannot read {}: {error}", path.display()))
        })?;
        return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
    }
    if let Some(name) = env {
        return std::env::var(name)
            .map(Some)
            .map_err(|_| invalid(env_key, format!("environment variable {name} is not set")));
    }
    Ok(None)
}

/// `[federation]`: other domains' lime servers, both ways.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationSettings {
    /// The domains this server serves (device ids `sip:user@DOMAIN;gr=...`).
    /// Empty: `auth.realm` alone.
    pub domains: Vec<String>,
    /// Longest wait for a peer's answer to one forwarded request, connection
    /// included; past it the peer's devices get no bundle.
    pub timeout_ms: u64,
    /// The lime servers our clients' bundle requests for their domains go to.
    pub forward_to: Vec<ForwardPeerSettings>,
    /// The peer servers that may ask for our users' bundles.
    pub accept_from: Vec<AcceptedPeerSettings>,
}

impl Default for FederationSettings {
    fn default() -> Self {
        FederationSettings {
            domains: Vec::new(),
            timeout_ms: 3_000,
            forward_to: Vec::new(),
            accept_from: Vec::new(),
        }
    }
}

/// One `[[federation.forward_to]]`: a peer lime server and how we log in to it.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardPeerSettings {
    /// The domains whose devices it holds.
    pub domains: Vec<String>,
    /// Its X3DH URL (`https://lime.example.org/lime-server/lime-server.php`).
    pub url: String,
    /// Digest user name; default: our first served domain.
    pub username: Option<String>,
    /// File holding the digest HA1 it gave us: hex of
    /// SHA-256(username:realm:password), realm being its domain.
    pub digest_ha1_file: Option<PathBuf>,
    /// Environment variable holding it (read when the file is not set).
    pub digest_ha1_env: Option<String>,
    /// PEM certificate chain we present to it (its subjectAltName names us).
    pub client_certificate: Option<PathBuf>,
    /// PEM private key of `client_certificate`.
    pub client_private_key: Option<PathBuf>,
    /// PEM CA bundle its server certificate is verified with; default: the
    /// system's roots.
    pub ca_file: Option<PathBuf>,
}

/// One `[[federation.accept_from]]`: a peer server allowed to ask for our
/// users' bundles on behalf of the devices of its domains.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AcceptedPeerSettings {
    /// Its domains: the device ids it may ask for bundles on behalf of.
    pub domains: Vec<String>,
    /// The digest user name it logs in with; default: its first domain.
    pub username: Option<String>,
    /// File holding the digest HA1 we gave it: hex of
    /// SHA-256(username:realm:password), realm being our domain.
    pub digest_ha1_file: Option<PathBuf>,
    /// Environment variable holding it (read when the file is not set).
    pub digest_ha1_env: Option<String>,
    /// The name its client certificate carries (subjectAltName URI or DNS, or CN
    /// by `auth.client_certificates.identity`), verified against
    /// `auth.client_certificates.ca_file`.
    pub certificate_identity: Option<String>,
}

impl FederationSettings {
    /// The domains served: `federation.domains`, else `auth.realm`.
    pub fn served_domains(&self, auth: &AuthSettings) -> Vec<String> {
        if self.domains.is_empty() {
            auth.realm.iter().cloned().collect()
        } else {
            self.domains.clone()
        }
    }

    /// True when peers are configured either way.
    pub fn is_enabled(&self) -> bool {
        !self.forward_to.is_empty() || !self.accept_from.is_empty()
    }

    fn validate(&self, auth: &AuthSettings) -> Result<(), ConfigError> {
        for domain in &self.domains {
            check_domain("federation.domains", domain)?;
        }
        if !self.is_enabled() {
            return Ok(());
        }
        let served = self.served_domains(auth);
        if served.is_empty() {
            return Err(invalid(
                "federation.domains",
                "peers are configured but the domains this server serves are not: set \
                 federation.domains (or auth.realm)",
            ));
        }
        if self.timeout_ms == 0 {
            return Err(invalid("federation.timeout_ms", "must be at least 1"));
        }
        let mut forwarded = std::collections::BTreeSet::new();
        for peer in &self.forward_to {
            check_peer_domains("federation.forward_to", &peer.domains, &served)?;
            for domain in &peer.domains {
                if !forwarded.insert(domain) {
                    return Err(invalid(
                        "federation.forward_to",
                        format!("domain {domain} is listed for two peers"),
                    ));
                }
            }
            let url: http::Uri = peer.url.parse().map_err(|error| {
                invalid(
                    "federation.forward_to",
                    format!("url {:?}: {error}", peer.url),
                )
            })?;
            if !matches!(url.scheme_str(), Some("https" | "http")) || url.host().is_none() {
                return Err(invalid(
                    "federation.forward_to",
                    format!("url {:?} is not an http(s) URL with a host", peer.url),
                ));
            }
            peer.digest_ha1()?;
            if peer.client_certificate.is_some() != peer.client_private_key.is_some() {
                return Err(invalid(
                    "federation.forward_to",
                    format!(
                        "peer {}: client_certificate and client_private_key go together",
                        peer.domains.join(", ")
                    ),
                ));
            }
        }
        let mut accepted = std::collections::BTreeSet::new();
        for peer in &self.accept_from {
            check_peer_domains("federation.accept_from", &peer.domains, &served)?;
            for domain in &peer.domains {
                if !accepted.insert(domain) {
                    return Err(invalid(
                        "federation.accept_from",
                        format!("domain {domain} is listed for two peers"),
                    ));
                }
            }
            let ha1 = peer.digest_ha1()?;
            if ha1.is_none() && peer.certificate_identity.is_none() {
                return Err(invalid(
                    "federation.accept_from",
                    format!(
                        "peer {}: give how it proves itself (digest_ha1_file, digest_ha1_env or \
                         certificate_identity): a peer without one would be anyone",
                        peer.domains.join(", ")
                    ),
                ));
            }
            if ha1.is_some() {
                auth.digest.nonce_secret().map_err(|_| {
                    invalid(
                        "auth.digest.nonce_secret_file",
                        "a peer logs in with digest (federation.accept_from): digest needs a \
                         nonce secret, auth.digest.nonce_secret_file or nonce_secret_env",
                    )
                })?;
            }
            if peer.certificate_identity.is_some() && !auth.client_certificates.is_enabled() {
                return Err(invalid(
                    "federation.accept_from",
                    format!(
                        "peer {}: certificate_identity needs auth.client_certificates.ca_file to \
                         verify its certificate",
                        peer.domains.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl ForwardPeerSettings {
    /// The HA1 from `digest_ha1_file` or `digest_ha1_env`, checked: 64 hex digits.
    pub fn digest_ha1(&self) -> Result<Option<String>, ConfigError> {
        read_ha1(
            &self.digest_ha1_file,
            &self.digest_ha1_env,
            "federation.forward_to",
        )
    }
}

impl AcceptedPeerSettings {
    /// The HA1 from `digest_ha1_file` or `digest_ha1_env`, checked: 64 hex digits.
    pub fn digest_ha1(&self) -> Result<Option<String>, ConfigError> {
        read_ha1(
            &self.digest_ha1_file,
            &self.digest_ha1_env,
            "federation.accept_from",
        )
    }
}

/// A SHA-256 HA1 (64 hex digits, lower-cased) from a file or the environment.
fn read_ha1(
    file: &Option<PathBuf>,
    env: &Option<String>,
    key: &'static str,
) -> Result<Option<String>, ConfigError> {
    let Some(ha1) = read_secret((key, file), (key, env))? else {
        return Ok(None);
    };
    let ha1 = ha1.trim().to_ascii_lowercase();
    if ha1.len() != 64 || !ha1.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return Err(invalid(
            key,
            "a digest HA1 is the hex of SHA-256(username:realm:password): 64 hex digits",
        ));
    }
    Ok(Some(ha1))
}

fn check_domain(key: &'static str, domain: &str) -> Result<(), ConfigError> {
    if crate::auth::is_valid_realm(domain) {
        Ok(())
    } else {
        Err(invalid(key, format!("{domain:?} is not a domain name")))
    }
}

/// A peer's domains: at least one, each a domain name, none of ours.
fn check_peer_domains(
    key: &'static str,
    domains: &[String],
    served: &[String],
) -> Result<(), ConfigError> {
    if domains.is_empty() {
        return Err(invalid(key, "a peer needs its domains"));
    }
    for domain in domains {
        check_domain(key, domain)?;
        if served.contains(domain) {
            return Err(invalid(
                key,
                format!("{domain} is a domain this server serves, not a peer's"),
            ));
        }
    }
    Ok(())
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// "human" or "json".
    pub format: LogFormat,
    /// A tracing filter, e.g. "info" or "lime_server=debug"; `RUST_LOG` overrides it.
    pub level: String,
    /// Most lines a second written from one place in the code; the rest are
    /// counted and summarised. 0: no limit.
    pub max_lines_per_second: u32,
    /// Most bytes of log lines waiting for a slow log reader; past it lines are
    /// dropped and counted. At least 64 KiB.
    pub max_queued_bytes: usize,
    /// A file to append the log to instead of stderr, reopened on SIGHUP (after
    /// logrotate renamed it). None: stderr (the journal under systemd).
    pub file: Option<PathBuf>,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Human,
            level: "info".into(),
            max_lines_per_second: 20,
            max_queued_bytes: 4 << 20,
            file: None,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Where `GET /metrics` is served in Prometheus text format, over plain HTTP
    /// without authentication; `None` (the default): no metrics listener.
    pub listen: Option<SocketAddr>,
    /// Devices holding fewer one-time pre-keys than this are counted in
    /// `lime_devices_low_one_time_pre_key_stock` (and by `admin stats`).
    pub low_stock_threshold: u32,
    /// How often the stock gauges (devices, one-time pre-keys, their spread) are
    /// counted in the databases, in seconds: one query per curve each time.
    pub stock_refresh_secs: u64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            listen: None,
            low_stock_threshold: 10,
            stock_refresh_secs: 60,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per event.
    Json,
}

/// A config that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for these settings (unknown key, wrong type...).
    #[error("config file {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// The key, dotted (`server.listen`).
        key: &'static str,
        /// Why.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

impl Settings {
    /// Loads `path`, or the default path when it exists, or the defaults.
    /// Returns the settings and the file they came from.
    pub fn load(path: Option<&Path>) -> Result<(Settings, Option<PathBuf>), ConfigError> {
        let path = match path {
            Some(path) => Some(path.to_owned()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|path| path.exists()),
        };
        let settings = match &path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Settings::from_toml(&text).map_err(|message| ConfigError::Syntax {
                    path: path.clone(),
                    message,
                })?
            }
            None => Settings::default(),
        };
        Ok((settings, path))
    }

    /// Parses settings from TOML text (not yet validated).
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|error| error.to_string().trim_end().to_owned())
    }

    /// Checks values and their consistency; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let server = &self.server;
        if server.listen.is_empty() && server.plain_http_listen.is_empty() {
            return Err(invalid(
                "server.listen",
                "no listener: give at least one address in server.listen or server.plain_http_listen",
            ));
        }
        if server.paths.is_empty() {
            return Err(invalid(
                "server.paths",
                "at least one path must accept requests",
            ));
        }
        if let Some(path) = server.paths.iter().find(|path| !path.starts_with('/')) {
            return Err(invalid(
                "server.paths",
                format!("{path:?} does not start with '/'"),
            ));
        }
        if let Some(path) = server
            .paths
            .iter()
            .find(|path| ["/health", "/ready"].contains(&path.as_str()))
        {
            return Err(invalid(
                "server.paths",
                format!("{path} is reserved for health checks"),
            ));
        }
        if server.max_body_bytes < 64 {
            return Err(invalid("server.max_body_bytes", "must be at least 64"));
        }
        if server.max_body_bytes > MAX_MAX_BODY_BYTES {
            return Err(invalid(
                "server.max_body_bytes",
                format!("must be at most {MAX_MAX_BODY_BYTES}"),
            ));
        }
        if server.max_buffered_body_bytes < server.max_body_bytes {
            return Err(invalid(
                "server.max_buffered_body_bytes",
                format!(
                    "{} is less than server.max_body_bytes ({}): a body of that size could never be read",
                    server.max_buffered_body_bytes, server.max_body_bytes
                ),
            ));
        }
        if !(MIN_MAX_HEADER_BYTES..=MAX_MAX_HEADER_BYTES).contains(&server.max_header_bytes) {
            return Err(invalid(
                "server.max_header_bytes",
                format!(
                    "must be from {MIN_MAX_HEADER_BYTES} (hyper's least HTTP/1 buffer) to \
                     {MAX_MAX_HEADER_BYTES}"
                ),
            ));
        }
        if !(1..=1_000_000).contains(&server.max_connections) {
            return Err(invalid(
                "server.max_connections",
                "must be between 1 and 1000000 (each connection needs a file descriptor)",
            ));
        }
        for (key, value) in [
            (
                "server.tls_handshake_timeout_ms",
                server.tls_handshake_timeout_ms,
            ),
            (
                "server.header_read_timeout_ms",
                server.header_read_timeout_ms,
            ),
            ("server.body_read_timeout_ms", server.body_read_timeout_ms),
            ("server.idle_timeout_ms", server.idle_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.tls.certificate.is_some() != self.tls.private_key.is_some() {
            return Err(invalid(
                "tls.private_key",
                "tls.certificate and tls.private_key go together: give both or neither",
            ));
        }
        let storage = &self.storage;
        if storage.curves.is_empty() {
            return Err(invalid(
                "storage.curves",
                "at least one curve must be enabled",
            ));
        }
        for name in &storage.curves {
            name.parse::<Curve>()
                .map_err(|error| invalid("storage.curves", error.to_string()))?;
        }
        if storage.timeout_ms == 0 {
            return Err(invalid("storage.timeout_ms", "must be at least 1"));
        }
        for name in storage.urls.keys() {
            name.parse::<Curve>()
                .map_err(|error| invalid("storage.urls", error.to_string()))?;
        }
        for curve in storage.enabled_curves() {
            storage.location(curve)?;
        }
        if storage.pool_size == 0 {
            return Err(invalid("storage.pool_size", "must be at least 1"));
        }
        if storage.connect_timeout_ms == 0 {
            return Err(invalid("storage.connect_timeout_ms", "must be at least 1"));
        }
        if storage.sqlite_max_batch == 0 {
            return Err(invalid("storage.sqlite_max_batch", "must be at least 1"));
        }
        self.limits.validate()?;
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(invalid(
                "log.level",
                format!("{:?} is not a tracing filter", self.log.level),
            ));
        }
        if self.log.max_queued_bytes < 64 << 10 {
            return Err(invalid(
                "log.max_queued_bytes",
                format!(
                    "{} bytes cannot hold a burst of lines: give at least 65536",
                    self.log.max_queued_bytes
                ),
            ));
        }
        if self
            .log
            .file
            .as_ref()
            .is_some_and(|file| file.as_os_str().is_empty() || file.is_dir())
        {
            return Err(invalid(
                "log.file",
                "must name a file (leave it out to log to stderr)",
            ));
        }
        self.auth.validate()?;
        if self.metrics.stock_refresh_secs == 0 {
            return Err(invalid("metrics.stock_refresh_secs", "must be at least 1"));
        }
        if let Some(addr) = self.metrics.listen
            && self
                .listeners()
                .any(|listener| *listener == addr && addr.port() != 0)
        {
            return Err(invalid(
                "metrics.listen",
                format!("{addr} is also an X3DH listener: give the metrics a port of their own"),
            ));
        }
        self.federation.validate(&self.auth)?;
        if !self.auth.is_enabled()
            && !server.insecure_no_auth
            && let Some(addr) = self.listeners().find(|addr| !addr.ip().is_loopback())
        {
            return Err(invalid(
                "server.listen",
                format!(
                    "{addr} is not a loopback address and authentication is off: anyone could \
                         replace anyone's keys. Turn authentication on, or set \
                         server.insecure_no_auth = true (--insecure-no-auth) if something in front \
                         of this server authenticates"
                ),
            ));
        }
        Ok(())
    }

    /// Every listening address, TLS and plain.
    pub fn listeners(&self) -> impl Iterator<Item = &SocketAddr> {
        self.server
            .listen
            .iter()
            .chain(&self.server.plain_http_listen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        match Settings::from_toml(text) {
            Err(message) => message,
            Ok(settings) => settings.validate().unwrap_err().to_string(),
        }
    }

    #[test]
    fn defaults_are_valid_and_loopback() {
        let settings = Settings::default();
        settings.validate().unwrap();
        assert!(settings.listeners().all(|addr| addr.ip().is_loopback()));
        assert_eq!(settings.storage.enabled_curves(), Curve::ALL.to_vec());
    }

    #[test]
    fn federation_settings_are_checked_with_the_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let ha1 = dir.path().join("ha1");
        std::fs::write(&ha1, format!("{}\n", "aB".repeat(32))).unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc").unwrap();
        let peer = |table: &str, body: &str| {
            format!("[federation]\ndomains = [\"a.test\"]\n[[federation.{table}]]\n{body}\n")
        };
        let forward = |body: &str| peer("forward_to", body);
        let accept = |body: &str| peer("accept_from", body);
        let ha1_line = format!("digest_ha1_file = {:?}", ha1.display().to_string());
        for (text, key, why) in [
            (
                "[[federation.forward_to]]\ndomains = [\"b.test\"]\nurl = \"https://b.test/\"\n"
                    .to_owned(),
                "federation.domains",
                "",
            ),
            (
                forward("domains = [\"a.test\"]\nurl = \"https://a.test/\""),
                "federation.forward_to",
                "a domain this server serves",
            ),
            (
                forward("domains = [\"b.test\"]\nurl = \"ftp://b.test/\""),
                "federation.forward_to",
                "not an http(s) URL",
            ),
            (
                forward(&format!(
                    "domains = [\"b.test\"]\nurl = \"https://b.test/\"\ndigest_ha1_file = {:?}",
                    short.display().to_string()
                )),
                "federation.forward_to",
                "64 hex digits",
            ),
            (
                forward("domains = []\nurl = \"https://b.test/\""),
                "federation.forward_to",
                "needs its domains",
            ),
            (
                accept("domains = [\"b.test\"]"),
                "federation.accept_from",
                "would be anyone",
            ),
            (
                accept(&format!("domains = [\"b.test\"]\n{ha1_line}")),
                "auth.digest.nonce_secret_file",
                "nonce secret",
            ),
            (
                accept("domains = [\"b.test\"]\ncertificate_identity = \"lime.b.test\""),
                "federation.accept_from",
                "auth.client_certificates.ca_file",
            ),
        ] {
            let error = error_of(&text);
            assert!(
                error.contains(key) && error.contains(why),
                "{text}\n=> {error}"
            );
        }
        let good = forward(&format!(
            "domains = [\"b.test\", \"b2.test\"]\nurl = \"https://lime.b.test/lime\"\n{ha1_line}"
        ));
        let settings = Settings::from_toml(&good).unwrap();
        settings.validate().unwrap();
        assert_eq!(
            settings.federation.forward_to[0].digest_ha1().unwrap(),
            Some("ab".repeat(32)),
            "trimmed and lower-cased"
        );
    }

    #[test]
    fn a_log_file_that_is_no_file_name_is_refused() {
        assert!(error_of("[log]\nfile = \"\"\n").contains("log.file"));
        let dir = std::env::temp_dir();
        let toml = format!("[log]\nfile = {:?}\n", dir.display().to_string());
        assert!(error_of(&toml).contains("log.file"), "a directory");
        let toml = "[log]\nfile = \"/var/log/lime-server/lime-server.log\"\n";
        assert!(Settings::from_toml(toml).unwrap().validate().is_ok());
    }

    #[test]
    fn unknown_key_is_named() {
        assert!(error_of("[server]\nlisen = []\n").contains("lisen"));
        assert!(error_of("[sever]\n").contains("sever"));
    }

    #[test]
    fn bad_values_are_named() {
        assert!(error_of("[storage]\ncurves = [\"c1\"]\n").contains("storage.curves"));
        assert!(
            error_of("[limits]\nmax_opks_per_device = 70000\n")
                .contains("limits.max_opks_per_device")
        );
        assert!(
            error_of("[limits]\nrequest_retention_secs = 60\n")
                .contains("limits.request_retention_secs")
        );
        assert!(
            error_of("[limits]\nbundle_request_over_limit = \"drop\"\n")
                .contains("bundle_request_over_limit")
        );
        for key in [
            "max_bundle_requests_per_identity",
            "max_recorded_requests_per_identity",
        ] {
            assert!(
                error_of(&format!("[limits]\n{key} = 0\n")).contains(&format!("limits.{key}")),
                "{key}"
            );
        }
        assert!(error_of("[server]\nlisten = \"x\"\n").contains("listen"));
        assert!(
            error_of("[limits]\nmax_bundle_answer_bytes = 100\n")
                .contains("limits.max_bundle_answer_bytes")
        );
        assert!(error_of("[tls]\ncertificate = \"/a\"\n").contains("tls.private_key"));
        assert!(
            error_of("[storage]\nsqlite_synchronous = \"off\"\n").contains("sqlite_synchronous")
        );
    }

    #[test]
    fn metrics_settings_are_checked_by_key() {
        let settings = Settings::default();
        assert_eq!(settings.metrics.listen, None, "metrics are off by default");
        assert!(
            error_of("[metrics]\nstock_refresh_secs = 0\n").contains("metrics.stock_refresh_secs")
        );
        assert!(
            error_of("[server]\nlisten = [\"127.0.0.1:25519\"]\n[metrics]\nlisten = \"127.0.0.1:25519\"\n")
                .contains("metrics.listen")
        );
        let on =
            Settings::from_toml("[metrics]\nlisten = \"[::]:9119\"\nlow_stock_threshold = 0\n")
                .unwrap();
        on.validate().unwrap();
        assert_eq!(on.metrics.listen, Some("[::]:9119".parse().unwrap()));
    }

    #[test]
    fn the_replaced_device_count_key_stops_the_start_naming_its_successor() {
        let error = error_of("[limits]\nmax_devices_per_bundle_request = 1000\n");
        assert!(
            error.contains("limits.max_devices_per_bundle_request"),
            "{error}"
        );
        assert!(error.contains("limits.max_bundle_answer_bytes"), "{error}");
    }

    #[test]
    fn authentication_settings_are_checked_with_the_key_named() {
        let digest = "[auth.digest]\naccounts_url = \"sqlite:///tmp/accounts.db\"\n";
        assert!(error_of(digest).contains("auth.digest.nonce_secret_file"));
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "short\n").unwrap();
        let with_secret = format!("{digest}nonce_secret_file = {secret:?}\n");
        assert!(error_of(&with_secret).contains("shorter than 16 bytes"));
        std::fs::write(&secret, "a secret long enough\n").unwrap();
        Settings::from_toml(&with_secret)
            .unwrap()
            .validate()
            .unwrap();
        assert!(
            error_of(&format!("{with_secret}algorithms = [\"SHA-512\"]\n"))
                .contains("auth.digest.algorithms")
        );
        assert!(
            error_of(&format!("{with_secret}accounts_query = \"SELECT 1\"\n"))
                .contains("auth.digest.accounts_query")
        );
        assert!(
            error_of("[auth.client_certificates]\nrequired = true\n")
                .contains("auth.client_certificates.ca_file")
        );
        assert!(
            error_of("[auth.proxy]\ntrusted = [\"10.0.0.0/33\"]\n").contains("auth.proxy.trusted")
        );
        assert!(error_of("[auth]\nrealm = \"exa mple.org\"\n").contains("auth.realm"));
    }

    #[test]
    fn certificate_identity_rule_is_read_by_name() {
        use crate::auth::certificate::IdentityRule;
        let read = |text: &str| {
            Settings::from_toml(text).map(|settings| settings.auth.client_certificates.identity)
        };
        assert_eq!(read(""), Ok(IdentityRule::SanElseCn));
        assert_eq!(
            read("[auth.client_certificates]\nidentity = \"san_else_cn\"\n"),
            Ok(IdentityRule::SanElseCn)
        );
        assert_eq!(
            read("[auth.client_certificates]\nidentity = \"san_or_cn\"\n"),
            Ok(IdentityRule::SanOrCn)
        );
        let error = error_of("[auth.client_certificates]\nidentity = \"cn\"\n");
        assert!(
            error.contains("identity") && error.contains("san_else_cn"),
            "{error}"
        );
    }

    #[test]
    fn a_configured_method_turns_authentication_on_and_allows_public_listeners() {
        let text = "[server]\nlisten = [\"0.0.0.0:25519\"]\n[auth.client_certificates]\nca_file = \"/etc/ca.pem\"\n";
        let settings = Settings::from_toml(text).unwrap();
        assert!(settings.auth.is_enabled());
        settings.validate().unwrap();
        assert!(!Settings::default().auth.is_enabled());
    }

    #[test]
    fn connection_limits_of_zero_are_refused_with_their_key() {
        for key in [
            "max_connections",
            "tls_handshake_timeout_ms",
            "header_read_timeout_ms",
            "body_read_timeout_ms",
            "idle_timeout_ms",
        ] {
            let error = error_of(&format!("[server]\n{key} = 0\n"));
            assert!(error.contains(&format!("server.{key}")), "{key}: {error}");
        }
        assert!(
            error_of("[server]\nmax_connections = 2000000\n").contains("server.max_connections")
        );
    }

    #[test]
    fn memory_limits_of_the_server_are_checked_with_their_key() {
        for (text, key) in [
            ("max_header_bytes = 4096", "server.max_header_bytes"),
            ("max_header_bytes = 2000000", "server.max_header_bytes"),
            (
                "max_buffered_body_bytes = 1000",
                "server.max_buffered_body_bytes",
            ),
            ("max_body_bytes = 100000000", "server.max_body_bytes"),
        ] {
            let error = error_of(&format!("[server]\n{text}\n"));
            assert!(error.contains(key), "{text}: {error}");
        }
    }

    #[test]
    fn public_listener_without_auth_needs_the_insecure_flag() {
        let text = "[server]\nlisten = [\"0.0.0.0:25519\"]\n";
        assert!(error_of(text).contains("insecure_no_auth"));
        let allowed = format!("{text}insecure_no_auth = true\n");
        Settings::from_toml(&allowed).unwrap().validate().unwrap();
    }
}
