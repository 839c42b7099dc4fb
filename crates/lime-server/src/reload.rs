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

/// What a reload touches.
pub struct Reload {
    /// The HTTPS listeners' TLS configuration, when there are any.
    pub tls: Option<Arc<ServerTls>>,
    /// The log writer, when logging to a file.
    pub log: Option<Reopener>,
}

impl Reload {
    /// Reloads what there is to reload, logging each outcome.
    pub fn run(&self) {
        systemd::notify_reloading();
        tracing::info!("SIGHUP: reloading the TLS files and reopening the log file");
        if let Some(log) = &self.log {
            log.reopen();
            tracing::info!("log file reopened");
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
        Ok(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                self.run();
            }
        }))
    }
}
