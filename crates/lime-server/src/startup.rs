//! Builds the application from settings (stores, TLS, listeners), then runs it
//! until told to stop.
//!
//! Each listener has an accept loop; each connection is served on its own task
//! (`connection/`: TLS, hyper, time limits). A semaphore bounds the connections
//! served at once: a connection over `server.max_connections` is accepted and
//! closed at once (plain HTTP: after a 503), not left waiting in the kernel's
//! backlog. A watch channel tells the accept loops and the connections to stop;
//! the stop is over when every permit is back.

use crate::auth::Authenticator;
use crate::body_budget::BodyBudget;
use crate::config::Settings;
use crate::connection::{self, ConnectionLimits};
use crate::federation::Federation;
use crate::http::HttpState;
use crate::metrics::{self, exporter::MetricsListener};
use crate::service::KeyService;
use crate::store::sqlite::SqliteOptions;
use crate::store::{self, ServerStoreOptions, StoreError, Stores};
use crate::tls::{self, CertificateFiles, ClientCaFiles, ServerTls};
use anyhow::{Context, Result};
use lime_protocol::Curve;
use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

/// How long requests in flight may take to finish once a stop is asked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What a plain-HTTP client over `server.max_connections` reads before the close.
const OVER_CAPACITY_ANSWER: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
    Connection: close\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\
    Content-Length: 21\r\n\
    \r\n\
    too many connections\n";

/// Least time between two log lines about refused connections.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// A bound listener and whether it speaks TLS.
struct Listener {
    tcp: TcpListener,
    /// `None` for a plain HTTP listener.
    tls: Option<Arc<ServerTls>>,
}

/// The server, built and bound, not yet serving.
pub struct Application {
    listeners: Vec<Listener>,
    state: Arc<HttpState>,
    /// The time limits of every connection.
    limits: ConnectionLimits,
    /// One permit per connection served; none left: the next one is refused.
    connections: Arc<Semaphore>,
    /// The number of permits (`server.max_connections`): all back, no connection left.
    max_connections: u32,
    /// The TLS configuration of the HTTPS listeners, when there are any.
    tls: Option<Arc<ServerTls>>,
    /// How often old bundle requests are purged, and how old they must be.
    purge: Option<(Duration, Duration)>,
    /// The scrape listener (`metrics.listen`), when metrics are on.
    metrics: Option<MetricsListener>,
    /// `metrics.low_stock_threshold` and `metrics.stock_refresh_secs`.
    stock_refresh: (u32, Duration),
}

impl Application {
    /// Opens the stores, prepares TLS and binds every listener.
    pub async fn build(settings: &Settings) -> Result<Application> {
        settings.validate()?;
        let storage = &settings.storage;
        std::fs::create_dir_all(&storage.data_dir).with_context(|| {
            format!(
                "cannot create data directory {}",
                storage.data_dir.display()
            )
        })?;
        let stores = open_stores_to_serve(settings).await?;
        let limits = &settings.limits;

        let tls = if settings.server.listen.is_empty() {
            None
        } else {
            let (files, self_signed) = certificate_files(settings)?;
            let tls = ServerTls::load(files, self_signed, client_ca_files(settings))?;
            Some(Arc::new(tls))
        };

        let mut listeners = Vec::new();
        for addr in &settings.server.listen {
            listeners.push(Listener {
                tcp: bind(*addr).await?,
                tls: tls.clone(),
            });
        }
        for addr in &settings.server.plain_http_listen {
            listeners.push(Listener {
                tcp: bind(*addr).await?,
                tls: None,
            });
        }

        let metrics = match settings.metrics.listen {
            Some(addr) => Some(MetricsListener::bind(addr).await?),
            None => None,
        };

        let auth = Authenticator::from_settings(&settings.auth, &settings.federation).await?;
        let federation = Federation::from_settings(&settings.federation, &settings.auth)
            .context("federation.forward_to")?;
        let state = Arc::new(HttpState {
            service: KeyService::new(
                stores,
                settings.limits.max_bundle_answer_bytes,
                federation.map(Arc::new),
            ),
            auth,
            paths: settings.server.paths.clone(),
            max_body_bytes: settings.server.max_body_bytes,
            body_budget: BodyBudget::new(settings.server.max_buffered_body_bytes),
            body_read_timeout: Duration::from_millis(settings.server.body_read_timeout_ms),
            readiness_timeout: Duration::from_millis(settings.storage.timeout_ms),
        });
        let max_connections = settings.server.max_connections;
        Ok(Application {
            listeners,
            state,
            limits: settings.server.connection_limits(),
            connections: Arc::new(Semaphore::new(max_connections as usize)),
            max_connections,
            tls,
            purge: (limits.request_purge_interval_secs > 0).then(|| {
                (
                    Duration::from_secs(limits.request_purge_interval_secs),
                    Duration::from_secs(limits.request_retention_secs),
                )
            }),
            metrics,
            stock_refresh: (
                settings.metrics.low_stock_threshold,
                Duration::from_secs(settings.metrics.stock_refresh_secs),
            ),
        })
    }

    /// The bound addresses, each with its URL scheme (`https` or `http`).
    pub fn local_addrs(&self) -> Vec<(SocketAddr, &'static str)> {
        self.listeners
            .iter()
            .filter_map(|listener| {
                let scheme = if listener.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                listener.tcp.local_addr().ok().map(|addr| (addr, scheme))
            })
            .collect()
    }

    /// The certificate the HTTPS listeners present, when there are any.
    pub fn certificate(&self) -> Option<&CertificateFiles> {
        self.tls.as_deref().map(ServerTls::files)
    }

    /// The TLS configuration of the HTTPS listeners, for reloads, when there are any.
    pub fn tls(&self) -> Option<Arc<ServerTls>> {
        self.tls.clone()
    }

    /// The address of the metrics listener, when metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(MetricsListener::local_addr)
    }

    /// Serves until `shutdown` completes, then lets requests in flight finish.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let (stop, stopped) = watch::channel(false);
        let mut loops = Vec::new();
        let mut stock_counting = None;
        if let Some(listener) = self.metrics {
            if let Some(addr) = listener.local_addr() {
                tracing::info!(metrics_addr = %addr, "metrics served at http://{addr}/metrics (no authentication)");
            }
            loops.push(tokio::spawn(listener.serve(stopped.clone())));
            let (threshold, interval) = self.stock_refresh;
            let stores = self.state.service.stores().clone();
            stock_counting = Some(tokio::spawn(metrics::exporter::refresh_stock_periodically(
                stores, threshold, interval,
            )));
        }
        for listener in self.listeners {
            let addr = listener.tcp.local_addr()?;
            let scheme = if listener.tls.is_some() {
                "https"
            } else {
                "http"
            };
            tracing::info!(%addr, scheme, "listening");
            loops.push(tokio::spawn(accept_loop(
                listener,
                self.state.clone(),
                self.limits,
                self.connections.clone(),
                self.max_connections,
                stopped.clone(),
            )));
        }
        let purging = self.purge.map(|(interval, retention)| {
            let stores = self.state.service.stores().clone();
            tokio::spawn(purge_requests_periodically(stores, interval, retention))
        });
        shutdown.await;
        for task in [purging, stock_counting].into_iter().flatten() {
            task.abort();
        }
        tracing::info!("stopping: no new connections, letting requests in flight finish");
        let _ = stop.send(true);
        for accept in loops {
            let _ = accept.await;
        }
        // Each connection gives its permit back when it ends.
        let all_closed = self.connections.acquire_many(self.max_connections);
        if tokio::time::timeout(SHUTDOWN_GRACE, all_closed)
            .await
            .is_err()
        {
            tracing::warn!("some connections did not finish within {SHUTDOWN_GRACE:?}");
        }
        Ok(())
    }
}

/// Opens the store of every enabled curve, as `serve` does, for a command that
/// runs beside the server (it never claims a bundle: SQLite files are not locked).
pub async fn open_stores(settings: &Settings) -> Result<Stores> {
    open_stores_for(settings, false).await
}

/// Opens the store of every enabled curve to serve them: a SQLite file served
/// with the bundle request limit on is locked against a second server.
pub async fn open_stores_to_serve(settings: &Settings) -> Result<Stores> {
    open_stores_for(settings, true).await
}

async fn open_stores_for(settings: &Settings, serves: bool) -> Result<Stores> {
    let storage = &settings.storage;
    let mut stores = Stores::default();
    let timeout = Duration::from_millis(storage.timeout_ms);
    let sqlite_options = SqliteOptions {
        path: PathBuf::new(),
        synchronous: storage.sqlite_synchronous,
        max_batch: storage.sqlite_max_batch,
        timeout,
        limits: settings.limits.store_limits(),
        serves,
    };
    let server_options = ServerStoreOptions {
        pool_size: storage.pool_size,
        connect_timeout: Duration::from_millis(storage.connect_timeout_ms),
        timeout,
        limits: settings.limits.store_limits(),
    };
    for curve in storage.enabled_curves() {
        let location = storage.location_with_password(curve)?;
        let store = store::open(curve, &location, &sqlite_options, &server_options).await?;
        tracing::info!(%curve, %location, "store opened");
        stores.insert(curve, store);
    }
    Ok(stores)
}

/// Deletes, in every store, the bundle requests older than `retention`; logs and
/// returns how many per curve. Safe with several instances on one database.
pub async fn purge_requests(
    stores: &Stores,
    retention: Duration,
) -> Vec<(Curve, Result<u64, StoreError>)> {
    let mut purged = Vec::new();
    for (curve, store) in stores.iter() {
        let result = store.purge_requests(retention).await;
        match &result {
            Ok(rows) => tracing::info!(%curve, rows, ?retention, "bundle requests purged"),
            Err(error) => tracing::warn!(%curve, %error, "bundle requests not purged"),
        }
        purged.push((curve, result));
    }
    purged
}

/// Purges old bundle requests every `interval`, until the server stops.
async fn purge_requests_periodically(stores: Stores, interval: Duration, retention: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        purge_requests(&stores, retention).await;
    }
}

/// The files of the client-certificate verifier of the HTTPS listeners, when
/// client certificates are configured.
fn client_ca_files(settings: &Settings) -> Option<ClientCaFiles> {
    let certificates = &settings.auth.client_certificates;
    let ca_file = certificates.ca_file.as_ref()?;
    tracing::info!(
        ca = %ca_file.display(),
        crls = certificates.crl_files.len(),
        required = certificates.required,
        "client certificates on"
    );
    Some(ClientCaFiles {
        ca_file: ca_file.clone(),
        crl_files: certificates.crl_files.clone(),
        required: certificates.required,
    })
}

/// The certificate files of the HTTPS listeners, and whether they are the
/// generated self-signed pair.
fn certificate_files(settings: &Settings) -> Result<(CertificateFiles, bool)> {
    match (&settings.tls.certificate, &settings.tls.private_key) {
        (Some(certificate), Some(private_key)) => Ok((
            CertificateFiles {
                certificate: certificate.clone(),
                private_key: private_key.clone(),
            },
            false,
        )),
        _ => {
            let files = CertificateFiles::self_signed_in(&settings.storage.data_dir);
            if tls::ensure_self_signed(&files)? {
                tracing::warn!(
                    certificate = %files.certificate.display(),
                    "no tls.certificate configured: generated a self-signed certificate for localhost"
                );
            }
            Ok((files, true))
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Accepts connections until `stopped`, each served on its own task while a
/// permit is left, refused at once otherwise.
async fn accept_loop(
    listener: Listener,
    state: Arc<HttpState>,
    limits: ConnectionLimits,
    connections: Arc<Semaphore>,
    max_connections: u32,
    mut stopped: watch::Receiver<bool>,
) {
    let mut refusals = RefusalLog::new(max_connections);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait a little, go on.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics::connection_refused();
            refuse(stream, listener.tls.is_none());
            refusals.refused(peer);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        // The configuration current at the accept: a reload changes new connections only.
        let tls = listener.tls.as_ref().map(|tls| tls.config());
        let stopped = stopped.clone();
        tokio::spawn(async move {
            let open = metrics::CountedConnection::open();
            connection::serve(stream, peer, tls, state, limits, stopped).await;
            drop(open);
            drop(permit);
        });
    }
}

/// Closes a connection over `server.max_connections` at once, without a task or a
/// wait: a plain-HTTP client first gets a 503 (written only if the socket takes it
/// at once, which a fresh socket does), a TLS client just sees the close.
fn refuse(stream: TcpStream, plain_http: bool) {
    // Leaving tokio's reactor makes the socket a plain non-blocking one, written
    // and read at once (tokio would wait for a readiness event first).
    let Ok(mut stream) = stream.into_std() else {
        return;
    };
    if plain_http {
        // Closing with unread bytes makes the kernel reset the connection, which
        // can destroy the 503 before the client reads it: take what has arrived.
        let mut arrived = [0; 4096];
        let _ = stream.read(&mut arrived);
        let _ = stream.write(OVER_CAPACITY_ANSWER);
    }
}

/// Counts the connections refused over `server.max_connections` and logs them at
/// most once every [`REFUSAL_LOG_INTERVAL`], so that a flood of connections does
/// not flood the log too.
struct RefusalLog {
    /// `server.max_connections`, for the log line.
    max_connections: u32,
    /// Refused since the last line.
    refused: u64,
    /// When the last line was written.
    last_line: Option<Instant>,
}

impl RefusalLog {
    fn new(max_connections: u32) -> RefusalLog {
        RefusalLog {
            max_connections,
            refused: 0,
            last_line: None,
        }
    }

    /// Counts a refusal of `peer`; logs the count when the last line is old enough.
    /// Returns the count logged, if a line was written.
    fn refused(&mut self, peer: SocketAddr) -> Option<u64> {
        self.refused += 1;
        if self
            .last_line
            .is_some_and(|at| at.elapsed() < REFUSAL_LOG_INTERVAL)
        {
            return None;
        }
        tracing::warn!(
            %peer,
            refused = self.refused,
            limit = self.max_connections,
            "refused connections: server.max_connections reached (count since the last such line, peer of the latest)"
        );
        self.last_line = Some(Instant::now());
        Some(std::mem::take(&mut self.refused))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_capacity_answer_is_one_whole_http_response() {
        let text = std::str::from_utf8(OVER_CAPACITY_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains("\r\nConnection: close"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
    }

    #[tokio::test]
    async fn a_flood_of_refusals_is_logged_once_a_second_with_its_count() {
        let peer = SocketAddr::from(([192, 0, 2, 1], 40000));
        let mut log = RefusalLog::new(5);
        assert_eq!(log.refused(peer), Some(1), "the first refusal is logged");
        for _ in 0..999 {
            assert_eq!(log.refused(peer), None);
        }
        tokio::time::sleep(REFUSAL_LOG_INTERVAL).await;
        assert_eq!(
            log.refused(peer),
            Some(1000),
            "the next line counts them all"
        );
    }
}
