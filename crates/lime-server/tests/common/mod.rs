//! Test harness: start a real server in-process on an ephemeral port, with its own
//! data directory, and talk to it over real HTTPS.
//!
//! Every test binary compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod accounts;
pub mod auth;
pub mod backend;
pub mod galera;
pub mod immutable;
pub mod liblime;
pub mod linphone;
pub mod php;
pub mod pki;
pub mod process;
pub mod raw;
pub mod registrations;
pub mod relay;
pub mod scrape;
pub mod served;
pub mod store_probe;

use auth::{AuthFixture, TestAuth};
use backend::{Backend, TestDatabases};
use lime_protocol::{
    Curve, DeviceId, IdentityKey, OneTimePreKey, Registration, Request, RequestMessage,
    ResponseMessage, SignedPreKey,
};
use lime_server::client::{LimeClient, RawAnswer};
use lime_server::config::Settings;
use lime_server::startup::Application;
use lime_server::store::StoreError;
use rand::RngCore;
use std::net::SocketAddr;
use std::time::Duration;
use store_probe::StoreProbe;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running server and a client that trusts it.
///
/// Fields drop in order: the server stops before its databases are dropped.
pub struct TestApp {
    /// `https://127.0.0.1:PORT/`
    pub base_url: String,
    /// The bound address.
    pub addr: SocketAddr,
    /// A client trusting the server's self-signed certificate.
    pub client: LimeClient,
    /// The settings the server runs with.
    pub settings: Settings,
    /// The store backend the test runs on (`LIME_TEST_BACKEND`).
    pub backend: Backend,
    /// Direct access to the stores, bypassing the protocol (and any relay).
    pub probe: StoreProbe,
    /// Dropping it stops the server.
    stop: oneshot::Sender<()>,
    /// The server's task, which ends once it has stopped.
    running: JoinHandle<anyhow::Result<()>>,
    /// How the server authenticates, and the accounts or certificates of its clients.
    pub auth: AuthFixture,
    /// The test's databases on a database server, dropped after the server stops.
    _databases: TestDatabases,
    /// Holds the data directory for the life of the test.
    pub data_dir: TempDir,
}

/// Starts a server with the defaults (TLS, all five curves) on an ephemeral
/// loopback port, its stores on the backend `LIME_TEST_BACKEND` names: SQLite in a
/// fresh temporary directory, or fresh databases on the machine's MariaDB or
/// PostgreSQL; authentication as `LIME_TEST_AUTH` says (off by default).
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Like [`spawn_app`], with settings changed by `configure` first.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_on(Backend::from_env(), configure).await
}

/// Starts a server with its stores on `backend`, settings changed by `configure`.
///
/// On a database server, a database is made for each of the five curves and
/// `storage.url` names them before `configure` runs: a test may point it
/// elsewhere (through a [`relay::Relay`], say), or enable fewer curves (the other
/// databases are simply unused).
pub async fn spawn_app_on(backend: Backend, configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_authenticating(backend, TestAuth::from_env(), configure).await
}

/// Starts a server with its stores on `backend` and authentication `auth` (its
/// accounts on the same backend), settings changed by `configure`.
pub async fn spawn_app_authenticating(
    backend: Backend,
    auth: TestAuth,
    configure: impl FnOnce(&mut Settings),
) -> TestApp {
    init_test_log();
    let data_dir = tempfile::tempdir().expect("temporary data directory");
    let mut settings = Settings::default();
    settings.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
    settings.storage.data_dir = data_dir.path().to_owned();
    // The suites fetch one device's bundle from one sender many times over: the
    // bundle request limit is off unless a test sets it (tests/limits.rs).
    settings.limits.max_bundle_requests = 0;
    let (databases, url) = TestDatabases::create(backend, &Curve::ALL).await;
    if url.is_some() {
        settings.storage.url = url.clone();
    }
    let auth = AuthFixture::create(auth, backend, data_dir.path()).await;
    auth.configure(&mut settings);
    configure(&mut settings);
    // The probe reaches the test's databases directly, wherever `configure`
    // pointed the server.
    let mut direct = settings.clone();
    if url.is_some() {
        direct.storage.url = url;
    }
    let app = Application::build(&settings)
        .await
        .expect("the server starts with the test settings");
    let (addr, scheme) = app.local_addrs()[0];
    let client = match app.certificate() {
        Some(files) => {
            LimeClient::trusting(&files.certificate).expect("client trusting the server")
        }
        None => LimeClient::plain().expect("plain HTTP client"),
    };
    let auth = auth.serving(client.clone(), app.certificate().cloned());
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    TestApp {
        base_url: format!("{scheme}://{addr}/"),
        addr,
        client,
        probe: StoreProbe::new(&direct),
        auth,
        settings,
        backend,
        stop,
        running,
        _databases: databases,
        data_dir,
    }
}

/// Logs to stderr when `TEST_LOG` is set; silent otherwise.
fn init_test_log() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_test_writer()
            .try_init();
    }
}

impl TestApp {
    /// Stops the server and waits (bounded) for it to finish; its databases are
    /// dropped after.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let finished = tokio::time::timeout(Duration::from_secs(15), self.running).await;
        assert!(finished.is_ok(), "the server did not stop within 15 s");
    }

    /// Sends one X3DH request as `sender` (header X-Lime-user-identity) and parses
    /// the answer. Panics when the answer is not an HTTP 200 X3DH message.
    pub async fn send(&self, sender: &str, message: &RequestMessage) -> ResponseMessage {
        self.client_for(sender)
            .await
            .send(&self.base_url, sender, message)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "{:?} as {sender}: {error:#}",
                    message.request.message_type()
                )
            })
    }

    /// Sends a request made of `curve` and `request`.
    pub async fn ask(&self, sender: &str, curve: Curve, request: Request) -> ResponseMessage {
        self.send(sender, &RequestMessage { curve, request }).await
    }

    /// A client that authenticates as the owner of `device_id` (the plain client
    /// when authentication is off): its account or certificate is made on first use.
    pub async fn client_for(&self, device_id: &str) -> LimeClient {
        self.auth.client_for(device_id).await
    }

    /// The self-signed certificate the server presents.
    pub fn certificate_file(&self) -> std::path::PathBuf {
        lime_server::tls::CertificateFiles::self_signed_in(&self.settings.storage.data_dir)
            .certificate
    }

    /// POSTs raw bytes to the base URL with exactly these headers.
    pub async fn post_raw(&self, headers: &[(&str, &str)], body: Vec<u8>) -> RawAnswer {
        self.client
            .post(&self.base_url, headers, body)
            .await
            .expect("the server answers")
    }

    /// A second server on this one's stores, settings changed by `configure`, with
    /// a data directory, a port and clients of its own: a test can give it the
    /// setting under test (a short store time-out, say) and do its set-up and its
    /// checks through this one, which keeps the defaults.
    pub async fn spawn_beside(&self, configure: impl FnOnce(&mut Settings)) -> TestApp {
        let urls = Curve::ALL
            .iter()
            .map(|&curve| {
                let location = self
                    .settings
                    .storage
                    .location(curve)
                    .expect("store location");
                (curve.name().to_owned(), location.to_string())
            })
            .collect();
        spawn_app_on(self.backend, |settings| {
            settings.storage.urls = urls;
            configure(settings);
        })
        .await
    }

    /// Removes a device (and its OPks) directly in the store, bypassing the protocol:
    /// what a server that lost a device looks like to its client.
    pub async fn delete_device_in_store(&self, curve: Curve, device_id: &str) {
        self.probe.delete_device(curve, device_id).await;
    }

    /// Number of OPk rows in a curve's store, all devices together.
    pub async fn stored_one_time_pre_keys(&self, curve: Curve) -> u64 {
        self.probe.count_one_time_pre_keys(curve).await
    }
}

/// `call`, made again (20 times at most) while it answers `StoreError::Timeout`:
/// for the calls a test makes through a store with a short time-out once what it
/// tests is over, which a loaded machine alone can make time out.
pub async fn again_past_timeouts<T, F, Fut>(mut call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut answer = call().await;
    for _ in 1..20 {
        if !matches!(answer, Err(StoreError::Timeout(_))) {
            break;
        }
        answer = call().await;
    }
    answer
}

/// A device id unique to this test run: `sip:NAME-RANDOM@example.org;gr=urn:uuid:...`.
pub fn device_id(name: &str) -> String {
    let mut rng = rand::rng();
    format!(
        "sip:{name}-{:08x}@example.org;gr=urn:uuid:{:032x}",
        rng.next_u32(),
        u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())
    )
}

/// `bytes` random bytes in hex.
pub fn random_hex(bytes: usize) -> String {
    hex::encode(random_bytes(bytes))
}

/// `len` random bytes.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// A one-time pre-key of the curve's size with random bytes.
pub fn one_time_pre_key(curve: Curve, id: u32) -> OneTimePreKey {
    OneTimePreKey::new(curve, random_bytes(curve.pre_key_len()), id).unwrap()
}

/// A signed pre-key of the curve's sizes with random bytes.
pub fn signed_pre_key(curve: Curve, id: u32) -> SignedPreKey {
    SignedPreKey::new(
        curve,
        random_bytes(curve.pre_key_len()),
        random_bytes(curve.signature_len()),
        id,
    )
    .unwrap()
}

/// A registration with random keys and OPks with ids `first_opk_id..first_opk_id+opks`.
pub fn registration(curve: Curve, opks: u32, first_opk_id: u32) -> Registration {
    Registration {
        identity_key: IdentityKey::new(curve, random_bytes(curve.identity_key_len())).unwrap(),
        signed_pre_key: signed_pre_key(curve, 1),
        one_time_pre_keys: (first_opk_id..first_opk_id + opks)
            .map(|id| one_time_pre_key(curve, id))
            .collect(),
    }
}

/// `DeviceId` from a string known to be valid.
pub fn id(text: &str) -> DeviceId {
    DeviceId::new(text).unwrap()
}
