//! `[ocserv]`: how to reach the ocserv beside the agent, and how hard to press it.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{absolute, duration, ms, number, secs, ConfigError};
use crate::ocserv::BackendKind;

/// `[ocserv]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OcservConfig {
    /// `native` speaks ocserv's control socket directly; `occtl` runs the occtl binary (slower;
    /// a fallback for ocserv versions the native client cannot read).
    pub backend: BackendKind,
    /// ocserv's control socket (ocserv.conf `occtl-socket-file`), used by the native backend.
    /// An absolute path.
    pub control_socket: PathBuf,
    /// The occtl binary, used by the occtl backend. An absolute path.
    pub occtl_path: PathBuf,
    /// Deadline of one request to ocserv (either backend); 10ms to 1m.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often sessions are reconciled against ocserv's own list (finds sessions the hooks
    /// missed, closes vanished ones, refreshes counters); 100ms to 1h.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Calls to ocserv in flight at once (its main loop is single-threaded); 1 to 64.
    pub max_in_flight: usize,
    /// Calls waiting beyond `max_in_flight` before new ones are refused; 0 to 100000.
    pub max_queued: usize,
}

impl Default for OcservConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Native,
            control_socket: "/var/run/occtl.socket".into(),
            occtl_path: "/usr/bin/occtl".into(),
            request_timeout: secs(2),
            reconcile_interval: secs(10),
            max_in_flight: 4,
            max_queued: 256,
        }
    }
}

impl OcservConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        absolute("ocserv.control_socket", &self.control_socket)?;
        absolute("ocserv.occtl_path", &self.occtl_path)?;
        duration(
            "ocserv.request_timeout",
            self.request_timeout,
            ms(10)..=secs(60),
        )?;
        duration(
            "ocserv.reconcile_interval",
            self.reconcile_interval,
            ms(100)..=secs(3600),
        )?;
        number("ocserv.max_in_flight", self.max_in_flight, 1..=64)?;
        number("ocserv.max_queued", self.max_queued, 0..=100_000)
    }
}
