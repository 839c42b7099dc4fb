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
use crate::federation::Federation;
use crate::store::{KeyStore, StoreError, Stores};
use crate::telemetry::clip;
use lime_protocol::response::largest_peer_bundle_len;
use lime_protocol::{Request, RequestMessage, Response, ResponseMessage};
use std::sync::Arc;

/// Answers X3DH requests from the stores of the enabled curves.
pub struct KeyService {
    /// One store per enabled base algorithm.
    stores: Stores,
    /// `limits.max_bundle_answer_bytes`.
    max_bundle_answer_bytes: u64,
    /// The peer servers foreign devices' bundles are fetched from, if any.
    federation: Option<Arc<Federation>>,
}

impl KeyService {
    /// A service over `stores`. Each store keeps its own time-out (see
    /// [`KeyStore`]): the service never abandons a store call.
    pub fn new(
        stores: Stores,
        max_bundle_answer_bytes: u64,
        federation: Option<Arc<Federation>>,
    ) -> KeyService {
        KeyService {
            stores,
            max_bundle_answer_bytes,
            federation,
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
            // Before any claim: a refused request takes no one-time key.
            let bytes = largest_peer_bundle_len(curve, devices);
            if bytes > self.max_bundle_answer_bytes {
                return Err(RequestError::BundleAnswerTooLarge {
                    devices: devices.len(),
                    bytes,
                    limit: self.max_bundle_answer_bytes,
                });
            }
        }
        let result = self.route(store, curve, sender, request).await;
        if let Err(RequestError::Store(error @ (StoreError::Backend(_) | StoreError::Timeout(_)))) =
            &result
        {
            crate::metrics::store_failed(
                store.backend(),
                curve,
                matches!(error, StoreError::Timeout(_)),
            );
        }
        result
    }

    /// Runs a decoded request: a peer server's getPeerBundle, one with devices of
    /// other domains, or any other by its handler.
    async fn route(
        &self,
        store: &dyn KeyStore,
        curve: lime_protocol::Curve,
        sender: &Sender,
        request: Request,
    ) -> Result<Response, RequestError> {
        if let Some(peer) = sender.forwarded_by() {
            // A peer server may only ask for bundles (also refused at the HTTP
            // level, before the body is decoded).
            let (Request::GetPeerBundle(devices), Some(federation)) = (&request, &self.federation)
            else {
                return Err(RequestError::NotForPeers {
                    peer: peer.to_owned(),
                    message: request.message_type(),
                });
            };
            return get_peer_bundle::handle_forwarded(store, sender, devices.clone(), federation)
                .await;
        }
        if let Request::GetPeerBundle(devices) = &request
            && let Some(federation) = self.federation.as_ref().filter(|f| f.has_peers())
        {
            return get_peer_bundle::handle_federated(
                store,
                curve,
                sender,
                devices.clone(),
                federation,
            )
            .await;
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
    let device = sender
        .map(|sender| sender.device_id().as_str())
        .unwrap_or("-");
    let identity = sender.and_then(Sender::authenticated_as).unwrap_or("-");
    let (device, identity) = (clip(device), clip(identity));
    if error.is_server_fault() {
        tracing::error!(%code, sender = %device, identity = %identity, curve = curve_byte, %error, "request failed");
    } else {
        tracing::warn!(%code, sender = %device, identity = %identity, curve = curve_byte, %error, "request refused");
    }
    ResponseMessage::error(curve_byte, code, error.client_text())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lime_protocol::{
        Curve, DeviceId, IdentityKey, KeyBundle, OneTimePreKey, PeerBundle, SignedPreKey,
    };

    /// The answer with every device given a bundle and a one-time pre-key.
    fn fullest_answer(curve: Curve, devices: &[DeviceId]) -> Vec<u8> {
        let bundle = KeyBundle {
            identity_key: IdentityKey::new(curve, vec![1; curve.identity_key_len()]).unwrap(),
            signed_pre_key: SignedPreKey::new(
                curve,
                vec![2; curve.pre_key_len()],
                vec![3; curve.signature_len()],
                7,
            )
            .unwrap(),
            one_time_pre_key: Some(
                OneTimePreKey::new(curve, vec![4; curve.pre_key_len()], 9).unwrap(),
            ),
        };
        let bundles = devices
            .iter()
            .map(|device_id| PeerBundle {
                device_id: device_id.clone(),
                bundle: Some(bundle.clone()),
            })
            .collect();
        ResponseMessage {
            curve_byte: curve.id(),
            response: Response::PeerBundles(bundles),
        }
        .encode()
        .unwrap()
    }

    #[test]
    fn the_reckoned_answer_size_is_the_size_of_the_fullest_answer_on_every_curve() {
        let devices: Vec<DeviceId> = ["a", "sip:bob@example.org;gr=urn:uuid:0123", "ü"]
            .into_iter()
            .map(|text| DeviceId::new(text).unwrap())
            .collect();
        for curve in Curve::ALL {
            let reckoned = largest_peer_bundle_len(curve, &devices);
            assert_eq!(
                reckoned,
                fullest_answer(curve, &devices).len() as u64,
                "{curve}"
            );
        }
    }

    #[test]
    fn the_default_bound_serves_5000_devices_with_long_ids_on_every_curve() {
        let long_id = DeviceId::new(format!(
            "sip:{}@example.org;gr=urn:uuid:{}",
            "u".repeat(200),
            "0".repeat(36)
        ))
        .unwrap();
        let group = vec![long_id; 5_000];
        for curve in Curve::ALL {
            assert!(
                largest_peer_bundle_len(curve, &group)
                    <= crate::config::DEFAULT_MAX_BUNDLE_ANSWER_BYTES,
                "{curve}"
            );
        }
    }
}
