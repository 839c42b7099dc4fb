//! The PostgreSQL store: the original's tables and columns with PostgreSQL types.

use crate::store::{KeyStore, Migration, SchemaState, ServerStoreOptions, SetupError};
use lime_protocol::Curve;
use std::sync::Arc;

/// Connects to the database at `url`, checks its schema, and serves `curve` from it.
pub async fn open(
    _curve: Curve,
    url: &str,
    _options: &ServerStoreOptions,
) -> Result<Arc<dyn KeyStore>, SetupError> {
    Err(not_yet(url))
}

/// Creates the schema when absent; leaves an existing one as it is.
pub async fn init(url: &str) -> Result<SchemaState, SetupError> {
    Err(not_yet(url))
}

/// Brings an existing database to our schema version, only adding to it.
pub async fn migrate(url: &str) -> Result<Migration, SetupError> {
    Err(not_yet(url))
}

fn not_yet(url: &str) -> SetupError {
    SetupError::Database {
        location: crate::store::location::redact(url),
        message: "this backend is being written".into(),
    }
}
