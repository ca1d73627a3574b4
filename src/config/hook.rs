//! `[hook]`: the Unix socket the connect/disconnect hook program (`ocserv-agent-hook`) asks on.

use super::*;

/// The hook program's own default overall deadline (`ocserv-agent-hook --timeout`). The agent
/// must answer well before it, or the hook gives up and applies its own fail mode.
pub const HOOK_PROGRAM_DEADLINE: Duration = secs(3);

section! {
    "hook" => pub struct HookConfig {
        /// The hook socket (its directory created 0750 if missing, the socket 0660, a stale one
        /// replaced, removed on a clean stop). An absolute path, not `grpc.socket`.
        socket: PathBuf = "/run/ocserv-agent/hook.sock".into(),
        /// Peer uids (`SO_PEERCRED`) allowed on `socket`: ocserv runs its scripts as root, so
        /// only root by default. Not empty. From the environment comma-separated, e.g. `0,1000`.
        allowed_uids: Vec<u32> = vec![0],
        /// Hook connections open at once; one more gets an error answer at once (never waits).
        max_connections: usize = 256, in 1..=65_536,
        /// Deadline of one hook request inside the agent, from accept to answer. Below the hook
        /// program's own deadline (3 s by default) so that, whatever the portal does, the
        /// agent's answer (from the fail mode if need be) reaches the hook in time; 2 s leaves
        /// 1 s for the hook's fork, connect and framing. Above `portal.call_timeout`.
        #[serde(with = "human")] request_timeout: Duration = secs(2), in ms(10)..=secs(60),
    }
}

impl HookConfig {
    fn rules(&self) -> Result<(), ConfigError> {
        absolute("hook.socket", &self.socket)?;
        match self.allowed_uids.is_empty() {
            true => fail("hook.allowed_uids", "must not be empty"),
            false => Ok(()),
        }
    }
}
