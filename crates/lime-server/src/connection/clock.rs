//! The clock of one connection: which time limit runs now, and since when.
//!
//! A connection is always in one of three phases:
//! - receiving a request's headers, from the connection's start (after TLS) or from
//!   the first byte after an idle spell: `server.header_read_timeout_ms` runs;
//! - handling requests, from the end of a request's headers until its handler has
//!   returned: no clock of this module runs (the body read time-out in `http.rs`
//!   and the store time-out bound a handler);
//! - idle, from the end of the last handler, while nothing is received:
//!   `server.idle_timeout_ms` runs. It also bounds how long a client may take to
//!   read its answer.
//!
//! [`WatchedIo`] tells the clock when bytes arrive; each request holds a
//! [`RequestInProgress`] while its handler runs. This module only measures: what
//! to do when a limit runs out is `connection/mod.rs`'s business.

use http::Version;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// A time limit of a connection that ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// A request's headers did not arrive within `server.header_read_timeout_ms`.
    HeaderRead,
    /// No request came within `server.idle_timeout_ms` after the last one.
    Idle,
}

/// What the clock says is due on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// A time limit ran out.
    Expired(Expired),
    /// The connection has been idle for the span asked for: its HTTP state may
    /// be let go until bytes arrive ([`ConnectionClock::due`]).
    Park,
}

/// What a connection is doing, as its time limits see it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A request's headers are expected, since this instant.
    ReceivingHeaders(Instant),
    /// This many requests are being handled (several at once over HTTP/2).
    Handling(usize),
    /// No request in progress and nothing received, since this instant.
    Idle(Instant),
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// The connection speaks HTTP/2, where bytes between requests (pings, window
    /// updates, settings) do not start a request: they leave the idle clock
    /// running instead of starting the header clock.
    multiplexed: bool,
}

/// The clock of one connection, shared by its IO, its requests and its watchdog.
#[derive(Debug)]
pub struct ConnectionClock {
    state: Mutex<State>,
    /// Wakes [`ConnectionClock::expired`] when the phase changes.
    changed: Notify,
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

impl ConnectionClock {
    /// A clock for a connection that starts now, waiting for its first request.
    pub fn start(header_read_timeout: Duration, idle_timeout: Duration) -> Arc<ConnectionClock> {
        Arc::new(ConnectionClock {
            state: Mutex::new(State {
                phase: Phase::ReceivingHeaders(Instant::now()),
                multiplexed: false,
            }),
            changed: Notify::new(),
            header_read_timeout,
            idle_timeout,
        })
    }

    /// Marks a request whose headers have arrived; it is in progress until the
    /// returned guard is dropped.
    pub fn request_started(self: &Arc<Self>, version: Version) -> RequestInProgress {
        let mut state = self.state();
        state.multiplexed |= version == Version::HTTP_2;
        state.phase = match state.phase {
            Phase::Handling(requests) => Phase::Handling(requests + 1),
            Phase::ReceivingHeaders(_) | Phase::Idle(_) => Phase::Handling(1),
        };
        drop(state);
        self.changed.notify_one();
        RequestInProgress(self.clone())
    }

    /// Resolves when a time limit runs out; never while requests are handled.
    pub async fn expired(&self) -> Expired {
        match self.due(None).await {
            Due::Expired(expired) => expired,
            Due::Park => unreachable!("parking is due only when asked for"),
        }
    }

    /// Resolves when a time limit runs out or, with `park_after`, when the
    /// connection has been idle that long (whichever comes first); never while
    /// requests are handled.
    pub async fn due(&self, park_after: Option<Duration>) -> Due {
        loop {
            match self.deadline(park_after) {
                Some((at, due)) if at <= Instant::now() => return due,
                Some((at, _)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }

    /// What is due first and when; `None` while handling (or for a limit too
    /// large to reach).
    fn deadline(&self, park_after: Option<Duration>) -> Option<(Instant, Due)> {
        match self.state().phase {
            Phase::ReceivingHeaders(since) => since
                .checked_add(self.header_read_timeout)
                .map(|at| (at, Due::Expired(Expired::HeaderRead))),
            Phase::Idle(since) => {
                let idle = since
                    .checked_add(self.idle_timeout)
                    .map(|at| (at, Due::Expired(Expired::Idle)));
                let park = park_after
                    .and_then(|span| since.checked_add(span))
                    .map(|at| (at, Due::Park));
                match (idle, park) {
                    (Some(idle), Some(park)) if park.0 < idle.0 => Some(park),
                    (None, park) => park,
                    (idle, _) => idle,
                }
            }
            Phase::Handling(_) => None,
        }
    }

    /// Bytes arrived: on an idle HTTP/1 connection, the next request has begun.
    fn bytes_received(&self) {
        let mut state = self.state();
        if let Phase::Idle(_) = state.phase
            && !state.multiplexed
        {
            state.phase = Phase::ReceivingHeaders(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    fn request_finished(&self) {
        let mut state = self.state();
        state.phase = match state.phase {
            Phase::Handling(requests) if requests > 1 => Phase::Handling(requests - 1),
            _ => Phase::Idle(Instant::now()),
        };
        drop(state);
        self.changed.notify_one();
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across a panic-prone step; a poisoned one still
        // holds a consistent phase.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Held by a request while its handler runs; dropping it ends the request on the
/// connection's clock.
#[derive(Debug)]
pub struct RequestInProgress(Arc<ConnectionClock>);

impl Drop for RequestInProgress {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// The connection's byte stream (TCP, or TLS once the handshake is done), telling
/// the clock when bytes arrive.
#[derive(Debug)]
pub struct WatchedIo<S> {
    inner: S,
    clock: Arc<ConnectionClock>,
}

impl<S> WatchedIo<S> {
    /// Wraps `inner`, reporting to `clock`.
    pub fn new(inner: S, clock: Arc<ConnectionClock>) -> WatchedIo<S> {
        WatchedIo { inner, clock }
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.bytes_received();
        }
        poll
    }
}

forward_async_write!(WatchedIo);

#[cfg(test)]
mod tests {
    //! Real (short) time: a deadline is never met early, so lower bounds are exact;
    //! which limit ran out tells the phases apart.
    use super::*;

    const HEADERS: Duration = Duration::from_millis(100);
    const IDLE: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_new_connection_has_the_header_read_timeout_for_its_first_request() {
        let clock = ConnectionClock::start(HEADERS, IDLE);
        let started = Instant::now();
        assert_eq!(clock.expired().await, Expired::HeaderRead);
        assert!(started.elapsed() >= HEADERS);
    }

    #[tokio::test]
    async fn no_limit_runs_while_a_request_is_handled() {
        let clock = ConnectionClock::start(HEADERS, IDLE);
        let request = clock.request_started(Version::HTTP_11);
        let waited = tokio::time::timeout(IDLE * 2, clock.expired()).await;
        assert!(waited.is_err(), "expired while handling: {waited:?}");
        drop(request);
        let finished = Instant::now();
        assert_eq!(clock.expired().await, Expired::Idle);
        assert!(finished.elapsed() >= IDLE);
    }

    #[tokio::test]
    async fn the_first_byte_after_idle_starts_the_header_clock_over_http1() {
        let clock = ConnectionClock::start(HEADERS, IDLE);
        drop(clock.request_started(Version::HTTP_11));
        tokio::time::sleep(Duration::from_millis(50)).await;
        clock.bytes_received();
        let first_byte = Instant::now();
        assert_eq!(clock.expired().await, Expired::HeaderRead);
        assert!(first_byte.elapsed() >= HEADERS);
    }

    #[tokio::test]
    async fn bytes_between_http2_requests_leave_the_idle_clock_running() {
        let clock = ConnectionClock::start(HEADERS, IDLE);
        // Stamped before the request ends, so that the time measured from it is
        // never shorter than the clock's.
        let finished = Instant::now();
        drop(clock.request_started(Version::HTTP_2));
        tokio::time::sleep(Duration::from_millis(50)).await;
        clock.bytes_received();
        assert_eq!(clock.expired().await, Expired::Idle);
        assert!(finished.elapsed() >= IDLE);
    }

    #[tokio::test]
    async fn parking_is_due_after_its_span_of_idleness_and_never_after_the_idle_limit() {
        let clock = ConnectionClock::start(HEADERS, IDLE);
        let park_after = Some(Duration::from_millis(50));
        // Stamped before the request ends, so that the time measured from it is
        // never shorter than the clock's.
        let finished = Instant::now();
        drop(clock.request_started(Version::HTTP_11));
        assert_eq!(clock.due(park_after).await, Due::Park);
        assert!(finished.elapsed() >= Duration::from_millis(50));
        // Asked for later than the idle limit, the limit comes first.
        assert_eq!(clock.due(Some(IDLE * 2)).await, Due::Expired(Expired::Idle));
        // Receiving a request's headers is never parked.
        clock.bytes_received();
        assert_eq!(
            clock.due(park_after).await,
            Due::Expired(Expired::HeaderRead)
        );
    }

    #[tokio::test]
    async fn the_connection_is_idle_only_once_every_request_ended() {
        let clock = ConnectionClock::start(HEADERS, IDLE);
        let first = clock.request_started(Version::HTTP_2);
        let second = clock.request_started(Version::HTTP_2);
        drop(first);
        let waited = tokio::time::timeout(IDLE * 2, clock.expired()).await;
        assert!(waited.is_err(), "expired with a request in progress");
        drop(second);
        assert_eq!(clock.expired().await, Expired::Idle);
    }
}
