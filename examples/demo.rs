//! The quick-start demo (`scripts/demo.sh`): a throwaway ocserv in network namespaces with a few
//! real openconnect clients, the agent beside it, then the operator's view: list the sessions
//! through the agent, kick one user, show the metrics, and tear everything down.
//!
//! Needs root (namespaces, ocserv) and the release binary next to this example.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::lab::{Lab, LabOptions, LabUser};

fn step(title: &str) {
    println!("\n==> {title}");
}

fn agent_cli(bin: &std::path::Path, args: &[&str]) -> eyre::Result<String> {
    let out = Command::new(bin).args(args).stdin(Stdio::null()).output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        eyre::bail!(
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

fn main() -> eyre::Result<()> {
    let bin = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("ocserv-agent"))
        .ok_or_else(|| eyre::eyre!("cannot locate the ocserv-agent binary"))?;

    step("starting a throwaway ocserv in its own network namespace");
    let lab = Lab::start(LabOptions {
        users: vec![
            LabUser::new("alice", "alice-pw").in_group("staff"),
            LabUser::new("bob", "bob-pw"),
            LabUser::new("carol", "carol-pw"),
        ],
        ..Default::default()
    })?;
    println!(
        "ocserv listening on {}:{} (namespace {}), control socket {}",
        lab.server_addr,
        lab.port,
        lab.server_ns,
        lab.occtl_socket.display()
    );

    step("connecting three openconnect clients (namespace for clients)");
    let mut clients = Vec::new();
    for (u, p) in [
        ("alice", "alice-pw"),
        ("bob", "bob-pw"),
        ("carol", "carol-pw"),
    ] {
        let c = lab.connect(u, p)?;
        println!("{u}: connected, VPN address {:?}", c.vpn_ip());
        c.send_traffic(5)?;
        clients.push(c);
    }

    step("starting ocserv-agent");
    // The control channel is a Unix socket (root only, checked by peer credentials); the demo
    // keeps it in the lab's temp dir.
    let grpc = lab.dir.join("agent.sock");
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let config = lab.dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[ocserv]\ncontrol_socket = {:?}\nreconcile_interval = \"1s\"\n\n[grpc]\nsocket = {:?}\n\n[hook]\nsocket = {:?}\n\n[metrics]\nlisten = \"{metrics}\"\n",
            lab.occtl_socket.display().to_string(),
            grpc.display().to_string(),
            lab.dir.join("hook.sock").display().to_string()
        ),
    )?;
    let log = std::fs::File::create(lab.dir.join("agent.log"))?;
    let mut agent = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let cfg = config.to_str().unwrap_or_default();
    let result = (|| -> eyre::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while http_get(&metrics, "/readyz").map(|r| r.0).unwrap_or(0) != 200 {
            if Instant::now() > deadline {
                eyre::bail!(
                    "the agent did not become ready; see {}",
                    lab.dir.join("agent.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "agent ready: gRPC on the control socket {}, metrics on http://{metrics}/metrics",
            grpc.display()
        );

        step("ocserv-agent sessions");
        print!("{}", agent_cli(&bin, &["sessions", "--config", cfg])?);

        step("ocserv-agent disconnect bob");
        print!(
            "{}",
            agent_cli(&bin, &["disconnect", "bob", "--config", cfg])?
        );
        let bob = &clients[1];
        println!(
            "bob's openconnect exited: {}",
            bob.wait_exit(Duration::from_secs(15))
        );

        step("ocserv-agent sessions --user alice --json");
        print!(
            "{}",
            agent_cli(
                &bin,
                &["sessions", "--user", "alice", "--json", "--config", cfg]
            )?
        );

        step("metrics (excerpt)");
        let (_, text) = http_get(&metrics, "/metrics")?;
        for line in text.lines().filter(|l| {
            !l.starts_with('#')
                && (l.starts_with("ocserv_up")
                    || l.starts_with("ocserv_agent_active_sessions")
                    || l.starts_with("ocserv_total_sessions")
                    || l.starts_with("ocserv_agent_ocserv_requests_total")
                    || l.starts_with("ocserv_agent_build_info"))
        }) {
            println!("{line}");
        }
        Ok(())
    })();

    step("tearing down");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = agent.wait()?;
    println!("agent stopped ({status})");
    drop(clients);
    drop(lab);
    println!("namespaces, ocserv and clients removed");
    result
}
