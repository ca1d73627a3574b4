//! Chaos: kill and panic every named actor, repeatedly, while a stream of `GetActiveSessions`
//! calls runs. Each actor comes back, every call is answered, the registry equals ocserv's list
//! after one reconcile, no openconnect client is disconnected, and the restart counter moves.
//! Exceeding the restart intensity stops the agent with a non-zero exit code.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ocserv_agent::actors::supervisor::ExitReason;
use ocserv_agent::actors::{Child, GRPC_FRONT_DOOR, METRICS_SERVER, OCSERV_CTL, SESSION_REGISTRY};
use ocserv_agent::messages::RegistryMsg;
use ocserv_agent::ocserv::BackendKind;
use support::agent;
use support::lab::{Lab, LabOptions, LabUser};

/// Panics (ActorFailed) or kills (ActorTerminated) the named actor; see `Child::strike`.
fn strike(name: &'static str, panic: bool) -> ractor::ActorId {
    Child::from_name(name)
        .and_then(|c| c.strike(panic))
        .unwrap_or_else(|| panic!("{name} is not running before the strike"))
}

/// Waits (polling every millisecond) until a new incarnation of `name` is registered.
async fn back_again(name: &'static str, old: ractor::ActorId) -> Duration {
    let t = Instant::now();
    while ractor::registry::where_is(name).is_none_or(|c| c.get_id() == old) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{name} did not restart within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_actor_heals_under_load_without_dropping_sessions() {
    let lab = Lab::start(LabOptions {
        users: vec![LabUser::new("u1", "p1"), LabUser::new("u2", "p2")],
        ..Default::default()
    })
    .unwrap();
    let clients = vec![
        lab.connect("u1", "p1").unwrap(),
        lab.connect("u2", "p2").unwrap(),
        lab.connect("u2", "p2").unwrap(),
    ];
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    // Views stay servable for three intervals (3 s): long enough that the restarts of the
    // registry and the ocserv client among the strikes below fit on a loaded 2-core machine.
    cfg.ocserv.reconcile_interval = Duration::from_secs(1);
    let a = agent::start(cfg).await;
    let mut c = agent::client(&a).await;
    agent::wait_sessions(&mut c, "", 3).await;

    // A stream of queries during the whole run; every call must be answered within its deadline.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let socket = a.grpc_socket.clone();
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                // A fresh connection sometimes, to also cross a front-door restart.
                let r = async {
                    let target = ocserv_agent::cli::Target::Socket(socket.clone());
                    let mut c = ocserv_agent::cli::connect(&target)
                        .await
                        .map_err(|e| e.message)?;
                    agent::sessions(&mut c, "").await.map_err(|e| e.to_string())
                };
                match tokio::time::timeout(Duration::from_secs(5), r).await {
                    Ok(Ok(s)) if s.len() == 3 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(other) => {
                        eprintln!("query answered with {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => panic!("a GetActiveSessions call was not answered within 5 s"),
                };
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            worst
        })
    };

    let mut restart_times = Vec::new();
    for round in 0..3 {
        let mut order = Child::ALL;
        rand::seq::SliceRandom::shuffle(&mut order[..], &mut rand::rng());
        for child in order {
            let name = child.name();
            let old = strike(name, round % 2 == 0);
            restart_times.push((name, back_again(name, old).await));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let worst = load.await.expect("load task");
    let mut times: Vec<_> = restart_times.iter().map(|(_, d)| *d).collect();
    times.sort_unstable();
    eprintln!(
        "restart (crash -> registered again) median {:?} max {:?}",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    eprintln!(
        "queries ok={} not-ok={} worst={worst:?} restarts={restart_times:?}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    // Every call during the kills was answered, and answered successfully.
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "calls answered with an error"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 10,
        "the query stream made progress"
    );

    // After one reconcile the registry equals ocserv's list.
    let cell = ractor::registry::where_is(SESSION_REGISTRY).unwrap();
    let report = ractor::rpc::call(
        &cell,
        RegistryMsg::ReconcileNow,
        Some(Duration::from_secs(5)),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    assert_eq!(report.sessions, 3);
    let mut ids: Vec<u32> = agent::sessions(&mut c, "")
        .await
        .unwrap()
        .iter()
        .map(|s| s.session_id.parse().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, agent::ocserv_ids(&lab));

    // No client was dropped.
    for cl in &clients {
        assert!(cl.is_alive(), "openconnect {} still running", cl.pid);
    }
    // Every actor's restart was counted (3 rounds each).
    let (_, text) = agent::http_get(a.metrics_addr, "/metrics").await;
    for name in [
        OCSERV_CTL,
        SESSION_REGISTRY,
        METRICS_SERVER,
        GRPC_FRONT_DOOR,
    ] {
        let v = agent::metric(
            &text,
            &format!("ocserv_agent_actor_restarts_total{{actor=\"{name}\"}}"),
        );
        assert_eq!(v, Some(3.0), "restart counter for {name} in\n{text}");
    }
    assert_eq!(a.shutdown().await, ExitReason::Shutdown);
}

/// Actors that fail together (the registry restarting while `OcservCtl` is also down) heal
/// without waiting for the next periodic reconcile, here set to a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_crashes_heal_without_waiting_for_the_tick() {
    let lab = Lab::start(LabOptions {
        users: vec![LabUser::new("s1", "p1"), LabUser::new("s2", "p2")],
        ..Default::default()
    })
    .unwrap();
    let clients = [
        lab.connect("s1", "p1").unwrap(),
        lab.connect("s2", "p2").unwrap(),
    ];
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.ocserv.reconcile_interval = Duration::from_secs(60);
    let a = agent::start(cfg).await;
    let mut c = agent::client(&a).await;
    agent::wait_sessions(&mut c, "", 2).await;
    for round in 0..4 {
        // The registry first, so its restart asks for the session list while OcservCtl is gone.
        let strikes = [
            SESSION_REGISTRY,
            OCSERV_CTL,
            METRICS_SERVER,
            GRPC_FRONT_DOOR,
        ];
        let old: Vec<_> = strikes
            .iter()
            .map(|n| (*n, strike(n, round % 2 == 1)))
            .collect();
        let t = Instant::now();
        for (name, id) in old {
            back_again(name, id).await;
        }
        let mut c = agent::client(&a).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match agent::sessions(&mut c, "").await {
                Ok(s) if s.len() == 2 => break,
                other => assert!(
                    Instant::now() < deadline,
                    "round {round}: sessions not listed again within 5 s: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        eprintln!(
            "round {round}: all four struck, serving the full list after {:?}",
            t.elapsed()
        );
    }
    for cl in &clients {
        assert!(cl.is_alive(), "openconnect {} still running", cl.pid);
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_restart_intensity_stops_the_agent_non_zero() {
    let lab = Lab::start(LabOptions::default()).unwrap();
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.supervisor.restart_intensity = 3;
    cfg.supervisor.restart_window = Duration::from_secs(30);
    let mut a = agent::start(cfg).await;
    for _ in 0..3 {
        let old = strike(OCSERV_CTL, false);
        back_again(OCSERV_CTL, old).await;
    }
    strike(OCSERV_CTL, true);
    let reason = tokio::time::timeout(Duration::from_secs(10), a.wait())
        .await
        .expect("the supervisor gives up");
    assert_eq!(
        reason,
        ExitReason::RestartIntensityExceeded { actor: OCSERV_CTL }
    );
    assert_ne!(ocserv_agent::app::exit_code(&reason), 0);
    // Every child was stopped.
    for child in Child::ALL {
        assert!(ractor::registry::where_is(child.name()).is_none());
    }
}

/// A server whose serving task dies is noticed: its actor fails and is restarted. Here the metrics
/// listener is shut down under the agent (accept fails for good), so every restart fails again and
/// the supervisor escalates instead of leaving a live actor that serves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_listener_breaks_fails_and_escalates() {
    use std::os::fd::AsRawFd;
    let lab = Lab::start(LabOptions::default()).unwrap();
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.supervisor.restart_intensity = 3;
    let mut a = agent::start(cfg).await;
    assert_eq!(agent::http_get(a.metrics_addr, "/healthz").await.0, 200);
    let ocserv_agent::serve::Listener::Tcp(l) = &a.ctx.metrics_endpoint.listener else {
        panic!("metrics listens on TCP")
    };
    nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both).unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), a.wait())
        .await
        .expect("the supervisor gives up on a server that cannot serve");
    assert_eq!(
        reason,
        ExitReason::RestartIntensityExceeded {
            actor: METRICS_SERVER
        }
    );
    // It was restarted (not left alive and deaf) before the supervisor gave up.
    let text = a.metrics.encode();
    let restarts = agent::metric(
        &text,
        "ocserv_agent_actor_restarts_total{actor=\"metrics_server\"}",
    );
    assert!(restarts.is_some_and(|n| n >= 1.0), "{text}");
}
