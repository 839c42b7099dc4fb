//! getPeerBundle (0x05): the key bundles of the asked devices, in request order,
//! each with a one-time pre-key taken from the store when one is left, as far as
//! the bundle request limit lets the sender have them.

use crate::error::RequestError;
use crate::store::KeyStore;
use lime_protocol::{DeviceId, Response};

pub(super) async fn handle(
    store: &dyn KeyStore,
    sender: DeviceId,
    devices: Vec<DeviceId>,
) -> Result<Response, RequestError> {
    let bundles = store.claim_key_bundles(sender, devices).await?;
    Ok(Response::PeerBundles(bundles))
}
