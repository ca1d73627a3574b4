//! `[supervisor]`: the restart policy of the actor tree and its time limits.

use super::*;
use crate::backoff::Backoff;

/// Growth factor of the restart backoff. Not configurable: doubling is what every operator
/// expects, and one knob fewer cannot be misconfigured.
pub const RESTART_BACKOFF_MULTIPLIER: f64 = 2.0;

section! {
    "supervisor" => pub struct SupervisorConfig {
        /// First delay before restarting a failed actor; each further restart doubles it (with
        /// jitter) up to `restart_backoff_max`.
        #[serde(with = "human")] restart_backoff_initial: Duration = ms(1), in ms(1)..=secs(3600),
        /// Longest delay between restarts of a failing actor; not below the initial one.
        #[serde(with = "human")] restart_backoff_max: Duration = secs(5), in ms(1)..=secs(3600),
        /// More than this many restarts within `restart_window` make the agent exit non-zero
        /// (systemd then restarts the process); at least 1.
        restart_intensity: u32 = 5,
        /// The sliding window in which `restart_intensity` is counted.
        #[serde(with = "human")] restart_window: Duration = secs(30), in ms(1)..=secs(3600),
        /// On shutdown, how long actors get to finish before the process exits anyway.
        #[serde(with = "human")] shutdown_grace: Duration = secs(10), in ms(1)..=secs(3600),
        /// Deadline of every call from one actor to another.
        #[serde(with = "human")] call_timeout: Duration = secs(2), in ms(1)..=secs(3600),
    }
}

impl SupervisorConfig {
    fn rules(&self) -> Result<(), ConfigError> {
        let (initial, max) = (self.restart_backoff_initial, self.restart_backoff_max);
        if max < initial {
            let (i, m) = (initial.show(), max.show());
            let why =
                format!("must not be below supervisor.restart_backoff_initial ({i}), got {m}");
            return fail("supervisor.restart_backoff_max", why);
        }
        match self.restart_intensity {
            0 => fail("supervisor.restart_intensity", "must be at least 1, got 0"),
            _ => Ok(()),
        }
    }

    /// The restart backoff. Validated configs always satisfy [`Backoff::new`]; hand-built
    /// values are first clamped into its rules (initial > 0, max >= initial), so this never fails.
    pub fn backoff(&self) -> Backoff {
        let initial = self.restart_backoff_initial;
        let initial = if initial.is_zero() { ms(1) } else { initial };
        let max = self.restart_backoff_max.max(initial);
        Backoff::new(initial, max, RESTART_BACKOFF_MULTIPLIER)
            .or_else(|_| Backoff::new(ms(1), secs(5), RESTART_BACKOFF_MULTIPLIER))
            .expect("constant backoff parameters are valid")
    }
}
