//! `[metrics]`: the HTTP server for `/metrics` (Prometheus), `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, ms, number, secs, ConfigError};

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address (IP:port) of the HTTP server; loopback unless `allow_non_loopback`.
    pub listen: SocketAddr,
    /// Allows a non-loopback `listen` (the endpoints are read-only, but unauthenticated).
    pub allow_non_loopback: bool,
    /// Connections open at once; one over the cap is closed at once. 1 to 1000000.
    pub max_connections: usize,
    /// A connection with no request for this long is closed; 1s to 1d.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a request's headers may take to arrive; 100ms to 5m.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 9102).into(),
            allow_non_loopback: false,
            max_connections: 256,
            idle_timeout: secs(30),
            header_timeout: secs(5),
        }
    }
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback() && !self.allow_non_loopback {
            let reason = format!(
                "must be a loopback address unless metrics.allow_non_loopback = true (got {})",
                self.listen
            );
            return Err(ConfigError::new("metrics.listen", reason));
        }
        number(
            "metrics.max_connections",
            self.max_connections,
            1..=1_000_000,
        )?;
        duration(
            "metrics.idle_timeout",
            self.idle_timeout,
            secs(1)..=secs(86_400),
        )?;
        duration(
            "metrics.header_timeout",
            self.header_timeout,
            ms(100)..=secs(300),
        )
    }
}
