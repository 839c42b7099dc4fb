//! Drop-in on a PHP lime-server database: a MariaDB database made with the
//! original's schema script and filled the way the PHP server fills it is served
//! by our server as it is, takes new registrations and uploads, and after
//! `lime-server db migrate` still answers the original's own queries.

mod common;

use common::backend::{Backend, TestDatabase};
use common::process::{BIN, ServerProcess};
use common::{device_id, id, one_time_pre_key, php, random_bytes, registration, signed_pre_key};
use lime_protocol::{Curve, MessageType, Request, RequestMessage, Response};
use lime_server::client::LimeClient;
use sqlx::{Connection, MySqlConnection, Row};

const CURVE: Curve = Curve::C25519;

/// Runs `lime-server ARGS...`; its standard output, or a panic with its error.
fn lime_server(args: &[&str]) -> String {
    let output = std::process::Command::new(BIN).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "lime-server {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_php_servers_database_is_served_as_it_is_and_stays_usable_by_it_after_migrate() {
    let database = TestDatabase::empty(Backend::Mariadb).await;
    let mut php_side = MySqlConnection::connect(&database.url).await.unwrap();
    php::create_schema(&mut php_side).await;

    // What the PHP server left: a device with its keys and three OPks.
    let alice = device_id("alice");
    let identity_key = random_bytes(CURVE.identity_key_len());
    let spk = signed_pre_key(CURVE, 7);
    let opks: Vec<_> = (21..24)
        .map(|opk_id| one_time_pre_key(CURVE, opk_id))
        .collect();
    let opk_rows: Vec<(&[u8], u32)> = opks.iter().map(|key| (key.public(), key.id())).collect();
    php::register_device(
        &mut php_side,
        &alice,
        &identity_key,
        (spk.public(), spk.signature(), spk.id()),
        &opk_rows,
    )
    .await;

    let data_dir = tempfile::tempdir().unwrap();
    let config = data_dir.path().join("lime-server.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ncurves = [\"c25519\"]\nurl = \"{}\"\ndata_dir = \"{}\"\n",
            database.url,
            data_dir.path().display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let server = ServerProcess::start(&[
        "--config",
        config,
        "--plain-http",
        "--listen",
        "127.0.0.1:0",
    ]);
    let url = format!("http://{}/lime-server/lime-server.php", server.addr);
    let client = LimeClient::plain().unwrap();
    let ask = |sender: String, request: Request| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let message = RequestMessage {
                curve: CURVE,
                request,
            };
            client.send(&url, &sender, &message).await.unwrap().response
        }
    };

    // The PHP-written bundle, with one of its OPks, for a device registered as
    // liblime registers before it fetches (it stays registered for what follows).
    let asker = "sip:asker@example.org;gr=1";
    let registered = ask(
        asker.into(),
        Request::RegisterUser(registration(CURVE, 0, 1)),
    )
    .await;
    assert_eq!(registered, Response::Done(MessageType::RegisterUser));
    let answer = ask(asker.into(), Request::GetPeerBundle(vec![id(&alice)])).await;
    let Response::PeerBundles(bundles) = answer else {
        panic!("expected a peerBundle, got {answer:?}");
    };
    let bundle = bundles[0].bundle.as_ref().expect("alice's bundle");
    assert_eq!(bundle.identity_key.as_bytes(), identity_key);
    assert_eq!(bundle.signed_pre_key, spk);
    let served = bundle.one_time_pre_key.as_ref().expect("an OPk");
    assert!(opks.contains(served), "an OPk the PHP server stored");
    let left = ask(alice.clone(), Request::GetSelfOneTimePreKeys).await;
    let Response::SelfOneTimePreKeys(mut left) = left else {
        panic!("{left:?}")
    };
    left.sort();
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&served.id()));

    // New registrations and uploads land in the same tables.
    let bob = device_id("bob");
    let answer = ask(
        bob.clone(),
        Request::RegisterUser(registration(CURVE, 2, 1)),
    )
    .await;
    assert_eq!(answer, Response::Done(MessageType::RegisterUser));
    let answer = ask(
        alice.clone(),
        Request::PostOneTimePreKeys(vec![one_time_pre_key(CURVE, 30)]),
    )
    .await;
    assert_eq!(answer, Response::Done(MessageType::PostOneTimePreKeys));
    let opk_rows: i64 = sqlx::query("SELECT COUNT(*) FROM OPk")
        .fetch_one(&mut php_side)
        .await
        .unwrap()
        .get(0);
    assert_eq!(opk_rows, 2 + 1 + 2, "alice's 2 left + 1 new, bob's 2");
    drop(server);

    // db migrate only adds: the original's query still works, then nothing is left to do.
    let migrated = lime_server(&["--config", config, "db", "migrate"]);
    assert!(migrated.contains("added"), "{migrated}");
    let row = sqlx::query(php::BUNDLE_QUERY)
        .bind(&bob)
        .fetch_one(&mut php_side)
        .await
        .unwrap();
    assert_eq!(row.get::<Vec<u8>, _>("Ik").len(), CURVE.identity_key_len());
    assert_eq!(
        row.get::<Option<u32>, _>("OPk_id").map(|id| id >= 1),
        Some(true)
    );
    let version: i64 = sqlx::query("SELECT Value FROM Config WHERE Name = 'version'")
        .fetch_one(&mut php_side)
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 1, "the original's version row is left as it is");
    let again = lime_server(&["--config", config, "db", "migrate"]);
    assert!(!again.contains("added"), "{again}");

    // And our server serves the migrated database.
    let server = ServerProcess::start(&[
        "--config",
        config,
        "--plain-http",
        "--listen",
        "127.0.0.1:0",
    ]);
    let url = format!("http://{}/", server.addr);
    let message = RequestMessage {
        curve: CURVE,
        request: Request::GetPeerBundle(vec![id(&bob)]),
    };
    let answer = client
        .send(&url, "sip:asker@example.org;gr=1", &message)
        .await
        .unwrap();
    let Response::PeerBundles(bundles) = answer.response else {
        panic!("expected a peerBundle")
    };
    assert_eq!(bundles[0].flag(), 1);
}
