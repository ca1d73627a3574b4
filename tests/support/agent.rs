//! Running the agent in-process against a lab, and small helpers to talk to it.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ocserv_agent::app::Agent;
use ocserv_agent::config::Config;
use ocserv_agent::ocserv::BackendKind;
use ocserv_agent::proto::agent::v1::vpn_agent_service_client::VpnAgentServiceClient;
use ocserv_agent::proto::agent::v1::{GetActiveSessionsRequest, VpnSession};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use super::lab::Lab;

/// The embedded defaults (never the machine's file or environment) for an agent whose every
/// socket and its state live in `dir`, asking ocserv on `ocserv_socket`: metrics on an ephemeral
/// loopback port, and a restart intensity that chaos tests do not reach by accident.
pub fn config_in(dir: &std::path::Path, ocserv_socket: &std::path::Path) -> Config {
    let mut c = ocserv_agent::config::load_with_env(None, &[])
        .expect("embedded defaults are valid")
        .config;
    c.ocserv.control_socket = ocserv_socket.to_path_buf();
    c.grpc.socket = dir.join("agent.sock");
    c.hook.socket = dir.join("hook.sock");
    c.agent.state_dir = dir.join("state");
    c.metrics.listen = "127.0.0.1:0".parse().unwrap();
    c.supervisor.restart_intensity = 1000;
    c
}

/// [`config_in`] the lab's directory, on its ocserv, with a short reconcile interval.
pub fn config_for(lab: &Lab, backend: BackendKind) -> Config {
    let mut c = config_in(&lab.dir, &lab.occtl_socket);
    c.ocserv.backend = backend;
    c.ocserv.reconcile_interval = Duration::from_millis(300);
    c
}

pub async fn start(config: Config) -> Agent {
    ocserv_agent::app::start(config)
        .await
        .expect("agent starts")
}

/// A client on the agent's control socket (the same connector the CLI uses).
pub async fn client(agent: &Agent) -> VpnAgentServiceClient<Channel> {
    socket_client(&agent.grpc_socket).await
}

/// A loopback TCP port free at the time of the call (for an agent started as a process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `agent.v1.AgentService/HealthCheck` of `tier`, on the agent's control socket.
pub async fn health(
    agent: &Agent,
    tier: i32,
) -> Result<ocserv_agent::proto::agent::v1::HealthCheckResponse, tonic::Status> {
    use ocserv_agent::proto::agent::v1::agent_service_client::AgentServiceClient;
    let target = ocserv_agent::cli::Target::Socket(agent.grpc_socket.clone());
    let channel = ocserv_agent::cli::connect_channel(&target)
        .await
        .map_err(|e| e.message)
        .expect("connect to the agent");
    AgentServiceClient::new(channel)
        .health_check(ocserv_agent::proto::agent::v1::HealthCheckRequest { tier })
        .await
        .map(tonic::Response::into_inner)
}

pub async fn socket_client(path: &std::path::Path) -> VpnAgentServiceClient<Channel> {
    ocserv_agent::cli::connect(&ocserv_agent::cli::Target::Socket(path.to_path_buf()))
        .await
        .map_err(|e| e.message)
        .expect("connect to the agent")
}

/// Polls `f` every 100 ms until it yields `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sessions the agent reports (with stats), or the gRPC error.
pub async fn sessions(
    c: &mut VpnAgentServiceClient<Channel>,
    user: &str,
) -> Result<Vec<VpnSession>, tonic::Status> {
    c.get_active_sessions(GetActiveSessionsRequest {
        username_filter: user.to_string(),
        include_stats: true,
    })
    .await
    .map(|r| r.into_inner().sessions)
}

/// Waits until the agent lists exactly `n` sessions (of `user`, or all when empty).
pub async fn wait_sessions(
    c: &mut VpnAgentServiceClient<Channel>,
    user: &str,
    n: usize,
) -> Vec<VpnSession> {
    let what = format!("{n} session(s) of {user:?} through GetActiveSessions");
    wait_for(&what, Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            match sessions(&mut c, user).await {
                Ok(s) if s.len() == n => Some(s),
                _ => None,
            }
        }
    })
    .await
}

/// A bare HTTP/1.0 GET on loopback: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// The value of one exposition line (`name{labels} value`), if present.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// IDs of the sessions ocserv lists, via occtl (the independent witness).
pub fn ocserv_ids(lab: &Lab) -> Vec<u32> {
    let out = lab.occtl(&["-j", "show", "users"]).expect("occtl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ids: Vec<u32> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("\"ID\":"))
        .filter_map(|v| v.trim().trim_end_matches(',').trim().parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

/// The agent binary, hermetic: no inherited `OCSERV_AGENT*` variables or `RUST_LOG`, an explicit
/// configuration file (an empty one unless `args` name one), so the machine's own configuration is never read,
/// and, for `run`, the control socket in `dir`.
#[cfg(test)] // the binary is known to integration tests only, not to the demo example
pub fn agent_cmd(dir: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ocserv-agent"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy()
            .to_uppercase()
            .starts_with("OCSERV_AGENT")
        {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null());
    if !args.contains(&"--config") {
        let empty = dir.join("empty.toml");
        std::fs::write(&empty, "").unwrap();
        cmd.arg("--config").arg(empty);
    }
    if args.first() == Some(&"run") {
        cmd.env("OCSERV_AGENT__GRPC__SOCKET", dir.join("agent.sock"));
        cmd.env("OCSERV_AGENT__HOOK__SOCKET", dir.join("hook.sock"));
        cmd.env("OCSERV_AGENT__AGENT__STATE_DIR", dir.join("state"));
    }
    cmd.args(args);
    cmd
}
