//! Bad input never panics and always names its cause: malformed or unknown configuration (exit 64),
//! an unreachable ocserv socket, a missing occtl, garbage on the control socket, an agent that is
//! not running.

mod support;

use std::io::Write;
use std::process::{Output, Stdio};
use std::time::Duration;

use ocserv_agent::ocserv::fake::{Act, FakeOcserv};
use ocserv_agent::ocserv::OcservBackend;
use support::agent;

use support::agent::{agent_cmd, free_port};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = agent_cmd(dir.path(), args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run ocserv-agent")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn malformed_toml_exits_64_naming_the_file() {
    let f = config_file("[grpc\nlisten = 1\n");
    let o = run(
        &["check-config", "--config", f.path().to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(f.path().to_str().unwrap()),
        "{}",
        stderr(&o)
    );
}

#[test]
fn unknown_key_exits_64_naming_the_key() {
    let f = config_file("[grpc]\nlisen = \"127.0.0.1:1\"\n");
    let o = run(
        &["check-config", "--config", f.path().to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("grpc.lisen"), "{}", stderr(&o));
    // Same through the agent itself, before anything starts.
    let o = run(&["run", "--config", f.path().to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(64));
}

#[test]
fn bad_values_name_the_key_and_the_reason() {
    let o = run(
        &["check-config"],
        &[("OCSERV_AGENT__OCSERV__RECONCILE_INTERVAL", "soon")],
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("RECONCILE_INTERVAL") || stderr(&o).contains("reconcile_interval"),
        "{}",
        stderr(&o)
    );
    let o = run(
        &["check-config"],
        &[
            ("OCSERV_AGENT__GRPC__LISTEN", "0.0.0.0:50051"),
            ("OCSERV_AGENT__GRPC__INSECURE", "true"),
        ],
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("loopback"), "{}", stderr(&o));
    let o = run(&["check-config"], &[("OCSERV_AGENT__NOPE__X", "1")]);
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("OCSERV_AGENT__NOPE__X"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn embedded_defaults_are_shown() {
    let o = run(&["check-config"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("/run/ocserv-agent/agent.sock"), "{out}");
    assert!(out.contains("/var/run/occtl.socket"), "{out}");
}

#[test]
fn cli_against_a_stopped_agent_explains() {
    let addr = format!("http://127.0.0.1:{}", free_port());
    let o = run(&["sessions", "--addr", &addr], &[]);
    assert_eq!(o.status.code(), Some(69));
    assert!(
        stderr(&o).contains("cannot reach the agent"),
        "{}",
        stderr(&o)
    );
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let o = run(&["sessions", "--socket", socket.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(69));
    assert!(
        stderr(&o).contains(&format!("cannot reach the agent at {}", socket.display())),
        "{}",
        stderr(&o)
    );
}

/// The real binary with no ocserv behind it: it keeps running, reports unready, and the CLI says why.
#[test]
fn unreachable_ocserv_socket_is_reported_not_fatal() {
    let metrics = free_port();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("missing.socket");
    let mut child = agent_cmd(dir.path(), &["run"])
        .env("OCSERV_AGENT__OCSERV__CONTROL_SOCKET", &socket)
        .env(
            "OCSERV_AGENT__METRICS__LISTEN",
            format!("127.0.0.1:{metrics}"),
        )
        .env("OCSERV_AGENT__OCSERV__RECONCILE_INTERVAL", "200ms")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent_socket = dir.path().join("agent.sock");
    let addr = agent_socket.to_str().unwrap();
    let mut last = String::new();
    let mut seen = false;
    for _ in 0..100 {
        let o = run(&["sessions", "--socket", addr], &[]);
        last = stderr(&o);
        if o.status.code() == Some(69) && last.contains(socket.to_str().unwrap()) {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent is still running"
    );
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // SIGHUP re-validates the configuration and never stops the agent.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP does not stop the agent"
    );
    // SIGTERM: ordered shutdown, exit 0.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert!(seen, "the CLI names the socket; last stderr: {last}");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_occtl_and_socket_garbage_are_named() {
    let dir = tempfile::tempdir().unwrap();
    // A control socket that answers every request with garbage.
    let garbage = FakeOcserv::start(|_, _| Act::raw(vec![0xff, 0x10, 0, 0, 0, 1, 2, 3]));
    let sock = garbage.socket().to_path_buf();
    let mut cfg = agent::config_in(dir.path(), &sock);
    cfg.ocserv.reconcile_interval = Duration::from_millis(200);
    let a = agent::start(cfg).await;
    let mut c = agent::client(&a).await;
    let e = agent::sessions(&mut c, "").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("malformed reply"), "{e:?}");
    assert_eq!(agent::http_get(a.metrics_addr, "/readyz").await.0, 503);
    a.shutdown().await;

    // occtl backend with no occtl binary.
    let missing = dir.path().join("no-such-occtl");
    let occtl = ocserv_agent::ocserv::occtl::OcctlBackend::new(
        missing.clone(),
        sock,
        Duration::from_secs(2),
    );
    let e = occtl.list().await.unwrap_err().to_string();
    assert!(
        e.contains("cannot run occtl") && e.contains(missing.to_str().unwrap()),
        "{e}"
    );
}

#[test]
fn a_listen_address_in_use_is_named_and_exits_71() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = run(
        &["run"],
        &[
            ("OCSERV_AGENT__GRPC__LISTEN", addr.as_str()),
            ("OCSERV_AGENT__GRPC__INSECURE", "true"),
            ("OCSERV_AGENT__METRICS__LISTEN", "127.0.0.1:0"),
        ],
    );
    assert_eq!(o.status.code(), Some(71), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("grpc.listen: cannot listen on {addr}")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn an_invalid_policy_file_exits_64_naming_the_entry_and_key() {
    let policy =
        config_file("default = \"allow\"\n[users.bob]\nallow = true\nroutes = [\"10.0.0/8\"]\n");
    let f = config_file(&format!(
        "[local_policy]\npath = {:?}\n",
        policy.path().display().to_string()
    ));
    for cmd in ["check-config", "run"] {
        let o = run(&[cmd, "--config", f.path().to_str().unwrap()], &[]);
        assert_eq!(o.status.code(), Some(64), "{cmd}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("local_policy.path") && e.contains("users.bob.routes"),
            "{cmd}: {e}"
        );
    }
    // Without a file, check-config says that everyone ocserv authenticated is admitted.
    let o = run(&["check-config"], &[]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains("every user that ocserv authenticated is admitted"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}
