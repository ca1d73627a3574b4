//! The quick-start demo (`scripts/demo.sh`): a throwaway ocserv in network namespaces whose
//! connect and disconnect scripts are the shipped hook (`contrib/ocserv-agent-hook.sh` beside the
//! release `ocserv-agent-hook`), the agent beside it with a local policy file, and real
//! openconnect clients. It shows connect-time policy (`policy test`; alice admitted with the
//! routes and DNS of the policy, bob and carol admitted by its default, mallory refused), then
//! the operator's view (list the sessions through the agent, kick one user, the metrics), then
//! the portal's view: a portal (the test double of `tests/support/portal.rs`, plaintext on
//! loopback) got exactly one `ReportConnect` per session and bob's `ReportDisconnect` with the
//! reason `ADMIN_FORCED`, through the agent's durable outbox; and tears everything down.
//!
//! It is also a smoke test: a step that does not behave as shown (alice without her routes,
//! mallory admitted, a decision missing from the metrics) stops the demo with a message saying
//! what was expected and a non-zero exit, after the same complete teardown.
//!
//! Needs root (namespaces, ocserv) and the release binaries `ocserv-agent` and
//! `ocserv-agent-hook` in the directory above this example's.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use eyre::{bail, ensure, eyre, WrapErr};
use support::lab::{Client, Lab, LabOptions, LabUser};

/// What the policy gives alice (as ocserv pushes it to her client) and the reason it refuses
/// mallory with.
const ALICE_ROUTE: &str = "10.99.0.0/16";
const ALICE_DNS: &str = "10.99.0.53";
const MALLORY_REASON: &str = "mallory's access is suspended pending review";

/// The demo's local policy file (`local_policy.path`): everyone ocserv authenticates is
/// admitted, alice with a route and a DNS server of her own, mallory refused.
fn policy_text() -> String {
    format!(
        "default = \"allow\"\n\n\
         [users.alice]\nallow = true\nroutes = [\"{ALICE_ROUTE}\"]\ndns = [\"{ALICE_DNS}\"]\n\n\
         [users.mallory]\nallow = false\nreason = \"{MALLORY_REASON}\"\n"
    )
}

fn step(title: &str) {
    println!("\n==> {title}");
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| match l.is_empty() {
            true => "\n".to_owned(),
            false => format!("    {l}\n"),
        })
        .collect()
}

fn agent_cli(bin: &Path, args: &[&str]) -> eyre::Result<String> {
    let out = Command::new(bin).args(args).stdin(Stdio::null()).output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!(
            "ocserv-agent {} failed ({}): {text}",
            args.join(" "),
            out.status
        );
    }
    Ok(text)
}

fn http_get(addr: &str, path: &str) -> eyre::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
}

fn free_port() -> eyre::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `f` every 100 ms until it yields `Some`, or fails after `timeout` naming `what`.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> eyre::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent process; SIGTERMed and reaped when dropped, also when a step failed or panicked.
struct AgentProcess(Option<Child>);

impl AgentProcess {
    fn stop(&mut self) -> Option<std::io::Result<ExitStatus>> {
        let mut child = self.0.take()?;
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        Some(child.wait())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// What ocserv pushed to a client (openconnect's script environment, [`Client::pushed`]): its
/// routes as `address/prefix` and its DNS servers.
fn pushed(client: &Client) -> eyre::Result<(Vec<String>, Vec<String>)> {
    // The client's script writes the file right after configuring the tun device.
    let text = wait_for(
        &format!("the environment of {}'s openconnect script", client.user),
        Duration::from_secs(5),
        || Some(client.pushed()).filter(|t| !t.is_empty()),
    )?;
    let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let routes = (0..)
        .map_while(|i| {
            let addr = vars.get(format!("CISCO_SPLIT_INC_{i}_ADDR").as_str())?;
            let len = vars
                .get(format!("CISCO_SPLIT_INC_{i}_MASKLEN").as_str())
                .unwrap_or(&"?");
            Some(format!("{addr}/{len}"))
        })
        .collect();
    let dns = vars
        .get("INTERNAL_IP4_DNS")
        .map(|d| d.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    Ok((routes, dns))
}

fn show_client(client: &Client) -> eyre::Result<(Vec<String>, Vec<String>)> {
    let (routes, dns) = pushed(client)?;
    let ip = client
        .vpn_ip()
        .map_or_else(|| "none".to_owned(), |ip| ip.to_string());
    let dns_text = match dns.is_empty() {
        true => "none".to_owned(),
        false => dns.join(", "),
    };
    println!(
        "{}: admitted, VPN address {ip}; ocserv pushed routes {}, DNS {dns_text}",
        client.user,
        routes.join(", ")
    );
    Ok((routes, dns))
}

/// The `ocserv_agent_hook_decisions_total` value for connects with this decision and source.
fn connect_decisions(metrics: &str, decision: &str) -> f64 {
    let prefix = format!(
        "ocserv_agent_hook_decisions_total{{reason=\"connect\",decision=\"{decision}\",source=\"local_policy\"}} "
    );
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn main() -> std::process::ExitCode {
    let started = Instant::now();
    let result = demo();
    println!("\n(took {:.1} s)", started.elapsed().as_secs_f64());
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\n==> DEMO FAILED: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The lab, the steps, and the teardown; an error says which step went wrong, after the
/// teardown.
fn demo() -> eyre::Result<()> {
    let release = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(Path::to_path_buf)
        .ok_or_else(|| eyre!("cannot locate the release directory above this example"))?;
    let bin = release.join("ocserv-agent");
    let hook = release.join("ocserv-agent-hook");
    for b in [&bin, &hook] {
        ensure!(
            b.is_file(),
            "{} is missing: build it first (scripts/demo.sh does: cargo build --release --bin ocserv-agent --bin ocserv-agent-hook --example demo)",
            b.display()
        );
    }

    step("starting a throwaway ocserv in its own network namespace, the agent's hook as its connect-script");
    let lab = Lab::start(LabOptions {
        users: vec![
            LabUser::new("alice", "alice-pw").in_group("staff"),
            LabUser::new("bob", "bob-pw"),
            LabUser::new("carol", "carol-pw"),
            LabUser::new("mallory", "mallory-pw"),
        ],
        hook: Some(hook.clone()),
        ..Default::default()
    })?;
    println!(
        "ocserv listening on {}:{} (namespace {}), control socket {}",
        lab.server_addr,
        lab.port,
        lab.server_ns,
        lab.occtl_socket.display()
    );
    let hook_socket = support::hook::socket(&lab);
    if let Some(script) = &lab.connect_script {
        println!(
            "connect-script = disconnect-script = {} (execs {}), asking on {}",
            script.display(),
            hook.display(),
            hook_socket.display()
        );
    }

    // Dropped in reverse order on a panic too: clients, then the agent, then the lab.
    let mut agent = AgentProcess(None);
    let mut clients = Vec::new();
    // The portal double runs on a runtime of its own for the whole demo.
    let rt = tokio::runtime::Runtime::new().wrap_err("starting a runtime for the portal")?;
    let portal = rt.block_on(support::portal::PortalDouble::start_plain());
    let result = steps(&lab, &bin, &hook_socket, &portal, &mut agent, &mut clients);
    step("tearing down");
    drop(clients);
    println!("openconnect clients stopped");
    match agent.stop() {
        Some(Ok(status)) => println!("agent stopped ({status})"),
        Some(Err(e)) => println!("agent: waiting for it failed: {e}"),
        None => {}
    }
    drop(lab);
    println!("namespaces, ocserv and the lab's files removed");
    result
}

/// Every step after the lab is up; the agent and the clients it starts are left in `agent` and
/// `clients` for the teardown, whatever happens.
fn steps(
    lab: &Lab,
    bin: &Path,
    hook_socket: &Path,
    portal: &support::portal::PortalDouble,
    agent: &mut AgentProcess,
    clients: &mut Vec<Client>,
) -> eyre::Result<()> {
    let policy = lab.dir.join("policy.toml");
    let policy_text = policy_text();
    std::fs::write(&policy, &policy_text).wrap_err("writing the policy file")?;
    step(&format!(
        "starting ocserv-agent with the local policy {}",
        policy.display()
    ));
    print!("{}", indent(&policy_text));
    // The control channel is a Unix socket (root only, checked by peer credentials); the demo
    // keeps it, the hook socket, the policy and the per-user files in the lab's temp dir.
    let grpc = lab.dir.join("agent.sock");
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let config = lab.dir.join("agent.toml");
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = {}\n\n\
             [ocserv]\ncontrol_socket = {}\nreconcile_interval = \"1s\"\n\n\
             [grpc]\nsocket = {}\n\n\
             [hook]\nsocket = {}\n\n\
             [local_policy]\npath = {}\n\n\
             [config_writer]\nper_user_dir = {}\nper_group_dir = {}\n\n\
             [metrics]\nlisten = \"{metrics}\"\n\n\
             [portal]\nendpoint = \"{}\"\nsession_update_interval = \"0s\"\nvalidate_interval = \"0s\"\n",
            q(&lab.dir.join("state")),
            q(&lab.occtl_socket),
            q(&grpc),
            q(hook_socket),
            q(&policy),
            q(&lab.config_per_user_dir),
            q(&lab.config_per_group_dir),
            portal.endpoint,
        ),
    )?;
    let log_path = lab.dir.join("agent.log");
    let log = std::fs::File::create(&log_path)?;
    agent.0 = Some(
        Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .wrap_err_with(|| format!("starting {}", bin.display()))?,
    );
    let agent_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for("the agent to be ready", Duration::from_secs(15), || {
        (http_get(&metrics, "/readyz").map(|r| r.0).unwrap_or(0) == 200).then_some(())
    })
    .wrap_err_with(|| format!("agent log:\n{}", agent_log()))?;
    println!(
        "agent ready: gRPC on the control socket {}, hook socket {}, metrics on http://{metrics}/metrics",
        grpc.display(),
        hook_socket.display()
    );
    // The agent turns the policy's routes and DNS into per-user files at start; ocserv reads
    // alice's when her session opens, before the connect-script asks.
    let alice_file: PathBuf = lab.config_per_user_dir.join("alice");
    wait_for(
        &format!("the agent to write {}", alice_file.display()),
        Duration::from_secs(10),
        || alice_file.exists().then_some(()),
    )
    .wrap_err_with(|| format!("agent log:\n{}", agent_log()))?;

    let cfg = config
        .to_str()
        .ok_or_else(|| eyre!("the lab path is not UTF-8"))?;
    step("ocserv-agent policy test alice --group staff");
    let out = agent_cli(
        bin,
        &[
            "policy", "test", "alice", "--group", "staff", "--config", cfg,
        ],
    )?;
    print!("{out}");
    ensure!(
        out.contains("decision: allow") && out.contains(ALICE_DNS),
        "policy test should admit alice with the DNS server {ALICE_DNS} in her per-user file"
    );
    step("ocserv-agent policy test mallory");
    let out = agent_cli(bin, &["policy", "test", "mallory", "--config", cfg])?;
    print!("{out}");
    ensure!(
        out.contains("decision: deny") && out.contains(MALLORY_REASON),
        "policy test should deny mallory with the policy's reason"
    );

    step("alice connects: admitted with the route and DNS server the policy gives her");
    let alice = lab.connect("alice", "alice-pw")?;
    let (routes, dns) = show_client(&alice)?;
    alice.send_traffic(5)?;
    clients.push(alice);
    ensure!(
        routes.iter().any(|r| r == ALICE_ROUTE),
        "ocserv should have pushed alice the route {ALICE_ROUTE} from the policy; it pushed {routes:?}"
    );
    ensure!(
        dns.iter().any(|d| d == ALICE_DNS),
        "ocserv should have pushed alice the DNS server {ALICE_DNS} from the policy; it pushed {dns:?}"
    );

    step("bob and carol connect: admitted by the policy's default, without alice's route");
    for (u, p) in [("bob", "bob-pw"), ("carol", "carol-pw")] {
        let c = lab.connect(u, p)?;
        let (routes, _) = show_client(&c)?;
        c.send_traffic(5)?;
        clients.push(c);
        ensure!(
            !routes.iter().any(|r| r == ALICE_ROUTE),
            "{u} should not get alice's route {ALICE_ROUTE}; ocserv pushed {routes:?}"
        );
    }

    step("mallory connects: refused by the policy");
    match lab.connect("mallory", "mallory-pw") {
        Ok(c) => {
            clients.push(c);
            bail!("mallory was admitted, but the policy denies her");
        }
        Err(e) => {
            let text = format!("{e:#}");
            let said = text
                .lines()
                .find(|l| l.contains("not acceptable") || l.contains("401"))
                .unwrap_or_else(|| text.lines().next().unwrap_or(""));
            println!("openconnect failed: {}", said.trim());
        }
    }
    let refusal = wait_for(
        "the hook's refusal of mallory in ocserv's log",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(&lab.ocserv_log)
                .unwrap_or_default()
                .lines()
                .find(|l| l.contains("refused by the agent") && l.contains("\"mallory\""))
                .map(str::to_owned)
        },
    )
    .wrap_err("mallory was refused, but not by the agent's policy")?;
    println!("ocserv's log (the hook's stderr): {}", refusal.trim());
    ensure!(
        refusal.contains(MALLORY_REASON),
        "the refusal should carry the policy's reason {MALLORY_REASON:?}"
    );

    step("ocserv-agent sessions");
    // The agent learns of admitted sessions from ocserv at its next reconcile (every second
    // here): wait for it, so the list shows all three.
    wait_for(
        "the agent to list the 3 admitted sessions",
        Duration::from_secs(15),
        || {
            let (_, text) = http_get(&metrics, "/metrics").ok()?;
            text.lines()
                .any(|l| {
                    l == "ocserv_agent_active_sessions 3.0" || l == "ocserv_agent_active_sessions 3"
                })
                .then_some(())
        },
    )?;
    let out = agent_cli(bin, &["sessions", "--config", cfg])?;
    print!("{out}");
    ensure!(
        ["alice", "bob", "carol"].iter().all(|u| out.contains(u)) && !out.contains("mallory"),
        "the agent should list alice, bob and carol, and not mallory"
    );

    step("ocserv-agent disconnect bob");
    print!(
        "{}",
        agent_cli(bin, &["disconnect", "bob", "--config", cfg])?
    );
    let bob = &clients[1];
    let exited = bob.wait_exit(Duration::from_secs(15));
    println!("bob's openconnect exited: {exited}");
    ensure!(exited, "bob's openconnect should exit after the disconnect");

    step("ocserv-agent sessions --user alice --json");
    let out = agent_cli(
        bin,
        &["sessions", "--user", "alice", "--json", "--config", cfg],
    )?;
    print!("{out}");
    ensure!(
        out.contains("\"total_count\": 1"),
        "the agent should list alice's one session"
    );

    step("metrics (excerpt)");
    let (_, text) = http_get(&metrics, "/metrics")?;
    for line in text.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("ocserv_up")
                || l.starts_with("ocserv_agent_active_sessions")
                || l.starts_with("ocserv_total_sessions")
                || l.starts_with("ocserv_agent_ocserv_requests_total")
                || l.starts_with("ocserv_agent_hook_decisions_total")
                || l.starts_with("ocserv_agent_build_info"))
    }) {
        println!("{line}");
    }
    let (allowed, denied) = (
        connect_decisions(&text, "allow"),
        connect_decisions(&text, "deny"),
    );
    ensure!(
        allowed == 3.0 && denied == 1.0,
        "the agent should count 3 admissions and 1 refusal of connects; it counts {allowed} and {denied}"
    );

    step(&format!("what the portal ({}) was told", portal.endpoint));
    use support::portal::Event;
    let done = |e: &[Event]| {
        let connects = e.iter().filter(|e| matches!(e, Event::Connect(_))).count();
        let ends = e
            .iter()
            .filter(|e| matches!(e, Event::Disconnect(_)))
            .count();
        (connects, ends) == (3, 1)
    };
    let events = wait_for(
        "3 connects and bob's disconnect",
        Duration::from_secs(15),
        || {
            let e = portal.unique_events();
            done(&e).then_some(e)
        },
    )
    .wrap_err_with(|| format!("the portal got: {:#?}", portal.events()))?;
    for e in &events {
        let detail = match e {
            Event::Connect(c) => format!(
                "vpn_ip {} connected_at {}",
                c.vpn_ip,
                c.connected_at.unwrap_or_default().seconds
            ),
            Event::Disconnect(d) => {
                let stats = d.stats.unwrap_or_default();
                format!(
                    "reason {:?} after {} s, {} bytes in, {} out",
                    d.reason(),
                    stats.duration_seconds,
                    stats.bytes_received,
                    stats.bytes_sent
                )
            }
            Event::Update(_) => String::new(),
        };
        println!("{e}  {detail}");
    }
    let bob_end = events.iter().find_map(|e| match e {
        Event::Disconnect(d) if d.username == "bob" => Some(d.reason()),
        _ => None,
    });
    use ocserv_agent::metrics::DisconnectReason;
    ensure!(
        bob_end == Some(DisconnectReason::AdminForced),
        "bob's disconnect should be reported as ADMIN_FORCED, got {bob_end:?}"
    );
    Ok(())
}
