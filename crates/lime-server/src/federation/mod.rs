//! Federation: key bundles of devices of other domains, fetched from those
//! domains' lime servers, and the peer servers allowed to fetch ours.
//!
//! **Outbound** ([`Federation`], [`forward`]): a getPeerBundle from one of our
//! clients is split by the domain of each asked device id. Devices of a domain
//! that `[[federation.forward_to]]` names are asked of that peer, one request per
//! peer holding all of its devices, all peers at once, each within
//! `federation.timeout_ms`; the rest come from our store as without federation.
//! A peer that fails (down, slow, refusing us, answering anything but exactly
//! the bundles asked) costs its own devices only: they get no bundle (flag 2).
//!
//! **Inbound** ([`inbound`]): a request whose device id is not of a domain we
//! serve must come from a peer of `[[federation.accept_from]]`, proven by digest
//! (its HA1) or by its client certificate, acting for a device of its own
//! domains. It may only ask for bundles, only of our domains' devices (never
//! forwarded again), and the bundle request limits count the device it acts
//! for, not the peer.

pub mod forward;
pub mod inbound;

use crate::config::{AuthSettings, FederationSettings};
use anyhow::Result;
use forward::ForwardPeer;
use lime_protocol::DeviceId;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The domain of a device id (`sip:user@DOMAIN;gr=...`), if it has that shape.
pub fn domain_of(device: &DeviceId) -> Option<&str> {
    crate::auth::identity::domain_of(device.as_str())
}

/// True when `device` is of one of `domains`.
pub fn is_of(domains: &[String], device: &DeviceId) -> bool {
    domain_of(device).is_some_and(|domain| domains.iter().any(|listed| listed == domain))
}

/// Federation as the service sees it: our domains, and the peers our clients'
/// requests are forwarded to.
pub struct Federation {
    /// Our domains, never forwarded.
    served: Vec<String>,
    /// The peers, each once.
    peers: Vec<Arc<ForwardPeer>>,
    /// Index into `peers` of each peer domain.
    by_domain: HashMap<String, usize>,
    /// `federation.timeout_ms`
    timeout: Duration,
}

/// Where each asked device of a request is answered from.
#[derive(Default)]
pub struct Plan {
    /// Positions (in the request) of the devices our store answers.
    pub local: Vec<usize>,
    /// For each peer asked: the peer, and the positions of its devices.
    pub forwarded: Vec<(Arc<ForwardPeer>, Vec<usize>)>,
}

impl Federation {
    /// From validated settings; `None` when no peer is configured either way.
    pub fn from_settings(
        settings: &FederationSettings,
        auth: &AuthSettings,
    ) -> Result<Option<Federation>> {
        if !settings.is_enabled() {
            return Ok(None);
        }
        let served = settings.served_domains(auth);
        let our_name = served.first().cloned().unwrap_or_default();
        let mut peers = Vec::new();
        let mut by_domain = HashMap::new();
        for peer in &settings.forward_to {
            for domain in &peer.domains {
                by_domain.insert(domain.clone(), peers.len());
            }
            peers.push(Arc::new(ForwardPeer::from_settings(peer, &our_name)?));
        }
        if !peers.is_empty() {
            tracing::info!(
                served = %served.join(", "),
                peers = %peers.iter().map(|peer| peer.name()).collect::<Vec<_>>().join("; "),
                "federation: bundle requests for peer domains are forwarded"
            );
        }
        Ok(Some(Federation {
            served,
            peers,
            by_domain,
            timeout: Duration::from_millis(settings.timeout_ms),
        }))
    }

    /// True when `device` is of a domain this server serves.
    pub fn serves(&self, device: &DeviceId) -> bool {
        is_of(&self.served, device)
    }

    /// True when requests for `device` go to a peer.
    pub fn has_peers(&self) -> bool {
        !self.peers.is_empty()
    }

    /// Longest wait for one peer's answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Splits the asked devices between our store and the peers, keeping the
    /// request's positions so the answer can be put back in its order.
    pub fn plan(&self, devices: &[DeviceId]) -> Plan {
        let mut plan = Plan::default();
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        for (position, device) in devices.iter().enumerate() {
            let peer = domain_of(device)
                .filter(|_| !self.serves(device))
                .and_then(|domain| self.by_domain.get(domain));
            match peer {
                Some(&peer) => groups.entry(peer).or_default().push(position),
                None => plan.local.push(position),
            }
        }
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by_key(|(peer, _)| *peer);
        plan.forwarded = groups
            .into_iter()
            .map(|(peer, positions)| (self.peers[peer].clone(), positions))
            .collect();
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ForwardPeerSettings, Settings};

    fn federation() -> Federation {
        let mut settings = Settings::default();
        settings.federation.domains = vec!["a.test".into()];
        for (domain, port) in [("b.test", 1), ("c.test", 2)] {
            settings.federation.forward_to.push(ForwardPeerSettings {
                domains: vec![domain.into()],
                url: format!("http://127.0.0.1:{port}/"),
                ..ForwardPeerSettings::default()
            });
        }
        Federation::from_settings(&settings.federation, &settings.auth)
            .unwrap()
            .unwrap()
    }

    fn ids(texts: &[&str]) -> Vec<DeviceId> {
        texts
            .iter()
            .map(|text| DeviceId::new(*text).unwrap())
            .collect()
    }

    #[test]
    fn devices_are_split_by_domain_keeping_their_positions() {
        let federation = federation();
        let plan = federation.plan(&ids(&[
            "sip:bob@b.test;gr=1",
            "sip:dave@a.test;gr=2",
            "sip:claire@c.test;gr=3",
            "sip:eve@unknown.test;gr=4",
            "sip:bob@b.test;gr=5",
            "not-a-gruu",
        ]));
        assert_eq!(plan.local, vec![1, 3, 5]);
        let forwarded: Vec<(String, Vec<usize>)> = plan
            .forwarded
            .iter()
            .map(|(peer, positions)| (peer.name().to_owned(), positions.clone()))
            .collect();
        assert_eq!(
            forwarded,
            vec![
                ("b.test".to_owned(), vec![0, 4]),
                ("c.test".to_owned(), vec![2])
            ]
        );
    }
}
