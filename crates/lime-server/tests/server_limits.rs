//! The limits that protect the server itself, as clients meet them: slow or silent
//! clients are cut off after the time limits of `[server]`, connections over
//! `server.max_connections` are refused at once, and a normal client is served
//! meanwhile.
//!
//! Most stories run on a plain-HTTP listener, so that a raw TCP client can be as
//! slow as it likes. Bounds on "within" are generous (limit × 3 + 1 s) for a loaded
//! machine; the only tight one is the issue's own: a normal round trip within a
//! second while 200 clients trickle their headers.

mod common;

use bytes::Bytes;
use common::raw::{health_check_keeping_alive, read_until_closed};
use common::{TestApp, device_id, registration, spawn_app_with};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lime_protocol::{Curve, Request, Response};
use lime_server::config::Settings;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// How many clients trickle their headers in the slowloris stories.
const TRICKLING_CLIENTS: usize = 200;

/// What a trickling client sends, one byte a second: more bytes than any story
/// lasts seconds.
const TRICKLED_HEADERS: &[u8] = b"POST / HTTP/1.1\r\nHost: lime.example.org\r\n\
    Content-Type: x3dh/octet-stream\r\nContent-Length: 3\r\n\r\n";

/// A server with a plain-HTTP listener only, settings changed by `configure`.
async fn spawn_plain_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with(|settings| {
        settings.server.plain_http_listen = vec!["127.0.0.1:0".parse().unwrap()];
        settings.server.listen = vec![];
        configure(settings);
    })
    .await
}

/// The generous bound on "cut off after `limit`" for a loaded machine.
fn within(limit: Duration) -> Duration {
    limit * 3 + Duration::from_secs(1)
}

/// A client that sends a request's headers one byte a second until the server
/// closes the connection. Tells `trickling` once its first byte is sent; returns
/// how long after connecting the server cut it off (closed or answered).
async fn trickle_headers(addr: SocketAddr, trickling: mpsc::Sender<()>) -> Duration {
    // Before connecting: the server's clock starts once it accepted, after this.
    let connected = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("the server accepts");
    let mut buffer = [0; 256];
    for (sent, byte) in TRICKLED_HEADERS.iter().enumerate() {
        if stream.write_all(&[*byte]).await.is_err() {
            return connected.elapsed();
        }
        if sent == 0 {
            let _ = trickling.send(()).await;
        }
        if timeout(Duration::from_secs(1), stream.read(&mut buffer))
            .await
            .is_ok()
        {
            return connected.elapsed();
        }
    }
    let _ = stream.read(&mut buffer).await;
    connected.elapsed()
}

/// Starts the trickling clients and waits until each has sent its first byte.
async fn start_trickling(addr: SocketAddr) -> Vec<tokio::task::JoinHandle<Duration>> {
    let (trickling, mut started) = mpsc::channel(TRICKLING_CLIENTS);
    let clients = (0..TRICKLING_CLIENTS)
        .map(|_| tokio::spawn(trickle_headers(addr, trickling.clone())))
        .collect();
    for _ in 0..TRICKLING_CLIENTS {
        timeout(Duration::from_secs(30), started.recv())
            .await
            .expect("every trickling client connects")
            .expect("the clients are running");
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_client_is_served_within_a_second_while_200_clients_trickle_their_headers() {
    // The default header time-out (10 s): the trickling clients hold their
    // connections for the whole story.
    let app = spawn_plain_app_with(|_| {}).await;
    let trickling = start_trickling(app.addr).await;

    let device = device_id("bystander");
    let started = Instant::now();
    let registered = app
        .ask(
            &device,
            Curve::C25519,
            Request::RegisterUser(registration(Curve::C25519, 5, 1)),
        )
        .await;
    let listed = app
        .ask(&device, Curve::C25519, Request::GetSelfOneTimePreKeys)
        .await;
    let round_trip = started.elapsed();

    assert!(
        matches!(registered.response, Response::Done(_)),
        "{registered:?}"
    );
    match listed.response {
        Response::SelfOneTimePreKeys(mut ids) => {
            ids.sort_unstable();
            assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        }
        other => panic!("expected selfOPks, got {other:?}"),
    }
    assert!(
        round_trip < Duration::from_secs(1),
        "registerUser + getSelfOPks took {round_trip:?} while {TRICKLING_CLIENTS} clients trickled"
    );
    let cut_off = trickling
        .iter()
        .filter(|client| client.is_finished())
        .count();
    assert_eq!(
        cut_off, 0,
        "the trickling clients must still hold their connections"
    );
    for client in trickling {
        client.abort();
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_trickling_their_headers_are_cut_off_after_server_header_read_timeout_ms() {
    let limit = Duration::from_millis(1500);
    let app = spawn_plain_app_with(|settings| {
        settings.server.header_read_timeout_ms = limit.as_millis() as u64;
    })
    .await;
    let trickling = start_trickling(app.addr).await;
    for client in trickling {
        let held = timeout(within(limit) + Duration::from_secs(1), client)
            .await
            .expect("the server cuts the trickling client off")
            .unwrap();
        assert!(
            held >= limit - Duration::from_millis(50) && held <= within(limit),
            "cut off after {held:?}, the limit is {limit:?}"
        );
    }
    // And the server still serves.
    let answer = app
        .client
        .request("GET", &format!("{}health", app.base_url), &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    app.stop().await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_server_header_read_timeout_ms() {
    let limit = Duration::from_millis(1000);
    let app = spawn_plain_app_with(|settings| {
        settings.server.header_read_timeout_ms = limit.as_millis() as u64;
    })
    .await;
    let connected = Instant::now();
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    let received = read_until_closed(&mut silent, within(limit))
        .await
        .expect("the silent connection is closed");
    assert!(received.is_empty(), "{received:?}");
    assert!(connected.elapsed() >= limit - Duration::from_millis(50));
    app.stop().await;
}

#[tokio::test]
async fn a_tls_handshake_not_finished_is_closed_after_server_tls_handshake_timeout_ms() {
    let limit = Duration::from_millis(1000);
    let app = spawn_app_with(|settings| {
        settings.server.tls_handshake_timeout_ms = limit.as_millis() as u64;
        settings.server.header_read_timeout_ms = 60_000;
    })
    .await;
    let connected = Instant::now();
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    read_until_closed(&mut silent, within(limit))
        .await
        .expect("the handshake is cut off");
    assert!(connected.elapsed() >= limit - Duration::from_millis(50));
    app.stop().await;
}

#[tokio::test]
async fn a_body_that_stops_halfway_is_answered_408_after_server_body_read_timeout_ms() {
    let limit = Duration::from_millis(1000);
    let app = spawn_plain_app_with(|settings| {
        settings.server.body_read_timeout_ms = limit.as_millis() as u64;
    })
    .await;
    let mut stalled = TcpStream::connect(app.addr).await.unwrap();
    // Before the request is sent: the server's clock starts after this.
    let sent = Instant::now();
    // A request that is let in (authentication off, a sender named): its body is
    // read, and stops halfway.
    stalled
        .write_all(
            b"POST / HTTP/1.1\r\nHost: lime.example.org\r\n\
              Content-Type: x3dh/octet-stream\r\n\
              X-Lime-user-identity: sip:stalled@example.org;gr=urn:uuid:stalled\r\n\
              Content-Length: 1000\r\n\r\n",
        )
        .await
        .unwrap();
    stalled.write_all(&[0; 500]).await.unwrap();

    // Meanwhile others are served.
    let answer = app
        .client
        .request("GET", &format!("{}health", app.base_url), &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(answer.status, 200);

    let received = read_until_closed(&mut stalled, within(limit))
        .await
        .expect("the stalled request is answered and its connection closed");
    assert!(sent.elapsed() >= limit - Duration::from_millis(50));
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    app.stop().await;
}

#[tokio::test]
async fn a_keep_alive_connection_is_closed_after_server_idle_timeout_ms_without_a_request() {
    // A header time-out shorter than the idle one: the idle connection must outlive it.
    let header_limit = Duration::from_millis(500);
    let limit = Duration::from_millis(2000);
    let app = spawn_plain_app_with(|settings| {
        settings.server.header_read_timeout_ms = header_limit.as_millis() as u64;
        settings.server.idle_timeout_ms = limit.as_millis() as u64;
    })
    .await;
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    // Before the request: the server counts the idle time from its answer.
    let asked = Instant::now();
    health_check_keeping_alive(&mut idle).await;

    // Still open 1 s after the request, past the header limit. (A loaded machine
    // may leave less of that second to watch; a close before the idle limit
    // still fails the check on the time of the close below.)
    let watch = (asked + Duration::from_millis(1000)).saturating_duration_since(Instant::now());
    if !watch.is_zero() {
        assert!(
            read_until_closed(&mut idle, watch).await.is_none(),
            "closed before server.idle_timeout_ms"
        );
    }
    let received = read_until_closed(&mut idle, within(limit))
        .await
        .expect("the idle connection is closed");
    assert!(received.is_empty(), "{received:?}");
    assert!(asked.elapsed() >= limit - Duration::from_millis(50));
    app.stop().await;
}

#[tokio::test]
async fn an_http2_connection_is_closed_after_server_idle_timeout_ms_without_a_request() {
    let limit = Duration::from_millis(1500);
    let app = spawn_plain_app_with(|settings| {
        settings.server.idle_timeout_ms = limit.as_millis() as u64;
    })
    .await;
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let mut connection = tokio::spawn(connection);
    let request = http::Request::get(format!("{}health", app.base_url))
        .body(Empty::<Bytes>::new())
        .unwrap();
    // Before the request: the server counts the idle time from after it.
    let asked = Instant::now();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    drop(response);

    timeout(within(limit), &mut connection)
        .await
        .expect("the idle HTTP/2 connection is closed")
        .unwrap()
        .ok();
    assert!(asked.elapsed() >= limit - Duration::from_millis(50));
    drop(sender);
    app.stop().await;
}

#[tokio::test]
async fn connections_over_server_max_connections_get_a_503_at_once_until_one_closes() {
    let app = spawn_plain_app_with(|settings| settings.server.max_connections = 5).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut connection = TcpStream::connect(app.addr).await.unwrap();
        health_check_keeping_alive(&mut connection).await;
        held.push(connection);
    }

    let mut sixth = TcpStream::connect(app.addr).await.unwrap();
    let received = read_until_closed(&mut sixth, Duration::from_secs(5))
        .await
        .expect("the sixth connection is closed at once, not left waiting");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
    assert!(text.contains("Connection: close"), "{text}");

    drop(held.pop());
    served_again(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn tls_connections_over_server_max_connections_are_closed_at_once() {
    let app = spawn_app_with(|settings| {
        settings.server.max_connections = 2;
        settings.server.tls_handshake_timeout_ms = 60_000;
    })
    .await;
    // Two clients in the middle of their handshake hold both places.
    let mut held = vec![
        TcpStream::connect(app.addr).await.unwrap(),
        TcpStream::connect(app.addr).await.unwrap(),
    ];
    let mut third = TcpStream::connect(app.addr).await.unwrap();
    let received = read_until_closed(&mut third, Duration::from_secs(5))
        .await
        .expect("the third connection is closed at once, not left waiting");
    assert!(received.is_empty(), "{received:?}");

    drop(held.pop());
    served_again(&app).await;
    drop(held);
    app.stop().await;
}

#[tokio::test]
async fn a_stop_closes_idle_connections_at_once_and_lets_a_request_in_flight_finish() {
    let app = spawn_plain_app_with(|_| {}).await;
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    health_check_keeping_alive(&mut idle).await;
    let mut in_flight = TcpStream::connect(app.addr).await.unwrap();
    in_flight
        .write_all(
            b"POST / HTTP/1.1\r\nHost: lime.example.org\r\n\
              Content-Type: x3dh/octet-stream\r\nContent-Length: 1000\r\n\r\n",
        )
        .await
        .unwrap();
    in_flight.write_all(&[0; 500]).await.unwrap();
    // Let the server start reading the body before it is told to stop: wait
    // (bounded) until it has read all that was sent.
    let client = in_flight.local_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let unread = unread_by_server(app.addr, client);
        if unread == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server left {unread:?} bytes of the request unread"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let stopping = Instant::now();
    let stopped = tokio::spawn(app.stop());
    let received = read_until_closed(&mut idle, Duration::from_secs(2))
        .await
        .expect("the idle connection is closed at once");
    assert!(received.is_empty(), "{received:?}");

    in_flight.write_all(&[0; 500]).await.unwrap();
    let received = read_until_closed(&mut in_flight, Duration::from_secs(5))
        .await
        .expect("the request in flight is answered, then its connection closed");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.contains("x3dh/octet-stream"), "{text}");
    stopped.await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "the stop waited {:?}",
        stopping.elapsed()
    );
}

/// The bytes `client` sent on loopback that the server at `server` has not read
/// yet: the receive queue of the server's end, from `/proc/net/tcp` (IPv4).
fn unread_by_server(server: SocketAddr, client: SocketAddr) -> Option<u64> {
    let field = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => panic!("{addr}: IPv4 only"),
    };
    let (local, remote) = (field(server), field(client));
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.len() > 4 && fields[1] == local && fields[2] == remote)
        .and_then(|fields| {
            let (_, unread) = fields[4].split_once(':')?;
            u64::from_str_radix(unread, 16).ok()
        })
}

/// Waits (bounded) until the server notices a closed connection and serves a new
/// client again.
async fn served_again(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = app
            .client
            .request("GET", &format!("{}health", app.base_url), &[], Vec::new())
            .await;
        match answer {
            Ok(answer) if answer.status == 200 => return,
            other => assert!(
                Instant::now() < deadline,
                "not served again once a place was free: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
