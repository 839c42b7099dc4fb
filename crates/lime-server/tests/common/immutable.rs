//! SQLite files made immutable with `chattr +i` (which stops root too, even
//! through an open file): a database that refuses writes for real, not through a
//! flag the server sets. Needs root and a file system with immutable files (ext4,
//! xfs, btrfs; not tmpfs).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Files made immutable with `chattr +i`, made mutable again when dropped.
pub struct Immutable(Vec<PathBuf>);

impl Immutable {
    /// Makes `paths` immutable; panics (the test fails) when it cannot.
    pub fn make(paths: Vec<PathBuf>) -> Immutable {
        for path in &paths {
            let status = Command::new("chattr")
                .arg("+i")
                .arg(path)
                .status()
                .expect("chattr runs (apt-get install e2fsprogs)");
            assert!(
                status.success(),
                "chattr +i {} failed: this story needs root and a file system with \
                 immutable files (ext4, xfs, btrfs; not tmpfs): set TMPDIR to one",
                path.display()
            );
        }
        Immutable(paths)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(path).status();
        }
    }
}

/// The SQLite files of one curve's store that hold its data: the database and its
/// WAL. (Not the `-shm` index: SQLite writes it through a memory map, and a
/// memory-mapped write to an immutable file is a SIGBUS, not an error.)
pub fn sqlite_files(database: &Path) -> Vec<PathBuf> {
    ["", "-wal"]
        .into_iter()
        .map(|suffix| PathBuf::from(format!("{}{suffix}", database.display())))
        .filter(|path| path.exists())
        .collect()
}
