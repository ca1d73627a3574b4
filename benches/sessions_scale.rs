//! DESIGN §6: "GetActiveSessions, 10 000 sessions: p99 < 25 ms" and "resident memory < 30 MiB
//! idle, < 80 MiB with 10 000 sessions".
//!
//! 10 000 sessions cannot be hosted as real openconnect clients, so the agent talks to the fake
//! ocserv of `common` (ocserv's real control protocol, framed by the agent's own codec).
//!
//! Part 1, latency (in-process): the agent is started with `ocserv_agent::app::start` on embedded
//! defaults (gRPC and metrics on 127.0.0.1:0, reconcile every 10 s as by default) against a fake
//! with 10 000 sessions. After the registry has synced, GetActiveSessions is called over gRPC on
//! one HTTP/2 connection, the variants interleaved call by call: all sessions without stats, all
//! with stats, and a username filter matching 2 sessions. Each call is timed end to end at the
//! client (request encode, server, response decode). A second round repeats the with-stats calls
//! after switching the fake to sessions whose tun is `lo`, so every counter read succeeds from
//! sysfs as it would beside a real ocserv. Breakdown rows time the registry query alone and a
//! full reconcile (STATUS + LIST of 10 000 + counters + table update).
//!
//! Part 2, memory (child process): the release binary runs against a fake with 0 sessions; after
//! it is ready and has idled, its VmRSS is read from /proc/<pid>/status. The fake then serves
//! 10 000 sessions; once the agent lists them all and has answered 20 GetActiveSessions calls,
//! VmRSS and VmHWM (peak) are read again. The figures are the agent's alone: the fake and this
//! harness live in the bench process.
//!
//! Bounded: fixed call counts with a wall-clock budget per round (rounds stop early, and say so,
//! when the budget is spent); every wait has a deadline. Only loopback and a Unix socket in a
//! temp dir are used.

mod common;

use std::time::{Duration, Instant};

use common::{report, ChildAgent, Devices, FakeOcserv};
use ocserv_agent::actors::{call, SESSION_REGISTRY};
use ocserv_agent::messages::RegistryMsg;
use ocserv_agent::proto::agent::v1::vpn_agent_service_client::VpnAgentServiceClient;
use ocserv_agent::proto::agent::v1::GetActiveSessionsRequest;
use prost::Message;
use tonic::transport::Channel;

const SESSIONS: usize = 10_000;
const WARMUP: usize = 20;
const CALLS: usize = 300;
const CALLS_LOOPBACK: usize = 100;
const ROUND_BUDGET: Duration = Duration::from_secs(180);
/// A 10 000-session reply is several MiB; tonic's client default limit is 4 MiB.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

type Client = VpnAgentServiceClient<Channel>;

struct Variant<'a> {
    label: &'static str,
    user: &'a str,
    stats: bool,
}

async fn connect(addr: std::net::SocketAddr) -> Client {
    VpnAgentServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connecting to the agent's gRPC port")
        .max_decoding_message_size(MAX_MESSAGE)
}

/// One timed call; panics on an error (the measurement would be meaningless).
async fn timed_call(c: &mut Client, user: &str, stats: bool) -> (Duration, usize, usize) {
    let t = Instant::now();
    let r = c
        .get_active_sessions(GetActiveSessionsRequest {
            username_filter: user.to_owned(),
            include_stats: stats,
        })
        .await
        .unwrap_or_else(|e| panic!("GetActiveSessions(user={user:?}, stats={stats}): {e}"))
        .into_inner();
    let d = t.elapsed();
    (d, r.sessions.len(), r.encoded_len())
}

async fn wait_listed(c: &mut Client, n: usize, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        if let Ok(r) = c
            .get_active_sessions(GetActiveSessionsRequest {
                username_filter: String::new(),
                include_stats: false,
            })
            .await
        {
            if r.into_inner().sessions.len() == n {
                return t.elapsed();
            }
        }
        assert!(
            t.elapsed() < limit,
            "the agent did not list {n} sessions within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Interleaves the variants call by call; returns one sample vector per variant.
async fn run_round(c: &mut Client, variants: &[Variant<'_>], calls: usize) -> Vec<Vec<Duration>> {
    for v in variants {
        for _ in 0..WARMUP {
            timed_call(c, v.user, v.stats).await;
        }
    }
    let mut samples = vec![Vec::with_capacity(calls); variants.len()];
    let started = Instant::now();
    for i in 0..calls {
        if started.elapsed() > ROUND_BUDGET {
            println!("  (round budget {ROUND_BUDGET:?} spent after {i} calls per variant)");
            break;
        }
        // Rotate the order so no variant always follows the same one.
        for k in 0..variants.len() {
            let v = &variants[(i + k) % variants.len()];
            let (d, _, _) = timed_call(c, v.user, v.stats).await;
            samples[(i + k) % variants.len()].push(d);
        }
    }
    samples
}

async fn reconcile_now() -> Duration {
    let t = Instant::now();
    call(SESSION_REGISTRY, Duration::from_secs(30), true, |r| {
        RegistryMsg::ReconcileNow(r)
    })
    .await
    .expect("registry answers")
    .expect("reconcile succeeds");
    t.elapsed()
}

async fn latency() {
    println!("\n## GetActiveSessions with {SESSIONS} sessions (in-process agent, fake ocserv)");
    let fake = FakeOcserv::start(SESSIONS, Devices::Missing);
    println!(
        "fake ocserv LIST reply: {} bytes ({} per session)",
        fake.list_reply_len(),
        fake.list_reply_len() / SESSIONS
    );
    let mut config = ocserv_agent::config::load_with_env(None, &[])
        .expect("embedded defaults are valid")
        .config;
    config.ocserv.control_socket = fake.socket.clone();
    config.grpc.listen = Some("127.0.0.1:0".parse().expect("address"));
    config.grpc.insecure = true;
    config.metrics.listen = "127.0.0.1:0".parse().expect("address");
    let agent = ocserv_agent::app::start(config)
        .await
        .expect("the agent starts");
    let mut c = connect(agent.grpc_addr.expect("TCP listener")).await;
    let synced = wait_listed(&mut c, SESSIONS, Duration::from_secs(60)).await;
    println!("registry synced with {SESSIONS} sessions ({synced:?} after start)");

    let user = common::fake_username(5000);
    let user = user.as_str();
    let variants = [
        Variant {
            label: "all 10 000, include_stats=false",
            user: "",
            stats: false,
        },
        Variant {
            label: "all 10 000, include_stats=true",
            user: "",
            stats: true,
        },
        Variant {
            label: "username filter (2 sessions), stats=true",
            user,
            stats: true,
        },
    ];
    for v in &variants {
        let (_, n, bytes) = timed_call(&mut c, v.user, v.stats).await;
        println!("{}: {n} sessions, response {bytes} bytes", v.label);
    }

    println!("\n### round 1: tun devices absent (counter reads fail fast), {CALLS} calls each, interleaved");
    common::print_header();
    let samples = run_round(&mut c, &variants, CALLS).await;
    for (v, s) in variants.iter().zip(&samples) {
        report(v.label, s);
    }

    // Breakdown: the registry actor alone, and a full reconcile.
    let mut query = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let view = call(SESSION_REGISTRY, Duration::from_secs(10), true, |reply| {
            RegistryMsg::Query {
                username: None,
                reply,
            }
        })
        .await
        .expect("registry answers");
        query.push(t.elapsed());
        assert_eq!(view.sessions.len(), SESSIONS);
    }
    // What the handler and the client do with the view, without the transport.
    let view = call(SESSION_REGISTRY, Duration::from_secs(10), true, |reply| {
        RegistryMsg::Query {
            username: None,
            reply,
        }
    })
    .await
    .expect("registry answers");
    let (mut map, mut encode, mut decode) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..50 {
        let t = Instant::now();
        let sessions: Vec<_> = view
            .sessions
            .iter()
            .map(|s| ocserv_agent::grpc::vpn_session(s, None))
            .collect();
        map.push(t.elapsed());
        let resp = ocserv_agent::proto::agent::v1::GetActiveSessionsResponse {
            total_count: sessions.len() as u32,
            sessions,
        };
        let t = Instant::now();
        let bytes = resp.encode_to_vec();
        encode.push(t.elapsed());
        let t = Instant::now();
        let back = ocserv_agent::proto::agent::v1::GetActiveSessionsResponse::decode(&bytes[..])
            .expect("decodes");
        decode.push(t.elapsed());
        assert_eq!(back.sessions.len(), SESSIONS);
    }
    let mut reconcile = Vec::new();
    for _ in 0..20 {
        reconcile.push(reconcile_now().await);
    }
    // The filter alone, not interleaved with 4 MiB responses on the same connection.
    let mut alone = Vec::new();
    for _ in 0..100 {
        alone.push(timed_call(&mut c, user, true).await.0);
    }
    report("filter (2 sessions), not interleaved", &alone);
    report("breakdown: registry Query (no gRPC, no stats)", &query);
    report("breakdown: map 10 000 to VPNSession", &map);
    report("breakdown: prost encode of the response", &encode);
    report("breakdown: prost decode of the response", &decode);
    report("breakdown: reconcile of 10 000 (STATUS+LIST)", &reconcile);

    nodelay_comparison(&agent, &mut c, user).await;

    println!("\n### round 2: every session's tun is `lo` (counter reads succeed from sysfs), {CALLS_LOOPBACK} calls each");
    fake.set_sessions(SESSIONS, Devices::Loopback);
    reconcile_now().await;
    let stats_variants = [
        Variant {
            label: "all 10 000, include_stats=true (sysfs)",
            user: "",
            stats: true,
        },
        Variant {
            label: "username filter, stats=true (sysfs)",
            user,
            stats: true,
        },
    ];
    common::print_header();
    let samples = run_round(&mut c, &stats_variants, CALLS_LOOPBACK).await;
    for (v, s) in stats_variants.iter().zip(&samples) {
        report(v.label, s);
    }
    let mut reconcile = Vec::new();
    for _ in 0..10 {
        reconcile.push(reconcile_now().await);
    }
    report(
        "breakdown: reconcile of 10 000 (sysfs counters)",
        &reconcile,
    );

    drop(c);
    agent.shutdown().await;
    drop(fake);
}

/// The same `VpnAgent` service served twice on loopback: by the agent's front door (accepted
/// sockets keep Nagle's algorithm: `serve_with_incoming` ignores `tcp_nodelay`) and by a second
/// tonic server whose accepted sockets get TCP_NODELAY. Both ask the same registry actor, so the
/// difference is the transport alone.
async fn nodelay_comparison(agent: &ocserv_agent::app::Agent, c: &mut Client, user: &str) {
    use ocserv_agent::proto::agent::v1::vpn_agent_service_server::VpnAgentServiceServer;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding a loopback port for the comparison server");
    let addr = listener.local_addr().expect("local address");
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let svc = VpnAgentServiceServer::new(ocserv_agent::grpc::VpnAgent::new(
        agent.metrics.clone(),
        Duration::from_secs(2),
        Duration::from_secs(2),
    ));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    let mut nd = connect(addr).await;
    const N: usize = 100;
    let (mut fd_filter, mut nd_filter, mut fd_all, mut nd_all) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut fd_fresh, mut nd_fresh) = (Vec::new(), Vec::new());
    for i in 0..N + WARMUP {
        let keep = i >= WARMUP;
        let a = timed_call(c, user, true).await.0;
        let b = timed_call(&mut nd, user, true).await.0;
        let x = timed_call(c, "", false).await.0;
        let y = timed_call(&mut nd, "", false).await.0;
        let t = Instant::now();
        let mut fresh = connect(agent.grpc_addr.expect("TCP listener")).await;
        timed_call(&mut fresh, user, true).await;
        let p = t.elapsed();
        let t = Instant::now();
        let mut fresh = connect(addr).await;
        timed_call(&mut fresh, user, true).await;
        let q = t.elapsed();
        if keep {
            fd_filter.push(a);
            nd_filter.push(b);
            fd_all.push(x);
            nd_all.push(y);
            fd_fresh.push(p);
            nd_fresh.push(q);
        }
    }
    server.abort();
    println!("\n### transport: the front door vs the same service with TCP_NODELAY, {N} calls each, interleaved");
    common::print_header();
    let a = report("front door: filter (2 sessions)", &fd_filter);
    let b = report("TCP_NODELAY: filter (2 sessions)", &nd_filter);
    let x = report("front door: all 10 000, no stats", &fd_all);
    let y = report("TCP_NODELAY: all 10 000, no stats", &nd_all);
    let p = report("front door: fresh connection + filter call", &fd_fresh);
    let q = report("TCP_NODELAY: fresh connection + filter call", &nd_fresh);
    let ratio = |s: common::Summary, t: common::Summary| {
        s.median.as_secs_f64() / t.median.as_secs_f64().max(1e-9)
    };
    println!(
        "median ratios front door / TCP_NODELAY: filter {:.1}x, all {:.2}x, fresh connection {:.1}x",
        ratio(a, b),
        ratio(x, y),
        ratio(p, q)
    );
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn memory(rt: &tokio::runtime::Runtime) {
    println!("\n## Resident memory of the release binary (child process; fake ocserv in the bench process)");
    let fake = FakeOcserv::start(0, Devices::Missing);
    let mut child = ChildAgent::spawn(
        &fake.socket,
        &[("OCSERV_AGENT__OCSERV__RECONCILE_INTERVAL", "1s")],
    );
    let ready = child.wait_ready(
        Instant::now(),
        Duration::from_millis(5),
        Duration::from_secs(20),
    );
    assert!(
        ready.is_some(),
        "the agent did not become ready\n{}",
        child.log_text()
    );
    std::thread::sleep(Duration::from_secs(5));
    let (idle_rss, idle_hwm) = common::rss_kib(child.pid()).expect("reading /proc/<pid>/status");
    println!(
        "idle, 0 sessions, 5 s after ready: VmRSS {} (peak VmHWM {})",
        mib(idle_rss),
        mib(idle_hwm)
    );

    fake.set_sessions(SESSIONS, Devices::Missing);
    let grpc = child.grpc;
    let waited = rt.block_on(async {
        let mut c = connect(grpc).await;
        let w = wait_listed(&mut c, SESSIONS, Duration::from_secs(60)).await;
        for i in 0..20 {
            timed_call(&mut c, "", i % 2 == 0).await;
        }
        w
    });
    println!("agent listed {SESSIONS} sessions {waited:?} after the fake switched; 20 GetActiveSessions calls answered");
    std::thread::sleep(Duration::from_secs(3));
    let (rss, hwm) = common::rss_kib(child.pid()).expect("reading /proc/<pid>/status");
    println!(
        "{SESSIONS} sessions, reconciling every 1 s: VmRSS {} (peak VmHWM {})",
        mib(rss),
        mib(hwm)
    );
    println!(
        "targets: idle < 30 MiB → {}; with 10 000 < 80 MiB → {} (peak {})",
        if idle_rss < 30 * 1024 {
            "met"
        } else {
            "MISSED"
        },
        if rss < 80 * 1024 { "met" } else { "MISSED" },
        if hwm < 80 * 1024 {
            "also under"
        } else {
            "over"
        }
    );
    child.stop();
}

fn main() {
    if !common::invoked_as_bench() {
        return;
    }
    common::print_machine("sessions_scale");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(latency());
    memory(&rt);
}
