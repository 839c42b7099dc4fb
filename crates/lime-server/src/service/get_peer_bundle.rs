//! getPeerBundle (0x05): the key bundles of the asked devices, in request order,
//! each with a one-time pre-key taken from the store when one is left, as far as
//! the bundle request limits let the sender have them. The sender must be a
//! registered device of the request's curve (`user_not_found` otherwise).
//!
//! With federation, devices of a peer's domain are asked of that peer (one
//! request per peer, all at once, after the sender was found registered here);
//! a request a peer forwards is answered for our domains' devices only, never
//! forwarded again (see [`crate::federation`]).
//!
//! Logged at debug: one line per request (how many bundles of each kind), and
//! one per bundle served without a one-time pre-key or not served; the store
//! says at debug which limit withheld one.

use crate::auth::Sender;
use crate::error::RequestError;
use crate::federation::Federation;
use crate::store::{KeyStore, SourceCheck};
use crate::telemetry::clip;
use lime_protocol::{Curve, DeviceId, KeyBundle, PeerBundle, Response};
use std::collections::HashMap;

pub(super) async fn handle(
    store: &dyn KeyStore,
    sender: DeviceId,
    devices: Vec<DeviceId>,
) -> Result<Response, RequestError> {
    let asked = devices.len();
    let bundles = store.claim_key_bundles(sender.clone(), devices).await?;
    log_answer(&sender, asked, &bundles);
    Ok(Response::PeerBundles(bundles))
}

/// A request of one of our clients, on a server with peers: our store's
/// devices first (which checks the sender is registered here), then each peer's
/// devices from that peer, all peers at once, back in the request's order.
pub(super) async fn handle_federated(
    store: &dyn KeyStore,
    curve: Curve,
    sender: &Sender,
    devices: Vec<DeviceId>,
    federation: &Federation,
) -> Result<Response, RequestError> {
    let source = sender.device_id();
    let asked = devices.len();
    let plan = federation.plan(&devices);
    let local: Vec<DeviceId> = plan.local.iter().map(|&i| devices[i].clone()).collect();
    // The peers' devices, in plan order: our limits apply to them first.
    let foreign: Vec<usize> = plan
        .forwarded
        .iter()
        .flat_map(|(_, positions)| positions.iter().copied())
        .collect();
    let claimed = store
        .claim_key_bundles_for(
            source.clone(),
            SourceCheck::Registered,
            local,
            foreign.iter().map(|&i| devices[i].clone()).collect(),
        )
        .await?;
    let mut answer: Vec<PeerBundle> = devices
        .iter()
        .map(|device_id| PeerBundle::none(device_id.clone()))
        .collect();
    for (position, bundle) in plan.local.iter().zip(claimed.bundles) {
        answer[*position] = bundle;
    }
    // Whether each position may be asked of its peer (within our limits, not a
    // repeat): one flag per position, looked up in O(1).
    let mut granted = vec![false; asked];
    for (&position, &forward) in foreign.iter().zip(&claimed.forward) {
        granted[position] = forward;
    }
    let (devices, granted) = (&devices, &granted);
    let fetches = plan.forwarded.iter().map(|(peer, positions)| {
        let positions: Vec<usize> = positions
            .iter()
            .copied()
            .filter(|&position| granted[position])
            .collect();
        async move {
            if positions.is_empty() {
                return (positions, Ok(Vec::new()));
            }
            let asked: Vec<DeviceId> = positions.iter().map(|&i| devices[i].clone()).collect();
            let fetched = peer.fetch(curve, source, asked, federation.timeout()).await;
            if let Err(failure) = &fetched {
                tracing::warn!(
                    peer = %peer.name(),
                    source = %clip(source.as_str()),
                    devices = positions.len(),
                    reason = %failure,
                    "federation: peer failed, its devices get no bundle"
                );
            }
            (positions, fetched)
        }
    });
    for (positions, fetched) in futures_util::future::join_all(fetches).await {
        if let Ok(bundles) = fetched {
            for (position, bundle) in positions.into_iter().zip(bundles) {
                answer[position] = bundle;
            }
        }
    }
    // Not forwarded: a repeat gets its first occurrence's bundle without the
    // one-time key (as a device held here would); past one of our limits, none.
    let mut first_at: HashMap<&DeviceId, usize> = HashMap::new();
    for (position, device_id) in devices.iter().enumerate() {
        first_at.entry(device_id).or_insert(position);
    }
    for &position in foreign.iter().filter(|&&position| !granted[position]) {
        let bundle = first_at
            .get(&devices[position])
            .filter(|&&first| first < position)
            .and_then(|&first| answer[first].bundle.clone());
        answer[position].bundle = bundle.map(|bundle| KeyBundle {
            one_time_pre_key: None,
            ..bundle
        });
    }
    log_answer(source, asked, &answer);
    Ok(Response::PeerBundles(answer))
}

/// A request a peer server forwarded for a device of its domain: our domains'
/// devices from our store, counted for that device (not the peer) and without
/// the registered-source check (the peer vouches for its device); any other
/// device gets no bundle, never forwarded again.
pub(super) async fn handle_forwarded(
    store: &dyn KeyStore,
    sender: &Sender,
    devices: Vec<DeviceId>,
    federation: &Federation,
) -> Result<Response, RequestError> {
    let source = sender.device_id();
    let asked = devices.len();
    let ours: Vec<DeviceId> = devices
        .iter()
        .filter(|device| federation.serves(device))
        .cloned()
        .collect();
    if ours.len() < asked {
        tracing::debug!(
            peer = sender.forwarded_by().unwrap_or("-"),
            source = %clip(source.as_str()),
            devices = asked - ours.len(),
            "federation: a peer asked for devices of domains we do not serve: no bundle, \
             never forwarded again"
        );
    }
    let mut served = store
        .claim_key_bundles_for(source.clone(), SourceCheck::VouchedByPeer, ours, Vec::new())
        .await?
        .bundles
        .into_iter();
    let answer: Vec<PeerBundle> = devices
        .into_iter()
        .map(|device_id| match federation.serves(&device_id) {
            // The store answers each device asked, in order.
            true => served.next().unwrap_or(PeerBundle::none(device_id)),
            false => PeerBundle::none(device_id),
        })
        .collect();
    log_answer(source, asked, &answer);
    Ok(Response::PeerBundles(answer))
}

fn log_answer(sender: &DeviceId, asked: usize, bundles: &[PeerBundle]) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let (mut with_key, mut without_key, mut none) = (0usize, 0usize, 0usize);
    for entry in bundles {
        match entry.flag() {
            1 => with_key += 1,
            0 => {
                without_key += 1;
                tracing::debug!(
                source = %clip(sender.as_str()),
                target = %clip(entry.device_id.as_str()),
                "bundle served without a one-time pre-key (none left, a repeat, or withheld by \
                 a bundle request limit)"
                );
            }
            _ => {
                none += 1;
                tracing::debug!(
                    source = %clip(sender.as_str()),
                    target = %clip(entry.device_id.as_str()),
                    "no bundle (device unknown, no signed pre-key, or refused by a bundle \
                     request limit in no_bundle mode)"
                );
            }
        }
    }
    tracing::debug!(
        source = %clip(sender.as_str()),
        asked,
        with_one_time_pre_key = with_key,
        without_one_time_pre_key = without_key,
        no_bundle = none,
        "getPeerBundle answered"
    );
}
