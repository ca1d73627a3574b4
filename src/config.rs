//! Agent configuration: load, check and type it before anything starts (DESIGN §8).
//!
//! Inputs: an optional TOML file (by default [`DEFAULT_PATH`]) and environment overrides named
//! `OCSERV_AGENT__<SECTION>__<KEY>` (e.g. `OCSERV_AGENT__GRPC__LISTEN=127.0.0.1:6000`); an
//! override always wins over the file. The `config` crate does the loading and merging; this
//! module checks the merged tree itself (unknown sections and keys, value types) before serde
//! sees it, because the crate's own errors do not reliably carry the dotted key path and it
//! lowercases environment names.
//!
//! Output: a [`Loaded`] holding the typed, validated [`Config`], where it came from, and which
//! keys took their embedded default (so the startup message can say so).
//!
//! Failure: every problem is one [`ConfigError`] naming the dotted key (`ocserv.request_timeout`),
//! the environment variable when the value came from the environment, or the file path for
//! file-level problems, plus the reason. The binary exits with [`EXIT_CONFIG`] on it. Nothing
//! here panics on outside input. Re-running [`load`] (e.g. on SIGHUP) re-validates from scratch.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ::config::{Environment, File, FileFormat, Map, Value, ValueKind};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::backoff::Backoff;
use crate::ocserv::BackendKind;

/// Process exit code for an invalid configuration (`EX_CONFIG` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Where the agent looks for its configuration when no path is given.
pub const DEFAULT_PATH: &str = "/etc/ocserv-agent/agent.toml";

/// Default `agent.state_dir`.
const DEFAULT_STATE_DIR: &str = "/var/lib/ocserv-agent";

/// Prefix of environment overrides; the full name is `OCSERV_AGENT__<SECTION>__<KEY>`.
pub const ENV_PREFIX: &str = "OCSERV_AGENT";

/// Separator between prefix, section and key in environment override names.
pub const ENV_SEPARATOR: &str = "__";

/// Growth factor of the supervisor's restart backoff. Not configurable: doubling is what every
/// operator expects, and one knob fewer cannot be misconfigured.
pub const RESTART_BACKOFF_MULTIPLIER: f64 = 2.0;

/// Origin string the `config` crate gives values read from the environment.
const ENV_ORIGIN: &str = "the environment";

/// An invalid configuration: which key (dotted, env var name, or file path) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The whole typed configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    pub agent: AgentConfig,
    pub ocserv: OcservConfig,
    pub grpc: GrpcConfig,
    pub metrics: MetricsConfig,
    pub supervisor: SupervisorConfig,
    pub log: LogConfig,
}

/// `[agent]`: identity and local state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Name of this agent towards the portal; 1..=64 chars of `[A-Za-z0-9._-]`.
    pub id: String,
    /// Directory of the durable store; absolute.
    pub state_dir: PathBuf,
}

/// `[ocserv]`: how to reach the ocserv beside us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcservConfig {
    pub backend: BackendKind,
    pub control_socket: PathBuf,
    pub occtl_path: PathBuf,
    pub request_timeout: Duration,
    pub reconcile_interval: Duration,
    pub max_in_flight: usize,
    pub max_queued: usize,
}

/// `[grpc]`: the management front door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcConfig {
    pub socket: PathBuf,
    pub allowed_uids: Vec<u32>,
    /// Loopback only until mTLS is configurable.
    pub listen: Option<SocketAddr>,
    pub insecure: bool,
    pub max_concurrent_requests: usize,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub max_streams_per_connection: u32,
    pub read_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// `[metrics]`: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
    pub allow_non_loopback: bool,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub header_timeout: Duration,
}

/// `[supervisor]`: restart policy of the actor tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorConfig {
    pub restart_backoff_initial: Duration,
    pub restart_backoff_max: Duration,
    /// More than this many restarts within `restart_window` escalates to a process exit.
    pub restart_intensity: u32,
    pub restart_window: Duration,
    /// How long actors get to stop on shutdown before the process exits anyway.
    pub shutdown_grace: Duration,
    /// Bound of every cross-actor call.
    pub call_timeout: Duration,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// One of `trace`, `debug`, `info`, `warn`, `error` (stored lowercase).
    pub level: String,
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl SupervisorConfig {
    /// The restart backoff. Validated configs always satisfy [`Backoff::new`]; for hand-built
    /// values the parameters are first clamped into its rules (initial > 0, max >= initial), so
    /// this never fails.
    pub fn backoff(&self) -> Backoff {
        let initial = if self.restart_backoff_initial.is_zero() {
            Duration::from_millis(1)
        } else {
            self.restart_backoff_initial
        };
        let max = self.restart_backoff_max.max(initial);
        match Backoff::new(initial, max, RESTART_BACKOFF_MULTIPLIER) {
            Ok(b) => b,
            // Unreachable: initial > 0, max >= initial and the multiplier is a valid constant.
            Err(_) => Backoff::new(
                Duration::from_millis(1),
                Duration::from_secs(5),
                RESTART_BACKOFF_MULTIPLIER,
            )
            .expect("constant backoff parameters are valid"),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            id: default_agent_id(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}

impl Default for OcservConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Native,
            control_socket: PathBuf::from("/var/run/occtl.socket"),
            occtl_path: PathBuf::from("/usr/bin/occtl"),
            request_timeout: Duration::from_secs(2),
            reconcile_interval: Duration::from_secs(10),
            max_in_flight: 4,
            max_queued: 256,
        }
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/ocserv-agent/agent.sock"),
            allowed_uids: vec![0],
            listen: None,
            insecure: false,
            max_concurrent_requests: 256,
            request_timeout: Duration::from_secs(5),
            max_connections: 4096,
            idle_timeout: Duration::from_secs(300),
            max_streams_per_connection: 32,
            read_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9102),
            allow_non_loopback: false,
            max_connections: 256,
            idle_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            restart_backoff_initial: Duration::from_millis(1),
            restart_backoff_max: Duration::from_secs(5),
            restart_intensity: 5,
            restart_window: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            call_timeout: Duration::from_secs(2),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// The default agent id: the machine's hostname when it is a valid id, else `ocserv-agent`.
pub fn default_agent_id() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| check_agent_id(s).is_ok())
        .unwrap_or_else(|| "ocserv-agent".to_owned())
}

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    EmbeddedDefaults,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::EmbeddedDefaults => write!(f, "embedded defaults (no file at {DEFAULT_PATH})"),
        }
    }
}

/// A loaded, validated configuration and its provenance.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub config: Config,
    pub source: ConfigSource,
    /// Dotted keys that took their embedded default, in declaration order.
    pub defaults_used: Vec<String>,
}

impl Loaded {
    /// One line for the startup log: the source and the keys left at their defaults.
    pub fn summary(&self) -> String {
        let defaults = if self.defaults_used.is_empty() {
            "no embedded defaults used".to_owned()
        } else if self.defaults_used.len() == KEYS.len() {
            "embedded defaults used for every key".to_owned()
        } else {
            format!(
                "embedded defaults used for: {}",
                self.defaults_used.join(", ")
            )
        };
        format!("configuration from {}; {defaults}", self.source)
    }

    /// One `key = value` line per key that took its embedded default, for the startup log.
    pub fn describe_defaults(&self) -> Vec<String> {
        self.config
            .entries()
            .into_iter()
            .filter(|(k, _)| self.defaults_used.contains(k))
            .map(|(k, v)| format!("{k} = {v}"))
            .collect()
    }

    /// The effective configuration as a TOML document (for `check-config`): a header naming the
    /// source, then every key with its value, defaults marked. Loading the output gives back
    /// the same configuration.
    pub fn render(&self) -> String {
        // A path could hold a newline; keep the header one comment line.
        let mut out = format!("# {}\n", self.summary().replace('\n', " "));
        let mut current = String::new();
        for (dotted, value) in self.config.entries() {
            let (section, key) = dotted.split_once('.').unwrap_or(("", dotted.as_str()));
            if section != current {
                out.push_str(&format!("\n[{section}]\n"));
                current = section.to_owned();
            }
            let mark = if self.defaults_used.contains(&dotted) {
                "  # default"
            } else {
                ""
            };
            out.push_str(&format!("{key} = {value}{mark}\n"));
        }
        out
    }
}

impl Config {
    /// Every key (dotted) with its value rendered as a TOML value, in declaration order.
    pub fn entries(&self) -> Vec<(String, String)> {
        // JSON string syntax is valid TOML basic-string syntax, escapes included.
        let s = |v: &str| serde_json::to_string(v).unwrap_or_else(|_| "\"\"".to_owned());
        let p = |v: &Path| s(&v.to_string_lossy());
        let d = |v: Duration| s(&humantime::format_duration(v).to_string());
        let backend = match self.ocserv.backend {
            BackendKind::Native => "native",
            BackendKind::Occtl => "occtl",
        };
        let format = match self.log.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let (a, o, g, m, v, l) = (
            &self.agent,
            &self.ocserv,
            &self.grpc,
            &self.metrics,
            &self.supervisor,
            &self.log,
        );
        [
            ("agent.id", s(&a.id)),
            ("agent.state_dir", p(&a.state_dir)),
            ("ocserv.backend", s(backend)),
            ("ocserv.control_socket", p(&o.control_socket)),
            ("ocserv.occtl_path", p(&o.occtl_path)),
            ("ocserv.request_timeout", d(o.request_timeout)),
            ("ocserv.reconcile_interval", d(o.reconcile_interval)),
            (
                "grpc.listen",
                s(&g.listen.map(|l| l.to_string()).unwrap_or_default()),
            ),
            (
                "grpc.max_concurrent_requests",
                g.max_concurrent_requests.to_string(),
            ),
            ("grpc.request_timeout", d(g.request_timeout)),
            ("metrics.listen", s(&m.listen.to_string())),
            (
                "supervisor.restart_backoff_initial",
                d(v.restart_backoff_initial),
            ),
            ("supervisor.restart_backoff_max", d(v.restart_backoff_max)),
            (
                "supervisor.restart_intensity",
                v.restart_intensity.to_string(),
            ),
            ("supervisor.restart_window", d(v.restart_window)),
            ("supervisor.shutdown_grace", d(v.shutdown_grace)),
            ("supervisor.call_timeout", d(v.call_timeout)),
            ("log.level", s(&l.level)),
            ("log.format", s(format)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// Load from `path` (which must exist), or with `None` from [`DEFAULT_PATH`] when it exists and
/// embedded defaults otherwise. Environment overrides from the process environment always apply.
pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars_os() {
        // Names that are not Unicode cannot carry our prefix in a form we could parse; skip
        // them like the config crate does.
        let Ok(name) = name.into_string() else {
            continue;
        };
        match value.into_string() {
            Ok(value) => env.push((name, value)),
            Err(_) if has_env_prefix(&name) => {
                return Err(ConfigError::new(name, "value is not valid UTF-8"));
            }
            Err(_) => {}
        }
    }
    load_with_env(path, &env)
}

/// [`load`] with an explicit environment instead of the process's (for tests and SIGHUP
/// re-validation with a captured environment).
pub fn load_with_env(path: Option<&Path>, env: &[(String, String)]) -> Result<Loaded, ConfigError> {
    load_from(path, Path::new(DEFAULT_PATH), env)
}

/// The loader, with the default path as a parameter so tests do not depend on the machine's /etc.
fn load_from(
    path: Option<&Path>,
    default_path: &Path,
    env: &[(String, String)],
) -> Result<Loaded, ConfigError> {
    let overrides = EnvOverrides::parse(env)?;
    let file = match path {
        Some(p) => {
            check_file(p)?;
            Some(p.to_path_buf())
        }
        None => {
            let p = default_path;
            // Only "exists" decides; an existing but unreadable default file is an error, not
            // a silent fallback to defaults.
            if p.exists() {
                check_file(p)?;
                Some(p.to_path_buf())
            } else {
                None
            }
        }
    };

    let mut builder = ::config::Config::builder();
    if let Some(p) = &file {
        builder = builder.add_source(
            File::from(p.as_path())
                .format(FileFormat::Toml)
                .required(true),
        );
    }
    let env_map: Map<String, String> = overrides
        .by_key
        .values()
        .map(|o| (o.var.clone(), o.value.clone()))
        .collect();
    builder = builder.add_source(
        Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
            .source(Some(env_map)),
    );
    let built = builder
        .build()
        .map_err(|e| build_error(file.as_deref(), e))?;
    let tree = ::config::Source::collect(&built).map_err(|e| build_error(file.as_deref(), e))?;

    let names = Namer {
        overrides: &overrides,
    };
    check_tree(&tree, &names)?;
    let raw = RawConfig {
        agent: section(&tree, "agent", &names)?,
        ocserv: section(&tree, "ocserv", &names)?,
        grpc: section(&tree, "grpc", &names)?,
        metrics: section(&tree, "metrics", &names)?,
        supervisor: section(&tree, "supervisor", &names)?,
        log: section(&tree, "log", &names)?,
    };
    let config = raw.validate(&names)?;

    let defaults_used = KEYS
        .iter()
        .filter(|k| lookup(&tree, k.section, k.key).is_none())
        .map(|k| format!("{}.{}", k.section, k.key))
        .collect();
    let source = match file {
        Some(p) => ConfigSource::File(p),
        None => ConfigSource::EmbeddedDefaults,
    };
    Ok(Loaded {
        config,
        source,
        defaults_used,
    })
}

fn check_file(p: &Path) -> Result<(), ConfigError> {
    let key = p.display().to_string();
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::new(key, "not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ConfigError::new(key, "configuration file not found"))
        }
        Err(e) => Err(ConfigError::new(key, format!("cannot read: {e}"))),
    }
}

/// Errors of the `config` crate while loading: the file is the only thing that can fail here
/// (environment names and values were checked before), so they are named by the file path.
fn build_error(file: Option<&Path>, e: ::config::ConfigError) -> ConfigError {
    let key = file.map_or_else(|| ENV_PREFIX.to_owned(), |p| p.display().to_string());
    match e {
        // The toml error text carries "line L, column C" and a caret snippet.
        ::config::ConfigError::FileParse { cause, .. } => ConfigError::new(
            key,
            format!("malformed TOML: {}", cause.to_string().trim_end()),
        ),
        other => ConfigError::new(key, other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Key catalogue

/// What a key holds in the TOML file (environment values are always strings).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Toml {
    String,
    Integer,
}

struct KeySpec {
    section: &'static str,
    key: &'static str,
    toml: Toml,
    /// Completes "expected ...".
    expect: &'static str,
}

const DURATION: &str = "a duration like \"2s\" or \"250ms\"";
const ABS_PATH: &str = "an absolute path";

const fn spec(
    section: &'static str,
    key: &'static str,
    toml: Toml,
    expect: &'static str,
) -> KeySpec {
    KeySpec {
        section,
        key,
        toml,
        expect,
    }
}

/// Every key, in declaration order. The raw structs below must match (tests check that the
/// example file sets every key here and that it deserializes with `deny_unknown_fields`).
const KEYS: &[KeySpec] = &[
    spec(
        "agent",
        "id",
        Toml::String,
        "1 to 64 characters from A-Z a-z 0-9 . _ -",
    ),
    spec("agent", "state_dir", Toml::String, ABS_PATH),
    spec("ocserv", "backend", Toml::String, "one of: native, occtl"),
    spec("ocserv", "control_socket", Toml::String, ABS_PATH),
    spec("ocserv", "occtl_path", Toml::String, ABS_PATH),
    spec("ocserv", "request_timeout", Toml::String, DURATION),
    spec("ocserv", "reconcile_interval", Toml::String, DURATION),
    spec(
        "grpc",
        "listen",
        Toml::String,
        "a loopback socket address like \"127.0.0.1:50051\"",
    ),
    spec(
        "grpc",
        "max_concurrent_requests",
        Toml::Integer,
        "a whole number from 1 to 65536",
    ),
    spec("grpc", "request_timeout", Toml::String, DURATION),
    spec(
        "metrics",
        "listen",
        Toml::String,
        "a socket address like \"127.0.0.1:9102\"",
    ),
    spec(
        "supervisor",
        "restart_backoff_initial",
        Toml::String,
        DURATION,
    ),
    spec("supervisor", "restart_backoff_max", Toml::String, DURATION),
    spec(
        "supervisor",
        "restart_intensity",
        Toml::Integer,
        "a whole number from 1 to 4294967295",
    ),
    spec("supervisor", "restart_window", Toml::String, DURATION),
    spec("supervisor", "shutdown_grace", Toml::String, DURATION),
    spec("supervisor", "call_timeout", Toml::String, DURATION),
    spec(
        "log",
        "level",
        Toml::String,
        "one of: trace, debug, info, warn, error",
    ),
    spec("log", "format", Toml::String, "one of: text, json"),
];

const SECTIONS: &[&str] = &["agent", "ocserv", "grpc", "metrics", "supervisor", "log"];

fn keys_of(section: &str) -> impl Iterator<Item = &'static KeySpec> + '_ {
    KEYS.iter().filter(move |k| k.section == section)
}

fn find_key(section: &str, key: &str) -> Option<&'static KeySpec> {
    keys_of(section).find(|k| k.key == key)
}

fn expected_keys(section: &str) -> String {
    keys_of(section)
        .map(|k| k.key)
        .collect::<Vec<_>>()
        .join(", ")
}

fn lookup<'t>(tree: &'t Map<String, Value>, section: &str, key: &str) -> Option<&'t Value> {
    match &tree.get(section)?.kind {
        ValueKind::Table(t) => t.get(key),
        _ => None,
    }
}

/// The name of the env var for a key: `ocserv.request_timeout` → `OCSERV_AGENT__OCSERV__REQUEST_TIMEOUT`.
pub fn env_var_name(section: &str, key: &str) -> String {
    format!(
        "{ENV_PREFIX}{ENV_SEPARATOR}{}{ENV_SEPARATOR}{}",
        section.to_uppercase(),
        key.to_uppercase()
    )
}

// ---------------------------------------------------------------------------------------------
// Environment overrides

fn has_env_prefix(name: &str) -> bool {
    // The config crate matches the prefix case-insensitively; so must we, or a lowercase
    // variable would be loaded without being checked.
    name.to_lowercase()
        .starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase())
}

struct Override {
    var: String,
    value: String,
}

/// Checked environment overrides, by dotted key.
struct EnvOverrides {
    by_key: BTreeMap<String, Override>,
}

impl EnvOverrides {
    fn parse(env: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut by_key: BTreeMap<String, Override> = BTreeMap::new();
        let prefix_len = ENV_PREFIX.len() + ENV_SEPARATOR.len();
        for (var, value) in env {
            if !has_env_prefix(var) {
                continue;
            }
            // Slice the lowercased name: it starts with the ASCII prefix, so the index is a char
            // boundary there even if lowercasing changed the length of other characters.
            let lower = var.to_lowercase();
            let rest = &lower[prefix_len..];
            let parts: Vec<&str> = rest.split(ENV_SEPARATOR).collect();
            let [section, key] = parts[..] else {
                return Err(ConfigError::new(
                    var,
                    format!(
                        "environment overrides are named {ENV_PREFIX}{ENV_SEPARATOR}<SECTION>{ENV_SEPARATOR}<KEY>, e.g. {}",
                        env_var_name("grpc", "listen")
                    ),
                ));
            };
            if !SECTIONS.contains(&section) {
                return Err(ConfigError::new(
                    var,
                    format!(
                        "unknown section `{section}` (expected one of: {})",
                        SECTIONS.join(", ")
                    ),
                ));
            }
            if find_key(section, key).is_none() {
                return Err(ConfigError::new(
                    var,
                    format!(
                        "unknown key `{section}.{key}` (expected one of: {})",
                        expected_keys(section)
                    ),
                ));
            }
            let dotted = format!("{section}.{key}");
            if let Some(other) = by_key.get(&dotted) {
                return Err(ConfigError::new(
                    var,
                    format!("{dotted} is also set by {}; set it once", other.var),
                ));
            }
            by_key.insert(
                dotted,
                Override {
                    var: var.clone(),
                    value: value.clone(),
                },
            );
        }
        Ok(Self { by_key })
    }
}

/// Names keys in errors: the env var when the environment set the value, else the dotted key.
struct Namer<'a> {
    overrides: &'a EnvOverrides,
}

impl Namer<'_> {
    fn name(&self, section: &str, key: &str) -> String {
        let dotted = format!("{section}.{key}");
        match self.overrides.by_key.get(&dotted) {
            Some(o) => o.var.clone(),
            None => dotted,
        }
    }

    fn overridden(&self, section: &str, key: &str) -> bool {
        self.overrides
            .by_key
            .contains_key(&format!("{section}.{key}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Tree checks and deserialization

/// A short description of a value for "got ..." in messages.
fn describe(v: &Value) -> String {
    match &v.kind {
        ValueKind::Nil => "nothing".to_owned(),
        ValueKind::Boolean(b) => format!("boolean {b}"),
        ValueKind::I64(i) => format!("integer {i}"),
        ValueKind::I128(i) => format!("integer {i}"),
        ValueKind::U64(i) => format!("integer {i}"),
        ValueKind::U128(i) => format!("integer {i}"),
        ValueKind::Float(f) => format!("float {f}"),
        ValueKind::String(s) if s.chars().count() > 80 => {
            let head: String = s.chars().take(80).collect();
            format!("string {head:?}...")
        }
        ValueKind::String(s) => format!("string {s:?}"),
        ValueKind::Table(_) => "a table".to_owned(),
        ValueKind::Array(_) => "an array".to_owned(),
    }
}

/// Unknown sections and keys, and TOML types, before serde sees the tree: this is what makes
/// every message carry the full dotted key.
fn check_tree(tree: &Map<String, Value>, names: &Namer<'_>) -> Result<(), ConfigError> {
    let mut sections: Vec<&String> = tree.keys().collect();
    sections.sort();
    for section in sections {
        if !SECTIONS.contains(&section.as_str()) {
            return Err(ConfigError::new(
                section.as_str(),
                format!("unknown section (expected one of: {})", SECTIONS.join(", ")),
            ));
        }
        let value = &tree[section];
        let ValueKind::Table(table) = &value.kind else {
            return Err(ConfigError::new(
                section.as_str(),
                format!("expected a table [{section}], got {}", describe(value)),
            ));
        };
        let mut keys: Vec<&String> = table.keys().collect();
        keys.sort();
        for key in keys {
            let Some(spec) = find_key(section, key) else {
                return Err(ConfigError::new(
                    format!("{section}.{key}"),
                    format!("unknown key (expected one of: {})", expected_keys(section)),
                ));
            };
            let v = &table[key];
            // Environment values are strings whatever the key's type; their syntax is checked
            // by deserialization below.
            let from_env = names.overridden(section, key) || v.origin() == Some(ENV_ORIGIN);
            let type_ok = match (&v.kind, spec.toml) {
                (ValueKind::String(_), _) if from_env => true,
                (ValueKind::String(_), Toml::String) => true,
                (
                    ValueKind::I64(_) | ValueKind::I128(_) | ValueKind::U64(_) | ValueKind::U128(_),
                    Toml::Integer,
                ) => true,
                _ => false,
            };
            if !type_ok {
                return Err(ConfigError::new(
                    names.name(section, key),
                    format!("expected {}, got {}", spec.expect, describe(v)),
                ));
            }
        }
    }
    Ok(())
}

/// Deserialize one section through the config crate; map its error to the failing key.
fn section<T: DeserializeOwned + Default>(
    tree: &Map<String, Value>,
    name: &str,
    names: &Namer<'_>,
) -> Result<T, ConfigError> {
    let Some(value) = tree.get(name) else {
        return Ok(T::default());
    };
    value.clone().try_deserialize::<T>().map_err(|e| {
        let key = match &e {
            ::config::ConfigError::Type { key, .. } | ::config::ConfigError::At { key, .. } => key
                .as_deref()
                .and_then(|k| k.split(['.', '[']).next())
                .map(str::to_owned),
            _ => None,
        };
        match key.as_deref().and_then(|k| find_key(name, k)) {
            Some(spec) => {
                let got = lookup(tree, name, spec.key)
                    .map(describe)
                    .unwrap_or_else(|| "nothing".to_owned());
                ConfigError::new(
                    names.name(name, spec.key),
                    format!("expected {}, got {got}", spec.expect),
                )
            }
            // The crate did not say which key; still name the section and keep its reason.
            None => ConfigError::new(name, e.to_string()),
        }
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    id: Option<String>,
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOcserv {
    backend: Option<BackendKind>,
    control_socket: Option<PathBuf>,
    occtl_path: Option<PathBuf>,
    #[serde(default, with = "humantime_serde::option")]
    request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    reconcile_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpc {
    listen: Option<SocketAddr>,
    max_concurrent_requests: Option<usize>,
    #[serde(default, with = "humantime_serde::option")]
    request_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSupervisor {
    #[serde(default, with = "humantime_serde::option")]
    restart_backoff_initial: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    restart_backoff_max: Option<Duration>,
    restart_intensity: Option<u32>,
    #[serde(default, with = "humantime_serde::option")]
    restart_window: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    shutdown_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    call_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

struct RawConfig {
    agent: RawAgent,
    ocserv: RawOcserv,
    grpc: RawGrpc,
    metrics: RawMetrics,
    supervisor: RawSupervisor,
    log: RawLog,
}

// ---------------------------------------------------------------------------------------------
// Validation

const MS: fn(u64) -> Duration = Duration::from_millis;
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn check_agent_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("must be 1 to 64 characters long, got {}", id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "character {c:?} not allowed (use A-Z a-z 0-9 . _ -)"
        ));
    }
    Ok(())
}

impl RawConfig {
    fn validate(self, names: &Namer<'_>) -> Result<Config, ConfigError> {
        let err = |s: &str, k: &str, reason: String| ConfigError::new(names.name(s, k), reason);
        let path = |s: &str, k: &str, v: Option<PathBuf>, dflt: PathBuf| {
            let p = v.unwrap_or(dflt);
            if !p.is_absolute() {
                return Err(err(
                    s,
                    k,
                    format!(
                        "must be an absolute path, got {:?}",
                        p.display().to_string()
                    ),
                ));
            }
            if p.as_os_str().as_encoded_bytes().contains(&0) {
                return Err(err(s, k, "must not contain a NUL byte".to_owned()));
            }
            Ok(p)
        };
        let dur = |s: &str,
                   k: &str,
                   v: Option<Duration>,
                   dflt: Duration,
                   min: Duration,
                   max: Duration| {
            let v = v.unwrap_or(dflt);
            if v < min || v > max {
                return Err(err(
                    s,
                    k,
                    format!(
                        "must be between {} and {}, got {}",
                        humantime::format_duration(min),
                        humantime::format_duration(max),
                        humantime::format_duration(v)
                    ),
                ));
            }
            Ok(v)
        };

        let id = match self.agent.id {
            Some(id) => {
                check_agent_id(&id).map_err(|r| err("agent", "id", r))?;
                id
            }
            None => default_agent_id(),
        };
        let agent = AgentConfig {
            id,
            state_dir: path(
                "agent",
                "state_dir",
                self.agent.state_dir,
                PathBuf::from(DEFAULT_STATE_DIR),
            )?,
        };

        let o = self.ocserv;
        let od = OcservConfig::default();
        let ocserv = OcservConfig {
            backend: o.backend.unwrap_or(od.backend),
            control_socket: path(
                "ocserv",
                "control_socket",
                o.control_socket,
                od.control_socket,
            )?,
            occtl_path: path("ocserv", "occtl_path", o.occtl_path, od.occtl_path)?,
            request_timeout: dur(
                "ocserv",
                "request_timeout",
                o.request_timeout,
                od.request_timeout,
                MS(10),
                SECS(60),
            )?,
            reconcile_interval: dur(
                "ocserv",
                "reconcile_interval",
                o.reconcile_interval,
                od.reconcile_interval,
                MS(100),
                SECS(3600),
            )?,
            ..od
        };

        let g = self.grpc;
        let gd = GrpcConfig::default();
        let listen = g.listen.or(gd.listen);
        if listen.is_some_and(|l| !l.ip().is_loopback()) {
            return Err(err(
                "grpc",
                "listen",
                format!(
                    "plaintext gRPC is only allowed on a loopback address; mTLS is not configured yet (got {listen:?})"
                ),
            ));
        }
        let max_concurrent_requests = g
            .max_concurrent_requests
            .unwrap_or(gd.max_concurrent_requests);
        if !(1..=65536).contains(&max_concurrent_requests) {
            return Err(err(
                "grpc",
                "max_concurrent_requests",
                format!("must be between 1 and 65536, got {max_concurrent_requests}"),
            ));
        }
        let grpc = GrpcConfig {
            listen,
            max_concurrent_requests,
            request_timeout: dur(
                "grpc",
                "request_timeout",
                g.request_timeout,
                gd.request_timeout,
                MS(1),
                SECS(3600),
            )?,
            insecure: listen.is_some(),
            ..gd
        };

        let metrics = MetricsConfig {
            listen: self
                .metrics
                .listen
                .unwrap_or(MetricsConfig::default().listen),
            ..MetricsConfig::default()
        };

        let s = self.supervisor;
        let sd = SupervisorConfig::default();
        let restart_backoff_initial = dur(
            "supervisor",
            "restart_backoff_initial",
            s.restart_backoff_initial,
            sd.restart_backoff_initial,
            MS(1),
            SECS(3600),
        )?;
        let restart_backoff_max = dur(
            "supervisor",
            "restart_backoff_max",
            s.restart_backoff_max,
            sd.restart_backoff_max,
            MS(1),
            SECS(3600),
        )?;
        // The shared Backoff type is the authority on its own rules.
        if let Err(e) = Backoff::new(
            restart_backoff_initial,
            restart_backoff_max,
            RESTART_BACKOFF_MULTIPLIER,
        ) {
            let key = match e {
                crate::backoff::BackoffError::ZeroInitial => "restart_backoff_initial",
                _ => "restart_backoff_max",
            };
            let reason = match e {
                crate::backoff::BackoffError::MaxBelowInitial { initial, max } => format!(
                    "must not be below supervisor.restart_backoff_initial ({}), got {}",
                    humantime::format_duration(initial),
                    humantime::format_duration(max)
                ),
                other => other.to_string(),
            };
            return Err(err("supervisor", key, reason));
        }
        let restart_intensity = s.restart_intensity.unwrap_or(sd.restart_intensity);
        if restart_intensity == 0 {
            return Err(err(
                "supervisor",
                "restart_intensity",
                "must be at least 1, got 0".to_owned(),
            ));
        }
        let supervisor = SupervisorConfig {
            restart_backoff_initial,
            restart_backoff_max,
            restart_intensity,
            restart_window: dur(
                "supervisor",
                "restart_window",
                s.restart_window,
                sd.restart_window,
                MS(1),
                SECS(3600),
            )?,
            shutdown_grace: dur(
                "supervisor",
                "shutdown_grace",
                s.shutdown_grace,
                sd.shutdown_grace,
                MS(1),
                SECS(3600),
            )?,
            call_timeout: dur(
                "supervisor",
                "call_timeout",
                s.call_timeout,
                sd.call_timeout,
                MS(1),
                SECS(3600),
            )?,
        };

        let ld = LogConfig::default();
        let level = self.log.level.unwrap_or(ld.level).to_lowercase();
        if !["trace", "debug", "info", "warn", "error"].contains(&level.as_str()) {
            return Err(err(
                "log",
                "level",
                format!("expected one of: trace, debug, info, warn, error, got {level:?}"),
            ));
        }
        let log = LogConfig {
            level,
            format: self.log.format.unwrap_or(ld.format),
        };

        Ok(Config {
            agent,
            ocserv,
            grpc,
            metrics,
            supervisor,
            log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/agent.toml");

    /// A temp dir with `agent.toml` holding `text`; the dir lives as long as the guard.
    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// "No file anywhere", independent of the machine's /etc.
    fn no_default() -> PathBuf {
        PathBuf::from("/nonexistent/ocserv-agent-test/agent.toml")
    }

    fn load_text(text: &str, vars: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
        let (_dir, path) = file(text);
        load_from(Some(&path), &no_default(), &env(vars))
    }

    fn err_text(text: &str, vars: &[(&str, &str)]) -> ConfigError {
        match load_text(text, vars) {
            Ok(l) => panic!("expected an error, loaded {:?}", l.config),
            Err(e) => e,
        }
    }

    fn all_keys() -> Vec<String> {
        KEYS.iter()
            .map(|k| format!("{}.{}", k.section, k.key))
            .collect()
    }

    #[test]
    fn embedded_defaults_without_a_file() {
        let l = load_from(None, &no_default(), &[]).unwrap();
        assert_eq!(l.source, ConfigSource::EmbeddedDefaults);
        assert_eq!(l.defaults_used, all_keys());
        let c = &l.config;
        assert_eq!(c.agent.id, default_agent_id());
        assert!(check_agent_id(&c.agent.id).is_ok());
        assert_eq!(c.agent.state_dir, Path::new("/var/lib/ocserv-agent"));
        assert_eq!(c.ocserv.backend, BackendKind::Native);
        assert_eq!(c.ocserv.control_socket, Path::new("/var/run/occtl.socket"));
        assert_eq!(c.ocserv.occtl_path, Path::new("/usr/bin/occtl"));
        assert_eq!(c.ocserv.request_timeout, SECS(2));
        assert_eq!(c.ocserv.reconcile_interval, SECS(10));
        assert_eq!(c.grpc.listen, None);
        assert_eq!(c.grpc.max_concurrent_requests, 256);
        assert_eq!(c.grpc.request_timeout, SECS(5));
        assert_eq!(c.metrics.listen, "127.0.0.1:9102".parse().unwrap());
        assert_eq!(c.supervisor.restart_backoff_initial, MS(1));
        assert_eq!(c.supervisor.restart_backoff_max, SECS(5));
        assert_eq!(c.supervisor.restart_intensity, 5);
        assert_eq!(c.supervisor.restart_window, SECS(30));
        assert_eq!(c.supervisor.shutdown_grace, SECS(10));
        assert_eq!(c.supervisor.call_timeout, SECS(2));
        assert_eq!(c.log.level, "info");
        assert_eq!(c.log.format, LogFormat::Text);
        // The Default impls and the loader agree.
        assert_eq!(*c, Config::default());
        assert!(l.summary().contains("every key"), "{}", l.summary());
    }

    #[test]
    fn default_path_is_used_when_it_exists() {
        let (_dir, path) = file("[log]\nlevel = \"debug\"\n");
        let l = load_from(None, &path, &[]).unwrap();
        assert_eq!(l.source, ConfigSource::File(path));
        assert_eq!(l.config.log.level, "debug");
    }

    #[test]
    fn given_path_must_exist() {
        let e = load_from(Some(Path::new("/nonexistent/x.toml")), &no_default(), &[]).unwrap_err();
        assert_eq!(e.key, "/nonexistent/x.toml");
        assert!(e.reason.contains("not found"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = load_from(Some(dir.path()), &no_default(), &[]).unwrap_err();
        assert!(e.reason.contains("not a regular file"), "{e}");
    }

    #[test]
    fn example_file_loads_and_sets_every_key() {
        let l = load_text(EXAMPLE, &[]).unwrap();
        assert!(
            l.defaults_used.is_empty(),
            "example leaves keys undocumented: {:?}",
            l.defaults_used
        );
        // Apart from the hostname-derived id, the example shows the embedded defaults.
        let mut expected = Config::default();
        expected.agent.id = "ocserv-agent".to_owned();
        assert_eq!(l.config, expected);
        for k in KEYS {
            let var = env_var_name(k.section, k.key);
            assert!(EXAMPLE.contains(&var), "example does not name {var}");
        }
    }

    #[test]
    fn full_valid_file() {
        let text = r#"
            [agent]
            id = "edge-1.example_net"
            state_dir = "/srv/agent"
            [ocserv]
            backend = "occtl"
            control_socket = "/run/ocserv/occtl.socket"
            occtl_path = "/usr/local/bin/occtl"
            request_timeout = "250ms"
            reconcile_interval = "1m"
            [grpc]
            listen = "[::1]:6000"
            max_concurrent_requests = 65536
            request_timeout = "1m 30s"
            [metrics]
            listen = "0.0.0.0:9200"
            [supervisor]
            restart_backoff_initial = "10ms"
            restart_backoff_max = "10ms"
            restart_intensity = 1
            restart_window = "1h"
            shutdown_grace = "3s"
            call_timeout = "100ms"
            [log]
            level = "WARN"
            format = "json"
        "#;
        let l = load_text(text, &[]).unwrap();
        assert!(l.defaults_used.is_empty(), "{:?}", l.defaults_used);
        let c = l.config;
        assert_eq!(c.agent.id, "edge-1.example_net");
        assert_eq!(c.agent.state_dir, Path::new("/srv/agent"));
        assert_eq!(c.ocserv.backend, BackendKind::Occtl);
        assert_eq!(
            c.ocserv.control_socket,
            Path::new("/run/ocserv/occtl.socket")
        );
        assert_eq!(c.ocserv.occtl_path, Path::new("/usr/local/bin/occtl"));
        assert_eq!(c.ocserv.request_timeout, MS(250));
        assert_eq!(c.ocserv.reconcile_interval, SECS(60));
        assert_eq!(c.grpc.listen, Some("[::1]:6000".parse().unwrap()));
        assert_eq!(c.grpc.max_concurrent_requests, 65536);
        assert_eq!(c.grpc.request_timeout, SECS(90));
        assert_eq!(c.metrics.listen, "0.0.0.0:9200".parse().unwrap());
        assert_eq!(c.supervisor.restart_backoff_initial, MS(10));
        assert_eq!(c.supervisor.restart_backoff_max, MS(10));
        assert_eq!(c.supervisor.restart_intensity, 1);
        assert_eq!(c.supervisor.restart_window, SECS(3600));
        assert_eq!(c.supervisor.shutdown_grace, SECS(3));
        assert_eq!(c.supervisor.call_timeout, MS(100));
        assert_eq!(c.log.level, "warn");
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.supervisor.backoff().ceiling(3), MS(10));
    }

    #[test]
    fn partial_file_lists_only_missing_keys_and_keeps_section_defaults() {
        let l = load_text("[grpc]\nlisten = \"127.0.0.1:7000\"\n", &[]).unwrap();
        assert_eq!(
            l.config.grpc.listen,
            Some("127.0.0.1:7000".parse().unwrap())
        );
        assert_eq!(l.config.grpc.max_concurrent_requests, 256);
        assert_eq!(l.config.grpc.request_timeout, SECS(5));
        let mut expected = all_keys();
        expected.retain(|k| k != "grpc.listen");
        assert_eq!(l.defaults_used, expected);
        assert!(
            l.summary().contains("grpc.request_timeout"),
            "{}",
            l.summary()
        );
        assert!(!l.summary().contains("grpc.listen"), "{}", l.summary());

        // An empty file and an empty section are valid and leave everything at its default.
        let l = load_text("[ocserv]\n", &[]).unwrap();
        assert_eq!(l.defaults_used, all_keys());
        assert_eq!(l.config.ocserv, OcservConfig::default());
    }

    #[test]
    fn env_overrides_win_and_are_parsed() {
        let text = "[grpc]\nlisten = \"127.0.0.1:7000\"\nmax_concurrent_requests = 10\n[ocserv]\nrequest_timeout = \"1s\"\n";
        let l = load_text(
            text,
            &[
                ("OCSERV_AGENT__GRPC__LISTEN", "127.0.0.1:6000"),
                ("OCSERV_AGENT__GRPC__MAX_CONCURRENT_REQUESTS", "512"),
                ("OCSERV_AGENT__OCSERV__REQUEST_TIMEOUT", "250ms"),
                ("OCSERV_AGENT__OCSERV__BACKEND", "occtl"),
                ("OCSERV_AGENT__SUPERVISOR__RESTART_INTENSITY", "9"),
                ("OCSERV_AGENT__METRICS__LISTEN", "[::1]:9999"),
                ("OCSERV_AGENT__AGENT__ID", "From-Env"),
                // Not ours: single underscore (e.g. a CLI flag's variable) and other programs.
                ("OCSERV_AGENT_CONFIG", "/somewhere.toml"),
                ("PATH", "/usr/bin"),
            ],
        )
        .unwrap();
        let c = &l.config;
        assert_eq!(c.grpc.listen, Some("127.0.0.1:6000".parse().unwrap()));
        assert_eq!(c.grpc.max_concurrent_requests, 512);
        assert_eq!(c.ocserv.request_timeout, MS(250));
        assert_eq!(c.ocserv.backend, BackendKind::Occtl);
        assert_eq!(c.supervisor.restart_intensity, 9);
        assert_eq!(c.metrics.listen, "[::1]:9999".parse().unwrap());
        assert_eq!(c.agent.id, "From-Env");
        for k in [
            "grpc.listen",
            "grpc.max_concurrent_requests",
            "ocserv.request_timeout",
            "agent.id",
        ] {
            assert!(!l.defaults_used.iter().any(|d| d == k), "{k}");
        }
        assert!(l.defaults_used.iter().any(|d| d == "grpc.request_timeout"));

        // Overrides apply without a file too.
        let l = load_from(
            None,
            &no_default(),
            &env(&[("OCSERV_AGENT__LOG__FORMAT", "json")]),
        )
        .unwrap();
        assert_eq!(l.source, ConfigSource::EmbeddedDefaults);
        assert_eq!(l.config.log.format, LogFormat::Json);
        assert_eq!(l.defaults_used.len(), KEYS.len() - 1);
    }

    #[test]
    fn unknown_keys_and_sections_are_named() {
        let e = err_text("[grpc]\nlisen = \"127.0.0.1:1\"\n", &[]);
        assert_eq!(e.key, "grpc.lisen");
        assert_eq!(
            e.to_string(),
            "invalid configuration: grpc.lisen: unknown key (expected one of: listen, max_concurrent_requests, request_timeout)"
        );
        let e = err_text("[grpcc]\nlisten = \"127.0.0.1:1\"\n", &[]);
        assert_eq!(e.key, "grpcc");
        assert!(e.reason.contains("unknown section"), "{e}");
        let e = err_text("listen = \"127.0.0.1:1\"\n", &[]);
        assert_eq!(e.key, "listen");
        let e = err_text("[grpc.tls]\ncert = \"/x\"\n", &[]);
        assert_eq!(e.key, "grpc.tls");
        let e = err_text("grpc = 5\n", &[]);
        assert_eq!(e.key, "grpc");
        assert!(e.reason.contains("expected a table"), "{e}");
    }

    #[test]
    fn unknown_env_overrides_are_named() {
        for var in [
            "OCSERV_AGENT__GRPC__LISEN",
            "OCSERV_AGENT__NOPE__LISTEN",
            "OCSERV_AGENT__GRPC",
            "OCSERV_AGENT__GRPC__LISTEN__X",
            "OCSERV_AGENT__",
            "ocserv_agent__grpc__lisen",
        ] {
            let e = load_from(None, &no_default(), &env(&[(var, "1")])).unwrap_err();
            assert_eq!(e.key, var);
        }
        let e = load_from(
            None,
            &no_default(),
            &env(&[("OCSERV_AGENT__GRPC__LISEN", "1")]),
        )
        .unwrap_err();
        assert!(e.reason.contains("grpc.lisen"), "{e}");
        assert!(e.reason.contains("max_concurrent_requests"), "{e}");
        // The same key twice, in different case, is ambiguous.
        let e = load_from(
            None,
            &no_default(),
            &env(&[
                ("OCSERV_AGENT__LOG__LEVEL", "info"),
                ("ocserv_agent__log__level", "debug"),
            ]),
        )
        .unwrap_err();
        assert!(e.reason.contains("also set by"), "{e}");
    }

    #[test]
    fn lowercase_env_names_are_loaded_and_named_as_given() {
        let l = load_from(
            None,
            &no_default(),
            &env(&[("ocserv_agent__log__level", "debug")]),
        )
        .unwrap();
        assert_eq!(l.config.log.level, "debug");
        let e = load_from(
            None,
            &no_default(),
            &env(&[("ocserv_agent__log__level", "loud")]),
        )
        .unwrap_err();
        assert_eq!(e.key, "ocserv_agent__log__level");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[ocserv]\nrequest_timeout = 2\n",
                "ocserv.request_timeout",
                "expected a duration like \"2s\" or \"250ms\"",
            ),
            (
                "[ocserv]\nrequest_timeout = \"2 fortnights\"\n",
                "ocserv.request_timeout",
                "expected a duration like \"2s\" or \"250ms\", got string \"2 fortnights\"",
            ),
            (
                "[ocserv]\nrequest_timeout = \"2\"\n",
                "ocserv.request_timeout",
                "expected a duration",
            ),
            (
                "[grpc]\nmax_concurrent_requests = \"many\"\n",
                "grpc.max_concurrent_requests",
                "expected a whole number",
            ),
            (
                "[grpc]\nmax_concurrent_requests = -1\n",
                "grpc.max_concurrent_requests",
                "got integer -1",
            ),
            (
                "[grpc]\nmax_concurrent_requests = 1.5\n",
                "grpc.max_concurrent_requests",
                "got float 1.5",
            ),
            (
                "[grpc]\nlisten = \"localhost\"\n",
                "grpc.listen",
                "socket address",
            ),
            (
                "[metrics]\nlisten = 9102\n",
                "metrics.listen",
                "socket address",
            ),
            (
                "[ocserv]\nbackend = \"ssh\"\n",
                "ocserv.backend",
                "one of: native, occtl",
            ),
            (
                "[log]\nformat = \"xml\"\n",
                "log.format",
                "one of: text, json",
            ),
            ("[agent]\nid = 12345\n", "agent.id", "got integer 12345"),
            (
                "[agent]\nstate_dir = [\"/a\"]\n",
                "agent.state_dir",
                "got an array",
            ),
            (
                "[supervisor]\nrestart_intensity = 5000000000\n",
                "supervisor.restart_intensity",
                "whole number",
            ),
            ("[log]\nlevel = true\n", "log.level", "got boolean true"),
        ];
        for (text, key, reason) in cases {
            let e = err_text(text, &[]);
            assert_eq!(&e.key, key, "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
    }

    #[test]
    fn wrong_env_values_name_the_env_var() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "OCSERV_AGENT__OCSERV__REQUEST_TIMEOUT",
                "soon",
                "expected a duration",
            ),
            (
                "OCSERV_AGENT__GRPC__MAX_CONCURRENT_REQUESTS",
                "lots",
                "whole number",
            ),
            (
                "OCSERV_AGENT__GRPC__MAX_CONCURRENT_REQUESTS",
                "0",
                "between 1 and 65536",
            ),
            ("OCSERV_AGENT__GRPC__LISTEN", "10.0.0.1:50051", "loopback"),
            ("OCSERV_AGENT__GRPC__LISTEN", "", "got string \"\""),
            (
                "OCSERV_AGENT__OCSERV__RECONCILE_INTERVAL",
                "1ms",
                "between 100ms and 1h",
            ),
            ("OCSERV_AGENT__AGENT__STATE_DIR", "relative/dir", "absolute"),
        ];
        for (var, value, reason) in cases {
            // The file sets the same key validly: the (invalid) override must win and be named.
            let e = err_text(
                "[grpc]\nlisten = \"127.0.0.1:1\"\nmax_concurrent_requests = 5\n",
                &[(var, value)],
            );
            assert_eq!(&e.key, var, "{var}={value}: {e}");
            assert!(e.reason.contains(reason), "{var}={value}: {e}");
        }
    }

    #[test]
    fn values_out_of_range_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("[agent]\nid = \"\"\n", "agent.id", "1 to 64"),
            ("[agent]\nid = \"a/b\"\n", "agent.id", "'/'"),
            (
                &format!("[agent]\nid = \"{}\"\n", "x".repeat(65)),
                "agent.id",
                "1 to 64",
            ),
            (
                "[agent]\nstate_dir = \"var/lib\"\n",
                "agent.state_dir",
                "absolute",
            ),
            (
                "[agent]\nstate_dir = \"/a\\u0000b\"\n",
                "agent.state_dir",
                "NUL",
            ),
            (
                "[ocserv]\ncontrol_socket = \"occtl.socket\"\n",
                "ocserv.control_socket",
                "absolute",
            ),
            (
                "[ocserv]\nocctl_path = \"occtl\"\n",
                "ocserv.occtl_path",
                "absolute",
            ),
            (
                "[ocserv]\nrequest_timeout = \"0s\"\n",
                "ocserv.request_timeout",
                "between 10ms and 1m",
            ),
            (
                "[ocserv]\nrequest_timeout = \"61s\"\n",
                "ocserv.request_timeout",
                "got 1m 1s",
            ),
            (
                "[ocserv]\nreconcile_interval = \"99ms\"\n",
                "ocserv.reconcile_interval",
                "between 100ms and 1h",
            ),
            (
                "[ocserv]\nreconcile_interval = \"2h\"\n",
                "ocserv.reconcile_interval",
                "between",
            ),
            (
                "[grpc]\nlisten = \"0.0.0.0:50051\"\n",
                "grpc.listen",
                "plaintext gRPC is only allowed on a loopback address; mTLS is not configured yet",
            ),
            (
                "[grpc]\nlisten = \"[::]:50051\"\n",
                "grpc.listen",
                "loopback",
            ),
            (
                "[grpc]\nmax_concurrent_requests = 0\n",
                "grpc.max_concurrent_requests",
                "between 1 and 65536",
            ),
            (
                "[grpc]\nmax_concurrent_requests = 65537\n",
                "grpc.max_concurrent_requests",
                "between 1 and 65536",
            ),
            (
                "[grpc]\nrequest_timeout = \"0s\"\n",
                "grpc.request_timeout",
                "between",
            ),
            (
                "[supervisor]\nrestart_backoff_initial = \"0s\"\n",
                "supervisor.restart_backoff_initial",
                "between",
            ),
            (
                "[supervisor]\nrestart_backoff_initial = \"2s\"\nrestart_backoff_max = \"1s\"\n",
                "supervisor.restart_backoff_max",
                "must not be below supervisor.restart_backoff_initial (2s), got 1s",
            ),
            (
                "[supervisor]\nrestart_intensity = 0\n",
                "supervisor.restart_intensity",
                "at least 1",
            ),
            (
                "[supervisor]\nrestart_window = \"0s\"\n",
                "supervisor.restart_window",
                "between",
            ),
            (
                "[supervisor]\nshutdown_grace = \"0s\"\n",
                "supervisor.shutdown_grace",
                "between",
            ),
            (
                "[supervisor]\ncall_timeout = \"2h\"\n",
                "supervisor.call_timeout",
                "between",
            ),
            (
                "[log]\nlevel = \"verbose\"\n",
                "log.level",
                "trace, debug, info, warn, error",
            ),
        ];
        for (text, key, reason) in cases {
            let e = err_text(text, &[]);
            assert_eq!(&e.key, key, "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
    }

    #[test]
    fn malformed_toml_names_file_and_position() {
        let (_dir, path) =
            file("[grpc]\nlisten = \"127.0.0.1:1\"\nmax_concurrent_requests = = 3\n");
        let e = load_from(Some(&path), &no_default(), &[]).unwrap_err();
        assert_eq!(e.key, path.display().to_string());
        assert!(e.reason.starts_with("malformed TOML"), "{e}");
        assert!(e.reason.contains("line 3"), "{e}");
        assert!(e.reason.contains("column"), "{e}");
        // Duplicate keys are a TOML error too, not a silent "last one wins".
        let e = err_text("[log]\nlevel = \"info\"\nlevel = \"debug\"\n", &[]);
        assert!(e.reason.contains("line 3"), "{e}");
    }

    #[test]
    fn error_display_format() {
        let e = ConfigError::new(
            "ocserv.reconcile_interval",
            "must be between 100ms and 1h, got 2h",
        );
        assert_eq!(
            e.to_string(),
            "invalid configuration: ocserv.reconcile_interval: must be between 100ms and 1h, got 2h"
        );
        assert_eq!(EXIT_CONFIG, 64);
    }

    #[test]
    fn backoff_from_hand_built_values_never_fails() {
        let s = SupervisorConfig {
            restart_backoff_initial: Duration::ZERO,
            restart_backoff_max: Duration::ZERO,
            ..SupervisorConfig::default()
        };
        assert_eq!(s.backoff().ceiling(10), MS(1));
        let d = SupervisorConfig::default().backoff();
        assert_eq!(d.ceiling(0), MS(1));
        assert_eq!(d.ceiling(1), MS(2));
        assert_eq!(d.ceiling(30), SECS(5));
    }

    #[test]
    fn render_round_trips_and_marks_defaults() {
        let keys: Vec<String> = Config::default()
            .entries()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, all_keys());

        let text = "[grpc]\nlisten = \"[::1]:7000\"\n[agent]\nid = \"a-1\"\nstate_dir = \"/srv/x \\\"q\\\"\"\n[supervisor]\nrestart_window = \"1m 30s\"\n";
        let l = load_text(text, &[("OCSERV_AGENT__LOG__FORMAT", "json")]).unwrap();
        assert_eq!(l.config.agent.state_dir, Path::new("/srv/x \"q\""));
        let rendered = l.render();
        assert!(rendered.contains("listen = \"[::1]:7000\"\n"), "{rendered}");
        assert!(
            rendered.contains("listen = \"127.0.0.1:9102\"  # default"),
            "{rendered}"
        );
        assert!(
            rendered.contains("restart_window = \"1m 30s\"\n"),
            "{rendered}"
        );
        let again = load_text(&rendered, &[]).unwrap();
        assert_eq!(again.config, l.config);
        assert!(again.defaults_used.is_empty());

        let d = l.describe_defaults();
        assert!(
            d.contains(&"grpc.request_timeout = \"5s\"".to_owned()),
            "{d:?}"
        );
        assert!(!d.iter().any(|x| x.starts_with("grpc.listen")), "{d:?}");
        assert!(!d.iter().any(|x| x.starts_with("log.format")), "{d:?}");
        assert_eq!(d.len(), l.defaults_used.len());
    }

    #[test]
    fn env_var_names() {
        assert_eq!(env_var_name("grpc", "listen"), "OCSERV_AGENT__GRPC__LISTEN");
        assert_eq!(
            env_var_name("ocserv", "request_timeout"),
            "OCSERV_AGENT__OCSERV__REQUEST_TIMEOUT"
        );
    }
}

/// What a SIGHUP changes: keys applied live, keys that need a restart.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub applied: Vec<&'static str>,
    pub need_restart: Vec<String>,
}

/// Keys a SIGHUP applies without a restart.
pub const LIVE_KEYS: [&str; 6] = [
    "log.level",
    "ocserv.reconcile_interval",
    "ocserv.request_timeout",
    "grpc.request_timeout",
    "supervisor.call_timeout",
    "supervisor.shutdown_grace",
];

pub fn live_changes(old: &Config, new: &Config) -> Changes {
    let (o, n) = (old.entries(), new.entries());
    let mut c = Changes::default();
    for ((k, a), (_, b)) in o.iter().zip(n.iter()) {
        if a != b {
            match LIVE_KEYS.iter().find(|l| **l == k.as_str()) {
                Some(l) => c.applied.push(l),
                None => c.need_restart.push(k.clone()),
            }
        }
    }
    c
}

/// `old` with the live keys taken from `new`.
pub fn with_live_keys(old: &Config, new: &Config) -> Config {
    let mut c = old.clone();
    c.log.level = new.log.level.clone();
    c.ocserv.reconcile_interval = new.ocserv.reconcile_interval;
    c.ocserv.request_timeout = new.ocserv.request_timeout;
    c.grpc.request_timeout = new.grpc.request_timeout;
    c.supervisor.call_timeout = new.supervisor.call_timeout;
    c.supervisor.shutdown_grace = new.supervisor.shutdown_grace;
    c
}
