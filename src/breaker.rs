//! The circuit breaker in front of the portal: a plain state machine, no clock and no task of
//! its own (DESIGN §2: decision logic outside the actors).
//!
//! Inputs: the caller asks [`Breaker::try_acquire`] before each call, passing `now`, and reports
//! each call's [`Outcome`] with the [`Permit`] it got ([`Breaker::record`]). What counts as a
//! failure is the caller's choice (a deadline passed, the portal unreachable or erroring); an
//! answer of the portal, even a denial, is a success.
//!
//! Rules: **closed**, every call goes through; the breaker opens after `consecutive_failures`
//! failures in a row, or when more than `failure_rate` of the calls within the sliding `window`
//! failed once at least `min_calls` were made there. **Open**, every call is rejected for
//! `open_for` lengthened by a random 0-25 % (never shortened), so that many agents do not probe
//! in step. Then the next `try_acquire` becomes **half-open** and lets exactly one probe through;
//! every other call is rejected until the probe reports: success closes the breaker (with a
//! fresh window), failure opens it again. A probe that never reports (its caller was dropped or
//! crashed) counts as failed once `probe_timeout` has passed, so it cannot wedge the breaker.
//! Results of permits from an earlier state (a slow call made while closed that ends after the
//! breaker opened) are ignored.
//!
//! The window is kept as [`WINDOW_SLOTS`] counters of `window / WINDOW_SLOTS` each, so memory
//! is bounded whatever the call rate: a call leaves the window between `window` and
//! `window + window / WINDOW_SLOTS` after it was made.
//!
//! Output: [`Acquire`], the [`BreakerState`] (gauge value 0/1/2 for
//! `ocserv_agent_circuit_breaker_state`), and the state a call changed to. Nothing here fails or
//! panics; [`BreakerSettings::check`] says why hand-built parameters are unusable.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Counters the sliding window is kept in.
pub const WINDOW_SLOTS: u32 = 10;

/// The most `open_for` is lengthened by: a quarter.
pub const MAX_JITTER: f64 = 0.25;

/// The breaker's parameters (from `[portal.breaker]`, see
/// [`crate::config::PortalConfig::breaker_settings`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Failures in a row that open the breaker; at least 1.
    pub consecutive_failures: u32,
    /// Share of failed calls within `window` above which the breaker opens (0.0 to 1.0).
    pub failure_rate: f64,
    /// Calls within `window` before `failure_rate` is judged; at least 1.
    pub min_calls: u32,
    /// The sliding window of `failure_rate`; not zero.
    pub window: Duration,
    /// The shortest time the breaker stays open; not zero.
    pub open_for: Duration,
    /// A half-open probe that has not reported after this long counts as failed; not zero.
    pub probe_timeout: Duration,
}

/// Why [`BreakerSettings`] are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid circuit breaker setting {field}: {reason}")]
pub struct BreakerSettingsError {
    pub field: &'static str,
    pub reason: &'static str,
}

impl BreakerSettings {
    /// Checks the parameters (a validated config always passes).
    pub fn check(&self) -> Result<(), BreakerSettingsError> {
        let err = |field, reason| Err(BreakerSettingsError { field, reason });
        if self.consecutive_failures == 0 {
            return err("consecutive_failures", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return err("failure_rate", "must be a number from 0.0 to 1.0");
        }
        if self.min_calls == 0 {
            return err("min_calls", "must be at least 1");
        }
        for (field, d) in [
            ("window", self.window),
            ("open_for", self.open_for),
            ("probe_timeout", self.probe_timeout),
        ] {
            if d.is_zero() {
                return err(field, "must be longer than zero");
            }
        }
        Ok(())
    }
}

/// The breaker's state as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// The value of `ocserv_agent_circuit_breaker_state`: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }

    /// Lowercase name for logs and health details.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }
}

/// How one call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// Leave to make one call; hand it back to [`Breaker::record`] with the call's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    /// The breaker's state generation when the permit was given.
    generation: u64,
    probe: bool,
}

impl Permit {
    /// Whether this permit is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// The answer of [`Breaker::try_acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// Make the call.
    Permit(Permit),
    /// Do not call: the breaker is open, or half-open with its probe in flight.
    Rejected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_expires: Instant },
}

/// Calls and failures in one slot of the window, starting at `start`.
#[derive(Debug, Clone, Copy)]
struct Slot {
    start: Instant,
    calls: u32,
    failures: u32,
}

/// The circuit breaker. Deterministic: `now` comes from the caller and the jitter from a
/// seeded generator ([`Breaker::new`]).
#[derive(Debug, Clone)]
pub struct Breaker {
    settings: BreakerSettings,
    inner: Inner,
    /// Bumped at every change of state: permits of an older generation are ignored.
    generation: u64,
    consecutive: u32,
    slots: VecDeque<Slot>,
    rng: u64,
}

impl Breaker {
    /// A closed breaker; `seed` drives the jitter of `open_for` (a random one in production,
    /// a fixed one in tests).
    pub fn new(settings: BreakerSettings, seed: u64) -> Result<Self, BreakerSettingsError> {
        settings.check()?;
        Ok(Self {
            settings,
            inner: Inner::Closed,
            generation: 0,
            consecutive: 0,
            slots: VecDeque::new(),
            rng: seed,
        })
    }

    /// The parameters.
    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// The current state. An open breaker whose `open_for` has passed stays `Open` until the
    /// next [`Breaker::try_acquire`] lets the probe through.
    pub fn state(&self) -> BreakerState {
        match self.inner {
            Inner::Closed => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Until when an open breaker rejects calls; `None` when not open.
    pub fn open_until(&self) -> Option<Instant> {
        match self.inner {
            Inner::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Calls and failures currently within the window (closed state only counts).
    pub fn window_counts(&self, now: Instant) -> (u32, u32) {
        let live = self.slots.iter().filter(|s| !self.slot_expired(s, now));
        live.fold((0, 0), |(c, f), s| (c + s.calls, f + s.failures))
    }

    /// May a call be made now? Half-open lets exactly one probe through at a time.
    pub fn try_acquire(&mut self, now: Instant) -> Acquire {
        match self.inner {
            Inner::Closed => Acquire::Permit(self.permit(false)),
            Inner::Open { until } if now < until => Acquire::Rejected,
            Inner::Open { .. } => {
                let probe_expires = now + self.settings.probe_timeout;
                self.enter(Inner::HalfOpen { probe_expires });
                Acquire::Permit(self.permit(true))
            }
            Inner::HalfOpen { probe_expires } if now < probe_expires => Acquire::Rejected,
            Inner::HalfOpen { .. } => {
                // The probe never reported: as good as failed.
                self.open(now);
                Acquire::Rejected
            }
        }
    }

    /// Reports the outcome of the call made with `permit`. Returns the new state when this
    /// report changed it; a permit of an earlier state is ignored (`None`).
    pub fn record(
        &mut self,
        permit: Permit,
        outcome: Outcome,
        now: Instant,
    ) -> Option<BreakerState> {
        if permit.generation != self.generation {
            return None;
        }
        match (self.inner, outcome) {
            (Inner::Closed, Outcome::Success) => {
                self.consecutive = 0;
                self.count(now, false);
                None
            }
            (Inner::Closed, Outcome::Failure) => {
                self.consecutive = self.consecutive.saturating_add(1);
                self.count(now, true);
                match self.should_open(now) {
                    true => {
                        self.open(now);
                        Some(BreakerState::Open)
                    }
                    false => None,
                }
            }
            (Inner::HalfOpen { .. }, Outcome::Success) => {
                self.enter(Inner::Closed);
                Some(BreakerState::Closed)
            }
            (Inner::HalfOpen { .. }, Outcome::Failure) => {
                self.open(now);
                Some(BreakerState::Open)
            }
            // Open has no permits of its own generation.
            (Inner::Open { .. }, _) => None,
        }
    }

    fn permit(&self, probe: bool) -> Permit {
        Permit {
            generation: self.generation,
            probe,
        }
    }

    /// Switches state: a new generation, and a fresh count.
    fn enter(&mut self, inner: Inner) {
        self.inner = inner;
        self.generation = self.generation.wrapping_add(1);
        self.consecutive = 0;
        self.slots.clear();
    }

    fn open(&mut self, now: Instant) {
        let until = now + self.open_duration();
        self.enter(Inner::Open { until });
    }

    /// `open_for` lengthened by a random share in `[0, MAX_JITTER)`.
    fn open_duration(&mut self) -> Duration {
        let unit = (self.next_random() >> 11) as f64 / (1u64 << 53) as f64;
        let extra = self.settings.open_for.mul_f64(unit * MAX_JITTER);
        self.settings.open_for + extra
    }

    /// splitmix64: small, seedable, good enough for jitter.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn slot_width(&self) -> Duration {
        (self.settings.window / WINDOW_SLOTS).max(Duration::from_nanos(1))
    }

    /// A slot leaves the window once all of it is older than `window`.
    fn slot_expired(&self, slot: &Slot, now: Instant) -> bool {
        now.saturating_duration_since(slot.start) >= self.settings.window + self.slot_width()
    }

    fn count(&mut self, now: Instant, failed: bool) {
        while self
            .slots
            .front()
            .is_some_and(|s| self.slot_expired(s, now))
        {
            self.slots.pop_front();
        }
        let width = self.slot_width();
        if self.slots.back().is_none_or(|s| now >= s.start + width) {
            let (calls, failures) = (0, 0);
            self.slots.push_back(Slot {
                start: now,
                calls,
                failures,
            });
        }
        if let Some(slot) = self.slots.back_mut() {
            slot.calls = slot.calls.saturating_add(1);
            slot.failures = slot.failures.saturating_add(u32::from(failed));
        }
    }

    fn should_open(&self, now: Instant) -> bool {
        if self.consecutive >= self.settings.consecutive_failures {
            return true;
        }
        let (calls, failures) = self.window_counts(now);
        calls >= self.settings.min_calls
            && f64::from(failures) > self.settings.failure_rate * f64::from(calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_calls: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(4),
            probe_timeout: Duration::from_secs(2),
        }
    }

    fn breaker(s: BreakerSettings) -> Breaker {
        Breaker::new(s, 7).unwrap()
    }

    fn permit(b: &mut Breaker, now: Instant) -> Permit {
        match b.try_acquire(now) {
            Acquire::Permit(p) => p,
            Acquire::Rejected => panic!("rejected in state {:?}", b.state()),
        }
    }

    /// One call made and reported at `now`.
    fn call(b: &mut Breaker, now: Instant, outcome: Outcome) -> Option<BreakerState> {
        let p = permit(b, now);
        b.record(p, outcome, now)
    }

    /// Opens `b` by consecutive failures at `now`; returns when it may probe.
    fn open(b: &mut Breaker, now: Instant) -> Instant {
        while b.state() == BreakerState::Closed {
            call(b, now, Outcome::Failure);
        }
        b.open_until().unwrap()
    }

    #[test]
    fn settings_are_checked() {
        let bad = [
            BreakerSettings {
                consecutive_failures: 0,
                ..settings()
            },
            BreakerSettings {
                failure_rate: 1.5,
                ..settings()
            },
            BreakerSettings {
                failure_rate: f64::NAN,
                ..settings()
            },
            BreakerSettings {
                min_calls: 0,
                ..settings()
            },
            BreakerSettings {
                window: Duration::ZERO,
                ..settings()
            },
            BreakerSettings {
                open_for: Duration::ZERO,
                ..settings()
            },
            BreakerSettings {
                probe_timeout: Duration::ZERO,
                ..settings()
            },
        ];
        let fields: Vec<_> = bad
            .iter()
            .map(|s| Breaker::new(*s, 0).unwrap_err().field)
            .collect();
        let expected = [
            "consecutive_failures",
            "failure_rate",
            "failure_rate",
            "min_calls",
            "window",
            "open_for",
            "probe_timeout",
        ];
        assert_eq!(fields, expected);
    }

    #[test]
    fn gauge_values() {
        let states = [
            BreakerState::Closed,
            BreakerState::HalfOpen,
            BreakerState::Open,
        ];
        assert_eq!(states.map(BreakerState::gauge), [0, 1, 2]);
        assert_eq!(
            states.map(BreakerState::as_str),
            ["closed", "half_open", "open"]
        );
    }

    #[test]
    fn opens_after_consecutive_failures_and_a_success_resets_the_run() {
        let (mut b, t) = (breaker(settings()), Instant::now());
        assert_eq!(call(&mut b, t, Outcome::Failure), None);
        assert_eq!(call(&mut b, t, Outcome::Failure), None);
        assert_eq!(call(&mut b, t, Outcome::Success), None);
        assert_eq!(call(&mut b, t, Outcome::Failure), None);
        assert_eq!(call(&mut b, t, Outcome::Failure), None);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(call(&mut b, t, Outcome::Failure), Some(BreakerState::Open));
        assert_eq!(b.state().gauge(), 2);
        assert_eq!(b.try_acquire(t), Acquire::Rejected);
    }

    #[test]
    fn opens_on_failure_rate_only_after_min_calls() {
        let s = BreakerSettings {
            consecutive_failures: 100,
            ..settings()
        };
        let (mut b, t) = (breaker(s), Instant::now());
        // Alternating: 50 % failures is not above 0.5.
        for i in 0..20 {
            let o = [Outcome::Success, Outcome::Failure][i % 2];
            assert_eq!(call(&mut b, t, o), None, "call {i}");
        }
        // 9 calls, 6 failed (67 %), but fewer than min_calls = 10: still closed.
        let mut b = breaker(s);
        for o in [Outcome::Failure, Outcome::Failure, Outcome::Success].repeat(3) {
            call(&mut b, t, o);
        }
        assert_eq!(
            (b.window_counts(t), b.state()),
            ((9, 6), BreakerState::Closed)
        );
        // The 10th call makes the rate count: 7 of 10.
        assert_eq!(call(&mut b, t, Outcome::Failure), Some(BreakerState::Open));
        assert_eq!(b.window_counts(t), (0, 0), "opening starts a fresh count");
    }

    #[test]
    fn old_calls_leave_the_window() {
        let s = BreakerSettings {
            consecutive_failures: 100,
            ..settings()
        };
        let (mut b, t) = (breaker(s), Instant::now());
        for _ in 0..9 {
            call(&mut b, t, Outcome::Failure);
        }
        // Past window + one slot, those failures no longer count.
        let later = t + s.window + s.window / WINDOW_SLOTS;
        assert_eq!(b.window_counts(later), (0, 0));
        assert_eq!(call(&mut b, later, Outcome::Failure), None);
        assert_eq!(b.window_counts(later), (1, 1));
        // Still inside the window, they do.
        let mut b = breaker(s);
        for _ in 0..9 {
            call(&mut b, t, Outcome::Failure);
        }
        let inside = t + s.window - Duration::from_millis(1);
        assert_eq!(
            call(&mut b, inside, Outcome::Failure),
            Some(BreakerState::Open)
        );
    }

    #[test]
    fn rate_of_one_never_opens_by_rate() {
        let s = BreakerSettings {
            consecutive_failures: 1000,
            failure_rate: 1.0,
            ..settings()
        };
        let (mut b, t) = (breaker(s), Instant::now());
        for _ in 0..999 {
            call(&mut b, t, Outcome::Failure);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn open_lets_exactly_one_probe_through_and_its_success_closes() {
        let (mut b, t) = (breaker(settings()), Instant::now());
        let until = open(&mut b, t);
        let open_for = settings().open_for;
        assert!(until >= t + open_for && until <= t + open_for.mul_f64(1.25));
        assert_eq!(
            b.try_acquire(until - Duration::from_nanos(1)),
            Acquire::Rejected
        );
        let probe = permit(&mut b, until);
        assert!(probe.is_probe());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        for _ in 0..5 {
            assert_eq!(b.try_acquire(until), Acquire::Rejected, "a second probe");
        }
        assert_eq!(
            b.record(probe, Outcome::Success, until),
            Some(BreakerState::Closed)
        );
        // Closed with a fresh count: it takes a full run of failures to open again.
        assert!(!permit(&mut b, until).is_probe());
        assert_eq!(b.window_counts(until), (0, 0));
        assert_eq!(call(&mut b, until, Outcome::Failure), None);
    }

    #[test]
    fn a_failed_probe_reopens() {
        let (mut b, t) = (breaker(settings()), Instant::now());
        let until = open(&mut b, t);
        let probe = permit(&mut b, until);
        assert_eq!(
            b.record(probe, Outcome::Failure, until),
            Some(BreakerState::Open)
        );
        let again = b.open_until().unwrap();
        assert!(again >= until + settings().open_for);
        assert_eq!(b.try_acquire(until), Acquire::Rejected);
        // The same permit reported twice changes nothing.
        assert_eq!(b.record(probe, Outcome::Success, until), None);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn a_probe_that_never_reports_expires_as_failed() {
        let (mut b, t) = (breaker(settings()), Instant::now());
        let until = open(&mut b, t);
        let lost = permit(&mut b, until);
        let expiry = until + settings().probe_timeout;
        assert_eq!(
            b.try_acquire(expiry - Duration::from_nanos(1)),
            Acquire::Rejected
        );
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.try_acquire(expiry), Acquire::Rejected);
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "the lost probe counted as failed"
        );
        let next = b.open_until().unwrap();
        assert!(next >= expiry + settings().open_for);
        // The lost probe reporting late is ignored; the next probe works.
        assert_eq!(b.record(lost, Outcome::Success, next), None);
        let probe = permit(&mut b, next);
        assert!(probe.is_probe());
        assert_eq!(
            b.record(probe, Outcome::Success, next),
            Some(BreakerState::Closed)
        );
    }

    #[test]
    fn results_of_earlier_states_are_ignored() {
        let (mut b, t) = (breaker(settings()), Instant::now());
        let slow = permit(&mut b, t);
        let until = open(&mut b, t);
        // A success of a call made while closed neither closes nor counts.
        assert_eq!(b.record(slow, Outcome::Success, t), None);
        assert_eq!(b.state(), BreakerState::Open);
        let probe = permit(&mut b, until);
        assert_eq!(b.record(slow, Outcome::Success, until), None);
        assert_eq!(b.state(), BreakerState::HalfOpen, "only the probe decides");
        assert_eq!(
            b.record(probe, Outcome::Success, until),
            Some(BreakerState::Closed)
        );
    }

    #[test]
    fn jitter_is_seeded_and_varies() {
        let t = Instant::now();
        let open_at = |seed| {
            let mut b = Breaker::new(settings(), seed).unwrap();
            open(&mut b, t) - t
        };
        assert_eq!(open_at(1), open_at(1), "same seed, same jitter");
        let spread: std::collections::BTreeSet<_> = (0..20).map(open_at).collect();
        assert!(spread.len() > 10, "jitter varies with the seed: {spread:?}");
        assert!(spread.iter().all(|d| *d >= settings().open_for));
        assert!(spread
            .iter()
            .all(|d| *d <= settings().open_for.mul_f64(1.25)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Advance(u64),
        Acquire,
        /// Report the outstanding permit at this index (modulo), with this outcome.
        Report(usize, bool),
        /// Forget an outstanding permit (its caller was dropped).
        Drop(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..3000).prop_map(Op::Advance),
            Just(Op::Acquire),
            Just(Op::Acquire),
            (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Op::Report(i, ok)),
            any::<usize>().prop_map(Op::Drop),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold_for_any_sequence(
            seed in any::<u64>(),
            consecutive in 1u32..5,
            rate in 0.0f64..=1.0,
            min_calls in 1u32..8,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let s = BreakerSettings {
                consecutive_failures: consecutive,
                failure_rate: rate,
                min_calls,
                window: Duration::from_secs(5),
                open_for: Duration::from_secs(2),
                probe_timeout: Duration::from_secs(1),
            };
            let mut b = Breaker::new(s, seed).unwrap();
            let mut now = Instant::now();
            let mut outstanding: Vec<Permit> = Vec::new();
            let mut opened_at: Option<Instant> = None;
            for op in ops {
                let before = b.state();
                match op {
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                    Op::Acquire => {
                        let was_open_until = b.open_until();
                        match b.try_acquire(now) {
                            Acquire::Permit(p) => {
                                if let Some(until) = was_open_until {
                                    prop_assert!(now >= until, "a permit while open");
                                }
                                outstanding.push(p);
                            }
                            Acquire::Rejected => {
                                prop_assert_ne!(before, BreakerState::Closed);
                            }
                        }
                    }
                    Op::Report(i, ok) if !outstanding.is_empty() => {
                        let p = outstanding.remove(i % outstanding.len());
                        let o = [Outcome::Failure, Outcome::Success][usize::from(ok)];
                        b.record(p, o, now);
                    }
                    Op::Drop(i) if !outstanding.is_empty() => {
                        outstanding.remove(i % outstanding.len());
                    }
                    Op::Report(..) | Op::Drop(_) => {}
                }
                let state = b.state();
                // Open duration within [open_for, 1.25 × open_for] of the moment it opened.
                if state == BreakerState::Open && (before != BreakerState::Open || opened_at.is_none()) {
                    opened_at = Some(now);
                }
                if state == BreakerState::Open {
                    let d = b.open_until().unwrap() - opened_at.unwrap();
                    prop_assert!(d >= s.open_for && d <= s.open_for.mul_f64(1.25), "{d:?}");
                } else {
                    opened_at = None;
                }
                // At most one probe in flight in half-open: of the outstanding permits of the
                // current generation, at most one, and it is the probe.
                if state == BreakerState::HalfOpen {
                    let current: Vec<_> = outstanding.iter().filter(|p| p.generation == b.generation).collect();
                    prop_assert!(current.len() <= 1);
                    prop_assert!(current.iter().all(|p| p.probe));
                }
                prop_assert_eq!(b.open_until().is_some(), state == BreakerState::Open);
            }
        }
    }
}
