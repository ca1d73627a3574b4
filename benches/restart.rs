//! DESIGN §6: "actor crash → serving again < 10 ms; process restart → ready < 1 s".
//!
//! Part 1, actor restarts (in-process): the agent runs with `ocserv_agent::app::start` against
//! the fake ocserv of `common` (10 sessions). Each named actor is struck `STRIKES` times by
//! `kill()` (arrives at the supervisor as ActorTerminated) and `STRIKES` times by its `Crash`
//! message (a panic in its handler: ActorFailed), strikes `SPACING` apart. The clock starts just
//! before the strike and stops when a new incarnation is registered under the actor's name AND
//! has answered a request made after the registration:
//! - `ocserv_ctl`: a STATUS call through it (one round trip to the fake ocserv);
//! - `session_registry`: a Query answered with `synced = true` (the new incarnation rebuilds
//!   from ocserv in `pre_start` before it answers anything);
//! - `metrics_server`: `GET /healthz` on a fresh TCP connection;
//! - `grpc_front_door`: GetActiveSessions on a fresh gRPC connection.
//!
//! `supervisor.restart_window` is set to 200 ms (intensity 10 000) and strikes are 250 ms apart,
//! so every restart uses the first backoff step: `supervisor.restart_backoff_initial` with equal
//! jitter (a delay between half of it and all of it, printed with the figures) is part of every
//! figure. Baseline rows time the same request with no strike, to show what the restart adds.
//! A last row repeats the registry strikes with 10 000 sessions in the fake.
//!
//! Part 2, process restart: the release binary is spawned against the fake ocserv and
//! `/readyz` is polled every millisecond until it answers 200 (ready = ocserv answered); then it
//! gets SIGTERM and the exit is timed. `PROCESS_RUNS` runs after `PROCESS_WARMUP` unrecorded ones.
//!
//! Bounded: fixed strike and run counts, every wait has a deadline (5 s per restart, 10 s per
//! process start). Only loopback and a Unix socket in a temp dir are used.

mod common;

use std::time::{Duration, Instant};

use common::{report, ChildAgent, Devices, FakeOcserv};
use ocserv_agent::actors::{
    call, Child, GRPC_FRONT_DOOR, METRICS_SERVER, OCSERV_CTL, SESSION_REGISTRY,
};
use ocserv_agent::messages::{CtlMsg, RegistryMsg};
use ocserv_agent::proto::agent::v1::vpn_agent_service_client::VpnAgentServiceClient;
use ocserv_agent::proto::agent::v1::GetActiveSessionsRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STRIKES: usize = 20;
const SPACING: Duration = Duration::from_millis(250);
const RESTART_WINDOW: Duration = Duration::from_millis(200);
const RESTART_LIMIT: Duration = Duration::from_secs(5);
const PROCESS_WARMUP: usize = 2;
const PROCESS_RUNS: usize = 20;
const ACTORS: [&str; 4] = [
    OCSERV_CTL,
    SESSION_REGISTRY,
    METRICS_SERVER,
    GRPC_FRONT_DOOR,
];

/// Panics or kills the named actor; see `Child::strike`.
fn strike(name: &'static str, panic: bool) -> ractor::ActorId {
    Child::from_name(name)
        .and_then(|c| c.strike(panic))
        .unwrap_or_else(|| panic!("{name} is not running before the strike"))
}

async fn healthz(addr: std::net::SocketAddr) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.0 200") || buf.starts_with(b"HTTP/1.1 200")
}

/// One request that only a serving incarnation of `name` can answer.
async fn answers(name: &'static str, agent: &ocserv_agent::app::Agent) -> bool {
    let t = Duration::from_secs(2);
    match name {
        OCSERV_CTL => matches!(call(OCSERV_CTL, t, true, CtlMsg::Status).await, Ok(Ok(_))),
        SESSION_REGISTRY => call(SESSION_REGISTRY, t, true, |reply| RegistryMsg::Query {
            username: None,
            reply,
        })
        .await
        .is_ok_and(|v| v.age.is_some()),
        METRICS_SERVER => healthz(agent.metrics_addr).await,
        _ => {
            let Ok(mut c) = VpnAgentServiceClient::connect(format!(
                "http://{}",
                agent.grpc_addr.expect("TCP listener configured")
            ))
            .await
            else {
                return false;
            };
            c.get_active_sessions(GetActiveSessionsRequest::default())
                .await
                .is_ok()
        }
    }
}

/// Strike → new incarnation registered → it answered. Returns (registered, serving).
async fn one_restart(
    name: &'static str,
    panic: bool,
    agent: &ocserv_agent::app::Agent,
) -> (Duration, Duration) {
    let t = Instant::now();
    let old = strike(name, panic);
    // Poll without sleeping: tokio's timer has millisecond granularity, too coarse here.
    while ractor::registry::where_is(name).is_none_or(|c| c.get_id() == old) {
        assert!(
            t.elapsed() < RESTART_LIMIT,
            "{name} was not restarted within {RESTART_LIMIT:?}"
        );
        tokio::task::yield_now().await;
    }
    let registered = t.elapsed();
    assert!(
        answers(name, agent).await,
        "{name} did not answer after its restart"
    );
    (registered, t.elapsed())
}

async fn actor_restarts() {
    println!("\n## Actor restart → serving again (in-process agent, fake ocserv with 10 sessions)");
    // Panics requested by the benchmark are expected: keep their messages off the output.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if !msg.starts_with("chaos:") {
            default_hook(info);
        }
    }));

    let fake = FakeOcserv::start(10, Devices::Missing);
    let mut config = ocserv_agent::config::load_with_env(None, &[])
        .expect("embedded defaults are valid")
        .config;
    config.ocserv.control_socket = fake.socket.clone();
    config.grpc.listen = Some("127.0.0.1:0".parse().expect("address"));
    config.grpc.insecure = true;
    config.grpc.socket = fake.socket.with_file_name("agent.sock");
    config.hook.socket = fake.socket.with_file_name("hook.sock");
    config.agent.state_dir = fake.socket.with_file_name("state");
    config.metrics.listen = "127.0.0.1:0".parse().expect("address");
    config.supervisor.restart_window = RESTART_WINDOW;
    config.supervisor.restart_intensity = 10_000;
    println!(
        "restart backoff: initial {:?} (equal jitter: first delay in [{:?}, {:?}]), window {:?}, strikes {:?} apart",
        config.supervisor.restart_backoff_initial,
        config.supervisor.restart_backoff_initial / 2,
        config.supervisor.restart_backoff_initial,
        RESTART_WINDOW,
        SPACING
    );
    let agent = ocserv_agent::app::start(config)
        .await
        .expect("the agent starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !answers(SESSION_REGISTRY, &agent).await {
        assert!(Instant::now() < deadline, "the registry never synced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut rows = Vec::new();
    for name in ACTORS {
        let mut base = Vec::new();
        for _ in 0..STRIKES {
            let t = Instant::now();
            assert!(answers(name, &agent).await, "{name} answers (baseline)");
            base.push(t.elapsed());
        }
        let (mut killed, mut panicked, mut registered) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..2 * STRIKES {
            let panic = i % 2 == 1;
            let (reg, served) = one_restart(name, panic, &agent).await;
            registered.push(reg);
            if panic {
                panicked.push(served);
            } else {
                killed.push(served);
            }
            tokio::time::sleep(SPACING).await;
        }
        rows.push((name, base, registered, killed, panicked));
    }

    // The registry again, rebuilding 10 000 sessions from ocserv in its pre_start.
    fake.set_sessions(10_000, Devices::Missing);
    call(SESSION_REGISTRY, Duration::from_secs(30), true, |r| {
        RegistryMsg::ReconcileNow(r)
    })
    .await
    .expect("registry answers")
    .expect("reconcile succeeds");
    let mut big = Vec::new();
    for i in 0..STRIKES {
        big.push(one_restart(SESSION_REGISTRY, i % 2 == 1, &agent).await.1);
        tokio::time::sleep(SPACING).await;
    }

    common::print_header();
    let mut worst_median = Duration::ZERO;
    for (name, base, registered, killed, panicked) in &rows {
        report(&format!("{name}: baseline request, no strike"), base);
        report(&format!("{name}: strike → registered"), registered);
        let k = report(&format!("{name}: kill → serving"), killed);
        let p = report(&format!("{name}: panic → serving"), panicked);
        worst_median = worst_median.max(k.median).max(p.median);
    }
    report("session_registry, 10 000 sessions: → serving", &big);
    println!(
        "target < 10 ms (10 sessions): worst median {} → {}",
        common::fmt_d(worst_median),
        if worst_median < Duration::from_millis(10) {
            "met at the median (see the tail per row)"
        } else {
            "MISSED"
        }
    );
    agent.shutdown().await;
    let _ = std::panic::take_hook();
}

fn process_restarts() {
    println!("\n## Process start → /readyz 200 (release binary, fake ocserv with 10 sessions)");
    let fake = FakeOcserv::start(10, Devices::Missing);
    let (mut ready, mut exit) = (Vec::new(), Vec::new());
    for i in 0..PROCESS_WARMUP + PROCESS_RUNS {
        let mut child = ChildAgent::spawn(&fake.socket, &[]);
        let started = child.started;
        let r = child.wait_ready(started, Duration::from_millis(1), Duration::from_secs(10));
        let Some(r) = r else {
            panic!("the agent did not become ready\n{}", child.log_text());
        };
        let e = child.stop();
        if i >= PROCESS_WARMUP {
            ready.push(r);
            exit.push(e);
        }
    }
    let total: Vec<Duration> = ready.iter().zip(&exit).map(|(r, e)| *r + *e).collect();
    common::print_header();
    report("spawn → /readyz 200", &ready);
    report("SIGTERM → exited", &exit);
    let t = report("restart (exit + start to ready)", &total);
    println!(
        "target < 1 s: max of {} {} → {}",
        t.n,
        common::fmt_d(t.max),
        if t.max < Duration::from_secs(1) {
            "met"
        } else {
            "MISSED"
        }
    );
    drop(fake);
}

fn main() {
    if !common::invoked_as_bench() {
        return;
    }
    common::print_machine("restart");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(actor_restarts());
    drop(rt);
    process_restarts();
}
