//! `lime-server serve` as a separate process, the way operators run it: for tests
//! of the binary and of several servers sharing one database.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_lime-server");

/// A running `lime-server serve`, killed when dropped.
pub struct ServerProcess {
    child: Child,
    /// The address of its first listener.
    pub addr: SocketAddr,
    /// What it logged up to its "listening" line.
    pub log: String,
}

impl ServerProcess {
    /// Runs `lime-server serve ARGS...` and waits (30 s at most) for its
    /// "listening" log line.
    pub fn start(args: &[&str]) -> ServerProcess {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start lime-server serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut server = ServerProcess {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            log: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        for line in BufReader::new(stderr).lines() {
            let line = line.expect("read the server's log");
            server.log.push_str(&line);
            server.log.push('\n');
            if line.contains("listening") {
                server.addr = line
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("addr="))
                    .and_then(|addr| addr.parse().ok())
                    .unwrap_or_else(|| panic!("no addr= in {line:?}"));
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "no 'listening' line:\n{}",
                server.log
            );
        }
        panic!("serve exited before listening:\n{}", server.log);
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
