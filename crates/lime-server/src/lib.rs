//! lime-server: the LIME X3DH key server, the public-key directory behind
//! Linphone's end-to-end encrypted messaging.
//!
//! The request path reads straight down:
//! listener ([`startup`]) -> TLS ([`tls`]) / HTTP ([`http`]) -> sender ([`auth`])
//! -> decode (`lime-protocol`) -> handler ([`service`]) -> store ([`store`]) ->
//! encode -> response.
//!
//! - [`config`]: typed settings from one TOML file, checked once at start.
//! - [`cli`]: `serve`, `db ...`, `admin ...`, `probe`, `check-config`.
//! - [`admin`]: `admin device show|delete`, support on the stores.
//! - [`startup`]: builds stores, TLS and listeners; accepts (or refuses, over the
//!   connection limit) until stopped.
//! - [`connection`]: one accepted connection: TLS handshake, hyper, and the time
//!   limits (handshake, headers, idle) that keep slow clients from holding it.
//! - [`tls`]: certificate (configured or self-signed) and rustls config, rebuilt
//!   from its files on reload.
//! - [`reload`]: what SIGHUP does (TLS files read again, log file reopened).
//! - [`http`]: routes, method, body cap, content type, authentication before the
//!   body; X3DH answers as HTTP 200.
//! - [`body_budget`]: the bytes of request bodies buffered at once, all requests
//!   together.
//! - [`auth`]: who a request acts for ([`auth::Sender`]).
//! - [`service`]: one handler per X3DH request type.
//! - [`store`]: the [`store::KeyStore`] trait and the SQLite backend.
//! - [`error`]: one error type for the request path, mapped to X3DH error codes.
//! - [`metrics`]: Prometheus metrics (off unless `metrics.listen` is set): their
//!   names, one typed function per thing counted, the scrape listener.
//! - [`systemd`]: readiness and stopping notifications for a `Type=notify` unit.
//! - [`telemetry`]: log set-up, and the bounds on what a flood can make us log.
//! - [`client`]: a small X3DH client for tests and tools (not used by the server).
//! - [`probe`]: `lime-server probe URL`, a smoke test of a deployed server.

pub mod admin;
pub mod auth;
pub mod body_budget;
pub mod cli;
pub mod client;
pub mod config;
pub mod connection;
pub mod error;
pub mod federation;
pub mod http;
pub mod metrics;
pub mod probe;
pub mod reload;
pub mod service;
pub mod startup;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tls;
