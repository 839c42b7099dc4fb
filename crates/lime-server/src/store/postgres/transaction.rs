//! How one store call becomes one bounded PostgreSQL transaction.
//!
//! A call gets a deadline (`timeout` from now) that covers waiting for a pooled
//! connection and every statement up to `COMMIT`. Past it, the work is abandoned:
//! `COMMIT` was never sent, the connection is closed instead of being returned to
//! the pool, and PostgreSQL rolls the transaction back, so [`StoreError::Timeout`]
//! always means nothing was changed. The server gives up too: `statement_timeout`,
//! `lock_timeout` and `idle_in_transaction_session_timeout` are set (`SET LOCAL`) to
//! what is left of the deadline, in the same round trip as `BEGIN`.
//!
//! Once `COMMIT` is sent, its answer is waited for (at most one more `timeout`):
//! it is "a transaction already under way" in the sense of [`KeyStore`]. A `COMMIT`
//! whose answer never comes is reported as a database error whose outcome is
//! unknown, never as a time-out; [`Transactions::run_to_commit`] hands the work's
//! value back with it, so that a claim can be settled later (`store::in_doubt`).
//!
//! A transaction that failed before `COMMIT` changed nothing, so it is run again on
//! another connection when the failure is one a retry can cure (a connection found
//! dead, a serialization failure or deadlock), while the deadline allows.
//!
//! [`KeyStore`]: crate::store::KeyStore

use crate::store::StoreError;
use crate::store::in_doubt::CallError;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::time::{Instant, timeout, timeout_at};

/// The statements of one store call, run on a connection inside a transaction
/// that [`Transactions::run`] opened and will end.
pub(super) type Work<'c, T> = Pin<Box<dyn Future<Output = Result<T, Failure>> + Send + 'c>>;

/// Why the statements of a call stopped: an answer for the client (a domain
/// error, decided by `rules`) or the database's own error, which
/// [`Transactions::run`] sorts into time-out, retry or [`StoreError::Backend`].
#[derive(Debug)]
pub(crate) enum Failure {
    /// An answer decided from the rows read; the transaction is rolled back.
    Store(StoreError),
    /// The driver or the database failed.
    Sql(sqlx::Error),
}

impl From<sqlx::Error> for Failure {
    fn from(error: sqlx::Error) -> Failure {
        Failure::Sql(error)
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Failure {
        Failure::Store(error)
    }
}

/// A pool and the time-out its calls must answer within.
pub(super) struct Transactions {
    pool: PgPool,
    timeout: Duration,
    /// How many times a call is tried when a retry can cure its failure: enough
    /// to go through a whole pool of connections found dead after a restart.
    max_attempts: u32,
}

/// How one attempt ended, when it did not succeed.
enum Attempt<T> {
    /// Nothing was changed and trying again may succeed.
    Retry(String),
    /// The call's answer.
    Final(StoreError),
    /// COMMIT was sent and its answer never came.
    CommitUnanswered { value: T, error: String },
}

impl Transactions {
    pub(super) fn new(pool: PgPool, pool_size: u32, timeout: Duration) -> Transactions {
        Transactions {
            pool,
            timeout,
            max_attempts: pool_size.saturating_add(2),
        }
    }

    /// The pool, for work outside a call (purging old claim tokens).
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `work` with `args` in one transaction, committed when it succeeds,
    /// rolled back otherwise, within the time-out (see the module's doc).
    ///
    /// The future is boxed here, with `Send` proven once for all callers: left to
    /// the callers, the compiler cannot prove it through the higher-ranked `work`.
    pub(super) fn run<'a, A, T, F>(
        &'a self,
        args: &'a A,
        work: F,
    ) -> Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>
    where
        A: Sync,
        T: Send + 'a,
        F: for<'c> Fn(&'c mut PgConnection, &'c A) -> Work<'c, T> + Send + Sync + 'a,
    {
        let run = self.run_to_commit(args, work);
        Box::pin(async move { run.await.map_err(CallError::into_store_error) })
    }

    /// [`Transactions::run`], which also hands back the work's value when COMMIT
    /// went unanswered.
    pub(super) fn run_to_commit<'a, A, T, F>(
        &'a self,
        args: &'a A,
        work: F,
    ) -> Pin<Box<dyn Future<Output = Result<T, CallError<T>>> + Send + 'a>>
    where
        A: Sync,
        T: Send + 'a,
        F: for<'c> Fn(&'c mut PgConnection, &'c A) -> Work<'c, T> + Send + Sync + 'a,
    {
        Box::pin(async move {
            let deadline = Instant::now() + self.timeout;
            let mut attempt = 1;
            loop {
                match self.attempt(deadline, args, &work).await {
                    Ok(value) => return Ok(value),
                    Err(Attempt::Final(error)) => return Err(CallError::Failed(error)),
                    Err(Attempt::CommitUnanswered { value, error }) => {
                        return Err(CallError::CommitUnanswered { value, error });
                    }
                    Err(Attempt::Retry(error)) => {
                        if attempt >= self.max_attempts || Instant::now() >= deadline {
                            return Err(CallError::Failed(StoreError::Backend(error)));
                        }
                        tracing::debug!(%error, attempt, "PostgreSQL transaction failed, trying again");
                        attempt += 1;
                    }
                }
            }
        })
    }

    async fn attempt<A, T, F>(&self, deadline: Instant, args: &A, work: &F) -> Result<T, Attempt<T>>
    where
        A: Sync,
        T: Send,
        F: for<'c> Fn(&'c mut PgConnection, &'c A) -> Work<'c, T> + Sync,
    {
        let mut conn = self.acquire(deadline).await?;
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .as_millis();
        if budget == 0 {
            return Err(Attempt::Final(StoreError::Timeout(self.timeout)));
        }
        // One round trip: BEGIN and the server-side limits go in one simple query.
        let begin = format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED; \
             SET LOCAL statement_timeout = {budget}; \
             SET LOCAL lock_timeout = {budget}; \
             SET LOCAL idle_in_transaction_session_timeout = {budget}"
        );
        let body = async {
            simple_query(&mut conn, &begin).await?;
            work(&mut conn, args).await
        };
        let outcome = timeout_at(deadline, body).await;
        let value = match outcome {
            Ok(Ok(value)) => value,
            Ok(Err(failure)) => return Err(self.abandon(conn, failure).await),
            Err(_) => {
                // Whatever statement was under way is cut off; COMMIT was never
                // sent, so closing the connection rolls everything back.
                conn.close_on_drop();
                return Err(Attempt::Final(StoreError::Timeout(self.timeout)));
            }
        };
        match timeout(self.timeout, simple_query(&mut conn, "COMMIT")).await {
            Ok(Ok(_)) => Ok(value),
            // The database refused to commit (a serialization failure found at
            // commit, say): nothing was changed.
            Ok(Err(error)) if !connection_lost(&error) => {
                Err(self.abandon(conn, Failure::Sql(error)).await)
            }
            Ok(Err(error)) => {
                conn.close_on_drop();
                Err(Attempt::CommitUnanswered {
                    value,
                    error: format!(
                        "connection lost during COMMIT, the outcome is unknown: {error}"
                    ),
                })
            }
            Err(_) => {
                conn.close_on_drop();
                Err(Attempt::CommitUnanswered {
                    value,
                    error: format!(
                        "no answer to COMMIT within {:?}, the outcome is unknown",
                        self.timeout
                    ),
                })
            }
        }
    }

    /// A pooled connection, or the failure that ends the attempt.
    async fn acquire<T>(&self, deadline: Instant) -> Result<PoolConnection<Postgres>, Attempt<T>> {
        match timeout_at(deadline, self.pool.acquire()).await {
            Ok(Ok(conn)) => Ok(conn),
            Err(_) | Ok(Err(sqlx::Error::PoolTimedOut)) => {
                Err(Attempt::Final(StoreError::Timeout(self.timeout)))
            }
            Ok(Err(error)) => Err(Attempt::Final(StoreError::Backend(error.to_string()))),
        }
    }

    /// Ends a transaction whose work failed: rolled back, its connection returned
    /// to the pool when it is still sound, closed otherwise.
    async fn abandon<T>(&self, mut conn: PoolConnection<Postgres>, failure: Failure) -> Attempt<T> {
        let error = match failure {
            Failure::Store(error) => {
                self.roll_back(&mut conn).await;
                return Attempt::Final(error);
            }
            Failure::Sql(error) => error,
        };
        let message = error.to_string();
        if connection_lost(&error) {
            // Often a connection found dead after the database restarted.
            // COMMIT was not sent, so another connection may try.
            conn.close_on_drop();
            return Attempt::Retry(message);
        }
        self.roll_back(&mut conn).await;
        let code = match &error {
            sqlx::Error::Database(database) => database.code(),
            _ => None,
        };
        match code.as_deref() {
            // statement_timeout, lock_timeout: the server gave up first.
            Some("57014" | "55P03") => Attempt::Final(StoreError::Timeout(self.timeout)),
            // serialization_failure, deadlock_detected: nothing was changed.
            Some("40001" | "40P01") => Attempt::Retry(message),
            _ => Attempt::Final(StoreError::Backend(message)),
        }
    }

    async fn roll_back(&self, conn: &mut PoolConnection<Postgres>) {
        match timeout(self.timeout, simple_query(conn, "ROLLBACK")).await {
            Ok(Ok(_)) => {}
            // The transaction ends with the connection anyway.
            _ => conn.close_on_drop(),
        }
    }
}

/// Runs `sql` (one or more statements, no parameters) in one round trip, without
/// preparing it.
fn simple_query<'c>(
    conn: &'c mut PgConnection,
    sql: &'c str,
) -> Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send + 'c>> {
    // A `&str` without arguments goes out as a simple Query message.
    Box::pin(async move {
        sqlx::Executor::execute(conn, sql).await?;
        Ok(())
    })
}

/// Whether `error` leaves the connection unusable: the driver lost it, or the
/// server ended the session (connection exceptions, class 08; shut down or
/// terminated by an administrator, 57P01 to 57P03). Errors of a statement, and
/// rows that do not decode, leave it usable.
fn connection_lost(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(database) => database.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::RowNotFound => false,
        _ => true,
    }
}
