//! `[agent]`: who this agent is and where it keeps its state.

use super::*;

section! {
    "agent" => pub struct AgentConfig {
        /// Names this agent towards the portal: `metadata["agent_id"]` of every event, and part
        /// of every event's id (so change it only with an empty outbox). 1 to 64
        /// characters from `A-Z a-z 0-9 . _ -`; by default the hostname when it is a valid id,
        /// else `ocserv-agent`.
        id: String = default_agent_id(),
        /// Directory of the durable state store (`state.redb`: the session snapshot, the portal
        /// outbox, the audit log and the portal's cached decisions), created with mode 0700 when
        /// missing. A store that cannot be opened stops the
        /// start with exit code 74. An absolute path.
        state_dir: PathBuf = "/var/lib/ocserv-agent".into(),
    }
}

impl AgentConfig {
    fn rules(&self) -> Result<(), ConfigError> {
        check_id(&self.id).or_else(|reason| fail("agent.id", reason))?;
        absolute("agent.state_dir", &self.state_dir)
    }
}

/// The default agent id: the machine's hostname when it is a valid id, else `ocserv-agent`.
pub fn default_agent_id() -> String {
    let names = ["/proc/sys/kernel/hostname", "/etc/hostname"].map(std::fs::read_to_string);
    let mut names = names.into_iter().flatten().map(|s| s.trim().to_owned());
    names
        .find(|s| check_id(s).is_ok())
        .unwrap_or_else(|| "ocserv-agent".to_owned())
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("must be 1 to 64 characters long, got {}", id.len()));
    }
    let bad = |c: &char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let why = |c: char| format!("character {c:?} not allowed (use A-Z a-z 0-9 . _ -)");
    id.chars().find(bad).map_or(Ok(()), |c| Err(why(c)))
}
