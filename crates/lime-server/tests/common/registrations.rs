//! Registrations of new devices raced on stores that share one database, for the
//! backends' store tests: 32 at once, half for users of their own and half for
//! one shared user.

use lime_protocol::{DeviceId, Registration};
use lime_server::store::{KeyStore, Registered, StoreError};
use std::sync::Arc;

/// Registers 32 new devices at once, spread over `servers`: 16 of users of their
/// own (`user<round>x<n>`), which must all succeed, and 16 of the user
/// `kim<round>`, which may only be refused for the devices-per-user limit.
/// Answers the shared user's name and how many of its devices were registered.
pub async fn race_new_devices(
    servers: &[Arc<dyn KeyStore>],
    round: u64,
    registration: fn(u64) -> Registration,
) -> (String, usize) {
    let shared_user = format!("kim{round}");
    let mut tasks = Vec::new();
    for task in 0..32u64 {
        let server = servers[task as usize % servers.len()].clone();
        let name = match task % 2 {
            0 => format!("user{round}x{task}"),
            _ => shared_user.clone(),
        };
        tasks.push(tokio::spawn(async move {
            let device =
                DeviceId::new(format!("sip:{name}@example.org;gr=urn:uuid:{task}")).unwrap();
            let result = server.register_device(device, registration(task)).await;
            (name, result)
        }));
    }
    let mut shared_new = 0;
    for task in tasks {
        match task.await.unwrap() {
            (name, Ok(Registered::New)) if name == shared_user => shared_new += 1,
            (_, Ok(Registered::New)) => {}
            (name, Err(StoreError::TooManyDevices { .. })) if name == shared_user => {}
            (name, other) => panic!("registering a device of {name}: {other:?}"),
        }
    }
    (shared_user, shared_new)
}
