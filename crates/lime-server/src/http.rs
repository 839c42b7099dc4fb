//! HTTP in front of the service: routes, method, body cap, content type and
//! sender, then the X3DH answer as an HTTP 200.
//!
//! Every X3DH answer, errors included, goes out as `200` with
//! `Content-Type: x3dh/octet-stream` (the client reads no other status). Requests
//! that are not X3DH at all get a plain 4xx: 404 for another path, 405 for another
//! method, 413 for a body over the cap (refused before it is read whole).
//!
//! An unauthenticated request costs its headers (the threat model's invariant 3):
//! authentication is decided from the headers and refused (401/403/429/503)
//! before any of the body is read; a refused request's body is then thrown away
//! as it comes, never held (so that a client that sent it keeps its connection),
//! for a second at most. A body is kept only for a request let in, and only within
//! the budget of bodies buffered at once ([`BodyBudget`]; 503 when it is spent).

use crate::auth::{self, AuthFailure, Authenticator, ClientAddress, Refusal};
use crate::body_budget::{BodyBudget, BodyReservation};
use crate::error::RequestError;
use crate::metrics::{self, TimeLimit};
use crate::service::{KeyService, error_answer};
use crate::telemetry::clip;
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::time::{Duration, Instant};

/// Longest time a refused request's body is read (and thrown away) before the
/// answer: a client that sent its body keeps its connection; one that stalls is
/// answered and cut off after this.
const REFUSED_BODY_DRAIN: Duration = Duration::from_secs(1);

/// The media type of every X3DH message.
pub const X3DH_CONTENT_TYPE: &str = "x3dh/octet-stream";

/// What the HTTP layer needs to answer a request.
pub struct HttpState {
    /// The protocol handlers.
    pub service: KeyService,
    /// Who may act for which device.
    pub auth: Authenticator,
    /// Paths that accept X3DH requests.
    pub paths: Vec<String>,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// The bytes of bodies buffered at once, all requests together
    /// (`server.max_buffered_body_bytes`).
    pub body_budget: BodyBudget,
    /// Longest wait for a request's body, from the end of its headers
    /// (`server.body_read_timeout_ms`).
    pub body_read_timeout: Duration,
    /// Longest wait for a store in the readiness check.
    pub readiness_timeout: Duration,
}

/// Answers one HTTP request.
pub async fn handle(
    state: &HttpState,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    let response = if state.paths.iter().any(|accepted| accepted == path) {
        let response = if request.method() == Method::POST {
            x3dh(state, request).await
        } else {
            tracing::warn!(method = %request.method(), path = %clip(path), "refused: X3DH requests are POSTed");
            method_not_allowed("POST")
        };
        if response.status() != StatusCode::OK {
            metrics::http_refused(response.status());
        }
        response
    } else {
        match path {
            "/health" if request.method() == Method::GET => plain(StatusCode::OK, "ok\n"),
            "/ready" if request.method() == Method::GET => readiness(state).await,
            "/health" | "/ready" => method_not_allowed("GET"),
            _ => {
                tracing::warn!(method = %request.method(), path = %clip(path), "refused: no such path");
                plain(StatusCode::NOT_FOUND, "not found\n")
            }
        }
    };
    Ok(response)
}

/// An X3DH POST, in the order that keeps a stranger's cost to its headers: the
/// declared size, then the content type and sender header, then authentication
/// (from the headers alone), and only then the body, against the body budget.
async fn x3dh(state: &HttpState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let (parts, mut body) = request.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.max_body_bytes as u64) {
        return too_large(state, declared);
    }
    let claimed = match check_content_type(&parts.headers)
        .and_then(|()| auth::sender_from_headers(&parts.headers))
    {
        Ok(claimed) => claimed,
        Err(error) => {
            // The X3DH error echoes the request's curve byte, the body's third:
            // read that far, then the rest thrown away as it comes.
            let curve_byte = curve_byte_of(state, &mut body).await;
            discard_body(state, parts, body).await;
            let answer = error_answer(curve_byte, None, &error);
            metrics::x3dh_answered(&[], &answer, started.elapsed());
            return x3dh_answer(curve_byte, answer);
        }
    };
    let sender = match state.auth.authenticate(claimed, &parts).await {
        Ok(sender) => sender,
        // Decided from the headers: the body is thrown away, never held.
        Err(failure) => {
            discard_body(state, parts, body).await;
            return refused(state, failure);
        }
    };
    // Held until the answer is built: the body's bytes count against the budget
    // for as long as they are in memory.
    let (body, _reservation) = match read_body(state, &parts, body, declared).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    if let Some(peer) = sender.forwarded_by() {
        // Federation: a peer server asks for bundles, nothing else.
        if body.get(1) != Some(&lime_protocol::MessageType::GetPeerBundle.byte()) {
            tracing::warn!(
                peer,
                sender = %clip(sender.device_id().as_str()),
                message_type = body.get(1).copied().unwrap_or(0),
                "refused: a peer server may only send getPeerBundle"
            );
            return plain(
                StatusCode::FORBIDDEN,
                "a peer server may only ask for key bundles\n",
            );
        }
    }
    let curve_byte = body.get(2).copied().unwrap_or(0);
    let answer = state.service.handle(&sender, &body).await;
    metrics::x3dh_answered(&body, &answer, started.elapsed());
    x3dh_answer(curve_byte, answer)
}

/// The third byte of the body (the curve byte of an X3DH message), reading at
/// most what the client sent up to it, within `server.body_read_timeout_ms`; 0
/// when the body is shorter or does not come.
async fn curve_byte_of(state: &HttpState, body: &mut Incoming) -> u8 {
    let read = async {
        let mut seen = 0;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                if seen + data.len() > 2 {
                    return data[2 - seen];
                }
                seen += data.len();
            }
        }
        0
    };
    tokio::time::timeout(state.body_read_timeout, read)
        .await
        .unwrap_or(0)
}

/// Reads what is left of a refused request's body and throws each piece away as
/// it comes, within [`REFUSED_BODY_DRAIN`] and `server.max_body_bytes`: nothing is
/// held, and a client that sent its whole body (as liblime does before its 401,
/// and as HTTP/2 clients expect before the stream's end) keeps its connection for
/// the next request. A body still coming after that is left unread: hyper then
/// closes the connection after the answer (HTTP/1) or resets the stream (HTTP/2).
/// A client waiting for `100 Continue` has sent nothing: it gets its answer at
/// once, and the body is never asked for.
///
/// The request's head is let go first: its header values are slices of the
/// buffer hyper read the head into, and while one is held, hyper cannot read the
/// body into that buffer again and takes another (about 8 KiB more for each
/// refused connection, which 1,000 strangers multiply).
async fn discard_body(state: &HttpState, parts: http::request::Parts, mut body: Incoming) {
    let waits_for_continue = parts
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    drop(parts);
    if waits_for_continue {
        return;
    }
    let drain = async {
        let mut left = state.max_body_bytes;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                let Some(rest) = left.checked_sub(data.len()) else {
                    return;
                };
                left = rest;
            }
        }
    };
    let _ = tokio::time::timeout(REFUSED_BODY_DRAIN.min(state.body_read_timeout), drain).await;
}

/// Why a body was not read whole.
enum BodyError {
    /// Over `server.max_body_bytes`.
    TooLarge,
    /// The budget of bodies buffered at once is spent.
    OverBudget { needed: usize },
    /// The connection failed or the framing was wrong.
    Unreadable(Box<dyn std::error::Error + Send + Sync>),
}

/// Reads the body of a request that was let in: within `server.max_body_bytes`,
/// `server.body_read_timeout_ms` and the body budget. The bytes its Content-Length
/// declares are reserved before the first is read; without one, each chunk is
/// reserved as it arrives. The reservation comes back with the body.
async fn read_body(
    state: &HttpState,
    parts: &http::request::Parts,
    body: Incoming,
    declared: Option<u64>,
) -> Result<(Bytes, BodyReservation), Response<Full<Bytes>>> {
    // At most max_body_bytes, checked above.
    let declared = declared.map(|len| len as usize);
    let mut reservation = state.body_budget.reservation();
    let read = async {
        if let Some(len) = declared {
            reservation
                .grow(len)
                .map_err(|_| BodyError::OverBudget { needed: len })?;
        }
        let mut body = Limited::new(body, state.max_body_bytes);
        let mut received: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| {
                if error.downcast_ref::<LengthLimitError>().is_some() {
                    BodyError::TooLarge
                } else {
                    BodyError::Unreadable(error)
                }
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if received.capacity() - received.len() < data.len() {
                match declared {
                    // Allocated once, as declared (hyper checks the length).
                    Some(len) => received
                        .reserve_exact(len.max(received.len() + data.len()) - received.len()),
                    None => received.reserve(data.len()),
                }
            }
            // What is allocated is what the budget counts.
            let needed = received.capacity().saturating_sub(reservation.bytes());
            reservation
                .grow(needed)
                .map_err(|_| BodyError::OverBudget { needed })?;
            received.extend_from_slice(&data);
        }
        Ok(Bytes::from(received))
    };
    // The headers are whole once the handler runs: the body's time starts now.
    let result = tokio::time::timeout(state.body_read_timeout, read).await;
    let peer = client_address(parts);
    match result {
        Ok(Ok(body)) => Ok((body, reservation)),
        Ok(Err(BodyError::TooLarge)) => Err(too_large(state, declared.map(|len| len as u64))),
        Ok(Err(BodyError::OverBudget { needed })) => {
            state.body_budget.refused(&peer, needed);
            let mut response = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many request bodies being received, try again\n",
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, http::HeaderValue::from(1));
            Err(response)
        }
        Ok(Err(BodyError::Unreadable(error))) => {
            tracing::warn!(%peer, %error, "refused: request body could not be read");
            Err(plain(
                StatusCode::BAD_REQUEST,
                "request body could not be read\n",
            ))
        }
        Err(_) => {
            metrics::closed_by_time_limit(TimeLimit::BodyRead);
            // Answered, then closed: hyper does not keep a connection whose request
            // body was not read to its end.
            tracing::warn!(
                %peer,
                limit_ms = state.body_read_timeout.as_millis(),
                declared = ?declared,
                "refused: request body not received within server.body_read_timeout_ms"
            );
            Err(plain(
                StatusCode::REQUEST_TIMEOUT,
                "request body too slow\n",
            ))
        }
    }
}

/// The HTTP 200 carrying an X3DH answer.
fn x3dh_answer(curve_byte: u8, answer: lime_protocol::ResponseMessage) -> Response<Full<Bytes>> {
    match answer.encode() {
        Ok(bytes) => x3dh_response(bytes),
        Err(error) => {
            let error = RequestError::from(error);
            let fallback = error_answer(curve_byte, None, &error);
            // An error answer has no list in it: it always encodes.
            x3dh_response(fallback.encode().unwrap_or_default())
        }
    }
}

/// The plain HTTP answer to a request authentication refused, logged with why.
fn refused(state: &HttpState, failure: AuthFailure) -> Response<Full<Bytes>> {
    let AuthFailure {
        refusal,
        reason,
        routine,
        method,
        cause,
    } = failure;
    metrics::auth_failed(method, cause);
    if routine {
        tracing::debug!(%reason, "authentication");
    } else if refusal == Refusal::Unavailable {
        tracing::error!(%reason, "refused: cannot authenticate");
    } else {
        tracing::warn!(%reason, "refused: authentication");
    }
    match refusal {
        Refusal::Challenge {
            realm,
            stale,
            algorithms,
        } => {
            let mut response = plain(StatusCode::UNAUTHORIZED, "authentication required\n");
            for challenge in state.auth.challenges(&realm, stale, &algorithms) {
                if let Ok(value) = http::HeaderValue::from_str(&challenge) {
                    response.headers_mut().append(WWW_AUTHENTICATE, value);
                }
            }
            response
        }
        Refusal::Forbidden => plain(
            StatusCode::FORBIDDEN,
            "the authenticated identity may not act for this device id\n",
        ),
        Refusal::LockedOut(retry_after) => {
            let mut response = plain(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed authentications, try again later\n",
            );
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(RETRY_AFTER, http::HeaderValue::from(seconds));
            response
        }
        Refusal::Unavailable => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "authentication is unavailable, try again later\n",
        ),
    }
}

/// The client's address for a log line ("unknown" outside a served connection).
fn client_address(parts: &http::request::Parts) -> String {
    parts
        .extensions
        .get::<ClientAddress>()
        .map_or_else(|| "unknown".to_owned(), |address| address.0.to_string())
}

fn check_content_type(headers: &HeaderMap) -> Result<(), RequestError> {
    let value = headers
        .get(CONTENT_TYPE)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let media_type = value
        .as_deref()
        .and_then(|value| value.split(';').next())
        .map(str::trim);
    match media_type {
        Some(media_type) if media_type.eq_ignore_ascii_case(X3DH_CONTENT_TYPE) => Ok(()),
        _ => Err(RequestError::BadContentType(value)),
    }
}

/// Pings every store at once, all within one readiness time-out, so that a probe
/// is answered in that time however many curves are down.
async fn readiness(state: &HttpState) -> Response<Full<Bytes>> {
    let mut pings = tokio::task::JoinSet::new();
    for (curve, store) in state.service.stores().iter() {
        let store = store.clone();
        let limit = state.readiness_timeout;
        pings.spawn(async move {
            match tokio::time::timeout(limit, store.ping()).await {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(format!("{curve}: {error}")),
                Err(_) => Some(format!("{curve}: no answer within {limit:?}")),
            }
        });
    }
    let mut down: Vec<String> = pings.join_all().await.into_iter().flatten().collect();
    down.sort();
    if down.is_empty() {
        plain(StatusCode::OK, "ready\n")
    } else {
        tracing::warn!(stores = ?down, "not ready: store down");
        plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", down.join("\n")),
        )
    }
}

fn too_large(state: &HttpState, declared: Option<u64>) -> Response<Full<Bytes>> {
    tracing::warn!(
        limit = state.max_body_bytes,
        declared = ?declared,
        "refused: request body over server.max_body_bytes"
    );
    plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body over {} bytes\n", state.max_body_bytes),
    )
}

fn x3dh_response(body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static(X3DH_CONTENT_TYPE),
    );
    response
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response
        .headers_mut()
        .insert(ALLOW, http::HeaderValue::from_static(allow));
    response
}

fn plain(status: StatusCode, text: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(text.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
