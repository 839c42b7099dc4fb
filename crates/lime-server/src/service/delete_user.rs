//! deleteUser (0x02): remove the sender's device and its one-time pre-keys.
//! Deleting a device that is not there succeeds.

use crate::error::RequestError;
use crate::store::KeyStore;
use lime_protocol::{DeviceId, MessageType, Response};

pub(super) async fn handle(
    store: &dyn KeyStore,
    device: DeviceId,
) -> Result<Response, RequestError> {
    store.delete_device(device.clone()).await?;
    tracing::info!(%device, "device deleted");
    Ok(Response::Done(MessageType::DeleteUser))
}
