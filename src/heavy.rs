//! One dedicated thread for CPU-heavy work: decoding large ocserv replies, parsing occtl's
//! output, mapping and encoding thousands of sessions (DESIGN §2: such work never runs on an
//! async worker).
//!
//! Why one thread of its own rather than tokio's blocking pool: glibc malloc gives each thread
//! that allocates an arena, and keeps memory freed in an arena for reuse there. Multi-MB
//! transient buffers built on whichever blocking thread happened to be free spread over many
//! arenas, each of which kept its share: resident memory ratcheted up under load
//! (BENCHMARKS.md, sessions_scale). On one thread they reuse one arena.
//!
//! - Input: a closure. Output: its result, or [`HeavyError`] when it panicked (the thread lives
//!   on) or the thread is gone (the next job starts a new one).
//! - Jobs run one at a time, in order; at most [`QUEUE`] wait. A caller waits for room, bounded by
//!   its own deadline (every caller has one: the gRPC edge, the ocserv request timeout).

use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot};

/// Jobs that may wait for the thread.
pub const QUEUE: usize = 64;

type Job = Box<dyn FnOnce() + Send>;

static WORKER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeavyError {
    #[error("the work panicked: {0}")]
    Panicked(String),
    #[error("the worker thread is gone: {0}")]
    Gone(String),
}

/// The queue of the running worker, started when there is none.
fn worker() -> Result<mpsc::Sender<Job>, HeavyError> {
    let mut slot = WORKER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
        return Ok(tx.clone());
    }
    let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
    std::thread::Builder::new()
        .name("ocserv-agent-heavy".into())
        .spawn(move || {
            while let Some(job) = rx.blocking_recv() {
                job();
            }
        })
        .map_err(|e| HeavyError::Gone(format!("cannot start it: {e}")))?;
    *slot = Some(tx.clone());
    Ok(tx)
}

/// Runs `work` on the heavy-work thread and returns its result.
pub async fn run<T, F>(work: F) -> Result<T, HeavyError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(work)));
    });
    worker()?
        .send(job)
        .await
        .map_err(|_| HeavyError::Gone("its queue closed".into()))?;
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(panic)) => Err(HeavyError::Panicked(panic_message(&*panic))),
        Err(_) => Err(HeavyError::Gone("the job was dropped".into())),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn runs_work_on_one_named_thread_and_survives_a_panic() {
        let name = || std::thread::current().name().map(str::to_owned);
        let first = run(name).await.unwrap();
        assert_eq!(first.as_deref(), Some("ocserv-agent-heavy"));
        let id = run(|| std::thread::current().id()).await.unwrap();
        let e = run(|| -> u8 { panic!("boom") }).await.unwrap_err();
        assert_eq!(e, HeavyError::Panicked("boom".into()));
        assert_eq!(
            run(|| std::thread::current().id()).await.unwrap(),
            id,
            "the same thread after a panic"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_callers_than_the_queue_are_all_answered() {
        let calls: Vec<_> = (0..(QUEUE * 3) as u64)
            .map(|i| tokio::spawn(run(move || i * 2)))
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), i as u64 * 2);
        }
    }
}
