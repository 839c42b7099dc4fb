//! Prometheus metrics: every metric's name, labels and description
//! ([`describe_all`]), and one small typed function per thing counted, called
//! from where it happens (one call site per idea).
//!
//! Through the `metrics` facade: until [`exporter::install`] puts the Prometheus
//! recorder in place (only when `metrics.listen` is set), every function here is a
//! no-op that costs a load and a branch. Label values are `&'static str` from
//! closed sets (message types, curves, X3DH error codes, HTTP statuses, the enums
//! below): never a device id, a user, an address or anything else a client
//! chooses, so that the number of series is bounded by the code.
//!
//! A series appears at its first event; until then a scrape does not show it
//! (PromQL: `... or vector(0)`).

pub mod exporter;

use crate::auth::{AuthCause, AuthMethod, LockoutKind};
use crate::store::rules::LimitReached;
use crate::store::{OverLimit, StoreStats};
use lime_protocol::{Curve, MessageType, Response, ResponseMessage};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use std::time::Duration;

/// `lime_requests_total{type, curve, outcome}`
pub const REQUESTS: &str = "lime_requests_total";
/// `lime_request_duration_seconds{type}` (histogram)
pub const REQUEST_DURATION: &str = "lime_request_duration_seconds";
/// `lime_http_refusals_total{status}`
pub const HTTP_REFUSALS: &str = "lime_http_refusals_total";
/// `lime_bundles_total{curve, kind}`
pub const BUNDLES: &str = "lime_bundles_total";
/// `lime_bundles_over_limit_total{limit, over_limit}`
pub const BUNDLES_OVER_LIMIT: &str = "lime_bundles_over_limit_total";
/// `lime_auth_failures_total{method, reason}`
pub const AUTH_FAILURES: &str = "lime_auth_failures_total";
/// `lime_auth_lockouts_total{kind}`
pub const AUTH_LOCKOUTS: &str = "lime_auth_lockouts_total";
/// `lime_store_errors_total{backend, curve, kind}`
pub const STORE_ERRORS: &str = "lime_store_errors_total";
/// `lime_store_retries_total{backend, curve, at}`
pub const STORE_RETRIES: &str = "lime_store_retries_total";
/// `lime_store_claims_in_doubt{curve}`
pub const CLAIMS_IN_DOUBT: &str = "lime_store_claims_in_doubt";
/// `lime_connections_open`
pub const CONNECTIONS_OPEN: &str = "lime_connections_open";
/// `lime_connections_parked`
pub const CONNECTIONS_PARKED: &str = "lime_connections_parked";
/// `lime_connections_refused_total`
pub const CONNECTIONS_REFUSED: &str = "lime_connections_refused_total";
/// `lime_connections_closed_by_time_limit_total{kind}`
pub const TIME_LIMIT_CLOSINGS: &str = "lime_connections_closed_by_time_limit_total";
/// `lime_log_lines_suppressed_total`
pub const LOG_LINES_SUPPRESSED: &str = "lime_log_lines_suppressed_total";
/// `lime_log_lines_dropped_total`
pub const LOG_LINES_DROPPED: &str = "lime_log_lines_dropped_total";
/// `lime_devices{curve}`
pub const DEVICES: &str = "lime_devices";
/// `lime_one_time_pre_keys{curve}`
pub const ONE_TIME_PRE_KEYS: &str = "lime_one_time_pre_keys";
/// `lime_devices_by_one_time_pre_key_stock{curve, stock}`
pub const DEVICES_BY_STOCK: &str = "lime_devices_by_one_time_pre_key_stock";
/// `lime_devices_low_one_time_pre_key_stock{curve}`
pub const DEVICES_LOW_STOCK: &str = "lime_devices_low_one_time_pre_key_stock";
/// `lime_bundle_request_rows{curve}`
pub const BUNDLE_REQUEST_ROWS: &str = "lime_bundle_request_rows";
/// `lime_federation_forwards_total{peer, outcome}`
pub const FEDERATION_FORWARDS: &str = "lime_federation_forwards_total";
/// `lime_stock_refresh_failures_total{curve}`
pub const STOCK_REFRESH_FAILURES: &str = "lime_stock_refresh_failures_total";

/// The request latency buckets, in seconds: a store call is a few milliseconds;
/// the store time-out (5 s by default) is the top.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Describes every metric (the `# HELP` lines). Called once the recorder is in.
pub fn describe_all() {
    describe_counter!(
        FEDERATION_FORWARDS,
        "Bundle requests forwarded to peer lime servers (federation), by peer (its configured \
         domains) and outcome: ok, timed_out, unreachable, refused, bad_answer, x3dh_error"
    );
    describe_counter!(
        REQUESTS,
        "X3DH requests answered, by message type, curve and outcome (ok, or the X3DH error code)"
    );
    describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from a request's headers to its X3DH answer (authentication, body, store), by message type"
    );
    describe_counter!(
        HTTP_REFUSALS,
        "Requests on the X3DH paths answered with a plain HTTP error instead of an X3DH answer, by status"
    );
    describe_counter!(
        BUNDLES,
        "Entries of peerBundle answers, by curve and kind: with a one-time pre-key, without, or no bundle"
    );
    describe_counter!(
        BUNDLES_OVER_LIMIT,
        "Bundles withheld by a bundle request limit, by limit and what the source got instead"
    );
    describe_counter!(
        AUTH_FAILURES,
        "Requests refused by authentication, by method and reason (challenged and stale_nonce are a client's normal flow)"
    );
    describe_counter!(
        AUTH_LOCKOUTS,
        "Lock-outs and pacing started by the failed-authentication throttle, by kind"
    );
    describe_counter!(
        STORE_ERRORS,
        "Requests answered db_error, by backend, curve and kind (error, or timeout)"
    );
    describe_counter!(
        STORE_RETRIES,
        "Transactions rolled back by the database and run again, by backend, curve and where the \
         database refused: statement (a deadlock) or commit (a Galera certification failure)"
    );
    describe_gauge!(
        CLAIMS_IN_DOUBT,
        "Claims whose COMMIT went unanswered and are not settled yet, by curve"
    );
    describe_gauge!(CONNECTIONS_OPEN, "Connections being served");
    describe_gauge!(
        CONNECTIONS_PARKED,
        "Idle HTTP/1.1 connections over TLS whose HTTP state is let go until they send again"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed at once because server.max_connections were being served"
    );
    describe_counter!(
        TIME_LIMIT_CLOSINGS,
        "Connections or requests cut off by a time limit, by kind"
    );
    describe_counter!(
        LOG_LINES_SUPPRESSED,
        "Log lines left out by log.max_lines_per_second"
    );
    describe_counter!(
        LOG_LINES_DROPPED,
        "Log lines dropped because the log queue (log.max_queued_bytes) was full"
    );
    describe_gauge!(
        DEVICES,
        "Registered devices, by curve (counted every metrics.stock_refresh_secs)"
    );
    describe_gauge!(
        ONE_TIME_PRE_KEYS,
        "One-time pre-keys stored, by curve (counted every metrics.stock_refresh_secs)"
    );
    describe_gauge!(
        DEVICES_BY_STOCK,
        "Devices by the one-time pre-keys they hold (0, 1-9, 10-99, 100+), by curve"
    );
    describe_gauge!(
        DEVICES_LOW_STOCK,
        "Devices holding fewer one-time pre-keys than metrics.low_stock_threshold, by curve"
    );
    describe_gauge!(
        BUNDLE_REQUEST_ROWS,
        "Bundle requests recorded in table Requests for the bundle request limits, by curve"
    );
    describe_counter!(
        STOCK_REFRESH_FAILURES,
        "Stock counts that failed (the gauges keep their last value), by curve"
    );
}

/// The `type` label of a request: the protocol's name of its message type
/// (byte 1), `unknown` when there is none or it is not a request.
fn request_type(byte: Option<u8>) -> &'static str {
    match byte.and_then(MessageType::from_byte) {
        Some(MessageType::RegisterUser) => "registerUser",
        Some(MessageType::DeprecatedRegisterUser) => "deprecatedRegisterUser",
        Some(MessageType::DeleteUser) => "deleteUser",
        Some(MessageType::PostSignedPreKey) => "postSPk",
        Some(MessageType::PostOneTimePreKeys) => "postOPks",
        Some(MessageType::GetPeerBundle) => "getPeerBundle",
        Some(MessageType::GetSelfOneTimePreKeys) => "getSelfOPks",
        _ => "unknown",
    }
}

/// The `curve` label of a curve byte: its name, `unknown` for any other byte.
fn curve_label(byte: u8) -> &'static str {
    Curve::from_id(byte).map_or("unknown", Curve::name)
}

/// An X3DH answer sent: `head` is the request's first bytes (type and curve, as
/// far as they were read), `elapsed` the time since its headers. Counts the
/// request by type, curve and outcome, its latency, and a peerBundle's entries.
pub fn x3dh_answered(head: &[u8], answer: &ResponseMessage, elapsed: Duration) {
    let kind = request_type(head.get(1).copied());
    let curve = curve_label(answer.curve_byte);
    let outcome = match &answer.response {
        Response::Error(error) => error.code.name(),
        _ => "ok",
    };
    counter!(REQUESTS, "type" => kind, "curve" => curve, "outcome" => outcome).increment(1);
    histogram!(REQUEST_DURATION, "type" => kind).record(elapsed.as_secs_f64());
    if let Response::PeerBundles(bundles) = &answer.response {
        let mut kinds = [0u64; 3];
        for bundle in bundles {
            kinds[usize::from(bundle.flag().min(2))] += 1;
        }
        for (kind, count) in ["without_one_time_pre_key", "with_one_time_pre_key", "none"]
            .into_iter()
            .zip(kinds)
            .filter(|(_, count)| *count > 0)
        {
            counter!(BUNDLES, "curve" => curve, "kind" => kind).increment(count);
        }
    }
}

/// A request on an X3DH path answered with a plain HTTP error (401, 403, 408,
/// 413, 429, 503...).
pub fn http_refused(status: http::StatusCode) {
    counter!(HTTP_REFUSALS, "status" => status.as_str().to_owned()).increment(1);
}

/// A bundle withheld by a bundle request limit.
pub fn bundle_over_limit(limit: LimitReached, over_limit: OverLimit) {
    let limit = match limit {
        LimitReached::PerDevice => "per_device",
        LimitReached::PerIdentity => "per_identity",
        LimitReached::RecordedPerIdentity => "recorded_per_identity",
    };
    let instead = match over_limit {
        OverLimit::WithoutOneTimePreKey => "without_one_time_pre_key",
        OverLimit::NoBundle => "no_bundle",
    };
    counter!(BUNDLES_OVER_LIMIT, "limit" => limit, "over_limit" => instead).increment(1);
}

/// A bundle request forwarded to `peer` (its configured domains: a set the
/// operator bounds), and how it ended.
pub fn forwarded(peer: &str, outcome: &'static str) {
    counter!(FEDERATION_FORWARDS, "peer" => peer.to_owned(), "outcome" => outcome).increment(1);
}

/// A request refused by authentication.
pub fn auth_failed(method: AuthMethod, cause: AuthCause) {
    counter!(AUTH_FAILURES, "method" => method.label(), "reason" => cause.label()).increment(1);
}

/// A lock-out (or an account's pacing, or the global cap) started by the throttle.
pub fn auth_lockout(kind: LockoutKind) {
    counter!(AUTH_LOCKOUTS, "kind" => kind.label()).increment(1);
}

/// A request answered `db_error`: the store failed (`timeout`: could not start
/// within its time-out).
pub fn store_failed(backend: &'static str, curve: Curve, timeout: bool) {
    let kind = if timeout { "timeout" } else { "error" };
    counter!(STORE_ERRORS, "backend" => backend, "curve" => curve.name(), "kind" => kind)
        .increment(1);
}

/// Where a transaction run again was refused by the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAt {
    /// A statement was chosen as a deadlock victim.
    Statement,
    /// COMMIT failed certification on a Galera node (another node's transaction
    /// touched the same rows first).
    Commit,
}

/// A transaction rolled back by the database (deadlock, certification failure)
/// that the store runs again.
pub fn store_retried(backend: &'static str, curve: Curve, at: RetryAt) {
    let at = match at {
        RetryAt::Statement => "statement",
        RetryAt::Commit => "commit",
    };
    counter!(STORE_RETRIES, "backend" => backend, "curve" => curve.name(), "at" => at).increment(1);
}

/// The claims in doubt of a store, after one was recorded or settled.
pub fn claims_in_doubt(curve: &'static str, pending: usize) {
    gauge!(CLAIMS_IN_DOUBT, "curve" => curve).set(pending as f64);
}

/// A connection counted in a gauge for as long as this lives.
pub struct CountedConnection(&'static str);

impl CountedConnection {
    /// A connection being served (`lime_connections_open`).
    pub fn open() -> CountedConnection {
        CountedConnection::count(CONNECTIONS_OPEN)
    }

    /// An idle connection whose HTTP state is let go (`lime_connections_parked`).
    pub fn parked() -> CountedConnection {
        CountedConnection::count(CONNECTIONS_PARKED)
    }

    fn count(gauge: &'static str) -> CountedConnection {
        gauge!(gauge).increment(1.0);
        CountedConnection(gauge)
    }
}

impl Drop for CountedConnection {
    fn drop(&mut self) {
        gauge!(self.0).decrement(1.0);
    }
}

/// A connection refused over `server.max_connections`.
pub fn connection_refused() {
    counter!(CONNECTIONS_REFUSED).increment(1);
}

/// What a time limit cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeLimit {
    /// `server.tls_handshake_timeout_ms`
    TlsHandshake,
    /// `server.header_read_timeout_ms`
    HeaderRead,
    /// `server.body_read_timeout_ms` (a 408)
    BodyRead,
    /// `server.idle_timeout_ms`
    Idle,
}

/// A connection (or a request's body) cut off by a time limit.
pub fn closed_by_time_limit(limit: TimeLimit) {
    let kind = match limit {
        TimeLimit::TlsHandshake => "tls_handshake",
        TimeLimit::HeaderRead => "header_read",
        TimeLimit::BodyRead => "body_read",
        TimeLimit::Idle => "idle",
    };
    counter!(TIME_LIMIT_CLOSINGS, "kind" => kind).increment(1);
}

/// A log line left out by `log.max_lines_per_second`.
pub fn log_line_suppressed() {
    counter!(LOG_LINES_SUPPRESSED).increment(1);
}

/// A log line dropped by the full log queue.
pub fn log_line_dropped() {
    counter!(LOG_LINES_DROPPED).increment(1);
}

/// The stock gauges of `curve` from a fresh count.
pub fn stock(curve: Curve, stats: &StoreStats) {
    let curve = curve.name();
    gauge!(DEVICES, "curve" => curve).set(stats.devices as f64);
    gauge!(ONE_TIME_PRE_KEYS, "curve" => curve).set(stats.one_time_pre_keys as f64);
    for (stock, devices) in stats.stock.buckets() {
        gauge!(DEVICES_BY_STOCK, "curve" => curve, "stock" => stock).set(devices as f64);
    }
    gauge!(DEVICES_LOW_STOCK, "curve" => curve).set(stats.below_threshold as f64);
    gauge!(BUNDLE_REQUEST_ROWS, "curve" => curve).set(stats.bundle_request_rows as f64);
}

/// A stock count that failed.
pub fn stock_refresh_failed(curve: Curve) {
    counter!(STOCK_REFRESH_FAILURES, "curve" => curve.name()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_closed_sets() {
        assert_eq!(request_type(Some(0x05)), "getPeerBundle");
        assert_eq!(request_type(Some(0x06)), "unknown", "an answer type");
        assert_eq!(request_type(Some(0x42)), "unknown");
        assert_eq!(request_type(None), "unknown");
        assert_eq!(curve_label(1), "c25519");
        assert_eq!(curve_label(0), "unknown");
        assert_eq!(curve_label(200), "unknown");
    }
}
