//! `[supervisor]`: the restart policy of the actor tree and its time limits.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, ms, secs, ConfigError};
use crate::backoff::Backoff;

/// Growth factor of the restart backoff. Not configurable: doubling is what every operator
/// expects, and one knob fewer cannot be misconfigured.
pub const RESTART_BACKOFF_MULTIPLIER: f64 = 2.0;

/// `[supervisor]`. Durations: 1ms to 1h.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    /// First delay before restarting a failed actor; each further restart doubles it (with
    /// jitter) up to `restart_backoff_max`.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_initial: Duration,
    /// Longest delay between restarts of a failing actor; not below `restart_backoff_initial`.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// More than this many restarts within `restart_window` make the agent exit non-zero
    /// (systemd then restarts the process); at least 1.
    pub restart_intensity: u32,
    /// The sliding window in which `restart_intensity` is counted.
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// On shutdown, how long actors get to finish before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Deadline of every call from one actor to another.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            restart_backoff_initial: ms(1),
            restart_backoff_max: secs(5),
            restart_intensity: 5,
            restart_window: secs(30),
            shutdown_grace: secs(10),
            call_timeout: secs(2),
        }
    }
}

impl SupervisorConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (initial, max) = (self.restart_backoff_initial, self.restart_backoff_max);
        duration(
            "supervisor.restart_backoff_initial",
            initial,
            ms(1)..=secs(3600),
        )?;
        duration("supervisor.restart_backoff_max", max, ms(1)..=secs(3600))?;
        if max < initial {
            let f = humantime::format_duration;
            let reason = format!(
                "must not be below supervisor.restart_backoff_initial ({}), got {}",
                f(initial),
                f(max)
            );
            return Err(ConfigError::new("supervisor.restart_backoff_max", reason));
        }
        if self.restart_intensity == 0 {
            let reason = "must be at least 1, got 0";
            return Err(ConfigError::new("supervisor.restart_intensity", reason));
        }
        duration(
            "supervisor.restart_window",
            self.restart_window,
            ms(1)..=secs(3600),
        )?;
        duration(
            "supervisor.shutdown_grace",
            self.shutdown_grace,
            ms(1)..=secs(3600),
        )?;
        duration(
            "supervisor.call_timeout",
            self.call_timeout,
            ms(1)..=secs(3600),
        )
    }

    /// The restart backoff. Validated configs always satisfy [`Backoff::new`]; hand-built
    /// values are first clamped into its rules (initial > 0, max >= initial), so this never fails.
    pub fn backoff(&self) -> Backoff {
        let initial = match self.restart_backoff_initial {
            Duration::ZERO => ms(1),
            d => d,
        };
        let max = self.restart_backoff_max.max(initial);
        Backoff::new(initial, max, RESTART_BACKOFF_MULTIPLIER)
            .or_else(|_| Backoff::new(ms(1), secs(5), RESTART_BACKOFF_MULTIPLIER))
            .expect("constant backoff parameters are valid")
    }
}
