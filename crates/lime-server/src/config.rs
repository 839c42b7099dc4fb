//! Typed settings, loaded once from one TOML file and checked before anything starts.
//!
//! Every key has a default, so no file at all gives a working loopback server.
//! Unknown keys and bad values stop the start with the key's name and why.
//! `lime-server.example.toml` at the repository root documents every key.

use crate::store::sqlite::Synchronous;
use crate::store::{StoreLimits, StoreLocation};
use lime_protocol::Curve;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// Log output.
    pub log: LogSettings,
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
    /// Most connections served at once; more wait to be accepted.
    pub max_connections: usize,
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
            max_connections: 10_000,
            insecure_no_auth: false,
        }
    }
}

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
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|error| {
                invalid(
                    "storage.password_file",
                    format!("cannot read {}: {error}", path.display()),
                )
            })?;
            return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
        }
        if let Some(name) = &self.password_env {
            return std::env::var(name).map(Some).map_err(|_| {
                invalid(
                    "storage.password_env",
                    format!("environment variable {name} is not set"),
                )
            });
        }
        Ok(None)
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

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Most one-time pre-keys one device may hold (at most 65535, the most one
    /// selfOPks answer can list).
    pub max_one_time_pre_keys_per_device: u32,
    /// Most devices one getPeerBundle may ask for: bounds the size of an answer.
    pub max_devices_per_bundle_request: u16,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_one_time_pre_keys_per_device: 10_000,
            max_devices_per_bundle_request: 1_000,
        }
    }
}

impl LimitSettings {
    /// The limits the stores enforce.
    pub fn store_limits(&self) -> StoreLimits {
        StoreLimits {
            max_one_time_pre_keys_per_device: self.max_one_time_pre_keys_per_device,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// How requests are authenticated.
    pub mode: AuthMode,
}

/// Authentication mechanisms.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// None: any client may act for any device id it names. Loopback only,
    /// unless `server.insecure_no_auth` is set.
    #[default]
    None,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// "human" or "json".
    pub format: LogFormat,
    /// A tracing filter, e.g. "info" or "lime_server=debug"; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Human,
            level: "info".into(),
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
        if server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
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
        let max_opks = self.limits.max_one_time_pre_keys_per_device;
        if max_opks == 0 || max_opks > u32::from(u16::MAX) {
            return Err(invalid(
                "limits.max_one_time_pre_keys_per_device",
                format!(
                    "{max_opks} is not between 1 and 65535 (a selfOPks answer lists at most 65535 ids)"
                ),
            ));
        }
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
        if self.auth.mode == AuthMode::None && !server.insecure_no_auth {
            if let Some(addr) = self.listeners().find(|addr| !addr.ip().is_loopback()) {
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
    fn unknown_key_is_named() {
        assert!(error_of("[server]\nlisen = []\n").contains("lisen"));
        assert!(error_of("[sever]\n").contains("sever"));
    }

    #[test]
    fn bad_values_are_named() {
        assert!(error_of("[storage]\ncurves = [\"c1\"]\n").contains("storage.curves"));
        assert!(
            error_of("[limits]\nmax_one_time_pre_keys_per_device = 70000\n")
                .contains("limits.max_one_time_pre_keys_per_device")
        );
        assert!(error_of("[server]\nlisten = \"x\"\n").contains("listen"));
        assert!(error_of("[tls]\ncertificate = \"/a\"\n").contains("tls.private_key"));
        assert!(
            error_of("[storage]\nsqlite_synchronous = \"off\"\n").contains("sqlite_synchronous")
        );
    }

    #[test]
    fn public_listener_without_auth_needs_the_insecure_flag() {
        let text = "[server]\nlisten = [\"0.0.0.0:25519\"]\n";
        assert!(error_of(text).contains("insecure_no_auth"));
        let allowed = format!("{text}insecure_no_auth = true\n");
        Settings::from_toml(&allowed).unwrap().validate().unwrap();
    }
}
