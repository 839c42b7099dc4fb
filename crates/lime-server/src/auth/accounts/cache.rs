//! Stored passwords kept for a short while, so that an account's requests do not
//! cost the account database a query each: neither a client reusing its digest
//! nonce, nor Linphone's way (every request challenged with a 401, whose offered
//! algorithms are looked up, then sent again with credentials). Only accounts found are kept; a password that
//! does not match what is kept is looked up again before the attempt counts as a
//! failure (see `Authenticator`), so a changed password works at once. A deleted
//! account keeps working for at most the time-to-live.

use super::StoredPassword;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most accounts kept at once.
const MAX_ENTRIES: usize = 100_000;

/// Password rows by (username, domain), each with the time it was looked up.
type Entries = HashMap<(String, String), (Instant, Vec<StoredPassword>)>;

/// Accounts looked up lately.
#[derive(Debug)]
pub(super) struct PasswordCache {
    time_to_live: Duration,
    entries: Mutex<Entries>,
}

impl PasswordCache {
    pub(super) fn new(time_to_live: Duration) -> PasswordCache {
        PasswordCache {
            time_to_live,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The rows looked up less than the time-to-live ago.
    pub(super) fn get(
        &self,
        username: &str,
        domain: &str,
        now: Instant,
    ) -> Option<Vec<StoredPassword>> {
        let key = (username.to_owned(), domain.to_owned());
        let entries = self.entries();
        let (at, rows) = entries.get(&key)?;
        (now.duration_since(*at) < self.time_to_live).then(|| rows.clone())
    }

    /// Keeps the rows of an account found.
    pub(super) fn put(&self, username: &str, domain: &str, rows: &[StoredPassword], now: Instant) {
        if rows.is_empty() {
            return;
        }
        let mut entries = self.entries();
        if entries.len() >= MAX_ENTRIES {
            let time_to_live = self.time_to_live;
            entries.retain(|_, (at, _)| now.duration_since(*at) < time_to_live);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(
            (username.to_owned(), domain.to_owned()),
            (now, rows.to_vec()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::accounts::PasswordAlgorithm;

    fn rows(secret: &str) -> Vec<StoredPassword> {
        vec![StoredPassword {
            algorithm: PasswordAlgorithm::ClearText,
            secret: secret.to_owned(),
        }]
    }

    #[test]
    fn accounts_found_are_kept_for_the_time_to_live() {
        let cache = PasswordCache::new(Duration::from_secs(30));
        let now = Instant::now();
        assert_eq!(cache.get("alice", "example.org", now), None);
        cache.put("alice", "example.org", &rows("one"), now);
        assert_eq!(cache.get("alice", "example.org", now), Some(rows("one")));
        assert_eq!(cache.get("alice", "example.net", now), None);
        let later = now + Duration::from_secs(30);
        assert_eq!(cache.get("alice", "example.org", later), None);
    }

    #[test]
    fn unknown_accounts_are_not_kept() {
        let cache = PasswordCache::new(Duration::from_secs(30));
        let now = Instant::now();
        cache.put("nobody", "example.org", &[], now);
        assert_eq!(cache.get("nobody", "example.org", now), None);
    }
}
