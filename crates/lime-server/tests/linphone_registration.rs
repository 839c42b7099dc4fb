//! Linphone's own stack against our server, end to end: liblinphone devices
//! (tests/common/linphone.rs: the Linphone apps' library, its LIME engine and
//! belle-sip's HTTPS and digest client) register at a loopback SIP registrar and
//! create or update their LIME user on a `lime-server serve` process with digest
//! authentication on an account database and a certificate from a test CA the
//! devices trust.
//!
//! What belle-sip does that our own clients do not, and these stories therefore
//! go through on the real server: a fresh challenge for every request (it never
//! reuses a nonce), `algorithm="SHA-256"` quoted, the request path as the digest
//! `uri`, only a `From` header (no `X-Lime-user-identity`), and SHA-256 whenever
//! it holds a clear password.
//!
//! Each story runs its own server process, whose metrics count exactly what
//! the devices sent it.

mod common;

use common::accounts::{AccountsFixture, stored_secret};
use common::backend::Backend;
use common::linphone::{Account, Challenge, Device, Finished, Registrar, Secret};
use common::pki::TestPki;
use common::process::ServerProcess;
use common::random_hex;
use common::scrape::Scrape;
use common::store_probe::StoreProbe;
use lime_protocol::Curve;
use lime_server::config::Settings;
use serde_json::Value;
use std::net::SocketAddr;

/// liblinphone 5.1 makes its LIME users on Curve25519.
const CURVE: Curve = Curve::C25519;
const DOMAIN: &str = "example.org";
/// One-time pre-keys liblime uploads with a new user.
const FIRST_OPKS: u64 = 100;
/// Bounds a driver run that registers (a device needs about a second).
const RUN_SECS: u64 = 30;

/// A `lime-server serve` process for Linphone devices.
struct Server {
    process: ServerProcess,
    /// `https://127.0.0.1:PORT/`: the devices' `[lime] lime_server_url`.
    url: String,
    metrics: SocketAddr,
    accounts: AccountsFixture,
    /// The CA that signed the server's certificate: the devices' `root_ca`.
    pki: TestPki,
    probe: StoreProbe,
    _data_dir: tempfile::TempDir,
}

/// How the server authenticates the devices.
#[derive(Clone, Copy, PartialEq)]
enum Method {
    /// HTTP Digest on the account database, with these lines added to
    /// `[auth.digest]`.
    Digest(&'static str),
    /// Required client certificates from the test CA.
    Certificate,
}

/// Serves c25519 over HTTPS (a certificate for 127.0.0.1 from a test CA) with
/// digest authentication on an SQLite account database, metrics on; `tables`
/// (whole TOML tables) are added at the end.
async fn start_server(tables: &str) -> Server {
    start_server_authenticating(Method::Digest(""), tables).await
}

/// Like [`start_server`], authenticating with `method`.
async fn start_server_authenticating(method: Method, tables: &str) -> Server {
    let accounts = AccountsFixture::create(Backend::Sqlite).await;
    let pki = TestPki::new();
    // The address as a DNS name too: belle-sip checks the name through mbedTLS
    // 2.28 (Debian 12), which matches DNS names and the common name, never IP
    // address entries.
    let certificate = pki.issue_server(&["127.0.0.1".parse().unwrap()], &["127.0.0.1"]);
    let data_dir = tempfile::tempdir().unwrap();
    let dir = data_dir.path();
    let secret = dir.join("nonce-secret");
    std::fs::write(&secret, random_hex(32)).unwrap();
    let auth = match method {
        Method::Digest(keys) => format!(
            "[auth.digest]\naccounts_url = \"{}\"\nnonce_secret_file = \"{}\"\n{keys}\n",
            accounts.url,
            secret.display()
        ),
        Method::Certificate => format!(
            "[auth.client_certificates]\nca_file = \"{}\"\ncrl_files = [\"{}\"]\nrequired = true\n",
            pki.ca_file().display(),
            pki.crl_file().display()
        ),
    };
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\
         [tls]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n\
         [storage]\ndata_dir = \"{}\"\ncurves = [\"c25519\"]\n\
         {auth}\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         {tables}",
        certificate.certificate.display(),
        certificate.private_key.display(),
        dir.display(),
    );
    let file = dir.join("lime-server.toml");
    std::fs::write(&file, config).unwrap();
    let process = ServerProcess::start(&["--config", file.to_str().unwrap()]);
    let metrics = process.metrics_addr();
    let mut settings = Settings::default();
    settings.storage.data_dir = dir.to_owned();
    settings.storage.curves = vec!["c25519".to_owned()];
    Server {
        url: format!("https://{}/", process.addr),
        process,
        metrics,
        accounts,
        pki,
        probe: StoreProbe::new(&settings),
        _data_dir: data_dir,
    }
}

impl Server {
    /// A device of `username` registering at `registrar`, holding `secret`.
    fn device(&self, registrar: &Registrar, username: &str, secret: Secret) -> Device {
        let account = Account {
            username: username.to_owned(),
            domain: DOMAIN.to_owned(),
            secret,
            registrar_port: registrar.port,
        };
        Device::create(username, &account, &self.url, &self.pki.ca_file(), "")
    }

    /// The counter `name{labels}` now (0 before its first event).
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        Scrape::at(self.metrics).value(name, labels)
    }

    /// Requests refused by digest authentication for `reason`.
    fn auth_failures(&self, reason: &str) -> f64 {
        self.counter(
            "lime_auth_failures_total",
            &[("method", "digest"), ("reason", reason)],
        )
    }

    /// X3DH requests of `kind` answered ok.
    fn requests_ok(&self, kind: &str) -> f64 {
        self.counter(
            "lime_requests_total",
            &[("type", kind), ("curve", "c25519"), ("outcome", "ok")],
        )
    }
}

/// The GRUU the registrar gave `username`'s device: its LIME device id.
fn gruu_of(registrar: &Registrar, username: &str) -> String {
    registrar
        .registers(&format!("sip:{username}@{DOMAIN}"))
        .iter()
        .rev()
        .find_map(|event| event["gruu"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("{username} never registered: {:?}", registrar.events.all()))
}

/// The one "lime_user" event of a run, which must say the user was created.
fn created_user(run: &Finished) -> String {
    let users = run.lime_users();
    assert_eq!(users.len(), 1, "one LIME user creation: {}", run.describe());
    assert_eq!(users[0]["ok"], Value::Bool(true), "{}", run.describe());
    users[0]["user"].as_str().unwrap().to_owned()
}

/// What belle-sip sent the key server, from its log: each request first
/// without credentials (it keeps no nonce from one request to the next), then
/// answering the challenge with `algorithm` quoted and the request's path as
/// the digest `uri`; the device id in `From` and no `X-Lime-user-identity`.
fn assert_belle_sip_digest(run: &Finished, device_id: &str, algorithm: &str) {
    let requests = run.http_requests();
    assert!(
        !requests.is_empty(),
        "no HTTP request logged: {}",
        run.describe()
    );
    let mut unanswered = 0;
    for (index, head) in requests.iter().enumerate() {
        let header = |name: &str| {
            head.iter().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_owned())
            })
        };
        assert_eq!(head[0], "POST / HTTP/1.1");
        assert_eq!(header("From").as_deref(), Some(device_id), "{head:?}");
        assert_eq!(header("X-Lime-user-identity"), None, "{head:?}");
        match header("Authorization") {
            None => unanswered += 1,
            Some(authorization) => {
                // Requests may go out side by side (the keys update sends two
                // at once): each answer follows a request sent bare before it.
                assert!(
                    unanswered > 0,
                    "request {index} sent credentials first: {head:?}"
                );
                unanswered -= 1;
                assert!(authorization.starts_with("Digest "), "{authorization}");
                assert!(
                    authorization.contains(&format!("algorithm=\"{algorithm}\"")),
                    "{authorization}"
                );
                assert!(authorization.contains("uri=\"/\""), "{authorization}");
            }
        }
    }
    assert_eq!(unanswered, 0, "a challenge left unanswered: {requests:?}");
}

/// Story 1 for one kind of account row: alice's device registers (challenged
/// first by the registrar as `challenge` says), creates her LIME user on our
/// server over HTTPS with digest answered with `algorithm`, and the server
/// holds her device with its Ik, SPk and 100 OPks.
async fn alice_creates_her_lime_user(row: &str, challenge: Challenge, algorithm: &str) {
    let server = start_server("").await;
    server
        .accounts
        .add_account("alice", DOMAIN, "pw-alice", &[row])
        .await;
    let registrar = Registrar::start(DOMAIN, challenge, &[("alice", "pw-alice")], &[]);
    let mut alice = server.device(&registrar, "alice", Secret::Password("pw-alice".into()));

    let run = alice.run("register", RUN_SECS, &[]).await;

    let device_id = created_user(&run);
    assert_eq!(
        device_id,
        gruu_of(&registrar, "alice"),
        "the GRUU is the device id"
    );
    assert_belle_sip_digest(&run, &device_id, algorithm);
    let (ik, spk, spk_sig, spk_id) = server
        .probe
        .device_row(CURVE, &device_id)
        .await
        .unwrap_or_else(|| panic!("{device_id} is not stored"));
    assert_eq!(ik.len(), 32, "a Curve25519 identity key (Ed25519)");
    assert_eq!(spk.map(|k| k.len()), Some(32), "a signed pre-key");
    assert_eq!(spk_sig.map(|s| s.len()), Some(64), "its signature");
    assert!(spk_id.is_some());
    assert_eq!(
        server.probe.count_one_time_pre_keys(CURVE).await,
        FIRST_OPKS
    );
    // belle-sip's way: one unauthenticated request challenged, then the same
    // request authenticated, and nothing refused otherwise.
    assert_eq!(server.requests_ok("registerUser"), 1.0);
    assert_eq!(server.auth_failures("challenged"), 1.0);
    for reason in [
        "wrong_password",
        "wrong_uri",
        "algorithm_not_offered",
        "algorithm_not_stored",
        "bad_authorization",
    ] {
        assert_eq!(
            server.auth_failures(reason),
            0.0,
            "{reason}: {}",
            run.describe()
        );
    }
    let log = server.process.log_so_far();
    assert!(!log.contains("ERROR"), "the server logged an error:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_text_row_sha256_answer() {
    alice_creates_her_lime_user("CLRTXT", Challenge::None, "SHA-256").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha256_row_after_a_sha256_registrar_challenge() {
    alice_creates_her_lime_user("SHA-256", Challenge::Sha256, "SHA-256").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_row_after_an_md5_registrar_challenge() {
    alice_creates_her_lime_user("MD5", Challenge::Md5, "MD5").await;
}

/// Without the registrar's MD5 challenge the device holds only its clear
/// password, and belle-sip would answer SHA-256 if offered it: our server offers
/// an account only the algorithms its stored passwords verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_row_without_a_registrar_challenge() {
    alice_creates_her_lime_user("MD5", Challenge::None, "MD5").await;
}

/// Offered every algorithm (no look-up before challenging), a device holding its
/// clear password answers SHA-256, which an account with only an MD5 row cannot
/// check: that answer tests no password, so it is challenged again with MD5
/// only (`algorithm_not_stored`), never counted by the throttle, and belle-sip's
/// second try, with MD5, gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_row_is_challenged_again_when_every_algorithm_is_offered() {
    let server =
        start_server_authenticating(Method::Digest("challenge_lookups_per_sec = 0"), "").await;
    server
        .accounts
        .add_account("alice", DOMAIN, "pw-alice", &["MD5"])
        .await;
    let registrar = Registrar::start(DOMAIN, Challenge::None, &[], &[]);
    let mut alice = server.device(&registrar, "alice", Secret::Password("pw-alice".into()));

    let run = alice.run("register", RUN_SECS, &[]).await;

    created_user(&run);
    let answers: Vec<String> = run
        .http_requests()
        .iter()
        .filter_map(|head| {
            let authorization = head
                .iter()
                .find(|line| line.starts_with("Authorization:"))?;
            let algorithm = authorization
                .split("algorithm=\"")
                .nth(1)?
                .split('"')
                .next()?;
            Some(algorithm.to_owned())
        })
        .collect();
    assert_eq!(answers, ["SHA-256", "MD5"], "{}", run.describe());
    assert_eq!(server.auth_failures("challenged"), 1.0);
    assert_eq!(server.auth_failures("algorithm_not_stored"), 1.0);
    assert_eq!(server.auth_failures("wrong_password"), 0.0);
    let log = server.process.log_so_far();
    assert!(
        !log.contains("refused: authentication"),
        "a refusal logged as a warning:\n{log}"
    );
}

/// One-time pre-keys the server loses in story 2.
const LOST_OPKS: usize = 40;

/// Story 2: alice's app restarts holding only the HA1 it stored; liblinphone
/// loads her LIME user (no new one), and the keys update it runs on registering
/// once a day (forced here: its last update time moved back in its linphonerc,
/// her signed pre-key aged in her local LIME database) refills the one-time
/// pre-keys the server lost (40 new ones) and renews the signed pre-key, authenticated with
/// that HA1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_stored_ha1_refills_and_renews() {
    let server = start_server("").await;
    server
        .accounts
        .add_account("alice", DOMAIN, "pw-alice", &["SHA-256"])
        .await;
    let registrar = Registrar::start(DOMAIN, Challenge::Sha256, &[("alice", "pw-alice")], &[]);
    let mut alice = server.device(&registrar, "alice", Secret::Password("pw-alice".into()));
    let first = alice.run("register", RUN_SECS, &[]).await;
    let device_id = created_user(&first);

    // What the app kept when it stopped: the HA1 and its algorithm, no password.
    let ha1 = stored_secret("SHA-256", "alice", DOMAIN, "pw-alice");
    assert_eq!(
        alice.config("auth_info_0", "ha1"),
        Some(ha1),
        "{}",
        first.describe()
    );
    assert_eq!(
        alice.config("auth_info_0", "algorithm").as_deref(),
        Some("SHA-256")
    );
    assert_eq!(alice.config("auth_info_0", "passwd"), None);

    let (ik, _, _, spk_id) = server.probe.device_row(CURVE, &device_id).await.unwrap();
    let lost: Vec<u32> = server
        .probe
        .one_time_pre_keys(CURVE)
        .await
        .into_iter()
        .take(LOST_OPKS)
        .map(|(id, _)| id)
        .collect();
    for id in &lost {
        server.probe.delete_one_time_pre_key(CURVE, *id).await;
    }
    // Her signed pre-key two months old, and her last update long ago.
    let aged = rusqlite::Connection::open(alice.lime_database())
        .unwrap()
        .execute(
            "UPDATE X3DH_SPK SET timeStamp = datetime('now', '-60 days') WHERE Status = 1",
            [],
        )
        .unwrap();
    assert_eq!(
        aged, 1,
        "one active signed pre-key in the local LIME database"
    );
    alice.set_config("lime", "last_update_time", "0");
    let challenged = server.auth_failures("challenged");

    let second = alice.run("update", RUN_SECS, &[]).await;

    let updates = second.named("lime_operation");
    assert_eq!(updates.len(), 1, "{}", second.describe());
    assert_eq!(updates[0]["operation"], "Keys update");
    assert_eq!(updates[0]["ok"], Value::Bool(true), "{}", second.describe());
    assert!(
        second.lime_users().is_empty(),
        "her user is loaded, not made again"
    );
    assert_belle_sip_digest(&second, &device_id, "SHA-256");
    let (ik_now, _, _, spk_id_now) = server.probe.device_row(CURVE, &device_id).await.unwrap();
    assert_eq!(ik_now, ik, "the same device");
    assert_ne!(spk_id_now, spk_id, "a new signed pre-key");
    let stored: Vec<u32> = server
        .probe
        .one_time_pre_keys(CURVE)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // liblime tops the server's stock back up to its low limit, 100.
    assert_eq!(stored.len() as u64, FIRST_OPKS, "the lost keys replaced");
    assert!(
        lost.iter().all(|id| !stored.contains(id)),
        "lost keys stay lost"
    );
    // Three requests, each challenged once (a fresh nonce every time) and then
    // answered with the SHA-256 HA1.
    assert_eq!(server.requests_ok("getSelfOPks"), 1.0);
    assert_eq!(server.requests_ok("postSPk"), 1.0);
    assert_eq!(server.requests_ok("postOPks"), 1.0);
    assert_eq!(server.auth_failures("challenged") - challenged, 3.0);
    assert_eq!(server.auth_failures("wrong_password"), 0.0);
}

/// Story 4: alice's device holds a wrong password. belle-sip answers a
/// challenge twice with it, then gives up: her LIME user creation fails after
/// three requests, and the client does not try again by itself. As she restarts
/// the app, the failures reach the throttle's limit and alice is locked out from
/// her address, her right password included; bob, from the same address,
/// creates his LIME user meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_gives_up_and_is_throttled() {
    let server = start_server(
        "[auth.throttle]\nmax_failures_per_user = 3\nwindow_secs = 300\nlockout_secs = 300\n\
         delay_step_ms = 10\n",
    )
    .await;
    for user in ["alice", "bob"] {
        let password = format!("pw-{user}");
        server
            .accounts
            .add_account(user, DOMAIN, &password, &["SHA-256", "MD5"])
            .await;
    }
    // The registrar lets anyone in: only the key server checks passwords here.
    let registrar = Registrar::start(DOMAIN, Challenge::None, &[], &[]);
    let mut alice = server.device(&registrar, "alice", Secret::Password("wrong".into()));
    let refused = |server: &Server| {
        ["challenged", "wrong_password", "locked_out"]
            .map(|reason| server.auth_failures(reason))
            .iter()
            .sum::<f64>()
    };

    // Five seconds more after the failure: time for any retry to show.
    let first = alice.run("register", RUN_SECS, &["5"]).await;
    let users = first.lime_users();
    assert_eq!(users.len(), 1, "{}", first.describe());
    assert_eq!(users[0]["ok"], Value::Bool(false), "{}", first.describe());
    assert_eq!(
        server.auth_failures("challenged"),
        1.0,
        "{}",
        first.describe()
    );
    assert_eq!(
        server.auth_failures("wrong_password"),
        2.0,
        "{}",
        first.describe()
    );
    assert_eq!(server.auth_failures("locked_out"), 0.0);

    // The app restarted: the third failure locks her out, and the request
    // after it is refused untried.
    let second = alice.run("register", RUN_SECS, &["5"]).await;
    assert_eq!(
        second.lime_users()[0]["ok"],
        Value::Bool(false),
        "{}",
        second.describe()
    );
    assert_eq!(
        refused(&server),
        6.0,
        "three requests again: {}",
        second.describe()
    );
    assert_eq!(server.auth_failures("wrong_password"), 3.0);
    assert_eq!(server.auth_failures("locked_out"), 1.0);

    // Locked out, even with the right password.
    let mut alice_right = server.device(&registrar, "alice", Secret::Password("pw-alice".into()));
    let locked = alice_right.run("register", RUN_SECS, &[]).await;
    assert_eq!(
        locked.lime_users()[0]["ok"],
        Value::Bool(false),
        "{}",
        locked.describe()
    );
    assert!(server.auth_failures("locked_out") > 1.0);
    assert_eq!(server.requests_ok("registerUser"), 0.0);

    let mut bob = server.device(&registrar, "bob", Secret::Password("pw-bob".into()));
    let run = bob.run("register", RUN_SECS, &[]).await;
    let bob_id = created_user(&run);
    assert!(server.probe.device_row(CURVE, &bob_id).await.is_some());
    assert_eq!(server.requests_ok("registerUser"), 1.0);
}

/// Story 5: devices hold a client certificate from the CA our server requires,
/// instead of a password. liblinphone 5.1 presents it when the key server asks
/// for one (its LIME engine answers belle-sip's TLS authentication request):
/// from the account's auth info, else from the core's `[sip]` keys. A
/// certificate from another CA gets no user made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_instead_of_digest() {
    let server = start_server_authenticating(Method::Certificate, "").await;
    let registrar = Registrar::start(DOMAIN, Challenge::None, &[], &[]);
    let certificate = |user: &str| {
        let issued = server.pki.issue(
            &[&format!("sip:{user}@{DOMAIN}")],
            &[],
            &format!("{user} (lime test)"),
        );
        Secret::Certificate {
            chain: issued.certificate,
            key: issued.private_key,
        }
    };

    // alice: in her account's auth info.
    let mut alice = server.device(&registrar, "alice", certificate("alice"));
    let run = alice.run("register", RUN_SECS, &[]).await;
    let alice_id = created_user(&run);
    assert!(server.probe.device_row(CURVE, &alice_id).await.is_some());
    assert_eq!(
        server.probe.count_one_time_pre_keys(CURVE).await,
        FIRST_OPKS
    );

    // bob: the core's certificate, his auth info without one.
    let mut bob = server.device(&registrar, "bob", Secret::Password(String::new()));
    let Secret::Certificate { chain, key } = certificate("bob") else {
        unreachable!()
    };
    bob.set_config("sip", "client_cert_chain", &chain.display().to_string());
    bob.set_config("sip", "client_cert_key", &key.display().to_string());
    let run = bob.run("register", RUN_SECS, &[]).await;
    let bob_id = created_user(&run);
    assert!(server.probe.device_row(CURVE, &bob_id).await.is_some());

    // carol: a certificate the server does not trust.
    let issued = server
        .pki
        .issue_by_other_ca(&[&format!("sip:carol@{DOMAIN}")], "carol (other CA)");
    let secret = Secret::Certificate {
        chain: issued.certificate,
        key: issued.private_key,
    };
    let mut carol = server.device(&registrar, "carol", secret);
    let run = carol.run("register", RUN_SECS, &[]).await;
    let users = run.lime_users();
    assert_eq!(users.len(), 1, "{}", run.describe());
    assert_eq!(users[0]["ok"], Value::Bool(false), "{}", run.describe());
    assert_eq!(
        server.probe.device_ids(CURVE).await.len(),
        2,
        "alice and bob only"
    );
}
