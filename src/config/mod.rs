//! Agent configuration: load, check and type it before anything starts (DESIGN §8).
//!
//! Inputs: an optional TOML file (by default [`DEFAULT_PATH`]) and environment overrides named
//! `OCSERV_AGENT__<SECTION>__<KEY>`, which win over the file. Each section is one `section!` in
//! its own file, where each key is written once (doc comment, type, default, range), followed by
//! the rules that span keys. Serde loads it (`deny_unknown_fields`) and prints it; the key list,
//! the type of an environment value and the keys a reload changed come from [`Config::entries`].
//!
//! The `config` crate reads the file and layers the overrides on it; the merged tree is then
//! deserialized strictly (a TOML integer is not a string). Environment values are strings, typed
//! like the key's default: numbers, booleans, comma-separated lists.
//!
//! A section may hold one level of subtables (`[portal.breaker]`): their keys are named
//! `portal.breaker.open_for` and overridden by `OCSERV_AGENT__PORTAL__BREAKER__OPEN_FOR`.
//!
//! Output: a [`Loaded`]: the validated [`Config`], its source, the keys left at their default.
//! Failure: one [`ConfigError`] naming the dotted key (`ocserv.request_timeout`), the environment
//! variable when the value came from there, or the file for file-level problems, and the reason;
//! the binary exits with [`EXIT_CONFIG`]. Nothing panics on outside input. [`load`] re-validates
//! from scratch (SIGHUP); [`live_changes`] says what of a difference applies without a restart.

/// One `[section]`, named by its table: each key with its doc comment (required), serde
/// attributes, type, default and optional range: `key: Type = default,` or `key: Type = default,
/// in lo..=hi,`. Builds the struct, its `Default`, and `validate`: the ranges (errors name
/// `section.key`), then the section's own `rules`.
macro_rules! section {
    ($section:literal => $(#[$m:meta])* pub struct $name:ident {
        $($(#[$a:meta])+ $key:ident: $ty:ty = $default:expr $(, in $range:expr)?,)*
    }) => {
        #[doc = concat!("The `[", $section, "]` table.")]
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name { $($(#[$a])* pub $key: $ty,)* }

        impl Default for $name {
            fn default() -> Self {
                Self { $($key: $default,)* }
            }
        }

        impl $name {
            /// Every check of the section: the ranges of its keys, then its other rules.
            pub fn validate(&self) -> Result<(), ConfigError> {
                $($(in_range(concat!($section, ".", stringify!($key)), self.$key, $range)?;)?)*
                self.rules()
            }
        }
    };
}

mod agent;
mod config_writer;
mod grpc;
mod hook;
mod local_policy;
mod log;
mod metrics;
mod ocserv;
mod policy;
mod portal;
mod supervisor;

use std::collections::BTreeMap;
use std::fmt;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Durations read and written in human form ("250ms", "1m 30s"): `#[serde(with = "human")]`.
use humantime_serde as human;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value as Json};

pub use agent::{default_agent_id, AgentConfig};
pub use config_writer::ConfigWriterConfig;
pub use grpc::GrpcConfig;
pub use hook::{HookConfig, HOOK_PROGRAM_DEADLINE};
pub use local_policy::LocalPolicyConfig;
pub use log::{LogConfig, LogFormat};
pub use metrics::MetricsConfig;
pub use ocserv::OcservConfig;
pub use policy::{PolicyConfig, PolicySource};
pub use portal::{Fraction, PortalBreakerConfig, PortalConfig};
pub use supervisor::{SupervisorConfig, RESTART_BACKOFF_MULTIPLIER};

/// Process exit code for an invalid configuration (`EX_CONFIG` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;
/// Where the agent looks for its configuration when no path is given.
pub const DEFAULT_PATH: &str = "/etc/ocserv-agent/agent.toml";
/// Prefix of environment overrides; the full name is `OCSERV_AGENT__<SECTION>__<KEY>`.
pub const ENV_PREFIX: &str = "OCSERV_AGENT";
/// Separator between prefix, section and key in environment override names.
pub const ENV_SEPARATOR: &str = "__";
/// Keys a running agent can apply on SIGHUP; a change to any other key needs a restart.
///
/// A live key is one the agent reads where it uses it (a deadline, a lifetime, a path read at
/// each reload), never one that shaped something built once (a socket, a TLS client, a
/// directory written at start). No rule spans a live key and a restart-only one (except that
/// both live timeouts of the hook/portal rule are live together), so the mix of running and
/// new values that [`with_live_keys`] makes always passes [`Config::validate`].
pub const LIVE_KEYS: &[&str] = &[
    "log.level",
    "ocserv.reconcile_interval",
    "ocserv.request_timeout",
    "grpc.request_timeout",
    "supervisor.call_timeout",
    "supervisor.shutdown_grace",
    "hook.request_timeout",
    "policy.fail_mode",
    "policy.allow_ttl",
    "policy.deny_ttl",
    "policy.stale_for",
    "local_policy.path",
    "portal.call_timeout",
    "portal.session_update_interval",
    "portal.validate_interval",
    "portal.outbox_capacity",
    "config_writer.backups",
];

/// An invalid configuration: which key (dotted, env var name, or file path) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        let (key, reason) = (key.into(), reason.into());
        Self { key, reason }
    }
}

/// `Err` naming `key` and the reason.
fn fail<T>(key: impl Into<String>, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::new(key, reason))
}

/// The whole typed configuration, one field per `[section]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    pub ocserv: OcservConfig,
    pub grpc: GrpcConfig,
    pub metrics: MetricsConfig,
    pub supervisor: SupervisorConfig,
    pub log: LogConfig,
    pub hook: HookConfig,
    pub policy: PolicyConfig,
    pub local_policy: LocalPolicyConfig,
    pub portal: PortalConfig,
    pub config_writer: ConfigWriterConfig,
}

impl Config {
    /// Every section's checks, then the rules that span sections; the first failure names its
    /// dotted key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.agent.validate()?;
        self.ocserv.validate()?;
        self.grpc.validate()?;
        self.metrics.validate()?;
        self.supervisor.validate()?;
        self.log.validate()?;
        self.hook.validate()?;
        self.policy.validate()?;
        self.local_policy.validate()?;
        self.portal.validate()?;
        self.config_writer.validate()?;
        self.cross_rules()
    }

    /// Rules between sections.
    fn cross_rules(&self) -> Result<(), ConfigError> {
        if self.policy.source == PolicySource::Portal && self.portal.endpoint.is_none() {
            return fail(
                "portal.endpoint",
                "required when policy.source = \"portal\"",
            );
        }
        // The portal's failure must be known while the hook's request can still be answered
        // (from the fail mode); checked whatever the source, so that a reload swapping only
        // the live timeouts can never make an invalid mix.
        let (call, request) = (self.portal.call_timeout, self.hook.request_timeout);
        if call >= request {
            let (c, r) = (call.show(), request.show());
            let why = format!("must be below hook.request_timeout ({r}), got {c}");
            return fail("portal.call_timeout", why);
        }
        if self.hook.socket == self.grpc.socket {
            let why = format!(
                "must differ from grpc.socket ({})",
                self.grpc.socket.display()
            );
            return fail("hook.socket", why);
        }
        Ok(())
    }

    /// Every key as `section.key` (or `section.subtable.key`) with its value, sorted; `null`
    /// for an unset optional key.
    pub fn entries(&self) -> BTreeMap<String, Json> {
        fn walk(prefix: &str, value: &Json, out: &mut BTreeMap<String, Json>) {
            match value {
                Json::Object(table) => {
                    for (k, v) in table {
                        walk(&join(prefix, k), v, out);
                    }
                }
                v => {
                    out.insert(prefix.to_owned(), v.clone());
                }
            }
        }
        let mut out = BTreeMap::new();
        if let Ok(tree) = serde_json::to_value(self) {
            walk("", &tree, &mut out);
        }
        out
    }
}

/// `prefix.key`, or `key` at the top.
fn join(prefix: &str, key: &str) -> String {
    match prefix {
        "" => key.to_owned(),
        p => format!("{p}.{key}"),
    }
}

/// The value at a dotted path (`portal.breaker.open_for`) of a tree.
fn lookup<'a>(tree: &'a Json, dotted: &str) -> Option<&'a Json> {
    dotted.split('.').try_fold(tree, |t, part| t.get(part))
}

/// [`lookup`], mutable.
fn lookup_mut<'a>(tree: &'a mut Json, dotted: &str) -> Option<&'a mut Json> {
    dotted.split('.').try_fold(tree, |t, part| t.get_mut(part))
}

/// What a reload changed: dotted keys a running agent applies, and those that need a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub applied: Vec<String>,
    pub need_restart: Vec<String>,
}

/// The keys whose value differs between `old` and `new`, split by [`LIVE_KEYS`].
pub fn live_changes(old: &Config, new: &Config) -> Changes {
    let old = old.entries();
    let mut changes = Changes::default();
    let changed = |(k, v): &(String, Json)| old.get(k) != Some(v);
    for (key, _) in new.entries().into_iter().filter(changed) {
        match LIVE_KEYS.contains(&key.as_str()) {
            true => changes.applied.push(key),
            false => changes.need_restart.push(key),
        }
    }
    changes
}

/// `old` with the [`LIVE_KEYS`] taken from `new`: what a running agent switches to on SIGHUP
/// (every other key keeps its running value until a restart).
pub fn with_live_keys(old: &Config, new: &Config) -> Config {
    let (Ok(mut tree), Ok(fresh)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return old.clone();
    };
    for key in LIVE_KEYS {
        if let (Some(slot), Some(value)) = (lookup_mut(&mut tree, key), lookup(&fresh, key)) {
            *slot = value.clone();
        }
    }
    serde_json::from_value(tree).unwrap_or_else(|_| old.clone())
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
    /// Dotted keys that took their embedded default, sorted.
    pub defaults_used: Vec<String>,
}

impl Loaded {
    /// One line for the startup log: the source and the keys left at their defaults.
    pub fn summary(&self) -> String {
        let list = self.defaults_used.join(", ");
        let defaults = match self.defaults_used.len() {
            0 => "no embedded defaults used".to_owned(),
            n if n == self.config.entries().len() => "embedded defaults used for every key".into(),
            _ => format!("embedded defaults used for: {list}"),
        };
        format!("configuration from {}; {defaults}", self.source)
    }

    /// One `key = value` line per key that took its embedded default, for the startup log.
    pub fn describe_defaults(&self) -> Vec<String> {
        let entries = self.config.entries().into_iter();
        let used = entries.filter(|(k, _)| self.defaults_used.contains(k));
        used.map(|(k, v)| format!("{k} = {}", toml_value(&v)))
            .collect()
    }

    /// The effective configuration as a TOML document (for `check-config`): a header naming the
    /// source, then every key with its value, defaults marked. Loading it gives the same config.
    pub fn render(&self) -> String {
        // A path could hold a newline; keep the header one comment line.
        let mut out = format!("# {}\n", self.summary().replace('\n', " "));
        // Grouped by table: `[portal]`'s own keys must come before `[portal.breaker]`, which
        // sorts first among the dotted keys but after `portal` among table names.
        let mut tables: BTreeMap<&str, Vec<(&str, &String, &Json)>> = BTreeMap::new();
        let entries = self.config.entries();
        for (dotted, value) in &entries {
            let (table, key) = dotted.rsplit_once('.').unwrap_or_default();
            tables.entry(table).or_default().push((key, dotted, value));
        }
        for (table, keys) in tables {
            out += &format!("\n[{table}]\n");
            for (key, dotted, value) in keys {
                let mark = ["", "  # default"][usize::from(self.defaults_used.contains(dotted))];
                out += &match value {
                    Json::Null => format!("# {key} is not set{mark}\n"),
                    v => format!("{key} = {}{mark}\n", toml_value(v)),
                };
            }
        }
        out
    }
}

/// A value in TOML syntax: JSON strings, numbers and arrays are TOML, once DEL is escaped.
fn toml_value(v: &Json) -> String {
    match v {
        Json::Null => "(not set)".to_owned(),
        v => v.to_string().replace('\u{7f}', "\\u007f"),
    }
}

/// The env var of a key: `ocserv.request_timeout` → `OCSERV_AGENT__OCSERV__REQUEST_TIMEOUT`;
/// a dot in `section` or `key` (a subtable) becomes a separator too: `("portal",
/// "breaker.open_for")` → `OCSERV_AGENT__PORTAL__BREAKER__OPEN_FOR`.
pub fn env_var_name(section: &str, key: &str) -> String {
    let upper = |s: &str| s.to_uppercase().replace('.', ENV_SEPARATOR);
    let (s, k) = (upper(section), upper(key));
    format!("{ENV_PREFIX}{ENV_SEPARATOR}{s}{ENV_SEPARATOR}{k}")
}

/// Load from `path` (which must exist), or with `None` from [`DEFAULT_PATH`] when it exists and
/// embedded defaults otherwise. Environment overrides from the process environment always apply.
pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
    let mut env = Vec::new();
    // Names that are not Unicode cannot carry our prefix in a form we could parse: skipped.
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => env.push((name, value)),
            (Ok(name), Err(_)) if env_key(&name).is_some() => {
                return fail(name, "value is not valid UTF-8")
            }
            _ => {}
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
#[doc(hidden)]
pub fn load_from(
    path: Option<&Path>,
    default: &Path,
    env: &[(String, String)],
) -> Result<Loaded, ConfigError> {
    let defaults = Config::default().entries();
    let overrides = env_overrides(env, &defaults)?;
    // Only "exists" decides: an unreadable default file is an error, not a silent fallback.
    let file = path.or_else(|| default.exists().then_some(default));
    let mut builder = ::config::Config::builder();
    if let Some(p) = file {
        check_file(p)?;
        let source = ::config::File::from(p).format(::config::FileFormat::Toml);
        builder = builder.add_source(source.required(true));
    }
    for (dotted, (var, value)) in &overrides {
        let set = builder.set_override(dotted, value.as_str());
        builder = set.map_err(|e| ConfigError::new(var, e.to_string()))?;
    }
    let built = builder.build().map_err(|e| build_error(file, e))?;
    let tree = ::config::Source::collect(&built).map_err(|e| build_error(file, e))?;
    let tree: Map<String, Json> = tree.into_iter().map(|(k, v)| (k, to_json(v))).collect();
    let mut tree = Json::Object(tree);
    for (dotted, (_, raw)) in &overrides {
        let (table, key) = dotted.rsplit_once('.').unwrap_or_default();
        if let Some(table) = lookup_mut(&mut tree, table).and_then(Json::as_object_mut) {
            table.insert(key.into(), coerce(raw, &defaults[dotted]));
        }
    }

    let name = |key: String| overrides.get(&key).map_or(key, |(var, _)| var.clone());
    let config: Config = serde_json::from_value(tree.clone()).map_err(|e| {
        let found = tree.as_object().and_then(|t| culprit("", t, &defaults));
        let (key, why) = found.unwrap_or(("config".into(), e.to_string()));
        ConfigError::new(name(key), why)
    })?;
    config
        .validate()
        .map_err(|e| ConfigError::new(name(e.key), e.reason))?;
    let set = |dotted: &String| lookup(&tree, dotted).is_some();
    let defaults_used = defaults.into_keys().filter(|k| !set(k)).collect();
    let source = file.map(|p| ConfigSource::File(p.into()));
    let source = source.unwrap_or(ConfigSource::EmbeddedDefaults);
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
        Ok(_) => fail(key, "not a regular file"),
        Err(e) if e.kind() == ErrorKind::NotFound => fail(key, "configuration file not found"),
        Err(e) => fail(key, format!("cannot read: {e}")),
    }
}

/// Errors of the `config` crate while loading: only the file can fail there (the overrides were
/// checked before), so they are named by the file path.
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

/// The part of an override's name after `OCSERV_AGENT__`, lowercased; `None` when not ours.
/// Matched case-insensitively, like the config crate does.
fn env_key(var: &str) -> Option<String> {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase();
    var.to_lowercase().strip_prefix(&prefix).map(str::to_owned)
}

/// Checked environment overrides: dotted key → (variable, value). The names are checked here:
/// the `config` crate lowercases them and would silently ignore a misspelt one.
type Overrides = BTreeMap<String, (String, String)>;

/// Every key as `section.key` with its default value: what names a key.
type Keys = BTreeMap<String, Json>;

fn env_overrides(env: &[(String, String)], keys: &Keys) -> Result<Overrides, ConfigError> {
    let mut out = Overrides::new();
    for (var, value) in env {
        let Some(rest) = env_key(var) else { continue };
        if !rest.contains(ENV_SEPARATOR) {
            let form = env_var_name("<section>", "<key>");
            return fail(var, format!("environment overrides are named {form}"));
        }
        let dotted = rest.replace(ENV_SEPARATOR, ".");
        if !keys.contains_key(&dotted) {
            let table = || format!("a table, not a key: set its keys one by one ({var}__<KEY>)");
            let why = unknown(keys, &dotted).unwrap_or_else(table);
            return fail(var, format!("{dotted}: {why}"));
        }
        if let Some((other, _)) = out.get(&dotted) {
            return fail(var, format!("{dotted} is also set by {other}; set it once"));
        }
        out.insert(dotted, (var.clone(), value.clone()));
    }
    Ok(out)
}

/// Whether `name` is a section or a subtable (some key lies under it).
fn is_table(keys: &Keys, name: &str) -> bool {
    let under = |k: &&String| k.strip_prefix(name).is_some_and(|r| r.starts_with('.'));
    keys.keys().any(|k| under(&k))
}

/// Why `name` (a section, subtable or key) names nothing, with what the closest known table
/// holds (its keys and subtables), or the sections when not even its first part is known.
fn unknown(keys: &Keys, name: &str) -> Option<String> {
    if keys.contains_key(name) || is_table(keys, name) {
        return None;
    }
    let mut parent = name;
    let table = loop {
        match parent.rsplit_once('.') {
            Some((p, _)) if is_table(keys, p) => break Some(p),
            Some((p, _)) => parent = p,
            None => break None,
        }
    };
    fn child<'k>(table: Option<&str>, k: &'k str) -> Option<&'k str> {
        let rest = match table {
            Some(t) => k.strip_prefix(t)?.strip_prefix('.')?,
            None => k,
        };
        rest.split('.').next()
    }
    let known: std::collections::BTreeSet<&str> =
        keys.keys().filter_map(|k| child(table, k)).collect();
    let what = ["section", "key"][usize::from(table.is_some())];
    let known = known.into_iter().collect::<Vec<_>>().join(", ");
    Some(format!("unknown {what} (expected one of: {known})"))
}

/// A `config` crate value as JSON, keeping its type.
fn to_json(v: ::config::Value) -> Json {
    use ::config::ValueKind as K;
    match v.kind {
        K::Nil => Json::Null,
        K::Boolean(b) => b.into(),
        K::I64(i) => i.into(),
        K::U64(u) => u.into(),
        K::I128(i) => i64::try_from(i).map_or_else(|_| i.to_string().into(), Json::from),
        K::U128(u) => u64::try_from(u).map_or_else(|_| u.to_string().into(), Json::from),
        // TOML allows nan and inf, JSON does not: kept as a string, refused by type later.
        K::Float(f) => serde_json::Number::from_f64(f).map_or(f.to_string().into(), Json::Number),
        K::String(s) => s.into(),
        K::Table(t) => Json::Object(t.into_iter().map(|(k, v)| (k, to_json(v))).collect()),
        K::Array(a) => a.into_iter().map(to_json).collect(),
    }
}

/// An environment value typed like the key's default: numbers and booleans parsed, lists split
/// on commas; anything unparsable stays a string, for deserialization to refuse by name.
fn coerce(raw: &str, default: &Json) -> Json {
    match default {
        Json::Array(_) if raw.trim().is_empty() => Json::Array(Vec::new()),
        Json::Array(items) => {
            let item = items.first().unwrap_or(&Json::Null);
            raw.split(',').map(|s| coerce(s.trim(), item)).collect()
        }
        Json::Bool(_) | Json::Number(_) => match serde_json::from_str(&raw.to_lowercase()) {
            Ok(v @ (Json::Bool(_) | Json::Number(_))) => v,
            _ => raw.into(),
        },
        _ => raw.into(),
    }
}

/// The first (sorted) section, subtable or key under `prefix` whose value alone fails to
/// deserialize, and why: the deepest one, so a bad key in a subtable is named itself.
fn culprit(prefix: &str, table: &Map<String, Json>, keys: &Keys) -> Option<(String, String)> {
    // A config holding only `value` at `dotted`.
    let fails = |dotted: &str, value: &Json| {
        let wrap = |v, part: &str| Json::Object(Map::from_iter([(part.to_owned(), v)]));
        let alone = dotted.rsplit('.').fold(value.clone(), wrap);
        serde_json::from_value::<Config>(alone).err()
    };
    for (key, value) in table {
        let dotted = join(prefix, key);
        if let Some(why) = unknown(keys, &dotted) {
            return Some((dotted, why));
        }
        let Some(e) = fails(&dotted, value) else {
            continue;
        };
        if let Json::Object(inner) = value {
            if let Some(found) = culprit(&dotted, inner, keys) {
                return Some(found);
            }
        }
        return Some((dotted, reason(&e, value)));
    }
    None
}

/// serde's "invalid type: X, expected Y" as "expected Y, got X", in the operator's words.
fn reason(e: &serde_json::Error, got: &Json) -> String {
    let got = match got {
        Json::Null => "nothing".to_owned(),
        Json::Bool(b) => format!("boolean {b}"),
        Json::Number(n) if n.is_f64() => format!("float {n}"),
        Json::Number(n) => format!("integer {n}"),
        Json::String(s) if s.chars().count() > 80 => {
            format!("string {:?}...", s.chars().take(80).collect::<String>())
        }
        Json::String(s) => format!("string {s:?}"),
        Json::Array(_) => "an array".to_owned(),
        Json::Object(_) => "a table".to_owned(),
    };
    let msg = e.to_string();
    let expected = match msg.split_once(", expected ") {
        Some((head, list)) if head.starts_with("unknown variant") => {
            let list = list.trim_start_matches("one of ").replace("` or `", ", ");
            format!("one of: {}", list.replace('`', ""))
        }
        Some((_, "a duration")) => "a duration like \"2s\" or \"250ms\"".to_owned(),
        Some((_, "usize" | "u32" | "u64")) => "a whole number".to_owned(),
        Some((_, "f64")) => "a number".to_owned(),
        Some((_, "path string")) => "an absolute path".to_owned(),
        Some((_, what)) if what.starts_with("struct ") => "a table".to_owned(),
        Some((_, what)) => what.to_owned(),
        None => return format!("{msg}, got {got}"),
    };
    format!("expected {expected}, got {got}")
}

/// `key` must be an absolute path without NUL bytes.
fn absolute(key: &str, p: &Path) -> Result<(), ConfigError> {
    if !p.is_absolute() {
        let got = p.display().to_string();
        return fail(key, format!("must be an absolute path, got {got:?}"));
    }
    match p.as_os_str().as_encoded_bytes().contains(&0) {
        true => fail(key, "must not contain a NUL byte"),
        false => Ok(()),
    }
}

/// A key type that can carry a range in [`section!`]; `show` is how a value reads in an error.
trait Ranged: PartialOrd + Copy + fmt::Debug {
    fn show(self) -> String {
        format!("{self:?}")
    }
}

impl Ranged for u32 {}
impl Ranged for usize {}
impl Ranged for Duration {
    fn show(self) -> String {
        humantime::format_duration(self).to_string()
    }
}

/// `key` must lie in `range`: "must be between X and Y, got Z".
fn in_range<T: Ranged>(key: &str, v: T, range: RangeInclusive<T>) -> Result<(), ConfigError> {
    let (lo, hi, got) = (range.start().show(), range.end().show(), v.show());
    match range.contains(&v) {
        true => Ok(()),
        false => fail(key, format!("must be between {lo} and {hi}, got {got}")),
    }
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
