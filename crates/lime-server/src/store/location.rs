//! Where a database is: a URL, `sqlite://PATH`, `mysql://...` (MariaDB or MySQL) or
//! `postgres://...`. A curve's store URL may be a template with `{curve}` in it; the
//! account database (`auth::accounts`) is one URL.

use lime_protocol::Curve;
use std::fmt;
use std::path::PathBuf;

/// A curve's database, parsed from its URL.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A MariaDB/MySQL database (the original PHP server's backend).
    Mysql(String),
    /// A PostgreSQL database.
    Postgres(String),
}

/// A URL that names no supported backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store URL {url:?}: {reason}")]
pub struct BadStoreUrl {
    /// The URL, password hidden.
    pub url: String,
    /// Why it is refused.
    pub reason: &'static str,
}

impl StoreLocation {
    /// Parses a URL; `{curve}` is replaced by the curve's name first.
    pub fn parse(template: &str, curve: Curve) -> Result<StoreLocation, BadStoreUrl> {
        StoreLocation::parse_url(&template.replace("{curve}", curve.name()))
    }

    /// Parses a URL naming one database, as it is (no `{curve}` in it).
    pub fn parse_url(url: &str) -> Result<StoreLocation, BadStoreUrl> {
        let bad = |reason| BadStoreUrl {
            url: redact(url),
            reason,
        };
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(bad("no file path after sqlite://"));
            }
            Ok(StoreLocation::Sqlite(PathBuf::from(path)))
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Ok(StoreLocation::Mysql(url.replacen(
                "mariadb://",
                "mysql://",
                1,
            )))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(StoreLocation::Postgres(url.to_owned()))
        } else {
            Err(bad(
                "expected sqlite://, mysql://, mariadb://, postgres:// or postgresql://",
            ))
        }
    }

    /// Adds `password` to a database-server URL that has a user but no password.
    pub fn with_password(self, password: Option<&str>) -> StoreLocation {
        match self {
            StoreLocation::Mysql(url) => StoreLocation::Mysql(with_password(&url, password)),
            StoreLocation::Postgres(url) => StoreLocation::Postgres(with_password(&url, password)),
            sqlite => sqlite,
        }
    }
}

/// `url` with `password` added when it names a database server and a user but no
/// password; unchanged otherwise (SQLite paths included).
pub fn with_password(url: &str, password: Option<&str>) -> String {
    let Some(password) = password else {
        return url.to_owned();
    };
    match url.split_once("://") {
        Some(("sqlite", _)) | None => url.to_owned(),
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((user, host)) if !user.contains(':') => {
                format!("{scheme}://{user}:{}@{host}", percent_encode(password))
            }
            _ => url.to_owned(),
        },
    }
}

/// The URL with any password replaced by `***`, fit for logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(byte).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            StoreLocation::Mysql(url) | StoreLocation::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_the_curve() {
        let location =
            StoreLocation::parse("mysql://lime@127.0.0.1/lime_{curve}", Curve::C448).unwrap();
        assert_eq!(
            location,
            StoreLocation::Mysql("mysql://lime@127.0.0.1/lime_c448".into())
        );
        let location =
            StoreLocation::parse("sqlite:///var/lib/lime/{curve}.db", Curve::C25519).unwrap();
        assert_eq!(
            location,
            StoreLocation::Sqlite("/var/lib/lime/c25519.db".into())
        );
        assert!(StoreLocation::parse("redis://x", Curve::C25519).is_err());
        assert!(StoreLocation::parse("sqlite://", Curve::C25519).is_err());
    }

    #[test]
    fn passwords_are_added_encoded_and_never_shown() {
        let location =
            StoreLocation::Postgres("postgres://lime@db/lime".into()).with_password(Some("p@ss:w"));
        assert_eq!(
            location,
            StoreLocation::Postgres("postgres://lime:p%40ss%3Aw@db/lime".into())
        );
        assert_eq!(location.to_string(), "postgres://lime:***@db/lime");
        let kept =
            StoreLocation::Mysql("mysql://lime:own@db/x".into()).with_password(Some("other"));
        assert_eq!(kept, StoreLocation::Mysql("mysql://lime:own@db/x".into()));
    }
}
