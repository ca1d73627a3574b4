//! `[portal]` and `[portal.breaker]`: how the agent reaches the portal's `vpn.v1.AuthService`
//! (mTLS endpoint, files, deadline) and when it stops trying (the circuit breaker, whose state
//! machine is [`crate::breaker`]).
//!
//! Checked here: the endpoint's form (`https://host[:port]`, or `http://` only on a loopback IP
//! address), that the three TLS files are given for `https`, and absolute. Whether the files
//! exist and can be read is checked when they are loaded (at start and by `check-config`).

use std::cmp::Ordering;
use std::net::IpAddr;

use super::*;
use crate::breaker::BreakerSettings;

section! {
    "portal" => pub struct PortalConfig {
        /// The portal's gRPC endpoint: `https://host:port` (mTLS, TLS 1.3), or `http://IP:port`
        /// on a loopback IP only (plaintext, warned about; for tests and local proxies). No
        /// path, query or user part. Not set: no portal (needed by `policy.source = "portal"`).
        endpoint: Option<String> = None,
        /// PEM file of the CA(s) the portal's certificate must chain to. Required for an
        /// `https` endpoint. An absolute path.
        ca_file: Option<PathBuf> = None,
        /// PEM file of the agent's client certificate (chain). Required for `https`. Absolute.
        cert_file: Option<PathBuf> = None,
        /// PEM file of the client certificate's private key. Required for `https`. Absolute.
        key_file: Option<PathBuf> = None,
        /// The name the portal's certificate must carry, when it differs from the endpoint's
        /// host (e.g. an endpoint given by IP address). A DNS name or an IP address.
        server_name: Option<String> = None,
        /// Deadline of one call to the portal; past it the call counts as failed and the
        /// connect is answered by `policy.fail_mode`. Below `hook.request_timeout`.
        #[serde(with = "human")] call_timeout: Duration = secs(1), in ms(1)..=secs(60),
        /// Report every session's connect and disconnect (and periodic updates) to the
        /// portal's `vpn.v1.EventService` through the durable outbox. Not set: on when
        /// `endpoint` is set. `true` without an endpoint is refused.
        report_events: Option<bool> = None,
        /// How often every live session's counters go to the portal
        /// (`ReportSessionUpdate`, whose `should_disconnect` kicks the session); `0s` disables.
        #[serde(with = "human")] session_update_interval: Duration = secs(60), in secs(0)..=secs(86_400),
        /// How often every live session is revalidated with the portal's
        /// `AuthService.ValidateSession` (spread over the interval, in small batches;
        /// `force_disconnect` kicks the session); `0s` disables.
        #[serde(with = "human")] validate_interval: Duration = secs(300), in secs(0)..=secs(86_400),
        /// Events kept for the portal until it acknowledges them. When full, the oldest
        /// `ReportSessionUpdate`s are dropped first; connects and disconnects are never dropped
        /// (the outbox may then hold more than this, and says so in the log).
        outbox_capacity: usize = 100_000, in 100..=10_000_000,
        /// The circuit breaker in front of the portal.
        breaker: PortalBreakerConfig = PortalBreakerConfig::default(),
    }
}

section! {
    "portal.breaker" => pub struct PortalBreakerConfig {
        /// Failed calls in a row that open the breaker.
        consecutive_failures: u32 = 5, in 1..=1000,
        /// The breaker also opens when more than this share of the calls within `window` failed
        /// (a number from 0.0 to 1.0; 1.0 turns this rule off), once `min_calls` were made.
        failure_rate: Fraction = Fraction(0.5), in Fraction(0.0)..=Fraction(1.0),
        /// Calls within `window` before `failure_rate` is judged.
        min_calls: u32 = 20, in 1..=100_000,
        /// The sliding window over which `failure_rate` is measured.
        #[serde(with = "human")] window: Duration = secs(30), in secs(1)..=secs(3600),
        /// How long the breaker stays open (lengthened by a random 0-25 %) before one probe
        /// call is let through.
        #[serde(with = "human")] open_for: Duration = secs(10), in ms(100)..=secs(3600),
    }
}

/// A number from a TOML float (or integer), compared by [`f64::total_cmp`] so that it has a
/// total order and a true `Eq` (the `section!` structs derive `Eq`). `-0.0` reads as `0.0`.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(transparent)]
pub struct Fraction(pub f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // `+ 0.0` turns -0.0 into 0.0 and leaves every other value as it is.
        f64::deserialize(d).map(|f| Fraction(f + 0.0))
    }
}

impl PartialEq for Fraction {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Fraction {}

impl PartialOrd for Fraction {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Fraction {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Ranged for Fraction {
    fn show(self) -> String {
        format!("{:?}", self.0)
    }
}

impl PortalConfig {
    fn rules(&self) -> Result<(), ConfigError> {
        for (key, file) in self.tls_files() {
            if let Some(p) = file {
                absolute(key, p)?;
            }
        }
        if let Some(name) = &self.server_name {
            check_server_name(name).or_else(|why| fail("portal.server_name", why))?;
        }
        if let Some(endpoint) = &self.endpoint {
            let tls = check_endpoint(endpoint).or_else(|why| fail("portal.endpoint", why))?;
            for (key, file) in self.tls_files() {
                match (tls, file) {
                    (true, None) => {
                        return fail(key, "required when portal.endpoint is https");
                    }
                    (false, Some(_)) => {
                        let why = "set, but portal.endpoint is plaintext http (use https)";
                        return fail(key, why);
                    }
                    _ => {}
                }
            }
        }
        if self.report_events == Some(true) && self.endpoint.is_none() {
            return fail(
                "portal.report_events",
                "true, but portal.endpoint is not set",
            );
        }
        self.breaker.validate()
    }

    /// Whether events go to the portal: `report_events`, by default on with an endpoint.
    pub fn reports_events(&self) -> bool {
        self.endpoint.is_some() && self.report_events != Some(false)
    }

    /// The TLS file keys with their values, in the order they are checked.
    fn tls_files(&self) -> [(&'static str, Option<&PathBuf>); 3] {
        [
            ("portal.ca_file", self.ca_file.as_ref()),
            ("portal.cert_file", self.cert_file.as_ref()),
            ("portal.key_file", self.key_file.as_ref()),
        ]
    }

    /// The circuit breaker's parameters; a validated section always gives valid ones. A
    /// half-open probe that has not reported within twice `call_timeout` (its own deadline,
    /// plus as much again for the result to come back) counts as failed.
    pub fn breaker_settings(&self) -> BreakerSettings {
        let b = &self.breaker;
        BreakerSettings {
            consecutive_failures: b.consecutive_failures,
            failure_rate: b.failure_rate.0,
            min_calls: b.min_calls,
            window: b.window,
            open_for: b.open_for,
            probe_timeout: self.call_timeout.saturating_mul(2),
        }
    }

    /// Whether the endpoint (when set and valid) is `https`.
    pub fn is_tls(&self) -> bool {
        self.endpoint
            .as_deref()
            .is_some_and(|e| check_endpoint(e) == Ok(true))
    }
}

impl PortalBreakerConfig {
    fn rules(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// Checks a portal endpoint; `Ok(true)` for https, `Ok(false)` for plaintext http on loopback.
fn check_endpoint(endpoint: &str) -> Result<bool, String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("not a URL ({e}), expected https://host:port, got {endpoint:?}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("expected https://host:port, got {endpoint:?}")),
    };
    let Some(authority) = uri.authority() else {
        return Err(format!(
            "has no host, expected https://host:port, got {endpoint:?}"
        ));
    };
    if authority.as_str().contains('@') {
        return Err(format!("must not carry a user part, got {endpoint:?}"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "must not carry a path or query (the gRPC service paths are fixed), got {endpoint:?}"
        ));
    }
    if authority.port_u16() == Some(0) {
        return Err(format!("port 0 is not a port, got {endpoint:?}"));
    }
    let host = authority.host();
    let ip: Option<IpAddr> = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok();
    if !tls && !ip.is_some_and(|ip| ip.is_loopback()) {
        return Err(format!(
            "plaintext http is only allowed to a loopback IP address (127.0.0.1, [::1]); use \
             https for anything else, got {endpoint:?}"
        ));
    }
    if ip.is_none() {
        check_server_name(host)?;
    }
    Ok(tls)
}

/// A DNS name (labels of `A-Z a-z 0-9 -`, 1 to 63 bytes, not starting or ending with `-`; 253
/// bytes in all) or an IP address.
fn check_server_name(name: &str) -> Result<(), String> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    match name.len() <= 253 && name.split('.').all(label_ok) {
        true => Ok(()),
        false => Err(format!(
            "expected a DNS name or an IP address, got {name:?}"
        )),
    }
}
