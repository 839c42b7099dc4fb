//! Failed-authentication throttling: repeated failures for one username or from
//! one client address slow the answers down, then lock the username or address out
//! for a while, so that the account database cannot be brute-forced through this
//! server.
//!
//! Counts are kept per instance, in memory: behind a load balancer with N
//! instances an attacker gets at most N times the configured attempts. The table is
//! bounded: past [`MAX_TRACKED`] entries, idle ones are dropped first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most usernames and addresses tracked at once.
pub const MAX_TRACKED: usize = 100_000;

/// Longest delay added to one answer.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// `[auth.throttle]` as the throttle uses it.
#[derive(Debug, Clone)]
pub struct ThrottlePolicy {
    /// Failures for one username, within `window`, that lock it out. 0: never.
    pub max_failures_per_user: u32,
    /// Failures from one address, within `window`, that lock it out. 0: never.
    pub max_failures_per_address: u32,
    /// Failures older than this are forgotten.
    pub window: Duration,
    /// How long a lock-out lasts.
    pub lockout: Duration,
    /// Added to the answer of each failure, times the failures so far (at most 2 s).
    pub delay_step: Duration,
}

/// Who failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    User(String),
    Address(IpAddr),
}

#[derive(Debug, Clone)]
struct Record {
    failures: u32,
    first_failure: Instant,
    locked_until: Option<Instant>,
}

impl Record {
    fn is_idle(&self, now: Instant, window: Duration) -> bool {
        self.locked_until.is_none_or(|until| until <= now)
            && now.duration_since(self.first_failure) > window
    }
}

/// A username or address locked out, and for how much longer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockedOut {
    /// `user NAME` or `address IP`, for the log line.
    pub what: String,
    /// Until the lock-out ends.
    pub retry_after: Duration,
}

/// The failure counts of one instance.
#[derive(Debug)]
pub struct Throttle {
    policy: ThrottlePolicy,
    records: Mutex<HashMap<Key, Record>>,
}

impl Throttle {
    /// An empty throttle.
    pub fn new(policy: ThrottlePolicy) -> Throttle {
        Throttle {
            policy,
            records: Mutex::new(HashMap::new()),
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Record>> {
        // A panic while holding the lock leaves counts that are still counts.
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Refuses an attempt by `username` from `address` while either is locked out.
    pub fn check(&self, username: &str, address: IpAddr, now: Instant) -> Result<(), LockedOut> {
        let records = self.records();
        for key in [Key::User(username.to_owned()), Key::Address(address)] {
            if let Some(until) = records.get(&key).and_then(|record| record.locked_until) {
                if until > now {
                    return Err(LockedOut {
                        what: describe(&key),
                        retry_after: until - now,
                    });
                }
            }
        }
        Ok(())
    }

    /// Counts a failure; returns how long to wait before answering it.
    pub fn failure(&self, username: &str, address: IpAddr, now: Instant) -> Duration {
        let policy = &self.policy;
        let mut records = self.records();
        if records.len() >= MAX_TRACKED {
            records.retain(|_, record| !record.is_idle(now, policy.window));
        }
        let mut worst = 0;
        for (key, limit) in [
            (Key::User(username.to_owned()), policy.max_failures_per_user),
            (Key::Address(address), policy.max_failures_per_address),
        ] {
            if records.len() >= MAX_TRACKED && !records.contains_key(&key) {
                // Full of live records: count nothing new rather than grow.
                continue;
            }
            let record = records.entry(key.clone()).or_insert(Record {
                failures: 0,
                first_failure: now,
                locked_until: None,
            });
            if record.is_idle(now, policy.window) {
                *record = Record {
                    failures: 0,
                    first_failure: now,
                    locked_until: None,
                };
            }
            record.failures += 1;
            worst = worst.max(record.failures);
            if limit > 0 && record.failures >= limit {
                tracing::warn!(
                    locked = describe(&key),
                    failures = record.failures,
                    lockout = ?policy.lockout,
                    "authentication: too many failures, locked out"
                );
                record.locked_until = Some(now + policy.lockout);
                record.failures = 0;
                record.first_failure = now;
            }
        }
        policy.delay_step.saturating_mul(worst).min(MAX_DELAY)
    }

    /// Forgets the failures of `username` after it authenticated. The address keeps
    /// its count: one good account must not reset an attack on others.
    pub fn success(&self, username: &str) {
        let mut records = self.records();
        let key = Key::User(username.to_owned());
        if records
            .get(&key)
            .is_some_and(|record| record.locked_until.is_none())
        {
            records.remove(&key);
        }
    }
}

fn describe(key: &Key) -> String {
    match key {
        Key::User(name) => format!("user {name}"),
        Key::Address(address) => format!("address {address}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> Throttle {
        Throttle::new(ThrottlePolicy {
            max_failures_per_user: 3,
            max_failures_per_address: 5,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(30),
            delay_step: Duration::from_millis(100),
        })
    }

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const AWAY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn failures_slow_down_then_lock_the_user_out_for_the_lockout() {
        let throttle = throttle();
        let start = Instant::now();
        assert_eq!(
            throttle.failure("alice", HOME, start),
            Duration::from_millis(100)
        );
        assert_eq!(
            throttle.failure("alice", AWAY, start),
            Duration::from_millis(200)
        );
        assert!(throttle.check("alice", HOME, start).is_ok());
        throttle.failure("alice", HOME, start);
        let locked = throttle.check("alice", AWAY, start).unwrap_err();
        assert_eq!(locked.what, "user alice");
        assert_eq!(locked.retry_after, Duration::from_secs(30));
        // Other users from the same address are not locked out by alice's lock.
        assert!(throttle.check("bob", AWAY, start).is_ok());
        // Still locked a second before the end, free after.
        let later = start + Duration::from_secs(29);
        assert!(throttle.check("alice", AWAY, later).is_err());
        assert!(
            throttle
                .check("alice", AWAY, later + Duration::from_secs(1))
                .is_ok()
        );
    }

    #[test]
    fn an_address_trying_many_users_is_locked_out() {
        let throttle = throttle();
        let now = Instant::now();
        for user in ["a", "b", "c", "d", "e"] {
            assert!(throttle.check(user, HOME, now).is_ok());
            throttle.failure(user, HOME, now);
        }
        assert_eq!(
            throttle.check("f", HOME, now).unwrap_err().what,
            "address 192.0.2.1"
        );
        assert!(throttle.check("f", AWAY, now).is_ok());
    }

    #[test]
    fn old_failures_are_forgotten_and_success_resets_the_user() {
        let throttle = throttle();
        let now = Instant::now();
        throttle.failure("alice", HOME, now);
        throttle.failure("alice", HOME, now);
        let later = now + Duration::from_secs(61);
        throttle.failure("alice", HOME, later);
        assert!(throttle.check("alice", HOME, later).is_ok());
        throttle.success("alice");
        throttle.failure("alice", HOME, later);
        throttle.failure("alice", HOME, later);
        assert!(throttle.check("alice", HOME, later).is_ok());
    }

    #[test]
    fn success_does_not_lift_a_lockout() {
        let throttle = throttle();
        let now = Instant::now();
        for _ in 0..3 {
            throttle.failure("alice", HOME, now);
        }
        throttle.success("alice");
        assert!(throttle.check("alice", HOME, now).is_err());
    }

    #[test]
    fn delays_are_capped() {
        let throttle = Throttle::new(ThrottlePolicy {
            max_failures_per_user: 0,
            max_failures_per_address: 0,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(30),
            delay_step: Duration::from_secs(1),
        });
        let now = Instant::now();
        for _ in 0..10 {
            assert!(throttle.failure("alice", HOME, now) <= MAX_DELAY);
        }
        assert!(throttle.check("alice", HOME, now).is_ok());
    }
}
