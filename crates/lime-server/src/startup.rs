//! Builds the application from settings (stores, TLS, listeners), then runs it
//! until told to stop.
//!
//! Each listener has an accept loop; each connection is served by hyper (HTTP/1.1
//! keep-alive and HTTP/2) on its own task. A semaphore bounds the connections
//! served at once; a watch channel tells the accept loops to stop, and hyper's
//! graceful shutdown lets the requests in flight finish.

use crate::auth::certificate::{
    self, CertificateIdentity, CertificateIdentityError, PeerCertificate,
};
use crate::auth::{Authenticator, ClientAddress};
use crate::config::Settings;
use crate::http::{self, HttpState};
use crate::service::KeyService;
use crate::store::sqlite::SqliteOptions;
use crate::store::{self, ServerStoreOptions, StoreError, Stores};
use crate::tls::{self, CertificateFiles};
use anyhow::{Context, Result};
use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use lime_protocol::Curve;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client has to send a request's headers.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long requests in flight may take to finish once a stop is asked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A bound listener and whether it speaks TLS.
struct Listener {
    tcp: TcpListener,
    /// `None` for a plain HTTP listener.
    tls: Option<TlsAcceptor>,
}

/// The server, built and bound, not yet serving.
pub struct Application {
    listeners: Vec<Listener>,
    state: Arc<HttpState>,
    /// Bounds the connections served at once.
    connections: Arc<Semaphore>,
    /// The certificate of the TLS listeners, when there are any.
    certificate: Option<CertificateFiles>,
    /// How often old bundle requests are purged, and how old they must be.
    purge: Option<(Duration, Duration)>,
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
        let stores = open_stores(settings).await?;
        let limits = &settings.limits;

        let certificate = if settings.server.listen.is_empty() {
            None
        } else {
            Some(certificate_files(settings)?)
        };
        let acceptor = certificate
            .as_ref()
            .map(|files| {
                tls::server_config(files, client_verifier(settings)?).map(TlsAcceptor::from)
            })
            .transpose()?;

        let mut listeners = Vec::new();
        for addr in &settings.server.listen {
            listeners.push(Listener {
                tcp: bind(*addr).await?,
                tls: acceptor.clone(),
            });
        }
        for addr in &settings.server.plain_http_listen {
            listeners.push(Listener {
                tcp: bind(*addr).await?,
                tls: None,
            });
        }

        let auth = Authenticator::from_settings(&settings.auth).await?;
        let state = Arc::new(HttpState {
            service: KeyService::new(stores, settings.limits.max_devices_per_bundle_request),
            auth,
            paths: settings.server.paths.clone(),
            max_body_bytes: settings.server.max_body_bytes,
            readiness_timeout: Duration::from_millis(settings.storage.timeout_ms),
        });
        Ok(Application {
            listeners,
            state,
            connections: Arc::new(Semaphore::new(settings.server.max_connections)),
            certificate,
            purge: (limits.request_purge_interval_secs > 0).then(|| {
                (
                    Duration::from_secs(limits.request_purge_interval_secs),
                    Duration::from_secs(limits.request_retention_secs),
                )
            }),
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
        self.certificate.as_ref()
    }

    /// Serves until `shutdown` completes, then lets requests in flight finish.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let (stop, stopped) = watch::channel(false);
        let graceful = Arc::new(GracefulShutdown::new());
        let mut loops = Vec::new();
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
                self.connections.clone(),
                graceful.clone(),
                stopped.clone(),
            )));
        }
        let purging = self.purge.map(|(interval, retention)| {
            let stores = self.state.service.stores().clone();
            tokio::spawn(purge_requests_periodically(stores, interval, retention))
        });
        shutdown.await;
        if let Some(purging) = purging {
            purging.abort();
        }
        tracing::info!("stopping: no new connections, letting requests in flight finish");
        let _ = stop.send(true);
        for accept in loops {
            let _ = accept.await;
        }
        // The accept loops held the other references; the connections hold watchers.
        let Ok(graceful) = Arc::try_unwrap(graceful) else {
            tracing::warn!("connections not tracked, stopping without waiting for them");
            return Ok(());
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not finish within {SHUTDOWN_GRACE:?}");
        }
        Ok(())
    }
}

/// Opens the store of every enabled curve, as `serve` does.
pub async fn open_stores(settings: &Settings) -> Result<Stores> {
    let storage = &settings.storage;
    let mut stores = Stores::default();
    let timeout = Duration::from_millis(storage.timeout_ms);
    let sqlite_options = SqliteOptions {
        path: PathBuf::new(),
        synchronous: storage.sqlite_synchronous,
        max_batch: storage.sqlite_max_batch,
        timeout,
        limits: settings.limits.store_limits(),
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

/// The client-certificate verifier of the HTTPS listeners, when client
/// certificates are configured.
fn client_verifier(
    settings: &Settings,
) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>> {
    let certificates = &settings.auth.client_certificates;
    let Some(ca_file) = &certificates.ca_file else {
        return Ok(None);
    };
    let verifier =
        certificate::client_verifier(ca_file, &certificates.crl_files, certificates.required)
            .context("auth.client_certificates")?;
    tracing::info!(
        ca = %ca_file.display(),
        crls = certificates.crl_files.len(),
        required = certificates.required,
        "client certificates on"
    );
    Ok(Some(verifier))
}

fn certificate_files(settings: &Settings) -> Result<CertificateFiles> {
    match (&settings.tls.certificate, &settings.tls.private_key) {
        (Some(certificate), Some(private_key)) => Ok(CertificateFiles {
            certificate: certificate.clone(),
            private_key: private_key.clone(),
        }),
        _ => {
            let files = CertificateFiles::self_signed_in(&settings.storage.data_dir);
            if tls::ensure_self_signed(&files)? {
                tracing::warn!(
                    certificate = %files.certificate.display(),
                    "no tls.certificate configured: generated a self-signed certificate for localhost"
                );
            }
            Ok(files)
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

async fn accept_loop(
    listener: Listener,
    state: Arc<HttpState>,
    connections: Arc<Semaphore>,
    graceful: Arc<GracefulShutdown>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = stopped.changed() => return,
        };
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
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let tls = listener.tls.clone();
        let graceful = graceful.watcher();
        tokio::spawn(async move {
            serve_connection(stream, peer, tls, state, graceful).await;
            drop(permit);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    state: Arc<HttpState>,
    graceful: Watcher,
) {
    // Every request of the connection carries the client's address and its
    // verified client certificate, if any.
    let service = move |peer_certificate: Option<PeerCertificate>| {
        service_fn(move |mut request: Request<Incoming>| {
            let state = state.clone();
            request.extensions_mut().insert(ClientAddress(peer));
            if let Some(certificate) = &peer_certificate {
                request.extensions_mut().insert(certificate.clone());
            }
            async move { http::handle(&state, request).await }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that trickles its headers is cut off instead of holding a slot.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_READ_TIMEOUT);
    let result = match tls {
        Some(acceptor) => {
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let peer_certificate = match peer_certificate(&stream) {
                Ok(peer_certificate) => peer_certificate,
                Err(error) => {
                    tracing::warn!(%peer, %error, "unreadable client certificate, connection closed");
                    return;
                }
            };
            let connection =
                builder.serve_connection(TokioIo::new(stream), service(peer_certificate));
            graceful.watch(connection.into_owned()).await
        }
        None => {
            let connection = builder.serve_connection(TokioIo::new(stream), service(None));
            graceful.watch(connection.into_owned()).await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// The names of the certificate the client presented in the handshake (already
/// verified by rustls), or `None` when it presented none.
fn peer_certificate(
    stream: &TlsStream<TcpStream>,
) -> Result<Option<PeerCertificate>, CertificateIdentityError> {
    let Some(end_entity) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
    else {
        return Ok(None);
    };
    let identity = CertificateIdentity::from_der(end_entity)?;
    Ok(Some(PeerCertificate(Arc::new(identity))))
}
