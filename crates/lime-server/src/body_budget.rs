//! The budget of request bodies buffered at once, in bytes
//! (`server.max_buffered_body_bytes`), shared by every connection.
//!
//! A body is read only once its request is let in (authenticated, or anyone when
//! authentication is off), and only against this budget: the bytes its
//! Content-Length declares are reserved before the first byte is read, a body
//! without one (chunked HTTP/1, HTTP/2 without content-length) reserves each chunk
//! as it arrives. The reservation is held until the request is answered. When the
//! budget is spent the request is refused at once (503 + Retry-After), never
//! queued, and a warning naming the key is logged at most once a second with the
//! count refused since the last one.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Least time between two log lines about bodies refused over the budget.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The bytes of request bodies the server holds at once.
pub struct BodyBudget {
    /// One permit per byte.
    permits: Arc<Semaphore>,
    /// The budget (`server.max_buffered_body_bytes`), for the log line.
    bytes: usize,
    /// Refusals not yet logged, and when the last line was written.
    refusals: Mutex<Refusals>,
}

#[derive(Default)]
struct Refusals {
    since_last_line: u64,
    last_line: Option<Instant>,
}

/// Bytes of the budget held by one request's body; given back when dropped.
pub struct BodyReservation {
    permits: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
}

/// The budget is spent: the request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget;

impl BodyBudget {
    /// A budget of `bytes` bytes.
    pub fn new(bytes: usize) -> BodyBudget {
        BodyBudget {
            permits: Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))),
            bytes,
            refusals: Mutex::default(),
        }
    }

    /// An empty reservation, grown with [`BodyReservation::grow`].
    pub fn reservation(&self) -> BodyReservation {
        BodyReservation {
            permits: self.permits.clone(),
            held: None,
        }
    }

    /// Bytes of the budget not reserved now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Counts a request refused over the budget and logs it, at most once every
    /// [`REFUSAL_LOG_INTERVAL`] with the count since the last line. Returns the
    /// count logged, if a line was written.
    pub fn refused(&self, peer: &str, needed: usize) -> Option<u64> {
        let mut refusals = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        refusals.since_last_line += 1;
        if refusals
            .last_line
            .is_some_and(|at| at.elapsed() < REFUSAL_LOG_INTERVAL)
        {
            return None;
        }
        tracing::warn!(
            peer,
            needed,
            limit = self.bytes,
            refused = refusals.since_last_line,
            "refused request bodies: server.max_buffered_body_bytes in use by bodies being \
             read (503; count since the last such line, peer of the latest)"
        );
        refusals.last_line = Some(Instant::now());
        Some(std::mem::take(&mut refusals.since_last_line))
    }
}

impl BodyReservation {
    /// Reserves `bytes` more, at once or not at all.
    pub fn grow(&mut self, bytes: usize) -> Result<(), OverBudget> {
        if bytes == 0 {
            return Ok(());
        }
        let bytes = u32::try_from(bytes).map_err(|_| OverBudget)?;
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(bytes)
            .map_err(|_| OverBudget)?;
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        Ok(())
    }

    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        self.held.as_ref().map_or(0, |held| held.num_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_budget_and_give_it_back_when_dropped() {
        let budget = BodyBudget::new(100);
        let mut first = budget.reservation();
        first.grow(60).unwrap();
        let mut second = budget.reservation();
        assert_eq!(second.grow(50), Err(OverBudget), "all or nothing");
        second.grow(30).unwrap();
        second.grow(10).unwrap();
        assert_eq!(second.bytes(), 40);
        assert_eq!(budget.available(), 0);
        drop(first);
        assert_eq!(budget.available(), 60);
        drop(second);
        assert_eq!(budget.available(), 100);
    }

    #[tokio::test]
    async fn refusals_are_logged_once_a_second_with_their_count() {
        let budget = BodyBudget::new(10);
        assert_eq!(budget.refused("192.0.2.1:1", 20), Some(1));
        for _ in 0..99 {
            assert_eq!(budget.refused("192.0.2.1:1", 20), None);
        }
        tokio::time::sleep(REFUSAL_LOG_INTERVAL).await;
        assert_eq!(budget.refused("192.0.2.1:1", 20), Some(100));
    }
}
