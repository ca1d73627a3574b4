//! One validated exponential backoff with full jitter, shared by actor restarts, reconnects and
//! retries (DESIGN §8).

use std::time::Duration;

/// Exponential backoff parameters; build with [`Backoff::new`], which validates them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
}

/// Why backoff parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackoffError {
    #[error("initial delay must be greater than zero")]
    ZeroInitial,
    #[error("maximum delay ({max:?}) must not be below the initial delay ({initial:?})")]
    MaxBelowInitial { initial: Duration, max: Duration },
    #[error("multiplier must be a finite number >= 1.0")]
    BadMultiplier,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, multiplier: f64) -> Result<Self, BackoffError> {
        if initial.is_zero() {
            return Err(BackoffError::ZeroInitial);
        }
        if max < initial {
            return Err(BackoffError::MaxBelowInitial { initial, max });
        }
        if !multiplier.is_finite() || multiplier < 1.0 {
            return Err(BackoffError::BadMultiplier);
        }
        Ok(Self {
            initial,
            max,
            multiplier,
        })
    }

    /// The ceiling for attempt `n` (0-based): `initial * multiplier^n`, capped at `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.powi(attempt.min(64) as i32);
        let secs = self.initial.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay before attempt `n`: "equal jitter", uniformly in `[ceiling/2, ceiling]`, so a
    /// delay never collapses to zero and many peers never retry in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let spread = (ceiling - half).as_nanos() as u64;
        let jitter = if spread == 0 {
            0
        } else {
            rand::random_range(0..=spread)
        };
        half + Duration::from_nanos(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn validates_parameters() {
        let ms = Duration::from_millis;
        assert_eq!(
            Backoff::new(Duration::ZERO, ms(1), 2.0),
            Err(BackoffError::ZeroInitial)
        );
        assert!(matches!(
            Backoff::new(ms(10), ms(5), 2.0),
            Err(BackoffError::MaxBelowInitial { .. })
        ));
        assert_eq!(
            Backoff::new(ms(1), ms(5), 0.5),
            Err(BackoffError::BadMultiplier)
        );
        assert_eq!(
            Backoff::new(ms(1), ms(5), f64::NAN),
            Err(BackoffError::BadMultiplier)
        );
    }

    #[test]
    fn ceiling_grows_then_caps() {
        let b = Backoff::new(Duration::from_millis(5), Duration::from_secs(1), 2.0).unwrap();
        assert_eq!(b.ceiling(0), Duration::from_millis(5));
        assert_eq!(b.ceiling(1), Duration::from_millis(10));
        assert_eq!(b.ceiling(3), Duration::from_millis(40));
        assert_eq!(b.ceiling(20), Duration::from_secs(1));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(1));
    }

    proptest! {
        #[test]
        fn delay_stays_within_half_and_full_ceiling(
            initial_ms in 1u64..1000, extra_ms in 0u64..10_000, mult in 1.0f64..4.0, n in 0u32..100
        ) {
            let b = Backoff::new(
                Duration::from_millis(initial_ms),
                Duration::from_millis(initial_ms + extra_ms),
                mult,
            ).unwrap();
            let c = b.ceiling(n);
            let d = b.delay(n);
            prop_assert!(d <= c && d >= c / 2, "{d:?} vs {c:?}");
        }
    }
}
