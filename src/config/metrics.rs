//! `[metrics]`: the HTTP server for `/metrics` (Prometheus), `/healthz` and `/readyz`.

use std::net::SocketAddr;

use super::*;

section! {
    /// `[metrics]`.
    pub struct MetricsConfig {
        /// Address (IP:port) of the HTTP server; loopback unless `allow_non_loopback`.
        listen: SocketAddr = ([127, 0, 0, 1], 9102).into(),
        /// Allows a non-loopback `listen` (the endpoints are read-only, but unauthenticated).
        allow_non_loopback: bool = false,
        /// Connections open at once; one over the cap is closed at once. 1 to 1000000.
        max_connections: usize = 256,
        /// A connection with no request for this long is closed; 1s to 1d.
        #[serde(with = "humantime_serde")] idle_timeout: Duration = secs(30),
        /// How long a request's headers may take to arrive; 100ms to 5m.
        #[serde(with = "humantime_serde")] header_timeout: Duration = secs(5),
    }
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback() && !self.allow_non_loopback {
            let why = "must be a loopback address unless metrics.allow_non_loopback = true";
            return fail("metrics.listen", format!("{why} (got {})", self.listen));
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
