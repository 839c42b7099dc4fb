//! The log queue: formatted lines wait here for a background thread that writes
//! them to stderr or the log file, so a slow or stalled log reader never blocks a
//! request. The same thread reopens the log file when told (SIGHUP, after
//! logrotate renamed it), in queue order: lines logged before the request go to
//! the old file, lines after it to the new one.
//!
//! The queue is bounded in bytes, not lines: a flood of long lines cannot grow it
//! past `log.max_queued_bytes`. A line that does not fit is dropped and counted;
//! the writer reports the count in a line of its own once there is room.
//! (tracing-appender's queue is bounded in lines only, which bounds nothing when
//! lines can be long: hence these few lines of our own.)

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

/// Where the writer thread writes: stderr, or a file it can open again.
pub trait Sink: Write + Send + 'static {
    /// Opens the destination again (a log file renamed by logrotate); what has
    /// nothing to reopen (stderr) does nothing.
    fn reopen(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// What the destination is, for the line saying a reopen failed.
    fn describe(&self) -> String {
        "stderr".to_owned()
    }
}

impl Sink for io::Stderr {}

/// One thing for the writer thread to do, in order.
enum Entry {
    /// A formatted line to write.
    Line(Vec<u8>),
    /// Reopen the sink, and say how it went (an error names the sink).
    Reopen(mpsc::Sender<io::Result<()>>),
}

/// Lines waiting, their size, and what was dropped.
#[derive(Default)]
struct Lines {
    queued: VecDeque<Entry>,
    bytes: usize,
    dropped: u64,
    closed: bool,
}

struct Shared {
    lines: Mutex<Lines>,
    ready: Condvar,
    max_bytes: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Lines> {
        // A panic while holding the lock leaves whole lines behind: keep going.
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending side: a `MakeWriter` for the fmt layer, cheap to clone.
#[derive(Clone)]
pub struct QueueWriter {
    shared: Arc<Shared>,
}

/// Asks the writer thread to reopen its sink; cheap to clone.
#[derive(Clone)]
pub struct Reopener {
    shared: Arc<Shared>,
}

impl Reopener {
    /// Queues a reopen after the lines already queued (never dropped: it holds no
    /// bytes) and waits, at most `wait`, for the writer thread to do it: lines
    /// logged after an `Ok` go to the reopened sink. `None`: not done within
    /// `wait` (a stalled sink), it will be in its turn. Blocks: not for async code.
    pub fn reopen(&self, wait: Duration) -> Option<io::Result<()>> {
        let (done, outcome) = mpsc::channel();
        self.shared.lock().queued.push_back(Entry::Reopen(done));
        self.shared.ready.notify_one();
        outcome.recv_timeout(wait).ok()
    }
}

/// Keeps the writer thread; dropping it writes what is queued, then stops it.
pub struct QueueGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A queue of at most `max_bytes` bytes of lines, written to `sink` by a thread.
pub fn bounded<W: Sink>(sink: W, max_bytes: usize) -> (QueueWriter, QueueGuard) {
    let shared = Arc::new(Shared {
        lines: Mutex::new(Lines::default()),
        ready: Condvar::new(),
        max_bytes,
    });
    let worker = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_lines(&worker, sink))
        .ok();
    (
        QueueWriter {
            shared: Arc::clone(&shared),
        },
        QueueGuard { shared, thread },
    )
}

fn write_lines<W: Sink>(shared: &Shared, mut sink: W) {
    loop {
        let (entry, dropped) = {
            let mut lines = shared.lock();
            while lines.queued.is_empty() && lines.dropped == 0 && !lines.closed {
                lines = shared
                    .ready
                    .wait(lines)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let entry = lines.queued.pop_front();
            if let Some(Entry::Line(line)) = &entry {
                lines.bytes -= line.len();
            }
            let dropped = std::mem::take(&mut lines.dropped);
            if entry.is_none() && dropped == 0 && lines.closed {
                let _ = sink.flush();
                return;
            }
            (entry, dropped)
        };
        // Written outside the lock: a stalled reader blocks this thread only.
        match entry {
            Some(Entry::Line(line)) => {
                let _ = sink.write_all(&line);
            }
            Some(Entry::Reopen(done)) => {
                let _ = sink.flush();
                let outcome = sink.reopen().map_err(|error| {
                    io::Error::new(error.kind(), format!("{}: {error}", sink.describe()))
                });
                // The asker may have stopped waiting: nothing to tell then.
                let _ = done.send(outcome);
            }
            None => {}
        }
        if dropped > 0 {
            let _ = writeln!(
                sink,
                "lime-server: {dropped} log lines dropped: the log queue was full \
                 (log.max_queued_bytes = {}); the log reader is too slow",
                shared.max_bytes
            );
        }
    }
}

impl QueueWriter {
    /// Queues one line, or drops it (counted) when it does not fit.
    fn push(&self, line: &[u8]) {
        let mut lines = self.shared.lock();
        if lines.bytes + line.len() > self.shared.max_bytes {
            lines.dropped += 1;
            crate::metrics::log_line_dropped();
        } else {
            lines.bytes += line.len();
            lines.queued.push_back(Entry::Line(line.to_vec()));
        }
        drop(lines);
        self.shared.ready.notify_one();
    }
}

impl Write for QueueWriter {
    /// The fmt layer writes each event in one call: one call is one line.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueueWriter {
    type Writer = QueueWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl QueueGuard {
    /// A handle that asks the writer thread to reopen its sink.
    pub fn reopener(&self) -> Reopener {
        Reopener {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink that blocks until the test lets it go, then records what it got.
    struct Stalled {
        gate: mpsc::Receiver<()>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Sink for Stalled {}

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.gate.recv();
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_keeps_the_queue_within_its_bytes_and_counts_the_drops() {
        let (open, gate) = mpsc::channel();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = Stalled {
            gate,
            out: Arc::clone(&out),
        };
        let (mut writer, guard) = bounded(sink, 10_000);
        let line = vec![b'x'; 999];
        let mut line = line;
        line.push(b'\n');
        for _ in 0..1_000 {
            writer.write_all(&line).unwrap();
            assert!(writer.shared.lock().bytes <= 10_000);
        }
        // Let everything through, then stop.
        for _ in 0..2_000 {
            let _ = open.send(());
        }
        drop(open);
        drop(guard);
        let written = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let kept = written.lines().filter(|l| l.starts_with('x')).count();
        // At most the 10 that fit, plus the one the writer had taken out already.
        assert!((10..=11).contains(&kept), "{kept} lines kept");
        // The drops may be reported in several lines, as the writer takes them.
        let dropped: usize = written
            .lines()
            .filter(|l| l.contains("log lines dropped"))
            .map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
            })
            .sum();
        assert_eq!(kept + dropped, 1_000, "{written}");
    }

    #[test]
    fn lines_are_written_in_order_and_flushed_on_drop() {
        let out = Arc::new(Mutex::new(Vec::new()));
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Sink for Shared {}
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut writer, guard) = bounded(Shared(Arc::clone(&out)), 1 << 20);
        for n in 0..100 {
            writer.write_all(format!("{n}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let written = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let expected: String = (0..100).map(|n| format!("{n}\n")).collect();
        assert_eq!(written, expected);
    }

    #[test]
    fn a_reopen_comes_after_the_lines_queued_before_it() {
        /// Records lines, and "REOPEN" where the sink was reopened.
        struct Recording(Arc<Mutex<Vec<String>>>);
        impl Sink for Recording {
            fn reopen(&mut self) -> io::Result<()> {
                self.0.lock().unwrap().push("REOPEN".to_owned());
                Ok(())
            }
        }
        impl Write for Recording {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                let line = String::from_utf8_lossy(buf).trim_end().to_owned();
                self.0.lock().unwrap().push(line);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let out = Arc::new(Mutex::new(Vec::new()));
        let (mut writer, guard) = bounded(Recording(Arc::clone(&out)), 1 << 20);
        writer.write_all(b"before\n").unwrap();
        let reopened = guard.reopener().reopen(Duration::from_secs(30));
        assert!(matches!(reopened, Some(Ok(()))), "{reopened:?}");
        writer.write_all(b"after\n").unwrap();
        drop(guard);
        assert_eq!(*out.lock().unwrap(), ["before", "REOPEN", "after"]);
    }

    #[test]
    fn a_reopen_that_fails_is_reported_naming_the_sink() {
        struct Unopenable;
        impl Sink for Unopenable {
            fn reopen(&mut self) -> io::Result<()> {
                Err(io::Error::new(io::ErrorKind::NotFound, "gone"))
            }
            fn describe(&self) -> String {
                "/var/log/lime-server/lime-server.log".to_owned()
            }
        }
        impl Write for Unopenable {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (_writer, guard) = bounded(Unopenable, 1 << 20);
        let error = guard
            .reopener()
            .reopen(Duration::from_secs(30))
            .expect("the writer answers")
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "/var/log/lime-server/lime-server.log: gone"
        );
    }
}
