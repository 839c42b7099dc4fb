//! `lime-server serve` as a separate process, the way operators run it: for tests
//! of the binary and of several servers sharing one database.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
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
    /// Everything it logged, still growing: read on by a thread after "listening".
    all_log: Arc<Mutex<String>>,
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
            all_log: Arc::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut lines = BufReader::new(stderr).lines();
        while let Some(line) = lines.next() {
            let line = line.expect("read the server's log");
            server.log.push_str(&line);
            server.log.push('\n');
            if line.contains("listening") {
                server.addr = line
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("addr="))
                    .and_then(|addr| addr.parse().ok())
                    .unwrap_or_else(|| panic!("no addr= in {line:?}"));
                server.all_log.lock().unwrap().push_str(&server.log);
                let all_log = server.all_log.clone();
                std::thread::spawn(move || {
                    for line in lines.map_while(Result::ok) {
                        let mut log = all_log.lock().unwrap();
                        log.push_str(&line);
                        log.push('\n');
                    }
                });
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

impl ServerProcess {
    /// Its process id (for /proc/PID/status).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it has logged so far.
    pub fn log_so_far(&self) -> String {
        self.all_log.lock().unwrap().clone()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
