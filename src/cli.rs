//! The operator's command line: argument parsing and the client commands that talk to a running
//! agent over its gRPC API (`sessions`, `disconnect`). Output is a readable table or JSON; when the
//! agent cannot be reached the error says where it looked and what to check.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use tonic::transport::Channel;

use crate::proto::agent::v1 as pb;
use crate::proto::agent::v1::agent_service_client::AgentServiceClient;
use crate::proto::agent::v1::vpn_agent_service_client::VpnAgentServiceClient;

/// Exit code when the agent cannot be reached (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: i32 = 69;
/// Exit code when the agent refused the request (bad argument, unknown user).
pub const EXIT_REFUSED: i32 = 1;
/// Exit code of `health` when the agent answered unhealthy.
pub const EXIT_UNHEALTHY: i32 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "ocserv-agent",
    version,
    about = "Supervised management agent for ocserv (OpenConnect VPN server)",
    long_about = "Runs beside ocserv, tracks its sessions through the control socket (or occtl) \
and serves them over gRPC to a portal and to this command line.\n\nWithout a subcommand, runs the agent.",
    after_long_help = "Exit codes: 0 success or clean shutdown; 1 request refused by the agent; \
64 invalid configuration; 69 agent (CLI) unreachable; 70 restart intensity exceeded; \
71 start-up failure (e.g. a listen address in use); 75 shutdown did not finish within \
supervisor.shutdown_grace."
)]
pub struct Cli {
    /// Configuration file (TOML). Default: /etc/ocserv-agent/agent.toml if present, else embedded
    /// defaults. Every key can be overridden by OCSERV_AGENT__SECTION__KEY.
    #[arg(long, short = 'c', global = true, env = "OCSERV_AGENT_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (the default).
    Run,
    /// Validate the configuration and print the effective values; exit 64 when invalid.
    CheckConfig,
    /// List live VPN sessions through the running agent.
    Sessions {
        /// Only this user's sessions.
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Disconnect a user's newest session (or all of them with --all) through the running agent.
    Disconnect {
        /// The user to disconnect.
        user: String,
        /// Disconnect every session of the user, not only the newest.
        #[arg(long)]
        all: bool,
        /// Why (kept in the agent's log).
        #[arg(long, default_value = "disconnected by operator")]
        reason: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Connect-time policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Ask the running agent's HealthCheck; exit 0 when healthy, 1 when not.
    Health {
        /// 1: the agent's actors are running; 2: and ocserv is reachable; 3: and the portal's
        /// circuit breaker is closed (or no portal is configured).
        #[arg(long, default_value_t = 3)]
        tier: i32,
        #[command(flatten)]
        target: TargetArgs,
    },
}

/// `ocserv-agent policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print the decision a connect of USER would get now, its source, and the per-user file
    /// that would be written; touches nothing (asks the portal when policy.source = "portal").
    Test {
        /// The username, as ocserv would pass it.
        user: String,
        /// The user's ocserv group, if any.
        #[arg(long, short = 'g', default_value = "")]
        group: String,
    },
}

/// Where the CLI reaches the agent.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// The agent's control socket; default: grpc.socket from the configuration
    /// (/run/ocserv-agent/agent.sock).
    #[arg(long, conflicts_with = "addr")]
    pub socket: Option<std::path::PathBuf>,
    /// A plaintext TCP address instead of the socket, e.g. http://127.0.0.1:50051 (the agent
    /// serves one only with grpc.listen and grpc.insecure = true).
    #[arg(long)]
    pub addr: Option<String>,
}

/// The resolved place to reach the agent.
#[derive(Debug, Clone)]
pub enum Target {
    Socket(std::path::PathBuf),
    Tcp(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Socket(p) => write!(f, "{}", p.display()),
            Target::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// Replies can be large (20 000 sessions are about 6 MiB); allow up to this much.
pub const MAX_REPLY_BYTES: usize = 256 * 1024 * 1024;

/// A client-side failure with its exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

fn unavailable(target: &Target, why: &str) -> CliError {
    let hint = match target {
        Target::Socket(_) if why.contains("ermission denied") => {
            "the socket is mode 0660: run as root, or as a uid listed in grpc.allowed_uids with \
             access to the socket"
        }
        _ => {
            "is ocserv-agent running? try `systemctl status ocserv-agent`, or pass --socket/--addr"
        }
    };
    CliError {
        code: EXIT_UNAVAILABLE,
        message: format!("cannot reach the agent at {target}: {why} ({hint})"),
    }
}

/// Connects to the agent's `VPNAgentService` over its control socket or a TCP address.
pub async fn connect(target: &Target) -> Result<VpnAgentServiceClient<Channel>, CliError> {
    let channel = connect_channel(target).await?;
    Ok(VpnAgentServiceClient::new(channel).max_decoding_message_size(MAX_REPLY_BYTES))
}

/// A gRPC channel to the agent over its control socket or a TCP address.
pub async fn connect_channel(target: &Target) -> Result<Channel, CliError> {
    let endpoint = match target {
        Target::Tcp(addr) => Channel::from_shared(addr.clone()).map_err(|e| CliError {
            code: crate::config::EXIT_CONFIG,
            message: format!("--addr: invalid address {addr:?}: {e}"),
        })?,
        // The URI is required by the API but unused: the connector below dials the socket.
        Target::Socket(_) => Channel::from_static("http://agent.sock"),
    }
    .connect_timeout(Duration::from_secs(3))
    .timeout(Duration::from_secs(30));
    let connected = match target {
        Target::Tcp(_) => endpoint.connect().await,
        Target::Socket(path) => {
            let path = path.clone();
            endpoint
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
        }
    };
    connected.map_err(|e| {
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        unavailable(target, &cause.to_string())
    })
}

fn status_error(target: &Target, s: tonic::Status) -> CliError {
    let code = match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => EXIT_UNAVAILABLE,
        _ => EXIT_REFUSED,
    };
    CliError {
        code,
        message: format!(
            "agent at {target} answered {}: {}",
            crate::metrics::code_name(s.code()),
            s.message()
        ),
    }
}

/// `ocserv-agent sessions`.
pub async fn sessions(
    target: &Target,
    user: Option<String>,
    json: bool,
) -> Result<String, CliError> {
    let mut client = connect(target).await?;
    let resp = client
        .get_active_sessions(pb::GetActiveSessionsRequest {
            username_filter: user.unwrap_or_default(),
            include_stats: true,
        })
        .await
        .map_err(|s| status_error(target, s))?
        .into_inner();
    Ok(if json {
        sessions_json(&resp)
    } else {
        sessions_table(&resp, now_unix())
    })
}

/// `ocserv-agent health`: one line per check, then the verdict; an unhealthy agent is an error
/// (exit 1) whose message is the verdict.
pub async fn health(target: &Target, tier: i32) -> Result<String, CliError> {
    let channel = connect_channel(target).await?;
    let resp = AgentServiceClient::new(channel)
        .health_check(pb::HealthCheckRequest { tier })
        .await
        .map_err(|s| status_error(target, s))?
        .into_inner();
    let mut checks: Vec<_> = resp.checks.iter().collect();
    checks.sort();
    let mut out: String = checks.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
    if resp.healthy {
        out.push_str(&format!("tier {tier}: {}\n", resp.status_message));
        Ok(out)
    } else {
        eprint!("{out}");
        Err(CliError {
            code: EXIT_UNHEALTHY,
            message: format!("tier {tier}: unhealthy: {}", resp.status_message),
        })
    }
}

/// `ocserv-agent disconnect`.
pub async fn disconnect(
    target: &Target,
    user: String,
    all: bool,
    reason: String,
) -> Result<String, CliError> {
    let mut client = connect(target).await?;
    let resp = client
        .disconnect_user(pb::DisconnectUserRequest {
            username: user.clone(),
            reason,
            disconnect_all_sessions: all,
        })
        .await
        .map_err(|s| status_error(target, s))?
        .into_inner();
    let mut out = format!(
        "disconnected {} session(s) of {user}\n",
        resp.sessions_disconnected
    );
    if !resp.error_message.is_empty() {
        out.push_str(&format!("some sessions failed: {}\n", resp.error_message));
    }
    Ok(out)
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// JSON: one object per session, stable field names.
pub fn sessions_json(resp: &pb::GetActiveSessionsResponse) -> String {
    let list: Vec<_> = resp
        .sessions
        .iter()
        .map(|s| {
            serde_json::json!({
                "session_id": s.session_id,
                "username": s.username,
                "groupname": s.metadata.get("groupname").cloned().unwrap_or_default(),
                "client_ip": s.client_ip,
                "vpn_ip": s.vpn_ip,
                "connected_at": s.connected_at.as_ref().map(|t| t.seconds),
                "bytes_in": s.bytes_in,
                "bytes_out": s.bytes_out,
                "device_id": s.device_id,
                "metadata": s.metadata,
            })
        })
        .collect();
    let doc = serde_json::json!({ "total_count": resp.total_count, "sessions": list });
    format!("{:#}\n", doc)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A fixed-width table, one row per session.
pub fn sessions_table(resp: &pb::GetActiveSessionsResponse, now: i64) -> String {
    let header = [
        "ID",
        "USER",
        "GROUP",
        "CLIENT IP",
        "VPN IP",
        "UP",
        "STATE",
        "RX",
        "TX",
    ];
    let rows: Vec<[String; 9]> = resp
        .sessions
        .iter()
        .map(|s| {
            let meta = |k: &str| s.metadata.get(k).cloned().unwrap_or_default();
            [
                s.session_id.clone(),
                s.username.clone(),
                meta("groupname"),
                s.client_ip.clone(),
                s.vpn_ip.clone(),
                s.connected_at
                    .as_ref()
                    .map(|t| human_age(now - t.seconds))
                    .unwrap_or_default(),
                meta("state"),
                human_bytes(s.bytes_in),
                human_bytes(s.bytes_out),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, c) in cells.enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            out.push_str(c);
            if i + 1 < widths.len() {
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(&mut header.iter().copied());
    for r in &rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out.push_str(&format!("{} session(s)\n", resp.total_count));
    out
}

/// `policy test`: the decision a connect of `user` in `group` would get now, from the configured
/// source (the local policy file, or one call to the portal), its source, and the per-user file
/// the agent would write. Nothing is cached, written or kicked. A portal that cannot be asked is
/// reported with what the fail mode would answer a user not in the cache.
pub async fn policy_test(
    cfg: &crate::config::Config,
    user: &str,
    group: &str,
) -> Result<String, CliError> {
    use crate::config::PolicySource;
    use crate::policy::{Decision, Source};
    let invalid = |message: String| CliError {
        code: crate::config::EXIT_CONFIG,
        message,
    };
    let mut out = String::new();
    let names = crate::validate::file_name("username", user).and(match group.is_empty() {
        true => Ok(()),
        false => crate::validate::file_name("groupname", group),
    });
    let (decision, source, note) = if let Err(e) = names {
        (Decision::deny(e.to_string()), Source::LocalPolicy, None)
    } else {
        match cfg.policy.source {
            PolicySource::Local => {
                let policy = match &cfg.local_policy.path {
                    Some(p) => crate::policy::local::load(p)
                        .map_err(|e| invalid(format!("local_policy.path: {e}")))?,
                    None => crate::policy::local::LocalPolicy::admit_all(),
                };
                (
                    policy.decide(user, group),
                    Source::LocalPolicy,
                    Some(cfg.local_policy.describe()),
                )
            }
            PolicySource::Portal => match ask_portal(cfg, user, group).await {
                Ok(answer) => {
                    let note = answer.should_disconnect.then(|| {
                        "should_disconnect: the user's other sessions would be disconnected"
                            .to_owned()
                    });
                    (answer.decision, Source::Fresh, note)
                }
                Err(e) => {
                    let (d, s) = crate::policy::cache::on_portal_failure(
                        cfg.policy.fail_mode,
                        None,
                        std::time::Instant::now(),
                        &cfg.policy.lifetimes(),
                    );
                    (d, s, Some(format!("the portal could not be asked: {e}; answered from policy.fail_mode as for a user not in the cache")))
                }
            },
        }
    };
    out.push_str(&format!("user: {user}\ngroup: {group}\n"));
    out.push_str(&format!(
        "decision: {}\nsource: {}\n",
        decision.label(),
        source.as_str()
    ));
    if let Some(r) = decision.reason.as_deref().filter(|_| !decision.allowed) {
        out.push_str(&format!("reason: {r}\n"));
    }
    if let Some(n) = note {
        out.push_str(&format!("note: {n}\n"));
    }
    if crate::actors::config_writer::has_file(&decision) {
        let model = crate::actors::config_writer::model_of(&decision);
        let dir = match &cfg.config_writer.per_user_dir {
            Some(d) => d.join(user).display().to_string(),
            None => "nowhere: config_writer.per_user_dir is not set".into(),
        };
        out.push_str(&format!(
            "per-user file ({dir}):\n{}",
            crate::peruser::render(&model)
        ));
    } else {
        out.push_str("per-user file: none (no routes, no-routes or DNS)\n");
    }
    Ok(out)
}

async fn ask_portal(
    cfg: &crate::config::Config,
    user: &str,
    group: &str,
) -> Result<crate::messages::PortalAnswer, String> {
    let client = crate::actors::portal_link::client(&cfg.portal).map_err(|e| e.to_string())?;
    let Some(mut client) = client else {
        return Err("portal.endpoint is not set".into());
    };
    let query = crate::messages::PolicyQuery {
        username: user.to_owned(),
        groupname: group.to_owned(),
        client_ip: None,
        vpn_ip: None,
        session_id: 0,
        device: String::new(),
    };
    let request = crate::actors::portal_link::request_of(&query, SystemTime::now());
    let reply = tokio::time::timeout(cfg.portal.call_timeout, client.check_policy(request))
        .await
        .map_err(|_| "no answer within portal.call_timeout".to_owned())?
        .map_err(|s| crate::actors::portal_link::error_of(s).to_string())?;
    crate::actors::portal_link::answer_of(reply.into_inner()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp() -> pb::GetActiveSessionsResponse {
        let mut s = pb::VpnSession {
            session_id: "4242".into(),
            username: "jürgen".into(),
            client_ip: "192.0.2.10".into(),
            vpn_ip: "10.10.0.2".into(),
            connected_at: Some(prost_types::Timestamp {
                seconds: 1000,
                nanos: 0,
            }),
            bytes_in: 2048,
            bytes_out: 10,
            ..Default::default()
        };
        s.metadata.insert("groupname".into(), "staff".into());
        s.metadata.insert("state".into(), "connected".into());
        pb::GetActiveSessionsResponse {
            sessions: vec![s],
            total_count: 1,
        }
    }

    #[test]
    fn table_aligns_columns_and_humanizes() {
        let t = sessions_table(&resp(), 1000 + 125);
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID    USER    GROUP"));
        assert!(lines[1].contains("jürgen  staff"), "{t}");
        assert!(lines[1].contains("2m05s"));
        assert!(lines[1].contains("2.0 KiB"));
        assert!(lines[1].contains("10 B"));
        assert_eq!(lines[2], "1 session(s)");
    }

    #[test]
    fn json_has_stable_fields() {
        let v: serde_json::Value = serde_json::from_str(&sessions_json(&resp())).unwrap();
        assert_eq!(v["total_count"], 1);
        assert_eq!(v["sessions"][0]["username"], "jürgen");
        assert_eq!(v["sessions"][0]["groupname"], "staff");
        assert_eq!(v["sessions"][0]["connected_at"], 1000);
    }

    #[tokio::test]
    async fn unreachable_agent_is_a_clear_error() {
        // A port that was just free: bind, note it, release it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("http://127.0.0.1:{port}");
        let e = sessions(&Target::Tcp(addr.clone()), None, false)
            .await
            .unwrap_err();
        assert_eq!(e.code, EXIT_UNAVAILABLE);
        assert!(
            e.message
                .contains(&format!("cannot reach the agent at {addr}")),
            "{}",
            e.message
        );
    }
}
