//! The configuration loader through its public API: defaults, file, environment overrides, and
//! an error naming the key (or the variable, or the file) for every kind of bad input. Hermetic:
//! every load gets an explicit environment and a default path that does not exist.

use std::path::Path;
use std::time::Duration;

use ocserv_agent::config::*;
use ocserv_agent::ocserv::BackendKind;

const EXAMPLE: &str = include_str!("../examples/agent.toml");

/// "No file anywhere", independent of the machine's /etc; tests never read the process env.
const NO_DEFAULT: &str = "/nonexistent/ocserv-agent-test/agent.toml";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load_env(vars: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
    load_from(None, Path::new(NO_DEFAULT), &env(vars))
}

/// Loads `text` from a temporary `agent.toml`, with `vars` as the environment.
fn load_text(text: &str, vars: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    load_from(Some(&path), Path::new(NO_DEFAULT), &env(vars))
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn all_keys() -> Vec<String> {
    Config::default().entries().into_keys().collect()
}

/// Each case (file text, expected key, part of the reason) fails with that key and reason.
fn assert_errors(vars: &[(&str, &str)], cases: &[(&str, &str, &str)]) {
    for (text, key, reason) in cases {
        let e = load_text(text, vars).map(|l| l.config).unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.reason.contains(reason)),
            (*key, true),
            "{text} {vars:?}: {e}"
        );
    }
}

#[test]
fn embedded_defaults_without_a_file() {
    let l = load_env(&[]).unwrap();
    assert_eq!(l.source, ConfigSource::EmbeddedDefaults);
    assert_eq!(l.defaults_used, all_keys());
    assert_eq!(l.config.agent.id, default_agent_id());
    assert_eq!(l.config.agent.validate(), Ok(()), "the default id is valid");
    // The loader and the Default impls agree; the example test below pins every value.
    assert_eq!(l.config, Config::default());
    assert!(l.summary().contains("every key"), "{}", l.summary());
}

#[test]
fn default_path_is_used_when_it_exists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "[log]\nlevel = \"debug\"\n").unwrap();
    let l = load_from(None, &path, &[]).unwrap();
    assert_eq!(
        (l.source, l.config.log.level.as_str()),
        (ConfigSource::File(path), "debug")
    );
}

#[test]
fn given_path_must_exist() {
    let e = load_from(
        Some(Path::new("/nonexistent/x.toml")),
        Path::new(NO_DEFAULT),
        &[],
    );
    let e = e.unwrap_err();
    assert_eq!(e.key, "/nonexistent/x.toml");
    assert!(e.reason.contains("not found"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = load_from(Some(dir.path()), Path::new(NO_DEFAULT), &[]).unwrap_err();
    assert!(e.reason.contains("not a regular file"), "{e}");
}

#[test]
fn example_file_loads_and_sets_every_key() {
    let l = load_text(EXAMPLE, &[]).unwrap();
    // Optional keys (unset by default) are shown commented out; every other key is set.
    let entries = Config::default().entries().into_iter();
    let optional: Vec<String> = entries
        .filter(|(_, v)| v.is_null())
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        l.defaults_used, optional,
        "example leaves keys undocumented"
    );
    // Apart from the hostname-derived id, the example shows the embedded defaults.
    let mut expected = Config::default();
    expected.agent.id = "ocserv-agent".to_owned();
    assert_eq!(l.config, expected);
    for key in all_keys() {
        let var = env_var_name(
            key.split_once('.').unwrap().0,
            key.split_once('.').unwrap().1,
        );
        assert!(EXAMPLE.contains(&var), "example does not name {var}");
    }
}

#[rustfmt::skip]
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
        max_in_flight = 64
        max_queued = 0
        [grpc]
        socket = "/run/a/b.sock"
        allowed_uids = [0, 1000]
        listen = "[::1]:6000"
        insecure = true
        max_connections = 10
        idle_timeout = "1d"
        max_streams_per_connection = 1024
        read_timeout = "100ms"
        keepalive_interval = "1h"
        keepalive_timeout = "1s"
        max_concurrent_requests = 65536
        request_timeout = "1m 30s"
        [metrics]
        listen = "0.0.0.0:9200"
        allow_non_loopback = true
        max_connections = 1
        idle_timeout = "1s"
        header_timeout = "5m"
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
    let (a, o, g, m, s) = (&c.agent, &c.ocserv, &c.grpc, &c.metrics, &c.supervisor);
    assert_eq!((a.id.as_str(), a.state_dir.to_str()), ("edge-1.example_net", Some("/srv/agent")));
    assert_eq!((o.backend, o.control_socket.to_str()), (BackendKind::Occtl, Some("/run/ocserv/occtl.socket")));
    assert_eq!((o.occtl_path.to_str(), o.request_timeout, o.reconcile_interval), (Some("/usr/local/bin/occtl"), ms(250), secs(60)));
    assert_eq!((o.max_in_flight, o.max_queued), (64, 0));
    assert_eq!((g.socket.to_str(), g.allowed_uids.as_slice()), (Some("/run/a/b.sock"), &[0, 1000][..]));
    assert_eq!((g.listen, g.insecure), (Some("[::1]:6000".parse().unwrap()), true));
    assert_eq!((g.max_connections, g.idle_timeout, g.max_streams_per_connection), (10, secs(86_400), 1024));
    assert_eq!((g.read_timeout, g.keepalive_interval, g.keepalive_timeout), (ms(100), secs(3600), secs(1)));
    assert_eq!((g.max_concurrent_requests, g.request_timeout), (65536, secs(90)));
    assert_eq!((m.listen, m.allow_non_loopback), ("0.0.0.0:9200".parse().unwrap(), true));
    assert_eq!((m.max_connections, m.idle_timeout, m.header_timeout), (1, secs(1), secs(300)));
    assert_eq!((s.restart_backoff_initial, s.restart_backoff_max, s.restart_intensity), (ms(10), ms(10), 1));
    assert_eq!((s.restart_window, s.shutdown_grace, s.call_timeout), (secs(3600), secs(3), ms(100)));
    assert_eq!((c.log.level.as_str(), c.log.format, s.backoff().ceiling(3)), ("warn", LogFormat::Json, ms(10)));
}

#[test]
fn partial_file_lists_only_missing_keys_and_keeps_section_defaults() {
    let l = load_text("[grpc]\nmax_concurrent_requests = 7\n", &[]).unwrap();
    let g = &l.config.grpc;
    assert_eq!((g.max_concurrent_requests, g.request_timeout), (7, secs(5)));
    let mut expected = all_keys();
    expected.retain(|k| k != "grpc.max_concurrent_requests");
    assert_eq!(l.defaults_used, expected);
    assert!(
        l.summary().contains("grpc.request_timeout"),
        "{}",
        l.summary()
    );
    assert!(!l.summary().contains("grpc.max_concurrent_requests"));
    // An empty file and an empty section are valid and leave everything at its default.
    for text in ["", "[ocserv]\n"] {
        let l = load_text(text, &[]).unwrap();
        assert_eq!((l.defaults_used, l.config), (all_keys(), Config::default()));
    }
}

#[rustfmt::skip]
#[test]
fn env_overrides_win_and_are_parsed() {
    let text = "[grpc]\ninsecure = false\nmax_concurrent_requests = 10\n[ocserv]\nrequest_timeout = \"1s\"\n";
    let l = load_text(text, &[
        ("OCSERV_AGENT__GRPC__LISTEN", "127.0.0.1:6000"),
        ("OCSERV_AGENT__GRPC__INSECURE", "True"),
        ("OCSERV_AGENT__GRPC__ALLOWED_UIDS", "0, 1000"),
        ("OCSERV_AGENT__GRPC__MAX_CONCURRENT_REQUESTS", "512"),
        ("OCSERV_AGENT__OCSERV__REQUEST_TIMEOUT", "250ms"),
        ("OCSERV_AGENT__OCSERV__BACKEND", "occtl"),
        ("OCSERV_AGENT__SUPERVISOR__RESTART_INTENSITY", "9"),
        ("OCSERV_AGENT__METRICS__LISTEN", "[::1]:9999"),
        ("OCSERV_AGENT__AGENT__ID", "12345"), // a string key keeps a number-like value
        // Not ours: single underscore (e.g. a CLI flag's variable) and other programs.
        ("OCSERV_AGENT_CONFIG", "/somewhere.toml"),
        ("PATH", "/usr/bin"),
    ]).unwrap();
    let c = &l.config;
    assert_eq!((c.grpc.listen, c.grpc.insecure), (Some("127.0.0.1:6000".parse().unwrap()), true));
    assert_eq!((c.grpc.allowed_uids.as_slice(), c.grpc.max_concurrent_requests), (&[0, 1000][..], 512));
    assert_eq!((c.ocserv.request_timeout, c.ocserv.backend), (ms(250), BackendKind::Occtl));
    assert_eq!((c.supervisor.restart_intensity, c.agent.id.as_str()), (9, "12345"));
    assert_eq!(c.metrics.listen, "[::1]:9999".parse().unwrap());
    for k in ["grpc.listen", "grpc.max_concurrent_requests", "ocserv.request_timeout", "agent.id"] {
        assert!(!l.defaults_used.iter().any(|d| d == k), "{k}");
    }
    assert!(l.defaults_used.iter().any(|d| d == "grpc.request_timeout"));
    // Overrides apply without a file too.
    let l = load_env(&[("OCSERV_AGENT__LOG__FORMAT", "json")]).unwrap();
    assert_eq!((l.source, l.config.log.format), (ConfigSource::EmbeddedDefaults, LogFormat::Json));
    assert_eq!(l.defaults_used.len(), all_keys().len() - 1);
}

#[rustfmt::skip]
#[test]
fn unknown_keys_and_sections_are_named() {
    let e = load_text("[grpc]\nlisen = \"127.0.0.1:1\"\n", &[]).unwrap_err();
    assert_eq!(e.to_string(), "invalid configuration: grpc.lisen: unknown key (expected one of: allowed_uids, idle_timeout, insecure, keepalive_interval, keepalive_timeout, listen, max_concurrent_requests, max_connections, max_streams_per_connection, read_timeout, request_timeout, socket)");
    assert_errors(&[], &[
        ("[grpcc]\nlisten = \"127.0.0.1:1\"\n", "grpcc", "unknown section"),
        ("listen = \"127.0.0.1:1\"\n", "listen", "unknown section"),
        ("[grpc.tls]\ncert = \"/x\"\n", "grpc.tls", "unknown key"),
        ("grpc = 5\n", "grpc", "expected a table"),
    ]);
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
        assert_eq!(load_env(&[(var, "1")]).unwrap_err().key, var);
    }
    let e = load_env(&[("OCSERV_AGENT__GRPC__LISEN", "1")]).unwrap_err();
    assert!(e.reason.contains("grpc.lisen") && e.reason.contains("max_concurrent_requests"));
    // The same key twice, in different case, is ambiguous.
    let twice = [
        ("OCSERV_AGENT__LOG__LEVEL", "info"),
        ("ocserv_agent__log__level", "debug"),
    ];
    assert!(load_env(&twice).unwrap_err().reason.contains("also set by"));
}

#[test]
fn lowercase_env_names_are_loaded_and_named_as_given() {
    let l = load_env(&[("ocserv_agent__log__level", "debug")]).unwrap();
    assert_eq!(l.config.log.level, "debug");
    let e = load_env(&[("ocserv_agent__log__level", "loud")]).unwrap_err();
    assert_eq!(e.key, "ocserv_agent__log__level");
}

#[rustfmt::skip]
#[test]
fn wrong_types_name_the_key() {
    assert_errors(&[], &[
        ("[ocserv]\nrequest_timeout = 2\n", "ocserv.request_timeout", "expected a duration like \"2s\" or \"250ms\""),
        ("[ocserv]\nrequest_timeout = \"2 fortnights\"\n", "ocserv.request_timeout", "expected a duration like \"2s\" or \"250ms\", got string \"2 fortnights\""),
        ("[ocserv]\nrequest_timeout = \"2\"\n", "ocserv.request_timeout", "expected a duration"),
        ("[grpc]\nmax_concurrent_requests = \"many\"\n", "grpc.max_concurrent_requests", "expected a whole number"),
        ("[grpc]\nmax_concurrent_requests = -1\n", "grpc.max_concurrent_requests", "got integer -1"),
        ("[grpc]\nmax_concurrent_requests = 1.5\n", "grpc.max_concurrent_requests", "got float 1.5"),
        ("[grpc]\nlisten = \"localhost\"\n", "grpc.listen", "socket address"),
        ("[grpc]\nlisten = nan\n", "grpc.listen", "socket address"),
        ("[grpc]\nallowed_uids = 0\n", "grpc.allowed_uids", "got integer 0"),
        ("[grpc]\ninsecure = \"yes\"\n", "grpc.insecure", "expected a boolean"),
        ("[metrics]\nlisten = 9102\n", "metrics.listen", "socket address"),
        ("[ocserv]\nbackend = \"ssh\"\n", "ocserv.backend", "one of: native, occtl"),
        ("[log]\nformat = \"xml\"\n", "log.format", "one of: text, json"),
        ("[agent]\nid = 12345\n", "agent.id", "got integer 12345"),
        ("[agent]\nstate_dir = [\"/a\"]\n", "agent.state_dir", "got an array"),
        ("[supervisor]\nrestart_intensity = 5000000000\n", "supervisor.restart_intensity", "whole number"),
        ("[log]\nlevel = true\n", "log.level", "got boolean true"),
    ]);
}

#[rustfmt::skip]
#[test]
fn wrong_env_values_name_the_env_var() {
    // The file sets the same keys validly: the (invalid) override must win and be named.
    let text = "[grpc]\nlisten = \"127.0.0.1:1\"\ninsecure = true\nmax_concurrent_requests = 5\n";
    for (var, value, reason) in [
        ("OCSERV_AGENT__OCSERV__REQUEST_TIMEOUT", "soon", "expected a duration"),
        ("OCSERV_AGENT__GRPC__MAX_CONCURRENT_REQUESTS", "lots", "whole number"),
        ("OCSERV_AGENT__GRPC__MAX_CONCURRENT_REQUESTS", "0", "between 1 and 65536"),
        ("OCSERV_AGENT__GRPC__LISTEN", "10.0.0.1:50051", "loopback"),
        ("OCSERV_AGENT__GRPC__LISTEN", "", "got string \"\""),
        ("OCSERV_AGENT__GRPC__INSECURE", "maybe", "expected a boolean"),
        ("OCSERV_AGENT__GRPC__ALLOWED_UIDS", "", "must not be empty"),
        ("OCSERV_AGENT__GRPC__ALLOWED_UIDS", "0,root", "expected a whole number"),
        ("OCSERV_AGENT__OCSERV__RECONCILE_INTERVAL", "1ms", "between 100ms and 1h"),
        ("OCSERV_AGENT__AGENT__STATE_DIR", "relative/dir", "absolute"),
    ] {
        assert_errors(&[(var, value)], &[(text, var, reason)]);
    }
}

#[rustfmt::skip]
#[test]
fn values_out_of_range_name_the_key() {
    let long_id = format!("[agent]\nid = \"{}\"\n", "x".repeat(65));
    assert_errors(&[], &[
        ("[agent]\nid = \"\"\n", "agent.id", "1 to 64"),
        ("[agent]\nid = \"a/b\"\n", "agent.id", "'/'"),
        (&long_id, "agent.id", "1 to 64"),
        ("[agent]\nstate_dir = \"var/lib\"\n", "agent.state_dir", "absolute"),
        ("[agent]\nstate_dir = \"/a\\u0000b\"\n", "agent.state_dir", "NUL"),
        ("[ocserv]\ncontrol_socket = \"occtl.socket\"\n", "ocserv.control_socket", "absolute"),
        ("[ocserv]\nocctl_path = \"occtl\"\n", "ocserv.occtl_path", "absolute"),
        ("[ocserv]\nrequest_timeout = \"0s\"\n", "ocserv.request_timeout", "between 10ms and 1m"),
        ("[ocserv]\nrequest_timeout = \"61s\"\n", "ocserv.request_timeout", "got 1m 1s"),
        ("[ocserv]\nreconcile_interval = \"99ms\"\n", "ocserv.reconcile_interval", "between 100ms and 1h"),
        ("[ocserv]\nreconcile_interval = \"2h\"\n", "ocserv.reconcile_interval", "between"),
        ("[ocserv]\nmax_in_flight = 0\n", "ocserv.max_in_flight", "between 1 and 64"),
        ("[ocserv]\nmax_queued = 100001\n", "ocserv.max_queued", "between 0 and 100000"),
        ("[grpc]\nsocket = \"agent.sock\"\n", "grpc.socket", "must be an absolute path"),
        ("[grpc]\nallowed_uids = []\n", "grpc.allowed_uids", "must not be empty"),
        ("[grpc]\nlisten = \"0.0.0.0:50051\"\ninsecure = true\n", "grpc.listen", "plaintext gRPC is only allowed on a loopback address; mTLS is not configured yet"),
        ("[grpc]\nlisten = \"[::]:50051\"\ninsecure = true\n", "grpc.listen", "loopback"),
        ("[grpc]\nlisten = \"127.0.0.1:50051\"\n", "grpc.listen", "insecure = true"),
        ("[grpc]\nmax_connections = 0\n", "grpc.max_connections", "between 1 and 1000000"),
        ("[grpc]\nidle_timeout = \"2d\"\n", "grpc.idle_timeout", "between 1s and 1day"),
        ("[grpc]\nmax_streams_per_connection = 1025\n", "grpc.max_streams_per_connection", "between 1 and 1024"),
        ("[grpc]\nread_timeout = \"10ms\"\n", "grpc.read_timeout", "between 100ms and 5m"),
        ("[grpc]\nkeepalive_interval = \"0s\"\n", "grpc.keepalive_interval", "between"),
        ("[grpc]\nkeepalive_timeout = \"1h\"\n", "grpc.keepalive_timeout", "between"),
        ("[grpc]\nmax_concurrent_requests = 0\n", "grpc.max_concurrent_requests", "between 1 and 65536"),
        ("[grpc]\nmax_concurrent_requests = 65537\n", "grpc.max_concurrent_requests", "between 1 and 65536"),
        ("[grpc]\nrequest_timeout = \"0s\"\n", "grpc.request_timeout", "between"),
        ("[metrics]\nlisten = \"10.1.2.3:9102\"\n", "metrics.listen", "loopback"),
        ("[metrics]\nmax_connections = 0\n", "metrics.max_connections", "between"),
        ("[metrics]\nidle_timeout = \"0s\"\n", "metrics.idle_timeout", "between"),
        ("[metrics]\nheader_timeout = \"1h\"\n", "metrics.header_timeout", "between"),
        ("[supervisor]\nrestart_backoff_initial = \"0s\"\n", "supervisor.restart_backoff_initial", "between"),
        ("[supervisor]\nrestart_backoff_initial = \"2s\"\nrestart_backoff_max = \"1s\"\n", "supervisor.restart_backoff_max", "must not be below supervisor.restart_backoff_initial (2s), got 1s"),
        ("[supervisor]\nrestart_intensity = 0\n", "supervisor.restart_intensity", "at least 1"),
        ("[supervisor]\nrestart_window = \"0s\"\n", "supervisor.restart_window", "between"),
        ("[supervisor]\nshutdown_grace = \"0s\"\n", "supervisor.shutdown_grace", "between"),
        ("[supervisor]\ncall_timeout = \"2h\"\n", "supervisor.call_timeout", "between"),
        ("[log]\nlevel = \"verbose\"\n", "log.level", "trace, debug, info, warn, error"),
    ]);
}

#[test]
fn malformed_toml_names_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "[grpc]\nsocket = \"/a.sock\"\nmax_concurrent_requests = = 3\n",
    )
    .unwrap();
    let e = load_from(Some(&path), Path::new(NO_DEFAULT), &[]).unwrap_err();
    assert_eq!(e.key, path.display().to_string());
    assert!(e.reason.starts_with("malformed TOML"), "{e}");
    assert!(
        e.reason.contains("line 3") && e.reason.contains("column"),
        "{e}"
    );
    // Duplicate keys are a TOML error too, not a silent "last one wins".
    let e = load_text("[log]\nlevel = \"info\"\nlevel = \"debug\"\n", &[]).unwrap_err();
    assert!(e.reason.contains("line 3"), "{e}");
}

#[test]
fn error_display_format() {
    let e = ConfigError::new(
        "ocserv.reconcile_interval",
        "must be between 100ms and 1h, got 2h",
    );
    let text =
        "invalid configuration: ocserv.reconcile_interval: must be between 100ms and 1h, got 2h";
    assert_eq!((e.to_string().as_str(), EXIT_CONFIG), (text, 64));
}

#[test]
fn backoff_from_hand_built_values_never_fails() {
    let s = SupervisorConfig {
        restart_backoff_initial: Duration::ZERO,
        restart_backoff_max: Duration::ZERO,
        ..SupervisorConfig::default()
    };
    assert_eq!(s.backoff().ceiling(10), ms(1));
    let d = SupervisorConfig::default().backoff();
    assert_eq!(
        (d.ceiling(0), d.ceiling(1), d.ceiling(30)),
        (ms(1), ms(2), secs(5))
    );
}

#[rustfmt::skip]
#[test]
fn render_round_trips_and_marks_defaults() {
    let text = "[grpc]\nlisten = \"[::1]:7000\"\ninsecure = true\nallowed_uids = [0, 7]\n[agent]\nid = \"a-1\"\nstate_dir = \"/srv/x \\\"q\\\"\\u007f\"\n[supervisor]\nrestart_window = \"1m 30s\"\n";
    let l = load_text(text, &[("OCSERV_AGENT__LOG__FORMAT", "json")]).unwrap();
    assert_eq!(l.config.agent.state_dir, Path::new("/srv/x \"q\"\u{7f}"));
    let rendered = l.render();
    for line in ["listen = \"[::1]:7000\"\n", "listen = \"127.0.0.1:9102\"  # default", "restart_window = \"1m 30s\"\n", "allowed_uids = [0,7]\n"] {
        assert!(rendered.contains(line), "{line} in {rendered}");
    }
    let again = load_text(&rendered, &[]).unwrap();
    assert_eq!((&again.config, again.defaults_used.is_empty()), (&l.config, true));
    // An unset optional key is shown as a comment.
    assert!(load_env(&[]).unwrap().render().contains("# listen is not set  # default\n"));
    let d = l.describe_defaults();
    assert!(d.contains(&"grpc.request_timeout = \"5s\"".to_owned()), "{d:?}");
    assert!(!d.iter().any(|x| x.starts_with("grpc.listen") || x.starts_with("log.format")), "{d:?}");
    assert_eq!(d.len(), l.defaults_used.len());
}

#[test]
fn env_var_names() {
    assert_eq!(env_var_name("grpc", "listen"), "OCSERV_AGENT__GRPC__LISTEN");
    let var = env_var_name("ocserv", "request_timeout");
    assert_eq!(var, "OCSERV_AGENT__OCSERV__REQUEST_TIMEOUT");
}

#[test]
fn live_changes_split_live_keys_from_restart_keys() {
    let old = Config::default();
    assert_eq!(live_changes(&old, &old.clone()), Changes::default());
    let mut new = old.clone();
    new.log.level = "debug".into();
    new.ocserv.reconcile_interval = secs(1);
    new.supervisor.shutdown_grace = secs(1);
    new.grpc.listen = Some("127.0.0.1:1".parse().unwrap());
    new.grpc.allowed_uids.push(1000);
    new.metrics.idle_timeout = secs(1);
    let c = live_changes(&old, &new);
    let applied = [
        "log.level",
        "ocserv.reconcile_interval",
        "supervisor.shutdown_grace",
    ];
    assert_eq!(c.applied, applied);
    let restart = ["grpc.allowed_uids", "grpc.listen", "metrics.idle_timeout"];
    assert_eq!(c.need_restart, restart);
    // Every live key is a real key.
    assert!(LIVE_KEYS
        .iter()
        .all(|k| all_keys().contains(&k.to_string())));
}
