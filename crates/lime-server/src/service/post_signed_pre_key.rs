//! postSPk (0x03): replace the sender's signed pre-key.

use crate::error::RequestError;
use crate::store::KeyStore;
use lime_protocol::{DeviceId, MessageType, Response, SignedPreKey};

pub(super) async fn handle(
    store: &dyn KeyStore,
    device: DeviceId,
    key: SignedPreKey,
) -> Result<Response, RequestError> {
    let id = key.id();
    store.replace_signed_pre_key(device.clone(), key).await?;
    tracing::debug!(%device, spk_id = id, "signed pre-key replaced");
    Ok(Response::Done(MessageType::PostSignedPreKey))
}
