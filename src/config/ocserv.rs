//! `[ocserv]`: how to reach the ocserv beside the agent, and how hard to press it.

use super::*;
use crate::ocserv::BackendKind;

section! {
    "ocserv" => pub struct OcservConfig {
        /// `native` speaks ocserv's control socket directly; `occtl` runs the occtl binary
        /// (slower; a fallback for ocserv versions the native client cannot read).
        backend: BackendKind = BackendKind::Native,
        /// ocserv's control socket (ocserv.conf `occtl-socket-file`), used by the native
        /// backend. An absolute path.
        control_socket: PathBuf = "/var/run/occtl.socket".into(),
        /// The occtl binary, used by the occtl backend. An absolute path.
        occtl_path: PathBuf = "/usr/bin/occtl".into(),
        /// Deadline of one request to ocserv (either backend).
        #[serde(with = "human")] request_timeout: Duration = secs(2), in ms(10)..=secs(60),
        /// How often sessions are reconciled against ocserv's own list (finds sessions the hooks
        /// missed, closes vanished ones, refreshes counters).
        #[serde(with = "human")] reconcile_interval: Duration = secs(10), in ms(100)..=secs(3600),
        /// Hold ocserv's event stream (TOP) for immediate disconnect reasons (idle timeout, DPD,
        /// user, server). ocserv has one listener slot: while the agent holds it, an admin's
        /// `occtl show events` gets nothing. Native backend only.
        event_stream: bool = false,
        /// Calls to ocserv in flight at once (its main loop is single-threaded).
        max_in_flight: usize = 4, in 1..=64,
        /// Calls waiting beyond `max_in_flight` before new ones are refused.
        max_queued: usize = 256, in 0..=100_000,
    }
}

impl OcservConfig {
    fn rules(&self) -> Result<(), ConfigError> {
        absolute("ocserv.control_socket", &self.control_socket)?;
        absolute("ocserv.occtl_path", &self.occtl_path)?;
        if self.event_stream && self.backend != BackendKind::Native {
            return fail("ocserv.event_stream", "needs ocserv.backend = \"native\"");
        }
        Ok(())
    }
}
