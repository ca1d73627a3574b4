//! `[log]`: what is logged and how.

use serde::{Deserialize, Deserializer, Serialize};

use super::ConfigError;

const LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

/// `[log]`. `RUST_LOG`, when set, wins over `level`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Least severe level logged: `trace`, `debug`, `info`, `warn` or `error` (any case, stored
    /// lowercase).
    #[serde(deserialize_with = "lowercase")]
    pub level: String,
    /// `text` for people, `json` for log collectors (one object per line).
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if LEVELS.contains(&self.level.as_str()) {
            return Ok(());
        }
        let reason = format!(
            "expected one of: {}, got {:?}",
            LEVELS.join(", "),
            self.level
        );
        Err(ConfigError::new("log.level", reason))
    }
}

fn lowercase<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    String::deserialize(d).map(|s| s.to_lowercase())
}
