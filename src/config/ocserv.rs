//! `[ocserv]`: how to reach the ocserv beside the agent, and how hard to press it.

use super::*;
use crate::ocserv::BackendKind;

section! {
    /// `[ocserv]`.
    pub struct OcservConfig {
        /// `native` speaks ocserv's control socket directly; `occtl` runs the occtl binary
        /// (slower; a fallback for ocserv versions the native client cannot read).
        backend: BackendKind = BackendKind::Native,
        /// ocserv's control socket (ocserv.conf `occtl-socket-file`), used by the native
        /// backend. An absolute path.
        control_socket: PathBuf = "/var/run/occtl.socket".into(),
        /// The occtl binary, used by the occtl backend. An absolute path.
        occtl_path: PathBuf = "/usr/bin/occtl".into(),
        /// Deadline of one request to ocserv (either backend); 10ms to 1m.
        #[serde(with = "humantime_serde")] request_timeout: Duration = secs(2),
        /// How often sessions are reconciled against ocserv's own list (finds sessions the hooks
        /// missed, closes vanished ones, refreshes counters); 100ms to 1h.
        #[serde(with = "humantime_serde")] reconcile_interval: Duration = secs(10),
        /// Calls to ocserv in flight at once (its main loop is single-threaded); 1 to 64.
        max_in_flight: usize = 4,
        /// Calls waiting beyond `max_in_flight` before new ones are refused; 0 to 100000.
        max_queued: usize = 256,
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
