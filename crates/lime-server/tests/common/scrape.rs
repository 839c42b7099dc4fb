//! A Prometheus scrape of a server process's metrics listener (`metrics.listen`),
//! parsed into series: what tests read counters and gauges from.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `GET path` on `addr` over HTTP/1.1: the status code and the body.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

/// One scrape: each series (name and sorted labels) with its value.
pub struct Scrape {
    /// The scrape as it came.
    pub text: String,
    /// Each series (name, sorted labels) with its value.
    pub series: BTreeMap<(String, Vec<(String, String)>), f64>,
}

impl Scrape {
    /// Scrapes `GET /metrics` of the metrics listener at `addr`.
    pub fn at(addr: SocketAddr) -> Scrape {
        let (status, text) = get(addr, "/metrics");
        assert_eq!(status, 200, "{text}");
        let mut series = BTreeMap::new();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (name, labels) = match key.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (key, ""),
            };
            let mut labels: Vec<(String, String)> = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').expect("label=value");
                    (key.to_owned(), value.trim_matches('"').to_owned())
                })
                .collect();
            labels.sort();
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("value of {line:?}"));
            series.insert((name.to_owned(), labels), value);
        }
        Scrape { text, series }
    }

    /// The value of the series `name{labels}` (exactly these labels); 0 when
    /// absent (a series appears at its first event).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        labels.sort();
        self.series
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// Scrapes `addr` until the series `name{labels}` is `expected` (10 s at
    /// most, then panics with the last scrape): a gauge that follows an event
    /// on the server a moment later.
    pub fn wait_for(
        addr: SocketAddr,
        name: &str,
        labels: &[(&str, &str)],
        expected: f64,
    ) -> Scrape {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let scrape = Scrape::at(addr);
            let value = scrape.value(name, labels);
            if value == expected {
                return scrape;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}{labels:?} is {value}, expected {expected}:\n{}",
                scrape.text
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
