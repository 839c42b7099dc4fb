//! Linphone's own stack in the tests: devices run by liblinphone (the library of
//! the Linphone apps: its LIME engine, belle-sip's HTTPS and digest client), a SIP
//! registrar on loopback for them to register with, and the linphonerc that ties a
//! device to both and to our server.
//!
//! - The driver (`tests/linphone/*.c`, interface in `driver.h`) is compiled on
//!   first use with the system's C compiler against liblinphone (Debian
//!   `liblinphone-dev`), once per set of sources, into `CARGO_TARGET_TMPDIR`. One
//!   process a device: liblinphone keeps process-wide state (its factory, its
//!   log), and a device a test restarts is a process started again on the same
//!   files, as an app restarts.
//! - The registrar (`tests/linphone/registrar.py`, on `sip.py`) is a Python
//!   process; it answers REGISTER with the `pub-gruu` that becomes the device's
//!   LIME device id, and challenges first when asked to.
//! - Both report what happened as JSON lines, gathered here as they come.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Where the driver's C sources and the SIP scripts are.
pub const SOURCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/linphone");

/// The driver binary, compiled from every `*.c` of [`SOURCES`] on first use (and
/// again whenever they change: the file name carries a hash of them).
pub fn driver_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let mut sources: Vec<PathBuf> = std::fs::read_dir(SOURCES)
            .expect("tests/linphone")
            .map(|entry| entry.expect("directory entry").path())
            .filter(|path| matches!(path.extension(), Some(ext) if ext == "c" || ext == "h"))
            .collect();
        sources.sort();
        let mut hash = Sha256::new();
        for source in &sources {
            hash.update(source.file_name().unwrap().as_encoded_bytes());
            hash.update(std::fs::read(source).expect("driver source"));
        }
        let binary = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "linphone-driver-{}",
            &hex::encode(hash.finalize())[..16]
        ));
        if binary.exists() {
            return binary;
        }
        let flags = Command::new("pkg-config")
            .args(["--cflags", "--libs", "linphone"])
            .output()
            .expect("pkg-config (Debian package pkg-config) runs");
        assert!(
            flags.status.success(),
            "pkg-config linphone: {} (is liblinphone-dev installed?)",
            String::from_utf8_lossy(&flags.stderr)
        );
        // Several test binaries may build at once: each into a file of its own,
        // renamed into place (the same content wins either way).
        let partial = binary.with_extension(format!("partial-{}", std::process::id()));
        let output = Command::new("cc")
            .args(["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&partial)
            .args(
                sources
                    .iter()
                    .filter(|path| path.extension().unwrap() == "c"),
            )
            .args(String::from_utf8_lossy(&flags.stdout).split_whitespace())
            // Debian's linphone.pc names its dependencies but not liblinphone.
            .arg("-llinphone")
            .output()
            .expect("cc runs");
        assert!(
            output.status.success(),
            "compiling the liblinphone driver failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::rename(&partial, &binary).expect("driver binary in place");
        binary
    })
}

/// JSON lines read from a child's stdout by a thread, as they come.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<Vec<Value>>>);

impl Events {
    /// Reads `stdout` line by line until it closes; a line that is not JSON is
    /// kept as `{"event":"unparsed","line":...}`.
    fn follow(&self, stdout: impl std::io::Read + Send + 'static) {
        let events = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({"event": "unparsed", "line": line}));
                events.lock().unwrap().push(event);
            }
        });
    }

    /// Everything so far.
    pub fn all(&self) -> Vec<Value> {
        self.0.lock().unwrap().clone()
    }

    /// Those named `name` so far.
    pub fn named(&self, name: &str) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|event| event["event"] == name)
            .collect()
    }

    /// Waits (at most `timeout`) for an event for which `matches` holds.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.all().into_iter().find(|event| matches(event)) {
                return Some(found);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The SIP registrar (`registrar.py`), stopped when dropped.
pub struct Registrar {
    child: Child,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// Its realm: the domain of the accounts.
    pub realm: String,
    /// What it reported: "listening", then a "register" line per REGISTER.
    pub events: Events,
}

/// How the registrar treats a REGISTER.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// 200 at once, no credentials asked.
    None,
    /// A 401 with `algorithm=MD5` first: the client then holds an MD5 HA1.
    Md5,
    /// A 401 with `algorithm=SHA-256` first.
    Sha256,
}

impl Registrar {
    /// Starts a registrar for `realm`; with a challenge, it checks the answers
    /// against `accounts` (user, password). `modules` (of `tests/linphone`) add
    /// their handlers to the same server (a conference focus).
    pub fn start(
        realm: &str,
        challenge: Challenge,
        accounts: &[(&str, &str)],
        modules: &[&str],
    ) -> Registrar {
        let mut command = Command::new("python3");
        // -B: no __pycache__ left in the source tree by the imported modules.
        command
            .args(["-u", "-B"])
            .arg(Path::new(SOURCES).join("registrar.py"))
            .args(["--realm", realm]);
        match challenge {
            Challenge::None => {}
            Challenge::Md5 => drop(command.args(["--challenge", "MD5"])),
            Challenge::Sha256 => drop(command.args(["--challenge", "SHA-256"])),
        }
        for (user, password) in accounts {
            command.arg("--account").arg(format!("{user}:{password}"));
        }
        for module in modules {
            command.args(["--module", module]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs (Debian package python3)");
        let events = Events::default();
        events.follow(child.stdout.take().expect("piped stdout"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Some(listening) = events.named("listening").first() {
                break listening["port"].as_u64().expect("a port") as u16;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the registrar exited ({status}) before listening");
            }
            assert!(
                Instant::now() < deadline,
                "the registrar did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Registrar {
            child,
            port,
            realm: realm.to_owned(),
            events,
        }
    }

    /// The answers it gave to REGISTERs of `aor` (`sip:user@realm`), in order:
    /// their "register" events.
    pub fn registers(&self, aor: &str) -> Vec<Value> {
        self.events
            .named("register")
            .into_iter()
            .filter(|event| event["aor"] == aor)
            .collect()
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a device holds to authenticate, as linphonerc's `[auth_info_0]` stores it.
#[derive(Debug, Clone)]
pub enum Secret {
    /// `passwd`: the clear password (liblinphone replaces it by `ha1` and
    /// `algorithm` once it answered a challenge).
    Password(String),
    /// `ha1` and `algorithm` ("MD5" or "SHA-256"), no password.
    Ha1 { ha1: String, algorithm: String },
    /// `client_cert_chain` and `client_cert_key`: PEM files of a TLS client
    /// certificate and its key, which liblinphone presents to a key server
    /// asking for one; no password.
    Certificate { chain: PathBuf, key: PathBuf },
}

/// A device's account: `sip:username@domain`, registering at `registrar_port`.
#[derive(Debug, Clone)]
pub struct Account {
    pub username: String,
    pub domain: String,
    pub secret: Secret,
    pub registrar_port: u16,
}

/// One Linphone device: its linphonerc, its databases (LIME's included) and its
/// driver's log, in a directory of its own that outlives its runs.
pub struct Device {
    /// A name for messages.
    pub name: String,
    /// Kept (not removed) when the test fails, for its logs.
    dir: Option<TempDir>,
    runs: usize,
}

impl Drop for Device {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("device {} kept in {}", self.name, dir.keep().display());
        }
    }
}

impl Device {
    /// A device for `account`, using the LIME server at `lime_server_url` and
    /// trusting the CA certificates of `root_ca` (PEM): writes its linphonerc.
    /// `extra` lines are added as they are (whole sections, for a test's own
    /// keys).
    pub fn create(
        name: &str,
        account: &Account,
        lime_server_url: &str,
        root_ca: &Path,
        extra: &str,
    ) -> Device {
        let dir = tempfile::Builder::new()
            .prefix(&format!("linphone-{name}-"))
            .tempdir()
            .expect("device directory");
        let device = Device {
            name: name.to_owned(),
            dir: Some(dir),
            runs: 0,
        };
        let secret = match &account.secret {
            Secret::Password(password) => format!("passwd={password}\n"),
            Secret::Ha1 { ha1, algorithm } => format!("ha1={ha1}\nalgorithm={algorithm}\n"),
            Secret::Certificate { chain, key } => format!(
                "client_cert_chain={}\nclient_cert_key={}\n",
                chain.display(),
                key.display()
            ),
        };
        let config = format!(
            "{}\n{extra}",
            linphonerc(
                account,
                &secret,
                lime_server_url,
                root_ca,
                &device.lime_database(),
                device.dir(),
            )
        );
        std::fs::write(device.config_path(), config).expect("write linphonerc");
        device
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("the device's directory").path()
    }

    /// Its linphonerc, which liblinphone also writes back (on stopping).
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("linphonerc")
    }

    /// Its local LIME database (`[lime] x3dh_db_path`, SQLite).
    pub fn lime_database(&self) -> PathBuf {
        self.dir().join("lime.sqlite3")
    }

    /// The value of `key` in `[section]` of its linphonerc.
    pub fn config(&self, section: &str, key: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.config_path()).expect("read linphonerc");
        let mut current = "";
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                current = name;
            } else if current == section {
                match line.split_once('=') {
                    Some((k, v)) if k.trim() == key => return Some(v.trim().to_owned()),
                    _ => {}
                }
            }
        }
        None
    }

    /// Sets `key` in `[section]` of its linphonerc (the section must exist).
    pub fn set_config(&self, section: &str, key: &str, value: &str) {
        let text = std::fs::read_to_string(self.config_path()).expect("read linphonerc");
        let mut out = Vec::new();
        let mut current = String::new();
        let mut done = false;
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                if current == section && !done {
                    out.push(format!("{key}={value}"));
                    done = true;
                }
                current = name.to_owned();
            } else if current == section
                && line.split_once('=').is_some_and(|(k, _)| k.trim() == key)
            {
                if !done {
                    out.push(format!("{key}={value}"));
                    done = true;
                }
                continue;
            }
            out.push(line.to_owned());
        }
        if current == section && !done {
            out.push(format!("{key}={value}"));
            done = true;
        }
        assert!(done, "linphonerc of {} has no [{section}]", self.name);
        std::fs::write(self.config_path(), out.join("\n") + "\n").expect("write linphonerc");
    }

    /// Starts the driver's `command` (with `args`) on this device for at most
    /// `seconds`; its events come in as they happen.
    pub fn spawn(&mut self, command: &str, seconds: u64, args: &[&str]) -> DriverRun {
        self.runs += 1;
        let log = self
            .dir()
            .join(format!("driver-{}-{command}.log", self.runs));
        let mut child = Command::new(driver_binary())
            .arg(command)
            .arg(self.config_path())
            .arg(seconds.to_string())
            .args(args)
            // liblinphone keeps its other databases under $HOME/.local/share.
            .env("HOME", self.dir())
            .env_remove("XDG_DATA_HOME")
            .env_remove("XDG_CONFIG_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("driver log file"))
            .spawn()
            .expect("the driver starts");
        let events = Events::default();
        events.follow(child.stdout.take().expect("piped stdout"));
        DriverRun {
            name: self.name.clone(),
            child,
            events,
            log,
            // The driver ends itself at `seconds`; stopping the core may take a
            // little more.
            deadline: Instant::now() + Duration::from_secs(seconds + 15),
        }
    }

    /// Runs `command` to its end (bounded by `seconds`, see [`Device::spawn`]).
    pub async fn run(&mut self, command: &str, seconds: u64, args: &[&str]) -> Finished {
        self.spawn(command, seconds, args).finish().await
    }
}

/// The linphonerc of a device: the keys a Linphone app with this account has
/// (README, "Pointing Linphone at it"), on loopback and without media.
fn linphonerc(
    account: &Account,
    secret: &str,
    lime_server_url: &str,
    root_ca: &Path,
    lime_database: &Path,
    dir: &Path,
) -> String {
    let Account {
        username,
        domain,
        registrar_port,
        ..
    } = account;
    format!(
        "[sip]\n\
         sip_port=0\n\
         sip_tcp_port=-1\n\
         sip_tls_port=0\n\
         default_proxy=0\n\
         register_only_when_network_is_up=0\n\
         root_ca={root_ca}\n\
         verify_server_certs=1\n\
         verify_server_cn=1\n\
         \n\
         [proxy_0]\n\
         reg_proxy=<sip:127.0.0.1:{registrar_port};transport=tcp>\n\
         reg_identity=sip:{username}@{domain}\n\
         reg_expires=3600\n\
         reg_sendregister=1\n\
         publish=0\n\
         \n\
         [auth_info_0]\n\
         username={username}\n\
         {secret}\
         realm={domain}\n\
         domain={domain}\n\
         \n\
         [lime]\n\
         lime_server_url={lime_server_url}\n\
         x3dh_db_path={lime_database}\n\
         \n\
         [storage]\n\
         uri={storage}\n",
        root_ca = root_ca.display(),
        lime_database = lime_database.display(),
        storage = dir.join("linphone.db").display(),
    )
}

/// A driver running.
pub struct DriverRun {
    name: String,
    child: Child,
    /// What it reported so far.
    pub events: Events,
    /// Its stderr: liblinphone's own log.
    pub log: PathBuf,
    deadline: Instant,
}

/// A driver that ended.
#[derive(Debug)]
pub struct Finished {
    /// Its events, in order.
    pub events: Vec<Value>,
    pub status: ExitStatus,
    /// liblinphone's own log.
    pub log: PathBuf,
}

impl DriverRun {
    /// Waits for the driver to end (it ends itself; killed past its deadline,
    /// which fails the test).
    pub async fn finish(mut self) -> Finished {
        loop {
            if let Some(status) = self.child.try_wait().expect("driver status") {
                // The reader thread may still hold the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Finished {
                    events: self.events.all(),
                    status,
                    log: self.log.clone(),
                };
            }
            if Instant::now() > self.deadline {
                let _ = self.child.kill();
                panic!(
                    "the driver of {} did not end in time; its log: {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for DriverRun {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Finished {
    /// The events named `name`.
    pub fn named(&self, name: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|event| event["event"] == name)
            .collect()
    }

    /// The LIME user registrations it reported ("lime_user" events).
    pub fn lime_users(&self) -> Vec<&Value> {
        self.named("lime_user")
    }

    /// The head (request line and headers) of each HTTP request belle-sip sent,
    /// in order, as its log shows them (`message sent to [TLS://...]`).
    pub fn http_requests(&self) -> Vec<Vec<String>> {
        let log = std::fs::read_to_string(&self.log).expect("read the driver's log");
        let mut requests = Vec::new();
        let mut lines = log.lines();
        while let Some(line) = lines.next() {
            if !line.contains("message sent to [TLS://")
                && !line.contains("message sent to [TCP://")
            {
                continue;
            }
            let head: Vec<String> = lines
                .by_ref()
                .take_while(|line| !line.is_empty())
                .map(str::to_owned)
                .collect();
            if head
                .first()
                .is_some_and(|first| first.ends_with(" HTTP/1.1"))
            {
                requests.push(head);
            }
        }
        requests
    }

    /// Everything, for assertion messages: events and the tail of the log.
    pub fn describe(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        format!(
            "status {}; events:\n{}\nlog ({}), last lines:\n{}",
            self.status,
            self.events
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
            self.log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}
