//! The real binary as a process: signals during start-up are handled, and a server that cannot
//! serve makes the process exit with code 70 (restart intensity exceeded) so that systemd
//! restarts it.

mod support;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::agent::agent_cmd;

/// Waits for the child to exit, at most `timeout`.
fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A control socket that accepts connections and never answers: the agent's start (its first
/// session list) waits on it for `ocserv.request_timeout`.
fn silent_ocserv(dir: &std::path::Path) -> (std::os::unix::net::UnixListener, std::path::PathBuf) {
    let path = dir.join("silent.socket");
    (std::os::unix::net::UnixListener::bind(&path).unwrap(), path)
}

#[test]
fn signals_during_start_up_are_handled_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let (_silent, ocserv) = silent_ocserv(dir.path());
    let mut child = agent_cmd(dir.path(), &["run"])
        .env("OCSERV_AGENT__OCSERV__CONTROL_SOCKET", &ocserv)
        .env("OCSERV_AGENT__OCSERV__REQUEST_TIMEOUT", "3s")
        .env("OCSERV_AGENT__METRICS__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    // Still starting: the first session list waits on the silent socket.
    std::thread::sleep(Duration::from_millis(300));
    kill(pid, Signal::SIGHUP).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        child.try_wait().unwrap().is_none(),
        "a SIGHUP during start-up does not kill the agent"
    );
    kill(pid, Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(
        (status.code(), status.signal()),
        (Some(0), None),
        "SIGTERM during start-up is an ordered shutdown, not death by signal"
    );
}

/// A duplicate of the agent's listening TCP socket bound to `port`, taken from the running
/// process (root may: `pidfd_getfd`).
fn steal_listener(pid: u32, port: u16) -> OwnedFd {
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .expect("pidfd_open");
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let Ok(n) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(fd) = rustix::process::pidfd_getfd(
            pidfd.as_fd(),
            n,
            rustix::process::PidfdGetfdFlags::empty(),
        ) else {
            continue;
        };
        let listening = rustix::net::sockopt::socket_acceptconn(&fd).unwrap_or(false);
        let ours = rustix::net::getsockname(&fd)
            .ok()
            .and_then(|a| std::net::SocketAddr::try_from(a).ok())
            .is_some_and(|a| a.port() == port);
        if listening && ours {
            return fd;
        }
    }
    panic!("no listening socket on port {port} in process {pid}");
}

#[test]
fn a_server_that_cannot_serve_ends_the_process_with_code_70() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = dir.path().join("agent.log");
    let mut child = agent_cmd(dir.path(), &["run"])
        .env(
            "OCSERV_AGENT__OCSERV__CONTROL_SOCKET",
            dir.path().join("missing.socket"),
        )
        .env("OCSERV_AGENT__METRICS__LISTEN", format!("127.0.0.1:{port}"))
        .env("OCSERV_AGENT__SUPERVISOR__RESTART_INTENSITY", "3")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the agent never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Shut the metrics listener down under the agent: accepting fails for good, so the
    // metrics server's task ends, its actor fails and is restarted, fails again...
    let fd = steal_listener(child.id(), port);
    rustix::net::shutdown(&fd, rustix::net::Shutdown::Both).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(70), "{text}");
    assert!(text.contains("restart intensity exceeded"), "{text}");
    assert!(text.contains("metrics_server"), "{text}");
}
