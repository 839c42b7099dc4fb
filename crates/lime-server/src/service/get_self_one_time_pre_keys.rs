//! getSelfOPks (0x07): which of the sender's one-time pre-keys are still on the
//! server. `user_not_found` here is what makes a client re-register.

use crate::error::RequestError;
use crate::store::KeyStore;
use crate::telemetry::clip;
use lime_protocol::{DeviceId, Response};

pub(super) async fn handle(
    store: &dyn KeyStore,
    device: DeviceId,
) -> Result<Response, RequestError> {
    let ids = store.one_time_pre_key_ids(device.clone()).await?;
    tracing::debug!(
        device = %clip(device.as_str()),
        one_time_pre_keys = ids.len(),
        "getSelfOPks answered"
    );
    Ok(Response::SelfOneTimePreKeys(ids))
}
