//! The configuration loader through its public API: defaults, file, environment overrides, and
//! an error naming the key (or the variable, or the file) for every kind of bad input. Hermetic:
//! every load gets an explicit environment and a default path that does not exist.

use std::path::Path;
use std::time::Duration;

use ocserv_agent::config::*;
use ocserv_agent::ocserv::BackendKind;
use ocserv_agent::policy::FailMode;

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

/// Optional keys that are not set by default.
fn unset_optional_keys() -> Vec<String> {
    let entries = Config::default().entries().into_iter();
    entries
        .filter(|(_, v)| v.is_null())
        .map(|(k, _)| k)
        .collect()
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
        event_stream = false
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
        [hook]
        socket = "/run/h/hook.sock"
        allowed_uids = [0, 996]
        max_connections = 65536
        request_timeout = "2500ms"
        [policy]
        source = "portal"
        fail_mode = "closed"
        allow_ttl = "1d"
        deny_ttl = "1s"
        stale_for = "0s"
        capacity = 10000000
        [local_policy]
        path = "/srv/agent/policy.toml"
        [portal]
        endpoint = "https://portal.example.net:8443"
        ca_file = "/etc/a/ca.pem"
        cert_file = "/etc/a/cert.pem"
        key_file = "/etc/a/key.pem"
        server_name = "10.0.0.1"
        call_timeout = "2s"
        report_events = false
        session_update_interval = "0s"
        validate_interval = "1d"
        outbox_capacity = 100
        [portal.breaker]
        consecutive_failures = 1000
        failure_rate = 1
        min_calls = 100000
        window = "1h"
        open_for = "100ms"
        [config_writer]
        per_user_dir = "/etc/ocserv/config-per-user"
        per_group_dir = "/etc/ocserv/config-per-group"
        backups = 0
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
    let (h, p, w) = (&c.hook, &c.policy, &c.config_writer);
    assert_eq!((h.socket.to_str(), h.allowed_uids.as_slice()), (Some("/run/h/hook.sock"), &[0, 996][..]));
    assert_eq!((h.max_connections, h.request_timeout), (65536, ms(2500)));
    assert_eq!((p.source, p.fail_mode, p.allow_ttl, p.deny_ttl, p.stale_for, p.capacity), (PolicySource::Portal, FailMode::Closed, secs(86_400), secs(1), secs(0), 10_000_000));
    assert_eq!(c.local_policy.path.as_deref(), Some(Path::new("/srv/agent/policy.toml")));
    let po = &c.portal;
    assert_eq!((po.endpoint.as_deref(), po.is_tls(), po.server_name.as_deref()), (Some("https://portal.example.net:8443"), true, Some("10.0.0.1")));
    assert_eq!((po.reports_events(), po.session_update_interval, po.validate_interval, po.outbox_capacity), (false, secs(0), secs(86_400), 100));
    let files = [&po.ca_file, &po.cert_file, &po.key_file].map(|f| f.as_ref().and_then(|p| p.to_str()));
    assert_eq!(files, [Some("/etc/a/ca.pem"), Some("/etc/a/cert.pem"), Some("/etc/a/key.pem")]);
    let b = po.breaker_settings();
    assert_eq!((b.consecutive_failures, b.failure_rate, b.min_calls, b.window, b.open_for), (1000, 1.0, 100_000, secs(3600), ms(100)));
    assert_eq!((po.call_timeout, b.probe_timeout), (secs(2), secs(4)));
    assert_eq!((w.per_user_dir.as_deref(), w.per_group_dir.as_deref(), w.backups), (Some(Path::new("/etc/ocserv/config-per-user")), Some(Path::new("/etc/ocserv/config-per-group")), 0));
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
    // Every key is written out, except unset optional ones (shown as comments).
    let mut unset = unset_optional_keys();
    unset.retain(|k| k != "grpc.listen");
    assert_eq!((&again.config, &again.defaults_used), (&l.config, &unset));
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

#[rustfmt::skip]
#[test]
fn policy_sections_defaults() {
    let c = load_env(&[]).unwrap().config;
    let h = &c.hook;
    assert_eq!((h.socket.as_path(), h.allowed_uids.as_slice()), (Path::new("/run/ocserv-agent/hook.sock"), &[0][..]));
    assert_eq!((h.max_connections, h.request_timeout), (256, secs(2)));
    assert!(h.request_timeout < HOOK_PROGRAM_DEADLINE, "answers before the hook gives up");
    let p = &c.policy;
    assert_eq!((p.source, p.fail_mode), (PolicySource::Local, FailMode::Stale));
    assert_eq!((p.allow_ttl, p.deny_ttl, p.stale_for, p.capacity), (secs(300), secs(30), secs(3600), 10_000));
    let l = p.lifetimes();
    assert_eq!((l.allow_ttl, l.deny_ttl, l.stale_for), (secs(300), secs(30), secs(3600)));
    assert_eq!(c.local_policy.path, None);
    let po = &c.portal;
    assert_eq!((&po.endpoint, &po.ca_file, &po.cert_file, &po.key_file, &po.server_name), (&None, &None, &None, &None, &None));
    assert_eq!((po.call_timeout, po.is_tls()), (secs(1), false));
    let b = &po.breaker;
    assert_eq!((b.consecutive_failures, b.failure_rate, b.min_calls, b.window, b.open_for), (5, Fraction(0.5), 20, secs(30), secs(10)));
    ocserv_agent::breaker::Breaker::new(po.breaker_settings(), 1).expect("default settings are valid");
    let w = &c.config_writer;
    assert_eq!((&w.per_user_dir, &w.per_group_dir, w.backups), (&None, &None, 3));
}

#[test]
fn no_policy_file_says_everyone_is_admitted() {
    let c = load_env(&[]).unwrap().config;
    let text = c.local_policy.describe();
    assert!(
        text.contains("every user that ocserv authenticated is admitted"),
        "{text}"
    );
    let c = load_env(&[("OCSERV_AGENT__LOCAL_POLICY__PATH", "/etc/p.toml")])
        .unwrap()
        .config;
    assert_eq!(c.local_policy.describe(), "local policy file /etc/p.toml");
}

#[rustfmt::skip]
#[test]
fn policy_sections_env_overrides() {
    let l = load_env(&[
        ("OCSERV_AGENT__HOOK__SOCKET", "/run/x/hook.sock"),
        ("OCSERV_AGENT__HOOK__ALLOWED_UIDS", "0, 997"),
        ("OCSERV_AGENT__HOOK__MAX_CONNECTIONS", "9"),
        ("OCSERV_AGENT__HOOK__REQUEST_TIMEOUT", "1500ms"),
        ("OCSERV_AGENT__POLICY__SOURCE", "portal"),
        ("OCSERV_AGENT__POLICY__FAIL_MODE", "open"),
        ("OCSERV_AGENT__POLICY__ALLOW_TTL", "1m"),
        ("OCSERV_AGENT__POLICY__DENY_TTL", "5s"),
        ("OCSERV_AGENT__POLICY__STALE_FOR", "2h"),
        ("OCSERV_AGENT__POLICY__CAPACITY", "50"),
        ("OCSERV_AGENT__LOCAL_POLICY__PATH", "/etc/p.toml"),
        ("OCSERV_AGENT__PORTAL__ENDPOINT", "http://[::1]:50051"),
        ("OCSERV_AGENT__PORTAL__SERVER_NAME", "portal.test"),
        ("OCSERV_AGENT__PORTAL__CALL_TIMEOUT", "300ms"),
        ("OCSERV_AGENT__PORTAL__BREAKER__CONSECUTIVE_FAILURES", "2"),
        ("OCSERV_AGENT__PORTAL__BREAKER__FAILURE_RATE", "0.25"),
        ("OCSERV_AGENT__PORTAL__BREAKER__MIN_CALLS", "3"),
        ("OCSERV_AGENT__PORTAL__BREAKER__WINDOW", "1m"),
        ("ocserv_agent__portal__breaker__open_for", "2s"),
        ("OCSERV_AGENT__CONFIG_WRITER__PER_USER_DIR", "/u"),
        ("OCSERV_AGENT__CONFIG_WRITER__PER_GROUP_DIR", "/g"),
        ("OCSERV_AGENT__CONFIG_WRITER__BACKUPS", "64"),
    ]).unwrap();
    let c = &l.config;
    assert_eq!((c.hook.socket.to_str(), c.hook.allowed_uids.as_slice()), (Some("/run/x/hook.sock"), &[0, 997][..]));
    assert_eq!((c.hook.max_connections, c.hook.request_timeout), (9, ms(1500)));
    let p = &c.policy;
    assert_eq!((p.source, p.fail_mode, p.allow_ttl, p.deny_ttl, p.stale_for, p.capacity), (PolicySource::Portal, FailMode::Open, secs(60), secs(5), secs(7200), 50));
    assert_eq!(c.local_policy.path.as_deref(), Some(Path::new("/etc/p.toml")));
    let po = &c.portal;
    assert_eq!((po.endpoint.as_deref(), po.is_tls(), po.server_name.as_deref(), po.call_timeout), (Some("http://[::1]:50051"), false, Some("portal.test"), ms(300)));
    let b = &po.breaker;
    assert_eq!((b.consecutive_failures, b.failure_rate, b.min_calls, b.window, b.open_for), (2, Fraction(0.25), 3, secs(60), secs(2)));
    let w = &c.config_writer;
    assert_eq!((w.per_user_dir.as_deref(), w.per_group_dir.as_deref(), w.backups), (Some(Path::new("/u")), Some(Path::new("/g")), 64));
    assert!(!l.defaults_used.iter().any(|k| k.starts_with("portal.breaker.")), "{:?}", l.defaults_used);
    // An integer rate from the environment is a number too.
    let l = load_env(&[("OCSERV_AGENT__PORTAL__BREAKER__FAILURE_RATE", "1")]).unwrap();
    assert_eq!(l.config.portal.breaker.failure_rate, Fraction(1.0));
}

#[rustfmt::skip]
#[test]
fn policy_sections_errors_name_the_key() {
    let tls = "[portal]\nendpoint = \"https://portal.example.net:8443\"\nca_file = \"/ca\"\ncert_file = \"/c\"\nkey_file = \"/k\"\n";
    let with_tls = |extra: &str| format!("{tls}{extra}");
    assert_errors(&[], &[
        ("[hook]\nsocket = \"hook.sock\"\n", "hook.socket", "absolute"),
        ("[hook]\nsocket = \"/run/ocserv-agent/agent.sock\"\n", "hook.socket", "must differ from grpc.socket"),
        ("[hook]\nallowed_uids = []\n", "hook.allowed_uids", "must not be empty"),
        ("[hook]\nmax_connections = 0\n", "hook.max_connections", "between 1 and 65536"),
        ("[hook]\nrequest_timeout = \"5ms\"\n", "hook.request_timeout", "between 10ms and 1m"),
        ("[hook]\nrequest_timeout = \"61s\"\n", "hook.request_timeout", "between"),
        ("[hook]\nrequest_timeout = \"1s\"\n", "portal.call_timeout", "must be below hook.request_timeout (1s), got 1s"),
        ("[policy]\nsource = \"ldap\"\n", "policy.source", "one of: local, portal"),
        ("[policy]\nfail_mode = \"maybe\"\n", "policy.fail_mode", "one of: stale, open, closed"),
        ("[policy]\nallow_ttl = \"0s\"\n", "policy.allow_ttl", "between 1s and 1day"),
        ("[policy]\ndeny_ttl = \"2d\"\n", "policy.deny_ttl", "between 1s and 1day"),
        ("[policy]\nstale_for = \"8d\"\n", "policy.stale_for", "between 0s and 7days"),
        ("[policy]\ncapacity = 0\n", "policy.capacity", "between 1 and 10000000"),
        ("[policy]\nsource = \"portal\"\n", "portal.endpoint", "required when policy.source = \"portal\""),
        ("[local_policy]\npath = \"policy.toml\"\n", "local_policy.path", "absolute"),
        ("[local_policy]\npath = 5\n", "local_policy.path", "got integer 5"),
        ("[portal]\nendpoint = \"portal.example.net:8443\"\n", "portal.endpoint", "expected https://host:port"),
        ("[portal]\nendpoint = \"ftp://portal.example.net\"\n", "portal.endpoint", "expected https://host:port"),
        ("[portal]\nendpoint = \"https://\"\n", "portal.endpoint", "https://host:port"),
        ("[portal]\nendpoint = \"https://portal.example.net/api\"\n", "portal.endpoint", "path or query"),
        ("[portal]\nendpoint = \"https://portal.example.net?x=1\"\n", "portal.endpoint", "path or query"),
        ("[portal]\nendpoint = \"https://user@portal.example.net\"\n", "portal.endpoint", "user part"),
        ("[portal]\nendpoint = \"https://portal.example.net:0\"\n", "portal.endpoint", "port 0"),
        ("[portal]\nendpoint = \"https://bad_host!:1\"\n", "portal.endpoint", ""),
        ("[portal]\nendpoint = \"http://portal.example.net:80\"\n", "portal.endpoint", "only allowed to a loopback IP address"),
        ("[portal]\nendpoint = \"http://10.0.0.1:80\"\n", "portal.endpoint", "loopback"),
        ("[portal]\nendpoint = \"http://localhost:80\"\n", "portal.endpoint", "loopback IP"),
        ("[portal]\nendpoint = \"https://portal.example.net\"\n", "portal.ca_file", "required when portal.endpoint is https"),
        ("[portal]\nendpoint = \"https://portal.example.net\"\nca_file = \"/ca\"\n", "portal.cert_file", "required when portal.endpoint is https"),
        ("[portal]\nendpoint = \"https://portal.example.net\"\nca_file = \"/ca\"\ncert_file = \"/c\"\n", "portal.key_file", "required"),
        ("[portal]\nendpoint = \"http://127.0.0.1:50051\"\nca_file = \"/ca\"\n", "portal.ca_file", "plaintext http"),
        ("[portal]\nca_file = \"ca.pem\"\n", "portal.ca_file", "absolute"),
        (&with_tls("key_file = \"k.pem\"\n").replace("key_file = \"/k\"\n", ""), "portal.key_file", "absolute"),
        ("[portal]\nserver_name = \"-bad-\"\n", "portal.server_name", "DNS name or an IP address"),
        ("[portal]\nserver_name = \"a..b\"\n", "portal.server_name", "DNS name"),
        ("[portal]\ncall_timeout = \"0s\"\n", "portal.call_timeout", "between 1ms and 1m"),
        ("[portal]\nreport_events = true\n", "portal.report_events", "true, but portal.endpoint is not set"),
        ("[ocserv]\nbackend = \"occtl\"\nevent_stream = true\n", "ocserv.event_stream", "needs ocserv.backend = \"native\""),
        ("[portal]\ncall_timeout = \"2s\"\n", "portal.call_timeout", "must be below hook.request_timeout (2s), got 2s"),
        ("[portal]\nbreaker = 5\n", "portal.breaker", "expected a table, got integer 5"),
        ("[portal.breaker]\nconsecutive_failures = 0\n", "portal.breaker.consecutive_failures", "between 1 and 1000"),
        ("[portal.breaker]\nfailure_rate = 1.5\n", "portal.breaker.failure_rate", "between 0.0 and 1.0, got 1.5"),
        ("[portal.breaker]\nfailure_rate = -0.1\n", "portal.breaker.failure_rate", "between 0.0 and 1.0, got -0.1"),
        ("[portal.breaker]\nfailure_rate = \"half\"\n", "portal.breaker.failure_rate", "expected a number, got string \"half\""),
        ("[portal.breaker]\nfailure_rate = nan\n", "portal.breaker.failure_rate", "expected a number"),
        ("[portal.breaker]\nmin_calls = 0\n", "portal.breaker.min_calls", "between 1 and 100000"),
        ("[portal.breaker]\nwindow = \"2h\"\n", "portal.breaker.window", "between 1s and 1h"),
        ("[portal.breaker]\nopen_for = \"10ms\"\n", "portal.breaker.open_for", "between 100ms and 1h"),
        ("[portal.breaker]\nopen_for = 10\n", "portal.breaker.open_for", "expected a duration"),
        ("[config_writer]\nper_user_dir = \"ocserv/users\"\n", "config_writer.per_user_dir", "absolute"),
        ("[config_writer]\nper_group_dir = \"groups\"\n", "config_writer.per_group_dir", "absolute"),
        ("[config_writer]\nper_user_dir = \"/d\"\nper_group_dir = \"/d\"\n", "config_writer.per_group_dir", "must differ from config_writer.per_user_dir"),
        ("[config_writer]\nbackups = 65\n", "config_writer.backups", "between 0 and 64"),
        ("[config_writer]\nbackups = -1\n", "config_writer.backups", "got integer -1"),
    ]);
    // Valid edges.
    for text in [
        with_tls(""),
        "[portal]\nendpoint = \"http://127.0.0.1:50051\"\n".to_owned(),
        "[portal]\nendpoint = \"http://127.9.9.9:1/\"\n".to_owned(),
        "[portal]\nendpoint = \"https://[2001:db8::1]:443\"\nca_file = \"/a\"\ncert_file = \"/b\"\nkey_file = \"/c\"\n".to_owned(),
        "[portal.breaker]\nfailure_rate = 0\n".to_owned(),
        "[portal.breaker]\nfailure_rate = -0.0\n".to_owned(),
        "[policy]\nstale_for = \"0s\"\n[config_writer]\nbackups = 0\n".to_owned(),
        "[hook]\nrequest_timeout = \"1s\"\n[portal]\ncall_timeout = \"999ms\"\n".to_owned(),
        format!("{tls}[policy]\nsource = \"portal\"\n"),
    ] {
        load_text(&text, &[]).unwrap_or_else(|e| panic!("{text}: {e}"));
    }
    // The env override is named when it breaks a rule.
    let e = load_env(&[("OCSERV_AGENT__PORTAL__BREAKER__FAILURE_RATE", "2")]).unwrap_err();
    assert_eq!(e.key, "OCSERV_AGENT__PORTAL__BREAKER__FAILURE_RATE");
    let e = load_env(&[("OCSERV_AGENT__POLICY__FAIL_MODE", "shut")]).unwrap_err();
    assert_eq!((e.key.as_str(), e.reason.contains("stale, open, closed")), ("OCSERV_AGENT__POLICY__FAIL_MODE", true));
}

#[rustfmt::skip]
#[test]
fn subtables_name_unknown_keys_and_tables() {
    let e = load_text("[portal.breaker]\nopen = \"1s\"\n", &[]).unwrap_err();
    assert_eq!(e.to_string(), "invalid configuration: portal.breaker.open: unknown key (expected one of: consecutive_failures, failure_rate, min_calls, open_for, window)");
    let e = load_text("[portal]\nbreakers = 1\n", &[]).unwrap_err();
    assert_eq!(e.to_string(), "invalid configuration: portal.breakers: unknown key (expected one of: breaker, ca_file, call_timeout, cert_file, endpoint, key_file, outbox_capacity, report_events, server_name, session_update_interval, validate_interval)");
    assert_errors(&[], &[
        ("[portal.breaker.x]\ny = 1\n", "portal.breaker.x", "unknown key"),
        ("[hook.x]\ny = 1\n", "hook.x", "unknown key (expected one of: allowed_uids, max_connections, request_timeout, socket)"),
        ("[policies]\nsource = \"local\"\n", "policies", "unknown section (expected one of: agent, config_writer, grpc, hook, local_policy, log, metrics, ocserv, policy, portal, supervisor)"),
    ]);
    for (var, reason) in [
        ("OCSERV_AGENT__PORTAL__BREAKER", "portal.breaker: a table, not a key"),
        ("OCSERV_AGENT__PORTAL__BREAKER__OPEN", "portal.breaker.open: unknown key (expected one of: consecutive_failures"),
        ("OCSERV_AGENT__PORTAL__BREAKER__OPEN_FOR__X", "unknown key"),
        ("OCSERV_AGENT__PORTAL__BREAKERS__OPEN_FOR", "portal.breakers.open_for: unknown key (expected one of: breaker, ca_file"),
        ("OCSERV_AGENT__HOOK__SOCKET__X", "hook.socket.x: unknown key (expected one of: allowed_uids"),
    ] {
        let e = load_env(&[(var, "1")]).unwrap_err();
        assert_eq!(e.key, var);
        assert!(e.reason.contains(reason), "{var}: {e}");
    }
    assert_eq!(env_var_name("portal", "breaker.open_for"), "OCSERV_AGENT__PORTAL__BREAKER__OPEN_FOR");
    assert_eq!(env_var_name("portal.breaker", "window"), "OCSERV_AGENT__PORTAL__BREAKER__WINDOW");
}

#[test]
fn render_writes_subtables_after_their_section() {
    let text =
        "[portal]\nendpoint = \"http://127.0.0.1:1\"\n[portal.breaker]\nfailure_rate = 0.75\n";
    let l = load_text(text, &[]).unwrap();
    let rendered = l.render();
    let (portal, breaker) = (
        rendered.find("\n[portal]\n").unwrap(),
        rendered.find("\n[portal.breaker]\n").unwrap(),
    );
    let call_timeout = rendered.find("call_timeout = \"1s\"  # default").unwrap();
    assert!(
        portal < call_timeout && call_timeout < breaker,
        "{rendered}"
    );
    assert!(rendered.contains("failure_rate = 0.75\n"), "{rendered}");
    assert!(
        rendered.contains("# endpoint") || rendered.contains("endpoint = \"http://127.0.0.1:1\"\n")
    );
    let again = load_text(&rendered, &[]).unwrap();
    assert_eq!(again.config, l.config);
    let d = l.describe_defaults();
    assert!(
        d.contains(&"portal.breaker.open_for = \"10s\"".to_owned()),
        "{d:?}"
    );
}

#[test]
fn policy_live_keys_and_reload_mix() {
    let old = Config::default();
    let mut new = old.clone();
    new.hook.request_timeout = secs(3);
    new.portal.call_timeout = secs(2);
    new.policy.fail_mode = FailMode::Closed;
    new.policy.allow_ttl = secs(1);
    new.local_policy.path = Some("/p.toml".into());
    new.config_writer.backups = 0;
    new.policy.capacity = 5;
    new.hook.socket = "/run/other.sock".into();
    new.portal.breaker.open_for = secs(1);
    new.portal.breaker.failure_rate = Fraction(0.1);
    let c = live_changes(&old, &new);
    let applied = [
        "config_writer.backups",
        "hook.request_timeout",
        "local_policy.path",
        "policy.allow_ttl",
        "policy.fail_mode",
        "portal.call_timeout",
    ];
    assert_eq!(c.applied, applied);
    let restart = [
        "hook.socket",
        "policy.capacity",
        "portal.breaker.failure_rate",
        "portal.breaker.open_for",
    ];
    assert_eq!(c.need_restart, restart);
    // The running mix takes the live keys (nested ones too) and keeps the others; it is valid.
    let mixed = with_live_keys(&old, &new);
    assert_eq!(
        (mixed.portal.call_timeout, mixed.hook.request_timeout),
        (secs(2), secs(3))
    );
    assert_eq!(
        (mixed.policy.fail_mode, mixed.config_writer.backups),
        (FailMode::Closed, 0)
    );
    assert_eq!(
        (mixed.policy.capacity, &mixed.portal.breaker),
        (10_000, &old.portal.breaker)
    );
    assert_eq!(mixed.validate(), Ok(()));
    assert!(LIVE_KEYS
        .iter()
        .all(|k| all_keys().contains(&k.to_string())));
}
