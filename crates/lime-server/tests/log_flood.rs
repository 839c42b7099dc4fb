//! A flood of refused requests against a server process must not become a flood of
//! log bytes or of memory: each place in the code writes at most
//! `log.max_lines_per_second` lines a second (the rest summarised with a count),
//! client values are cut short, and a log reader that stops reading costs at most
//! `log.max_queued_bytes`.

mod common;

use common::process::{ServerProcess, memory_of, start_plain_with_config};
use lime_server::client::LimeClient;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A plain-HTTP server process with `config`, and its URL.
fn start(
    start_process: fn(&[&str]) -> ServerProcess,
    config: &str,
) -> (ServerProcess, String, TempDir) {
    let (server, data) = start_plain_with_config(start_process, config);
    let url = format!("http://{}/", server.addr);
    (server, url, data)
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
    let (server, url, _data) = start(ServerProcess::start, "[log]\nmax_lines_per_second = 5\n");
    let started = Instant::now();
    refused_requests(&url, 400, 4, 2_000).await;
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
        server.wait_for_log(
            "not every refusal written or counted",
            Duration::from_secs(20),
            |log| refusals(log) as u64 + left_out(log) >= 400,
        );
        server.stop()
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
    let (mut server, url, _data) = start(
        ServerProcess::start_with_log_unread,
        "[log]\nmax_lines_per_second = 0\nmax_queued_bytes = 65536\n",
    );
    let before = memory_of(server.pid()).rss_kb;
    refused_requests(&url, 3_000, 8, 7_000).await;
    let memory = memory_of(server.pid());
    let (after, peak) = (memory.rss_kb, memory.hwm_kb);
    eprintln!(
        "server RSS {before} KiB before, {after} KiB after 3,000 logged refusals (peak {peak} KiB)"
    );
    assert!(
        peak < before + 16 * 1024,
        "RSS grew from {before} KiB to a peak of {peak} KiB with a stalled log reader"
    );
    // Once the reader reads again, the drops are reported with their count.
    server.read_log_again();
    let log = tokio::task::block_in_place(|| {
        server.wait_for_log(
            "no line reports the dropped lines",
            Duration::from_secs(10),
            |log| log.contains("log lines dropped"),
        )
    });
    let report = log
        .lines()
        .find(|line| line.contains("log lines dropped"))
        .unwrap();
    assert!(report.contains("log.max_queued_bytes"), "{report}");
}
