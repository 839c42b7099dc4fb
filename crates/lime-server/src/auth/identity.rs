//! The one ownership rule every authentication method applies: which device ids
//! an authenticated identity may act for.
//!
//! An identity is a SIP user URI, `sip:alice@example.org`; a device id is a GRUU,
//! `sip:alice@example.org;gr=urn:uuid:...`. The identity owns the device id when the
//! device id starts with exactly the identity followed by `;gr=`. The comparison is
//! literal and case-sensitive: no URI normalisation, no pattern, so what an operator
//! sees in a certificate or a password file is exactly what is compared.
//!
//! This module decides nothing about how an identity was proven; digest and
//! client-certificate authentication each bring theirs here.

/// What separates the identity from the rest of a device id.
const GRUU_PARAMETER: &str = ";gr=";

/// The only scheme an identity or a device id may have. `sips:` is not accepted:
/// LIME device ids are `sip:` GRUUs, and accepting a second spelling of the same
/// user would let one identity own devices registered under the other.
const SIP_SCHEME: &str = "sip:";

/// True when `user_uri` (`sip:USER@DOMAIN`) owns `device_id`
/// (`sip:USER@DOMAIN;gr=...`).
///
/// An identity without the `sip:` scheme, with an empty user or domain, or with URI
/// parameters (a `;`) owns nothing.
pub fn owns_device(user_uri: &str, device_id: &str) -> bool {
    if split_user_uri(user_uri).is_none() {
        return false;
    }
    device_id
        .strip_prefix(user_uri)
        .is_some_and(|rest| rest.starts_with(GRUU_PARAMETER))
}

/// The identity of `username` in `domain`: `sip:{username}@{domain}`.
pub fn user_uri(username: &str, domain: &str) -> String {
    format!("{SIP_SCHEME}{username}@{domain}")
}

/// The domain of a device id `sip:USER@DOMAIN;gr=...`, or `None` when the id is not
/// of that shape.
///
/// The domain is what lies between the last `@` before the first `;` and that `;`.
/// It is `Some(domain)` exactly when some `sip:USER@domain` owns the device id.
pub fn domain_of(device_id: &str) -> Option<&str> {
    let end = device_id.find(';')?;
    if !device_id[end..].starts_with(GRUU_PARAMETER) {
        return None;
    }
    split_user_uri(&device_id[..end]).map(|(_, domain)| domain)
}

/// Splits `sip:USER@DOMAIN` into its user and domain, both non-empty, with no `;`.
fn split_user_uri(user_uri: &str) -> Option<(&str, &str)> {
    let address = user_uri.strip_prefix(SIP_SCHEME)?;
    if address.contains(';') {
        return None;
    }
    let (user, domain) = address.rsplit_once('@')?;
    (!user.is_empty() && !domain.is_empty()).then_some((user, domain))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "sip:alice@example.org";

    #[test]
    fn identity_owns_its_devices() {
        assert!(owns_device(ALICE, "sip:alice@example.org;gr=urn:uuid:1234"));
        assert!(owns_device(ALICE, "sip:alice@example.org;gr=1"));
    }

    #[test]
    fn longer_domain_is_not_owned() {
        assert!(!owns_device(ALICE, "sip:alice@example.org.evil.com;gr=x"));
    }

    #[test]
    fn identity_prefix_of_another_user_owns_nothing() {
        assert!(!owns_device("sip:alic", "sip:alice@example.org;gr=1"));
        assert!(!owns_device(
            "sip:alice@example.or",
            "sip:alice@example.org;gr=1"
        ));
        assert!(!owns_device(ALICE, "sip:alice@example.org.;gr=1"));
    }

    #[test]
    fn other_user_in_same_domain_is_not_owned() {
        assert!(!owns_device(ALICE, "sip:bob@example.org;gr=1"));
        assert!(!owns_device(
            "sip:bob@example.org",
            "sip:alice@example.org;gr=1"
        ));
    }

    #[test]
    fn device_needs_the_gruu_parameter_right_after_the_identity() {
        assert!(!owns_device(ALICE, ALICE));
        assert!(!owns_device(
            ALICE,
            "sip:alice@example.org;transport=tcp;gr=1"
        ));
        assert!(!owns_device(ALICE, "sip:alice@example.org;GR=1"));
        assert!(!owns_device(ALICE, "sip:alice@example.org gr=1"));
    }

    #[test]
    fn comparison_is_case_sensitive() {
        assert!(!owns_device(ALICE, "sip:Alice@example.org;gr=1"));
        assert!(!owns_device(ALICE, "sip:alice@EXAMPLE.org;gr=1"));
        assert!(!owns_device(
            "SIP:alice@example.org",
            "SIP:alice@example.org;gr=1"
        ));
    }

    #[test]
    fn identity_without_sip_scheme_owns_nothing() {
        assert!(!owns_device(
            "sips:alice@example.org",
            "sips:alice@example.org;gr=1"
        ));
        assert!(!owns_device("alice@example.org", "alice@example.org;gr=1"));
        assert!(!owns_device(
            "https:alice@example.org",
            "https:alice@example.org;gr=1"
        ));
        assert!(!owns_device("", ";gr=1"));
    }

    #[test]
    fn identity_with_empty_user_or_domain_owns_nothing() {
        assert!(!owns_device("sip:@example.org", "sip:@example.org;gr=1"));
        assert!(!owns_device("sip:alice@", "sip:alice@;gr=1"));
        assert!(!owns_device("sip:example.org", "sip:example.org;gr=1"));
        assert!(!owns_device("sip:", "sip:;gr=1"));
    }

    #[test]
    fn identity_with_parameters_owns_nothing() {
        assert!(!owns_device(
            "sip:alice@example.org;gr=1",
            "sip:alice@example.org;gr=1;gr=2"
        ));
    }

    #[test]
    fn user_uri_joins_user_and_domain() {
        assert_eq!(user_uri("alice", "example.org"), ALICE);
        assert!(owns_device(
            &user_uri("alice", "example.org"),
            "sip:alice@example.org;gr=1"
        ));
    }

    #[test]
    fn domain_of_a_device_id() {
        assert_eq!(
            domain_of("sip:alice@example.org;gr=urn:uuid:1"),
            Some("example.org")
        );
        // The last '@' before the ';' starts the domain; '@' after it do not count.
        assert_eq!(domain_of("sip:a@b@example.org;gr=x@y"), Some("example.org"));
    }

    #[test]
    fn domain_of_something_else_is_none() {
        assert_eq!(domain_of(ALICE), None);
        assert_eq!(domain_of("sip:example.org;gr=1"), None);
        assert_eq!(domain_of("sip:@example.org;gr=1"), None);
        assert_eq!(domain_of("sip:alice@;gr=1"), None);
        assert_eq!(domain_of("sips:alice@example.org;gr=1"), None);
        assert_eq!(domain_of("alice@example.org;gr=1"), None);
        assert_eq!(domain_of("sip:alice@example.org;transport=tcp"), None);
        assert_eq!(domain_of(""), None);
    }

    #[test]
    fn domain_of_agrees_with_ownership() {
        for device_id in [
            "sip:alice@example.org;gr=1",
            "sip:a@b@example.org;gr=1",
            "sip:alice@example.org.evil.com;gr=x",
        ] {
            let domain = domain_of(device_id).unwrap();
            let user = device_id[SIP_SCHEME.len()..]
                .rsplit_once(&format!("@{domain};"))
                .unwrap()
                .0;
            assert!(owns_device(&user_uri(user, domain), device_id));
        }
    }
}
