//! Idle HTTP/1.1 connections over TLS are parked: after 100 ms without a
//! request their HTTP state (hyper's buffers and dispatcher, about 25 KiB) is let
//! go, and taken again when the client sends. As a client sees it nothing
//! changes: the same connection serves its next request, and the idle limit and
//! the server's stop still close it. `lime_connections_parked` shows how many are.

mod common;

use common::process::ServerProcess;
use common::raw::{health_check_keeping_alive, read_until_closed, tls_connect};
use common::scrape::Scrape;
use std::net::SocketAddr;
use std::time::Duration;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

/// lime-server's `connection::PARK_AFTER`.
const PARK_AFTER: Duration = Duration::from_millis(100);

struct Server {
    process: ServerProcess,
    metrics: SocketAddr,
    data_dir: TempDir,
}

/// A server with one HTTPS listener (its self-signed certificate) and metrics.
fn start_server(idle_timeout: Duration) -> Server {
    let data_dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nidle_timeout_ms = {}\n\
         [storage]\ndata_dir = \"{}\"\ncurves = [\"c25519\"]\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
        idle_timeout.as_millis(),
        data_dir.path().display()
    );
    let file = data_dir.path().join("lime-server.toml");
    std::fs::write(&file, config).unwrap();
    let process = ServerProcess::start(&["--config", file.to_str().unwrap()]);
    let metrics = process.metrics_addr();
    Server {
        process,
        metrics,
        data_dir,
    }
}

impl Server {
    /// A TLS connection offering `alpn` (none when empty).
    async fn connect(&self, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let certificate = self.data_dir.path().join("tls/self-signed.crt");
        tls_connect(self.process.addr, &certificate, alpn).await
    }

    fn gauge(&self, name: &str) -> f64 {
        Scrape::at(self.metrics).value(name, &[])
    }

    /// Waits (bounded) until `lime_connections_parked` is `expected`.
    fn wait_parked(&self, expected: f64) {
        Scrape::wait_for(self.metrics, "lime_connections_parked", &[], expected);
    }
}

#[tokio::test]
async fn idle_connections_are_parked_and_serve_their_next_request_on_the_same_connection() {
    let server = start_server(Duration::from_secs(60));
    let mut connections = Vec::new();
    // Taken before each request is sent, so before the server's answer: the last
    // connection cannot be parked sooner than PARK_AFTER after it.
    let mut asked = Instant::now();
    for alpn in [&[][..], &[&b"http/1.1"[..]][..]].iter().cycle().take(10) {
        let mut connection = server.connect(alpn).await;
        asked = Instant::now();
        health_check_keeping_alive(&mut connection).await;
        connections.push(connection);
    }
    server.wait_parked(10.0);
    assert!(asked.elapsed() >= PARK_AFTER - Duration::from_millis(50));
    assert_eq!(server.gauge("lime_connections_open"), 10.0);

    // Each parked connection serves a request again, twice in a row (the
    // second on the HTTP state the first one brought back).
    for connection in &mut connections {
        health_check_keeping_alive(connection).await;
        health_check_keeping_alive(connection).await;
    }
    // Taken out of the park, a connection is parked again PARK_AFTER after its
    // last request: the gauge shows it out only if read within that. Read later
    // (a loaded machine), it is read again after another request.
    for attempt in 1..=20 {
        let connection = connections.last_mut().unwrap();
        let asked = Instant::now();
        health_check_keeping_alive(connection).await;
        let parked = server.gauge("lime_connections_parked");
        if parked < 10.0 {
            break;
        }
        assert!(
            asked.elapsed() >= PARK_AFTER && attempt < 20,
            "{parked} connections parked {:?} after a request on one of them",
            asked.elapsed()
        );
    }
    server.wait_parked(10.0);
    for connection in &mut connections {
        health_check_keeping_alive(connection).await;
    }
}

#[tokio::test]
async fn a_parked_connection_is_closed_at_the_idle_limit() {
    let limit = Duration::from_millis(2500);
    let server = start_server(limit);
    let mut connection = server.connect(&[]).await;
    // Before the request: the idle time is counted from after it.
    let asked = Instant::now();
    health_check_keeping_alive(&mut connection).await;
    server.wait_parked(1.0);
    let received = read_until_closed(&mut connection, limit * 3 + Duration::from_secs(1))
        .await
        .expect("the parked connection is closed at the idle limit");
    assert!(received.is_empty(), "{received:?}");
    assert!(asked.elapsed() >= limit - Duration::from_millis(50));
    server.wait_parked(0.0);
    let scrape = Scrape::at(server.metrics);
    assert_eq!(
        scrape.value(
            "lime_connections_closed_by_time_limit_total",
            &[("kind", "idle")]
        ),
        1.0,
        "{}",
        scrape.text
    );
}

#[tokio::test]
async fn a_stop_closes_parked_connections_at_once() {
    let server = start_server(Duration::from_secs(60));
    let mut connection = server.connect(&[]).await;
    health_check_keeping_alive(&mut connection).await;
    server.wait_parked(1.0);
    let stopping = Instant::now();
    server.process.terminate();
    read_until_closed(&mut connection, Duration::from_secs(5))
        .await
        .expect("the parked connection is closed when the server stops");
    assert!(stopping.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn http2_connections_are_not_parked() {
    let server = start_server(Duration::from_secs(60));
    let stream = server.connect(&[b"h2"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, connection) = h2::client::handshake(stream).await.expect("HTTP/2");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::get("https://localhost/health")
        .body(())
        .unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    tokio::time::sleep(PARK_AFTER * 2).await;
    assert_eq!(server.gauge("lime_connections_parked"), 0.0);
    assert_eq!(server.gauge("lime_connections_open"), 1.0);
}
