//! Bounds and identity under contention, against a real ocserv whose main process the test freezes
//! (SIGSTOP: its control socket accepts connections but answers nothing) to hold calls in flight:
//! - concurrent kicks of one session count once;
//! - `grpc.max_concurrent_requests`, `grpc.request_timeout`, and `ocserv.max_in_flight` /
//!   `ocserv.max_queued` each refuse or answer in time instead of hanging;
//! - an ordered shutdown lets a call in flight finish, and one that cannot finish within the
//!   grace is reported as a failed shutdown.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ocserv_agent::actors::supervisor::ExitReason;
use ocserv_agent::ocserv::BackendKind;
use ocserv_agent::proto::agent::v1::{DisconnectUserRequest, GetActiveSessionsRequest};
use support::agent;
use support::lab::{Lab, LabOptions, LabUser};
use tonic::Code;

/// ocserv's main process stopped until dropped (also on panic).
struct Frozen(Pid);

impl Frozen {
    fn ocserv(lab: &Lab) -> Self {
        let pid = Pid::from_raw(lab.ocserv_pid().expect("ocserv runs") as i32);
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP ocserv");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

fn lab(users: &[&str]) -> Lab {
    Lab::start(LabOptions {
        users: users.iter().map(|u| LabUser::new(u, "pw")).collect(),
        ..Default::default()
    })
    .expect("lab starts")
}

fn kick(user: &str) -> DisconnectUserRequest {
    DisconnectUserRequest {
        username: user.into(),
        reason: "test".into(),
        disconnect_all_sessions: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_kicks_of_one_session_count_once() {
    let lab = lab(&["solo"]);
    let client = lab.connect("solo", "pw").unwrap();
    let a = agent::start(agent::config_for(&lab, BackendKind::Native)).await;
    let c = agent::client(&a).await;
    agent::wait_sessions(&mut c.clone(), "solo", 1).await;
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { c.disconnect_user(kick("solo")).await })
        })
        .collect();
    let mut ones = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(r.sessions_disconnected, 1, "OK must mean one kick: {r:?}");
                ones += 1;
            }
            Err(s) => assert_eq!(s.code(), Code::NotFound, "{s:?}"),
        }
    }
    assert_eq!(ones, 1, "exactly one caller disconnected the session");
    assert!(
        client.wait_exit(Duration::from_secs(10)),
        "openconnect exits"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_requests_refuses_the_overflow_and_health_never_waits() {
    let lab = lab(&["u1"]);
    let _client = lab.connect("u1", "pw").unwrap();
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.grpc.max_concurrent_requests = 1;
    cfg.grpc.request_timeout = Duration::from_secs(5);
    cfg.ocserv.request_timeout = Duration::from_secs(3);
    let a = agent::start(cfg).await;
    let c = agent::client(&a).await;
    agent::wait_sessions(&mut c.clone(), "u1", 1).await;

    let frozen = Frozen::ocserv(&lab);
    // Holds the only slot: it waits on the frozen ocserv.
    let mut holder = c.clone();
    let held = tokio::spawn(async move { holder.disconnect_user(kick("u1")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The registry answers from memory, so without the limit this call would succeed.
    let t = Instant::now();
    let e = c
        .clone()
        .get_active_sessions(GetActiveSessionsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_concurrent_requests"), "{e:?}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "refused, not left to hang"
    );
    // Health checks are not behind the limit.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        ocserv_agent::cli::connect_channel(&ocserv_agent::cli::Target::Socket(
            a.grpc_socket.clone(),
        ))
        .await
        .unwrap(),
    );
    let h = tokio::time::timeout(
        Duration::from_secs(2),
        health.check(tonic_health::pb::HealthCheckRequest::default()),
    )
    .await
    .expect("health answers while the limit is reached");
    assert!(h.is_ok(), "{h:?}");
    drop(frozen);
    let _ = held.await.unwrap();
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_answers_before_a_slow_ocserv_does() {
    let lab = lab(&["u1"]);
    let client = lab.connect("u1", "pw").unwrap();
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.grpc.request_timeout = Duration::from_millis(600);
    cfg.ocserv.request_timeout = Duration::from_secs(8);
    let a = agent::start(cfg).await;
    let mut c = agent::client(&a).await;
    agent::wait_sessions(&mut c, "u1", 1).await;
    let frozen = Frozen::ocserv(&lab);
    let t = Instant::now();
    let e = c.disconnect_user(kick("u1")).await.unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        took < Duration::from_secs(4),
        "answered within grpc.request_timeout, not ocserv's 8 s ({took:?})"
    );
    drop(frozen);
    assert!(client.is_alive(), "nothing was kicked");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_ocserv_beyond_the_bound_are_refused() {
    let lab = lab(&["u1"]);
    let _client = lab.connect("u1", "pw").unwrap();
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.ocserv.max_in_flight = 1;
    cfg.ocserv.max_queued = 0;
    cfg.ocserv.request_timeout = Duration::from_secs(3);
    // Keep the registry's own reconcile from taking the slot first.
    cfg.ocserv.reconcile_interval = Duration::from_secs(60);
    let a = agent::start(cfg).await;
    let c = agent::client(&a).await;
    agent::wait_sessions(&mut c.clone(), "u1", 1).await;
    let frozen = Frozen::ocserv(&lab);
    let mut first = c.clone();
    let held = tokio::spawn(async move { first.disconnect_user(kick("u1")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let e = c.clone().disconnect_user(kick("u1")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("ocserv"), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "refused at once");
    let text = a.metrics.encode();
    assert!(
        text.contains(
            "ocserv_agent_ocserv_requests_total{command=\"user_info\",status=\"refused\"} 1"
        ),
        "{text}"
    );
    drop(frozen);
    let _ = held.await.unwrap();
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_call_in_flight_finish() {
    let lab = lab(&["u1"]);
    let client = lab.connect("u1", "pw").unwrap();
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.ocserv.request_timeout = Duration::from_secs(5);
    cfg.grpc.request_timeout = Duration::from_secs(8);
    cfg.supervisor.shutdown_grace = Duration::from_secs(8);
    let a = agent::start(cfg).await;
    let c = agent::client(&a).await;
    agent::wait_sessions(&mut c.clone(), "u1", 1).await;
    let frozen = Frozen::ocserv(&lab);
    let mut caller = c.clone();
    let call = tokio::spawn(async move { caller.disconnect_user(kick("u1")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let socket = a.grpc_socket.clone();
    let stop = tokio::spawn(a.shutdown());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The agent stopped accepting...
    assert!(
        tokio::net::UnixStream::connect(&socket).await.is_err(),
        "no new connections while draining"
    );
    // ...and the call it had accepted completes once ocserv answers.
    drop(frozen);
    let r = call
        .await
        .unwrap()
        .expect("the call in flight is answered, not cut");
    assert_eq!(r.into_inner().sessions_disconnected, 1);
    assert_eq!(stop.await.unwrap(), ExitReason::Shutdown);
    assert!(client.wait_exit(Duration::from_secs(10)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_cuts_a_call_reports_failure() {
    let lab = lab(&["u1"]);
    let _client = lab.connect("u1", "pw").unwrap();
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.ocserv.request_timeout = Duration::from_secs(10);
    cfg.grpc.request_timeout = Duration::from_secs(20);
    cfg.supervisor.shutdown_grace = Duration::from_millis(500);
    let a = agent::start(cfg).await;
    let c = agent::client(&a).await;
    agent::wait_sessions(&mut c.clone(), "u1", 1).await;
    let _frozen = Frozen::ocserv(&lab);
    let mut caller = c.clone();
    let _call = tokio::spawn(async move { caller.disconnect_user(kick("u1")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reason = a.shutdown().await;
    assert_eq!(reason, ExitReason::ShutdownTimedOut);
    assert_ne!(ocserv_agent::app::exit_code(&reason), 0);
}
