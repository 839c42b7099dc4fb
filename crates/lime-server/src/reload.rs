//! What SIGHUP does to a running server: the TLS certificate, key, client CA
//! bundle and CRLs read again ([`ServerTls::reload`]), the log file reopened
//! (logrotate's `postrotate`), systemd told around it. Nothing else changes: the
//! config file is not read again, listeners and connections stay as they are.
//!
//! A file that fails to load keeps the configuration in use, with an error line
//! naming the file; the server goes on serving either way.

use crate::systemd;
use crate::telemetry::Reopener;
use crate::tls::ServerTls;
use std::sync::Arc;
use std::time::Duration;

/// Longest a reload waits for the log writer to reopen the file (it writes the
/// lines queued before first).
const LOG_REOPEN_WAIT: Duration = Duration::from_secs(5);

/// What a reload touches.
pub struct Reload {
    /// The HTTPS listeners' TLS configuration, when there are any.
    pub tls: Option<Arc<ServerTls>>,
    /// The log writer, when logging to a file.
    pub log: Option<Reopener>,
}

impl Reload {
    /// Reloads what there is to reload, logging each outcome. Blocks (files are
    /// read, the log writer waited for): [`Reload::on_hangup`] runs it off the
    /// async workers.
    pub fn run(&self) {
        systemd::notify_reloading();
        tracing::info!("SIGHUP: reloading the TLS files and reopening the log file");
        if let Some(log) = &self.log {
            match log.reopen(LOG_REOPEN_WAIT) {
                Some(Ok(())) => tracing::info!("log file reopened"),
                Some(Err(error)) => tracing::error!(
                    "cannot reopen the log file, still writing to the one open: {error}"
                ),
                None => tracing::warn!(
                    "the log writer is stalled: the log file will be reopened once it catches up"
                ),
            }
        }
        match &self.tls {
            None => tracing::info!("no HTTPS listener: no TLS file to reload"),
            Some(tls) => match tls.reload() {
                Ok(()) if tls.is_self_signed() => tracing::info!(
                    "TLS reloaded; the certificate is the generated self-signed one \
                     (no tls.certificate configured): nothing renews it"
                ),
                Ok(()) => tracing::info!(
                    certificate = %tls.files().certificate.display(),
                    "TLS reloaded: new connections get the certificate, key, CA and CRLs read now"
                ),
                Err(error) => tracing::error!(
                    "TLS not reloaded, the previous certificate, key, CA and CRLs stay in use: {error:#}"
                ),
            },
        }
        systemd::notify_ready();
    }

    /// Runs [`Reload::run`] on every SIGHUP until the task is aborted. The
    /// handler is installed before this returns: from then on SIGHUP no longer
    /// ends the process.
    #[cfg(unix)]
    pub fn on_hangup(self) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup())?;
        let reload = Arc::new(self);
        Ok(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let reload = Arc::clone(&reload);
                // One reload at a time: the next SIGHUP waits for this one.
                let _ = tokio::task::spawn_blocking(move || reload.run()).await;
            }
        }))
    }
}
