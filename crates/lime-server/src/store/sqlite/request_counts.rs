//! The bundle request limit's counts of a SQLite store, kept in memory by its
//! writer thread.
//!
//! Counting over an index of `Requests` cost a random index page written per
//! bundle, plus the identity's row read and written: 40% of the throughput
//! (docs/benchmarks.md, "The bundle request limit counted in memory"). A SQLite
//! store has one writer, in one server (`serve` locks the file, see `mod.rs`), so
//! that writer can count exactly what it records without asking the database:
//! each bundle recorded is still a `Requests` row (appended, indexed by time
//! only), which is what `admin device show` lists and what the counts are
//! loaded from when the server starts.
//!
//! The counts follow the database's transactions: what a step recorded is
//! forgotten when its transaction does not commit ([`RequestCounts::forget`]),
//! so that an answer never sent counts for nothing, as its rows do.
//!
//! Memory: about 150 bytes per bundle recorded within the window, freed as the
//! window slides past it; `max_recorded_requests_per_identity` bounds what one
//! account adds (per fixed window, so at most twice that within the sliding
//! one: 20,000 by default, about 3 MB).

use crate::store::StoreError;
use crate::store::rules::{Received, SourceIdentity};
use lime_protocol::DeviceId;
use rusqlite::{Connection, params};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The counts of the bundles recorded within the window, by target and source.
pub struct RequestCounts {
    /// The window, in whole seconds.
    window: i64,
    /// Device ids and identities are counted by a 64-bit hash keyed at random
    /// when the server starts: a client cannot choose ids that collide, and two
    /// that collide by chance (about one in 2^64 per pair) only count together,
    /// never less.
    keys: RandomState,
    /// The bundles recorded, oldest first: each leaves the counts when the
    /// window has passed it.
    recorded: VecDeque<Entry>,
    /// The number of the first of `recorded` (numbers are never reused).
    first: u64,
    /// Bundles of a target (first) received by a source device (second).
    by_device: HashMap<(u64, u64), u32>,
    /// Bundles of a target received by all the devices of a source's identity.
    by_identity: HashMap<(u64, u64), u32>,
    /// Bundles recorded for an identity in its fixed window (the window's start).
    by_fixed_window: HashMap<u64, (i64, u64)>,
}

/// A bundle recorded in the counts.
#[derive(Debug, Clone, Copy)]
struct Entry {
    at: i64,
    target: u64,
    source: SourceKeys,
    /// False once forgotten: it still waits its turn to leave the queue.
    counted: bool,
}

/// A source device and its identity, as the counts key them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceKeys {
    device: u64,
    identity: u64,
}

/// A target device, as the counts key it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetKey(u64);

/// A bundle recorded, to forget it if its transaction does not commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded(u64);

/// Now, in whole seconds since the epoch: the clock `Requests.at` is written by
/// (SQLite's `CURRENT_TIMESTAMP` is the same system clock, in UTC).
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64)
}

impl RequestCounts {
    /// No bundle recorded yet.
    pub fn new(window: Duration) -> RequestCounts {
        RequestCounts {
            window: window.as_secs().max(1) as i64,
            keys: RandomState::new(),
            recorded: VecDeque::new(),
            first: 0,
            by_device: HashMap::new(),
            by_identity: HashMap::new(),
            by_fixed_window: HashMap::new(),
        }
    }

    /// The counts of the `Requests` rows of the last window, read from `conn`
    /// (through the index on `at`: only that window's rows).
    pub fn load(conn: &Connection, window: Duration) -> Result<RequestCounts, StoreError> {
        let mut counts = RequestCounts::new(window);
        let mut select = conn.prepare(
            "SELECT CAST(strftime('%s', at) AS INTEGER), source, target FROM Requests \
             WHERE at > datetime('now', ?1) ORDER BY at",
        )?;
        let mut rows = select.query(params![format!("-{} seconds", counts.window)])?;
        let mut unreadable = 0_u64;
        while let Some(row) = rows.next()? {
            let (at, source, target): (Option<i64>, String, String) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            match (at, DeviceId::new(source), DeviceId::new(target)) {
                (Some(at), Ok(source), Ok(target)) => {
                    let (source, target) = (counts.source(&source), counts.target(&target));
                    counts.record(at, source, target);
                }
                _ => unreadable += 1,
            }
        }
        if unreadable > 0 {
            tracing::warn!(
                rows = unreadable,
                "SQLite: Requests rows without a time or a valid device id are not counted"
            );
        }
        Ok(counts)
    }

    /// The key of `target`.
    pub fn target(&self, target: &DeviceId) -> TargetKey {
        TargetKey(self.keys.hash_one(target.as_str()))
    }

    /// The keys of `source` and of its identity.
    pub fn source(&self, source: &DeviceId) -> SourceKeys {
        let identity = SourceIdentity::of(source);
        SourceKeys {
            device: self.keys.hash_one(source.as_str()),
            // An id that is not a GRUU is an identity of its own, apart from the
            // user's GRUUs, as the SQL stores count it.
            identity: self
                .keys
                .hash_one((identity.identity, identity.devices.is_some())),
        }
    }

    /// The bundles of `target` that `source` and its identity received within
    /// the window, at `now`.
    pub fn received(&mut self, now: i64, source: SourceKeys, target: TargetKey) -> Received {
        self.expire(now);
        let TargetKey(target) = target;
        let count = |map: &HashMap<(u64, u64), u32>, key| u64::from(*map.get(&key).unwrap_or(&0));
        Received {
            by_device: count(&self.by_device, (target, source.device)),
            by_identity: count(&self.by_identity, (target, source.identity)),
        }
    }

    /// The bundles recorded for `source`'s identity in the fixed window of `now`
    /// (windows aligned on multiples of the window since the epoch).
    pub fn recorded_in_window(&mut self, now: i64, source: SourceKeys) -> u64 {
        self.expire(now);
        match self.by_fixed_window.get(&source.identity) {
            Some(&(start, recorded)) if start == self.fixed_window(now) => recorded,
            _ => 0,
        }
    }

    /// Counts one bundle of `target` for `source`, at `at`.
    pub fn record(&mut self, at: i64, source: SourceKeys, target: TargetKey) -> Recorded {
        let TargetKey(target) = target;
        *self.by_device.entry((target, source.device)).or_default() += 1;
        *self
            .by_identity
            .entry((target, source.identity))
            .or_default() += 1;
        let start = self.fixed_window(at);
        let fixed = self
            .by_fixed_window
            .entry(source.identity)
            .or_insert((start, 0));
        if fixed.0 != start {
            *fixed = (start, 0);
        }
        fixed.1 += 1;
        self.recorded.push_back(Entry {
            at,
            target,
            source,
            counted: true,
        });
        Recorded(self.first + self.recorded.len() as u64 - 1)
    }

    /// Takes back a bundle counted by [`RequestCounts::record`] (its transaction
    /// did not commit, or was undone). Forgetting it twice, or once it has left
    /// the window, changes nothing.
    pub fn forget(&mut self, recorded: Recorded) {
        let Some(index) = recorded.0.checked_sub(self.first) else {
            return;
        };
        if let Some(entry) = self.recorded.get_mut(index as usize)
            && entry.counted
        {
            entry.counted = false;
            let entry = *entry;
            self.uncount(entry);
        }
    }

    /// Bundles counted, for tests and log lines.
    pub fn len(&self) -> usize {
        self.recorded.iter().filter(|entry| entry.counted).count()
    }

    /// Drops the bundles the window has passed at `now` (recorded at or before
    /// `now` minus the window, as `at > datetime('now', '-window seconds')` does).
    /// The queue is in the order recorded: should the clock go back, a bundle
    /// behind a later one leaves when that one does (counted longer, never less).
    fn expire(&mut self, now: i64) {
        while let Some(entry) = self.recorded.front().copied() {
            if entry.at > now - self.window {
                break;
            }
            self.recorded.pop_front();
            self.first += 1;
            if entry.counted {
                self.uncount(entry);
            }
        }
    }

    fn uncount(&mut self, entry: Entry) {
        let source = entry.source;
        decrement(&mut self.by_device, (entry.target, source.device));
        decrement(&mut self.by_identity, (entry.target, source.identity));
        let start = self.fixed_window(entry.at);
        if let Some(fixed) = self.by_fixed_window.get_mut(&source.identity)
            && fixed.0 == start
        {
            fixed.1 -= 1;
            if fixed.1 == 0 {
                self.by_fixed_window.remove(&source.identity);
            }
        }
    }

    fn fixed_window(&self, at: i64) -> i64 {
        at.div_euclid(self.window) * self.window
    }
}

fn decrement(map: &mut HashMap<(u64, u64), u32>, key: (u64, u64)) {
    if let Some(count) = map.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(id: &str) -> DeviceId {
        DeviceId::new(id).unwrap()
    }

    const ALICE_1: &str = "sip:alice@example.org;gr=urn:uuid:1";
    const ALICE_2: &str = "sip:alice@example.org;gr=urn:uuid:2";
    const BOB: &str = "sip:bob@example.org;gr=urn:uuid:1";

    #[test]
    fn a_target_counts_per_device_and_per_identity_until_the_window_passes() {
        let mut counts = RequestCounts::new(Duration::from_secs(100));
        let (one, two) = (counts.source(&id(ALICE_1)), counts.source(&id(ALICE_2)));
        let bob = counts.target(&id(BOB));
        counts.record(1_000, one, bob);
        counts.record(1_050, two, bob);
        let received = |counts: &mut RequestCounts, now, source| counts.received(now, source, bob);
        assert_eq!(
            received(&mut counts, 1_050, one),
            Received {
                by_device: 1,
                by_identity: 2
            }
        );
        assert_eq!(received(&mut counts, 1_100, one).by_device, 0);
        assert_eq!(received(&mut counts, 1_100, two).by_identity, 1);
        assert_eq!(received(&mut counts, 1_150, two), Received::default());
        assert_eq!(counts.len(), 0);
        assert!(counts.by_device.is_empty() && counts.by_fixed_window.is_empty());
    }

    #[test]
    fn an_identity_is_counted_in_fixed_windows_and_an_id_not_a_gruu_apart() {
        let mut counts = RequestCounts::new(Duration::from_secs(100));
        let gruu = counts.source(&id(ALICE_1));
        let plain = counts.source(&id("sip:alice@example.org"));
        assert_ne!(gruu.identity, plain.identity);
        let target = |counts: &RequestCounts, name| counts.target(&id(name));
        for name in ["a", "b", "c"] {
            let target = target(&counts, name);
            counts.record(1_090, gruu, target);
        }
        assert_eq!(counts.recorded_in_window(1_099, gruu), 3);
        assert_eq!(counts.recorded_in_window(1_099, plain), 0);
        // A new fixed window starts at 1,100, while the sliding one still counts.
        assert_eq!(counts.recorded_in_window(1_100, gruu), 0);
        let (a, d) = (target(&counts, "a"), target(&counts, "d"));
        assert_eq!(counts.received(1_100, gruu, a).by_device, 1);
        counts.record(1_120, gruu, d);
        assert_eq!(counts.recorded_in_window(1_120, gruu), 1);
        // The old window's bundles leave without touching the new window's count.
        assert_eq!(counts.recorded_in_window(1_195, gruu), 1);
        assert_eq!(counts.recorded_in_window(1_220, gruu), 0);
    }

    #[test]
    fn a_forgotten_bundle_counts_for_nothing_once() {
        let mut counts = RequestCounts::new(Duration::from_secs(100));
        let (source, bob) = (counts.source(&id(ALICE_1)), counts.target(&id(BOB)));
        let kept = counts.record(1_000, source, bob);
        let forgotten = counts.record(1_000, source, bob);
        counts.forget(forgotten);
        counts.forget(forgotten);
        assert_eq!(counts.received(1_000, source, bob).by_identity, 1);
        assert_eq!(counts.recorded_in_window(1_000, source), 1);
        counts.forget(kept);
        assert_eq!(counts.received(1_000, source, bob), Received::default());
        assert!(counts.by_fixed_window.is_empty());
        // Gone with the window: forgetting it then changes nothing.
        let late = counts.record(1_010, source, bob);
        counts.record(1_150, source, bob);
        assert_eq!(counts.received(1_150, source, bob).by_device, 1);
        counts.forget(late);
        assert_eq!(counts.received(1_150, source, bob).by_device, 1);
    }

    #[test]
    fn the_counts_are_loaded_from_the_rows_of_the_last_window() {
        let conn = Connection::open_in_memory().unwrap();
        super::super::schema::ensure_schema(&conn).unwrap();
        conn.execute_batch(&format!(
            "INSERT INTO Requests (source, target, at) VALUES
                 ('{ALICE_1}', '{BOB}', datetime('now', '-10 seconds')),
                 ('{ALICE_2}', '{BOB}', datetime('now', '-50 seconds')),
                 ('{ALICE_1}', '{BOB}', datetime('now', '-200 seconds')),
                 ('', '{BOB}', datetime('now'));"
        ))
        .unwrap();
        let mut counts = RequestCounts::load(&conn, Duration::from_secs(100)).unwrap();
        let (source, bob) = (counts.source(&id(ALICE_1)), counts.target(&id(BOB)));
        assert_eq!(
            counts.received(now(), source, bob),
            Received {
                by_device: 1,
                by_identity: 2
            }
        );
    }
}
