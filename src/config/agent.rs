//! `[agent]`: who this agent is and where it keeps its state.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{absolute, ConfigError};

/// `[agent]`: identity and local state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Names this agent towards the portal (reserved until the portal link lands). 1 to 64
    /// characters from `A-Z a-z 0-9 . _ -`; default: the hostname when it is a valid id, else
    /// `ocserv-agent`.
    pub id: String,
    /// Directory for durable state (reserved: this version keeps none and does not create it).
    /// An absolute path.
    pub state_dir: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            id: default_agent_id(),
            state_dir: "/var/lib/ocserv-agent".into(),
        }
    }
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id(&self.id).map_err(|reason| ConfigError::new("agent.id", reason))?;
        absolute("agent.state_dir", &self.state_dir)
    }
}

/// The default agent id: the machine's hostname when it is a valid id, else `ocserv-agent`.
pub fn default_agent_id() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| check_id(s).is_ok())
        .unwrap_or_else(|| "ocserv-agent".to_owned())
}

pub(super) fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("must be 1 to 64 characters long, got {}", id.len()));
    }
    let bad = |c: &char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    match id.chars().find(bad) {
        Some(c) => Err(format!(
            "character {c:?} not allowed (use A-Z a-z 0-9 . _ -)"
        )),
        None => Ok(()),
    }
}
