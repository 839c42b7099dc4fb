//! What a store holds, counted: devices, one-time pre-keys and how they are spread
//! over the devices, recorded bundle requests, schema version. The one answer of
//! [`KeyStore::stats`](super::KeyStore::stats), read by `lime-server admin stats`
//! and by the metrics' stock gauges (refreshed every minute, never per request).
//!
//! Each backend counts in one read-only statement (scalar sub-queries, so one
//! snapshot): a scan of `Users`, `OPk` (grouped by device, through its
//! `(Uid, OPk_id)` index) and `Requests`.

use serde::Serialize;

/// The counts of one store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct StoreStats {
    /// Registered devices (rows of `Users`).
    pub devices: u64,
    /// One-time pre-keys stored, all devices together (rows of `OPk`).
    pub one_time_pre_keys: u64,
    /// How many devices hold how many one-time pre-keys.
    pub stock: OneTimePreKeyStock,
    /// Devices holding fewer one-time pre-keys than the threshold asked for.
    pub below_threshold: u64,
    /// The threshold `below_threshold` counts under.
    pub threshold: u32,
    /// Bundle requests recorded for the bundle request limits (rows of `Requests`).
    pub bundle_request_rows: u64,
    /// This server's schema version (`Config`'s `lime_rs_schema`); `None` on a
    /// database not yet migrated (`lime-server db migrate`).
    pub schema_version: Option<i64>,
}

/// Devices by the number of one-time pre-keys they hold. A device at 0 gets
/// bundles without one (weaker first messages) until its client uploads more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct OneTimePreKeyStock {
    /// Devices holding none.
    pub none: u64,
    /// Devices holding 1 to 9.
    pub from_1_to_9: u64,
    /// Devices holding 10 to 99.
    pub from_10_to_99: u64,
    /// Devices holding 100 or more.
    pub from_100: u64,
}

impl OneTimePreKeyStock {
    /// The buckets with their labels, in order: `0`, `1-9`, `10-99`, `100+`.
    pub fn buckets(&self) -> [(&'static str, u64); 4] {
        [
            ("0", self.none),
            ("1-9", self.from_1_to_9),
            ("10-99", self.from_10_to_99),
            ("100+", self.from_100),
        ]
    }
}

/// The columns every backend's statement returns, in this order, as signed
/// 64-bit integers (`schema_version` may be NULL): see each backend's
/// `queries.rs`.
pub(crate) fn from_columns(columns: [Option<i64>; 9], threshold: u32) -> StoreStats {
    let count = |index: usize| columns[index].map_or(0, |value| value.max(0) as u64);
    StoreStats {
        devices: count(0),
        one_time_pre_keys: count(1),
        stock: OneTimePreKeyStock {
            none: count(2),
            from_1_to_9: count(3),
            from_10_to_99: count(4),
            from_100: count(5),
        },
        below_threshold: count(6),
        threshold,
        bundle_request_rows: count(7),
        schema_version: columns[8],
    }
}

/// The statement's shape, for backends whose SQL reads the same once the names
/// are quoted their way (`q` quotes an identifier): devices, one-time pre-keys,
/// the four buckets, devices under the threshold (bound as the only parameter,
/// `param`), `Requests` rows, our schema version.
pub(crate) fn statement(q: impl Fn(&str) -> String, param: &str, int: &str) -> String {
    let (users, opk, requests, config) = (q("Users"), q("OPk"), q("Requests"), q("Config"));
    let (uid, name, value) = (q("Uid"), q("Name"), q("Value"));
    let bucket = |condition: &str| {
        format!("CAST(COALESCE(SUM(CASE WHEN {condition} THEN 1 ELSE 0 END), 0) AS {int})")
    };
    format!(
        "SELECT CAST(COUNT(*) AS {int}), \
         CAST((SELECT COUNT(*) FROM {opk}) AS {int}), \
         {}, {}, {}, {}, {}, \
         CAST((SELECT COUNT(*) FROM {requests}) AS {int}), \
         (SELECT CAST(MAX({value}) AS {int}) FROM {config} WHERE {name} = 'lime_rs_schema') \
         FROM (SELECT u.{uid}, COUNT(o.{uid}) AS held FROM {users} AS u \
               LEFT JOIN {opk} AS o ON o.{uid} = u.{uid} GROUP BY u.{uid}) AS per_device",
        bucket("held = 0"),
        bucket("held BETWEEN 1 AND 9"),
        bucket("held BETWEEN 10 AND 99"),
        bucket("held >= 100"),
        bucket(&format!("held < {param}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_map_to_their_counts_and_a_missing_version_stays_missing() {
        let stats = from_columns(
            [
                Some(5),
                Some(120),
                Some(1),
                Some(2),
                Some(1),
                Some(1),
                Some(3),
                Some(7),
                None,
            ],
            10,
        );
        assert_eq!(stats.devices, 5);
        assert_eq!(stats.one_time_pre_keys, 120);
        assert_eq!(
            stats.stock.buckets(),
            [("0", 1), ("1-9", 2), ("10-99", 1), ("100+", 1)]
        );
        assert_eq!((stats.below_threshold, stats.threshold), (3, 10));
        assert_eq!(stats.bundle_request_rows, 7);
        assert_eq!(stats.schema_version, None);
    }
}
