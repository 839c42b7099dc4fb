//! `lime-server serve` as a separate process, the way operators run it: for tests
//! of the binary and of several servers sharing one database.

use std::io::{BufRead, BufReader, Lines};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
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
    /// Its stderr after "listening", while no thread reads it.
    unread: Option<Lines<BufReader<ChildStderr>>>,
    /// The thread that reads its stderr into `all_log`.
    reader: Option<JoinHandle<()>>,
}

/// A plain-HTTP server on a loopback port, started by `start` (e.g.
/// [`ServerProcess::start`]) with `config` (TOML) in a data directory of its
/// own, kept while the returned `TempDir` lives.
pub fn start_plain_with_config(
    start: fn(&[&str]) -> ServerProcess,
    config: &str,
) -> (ServerProcess, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let config_file = data.path().join("lime-server.toml");
    std::fs::write(&config_file, config).unwrap();
    let server = start(&[
        "--config",
        config_file.to_str().unwrap(),
        "--plain-http",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    (server, data)
}

impl ServerProcess {
    /// Runs `lime-server serve ARGS...` and waits (30 s at most) for its
    /// "listening" log line.
    pub fn start(args: &[&str]) -> ServerProcess {
        let mut server = ServerProcess::start_with_log_unread(args);
        server.read_log_again();
        server
    }

    /// Like [`ServerProcess::start`], but nothing reads its log after the
    /// "listening" line (the pipe fills, as with a stalled log reader) until
    /// [`ServerProcess::read_log_again`].
    pub fn start_with_log_unread(args: &[&str]) -> ServerProcess {
        let mut child = spawn_serve(args);
        let stderr = child.stderr.take().expect("piped stderr");
        let mut server = ServerProcess {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            log: String::new(),
            all_log: Arc::default(),
            unread: None,
            reader: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut lines = BufReader::new(stderr).lines();
        while let Some(line) = lines.next() {
            let line = line.expect("read the server's log");
            server.log.push_str(&line);
            server.log.push('\n');
            if line.contains("listening") {
                server.addr = listening_addr(&line);
                server.all_log.lock().unwrap().push_str(&server.log);
                server.unread = Some(lines);
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

    /// Reads its log on, from a thread, into [`ServerProcess::log_so_far`]
    /// (what the pipe held first); nothing to do if that thread runs already.
    pub fn read_log_again(&mut self) {
        let Some(lines) = self.unread.take() else {
            return;
        };
        let all_log = self.all_log.clone();
        self.reader = Some(std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut log = all_log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        }));
    }

    /// Kills it (SIGKILL: it logs nothing more) and returns everything it
    /// logged, to the end of its stderr.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.read_log_again();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log_so_far()
    }
}

impl ServerProcess {
    /// Runs `lime-server serve ARGS...` whose config logs to `log_file`
    /// (`log.file`), and waits (30 s at most) for the "listening" line there.
    /// [`ServerProcess::log`] holds the file up to that line; stderr is not read
    /// (it is shown if the server stops before listening).
    pub fn start_logging_to(args: &[&str], log_file: &std::path::Path) -> ServerProcess {
        let mut child = spawn_serve(args);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let written = std::fs::read_to_string(log_file).unwrap_or_default();
            if let Some(line) = written.lines().find(|line| line.contains("listening")) {
                let addr = listening_addr(line);
                return ServerProcess {
                    child,
                    addr,
                    log: written,
                    all_log: Arc::default(),
                    unread: None,
                    reader: None,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                let _ = std::io::Read::read_to_string(
                    &mut child.stderr.take().expect("piped stderr"),
                    &mut stderr,
                );
                panic!("serve exited ({status}) before listening:\n{stderr}\n{written}");
            }
            assert!(
                Instant::now() < deadline,
                "no 'listening' line in {}:\n{written}",
                log_file.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends it SIGHUP (`kill -HUP`), as `systemctl reload` does.
    pub fn hang_up(&self) {
        self.signal("-HUP");
    }

    /// Sends it SIGTERM (`kill -TERM`), as `systemctl stop` does: a graceful stop.
    #[allow(dead_code)] // not every test binary stops its server
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// True while it runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The address of its metrics listener, as its start-up log names it
    /// (`metrics_addr=`): the server must run with `metrics.listen` set.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.log
            .lines()
            .find_map(|line| {
                line.split_whitespace()
                    .find_map(|field| field.strip_prefix("metrics_addr="))
                    .and_then(|addr| addr.parse().ok())
            })
            .unwrap_or_else(|| panic!("no metrics_addr= logged before listening:\n{}", self.log))
    }

    /// Its process id (for /proc/PID/status).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it has logged so far.
    pub fn log_so_far(&self) -> String {
        self.all_log.lock().unwrap().clone()
    }

    /// Its log once `done` holds for it (lines reach us through the server's log
    /// thread and a pipe, a little after the event); panics with `what` and the
    /// log after `timeout`. Blocks the calling thread: from async tests, lines
    /// keep arriving through the reader thread meanwhile.
    pub fn wait_for_log(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log_so_far();
            if done(&log) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "{what} after {timeout:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts one `lime-server serve` per store URL in `stores` (plain HTTP on a
/// loopback port), sharing the data directory `dir` and a config file holding
/// `config`: several instances behind a load balancer.
pub fn start_plain_servers(dir: &Path, config: &str, stores: &[&str]) -> Vec<ServerProcess> {
    let config_file = dir.join("lime-server.toml");
    std::fs::write(&config_file, config).unwrap();
    let (config_file, dir) = (config_file.to_str().unwrap(), dir.to_str().unwrap());
    stores
        .iter()
        .map(|store| {
            ServerProcess::start(&[
                "--config",
                config_file,
                "--plain-http",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                dir,
                "--store",
                store,
            ])
        })
        .collect()
}

/// The URL each server answers X3DH requests on.
pub fn plain_urls(servers: &[ServerProcess]) -> Vec<String> {
    servers
        .iter()
        .map(|server| format!("http://{}/", server.addr))
        .collect()
}

/// `lime-server serve ARGS...` at info level, stderr piped, stdout thrown away.
fn spawn_serve(args: &[&str]) -> Child {
    Command::new(BIN)
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start lime-server serve")
}

/// The address of a "listening" log line (`addr=...`).
fn listening_addr(line: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no addr= in {line:?}"))
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's memory, from `/proc/PID/status`, in kB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Resident now (`VmRSS`).
    pub rss_kb: u64,
    /// Its peak (`VmHWM`).
    pub hwm_kb: u64,
}

/// The memory of process `pid`.
pub fn memory_of(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    Memory {
        rss_kb: field("VmRSS:"),
        hwm_kb: field("VmHWM:"),
    }
}
