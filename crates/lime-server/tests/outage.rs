//! The database goes away in the middle of a load, then comes back: while it is
//! unreachable every request is answered `db_error` within the store's time-out
//! (no hang) and the server stays up (`/health` 200, `/ready` 503); once it is back
//! the same server process serves again (`/ready` 200), without a restart. Across
//! the whole episode no one-time pre-key is served twice, and none is lost: the
//! keys served and the keys still stored are exactly the keys uploaded.
//!
//! A TCP relay ([`common::relay`]) stands between the server and the machine's
//! MariaDB or PostgreSQL. Cutting it closes every database connection at once and
//! turns new ones away, as a crashed database server would; restoring it forwards
//! again on the same port.

mod common;

use common::backend::Backend;
use common::relay::Relay;
use common::{TestApp, device_id, id, registration, spawn_app_on};
use lime_protocol::{Curve, ErrorCode, MessageType, Request, RequestMessage, Response};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// The curve the story runs on (every curve's store goes through the relay).
const CURVE: Curve = Curve::C25519;
/// Devices whose bundles are fetched.
const TARGETS: u32 = 8;
/// One-time pre-keys each target uploads: 320 in all.
const OPKS_PER_TARGET: u32 = 40;
/// getPeerBundle requests in flight at once during the load.
const IN_FLIGHT: usize = 16;
/// `storage.timeout_ms`: the longest a request waits for the database. The load
/// before the cut must never reach it (no `db_error` while the database is
/// reachable), with 16 requests in flight on a machine busy with other suites.
const STORE_TIMEOUT: Duration = Duration::from_millis(2_000);
/// `storage.connect_timeout_ms`.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The slowest answer accepted: the store's time-out and a margin. More is a hang.
const LATENCY_LIMIT: Duration = Duration::from_millis(2_000 + 2_000);
/// A request not answered within this is given up on (and fails the test).
const GIVE_UP_AFTER: Duration = Duration::from_secs(15);
/// The cut lasts at least this long: several requests start and end inside it.
const CUT_FOR: Duration = Duration::from_secs(3);
/// Longest wait for the server to serve again once the database is back.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for the load to reach a point of the story.
const LOAD_LIMIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_outage_mid_load_answers_db_error_then_recovers_without_restart() {
    outage_mid_load_answers_db_error_then_recovers_without_restart(Backend::Mariadb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_mid_load_answers_db_error_then_recovers_without_restart() {
    outage_mid_load_answers_db_error_then_recovers_without_restart(Backend::Postgres).await;
}

async fn outage_mid_load_answers_db_error_then_recovers_without_restart(backend: Backend) {
    let database_addr = match backend {
        Backend::Mariadb => "127.0.0.1:3306",
        _ => "127.0.0.1:5432",
    };
    let relay = Relay::start(database_addr).await;
    // Set-up and checks go through `patient`, on the database directly with the
    // default time-outs: on a loaded machine they may take longer than the short
    // time-outs of the server under test, which only the load has to face.
    let patient = spawn_app_on(backend, |settings| {
        settings.server.listen = Vec::new();
        settings.server.plain_http_listen = vec!["127.0.0.1:0".parse().unwrap()];
    })
    .await;
    // The server under test: plain HTTP; every curve's store through the relay.
    // (`probe` goes to the database directly, never through the relay.)
    let server = patient
        .spawn_beside(|settings| {
            settings.server.listen = Vec::new();
            settings.server.plain_http_listen = vec!["127.0.0.1:0".parse().unwrap()];
            for url in settings.storage.urls.values_mut() {
                *url = relay.route(url);
            }
            settings.storage.timeout_ms = STORE_TIMEOUT.as_millis() as u64;
            settings.storage.connect_timeout_ms = CONNECT_TIMEOUT.as_millis() as u64;
        })
        .await;

    let targets: Vec<String> = (0..TARGETS).map(|_| device_id("target")).collect();
    let mut uploaded = HashSet::new();
    for target in &targets {
        let answer = ask(
            &patient,
            target,
            Request::RegisterUser(registration(CURVE, OPKS_PER_TARGET, 1)),
        )
        .await;
        assert_eq!(
            answer,
            Response::Done(MessageType::RegisterUser),
            "{target}"
        );
        uploaded.extend((1..=OPKS_PER_TARGET).map(|opk_id| (target.clone(), opk_id)));
    }
    // The devices that fetch bundles, registered as liblime registers first.
    let askers = (0..IN_FLIGHT)
        .map(|worker| format!("sip:asker{worker}@example.org;gr=x"))
        .chain(["sip:asker@example.org;gr=x".to_owned()]);
    for asker in askers {
        let answer = ask(
            &patient,
            &asker,
            Request::RegisterUser(registration(CURVE, 0, 1)),
        )
        .await;
        assert_eq!(answer, Response::Done(MessageType::RegisterUser), "{asker}");
    }

    // Load, then the cut once a third of the keys are served: claims are under
    // way on every connection when it comes.
    let load = Load::start(&server, &targets);
    let total = uploaded.len();
    load.wait_until("a third of the keys are served", || {
        load.opks_served() >= total / 3
    })
    .await;
    load.enter(Phase::Cutting);
    relay.cut().await;
    load.enter(Phase::Cut);
    let cut_at = Instant::now();

    // The server is alive and says it is not ready.
    let (status, latency) = get(&server, "/health").await;
    assert_eq!(status, 200, "{backend:?}: /health during the cut");
    assert!(
        latency < LATENCY_LIMIT,
        "{backend:?}: /health took {latency:?}"
    );
    let (status, ready_latency) = get(&server, "/ready").await;
    assert_eq!(status, 503, "{backend:?}: /ready during the cut");
    // /ready pings each curve's store in turn, each within the store's time-out.
    let ready_limit = STORE_TIMEOUT * Curve::ALL.len() as u32 + LATENCY_LIMIT;
    assert!(
        ready_latency < ready_limit,
        "{backend:?}: /ready took {ready_latency:?} during the cut"
    );
    tokio::time::sleep(CUT_FOR.saturating_sub(cut_at.elapsed())).await;

    // Back, on the same port; the server is not restarted.
    load.enter(Phase::Restored);
    relay.restore();
    let restored_at = Instant::now();
    load.wait_until("a peerBundle after the database is back", || {
        load.bundles_after_restore() > 0
    })
    .await;
    let recovered_after = restored_at.elapsed();
    assert!(
        recovered_after < RECOVERY_LIMIT,
        "{backend:?}: no peerBundle within {RECOVERY_LIMIT:?} of the database coming back"
    );
    let ready_again = wait_until_ready(&server, RECOVERY_LIMIT).await;
    assert!(
        ready_again,
        "{backend:?}: /ready not 200 within {RECOVERY_LIMIT:?} of the database coming back"
    );
    // Some more load on the recovered server, then stop it.
    let served_at_recovery = load.opks_served();
    load.wait_until("more keys served after recovery", || {
        load.opks_served() >= served_at_recovery + total / 6
    })
    .await;
    let outcomes = load.stop().await;

    // Every answer: in time, a peerBundle or db_error, and db_error when the
    // request began and ended inside the cut.
    let mut served: Vec<(String, u32)> = Vec::new();
    let mut tally = [Tally::default(); Period::ALL.len()];
    for outcome in &outcomes {
        let period = Period::of(outcome);
        assert!(
            outcome.latency <= LATENCY_LIMIT,
            "{backend:?}: a request {period:?} took {:?}: {:?}",
            outcome.latency,
            outcome.answer
        );
        let answer = outcome
            .answer
            .as_ref()
            .unwrap_or_else(|error| panic!("{backend:?}: a request {period:?}: {error}"));
        let tally = &mut tally[period as usize];
        tally.answers += 1;
        tally.slowest = tally.slowest.max(outcome.latency);
        match answer {
            Response::Error(error) if error.code == ErrorCode::DbError => tally.db_errors += 1,
            Response::PeerBundles(bundles) if period != Period::InsideTheCut => {
                served.extend(one_time_pre_keys_in(backend, bundles));
            }
            other => panic!(
                "{backend:?}: a request {period:?}: expected peerBundle or db_error, got {other:?}"
            ),
        }
    }
    let report: Vec<String> = Period::ALL
        .iter()
        .map(|period| format!("{period:?}: {:?}", tally[*period as usize]))
        .collect();
    let report = report.join("; ");
    assert!(
        tally[Period::InsideTheCut as usize].answers > 0,
        "{backend:?}: no request began and ended inside the cut ({report})"
    );
    assert_eq!(
        tally[Period::BeforeTheCut as usize].db_errors,
        0,
        "{backend:?}: db_error while the database was reachable ({report})"
    );

    // Drain, until the keys served and the keys still stored add up to the keys
    // uploaded: a key whose claim's outcome was unknown at the cut may come back
    // to the store a moment after the database does.
    let deadline = Instant::now() + RECOVERY_LIMIT;
    let mut stored;
    loop {
        for target in &targets {
            served.extend(drain(&patient, target).await);
        }
        stored = HashSet::new();
        for target in &targets {
            match ask(&patient, target, Request::GetSelfOneTimePreKeys).await {
                Response::SelfOneTimePreKeys(ids) => {
                    stored.extend(ids.into_iter().map(|opk_id| (target.clone(), opk_id)));
                }
                other => panic!("{backend:?}: getSelfOPks of {target}: {other:?}"),
            }
        }
        if served.len() + stored.len() >= total || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut served_once = HashSet::new();
    for key in &served {
        assert!(
            served_once.insert(key.clone()),
            "{backend:?}: OPk {} of {} served twice",
            key.1,
            key.0
        );
    }
    assert!(
        served_once.is_disjoint(&stored),
        "{backend:?}: OPks served and still stored: {:?}",
        served_once.intersection(&stored).collect::<Vec<_>>()
    );
    assert_eq!(
        patient.probe.count_one_time_pre_keys(CURVE).await,
        stored.len() as u64,
        "{backend:?}: getSelfOPks and the store agree"
    );
    let accounted: HashSet<_> = served_once.union(&stored).cloned().collect();
    let lost: Vec<_> = uploaded.difference(&accounted).collect();
    let unknown: Vec<_> = accounted.difference(&uploaded).collect();
    assert!(
        unknown.is_empty(),
        "{backend:?}: OPks never uploaded: {unknown:?}"
    );
    eprintln!(
        "{backend:?}: {report}; /ready took {ready_latency:?} during the cut; first peerBundle \
         {recovered_after:?} after the restore; OPks: {} served, {} stored, {} lost",
        served_once.len(),
        stored.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{backend:?}: {} of {total} OPks lost (neither served nor stored): {lost:?}",
        lost.len()
    );

    server.stop().await;
    patient.stop().await;
    drop(relay);
}

/// The (device, OPk id) of every flag-1 entry; every target has a bundle.
fn one_time_pre_keys_in(
    backend: Backend,
    bundles: &[lime_protocol::PeerBundle],
) -> Vec<(String, u32)> {
    bundles
        .iter()
        .filter_map(|entry| {
            let bundle = entry
                .bundle
                .as_ref()
                .unwrap_or_else(|| panic!("{backend:?}: {} answered with flag 2", entry.device_id));
            bundle
                .one_time_pre_key
                .as_ref()
                .map(|key| (entry.device_id.as_str().to_owned(), key.id()))
        })
        .collect()
}

/// Where the story is when a request begins or ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// The database is reachable.
    Before = 0,
    /// The relay is being cut.
    Cutting = 1,
    /// The relay is cut: nothing reaches the database.
    Cut = 2,
    /// The relay is being restored, or is.
    Restored = 3,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Before,
            1 => Phase::Cutting,
            2 => Phase::Cut,
            _ => Phase::Restored,
        }
    }
}

/// When a request of the load happened, from the phases it began and ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Period {
    /// Began and ended while the database was reachable.
    BeforeTheCut,
    /// In flight when the cut came.
    AtTheCut,
    /// Began and ended while nothing reached the database.
    InsideTheCut,
    /// In flight when the relay was restored.
    AtTheRestore,
    /// Began once the relay was restored.
    AfterTheRestore,
}

impl Period {
    const ALL: [Period; 5] = [
        Period::BeforeTheCut,
        Period::AtTheCut,
        Period::InsideTheCut,
        Period::AtTheRestore,
        Period::AfterTheRestore,
    ];

    fn of(outcome: &Outcome) -> Period {
        match (outcome.began, outcome.ended) {
            (Phase::Before, Phase::Before) => Period::BeforeTheCut,
            (Phase::Before | Phase::Cutting, _) => Period::AtTheCut,
            (Phase::Cut, Phase::Cut) => Period::InsideTheCut,
            (Phase::Cut, _) => Period::AtTheRestore,
            (Phase::Restored, _) => Period::AfterTheRestore,
        }
    }
}

/// The answers of one [`Period`].
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    answers: usize,
    db_errors: usize,
    slowest: Duration,
}

/// Sends one request as `sender`, outside the load: it must be answered.
async fn ask(server: &TestApp, sender: &str, request: Request) -> Response {
    tokio::time::timeout(GIVE_UP_AFTER, server.ask(sender, CURVE, request))
        .await
        .unwrap_or_else(|_| panic!("no answer within {GIVE_UP_AFTER:?}"))
        .response
}

/// GETs a path; its HTTP status and how long the answer took.
async fn get(server: &TestApp, path: &str) -> (u16, Duration) {
    let url = format!("{}{}", server.base_url, path.trim_start_matches('/'));
    let started = Instant::now();
    let answer = tokio::time::timeout(
        GIVE_UP_AFTER,
        server.client.request("GET", &url, &[], Vec::new()),
    )
    .await
    .unwrap_or_else(|_| panic!("GET {path}: no answer within {GIVE_UP_AFTER:?}"))
    .unwrap_or_else(|error| panic!("GET {path}: {error:#}"));
    (answer.status, started.elapsed())
}

/// Whether `/ready` answers 200 within `limit`.
async fn wait_until_ready(server: &TestApp, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if get(server, "/ready").await.0 == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Fetches `target`'s bundle until it comes without a one-time pre-key; the
/// keys served on the way.
async fn drain(server: &TestApp, target: &str) -> Vec<(String, u32)> {
    let backend = server.backend;
    let mut served = Vec::new();
    for _ in 0..=OPKS_PER_TARGET {
        match ask(
            server,
            "sip:asker@example.org;gr=x",
            Request::GetPeerBundle(vec![id(target)]),
        )
        .await
        {
            Response::PeerBundles(bundles) => {
                let keys = one_time_pre_keys_in(backend, &bundles);
                if keys.is_empty() {
                    return served;
                }
                served.extend(keys);
            }
            other => panic!("{backend:?}: draining {target}: {other:?}"),
        }
    }
    panic!("{backend:?}: {target} still had OPks after {OPKS_PER_TARGET} more requests");
}

/// What the load has done so far, shared with the test that steers it.
#[derive(Default)]
struct Progress {
    /// The current [`Phase`].
    phase: AtomicU8,
    /// One-time pre-keys received in peerBundles.
    opks_served: AtomicUsize,
    /// peerBundles for requests that began after the restore.
    bundles_after_restore: AtomicUsize,
    /// Tells the workers to stop.
    stop: AtomicBool,
    /// Requests sent, all workers together: picks the target.
    sent: AtomicUsize,
}

/// One getPeerBundle of the load, as answered.
#[derive(Debug)]
struct Outcome {
    began: Phase,
    ended: Phase,
    latency: Duration,
    /// The X3DH answer, or why there was none (transport failure, not HTTP 200,
    /// no answer within [`GIVE_UP_AFTER`]).
    answer: Result<Response, String>,
}

/// [`IN_FLIGHT`] workers, each sending one getPeerBundle after the other.
struct Load {
    progress: Arc<Progress>,
    workers: Vec<JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(server: &TestApp, targets: &[String]) -> Load {
        let progress = Arc::new(Progress::default());
        let targets: Arc<Vec<String>> = Arc::new(targets.to_vec());
        let workers = (0..IN_FLIGHT)
            .map(|worker| {
                let progress = progress.clone();
                let targets = targets.clone();
                let client = server.client.clone();
                let url = server.base_url.clone();
                let sender = format!("sip:asker{worker}@example.org;gr=x");
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    // Bounded in count too; the test stops the load long before.
                    while !progress.stop.load(Ordering::SeqCst) && outcomes.len() < 100_000 {
                        let n = progress.sent.fetch_add(1, Ordering::SeqCst);
                        let message = RequestMessage {
                            curve: CURVE,
                            request: Request::GetPeerBundle(vec![id(&targets[n % targets.len()])]),
                        };
                        let began = Phase::from_u8(progress.phase.load(Ordering::SeqCst));
                        let started = Instant::now();
                        let answer = tokio::time::timeout(
                            GIVE_UP_AFTER,
                            client.send(&url, &sender, &message),
                        )
                        .await;
                        let latency = started.elapsed();
                        let ended = Phase::from_u8(progress.phase.load(Ordering::SeqCst));
                        let answer = match answer {
                            Ok(Ok(answer)) => Ok(answer.response),
                            Ok(Err(error)) => Err(format!("{error:#}")),
                            Err(_) => Err(format!("no answer within {GIVE_UP_AFTER:?}")),
                        };
                        if let Ok(Response::PeerBundles(bundles)) = &answer {
                            let keys = bundles.iter().filter(|entry| entry.flag() == 1).count();
                            progress.opks_served.fetch_add(keys, Ordering::SeqCst);
                            if began == Phase::Restored {
                                progress
                                    .bundles_after_restore
                                    .fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        outcomes.push(Outcome {
                            began,
                            ended,
                            latency,
                            answer,
                        });
                    }
                    outcomes
                })
            })
            .collect();
        Load { progress, workers }
    }

    /// Marks the story's new phase: requests beginning or ending from now on
    /// are in it.
    fn enter(&self, phase: Phase) {
        self.progress.phase.store(phase as u8, Ordering::SeqCst);
    }

    /// One-time pre-keys served so far.
    fn opks_served(&self) -> usize {
        self.progress.opks_served.load(Ordering::SeqCst)
    }

    /// peerBundles for requests that began after the restore.
    fn bundles_after_restore(&self) -> usize {
        self.progress.bundles_after_restore.load(Ordering::SeqCst)
    }

    /// Polls `reached` until it holds or [`LOAD_LIMIT`] passed (then the story
    /// goes on: the assertions that follow say what is missing).
    async fn wait_until(&self, what: &str, reached: impl Fn() -> bool) {
        let deadline = Instant::now() + LOAD_LIMIT;
        while !reached() {
            if Instant::now() >= deadline {
                eprintln!("the load did not reach \"{what}\" within {LOAD_LIMIT:?}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the workers and returns every request's outcome.
    async fn stop(self) -> Vec<Outcome> {
        self.progress.stop.store(true, Ordering::SeqCst);
        let mut outcomes = Vec::new();
        for worker in self.workers {
            outcomes.extend(worker.await.expect("a load worker panicked"));
        }
        outcomes
    }
}
