//! registerUser (0x09): publish a device with its identity key, signed pre-key and
//! first one-time pre-keys. Idempotent: the same keys again succeed and change nothing.

use crate::error::RequestError;
use crate::store::{KeyStore, Registered};
use lime_protocol::{DeviceId, MessageType, Registration, Response};

pub(super) async fn handle(
    store: &dyn KeyStore,
    device: DeviceId,
    registration: Registration,
) -> Result<Response, RequestError> {
    let keys = registration.one_time_pre_keys.len();
    match store.register_device(device.clone(), registration).await? {
        Registered::New => tracing::info!(%device, one_time_pre_keys = keys, "device registered"),
        Registered::AlreadyWithSameKeys => {
            tracing::info!(%device, "device registered again with the same keys, nothing changed")
        }
    }
    Ok(Response::Done(MessageType::RegisterUser))
}
