//! A flood of refused requests against a server process must not become a flood of
//! log bytes or of memory: each place in the code writes at most
//! `log.max_lines_per_second` lines a second (the rest summarised with a count),
//! client values are cut short, and a log reader that stops reading costs at most
//! `log.max_queued_bytes`.

mod common;

use common::process::BIN;
use lime_server::client::LimeClient;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process whose log the test reads only when it chooses to.
struct Server {
    child: Child,
    url: String,
    log: BufReader<ChildStderr>,
    _data: tempfile::TempDir,
}

impl Server {
    fn start(config: &str) -> Server {
        let data = tempfile::tempdir().unwrap();
        let config_file = data.path().join("lime-server.toml");
        std::fs::write(&config_file, config).unwrap();
        let mut child = Command::new(BIN)
            .args(["--config", config_file.to_str().unwrap(), "serve"])
            .args(["--plain-http", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start lime-server serve");
        let log = BufReader::new(child.stderr.take().unwrap());
        // Owned at once, so that a failed start still kills and waits for it.
        let mut server = Server {
            child,
            url: String::new(),
            log,
            _data: data,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut line = String::new();
        loop {
            line.clear();
            assert!(server.log.read_line(&mut line).unwrap() > 0, "serve exited");
            if let Some(addr) = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("addr="))
                .filter(|_| line.contains("listening"))
            {
                server.url = format!("http://{addr}/");
                return server;
            }
            assert!(Instant::now() < deadline, "no listening line");
        }
    }

    /// Resident memory now, and its peak, in KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse().ok())
                .unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Reads the log again, from a thread, until a line contains `text` (10 s at
    /// most); the server keeps running.
    fn read_log_until(&mut self, text: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut line = String::new();
        while Instant::now() < deadline {
            line.clear();
            if self.log.read_line(&mut line).unwrap_or(0) == 0 {
                return None;
            }
            if line.contains(text) {
                return Some(line);
            }
        }
        None
    }

    /// Everything logged from now until the server stops, stopping it once what
    /// was logged satisfies `enough` (or `within` has passed).
    fn stop_once_logged(mut self, enough: impl Fn(&str) -> bool, within: Duration) -> String {
        let text = std::sync::Mutex::new(String::new());
        let Server { child, log, .. } = &mut self;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut line = String::new();
                loop {
                    line.clear();
                    match log.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => text.lock().unwrap().push_str(&line),
                    }
                }
            });
            let deadline = Instant::now() + within;
            while Instant::now() < deadline && !enough(&text.lock().unwrap()) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
        });
        let _ = child.wait();
        let _ = log.read_to_string(&mut text.lock().unwrap());
        text.into_inner().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `count` requests with a Content-Type of `content_type_bytes` bytes, each
/// refused with an X3DH error and a log line, over `connections` connections.
async fn refused_requests(url: &str, count: usize, connections: usize, content_type_bytes: usize) {
    let content_type = "x".repeat(content_type_bytes);
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (url, content_type) = (url.to_owned(), content_type.clone());
            tokio::spawn(async move {
                let client = LimeClient::plain().unwrap();
                for n in 0..count / connections {
                    let sender = format!("sip:flood@example.org;gr={n}");
                    let answer = client
                        .post(
                            &url,
                            &[("content-type", &content_type), ("from", &sender)],
                            vec![1, 9, 1],
                        )
                        .await
                        .expect("the server answers");
                    assert_eq!(answer.status, 200);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_lines_are_rate_limited_and_summarised_with_a_count() {
    let server = Server::start("[log]\nmax_lines_per_second = 5\n");
    let started = Instant::now();
    refused_requests(&server.url, 400, 4, 2_000).await;
    let elapsed = started.elapsed();
    let refusals = |log: &str| {
        log.lines()
            .filter(|l| l.contains("request refused"))
            .count()
    };
    let left_out = |log: &str| -> u64 {
        log.lines()
            .filter(|l| l.contains("log lines left out") && l.contains("service"))
            .map(|l| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix("count="))
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap()
            })
            .sum()
    };
    // The summary thread writes the count a second or so later (more on a loaded
    // machine): the server is stopped once every refusal is written or counted.
    let log = tokio::task::block_in_place(|| {
        server.stop_once_logged(
            |log| refusals(log) as u64 + left_out(log) >= 400,
            Duration::from_secs(20),
        )
    });
    let (refusals, left_out) = (refusals(&log), left_out(&log));
    let allowed = 5 * (elapsed.as_secs() as usize + 2);
    assert!(
        refusals <= allowed,
        "{refusals} refusal lines for 400 requests in {elapsed:?}, at most {allowed} expected"
    );
    assert_eq!(
        refusals as u64 + left_out,
        400,
        "every refusal is written or counted:\n{log}"
    );
    // The 2,000-byte Content-Type is cut short in the lines that were written.
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1_000, "a log line of {longest} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stops_reading_costs_at_most_the_queue() {
    // The reader stops after the listening line: the pipe fills, then the queue.
    let mut server = Server::start("[log]\nmax_lines_per_second = 0\nmax_queued_bytes = 65536\n");
    let (before, _) = server.memory_kib();
    refused_requests(&server.url, 3_000, 8, 7_000).await;
    let (after, peak) = server.memory_kib();
    eprintln!(
        "server RSS {before} KiB before, {after} KiB after 3,000 logged refusals (peak {peak} KiB)"
    );
    assert!(
        peak < before + 16 * 1024,
        "RSS grew from {before} KiB to a peak of {peak} KiB with a stalled log reader"
    );
    // Once the reader reads again, the drops are reported with their count.
    let report = tokio::task::block_in_place(|| server.read_log_until("log lines dropped"));
    let report = report.expect("a line reports the dropped lines");
    assert!(report.contains("log.max_queued_bytes"), "{report}");
}
