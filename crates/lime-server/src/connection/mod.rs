//! Serves one accepted connection: the TLS handshake, then HTTP/1.1 or HTTP/2 by
//! hyper, under the time limits that keep a slow or silent client from holding
//! one of the `server.max_connections` places for long.
//!
//! Why the header and idle clocks are ours ([`clock`]) and hyper's are off
//! (hyper 1.12, hyper-util 0.1.21):
//! - hyper's HTTP/1 `header_read_timeout` (`proto/h1/conn.rs`, `poll_read_head`)
//!   starts when hyper first asks for a request head and runs, not reset by the
//!   bytes that trickle in, until the head is whole; when it runs out the
//!   connection is closed without an answer. It is armed again as soon as an
//!   answer is sent (`State::idle` sets `notify_read`), so it also closes idle
//!   keep-alive connections, after the same time: one key could not mean both
//!   "headers within 10 s" and "idle for 60 s".
//! - hyper-util's `auto::Builder` first reads bytes to tell HTTP/2's preface from
//!   HTTP/1 (`server/conn/auto/mod.rs`, `ReadVersion`), with no timer: hyper's
//!   header timer starts only after the first byte, and a client that connects
//!   and sends nothing was never cut off.
//! - HTTP/2 has no header or idle time-out in hyper at all (only keep-alive pings,
//!   which a live client answers).
//! - Graceful shutdown does not close an HTTP/1 connection before its first
//!   request head is whole (it only turns keep-alive off), so a connection that
//!   runs out of header time is dropped, not shut down gracefully.
//!
//! What a connection may make the server hold is bounded too, for what a LIME
//! client does (one request at a time per device): a request head of at most
//! `server.max_header_bytes` (HTTP/1: hyper's read buffer, which also bounds what
//! is read ahead of a body; HTTP/2: the header list), and over HTTP/2 a few
//! streams with small flow-control windows ([`Http2Bounds`]), since hyper's h2
//! buffers what a client sends on a stream up to its window whether or not the
//! request is ever let in. hyper's defaults (200 streams, 1 MiB windows, a ~400 KB
//! HTTP/1 buffer) let one stranger make the server hold megabytes.

/// Implements `AsyncWrite` for a stream wrapper `$wrapper<S>` by passing every
/// call to its `inner` stream: the wrappers here only change reading.
macro_rules! forward_async_write {
    ($wrapper:ident) => {
        impl<S: AsyncWrite + Unpin> AsyncWrite for $wrapper<S> {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

pub mod clock;
mod rewind;
mod tls_stream;

use crate::auth::ClientAddress;
use crate::auth::certificate::{CertificateIdentity, CertificateIdentityError, PeerCertificate};
use crate::http::{self, HttpState};
use crate::metrics::{self, TimeLimit};
use bytes::Bytes;
use clock::{ConnectionClock, Due, Expired, WatchedIo};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{Service, service_fn};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rewind::Rewind;
use rustls::ServerConfig;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
pub use tls_stream::TlsStream;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// How long an idle connection's graceful close (an HTTP/2 GOAWAY, the end of an
/// answer the client is slow to read) may take before the connection is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How much one HTTP/2 connection may make the server hold. A LIME client sends
/// one request at a time per device; bodies are a few KB (the largest, a
/// registerUser with 100 C448MLK1024 one-time keys, about 170 KB).
pub struct Http2Bounds;

impl Http2Bounds {
    /// Streams open at once on one connection (hyper's default: 200).
    pub const MAX_CONCURRENT_STREAMS: u32 = 16;
    /// What a client may send on one stream before the server has read it
    /// (hyper's default: 1 MiB). A larger body takes more round trips.
    pub const STREAM_WINDOW: u32 = 64 * 1024;
    /// What a client may send on all streams of a connection before the server
    /// has read it (hyper's default: 1 MiB): what a stranger's connection can
    /// make the server hold beyond its headers.
    pub const CONNECTION_WINDOW: u32 = 128 * 1024;
    /// Largest frame (the protocol's least, and hyper's default).
    pub const MAX_FRAME_SIZE: u32 = 16 * 1024;
    /// Answer bytes queued per stream ahead of the client's window (hyper's
    /// default: 400 KB).
    pub const MAX_SEND_BUFFER: usize = 64 * 1024;
}

/// The time and size limits of every connection (`[server]`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// From accept to the end of the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// From the connection's start, or the first byte after an idle spell, until a
    /// request's headers are whole.
    pub header_read_timeout: Duration,
    /// From the end of the last request while nothing is received (HTTP/1) or no
    /// request comes (HTTP/2).
    pub idle_timeout: Duration,
    /// Largest request head (`server.max_header_bytes`).
    pub max_header_bytes: usize,
}

/// How long an HTTP/1 connection over TLS stays idle before its HTTP state is let
/// go (parked): hyper's read and write buffers and its dispatcher (about 25 KiB),
/// taken again when the next bytes arrive, which costs a few microseconds. A
/// client's request pair (a 401 and the same request with credentials) comes
/// well within it. Short, because the memory that parking connections free is
/// reused by those still busy and stays with the process: with 1 s, the
/// connections set up in the last second all held their HTTP state at once,
/// and 10,000 idle connections left 131 MiB resident rather than 111.
pub const PARK_AFTER: Duration = Duration::from_millis(100);

/// Serves `stream` until the client closes it, a time limit runs out, or `stopped`
/// turns true and the requests in flight are answered.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<ServerConfig>>,
    state: Arc<HttpState>,
    limits: ConnectionLimits,
    stopped: watch::Receiver<bool>,
) {
    // The connection's task lives as long as the connection, and a future is
    // as large as its largest state: what only some of its life needs (the
    // handshake, hyper's state) is boxed, so that an idle parked connection's
    // task holds little beyond its TLS session (see `serve_parked_http1`).
    let Some(config) = tls else {
        Box::pin(serve_http(stream, peer, None, state, limits, stopped)).await;
        return;
    };
    let Some(Handshaken {
        stream,
        peer_certificate,
        h2,
    }) = Box::pin(handshake(config, stream, peer, limits)).await
    else {
        return;
    };
    // HTTP/2 only when the client asked for it (ALPN, RFC 9113 section 3.2);
    // otherwise HTTP/1.1, parked while idle.
    if h2 {
        Box::pin(serve_http(
            stream,
            peer,
            peer_certificate,
            state,
            limits,
            stopped,
        ))
        .await;
    } else {
        serve_parked_http1(stream, peer, peer_certificate, state, limits, stopped).await;
    }
}

/// A TLS session on its connection, boxed: at about 1.2 KB it is the largest
/// thing a parked connection holds, and a future keeps room for each variable
/// and argument that may hold it (an async fn's arguments stay in its future
/// for its whole life), so it is moved from state to state as a pointer.
type TlsConnection = Box<TlsStream>;

/// A connection whose TLS handshake is done.
struct Handshaken {
    stream: TlsConnection,
    /// The client certificate's names, when it presented one.
    peer_certificate: Option<PeerCertificate>,
    /// Whether the client asked for HTTP/2 (ALPN).
    h2: bool,
}

/// The TLS handshake, within `server.tls_handshake_timeout_ms`; `None` (logged)
/// when it fails, runs out of time, or the client's certificate is unreadable.
async fn handshake(
    config: Arc<ServerConfig>,
    stream: TcpStream,
    peer: SocketAddr,
    limits: ConnectionLimits,
) -> Option<Handshaken> {
    let stream = match tokio::time::timeout(
        limits.tls_handshake_timeout,
        TlsStream::accept(config, stream),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            metrics::closed_by_time_limit(TimeLimit::TlsHandshake);
            tracing::info!(
                %peer,
                limit_ms = limits.tls_handshake_timeout.as_millis(),
                "closed: TLS handshake not finished within server.tls_handshake_timeout_ms"
            );
            return None;
        }
    };
    let peer_certificate = match peer_certificate(&stream) {
        Ok(peer_certificate) => peer_certificate,
        Err(error) => {
            tracing::warn!(%peer, %error, "unreadable client certificate, connection closed");
            return None;
        }
    };
    let h2 = stream.session().alpn_protocol() == Some(b"h2");
    Some(Handshaken {
        stream: Box::new(stream),
        peer_certificate,
        h2,
    })
}

/// What [`http::handle`] answers.
type Answer = Response<Full<Bytes>>;

/// A request's answer to come, boxed.
type AnswerFuture = Pin<Box<dyn Future<Output = Result<Answer, Infallible>> + Send>>;

/// The hyper service of a connection: every request carries the client's
/// address and its verified client certificate, if any, and is timed on the
/// connection's clock. Its futures are boxed, so that an HTTP/1 connection can
/// be run without shutting down its stream (hyper asks for `Unpin` there).
fn connection_service(
    clock: &Arc<ConnectionClock>,
    state: Arc<HttpState>,
    peer: SocketAddr,
    peer_certificate: Option<PeerCertificate>,
) -> impl Service<Request<Incoming>, Response = Answer, Error = Infallible, Future = AnswerFuture> + Clone
{
    let clock = clock.clone();
    service_fn(move |mut request: Request<Incoming>| {
        let in_progress = clock.request_started(request.version());
        let state = state.clone();
        request.extensions_mut().insert(ClientAddress(peer));
        if let Some(certificate) = &peer_certificate {
            request.extensions_mut().insert(certificate.clone());
        }
        let answer: AnswerFuture = Box::pin(async move {
            let answer = http::handle(&state, request).await;
            drop(in_progress);
            answer
        });
        answer
    })
}

/// Serves HTTP/1 or HTTP/2 (hyper-util tells them apart) on a connection (TLS
/// already done), watching its clock.
async fn serve_http<S>(
    stream: S,
    peer: SocketAddr,
    peer_certificate: Option<PeerCertificate>,
    state: Arc<HttpState>,
    limits: ConnectionLimits,
    mut stopped: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let clock = ConnectionClock::start(limits.header_read_timeout, limits.idle_timeout);
    let service = connection_service(&clock, state, peer, peer_certificate);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The clock above times the headers, for HTTP/1 and HTTP/2 alike. The head
    // must fit hyper's read buffer: over it, hyper answers 431 and closes.
    builder
        .http1()
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes);
    // Over the header list size, h2 answers the stream 431 itself.
    builder
        .http2()
        .max_concurrent_streams(Http2Bounds::MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(Http2Bounds::STREAM_WINDOW)
        .initial_connection_window_size(Http2Bounds::CONNECTION_WINDOW)
        .max_frame_size(Http2Bounds::MAX_FRAME_SIZE)
        .max_send_buf_size(Http2Bounds::MAX_SEND_BUFFER)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let connection =
        builder.serve_connection(TokioIo::new(WatchedIo::new(stream, clock.clone())), service);
    tokio::pin!(connection);
    // hyper shuts the stream down itself when the connection ends.
    drive(connection, &clock, peer, limits, &mut stopped, None).await;
}

/// Serves HTTP/1.1 over TLS, letting go of hyper's state while the connection is
/// idle: after [`PARK_AFTER`] without a request, hyper's connection is shut down
/// gracefully but its stream kept (with the bytes hyper had read ahead, if any);
/// the task then waits for the socket to become readable, or for the idle limit
/// or the server's stop, and serves the stream with a new hyper connection.
/// What a parked connection holds is its TLS session (about 3.5 KB: rustls's
/// state, without a buffer, see [`TlsStream`]) and this task (about 1.4 KB: the
/// serving spells are boxed by [`ServedUntilIdle`]).
async fn serve_parked_http1(
    stream: TlsConnection,
    peer: SocketAddr,
    peer_certificate: Option<PeerCertificate>,
    state: Arc<HttpState>,
    limits: ConnectionLimits,
    mut stopped: watch::Receiver<bool>,
) {
    let clock = ConnectionClock::start(limits.header_read_timeout, limits.idle_timeout);
    let service = connection_service(&clock, state, peer, peer_certificate);
    let mut builder = http1::Builder::new();
    builder
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes);
    let mut stream = WatchedIo::new(stream, clock.clone());
    let mut read_ahead = Bytes::new();
    loop {
        let serving = ServedUntilIdle {
            builder: &builder,
            service: service.clone(),
            clock: &clock,
            peer,
            limits,
        };
        let ended;
        (ended, stream, read_ahead) = Box::pin(serving.run(stream, read_ahead, &mut stopped)).await;
        match ended {
            Ended::Parked => {}
            Ended::Closed => {
                // What hyper would have done: close the TLS session and the
                // stream, within the grace of an idle close.
                let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, stream.shutdown()).await;
                return;
            }
            Ended::Dropped => return,
        }
        if !read_ahead.is_empty() {
            continue;
        }
        let _parked = metrics::CountedConnection::parked();
        tokio::select! {
            readable = stream.get_ref().tcp().readable() => {
                if readable.is_err() {
                    return;
                }
            }
            expired = clock.expired() => {
                if expired == Expired::Idle {
                    metrics::closed_by_time_limit(TimeLimit::Idle);
                    tracing::debug!(
                        %peer,
                        limit_ms = limits.idle_timeout.as_millis(),
                        "closing: idle for server.idle_timeout_ms"
                    );
                }
                let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, stream.shutdown()).await;
                return;
            }
            _ = stopped.changed() => {
                let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, stream.shutdown()).await;
                return;
            }
        }
    }
}

/// One spell of HTTP/1 serving on a parked connection's stream, until it ends
/// or is idle for [`PARK_AFTER`]; boxed by its caller, so that hyper's state and
/// the clocks that [`drive`] watches are held only while the spell lasts.
struct ServedUntilIdle<'a, S> {
    builder: &'a http1::Builder,
    service: S,
    clock: &'a ConnectionClock,
    peer: SocketAddr,
    limits: ConnectionLimits,
}

impl<S> ServedUntilIdle<'_, S>
where
    S: Service<Request<Incoming>, Response = Answer, Error = Infallible, Future = AnswerFuture>
        + Unpin,
{
    /// Serves `stream` (after the bytes of `read_ahead`), and gives it back with
    /// the bytes hyper had read ahead of a request, if any.
    async fn run(
        self,
        stream: WatchedIo<TlsConnection>,
        read_ahead: Bytes,
        stopped: &mut watch::Receiver<bool>,
    ) -> (Ended, WatchedIo<TlsConnection>, Bytes) {
        let mut connection = KeepStream(
            self.builder
                .serve_connection(TokioIo::new(Rewind::new(read_ahead, stream)), self.service),
        );
        let ended = drive(
            Pin::new(&mut connection),
            self.clock,
            self.peer,
            self.limits,
            stopped,
            Some(PARK_AFTER),
        )
        .await;
        let parts = connection.0.into_parts();
        let (unread, stream) = parts.io.into_inner().into_parts();
        (ended, stream, [unread, parts.read_buf].concat().into())
    }
}

/// How serving a connection with hyper came to an end.
enum Ended {
    /// hyper's connection ended (the client closed, or it was shut down
    /// gracefully for the idle limit or the server's stop).
    Closed,
    /// Let go while idle, on purpose: the stream stays open.
    Parked,
    /// Cut off (headers too slow, an idle close that did not finish, an error):
    /// the stream is to be dropped.
    Dropped,
}

/// A hyper connection that [`drive`] runs and can ask to end gracefully.
trait Served {
    fn poll_served(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>;
    fn shut_down_gracefully(self: Pin<&mut Self>);
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<I, S, E, B> Served for auto::Connection<'_, I, S, E>
where
    Self: Future<Output = Result<(), BoxError>>,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper_util::server::conn::auto::HttpServerConnExec<S::Future, B>,
{
    fn poll_served(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.poll(cx)
    }

    fn shut_down_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// An HTTP/1 connection run without shutting down its stream at the end, so
/// that the stream can be taken back ([`http1::Connection::into_parts`]).
struct KeepStream<I, S: hyper::service::HttpService<Incoming>>(http1::Connection<I, S>);

impl<I, S> Served for KeepStream<I, S>
where
    http1::Connection<I, S>: Unpin,
    S: hyper::service::HttpService<Incoming> + Unpin,
    S::Future: Unpin,
    S::Error: Into<BoxError>,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    fn poll_served(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.get_mut()
            .0
            .poll_without_shutdown(cx)
            .map_err(Into::into)
    }

    fn shut_down_gracefully(self: Pin<&mut Self>) {
        Pin::new(&mut self.get_mut().0).graceful_shutdown();
    }
}

/// Runs a hyper connection under the connection's time limits: the header
/// limit cuts it off, the idle limit and the server's stop end it gracefully,
/// and with `park_after` an idle spell that long ends it gracefully too, to be
/// parked.
async fn drive<C: Served + ?Sized>(
    mut connection: Pin<&mut C>,
    clock: &ConnectionClock,
    peer: SocketAddr,
    limits: ConnectionLimits,
    stopped: &mut watch::Receiver<bool>,
    park_after: Option<Duration>,
) -> Ended {
    let mut stopping = false;
    let mut parking = false;
    let mut idle_close_by = None;
    let result = loop {
        tokio::select! {
            result = std::future::poll_fn(|cx| connection.as_mut().poll_served(cx)) => break result,
            due = clock.due(park_after), if idle_close_by.is_none() && !parking => match due {
                Due::Expired(Expired::HeaderRead) => {
                    metrics::closed_by_time_limit(TimeLimit::HeaderRead);
                    tracing::warn!(
                        %peer,
                        limit_ms = limits.header_read_timeout.as_millis(),
                        "closed: request headers not received within server.header_read_timeout_ms"
                    );
                    return Ended::Dropped;
                }
                Due::Expired(Expired::Idle) => {
                    metrics::closed_by_time_limit(TimeLimit::Idle);
                    tracing::debug!(
                        %peer,
                        limit_ms = limits.idle_timeout.as_millis(),
                        "closing: idle for server.idle_timeout_ms"
                    );
                    connection.as_mut().shut_down_gracefully();
                    idle_close_by = Some(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                }
                Due::Park => {
                    connection.as_mut().shut_down_gracefully();
                    parking = true;
                }
            },
            () = sleep_until_some(idle_close_by) => return Ended::Dropped,
            _ = stopped.changed(), if !stopping => {
                // Answers the requests in flight, then closes; a client still
                // sending its headers is cut off by the clock.
                connection.as_mut().shut_down_gracefully();
                stopping = true;
            }
        }
    };
    match result {
        Ok(()) if parking && !stopping => Ended::Parked,
        Ok(()) => Ended::Closed,
        Err(error) => {
            let head_too_large = error
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_parse_too_large);
            if head_too_large {
                tracing::warn!(
                    %peer,
                    limit = limits.max_header_bytes,
                    "refused: request headers over server.max_header_bytes (431, connection closed)"
                );
            } else {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            Ended::Dropped
        }
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The names of the certificate the client presented in the handshake (already
/// verified by rustls), or `None` when it presented none.
fn peer_certificate(
    stream: &TlsStream,
) -> Result<Option<PeerCertificate>, CertificateIdentityError> {
    let Some(end_entity) = stream
        .session()
        .peer_certificates()
        .and_then(|chain| chain.first())
    else {
        return Ok(None);
    };
    let identity = CertificateIdentity::from_der(end_entity)?;
    Ok(Some(PeerCertificate(Arc::new(identity))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn returned_size<A, B, C, D, E, G, F>(_: impl Fn(A, B, C, D, E, G) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_connection_task_holds_neither_hyper_nor_its_tls_session_inline() {
        // A task's future is as large as its largest state, for the whole
        // connection's life: 11.9 KB when hyper's connection and a copy of the
        // TLS session (1.2 KB) were inline, about 1.3 KB now.
        assert!(std::mem::size_of::<TlsStream>() > 1_000);
        let serve = returned_size(serve);
        assert!(serve < 2_048, "serve's future: {serve} bytes");
    }
}
