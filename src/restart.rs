//! The supervisor's restart decision as plain data: jittered exponential backoff per child and a
//! restart intensity limit across all children. No actors, no clocks of its own (the caller passes
//! `now`), so every rule is unit-tested.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::tree::Child;

/// What to do after a child stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    RestartAfter(Duration),
    Escalate,
}

/// Restart intensity and backoff: at most `intensity` restarts (all children together) within
/// `window`; the delay grows with the number of recent restarts of the same child.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    backoff: Backoff,
    intensity: u32,
    window: Duration,
    history: VecDeque<(Instant, Child)>,
}

impl RestartPolicy {
    pub fn new(backoff: Backoff, intensity: u32, window: Duration) -> Self {
        Self {
            backoff,
            intensity,
            window,
            history: VecDeque::new(),
        }
    }

    pub fn on_stop(&mut self, child: Child, now: Instant) -> Decision {
        while let Some((t, _)) = self.history.front() {
            if now.duration_since(*t) > self.window {
                self.history.pop_front();
            } else {
                break;
            }
        }
        if self.history.len() >= self.intensity as usize {
            return Decision::Escalate;
        }
        let recent_same = self.history.iter().filter(|(_, c)| *c == child).count() as u32;
        self.history.push_back((now, child));
        Decision::RestartAfter(self.backoff.delay(recent_same))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(intensity: u32) -> RestartPolicy {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_secs(1), 2.0).unwrap();
        RestartPolicy::new(b, intensity, Duration::from_secs(30))
    }

    #[test]
    fn escalates_after_intensity_within_window() {
        let mut p = policy(3);
        let t = Instant::now();
        for i in 0..3 {
            assert!(matches!(
                p.on_stop(Child::OcservCtl, t + Duration::from_secs(i)),
                Decision::RestartAfter(_)
            ));
        }
        assert_eq!(
            p.on_stop(Child::SessionRegistry, t + Duration::from_secs(4)),
            Decision::Escalate
        );
    }

    #[test]
    fn old_restarts_leave_the_window() {
        let mut p = policy(2);
        let t = Instant::now();
        p.on_stop(Child::OcservCtl, t);
        p.on_stop(Child::OcservCtl, t + Duration::from_secs(1));
        assert!(matches!(
            p.on_stop(Child::OcservCtl, t + Duration::from_secs(40)),
            Decision::RestartAfter(_)
        ));
    }

    #[test]
    fn delay_grows_with_recent_restarts_of_the_same_child() {
        let mut p = policy(100);
        let t = Instant::now();
        let Decision::RestartAfter(first) = p.on_stop(Child::OcservCtl, t) else {
            panic!("escalated")
        };
        assert!(first <= Duration::from_millis(10));
        for _ in 0..5 {
            p.on_stop(Child::OcservCtl, t);
        }
        let Decision::RestartAfter(later) = p.on_stop(Child::OcservCtl, t) else {
            panic!("escalated")
        };
        assert!(later >= Duration::from_millis(320), "{later:?}");
        // another child starts from the initial delay
        let Decision::RestartAfter(other) = p.on_stop(Child::GrpcFrontDoor, t) else {
            panic!("escalated")
        };
        assert!(other <= Duration::from_millis(10));
    }
}
