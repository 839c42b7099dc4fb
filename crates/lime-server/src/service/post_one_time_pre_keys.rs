//! postOPks (0x04): add one-time pre-keys to the sender's device, all or nothing.

use crate::error::RequestError;
use crate::store::KeyStore;
use lime_protocol::{DeviceId, MessageType, OneTimePreKey, Response};

pub(super) async fn handle(
    store: &dyn KeyStore,
    device: DeviceId,
    keys: Vec<OneTimePreKey>,
) -> Result<Response, RequestError> {
    let count = keys.len();
    store.add_one_time_pre_keys(device.clone(), keys).await?;
    tracing::debug!(%device, count, "one-time pre-keys added");
    Ok(Response::Done(MessageType::PostOneTimePreKeys))
}
