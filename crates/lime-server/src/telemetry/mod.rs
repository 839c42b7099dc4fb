//! Log set-up: `tracing` to stderr or a file (`log.file`, reopened on SIGHUP:
//! [`file`]), human-readable or JSON lines, and the bounds that keep a flood of
//! requests from becoming a flood of log bytes.
//!
//! - Lines are written by a background thread ([`queue`]): a slow or closed stderr
//!   never blocks a request; the queue is bounded in bytes and drops (counted)
//!   rather than grows.
//! - Each place in the code writes at most `log.max_lines_per_second` lines a
//!   second ([`rate_limit`]); the rest are summarised with a count.
//! - Values a client sent are cut short wherever they are logged or echoed
//!   ([`clip`]).

pub mod file;
pub mod queue;
pub mod rate_limit;

use crate::config::{LogFormat, LogSettings};
use std::fmt;
use std::io::IsTerminal;
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use queue::{QueueGuard, Reopener};

/// Installs the global subscriber, writing to `log.file` when set, else to
/// stderr. `RUST_LOG`, when set, overrides `log.level`. Keep the returned guard
/// for the life of the program: dropping it writes the lines still queued; its
/// [`QueueGuard::reopener`] reopens the log file. Fails, naming `log.file` and the
/// path, when the file cannot be opened.
pub fn init(settings: &LogSettings) -> anyhow::Result<QueueGuard> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let limit = rate_limit::RateLimit::new(settings.max_lines_per_second);
    let (writer, guard) = match &settings.file {
        Some(path) => {
            let file = file::LogFile::open(path).map_err(|error| {
                anyhow::anyhow!("log.file: cannot open {}: {error}", path.display())
            })?;
            queue::bounded(file, settings.max_queued_bytes)
        }
        None => queue::bounded(std::io::stderr(), settings.max_queued_bytes),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(settings.file.is_none() && std::io::stderr().is_terminal());
    let layer = match settings.format {
        LogFormat::Human => layer.boxed(),
        LogFormat::Json => layer.json().boxed(),
    };
    // A second init (tests, or a subscriber set by an embedding program) keeps the first.
    if tracing_subscriber::registry()
        .with(layer.with_filter(filter.and(limit.clone())))
        .try_init()
        .is_ok()
    {
        limit.report_every(Duration::from_secs(1));
    }
    Ok(guard)
}

/// Most characters of a client-supplied value that a log line or an answer shows.
pub const CLIP_CHARS: usize = 96;

/// A client-supplied value, cut to [`CLIP_CHARS`] characters wherever it is echoed
/// or logged (the threat model's invariant 5): a 400 KB header must not become a
/// 400 KB log line or answer. Shows the first characters, then how long it was.
pub struct Clipped<'a>(&'a str);

/// `text` as it may be logged or echoed: see [`Clipped`].
pub fn clip(text: &str) -> Clipped<'_> {
    Clipped(text)
}

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(CLIP_CHARS) {
            None => f.write_str(self.0),
            Some((cut, _)) => write!(f, "{}… ({} bytes in all)", &self.0[..cut], self.0.len()),
        }
    }
}

impl fmt::Debug for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(CLIP_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}… ({} bytes in all)", &self.0[..cut], self.0.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_shown_whole() {
        assert_eq!(
            clip("sip:alice@example.org").to_string(),
            "sip:alice@example.org"
        );
        assert_eq!(format!("{:?}", clip("a\"b")), "\"a\\\"b\"");
    }

    #[test]
    fn long_values_are_cut_with_their_length() {
        let long = "é".repeat(200_000);
        let shown = clip(&long).to_string();
        assert!(shown.len() < 4 * CLIP_CHARS, "{} bytes shown", shown.len());
        assert!(shown.starts_with(&"é".repeat(CLIP_CHARS)));
        assert!(shown.ends_with("(400000 bytes in all)"), "{shown}");
        assert!(format!("{:?}", clip(&long)).ends_with("(400000 bytes in all)"));
    }
}
