//! getPeerBundle (0x05): the key bundles of the asked devices, in request order,
//! each with a one-time pre-key taken from the store when one is left, as far as
//! the bundle request limits let the sender have them. The sender must be a
//! registered device of the request's curve (`user_not_found` otherwise).
//!
//! Logged at debug: one line per request (how many bundles of each kind), and
//! one per bundle served without a one-time pre-key or not served; the store
//! says at debug which limit withheld one.

use crate::error::RequestError;
use crate::store::KeyStore;
use crate::telemetry::clip;
use lime_protocol::{DeviceId, PeerBundle, Response};

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
