//! DESIGN §6 / issue 7, connect-time policy: "decision over the hook socket on a cache hit p99 <
//! 250 µs"; a miss with the portal at 20 ms; "the whole connect path (exec the wrapper and the
//! hook, ask, exit) within 6× of `/bin/true` at the median, p99 < 5 ms"; "a login storm of 10 000
//! logins from 2 000 users in 60 s with the portal at 20 ms: p99 < 100 ms, portal calls ≤ distinct
//! users"; "the same storm with the portal black-holed: cache-hit latency, no portal calls while
//! the breaker is open".
//!
//! Every part runs the agent in-process (`ocserv_agent::app::start`) against the fake ocserv of
//! `common` (10 sessions), with a hermetic config (`load_with_env(None, &[])`) whose sockets
//! (`grpc.socket`, `hook.socket`) and per-user/per-group directories lie in a temp dir, and
//! `hook.allowed_uids` = this process's uid. The portal is the test double of
//! `tests/support/portal.rs` (a tonic `vpn.v1.AuthService` on loopback, plaintext or mTLS),
//! answering every user "allow" with two routes and a DNS server, so each admission also makes
//! the ConfigWriter write the user's per-user file (off the decision path, as in production).
//! Only one agent runs at a time (actor names are process-global), so rows from different agents
//! are sequential, not interleaved.
//!
//! 1. **Hit** (`hit`): one user is asked once (a miss, cached), then `HIT_WARMUP` unrecorded and
//!    `HIT_SAMPLES` recorded requests, each a fresh connection to the hook socket, one frame
//!    (the request `ocserv-agent-hook` builds from a realistic script environment), the answer
//!    read; timed at the client, a blocking std client on the main thread while the agent runs
//!    on its own 2-worker runtime. Rows: portal source (plaintext), portal source (mTLS), and
//!    `policy.source = "local"` (no policy file: every user admitted, nothing cached).
//! 2. **Miss** (`miss`): the portal double adds 20 ms; `MISS_SAMPLES` distinct users, one request
//!    each (every one a miss and a portal call), sequentially, plaintext and mTLS.
//! 3. **Exec** (`exec`): the shipped wrapper (`/bin/sh contrib/ocserv-agent-hook.sh`, copied into
//!    a temp dir beside a symlink to the release `ocserv-agent-hook`) run as ocserv runs it:
//!    `env_clear` plus ocserv's connect-script variables, waited for, exit status 0 checked; the
//!    user is cached (the steady state). Interleaved call by call in one run with `/bin/true`
//!    (same environment) and two breakdown variants: `/bin/sh` running an empty script, and the
//!    hook program exec'd directly (no shell). `EXEC_WARMUP` + `EXEC_SAMPLES` each, the order
//!    rotating every round.
//! 4. **Storm** (`storm`): `STORM_LOGINS` logins of `STORM_USERS` users (every user at least
//!    once, the rest drawn at random, seeded), start times uniform at random over `STORM_SPAN`
//!    (open loop: each login starts at its time whatever the others do, so concurrency is what
//!    the arrivals and latencies make it, bounded by `hook.max_connections` = 256), portal at
//!    20 ms. Each login is one hook connection from a client runtime on the main thread; timed
//!    from its start. Reports the latency of all logins, of first logins (misses) and repeats,
//!    the start lag, the most logins in flight at once, and portal calls vs distinct users.
//! 5. **Black hole** (`blackhole`): `policy.allow_ttl` = 1 s (its minimum), `fail_mode = "stale"`;
//!    a warm-up asks for every user once (portal at 20 ms), then waits until every entry is past
//!    its fresh lifetime (stale, within `stale_for`); the portal double then answers nothing
//!    (latency of an hour: calls reach it and are counted, and time out at `portal.call_timeout`
//!    = 1 s), and the same storm runs. A sampler records the portal's call count and the
//!    breaker's state (`ocserv_agent_circuit_breaker_state`) every 20 ms, which splits the logins
//!    into those started before the breaker first opened and those after, and counts the portal
//!    calls made while it was open or half-open (the probes).
//!
//! `cargo bench --bench connect_policy -- hit miss exec storm blackhole` picks parts (all by
//! default); `-- storm-nowriter` runs a diagnostic storm without per-user file writes. Bounded: fixed counts, a client timeout of 5 s per request, a storm budget of its span
//! plus 30 s, every wait with a deadline. Only loopback TCP and Unix sockets in temp dirs.

#![forbid(unsafe_code)]

mod common;
#[allow(dead_code)]
#[path = "../tests/support/portal.rs"]
mod portal;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fmt_d, report, Devices, FakeOcserv};
use ocserv_agent::config::{Config, PolicySource};
use ocserv_agent::hook_proto::{self, HookResponse};
use ocserv_agent::policy::FailMode;
use portal::{Answer, PortalDouble};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HIT_WARMUP: usize = 200;
const HIT_SAMPLES: usize = 2000;
const MISS_WARMUP: usize = 20;
const MISS_SAMPLES: usize = 300;
const EXEC_WARMUP: usize = 20;
const EXEC_SAMPLES: usize = 300;
const PORTAL_LATENCY: Duration = Duration::from_millis(20);
const STORM_LOGINS: usize = 10_000;
const STORM_USERS: usize = 2_000;
const STORM_SPAN: Duration = Duration::from_secs(60);
const STORM_SEED: u64 = 0x0c5e_57a6;
/// Black hole: the portal double waits this long before answering (the agent gives up first).
const BLACK_HOLE: Duration = Duration::from_secs(3600);
const BLACKHOLE_WARMUP_CONCURRENCY: usize = 50;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

const HIT_TARGET: Duration = Duration::from_micros(250);
const EXEC_RATIO_TARGET: f64 = 6.0;
const EXEC_P99_TARGET: Duration = Duration::from_millis(5);
const STORM_P99_TARGET: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// The agent, the portal and the request

/// An in-process agent on a fake ocserv, everything it writes in one temp dir.
struct Rig {
    agent: Option<ocserv_agent::app::Agent>,
    hook: PathBuf,
    dir: tempfile::TempDir,
    _fake: FakeOcserv,
}

impl Rig {
    async fn start(
        source: PolicySource,
        portal: Option<&PortalDouble>,
        tweak: impl FnOnce(&mut Config),
    ) -> Rig {
        let fake = FakeOcserv::start(10, Devices::Missing);
        let dir = tempfile::Builder::new()
            .prefix("oa-bench-connect-")
            .tempdir()
            .expect("temp dir");
        let mut config = ocserv_agent::config::load_with_env(None, &[])
            .expect("embedded defaults are valid")
            .config;
        config.ocserv.control_socket = fake.socket.clone();
        config.grpc.socket = dir.path().join("agent.sock");
        config.grpc.listen = None;
        config.hook.socket = dir.path().join("run/hook.sock");
        config.agent.state_dir = dir.path().join("state");
        config.hook.allowed_uids = vec![nix::unistd::getuid().as_raw()];
        config.metrics.listen = "127.0.0.1:0".parse().expect("address");
        for d in ["per-user", "per-group"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("per-user/group dirs");
        }
        config.config_writer.per_user_dir = Some(dir.path().join("per-user"));
        config.config_writer.per_group_dir = Some(dir.path().join("per-group"));
        config.policy.source = source;
        if let Some(p) = portal {
            config.portal = p.config();
        }
        tweak(&mut config);
        let hook = config.hook.socket.clone();
        let agent = ocserv_agent::app::start(config)
            .await
            .expect("the agent starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hook.exists() {
            assert!(Instant::now() < deadline, "the hook socket never appeared");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Rig {
            agent: Some(agent),
            hook,
            dir,
            _fake: fake,
        }
    }

    fn metrics(&self) -> String {
        self.agent.as_ref().expect("running").metrics.encode()
    }

    async fn stop(mut self) {
        if let Some(a) = self.agent.take() {
            a.shutdown().await;
        }
    }
}

/// A value from the agent's metrics text (first line starting with `prefix`).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn writes(text: &str, status: &str) -> f64 {
    metric(
        text,
        &format!("ocserv_agent_config_writes_total{{kind=\"user\",status=\"{status}\"}}"),
    )
}

fn portal_calls_metric(text: &str, status: &str) -> f64 {
    metric(
        text,
        &format!(
            "ocserv_agent_portal_requests_total{{method=\"CheckPolicy\",status=\"{status}\"}}"
        ),
    )
}

/// A plaintext or mTLS portal double answering everybody "allow" with routes and DNS.
async fn portal(tls: bool) -> PortalDouble {
    let p = match tls {
        true => PortalDouble::start_tls().await,
        false => PortalDouble::start_plain().await,
    };
    p.answer_others(Answer::Respond(PortalDouble::allow(
        &["10.20.0.0/16", "192.168.77.0/24"],
        &["10.20.0.53"],
    )));
    p
}

/// The environment ocserv (1.1.6) gives its connect-script for one session, plus `PATH` and the
/// hook's socket and timeout.
fn script_env(user: &str, id: u32, hook: &Path) -> Vec<(String, String)> {
    [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("REASON", "connect"),
        ("USERNAME", user),
        ("GROUPNAME", "staff"),
        ("VHOST", "default"),
        ("DEVICE", "vpns7"),
        ("IP_REAL", "198.51.100.23"),
        ("IP_REAL_LOCAL", "203.0.113.10"),
        ("IP_LOCAL", "10.10.0.1"),
        ("IP_REMOTE", "10.10.0.57"),
        ("IPV6_LOCAL", ""),
        ("IPV6_REMOTE", ""),
        ("HOSTNAME", "laptop-0457"),
        ("USER_AGENT", "Open AnyConnect VPN Agent v9.12-unknown"),
        ("DEVICE_TYPE", "linux-64"),
        ("DEVICE_PLATFORM", "linux-64"),
        (
            "OCSERV_ROUTES",
            "10.20.0.0/255.255.0.0 192.168.77.0/255.255.255.0",
        ),
        (
            "OCSERV_ROUTES4",
            "10.20.0.0/255.255.0.0 192.168.77.0/255.255.255.0",
        ),
        ("OCSERV_ROUTES6", ""),
        ("OCSERV_NO_ROUTES", ""),
        ("OCSERV_DNS", "10.20.0.53"),
        ("OCSERV_DNS4", "10.20.0.53"),
        ("OCSERV_DNS6", ""),
        ("OCSERV_AGENT_HOOK_TIMEOUT", "3s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .chain([
        ("ID".to_owned(), id.to_string()),
        (
            "OCSERV_AGENT_HOOK_SOCKET".to_owned(),
            hook.display().to_string(),
        ),
    ])
    .collect()
}

/// The frame `ocserv-agent-hook` sends for this environment (built by the same library code).
fn connect_frame(user: &str, id: u32, hook: &Path) -> Vec<u8> {
    let vars = script_env(user, id, hook)
        .into_iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
    hook_proto::request_from_env(vars)
        .expect("a valid script environment")
        .to_frame()
        .expect("a request fits in a frame")
}

/// One exchange as the hook program makes it: connect, one frame, read the answer.
fn ask_blocking(socket: &Path, frame: &[u8]) -> HookResponse {
    let mut s = UnixStream::connect(socket).expect("connect to the hook socket");
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).expect("timeout");
    s.write_all(frame).expect("send the request");
    let payload = hook_proto::read_frame(&mut s).expect("an answer");
    hook_proto::parse_response(&payload).expect("a valid answer")
}

async fn ask_async(socket: &Path, frame: &[u8]) -> Result<HookResponse, String> {
    let exchange = async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(frame).await.map_err(|e| format!("send: {e}"))?;
        let mut header = [0u8; hook_proto::HEADER_LEN];
        s.read_exact(&mut header)
            .await
            .map_err(|e| format!("header: {e}"))?;
        let len = hook_proto::frame_len(header).map_err(|e| e.to_string())?;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload)
            .await
            .map_err(|e| format!("payload: {e}"))?;
        hook_proto::parse_response(&payload).map_err(|e| e.to_string())
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err("client timeout".into()))
}

fn source(r: &HookResponse) -> &'static str {
    r.source.as_ref().map_or("none", |s| s.as_str())
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

// ---------------------------------------------------------------------------------------------
// Parts 1 and 2: one decision at a time

/// Cache-hit (or local-policy) decisions for one user; `expect` is the source every recorded
/// answer must carry.
fn hits(rig: &Rig, user: &str, expect: &str) -> Vec<Duration> {
    let frame = connect_frame(user, 4242, &rig.hook);
    let first = ask_blocking(&rig.hook, &frame);
    assert!(first.allowed, "{user} admitted: {first:?}");
    for _ in 0..HIT_WARMUP {
        ask_blocking(&rig.hook, &frame);
    }
    let mut out = Vec::with_capacity(HIT_SAMPLES);
    for _ in 0..HIT_SAMPLES {
        let t = Instant::now();
        let r = ask_blocking(&rig.hook, &frame);
        out.push(t.elapsed());
        assert!(
            r.allowed && source(&r) == expect,
            "{user}: expected an admission from {expect}, got {r:?}"
        );
    }
    out
}

/// Misses: a new user per request, each one portal call at `PORTAL_LATENCY`.
fn misses(rig: &Rig, portal: &PortalDouble, tag: &str) -> Vec<Duration> {
    portal.set_latency(PORTAL_LATENCY);
    let before = portal.total_calls();
    let mut out = Vec::with_capacity(MISS_SAMPLES);
    for i in 0..MISS_WARMUP + MISS_SAMPLES {
        let frame = connect_frame(&format!("miss-{tag}-{i:04}"), 5000 + i as u32, &rig.hook);
        let t = Instant::now();
        let r = ask_blocking(&rig.hook, &frame);
        let d = t.elapsed();
        assert!(
            r.allowed && source(&r) == "fresh",
            "a miss is answered fresh by the portal: {r:?}"
        );
        if i >= MISS_WARMUP {
            out.push(d);
        }
    }
    let calls = portal.total_calls() - before;
    assert_eq!(
        calls as usize,
        MISS_WARMUP + MISS_SAMPLES,
        "one portal call per miss"
    );
    portal.set_latency(Duration::ZERO);
    out
}

// ---------------------------------------------------------------------------------------------
// Part 3: the whole connect path

struct Installed {
    _dir: tempfile::TempDir,
    wrapper: PathBuf,
    hook_bin: PathBuf,
    empty_script: PathBuf,
}

/// The shipped wrapper copied beside a symlink to the release hook program, as an operator
/// installs them, plus an empty script for the shell-only breakdown row.
fn install_hook() -> Installed {
    let dir = tempfile::Builder::new()
        .prefix("oa-bench-hook-")
        .tempdir()
        .expect("temp dir");
    let wrapper = dir.path().join("ocserv-agent-hook.sh");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ocserv-agent-hook.sh"),
        &wrapper,
    )
    .expect("copy the wrapper");
    let hook_bin = dir.path().join("ocserv-agent-hook");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ocserv-agent-hook"), &hook_bin)
        .expect("link the hook program");
    let empty_script = dir.path().join("empty.sh");
    std::fs::write(&empty_script, "").expect("empty script");
    Installed {
        _dir: dir,
        wrapper,
        hook_bin,
        empty_script,
    }
}

/// Runs `program args` with exactly `env`, waits, returns the time and whether it exited 0.
fn exec(program: &Path, args: &[&Path], env: &[(String, String)]) -> (Duration, bool) {
    let t = Instant::now();
    let status = Command::new(program)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("spawn");
    (t.elapsed(), status.success())
}

fn exec_path(rig: &Rig, user: &str) {
    let inst = install_hook();
    let env = script_env(user, 4243, &rig.hook);
    let sh = Path::new("/bin/sh");
    let truebin = Path::new("/bin/true");
    let variants: [(&str, &Path, Vec<&Path>); 4] = [
        ("/bin/true", truebin, vec![]),
        ("/bin/sh empty.sh", sh, vec![inst.empty_script.as_path()]),
        ("ocserv-agent-hook (no shell)", &inst.hook_bin, vec![]),
        (
            "/bin/sh ocserv-agent-hook.sh",
            sh,
            vec![inst.wrapper.as_path()],
        ),
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    for round in 0..EXEC_WARMUP + EXEC_SAMPLES {
        for k in 0..variants.len() {
            let v = (round + k) % variants.len();
            let (label, program, args) = &variants[v];
            let (d, ok) = exec(program, args, &env);
            assert!(ok, "{label} exited non-zero (a denial or a failure)");
            if round >= EXEC_WARMUP {
                samples[v].push(d);
            }
        }
    }
    println!(
        "\n## Whole connect path, exec'd as ocserv runs a connect-script ({} each, interleaved, order rotating; user cached)",
        EXEC_SAMPLES
    );
    common::print_header();
    let mut summaries = Vec::new();
    for ((label, _, _), s) in variants.iter().zip(&samples) {
        summaries.push(report(label, s));
    }
    let (t, w) = (summaries[0], summaries[3]);
    let ratio = w.median.as_secs_f64() / t.median.as_secs_f64();
    let p99 = w.p99.expect("300 samples");
    println!(
        "wrapper / /bin/true: median {ratio:.2}× (target ≤ {EXEC_RATIO_TARGET}×: {}), p99 {:.2}×; wrapper p99 {} (target < {}: {})",
        verdict(ratio <= EXEC_RATIO_TARGET),
        p99.as_secs_f64() / t.p99.expect("300 samples").as_secs_f64(),
        fmt_d(p99),
        fmt_d(EXEC_P99_TARGET),
        verdict(p99 < EXEC_P99_TARGET)
    );
}

// ---------------------------------------------------------------------------------------------
// Parts 4 and 5: storms

/// (start offset, user index) for every login, sorted by start.
fn storm_schedule() -> Vec<(Duration, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(STORM_SEED);
    let mut users: Vec<usize> = (0..STORM_USERS)
        .chain((STORM_USERS..STORM_LOGINS).map(|_| rng.random_range(0..STORM_USERS)))
        .collect();
    users.shuffle(&mut rng);
    let mut times: Vec<Duration> = (0..STORM_LOGINS)
        .map(|_| STORM_SPAN.mul_f64(rng.random::<f64>()))
        .collect();
    times.sort_unstable();
    times.into_iter().zip(users).collect()
}

fn storm_user(i: usize) -> String {
    format!("user{i:05}")
}

struct Login {
    offset: Duration,
    lag: Duration,
    latency: Duration,
    first_of_user: bool,
    result: Result<HookResponse, String>,
}

struct StormOutcome {
    logins: Vec<Login>,
    max_in_flight: usize,
    wall: Duration,
}

/// Runs the schedule open-loop on a current-thread client runtime (this thread); the agent runs
/// on its own runtime.
fn run_storm(hook: &Path, schedule: &[(Duration, usize)]) -> StormOutcome {
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let frames: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..STORM_USERS)
            .map(|u| connect_frame(&storm_user(u), 10_000 + u as u32, hook))
            .collect(),
    );
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let hook = hook.to_path_buf();
    client.block_on(async move {
        let budget = STORM_SPAN + Duration::from_secs(30);
        let start = tokio::time::Instant::now();
        let mut seen = HashSet::new();
        let mut tasks = Vec::with_capacity(schedule.len());
        for &(offset, user) in schedule {
            tokio::time::sleep_until(start + offset).await;
            let first_of_user = seen.insert(user);
            let (frames, hook) = (frames.clone(), hook.clone());
            let (in_flight, max_in_flight) = (in_flight.clone(), max_in_flight.clone());
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let lag = (start + offset).elapsed();
                let now = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                max_in_flight.fetch_max(now, Ordering::Relaxed);
                let result = ask_async(&hook, &frames[user]).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
                Login {
                    offset,
                    lag,
                    latency: t.elapsed(),
                    first_of_user,
                    result,
                }
            }));
        }
        let mut logins = Vec::with_capacity(tasks.len());
        for t in tasks {
            let left = budget.saturating_sub(start.elapsed());
            let login = tokio::time::timeout(left, t)
                .await
                .expect("storm within its wall-clock budget")
                .expect("login task");
            logins.push(login);
        }
        StormOutcome {
            logins,
            max_in_flight: max_in_flight.load(Ordering::Relaxed),
            wall: start.elapsed(),
        }
    })
}

fn sources_of<'a>(logins: impl Iterator<Item = &'a Login>) -> (String, usize) {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut errors = 0;
    for l in logins {
        match &l.result {
            Ok(r) => {
                let key = format!("{}:{}", if r.allowed { "allow" } else { "deny" }, source(r));
                *counts.entry(key).or_default() += 1;
            }
            Err(_) => errors += 1,
        }
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort();
    let text = v
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    (text, errors)
}

fn latencies<'a>(logins: impl Iterator<Item = &'a Login>) -> Vec<Duration> {
    logins.map(|l| l.latency).collect()
}

fn first_error(o: &StormOutcome) -> Option<String> {
    o.logins
        .iter()
        .find_map(|l| l.result.as_ref().err().cloned())
}

/// `writer = false` (diagnostic): no `config_writer.per_user_dir`, so admissions write no file.
fn storm(rt: &tokio::runtime::Runtime, schedule: &[(Duration, usize)], writer: bool) {
    let portal = rt.block_on(portal(false));
    portal.set_latency(PORTAL_LATENCY);
    let rig = rt.block_on(Rig::start(PolicySource::Portal, Some(&portal), |c| {
        if !writer {
            c.config_writer.per_user_dir = None;
            c.config_writer.per_group_dir = None;
        }
    }));
    let out = run_storm(&rig.hook, schedule);
    let calls = portal.total_calls();
    println!(
        "\n## Login storm: {STORM_LOGINS} logins of {STORM_USERS} users over {:?}, portal at {:?} (plaintext), open loop{}",
        STORM_SPAN,
        PORTAL_LATENCY,
        if writer {
            ""
        } else {
            " — diagnostic: no per_user_dir (no file writes)"
        }
    );
    common::print_header();
    let all = report("every login", &latencies(out.logins.iter()));
    report(
        "first login of a user (miss → portal)",
        &latencies(out.logins.iter().filter(|l| l.first_of_user)),
    );
    report(
        "repeat logins (cache)",
        &latencies(out.logins.iter().filter(|l| !l.first_of_user)),
    );
    report(
        "start lag of the client (not in the latency)",
        &out.logins.iter().map(|l| l.lag).collect::<Vec<_>>(),
    );
    let (sources, errors) = sources_of(out.logins.iter());
    let distinct = out.logins.iter().filter(|l| l.first_of_user).count();
    println!(
        "wall {}, most logins in flight at once {}, answers: {sources}; client errors {errors}{}",
        fmt_d(out.wall),
        out.max_in_flight,
        first_error(&out).map_or(String::new(), |e| format!(" (first: {e})"))
    );
    let p99 = all.p99.expect("10 000 samples");
    println!(
        "p99 {} (target < {}: {}); portal calls {calls} for {distinct} distinct users (target ≤: {})",
        fmt_d(p99),
        fmt_d(STORM_P99_TARGET),
        verdict(p99 < STORM_P99_TARGET && errors == 0),
        verdict(calls as usize <= distinct)
    );
    let text = rig.metrics();
    println!(
        "agent: cache requests hit {} miss {} stale {}; per-user files written {} unchanged {} refused {} error {}; files in per_user_dir {}",
        metric(&text, "ocserv_agent_cache_requests_total{result=\"hit\"}"),
        metric(&text, "ocserv_agent_cache_requests_total{result=\"miss\"}"),
        metric(&text, "ocserv_agent_cache_requests_total{result=\"stale\"}"),
        writes(&text, "written"),
        writes(&text, "unchanged"),
        writes(&text, "refused"),
        writes(&text, "error"),
        std::fs::read_dir(rig.dir.path().join("per-user")).map_or(0, |d| d
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("user"))
            .count()),
    );
    rt.block_on(rig.stop());
    rt.block_on(portal.stop());
}

fn blackhole(rt: &tokio::runtime::Runtime, schedule: &[(Duration, usize)]) {
    let portal = Arc::new(rt.block_on(portal(false)));
    portal.set_latency(PORTAL_LATENCY);
    let rig = rt.block_on(Rig::start(PolicySource::Portal, Some(&portal), |c| {
        c.policy.fail_mode = FailMode::Stale;
        c.policy.allow_ttl = Duration::from_secs(1);
    }));
    let (call_timeout, breaker) = {
        let c = rig.agent.as_ref().expect("running").ctx.config();
        (c.portal.call_timeout, c.portal.breaker.clone())
    };
    // Warm-up: every user once, BLACKHOLE_WARMUP_CONCURRENCY at a time.
    let started = Instant::now();
    let users: Vec<usize> = (0..STORM_USERS).collect();
    for chunk in users.chunks(BLACKHOLE_WARMUP_CONCURRENCY) {
        std::thread::scope(|s| {
            for &u in chunk {
                let hook = &rig.hook;
                s.spawn(move || {
                    let r = ask_blocking(
                        hook,
                        &connect_frame(&storm_user(u), 10_000 + u as u32, hook),
                    );
                    assert!(r.allowed && source(&r) == "fresh", "warm-up: {r:?}");
                });
            }
        });
    }
    let warm = started.elapsed();
    assert_eq!(
        portal.total_calls() as usize,
        STORM_USERS,
        "the warm-up cached every user"
    );
    // Every entry past its fresh lifetime (1 s): stale, still within stale_for.
    std::thread::sleep(Duration::from_millis(1500));
    portal.set_latency(BLACK_HOLE);
    let calls_before = portal.total_calls();

    // Sampler on the agent's runtime: (time since the storm's start, portal calls, breaker state).
    let stop = tokio_util::sync::CancellationToken::new();
    let storm_start = Instant::now();
    let sampler = {
        let (stop, portal) = (stop.clone(), portal.clone());
        let metrics = rig.agent.as_ref().expect("running").metrics.clone();
        rt.spawn(async move {
            let mut samples = Vec::new();
            loop {
                let state = metric(
                    &metrics.encode(),
                    "ocserv_agent_circuit_breaker_state{service=\"auth\"}",
                );
                samples.push((storm_start.elapsed(), portal.total_calls(), state));
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                }
            }
            samples
        })
    };
    let out = run_storm(&rig.hook, schedule);
    stop.cancel();
    let samples = rt.block_on(sampler).expect("sampler");
    let calls_total = portal.total_calls() - calls_before;
    // 0 closed, 1 half-open, 2 open.
    let open_at = samples
        .iter()
        .find(|(_, _, s)| *s >= 1.0)
        .map(|(t, c, _)| (*t, *c - calls_before));
    println!(
        "\n## The same storm with the portal black-holed (fail_mode stale, allow_ttl 1 s, every user cached then stale; call_timeout {}, breaker: {} consecutive failures, open_for {})",
        fmt_d(call_timeout),
        breaker.consecutive_failures,
        fmt_d(breaker.open_for)
    );
    println!(
        "warm-up of {STORM_USERS} users, {BLACKHOLE_WARMUP_CONCURRENCY} at a time: {}",
        fmt_d(warm)
    );
    common::print_header();
    let all = report("every login", &latencies(out.logins.iter()));
    if let Some((t_open, calls_at_open)) = open_at {
        // The sampler sees the state up to SAMPLE_EVERY late: logins of that last interval are
        // counted as before the opening.
        report(
            "logins started before the breaker opened",
            &latencies(out.logins.iter().filter(|l| l.offset < t_open)),
        );
        let after: Vec<&Login> = out.logins.iter().filter(|l| l.offset >= t_open).collect();
        let after_s = report(
            "logins started after it opened",
            &latencies(after.iter().copied()),
        );
        let (sources, errors) = sources_of(after.iter().copied());
        let open_span = out.wall.saturating_sub(t_open);
        println!(
            "breaker first seen open {} into the storm, after {calls_at_open} portal calls; then {} more portal calls in {} (half-open probes: at most one per open_for, ≤ {:.0}); answers after the opening: {sources}; errors {errors}",
            fmt_d(t_open),
            calls_total - calls_at_open,
            fmt_d(open_span),
            (open_span.as_secs_f64() / breaker.open_for.as_secs_f64()).ceil()
        );
        println!(
            "cache-hit (stale) latency while open: median {}, p99 {}",
            fmt_d(after_s.median),
            after_s.tail_text()
        );
    } else {
        println!("the breaker was never seen open");
    }
    let (sources, errors) = sources_of(out.logins.iter());
    println!(
        "every login: p99 {}, answers: {sources}; client errors {errors}{}; most in flight {}; portal calls during the storm {calls_total}",
        all.tail_text(),
        first_error(&out).map_or(String::new(), |e| format!(" (first: {e})")),
        out.max_in_flight
    );
    let text = rig.metrics();
    println!(
        "agent: portal calls ok {} timeout {} unavailable {} breaker_open {}",
        portal_calls_metric(&text, "ok"),
        portal_calls_metric(&text, "timeout"),
        portal_calls_metric(&text, "unavailable"),
        portal_calls_metric(&text, "breaker_open"),
    );
    rt.block_on(rig.stop());
    rt.block_on(portal.stop());
}

// ---------------------------------------------------------------------------------------------

fn wanted(part: &str) -> bool {
    let parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    parts.is_empty() || parts.iter().any(|p| p == part)
}

fn main() {
    if !common::invoked_as_bench() {
        return;
    }
    common::print_machine("connect_policy");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    if wanted("hit") || wanted("miss") || wanted("exec") {
        let mut rows: Vec<(String, Vec<Duration>)> = Vec::new();
        for tls in [false, true] {
            let name = if tls { "mTLS" } else { "plaintext" };
            let portal = rt.block_on(portal(tls));
            let rig = rt.block_on(Rig::start(PolicySource::Portal, Some(&portal), |_| {}));
            if wanted("hit") {
                rows.push((
                    format!("hit, source portal ({name})"),
                    hits(&rig, "alice", "cached"),
                ));
            }
            if wanted("exec") && !tls {
                exec_path(&rig, "alice");
            }
            if wanted("miss") {
                rows.push((
                    format!("miss, portal at 20 ms ({name})"),
                    misses(&rig, &portal, name),
                ));
            }
            rt.block_on(rig.stop());
            rt.block_on(portal.stop());
        }
        if wanted("hit") {
            let rig = rt.block_on(Rig::start(PolicySource::Local, None, |_| {}));
            rows.push((
                "hit, source local (no file)".into(),
                hits(&rig, "alice", "local_policy"),
            ));
            rt.block_on(rig.stop());
        }
        if !rows.is_empty() {
            println!("\n## One decision at a time over the hook socket (client: connect, one frame, read the answer)");
            common::print_header();
            for (label, s) in &rows {
                let r = report(label, s);
                if label.starts_with("hit") {
                    let p99 = r.p99.expect("2000 samples");
                    println!(
                        "    p99 {} (target < {}: {})",
                        fmt_d(p99),
                        fmt_d(HIT_TARGET),
                        verdict(p99 < HIT_TARGET)
                    );
                } else {
                    println!(
                        "    median over the portal's 20 ms: {}",
                        fmt_d(r.median.saturating_sub(PORTAL_LATENCY))
                    );
                }
            }
        }
    }
    let schedule = storm_schedule();
    if wanted("storm") {
        storm(&rt, &schedule, true);
    }
    // Diagnostic, only on request: the storm without per-user file writes.
    if std::env::args().any(|a| a == "storm-nowriter") {
        storm(&rt, &schedule, false);
    }
    if wanted("blackhole") {
        blackhole(&rt, &schedule);
    }
    drop(rt);
}
