//! Log set-up: `tracing` to stderr, human-readable or JSON lines.
//!
//! Lines are written by a background thread (tracing-appender): a slow or closed
//! stderr never blocks or breaks a request; under a flood, lines are dropped
//! rather than requests slowed.

use crate::config::{LogFormat, LogSettings};
use std::io::IsTerminal;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
/// Keep the returned guard for the life of the program: dropping it flushes the
/// lines still queued.
pub fn init(settings: &LogSettings) -> WorkerGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::stderr().is_terminal());
    // A second init (tests, or a subscriber set by an embedding program) keeps the first.
    let _ = match settings.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    guard
}
