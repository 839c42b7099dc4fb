//! Log set-up: `tracing` to stderr, human-readable or JSON lines.
//!
//! Lines are written by a background thread (tracing-appender): a slow or closed
//! stderr never blocks or breaks a request; under a flood, lines are dropped
//! rather than requests slowed.

use crate::config::{LogFormat, LogSettings};
use std::fmt;
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
