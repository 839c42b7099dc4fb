//! The peer servers allowed to ask for our users' bundles
//! (`[[federation.accept_from]]`), and how a request is recognised as theirs.
//!
//! A request whose device id is not of a domain we serve can only be a peer's:
//! the authenticator ([`crate::auth`]) sends it here instead of to the user
//! account database. The peer proves itself with digest (user name: its domain
//! by default, realm: ours, SHA-256, the HA1 we gave it) or with a client
//! certificate whose name is the configured `certificate_identity`, and may act
//! only for device ids of its own domains.

use crate::auth::certificate::{CertificateIdentity, IdentityRule, as_identity};
use crate::auth::digest::NonceKey;
use crate::config::{AuthSettings, FederationSettings};
use anyhow::Result;
use lime_protocol::DeviceId;
use std::sync::Arc;
use std::time::Duration;

/// One accepted peer.
#[derive(Debug)]
pub struct AcceptedPeer {
    /// Its domains joined, for log lines and [`crate::auth::Sender`].
    pub name: Arc<str>,
    /// The domains it may act for.
    domains: Vec<String>,
    /// Its digest user name.
    username: String,
    /// The SHA-256 HA1 it logs in with, if digest.
    ha1: Option<String>,
    /// Its certificate's name, as an identity (`sip:` added), if certificates.
    certificate_identity: Option<String>,
}

impl AcceptedPeer {
    /// True when `device` is of one of its domains.
    pub fn acts_for(&self, device: &DeviceId) -> bool {
        super::is_of(&self.domains, device)
    }

    /// The SHA-256 HA1 it logs in with, if it uses digest.
    pub fn ha1(&self) -> Option<&str> {
        self.ha1.as_deref()
    }
}

/// The accepted peers, and what is needed to check them.
pub struct AcceptedPeers {
    /// The domains we serve: a device id of another domain is a peer's.
    served: Vec<String>,
    /// The realm peers log in to: `auth.realm`, else our first domain.
    realm: String,
    peers: Vec<Arc<AcceptedPeer>>,
    /// Nonces of the challenges to peers (the digest nonce secret).
    key: Option<NonceKey>,
}

impl AcceptedPeers {
    /// The inbound side of validated settings; `None` without `accept_from`.
    pub fn from_settings(
        settings: &FederationSettings,
        auth: &AuthSettings,
    ) -> Result<Option<AcceptedPeers>> {
        if settings.accept_from.is_empty() {
            return Ok(None);
        }
        let served = settings.served_domains(auth);
        let realm = auth
            .realm
            .clone()
            .or_else(|| served.first().cloned())
            .unwrap_or_default();
        let mut peers = Vec::new();
        let mut digest = false;
        for peer in &settings.accept_from {
            let ha1 = peer.digest_ha1()?;
            digest |= ha1.is_some();
            peers.push(Arc::new(AcceptedPeer {
                name: peer.domains.join(", ").into(),
                domains: peer.domains.clone(),
                username: peer
                    .username
                    .clone()
                    .unwrap_or_else(|| peer.domains[0].clone()),
                ha1,
                certificate_identity: peer.certificate_identity.as_deref().map(as_identity),
            }));
        }
        let key = if digest {
            Some(NonceKey::new(
                auth.digest.nonce_secret()?.as_bytes(),
                Duration::from_secs(auth.digest.nonce_lifetime_secs),
            ))
        } else {
            None
        };
        tracing::info!(
            peers = %peers.iter().map(|peer| peer.name.to_string()).collect::<Vec<_>>().join("; "),
            realm = %realm,
            "federation: peers may ask for bundles of our users"
        );
        Ok(Some(AcceptedPeers {
            served,
            realm,
            peers,
            key,
        }))
    }

    /// True when `device` is of a domain this server serves.
    pub fn serves(&self, device: &DeviceId) -> bool {
        super::is_of(&self.served, device)
    }

    /// The realm peers log in to.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The nonce key of peers' digest challenges, when a peer uses digest.
    pub fn nonce_key(&self) -> Option<&NonceKey> {
        self.key.as_ref()
    }

    /// The peer whose certificate this is, under `rule`.
    pub fn by_certificate(
        &self,
        certificate: &CertificateIdentity,
        rule: IdentityRule,
    ) -> Option<&Arc<AcceptedPeer>> {
        self.peers.iter().find(|peer| {
            peer.certificate_identity
                .as_deref()
                .is_some_and(|wanted| certificate.names(rule).any(|name| name == wanted))
        })
    }

    /// The peer that logs in with digest as `username`.
    pub fn by_username(&self, username: &str) -> Option<&Arc<AcceptedPeer>> {
        self.peers
            .iter()
            .find(|peer| peer.ha1.is_some() && peer.username == username)
    }
}
