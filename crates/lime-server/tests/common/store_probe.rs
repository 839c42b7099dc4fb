//! Looks into a test server's stores directly, bypassing the protocol, on whichever
//! backend the test runs: what the store holds, and changes a server could find
//! made behind its back (a device lost, a device written by an old server, a lock
//! held by another process).

use lime_protocol::Curve;
use lime_server::config::Settings;
use lime_server::store::StoreLocation;
use sqlx::{Connection, Row};
use std::time::Duration;

/// A device row as stored: Ik, SPk, SPk_sig, SPk_id.
pub type DeviceRow = (Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>, Option<u32>);

/// Direct access to the stores of one test server.
pub struct StoreProbe {
    settings: Settings,
}

/// One open connection to a curve's store.
enum Conn {
    Sqlite(rusqlite::Connection),
    Mysql(sqlx::MySqlConnection),
    Postgres(sqlx::PgConnection),
}

/// A write lock on a curve's store held by another connection, as another
/// process could; released by [`WriteLock::release`].
pub struct WriteLock(Conn);

impl StoreProbe {
    /// A probe of the stores `settings` name.
    pub fn new(settings: &Settings) -> StoreProbe {
        StoreProbe {
            settings: settings.clone(),
        }
    }

    async fn connect(&self, curve: Curve) -> Conn {
        let location = self
            .settings
            .storage
            .location(curve)
            .expect("store location");
        match &location {
            StoreLocation::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).expect("open the SQLite store");
                conn.busy_timeout(Duration::from_secs(5)).unwrap();
                conn.execute_batch("PRAGMA foreign_keys = ON").unwrap();
                Conn::Sqlite(conn)
            }
            StoreLocation::Mysql(url) => Conn::Mysql(
                sqlx::MySqlConnection::connect(url)
                    .await
                    .unwrap_or_else(|error| panic!("connect to {location}: {error}")),
            ),
            StoreLocation::Postgres(url) => Conn::Postgres(
                sqlx::PgConnection::connect(url)
                    .await
                    .unwrap_or_else(|error| panic!("connect to {location}: {error}")),
            ),
        }
    }

    /// Runs one statement with text parameters (`?` placeholders, rewritten as
    /// `$n` for PostgreSQL, whose identifiers are quoted).
    async fn execute(&self, curve: Curve, sql: &str, params: &[Param<'_>]) -> u64 {
        match &mut self.connect(curve).await {
            Conn::Sqlite(conn) => {
                let mut statement = conn.prepare(sql).unwrap();
                for (index, param) in params.iter().enumerate() {
                    match param {
                        Param::Text(text) => statement.raw_bind_parameter(index + 1, text),
                        Param::Bytes(bytes) => statement.raw_bind_parameter(index + 1, bytes),
                        Param::Int(value) => statement.raw_bind_parameter(index + 1, value),
                    }
                    .unwrap();
                }
                statement.raw_execute().unwrap() as u64
            }
            Conn::Mysql(conn) => bind_all(sqlx::query(sql), params)
                .execute(conn)
                .await
                .unwrap_or_else(|error| panic!("{sql}: {error}"))
                .rows_affected(),
            Conn::Postgres(conn) => {
                let sql = postgres_sql(sql);
                bind_all(sqlx::query(&sql), params)
                    .execute(conn)
                    .await
                    .unwrap_or_else(|error| panic!("{sql}: {error}"))
                    .rows_affected()
            }
        }
    }

    /// Number of one-time pre-keys stored for a curve, all devices together.
    pub async fn count_one_time_pre_keys(&self, curve: Curve) -> u64 {
        let sql = "SELECT COUNT(*) FROM OPk";
        let count: i64 = match &mut self.connect(curve).await {
            Conn::Sqlite(conn) => conn.query_row(sql, [], |row| row.get(0)).unwrap(),
            Conn::Mysql(conn) => sqlx::query(sql).fetch_one(conn).await.unwrap().get(0),
            Conn::Postgres(conn) => sqlx::query(&postgres_sql(sql))
                .fetch_one(conn)
                .await
                .unwrap()
                .get(0),
        };
        count as u64
    }

    /// The device ids stored for a curve, sorted.
    pub async fn device_ids(&self, curve: Curve) -> Vec<String> {
        let sql = "SELECT UserId FROM Users ORDER BY UserId";
        let rows = self.text_rows(curve, sql, 1).await;
        rows.into_iter().map(|mut row| row.remove(0)).collect()
    }

    /// The first `columns` columns of what `sql` selects, as text, on any backend.
    async fn text_rows(&self, curve: Curve, sql: &str, columns: usize) -> Vec<Vec<String>> {
        match &mut self.connect(curve).await {
            Conn::Sqlite(conn) => conn
                .prepare(sql)
                .unwrap()
                .query_map([], |row| (0..columns).map(|index| row.get(index)).collect())
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap(),
            // utf8_bin text comes back as bytes.
            Conn::Mysql(conn) => sqlx::query(sql)
                .fetch_all(conn)
                .await
                .unwrap()
                .iter()
                .map(|row| {
                    (0..columns)
                        .map(|index| String::from_utf8(row.get(index)).unwrap())
                        .collect()
                })
                .collect(),
            Conn::Postgres(conn) => sqlx::query(&postgres_sql(sql))
                .fetch_all(conn)
                .await
                .unwrap()
                .iter()
                .map(|row| (0..columns).map(|index| row.get(index)).collect())
                .collect(),
        }
    }

    /// A device's stored keys, if it is stored.
    pub async fn device_row(&self, curve: Curve, device_id: &str) -> Option<DeviceRow> {
        let sql = "SELECT Ik, SPk, SPk_sig, SPk_id FROM Users WHERE UserId = ?";
        match &mut self.connect(curve).await {
            Conn::Sqlite(conn) => {
                use rusqlite::OptionalExtension;
                conn.query_row(&sql.replace('?', "?1"), [device_id], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })
                .optional()
                .unwrap()
            }
            Conn::Mysql(conn) => sqlx::query(sql)
                .bind(device_id)
                .fetch_optional(conn)
                .await
                .unwrap()
                .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3))),
            Conn::Postgres(conn) => sqlx::query(&postgres_sql(sql))
                .bind(device_id)
                .fetch_optional(conn)
                .await
                .unwrap()
                .map(|row| {
                    let id: Option<i64> = row.get(3);
                    (row.get(0), row.get(1), row.get(2), id.map(|id| id as u32))
                }),
        }
    }

    /// Every stored one-time pre-key of a curve as (OPk_id, OPk), sorted by id.
    pub async fn one_time_pre_keys(&self, curve: Curve) -> Vec<(u32, Vec<u8>)> {
        let sql = "SELECT OPk_id, OPk FROM OPk ORDER BY OPk_id";
        match &mut self.connect(curve).await {
            Conn::Sqlite(conn) => conn
                .prepare(sql)
                .unwrap()
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap(),
            Conn::Mysql(conn) => sqlx::query(sql)
                .fetch_all(conn)
                .await
                .unwrap()
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect(),
            Conn::Postgres(conn) => sqlx::query(&postgres_sql(sql))
                .fetch_all(conn)
                .await
                .unwrap()
                .iter()
                .map(|row| (row.get::<i64, _>(0) as u32, row.get(1)))
                .collect(),
        }
    }

    /// Whether the four tables of the original layout are all there.
    pub async fn tables_intact(&self, curve: Curve) -> bool {
        for table in ["Users", "OPk", "Requests", "Config"] {
            let sql = format!("SELECT COUNT(*) FROM {table}");
            let ok = match &mut self.connect(curve).await {
                Conn::Sqlite(conn) => conn.query_row(&sql, [], |_| Ok(())).is_ok(),
                Conn::Mysql(conn) => sqlx::query(&sql).fetch_one(conn).await.is_ok(),
                Conn::Postgres(conn) => sqlx::query(&postgres_sql(&sql))
                    .fetch_one(conn)
                    .await
                    .is_ok(),
            };
            if !ok {
                return false;
            }
        }
        true
    }

    /// Records a bundle request of `source` for `target` made `age_secs` ago, by the
    /// database's clock, as a server would have.
    pub async fn insert_request(&self, curve: Curve, source: &str, target: &str, age_secs: i64) {
        let at = match self
            .settings
            .storage
            .location(curve)
            .expect("store location")
        {
            StoreLocation::Sqlite(_) => "datetime('now', '-' || ? || ' seconds')",
            StoreLocation::Mysql(_) => "NOW() - INTERVAL ? SECOND",
            StoreLocation::Postgres(_) => "now() - make_interval(secs => ?)",
        };
        let sql = format!("INSERT INTO Requests (source, target, at) VALUES (?, ?, {at})");
        let params = [
            Param::Text(source),
            Param::Text(target),
            Param::Int(age_secs),
        ];
        assert_eq!(self.execute(curve, &sql, &params).await, 1);
    }

    /// The (source, target) of every recorded bundle request of a curve, sorted.
    pub async fn requests(&self, curve: Curve) -> Vec<(String, String)> {
        let sql = "SELECT source, target FROM Requests";
        let mut rows: Vec<(String, String)> = self
            .text_rows(curve, sql, 2)
            .await
            .into_iter()
            .map(|mut row| (row.remove(0), row.remove(0)))
            .collect();
        rows.sort();
        rows
    }

    /// Removes a device and its one-time pre-keys behind the server's back.
    pub async fn delete_device(&self, curve: Curve, device_id: &str) {
        let deleted = self
            .execute(
                curve,
                "DELETE FROM Users WHERE UserId = ?",
                &[Param::Text(device_id)],
            )
            .await;
        assert_eq!(deleted, 1, "{device_id} was not in the {curve} store");
    }

    /// Removes one one-time pre-key (of any device) behind the server's back:
    /// what a server that lost keys looks like to their owner.
    pub async fn delete_one_time_pre_key(&self, curve: Curve, id: u32) {
        let deleted = self
            .execute(
                curve,
                "DELETE FROM OPk WHERE OPk_id = ?",
                &[Param::Int(i64::from(id))],
            )
            .await;
        assert_eq!(deleted, 1, "OPk {id} was not in the {curve} store");
    }

    /// Stores a device as an old server could have left it: its Ik and one OPk, no
    /// signed pre-key yet.
    pub async fn insert_device_without_signed_pre_key(
        &self,
        curve: Curve,
        device_id: &str,
        identity_key: &[u8],
        one_time_pre_key: (&[u8], u32),
    ) {
        self.execute(
            curve,
            "INSERT INTO Users (UserId, Ik) VALUES (?, ?)",
            &[Param::Text(device_id), Param::Bytes(identity_key)],
        )
        .await;
        self.execute(
            curve,
            "INSERT INTO OPk (Uid, OPk, OPk_id) SELECT Uid, ?, ? FROM Users WHERE UserId = ?",
            &[
                Param::Bytes(one_time_pre_key.0),
                Param::Int(i64::from(one_time_pre_key.1)),
                Param::Text(device_id),
            ],
        )
        .await;
    }

    /// Takes a write lock on the curve's device and key tables from another
    /// connection, as another process could.
    pub async fn lock_for_writing(&self, curve: Curve) -> WriteLock {
        let mut conn = self.connect(curve).await;
        match &mut conn {
            Conn::Sqlite(conn) => conn.execute_batch("BEGIN IMMEDIATE").unwrap(),
            Conn::Mysql(conn) => {
                sqlx::raw_sql("LOCK TABLES Users WRITE, OPk WRITE")
                    .execute(conn)
                    .await
                    .unwrap();
            }
            Conn::Postgres(conn) => {
                sqlx::raw_sql("BEGIN; LOCK TABLE \"Users\", \"OPk\" IN ACCESS EXCLUSIVE MODE")
                    .execute(conn)
                    .await
                    .unwrap();
            }
        }
        WriteLock(conn)
    }
}

impl WriteLock {
    /// Releases the lock.
    pub async fn release(self) {
        match self.0 {
            Conn::Sqlite(conn) => conn.execute_batch("ROLLBACK").unwrap(),
            Conn::Mysql(mut conn) => {
                sqlx::raw_sql("UNLOCK TABLES")
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
            Conn::Postgres(mut conn) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
            }
        }
    }
}

/// A statement parameter.
enum Param<'a> {
    Text(&'a str),
    Bytes(&'a [u8]),
    Int(i64),
}

fn bind_all<'q, DB>(
    mut query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    params: &'q [Param<'q>],
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for param in params {
        query = match param {
            Param::Text(text) => query.bind(*text),
            Param::Bytes(bytes) => query.bind(*bytes),
            Param::Int(value) => query.bind(*value),
        };
    }
    query
}

/// The statement for PostgreSQL: identifiers of the original layout quoted (they
/// are mixed-case there), `?` placeholders numbered.
fn postgres_sql(sql: &str) -> String {
    const IDENTIFIERS: [&str; 12] = [
        "Users", "OPk_id", "OPk", "Requests", "Config", "Uid", "UserId", "Ik", "SPk_sig", "SPk_id",
        "SPk", "Value",
    ];
    let mut out = String::new();
    let mut placeholder = 0;
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if IDENTIFIERS.contains(&word.as_str()) {
            out.push('"');
            out.push_str(word);
            out.push('"');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for ch in sql.chars() {
        if ch.is_ascii_alphanumeric() || ch == '_' {
            word.push(ch);
            continue;
        }
        flush(&mut word, &mut out);
        if ch == '?' {
            placeholder += 1;
            out.push_str(&format!("${placeholder}"));
        } else {
            out.push(ch);
        }
    }
    flush(&mut word, &mut out);
    out
}
