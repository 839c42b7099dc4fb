//! Claims whose COMMIT went unanswered: one-time pre-keys that must end up either
//! delivered or back on the server, never lost.
//!
//! Every claim transaction of a database-server store (MariaDB/MySQL, PostgreSQL)
//! that takes at least one key also inserts a fresh random token into the table
//! `lime_rs_claims`, so the token commits or not with the claim. When the
//! connection breaks (or times out) after COMMIT was sent, the client gets
//! `db_error` and never sees the keys; the claim is kept here, in memory, "in
//! doubt". A background task then settles it as soon as the database answers
//! again, in one transaction of the backend's ([`Reconcile::settle`]):
//!
//! - it inserts the token itself. If the claim committed, the token is there and
//!   the insert does nothing: the keys were taken and never delivered, so they are
//!   put back with their original rows (`id`, `Uid`, `OPk`, `OPk_id`; ids are never
//!   reused) unless their device is gone, and the token is deleted. If the claim
//!   rolled back, the insert succeeds and nothing is restored. If the claim is
//!   still open on the database server, the insert waits for it to end (its token
//!   is a uniqueness conflict), so a late COMMIT cannot be missed;
//! - a settling transaction whose own COMMIT goes unanswered stays in the list:
//!   if it did commit, the token is gone and the next try restores nothing.
//!
//! Limits: the list lives in memory, so a server that stops while claims are in
//! doubt loses them (their keys may stay taken); a database without the table
//! (the PHP server's, not migrated) claims without a token and an unanswered
//! COMMIT is only logged. Tokens of settled and delivered claims are purged after
//! [`TOKEN_LIFETIME`]. This module holds the bookkeeping only; the SQL is each
//! backend's.

use crate::store::StoreError;
use async_trait::async_trait;
use std::sync::{Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// Our table of claim tokens, as the SQL names it on both backends.
pub const CLAIMS_TABLE: &str = "lime_rs_claims";

/// How long a token is kept: far longer than any transaction may stay open.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// How often a store purges tokens older than [`TOKEN_LIFETIME`].
const PURGE_EVERY: Duration = Duration::from_secs(300);

/// How often in-doubt claims are tried again while the database does not answer.
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// The random token a claim transaction inserts: found after an unanswered
/// COMMIT, it proves that the claim committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimToken([u8; 16]);

impl ClaimToken {
    /// A fresh random token.
    pub fn new() -> ClaimToken {
        ClaimToken(rand::random())
    }

    /// Its 16 bytes, as stored.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Default for ClaimToken {
    fn default() -> ClaimToken {
        ClaimToken::new()
    }
}

/// A one-time pre-key row as a claim took it: what putting it back needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedKey {
    /// `OPk.id`, kept so that the key goes back to its place in the device's order.
    pub id: i64,
    /// `OPk.Uid`: the device's row.
    pub uid: i64,
    /// `OPk.OPk`: the public key.
    pub public: Vec<u8>,
    /// `OPk.OPk_id`: the client's id for it.
    pub key_id: u32,
}

/// What a claim transaction took: its token (none on a database without
/// [`CLAIMS_TABLE`]) and its keys.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    /// The token inserted with the claim.
    pub token: Option<ClaimToken>,
    /// The rows taken, none when no device had a key left.
    pub keys: Vec<ClaimedKey>,
}

/// A call that did not succeed.
#[derive(Debug)]
pub enum CallError<T> {
    /// The call's answer; nothing was changed.
    Failed(StoreError),
    /// COMMIT was sent and its answer never came: the transaction may or may not
    /// have committed. `value` is what its work produced.
    CommitUnanswered {
        /// What the work returned before COMMIT.
        value: T,
        /// Why the answer is missing, for the log and the client's `db_error`.
        error: String,
    },
}

impl<T> CallError<T> {
    /// The error the caller gets: an unanswered COMMIT is a database error.
    pub fn into_store_error(self) -> StoreError {
        match self {
            CallError::Failed(error) => error,
            CallError::CommitUnanswered { error, .. } => StoreError::Backend(error),
        }
    }
}

impl<T> From<StoreError> for CallError<T> {
    fn from(error: StoreError) -> CallError<T> {
        CallError::Failed(error)
    }
}

/// How a claim in doubt was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The claim had committed: this many of its keys were put back (the others'
    /// devices are gone, or hold that key id again).
    Restored(u64),
    /// The claim had rolled back: its keys never left.
    RolledBack,
}

/// A store that can settle claims in doubt (one per backend).
#[async_trait]
pub trait Reconcile: Send + Sync + 'static {
    /// The store's list of claims in doubt.
    fn in_doubt(&self) -> &InDoubtClaims;

    /// In one transaction: whether the claim of `token` committed, and if it did,
    /// its `keys` put back and its token deleted (see the module documentation).
    async fn settle(&self, token: ClaimToken, keys: &[ClaimedKey]) -> Result<Settled, StoreError>;
}

/// A store's claims in doubt, and when it last purged old tokens.
#[derive(Debug)]
pub struct InDoubtClaims {
    /// Which base algorithm, for the log.
    curve: &'static str,
    state: Mutex<State>,
    /// When tokens were last purged; `None` before the first purge.
    last_purge: Mutex<Option<Instant>>,
}

#[derive(Debug, Default)]
struct State {
    claims: Vec<(ClaimToken, Vec<ClaimedKey>)>,
    /// Whether a task is settling `claims`; it ends when they are all settled.
    settling: bool,
}

impl InDoubtClaims {
    /// An empty list for the store of `curve`.
    pub fn new(curve: &'static str) -> InDoubtClaims {
        InDoubtClaims {
            curve,
            state: Mutex::default(),
            last_purge: Mutex::new(None),
        }
    }

    /// How many claims are in doubt.
    pub fn len(&self) -> usize {
        self.lock().claims.len()
    }

    /// Whether no claim is in doubt.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The answer of a claim call: its bundles, or its error; a claim whose
    /// COMMIT went unanswered is recorded first, to be settled once the database
    /// answers again.
    pub fn answer<S: Reconcile, B>(
        &self,
        store: Weak<S>,
        claimed: Result<(B, Claim), CallError<(B, Claim)>>,
    ) -> Result<B, StoreError> {
        match claimed {
            Ok((bundles, _)) => Ok(bundles),
            Err(CallError::CommitUnanswered {
                value: (_, claim),
                error,
            }) => {
                self.record(store, claim, &error);
                Err(StoreError::Backend(error))
            }
            Err(CallError::Failed(error)) => Err(error),
        }
    }

    /// A claim's COMMIT went unanswered (`error`): keeps it to be settled by a
    /// task of its own, started unless one runs. A claim without token (database
    /// not migrated) cannot be settled: its keys are logged as possibly lost.
    pub fn record<S: Reconcile>(&self, store: Weak<S>, claim: Claim, error: &str) {
        if claim.keys.is_empty() {
            return;
        }
        let Some(token) = claim.token else {
            tracing::error!(
                curve = self.curve,
                keys = %describe(&claim.keys),
                error,
                "COMMIT of a claim went unanswered on a database without table {CLAIMS_TABLE} \
                 (run `lime-server db migrate`): these one-time pre-keys may be lost"
            );
            return;
        };
        tracing::warn!(
            curve = self.curve,
            keys = %describe(&claim.keys),
            error,
            "COMMIT of a claim went unanswered: its one-time pre-keys are in doubt until the \
             database answers again"
        );
        let start = {
            let mut state = self.lock();
            state.claims.push((token, claim.keys));
            crate::metrics::claims_in_doubt(self.curve, state.claims.len());
            !std::mem::replace(&mut state.settling, true)
        };
        if start {
            tokio::spawn(settle_until_done(store));
        }
    }

    /// Whether old tokens should be purged now (at most every few minutes); when
    /// it answers yes, the caller purges.
    pub fn purge_due(&self) -> bool {
        let mut last = self
            .last_purge
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        match *last {
            Some(at) if now.duration_since(at) < PURGE_EVERY => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Settles the store's claims in doubt, trying again every [`SETTLE_EVERY`] while
/// the database does not answer; ends when none is left or the store is gone.
async fn settle_until_done<S: Reconcile>(store: Weak<S>) {
    loop {
        tokio::time::sleep(SETTLE_EVERY).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        let in_doubt = store.in_doubt();
        let pending = in_doubt.lock().claims.clone();
        for (token, keys) in pending {
            match store.settle(token, &keys).await {
                Ok(settled) => {
                    match settled {
                        Settled::Restored(restored) => tracing::warn!(
                            curve = in_doubt.curve,
                            restored,
                            keys = %describe(&keys),
                            "a claim whose COMMIT went unanswered had committed: its undelivered \
                             one-time pre-keys are back on the server"
                        ),
                        Settled::RolledBack => tracing::info!(
                            curve = in_doubt.curve,
                            keys = %describe(&keys),
                            "a claim whose COMMIT went unanswered had rolled back: nothing to restore"
                        ),
                    }
                    let mut state = in_doubt.lock();
                    state.claims.retain(|(pending, _)| *pending != token);
                    crate::metrics::claims_in_doubt(in_doubt.curve, state.claims.len());
                }
                Err(error) => {
                    // The database does not answer yet: try again later.
                    tracing::debug!(curve = in_doubt.curve, %error, "claims in doubt not settled yet");
                    break;
                }
            }
        }
        let mut state = in_doubt.lock();
        if state.claims.is_empty() {
            state.settling = false;
            return;
        }
    }
}

/// "device Uid 3: OPk_id 7, 8; ..." for the log.
fn describe(keys: &[ClaimedKey]) -> String {
    keys.iter()
        .map(|key| format!("Uid {} OPk_id {} (row {})", key.uid, key.key_id, key.id))
        .collect::<Vec<_>>()
        .join(", ")
}
