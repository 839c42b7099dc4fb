//! Log lines rate-limited per place in the code: a flood of refusals (a password
//! guesser, a client in a loop, a database down under load) writes at most
//! `log.max_lines_per_second` lines a second from each `tracing` call site; the
//! rest are counted, and a summary line says how many were left out, from where.
//!
//! Call sites are static, so the table has at most one entry per call site in the
//! program: bounded by construction, whoever sends what. (A crate exists for this,
//! tracing-throttle; its limits are per message text with a table that fails open
//! when full, which is what we must not do, and this is forty lines.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tracing::callsite::Identifier;
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// The target of the summary lines (never limited themselves).
pub const SUMMARY_TARGET: &str = "lime_server::log_summary";

/// One call site's count in the current second.
struct Site {
    metadata: &'static Metadata<'static>,
    second_start: Instant,
    written: u32,
    suppressed: u64,
}

/// Lines left out at one call site since the last summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    /// The level, target, file and line of the call site.
    pub site: String,
    /// How many lines were left out.
    pub count: u64,
}

/// The per-call-site limit, a `Filter` for the fmt layer; clones share counts.
#[derive(Clone)]
pub struct RateLimit {
    per_second: u32,
    sites: Arc<Mutex<HashMap<Identifier, Site>>>,
}

impl RateLimit {
    /// At most `per_second` lines a second from each call site; 0: no limit.
    pub fn new(per_second: u32) -> RateLimit {
        RateLimit {
            per_second,
            sites: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Whether a line from `metadata`'s call site may be written at `now`.
    pub fn admit(&self, metadata: &'static Metadata<'static>, now: Instant) -> bool {
        if self.per_second == 0 || metadata.target() == SUMMARY_TARGET {
            return true;
        }
        let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        let site = sites.entry(metadata.callsite()).or_insert(Site {
            metadata,
            second_start: now,
            written: 0,
            suppressed: 0,
        });
        if now.duration_since(site.second_start) >= Duration::from_secs(1) {
            site.second_start = now;
            site.written = 0;
        }
        if site.written < self.per_second {
            site.written += 1;
            true
        } else {
            site.suppressed += 1;
            crate::metrics::log_line_suppressed();
            false
        }
    }

    /// The lines left out since the last call, per call site; the counts restart.
    pub fn take_suppressed(&self) -> Vec<Suppressed> {
        let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        let mut taken: Vec<Suppressed> = sites
            .values_mut()
            .filter(|site| site.suppressed > 0)
            .map(|site| Suppressed {
                site: describe(site.metadata),
                count: std::mem::take(&mut site.suppressed),
            })
            .collect();
        taken.sort_by(|a, b| a.site.cmp(&b.site));
        taken
    }

    /// Writes a summary line for each call site that had lines left out, every
    /// `period`, from a thread of its own, for the life of the process.
    pub fn report_every(&self, period: Duration) {
        if self.per_second == 0 {
            return;
        }
        let limit = self.clone();
        let _ = std::thread::Builder::new()
            .name("log-summary".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(period);
                    for Suppressed { site, count } in limit.take_suppressed() {
                        tracing::warn!(
                            target: SUMMARY_TARGET,
                            count,
                            site,
                            "log lines left out: more than log.max_lines_per_second from one place"
                        );
                    }
                }
            });
    }
}

fn describe(metadata: &Metadata<'_>) -> String {
    format!(
        "{} {} {}:{}",
        metadata.level(),
        metadata.target(),
        metadata.file().unwrap_or("?"),
        metadata.line().unwrap_or(0)
    )
}

impl<S> Filter<S> for RateLimit {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _: &Context<'_, S>) -> bool {
        self.admit(event.metadata(), Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    use tracing::callsite::DefaultCallsite;
    use tracing::field::FieldSet;
    use tracing::metadata::Kind;

    macro_rules! site {
        ($name:ident, $line:expr) => {{
            static META: Metadata<'static> = Metadata::new(
                "event",
                "lime_server::test",
                Level::WARN,
                Some("test.rs"),
                Some($line),
                None,
                FieldSet::new(&[], tracing::callsite::Identifier(&$name)),
                Kind::EVENT,
            );
            static $name: DefaultCallsite = DefaultCallsite::new(&META);
            &META
        }};
    }

    #[test]
    fn each_place_writes_its_share_a_second_and_the_rest_is_counted() {
        let limit = RateLimit::new(3);
        let flood = site!(FLOOD, 1);
        let quiet = site!(QUIET, 2);
        let start = Instant::now();
        let written = (0..1_000).filter(|_| limit.admit(flood, start)).count();
        assert_eq!(written, 3);
        // Another place is not held back by the flood.
        assert!(limit.admit(quiet, start));
        assert_eq!(
            limit.take_suppressed(),
            vec![Suppressed {
                site: "WARN lime_server::test test.rs:1".into(),
                count: 997
            }]
        );
        assert!(limit.take_suppressed().is_empty(), "counts restart");
        // A second later, the place writes again.
        assert!(!limit.admit(flood, start + Duration::from_millis(999)));
        assert!(limit.admit(flood, start + Duration::from_secs(1)));
    }

    #[test]
    fn zero_is_no_limit() {
        let limit = RateLimit::new(0);
        let flood = site!(UNLIMITED, 3);
        let now = Instant::now();
        assert!((0..1_000).all(|_| limit.admit(flood, now)));
        assert!(limit.take_suppressed().is_empty());
    }
}
