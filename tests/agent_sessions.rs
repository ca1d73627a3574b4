//! The first vertical slice against a real ocserv with real openconnect clients: sessions appear
//! through `GetActiveSessions` with the right details and growing counters; `DisconnectUser` really
//! drops clients; unknown users get NOT_FOUND; both backends see the same sessions; UTF-8 names
//! survive the native backend.

mod support;

use std::time::Duration;

use ocserv_agent::ocserv::native::NativeBackend;
use ocserv_agent::ocserv::occtl::OcctlBackend;
use ocserv_agent::ocserv::{BackendKind, OcservBackend};
use ocserv_agent::proto::agent::v1::DisconnectUserRequest;
use support::agent::{self, wait_for};
use support::lab::{Lab, LabOptions, LabUser};

fn lab(users: &[LabUser]) -> Lab {
    Lab::start(LabOptions {
        users: users.to_vec(),
        ..Default::default()
    })
    .expect("lab starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_have_details_and_growing_counters() {
    let lab = lab(&[
        LabUser::new("alice", "pw-alice").in_group("staff"),
        LabUser::new("bob", "pw-bob"),
    ]);
    let alice = lab.connect("alice", "pw-alice").unwrap();
    let bob = lab.connect("bob", "pw-bob").unwrap();
    let a = agent::start(agent::config_for(&lab, BackendKind::Native)).await;
    let mut c = agent::client(&a).await;

    let all = agent::wait_sessions(&mut c, "", 2).await;
    let s = agent::wait_sessions(&mut c, "alice", 1).await.remove(0);
    assert_eq!(s.username, "alice");
    assert_eq!(s.metadata["groupname"], "staff");
    assert_eq!(s.client_ip, lab.client_addr.to_string());
    assert_eq!(s.vpn_ip, alice.vpn_ip().unwrap().to_string());
    assert_eq!(s.session_id, alice_id(&all, "alice"));
    assert_eq!(s.metadata["ocserv_session_id"].len(), 28);
    assert!(s.connected_at.is_some());
    let b = agent::wait_sessions(&mut c, "bob", 1).await.remove(0);
    assert_eq!(b.vpn_ip, bob.vpn_ip().unwrap().to_string());
    assert!(!b.metadata.contains_key("groupname"), "bob has no group");

    // Counters grow with traffic through the tunnel.
    let before = s.bytes_in;
    alice.send_traffic(20).unwrap();
    let after = wait_for("alice's bytes_in to grow", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            let s = agent::sessions(&mut c, "alice").await.ok()?.pop()?;
            (s.bytes_in >= before + 20 * 1000).then_some(s)
        }
    })
    .await;
    assert!(after.bytes_out > 0, "echo replies counted as bytes_out");

    // The operator's CLI shows the same sessions as a table and as JSON.
    let cli = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ocserv-agent"))
            .args(args)
            .output()
            .await
            .expect("run the CLI");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let addr = format!("http://{}", a.grpc_addr.expect("TCP listener"));
    let table = cli(vec!["sessions".into(), "--addr".into(), addr.clone()]).await;
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains("alice") && table.contains("staff") && table.contains("bob"),
        "{table}"
    );
    assert!(table.trim_end().ends_with("2 session(s)"), "{table}");
    let json = cli(vec![
        "sessions".into(),
        "--json".into(),
        "--user".into(),
        "bob".into(),
        "--addr".into(),
        addr,
    ])
    .await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["total_count"], 1);
    assert_eq!(v["sessions"][0]["vpn_ip"], b.vpn_ip);

    // The active-sessions gauge follows the registry.
    let (_, text) = agent::http_get(a.metrics_addr, "/metrics").await;
    assert_eq!(
        agent::metric(&text, "ocserv_agent_active_sessions "),
        Some(2.0)
    );
    assert!(alice.is_alive() && bob.is_alive());
    a.shutdown().await;
}

fn alice_id(all: &[ocserv_agent::proto::agent::v1::VpnSession], user: &str) -> String {
    all.iter()
        .find(|s| s.username == user)
        .map(|s| s.session_id.clone())
        .expect("user listed among all sessions")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_user_drops_clients_and_counts_them() {
    let lab = lab(&[
        LabUser::new("carol", "pw-carol"),
        LabUser::new("dave", "pw-dave"),
    ]);
    let carol = lab.connect("carol", "pw-carol").unwrap();
    let dave1 = lab.connect("dave", "pw-dave").unwrap();
    let dave2 = lab.connect("dave", "pw-dave").unwrap();
    let a = agent::start(agent::config_for(&lab, BackendKind::Native)).await;
    let mut c = agent::client(&a).await;
    agent::wait_sessions(&mut c, "", 3).await;

    // One session of carol.
    let r = c
        .disconnect_user(DisconnectUserRequest {
            username: "carol".into(),
            reason: "test".into(),
            disconnect_all_sessions: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.success);
    assert_eq!(r.sessions_disconnected, 1);
    assert!(
        carol.wait_exit(Duration::from_secs(20)),
        "openconnect for carol exits"
    );

    // Both sessions of dave.
    let r = c
        .disconnect_user(DisconnectUserRequest {
            username: "dave".into(),
            reason: "test".into(),
            disconnect_all_sessions: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.sessions_disconnected, 2);
    assert!(dave1.wait_exit(Duration::from_secs(20)));
    assert!(dave2.wait_exit(Duration::from_secs(20)));

    // ocserv no longer lists them, and neither does the agent.
    wait_for(
        "ocserv to list no session",
        Duration::from_secs(10),
        || async { agent::ocserv_ids(&lab).is_empty().then_some(()) },
    )
    .await;
    agent::wait_sessions(&mut c, "", 0).await;

    // Unknown user, and a name that must never reach ocserv.
    let e = c
        .disconnect_user(DisconnectUserRequest {
            username: "nobody-here".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let e = c
        .disconnect_user(DisconnectUserRequest {
            username: "../etc/passwd".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("username"), "{e:?}");
    // The CLI says the same, with exit code 1.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ocserv-agent"))
        .args(["disconnect", "nobody-here", "--addr"])
        .arg(format!("http://{}", a.grpc_addr.expect("TCP listener")))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NOT_FOUND") && stderr.contains("nobody-here"),
        "{stderr}"
    );
    let e = agent::sessions(&mut c, "a/b").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("username_filter"), "{e:?}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_agree_and_native_keeps_utf8_names() {
    let lab = lab(&[
        LabUser::new("erin", "pw-erin"),
        LabUser::new("jürgen", "pw-jürgen"),
    ]);
    let _e = lab.connect("erin", "pw-erin").unwrap();
    let _j1 = lab.connect("jürgen", "pw-jürgen").unwrap();
    let _j2 = lab.connect("jürgen", "pw-jürgen").unwrap();
    let timeout = Duration::from_secs(5);
    let native = NativeBackend::new(lab.occtl_socket.clone(), timeout);
    let occtl = OcctlBackend::new("/usr/bin/occtl".into(), lab.occtl_socket.clone(), timeout);

    let mut n: Vec<_> = native.list().await.unwrap();
    let mut o: Vec<_> = occtl.list().await.unwrap();
    n.sort_by_key(|s| s.id);
    o.sort_by_key(|s| s.id);
    let ids = |v: &[ocserv_agent::ocserv::Session]| v.iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(ids(&n), ids(&o));
    assert_eq!(ids(&n), agent::ocserv_ids(&lab));
    for (a, b) in n.iter().zip(&o) {
        assert_eq!(a.safe_id, b.safe_id);
        assert_eq!(a.vpn_ipv4, b.vpn_ipv4);
        assert_eq!(a.client_ip, b.client_ip);
        assert_eq!(a.device, b.device);
    }
    // Native keeps raw UTF-8; occtl 1.1.6 mangles it.
    let names: Vec<_> = n.iter().map(|s| s.username.as_str()).collect();
    assert_eq!(
        names.iter().filter(|u| **u == "jürgen").count(),
        2,
        "{names:?}"
    );
    let sessions = native.user_info("jürgen").await.unwrap();
    assert_eq!(sessions.len(), 2);

    // And through the agent's API.
    let a = agent::start(agent::config_for(&lab, BackendKind::Native)).await;
    let mut c = agent::client(&a).await;
    let s = agent::wait_sessions(&mut c, "jürgen", 2).await;
    assert!(s.iter().all(|s| s.username == "jürgen"));
    a.shutdown().await;
}
