//! The checkpointer's VFS: a checkpoint's pages written back a few at a time.
//!
//! A checkpoint copies pages from the WAL into the database file (into the page
//! cache) and then fsyncs the file: the kernel sends every copied page to the
//! disk at once, and a commit's fsync of the WAL that comes meanwhile queues
//! behind all of them. On the disks measured in `docs/benchmarks.md` that made a
//! commit wait up to the whole flush (4–5 ms), and it was most of the server's
//! p99 under load. Here the pages go out in runs of [`RUN_PAGES`] while the
//! checkpoint copies them (`sync_file_range`, waiting for each run), so a commit
//! waits behind one run at most; the fsync that follows, which is what
//! durability rests on, finds little left to write.
//!
//! Only the checkpointer's connection is opened through this VFS ([`VFS_NAME`]),
//! and only its main database file is changed: SQLite's own unix VFS does all the
//! work, and this one adds `sync_file_range` calls after its writes. Nothing here
//! decides what is written or when a sync is done. A call that fails is only
//! advice not taken: the sync follows anyway and reports the error.
//!
//! This is the crate's only `unsafe` code: a VFS is a table of C callbacks over
//! memory SQLite allocates, and no crate wraps an existing VFS this way.

use rusqlite::ffi;
use std::cell::{Cell, RefCell};
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The name the checkpointer opens its connection with.
pub const VFS_NAME: &CStr = c"lime-writeback";

/// Pages of a checkpoint written back together: a commit's fsync waits behind
/// at most this many. On the disk of `docs/benchmarks.md` (measured with
/// `tools/lime-load/flush-contention.py`), runs of 32 held a concurrent fsync's
/// p99 at 2.3 ms where one flush of 300 pages made it 7.6 ms; runs of 8 held it
/// at 0.7 ms, but their passes took longer and the writer, which waits for a
/// pass when the WAL starts over, waited longer: the server's p99.9 was worse.
pub const RUN_PAGES: u32 = 32;

thread_local! {
    /// Set while a writer waits for this thread's checkpoint ([`hurry_with`]).
    static HURRY: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Makes the checkpoints run on this thread flush their pages at once while
/// `flag` is set: the writer waits for such a checkpoint, so no commit runs
/// meanwhile to be spared, and one flush is the shortest wait.
pub fn hurry_with(flag: Arc<AtomicBool>) {
    HURRY.with(|hurry| *hurry.borrow_mut() = Some(flag));
}

fn hurried() -> bool {
    HURRY.with(|hurry| {
        hurry
            .borrow()
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    })
}

thread_local! {
    /// Runs written back by checkpoints on this thread.
    static RUNS: Cell<u64> = const { Cell::new(0) };
}

/// Runs of pages written back by the checkpoints run on this thread so far.
#[cfg(test)]
fn runs() -> u64 {
    RUNS.with(Cell::get)
}

/// What this VFS keeps for each main database file, after the unix VFS's own
/// structure in the memory SQLite gives to the file.
struct FileState {
    /// The file's descriptor, read from the unix VFS's structure and checked.
    fd: c_int,
    /// The run not yet written back: its first and end offsets in the file.
    start: i64,
    end: i64,
    /// Writes in that span.
    pages: u32,
}

/// Whether the VFS is registered (its `sqlite3_vfs` leaked for the process's
/// life, since SQLite keeps the pointer), or why it could not be.
static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();

/// Where a file's [`FileState`] starts in the memory SQLite gives to it: after the unix
/// VFS's structure (set once, when the VFS is registered).
static STATE_OFFSET: OnceLock<usize> = OnceLock::new();

/// Our copy of the unix VFS's file methods with `xWrite`, `xSync` and `xClose`
/// replaced, and the table it copies: the methods every file we change had,
/// called for the work itself.
static METHODS: OnceLock<(ffi::sqlite3_io_methods, &'static ffi::sqlite3_io_methods)> =
    OnceLock::new();

/// The unix VFS's methods of the files whose methods are ours.
fn real_methods() -> &'static ffi::sqlite3_io_methods {
    METHODS.get().expect("a file was opened through the VFS").1
}

/// Registers the VFS (once per process). Errors name what failed; the caller
/// then opens its connection with SQLite's default VFS.
pub fn register() -> Result<(), String> {
    REGISTERED
        .get_or_init(|| {
            // SAFETY: `sqlite3_vfs_find` initializes SQLite if needed and returns
            // the default VFS, valid for the process's life, or null.
            let real = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
            if real.is_null() {
                return Err("SQLite has no default VFS".into());
            }
            // SAFETY: `real` is a valid VFS; we copy its fields and keep it as
            // our `pAppData`. Its other methods ignore the VFS they are given
            // (the unix VFS reads it only in `xOpen`, which we wrap).
            let mut vfs = unsafe { *real };
            let name = unsafe { CStr::from_ptr(vfs.zName) };
            if name.to_bytes() != b"unix" {
                return Err(format!("SQLite's default VFS is {name:?}, not \"unix\""));
            }
            let Ok(real_size) = usize::try_from(vfs.szOsFile) else {
                return Err(format!("SQLite's file size {} is negative", vfs.szOsFile));
            };
            let offset =
                *STATE_OFFSET.get_or_init(|| real_size.next_multiple_of(align_of::<FileState>()));
            vfs.szOsFile = c_int::try_from(offset + size_of::<FileState>())
                .map_err(|_| "SQLite's file size overflows".to_string())?;
            vfs.pNext = std::ptr::null_mut();
            vfs.zName = VFS_NAME.as_ptr();
            vfs.pAppData = real.cast();
            vfs.xOpen = Some(open);
            let vfs = Box::leak(Box::new(vfs));
            // SAFETY: `vfs` lives for the process's life, as SQLite requires.
            match unsafe { ffi::sqlite3_vfs_register(vfs, 0) } {
                ffi::SQLITE_OK => Ok(()),
                code => Err(format!("sqlite3_vfs_register failed ({code})")),
            }
        })
        .clone()
}

/// Where the [`FileState`] of `file` is.
///
/// # Safety
/// `file` was allocated by SQLite with our VFS's `szOsFile` (so the VFS is
/// registered and [`STATE_OFFSET`] set).
unsafe fn state_of(file: *mut ffi::sqlite3_file) -> *mut FileState {
    let offset = *STATE_OFFSET.get().expect("the VFS is registered");
    // SAFETY: `szOsFile` covers the offset and a `FileState` after it.
    unsafe { file.cast::<u8>().add(offset).cast() }
}

/// The descriptor the unix VFS opened `file` on, when it is the file at `path`:
/// `unixFile` starts with three pointers, then the descriptor. The device and
/// inode are compared with `path`'s, so a layout that differs is noticed (the
/// file is then left as the unix VFS made it).
///
/// # Safety
/// `file` was just opened by the unix VFS.
unsafe fn descriptor(file: *mut ffi::sqlite3_file, path: *const c_char) -> Option<c_int> {
    // SAFETY: the unix VFS's structure is larger than three pointers and an int.
    let fd = unsafe {
        file.cast::<u8>()
            .add(3 * size_of::<*const c_void>())
            .cast::<c_int>()
            .read()
    };
    // SAFETY: `stat` buffers are plain data; `path` is SQLite's NUL-terminated name.
    let (mut by_fd, mut by_path) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let same = unsafe {
        fd >= 0
            && libc::fstat(fd, &mut by_fd) == 0
            && libc::stat(path, &mut by_path) == 0
            && (by_fd.st_dev, by_fd.st_ino) == (by_path.st_dev, by_path.st_ino)
    };
    same.then_some(fd)
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite calls this with our VFS, whose `pAppData` is the unix VFS,
    // and a zeroed `file` of our `szOsFile`; the unix VFS fills its own part.
    unsafe {
        let real = (*vfs).pAppData.cast::<ffi::sqlite3_vfs>();
        let Some(real_open) = (*real).xOpen else {
            return ffi::SQLITE_CANTOPEN;
        };
        let code = real_open(real, name, file, flags, out_flags);
        if code != ffi::SQLITE_OK
            || flags & ffi::SQLITE_OPEN_MAIN_DB == 0
            || name.is_null()
            || (*file).pMethods.is_null()
        {
            return code;
        }
        let Some(fd) = descriptor(file, name) else {
            return code;
        };
        // The unix VFS's methods are static tables, valid for the process's life.
        let real_methods: &'static ffi::sqlite3_io_methods = &*(*file).pMethods;
        let (methods, copied) = METHODS.get_or_init(|| {
            let mut methods = *real_methods;
            methods.xWrite = Some(write);
            methods.xSync = Some(sync);
            methods.xClose = Some(close);
            (methods, real_methods)
        });
        if !std::ptr::eq(*copied, real_methods) {
            // Another kind of file methods than the first one seen: leave it.
            return code;
        }
        state_of(file).write(FileState {
            fd,
            start: 0,
            end: 0,
            pages: 0,
        });
        (*file).pMethods = methods;
        code
    }
}

/// The [`FileState`] of a file whose methods are ours.
///
/// # Safety
/// `file` was opened by [`open`], which wrote its `FileState`, and SQLite calls a
/// file's methods one at a time.
unsafe fn file_state<'a>(file: *mut ffi::sqlite3_file) -> &'a mut FileState {
    unsafe { &mut *state_of(file) }
}

/// Writes back the pending run and waits for it.
fn write_back(state: &mut FileState) {
    if state.pages == 0 {
        return;
    }
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a plain system call on a descriptor the unix VFS keeps open.
    // Its failure is advice not taken: the sync that follows reports errors.
    unsafe { libc::sync_file_range(state.fd, state.start, state.end - state.start, flags) };
    RUNS.with(|runs| runs.set(runs.get() + 1));
    state.pages = 0;
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: SQLite calls our methods only on files `open` set them on.
    let state = unsafe { file_state(file) };
    let Some(real_write) = real_methods().xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let code = unsafe { real_write(file, data, amount, offset) };
    if code == ffi::SQLITE_OK {
        let end = offset + i64::from(amount);
        if state.pages == 0 {
            (state.start, state.end) = (offset, end);
        } else {
            (state.start, state.end) = (state.start.min(offset), state.end.max(end));
        }
        state.pages += 1;
        if state.pages >= RUN_PAGES && !hurried() {
            write_back(state);
        }
    }
    code
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: as in `write`.
    let state = unsafe { file_state(file) };
    if hurried() {
        state.pages = 0;
    } else {
        write_back(state);
    }
    match real_methods().xSync {
        Some(real_sync) => unsafe { real_sync(file, flags) },
        None => ffi::SQLITE_IOERR_FSYNC,
    }
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls our methods only on files `open` set them on; the
    // `FileState` holds nothing to free.
    match real_methods().xClose {
        Some(real_close) => unsafe { real_close(file) },
        None => ffi::SQLITE_OK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::checkpoint;
    use rusqlite::Connection;

    /// Rows of about a page each, committed to the WAL of a new file in WAL mode
    /// with no automatic checkpoint.
    const ROWS: u32 = 400;

    fn file_with_a_full_wal() -> (tempfile::TempDir, std::path::PathBuf, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.sqlite3");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; \
                 CREATE TABLE pages (n INTEGER PRIMARY KEY, filler BLOB NOT NULL);",
            )
            .unwrap();
        writer
            .execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
                 INSERT INTO pages SELECT i, randomblob(3000) FROM n",
                [ROWS],
            )
            .unwrap();
        (dir, path, writer)
    }

    /// Copies the whole WAL into the file on the checkpointer's connection;
    /// returns the runs written back meanwhile.
    fn checkpoint_all(path: &std::path::Path) -> u64 {
        let conn = checkpoint::connect(path, "FULL").unwrap();
        let before = runs();
        let (frames, copied): (i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                Ok((row.get(1)?, row.get(2)?))
            })
            .unwrap();
        assert_eq!(frames, copied, "the checkpoint left frames");
        runs() - before
    }

    /// Every row is in the database file: read with the WAL emptied.
    fn assert_rows_in_file(path: &std::path::Path) {
        let wal = std::fs::metadata(path.with_extension("sqlite3-wal")).map_or(0, |m| m.len());
        assert_eq!(wal, 0, "the WAL was not emptied");
        let conn = Connection::open(path).unwrap();
        let (rows, bytes): (u32, i64) = conn
            .query_row(
                "SELECT count(*), sum(length(filler)) FROM pages",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        assert_eq!((rows, bytes), (ROWS, i64::from(ROWS) * 3000));
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    #[test]
    fn a_checkpoint_writes_its_pages_back_a_few_at_a_time() {
        let (_dir, path, writer) = file_with_a_full_wal();
        let runs = checkpoint_all(&path);
        // Each row fills most of a page: at least ROWS pages were copied.
        let least = u64::from(ROWS / RUN_PAGES);
        assert!(
            runs >= least,
            "{runs} runs written back, expected {least} or more"
        );
        drop(writer);
        assert_rows_in_file(&path);
    }

    #[test]
    fn a_checkpoint_the_writer_waits_for_flushes_at_once() {
        let (_dir, path, writer) = file_with_a_full_wal();
        hurry_with(Arc::new(AtomicBool::new(true)));
        let runs = checkpoint_all(&path);
        HURRY.with(|hurry| hurry.borrow_mut().take());
        assert_eq!(runs, 0, "a hurried checkpoint wrote back runs");
        drop(writer);
        assert_rows_in_file(&path);
    }
}
