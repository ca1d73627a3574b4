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
//! - Jobs run one at a time; at most [`QUEUE`] wait in each of two lanes. [`Lane::Ocserv`]
//!   (decoding what ocserv answered: the reconcile that keeps the session view fresh) always goes
//!   before [`Lane::Replies`] (encoding replies for callers), so callers asking for expensive
//!   replies can delay a reconcile by one job at most, never starve it. A caller waits for room,
//!   bounded by its own deadline (every caller has one: the gRPC edge, the ocserv request
//!   timeout).

use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot};

/// Jobs that may wait for the thread.
pub const QUEUE: usize = 64;

type Job = Box<dyn FnOnce() + Send>;

/// Which queue a job waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Decoding ocserv's answers; always served first.
    Ocserv,
    /// Encoding replies for callers.
    Replies,
}

#[derive(Clone)]
struct Worker {
    ocserv: mpsc::Sender<Job>,
    replies: mpsc::Sender<Job>,
}

impl Worker {
    fn is_closed(&self) -> bool {
        self.ocserv.is_closed() || self.replies.is_closed()
    }
}

static WORKER: Mutex<Option<Worker>> = Mutex::new(None);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeavyError {
    #[error("the work panicked: {0}")]
    Panicked(String),
    #[error("the worker thread is gone: {0}")]
    Gone(String),
}

/// The queues of the running worker, started when there is none.
fn worker() -> Result<Worker, HeavyError> {
    let mut slot = WORKER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(w) = slot.as_ref().filter(|w| !w.is_closed()) {
        return Ok(w.clone());
    }
    let (ocserv, mut first) = mpsc::channel::<Job>(QUEUE);
    let (replies, mut then) = mpsc::channel::<Job>(QUEUE);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| HeavyError::Gone(format!("cannot start it: {e}")))?;
    std::thread::Builder::new()
        .name("ocserv-agent-heavy".into())
        .spawn(move || {
            runtime.block_on(async {
                loop {
                    let job = tokio::select! {
                        biased;
                        Some(job) = first.recv() => job,
                        Some(job) = then.recv() => job,
                        else => break,
                    };
                    job();
                }
            })
        })
        .map_err(|e| HeavyError::Gone(format!("cannot start it: {e}")))?;
    let w = Worker { ocserv, replies };
    *slot = Some(w.clone());
    Ok(w)
}

/// Runs `work` on the heavy-work thread, in `lane`, and returns its result.
pub async fn run<T, F>(lane: Lane, work: F) -> Result<T, HeavyError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(work)));
    });
    let w = worker()?;
    let queue = match lane {
        Lane::Ocserv => w.ocserv,
        Lane::Replies => w.replies,
    };
    queue
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
        let first = run(Lane::Replies, name).await.unwrap();
        assert_eq!(first.as_deref(), Some("ocserv-agent-heavy"));
        let id = run(Lane::Ocserv, || std::thread::current().id())
            .await
            .unwrap();
        let e = run(Lane::Replies, || -> u8 { panic!("boom") })
            .await
            .unwrap_err();
        assert_eq!(e, HeavyError::Panicked("boom".into()));
        assert_eq!(
            run(Lane::Replies, || std::thread::current().id())
                .await
                .unwrap(),
            id,
            "the same thread after a panic"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ocserv_work_goes_before_queued_replies() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static ORDER: AtomicUsize = AtomicUsize::new(0);
        // Hold the thread, queue replies, then one ocserv job: it runs next.
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let busy = tokio::spawn(run(Lane::Replies, move || {
            let _ = hold_rx.recv();
        }));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let replies: Vec<_> = (0..5)
            .map(|_| tokio::spawn(run(Lane::Replies, || ORDER.fetch_add(1, Ordering::SeqCst))))
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let ocserv = tokio::spawn(run(Lane::Ocserv, || ORDER.fetch_add(1, Ordering::SeqCst)));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        hold_tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
        assert_eq!(
            ocserv.await.unwrap().unwrap(),
            0,
            "the ocserv job ran first"
        );
        for r in replies {
            assert!(r.await.unwrap().unwrap() > 0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_callers_than_the_queue_are_all_answered() {
        let calls: Vec<_> = (0..(QUEUE * 3) as u64)
            .map(|i| tokio::spawn(run(Lane::Replies, move || i * 2)))
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), i as u64 * 2);
        }
    }
}
