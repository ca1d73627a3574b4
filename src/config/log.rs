//! `[log]`: what is logged and how. `RUST_LOG`, when set, wins over `level`.

use super::*;

section! {
    "log" => pub struct LogConfig {
        /// Least severe level logged: `trace`, `debug`, `info`, `warn` or `error` (any case,
        /// stored lowercase).
        #[serde(deserialize_with = "lowercase")]
        level: String = "info".to_owned(),
        /// `text` for people, `json` for log collectors (one object per line).
        format: LogFormat = LogFormat::Text,
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl LogConfig {
    fn rules(&self) -> Result<(), ConfigError> {
        const LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];
        let (levels, level) = (LEVELS.join(", "), &self.level);
        let why = format!("expected one of: {levels}, got {level:?}");
        match LEVELS.contains(&level.as_str()) {
            true => Ok(()),
            false => fail("log.level", why),
        }
    }
}

fn lowercase<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    String::deserialize(d).map(|s| s.to_lowercase())
}
