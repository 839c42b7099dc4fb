//! The original PHP lime-server's side of a shared MariaDB database: its schema
//! script (`tests/fixtures/original-lime-server-schema.mysql.sql`), its bundle query, and devices written the way
//! it writes them.

use sqlx::MySqlConnection;

/// The original's per-algorithm schema script, as published in its README.
pub const SCHEMA_SCRIPT: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/original-lime-server-schema.mysql.sql"
));

/// The original's bundle query, as the PHP server runs it.
pub const BUNDLE_QUERY: &str = "SELECT u.Ik, u.SPk, u.SPk_id, u.SPk_sig, o.OPk, o.OPk_id \
     FROM Users AS u LEFT JOIN OPk AS o ON u.Uid=o.Uid WHERE UserId = ? LIMIT 1";

/// The schema script's statements, comments left out.
pub fn schema_statements() -> Vec<String> {
    let text: String = SCHEMA_SCRIPT
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .map(|line| format!("{line}\n"))
        .collect();
    text.split(";\n")
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Runs the schema script as it is; only its `CREATE EVENT` may fail (it needs the
/// EVENT privilege).
pub async fn create_schema(conn: &mut MySqlConnection) {
    for statement in schema_statements() {
        if let Err(error) = sqlx::raw_sql(&statement).execute(&mut *conn).await {
            assert!(
                statement.starts_with("CREATE EVENT"),
                "schema script statement failed: {statement}: {error}"
            );
        }
    }
}

/// Stores a device the way the PHP server does: registerUser inserts its Ik,
/// postSPk sets its signed pre-key, postOPks inserts its one-time pre-keys.
/// Returns its `Uid`.
pub async fn register_device(
    conn: &mut MySqlConnection,
    device_id: &str,
    identity_key: &[u8],
    signed_pre_key: (&[u8], &[u8], u32),
    one_time_pre_keys: &[(&[u8], u32)],
) -> u64 {
    let uid = sqlx::query("INSERT INTO Users(UserId,Ik) VALUES(?,?)")
        .bind(device_id)
        .bind(identity_key)
        .execute(&mut *conn)
        .await
        .unwrap()
        .last_insert_id();
    let (spk, spk_sig, spk_id) = signed_pre_key;
    sqlx::query("UPDATE Users SET SPk = ?, SPk_sig = ?, SPk_id = ? WHERE Uid = ?;")
        .bind(spk)
        .bind(spk_sig)
        .bind(spk_id)
        .bind(uid)
        .execute(&mut *conn)
        .await
        .unwrap();
    for (opk, opk_id) in one_time_pre_keys {
        sqlx::query("INSERT INTO OPk(Uid, OPk, OPk_id) VALUES(?,?,?);")
            .bind(uid)
            .bind(*opk)
            .bind(*opk_id)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    uid
}
