//! The scrape side: the Prometheus recorder (installed once per process, only
//! when `metrics.listen` is set), the metrics listener (`GET /metrics`, plain
//! HTTP, its own port, never an X3DH listener) and the task that counts the
//! stores' stock every `metrics.stock_refresh_secs`.
//!
//! The listener has no authentication: it is meant for loopback or a monitoring
//! network. It serves a few connections at once, each bounded in time, so that a
//! stranger who reaches it cannot hold the server's memory or descriptors.

use super::{LATENCY_BUCKETS, REQUEST_DURATION, describe_all, stock, stock_refresh_failed};
use crate::store::Stores;
use anyhow::{Context, Result};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Scrapes served at once; more connections are closed at once.
const MAX_SCRAPE_CONNECTIONS: usize = 8;

/// Longest a scrape connection may take, from accept to its end.
const SCRAPE_CONNECTION_LIMIT: Duration = Duration::from_secs(10);

/// The media type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The process's recorder: installed by the first server that asks, shared by
/// any other in the same process (tests).
static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and describes every
/// metric; returns the handle that renders a scrape.
pub fn install() -> Result<PrometheusHandle> {
    if let Some(handle) = RECORDER.get() {
        return Ok(handle.clone());
    }
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.to_owned()), LATENCY_BUCKETS)
        .context("metrics: request latency buckets")?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    // Another thread may have won the race: its recorder stays, ours is dropped.
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = RECORDER.set(handle);
        describe_all();
    }
    RECORDER
        .get()
        .cloned()
        .context("metrics: another metrics recorder is installed in this process")
}

/// The bound metrics listener and what it serves.
pub struct MetricsListener {
    tcp: TcpListener,
    handle: PrometheusHandle,
}

impl MetricsListener {
    /// Installs the recorder and binds `metrics.listen`.
    pub async fn bind(addr: SocketAddr) -> Result<MetricsListener> {
        let handle = install()?;
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics.listen: cannot listen on {addr}"))?;
        Ok(MetricsListener { tcp, handle })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.local_addr().ok()
    }

    /// Serves scrapes until `stopped` turns true.
    pub async fn serve(self, mut stopped: watch::Receiver<bool>) {
        let places = Arc::new(Semaphore::new(MAX_SCRAPE_CONNECTIONS));
        let handle = self.handle;
        loop {
            let stream = tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "metrics: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stopped.changed() => return,
            };
            let Ok(place) = places.clone().try_acquire_owned() else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let handle = handle.clone();
                    async move { Ok::<_, Infallible>(scrape(&handle, &request)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(SCRAPE_CONNECTION_LIMIT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(SCRAPE_CONNECTION_LIMIT, connection).await;
                drop(place);
            });
        }
    }
}

/// The answer to one request on the metrics listener.
fn scrape(handle: &PrometheusHandle, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            handle.run_upkeep();
            (StatusCode::OK, PROMETHEUS_TEXT, handle.render())
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

/// Counts every store's stock now, then every `interval`, until aborted; also
/// runs the recorder's upkeep (histogram buffers) at each tick.
pub async fn refresh_stock_periodically(stores: Stores, threshold: u32, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Some(handle) = RECORDER.get() {
            handle.run_upkeep();
        }
        for (curve, store) in stores.iter() {
            match store.stats(threshold).await {
                Ok(stats) => stock(curve, &stats),
                Err(error) => {
                    stock_refresh_failed(curve);
                    tracing::warn!(%curve, %error, "metrics: the stock of one-time pre-keys could not be counted");
                }
            }
        }
    }
}
