//! Smoke test of the real-ocserv test lab (`tests/support/lab.rs`): users (one in a group, one
//! with a UTF-8 name), three live openconnect sessions, traffic through a tunnel, a client
//! leaving, an ocserv restart, and complete clean-up after drop. Needs root and ocserv; it
//! fails with a clear message otherwise.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use eyre::{bail, ensure, eyre, Result, WrapErr};
use support::{Lab, LabOptions, LabUser};

/// `occtl -j show users` parsed; fails on a non-zero exit or invalid JSON.
fn users(lab: &Lab, in_server_ns: bool) -> Result<Vec<serde_json::Value>> {
    let args = ["-j", "show", "users"];
    let out = if in_server_ns {
        lab.occtl_in_server_ns(&args)?
    } else {
        lab.occtl(&args)?
    };
    ensure!(
        out.status.success(),
        "occtl -j show users failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).wrap_err("parsing occtl -j show users")?;
    v.as_array()
        .cloned()
        .ok_or_else(|| eyre!("occtl -j show users is not an array: {v}"))
}

fn field<'a>(u: &'a serde_json::Value, key: &str) -> &'a str {
    u.get(key).and_then(|v| v.as_str()).unwrap_or("")
}

/// occtl 1.1.6 turns every byte >= 0x80 of a JSON string into U+00FF (reference/ocserv.md §2,
/// quirk 7), so a UTF-8 name appears mangled there.
fn occtl_json_name(name: &str) -> String {
    name.bytes()
        .map(|b| if b >= 0x80 { '\u{ff}' } else { char::from(b) })
        .collect()
}

#[test]
fn lab_smoke() -> Result<()> {
    let started = Instant::now();
    let utf8 = "jürgen";
    let mut lab = Lab::start(LabOptions {
        users: vec![
            LabUser::new("alice", "pw-alice").in_group("staff"),
            LabUser::new(utf8, "pw-jürgen"),
        ],
        ..LabOptions::default()
    })?;
    let slot_file = lab.slot_file();
    let (server_ns, client_ns, dir) = (
        lab.server_ns.clone(),
        lab.client_ns.clone(),
        lab.dir.clone(),
    );
    assert!(
        slot_file.exists(),
        "slot marker {} missing",
        slot_file.display()
    );
    assert_eq!(
        std::fs::read_to_string(&slot_file)?.trim(),
        std::process::id().to_string(),
        "slot marker holds the owner pid"
    );

    let wrong = lab.connect("alice", "not-the-password");
    assert!(wrong.is_err(), "a wrong password must not connect");

    let a1 = lab.connect("alice", "pw-alice")?;
    let mut a2 = lab.connect("alice", "pw-alice")?;
    let j = lab.connect(utf8, "pw-jürgen")?;
    let clients = [&a1, &a2, &j];
    let ips: Vec<_> = clients.iter().map(|c| c.vpn_ip()).collect();
    assert!(
        ips.iter().all(Option::is_some),
        "every client has a VPN address: {ips:?}"
    );
    assert!(
        ips.iter()
            .all(|ip| lab.vpn_network.contains(&ip.unwrap_or(lab.server_addr))),
        "VPN addresses {ips:?} come from {}",
        lab.vpn_network
    );

    let list = users(&lab, false)?;
    assert_eq!(list.len(), 3, "three sessions: {list:#?}");
    let mut names: Vec<&str> = list.iter().map(|u| field(u, "Username")).collect();
    names.sort_unstable();
    let mangled = occtl_json_name(utf8);
    assert_eq!(
        names,
        ["alice", "alice", mangled.as_str()],
        "usernames in {list:#?}"
    );
    for u in &list {
        assert_eq!(field(u, "State"), "connected");
        assert_eq!(field(u, "Remote IP"), lab.client_addr.to_string());
        assert!(
            field(u, "Device").starts_with(&lab.device_prefix),
            "device of {u}"
        );
        let group = if field(u, "Username") == "alice" {
            "staff"
        } else {
            "(none)"
        };
        assert_eq!(field(u, "Groupname"), group, "group of {u}");
    }
    // The text output and the lookup by name keep the raw UTF-8 name.
    let by_name = lab.occtl(&["show", "user", utf8])?;
    assert!(
        by_name.status.success(),
        "occtl show user {utf8}: {by_name:?}"
    );
    assert!(
        String::from_utf8_lossy(&by_name.stdout).contains(utf8),
        "occtl show user prints the UTF-8 name: {}",
        String::from_utf8_lossy(&by_name.stdout)
    );

    // Traffic through one tunnel shows up on that session's counters only.
    j.send_traffic(20)?;
    let j_ip = j.vpn_ip().map(|ip| ip.to_string()).unwrap_or_default();
    let counters = users(&lab, true)?;
    let j_session = counters
        .iter()
        .find(|u| field(u, "IPv4") == j_ip)
        .ok_or_else(|| eyre!("no session with IPv4 {j_ip} in {counters:#?}"))?;
    let rx: u64 = field(j_session, "RX").parse().unwrap_or(0);
    assert!(
        rx >= 20 * 1000,
        "RX of {utf8}'s session is {rx}, expected >= 20000"
    );

    // A client leaving disappears from ocserv.
    a2.stop();
    assert!(!a2.is_alive(), "stopped client still alive");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = users(&lab, false)?.len();
        if n == 2 {
            break;
        }
        if Instant::now() >= deadline {
            bail!("after stopping one client ocserv still lists {n} sessions");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // Restart: same config and sockets; users added while running can log in.
    let old_pid = lab
        .ocserv_pid()
        .ok_or_else(|| eyre!("ocserv pid unknown"))?;
    lab.stop_ocserv()?;
    assert_eq!(lab.ocserv_pid(), None);
    assert!(
        !lab.occtl(&["show", "status"])?.status.success(),
        "occtl answers after stop"
    );
    lab.start_ocserv()?;
    let new_pid = lab
        .ocserv_pid()
        .ok_or_else(|| eyre!("ocserv pid unknown after restart"))?;
    assert_ne!(old_pid, new_pid);
    lab.add_user(&LabUser::new("carol", "pw-carol"))?;
    let c = lab.connect("carol", "pw-carol")?;
    c.send_traffic(3)?;

    let client_pids = [a1.pid, j.pid, c.pid];
    drop(lab);
    let netns = Command::new("ip").args(["netns", "list"]).output()?;
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !netns
            .lines()
            .any(|l| l.starts_with(&server_ns) || l.starts_with(&client_ns)),
        "namespaces left behind: {netns}"
    );
    assert!(
        !slot_file.exists(),
        "slot file {} left behind",
        slot_file.display()
    );
    assert!(!dir.exists(), "lab dir {} left behind", dir.display());
    for client in [&a1, &j, &c] {
        assert!(
            !client.is_alive(),
            "client pid {} survived the lab",
            client.pid
        );
    }
    eprintln!(
        "clients {client_pids:?} gone; lab smoke took {:?}",
        started.elapsed()
    );
    Ok(())
}
