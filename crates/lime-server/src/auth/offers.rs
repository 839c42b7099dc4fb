//! Which digest algorithms a challenge offers: only those the account can verify.
//!
//! A client holding a clear password answers the first challenge it can
//! (belle-sip: SHA-256 when offered); an account that stores only an MD5 hash
//! cannot verify that answer, and the client fails where MD5 would have worked.
//! The device id names the account before any credentials are sent
//! (`sip:user@domain;gr=...`), so the challenge offers, in the configured order,
//! the algorithms its stored passwords serve: a `CLRTXT` row serves every one, an
//! `MD5` or `SHA-256` row its own (as flexisip-account-manager does).
//!
//! Finding that out must not cost the account database a query per
//! unauthenticated request, whoever sends them:
//! - what is found, accounts unknown included, is kept for the account cache's
//!   time-to-live (`auth.digest.accounts_cache_secs`), at most [`MAX_KEPT`]
//!   accounts, the least recently used dropped first;
//! - the lookups themselves go through the password cache (the authenticated
//!   request that follows then costs no query);
//! - at most `auth.digest.challenge_lookups_per_sec` lookups a second (a GCRA from
//!   `governor`): past it, and when the database fails, a challenge offers every
//!   configured algorithm, as it did before, rather than query.
//!
//! What it tells a stranger: an account whose challenge offers fewer algorithms
//! exists and stores only those hashes; unknown accounts and accounts serving
//! every algorithm are offered the same.

use super::accounts::{AccountDatabase, PasswordAlgorithm, StoredPassword};
use super::digest::DigestAlgorithm;
use governor::clock::MonotonicClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use lru::LruCache;
use sha2::{Digest, Sha256};
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most accounts whose algorithms are kept.
pub const MAX_KEPT: usize = 100_000;

/// An account (`user`, `realm`) as a fixed-size digest, so that long names cost
/// no more memory than short ones.
type AccountKey = [u8; 16];

fn account_key(user: &str, realm: &str) -> AccountKey {
    let mut hash = Sha256::new();
    hash.update((user.len() as u64).to_be_bytes());
    hash.update(user.as_bytes());
    hash.update(realm.as_bytes());
    let digest = hash.finalize();
    let mut key = [0; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// The user part of a device id `sip:user@domain;gr=...`: the account it belongs
/// to. `None` when the device id is not of that shape.
pub fn user_of(device_id: &str) -> Option<&str> {
    super::identity::domain_of(device_id)?;
    let end = device_id.find(';')?;
    let (user, _) = device_id[..end].strip_prefix("sip:")?.rsplit_once('@')?;
    (!user.is_empty()).then_some(user)
}

/// Whether `password` can verify an answer in `algorithm`: a clear password any,
/// a hash its own algorithm's.
pub fn serves(password: &StoredPassword, algorithm: DigestAlgorithm) -> bool {
    matches!(
        (password.algorithm, algorithm),
        (PasswordAlgorithm::ClearText, _)
            | (PasswordAlgorithm::Md5, DigestAlgorithm::Md5)
            | (PasswordAlgorithm::Sha256, DigestAlgorithm::Sha256)
    )
}

/// The algorithms `stored` can verify, among `configured` and in its order; all of
/// `configured` when none (unknown account, or only unconfigured algorithms).
pub fn verifiable(
    stored: &[StoredPassword],
    configured: &[DigestAlgorithm],
) -> Vec<DigestAlgorithm> {
    let offered: Vec<_> = configured
        .iter()
        .copied()
        .filter(|algorithm| stored.iter().any(|password| serves(password, *algorithm)))
        .collect();
    if offered.is_empty() {
        configured.to_vec()
    } else {
        offered
    }
}

/// The algorithms to offer each account, found out at a bounded cost.
pub struct AlgorithmOffers {
    configured: Vec<DigestAlgorithm>,
    time_to_live: Duration,
    kept: Mutex<LruCache<AccountKey, (Instant, Vec<DigestAlgorithm>)>>,
    /// `None`: no lookup at challenge time (`challenge_lookups_per_sec = 0`).
    lookups: Option<RateLimiter<NotKeyed, InMemoryState, MonotonicClock>>,
}

impl AlgorithmOffers {
    /// Offers among `configured`, kept `time_to_live`, at most `lookups_per_sec`
    /// database lookups a second.
    pub fn new(
        configured: Vec<DigestAlgorithm>,
        time_to_live: Duration,
        lookups_per_sec: u32,
    ) -> AlgorithmOffers {
        AlgorithmOffers {
            configured,
            time_to_live,
            kept: Mutex::new(LruCache::new(
                NonZeroUsize::new(MAX_KEPT).unwrap_or(NonZeroUsize::MIN),
            )),
            lookups: NonZeroU32::new(lookups_per_sec).map(|rate| {
                RateLimiter::direct_with_clock(Quota::per_second(rate), MonotonicClock)
            }),
        }
    }

    /// Every configured algorithm, in order.
    pub fn configured(&self) -> &[DigestAlgorithm] {
        &self.configured
    }

    fn kept(
        &self,
    ) -> std::sync::MutexGuard<'_, LruCache<AccountKey, (Instant, Vec<DigestAlgorithm>)>> {
        self.kept
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Remembers what `stored` (just looked up) serves for `user@realm`.
    pub fn learn(&self, user: &str, realm: &str, stored: &[StoredPassword]) {
        if self.time_to_live.is_zero() {
            return;
        }
        let offered = verifiable(stored, &self.configured);
        self.kept()
            .put(account_key(user, realm), (Instant::now(), offered));
    }

    /// The algorithms to challenge `user@realm` with.
    pub async fn for_account(
        &self,
        accounts: &AccountDatabase,
        user: &str,
        realm: &str,
    ) -> Vec<DigestAlgorithm> {
        let key = account_key(user, realm);
        let now = Instant::now();
        if let Some((at, offered)) = self.kept().get(&key)
            && now.saturating_duration_since(*at) < self.time_to_live
        {
            return offered.clone();
        }
        let allowed = self
            .lookups
            .as_ref()
            .is_some_and(|lookups| lookups.check().is_ok());
        if !allowed {
            return self.configured.clone();
        }
        match accounts.cached_passwords(user, realm, false).await {
            Ok((stored, _)) => {
                self.learn(user, realm, &stored);
                verifiable(&stored, &self.configured)
            }
            Err(error) => {
                tracing::debug!(%error, "account lookup for a challenge failed: every algorithm offered");
                self.configured.clone()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: [DigestAlgorithm; 2] = [DigestAlgorithm::Sha256, DigestAlgorithm::Md5];

    fn rows(algorithms: &[PasswordAlgorithm]) -> Vec<StoredPassword> {
        algorithms
            .iter()
            .map(|algorithm| StoredPassword {
                algorithm: *algorithm,
                secret: "x".into(),
            })
            .collect()
    }

    #[test]
    fn each_row_serves_its_algorithms_in_the_configured_order() {
        use PasswordAlgorithm::*;
        assert_eq!(verifiable(&rows(&[Md5]), &BOTH), [DigestAlgorithm::Md5]);
        assert_eq!(
            verifiable(&rows(&[Sha256]), &BOTH),
            [DigestAlgorithm::Sha256]
        );
        assert_eq!(verifiable(&rows(&[ClearText]), &BOTH), BOTH);
        assert_eq!(verifiable(&rows(&[Md5, Sha256]), &BOTH), BOTH);
        let md5_first = [DigestAlgorithm::Md5, DigestAlgorithm::Sha256];
        assert_eq!(verifiable(&rows(&[ClearText]), &md5_first), md5_first);
    }

    #[test]
    fn nothing_verifiable_offers_everything_configured() {
        assert_eq!(verifiable(&[], &BOTH), BOTH);
        assert_eq!(
            verifiable(&rows(&[PasswordAlgorithm::Md5]), &[DigestAlgorithm::Sha256]),
            [DigestAlgorithm::Sha256]
        );
    }

    #[test]
    fn the_user_of_a_device_id() {
        assert_eq!(
            user_of("sip:alice@example.org;gr=urn:uuid:1"),
            Some("alice")
        );
        assert_eq!(user_of("sip:a@b@example.org;gr=x@y"), Some("a@b"));
        assert_eq!(user_of("sip:alice@example.org"), None);
        assert_eq!(user_of("sip:@example.org;gr=1"), None);
    }

    #[test]
    fn long_names_are_distinct_keys_of_one_size() {
        assert_ne!(account_key("a@b", "c"), account_key("a", "b@c"));
        assert_eq!(account_key(&"x".repeat(10_000), "r").len(), 16);
    }
}
