//! The log queue: formatted lines wait here for a background thread that writes
//! them to stderr, so a slow or stalled log reader never blocks a request.
//!
//! The queue is bounded in bytes, not lines: a flood of long lines cannot grow it
//! past `log.max_queued_bytes`. A line that does not fit is dropped and counted;
//! the writer reports the count in a line of its own once there is room.
//! (tracing-appender's queue is bounded in lines only, which bounds nothing when
//! lines can be long: hence these few lines of our own.)

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// Lines waiting, their size, and what was dropped.
#[derive(Default)]
struct Lines {
    queued: VecDeque<Vec<u8>>,
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

/// Keeps the writer thread; dropping it writes what is queued, then stops it.
pub struct QueueGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A queue of at most `max_bytes` bytes of lines, written to `sink` by a thread.
pub fn bounded<W: Write + Send + 'static>(sink: W, max_bytes: usize) -> (QueueWriter, QueueGuard) {
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

fn write_lines<W: Write>(shared: &Shared, mut sink: W) {
    loop {
        let (line, dropped) = {
            let mut lines = shared.lock();
            while lines.queued.is_empty() && lines.dropped == 0 && !lines.closed {
                lines = shared
                    .ready
                    .wait(lines)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let line = lines.queued.pop_front();
            if let Some(line) = &line {
                lines.bytes -= line.len();
            }
            let dropped = std::mem::take(&mut lines.dropped);
            if line.is_none() && dropped == 0 && lines.closed {
                let _ = sink.flush();
                return;
            }
            (line, dropped)
        };
        // Written outside the lock: a stalled reader blocks this thread only.
        if let Some(line) = line {
            let _ = sink.write_all(&line);
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
            lines.queued.push_back(line.to_vec());
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
}
