//! The MariaDB/MySQL schema: the original PHP server's tables exactly as its README
//! creates them, our additions (only things the PHP server tolerates, so that it
//! keeps working on a migrated database), and the checks a store makes at open.
//! Errors are plain messages; `mod.rs` adds the location.

use crate::store::{Migration, SCHEMA_VERSION, SCHEMA_VERSION_NAME, SchemaState};
use sqlx::mysql::MySqlConnection;
use sqlx::{Connection, Row};

/// The original layout's version, in `Config` as `('version', 1)`.
const LAYOUT_VERSION: i32 = 1;

/// The original script's tables, statement by statement, `Config` last so that an
/// interrupted `db init` can be run again. Its `CREATE EVENT clean_requests`
/// (weekly purge of `Requests`) is left out: it needs the EVENT privilege and a
/// running event scheduler (`event_scheduler` is OFF by default), neither of which
/// the store should demand; an operator who wants it can create it by hand.
const ORIGINAL_TABLES: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS `Users` (
`Uid` INTEGER NOT NULL AUTO_INCREMENT,
`UserId` TEXT COLLATE utf8_bin NOT NULL,
`Ik` BLOB NOT NULL,
`SPk` BLOB DEFAULT NULL,
`SPk_sig` BLOB DEFAULT NULL,
`SPk_id` INTEGER UNSIGNED DEFAULT NULL,
PRIMARY KEY(`Uid`),
INDEX(UserId(100))
) ENGINE=InnoDB DEFAULT CHARSET=utf8 COLLATE=utf8_bin",
    "CREATE TABLE IF NOT EXISTS `OPk` (
`id` INTEGER NOT NULL AUTO_INCREMENT,
`Uid` INTEGER NOT NULL,
`OPk` BLOB NOT NULL,
`OPk_id` INTEGER UNSIGNED NOT NULL,
PRIMARY KEY(`id`),
FOREIGN KEY(`Uid`) REFERENCES Users(`Uid`) ON UPDATE CASCADE ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8 COLLATE=utf8_bin",
    "CREATE TABLE IF NOT EXISTS Requests (
`source` TEXT NOT NULL,
`target` TEXT NOT NULL,
`at` TIMESTAMP DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB DEFAULT CHARSET=utf8 COLLATE=utf8_bin",
    "CREATE TABLE IF NOT EXISTS `Config` (
`Name` VARCHAR(20) COLLATE utf8_bin DEFAULT NULL,
`Value` INTEGER NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8 COLLATE=utf8_bin",
];

/// Our unique index on one-time pre-keys: one key per (device, id). The store
/// does not depend on it (it locks the device row before writing keys), it
/// guards the data against any other writer.
const OPK_UNIQUE_INDEX: &str = "OPk_Uid_OPk_id";

/// Our table of claim tokens (see `store::in_doubt`): a claim transaction inserts
/// one, so that after an unanswered COMMIT the store can tell whether the claim
/// happened. The PHP server never reads it.
const CLAIMS_TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS `lime_rs_claims` (
`token` BINARY(16) NOT NULL,
`claimed_at` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
PRIMARY KEY(`token`),
INDEX(`claimed_at`)
) ENGINE=InnoDB";

/// Our index on bundle requests (version 3, in place of version 2's
/// `Requests_source_target_at`): the request limitation counts a target's
/// requests from a source device, and from all the devices of the source's
/// identity (a range of `source`), within a window. TEXT columns take a prefix.
const REQUESTS_INDEX: &str = "Requests_target_source_at";
const REQUESTS_INDEX_DDL: &str =
    "CREATE INDEX `Requests_target_source_at` ON Requests (`target`(100), `source`(100), `at`)";
/// Version 2's index, dropped by `db migrate` once the new one is there.
const OLD_REQUESTS_INDEX: &str = "Requests_source_target_at";

/// Our table of bundle requests recorded per identity in the current window
/// (version 3): one row per identity (the first 16 bytes of the SHA-256 of
/// `sip:user@domain`), locked by a claim of that identity. The PHP server never
/// reads it.
const IDENTITIES_TABLE: &str = "lime_rs_identity_requests";
const IDENTITIES_TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS `lime_rs_identity_requests` (
`identity` BINARY(16) NOT NULL,
`window_start` BIGINT NOT NULL,
`recorded` INTEGER UNSIGNED NOT NULL,
PRIMARY KEY(`identity`)
) ENGINE=InnoDB";

/// The original's tables without a primary key. A Galera cluster wants one on
/// every table (rows are replicated and certified by key); we add an INVISIBLE
/// auto-increment column as the key (MariaDB 10.3+, MySQL 8.0.23+): `SELECT *`
/// and `INSERT INTO t VALUES (...)` without a column list do not see it, so
/// that the PHP server's statements keep working.
const KEYLESS_TABLES: [&str; 2] = ["Requests", "Config"];
/// The name of that column.
const INVISIBLE_KEY: &str = "lime_rs_id";

/// Step names, as `db migrate` reports them.
const OPK_UNIQUE_STEP: &str = "unique index OPk(Uid, OPk_id)";
const CLAIMS_TABLE_STEP: &str = "table lime_rs_claims";
const REQUESTS_INDEX_STEP: &str = "index Requests(target, source, at)";
const OLD_REQUESTS_INDEX_STEP: &str = "drop index Requests(source, target, at)";
const IDENTITIES_TABLE_STEP: &str = "table lime_rs_identity_requests";
const INVISIBLE_KEY_STEP: &str = "invisible primary key";

// No unique index on Users(UserId): a TEXT column can only have a prefix index
// in MySQL, and devices of one long user name share their first 100 characters;
// MariaDB's hash-based long unique keys do not exist in MySQL. Registrations are
// serialised by locking instead (see `queries::register_device`).

/// Creates the original tables, our additions and both version rows when there
/// is no `Config` table; otherwise leaves everything as it is.
pub(super) async fn init(conn: &mut MySqlConnection) -> Result<SchemaState, String> {
    if has_table(conn, "Config").await? {
        return Ok(SchemaState::Present);
    }
    let [users, opk, requests, config] = ORIGINAL_TABLES;
    for ddl in [users, opk, requests] {
        execute(conn, ddl).await?;
    }
    add_opk_unique_index(conn).await?;
    execute(conn, CLAIMS_TABLE_DDL).await?;
    execute(conn, REQUESTS_INDEX_DDL).await?;
    execute(conn, IDENTITIES_TABLE_DDL).await?;
    execute(conn, config).await?;
    for table in KEYLESS_TABLES {
        add_invisible_key(conn, table).await?;
    }
    sqlx::query("INSERT INTO `Config` (`Name`, `Value`) VALUES ('version', ?), (?, ?)")
        .bind(LAYOUT_VERSION)
        .bind(SCHEMA_VERSION_NAME)
        .bind(SCHEMA_VERSION)
        .execute(&mut *conn)
        .await
        .map_err(|error| error.to_string())?;
    Ok(SchemaState::Created)
}

/// Brings a database of the original layout to [`SCHEMA_VERSION`]. Each step
/// checks whether it is needed, so a second run applies nothing. MySQL commits
/// DDL at once: a step that fails leaves the steps before it applied, and a new
/// run goes on from there.
pub(super) async fn migrate(conn: &mut MySqlConnection) -> Result<Migration, String> {
    let ours = versions(conn).await?;
    let mut applied = Vec::new();
    if !has_index(conn, "OPk", OPK_UNIQUE_INDEX).await? {
        refuse_duplicate_one_time_pre_keys(conn).await?;
        add_opk_unique_index(conn).await?;
        applied.push(OPK_UNIQUE_STEP.to_owned());
    }
    // Checked by its presence, not by the version: databases at version 1 made
    // before the table existed lack it.
    if !has_claims_table(conn).await? {
        execute(conn, CLAIMS_TABLE_DDL).await?;
        applied.push(CLAIMS_TABLE_STEP.to_owned());
    }
    if !has_index(conn, "Requests", REQUESTS_INDEX).await? {
        execute(conn, REQUESTS_INDEX_DDL).await?;
        applied.push(REQUESTS_INDEX_STEP.to_owned());
    }
    if has_index(conn, "Requests", OLD_REQUESTS_INDEX).await? {
        execute(
            conn,
            &format!("DROP INDEX `{OLD_REQUESTS_INDEX}` ON Requests"),
        )
        .await?;
        applied.push(OLD_REQUESTS_INDEX_STEP.to_owned());
    }
    if !has_identities_table(conn).await? {
        execute(conn, IDENTITIES_TABLE_DDL).await?;
        applied.push(IDENTITIES_TABLE_STEP.to_owned());
    }
    // Checked by presence too, and not a new version: the version is shared
    // with the other backends, which have nothing to add.
    for table in KEYLESS_TABLES {
        if !has_primary_key(conn, table).await? {
            add_invisible_key(conn, table).await?;
            applied.push(format!("{INVISIBLE_KEY_STEP} {table}.{INVISIBLE_KEY}"));
        }
    }
    match ours {
        None => {
            sqlx::query("INSERT INTO `Config` (`Name`, `Value`) VALUES (?, ?)")
                .bind(SCHEMA_VERSION_NAME)
                .bind(SCHEMA_VERSION)
                .execute(&mut *conn)
                .await
                .map_err(|error| error.to_string())?;
        }
        Some(version) if version < SCHEMA_VERSION => {
            sqlx::query("UPDATE `Config` SET `Value` = ? WHERE `Name` = ?")
                .bind(SCHEMA_VERSION)
                .bind(SCHEMA_VERSION_NAME)
                .execute(&mut *conn)
                .await
                .map_err(|error| error.to_string())?;
        }
        Some(_) => return Ok(Migration { applied }),
    }
    applied.push(format!(
        "Config ('{SCHEMA_VERSION_NAME}', {SCHEMA_VERSION})"
    ));
    Ok(Migration { applied })
}

/// Checks that the database can be served: the original layout (version 1), our
/// version not newer than ours, the columns the store uses, and a server that
/// knows `SKIP LOCKED`. Returns our schema version, `None` before `db migrate`.
pub(super) async fn check(conn: &mut MySqlConnection) -> Result<Option<i64>, String> {
    let ours = versions(conn).await?;
    sqlx::query("SELECT Uid, UserId, Ik, SPk, SPk_sig, SPk_id FROM Users LIMIT 0")
        .execute(&mut *conn)
        .await
        .map_err(|error| format!("table Users is not the original's: {error}"))?;
    let mut transaction = conn.begin().await.map_err(|error| error.to_string())?;
    let probe = sqlx::query(
        "SELECT id, OPk, OPk_id FROM OPk WHERE Uid = -1 LIMIT 1 FOR UPDATE SKIP LOCKED",
    )
    .execute(&mut *transaction)
    .await;
    let _ = transaction.rollback().await;
    if let Err(error) = probe {
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(&mut *conn)
            .await
            .unwrap_or_default();
        return Err(match super::mysql_error_number(&error) {
            // ER_PARSE_ERROR
            Some(1064) => format!(
                "the database server ({version}) does not know SELECT ... FOR UPDATE SKIP \
                 LOCKED: MariaDB 10.6 or MySQL 8.0 or later is needed"
            ),
            _ => format!("table OPk is not the original's: {error}"),
        });
    }
    Ok(ours)
}

/// `Config`'s `('version', 1)` (required) and our `('lime_rs_schema', N)`.
async fn versions(conn: &mut MySqlConnection) -> Result<Option<i64>, String> {
    let rows = match sqlx::query("SELECT `Name`, `Value` FROM `Config`")
        .fetch_all(&mut *conn)
        .await
    {
        Ok(rows) => rows,
        // ER_NO_SUCH_TABLE
        Err(error) if super::mysql_error_number(&error) == Some(1146) => {
            return Err(
                "no Config table: not a lime-server database yet (`lime-server db init` \
                 creates the schema)"
                    .into(),
            );
        }
        Err(error) => return Err(error.to_string()),
    };
    let mut layout = None;
    let mut ours = None;
    for row in rows {
        // sqlx reads a `utf8_bin` column as bytes.
        let name: Option<Vec<u8>> = row.try_get(0).map_err(|error| error.to_string())?;
        let value: i32 = row.try_get(1).map_err(|error| error.to_string())?;
        match name.as_deref() {
            Some(b"version") => layout = Some(value),
            Some(name) if name == SCHEMA_VERSION_NAME.as_bytes() => ours = Some(i64::from(value)),
            _ => {}
        }
    }
    match layout {
        Some(LAYOUT_VERSION) => {}
        Some(other) => {
            return Err(format!(
                "table Config has ('version', {other}); this server serves version {LAYOUT_VERSION}"
            ));
        }
        None => {
            return Err("no ('version', N) row in table Config: not a lime-server database".into());
        }
    }
    match ours {
        Some(version) if version > SCHEMA_VERSION => Err(format!(
            "schema version {version} in table Config is newer than this server's \
             {SCHEMA_VERSION}: a newer lime-server wrote it"
        )),
        ours => Ok(ours),
    }
}

/// A unique index cannot be added over keys stored twice under one id: name the
/// devices and say how to keep the oldest key of each, rather than choosing for
/// the operator which of a device's keys to throw away.
async fn refuse_duplicate_one_time_pre_keys(conn: &mut MySqlConnection) -> Result<(), String> {
    let duplicates = sqlx::query(
        "SELECT u.UserId, o.OPk_id, COUNT(*) FROM OPk AS o JOIN Users AS u ON u.Uid = o.Uid \
         GROUP BY o.Uid, u.UserId, o.OPk_id HAVING COUNT(*) > 1 ORDER BY o.Uid, o.OPk_id LIMIT 10",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|error| error.to_string())?;
    if duplicates.is_empty() {
        return Ok(());
    }
    let examples = duplicates
        .iter()
        .map(|row| {
            let device: Vec<u8> = row.try_get(0).unwrap_or_default();
            let device = String::from_utf8_lossy(&device);
            let id: u32 = row.try_get(1).unwrap_or_default();
            let count: i64 = row.try_get(2).unwrap_or_default();
            format!("{device} (OPk_id {id}: {count} keys)")
        })
        .collect::<Vec<_>>()
        .join(", ");
    Err(format!(
        "cannot add the {OPK_UNIQUE_STEP}: devices hold several one-time pre-keys under one \
         id: {examples}{more}. Nothing was changed. To keep the oldest key of each id, run \
         `DELETE o1 FROM OPk AS o1 JOIN OPk AS o2 ON o1.Uid = o2.Uid AND o1.OPk_id = o2.OPk_id \
         AND o1.id > o2.id` and then `lime-server db migrate` again",
        more = if duplicates.len() == 10 {
            " and maybe more"
        } else {
            ""
        },
    ))
}

/// Adds [`INVISIBLE_KEY`] to `table` as its primary key. The rows already there
/// are numbered as the table is rebuilt (a copy: the PHP server's writes wait
/// for it; `Requests` is the only large one, and `db purge` keeps it short).
async fn add_invisible_key(conn: &mut MySqlConnection, table: &str) -> Result<(), String> {
    execute(
        conn,
        &format!(
            "ALTER TABLE `{table}` ADD COLUMN `{INVISIBLE_KEY}` BIGINT UNSIGNED NOT NULL \
             AUTO_INCREMENT INVISIBLE PRIMARY KEY FIRST"
        ),
    )
    .await
}

/// Whether the original's tables without a primary key have one now (ours, or
/// one an operator added).
pub(super) async fn has_primary_keys(conn: &mut MySqlConnection) -> Result<bool, String> {
    for table in KEYLESS_TABLES {
        if !has_primary_key(conn, table).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn has_primary_key(conn: &mut MySqlConnection, table: &str) -> Result<bool, String> {
    has_index(conn, table, "PRIMARY").await
}

async fn add_opk_unique_index(conn: &mut MySqlConnection) -> Result<(), String> {
    // InnoDB builds a secondary index online: the PHP server can keep serving.
    execute(
        conn,
        &format!("CREATE UNIQUE INDEX `{OPK_UNIQUE_INDEX}` ON `OPk` (`Uid`, `OPk_id`)"),
    )
    .await
}

/// Whether the table of claim tokens is there (not before `db migrate`).
pub(super) async fn has_claims_table(conn: &mut MySqlConnection) -> Result<bool, String> {
    has_table(conn, crate::store::in_doubt::CLAIMS_TABLE).await
}

/// Whether the table of requests recorded per identity is there (not before `db
/// migrate` to version 3).
pub(super) async fn has_identities_table(conn: &mut MySqlConnection) -> Result<bool, String> {
    has_table(conn, IDENTITIES_TABLE).await
}

async fn has_table(conn: &mut MySqlConnection, table: &str) -> Result<bool, String> {
    let count: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
    )
    .bind(table)
    .fetch_one(&mut *conn)
    .await
    .map_err(|error| error.to_string())?;
    Ok(count > 0)
}

async fn has_index(conn: &mut MySqlConnection, table: &str, index: &str) -> Result<bool, String> {
    let count: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.STATISTICS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND INDEX_NAME = ?",
    )
    .bind(table)
    .bind(index)
    .fetch_one(&mut *conn)
    .await
    .map_err(|error| error.to_string())?;
    Ok(count > 0)
}

async fn execute(conn: &mut MySqlConnection, sql: &str) -> Result<(), String> {
    sqlx::raw_sql(sql)
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(|error| error.to_string())
}
