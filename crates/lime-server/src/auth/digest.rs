//! HTTP Digest authentication, server side (RFC 7616, with RFC 2617's `qop=auth`).
//!
//! No crate does the server side well, so this is written small, from the RFCs:
//!
//! - [`challenges`]: the `WWW-Authenticate` values of a 401, one per algorithm
//!   offered, in the configured order (SHA-256 first by default: clients take the
//!   first they can answer; `offers.rs` leaves out what the account cannot verify). The names are spelled exactly `SHA-256` and `MD5`: belle-sip,
//!   Linphone's HTTP stack, compares them case-sensitively.
//! - [`NonceKey`]: stateless nonces, `base64url(timestamp || HMAC(secret, timestamp
//!   || realm))`, so that any instance sharing the secret verifies any other's nonces.
//!   A nonce older than its lifetime is *stale*: the client is challenged again with
//!   `stale=true` and answers without asking its user. Nonce counts are not tracked
//!   (clients send `nc=00000001`; Linphone never reuses a nonce, it is challenged
//!   on every request): within its lifetime a captured request could be replayed,
//!   which TLS is there to prevent.
//! - [`Credentials::parse`]: the `Authorization` header.
//! - [`Credentials::response_matches`]: recomputes the response from a stored HA1
//!   and compares it in constant time.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::fmt;
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Bytes of HMAC kept in a nonce.
const NONCE_MAC_LEN: usize = 16;

/// How far in the future a nonce's timestamp may be: clock differences between
/// instances behind one load balancer.
const NONCE_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// A digest hash algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestAlgorithm {
    /// `MD5`: every client knows it.
    Md5,
    /// `SHA-256` (RFC 7616).
    Sha256,
}

impl DigestAlgorithm {
    /// The name in challenges and credentials.
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Md5 => "MD5",
            DigestAlgorithm::Sha256 => "SHA-256",
        }
    }

    /// The hex digest of `parts` joined by `:` (how RFC 7616 builds A1, A2 and
    /// the response), on the stack.
    fn hex_of_joined(self, parts: &[&str]) -> HexDigest {
        fn of<D: Digest>(parts: &[&str]) -> HexDigest {
            let mut digest = D::new();
            for (index, part) in parts.iter().enumerate() {
                if index > 0 {
                    digest.update(b":");
                }
                digest.update(part.as_bytes());
            }
            HexDigest::of(&digest.finalize())
        }
        match self {
            DigestAlgorithm::Md5 => of::<Md5>(parts),
            DigestAlgorithm::Sha256 => of::<Sha256>(parts),
        }
    }

    /// HA1 = H(username:realm:password), for passwords stored in clear.
    pub fn ha1(self, username: &str, realm: &str, password: &str) -> String {
        self.hex_of_joined(&[username, realm, password])
            .as_str()
            .to_owned()
    }
}

/// A digest in lowercase hex, on the stack: 32 characters (MD5) or 64 (SHA-256).
struct HexDigest {
    text: [u8; 64],
    len: usize,
}

impl HexDigest {
    fn of(digest: &[u8]) -> HexDigest {
        let mut text = [0u8; 64];
        let len = digest.len() * 2;
        hex::encode_to_slice(digest, &mut text[..len]).expect("room for the hex digest");
        HexDigest { text, len }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text[..self.len]).expect("hex is ASCII")
    }
}

impl fmt::Display for DigestAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DigestAlgorithm {
    type Err = String;

    /// Exact names only (`MD5`, `SHA-256`), as in the config file.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "MD5" => Ok(DigestAlgorithm::Md5),
            "SHA-256" => Ok(DigestAlgorithm::Sha256),
            other => Err(format!(
                "unknown digest algorithm {other:?}: expected \"SHA-256\" or \"MD5\""
            )),
        }
    }
}

/// What a nonce check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceState {
    /// Issued by an instance with this secret for this realm, within its lifetime.
    Fresh,
    /// Genuine but older than its lifetime: challenge again with `stale=true`.
    Stale,
    /// Not issued with this secret and realm: altered, made up, or from another realm.
    Forged,
}

/// The secret that makes and checks nonces and the opaque value.
#[derive(Clone)]
pub struct NonceKey {
    /// HMAC-SHA256 keyed with the secret: each use clones it, rather than
    /// hashing the key again.
    keyed: Hmac<Sha256>,
    lifetime: Duration,
}

impl fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NonceKey")
            .field("secret", &"***")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl NonceKey {
    /// A key from the configured secret; nonces live `lifetime`.
    pub fn new(secret: &[u8], lifetime: Duration) -> NonceKey {
        NonceKey {
            keyed: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length"),
            lifetime,
        }
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(label);
        for part in parts {
            // Length-prefixed, so that no two different inputs read the same.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// A nonce for `realm`, made at `now` (seconds since the Unix epoch).
    pub fn issue(&self, realm: &str, now: u64) -> String {
        let timestamp = now.to_be_bytes();
        let tag = self
            .mac(b"lime-server nonce", &[&timestamp, realm.as_bytes()])
            .finalize()
            .into_bytes();
        let mut bytes = Vec::with_capacity(8 + NONCE_MAC_LEN);
        bytes.extend_from_slice(&timestamp);
        bytes.extend_from_slice(&tag[..NONCE_MAC_LEN]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Whether `nonce` was issued for `realm` with this secret, and how long ago.
    pub fn check(&self, nonce: &str, realm: &str, now: u64) -> NonceState {
        let Ok(bytes) = URL_SAFE_NO_PAD.decode(nonce) else {
            return NonceState::Forged;
        };
        if bytes.len() != 8 + NONCE_MAC_LEN {
            return NonceState::Forged;
        }
        let (timestamp, tag) = bytes.split_at(8);
        let genuine = self
            .mac(b"lime-server nonce", &[timestamp, realm.as_bytes()])
            .verify_truncated_left(tag)
            .is_ok();
        if !genuine {
            return NonceState::Forged;
        }
        let issued = u64::from_be_bytes(timestamp.try_into().expect("8 bytes"));
        if issued > now.saturating_add(NONCE_CLOCK_SKEW.as_secs()) {
            return NonceState::Forged;
        }
        if now.saturating_sub(issued) > self.lifetime.as_secs() {
            NonceState::Stale
        } else {
            NonceState::Fresh
        }
    }

    /// The `opaque` of challenges for `realm`: clients send it back unchanged.
    pub fn opaque(&self, realm: &str) -> String {
        let tag = self
            .mac(b"lime-server opaque", &[realm.as_bytes()])
            .finalize()
            .into_bytes();
        hex::encode(&tag[..16])
    }
}

/// The `WWW-Authenticate` values of a 401: one challenge per algorithm, in order.
pub fn challenges(
    key: &NonceKey,
    realm: &str,
    algorithms: &[DigestAlgorithm],
    stale: bool,
    now: u64,
) -> Vec<String> {
    let nonce = key.issue(realm, now);
    let opaque = key.opaque(realm);
    let realm = quote(realm);
    algorithms
        .iter()
        .map(|algorithm| {
            let mut challenge = format!(
                "Digest realm={realm}, nonce=\"{nonce}\", opaque=\"{opaque}\", qop=\"auth\", algorithm={algorithm}"
            );
            if stale {
                challenge.push_str(", stale=true");
            }
            challenge
        })
        .collect()
}

/// `value` as a quoted-string.
fn quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// Why an `Authorization` header is not digest credentials we can check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// Another scheme (Basic, Bearer...).
    #[error("authorization scheme is not Digest")]
    NotDigest,
    /// Not `name=value` pairs separated by commas.
    #[error("malformed Digest authorization: {0}")]
    Malformed(&'static str),
    /// A parameter given twice.
    #[error("parameter {0} given twice")]
    Duplicate(String),
    /// A required parameter is absent.
    #[error("parameter {0} missing")]
    Missing(&'static str),
    /// Something this server does not do (`username*`, `userhash`, `auth-int`, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// The parameters of an `Authorization: Digest ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `username`
    pub username: String,
    /// `realm`
    pub realm: String,
    /// `nonce`
    pub nonce: String,
    /// `uri`: the request target the client hashed.
    pub uri: String,
    /// `response`: lowercase hex.
    pub response: String,
    /// `algorithm`; absent means MD5.
    pub algorithm: DigestAlgorithm,
    /// `cnonce`
    pub cnonce: String,
    /// `nc`
    pub nonce_count: String,
    /// `opaque`, when sent back.
    pub opaque: Option<String>,
}

impl Credentials {
    /// Parses an `Authorization` header value. Only `qop=auth` is accepted: it is
    /// all the challenges offer.
    pub fn parse(header: &str) -> Result<Credentials, CredentialsError> {
        let mut params = digest_params(header)?;
        if params.position("username*").is_some() {
            return Err(CredentialsError::Unsupported(
                "username* (RFC 7616 encoded user names)".into(),
            ));
        }
        if params
            .get("userhash")
            .is_some_and(|value| value.eq_ignore_ascii_case("true"))
        {
            return Err(CredentialsError::Unsupported("userhash=true".into()));
        }
        let mut take =
            |name: &'static str| params.take(name).ok_or(CredentialsError::Missing(name));
        let username = take("username")?;
        let realm = take("realm")?;
        let nonce = take("nonce")?;
        let uri = take("uri")?;
        let response = take("response")?.to_ascii_lowercase();
        let qop = take("qop")?;
        if qop != "auth" {
            return Err(CredentialsError::Unsupported(format!("qop={qop}")));
        }
        let cnonce = take("cnonce")?;
        let nonce_count = take("nc")?;
        let algorithm = algorithm_param(params.take("algorithm"))?;
        Ok(Credentials {
            username,
            realm,
            nonce,
            uri,
            response,
            algorithm,
            cnonce,
            nonce_count,
            opaque: params.take("opaque"),
        })
    }

    /// Whether the response is the one `ha1` (lowercase hex, for this algorithm)
    /// gives for `method`, compared in constant time.
    pub fn response_matches(&self, ha1: &str, method: &str) -> bool {
        let expected = response(
            self.algorithm,
            ha1,
            method,
            &self.uri,
            &self.nonce,
            &self.nonce_count,
            &self.cnonce,
        );
        expected
            .as_str()
            .as_bytes()
            .ct_eq(self.response.as_bytes())
            .into()
    }
}

/// The `qop=auth` response (RFC 7616 section 3.4.1) that `ha1` gives for a
/// request: what a client sends and what a server expects.
fn response(
    algorithm: DigestAlgorithm,
    ha1: &str,
    method: &str,
    uri: &str,
    nonce: &str,
    nonce_count: &str,
    cnonce: &str,
) -> HexDigest {
    let ha2 = algorithm.hex_of_joined(&[method, uri]);
    algorithm.hex_of_joined(&[ha1, nonce, nonce_count, cnonce, "auth", ha2.as_str()])
}

/// One `WWW-Authenticate: Digest ...` challenge, as a client answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `realm`
    pub realm: String,
    /// `nonce`
    pub nonce: String,
    /// `opaque`, to send back.
    pub opaque: Option<String>,
    /// `algorithm`; absent means MD5.
    pub algorithm: DigestAlgorithm,
    /// `stale=true`: the credentials were right, the nonce too old.
    pub stale: bool,
}

impl Challenge {
    /// Parses a `WWW-Authenticate` value; only challenges that offer `qop=auth`
    /// with MD5 or SHA-256 can be answered.
    pub fn parse(header: &str) -> Result<Challenge, CredentialsError> {
        let mut params = digest_params(header)?;
        let mut take =
            |name: &'static str| params.take(name).ok_or(CredentialsError::Missing(name));
        let realm = take("realm")?;
        let nonce = take("nonce")?;
        let qop = take("qop")?;
        if !qop.split(',').any(|option| option.trim() == "auth") {
            return Err(CredentialsError::Unsupported(format!("qop={qop}")));
        }
        let algorithm = algorithm_param(params.take("algorithm"))?;
        Ok(Challenge {
            realm,
            nonce,
            opaque: params.take("opaque"),
            algorithm,
            stale: params
                .take("stale")
                .is_some_and(|stale| stale.eq_ignore_ascii_case("true")),
        })
    }
}

/// The `Authorization` value answering `challenge` for `method` on `uri` with
/// `ha1` (of the challenge's algorithm), as request number `nonce_count` on
/// its nonce.
pub fn authorization(
    challenge: &Challenge,
    username: &str,
    ha1: &str,
    method: &str,
    uri: &str,
    nonce_count: u32,
    cnonce: &str,
) -> String {
    let nc = format!("{nonce_count:08x}");
    let response = response(
        challenge.algorithm,
        ha1,
        method,
        uri,
        &challenge.nonce,
        &nc,
        cnonce,
    );
    let mut header = format!(
        "Digest username={}, realm={}, nonce={}, uri={}, algorithm={}, qop=auth, nc={nc}, \
         cnonce={}, response=\"{}\"",
        quote(username),
        quote(&challenge.realm),
        quote(&challenge.nonce),
        quote(uri),
        challenge.algorithm,
        quote(cnonce),
        response.as_str(),
    );
    if let Some(opaque) = &challenge.opaque {
        header.push_str(&format!(", opaque={}", quote(opaque)));
    }
    header
}

/// The most parameters a `Digest` header may have: RFC 7616 defines 13, and a
/// client sends about 10. Bounds the checks for a name given twice.
const MAX_PARAMS: usize = 32;

/// The parameters of a `Digest` header value, in the order given: names as
/// sent (compared without regard to case), values unquoted, borrowed from the
/// header unless they held an escape.
struct Params<'a>(Vec<(&'a str, Cow<'a, str>)>);

impl Params<'_> {
    fn position(&self, name: &str) -> Option<usize> {
        self.0
            .iter()
            .position(|(given, _)| given.eq_ignore_ascii_case(name))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.position(name).map(|index| &*self.0[index].1)
    }

    /// Takes the value of `name` out.
    fn take(&mut self, name: &str) -> Option<String> {
        let index = self.position(name)?;
        Some(self.0.swap_remove(index).1.into_owned())
    }
}

/// The parameters of a `Digest ...` header value (`Authorization` or
/// `WWW-Authenticate`).
fn digest_params(header: &str) -> Result<Params<'_>, CredentialsError> {
    let header = header.trim_start();
    let (scheme, rest) = header.split_once([' ', '\t']).unwrap_or((header, ""));
    if !scheme.eq_ignore_ascii_case("Digest") {
        return Err(CredentialsError::NotDigest);
    }
    parse_params(rest)
}

/// The `algorithm` parameter, case-insensitive; absent means MD5.
fn algorithm_param(name: Option<String>) -> Result<DigestAlgorithm, CredentialsError> {
    match name.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("MD5") => Ok(DigestAlgorithm::Md5),
        Some("SHA-256") => Ok(DigestAlgorithm::Sha256),
        Some(_) => Err(CredentialsError::Unsupported(format!(
            "algorithm={}",
            name.unwrap_or_default()
        ))),
    }
}

/// Splits `name=token, name="quoted string", ...` into names and values.
fn parse_params(mut input: &str) -> Result<Params<'_>, CredentialsError> {
    let mut params = Params(Vec::with_capacity(12));
    loop {
        input = input.trim_start_matches([' ', '\t', ',']);
        if input.is_empty() {
            return Ok(params);
        }
        let (name, rest) = input
            .split_once('=')
            .ok_or(CredentialsError::Malformed("parameter without '='"))?;
        let name = name.trim();
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(CredentialsError::Malformed("bad parameter name"));
        }
        let rest = rest.trim_start();
        let (value, rest) = if let Some(quoted) = rest.strip_prefix('"') {
            unquote(quoted)?
        } else {
            let end = rest.find([',', ' ', '\t']).unwrap_or(rest.len());
            (Cow::Borrowed(&rest[..end]), &rest[end..])
        };
        let rest = rest.trim_start_matches([' ', '\t']);
        if !(rest.is_empty() || rest.starts_with(',')) {
            return Err(CredentialsError::Malformed("text after a parameter value"));
        }
        if params.position(name).is_some() {
            return Err(CredentialsError::Duplicate(name.to_ascii_lowercase()));
        }
        if params.0.len() == MAX_PARAMS {
            return Err(CredentialsError::Malformed("too many parameters"));
        }
        params.0.push((name, value));
        input = rest;
    }
}

/// Reads a quoted-string whose opening quote is consumed; returns it and the rest.
fn unquote(input: &str) -> Result<(Cow<'_, str>, &str), CredentialsError> {
    // Mostly no escape: the value is a slice of the header.
    match input.find(['"', '\\']) {
        Some(end) if input.as_bytes()[end] == b'"' => {
            return Ok((Cow::Borrowed(&input[..end]), &input[end + 1..]));
        }
        None => return Err(CredentialsError::Malformed("unterminated quoted string")),
        Some(_) => {}
    }
    let mut value = String::new();
    let mut chars = input.char_indices();
    while let Some((index, c)) = chars.next() {
        match c {
            '"' => return Ok((Cow::Owned(value), &input[index + 1..])),
            '\\' => match chars.next() {
                Some((_, escaped)) => value.push(escaped),
                None => break,
            },
            c => value.push(c),
        }
    }
    Err(CredentialsError::Malformed("unterminated quoted string"))
}

fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_790_000_000;

    fn key() -> NonceKey {
        NonceKey::new(b"a secret of the operator", Duration::from_secs(300))
    }

    /// RFC 7616 section 3.9.1: the SHA-256 and MD5 examples, checked end to end.
    #[test]
    fn rfc_7616_examples_verify() {
        let header = |algorithm: &str, response: &str| {
            format!(
                r#"Digest username="Mufasa", realm="http-auth@example.org", uri="/dir/index.html", algorithm={algorithm}, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", nc=00000001, cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", qop=auth, response="{response}", opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS""#
            )
        };
        let cases = [
            (
                DigestAlgorithm::Sha256,
                "SHA-256",
                "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            ),
            (
                DigestAlgorithm::Md5,
                "MD5",
                "8ca523f5e9506fed4657c9700eebdbec",
            ),
        ];
        for (algorithm, name, response) in cases {
            let credentials = Credentials::parse(&header(name, response)).unwrap();
            assert_eq!(credentials.algorithm, algorithm);
            let ha1 = algorithm.ha1("Mufasa", "http-auth@example.org", "Circle of Life");
            assert!(credentials.response_matches(&ha1, "GET"), "{name}");
            let wrong = algorithm.ha1("Mufasa", "http-auth@example.org", "Circle of life");
            assert!(!credentials.response_matches(&wrong, "GET"), "{name}");
            assert!(!credentials.response_matches(&ha1, "POST"), "{name}");
        }
    }

    #[test]
    fn nonces_are_checked_statelessly() {
        let nonce = key().issue("example.org", NOW);
        // Another instance with the same secret accepts it.
        let other = NonceKey::new(b"a secret of the operator", Duration::from_secs(300));
        assert_eq!(
            other.check(&nonce, "example.org", NOW + 10),
            NonceState::Fresh
        );
        assert_eq!(
            other.check(&nonce, "example.org", NOW + 300),
            NonceState::Fresh
        );
        assert_eq!(
            other.check(&nonce, "example.org", NOW + 301),
            NonceState::Stale
        );
        assert_eq!(key().check(&nonce, "example.net", NOW), NonceState::Forged);
        let stranger = NonceKey::new(b"another secret", Duration::from_secs(300));
        assert_eq!(
            stranger.check(&nonce, "example.org", NOW),
            NonceState::Forged
        );
    }

    #[test]
    fn altered_or_future_nonces_are_forged() {
        let nonce = key().issue("example.org", NOW);
        let mut bytes = URL_SAFE_NO_PAD.decode(&nonce).unwrap();
        for index in 0..bytes.len() {
            bytes[index] ^= 1;
            let altered = URL_SAFE_NO_PAD.encode(&bytes);
            assert_eq!(
                key().check(&altered, "example.org", NOW),
                NonceState::Forged
            );
            bytes[index] ^= 1;
        }
        assert_eq!(key().check("", "example.org", NOW), NonceState::Forged);
        assert_eq!(key().check("!!", "example.org", NOW), NonceState::Forged);
        let future = key().issue("example.org", NOW + 3600);
        assert_eq!(key().check(&future, "example.org", NOW), NonceState::Forged);
    }

    #[test]
    fn challenges_name_algorithms_exactly_and_in_order() {
        let values = challenges(
            &key(),
            "example.org",
            &[DigestAlgorithm::Sha256, DigestAlgorithm::Md5],
            false,
            NOW,
        );
        assert_eq!(values.len(), 2);
        assert!(
            values[0].ends_with("qop=\"auth\", algorithm=SHA-256"),
            "{}",
            values[0]
        );
        assert!(
            values[1].ends_with("qop=\"auth\", algorithm=MD5"),
            "{}",
            values[1]
        );
        assert!(values[0].starts_with("Digest realm=\"example.org\", nonce=\""));
        let stale = challenges(&key(), "example.org", &[DigestAlgorithm::Md5], true, NOW);
        assert!(stale[0].ends_with(", stale=true"));
        // The digest_auth crate (a client) reads what we send.
        let parsed = digest_auth::parse(&values[0]).unwrap();
        assert_eq!(parsed.realm, "example.org");
        assert_eq!(
            parsed.opaque.as_deref(),
            Some(key().opaque("example.org").as_str())
        );
    }

    #[test]
    fn quoted_strings_and_tokens_parse() {
        let credentials = Credentials::parse(
            r#"digest username="a\"b", realm="r", nonce="n", uri="/", response="ABC", qop=auth, nc=00000001, cnonce="c""#,
        )
        .unwrap();
        assert_eq!(credentials.username, "a\"b");
        assert_eq!(credentials.response, "abc");
        assert_eq!(credentials.algorithm, DigestAlgorithm::Md5);
        assert_eq!(credentials.opaque, None);
    }

    #[test]
    fn bad_headers_are_refused_with_the_reason() {
        let full = r#"username="u", realm="r", nonce="n", uri="/", response="x", qop=auth, nc=1, cnonce="c""#;
        assert_eq!(
            Credentials::parse("Basic dTpw"),
            Err(CredentialsError::NotDigest)
        );
        assert_eq!(
            Credentials::parse(&format!("Digest {full}, realm=\"s\"")),
            Err(CredentialsError::Duplicate("realm".into()))
        );
        assert_eq!(
            Credentials::parse(r#"Digest username="u", realm="r""#),
            Err(CredentialsError::Missing("nonce"))
        );
        assert!(matches!(
            Credentials::parse(&format!("Digest {full}, algorithm=SHA-512-256")),
            Err(CredentialsError::Unsupported(_))
        ));
        assert!(matches!(
            Credentials::parse(&format!(
                "Digest {}",
                full.replace("qop=auth", "qop=auth-int")
            )),
            Err(CredentialsError::Unsupported(_))
        ));
        assert!(matches!(
            Credentials::parse(r#"Digest username="unterminated"#),
            Err(CredentialsError::Malformed(_))
        ));
        assert!(matches!(
            Credentials::parse(r#"Digest username="u" junk, realm="r""#),
            Err(CredentialsError::Malformed(_))
        ));
        // Names are compared without regard to case.
        assert_eq!(
            Credentials::parse(&format!("Digest {full}, Realm=\"s\"")),
            Err(CredentialsError::Duplicate("realm".into()))
        );
        // A header of a thousand parameters is refused at the 33rd, before the
        // checks for a name given twice could cost more.
        let many: Vec<String> = (0..1000).map(|i| format!("x{i}=1")).collect();
        assert_eq!(
            Credentials::parse(&format!("Digest {full}, {}", many.join(", "))),
            Err(CredentialsError::Malformed("too many parameters"))
        );
    }

    #[test]
    fn quoted_values_with_and_without_escapes_read_the_same() {
        let params = parse_params(r#"a="plain", b="with \"quotes\" and \\", c=token"#).unwrap();
        assert_eq!(params.get("A"), Some("plain"));
        assert!(
            matches!(params.0[0].1, Cow::Borrowed(_)),
            "no copy without escapes"
        );
        assert_eq!(params.get("b"), Some(r#"with "quotes" and \"#));
        assert_eq!(params.get("c"), Some("token"));
    }

    #[test]
    fn a_response_from_the_digest_auth_crate_verifies() {
        for (name, algorithm) in [
            ("SHA-256", DigestAlgorithm::Sha256),
            ("MD5", DigestAlgorithm::Md5),
        ] {
            let challenge = challenges(&key(), "example.org", &[algorithm], false, NOW);
            let mut prompt = digest_auth::parse(&challenge[0]).unwrap();
            let context = digest_auth::AuthContext::new_post::<_, _, _, &[u8]>(
                "alice",
                "secret",
                "/lime-server/lime-server.php",
                None,
            );
            let answer = prompt.respond(&context).unwrap().to_header_string();
            let credentials = Credentials::parse(&answer).unwrap();
            assert_eq!(credentials.algorithm, algorithm, "{name}");
            assert_eq!(
                key().check(&credentials.nonce, "example.org", NOW),
                NonceState::Fresh
            );
            let ha1 = algorithm.ha1("alice", "example.org", "secret");
            assert!(credentials.response_matches(&ha1, "POST"), "{name}");
        }
    }
}
