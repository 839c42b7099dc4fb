//! Authentication against the real server: HTTP Digest with accounts in a
//! flexisip-account-manager-shaped database (MariaDB, PostgreSQL, SQLite), answered
//! by real clients (`curl --digest` and the `digest_auth` crate behind
//! `LimeClient`); every way of being refused, each a named test; failed-attempt
//! throttling; TLS client certificates beside digest; certificates verified by a
//! trusted reverse proxy.

mod common;

use common::accounts::AccountsFixture;
use common::auth::{TestAuth, password_of, user_and_domain};
use common::backend::Backend;
use common::pki::TestPki;
use common::{TestApp, device_id, registration, spawn_app_authenticating};
use lime_protocol::{Curve, Request, RequestMessage, Response, ResponseMessage};
use lime_server::client::{LimeClient, RawAnswer};
use lime_server::config::Settings;
use std::time::{Duration, Instant};

const CURVE: Curve = Curve::C25519;

/// A server with digest on, its accounts on `accounts`, settings changed by `configure`.
async fn digest_app(accounts: Backend, configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_authenticating(accounts, TestAuth::Digest, configure).await
}

fn accounts_of(app: &TestApp) -> &AccountsFixture {
    app.auth.accounts.as_ref().expect("digest has accounts")
}

/// A registerUser for a fresh device of `name`, its body and device id.
fn register(name: &str) -> (String, Vec<u8>) {
    let device = device_id(name);
    let message = RequestMessage {
        curve: CURVE,
        request: Request::RegisterUser(registration(CURVE, 3, 1)),
    };
    (device, message.encode().unwrap())
}

/// Adds the account owning `device` with its test password (MD5 and SHA-256 rows).
async fn add_owner(app: &TestApp, device: &str, algorithms: &[&str]) -> (String, String) {
    let (user, domain) = user_and_domain(device);
    let password = password_of(&user);
    accounts_of(app)
        .add_account(&user, &domain, &password, algorithms)
        .await;
    (user, password)
}

fn x3dh_headers(device: &str) -> [(&'static str, &str); 2] {
    [
        ("content-type", "x3dh/octet-stream"),
        ("x-lime-user-identity", device),
    ]
}

/// Checks an answer is an X3DH 200 of the registerUser kind.
fn assert_registered(answer: &RawAnswer, what: &str) {
    assert_eq!(answer.status, 200, "{what}: {answer:?}");
    let parsed = ResponseMessage::parse(&answer.body).expect("an X3DH answer");
    assert!(
        matches!(parsed.response, Response::Done(_)),
        "{what}: {parsed:?}"
    );
}

/// True when the server holds `device`.
async fn is_registered(app: &TestApp, device: &str) -> bool {
    app.probe.device_row(CURVE, device).await.is_some()
}

/// The challenge values of a first, credential-less request.
async fn first_challenges(app: &TestApp, device: &str, body: &[u8]) -> Vec<String> {
    let answer = app.post_raw(&x3dh_headers(device), body.to_vec()).await;
    assert_eq!(answer.status, 401, "no credentials: {answer:?}");
    answer.www_authenticate
}

/// An `Authorization` header answering `challenge` with the `digest_auth` crate,
/// after `tamper` changed the challenge (realm, nonce...).
fn answer_challenge(
    challenge: &str,
    username: &str,
    password: &str,
    tamper: impl FnOnce(&mut digest_auth::WwwAuthenticateHeader),
) -> String {
    let mut prompt = digest_auth::parse(challenge).expect("a readable challenge");
    tamper(&mut prompt);
    let mut context = digest_auth::AuthContext::new(username, password, "/");
    context.method = digest_auth::HttpMethod::POST;
    prompt.respond(&context).unwrap().to_header_string()
}

/// Posts `body` as `device` with an `Authorization` header.
async fn post_with(app: &TestApp, device: &str, body: &[u8], authorization: &str) -> RawAnswer {
    let mut headers = x3dh_headers(device).to_vec();
    headers.push(("authorization", authorization));
    app.post_raw(&headers, body.to_vec()).await
}

// --- The challenge itself ---------------------------------------------------------

#[tokio::test]
async fn a_request_without_credentials_gets_sha256_then_md5_challenges() {
    let app = digest_app(Backend::Sqlite, |_| {}).await;
    let (device, body) = register("alice");
    let challenges = first_challenges(&app, &device, &body).await;
    assert_eq!(challenges.len(), 2, "{challenges:?}");
    for (challenge, algorithm) in challenges.iter().zip(["SHA-256", "MD5"]) {
        assert!(
            challenge.starts_with("Digest realm=\"example.org\", nonce=\""),
            "{challenge}"
        );
        assert!(
            challenge.ends_with(&format!("qop=\"auth\", algorithm={algorithm}")),
            "the name must be exactly {algorithm}: {challenge}"
        );
        assert!(challenge.contains("opaque=\""), "{challenge}");
    }
    assert!(!is_registered(&app, &device).await);
    app.stop().await;
}

// --- Real clients, accounts on each database --------------------------------------

/// curl answers the challenge with `algorithm` (the server offering only it, as
/// curl takes the first Digest challenge).
async fn curl_registers(accounts: Backend, algorithm: &'static str) {
    let app = digest_app(accounts, |settings| {
        settings.auth.digest.algorithms = vec![algorithm.into()];
    })
    .await;
    let (device, body) = register("curl");
    let (user, password) = add_owner(&app, &device, &[algorithm]).await;
    let dir = tempfile::tempdir().unwrap();
    let request = dir.path().join("request");
    let response = dir.path().join("response");
    std::fs::write(&request, &body).unwrap();
    let certificate = app.certificate_file();
    let mut curl = std::process::Command::new("curl");
    curl.args(["--silent", "--show-error", "--digest", "--user"])
        .arg(format!("{user}:{password}"))
        .arg("--cacert")
        .arg(&certificate)
        .args(["--header", "Content-Type: x3dh/octet-stream", "--header"])
        .arg(format!("X-Lime-user-identity: {device}"))
        .arg("--data-binary")
        .arg(format!("@{}", request.display()))
        .arg("--output")
        .arg(&response)
        .args(["--write-out", "%{http_code}", "--verbose"])
        .arg(&app.base_url);
    // curl blocks: off the runtime that serves it.
    let output = tokio::task::spawn_blocking(move || curl.output())
        .await
        .unwrap()
        .expect("curl runs (apt-get install curl)");
    let trace = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "200",
        "curl --digest ({algorithm}) did not get a 200:\n{trace}"
    );
    assert!(
        trace.contains(&format!("algorithm={algorithm}")),
        "curl answered another algorithm than {algorithm}:\n{trace}"
    );
    let answer = ResponseMessage::parse(&std::fs::read(&response).unwrap()).unwrap();
    assert!(matches!(answer.response, Response::Done(_)), "{answer:?}");
    assert!(is_registered(&app, &device).await);
    app.stop().await;
}

/// The Rust client (`digest_auth` behind `LimeClient`) registers, then keeps
/// using the nonce for the next requests, as Linphone does.
async fn rust_client_registers(accounts: Backend, algorithm: &'static str, stored: &[&str]) {
    let app = digest_app(accounts, |_| {}).await;
    let (device, body) = register("rust");
    let (user, password) = add_owner(&app, &device, stored).await;
    let client = app.client.with_digest(&user, &password, Some(algorithm));
    let answer = client
        .post(&app.base_url, &x3dh_headers(&device), body)
        .await
        .unwrap();
    assert_registered(&answer, algorithm);
    let again = RequestMessage {
        curve: CURVE,
        request: Request::GetSelfOneTimePreKeys,
    };
    let answer = client.send(&app.base_url, &device, &again).await.unwrap();
    assert!(
        matches!(&answer.response, Response::SelfOneTimePreKeys(ids) if ids.len() == 3),
        "{answer:?}"
    );
    app.stop().await;
}

macro_rules! real_clients_on {
    ($($backend:ident: $variant:expr;)*) => {
        $(mod $backend {
            use super::*;

            #[tokio::test]
            async fn curl_digest_sha256_registers() {
                curl_registers($variant, "SHA-256").await;
            }

            #[tokio::test]
            async fn curl_digest_md5_registers() {
                curl_registers($variant, "MD5").await;
            }

            #[tokio::test]
            async fn rust_client_sha256_registers() {
                rust_client_registers($variant, "SHA-256", &["MD5", "SHA-256"]).await;
            }

            #[tokio::test]
            async fn rust_client_md5_registers() {
                rust_client_registers($variant, "MD5", &["MD5", "SHA-256"]).await;
            }

            #[tokio::test]
            async fn clear_text_password_serves_both_algorithms() {
                rust_client_registers($variant, "SHA-256", &["CLRTXT"]).await;
                rust_client_registers($variant, "MD5", &["CLRTXT"]).await;
            }
        })*
    };
}

real_clients_on! {
    mariadb: Backend::Mariadb;
    postgres: Backend::Postgres;
    sqlite: Backend::Sqlite;
}

// --- Refusals ----------------------------------------------------------------------

/// Runs `attempt` against a MariaDB-backed digest server where the owner of a
/// fresh device has an account, then checks the device was not registered.
async fn refused(
    name: &str,
    attempt: impl AsyncFnOnce(&TestApp, &str, &[u8], &str, &str) -> RawAnswer,
    expected_status: u16,
) -> RawAnswer {
    let app = digest_app(Backend::Mariadb, |_| {}).await;
    let (device, body) = register(name);
    let (user, password) = add_owner(&app, &device, &["MD5", "SHA-256"]).await;
    let answer = attempt(&app, &device, &body, &user, &password).await;
    assert_eq!(answer.status, expected_status, "{name}: {answer:?}");
    assert!(
        !is_registered(&app, &device).await,
        "{name}: the device was registered anyway"
    );
    app.stop().await;
    answer
}

#[tokio::test]
async fn wrong_password_is_refused() {
    let answer = refused(
        "wrong-password",
        async |app, device, body, user, _| {
            let client = app.client.with_digest(user, "not the password", None);
            client
                .post(&app.base_url, &x3dh_headers(device), body.to_vec())
                .await
                .unwrap()
        },
        401,
    )
    .await;
    assert!(answer.www_authenticate.iter().all(|c| !c.contains("stale")));
}

#[tokio::test]
async fn unknown_user_is_refused() {
    refused(
        "unknown-user",
        async |app, device, body, user, password| {
            // The device id names `user`; credentials of a user with no account
            // but the right user part would be the same name: use another name.
            let stranger = format!("{user}-nobody");
            let device = device.replacen(user, &stranger, 1);
            let client = app.client.with_digest(&stranger, password, None);
            client
                .post(&app.base_url, &x3dh_headers(&device), body.to_vec())
                .await
                .unwrap()
        },
        401,
    )
    .await;
}

#[tokio::test]
async fn wrong_realm_is_refused() {
    refused(
        "wrong-realm",
        async |app, device, body, user, password| {
            let challenges = first_challenges(app, device, body).await;
            let authorization = answer_challenge(&challenges[0], user, password, |prompt| {
                prompt.realm = "example.net".into();
            });
            post_with(app, device, body, &authorization).await
        },
        401,
    )
    .await;
}

#[tokio::test]
async fn tampered_nonce_is_refused() {
    let answer = refused(
        "tampered-nonce",
        async |app, device, body, user, password| {
            let challenges = first_challenges(app, device, body).await;
            let authorization = answer_challenge(&challenges[0], user, password, |prompt| {
                // One character changed; the response is computed for it, so only
                // the nonce's own integrity check can catch it.
                let mut nonce = prompt.nonce.clone().into_bytes();
                nonce[3] = if nonce[3] == b'A' { b'B' } else { b'A' };
                prompt.nonce = String::from_utf8(nonce).unwrap();
            });
            post_with(app, device, body, &authorization).await
        },
        401,
    )
    .await;
    assert!(answer.www_authenticate.iter().all(|c| !c.contains("stale")));
}

#[tokio::test]
async fn device_id_of_another_user_is_refused() {
    let app = digest_app(Backend::Mariadb, |_| {}).await;
    let (bob_device, bob_body) = register("bob");
    let bob = app.client_for(&bob_device).await;
    let answer = bob
        .post(&app.base_url, &x3dh_headers(&bob_device), bob_body)
        .await
        .unwrap();
    assert_registered(&answer, "bob registers");
    let keys_before = app.probe.device_row(CURVE, &bob_device).await;

    // alice, authenticated, names bob's device id: registering over it, deleting it.
    let alice_device = device_id("alice");
    let alice = app.client_for(&alice_device).await;
    let (_, alice_body) = register("alice");
    let delete = RequestMessage {
        curve: CURVE,
        request: Request::DeleteUser,
    }
    .encode()
    .unwrap();
    for body in [alice_body, delete] {
        let answer = alice
            .post(&app.base_url, &x3dh_headers(&bob_device), body)
            .await
            .unwrap();
        assert_eq!(answer.status, 403, "alice acting for bob: {answer:?}");
    }
    assert_eq!(
        app.probe.device_row(CURVE, &bob_device).await,
        keys_before,
        "bob's keys changed"
    );
    app.stop().await;
}

#[tokio::test]
async fn expired_nonce_is_stale_then_accepted() {
    let app = digest_app(Backend::Mariadb, |settings| {
        settings.auth.digest.nonce_lifetime_secs = 1;
    })
    .await;
    let (device, body) = register("stale");
    let (user, password) = add_owner(&app, &device, &["SHA-256"]).await;
    let challenges = first_challenges(&app, &device, &body).await;
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let late = answer_challenge(&challenges[0], &user, &password, |_| {});
    let mut challenged = Instant::now();
    let answer = post_with(&app, &device, &body, &late).await;
    assert_eq!(answer.status, 401, "an expired nonce: {answer:?}");
    assert!(
        !answer.www_authenticate.is_empty()
            && answer
                .www_authenticate
                .iter()
                .all(|challenge| challenge.ends_with(", stale=true")),
        "right credentials on an old nonce get stale=true: {:?}",
        answer.www_authenticate
    );
    assert!(!is_registered(&app, &device).await);
    // The new challenge's nonce lives 1 s too (counted in whole seconds): answered
    // later than that after it was issued, it is rightly stale again, and is
    // answered again. Answered within 1 s, it must be accepted.
    let mut answer = answer;
    for _ in 0..10 {
        let fresh = answer_challenge(&answer.www_authenticate[0], &user, &password, |_| {});
        let answering = Instant::now();
        answer = post_with(&app, &device, &body, &fresh).await;
        if answer.status == 200 || challenged.elapsed() < Duration::from_secs(1) {
            break;
        }
        challenged = answering;
    }
    assert_registered(&answer, "answering the stale challenge");
    app.stop().await;
}

#[tokio::test]
async fn wrong_password_on_an_expired_nonce_is_not_stale() {
    let app = digest_app(Backend::Sqlite, |settings| {
        settings.auth.digest.nonce_lifetime_secs = 1;
    })
    .await;
    let (device, body) = register("stale-wrong");
    let (user, _) = add_owner(&app, &device, &["SHA-256"]).await;
    let challenges = first_challenges(&app, &device, &body).await;
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let late = answer_challenge(&challenges[0], &user, "wrong", |_| {});
    let answer = post_with(&app, &device, &body, &late).await;
    assert_eq!(answer.status, 401);
    assert!(
        answer.www_authenticate.iter().all(|c| !c.contains("stale")),
        "stale=true would tell a guesser nothing is wrong but time: {:?}",
        answer.www_authenticate
    );
    app.stop().await;
}

#[tokio::test]
async fn an_unreachable_account_database_answers_503_and_changes_nothing() {
    let app = digest_app(Backend::Mariadb, |_| {}).await;
    let (device, body) = register("dbdown");
    let client = app.client_for(&device).await;
    // The query stops working: the table it reads is gone.
    accounts_of(&app).execute("DROP TABLE passwords").await;
    let answer = client
        .post(&app.base_url, &x3dh_headers(&device), body)
        .await
        .unwrap();
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(!is_registered(&app, &device).await);
    app.stop().await;
}

#[tokio::test]
async fn a_changed_password_works_at_once_despite_the_kept_one() {
    let app = digest_app(Backend::Mariadb, |settings| {
        settings.auth.digest.accounts_cache_secs = 3_600;
    })
    .await;
    let (device, body) = register("changed");
    let (user, old_password) = add_owner(&app, &device, &["SHA-256"]).await;
    let old_client = app.client.with_digest(&user, &old_password, None);
    let answer = old_client
        .post(&app.base_url, &x3dh_headers(&device), body.clone())
        .await
        .unwrap();
    assert_registered(&answer, "the first password");
    let (_, domain) = user_and_domain(&device);
    let new_secret = common::accounts::stored_secret("SHA-256", &user, &domain, "new password");
    accounts_of(&app)
        .execute(&format!(
            "UPDATE passwords SET password = '{new_secret}' WHERE algorithm = 'SHA-256'"
        ))
        .await;
    let new_client = app.client.with_digest(&user, "new password", None);
    let answer = new_client
        .post(&app.base_url, &x3dh_headers(&device), body.clone())
        .await
        .unwrap();
    assert_registered(&answer, "the new password, while the old one is kept");
    let answer = old_client
        .post(&app.base_url, &x3dh_headers(&device), body)
        .await
        .unwrap();
    assert_eq!(answer.status, 401, "the old password: {answer:?}");
    app.stop().await;
}

// --- Throttling --------------------------------------------------------------------

#[tokio::test]
async fn repeated_failures_lock_the_user_out_until_the_lockout_ends() {
    const LOCKOUT: Duration = Duration::from_secs(4);
    let app = digest_app(Backend::Mariadb, |settings| {
        let throttle = &mut settings.auth.throttle;
        throttle.max_failures_per_user = 3;
        // Long enough for the right password to be tried within it on a loaded
        // machine (two requests on MariaDB's accounts).
        throttle.lockout_secs = LOCKOUT.as_secs();
        throttle.delay_step_ms = 0;
    })
    .await;
    let (device, body) = register("locked");
    let (user, password) = add_owner(&app, &device, &["MD5", "SHA-256"]).await;
    let challenges = first_challenges(&app, &device, &body).await;
    for attempt in 1..=3 {
        let guess = answer_challenge(&challenges[0], &user, &format!("guess {attempt}"), |_| {});
        let answer = post_with(&app, &device, &body, &guess).await;
        assert_eq!(answer.status, 401, "wrong password #{attempt}");
    }
    // The lock-out began before this.
    let locked = Instant::now();
    let owner = app.client.with_digest(&user, &password, None);
    let answer = owner
        .post(&app.base_url, &x3dh_headers(&device), body.clone())
        .await
        .unwrap();
    assert_eq!(
        answer.status, 429,
        "the right password during the lock-out: {answer:?}"
    );
    assert!(!is_registered(&app, &device).await);
    tokio::time::sleep((LOCKOUT + Duration::from_millis(100)).saturating_sub(locked.elapsed()))
        .await;
    let answer = owner
        .post(&app.base_url, &x3dh_headers(&device), body)
        .await
        .unwrap();
    assert_registered(&answer, "after the lock-out");
    app.stop().await;
}

/// A plain-HTTP digest server behind a trusted proxy on loopback, so that each
/// request can come from the address its `X-Forwarded-For` names; throttle
/// settings changed by `configure` (no delays unless it sets them).
async fn throttled_app(
    configure: impl FnOnce(&mut lime_server::config::ThrottleSettings),
) -> TestApp {
    digest_app(Backend::Sqlite, move |settings| {
        settings.server.listen = Vec::new();
        settings.server.plain_http_listen = vec!["127.0.0.1:0".parse().unwrap()];
        settings.auth.proxy.trusted = vec!["127.0.0.0/8".into()];
        settings.auth.throttle.delay_step_ms = 0;
        configure(&mut settings.auth.throttle);
    })
    .await
}

/// Posts `body` as `device` from `address` (through the trusted proxy), with
/// `authorization` when given.
async fn post_from(
    app: &TestApp,
    address: &str,
    device: &str,
    body: &[u8],
    authorization: Option<&str>,
) -> RawAnswer {
    let mut headers = x3dh_headers(device).to_vec();
    headers.push(("x-forwarded-for", address));
    if let Some(authorization) = authorization {
        headers.push(("authorization", authorization));
    }
    app.post_raw(&headers, body.to_vec()).await
}

/// An `Authorization` for `user` with `password`, answering a fresh challenge of
/// `device`'s realm (`forged`: on a nonce this server never issued).
async fn credentials(
    app: &TestApp,
    device: &str,
    body: &[u8],
    user: &str,
    password: &str,
    forged: bool,
) -> String {
    let challenges = first_challenges(app, device, body).await;
    answer_challenge(&challenges[0], user, password, |prompt| {
        if forged {
            prompt.nonce = common::random_hex(24);
        }
    })
}

/// The answer to `user`'s right password for `device` from `address`.
async fn owner_from(app: &TestApp, address: &str, device: &str, body: &[u8]) -> RawAnswer {
    let (user, _) = user_and_domain(device);
    let authorization = credentials(app, device, body, &user, &password_of(&user), false).await;
    post_from(app, address, device, body, Some(&authorization)).await
}

#[tokio::test]
async fn a_full_throttle_table_still_counts_new_failures() {
    let app = throttled_app(|throttle| {
        throttle.max_tracked = 100;
        throttle.max_failures_per_user = 3;
        throttle.max_failures_per_address = 1_000;
        throttle.max_failures_per_sec = 0;
    })
    .await;
    // Forged nonces from 300 addresses, each for another user: more than the
    // table holds.
    let (filler, filler_body) = register("filler");
    let challenges = first_challenges(&app, &filler, &filler_body).await;
    for index in 0..300 {
        let address = format!("10.1.{}.{}", index / 250, index % 250 + 1);
        let forged = answer_challenge(&challenges[0], &format!("filler{index}"), "x", |prompt| {
            prompt.nonce = common::random_hex(24);
        });
        let answer = post_from(&app, &address, &filler, &filler_body, Some(&forged)).await;
        assert_eq!(answer.status, 401, "filler #{index}");
    }
    let (device, body) = register("victim");
    let (user, _) = add_owner(&app, &device, &["MD5", "SHA-256"]).await;
    let guess = credentials(&app, &device, &body, &user, "guess", false).await;
    for attempt in 1..=3 {
        let answer = post_from(&app, "198.51.100.1", &device, &body, Some(&guess)).await;
        assert_eq!(answer.status, 401, "guess #{attempt}");
    }
    let answer = owner_from(&app, "198.51.100.1", &device, &body).await;
    assert_eq!(
        answer.status, 429,
        "the table is full, yet the guesser's failures must be counted: {answer:?}"
    );
    assert!(!is_registered(&app, &device).await);
    app.stop().await;
}

#[tokio::test]
async fn ipv6_addresses_are_counted_per_64() {
    let app = throttled_app(|throttle| {
        throttle.max_failures_per_address = 3;
        throttle.max_failures_per_user = 100;
    })
    .await;
    let (device, body) = register("six");
    add_owner(&app, &device, &["MD5", "SHA-256"]).await;
    let forged = credentials(&app, &device, &body, "someone", "x", true).await;
    for host in 1..=3 {
        let address = format!("2001:db8:1:2::{host}");
        let answer = post_from(&app, &address, &device, &body, Some(&forged)).await;
        assert_eq!(answer.status, 401, "{address}");
    }
    let answer = owner_from(&app, "2001:db8:1:2:ffff::99", &device, &body).await;
    assert_eq!(
        answer.status, 429,
        "another address of the same /64 is the same source: {answer:?}"
    );
    let answer = owner_from(&app, "2001:db8:1:3::1", &device, &body).await;
    assert_registered(&answer, "from the next /64");
    app.stop().await;
}

/// One failure a second for the whole instance. Past it, failures are refused
/// untried until the second that opened the cap is over: in each second at most
/// two failures are let through (the one that opens it, and the one that finds it
/// used and starts the refusals), however slow the machine.
#[tokio::test]
async fn global_failure_cap_slows_everyone_past_it() {
    let app = throttled_app(|throttle| {
        throttle.max_failures_per_sec = 1;
        throttle.max_failures_per_address = 1_000;
        throttle.max_failures_per_user = 1_000;
    })
    .await;
    let (alice, alice_body) = register("alice");
    add_owner(&app, &alice, &["MD5", "SHA-256"]).await;
    let answer = owner_from(&app, "198.51.100.1", &alice, &alice_body).await;
    assert_registered(&answer, "alice, before the flood");
    let (user, user_body) = register("flood");
    let forged = credentials(&app, &user, &user_body, "flood", "x", true).await;
    // bob, from an address he never authenticated from, is refused while the
    // flood holds the cap. He is sure to try within it when his answer comes
    // less than a second after the failure that opened the cap's current second
    // was sent; later, on a slow machine, the cap may rightly have let him in,
    // and a new bob tries after another flood.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (bob, bob_body) = register("bob");
        let (bob_user, bob_password) = add_owner(&app, &bob, &["MD5", "SHA-256"]).await;
        let bob_authorization =
            credentials(&app, &bob, &bob_body, &bob_user, &bob_password, false).await;
        let mut refused = 0;
        let mut second_opened = None;
        let mut after_refusal = true;
        let flooding = Instant::now();
        for index in 0..12 {
            let address = format!("10.2.{attempt}.{}", index + 1);
            let sent = Instant::now();
            let answer = post_from(&app, &address, &user, &user_body, Some(&forged)).await;
            if answer.status == 429 {
                refused += 1;
                after_refusal = true;
            } else {
                if after_refusal {
                    second_opened = Some(sent);
                }
                after_refusal = false;
            }
        }
        let seconds = flooding.elapsed().as_secs() as usize + 1;
        assert!(
            12 - refused <= 2 * seconds,
            "past one failure a second, failures are refused: {refused} of 12 in {:?}",
            flooding.elapsed()
        );
        let answer = post_from(
            &app,
            "198.51.100.2",
            &bob,
            &bob_body,
            Some(&bob_authorization),
        )
        .await;
        let within_the_cap = after_refusal
            && second_opened
                .is_some_and(|opened: Instant| opened.elapsed() < Duration::from_secs(1));
        if answer.status == 429 || within_the_cap || attempt == 5 {
            assert_eq!(
                answer.status, 429,
                "bob, from an address he never authenticated from, waits too: {answer:?}"
            );
            break;
        }
        eprintln!("bob came too late after the cap's second opened ({second_opened:?}): again");
    }
    let answer = owner_from(&app, "198.51.100.1", &alice, &alice_body).await;
    assert_registered(&answer, "alice, from where she authenticated before");
    app.stop().await;
}

#[tokio::test]
async fn forged_nonce_does_not_count_against_the_username() {
    let app = throttled_app(|throttle| {
        throttle.max_failures_per_user = 3;
        throttle.max_failures_per_address = 100;
    })
    .await;
    let (device, body) = register("forged");
    let (user, _) = add_owner(&app, &device, &["MD5", "SHA-256"]).await;
    // No password at all: a nonce made up, answered with anything.
    let forged = credentials(&app, &device, &body, &user, "", true).await;
    for attempt in 1..=10 {
        let answer = post_from(&app, "203.0.113.9", &device, &body, Some(&forged)).await;
        assert_eq!(answer.status, 401, "forged nonce #{attempt}");
    }
    let answer = owner_from(&app, "198.51.100.1", &device, &body).await;
    assert_registered(&answer, "the owner, after ten forged nonces for his name");
    app.stop().await;
}

#[tokio::test]
async fn alice_failures_do_not_lock_alice_at_another_realm() {
    let app = throttled_app(|throttle| {
        throttle.max_failures_per_user = 3;
    })
    .await;
    let (device, body) = register("alice");
    let (user, _) = add_owner(&app, &device, &["MD5", "SHA-256"]).await;
    let elsewhere = device.replacen("@example.org;", "@other.org;", 1);
    add_owner(&app, &elsewhere, &["MD5", "SHA-256"]).await;
    let guess = credentials(&app, &device, &body, &user, "guess", false).await;
    for attempt in 1..=5 {
        post_from(&app, "198.51.100.1", &device, &body, Some(&guess)).await;
        let _ = attempt;
    }
    let answer = owner_from(&app, "198.51.100.1", &device, &body).await;
    assert_eq!(answer.status, 429, "{user}@example.org is locked out there");
    let answer = owner_from(&app, "198.51.100.1", &elsewhere, &body).await;
    assert_registered(&answer, "the same name at other.org");
    app.stop().await;
}

#[tokio::test]
async fn one_address_cannot_lock_a_user_out_for_others() {
    let app = throttled_app(|throttle| {
        throttle.max_failures_per_user = 3;
    })
    .await;
    let (device, body) = register("target");
    let (user, _) = add_owner(&app, &device, &["MD5", "SHA-256"]).await;
    let guess = credentials(&app, &device, &body, &user, "guess", false).await;
    for _ in 0..10 {
        post_from(&app, "203.0.113.9", &device, &body, Some(&guess)).await;
    }
    let answer = owner_from(&app, "203.0.113.9", &device, &body).await;
    assert_eq!(
        answer.status, 429,
        "the guessing address is locked out for that user, right password included"
    );
    let answer = owner_from(&app, "198.51.100.1", &device, &body).await;
    assert_registered(&answer, "the user, from anywhere else");
    app.stop().await;
}

#[tokio::test]
async fn a_guesser_over_many_addresses_is_paced_but_the_user_gets_in_from_home() {
    let app = throttled_app(|throttle| {
        throttle.max_failures_per_user = 3;
        throttle.lockout_secs = 30;
    })
    .await;
    let (device, body) = register("paced");
    let (user, _) = add_owner(&app, &device, &["MD5", "SHA-256"]).await;
    let answer = owner_from(&app, "198.51.100.1", &device, &body).await;
    assert_registered(&answer, "from home, before the attack");
    let guess = credentials(&app, &device, &body, &user, "guess", false).await;
    let mut statuses = Vec::new();
    for index in 0..10 {
        let address = format!("10.3.0.{}", index + 1);
        statuses.push(
            post_from(&app, &address, &device, &body, Some(&guess))
                .await
                .status,
        );
    }
    assert_eq!(
        statuses,
        [401, 401, 401, 429, 429, 429, 429, 429, 429, 429],
        "three guesses, then one per 10 s from addresses the user never used"
    );
    let answer = owner_from(&app, "198.51.100.1", &device, &body).await;
    assert_registered(&answer, "from home, during the attack");
    app.stop().await;
}

// --- Which algorithms a challenge offers --------------------------------------------

/// The algorithms named by `challenges`, in order.
fn algorithms_of(challenges: &[String]) -> Vec<String> {
    challenges
        .iter()
        .map(|challenge| {
            challenge
                .rsplit_once("algorithm=")
                .map(|(_, name)| name.split(',').next().unwrap_or(name).to_owned())
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test]
async fn md5_only_account_is_challenged_with_md5_only() {
    let app = digest_app(Backend::Sqlite, |_| {}).await;
    for (name, stored, offered) in [
        ("md5only", &["MD5"][..], &["MD5"][..]),
        ("sha256only", &["SHA-256"], &["SHA-256"]),
        ("clrtxt", &["CLRTXT"], &["SHA-256", "MD5"]),
        ("bothhashes", &["MD5", "SHA-256"], &["SHA-256", "MD5"]),
    ] {
        let (device, body) = register(name);
        add_owner(&app, &device, stored).await;
        let challenges = first_challenges(&app, &device, &body).await;
        assert_eq!(
            algorithms_of(&challenges),
            offered,
            "{name}: {challenges:?}"
        );
    }
    let (stranger, body) = register("nobody");
    let challenges = first_challenges(&app, &stranger, &body).await;
    assert_eq!(algorithms_of(&challenges), ["SHA-256", "MD5"], "no account");
    app.stop().await;
}

#[tokio::test]
async fn a_clear_password_client_taking_the_first_challenge_registers_on_an_md5_account() {
    // belle-sip holds the clear password, answers the first challenge, and is
    // challenged on every request (it never reuses a nonce).
    for backend in [Backend::Sqlite, Backend::Mariadb] {
        let app = digest_app(backend, |_| {}).await;
        let (device, body) = register("belle");
        let (user, password) = add_owner(&app, &device, &["MD5"]).await;
        let client = app
            .client
            .with_digest_challenged_each_time(&user, &password, None);
        let answer = client
            .post(&app.base_url, &x3dh_headers(&device), body)
            .await
            .unwrap();
        assert_registered(&answer, &format!("{backend:?}"));
        let again = RequestMessage {
            curve: CURVE,
            request: Request::GetSelfOneTimePreKeys,
        };
        let answer = client.send(&app.base_url, &device, &again).await.unwrap();
        assert!(
            matches!(&answer.response, Response::SelfOneTimePreKeys(ids) if ids.len() == 3),
            "{backend:?}: {answer:?}"
        );
        app.stop().await;
    }
}

/// A client holding the clear password answers SHA-256 when offered it (belle-sip
/// does); an MD5-only account cannot check that answer. Offered every algorithm
/// (no lookup before challenging, nothing kept), the answer tests no password:
/// it is challenged again with MD5 only and never counted, however often, while
/// a wrong MD5 password and an unknown user still count as before.
#[tokio::test]
async fn an_answer_in_an_algorithm_the_account_does_not_store_is_never_a_failure() {
    let app = digest_app(Backend::Sqlite, |settings| {
        settings.auth.digest.challenge_lookups_per_sec = 0;
        settings.auth.digest.accounts_cache_secs = 0;
        let throttle = &mut settings.auth.throttle;
        throttle.max_failures_per_user = 3;
        throttle.lockout_secs = 300;
        throttle.delay_step_ms = 0;
    })
    .await;
    let (device, body) = register("md5holder");
    let (user, password) = add_owner(&app, &device, &["MD5"]).await;
    let mut last = None;
    for attempt in 1..=8 {
        let challenges = first_challenges(&app, &device, &body).await;
        assert_eq!(algorithms_of(&challenges), ["SHA-256", "MD5"], "#{attempt}");
        let sha256 = answer_challenge(&challenges[0], &user, &password, |_| {});
        let answer = post_with(&app, &device, &body, &sha256).await;
        assert_eq!(answer.status, 401, "SHA-256 answer #{attempt}: {answer:?}");
        assert_eq!(
            algorithms_of(&answer.www_authenticate),
            ["MD5"],
            "challenged again with what the account stores, #{attempt}"
        );
        last = Some(answer.www_authenticate);
    }
    let md5 = answer_challenge(&last.unwrap()[0], &user, &password, |_| {});
    let answer = post_with(&app, &device, &body, &md5).await;
    assert_registered(&answer, "the MD5 answer after 8 SHA-256 ones");

    // A wrong password in the algorithm the account stores counts as before.
    let (device, body) = register("md5guessed");
    let (user, password) = add_owner(&app, &device, &["MD5"]).await;
    for attempt in 1..=3 {
        let challenges = first_challenges(&app, &device, &body).await;
        let guess = answer_challenge(&challenges[1], &user, &format!("guess {attempt}"), |_| {});
        let answer = post_with(&app, &device, &body, &guess).await;
        assert_eq!(answer.status, 401, "wrong MD5 password #{attempt}");
    }
    let challenges = first_challenges(&app, &device, &body).await;
    let right = answer_challenge(&challenges[1], &user, &password, |_| {});
    let answer = post_with(&app, &device, &body, &right).await;
    assert_eq!(answer.status, 429, "locked out after 3 wrong MD5 passwords");

    // An unknown user's SHA-256 answer counts as before, challenged with every
    // algorithm.
    let (device, body) = register("md5nobody");
    let (user, _) = user_and_domain(&device);
    for attempt in 1..=3 {
        let challenges = first_challenges(&app, &device, &body).await;
        let guess = answer_challenge(&challenges[0], &user, "anything", |_| {});
        let answer = post_with(&app, &device, &body, &guess).await;
        assert_eq!(answer.status, 401, "unknown user #{attempt}");
        assert_eq!(algorithms_of(&answer.www_authenticate), ["SHA-256", "MD5"]);
    }
    let challenges = first_challenges(&app, &device, &body).await;
    let again = answer_challenge(&challenges[0], &user, "anything", |_| {});
    let answer = post_with(&app, &device, &body, &again).await;
    assert_eq!(answer.status, 429, "an unknown user locked out after 3");
    app.stop().await;
}

/// An account database on PostgreSQL whose query records each lookup in a table
/// `lookups`, and the query to configure.
async fn counting_accounts() -> (AccountsFixture, String) {
    let accounts = AccountsFixture::create(Backend::Postgres).await;
    accounts
        .execute(
            "CREATE TABLE lookups (username TEXT NOT NULL);
             CREATE FUNCTION counted(name TEXT) RETURNS INTEGER LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO lookups VALUES (name); RETURN 1; END $$;",
        )
        .await;
    let query = "SELECT passwords.password, passwords.algorithm, accounts.username \
                 FROM counted(:username) AS counted, accounts \
                 JOIN passwords ON passwords.account_id = accounts.id \
                 WHERE accounts.username = :username AND accounts.domain = :domain";
    (accounts, query.to_owned())
}

/// Lookups the counting query recorded for `user` (all users but the start-up
/// check when `None`).
async fn lookups(accounts: &AccountsFixture, user: Option<&str>) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&accounts.url).await.unwrap();
    let (count,): (i64,) = match user {
        Some(user) => sqlx::query_as("SELECT count(*) FROM lookups WHERE username = $1")
            .bind(user)
            .fetch_one(&mut conn)
            .await
            .unwrap(),
        None => {
            sqlx::query_as("SELECT count(*) FROM lookups WHERE username NOT LIKE 'lime-server:%'")
                .fetch_one(&mut conn)
                .await
                .unwrap()
        }
    };
    count
}

/// A server whose account database counts its lookups, and an account with
/// only an MD5 row, with the registration a device of it sends.
struct CountedAccount {
    accounts: AccountsFixture,
    app: TestApp,
    device: String,
    body: Vec<u8>,
    user: String,
    password: String,
}

async fn md5_account_with_counted_lookups(name: &str) -> CountedAccount {
    let (accounts, query) = counting_accounts().await;
    let url = accounts.url.clone();
    let app = digest_app(Backend::Postgres, move |settings| {
        settings.auth.digest.accounts_url = Some(url);
        settings.auth.digest.accounts_query = query;
    })
    .await;
    let (device, body) = register(name);
    let (user, domain) = user_and_domain(&device);
    let password = password_of(&user);
    accounts
        .add_account(&user, &domain, &password, &["MD5"])
        .await;
    CountedAccount {
        accounts,
        app,
        device,
        body,
        user,
        password,
    }
}

#[tokio::test]
async fn challenges_for_one_user_cost_one_account_lookup() {
    let CountedAccount {
        accounts,
        app,
        device,
        body,
        user,
        password,
    } = md5_account_with_counted_lookups("counted").await;
    for request in 1..=10 {
        let challenges = first_challenges(&app, &device, &body).await;
        assert_eq!(algorithms_of(&challenges), ["MD5"], "request #{request}");
    }
    assert_eq!(
        lookups(&accounts, Some(&user)).await,
        1,
        "10 challenges, one lookup"
    );
    // The authenticated request that follows uses what the challenge looked up.
    let client = app.client.with_digest(&user, &password, None);
    let answer = client
        .post(&app.base_url, &x3dh_headers(&device), body)
        .await
        .unwrap();
    assert_registered(&answer, "answering the MD5 challenge");
    assert_eq!(lookups(&accounts, Some(&user)).await, 1, "and no more");
    app.stop().await;
}

/// Answers in an algorithm the account does not store are not counted, so they
/// must not cost a query each: the kept passwords, which cannot check them, are
/// not looked up again.
#[tokio::test]
async fn answers_in_an_algorithm_not_stored_use_the_kept_passwords() {
    let CountedAccount {
        accounts,
        app,
        device,
        body,
        user,
        password,
    } = md5_account_with_counted_lookups("keptmd5").await;
    for attempt in 1..=10 {
        let challenges = first_challenges(&app, &device, &body).await;
        assert_eq!(algorithms_of(&challenges), ["MD5"], "#{attempt}");
        // A client answering SHA-256 whatever it is offered.
        let sha256 = answer_challenge(&challenges[0], &user, &password, |prompt| {
            prompt.algorithm =
                digest_auth::Algorithm::new(digest_auth::AlgorithmType::SHA2_256, false);
        });
        let answer = post_with(&app, &device, &body, &sha256).await;
        assert_eq!(answer.status, 401, "SHA-256 answer #{attempt}: {answer:?}");
        assert_eq!(algorithms_of(&answer.www_authenticate), ["MD5"]);
    }
    assert_eq!(
        lookups(&accounts, Some(&user)).await,
        1,
        "a challenge and 10 SHA-256 answers, one lookup"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_stranger_cycling_usernames_causes_at_most_the_lookup_bound() {
    let (accounts, query) = counting_accounts().await;
    let url = accounts.url.clone();
    let app = digest_app(Backend::Postgres, move |settings| {
        settings.auth.digest.accounts_url = Some(url);
        settings.auth.digest.accounts_query = query;
        settings.auth.digest.challenge_lookups_per_sec = 5;
    })
    .await;
    let started = std::time::Instant::now();
    for index in 0..60 {
        let (device, body) = register(&format!("cycle{index}"));
        let challenges = first_challenges(&app, &device, &body).await;
        assert_eq!(algorithms_of(&challenges), ["SHA-256", "MD5"]);
    }
    let seconds = started.elapsed().as_secs_f64();
    let made = lookups(&accounts, None).await;
    let bound = 5 + (5.0 * seconds).ceil() as i64;
    assert!(
        made <= bound,
        "{made} lookups in {seconds:.2} s for 60 names, bound {bound}"
    );
    assert!(made >= 5, "the first ones are looked up: {made}");
    app.stop().await;
}

// --- Client certificates beside digest ---------------------------------------------

/// A server with digest (accounts on SQLite) and optional client certificates of `pki`.
async fn both_methods(pki: &TestPki) -> TestApp {
    let (ca, crl) = (pki.ca_file(), pki.crl_file());
    digest_app(Backend::Sqlite, move |settings| {
        let certificates = &mut settings.auth.client_certificates;
        certificates.ca_file = Some(ca);
        certificates.crl_files = vec![crl];
        certificates.required = false;
    })
    .await
}

fn presenting(app: &TestApp, certificate: &common::pki::IssuedCertificate) -> LimeClient {
    LimeClient::with_client_certificate(
        &app.certificate_file(),
        &certificate.certificate,
        &certificate.private_key,
    )
    .unwrap()
}

#[tokio::test]
async fn without_a_certificate_digest_applies() {
    let pki = TestPki::new();
    let app = both_methods(&pki).await;
    let (device, body) = register("nocert");
    let first = app.post_raw(&x3dh_headers(&device), body.clone()).await;
    assert_eq!(
        first.status, 401,
        "no certificate, no credentials: challenged"
    );
    let client = app.client_for(&device).await;
    let answer = client
        .post(&app.base_url, &x3dh_headers(&device), body)
        .await
        .unwrap();
    assert_registered(&answer, "digest without a certificate");
    app.stop().await;
}

#[tokio::test]
async fn a_certificate_owning_the_device_needs_no_digest() {
    let pki = TestPki::new();
    let app = both_methods(&pki).await;
    let (device, body) = register("cert");
    let (user, domain) = user_and_domain(&device);
    let certificate = pki.issue(&[&format!("sip:{user}@{domain}")], &[], "cert");
    let answer = presenting(&app, &certificate)
        .post(&app.base_url, &x3dh_headers(&device), body)
        .await
        .unwrap();
    assert_registered(&answer, "certificate only");
    app.stop().await;
}

#[tokio::test]
async fn a_certificate_of_another_identity_is_refused_without_digest_fallback() {
    let pki = TestPki::new();
    let app = both_methods(&pki).await;
    let (device, body) = register("mismatch");
    let (user, password) = add_owner(&app, &device, &["MD5", "SHA-256"]).await;
    let certificate = pki.issue(&["sip:somebody-else@example.org"], &[], "somebody-else");
    // Right digest credentials too: the certificate's identity decides.
    let client = presenting(&app, &certificate).with_digest(&user, &password, None);
    let answer = client
        .post(&app.base_url, &x3dh_headers(&device), body)
        .await
        .unwrap();
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(
        answer.www_authenticate.is_empty(),
        "no digest challenge offered"
    );
    assert!(!is_registered(&app, &device).await);
    app.stop().await;
}

#[tokio::test]
async fn revoked_or_foreign_certificates_are_refused_at_the_handshake() {
    let pki = TestPki::new();
    let (device, body) = register("revoked");
    let (user, domain) = user_and_domain(&device);
    let owner = format!("sip:{user}@{domain}");
    let revoked = pki.issue(&[&owner], &[], "revoked");
    // The CRL is read when the server starts.
    pki.revoke(&revoked);
    let foreign = pki.issue_by_other_ca(&[&owner], "foreign");
    let app = both_methods(&pki).await;
    for (what, certificate) in [("revoked", &revoked), ("other CA", &foreign)] {
        let result = presenting(&app, certificate)
            .post(&app.base_url, &x3dh_headers(&device), body.clone())
            .await;
        assert!(
            result.is_err(),
            "{what} certificate: the handshake must fail, got {result:?}"
        );
    }
    assert!(!is_registered(&app, &device).await);
    app.stop().await;
}

// --- Behind a reverse proxy --------------------------------------------------------

/// A plain-HTTP server with digest, believing proxy headers from `trusted`.
async fn behind_proxy(trusted: &str) -> TestApp {
    let trusted = trusted.to_owned();
    digest_app(Backend::Sqlite, move |settings| {
        settings.server.listen = Vec::new();
        settings.server.plain_http_listen = vec!["127.0.0.1:0".parse().unwrap()];
        settings.auth.proxy.trusted = vec![trusted];
    })
    .await
}

/// What a proxy adds for a client certificate it verified.
fn proxy_headers<'a>(
    device: &'a str,
    verify: &'a str,
    certificate: &'a str,
) -> Vec<(&'a str, &'a str)> {
    let mut headers = x3dh_headers(device).to_vec();
    headers.push(("x-ssl-client-verify", verify));
    headers.push(("x-ssl-client-cert", certificate));
    headers.push(("x-forwarded-for", "198.51.100.7"));
    headers
}

/// The PEM of an issued certificate, URL-escaped as nginx's `$ssl_client_escaped_cert`.
fn escaped_pem(certificate: &common::pki::IssuedCertificate) -> String {
    let pem = std::fs::read_to_string(&certificate.certificate).unwrap();
    percent_encoding::utf8_percent_encode(&pem, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn a_trusted_proxy_vouches_for_a_certificate() {
    let app = behind_proxy("127.0.0.0/8").await;
    let pki = TestPki::new();
    let (device, body) = register("proxied");
    let (user, domain) = user_and_domain(&device);
    let certificate = escaped_pem(&pki.issue(&[&format!("sip:{user}@{domain}")], &[], "p"));
    let answer = app
        .post_raw(
            &proxy_headers(&device, "SUCCESS", &certificate),
            body.clone(),
        )
        .await;
    assert_registered(&answer, "proxy-verified certificate");

    let other = escaped_pem(&pki.issue(&["sip:other@example.org"], &[], "o"));
    let answer = app
        .post_raw(&proxy_headers(&device, "SUCCESS", &other), body.clone())
        .await;
    assert_eq!(
        answer.status, 403,
        "certificate of another identity: {answer:?}"
    );
    let answer = app
        .post_raw(
            &proxy_headers(&device, "FAILED:certificate revoked", &certificate),
            body.clone(),
        )
        .await;
    assert_eq!(answer.status, 403, "the proxy refused it: {answer:?}");
    let answer = app.post_raw(&x3dh_headers(&device), body).await;
    assert_eq!(answer.status, 401, "no certificate: digest applies");
    app.stop().await;
}

#[tokio::test]
async fn proxy_headers_from_an_untrusted_address_are_ignored() {
    let app = behind_proxy("192.0.2.1").await;
    let pki = TestPki::new();
    let (device, body) = register("spoofed");
    let (user, domain) = user_and_domain(&device);
    let certificate = escaped_pem(&pki.issue(&[&format!("sip:{user}@{domain}")], &[], "s"));
    let answer = app
        .post_raw(&proxy_headers(&device, "SUCCESS", &certificate), body)
        .await;
    assert_eq!(
        answer.status, 401,
        "headers from a client that is not the proxy must not authenticate: {answer:?}"
    );
    assert!(!is_registered(&app, &device).await);
    app.stop().await;
}

/// Behind a proxy that appends (HAProxy `add-header`, Apache `RequestHeader add`),
/// a client's own verdict comes first and the proxy's after it: with two verdicts
/// nobody can tell which the proxy wrote, so the request is refused.
#[tokio::test]
async fn two_verdict_headers_are_refused() {
    let app = behind_proxy("127.0.0.0/8").await;
    let pki = TestPki::new();
    let (device, body) = register("two-verdicts");
    let (user, domain) = user_and_domain(&device);
    // Someone's certificate is public: a client may paste it into its own headers.
    let victims = escaped_pem(&pki.issue(&[&format!("sip:{user}@{domain}")], &[], "v"));
    let mut headers = x3dh_headers(&device).to_vec();
    headers.push(("x-ssl-client-verify", "SUCCESS"));
    headers.push(("x-ssl-client-cert", &victims));
    // What the proxy appends: the client presented no certificate.
    headers.push(("x-ssl-client-verify", "NONE"));
    headers.push(("x-forwarded-for", "198.51.100.7"));

    let answer = app.post_raw(&headers, body).await;

    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(!is_registered(&app, &device).await);
    app.stop().await;
}

/// The proxy sets its verdict but appends the certificate: the client's pasted
/// certificate comes first, the one it really presented after.
#[tokio::test]
async fn two_certificate_headers_are_refused() {
    let app = behind_proxy("127.0.0.0/8").await;
    let pki = TestPki::new();
    let (device, body) = register("two-certificates");
    let (user, domain) = user_and_domain(&device);
    let victims = escaped_pem(&pki.issue(&[&format!("sip:{user}@{domain}")], &[], "v"));
    let own = escaped_pem(&pki.issue(&["sip:mallory@example.org"], &[], "m"));
    let mut headers = x3dh_headers(&device).to_vec();
    headers.push(("x-ssl-client-cert", &victims));
    headers.push(("x-ssl-client-verify", "SUCCESS"));
    headers.push(("x-ssl-client-cert", &own));
    headers.push(("x-forwarded-for", "198.51.100.7"));

    let answer = app.post_raw(&headers, body.clone()).await;
    assert_eq!(answer.status, 403, "two header lines: {answer:?}");

    // Apache's `RequestHeader append` joins them into one line instead.
    let joined = format!("{victims}, {own}");
    let mut headers = x3dh_headers(&device).to_vec();
    headers.push(("x-ssl-client-verify", "SUCCESS"));
    headers.push(("x-ssl-client-cert", &joined));
    let answer = app.post_raw(&headers, body).await;
    assert_eq!(
        answer.status, 403,
        "two certificates in one line: {answer:?}"
    );

    assert!(!is_registered(&app, &device).await);
    app.stop().await;
}

/// The proxy appends the address it saw to whatever the client sent, as a last
/// entry or a last header line: failures are counted against that address, so a
/// client can neither spread its failures over made-up addresses nor pin them on
/// someone else's.
#[tokio::test]
async fn client_address_is_the_last_forwarded_for_entry() {
    let app = digest_app(Backend::Sqlite, |settings| {
        settings.server.listen = Vec::new();
        settings.server.plain_http_listen = vec!["127.0.0.1:0".parse().unwrap()];
        settings.auth.proxy.trusted = vec!["127.0.0.0/8".into()];
        let throttle = &mut settings.auth.throttle;
        throttle.max_failures_per_user = 0;
        throttle.max_failures_per_address = 2;
        throttle.lockout_secs = 60;
        throttle.delay_step_ms = 0;
    })
    .await;
    let (device, body) = register("forwarded");
    let (user, password) = add_owner(&app, &device, &["MD5", "SHA-256"]).await;
    let attacker = "198.51.100.7";
    for attempt in 1..=2 {
        // A forged first line, then the line the proxy appended.
        let forged = format!("203.0.113.{attempt}");
        let mut headers = x3dh_headers(&device).to_vec();
        headers.push(("x-forwarded-for", &forged));
        headers.push(("x-forwarded-for", attacker));
        let guess = app.client.with_digest(&user, "a guess", None);
        let answer = guess
            .post(&app.base_url, &headers, body.clone())
            .await
            .unwrap();
        assert_eq!(answer.status, 401, "wrong password #{attempt}: {answer:?}");
    }

    // The attacker's address is locked out, whatever first line it sends...
    let mut headers = x3dh_headers(&device).to_vec();
    headers.push(("x-forwarded-for", "192.0.2.99, 203.0.113.50"));
    let last_line = format!("192.0.2.98, {attacker}");
    headers.push(("x-forwarded-for", &last_line));
    let owner = app.client.with_digest(&user, &password, None);
    let answer = owner
        .post(&app.base_url, &headers, body.clone())
        .await
        .unwrap();
    assert_eq!(
        answer.status, 429,
        "from the locked-out address: {answer:?}"
    );

    // ...and the addresses it named in its first lines are not.
    let mut headers = x3dh_headers(&device).to_vec();
    headers.push(("x-forwarded-for", "203.0.113.1"));
    let answer = owner.post(&app.base_url, &headers, body).await.unwrap();
    assert_registered(&answer, "from an address the attacker only named");
    app.stop().await;
}

// --- Which name of a certificate counts ---------------------------------------------

/// RFC 6125: a certificate that names someone in its subjectAltName is theirs; its
/// common name counts only when it has no subjectAltName identity at all.
#[tokio::test]
async fn common_name_is_ignored_when_the_san_names_someone_else() {
    let pki = TestPki::new();
    let app = both_methods(&pki).await;
    let (device, body) = register("cn-victim");
    let (user, domain) = user_and_domain(&device);
    let certificate = pki.issue(
        &["sip:mallory@example.org"],
        &[],
        &format!("sip:{user}@{domain}"),
    );

    let answer = presenting(&app, &certificate)
        .post(&app.base_url, &x3dh_headers(&device), body)
        .await
        .unwrap();

    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(!is_registered(&app, &device).await);
    app.stop().await;
}

/// The same rule for a certificate a trusted proxy verified.
#[tokio::test]
async fn proxy_verified_common_name_is_ignored_when_the_san_names_someone_else() {
    let app = behind_proxy("127.0.0.0/8").await;
    let pki = TestPki::new();
    let (device, body) = register("proxied-cn-victim");
    let (user, domain) = user_and_domain(&device);
    let certificate = escaped_pem(&pki.issue(
        &["sip:mallory@example.org"],
        &[],
        &format!("{user}@{domain}"),
    ));

    let answer = app
        .post_raw(&proxy_headers(&device, "SUCCESS", &certificate), body)
        .await;

    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(!is_registered(&app, &device).await);
    app.stop().await;
}

/// A certificate without subjectAltName still names its owner in its common name.
#[tokio::test]
async fn a_common_name_alone_names_the_owner() {
    let pki = TestPki::new();
    let app = both_methods(&pki).await;
    let (device, body) = register("cn-only");
    let (user, domain) = user_and_domain(&device);
    let certificate = pki.issue(&[], &[], &format!("sip:{user}@{domain}"));

    let answer = presenting(&app, &certificate)
        .post(&app.base_url, &x3dh_headers(&device), body)
        .await
        .unwrap();

    assert_registered(&answer, "identity in the common name only");
    app.stop().await;
}

/// `auth.client_certificates.identity = "san_or_cn"`, the PHP server's rule, lets
/// the common name count beside a subjectAltName: for TLS client certificates and
/// proxy-verified ones alike.
#[tokio::test]
async fn looser_rule_is_an_explicit_option() {
    let pki = TestPki::new();
    let (ca, crl) = (pki.ca_file(), pki.crl_file());
    let app = digest_app(Backend::Sqlite, move |settings| {
        let certificates = &mut settings.auth.client_certificates;
        certificates.ca_file = Some(ca);
        certificates.crl_files = vec![crl];
        certificates.identity =
            toml::from_str::<Settings>("[auth.client_certificates]\nidentity = \"san_or_cn\"\n")
                .unwrap()
                .auth
                .client_certificates
                .identity;
    })
    .await;
    let (device, body) = register("cn-looser");
    let (user, domain) = user_and_domain(&device);
    let certificate = pki.issue(
        &["sip:bob@example.org"],
        &[],
        &format!("sip:{user}@{domain}"),
    );
    let answer = presenting(&app, &certificate)
        .post(&app.base_url, &x3dh_headers(&device), body)
        .await
        .unwrap();
    assert_registered(&answer, "common name under san_or_cn");
    app.stop().await;

    let app = digest_app(Backend::Sqlite, |settings| {
        settings.server.listen = Vec::new();
        settings.server.plain_http_listen = vec!["127.0.0.1:0".parse().unwrap()];
        settings.auth.proxy.trusted = vec!["127.0.0.0/8".into()];
        settings.auth.client_certificates.identity =
            lime_server::auth::certificate::IdentityRule::SanOrCn;
    })
    .await;
    let (device, body) = register("proxied-cn-looser");
    let (user, domain) = user_and_domain(&device);
    let certificate =
        escaped_pem(&pki.issue(&["sip:bob@example.org"], &[], &format!("{user}@{domain}")));
    let answer = app
        .post_raw(&proxy_headers(&device, "SUCCESS", &certificate), body)
        .await;
    assert_registered(&answer, "proxy-verified common name under san_or_cn");
    app.stop().await;
}

// --- Account names spelt another way -------------------------------------------------

/// On MariaDB's case- and accent-insensitive collations, `ALICE`, `alicé` and
/// `alice ` find alice's row; with alice's password they would act as identities of
/// their own (`sip:ALICE@...`), each with its own devices, past the devices-per-user
/// limit. Only the account's own spelling is let in.
#[tokio::test]
async fn username_in_another_case_is_refused() {
    let app = digest_app(Backend::Mariadb, |settings| {
        settings.auth.throttle.delay_step_ms = 0;
    })
    .await;
    let (device, body) = register("alice");
    let (user, password) = add_owner(&app, &device, &["CLRTXT"]).await;
    let accented = user.replacen("alice", "alicé", 1);
    let trailing_space = format!("{user} ");
    for spelling in [user.to_uppercase(), accented, trailing_space] {
        let other_device = device.replacen(&user, &spelling, 1);
        let client = app.client.with_digest(&spelling, &password, None);
        let answer = client
            .post(&app.base_url, &x3dh_headers(&other_device), body.clone())
            .await
            .unwrap();
        assert_eq!(answer.status, 401, "{spelling:?}: {answer:?}");
        assert!(
            !is_registered(&app, &other_device).await,
            "{spelling:?} registered a device of its own"
        );
    }

    let client = app.client.with_digest(&user, &password, None);
    let answer = client
        .post(&app.base_url, &x3dh_headers(&device), body)
        .await
        .unwrap();
    assert_registered(&answer, "the account's own spelling");
    app.stop().await;
}

/// Without `auth.realm`, the realm is the device id's domain: `EXAMPLE.ORG` is no
/// second namespace either.
#[tokio::test]
async fn domain_in_another_case_is_refused() {
    let app = digest_app(Backend::Mariadb, |settings| {
        settings.auth.throttle.delay_step_ms = 0;
    })
    .await;
    let (device, body) = register("domain-case");
    let (user, password) = add_owner(&app, &device, &["CLRTXT"]).await;
    let other_device = device.replacen("@example.org;", "@EXAMPLE.ORG;", 1);
    let client = app.client.with_digest(&user, &password, None);

    let answer = client
        .post(&app.base_url, &x3dh_headers(&other_device), body)
        .await
        .unwrap();

    assert_eq!(answer.status, 401, "{answer:?}");
    assert!(!is_registered(&app, &other_device).await);
    app.stop().await;
}
