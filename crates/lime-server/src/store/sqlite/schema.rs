//! The SQLite schema: the original server's tables (`Users`, `OPk`, `Requests`,
//! `Config`) with SQLite types, plus the indexes that keep every request's cost
//! independent of the number of stored devices. `Config` holds the original's
//! `('version', 1)` and our `('lime_rs_schema', N)`.

use crate::store::{Migration, SCHEMA_VERSION_NAME, SchemaState};
use rusqlite::{Connection, OptionalExtension};

/// The original layout's version, in `Config` as `('version', 1)`.
const LAYOUT_VERSION: i64 = 1;

/// Our schema version of a SQLite database, in `Config` as `('lime_rs_schema', N)`:
/// one past the database servers' [`crate::store::SCHEMA_VERSION`], since
/// version 4 changed SQLite alone (the bundle request limit counted in memory).
pub const SCHEMA_VERSION: i64 = 4;

const CREATE_TABLES: &str = "
CREATE TABLE Users (
    Uid INTEGER PRIMARY KEY AUTOINCREMENT,
    UserId TEXT NOT NULL,
    Ik BLOB NOT NULL,
    SPk BLOB DEFAULT NULL,
    SPk_sig BLOB DEFAULT NULL,
    SPk_id INTEGER DEFAULT NULL
);
CREATE TABLE OPk (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    Uid INTEGER NOT NULL REFERENCES Users(Uid) ON UPDATE CASCADE ON DELETE CASCADE,
    OPk BLOB NOT NULL,
    OPk_id INTEGER NOT NULL
);
CREATE TABLE Requests (
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE Config (
    Name VARCHAR(20) DEFAULT NULL,
    Value INTEGER NOT NULL
);
INSERT INTO Config (Name, Value) VALUES ('version', 1);
";

/// Our additions, each idempotent, with the schema version that brought it: one
/// device per id, one key per (device, id), bundle requests counted by index
/// (version 3: per target first, so that a target's requests from all the
/// devices of one identity, a range of `source`, are one index range), the
/// bundle requests recorded per identity in the current window, and (version 4)
/// in place of both, `Requests` indexed by time alone: the writer counts in
/// memory (`request_counts.rs`), and a row no longer writes a random index page.
const ADDITIONS: [(i64, &str, &str); 6] = [
    (
        1,
        "unique index Users(UserId)",
        "CREATE UNIQUE INDEX IF NOT EXISTS Users_UserId ON Users(UserId)",
    ),
    (
        1,
        "unique index OPk(Uid, OPk_id)",
        "CREATE UNIQUE INDEX IF NOT EXISTS OPk_Uid_OPk_id ON OPk(Uid, OPk_id)",
    ),
    (
        2,
        "index Requests(source, target, at)",
        "CREATE INDEX IF NOT EXISTS Requests_source_target_at ON Requests(source, target, at)",
    ),
    (
        3,
        "index Requests(target, source, at) in place of Requests(source, target, at)",
        "CREATE INDEX IF NOT EXISTS Requests_target_source_at ON Requests(target, source, at);
         DROP INDEX IF EXISTS Requests_source_target_at",
    ),
    (
        3,
        "table lime_rs_identity_requests",
        "CREATE TABLE IF NOT EXISTS lime_rs_identity_requests (
             identity BLOB NOT NULL PRIMARY KEY,
             window_start INTEGER NOT NULL,
             recorded INTEGER NOT NULL
         ) WITHOUT ROWID",
    ),
    (
        4,
        "index Requests(at) in place of Requests(target, source, at), \
         table lime_rs_identity_requests dropped",
        "CREATE INDEX IF NOT EXISTS Requests_at ON Requests(at);
         DROP INDEX IF EXISTS Requests_target_source_at;
         DROP TABLE IF EXISTS lime_rs_identity_requests",
    ),
];

/// Creates the schema in an empty database, or checks an existing one: the
/// original layout at our version. A database of an older version of ours is
/// brought up to date (our additions only add indexes); one without our additions
/// (written by the PHP server) needs `db migrate`; anything else is refused rather
/// than touched.
pub fn ensure_schema(conn: &Connection) -> Result<SchemaState, SchemaError> {
    if !has_config(conn)? {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(CREATE_TABLES)?;
        apply_additions(&tx, None)?;
        tx.commit()?;
        return Ok(SchemaState::Created);
    }
    match versions(conn)? {
        (Some(LAYOUT_VERSION), Some(SCHEMA_VERSION)) => Ok(SchemaState::Present),
        (Some(LAYOUT_VERSION), None) => Err(SchemaError::NeedsMigration),
        (Some(LAYOUT_VERSION), Some(ours)) if ours < SCHEMA_VERSION => {
            migrate(conn)?;
            Ok(SchemaState::Present)
        }
        (Some(LAYOUT_VERSION), Some(ours)) => Err(SchemaError::Newer(ours)),
        (Some(layout), _) => Err(SchemaError::Layout(layout)),
        (None, _) => Err(SchemaError::NoVersion),
    }
}

/// Brings a database of the original layout to our schema version.
pub fn migrate(conn: &Connection) -> Result<Migration, SchemaError> {
    match versions(conn)? {
        (Some(LAYOUT_VERSION), Some(SCHEMA_VERSION)) => Ok(Migration::default()),
        (Some(LAYOUT_VERSION), ours) if ours.is_none_or(|ours| ours < SCHEMA_VERSION) => {
            let tx = conn.unchecked_transaction()?;
            let applied = apply_additions(&tx, ours)?;
            tx.commit()?;
            Ok(Migration { applied })
        }
        (Some(LAYOUT_VERSION), Some(ours)) => Err(SchemaError::Newer(ours)),
        (Some(layout), _) => Err(SchemaError::Layout(layout)),
        (None, _) => Err(SchemaError::NoVersion),
    }
}

/// Applies the additions newer than version `from` (all when `None`) and records
/// [`SCHEMA_VERSION`].
fn apply_additions(conn: &Connection, from: Option<i64>) -> Result<Vec<String>, SchemaError> {
    let mut applied = Vec::new();
    for (version, name, sql) in ADDITIONS {
        if from.is_none_or(|from| version > from) {
            conn.execute_batch(sql)?;
            applied.push(name.to_owned());
        }
    }
    conn.execute("DELETE FROM Config WHERE Name = ?1", [SCHEMA_VERSION_NAME])?;
    conn.execute(
        "INSERT INTO Config (Name, Value) VALUES (?1, ?2)",
        (SCHEMA_VERSION_NAME, SCHEMA_VERSION),
    )?;
    applied.push(format!(
        "Config ('{SCHEMA_VERSION_NAME}', {SCHEMA_VERSION})"
    ));
    Ok(applied)
}

fn has_config(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'Config')",
        [],
        |row| row.get(0),
    )
}

/// The original's `version` and our schema version, as found in `Config`.
fn versions(conn: &Connection) -> Result<(Option<i64>, Option<i64>), SchemaError> {
    if !has_config(conn)? {
        return Err(SchemaError::NoVersion);
    }
    let value = |name: &str| {
        conn.query_row("SELECT Value FROM Config WHERE Name = ?1", [name], |row| {
            row.get(0)
        })
        .optional()
    };
    Ok((value("version")?, value(SCHEMA_VERSION_NAME)?))
}

/// Why a database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// SQLite failed.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// `Config` says another layout than the original's version 1.
    #[error("table Config has ('version', {0}); this server serves version 1")]
    Layout(i64),
    /// Written by a newer lime-server.
    #[error("schema version {0} in table Config is newer than this server's {SCHEMA_VERSION}")]
    Newer(i64),
    /// The original layout without our additions: `db migrate` adds them.
    #[error("schema not migrated: run `lime-server db migrate`")]
    NeedsMigration,
    /// No `Config` table or no `('version', N)` row.
    #[error("no ('version', N) row in a Config table: not a lime-server database")]
    NoVersion,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_names(conn: &Connection) -> Vec<String> {
        let mut select = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%' ORDER BY name")
            .unwrap();
        select
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// A database as an older release left it: today's schema, then `older` run on it.
    fn left_by_older_release(older: &str) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        assert_eq!(ensure_schema(&conn).unwrap(), SchemaState::Created);
        conn.execute_batch(older).unwrap();
        conn
    }

    /// Schema 4: our version, `Requests` indexed by time only (the limit is
    /// counted in memory), no table of identities.
    fn assert_at_schema_4(conn: &Connection) {
        assert_eq!(versions(conn).unwrap(), (Some(1), Some(SCHEMA_VERSION)));
        assert_eq!(
            index_names(conn),
            ["OPk_Uid_OPk_id", "Requests_at", "Users_UserId"]
        );
        assert!(!has_table(conn, "lime_rs_identity_requests"));
    }

    fn has_table(conn: &Connection, name: &str) -> bool {
        conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [name],
            |row| row.get(0),
        )
        .unwrap()
    }

    #[test]
    fn a_database_of_schema_1_is_brought_up_to_date_on_open() {
        // What the first release left: schema 1, without the Requests index.
        let conn = left_by_older_release(
            "DROP INDEX Requests_at;
             UPDATE Config SET Value = 1 WHERE Name = 'lime_rs_schema';",
        );
        assert_eq!(ensure_schema(&conn).unwrap(), SchemaState::Present);
        assert_at_schema_4(&conn);
        assert_eq!(migrate(&conn).unwrap(), Migration::default());
    }

    #[test]
    fn a_database_of_schema_2_gets_requests_indexed_by_time_on_open() {
        let conn = left_by_older_release(
            "DROP INDEX Requests_at;
             CREATE INDEX Requests_source_target_at ON Requests(source, target, at);
             UPDATE Config SET Value = 2 WHERE Name = 'lime_rs_schema';",
        );
        assert_eq!(ensure_schema(&conn).unwrap(), SchemaState::Present);
        assert_at_schema_4(&conn);
    }

    #[test]
    fn a_database_of_schema_3_counts_in_memory_from_version_4_on() {
        // What the release before the counts in memory left.
        let conn = left_by_older_release(
            "DROP INDEX Requests_at;
             CREATE INDEX Requests_target_source_at ON Requests(target, source, at);
             CREATE TABLE lime_rs_identity_requests (identity BLOB NOT NULL PRIMARY KEY,
                 window_start INTEGER NOT NULL, recorded INTEGER NOT NULL) WITHOUT ROWID;
             UPDATE Config SET Value = 3 WHERE Name = 'lime_rs_schema';",
        );
        let migration = migrate(&conn).unwrap();
        assert_eq!(migration.applied.len(), 2, "{migration:?}");
        assert_at_schema_4(&conn);
    }

    #[test]
    fn a_database_without_our_additions_needs_db_migrate() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(CREATE_TABLES).unwrap();
        assert!(matches!(
            ensure_schema(&conn),
            Err(SchemaError::NeedsMigration)
        ));
        let migration = migrate(&conn).unwrap();
        assert_eq!(migration.applied.len(), ADDITIONS.len() + 1);
        assert_eq!(ensure_schema(&conn).unwrap(), SchemaState::Present);
    }
}
