//! The SQLite schema: the original server's tables (`Users`, `OPk`, `Requests`,
//! `Config`) with SQLite types, plus the indexes that keep every request's cost
//! independent of the number of stored devices.

use rusqlite::{Connection, OptionalExtension};

/// The schema version this server writes and expects, kept in `Config` as
/// `('version', N)` like the original's.
pub const SCHEMA_VERSION: i64 = 1;

const CREATE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS Users (
    Uid INTEGER PRIMARY KEY AUTOINCREMENT,
    UserId TEXT NOT NULL,
    Ik BLOB NOT NULL,
    SPk BLOB DEFAULT NULL,
    SPk_sig BLOB DEFAULT NULL,
    SPk_id INTEGER DEFAULT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS Users_UserId ON Users(UserId);
CREATE TABLE IF NOT EXISTS OPk (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    Uid INTEGER NOT NULL REFERENCES Users(Uid) ON UPDATE CASCADE ON DELETE CASCADE,
    OPk BLOB NOT NULL,
    OPk_id INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS OPk_Uid_OPk_id ON OPk(Uid, OPk_id);
CREATE TABLE IF NOT EXISTS Requests (
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS Config (
    Name VARCHAR(20) DEFAULT NULL,
    Value INTEGER NOT NULL
);
";

/// What [`ensure_schema`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaState {
    /// The tables were created just now.
    Created,
    /// The tables were there, at our version.
    Current,
}

/// Creates the schema in an empty database, or checks the version of an existing
/// one. A database at another version is refused rather than touched.
pub fn ensure_schema(conn: &Connection) -> Result<SchemaState, SchemaError> {
    let has_config: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'Config')",
        [],
        |row| row.get(0),
    )?;
    if has_config {
        let version: Option<i64> = conn
            .query_row(
                "SELECT Value FROM Config WHERE Name = 'version'",
                [],
                |row| row.get(0),
            )
            .optional()?;
        return match version {
            Some(SCHEMA_VERSION) => Ok(SchemaState::Current),
            Some(found) => Err(SchemaError::Version(found)),
            None => Err(SchemaError::NoVersion),
        };
    }
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(CREATE_SCHEMA)?;
    tx.execute(
        "INSERT INTO Config (Name, Value) VALUES ('version', ?1)",
        [SCHEMA_VERSION],
    )?;
    tx.commit()?;
    Ok(SchemaState::Created)
}

/// Why a database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// SQLite failed.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// `Config` has a version row with another version.
    #[error("schema version {0} in table Config, this server serves version {SCHEMA_VERSION}")]
    Version(i64),
    /// `Config` exists without a version row.
    #[error("table Config has no ('version', N) row: not a lime-server database")]
    NoVersion,
}
