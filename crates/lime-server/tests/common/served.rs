//! What the clients of several server instances check together: every one-time
//! pre-key is served at most once, by whichever instance.

use lime_protocol::Response;
use std::collections::HashSet;
use std::fmt::Display;

/// The one-time pre-keys served so far: (device id, key id).
#[derive(Default)]
pub struct ServedKeys(HashSet<(String, u32)>);

impl ServedKeys {
    /// Records the one-time pre-keys of a peerBundle answer. Panics (naming
    /// `context`) when the answer is anything else, when a device asked for has
    /// no bundle, or when a key was served before.
    pub fn record(&mut self, answer: Response, context: impl Display) {
        let Response::PeerBundles(bundles) = answer else {
            panic!("{context}: expected peerBundle, got {answer:?}");
        };
        for entry in bundles {
            let bundle = entry
                .bundle
                .unwrap_or_else(|| panic!("{context}: {} has no bundle", entry.device_id));
            if let Some(key) = bundle.one_time_pre_key {
                let first_time = self
                    .0
                    .insert((entry.device_id.as_str().to_owned(), key.id()));
                assert!(
                    first_time,
                    "{context}: OPk {} of {} served twice",
                    key.id(),
                    entry.device_id
                );
            }
        }
    }

    /// How many keys were served.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}
