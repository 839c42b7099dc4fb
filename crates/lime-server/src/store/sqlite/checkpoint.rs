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
//!   [`CAUGHT_UP_FRAMES`] to copy, the writer waits for one more pass before its
//!   next transaction: that pass is short (the rest was copied already) and
//!   complete, so the next transaction starts the WAL over;
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
/// so that the WAL starts over. Each start-over holds the writer for one pass
/// (5–15 ms on the disk of `docs/benchmarks.md`), so it comes rarely: at
/// SQLite's 1,000 frames it came 37 times a second under load.
pub const RESET_FRAMES: u32 = 16_000;

/// What "nearly caught up" means: frames a pass left uncopied.
pub const CAUGHT_UP_FRAMES: u32 = 200;

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
        Ok(Pass {
            frames: u32::try_from(frames).unwrap_or(0),
            copied: u32::try_from(copied).unwrap_or(0),
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
    /// The writer waits: skip the gathering.
    urgent: bool,
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
        })
    }

    /// Called by the writer after each transaction it ran on `conn`, before the
    /// next: asks for a pass, and keeps the WAL bounded (see the module's doc).
    pub fn after_commit(&self, conn: &Connection) {
        let frames = wal_frames();
        if frames == 0 {
            return;
        }
        if frames >= MAX_WAL_FRAMES {
            self.writer_restart(conn, frames);
            return;
        }
        let caught_up = self
            .shared
            .lock()
            .last
            .is_some_and(|pass| pass.left() <= CAUGHT_UP_FRAMES);
        if frames >= RESET_FRAMES && caught_up {
            self.pass_and_wait();
        } else {
            self.request(false);
        }
    }

    /// The writer's own checkpoint at the hard bound: RESTART, so that the next
    /// transaction starts the WAL over. The checkpointer's pass under way (if
    /// any) is waited for first, since two checkpoints cannot run at once.
    fn writer_restart(&self, conn: &Connection, frames: u32) {
        self.pass_and_wait();
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
    }

    /// Asks for a pass; `urgent` skips the gathering.
    fn request(&self, urgent: bool) -> u64 {
        let mut state = self.shared.lock();
        state.requested += 1;
        state.urgent |= urgent;
        if urgent {
            self.shared.hurry.store(true, Ordering::Relaxed);
        }
        self.shared.wake.notify_one();
        state.requested
    }

    /// Asks for a pass at once and waits (at most [`PASS_WAIT`]) until one that
    /// started after the request has ended.
    fn pass_and_wait(&self) {
        let request = self.request(true);
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
        }
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
        shared.hurry.store(state.urgent, Ordering::Relaxed);
        state.urgent = false;
        drop(state);
        let result = checkpoint(conn, "PASSIVE");
        let mut state = shared.lock();
        state.finished = serves;
        match result {
            Ok(pass) => state.last = Some(pass),
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
