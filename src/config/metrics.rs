//! `[metrics]`: the HTTP server for `/metrics` (Prometheus), `/healthz` and `/readyz`.

use super::*;

section! {
    "metrics" => pub struct MetricsConfig {
        /// Address (IP:port) of the HTTP server; loopback unless `allow_non_loopback`.
        listen: SocketAddr = ([127, 0, 0, 1], 9102).into(),
        /// Allows a non-loopback `listen` (the endpoints are read-only, but unauthenticated).
        allow_non_loopback: bool = false,
        /// Connections open at once; one over the cap is closed at once.
        max_connections: usize = 256, in 1..=1_000_000,
        /// A connection with no request for this long is closed; so is one whose request is not
        /// answered (response written) within it.
        #[serde(with = "human")] idle_timeout: Duration = secs(30), in secs(1)..=secs(86_400),
        /// How long a request's headers may take to arrive.
        #[serde(with = "human")] header_timeout: Duration = secs(5), in ms(100)..=secs(300),
    }
}

impl MetricsConfig {
    fn rules(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback() && !self.allow_non_loopback {
            let why = "must be a loopback address unless metrics.allow_non_loopback = true";
            return fail("metrics.listen", format!("{why} (got {})", self.listen));
        }
        Ok(())
    }
}
