//! Authentication in the test harness: which method a test server uses
//! (`LIME_TEST_AUTH`: `off`, `digest` or `certificate`), and clients that
//! authenticate as the owner of a device id, their account or certificate made on
//! first use.
//!
//! With `digest`, accounts live in a flexisip-account-manager-shaped database on
//! the test's backend (SQLite, MariaDB or PostgreSQL); with `certificate`, client
//! certificates are issued by a test CA and required by the server.

use super::accounts::AccountsFixture;
use super::backend::Backend;
use super::pki::TestPki;
use lime_server::client::LimeClient;
use lime_server::config::Settings;
use lime_server::tls::CertificateFiles;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// An authentication method of the test server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestAuth {
    /// Authentication off: any client acts for any device id.
    Off,
    /// HTTP Digest against an account database.
    Digest,
    /// Required TLS client certificates.
    Certificate,
}

impl TestAuth {
    /// The method `LIME_TEST_AUTH` names (off when unset).
    pub fn from_env() -> TestAuth {
        match std::env::var("LIME_TEST_AUTH").as_deref() {
            Err(_) | Ok("") | Ok("off") | Ok("none") => TestAuth::Off,
            Ok("digest") => TestAuth::Digest,
            Ok("certificate") => TestAuth::Certificate,
            Ok(other) => panic!("LIME_TEST_AUTH={other:?}: expected off, digest or certificate"),
        }
    }
}

/// The password every test account gets: derived from its user name.
pub fn password_of(username: &str) -> String {
    format!("pw-{username}")
}

/// `(user, domain)` of a device id `sip:user@domain;gr=...`.
pub fn user_and_domain(device_id: &str) -> (String, String) {
    let address = device_id
        .strip_prefix("sip:")
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("{device_id} is not a sip: GRUU"));
    let (user, domain) = address
        .rsplit_once('@')
        .unwrap_or_else(|| panic!("{device_id} has no user@domain"));
    (user.to_owned(), domain.to_owned())
}

/// The accounts or certificates behind a test server, and its clients by user.
pub struct AuthFixture {
    /// The method.
    pub mode: TestAuth,
    /// The account database, with digest.
    pub accounts: Option<AccountsFixture>,
    /// The test CA, with certificates.
    pub pki: Option<TestPki>,
    /// A file holding the nonce secret, with digest.
    nonce_secret: PathBuf,
    /// The client without credentials, and the server certificate it trusts.
    plain: Option<(LimeClient, Option<CertificateFiles>)>,
    /// One client per `sip:user@domain`, made on first use and reused (as a
    /// Linphone client reuses its digest nonce).
    clients: tokio::sync::Mutex<HashMap<String, LimeClient>>,
}

impl AuthFixture {
    /// Makes the account database (on `backend`) or the CA that `mode` needs.
    pub async fn create(mode: TestAuth, backend: Backend, data_dir: &Path) -> AuthFixture {
        let nonce_secret = data_dir.join("nonce-secret");
        let (accounts, pki) = match mode {
            TestAuth::Off => (None, None),
            TestAuth::Digest => {
                std::fs::write(&nonce_secret, super::random_hex(32)).expect("nonce secret file");
                (Some(AccountsFixture::create(backend).await), None)
            }
            TestAuth::Certificate => (None, Some(TestPki::new())),
        };
        AuthFixture {
            mode,
            accounts,
            pki,
            nonce_secret,
            plain: None,
            clients: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Turns the method on in `settings`.
    pub fn configure(&self, settings: &mut Settings) {
        let auth = &mut settings.auth;
        if let Some(accounts) = &self.accounts {
            auth.digest.accounts_url = Some(accounts.url.clone());
            auth.digest.nonce_secret_file = Some(self.nonce_secret.clone());
        }
        if let Some(pki) = &self.pki {
            auth.client_certificates.ca_file = Some(pki.ca_file());
            auth.client_certificates.crl_files = vec![pki.crl_file()];
            auth.client_certificates.required = true;
        }
    }

    /// Records the server's plain client and certificate once it runs.
    pub fn serving(mut self, plain: LimeClient, certificate: Option<CertificateFiles>) -> Self {
        self.plain = Some((plain, certificate));
        self
    }

    /// A client authenticating as the owner of `device_id`.
    pub async fn client_for(&self, device_id: &str) -> LimeClient {
        let (plain, certificate) = self.plain.as_ref().expect("the server runs");
        if self.mode == TestAuth::Off {
            return plain.clone();
        }
        let (user, domain) = user_and_domain(device_id);
        let owner = format!("sip:{user}@{domain}");
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(&owner) {
            return client.clone();
        }
        let client = match self.mode {
            TestAuth::Off => unreachable!("handled above"),
            TestAuth::Digest => {
                let password = password_of(&user);
                self.accounts
                    .as_ref()
                    .expect("digest has accounts")
                    .add_account(&user, &domain, &password, &["MD5", "SHA-256"])
                    .await;
                plain.with_digest(&user, &password, None)
            }
            TestAuth::Certificate => {
                let issued = self.pki.as_ref().expect("certificates have a CA").issue(
                    &[&owner],
                    &[],
                    &format!("{user} (lime test)"),
                );
                let server = certificate
                    .as_ref()
                    .expect("client certificates need an HTTPS listener");
                LimeClient::with_client_certificate(
                    &server.certificate,
                    &issued.certificate,
                    &issued.private_key,
                )
                .expect("client presenting its certificate")
            }
        };
        clients.insert(owner, client.clone());
        client
    }
}
