//! Failed-authentication throttling: what stops the account database from being
//! brute-forced through this server, without letting a stranger lock a real user
//! out.
//!
//! Failures are counted against three keys, in one table:
//!
//! - the **source**: an IPv4 address, or the /64 of an IPv6 address (one IPv6
//!   customer holds a /64 or more, so counting per /128 would count nothing).
//!   Past `max_failures_per_address` the source is locked out, every user;
//! - the **account at that source**, `user@realm` from that source. Past
//!   `max_failures_per_user` that pair is locked out: the right password from
//!   there is refused too, so a guesser there learns nothing. Nobody else is;
//! - the **account**, `user@realm` from anywhere. Once its failures pass
//!   `max_failures_per_user` *and come from more than one source*, the account
//!   is paced: one attempt per `lockout / max_failures_per_user` from sources it
//!   has not authenticated from, the others answered 429 untried. A guesser
//!   spread over many addresses is held to the rate a single one had; the user,
//!   from where it authenticated before (a *proven* source), is not held up.
//!
//! A failure that tested no password (a nonce this server did not issue, another
//! realm, an altered opaque) counts against the source only: it proves nothing
//! about the account, and must not let a stranger lock it.
//!
//! Memory is bounded and reaching the bound never stops the counting: the table
//! holds at most `max_tracked` entries and evicts the least recently failed one.
//! Failures are also capped for the whole instance (`max_failures_per_sec`, a
//! GCRA from `governor`): past the cap, every attempt from a source not proven
//! for its account is answered 429 untried until the rate drops. So the table
//! fills at most that fast, and with `max_tracked` above three entries per failure
//! over the window, what flooding evicts is already forgotten.
//!
//! Counts are per instance, in memory: behind a load balancer with N instances an
//! attacker gets at most N times the attempts; a restart forgets them.

use crate::telemetry::clip;
use governor::clock::{Clock, MonotonicClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use lru::LruCache;
use sha2::{Digest, Sha256};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest delay added to the answer of one failure.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// How long a source stays proven for an account after it authenticated there.
pub const PROVEN_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most often the "past the global cap" warning is logged.
const SATURATION_LOG_EVERY: Duration = Duration::from_secs(10);

/// `[auth.throttle]` as the throttle uses it.
#[derive(Debug, Clone)]
pub struct ThrottlePolicy {
    /// Failures for one account from one source, within `window`, that lock that
    /// pair out; from several sources, that pace the account. 0: never.
    pub max_failures_per_user: u32,
    /// Failures from one source, within `window`, that lock it out. 0: never.
    pub max_failures_per_address: u32,
    /// Failures per second for the whole instance; past it, unproven attempts are
    /// refused untried. 0: no cap.
    pub max_failures_per_sec: u32,
    /// Most entries kept (failure counts, and proven sources, each).
    pub max_tracked: usize,
    /// Failures older than this are forgotten.
    pub window: Duration,
    /// How long a lock-out lasts.
    pub lockout: Duration,
    /// Added to the answer of each failure, times the failures so far (at most 2 s).
    pub delay_step: Duration,
}

impl ThrottlePolicy {
    /// The least time between two attempts from unproven sources on a paced
    /// account: `max_failures_per_user` attempts per `lockout`, what one source
    /// gets before it is locked out.
    pub fn account_pace(&self) -> Duration {
        match self.max_failures_per_user {
            0 => Duration::ZERO,
            failures => self.lockout / failures,
        }
    }

    /// The entries a failure rate at the cap fills within a window (or a
    /// lock-out, whichever is longer): three keys per failure. A table this large
    /// is never made to forget a live count by flooding.
    pub fn entries_at_cap(&self) -> u64 {
        let horizon = self.window.max(self.lockout).as_secs();
        3 * u64::from(self.max_failures_per_sec) * horizon
    }
}

/// Where attempts come from, as counted: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// One IPv4 address (IPv4-mapped IPv6 addresses included).
    V4(Ipv4Addr),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl Source {
    /// The source an address counts as.
    pub fn of(address: IpAddr) -> Source {
        match address {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(v4) => write!(f, "{v4}"),
            Source::V6(prefix) => write!(f, "{}/64", Ipv6Addr::from(u128::from(*prefix) << 64)),
        }
    }
}

/// An account, `user@realm`, as a fixed-size digest: a long user name costs the
/// table no more than a short one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Account([u8; 16]);

impl Account {
    fn of(user: &str, realm: &str) -> Account {
        let mut hash = Sha256::new();
        // Length-prefixed: ("a@b", "c") and ("a", "b@c") differ.
        hash.update((user.len() as u64).to_be_bytes());
        hash.update(user.as_bytes());
        hash.update(realm.as_bytes());
        let digest = hash.finalize();
        let mut bytes = [0; 16];
        bytes.copy_from_slice(&digest[..16]);
        Account(bytes)
    }
}

/// What a failure is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Source(Source),
    Account(Account),
    AccountFrom(Account, Source),
}

#[derive(Debug, Clone)]
struct Record {
    failures: u32,
    first_failure: Instant,
    locked_until: Option<Instant>,
    /// Account records: the source of the window's first failure, and whether
    /// another source has failed since.
    first_source: Option<Source>,
    several_sources: bool,
    /// Account records, once paced: when the next attempt from an unproven
    /// source may be tried.
    next_attempt: Option<Instant>,
}

impl Record {
    fn new(now: Instant) -> Record {
        Record {
            failures: 0,
            first_failure: now,
            locked_until: None,
            first_source: None,
            several_sources: false,
            next_attempt: None,
        }
    }

    fn is_idle(&self, now: Instant, window: Duration) -> bool {
        self.locked_until.is_none_or(|until| until <= now)
            && now.saturating_duration_since(self.first_failure) > window
    }

    fn locked(&self, now: Instant) -> Option<Duration> {
        self.locked_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }
}

/// What a lock-out holds back: the `kind` label of `lime_auth_lockouts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockoutKind {
    /// One source, every user (`max_failures_per_address`).
    Address,
    /// One account at one source (`max_failures_per_user`).
    UserAtAddress,
    /// One account paced from sources it has not authenticated from.
    AccountPaced,
    /// Every unproven source, past `max_failures_per_sec`.
    GlobalCap,
}

impl LockoutKind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            LockoutKind::Address => "address",
            LockoutKind::UserAtAddress => "user_at_address",
            LockoutKind::AccountPaced => "account_paced",
            LockoutKind::GlobalCap => "global_cap",
        }
    }
}

/// Why an attempt is refused untried, and for how much longer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockedOut {
    /// What is held back, for the log line (`address 192.0.2.1`, `user
    /// alice@example.org from 192.0.2.1`...).
    pub what: String,
    /// When to try again.
    pub retry_after: Duration,
}

/// The tables, under one lock.
struct Tables {
    /// Failure counts by key, least recently failed evicted first.
    failures: LruCache<Key, Record>,
    /// (account, source) pairs that authenticated, and when.
    proven: LruCache<(Account, Source), Instant>,
    /// Past the global cap until then.
    saturated_until: Option<Instant>,
    /// When the global cap was last said to be reached, and the failures refused
    /// since.
    saturation_logged: Option<Instant>,
}

/// The failure counts of one instance.
pub struct Throttle {
    policy: ThrottlePolicy,
    tables: Mutex<Tables>,
    /// The global failure cap; `None` when `max_failures_per_sec` is 0.
    global: Option<RateLimiter<NotKeyed, InMemoryState, MonotonicClock>>,
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Throttle {
    /// An empty throttle.
    pub fn new(policy: ThrottlePolicy) -> Throttle {
        let capacity = NonZeroUsize::new(policy.max_tracked).unwrap_or(NonZeroUsize::MIN);
        let global = NonZeroU32::new(policy.max_failures_per_sec)
            .map(|rate| RateLimiter::direct_with_clock(Quota::per_second(rate), MonotonicClock));
        Throttle {
            tables: Mutex::new(Tables {
                failures: LruCache::new(capacity),
                proven: LruCache::new(capacity),
                saturated_until: None,
                saturation_logged: None,
            }),
            policy,
            global,
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A panic while holding the lock leaves counts that are still counts.
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Refuses an attempt by `user@realm` from `address`, untried, while the source
    /// or the pair is locked out, or, from a source not proven for the account,
    /// while the instance is past its failure cap or the account is paced. Taking
    /// a paced account's turn here keeps concurrent attempts from sharing it.
    pub fn check(
        &self,
        user: &str,
        realm: &str,
        address: IpAddr,
        now: Instant,
    ) -> Result<(), LockedOut> {
        let source = Source::of(address);
        let account = Account::of(user, realm);
        let who = || format!("user {}@{}", clip(user), clip(realm));
        let mut tables = self.tables();
        if let Some(retry_after) = tables
            .failures
            .peek(&Key::Source(source))
            .and_then(|record| record.locked(now))
        {
            return Err(LockedOut {
                what: format!("address {source}"),
                retry_after,
            });
        }
        if let Some(retry_after) = tables
            .failures
            .peek(&Key::AccountFrom(account, source))
            .and_then(|record| record.locked(now))
        {
            return Err(LockedOut {
                what: format!("{} from {source}", who()),
                retry_after,
            });
        }
        let proven = tables
            .proven
            .peek(&(account, source))
            .is_some_and(|at| now.saturating_duration_since(*at) < PROVEN_FOR);
        if proven {
            return Ok(());
        }
        if let Some(until) = tables.saturated_until.filter(|until| *until > now) {
            return Err(LockedOut {
                what: "every unproven source (past auth.throttle.max_failures_per_sec)".into(),
                retry_after: until - now,
            });
        }
        let window = self.policy.window;
        let pace = self.policy.account_pace();
        if let Some(record) = tables
            .failures
            .peek_mut(&Key::Account(account))
            .filter(|record| !record.is_idle(now, window))
            && let Some(next) = record.next_attempt
        {
            if next > now {
                return Err(LockedOut {
                    what: format!("{} from sources it has not authenticated from", who()),
                    retry_after: next - now,
                });
            }
            record.next_attempt = Some(now + pace);
        }
        Ok(())
    }

    /// Counts a failure that tested no password (forged nonce, another realm):
    /// against the source only. Returns how long to wait before answering it.
    pub fn failure_without_password(&self, address: IpAddr, now: Instant) -> Duration {
        let source = Source::of(address);
        let mut tables = self.tables();
        self.count_globally(&mut tables, now);
        let failures = self.count(&mut tables, Key::Source(source), now);
        self.delay(failures)
    }

    /// Counts a wrong password or an unknown user for `user@realm` from `address`.
    /// Returns how long to wait before answering it.
    pub fn failure(&self, user: &str, realm: &str, address: IpAddr, now: Instant) -> Duration {
        let source = Source::of(address);
        let account = Account::of(user, realm);
        let mut tables = self.tables();
        self.count_globally(&mut tables, now);
        let from_source = self.count(&mut tables, Key::Source(source), now);
        let pair = self.count(&mut tables, Key::AccountFrom(account, source), now);
        if pair >= self.policy.max_failures_per_user && self.policy.max_failures_per_user > 0 {
            tracing::warn!(
                user = %clip(user),
                realm = %clip(realm),
                source = %source,
                failures = pair,
                lockout = ?self.policy.lockout,
                "authentication: too many failures for this user from this address, \
                 locked out there (auth.throttle.max_failures_per_user)"
            );
        }
        self.count_account(&mut tables, account, source, user, realm, now);
        self.delay(from_source.max(pair))
    }

    /// Notes that `user@realm` authenticated from `address`: the pair's failures
    /// are forgotten (unless it is locked out) and the source is proven for the
    /// account. The source's and the account's counts stay: one good password
    /// must not reset an attack on others.
    pub fn success(&self, user: &str, realm: &str, address: IpAddr, now: Instant) {
        let source = Source::of(address);
        let account = Account::of(user, realm);
        let mut tables = self.tables();
        let pair = Key::AccountFrom(account, source);
        if tables
            .failures
            .peek(&pair)
            .is_some_and(|record| record.locked(now).is_none())
        {
            tables.failures.pop(&pair);
        }
        tables.proven.put((account, source), now);
    }

    /// Takes one failure from the global budget; past it, unproven attempts are
    /// refused until the budget allows one more.
    fn count_globally(&self, tables: &mut Tables, now: Instant) {
        let Some(global) = &self.global else {
            return;
        };
        let Err(not_until) = global.check() else {
            return;
        };
        let wait = not_until.wait_time_from(MonotonicClock.now());
        if tables.saturated_until.is_none_or(|until| until <= now) {
            crate::metrics::auth_lockout(LockoutKind::GlobalCap);
        }
        tables.saturated_until = Some(now + wait.max(Duration::from_millis(1)));
        if tables
            .saturation_logged
            .is_none_or(|at| now.saturating_duration_since(at) >= SATURATION_LOG_EVERY)
        {
            tables.saturation_logged = Some(now);
            tracing::warn!(
                max_failures_per_sec = self.policy.max_failures_per_sec,
                "authentication: failures past auth.throttle.max_failures_per_sec: attempts \
                 from addresses not proven for their user are refused (429) until the rate \
                 drops (said at most every 10 s)"
            );
        }
    }

    /// Counts one failure against `key`, locking it out at its limit; returns the
    /// failures in the window so far.
    fn count(&self, tables: &mut Tables, key: Key, now: Instant) -> u32 {
        let policy = &self.policy;
        let limit = match key {
            Key::Source(_) => policy.max_failures_per_address,
            Key::AccountFrom(..) => policy.max_failures_per_user,
            Key::Account(_) => 0,
        };
        let record = tables.failures.get_or_insert_mut(key, || Record::new(now));
        if record.is_idle(now, policy.window) {
            *record = Record::new(now);
        }
        record.failures = record.failures.saturating_add(1);
        let failures = record.failures;
        if limit > 0 && failures >= limit {
            crate::metrics::auth_lockout(match key {
                Key::Source(_) => LockoutKind::Address,
                _ => LockoutKind::UserAtAddress,
            });
            record.locked_until = Some(now + policy.lockout);
            record.failures = 0;
            record.first_failure = now;
            if let Key::Source(source) = key {
                tracing::warn!(
                    source = %source,
                    failures,
                    lockout = ?policy.lockout,
                    "authentication: too many failures from this address, locked out \
                     (auth.throttle.max_failures_per_address)"
                );
            }
        }
        failures
    }

    /// Counts one failure against the account from anywhere; paces it once its
    /// failures pass the limit from more than one source.
    fn count_account(
        &self,
        tables: &mut Tables,
        account: Account,
        source: Source,
        user: &str,
        realm: &str,
        now: Instant,
    ) {
        let policy = &self.policy;
        let record = tables
            .failures
            .get_or_insert_mut(Key::Account(account), || Record::new(now));
        if record.is_idle(now, policy.window) {
            *record = Record::new(now);
        }
        record.failures = record.failures.saturating_add(1);
        match record.first_source {
            None => record.first_source = Some(source),
            Some(first) if first != source => record.several_sources = true,
            Some(_) => {}
        }
        let limit = policy.max_failures_per_user;
        if limit == 0 || record.failures < limit || !record.several_sources {
            return;
        }
        if record.next_attempt.is_none() {
            crate::metrics::auth_lockout(LockoutKind::AccountPaced);
            tracing::warn!(
                user = %clip(user),
                realm = %clip(realm),
                failures = record.failures,
                pace = ?policy.account_pace(),
                "authentication: failures for this user from several addresses: one attempt \
                 per pace from addresses it has not authenticated from (auth.throttle.\
                 max_failures_per_user)"
            );
        }
        record.next_attempt = Some(now + policy.account_pace());
        // Paced as long as failures keep coming: the window restarts with each.
        record.first_failure = now;
    }

    fn delay(&self, failures: u32) -> Duration {
        self.policy
            .delay_step
            .saturating_mul(failures)
            .min(MAX_DELAY)
    }

    /// Entries held in the failure table.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.tables().failures.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ThrottlePolicy {
        ThrottlePolicy {
            max_failures_per_user: 3,
            max_failures_per_address: 5,
            max_failures_per_sec: 0,
            max_tracked: 1_000,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(30),
            delay_step: Duration::from_millis(100),
        }
    }

    fn throttle() -> Throttle {
        Throttle::new(policy())
    }

    const REALM: &str = "example.org";
    const HOME: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const AWAY: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    fn v4(index: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + index))
    }

    #[test]
    fn failures_slow_down_then_lock_the_user_out_from_that_address() {
        let throttle = throttle();
        let start = Instant::now();
        assert_eq!(
            throttle.failure("alice", REALM, HOME, start),
            Duration::from_millis(100)
        );
        assert_eq!(
            throttle.failure("alice", REALM, HOME, start),
            Duration::from_millis(200)
        );
        assert!(throttle.check("alice", REALM, HOME, start).is_ok());
        throttle.failure("alice", REALM, HOME, start);
        let locked = throttle.check("alice", REALM, HOME, start).unwrap_err();
        assert_eq!(locked.what, "user alice@example.org from 192.0.2.1");
        assert_eq!(locked.retry_after, Duration::from_secs(30));
        // Other users from the same address are not locked out by alice's lock.
        assert!(throttle.check("bob", REALM, HOME, start).is_ok());
        // Still locked a second before the end, free after.
        let later = start + Duration::from_secs(29);
        assert!(throttle.check("alice", REALM, HOME, later).is_err());
        assert!(
            throttle
                .check("alice", REALM, HOME, later + Duration::from_secs(1))
                .is_ok()
        );
    }

    #[test]
    fn one_address_cannot_lock_a_user_out_for_others() {
        let throttle = throttle();
        let now = Instant::now();
        for _ in 0..10 {
            if throttle.check("alice", REALM, HOME, now).is_ok() {
                throttle.failure("alice", REALM, HOME, now);
            }
        }
        assert!(throttle.check("alice", REALM, HOME, now).is_err());
        assert!(throttle.check("alice", REALM, AWAY, now).is_ok());
    }

    #[test]
    fn an_address_trying_many_users_is_locked_out() {
        let throttle = throttle();
        let now = Instant::now();
        for user in ["a", "b", "c", "d", "e"] {
            assert!(throttle.check(user, REALM, HOME, now).is_ok());
            throttle.failure(user, REALM, HOME, now);
        }
        assert_eq!(
            throttle.check("f", REALM, HOME, now).unwrap_err().what,
            "address 192.0.2.1"
        );
        assert!(throttle.check("f", REALM, AWAY, now).is_ok());
    }

    #[test]
    fn forged_nonce_does_not_count_against_the_username() {
        let throttle = throttle();
        let now = Instant::now();
        for index in 0..20 {
            throttle.failure_without_password(v4(index), now);
        }
        assert!(throttle.check("alice", REALM, HOME, now).is_ok());
        // It counts against the address.
        for _ in 0..5 {
            throttle.failure_without_password(HOME, now);
        }
        assert!(throttle.check("alice", REALM, HOME, now).is_err());
    }

    #[test]
    fn alice_failures_do_not_lock_alice_at_another_realm() {
        let throttle = throttle();
        let now = Instant::now();
        for _ in 0..3 {
            throttle.failure("alice", REALM, HOME, now);
        }
        assert!(throttle.check("alice", REALM, HOME, now).is_err());
        assert!(throttle.check("alice", "other.org", HOME, now).is_ok());
        // The realm is part of the key, not a suffix of the name.
        assert!(throttle.check("alice@example", "org", HOME, now).is_ok());
    }

    #[test]
    fn ipv6_addresses_are_counted_per_64() {
        let throttle = throttle();
        let now = Instant::now();
        for host in 1..=5u16 {
            let address = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, host));
            throttle.failure_without_password(address, now);
        }
        let neighbour = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0xffff, 0, 0, 9));
        assert_eq!(
            throttle
                .check("bob", REALM, neighbour, now)
                .unwrap_err()
                .what,
            "address 2001:db8:1:2::/64"
        );
        let next_64 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1));
        assert!(throttle.check("bob", REALM, next_64, now).is_ok());
        // An IPv4-mapped address is its IPv4 address.
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(Source::of(mapped), Source::of(HOME));
    }

    #[test]
    fn a_full_throttle_table_still_counts_new_failures() {
        let throttle = Throttle::new(ThrottlePolicy {
            max_tracked: 50,
            ..policy()
        });
        let now = Instant::now();
        for index in 0..500 {
            throttle.failure(&format!("filler-{index}"), REALM, v4(index), now);
        }
        assert!(throttle.tracked() <= 50);
        for _ in 0..3 {
            throttle.failure("alice", REALM, HOME, now);
        }
        assert!(throttle.check("alice", REALM, HOME, now).is_err());
        assert!(throttle.tracked() <= 50);
    }

    #[test]
    fn a_guesser_over_many_addresses_is_paced_but_not_where_the_user_authenticated() {
        let throttle = throttle();
        let now = Instant::now();
        throttle.success("alice", REALM, HOME, now);
        let mut tried = 0;
        for index in 0..30 {
            if throttle.check("alice", REALM, v4(index), now).is_ok() {
                tried += 1;
                throttle.failure("alice", REALM, v4(index), now);
            }
        }
        // The limit, then nothing more until the pace allows one.
        assert_eq!(tried, 3);
        let refused = throttle.check("alice", REALM, v4(100), now).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(10));
        assert!(throttle.check("alice", REALM, HOME, now).is_ok());
        // One attempt per pace: the turn is taken by whoever checks first.
        let later = now + Duration::from_secs(10);
        assert!(throttle.check("alice", REALM, v4(200), later).is_ok());
        assert!(throttle.check("alice", REALM, v4(201), later).is_err());
    }

    #[test]
    fn a_sustained_guesser_stays_paced_past_the_window() {
        let throttle = throttle();
        let start = Instant::now();
        let mut tried = 0;
        // Five minutes of guesses, one address after another, every second.
        for second in 0..300u32 {
            let now = start + Duration::from_secs(u64::from(second));
            let address = v4(second);
            if throttle.check("alice", REALM, address, now).is_ok() {
                tried += 1;
                throttle.failure("alice", REALM, address, now);
            }
        }
        // Three, then one per 10 s pace: not three more each window.
        assert_eq!(tried, 3 + 29);
    }

    #[test]
    fn one_address_alone_does_not_pace_the_user() {
        let throttle = throttle();
        let now = Instant::now();
        for _ in 0..3 {
            throttle.failure("alice", REALM, HOME, now);
        }
        for index in 0..5 {
            assert!(throttle.check("alice", REALM, v4(index), now).is_ok());
        }
    }

    #[test]
    fn global_failure_cap_slows_everyone_past_it() {
        let throttle = Throttle::new(ThrottlePolicy {
            max_failures_per_sec: 5,
            ..policy()
        });
        let now = Instant::now();
        throttle.success("alice", REALM, HOME, now);
        for index in 0..5 {
            throttle.failure_without_password(v4(index), now);
        }
        assert!(throttle.check("bob", REALM, AWAY, now).is_ok());
        throttle.failure_without_password(v4(5), now);
        let refused = throttle.check("bob", REALM, AWAY, now).unwrap_err();
        assert!(
            refused.retry_after <= Duration::from_millis(200),
            "{refused:?}"
        );
        assert!(throttle.check("alice", REALM, HOME, now).is_ok());
    }

    #[test]
    fn old_failures_are_forgotten_and_success_resets_the_pair() {
        let throttle = throttle();
        let now = Instant::now();
        throttle.failure("alice", REALM, HOME, now);
        throttle.failure("alice", REALM, HOME, now);
        let later = now + Duration::from_secs(61);
        throttle.failure("alice", REALM, HOME, later);
        assert!(throttle.check("alice", REALM, HOME, later).is_ok());
        throttle.success("alice", REALM, HOME, later);
        throttle.failure("alice", REALM, HOME, later);
        throttle.failure("alice", REALM, HOME, later);
        assert!(throttle.check("alice", REALM, HOME, later).is_ok());
    }

    #[test]
    fn success_does_not_lift_a_lockout() {
        let throttle = throttle();
        let now = Instant::now();
        for _ in 0..3 {
            throttle.failure("alice", REALM, HOME, now);
        }
        throttle.success("alice", REALM, HOME, now);
        assert!(throttle.check("alice", REALM, HOME, now).is_err());
    }

    #[test]
    fn delays_are_capped() {
        let throttle = Throttle::new(ThrottlePolicy {
            max_failures_per_user: 0,
            max_failures_per_address: 0,
            delay_step: Duration::from_secs(1),
            ..policy()
        });
        let now = Instant::now();
        for _ in 0..10 {
            assert!(throttle.failure("alice", REALM, HOME, now) <= MAX_DELAY);
        }
        assert!(throttle.check("alice", REALM, HOME, now).is_ok());
    }
}
