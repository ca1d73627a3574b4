//! DESIGN §6: "GetActiveSessions, 10 000 sessions: p99 < 25 ms (the whole-list reply stays
//! bounded in memory under concurrent calls)" and "resident memory < 30 MiB idle, < 80 MiB with
//! 10 000 sessions".
//!
//! 10 000 sessions cannot be hosted as real openconnect clients, so the agent talks to the fake
//! ocserv of `common` (ocserv's real control protocol, framed by the agent's own codec).
//!
//! Part 1, latency (in-process): the agent is started with `ocserv_agent::app::start` on embedded
//! defaults (reconcile every 10 s as by default) serving gRPC on its Unix control socket (this
//! process's uid allowed) and on a plaintext loopback TCP listener (`grpc.listen` with
//! `grpc.insecure`), against a fake with 10 000 sessions. After the registry has synced,
//! GetActiveSessions is called over one HTTP/2 connection per transport, the variants interleaved
//! call by call: all sessions without stats over the socket and over TCP, all with stats, and a
//! username filter matching 2 sessions (both over the socket, the operator's default path). Each
//! call is timed end to end at the client (request encode, server, response decode). A second
//! round repeats the with-stats calls after switching the fake to sessions whose tun is `lo`, so
//! every counter read succeeds from sysfs as it would beside a real ocserv. Breakdown rows time
//! the registry query alone, the pieces of a reply without a transport, and a full reconcile; a
//! transport table compares the socket with TCP for small calls and fresh connections.
//!
//! Part 2, size of a reply: with the agent stopped, the 10 000 sessions of its last view are
//! encoded as the handler does (`grpc::encode_sessions`: one `VPNSession` at a time into 64 KiB
//! pieces), without and with stats, while a counting allocator (this binary's global allocator,
//! counting only during this part) records the bytes live, as requested and as glibc malloc
//! chunks: the encoded reply as held, and the peak while encoding. Compared with
//! `grpc::REPLY_BYTES_PER_SESSION`, the figure the agent's reply budget charges per session.
//!
//! Part 3, memory (child process): the release binary runs against a fake with 0 sessions; after
//! it is ready and has idled, its VmRSS is read from /proc/<pid>/status. The fake then serves
//! 10 000 sessions; once the agent lists them all and has answered 20 GetActiveSessions calls,
//! VmRSS and VmHWM (peak) are read again. Then the concurrent load: rounds of 256
//! GetActiveSessions calls (all sessions; include_stats false, then true) started at once over
//! 16 connections to the control socket (16 streams each, under the default 32 per connection).
//! VmHWM is reset (`/proc/<pid>/clear_refs`) before each round, so its value at the end of the
//! round is that round's peak; a sampler also reads VmRSS every 5 ms. Each call is counted as OK
//! (all 10 000 sessions received), RESOURCE_EXHAUSTED (the agent's reply budget or request gate
//! refused it) or another status, and the OK ones are timed. The figures are the agent's alone:
//! the fake and this harness (which decodes the replies) live in the bench process. Part 3 runs
//! twice: with glibc malloc's defaults (the verdict), and as a diagnostic with glibc told to give
//! freed memory back at once (one arena, large blocks mmapped, heap top trimmed), so the difference
//! shows how much of the RSS is memory the agent freed but glibc kept.
//!
//! Bounded: fixed call counts with a wall-clock budget per round (rounds stop early, and say so,
//! when the budget is spent); every wait has a deadline. Only loopback and Unix sockets in temp
//! dirs are used.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{report, ChildAgent, Devices, FakeOcserv};
use ocserv_agent::actors::{call, SESSION_REGISTRY};
use ocserv_agent::cli::Target;
use ocserv_agent::messages::{RegistryMsg, SessionsView};
use ocserv_agent::proto::agent::v1::vpn_agent_service_client::VpnAgentServiceClient;
use ocserv_agent::proto::agent::v1::{GetActiveSessionsRequest, GetActiveSessionsResponse};
use prost::Message;
use tonic::transport::Channel;

const SESSIONS: usize = 10_000;
const WARMUP: usize = 20;
const CALLS: usize = 300;
const CALLS_LOOPBACK: usize = 100;
const CALLS_TRANSPORT: usize = 100;
const ROUND_BUDGET: Duration = Duration::from_secs(180);
/// Concurrent load: calls started at once, over this many connections, in these rounds
/// (`include_stats` per round).
const LOAD_CALLS: usize = 256;
const LOAD_CONNECTIONS: usize = 16;
const LOAD_ROUNDS: [bool; 6] = [false, false, false, true, true, true];
const LOAD_PAUSE: Duration = Duration::from_secs(3);
/// Every call of a round has answered long before this (grpc.request_timeout is 5 s).
const LOAD_ROUND_LIMIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1024;

type Client = VpnAgentServiceClient<Channel>;

// ---------------------------------------------------------------------------------------------
// Counting allocator, for part 2 only: while `COUNTING` is on, bytes allocated and freed in this
// process (as requested, and as glibc malloc chunks: usable size plus the 8-byte chunk header) and
// their peaks. Off (parts 1 and 3), each allocation costs one relaxed atomic load more than the
// system allocator alone.

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
static LIVE_CHUNKS: AtomicIsize = AtomicIsize::new(0);
static PEAK_CHUNKS: AtomicIsize = AtomicIsize::new(0);

/// glibc's per-chunk header on 64-bit targets.
const CHUNK_HEADER: usize = 8;

/// The bytes a live allocation takes in the malloc heap.
fn chunk(p: *mut u8) -> isize {
    // SAFETY: `p` is a live pointer returned by the system (glibc) allocator.
    let usable = unsafe { nix::libc::malloc_usable_size(p.cast()) };
    (usable + CHUNK_HEADER) as isize
}

fn grew(by: usize, chunk: isize) {
    let by = by as isize;
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    let now_chunks = LIVE_CHUNKS.fetch_add(chunk, Ordering::Relaxed) + chunk;
    PEAK.fetch_max(now, Ordering::Relaxed);
    PEAK_CHUNKS.fetch_max(now_chunks, Ordering::Relaxed);
}

fn shrank(by: usize, chunk: isize) {
    LIVE.fetch_sub(by as isize, Ordering::Relaxed);
    LIVE_CHUNKS.fetch_sub(chunk, Ordering::Relaxed);
}

fn counting() -> bool {
    COUNTING.load(Ordering::Relaxed)
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && counting() {
            grew(layout.size(), chunk(p));
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && counting() {
            grew(layout.size(), chunk(p));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if counting() {
            shrank(layout.size(), chunk(ptr));
        }
        // SAFETY: `ptr` was allocated by this allocator (i.e. by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old_chunk = if counting() { chunk(ptr) } else { 0 };
        // SAFETY: as for `dealloc`; `new_size` is valid per the caller's contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && counting() {
            shrank(layout.size(), old_chunk);
            grew(new_size, chunk(p));
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// Clients

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Socket,
    Tcp,
}

struct Clients {
    socket: Client,
    tcp: Client,
    socket_path: PathBuf,
    tcp_addr: std::net::SocketAddr,
}

impl Clients {
    fn get(&mut self, via: Via) -> &mut Client {
        match via {
            Via::Socket => &mut self.socket,
            Via::Tcp => &mut self.tcp,
        }
    }

    /// A fresh connection (a new HTTP/2 connection, not a clone of a channel).
    async fn fresh(&self, via: Via) -> Client {
        match via {
            Via::Socket => connect_socket(&self.socket_path).await,
            Via::Tcp => connect_tcp(self.tcp_addr).await,
        }
    }
}

/// The agent's control socket, through the CLI's own connector (decode limit 256 MiB).
async fn connect_socket(path: &std::path::Path) -> Client {
    ocserv_agent::cli::connect(&Target::Socket(path.to_path_buf()))
        .await
        .unwrap_or_else(|e| panic!("connecting to the agent's socket: {}", e.message))
}

/// The agent's plaintext loopback TCP listener, through the CLI's connector.
async fn connect_tcp(addr: std::net::SocketAddr) -> Client {
    ocserv_agent::cli::connect(&Target::Tcp(format!("http://{addr}")))
        .await
        .unwrap_or_else(|e| panic!("connecting to the agent's TCP port: {}", e.message))
}

struct Variant<'a> {
    label: &'static str,
    via: Via,
    user: &'a str,
    stats: bool,
}

fn request(user: &str, stats: bool) -> GetActiveSessionsRequest {
    GetActiveSessionsRequest {
        username_filter: user.to_owned(),
        include_stats: stats,
    }
}

/// One timed call; panics on an error (the measurement would be meaningless).
async fn timed_call(c: &mut Client, user: &str, stats: bool) -> (Duration, usize, usize) {
    let t = Instant::now();
    let r = c
        .get_active_sessions(request(user, stats))
        .await
        .unwrap_or_else(|e| panic!("GetActiveSessions(user={user:?}, stats={stats}): {e}"))
        .into_inner();
    let d = t.elapsed();
    (d, r.sessions.len(), r.encoded_len())
}

async fn wait_listed(c: &mut Client, n: usize, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        if let Ok(r) = c.get_active_sessions(request("", false)).await {
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
async fn run_round(c: &mut Clients, variants: &[Variant<'_>], calls: usize) -> Vec<Vec<Duration>> {
    for v in variants {
        for _ in 0..WARMUP {
            timed_call(c.get(v.via), v.user, v.stats).await;
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
            let (d, _, _) = timed_call(c.get(v.via), v.user, v.stats).await;
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

async fn registry_view() -> SessionsView {
    call(SESSION_REGISTRY, Duration::from_secs(10), true, |reply| {
        RegistryMsg::Query {
            username: None,
            reply,
        }
    })
    .await
    .expect("registry answers")
}

fn median_ratio(a: &common::Summary, b: &common::Summary) -> f64 {
    a.median.as_secs_f64() / b.median.as_secs_f64().max(1e-9)
}

// ---------------------------------------------------------------------------------------------
// Part 1: latency

/// Runs the latency part; returns the registry's last view (10 000 sessions) for part 2.
async fn latency() -> SessionsView {
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
    config.grpc.socket = fake.socket.with_file_name("agent.sock");
    config.hook.socket = fake.socket.with_file_name("hook.sock");
    config.agent.state_dir = fake.socket.with_file_name("state");
    config.grpc.allowed_uids = vec![nix::unistd::getuid().as_raw()];
    config.metrics.listen = "127.0.0.1:0".parse().expect("address");
    let agent = ocserv_agent::app::start(config)
        .await
        .expect("the agent starts");
    let tcp_addr = agent.grpc_addr.expect("TCP listener configured");
    let mut c = Clients {
        socket: connect_socket(&agent.grpc_socket).await,
        tcp: connect_tcp(tcp_addr).await,
        socket_path: agent.grpc_socket.clone(),
        tcp_addr,
    };
    let synced = wait_listed(&mut c.socket, SESSIONS, Duration::from_secs(60)).await;
    println!("registry synced with {SESSIONS} sessions ({synced:?} after start)");

    let user = ocserv_agent::ocserv::fake::username(5000);
    let user = user.as_str();
    let variants = [
        Variant {
            label: "all 10 000, stats=false, socket",
            via: Via::Socket,
            user: "",
            stats: false,
        },
        Variant {
            label: "all 10 000, stats=false, TCP",
            via: Via::Tcp,
            user: "",
            stats: false,
        },
        Variant {
            label: "all 10 000, stats=true, socket",
            via: Via::Socket,
            user: "",
            stats: true,
        },
        Variant {
            label: "username filter (2 sessions), stats=true",
            via: Via::Socket,
            user,
            stats: true,
        },
    ];
    for v in &variants {
        let (_, n, bytes) = timed_call(c.get(v.via), v.user, v.stats).await;
        println!("{}: {n} sessions, response {bytes} bytes", v.label);
    }

    println!("\n### round 1: tun devices absent (counter reads fail fast), {CALLS} calls each, interleaved");
    common::print_header();
    let samples = run_round(&mut c, &variants, CALLS).await;
    let mut summaries = Vec::new();
    for (v, s) in variants.iter().zip(&samples) {
        summaries.push(report(v.label, s));
    }
    println!(
        "median ratio socket / TCP, all 10 000 without stats: {:.2}x",
        median_ratio(&summaries[0], &summaries[1])
    );

    // Breakdown: the registry actor alone, and a full reconcile.
    let mut query = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let view = registry_view().await;
        query.push(t.elapsed());
        assert_eq!(view.sessions.len(), SESSIONS);
    }
    // What the handler and the client do with the view, without the transport.
    let view = registry_view().await;
    let (mut map, mut encode, mut decode) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..100 {
        let t = Instant::now();
        let sessions: Vec<_> = view
            .sessions
            .iter()
            .map(|s| ocserv_agent::grpc::vpn_session(s, None))
            .collect();
        map.push(t.elapsed());
        let resp = GetActiveSessionsResponse {
            total_count: sessions.len() as u32,
            sessions,
        };
        let t = Instant::now();
        let bytes = resp.encode_to_vec();
        encode.push(t.elapsed());
        let t = Instant::now();
        let back = GetActiveSessionsResponse::decode(&bytes[..]).expect("decodes");
        decode.push(t.elapsed());
        assert_eq!(back.sessions.len(), SESSIONS);
    }
    let mut reconcile = Vec::new();
    for _ in 0..20 {
        reconcile.push(reconcile_now().await);
    }
    // The filter alone, not interleaved with multi-MB responses on the same connection.
    let mut alone = Vec::new();
    for _ in 0..100 {
        alone.push(timed_call(&mut c.socket, user, true).await.0);
    }
    report("filter (2 sessions), not interleaved", &alone);
    report("breakdown: registry Query (no gRPC, no stats)", &query);
    report("breakdown: map 10 000 to VPNSession", &map);
    report("breakdown: prost encode of the response", &encode);
    report("breakdown: prost decode of the response", &decode);
    report("breakdown: reconcile of 10 000 (STATUS+LIST)", &reconcile);

    transport_comparison(&mut c, user).await;

    println!("\n### round 2: every session's tun is `lo` (counter reads succeed from sysfs), {CALLS_LOOPBACK} calls each");
    fake.set_sessions(SESSIONS, Devices::Loopback);
    reconcile_now().await;
    let stats_variants = [
        Variant {
            label: "all 10 000, stats=true (sysfs), socket",
            via: Via::Socket,
            user: "",
            stats: true,
        },
        Variant {
            label: "username filter, stats=true (sysfs)",
            via: Via::Socket,
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
    view
}

/// The agent's two transports side by side, interleaved call by call: small calls on an open
/// connection, and a fresh connection plus a small call (TCP_NODELAY is set by the front door
/// on accepted TCP sockets; a Unix socket has no Nagle).
async fn transport_comparison(c: &mut Clients, user: &str) {
    let (mut s_filter, mut t_filter, mut s_fresh, mut t_fresh) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..CALLS_TRANSPORT + WARMUP {
        let keep = i >= WARMUP;
        let a = timed_call(&mut c.socket, user, true).await.0;
        let b = timed_call(&mut c.tcp, user, true).await.0;
        let t = Instant::now();
        let mut fresh = c.fresh(Via::Socket).await;
        timed_call(&mut fresh, user, true).await;
        let p = t.elapsed();
        let t = Instant::now();
        let mut fresh = c.fresh(Via::Tcp).await;
        timed_call(&mut fresh, user, true).await;
        let q = t.elapsed();
        if keep {
            s_filter.push(a);
            t_filter.push(b);
            s_fresh.push(p);
            t_fresh.push(q);
        }
    }
    println!("\n### transport: Unix control socket vs loopback TCP, {CALLS_TRANSPORT} calls each, interleaved");
    common::print_header();
    let a = report("socket: filter (2 sessions)", &s_filter);
    let b = report("TCP: filter (2 sessions)", &t_filter);
    let p = report("socket: fresh connection + filter call", &s_fresh);
    let q = report("TCP: fresh connection + filter call", &t_fresh);
    println!(
        "median ratios socket / TCP: filter {:.2}x, fresh connection {:.2}x",
        median_ratio(&a, &b),
        median_ratio(&p, &q)
    );
}

// ---------------------------------------------------------------------------------------------
// Part 2: the size of a 10 000-session reply

fn reply_size(view: &SessionsView) {
    println!("\n## Size of a {SESSIONS}-session reply (counting allocator, agent stopped)");
    assert_eq!(view.sessions.len(), SESSIONS);
    for stats in [false, true] {
        // (requested, malloc chunks): the encoded reply as held; the peak while encoding it.
        let (mut held, mut peak, mut encoded) = (Vec::new(), Vec::new(), 0usize);
        for _ in 0..5 {
            for c in [&LIVE, &PEAK, &LIVE_CHUNKS, &PEAK_CHUNKS] {
                c.store(0, Ordering::Relaxed);
            }
            COUNTING.store(true, Ordering::SeqCst);
            // As the handler encodes it: one VPNSession at a time into 64 KiB pieces.
            let reply = ocserv_agent::grpc::encode_sessions(&view.sessions, stats);
            let built = (
                LIVE.load(Ordering::Relaxed),
                LIVE_CHUNKS.load(Ordering::Relaxed),
            );
            COUNTING.store(false, Ordering::SeqCst);
            encoded = reply.len();
            let as_bytes = |v: isize| usize::try_from(v).unwrap_or(0);
            held.push((as_bytes(built.0), as_bytes(built.1)));
            peak.push((
                as_bytes(PEAK.load(Ordering::Relaxed)),
                as_bytes(PEAK_CHUNKS.load(Ordering::Relaxed)),
            ));
            // The harness checks it is the real message.
            let decoded = GetActiveSessionsResponse::decode(reply.to_vec().as_slice())
                .expect("the encoded reply decodes");
            assert_eq!(decoded.sessions.len(), SESSIONS);
        }
        // The smallest of five (the agent has stopped; nothing else should allocate meanwhile).
        let held = held.into_iter().min().unwrap_or_default();
        let peak = peak.into_iter().min().unwrap_or_default();
        let per = |b: usize| b / SESSIONS;
        println!(
            "include_stats={stats}: encoded {encoded} bytes ({} per session); held: {} bytes requested, {} in malloc chunks ({} per session); peak while encoding: {} requested, {} in chunks ({} per session)",
            per(encoded),
            held.0,
            held.1,
            per(held.1),
            peak.0,
            peak.1,
            per(peak.1)
        );
    }
    println!(
        "the reply budget charges grpc::REPLY_BYTES_PER_SESSION = {} bytes per session ({} KiB for {SESSIONS}) \
         of grpc::REPLY_BUDGET_KIB = {} KiB: {} such replies at once; the whole list without stats is \
         encoded once per registry version and shared, not charged",
        ocserv_agent::grpc::REPLY_BYTES_PER_SESSION,
        ocserv_agent::grpc::reply_cost_kib(SESSIONS),
        ocserv_agent::grpc::REPLY_BUDGET_KIB,
        ocserv_agent::grpc::REPLY_BUDGET_KIB / ocserv_agent::grpc::reply_cost_kib(SESSIONS)
    );
}

// ---------------------------------------------------------------------------------------------
// Part 3: resident memory of the release binary

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// What one round of concurrent calls came to.
struct LoadRound {
    ok: Vec<Duration>,
    exhausted: usize,
    other: BTreeMap<String, usize>,
    wall: Duration,
}

async fn load_round(clients: &[Client], stats: bool) -> LoadRound {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..LOAD_CALLS {
        let mut c = clients[i % clients.len()].clone();
        tasks.spawn(async move {
            let t = Instant::now();
            let r = c.get_active_sessions(request("", stats)).await;
            let d = t.elapsed();
            match r {
                Ok(r) => {
                    let n = r.into_inner().sessions.len();
                    assert_eq!(n, SESSIONS, "an OK reply lists every session");
                    Ok(d)
                }
                Err(s) => Err(s.code()),
            }
        });
    }
    let mut round = LoadRound {
        ok: Vec::new(),
        exhausted: 0,
        other: BTreeMap::new(),
        wall: Duration::ZERO,
    };
    let all = async {
        while let Some(r) = tasks.join_next().await {
            match r.expect("a load task panicked") {
                Ok(d) => round.ok.push(d),
                Err(tonic::Code::ResourceExhausted) => round.exhausted += 1,
                Err(code) => *round.other.entry(format!("{code:?}")).or_default() += 1,
            }
        }
    };
    tokio::time::timeout(LOAD_ROUND_LIMIT, all)
        .await
        .unwrap_or_else(|_| panic!("a load round did not finish within {LOAD_ROUND_LIMIT:?}"));
    round.wall = started.elapsed();
    round
}

/// Reads VmRSS of `pid` every 5 ms until stopped; the highest value seen, in KiB.
struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<Mutex<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(Mutex::new(0u64));
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some((rss, _)) = common::rss_kib(pid) {
                    let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
                    *m = (*m).max(rss);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Sampler {
            stop,
            max,
            thread: Some(thread),
        }
    }

    /// The highest VmRSS since the last call, and starts a new window.
    fn take(&self) -> u64 {
        std::mem::take(&mut *self.max.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// glibc malloc settings that make freed memory go back to the system at once (one arena, large
/// blocks always mmapped, the heap top always trimmed): with them, RSS follows the memory the
/// agent really holds, so the difference to a default run is memory glibc keeps for reuse.
const RETURNING_MALLOC: [(&str, &str); 3] = [
    ("MALLOC_ARENA_MAX", "1"),
    ("MALLOC_MMAP_THRESHOLD_", "131072"),
    ("MALLOC_TRIM_THRESHOLD_", "0"),
];

/// What a memory run measured, in KiB.
struct MemoryRun {
    idle: u64,
    loaded: u64,
    loaded_hwm: u64,
    load_hwm: u64,
    after_load: u64,
}

/// Part 3 on the release binary; `returning_malloc` runs it with [`RETURNING_MALLOC`].
fn memory(rt: &tokio::runtime::Runtime, returning_malloc: bool) -> MemoryRun {
    if returning_malloc {
        println!(
            "\n## The same with glibc returning freed memory at once (diagnostic): {}",
            RETURNING_MALLOC
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    } else {
        println!("\n## Resident memory of the release binary (child process, default glibc malloc; fake ocserv in the bench process)");
    }
    let fake = FakeOcserv::start(0, Devices::Missing);
    let mut env = vec![("OCSERV_AGENT__OCSERV__RECONCILE_INTERVAL", "1s")];
    if returning_malloc {
        env.extend(RETURNING_MALLOC);
    }
    let mut child = ChildAgent::spawn(&fake.socket, &env);
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
    let pid = child.pid();
    let (idle_rss, idle_hwm) = common::rss_kib(pid).expect("reading /proc/<pid>/status");
    println!(
        "idle, 0 sessions, 5 s after ready: VmRSS {} (peak VmHWM {})",
        mib(idle_rss),
        mib(idle_hwm)
    );

    fake.set_sessions(SESSIONS, Devices::Missing);
    let socket = child.socket.clone();
    let waited = rt.block_on(async {
        let mut c = connect_socket(&socket).await;
        let w = wait_listed(&mut c, SESSIONS, Duration::from_secs(60)).await;
        for i in 0..20 {
            timed_call(&mut c, "", i % 2 == 0).await;
        }
        w
    });
    println!("agent listed {SESSIONS} sessions {waited:?} after the fake switched; 20 GetActiveSessions calls answered");
    std::thread::sleep(Duration::from_secs(3));
    let (rss, hwm) = common::rss_kib(pid).expect("reading /proc/<pid>/status");
    println!(
        "{SESSIONS} sessions, reconciling every 1 s: VmRSS {} (peak VmHWM {})",
        mib(rss),
        mib(hwm)
    );
    println!(
        "targets: idle < 30 MiB → {}; with 10 000 < 80 MiB → {} (peak {})",
        if idle_rss < 30 * MIB { "met" } else { "MISSED" },
        if rss < 80 * MIB { "met" } else { "MISSED" },
        if hwm < 80 * MIB { "also under" } else { "over" }
    );

    // The concurrent load.
    println!(
        "\n### concurrent load: {} rounds of {LOAD_CALLS} GetActiveSessions (all {SESSIONS}) started at once, \
         {LOAD_CONNECTIONS} socket connections, {:?} apart; reply budget {} KiB, {} KiB per reply",
        LOAD_ROUNDS.len(),
        LOAD_PAUSE,
        ocserv_agent::grpc::REPLY_BUDGET_KIB,
        ocserv_agent::grpc::reply_cost_kib(SESSIONS)
    );
    let sampler = Sampler::start(pid);
    let mut rounds = Vec::new();
    let mut hwm_ok = true;
    let (mut overall_hwm, mut overall_sampled) = (0u64, 0u64);
    rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..LOAD_CONNECTIONS {
            clients.push(connect_socket(&socket).await);
        }
        // One small call per connection, so every connection is open before the first round.
        for c in &mut clients {
            timed_call(c, &ocserv_agent::ocserv::fake::username(0), false).await;
        }
        println!(
            "{:<7} {:>6} {:>5} {:>6} {:>6} {:>9} {:>12} {:>14} {:>12} {:>10} {:>10}",
            "round",
            "stats",
            "OK",
            "EXHST",
            "other",
            "wall",
            "RSS before",
            "peak VmHWM",
            "max sampled",
            "OK median",
            "OK max"
        );
        for (i, &stats) in LOAD_ROUNDS.iter().enumerate() {
            let (before, _) = common::rss_kib(pid).expect("reading /proc/<pid>/status");
            hwm_ok &= common::reset_hwm(pid);
            sampler.take();
            let round = load_round(&clients, stats).await;
            let (_, peak) = common::rss_kib(pid).expect("reading /proc/<pid>/status");
            let sampled = sampler.take();
            overall_hwm = overall_hwm.max(peak);
            overall_sampled = overall_sampled.max(sampled);
            let s = common::summarize(&round.ok);
            println!(
                "{:<7} {:>6} {:>5} {:>6} {:>6} {:>9} {:>12} {:>14} {:>12} {:>10} {:>10}",
                i + 1,
                stats,
                round.ok.len(),
                round.exhausted,
                round.other.values().sum::<usize>(),
                common::fmt_d(round.wall),
                mib(before),
                mib(peak),
                mib(sampled),
                common::fmt_d(s.median),
                common::fmt_d(s.max)
            );
            if !round.other.is_empty() {
                println!("        other statuses: {:?}", round.other);
            }
            rounds.push((stats, round));
            tokio::time::sleep(LOAD_PAUSE).await;
        }
    });
    if !hwm_ok {
        println!("(VmHWM could not be reset: peaks are since the process started)");
    }
    std::thread::sleep(Duration::from_secs(2));
    let (after, _) = common::rss_kib(pid).expect("reading /proc/<pid>/status");
    drop(sampler);

    println!(
        "\nOK calls pooled over the rounds (timed at the client, from the start of the round):"
    );
    common::print_header();
    for stats in [false, true] {
        let ok: Vec<Duration> = rounds
            .iter()
            .filter(|(s, _)| *s == stats)
            .flat_map(|(_, r)| r.ok.iter().copied())
            .collect();
        let total = rounds.iter().filter(|(s, _)| *s == stats).count() * LOAD_CALLS;
        let exhausted: usize = rounds
            .iter()
            .filter(|(s, _)| *s == stats)
            .map(|(_, r)| r.exhausted)
            .sum();
        report(
            &format!(
                "stats={stats}: OK {} of {total} (EXHAUSTED {exhausted})",
                ok.len()
            ),
            &ok,
        );
    }
    println!(
        "under load: peak VmHWM {} (max sampled VmRSS {}), {} after the load → target < 80 MiB {}",
        mib(overall_hwm),
        mib(overall_sampled),
        mib(after),
        if overall_hwm < 80 * MIB {
            "met".to_owned()
        } else {
            format!("MISSED by {}", mib(overall_hwm - 80 * MIB))
        }
    );
    child.stop();
    MemoryRun {
        idle: idle_rss,
        loaded: rss,
        loaded_hwm: hwm,
        load_hwm: overall_hwm,
        after_load: after,
    }
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
    // `cargo bench --bench sessions_scale -- memory` runs part 3 alone.
    if !std::env::args().any(|a| a == "memory") {
        let view = rt.block_on(latency());
        reply_size(&view);
        drop(view);
    }
    let default = memory(&rt, false);
    let returning = memory(&rt, true);
    println!("\n## Memory summary (VmRSS / VmHWM of the agent)");
    println!(
        "{:<28} {:>10} {:>16} {:>16} {:>16} {:>16}",
        "malloc", "idle", "10 000 loaded", "10 000 peak", "load peak", "after the load"
    );
    for (label, r) in [
        ("glibc default", &default),
        ("glibc returning memory", &returning),
    ] {
        println!(
            "{:<28} {:>10} {:>16} {:>16} {:>16} {:>16}",
            label,
            mib(r.idle),
            mib(r.loaded),
            mib(r.loaded_hwm),
            mib(r.load_hwm),
            mib(r.after_load)
        );
    }
}
