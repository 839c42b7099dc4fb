//! Prometheus metrics, scraped from a server process (the recorder is one per
//! process, so each test runs its own) with digest authentication on an SQLite
//! account database: a known sequence of requests moves each counter by exactly
//! what was done; the stock gauges follow the stores; the scrape passes
//! `promtool check metrics` (Debian package `prometheus`); the X3DH listener does
//! not serve the metrics.

mod common;

use common::accounts::AccountsFixture;
use common::backend::Backend;
use common::immutable::{Immutable, sqlite_files};
use common::process::ServerProcess;
use common::scrape::{Scrape, get};
use common::{random_hex, registration};
use lime_protocol::{
    Curve, DeviceId, Request, RequestMessage, Response, ResponseMessage, SignedPreKey,
};
use lime_server::client::LimeClient;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

const CURVE: Curve = Curve::C25519;
const DOMAIN: &str = "example.org";

/// A server process with metrics on, its accounts, and where it listens.
struct Server {
    process: ServerProcess,
    /// The X3DH listener (plain HTTP).
    x3dh: SocketAddr,
    /// `metrics.listen`.
    metrics: SocketAddr,
    accounts: AccountsFixture,
    data_dir: tempfile::TempDir,
}

/// Serves c25519 with digest, a bundle request limit of one bundle per target
/// and source, a 4 KiB body cap and the stock counted every second.
async fn start_server() -> Server {
    start_server_with("", "").await
}

/// Like [`start_server`], with `server_keys` added to `[server]` and `tables`
/// (whole TOML tables) at the end.
async fn start_server_with(server_keys: &str, tables: &str) -> Server {
    let accounts = AccountsFixture::create(Backend::Sqlite).await;
    let data_dir = tempfile::tempdir().unwrap();
    let dir = data_dir.path();
    let secret = dir.join("nonce-secret");
    std::fs::write(&secret, random_hex(32)).unwrap();
    let config = format!(
        "[server]\nlisten = []\nplain_http_listen = [\"127.0.0.1:0\"]\nmax_body_bytes = 4096\n\
         {server_keys}\n\
         [storage]\ndata_dir = \"{}\"\ncurves = [\"c25519\"]\n\
         [limits]\nmax_bundle_requests = 1\n\
         [auth.digest]\naccounts_url = \"{}\"\nnonce_secret_file = \"{}\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\nstock_refresh_secs = 1\nlow_stock_threshold = 10\n\
         {tables}",
        dir.display(),
        accounts.url,
        secret.display()
    );
    let file = dir.join("lime-server.toml");
    std::fs::write(&file, config).unwrap();
    let process = ServerProcess::start(&["--config", file.to_str().unwrap()]);
    let metrics = process.metrics_addr();
    Server {
        x3dh: process.addr,
        process,
        metrics,
        accounts,
        data_dir,
    }
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}/", self.x3dh)
    }

    /// A device of a new account `name`, and a client that logs in as it.
    async fn user(&self, name: &str) -> (String, LimeClient) {
        let user = format!("{name}-{}", random_hex(4));
        let password = format!("pw-{user}");
        self.accounts
            .add_account(&user, DOMAIN, &password, &["MD5", "SHA-256"])
            .await;
        let device = format!("sip:{user}@{DOMAIN};gr=urn:uuid:{}", random_hex(8));
        let client = LimeClient::plain()
            .unwrap()
            .with_digest(&user, &password, None);
        (device, client)
    }

    async fn ask(
        &self,
        client: &LimeClient,
        device: &str,
        curve: Curve,
        request: Request,
    ) -> ResponseMessage {
        client
            .send(&self.url(), device, &RequestMessage { curve, request })
            .await
            .unwrap_or_else(|error| panic!("{device}: {error:#}"))
    }
}

/// A series (name, labels) and how much it must move.
type Delta<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Checks that each `(name, labels, delta)` moved by exactly `delta` from
/// `before` to `after`.
fn assert_deltas(before: &Scrape, after: &Scrape, expected: &[Delta<'_>]) {
    let mut wrong = Vec::new();
    for (name, labels, delta) in expected {
        let moved = after.value(name, labels) - before.value(name, labels);
        if moved != *delta {
            wrong.push(format!(
                "{name}{labels:?}: moved by {moved}, expected {delta}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{}\n\nscrape after:\n{}",
        wrong.join("\n"),
        after.text
    );
}

fn requests<'a>(kind: &'a str, curve: &'a str, outcome: &'a str) -> [(&'a str, &'a str); 3] {
    [("type", kind), ("curve", curve), ("outcome", outcome)]
}

fn is_error(answer: &ResponseMessage) -> bool {
    matches!(answer.response, Response::Error(_))
}

/// A raw POST on the X3DH path, answered whatever its status.
async fn post_raw(server: &Server, headers: &[(&str, &str)], body: Vec<u8>) -> u16 {
    LimeClient::plain()
        .unwrap()
        .post(&server.url(), headers, body)
        .await
        .expect("the server answers")
        .status
}

#[tokio::test]
async fn a_known_sequence_of_requests_moves_each_counter_by_exactly_what_was_done() {
    let server = start_server().await;
    let before = Scrape::at(server.metrics);
    let (alice, alice_client) = server.user("alice").await;
    let (bob, bob_client) = server.user("bob").await;
    let (carol, carol_client) = server.user("carol").await;
    let id = |device: &str| DeviceId::new(device).unwrap();

    // Each client's first request is challenged (401), then sent again with
    // credentials; later ones reuse the nonce.
    let answer = server
        .ask(
            &alice_client,
            &alice,
            CURVE,
            Request::RegisterUser(registration(CURVE, 3, 1)),
        )
        .await;
    assert!(!is_error(&answer), "{answer:?}");
    let keys = (4..=5)
        .map(|key| common::one_time_pre_key(CURVE, key))
        .collect();
    let answer = server
        .ask(
            &alice_client,
            &alice,
            CURVE,
            Request::PostOneTimePreKeys(keys),
        )
        .await;
    assert!(!is_error(&answer), "{answer:?}");
    let answer = server
        .ask(
            &bob_client,
            &bob,
            CURVE,
            Request::RegisterUser(registration(CURVE, 0, 1)),
        )
        .await;
    assert!(!is_error(&answer), "{answer:?}");

    // Bob gets Alice's bundle with a key, then, past the limit of one, without.
    let flags = |answer: &ResponseMessage| match &answer.response {
        Response::PeerBundles(bundles) => bundles.iter().map(|b| b.flag()).collect::<Vec<_>>(),
        other => panic!("not a peerBundle: {other:?}"),
    };
    for expected in [1, 0] {
        let answer = server
            .ask(
                &bob_client,
                &bob,
                CURVE,
                Request::GetPeerBundle(vec![id(&alice)]),
            )
            .await;
        assert_eq!(flags(&answer), [expected]);
    }
    // Alice gets Bob's (no key left) and an unknown device's (none).
    let unknown = format!("sip:nobody@{DOMAIN};gr=urn:uuid:0");
    let answer = server
        .ask(
            &alice_client,
            &alice,
            CURVE,
            Request::GetPeerBundle(vec![id(&bob), id(&unknown)]),
        )
        .await;
    assert_eq!(flags(&answer), [0, 2]);

    // X3DH errors: an unregistered device, and a curve not served.
    let answer = server
        .ask(&carol_client, &carol, CURVE, Request::GetSelfOneTimePreKeys)
        .await;
    assert!(is_error(&answer), "{answer:?}");
    let spk = SignedPreKey::new(Curve::C448, vec![1; 56], vec![2; 114], 1);
    let answer = server
        .ask(
            &carol_client,
            &carol,
            Curve::C448,
            Request::PostSignedPreKey(spk.unwrap()),
        )
        .await;
    assert!(is_error(&answer), "{answer:?}");

    // HTTP refusals: a forged digest nonce (401), Alice acting for Bob (403), a
    // body over server.max_body_bytes (413).
    let body = RequestMessage {
        curve: CURVE,
        request: Request::GetSelfOneTimePreKeys,
    }
    .encode()
    .unwrap();
    let forged = format!(
        "Digest username=\"x\", realm=\"{DOMAIN}\", nonce=\"forged\", uri=\"/\", \
         response=\"{}\", algorithm=MD5, qop=auth, nc=00000001, cnonce=\"c\"",
        "0".repeat(32)
    );
    let x3dh = ("content-type", "x3dh/octet-stream");
    let status = post_raw(
        &server,
        &[
            x3dh,
            ("x-lime-user-identity", &alice),
            ("authorization", &forged),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(status, 401);
    let answer = alice_client
        .post(&server.url(), &[x3dh, ("x-lime-user-identity", &bob)], body)
        .await
        .unwrap();
    assert_eq!(answer.status, 403);
    let status = post_raw(
        &server,
        &[x3dh, ("x-lime-user-identity", &alice)],
        vec![0; 5000],
    )
    .await;
    assert_eq!(status, 413);

    let after = Scrape::at(server.metrics);
    assert_deltas(
        &before,
        &after,
        &[
            (
                "lime_requests_total",
                &requests("registerUser", "c25519", "ok"),
                2.0,
            ),
            (
                "lime_requests_total",
                &requests("postOPks", "c25519", "ok"),
                1.0,
            ),
            (
                "lime_requests_total",
                &requests("getPeerBundle", "c25519", "ok"),
                3.0,
            ),
            (
                "lime_requests_total",
                &requests("getSelfOPks", "c25519", "user_not_found"),
                1.0,
            ),
            (
                "lime_requests_total",
                &requests("postSPk", "c448", "bad_curve"),
                1.0,
            ),
            (
                "lime_request_duration_seconds_count",
                &[("type", "registerUser")],
                2.0,
            ),
            (
                "lime_request_duration_seconds_bucket",
                &[("type", "getPeerBundle"), ("le", "+Inf")],
                3.0,
            ),
            (
                "lime_bundles_total",
                &[("curve", "c25519"), ("kind", "with_one_time_pre_key")],
                1.0,
            ),
            (
                "lime_bundles_total",
                &[("curve", "c25519"), ("kind", "without_one_time_pre_key")],
                2.0,
            ),
            (
                "lime_bundles_total",
                &[("curve", "c25519"), ("kind", "none")],
                1.0,
            ),
            (
                "lime_bundles_over_limit_total",
                &[
                    ("limit", "per_device"),
                    ("over_limit", "without_one_time_pre_key"),
                ],
                1.0,
            ),
            // Three first requests challenged, the forged nonce refused.
            ("lime_http_refusals_total", &[("status", "401")], 4.0),
            ("lime_http_refusals_total", &[("status", "403")], 1.0),
            ("lime_http_refusals_total", &[("status", "413")], 1.0),
            ("lime_http_refusals_total", &[("status", "429")], 0.0),
            (
                "lime_auth_failures_total",
                &[("method", "digest"), ("reason", "challenged")],
                3.0,
            ),
            (
                "lime_auth_failures_total",
                &[("method", "digest"), ("reason", "forged_nonce")],
                1.0,
            ),
            (
                "lime_auth_failures_total",
                &[("method", "digest"), ("reason", "not_owner")],
                1.0,
            ),
            (
                "lime_store_errors_total",
                &[
                    ("backend", "sqlite"),
                    ("curve", "c25519"),
                    ("kind", "error"),
                ],
                0.0,
            ),
        ],
    );
    assert_eq!(after.value("lime_connections_refused_total", &[]), 0.0);
}

/// Waits (10 s at most) for the stock gauges to count `devices` devices.
fn scrape_once_devices_are(server: &Server, devices: f64) -> Scrape {
    Scrape::wait_for(
        server.metrics,
        "lime_devices",
        &[("curve", "c25519")],
        devices,
    )
}

#[tokio::test]
async fn stock_gauges_follow_the_store() {
    let server = start_server().await;
    let empty = scrape_once_devices_are(&server, 0.0);
    assert_eq!(
        empty.value("lime_one_time_pre_keys", &[("curve", "c25519")]),
        0.0
    );

    let (alice, alice_client) = server.user("alice").await;
    let (bob, bob_client) = server.user("bob").await;
    server
        .ask(
            &alice_client,
            &alice,
            CURVE,
            Request::RegisterUser(registration(CURVE, 12, 1)),
        )
        .await;
    server
        .ask(
            &bob_client,
            &bob,
            CURVE,
            Request::RegisterUser(registration(CURVE, 0, 1)),
        )
        .await;

    let scrape = scrape_once_devices_are(&server, 2.0);
    let curve = ("curve", "c25519");
    assert_eq!(scrape.value("lime_one_time_pre_keys", &[curve]), 12.0);
    for (stock, devices) in [("0", 1.0), ("1-9", 0.0), ("10-99", 1.0), ("100+", 0.0)] {
        assert_eq!(
            scrape.value(
                "lime_devices_by_one_time_pre_key_stock",
                &[curve, ("stock", stock)]
            ),
            devices,
            "{stock}"
        );
    }
    assert_eq!(
        scrape.value("lime_devices_low_one_time_pre_key_stock", &[curve]),
        1.0,
        "Bob's empty stock is under the threshold of 10, Alice's 12 is not"
    );
}

#[tokio::test]
async fn the_scrape_passes_promtool_and_is_not_served_on_the_x3dh_listener() {
    let server = start_server().await;
    let (alice, alice_client) = server.user("alice").await;
    server
        .ask(
            &alice_client,
            &alice,
            CURVE,
            Request::RegisterUser(registration(CURVE, 2, 1)),
        )
        .await;
    server
        .ask(
            &alice_client,
            &alice,
            CURVE,
            Request::GetPeerBundle(vec![DeviceId::new(alice.as_str()).unwrap()]),
        )
        .await;
    let scrape = scrape_once_devices_are(&server, 1.0);
    for kind in ["counter", "gauge", "histogram"] {
        assert!(
            scrape.text.contains(&format!(" {kind}\n")),
            "no {kind} in the scrape:\n{}",
            scrape.text
        );
    }

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package prometheus; scripts/test.sh installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics:\n{}{}\n\nscrape:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        scrape.text
    );

    let (status, _) = get(server.x3dh, "/metrics");
    assert_eq!(status, 404, "the X3DH listener does not serve the metrics");
    let (status, _) = get(server.metrics, "/");
    assert_eq!(status, 404);
    assert!(server.process.log.contains("no authentication"));
}

#[tokio::test]
async fn failed_passwords_count_by_reason_and_the_lockout_they_start() {
    let server = start_server_with(
        "",
        "[auth.throttle]\nmax_failures_per_user = 2\ndelay_step_ms = 1\n",
    )
    .await;
    let (alice, _) = server.user("alice").await;
    let user = alice
        .strip_prefix("sip:")
        .and_then(|rest| rest.split('@').next())
        .unwrap();
    let guesser = LimeClient::plain()
        .unwrap()
        .with_digest(user, "not-the-password", None);
    let body = RequestMessage {
        curve: CURVE,
        request: Request::GetSelfOneTimePreKeys,
    }
    .encode()
    .unwrap();
    let headers = [
        ("content-type", "x3dh/octet-stream"),
        ("x-lime-user-identity", alice.as_str()),
    ];
    let before = Scrape::at(server.metrics);
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let answer = guesser
            .post(&server.url(), &headers, body.clone())
            .await
            .unwrap();
        statuses.push(answer.status);
    }
    // The client's first call is challenged, then refused (first failure); its
    // second, sent with the nonce, is the second failure, which locks the user
    // out from this address (401), and the client's retry is refused untried.
    assert_eq!(statuses, [401, 429]);
    let after = Scrape::at(server.metrics);
    assert_deltas(
        &before,
        &after,
        &[
            (
                "lime_auth_failures_total",
                &[("method", "digest"), ("reason", "challenged")],
                1.0,
            ),
            (
                "lime_auth_failures_total",
                &[("method", "digest"), ("reason", "wrong_password")],
                2.0,
            ),
            (
                "lime_auth_failures_total",
                &[("method", "digest"), ("reason", "locked_out")],
                1.0,
            ),
            (
                "lime_auth_lockouts_total",
                &[("kind", "user_at_address")],
                1.0,
            ),
            ("lime_auth_lockouts_total", &[("kind", "address")], 0.0),
            ("lime_http_refusals_total", &[("status", "401")], 3.0),
            ("lime_http_refusals_total", &[("status", "429")], 1.0),
        ],
    );
}

#[tokio::test]
async fn connections_open_refused_and_cut_off_by_a_time_limit_are_counted() {
    let server =
        start_server_with("max_connections = 1\nheader_read_timeout_ms = 2000\n", "").await;
    let before = Scrape::at(server.metrics);
    // Holds the only place, sending nothing: the header time limit closes it.
    let mut silent = TcpStream::connect(server.x3dh).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Counted once the server has accepted it (a moment, on a loaded machine).
    Scrape::wait_for(server.metrics, "lime_connections_open", &[], 1.0);
    let mut refused = TcpStream::connect(server.x3dh).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    refused
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = refused.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    // The silent connection is closed by the server: read gives end of file.
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest);
    let after = Scrape::at(server.metrics);
    assert_deltas(
        &before,
        &after,
        &[
            ("lime_connections_refused_total", &[], 1.0),
            (
                "lime_connections_closed_by_time_limit_total",
                &[("kind", "header_read")],
                1.0,
            ),
            (
                "lime_connections_closed_by_time_limit_total",
                &[("kind", "idle")],
                0.0,
            ),
        ],
    );
    // The connection's task counts it out just after closing it.
    Scrape::wait_for(server.metrics, "lime_connections_open", &[], 0.0);
}

#[tokio::test]
async fn a_database_that_refuses_writes_counts_store_errors_by_backend() {
    let server = start_server().await;
    let (alice, alice_client) = server.user("alice").await;
    // Authenticated once while the database is writable: the next request goes
    // straight to the store.
    server
        .ask(
            &alice_client,
            &alice,
            CURVE,
            Request::RegisterUser(registration(CURVE, 1, 1)),
        )
        .await;
    let before = Scrape::at(server.metrics);
    let database = server.data_dir.path().join("lime-c25519.sqlite3");
    let immutable = Immutable::make(sqlite_files(&database));
    let keys = vec![common::one_time_pre_key(CURVE, 2)];
    let answer = server
        .ask(
            &alice_client,
            &alice,
            CURVE,
            Request::PostOneTimePreKeys(keys),
        )
        .await;
    drop(immutable);
    assert!(is_error(&answer), "{answer:?}");
    let after = Scrape::at(server.metrics);
    assert_deltas(
        &before,
        &after,
        &[
            (
                "lime_store_errors_total",
                &[
                    ("backend", "sqlite"),
                    ("curve", "c25519"),
                    ("kind", "error"),
                ],
                1.0,
            ),
            (
                "lime_requests_total",
                &requests("postOPks", "c25519", "db_error"),
                1.0,
            ),
        ],
    );
}
