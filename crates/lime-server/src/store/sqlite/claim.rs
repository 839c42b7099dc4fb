//! The getPeerBundle claim of the SQLite store, in steps: the [`Work`] the
//! writer runs one step per transaction, so that a group's 1,000-device request
//! holds the single writer for one step at a time and small requests get in
//! between (no head-of-line blocking). A step ends after [`CLAIM_STEP_DEVICES`]
//! devices when another job waits for the writer, and goes on to at most
//! [`CLAIM_STEP_DEVICES_ALONE`] when none does: a commit per step costs a
//! large claim alone its time twice over (seen with fixed steps of 100), and
//! is only worth it when someone waits.
//!
//! What a claim in steps keeps, and why:
//!
//! - **The answer is all or nothing.** It is sent after the last step committed.
//!   Between steps, other requests see what the earlier steps did (those devices'
//!   keys gone, their `Requests` rows, the identity's recorded count): a device
//!   claimed by this request and by another one between two steps gets a key in
//!   each answer, never the same key.
//! - **Limits stay exact.** The writer's counts (`request_counts.rs`) are read
//!   for each device as it comes, after the earlier steps and any request that
//!   came between them: counted exactly as if the requests had come one after
//!   another. What a step recorded is forgotten when its transaction does not
//!   commit. Repeats of a device across steps are known from the whole list,
//!   first occurrences' grants kept.
//! - **A failure takes nothing.** When a later step fails (its statement, or its
//!   transaction's commit), the client gets the error and none of the bundles, so
//!   the keys the earlier, committed steps took were never delivered: they are
//!   put back with their original rows (ids are never reused), unless their
//!   device was deleted meanwhile or has reused the key's id, and the `Requests`
//!   rows those steps recorded are removed and forgotten ([`BundleClaim::undo`],
//!   in the writer's next transaction, before the error is answered). No key is
//!   lost, none is served twice: a key put back was in no answer. Between the
//!   failure and the undo another request may find those devices without the
//!   keys (flag 0 where a key would have come); the undo is tried a few times,
//!   then given up with an error logged (the keys lost, as when the server stops
//!   in between).

use super::queries::{find_device, find_uid};
use super::request_counts::{self, Recorded, RequestCounts, SourceKeys};
use super::writer::{Progress, Waiting, Work};
use crate::store::in_doubt::ClaimedKey;
use crate::store::rules::{self, Grant};
use crate::store::{BundleRequestLimit, Claimed, SourceCheck, StoreError};
use lime_protocol::{Curve, DeviceId, PeerBundle};
use rusqlite::{Connection, OptionalExtension, params};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The counts of a store, shared by its claims; only the writer thread uses them.
pub type SharedCounts = Arc<Mutex<RequestCounts>>;

/// The bundle request limit and the counts it is enforced with.
pub type Limit = Option<(BundleRequestLimit, SharedCounts)>;

fn lock(counts: &SharedCounts) -> MutexGuard<'_, RequestCounts> {
    counts.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Devices a claim step serves before it looks whether other requests wait for
/// the writer, and ends if they do: what a small request behind a large claim
/// waits for is this many devices' work (under 1 ms) and the commit of their
/// pages. Smaller steps cost a large claim more commits while small requests
/// keep coming (docs/benchmarks.md: 25 devices left a 1-device request 5-6 ms
/// behind a stream of 1,000-device ones at the median, 10 devices 4 ms).
pub const CLAIM_STEP_DEVICES: usize = 10;

/// Most devices a claim step serves when no other request waits: a large
/// claim alone commits every this many devices (a 1,000-device one twice),
/// so that steps cost few commits and a failure has earlier steps to undo
/// only past this.
pub const CLAIM_STEP_DEVICES_ALONE: usize = 500;

/// A bundle claim, run in steps.
pub struct BundleClaim {
    curve: Curve,
    limit: Limit,
    source: DeviceId,
    check: SourceCheck,
    /// The devices held here, then those held by peer servers.
    devices: Vec<DeviceId>,
    held_here: usize,
    /// For each device, the index of its first occurrence when it is a repeat.
    repeats: Vec<Option<usize>>,
    /// The grants of the devices done so far, in order.
    grants: Vec<Grant>,
    /// The answer so far.
    claimed: Claimed,
    /// What the steps changed, for [`BundleClaim::undo`].
    changes: Changes,
    /// Where the current step started, to forget it when it is rolled back.
    step_start: Marks,
}

/// What the steps changed in the database.
#[derive(Default)]
struct Changes {
    /// The one-time pre-key rows taken.
    taken: Vec<ClaimedKey>,
    /// The `rowid`s of the `Requests` rows inserted, and their place in the counts.
    requests: Vec<(i64, Recorded)>,
}

/// The lengths of what a claim has gathered, at the start of a step.
#[derive(Default, Clone, Copy)]
struct Marks {
    grants: usize,
    bundles: usize,
    forward: usize,
    taken: usize,
    requests: usize,
}

impl BundleClaim {
    /// The claim of `devices` (held here) and `forwarded` (held by peers) for `source`.
    pub fn new(
        curve: Curve,
        limit: Limit,
        (source, check): (DeviceId, SourceCheck),
        (devices, forwarded): (Vec<DeviceId>, Vec<DeviceId>),
    ) -> BundleClaim {
        let held_here = devices.len();
        let devices: Vec<DeviceId> = devices.into_iter().chain(forwarded).collect();
        let repeats = rules::repeats(&devices);
        BundleClaim {
            curve,
            limit,
            source,
            check,
            grants: Vec::with_capacity(devices.len()),
            devices,
            held_here,
            repeats,
            claimed: Claimed::default(),
            changes: Changes::default(),
            step_start: Marks::default(),
        }
    }

    fn marks(&self) -> Marks {
        Marks {
            grants: self.grants.len(),
            bundles: self.claimed.bundles.len(),
            forward: self.claimed.forward.len(),
            taken: self.changes.taken.len(),
            requests: self.changes.requests.len(),
        }
    }

    /// Takes the requests recorded from the `from`th on out of the counts.
    fn forget_requests(&self, from: usize) {
        if let Some((_, counts)) = &self.limit {
            let mut counts = lock(counts);
            for (_, counted) in &self.changes.requests[from..] {
                counts.forget(*counted);
            }
        }
    }

    /// Runs the claim to its end on `conn`, in the caller's transaction.
    pub fn run_whole(mut self, conn: &Connection) -> Result<Claimed, StoreError> {
        while self.step(conn, Waiting::nobody())? == Progress::More {}
        Ok(self.claimed)
    }

    /// The grant of device `index`, recording it in `Requests` and in `counts`
    /// (with the source's keys there) when it counts.
    fn grant(
        &mut self,
        conn: &Connection,
        index: usize,
        refused: bool,
        counts: Option<(&mut RequestCounts, SourceKeys)>,
    ) -> Result<Grant, StoreError> {
        let device_id = &self.devices[index];
        let limit = self.limit.as_ref().map(|(limit, _)| limit);
        let grant = match (refused, self.repeats[index], limit.zip(counts)) {
            (true, _, _) => Grant::Refused,
            (false, Some(first), _) => rules::repeat_grant(self.grants[first]),
            (false, None, None) => Grant::Full,
            (false, None, Some((limit, (counts, source)))) => {
                let now = request_counts::now();
                let target = counts.target(device_id);
                let received = counts.received(now, source, target);
                let recorded = counts.recorded_in_window(now, source);
                let grant = rules::grant(&self.source, device_id, received, recorded, limit);
                if grant == Grant::Full {
                    conn.prepare_cached(
                        "INSERT INTO Requests (source, target, at) \
                         VALUES (?1, ?2, datetime(?3, 'unixepoch'))",
                    )?
                    .execute(params![
                        self.source.as_str(),
                        device_id.as_str(),
                        now
                    ])?;
                    let row = conn.last_insert_rowid();
                    let counted = counts.record(now, source, target);
                    self.changes.requests.push((row, counted));
                }
                grant
            }
        };
        Ok(grant)
    }

    /// Grants device `index` and, for a device held here, takes its one-time
    /// pre-key (when the grant is full) with `take` and adds its bundle.
    fn claim_device(
        &mut self,
        conn: &Connection,
        take: &mut rusqlite::CachedStatement<'_>,
        index: usize,
        counts: Option<(&mut RequestCounts, SourceKeys)>,
    ) -> Result<(), StoreError> {
        // A device a peer holds is granted as one held here would be.
        let held = index < self.held_here;
        let device = match held {
            true => find_device(conn, &self.devices[index])?
                .filter(|device| device.signed_pre_key.is_some()),
            false => None,
        };
        let grant = self.grant(conn, index, held && device.is_none(), counts)?;
        self.grants.push(grant);
        if !held {
            self.claimed.forward.push(grant == Grant::Full);
            return Ok(());
        }
        let bundle = match device {
            Some(device) if grant.is_served() => {
                let mut one_time_pre_key = None;
                if grant == Grant::Full {
                    let uid = device.uid;
                    let key = take
                        .query_row([uid], |row| {
                            Ok(ClaimedKey {
                                id: row.get(0)?,
                                uid,
                                public: row.get(1)?,
                                key_id: row.get(2)?,
                            })
                        })
                        .optional()?;
                    one_time_pre_key = key.as_ref().map(|key| (key.public.clone(), key.key_id));
                    self.changes.taken.extend(key);
                }
                rules::key_bundle(self.curve, device, one_time_pre_key)?
            }
            _ => None,
        };
        self.claimed.bundles.push(PeerBundle {
            device_id: self.devices[index].clone(),
            bundle,
        });
        Ok(())
    }
}

impl Work for BundleClaim {
    type Output = Result<Claimed, StoreError>;

    fn step(&mut self, conn: &Connection, waiting: Waiting<'_>) -> Result<Progress, StoreError> {
        self.step_start = self.marks();
        let first = self.grants.len();
        if first == 0 && self.check == SourceCheck::Registered {
            find_uid(conn, &self.source)?;
        }
        let shared = self.limit.as_ref().map(|(_, counts)| Arc::clone(counts));
        let mut counts = shared.as_ref().map(lock);
        let source = counts.as_ref().map(|counts| counts.source(&self.source));
        // Chunks of CLAIM_STEP_DEVICES, until `last` or another job waits.
        let last = self.devices.len().min(first + CLAIM_STEP_DEVICES_ALONE);
        let mut start = first;
        let mut take = conn.prepare_cached(
            "DELETE FROM OPk WHERE id = (SELECT id FROM OPk WHERE Uid = ?1 LIMIT 1) \
             RETURNING id, OPk, OPk_id",
        )?;
        loop {
            let end = last.min(start + CLAIM_STEP_DEVICES);
            for index in start..end {
                let counts = counts.as_deref_mut().zip(source);
                self.claim_device(conn, &mut take, index, counts)?;
            }
            start = end;
            if end == last || waiting.others() {
                break;
            }
        }
        Ok(match start == self.devices.len() {
            true => Progress::Done,
            false => Progress::More,
        })
    }

    fn step_rolled_back(&mut self) {
        let marks = self.step_start;
        self.grants.truncate(marks.grants);
        self.claimed.bundles.truncate(marks.bundles);
        self.claimed.forward.truncate(marks.forward);
        self.changes.taken.truncate(marks.taken);
        self.forget_requests(marks.requests);
        self.changes.requests.truncate(marks.requests);
    }

    fn needs_undo(&self) -> bool {
        !self.changes.taken.is_empty() || !self.changes.requests.is_empty()
    }

    /// Puts back the keys the committed steps took (unless their device is gone
    /// or has used the id again meanwhile), and removes what they recorded.
    fn undo(&mut self, conn: &Connection) -> Result<(), StoreError> {
        let mut put_back = conn.prepare_cached(
            "INSERT INTO OPk (id, Uid, OPk, OPk_id) SELECT ?1, ?2, ?3, ?4 \
             WHERE EXISTS (SELECT 1 FROM Users WHERE Uid = ?2) ON CONFLICT DO NOTHING",
        )?;
        for key in &self.changes.taken {
            put_back.execute(params![key.id, key.uid, key.public, key.key_id])?;
        }
        let mut delete = conn.prepare_cached("DELETE FROM Requests WHERE rowid = ?1")?;
        for (row, _) in &self.changes.requests {
            delete.execute([row])?;
        }
        // Forgotten now, whether this transaction commits or not: should it
        // fail for good, the rows stay but count for nothing, as the keys are
        // lost (an error is logged).
        self.forget_requests(0);
        tracing::warn!(
            keys = self.changes.taken.len(),
            "SQLite: a claim failed after some of its steps committed; their keys are put back"
        );
        Ok(())
    }

    fn into_output(self) -> Self::Output {
        Ok(self.claimed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreLimits;
    use lime_protocol::{IdentityKey, OneTimePreKey, Registration, SignedPreKey};

    /// An in-memory store of `count` devices with one one-time pre-key each.
    fn store_of(count: usize) -> (Connection, Vec<DeviceId>) {
        let conn = Connection::open_in_memory().unwrap();
        super::super::schema::ensure_schema(&conn).unwrap();
        let limits = StoreLimits {
            max_one_time_pre_keys_per_device: 10,
            max_devices_per_user: 0,
            bundle_requests: None,
        };
        let curve = Curve::C25519;
        let devices: Vec<DeviceId> = (0..count)
            .map(|n| DeviceId::new(format!("sip:d{n}@example.org;gr=urn:uuid:{n}")).unwrap())
            .collect();
        for device in &devices {
            let registration = Registration {
                identity_key: IdentityKey::new(curve, vec![1; 32]).unwrap(),
                signed_pre_key: SignedPreKey::new(curve, vec![2; 32], vec![3; 64], 1).unwrap(),
                one_time_pre_keys: vec![OneTimePreKey::new(curve, vec![4; 32], 1).unwrap()],
            };
            super::super::queries::register_device(&conn, &limits, device, &registration).unwrap();
        }
        (conn, devices)
    }

    /// The claim of every device, by the first one.
    fn claim_of(devices: &[DeviceId]) -> BundleClaim {
        BundleClaim::new(
            Curve::C25519,
            None,
            (devices[0].clone(), SourceCheck::Registered),
            (devices.to_vec(), Vec::new()),
        )
    }

    #[test]
    fn a_step_ends_early_only_when_another_job_waits() {
        let (conn, devices) = store_of(1_000);
        let mut alone = claim_of(&devices);
        let first = alone.step(&conn, Waiting::nobody()).unwrap();
        assert_eq!(first, Progress::More);
        assert_eq!(alone.claimed.bundles.len(), CLAIM_STEP_DEVICES_ALONE);
        let second = alone.step(&conn, Waiting::nobody()).unwrap();
        assert_eq!(second, Progress::Done);
        assert_eq!(alone.claimed.bundles.len(), 1_000);

        let (conn, devices) = store_of(1_000);
        let mut beside_others = claim_of(&devices);
        let first = beside_others
            .step(&conn, Waiting::others_in_transaction())
            .unwrap();
        assert_eq!(first, Progress::More);
        assert_eq!(beside_others.claimed.bundles.len(), CLAIM_STEP_DEVICES);
    }

    /// Keeps the calling thread, and the threads it starts from now on, on the
    /// CPU it runs on.
    #[cfg(target_os = "linux")]
    fn pin_to_this_cpu() {
        use rustix::thread::{CpuSet, sched_getcpu, sched_setaffinity};
        let mut set = CpuSet::new();
        set.set(sched_getcpu());
        sched_setaffinity(None, &set).expect("sched_setaffinity failed");
    }

    /// On a server with one CPU (or all of them busy), the threads that take
    /// requests in share the writer's CPU. A large claim running alone must let
    /// such a thread, once woken, queue its job at the step's next look, not
    /// after the kernel's time slice: 100 devices and more, several ms, that
    /// the small request waits on top of the step's commit. Whether the kernel
    /// lets a woken thread in at once varies, and on a loaded machine a yield
    /// may go to another thread first (a CI run saw 2 tries of 10 end at the
    /// second look), so this is tried several times and most tries must end at
    /// the first look; without the yield at most 2 of 10 did, in 30 runs.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_step_alone_lets_a_request_thread_on_its_cpu_queue_a_job() {
        use super::super::writer::{Job, OneStep, PendingJob};
        use std::sync::mpsc::channel;
        use std::time::Duration;
        const TRIES: usize = 10;
        let (conn, devices) = store_of(1_000);
        let (sender, mut queue) = tokio::sync::mpsc::channel::<Box<dyn Job>>(TRIES);
        pin_to_this_cpu();
        // A thread started for each try: how soon the kernel lets in a thread it
        // has just started or woken varies most for the first one.
        let steps: Vec<usize> = (0..TRIES)
            .map(|_| {
                let (wake, woken) = channel::<()>();
                let sender = sender.clone();
                let request_thread = std::thread::spawn(move || {
                    woken.recv().unwrap();
                    let (job, _answer) = PendingJob::new(
                        OneStep::new(|_: &Connection| Ok(())),
                        Duration::from_secs(5),
                    );
                    sender.try_send(job).ok().unwrap();
                });
                let mut claim = claim_of(&devices);
                wake.send(()).unwrap();
                claim.step(&conn, Waiting::queue(&queue)).unwrap();
                request_thread.join().unwrap();
                while queue.try_recv().is_ok() {}
                claim.claimed.bundles.len()
            })
            .collect();
        let at_first_look = steps
            .iter()
            .filter(|&&step| step == CLAIM_STEP_DEVICES)
            .count();
        assert!(
            at_first_look > TRIES / 2,
            "devices a step served after a job was on its way: {steps:?}"
        );
    }
}
