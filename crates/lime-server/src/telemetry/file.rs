//! The log file (`log.file`): opened for appending at start, opened again by path
//! when the writer thread is told to (SIGHUP), so that logrotate can rename it and
//! the server goes on in a new file of the same name.

use super::queue::Sink;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// An append-mode log file that can be reopened by its path.
pub struct LogFile {
    /// `log.file`.
    path: PathBuf,
    /// The file open now (after a rename, the renamed one until the reopen).
    file: File,
}

impl LogFile {
    /// Opens (creating it, mode 0640 on Unix) `path` for appending.
    pub fn open(path: &Path) -> io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_owned(),
            file: open_append(path)?,
        })
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
    options.open(path)
}

impl Sink for LogFile {
    /// Opens the path again; when that fails the file open now stays.
    fn reopen(&mut self) -> io::Result<()> {
        self.file = open_append(&self.path)?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_rename_a_reopen_writes_to_a_new_file_of_the_same_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lime-server.log");
        let rotated = dir.path().join("lime-server.log.1");
        let mut log = LogFile::open(&path).unwrap();
        log.write_all(b"one\n").unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        log.write_all(b"two\n").unwrap();
        log.reopen().unwrap();
        log.write_all(b"three\n").unwrap();
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "one\ntwo\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
    }

    #[test]
    fn a_reopen_that_fails_keeps_the_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("logs");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("lime-server.log");
        let mut log = LogFile::open(&path).unwrap();
        let moved = dir.path().join("moved");
        std::fs::rename(&sub, &moved).unwrap();
        assert!(log.reopen().is_err());
        log.write_all(b"kept\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(moved.join("lime-server.log")).unwrap(),
            "kept\n"
        );
    }
}
