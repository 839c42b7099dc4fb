//! The writer thread of a SQLite store: the only connection that runs jobs.
//!
//! Jobs come through a channel. The thread runs the jobs that are waiting
//! together in one transaction (group commit), each inside its own savepoint: a
//! job that fails rolls back alone, and no job's answer is sent before the
//! transaction that holds it has committed. Jobs that come while a
//! transaction's jobs run join it before its commit (up to the batch's size):
//! they would otherwise wait for that commit and then for their own.
//!
//! A job is [`Work`] in one step or several. A long one (a claim of hundreds of
//! devices, see `claim.rs`) runs one step per transaction and is carried over to
//! the next batch with the jobs that came meanwhile, so that a small request
//! waits for at most one step of it, not for all of it. A step asks [`Waiting`]
//! whether other jobs wait for the writer (in its transaction, or in the queue):
//! it ends early when they do, and goes on longer when nobody waits, so that
//! the steps cost commits only when another request gains from them. Before it
//! says nobody waits, the writer yields the CPU, so that a request thread that
//! shares it gets to queue its job (on a busy server the kernel would otherwise
//! let the writer run out its time slice, 60-120 devices of a large claim). Its
//! answer is sent after its last step committed. When a step fails after earlier
//! ones committed, the work undoes them ([`Work::undo`], in the next
//! transaction) before its error is answered, so that an error still means that
//! nothing changed.
//!
//! Between two transactions the writer hands the WAL to the checkpointer
//! (`checkpoint.rs`), which keeps it bounded.

use super::checkpoint::Checkpointer;
use crate::store::StoreError;
use rusqlite::Connection;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Times an undo is tried (one per following transaction) before its keys are
/// given up for lost, with an error logged.
const UNDO_ATTEMPTS: u32 = 5;

/// Whether work has more steps to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Its answer is ready, once this step commits.
    Done,
    /// More steps follow, each in a later transaction.
    More,
}

/// Whether other jobs wait for the writer while a step runs.
#[derive(Clone, Copy)]
pub struct Waiting<'a> {
    /// The writer's queue: jobs not yet taken.
    queue: Option<&'a mpsc::Receiver<Box<dyn Job>>>,
    /// Other jobs run in the same transaction: they wait for its commit.
    in_transaction: bool,
}

impl Waiting<'_> {
    /// Nobody: the work runs alone (in a caller's transaction).
    pub fn nobody() -> Waiting<'static> {
        Waiting {
            queue: None,
            in_transaction: false,
        }
    }

    /// Another job in the same transaction, for tests of steps.
    #[cfg(test)]
    pub fn others_in_transaction() -> Waiting<'static> {
        Waiting {
            queue: None,
            in_transaction: true,
        }
    }

    /// Jobs in `queue` only, for tests of steps.
    #[cfg(test)]
    pub fn queue(queue: &mpsc::Receiver<Box<dyn Job>>) -> Waiting<'_> {
        Waiting {
            queue: Some(queue),
            in_transaction: false,
        }
    }

    /// True when another job waits for this step's transaction to end. When
    /// none does yet and the queue could bring one, the writer first yields the
    /// CPU: a thread taking requests in that the kernel has woken on the
    /// writer's CPU then queues its job now, rather than when the writer's time
    /// slice ends (a large claim alone ran 60-120 devices, several ms, further).
    pub fn others(&self) -> bool {
        match self.queue {
            _ if self.in_transaction => true,
            None => false,
            Some(queue) => {
                !queue.is_empty() || {
                    std::thread::yield_now();
                    !queue.is_empty()
                }
            }
        }
    }
}

/// Work for the writer, run in one step or several, each inside the savepoint of
/// a transaction the writer commits before the next step.
pub trait Work: Send + 'static {
    /// The answer.
    type Output: Send + 'static;
    /// Runs the next step; `waiting` tells whether to end it early.
    fn step(&mut self, conn: &Connection, waiting: Waiting<'_>) -> Result<Progress, StoreError>;
    /// Forgets what the last step did: it was rolled back (it failed, or its
    /// transaction did not commit).
    fn step_rolled_back(&mut self);
    /// Whether steps that committed changed something [`Work::undo`] must put back.
    fn needs_undo(&self) -> bool;
    /// Undoes the committed steps, after a later one failed.
    fn undo(&mut self, conn: &Connection) -> Result<(), StoreError>;
    /// The answer, after the last step committed.
    fn into_output(self) -> Self::Output;
}

/// Work done in one step by a closure.
pub struct OneStep<T, F> {
    work: Option<F>,
    output: Option<T>,
}

impl<T, F> OneStep<T, F> {
    pub fn new(work: F) -> OneStep<T, F> {
        OneStep {
            work: Some(work),
            output: None,
        }
    }
}

impl<T, F> Work for OneStep<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    type Output = Result<T, StoreError>;

    fn step(&mut self, conn: &Connection, _: Waiting<'_>) -> Result<Progress, StoreError> {
        let work = self
            .work
            .take()
            .ok_or_else(|| StoreError::Backend("job run twice".into()))?;
        self.output = Some(work(conn)?);
        Ok(Progress::Done)
    }

    fn step_rolled_back(&mut self) {
        self.output = None;
    }

    fn needs_undo(&self) -> bool {
        false
    }

    fn undo(&mut self, _: &Connection) -> Result<(), StoreError> {
        Ok(())
    }

    fn into_output(self) -> Self::Output {
        self.output
            .ok_or_else(|| StoreError::Backend("job was not run".into()))
    }
}

/// A unit of work for the writer thread, type-erased so one queue carries them all.
pub trait Job: Send {
    /// The caller stopped waiting (its request timed out) before the work
    /// started: skip it, so that nothing is claimed for an answer nobody will
    /// read. Work that has started is finished (or undone) whatever happens.
    fn abandoned(&self) -> bool;
    /// Runs the next step (or the undo), unless the work has not started and its
    /// deadline has passed; `false` when it failed and its savepoint must be
    /// rolled back.
    fn run(&mut self, conn: &Connection, now: Instant, waiting: Waiting<'_>) -> bool;
    /// Once the transaction's fate is known: answers, or gives the job back to
    /// be carried into the next transaction.
    fn finish(self: Box<Self>, committed: &Result<(), String>) -> Option<Box<dyn Job>>;
}

/// A job for `work`, answered on `reply` with a result.
pub struct PendingJob<W: Work<Output = Result<T, StoreError>>, T> {
    work: W,
    /// A step has run (committed or not): the deadline no longer applies.
    started: bool,
    /// Past it, the work is not started.
    deadline: Instant,
    /// The time-out the deadline came from, for the error.
    timeout: Duration,
    /// What the step (or the undo) run in this transaction gave.
    outcome: Option<Result<Progress, StoreError>>,
    /// Set while undoing: the error to answer once undone, and the attempts.
    failed: Option<(StoreError, u32)>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<W, T> PendingJob<W, T>
where
    W: Work<Output = Result<T, StoreError>>,
    T: Send + 'static,
{
    /// The job, and where its answer will come.
    pub fn new(
        work: W,
        timeout: Duration,
    ) -> (Box<Self>, oneshot::Receiver<Result<T, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        let job = PendingJob {
            work,
            started: false,
            deadline: Instant::now() + timeout,
            timeout,
            outcome: None,
            failed: None,
            reply,
        };
        (Box::new(job), answer)
    }

    fn answer(self, answer: Result<T, StoreError>) -> Option<Box<dyn Job>> {
        // The caller may have given up meanwhile; nothing else to tell it.
        let _ = self.reply.send(answer);
        None
    }
}

impl<W, T> Job for PendingJob<W, T>
where
    W: Work<Output = Result<T, StoreError>>,
    T: Send + 'static,
{
    fn abandoned(&self) -> bool {
        !self.started && self.reply.is_closed()
    }

    fn run(&mut self, conn: &Connection, now: Instant, waiting: Waiting<'_>) -> bool {
        let outcome = if self.failed.is_some() {
            self.work.undo(conn).map(|()| Progress::Done)
        } else if !self.started && now > self.deadline {
            Err(StoreError::Timeout(self.timeout))
        } else {
            self.started = true;
            self.work.step(conn, waiting)
        };
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn finish(mut self: Box<Self>, committed: &Result<(), String>) -> Option<Box<dyn Job>> {
        let outcome = match (committed, self.outcome.take()) {
            (Ok(()), Some(outcome)) => outcome,
            (Ok(()), None) => Err(StoreError::Backend("job was not run".into())),
            (Err(error), _) => Err(StoreError::Backend(error.clone())),
        };
        if let Some((error, attempts)) = self.failed.take() {
            return match outcome {
                Ok(_) => self.answer(Err(error)),
                Err(_) if attempts + 1 < UNDO_ATTEMPTS => {
                    self.failed = Some((error, attempts + 1));
                    Some(self)
                }
                Err(undo_error) => {
                    tracing::error!(
                        error = %undo_error,
                        "SQLite: a failed claim's earlier steps could not be undone: \
                         the one-time pre-keys they took are lost"
                    );
                    self.answer(Err(error))
                }
            };
        }
        match outcome {
            Ok(Progress::Done) => {
                let output = self.work.into_output();
                let _ = self.reply.send(output);
                None
            }
            Ok(Progress::More) => Some(self),
            Err(error) => {
                self.work.step_rolled_back();
                if self.work.needs_undo() {
                    self.failed = Some((error, 0));
                    Some(self)
                } else {
                    self.answer(Err(error))
                }
            }
        }
    }
}

/// The writer thread's loop: batches of waiting jobs, each batch one
/// transaction, the jobs with steps left carried into the next; then the WAL
/// handed to the checkpointer. Returns when the channel is closed and every
/// carried job is done.
pub fn run_writer(
    conn: Connection,
    mut queue: mpsc::Receiver<Box<dyn Job>>,
    max_batch: usize,
    checkpointer: Checkpointer,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    let mut carried: Vec<Box<dyn Job>> = Vec::new();
    loop {
        // Wait for a job only when none is carried.
        if carried.is_empty() {
            match queue.blocking_recv() {
                Some(job) if !job.abandoned() => batch.push(job),
                Some(_) => {}
                None => break,
            }
        }
        take_queued(
            &mut queue,
            &mut batch,
            max_batch.saturating_sub(carried.len()),
        );
        // The jobs that came meanwhile first: they are what must not wait.
        batch.append(&mut carried);
        if batch.is_empty() {
            continue;
        }
        let committed = run_batch(&conn, &mut batch, &mut queue, max_batch);
        if let Err(error) = &committed {
            tracing::error!(%error, jobs = batch.len(), "SQLite transaction failed, rolled back");
        }
        carried.extend(batch.drain(..).filter_map(|job| job.finish(&committed)));
        // After the answers, before the next transaction: the one place where the
        // writer may wait for a checkpoint.
        checkpointer.after_commit(&conn);
    }
}

/// Moves the jobs waiting in the queue into `batch` until it holds `max_jobs`,
/// leaving out those whose caller gave up; false when none was added.
fn take_queued(
    queue: &mut mpsc::Receiver<Box<dyn Job>>,
    batch: &mut Vec<Box<dyn Job>>,
    max_jobs: usize,
) -> bool {
    let before = batch.len();
    let room = max_jobs.saturating_sub(before);
    batch.extend(
        std::iter::from_fn(|| queue.try_recv().ok())
            .take(room)
            .filter(|job| !job.abandoned()),
    );
    batch.len() > before
}

/// Runs the jobs in one transaction, each in a savepoint, and the jobs that
/// come meanwhile (up to `max_batch` in all) after them; commits what
/// succeeded. A job that comes while others run joins their transaction rather
/// than waiting for its commit and then for its own (a second fsync).
fn run_batch(
    conn: &Connection,
    batch: &mut Vec<Box<dyn Job>>,
    queue: &mut mpsc::Receiver<Box<dyn Job>>,
    max_batch: usize,
) -> Result<(), String> {
    let result = (|| -> rusqlite::Result<()> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut ran = 0;
        while ran < batch.len() || take_queued(queue, batch, max_batch) {
            let waiting = Waiting {
                queue: Some(&*queue),
                in_transaction: batch.len() > 1,
            };
            conn.execute_batch("SAVEPOINT job")?;
            if !batch[ran].run(conn, Instant::now(), waiting) {
                conn.execute_batch("ROLLBACK TO job")?;
            }
            conn.execute_batch("RELEASE job")?;
            ran += 1;
        }
        conn.execute_batch("COMMIT")
    })();
    result.map_err(|error| {
        if !conn.is_autocommit() {
            // Leave the connection clean for the next batch; its own failure
            // changes nothing for this batch's answers.
            let _ = conn.execute_batch("ROLLBACK");
        }
        error.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job that came while a transaction's jobs ran is run in that
    /// transaction, before its commit: it would otherwise wait for this commit,
    /// then for its own.
    #[test]
    fn a_job_that_comes_while_a_batch_runs_joins_its_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("writer.sqlite");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (n INTEGER)")
            .unwrap();
        let (sender, mut queue) = mpsc::channel::<Box<dyn Job>>(4);
        // The late job counts the first one's row as another connection sees it:
        // none while the transaction that holds it has not committed.
        let (late, late_answer) = PendingJob::new(
            OneStep::new(move |_: &Connection| {
                let other = Connection::open(&path)?;
                Ok(other.query_row("SELECT count(*) FROM t", [], |row| row.get::<_, i64>(0))?)
            }),
            Duration::from_secs(5),
        );
        let (first, first_answer) = PendingJob::new(
            OneStep::new(move |conn: &Connection| {
                conn.execute("INSERT INTO t VALUES (1)", [])?;
                sender.try_send(late).ok().unwrap();
                Ok(0)
            }),
            Duration::from_secs(5),
        );
        let mut batch: Vec<Box<dyn Job>> = vec![first];
        let committed = run_batch(&conn, &mut batch, &mut queue, 64);
        assert_eq!(committed, Ok(()));
        assert_eq!(batch.len(), 2, "the late job did not join the transaction");
        for job in batch {
            assert!(job.finish(&committed).is_none());
        }
        assert_eq!(first_answer.blocking_recv().unwrap().unwrap(), 0);
        assert_eq!(late_answer.blocking_recv().unwrap().unwrap(), 0);
        assert!(queue.try_recv().is_err());
    }
}
