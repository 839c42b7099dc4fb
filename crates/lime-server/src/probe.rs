//! `lime-server probe URL`: a smoke test of a deployed server from outside, for
//! operators and monitoring. Two throw-away devices of the given user: the first
//! registers and uploads one-time pre-keys, the second registers and fetches the
//! first's bundle (which must carry one of those keys), then both are deleted.
//! Each step is printed with its latency; the first failure ends the probe (after
//! deleting what it registered) and names the step.
//!
//! The keys are random bytes of the curve's lengths: the server checks lengths,
//! never signatures, and nobody will ever open a session with these devices.

use crate::client::LimeClient;
use anyhow::{Context, Result};
use lime_protocol::{
    Curve, DeviceId, IdentityKey, OneTimePreKey, Registration, Request, RequestMessage, Response,
    SignedPreKey,
};
use rand::RngCore;
use std::future::Future;
use std::time::Instant;

/// One-time pre-keys the first device uploads.
const ONE_TIME_PRE_KEYS: u32 = 3;

/// What to probe, and as whom.
pub struct Probe {
    /// The server's X3DH URL (what Linphone's `lime_server_url` holds).
    pub url: String,
    /// `sip:user@domain`: the throw-away devices are its (`;gr=urn:uuid:...`),
    /// so that authentication lets them in.
    pub identity: String,
    /// The base algorithm of the devices.
    pub curve: Curve,
    /// The client, with its credentials (digest or certificate) and trust.
    pub client: LimeClient,
}

/// A device of the probe's: its id and the keys it registered.
struct ThrowAway {
    id: DeviceId,
    registration: Registration,
}

impl Probe {
    /// Runs every step, printing each; `Err` names the step that failed.
    pub async fn run(&self) -> Result<()> {
        println!(
            "probing {} as {} on {}",
            self.url, self.identity, self.curve
        );
        let started = Instant::now();
        let first = self.throw_away()?;
        let second = self.throw_away()?;
        let mut registered = Vec::new();
        let outcome = self.steps(&first, &second, &mut registered).await;
        if outcome.is_err() {
            // Leave nothing behind: delete what was registered, saying so.
            for device in registered {
                let deleted = self.delete(device).await;
                match deleted {
                    Ok(()) => println!("  cleanup: {device} deleted"),
                    Err(error) => println!("  cleanup: {device} NOT deleted: {error:#}"),
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        match &outcome {
            Ok(()) => println!("OK: {} answered every step in {elapsed:.0} ms", self.url),
            Err(error) => println!("FAILED: {error:#}"),
        }
        outcome
    }

    async fn steps<'a>(
        &self,
        first: &'a ThrowAway,
        second: &'a ThrowAway,
        registered: &mut Vec<&'a DeviceId>,
    ) -> Result<()> {
        step("registerUser (first device)", self.register(first)).await?;
        registered.push(&first.id);
        step(
            "postOPks (first device)",
            self.post_one_time_pre_keys(&first.id),
        )
        .await?;
        step("registerUser (second device)", self.register(second)).await?;
        registered.push(&second.id);
        step(
            "getPeerBundle (second asks for the first)",
            self.bundle_of(first, &second.id),
        )
        .await?;
        step("deleteUser (first device)", self.delete(&first.id)).await?;
        registered.retain(|device| *device != &first.id);
        step("deleteUser (second device)", self.delete(&second.id)).await?;
        registered.clear();
        Ok(())
    }

    /// A new device id of the identity, with random keys.
    fn throw_away(&self) -> Result<ThrowAway> {
        let mut rng = rand::rng();
        let uuid = format!(
            "{:032x}",
            u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())
        );
        let id = format!(
            "{};gr=urn:uuid:{}-{}-{}-{}-{}",
            self.identity,
            &uuid[..8],
            &uuid[8..12],
            &uuid[12..16],
            &uuid[16..20],
            &uuid[20..]
        );
        let curve = self.curve;
        Ok(ThrowAway {
            id: DeviceId::new(id).context("device id")?,
            registration: Registration {
                identity_key: IdentityKey::new(curve, random_bytes(curve.identity_key_len()))?,
                signed_pre_key: SignedPreKey::new(
                    curve,
                    random_bytes(curve.pre_key_len()),
                    random_bytes(curve.signature_len()),
                    1,
                )?,
                one_time_pre_keys: Vec::new(),
            },
        })
    }

    /// Sends `request` as `sender` and returns the answer; an X3DH error answer
    /// is an error.
    async fn ask(&self, sender: &DeviceId, request: Request) -> Result<Response> {
        let message = RequestMessage {
            curve: self.curve,
            request,
        };
        let answer = self
            .client
            .send(&self.url, sender.as_str(), &message)
            .await?;
        match answer.response {
            Response::Error(error) => anyhow::bail!("the server answered {error:?}"),
            response => Ok(response),
        }
    }

    async fn expect_done(&self, sender: &DeviceId, request: Request) -> Result<()> {
        let kind = request.message_type();
        match self.ask(sender, request).await? {
            Response::Done(done) if done == kind => Ok(()),
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }

    async fn register(&self, device: &ThrowAway) -> Result<()> {
        let request = Request::RegisterUser(device.registration.clone());
        self.expect_done(&device.id, request).await
    }

    async fn post_one_time_pre_keys(&self, device: &DeviceId) -> Result<()> {
        let keys = self.one_time_pre_keys()?;
        self.expect_done(device, Request::PostOneTimePreKeys(keys))
            .await
    }

    /// The probe's one-time pre-keys: ids 1 to [`ONE_TIME_PRE_KEYS`].
    fn one_time_pre_keys(&self) -> Result<Vec<OneTimePreKey>> {
        (1..=ONE_TIME_PRE_KEYS)
            .map(|id| {
                OneTimePreKey::new(self.curve, random_bytes(self.curve.pre_key_len()), id)
                    .map_err(anyhow::Error::from)
            })
            .collect()
    }

    /// The bundle of `target` as `asker` gets it: its identity key and signed
    /// pre-key as registered, and one of its one-time pre-keys.
    async fn bundle_of(&self, target: &ThrowAway, asker: &DeviceId) -> Result<()> {
        let request = Request::GetPeerBundle(vec![target.id.clone()]);
        let bundles = match self.ask(asker, request).await? {
            Response::PeerBundles(bundles) => bundles,
            other => anyhow::bail!("unexpected answer {other:?}"),
        };
        let [bundle] = bundles.as_slice() else {
            anyhow::bail!("{} bundles for one device asked", bundles.len());
        };
        let keys = bundle
            .bundle
            .as_ref()
            .context("no bundle: the server does not know the device just registered")?;
        anyhow::ensure!(
            keys.identity_key == target.registration.identity_key
                && keys.signed_pre_key == target.registration.signed_pre_key,
            "the bundle's keys are not the ones registered"
        );
        let one_time = keys.one_time_pre_key.as_ref().context(
            "the bundle has no one-time pre-key, though 3 were uploaded \
             (another instance or a bundle request limit?)",
        )?;
        anyhow::ensure!(
            (1..=ONE_TIME_PRE_KEYS).contains(&one_time.id()),
            "the bundle's one-time pre-key id {} is not one uploaded",
            one_time.id()
        );
        Ok(())
    }

    async fn delete(&self, device: &DeviceId) -> Result<()> {
        self.expect_done(device, Request::DeleteUser).await
    }
}

/// Runs one step, printing its name, its latency and its outcome.
async fn step(name: &str, work: impl Future<Output = Result<()>>) -> Result<()> {
    let started = Instant::now();
    let outcome = work.await;
    let millis = started.elapsed().as_secs_f64() * 1000.0;
    match &outcome {
        Ok(()) => println!("  ok      {name:<42} {millis:8.1} ms"),
        Err(error) => println!("  FAILED  {name:<42} {millis:8.1} ms: {error:#}"),
    }
    outcome.with_context(|| format!("step '{name}' failed"))
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throw_away_devices_belong_to_the_identity_and_differ() {
        let probe = Probe {
            url: "https://127.0.0.1:25519/".into(),
            identity: "sip:alice@example.org".into(),
            curve: Curve::C448,
            client: LimeClient::plain().unwrap(),
        };
        let (first, second) = (probe.throw_away().unwrap(), probe.throw_away().unwrap());
        assert!(
            first
                .id
                .as_str()
                .starts_with("sip:alice@example.org;gr=urn:uuid:")
        );
        assert_eq!(
            first.id.as_str().len(),
            "sip:alice@example.org;gr=urn:uuid:".len() + 36
        );
        assert_ne!(first.id, second.id);
        assert_eq!(
            first.registration.identity_key.as_bytes().len(),
            Curve::C448.identity_key_len()
        );
    }
}
