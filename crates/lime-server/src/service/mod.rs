//! The protocol's meaning: one handler per X3DH request type.
//!
//! [`KeyService::handle`] takes the authenticated [`Sender`] and the request body,
//! decodes it, picks the store of its curve and runs the handler. Handlers never
//! see HTTP; they talk to a [`KeyStore`] and return a [`Response`].

mod delete_user;
mod get_peer_bundle;
mod get_self_one_time_pre_keys;
mod post_one_time_pre_keys;
mod post_signed_pre_key;
mod register_user;

use crate::auth::Sender;
use crate::error::RequestError;
use crate::store::{KeyStore, Stores};
use lime_protocol::{Request, RequestMessage, Response, ResponseMessage};

/// Answers X3DH requests from the stores of the enabled curves.
pub struct KeyService {
    /// One store per enabled base algorithm.
    stores: Stores,
    /// `limits.max_devices_per_bundle_request`.
    max_devices_per_bundle_request: u16,
}

impl KeyService {
    /// A service over `stores`. Each store keeps its own time-out (see
    /// [`KeyStore`]): the service never abandons a store call.
    pub fn new(stores: Stores, max_devices_per_bundle_request: u16) -> KeyService {
        KeyService {
            stores,
            max_devices_per_bundle_request,
        }
    }

    /// The stores served.
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// Answers one request body sent by `sender`. Always an answer: failures are
    /// X3DH error messages, logged with their full reason.
    pub async fn handle(&self, sender: &Sender, body: &[u8]) -> ResponseMessage {
        let curve_byte = body.get(2).copied().unwrap_or(0);
        match self.dispatch(sender, body).await {
            Ok(response) => ResponseMessage {
                curve_byte,
                response,
            },
            Err(error) => error_answer(curve_byte, Some(sender), &error),
        }
    }

    async fn dispatch(&self, sender: &Sender, body: &[u8]) -> Result<Response, RequestError> {
        let RequestMessage { curve, request } = RequestMessage::parse(body)?;
        let store = self
            .stores
            .get(curve)
            .ok_or(RequestError::CurveNotEnabled(curve))?
            .as_ref();
        if let Request::GetPeerBundle(devices) = &request {
            let limit = self.max_devices_per_bundle_request;
            if devices.len() > usize::from(limit) {
                return Err(RequestError::TooManyDevicesRequested {
                    asked: devices.len(),
                    limit,
                });
            }
        }
        run(store, sender.device_id().clone(), request).await
    }
}

async fn run(
    store: &dyn KeyStore,
    device: lime_protocol::DeviceId,
    request: Request,
) -> Result<Response, RequestError> {
    match request {
        Request::RegisterUser(registration) => {
            register_user::handle(store, device, registration).await
        }
        Request::DeleteUser => delete_user::handle(store, device).await,
        Request::PostSignedPreKey(key) => post_signed_pre_key::handle(store, device, key).await,
        Request::PostOneTimePreKeys(keys) => {
            post_one_time_pre_keys::handle(store, device, keys).await
        }
        Request::GetPeerBundle(devices) => get_peer_bundle::handle(store, device, devices).await,
        Request::GetSelfOneTimePreKeys => get_self_one_time_pre_keys::handle(store, device).await,
    }
}

/// The X3DH error answer for `error`, logged: server faults as errors, the
/// client's mistakes as warnings.
pub fn error_answer(
    curve_byte: u8,
    sender: Option<&Sender>,
    error: &RequestError,
) -> ResponseMessage {
    let code = error.code();
    let device = crate::telemetry::clip(
        sender
            .map(|sender| sender.device_id().as_str())
            .unwrap_or("-"),
    );
    let identity = sender.and_then(Sender::authenticated_as).unwrap_or("-");
    if error.is_server_fault() {
        tracing::error!(%code, sender = %device, identity, curve = curve_byte, %error, "request failed");
    } else {
        tracing::warn!(%code, sender = %device, identity, curve = curve_byte, %error, "request refused");
    }
    ResponseMessage::error(curve_byte, code, error.client_text())
}
