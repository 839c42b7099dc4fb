//! WAL checkpoints beside the writer, not inside its commits.
//!
//! SQLite's automatic checkpoint runs in the connection that commits, once the
//! WAL passes 1,000 pages: the writer thread would copy the WAL into the database
//! file (and fsync both) inside a commit, and every job waiting behind it would
//! wait for that I/O too (the 10–20 ms p99 of `docs/benchmarks.md`). So the
//! writer's connection turns it off (`wal_autocheckpoint = 0`) and a
//! [`Checkpointer`] thread, on a connection of its own, runs
//! `wal_checkpoint(PASSIVE)` after commits: woken by the writer, it gathers
//! commits for [`GATHER`] and copies what is committed while the writer goes on.
//!
//! A PASSIVE checkpoint never waits, so under steady load it never catches up with
//! a writer that keeps appending, and SQLite only starts the WAL over from its
//! beginning once everything in it has been copied. The WAL is kept bounded by the
//! writer, between two transactions ([`Checkpointer::after_commit`]):
//!
//! - past [`RESET_FRAMES`], when the checkpointer's last pass left at most
//!   [`CAUGHT_UP_FRAMES`] to copy, the writer asks for a pass at once and goes
//!   on; once that pass has ended, it asks for another while more than
//!   [`CAUGHT_UP_FRAMES`] came meanwhile (each copies what came during the one
//!   before, so less each time, up to [`START_OVER_PASSES`]), then waits for
//!   one more before its next transaction. That last pass copies only what is
//!   left (the rest was copied already) and is complete, so the next
//!   transaction starts the WAL over;
//! - past [`MAX_WAL_FRAMES`] (the checkpointer falls behind, or a reader in another
//!   process holds old pages), the writer runs a RESTART checkpoint itself.
//!
//! A pass's pages go to the disk a few at a time (on Linux, through the VFS of
//! `writeback.rs`), so that a commit's fsync queues behind a few pages rather
//! than the whole pass; a pass the writer waits for flushes at once, since no
//! commit runs meanwhile. With commits no longer waiting behind the passes, the
//! writer's waits for the WAL to start over were most of what was left of the
//! p99 (every request in flight waits with the writer): they are now one per
//! [`RESET_FRAMES`] (64 MiB of 4 KiB pages), not one per 1,000 frames.
//!
//! Durability does not change: a commit still fsyncs the WAL under
//! `synchronous = FULL`; a checkpoint fsyncs the WAL and the database file as the
//! automatic one did, on the checkpointer's connection set up alike. This module
//! must not run jobs or touch any table.

use rusqlite::Connection;
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the checkpointer waits after being woken, so that one pass copies
/// the pages of many commits.
pub const GATHER: Duration = Duration::from_millis(10);

/// WAL frames past which the writer lets a nearly caught-up checkpointer finish,
/// so that the WAL starts over. Each start-over holds the writer for a pass
/// (about 2 ms at the median on the disk of `docs/benchmarks.md`), so it comes
/// rarely: at SQLite's 1,000 frames it came 37 times a second under load.
pub const RESET_FRAMES: u32 = 16_000;

/// What "nearly caught up" means: frames a pass left uncopied.
pub const CAUGHT_UP_FRAMES: u32 = 200;

/// Most passes that run beside the writer, each copying what came during the
/// one before, before it waits for the last: a writer that writes as fast as a
/// pass copies would never leave little enough.
pub const START_OVER_PASSES: u32 = 4;

/// The hard bound: past it the writer checkpoints (RESTART) itself.
pub const MAX_WAL_FRAMES: u32 = 32_000;

/// Longest the writer waits for the checkpointer's pass before going on: a
/// checkpointer that is stuck must not stop the writer.
const PASS_WAIT: Duration = Duration::from_secs(1);

thread_local! {
    /// The frames in the WAL after the last commit of the connection on this
    /// thread, set by [`record_wal_frames`]: each writer has a thread of its own.
    static WAL_FRAMES: Cell<u32> = const { Cell::new(0) };
}

/// The WAL hook of the writer's connection (SQLite calls it after each commit,
/// on the committing thread, with the WAL's size in frames).
fn record_wal_frames(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.with(|cell| cell.set(u32::try_from(frames).unwrap_or(0)));
    Ok(())
}

/// Sets up the writer's connection: no automatic checkpoint, the WAL's size
/// recorded after each commit. Call on the writer's own thread.
pub fn prepare_writer(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
    conn.wal_hook(Some(record_wal_frames));
    Ok(())
}

/// The frames in the WAL after the writer's last commit on this thread.
fn wal_frames() -> u32 {
    WAL_FRAMES.with(Cell::get)
}

/// What one `PRAGMA wal_checkpoint` reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Frames in the WAL when the pass ran.
    pub frames: u32,
    /// Of those, frames copied into the database file (by this pass or earlier).
    pub copied: u32,
    /// Of those, frames this pass copied, as far as the checkpointer thread
    /// knows (the whole `copied` when it has no earlier pass of the same WAL).
    pub fresh: u32,
}

impl Pass {
    /// Frames the pass left to copy.
    pub fn left(&self) -> u32 {
        self.frames.saturating_sub(self.copied)
    }
}

/// Runs `PRAGMA wal_checkpoint(mode)` on `conn`.
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<Pass> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        let frames: i64 = row.get(1)?;
        let copied: i64 = row.get(2)?;
        let copied = u32::try_from(copied).unwrap_or(0);
        Ok(Pass {
            frames: u32::try_from(frames).unwrap_or(0),
            copied,
            fresh: copied,
        })
    })
}

/// What the writer and the checkpointer thread share.
#[derive(Default)]
struct State {
    /// Passes asked for (a count: a pass started after request `n` serves it).
    requested: u64,
    /// Requests a pass started has taken on: `requested` when it started.
    served: u64,
    /// Requests served by a pass that has ended.
    finished: u64,
    /// A pass is wanted at once: skip the gathering.
    urgent: bool,
    /// The writer waits for the pass: it flushes its pages at once.
    hurry: bool,
    /// The last pass, when it succeeded.
    last: Option<Pass>,
    /// The store is closing.
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the checkpointer (a request, or the stop).
    wake: Condvar,
    /// Wakes the writer waiting for a pass.
    done: Condvar,
    /// The writer waits: the pass under way flushes its pages at once rather
    /// than a few at a time (`writeback.rs`).
    hurry: Arc<AtomicBool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters: still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The checkpointer thread of one database file, driven by its writer.
pub struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// The passes that let the WAL start over, while they run beside the
    /// writer ([`Checkpointer::start_over`]).
    starting_over: Cell<Option<StartOver>>,
    /// [`RESET_FRAMES`], or less in tests.
    reset_frames: u32,
}

/// How soon a pass is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// After [`GATHER`], its pages written back a few at a time.
    Gathered,
    /// At once, its pages still written back a few at a time: the passes that
    /// run beside the writer to let the WAL start over.
    Soon,
    /// At once, its pages flushed at once: the writer waits for it.
    Waited,
}

/// The passes under way that let the WAL start over.
#[derive(Debug, Clone, Copy)]
struct StartOver {
    /// The request of the last pass asked for.
    request: u64,
    /// Passes asked for so far.
    passes: u32,
}

impl Checkpointer {
    /// Starts the checkpointer on `conn`, a connection of its own to the file the
    /// writer writes (set up like the writer's: WAL, same `synchronous`).
    pub fn start(conn: Connection, name: String) -> std::io::Result<Checkpointer> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
            hurry: Arc::new(AtomicBool::new(false)),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || run_checkpointer(&conn, &shared))?
        };
        Ok(Checkpointer {
            shared,
            thread: Some(thread),
            starting_over: Cell::new(None),
            reset_frames: RESET_FRAMES,
        })
    }

    /// Called by the writer after each transaction it ran on `conn`, before the
    /// next: asks for a pass, and keeps the WAL bounded (see the module's doc).
    pub fn after_commit(&self, conn: &Connection) {
        self.keep_bounded(conn, wal_frames());
    }

    /// [`Checkpointer::after_commit`] with the WAL at `frames`; returns the
    /// checkpointer's pass the writer waited for, if it waited for one.
    fn keep_bounded(&self, conn: &Connection, frames: u32) -> Option<Pass> {
        if frames == 0 {
            return None;
        }
        if frames >= MAX_WAL_FRAMES {
            return self.writer_restart(conn, frames);
        }
        let caught_up = self
            .shared
            .lock()
            .last
            .is_some_and(|pass| pass.left() <= CAUGHT_UP_FRAMES);
        if frames < self.reset_frames {
            // Started over, or never due: what ran for it is done with.
            self.starting_over.set(None);
        } else if caught_up || self.starting_over.get().is_some() {
            return self.start_over(frames);
        }
        self.request(Ask::Gathered);
        None
    }

    /// The writer's own checkpoint at the hard bound: RESTART, so that the next
    /// transaction starts the WAL over. The checkpointer's pass under way (if
    /// any) is waited for first, since two checkpoints cannot run at once.
    fn writer_restart(&self, conn: &Connection, frames: u32) -> Option<Pass> {
        self.starting_over.set(None);
        let waited = self.pass_and_wait();
        match checkpoint(conn, "RESTART") {
            Ok(pass) if pass.left() == 0 => {
                tracing::debug!(frames, "WAL at its bound: restarted by the writer");
            }
            Ok(pass) => tracing::warn!(
                frames,
                left = pass.left(),
                "WAL at its bound and a reader keeps it from starting over \
                 (another process reading the database?)"
            ),
            Err(error) => tracing::warn!(%error, frames, "WAL checkpoint by the writer failed"),
        }
        WAL_FRAMES.with(|cell| cell.set(0));
        waited
    }

    /// Lets the WAL start over (the WAL at `frames`). Passes run at once, one
    /// after the other, beside the writer: the first copies what the WAL holds,
    /// each next one what came during the one before. Once one has left at
    /// most [`CAUGHT_UP_FRAMES`] (or after [`START_OVER_PASSES`]), the writer
    /// waits for a last pass that copies what is left. Every request in flight
    /// waits with the writer. Waiting for one pass straight away, it waited for
    /// the pass under way (if any) and for one that copied all that came since
    /// the last gathered pass started: 7-8 ms at the median on the disk of
    /// `docs/benchmarks.md`. Waiting after one pass, for what came during it
    /// (390-540 frames beside a stream of 1,000-device requests): about 4 ms.
    /// Now the pass waited for copies 150-180 frames, in about 2 ms.
    fn start_over(&self, frames: u32) -> Option<Pass> {
        let Some(running) = self.starting_over.get() else {
            self.start_over_pass(1);
            return None;
        };
        let left = {
            let state = self.shared.lock();
            if state.finished < running.request {
                // The pass runs: nothing to ask meanwhile.
                return None;
            }
            state
                .last
                .map_or(frames, |pass| frames.saturating_sub(pass.copied))
        };
        if left > CAUGHT_UP_FRAMES && running.passes < START_OVER_PASSES {
            self.start_over_pass(running.passes + 1);
            return None;
        }
        self.starting_over.set(None);
        self.pass_and_wait()
    }

    /// Asks for the `passes`-th pass beside the writer that lets the WAL start
    /// over.
    fn start_over_pass(&self, passes: u32) {
        let request = self.request(Ask::Soon);
        self.starting_over.set(Some(StartOver { request, passes }));
    }

    /// Asks for a pass; returns the request's number.
    fn request(&self, ask: Ask) -> u64 {
        let mut state = self.shared.lock();
        state.requested += 1;
        state.urgent |= ask != Ask::Gathered;
        if ask == Ask::Waited {
            state.hurry = true;
            self.shared.hurry.store(true, Ordering::Relaxed);
        }
        self.shared.wake.notify_one();
        state.requested
    }

    /// Asks for a pass at once and waits (at most [`PASS_WAIT`]) until one that
    /// started after the request has ended; returns that pass.
    fn pass_and_wait(&self) -> Option<Pass> {
        let request = self.request(Ask::Waited);
        let state = self.shared.lock();
        let (state, waited) = self
            .shared
            .done
            .wait_timeout_while(state, PASS_WAIT, |state| {
                state.finished < request && !state.stop
            })
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if waited.timed_out() && !state.stop {
            tracing::warn!(waited = ?PASS_WAIT, "WAL checkpoint slow: the writer goes on");
            return None;
        }
        state.last
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_checkpointer(conn: &Connection, shared: &Shared) {
    #[cfg(target_os = "linux")]
    super::writeback::hurry_with(shared.hurry.clone());
    loop {
        let mut state = shared.lock();
        while state.requested == state.served && !state.stop {
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if state.stop {
            return;
        }
        if !state.urgent {
            // Gather: later commits' pages go into this pass (a request that
            // turns urgent meanwhile ends the wait).
            state = shared
                .wake
                .wait_timeout_while(state, GATHER, |state| !state.urgent && !state.stop)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        let serves = state.requested;
        state.served = serves;
        shared.hurry.store(state.hurry, Ordering::Relaxed);
        state.urgent = false;
        state.hurry = false;
        drop(state);
        let result = checkpoint(conn, "PASSIVE");
        let mut state = shared.lock();
        state.finished = serves;
        match result {
            Ok(mut pass) => {
                // The same WAL (not started over since) unless it holds fewer frames.
                if let Some(last) = state.last.filter(|last| last.frames <= pass.frames) {
                    pass.fresh = pass.copied.saturating_sub(last.copied);
                }
                state.last = Some(pass);
            }
            Err(error) => {
                state.last = None;
                tracing::warn!(%error, "WAL checkpoint failed");
            }
        }
        shared.done.notify_all();
    }
}

/// Opens the checkpointer's connection to `path`, in WAL mode with the writer's
/// `synchronous` (the checkpoint's fsyncs follow it). On Linux it goes through
/// the VFS that writes a checkpoint's pages back a few at a time
/// (`writeback.rs`), so that commits do not wait behind a whole pass's flush.
pub fn connect(path: &Path, synchronous: &str) -> rusqlite::Result<Connection> {
    let conn = open(path)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
         PRAGMA wal_autocheckpoint = 0;"
    ))?;
    Ok(conn)
}

#[cfg(target_os = "linux")]
fn open(path: &Path) -> rusqlite::Result<Connection> {
    use rusqlite::OpenFlags;
    match super::writeback::register() {
        Ok(()) => Connection::open_with_flags_and_vfs(
            path,
            OpenFlags::default(),
            super::writeback::VFS_NAME,
        ),
        Err(error) => {
            tracing::warn!(%error, "SQLite: checkpoints flush each pass at once");
            Connection::open(path)
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn open(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends about `pages` frames to the WAL, in one transaction.
    fn write_pages(conn: &Connection, pages: usize) {
        conn.execute_batch("BEGIN").unwrap();
        for _ in 0..pages {
            conn.execute("INSERT INTO t VALUES (randomblob(4000))", [])
                .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
    }

    /// Past its reset, the writer goes on while passes copy the WAL, and waits
    /// only for a pass that copies what little the last of them left, however
    /// much it wrote while they ran: its wait no longer grows with the WAL's
    /// size, nor with how fast the writer writes.
    #[test]
    fn the_pass_the_writer_waits_for_copies_little_however_fast_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.sqlite");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (b BLOB)")
            .unwrap();
        prepare_writer(&writer).unwrap();
        let mut checkpointer =
            Checkpointer::start(connect(&path, "FULL").unwrap(), "test-ckpt".into()).unwrap();
        checkpointer.reset_frames = 1_000;
        // A pass that leaves the WAL caught up, then 5,000 pages no pass copied.
        write_pages(&writer, 10);
        checkpointer.pass_and_wait().unwrap();
        write_pages(&writer, 5_000);
        // The writer's next transactions (10 pages each, a millisecond apart),
        // each followed by what the writer does after a commit, until it has
        // waited for a pass.
        let started = std::time::Instant::now();
        let waited = loop {
            if let Some(pass) = checkpointer.keep_bounded(&writer, wal_frames()) {
                break pass;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no pass waited for"
            );
            std::thread::sleep(Duration::from_millis(1));
            write_pages(&writer, 10);
        };
        // Had it waited once the first pass ended, it would have waited for all
        // that came while the first pass copied 5,000 pages.
        assert!(
            waited.fresh <= CAUGHT_UP_FRAMES,
            "the writer waited for a pass that copied {} frames",
            waited.fresh
        );
        // Everything was copied: the next transaction starts the WAL over.
        write_pages(&writer, 1);
        assert!(wal_frames() < 10, "{} frames in the WAL", wal_frames());
    }
}
