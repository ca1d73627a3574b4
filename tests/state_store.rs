//! The durable state store with the real binary as a process: portal decisions outlive a
//! SIGKILL of the agent (a user admitted before is admitted again from the stale entry while the
//! portal stays down), and a store that cannot be opened stops the start with exit code 74,
//! leaving the file as it was.
//!
//! Hermetic: every agent gets an empty configuration file and its sockets and state directory
//! in a temporary directory (`support::agent::agent_cmd`); the fake ocserv and the portal double
//! run in this process, on loopback and Unix sockets.

mod support;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ocserv_agent::hook_proto::HookResponse;
use ocserv_agent::ocserv::fake::FakeOcserv;
use ocserv_agent::policy::Source;
use ocserv_agent::store::EventKind;
use support::agent::{self, agent_cmd, free_port, wait_for};
use support::hook;
use support::portal::PortalDouble;

/// The agent as a process, deciding with the portal at `endpoint` (fail mode `stale`, a fresh
/// lifetime of 1 s), its metrics on `metrics`.
fn spawn_agent(dir: &Path, ocserv: &Path, endpoint: &str, metrics: u16) -> Child {
    agent_cmd(dir, &["run"])
        .env("OCSERV_AGENT__OCSERV__CONTROL_SOCKET", ocserv)
        .env(
            "OCSERV_AGENT__METRICS__LISTEN",
            format!("127.0.0.1:{metrics}"),
        )
        .env("OCSERV_AGENT__POLICY__SOURCE", "portal")
        .env("OCSERV_AGENT__POLICY__FAIL_MODE", "stale")
        .env("OCSERV_AGENT__POLICY__ALLOW_TTL", "1s")
        .env("OCSERV_AGENT__PORTAL__ENDPOINT", endpoint)
        .env("OCSERV_AGENT__PORTAL__CALL_TIMEOUT", "300ms")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A temporary directory for the agent, a fake ocserv, the portal double and where the agent
/// will answer.
struct Setup {
    dir: tempfile::TempDir,
    fake: FakeOcserv,
    portal: PortalDouble,
    endpoint: String,
    /// The agent's hook socket.
    socket: std::path::PathBuf,
    /// The agent's metrics port.
    metrics: u16,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let portal = PortalDouble::start_plain().await;
        Setup {
            fake: FakeOcserv::with_sessions(vec![]),
            endpoint: portal.config().endpoint.expect("the double's endpoint"),
            socket: dir.path().join("hook.sock"),
            metrics: free_port(),
            portal,
            dir,
        }
    }
}

/// Asks the agent's hook socket about a connect of `user`, retrying while the socket is not
/// there yet (the agent starting).
async fn ask(socket: &Path, user: &str, id: u32) -> HookResponse {
    let frame = hook::connect(user, "", id);
    let socket = socket.to_path_buf();
    wait_for(
        &format!("an answer for {user}"),
        Duration::from_secs(20),
        || {
            let (socket, frame) = (socket.clone(), frame.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    std::os::unix::net::UnixStream::connect(&socket)
                        .ok()
                        .and_then(|_| hook::exchange(&socket, &frame))
                })
                .await
                .unwrap()
            }
        },
    )
    .await
}

async fn stored_writes(metrics: u16) -> f64 {
    let addr = format!("127.0.0.1:{metrics}").parse().unwrap();
    let (_, text) = agent::http_get(addr, "/metrics").await;
    agent::metric(
        &text,
        "ocserv_agent_store_writes_total{table=\"policy_decisions\",status=\"ok\"}",
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_survives_sigkill_and_serves_as_stale_while_the_portal_stays_down() {
    let Setup {
        dir,
        fake,
        portal,
        endpoint,
        socket,
        metrics,
    } = Setup::new().await;

    let mut first = spawn_agent(dir.path(), fake.socket(), &endpoint, metrics);
    let fresh = ask(&socket, "ana", 1).await;
    assert_eq!((fresh.allowed, fresh.source), (true, Some(Source::Fresh)));
    assert_eq!(portal.calls("ana"), 1);
    wait_for(
        "ana's decision in the store",
        Duration::from_secs(10),
        || async { (stored_writes(metrics).await >= 1.0).then_some(()) },
    )
    .await;
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();

    // The portal goes down and stays down; the agent starts again on the same state directory.
    portal.stop().await;
    let mut second = spawn_agent(dir.path(), fake.socket(), &endpoint, metrics);
    let started = Instant::now();
    let again = ask(&socket, "ana", 2).await;
    // Fresh for 1 s after the portal's answer; by now (a process start later) usually stale.
    assert!(again.allowed, "admitted from the kept decision: {again:?}");
    assert!(
        matches!(again.source, Some(Source::Stale | Source::Cached)),
        "{again:?}"
    );
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(started.elapsed())).await;
    let stale = ask(&socket, "ana", 3).await;
    assert_eq!((stale.allowed, stale.source), (true, Some(Source::Stale)));
    let never_seen = ask(&socket, "noor", 4).await;
    assert_eq!(
        (never_seen.allowed, never_seen.source),
        (false, Some(Source::FailClosed)),
        "a user never admitted is denied"
    );
    assert_eq!(
        portal.calls("ana"),
        1,
        "the portal was down: no call reached it"
    );
    second.kill().unwrap();
    second.wait().unwrap();
}

/// Runs the agent on `state_dir` and returns its exit status and stderr.
fn run_with_state_dir(dir: &Path, state_dir: &Path) -> (Option<i32>, String) {
    let fake = FakeOcserv::with_sessions(vec![]);
    let out = agent_cmd(dir, &["run"])
        .env("OCSERV_AGENT__OCSERV__CONTROL_SOCKET", fake.socket())
        .env("OCSERV_AGENT__METRICS__LISTEN", "127.0.0.1:0")
        .env("OCSERV_AGENT__AGENT__STATE_DIR", state_dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `check-config`'s line about the store.
fn check_config_says(dir: &Path, state_dir: &Path) -> String {
    let out = agent_cmd(dir, &["check-config"])
        .env("OCSERV_AGENT__AGENT__STATE_DIR", state_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("# state store: "))
        .unwrap_or_else(|| panic!("no state store line:\n{text}"))
        .to_owned()
}

#[test]
fn a_store_that_cannot_be_opened_stops_the_start_with_code_74_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = state.join("state.redb");
    assert_eq!(
        check_config_says(dir.path(), &state),
        format!(
            "# state store: {} (created at the first start)",
            file.display()
        )
    );
    // A file that is not a store (corruption, or something else at the path).
    std::fs::create_dir(&state).unwrap();
    let junk = vec![0x5a_u8; 16 * 1024];
    std::fs::write(&file, &junk).unwrap();
    let (code, stderr) = run_with_state_dir(dir.path(), &state);
    assert_eq!(code, Some(74), "{stderr}");
    assert!(
        stderr.contains("agent.state_dir: cannot open the state store")
            && stderr.contains(&file.display().to_string()),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        junk,
        "never replaced by an empty store"
    );
    assert_eq!(
        check_config_says(dir.path(), &state),
        format!("# state store: {} (exists)", file.display())
    );
    assert!(!dir.path().join("agent.sock").exists(), "nothing started");

    // A state directory that cannot be created.
    let blocker = dir.path().join("plain-file");
    std::fs::write(&blocker, "x").unwrap();
    let (code, stderr) = run_with_state_dir(dir.path(), &blocker.join("state"));
    assert_eq!(code, Some(74), "{stderr}");
    assert!(
        stderr.contains("agent.state_dir: cannot create"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_disconnect_user_call_is_in_the_audit_log_with_its_caller_and_result() {
    use ocserv_agent::ocserv::fake;
    use ocserv_agent::proto::agent::v1::DisconnectUserRequest;
    let dir = tempfile::tempdir().unwrap();
    let ocserv = FakeOcserv::with_sessions(vec![fake::session(0, "lo")]);
    let a = agent::start(agent::config_in(dir.path(), ocserv.socket())).await;
    let mut c = agent::client(&a).await;
    let user = fake::username(0);
    let kicked = c
        .disconnect_user(DisconnectUserRequest {
            username: user.clone(),
            reason: "audit test".into(),
            disconnect_all_sessions: true,
        })
        .await
        .expect("disconnected")
        .into_inner();
    assert_eq!(kicked.sessions_disconnected, 1);
    for bad in ["nobody", "../etc"] {
        let e = c
            .disconnect_user(DisconnectUserRequest {
                username: bad.into(),
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_ne!(e.code(), tonic::Code::Ok);
    }
    let records = wait_for("three audit records", Duration::from_secs(10), || {
        let got = a.ctx.store.audit(10).unwrap();
        async move { (got.len() == 3).then_some(got) }
    })
    .await;
    let caller = format!("uid 0 pid {}", std::process::id());
    for (_, r) in &records {
        assert_eq!(r.action, "DisconnectUser");
        assert_eq!(r.caller, caller);
        assert!(r.at_ms > 1_700_000_000_000, "{r:?}");
    }
    let (first, second, third) = (&records[0].1, &records[1].1, &records[2].1);
    assert_eq!(first.args["username"], user);
    assert_eq!(first.args["reason"], "audit test");
    assert_eq!(first.args["disconnect_all_sessions"], "true");
    assert_eq!(first.result, "ok: 1 session(s) disconnected");
    assert_eq!(second.args["username"], "nobody");
    assert!(second.result.starts_with("error NOT_FOUND: "), "{second:?}");
    assert_eq!(third.args["username"], "../etc");
    assert!(
        third.result.starts_with("error INVALID_ARGUMENT: username"),
        "{third:?}"
    );
    assert!(records
        .windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1.at_ms <= w[1].1.at_ms));
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_survives_sigkill_during_writes() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    let Setup {
        dir,
        fake,
        portal,
        endpoint,
        socket,
        metrics,
    } = Setup::new().await;
    // Events stay in the outbox: the portal takes no event.
    portal.set_event_answer(false);
    let asked = Arc::new(AtomicU32::new(0));
    const ROUNDS: u32 = 12;
    for round in 0..ROUNDS {
        let mut child = spawn_agent(dir.path(), fake.socket(), &endpoint, metrics);
        // The store opened (else the agent would have exited 74 and never answered).
        let first = ask(&socket, &format!("r{round}"), 1).await;
        assert!(first.allowed, "round {round}: {first:?}");
        // A storm of new users: every answer is a decision written to the store.
        let stop = Arc::new(AtomicBool::new(false));
        let storm: Vec<_> = (0..3)
            .map(|t| {
                let (stop, asked, socket) = (stop.clone(), asked.clone(), socket.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let n = asked.fetch_add(1, Ordering::Relaxed);
                        let frame = hook::connect(&format!("s{t}-{n}"), "", n);
                        // Its end, reported before ocserv was asked about it: a connect and
                        // a disconnect for the outbox in one transaction.
                        let end = hook::frame(&format!(
                            r#"{{"reason":"disconnect","username":"s{t}-{n}","session_id":{n},"stats_duration":"1"}}"#
                        ));
                        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                            let _ = std::panic::catch_unwind(|| hook::exchange(&socket, &frame));
                            let _ = std::panic::catch_unwind(|| hook::exchange(&socket, &end));
                        }
                    }
                })
            })
            .collect();
        wait_for("writes under way", Duration::from_secs(10), || async {
            (stored_writes(metrics).await >= 2.0).then_some(())
        })
        .await;
        // Kill at a different moment of the write cycle each round.
        tokio::time::sleep(Duration::from_millis(u64::from(round * 37 % 150))).await;
        child.kill().unwrap(); // SIGKILL, writes in flight
        child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for t in storm {
            t.join().unwrap();
        }
    }
    assert!(
        asked.load(Ordering::Relaxed) > 100,
        "the storm asked too little"
    );
    // The file opens, and every entry in it reads back as a decision.
    let store = ocserv_agent::store::Store::open(&dir.path().join("state")).expect("store opens");
    let loaded = store
        .load_decisions(std::time::SystemTime::now(), usize::MAX, |_, _| true)
        .expect("readable");
    assert_eq!(loaded.dropped, 0, "no unreadable entry");
    assert!(
        loaded.decisions.len() >= ROUNDS as usize,
        "each round's first decision was kept before the kill: {}",
        loaded.decisions.len()
    );
    for round in 0..ROUNDS {
        let name = format!("r{round}");
        assert!(
            loaded.decisions.iter().any(|d| d.username == name),
            "{name} was written before its round's kill"
        );
    }
    // Every outbox entry reads back, and each session's connect and disconnect were kept
    // together, in order (never one without the other).
    let outbox = store.outbox_peek(usize::MAX).expect("readable");
    assert!(outbox.unreadable.is_empty(), "{:?}", outbox.unreadable);
    assert!(
        outbox.events.len() >= 20,
        "events were written: {}",
        outbox.events.len()
    );
    let mut per_session: std::collections::HashMap<String, Vec<EventKind>> = Default::default();
    for (_, e) in &outbox.events {
        per_session
            .entry(e.session.username.clone())
            .or_default()
            .push(e.kind);
    }
    for (user, kinds) in &per_session {
        assert_eq!(
            kinds,
            &[EventKind::Connect, EventKind::Disconnect],
            "{user}"
        );
    }
    assert!(store.live_sessions().unwrap().is_empty());
}
