//! rusqlite vs sqlx-sqlite on lime-server's two hot paths: the getPeerBundle
//! claim transaction and registerUser with 100 OPks. See README.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{OptionalExtension, TransactionBehavior, params};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio::sync::{mpsc, oneshot};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const DEVICES: usize = 1_000; // pre-filled devices for the claim workloads
const OPKS_PER_DEVICE: usize = 200;
const CLAIMS: usize = 20_000; // claims per run, round-robin over the devices
const REGISTERS: usize = 2_000; // registrations per run
const OPKS_PER_REGISTER: usize = 100;
const BATCH: usize = 32; // claims per transaction in the group-commit variants
const TASKS: usize = 16; // concurrent tokio tasks in the concurrent variants
const RUNS: usize = 5; // median of this many runs, each on a fresh database file

const SCHEMA: &str = "
CREATE TABLE Users (Uid INTEGER PRIMARY KEY AUTOINCREMENT, UserId TEXT NOT NULL, Ik BLOB NOT NULL, SPk BLOB, SPk_sig BLOB, SPk_id INTEGER);
CREATE UNIQUE INDEX users_userid ON Users(UserId);
CREATE TABLE OPk (id INTEGER PRIMARY KEY AUTOINCREMENT, Uid INTEGER NOT NULL REFERENCES Users(Uid) ON UPDATE CASCADE ON DELETE CASCADE, OPk BLOB NOT NULL, OPk_id INTEGER NOT NULL);
CREATE UNIQUE INDEX opk_uid_opkid ON OPk(Uid, OPk_id);";
const SELECT_USER: &str = "SELECT Uid, Ik, SPk, SPk_sig, SPk_id FROM Users WHERE UserId=?";
const CLAIM_OPK: &str =
    "DELETE FROM OPk WHERE id = (SELECT id FROM OPk WHERE Uid=? LIMIT 1) RETURNING OPk, OPk_id";
const INSERT_USER: &str = "INSERT INTO Users(UserId, Ik, SPk, SPk_sig, SPk_id) VALUES (?,?,?,?,?)";
const INSERT_OPK: &str = "INSERT INTO OPk(Uid, OPk, OPk_id) VALUES (?,?,?)";

const KEY: [u8; 32] = [0x42; 32];
const SIG: [u8; 64] = [0x5a; 64];

fn user_id(i: usize) -> String {
    format!("sip:user{i}@example.org;gr=urn:uuid:00000000-0000-0000-0000-{i:012}")
}

/// What one claim reads out of the database (copied out, as the server must).
#[allow(dead_code)]
struct Bundle {
    ik: Vec<u8>,
    spk: Option<Vec<u8>>,
    spk_sig: Option<Vec<u8>>,
    spk_id: Option<i64>,
    opk: Option<(Vec<u8>, i64)>,
}

// ---------------------------------------------------------------- database files

/// A fresh database file in its own temp dir, removed on drop.
struct TempDb(PathBuf);

impl TempDb {
    /// Creates the schema and, if `prefill`, DEVICES devices with OPKS_PER_DEVICE OPks each.
    fn new(prefill: bool) -> Res<Self> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("sqlite-driver-bench-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let db = TempDb(dir);
        let mut conn = rusqlite_open(&db.path())?;
        conn.execute_batch(SCHEMA)?;
        if prefill {
            let tx = conn.transaction()?;
            for d in 0..DEVICES {
                rusqlite_register(&tx, &user_id(d), OPKS_PER_DEVICE)?;
            }
            tx.commit()?;
        }
        conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")?;
        Ok(db)
    }
    fn path(&self) -> PathBuf {
        self.0.join("lime.sqlite3")
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- rusqlite

fn rusqlite_open(path: &Path) -> Res<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// The claim queries, inside a transaction the caller opened.
fn rusqlite_claim(conn: &rusqlite::Connection, user: &str) -> Res<Bundle> {
    let (uid, ik, spk, spk_sig, spk_id): (i64, _, _, _, _) =
        conn.prepare_cached(SELECT_USER)?.query_row([user], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?;
    let opk = conn
        .prepare_cached(CLAIM_OPK)?
        .query_row([uid], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(Bundle {
        ik,
        spk,
        spk_sig,
        spk_id,
        opk,
    })
}

/// The register queries, inside a transaction the caller opened.
fn rusqlite_register(conn: &rusqlite::Connection, user: &str, opks: usize) -> Res<()> {
    conn.prepare_cached(INSERT_USER)?
        .execute(params![user, &KEY[..], &KEY[..], &SIG[..], 1])?;
    let uid = conn.last_insert_rowid();
    let mut insert = conn.prepare_cached(INSERT_OPK)?;
    for k in 0..opks {
        insert.execute(params![uid, &KEY[..], k as i64])?;
    }
    Ok(())
}

/// CLAIMS claims, `batch` per BEGIN IMMEDIATE..COMMIT, one connection, one thread.
fn rusqlite_claims(batch: usize) -> Res<Sample> {
    let db = TempDb::new(true)?;
    let users: Vec<String> = (0..DEVICES).map(user_id).collect();
    let mut conn = rusqlite_open(&db.path())?;
    let (mut got, clock) = (0, Clock::start());
    for chunk in (0..CLAIMS).collect::<Vec<_>>().chunks(batch) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for i in chunk {
            got += rusqlite_claim(&tx, &users[i % DEVICES])?.opk.is_some() as usize;
        }
        tx.commit()?;
    }
    let sample = clock.stop(CLAIMS);
    assert_eq!(got, CLAIMS, "every claim must get an OPk");
    Ok(sample)
}

fn rusqlite_registers() -> Res<Sample> {
    let db = TempDb::new(false)?;
    let users: Vec<String> = (0..REGISTERS).map(user_id).collect();
    let mut conn = rusqlite_open(&db.path())?;
    let clock = Clock::start();
    for user in &users {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        rusqlite_register(&tx, user, OPKS_PER_REGISTER)?;
        tx.commit()?;
    }
    Ok(clock.stop(REGISTERS))
}

/// The server-shaped use of rusqlite: one writer thread owns the connection,
/// TASKS tokio tasks send it claims over a channel; it takes whatever is queued
/// (up to `max_batch`) into one transaction and answers after COMMIT.
async fn rusqlite_writer_thread_claims(max_batch: usize) -> Res<Sample> {
    struct Claim(Arc<str>, oneshot::Sender<Bundle>);
    let db = TempDb::new(true)?;
    let users: Arc<Vec<Arc<str>>> = Arc::new((0..DEVICES).map(|d| user_id(d).into()).collect());
    let mut conn = rusqlite_open(&db.path())?;
    let (send, mut recv) = mpsc::channel::<Claim>(1024);
    let writer = std::thread::spawn(move || -> Res<()> {
        while let Some(first) = recv.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match recv.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let bundles = batch
                .iter()
                .map(|c| rusqlite_claim(&tx, &c.0))
                .collect::<Res<Vec<_>>>()?;
            tx.commit()?;
            for (c, b) in batch.into_iter().zip(bundles) {
                let _ = c.1.send(b);
            }
        }
        Ok(())
    });
    let clock = Clock::start();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (send, users) = (send.clone(), users.clone());
            tokio::spawn(async move {
                let mut got = 0;
                for i in (t..CLAIMS).step_by(TASKS) {
                    let (reply, answer) = oneshot::channel();
                    send.send(Claim(users[i % DEVICES].clone(), reply))
                        .await
                        .ok()
                        .unwrap();
                    got += answer.await.unwrap().opk.is_some() as usize;
                }
                got
            })
        })
        .collect();
    let mut got = 0;
    for t in tasks {
        got += t.await?;
    }
    let sample = clock.stop(CLAIMS);
    drop(send);
    writer.join().unwrap()?;
    assert_eq!(got, CLAIMS, "every claim must get an OPk");
    Ok(sample)
}

// ---------------------------------------------------------------- sqlx

fn sqlx_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5))
}

/// The claim queries, inside a transaction the caller opened (statements are cached by sqlx).
async fn sqlx_claim(conn: &mut SqliteConnection, user: &str) -> Res<Bundle> {
    let row = sqlx::query(SELECT_USER)
        .bind(user)
        .fetch_one(&mut *conn)
        .await?;
    let uid: i64 = row.try_get(0)?;
    let opk = sqlx::query(CLAIM_OPK)
        .bind(uid)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(Bundle {
        ik: row.try_get(1)?,
        spk: row.try_get(2)?,
        spk_sig: row.try_get(3)?,
        spk_id: row.try_get(4)?,
        opk: opk
            .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
            .transpose()?,
    })
}

async fn sqlx_claims() -> Res<Sample> {
    let db = TempDb::new(true)?;
    let users: Vec<String> = (0..DEVICES).map(user_id).collect();
    let mut conn = SqliteConnection::connect_with(&sqlx_options(&db.path())).await?;
    let (mut got, clock) = (0, Clock::start());
    for i in 0..CLAIMS {
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        got += sqlx_claim(&mut tx, &users[i % DEVICES])
            .await?
            .opk
            .is_some() as usize;
        tx.commit().await?;
    }
    let sample = clock.stop(CLAIMS);
    assert_eq!(got, CLAIMS, "every claim must get an OPk");
    Ok(sample)
}

/// TASKS tasks claiming concurrently through a pool of `conns` connections.
async fn sqlx_pool_claims(conns: u32) -> Res<Sample> {
    let db = TempDb::new(true)?;
    let users: Arc<Vec<String>> = Arc::new((0..DEVICES).map(user_id).collect());
    let pool = SqlitePoolOptions::new()
        .max_connections(conns)
        .connect_with(sqlx_options(&db.path()))
        .await?;
    let mut warm = Vec::new(); // open every connection before the clock starts
    for _ in 0..conns {
        warm.push(pool.acquire().await?);
    }
    drop(warm);
    let clock = Clock::start();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (pool, users) = (pool.clone(), users.clone());
            tokio::spawn(async move {
                let mut got = 0;
                for i in (t..CLAIMS).step_by(TASKS) {
                    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                    got += sqlx_claim(&mut tx, &users[i % DEVICES])
                        .await?
                        .opk
                        .is_some() as usize;
                    tx.commit().await?;
                }
                Res::Ok(got)
            })
        })
        .collect();
    let mut got = 0;
    for t in tasks {
        got += t.await??;
    }
    let sample = clock.stop(CLAIMS);
    pool.close().await;
    assert_eq!(got, CLAIMS, "every claim must get an OPk");
    Ok(sample)
}

/// registerUser as the server would naively write it: one INSERT per OPk.
/// With `multi_row`, the 100 OPks go in one `INSERT .. VALUES (..),(..)..` instead.
async fn sqlx_registers(multi_row: bool) -> Res<Sample> {
    let db = TempDb::new(false)?;
    let users: Vec<String> = (0..REGISTERS).map(user_id).collect();
    let many = format!(
        "INSERT INTO OPk(Uid, OPk, OPk_id) VALUES {}",
        vec!["(?,?,?)"; OPKS_PER_REGISTER].join(",")
    );
    let mut conn = SqliteConnection::connect_with(&sqlx_options(&db.path())).await?;
    let clock = Clock::start();
    for user in &users {
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let uid = sqlx::query(INSERT_USER)
            .bind(user)
            .bind(&KEY[..])
            .bind(&KEY[..])
            .bind(&SIG[..])
            .bind(1i64)
            .execute(&mut *tx)
            .await?
            .last_insert_rowid();
        if multi_row {
            let mut q = sqlx::query(AssertSqlSafe(many.as_str()));
            for k in 0..OPKS_PER_REGISTER {
                q = q.bind(uid).bind(&KEY[..]).bind(k as i64);
            }
            q.execute(&mut *tx).await?;
        } else {
            for k in 0..OPKS_PER_REGISTER {
                sqlx::query(INSERT_OPK)
                    .bind(uid)
                    .bind(&KEY[..])
                    .bind(k as i64)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
    }
    Ok(clock.stop(REGISTERS))
}

// ---------------------------------------------------------------- measuring

/// One timed run: throughput and CPU time (user+sys, all threads) per operation.
#[derive(Clone, Copy)]
struct Sample {
    ops_per_sec: f64,
    cpu_us_per_op: f64,
}

struct Clock(Instant, Duration);

impl Clock {
    fn start() -> Self {
        Clock(Instant::now(), cpu_time())
    }
    fn stop(self, ops: usize) -> Sample {
        let (wall, cpu) = (self.0.elapsed(), cpu_time() - self.1);
        Sample {
            ops_per_sec: ops as f64 / wall.as_secs_f64(),
            cpu_us_per_op: cpu.as_secs_f64() * 1e6 / ops as f64,
        }
    }
}

/// CPU time used by this process so far, all threads, user + system.
fn cpu_time() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct we hand it.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

type Bench<'a> = (
    &'static str,
    &'static str,
    Box<dyn FnMut() -> Res<Sample> + 'a>,
);

fn main() -> Res<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let only = std::env::args().nth(1).unwrap_or_default(); // optional substring filter
    #[rustfmt::skip]
    let mut benches: Vec<Bench> = vec![
        ("claim", "rusqlite, 1 conn, 1 claim/tx", Box::new(|| rusqlite_claims(1))),
        ("claim", "rusqlite, 1 conn, 32 claims/tx", Box::new(|| rusqlite_claims(BATCH))),
        ("claim", "rusqlite, writer thread, 16 tasks, 1 claim/tx", Box::new(|| rt.block_on(rusqlite_writer_thread_claims(1)))),
        ("claim", "rusqlite, writer thread, 16 tasks, <=32 claims/tx", Box::new(|| rt.block_on(rusqlite_writer_thread_claims(BATCH)))),
        ("claim", "sqlx, 1 conn, 1 claim/tx", Box::new(|| rt.block_on(sqlx_claims()))),
        ("claim", "sqlx, pool of 1, 16 tasks, 1 claim/tx", Box::new(|| rt.block_on(sqlx_pool_claims(1)))),
        ("claim", "sqlx, pool of 16, 16 tasks, 1 claim/tx", Box::new(|| rt.block_on(sqlx_pool_claims(16)))),
        ("register", "rusqlite, 1 conn, 101 INSERTs/tx", Box::new(rusqlite_registers)),
        ("register", "sqlx, 1 conn, 101 INSERTs/tx", Box::new(|| rt.block_on(sqlx_registers(false)))),
        ("register", "sqlx, 1 conn, 2 INSERTs/tx (multi-row OPk)", Box::new(|| rt.block_on(sqlx_registers(true)))),
    ];
    benches.retain(|(w, v, _)| format!("{w} {v}").contains(only.as_str()));
    println!(
        "claim: {CLAIMS} claims over {DEVICES} devices x {OPKS_PER_DEVICE} OPks; register: {REGISTERS} users x \
         {OPKS_PER_REGISTER} OPks; median of {RUNS} interleaved runs, fresh db file each run under {}",
        std::env::temp_dir().display()
    );
    // Interleave the runs (all benches, then all again...) so that a burst of
    // load from elsewhere on the machine hits every variant alike.
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); benches.len()];
    for run in 1..=RUNS {
        eprintln!("run {run}/{RUNS}");
        for (bench, out) in benches.iter_mut().zip(&mut samples) {
            out.push((bench.2)()?);
        }
    }
    println!(
        "{:<9} {:<50} {:>9} {:>8} {:>10} {:>17}",
        "workload", "variant", "ops/s", "us/op", "cpu us/op", "ops/s min..max"
    );
    for ((workload, variant, _), runs) in benches.iter().zip(samples) {
        let rates: Vec<f64> = runs.iter().map(|s| s.ops_per_sec).collect();
        let (lo, hi) = rates
            .iter()
            .fold((f64::MAX, 0f64), |(l, h), &r| (l.min(r), h.max(r)));
        let rate = median(rates);
        let cpu = median(runs.iter().map(|s| s.cpu_us_per_op).collect());
        println!(
            "{workload:<9} {variant:<50} {rate:>9.0} {:>8.1} {cpu:>10.1} {:>17}",
            1e6 / rate,
            format!("{lo:.0}..{hi:.0}")
        );
    }
    Ok(())
}
