//! A bounded gate for work in flight: at most `permits` units inside, at most `max_waiting`
//! callers queued, each for at most the wait it asks. Anything beyond is refused at once, so work
//! behind the gate is bounded and nobody hangs. It lives outside the actors (in the shared
//! context), so a bound holds across their restarts.
//!
//! Used for calls to ocserv (its main loop is single-threaded), for requests on the gRPC front
//! door, and for the memory of large replies being built.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why the gate did not let a caller in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{waiting} callers already waiting (limit reached)")]
    QueueFull { waiting: usize },
    #[error("no room within {0:?}")]
    TimedOut(Duration),
    #[error("asked for {asked} units, more than the gate's {capacity}")]
    TooLarge { asked: u32, capacity: u32 },
}

#[derive(Debug)]
pub struct Gate {
    slots: Arc<Semaphore>,
    capacity: u32,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Decrements the waiting count when the wait ends, however it ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gate {
    pub fn new(permits: u32, max_waiting: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(permits as usize)),
            capacity: permits,
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// One unit of room.
    pub async fn enter(&self, wait: Duration) -> Result<OwnedSemaphorePermit, Refused> {
        self.enter_many(1, wait).await
    }

    /// `n` units of room (e.g. bytes of a reply). Waits at most `wait`, and only when fewer than
    /// `max_waiting` callers are already waiting.
    pub async fn enter_many(
        &self,
        n: u32,
        wait: Duration,
    ) -> Result<OwnedSemaphorePermit, Refused> {
        if n > self.capacity {
            return Err(Refused::TooLarge {
                asked: n,
                capacity: self.capacity,
            });
        }
        if let Ok(p) = self.slots.clone().try_acquire_many_owned(n) {
            return Ok(p);
        }
        let before = self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        if before >= self.max_waiting {
            return Err(Refused::QueueFull { waiting: before });
        }
        match tokio::time::timeout(wait, self.slots.clone().acquire_many_owned(n)).await {
            Ok(Ok(p)) => Ok(p),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => Err(Refused::TimedOut(wait)),
        }
    }

    /// Units in use right now.
    pub fn in_use(&self) -> u32 {
        self.capacity - self.slots.available_permits() as u32
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[tokio::test]
    async fn bounds_in_flight_and_queue() {
        let g = Gate::new(2, 1);
        let a = g.enter(MS(10)).await.unwrap();
        let _b = g.enter(MS(10)).await.unwrap();
        assert_eq!(g.in_use(), 2);
        // The third waits (the one queue slot) and times out.
        assert_eq!(
            g.enter(MS(20)).await.unwrap_err(),
            Refused::TimedOut(MS(20))
        );
        assert_eq!(g.waiting(), 0, "a finished wait leaves the queue");
        // With one waiter queued, a fourth is refused at once.
        let g = std::sync::Arc::new(g);
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.enter(MS(500)).await.map(drop) });
        while g.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            g.enter(MS(500)).await,
            Err(Refused::QueueFull { waiting: 1 })
        ));
        drop(a);
        waiter
            .await
            .unwrap()
            .expect("the queued caller gets the freed slot");
    }

    #[tokio::test]
    async fn many_units_and_too_large() {
        let g = Gate::new(100, 4);
        let p = g.enter_many(60, MS(10)).await.unwrap();
        assert!(matches!(
            g.enter_many(50, MS(10)).await,
            Err(Refused::TimedOut(_))
        ));
        drop(p);
        assert!(g.enter_many(100, MS(10)).await.is_ok());
        assert_eq!(
            g.enter_many(101, MS(10)).await.unwrap_err(),
            Refused::TooLarge {
                asked: 101,
                capacity: 100
            }
        );
    }
}
