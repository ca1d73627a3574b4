//! Session reporting at 10 000 sessions: what one reconcile and one outbox drain cost, as wall
//! time and CPU time, and what that CPU is as a share of one core at the default intervals
//! (`ocserv.reconcile_interval` 10 s, `portal.session_update_interval` 60 s).
//!
//! The agent runs in-process (`ocserv_agent::app::start`, on this binary's 2-worker runtime) on
//! the fake ocserv of `common` listing 10 000 sessions (`fake::session(i, tun)`, as in
//! `sessions_scale`), with reporting on: `portal` is the plaintext portal double of
//! `tests/support/portal.rs` (EventService answers `success` at once, or after 2 ms). Embedded
//! defaults otherwise, except: `reconcile_interval` 1 h and `session_update_interval` 1 h (only
//! this bench starts reconciles and update rounds), `validate_interval` 0 (no ValidateSession
//! calls in the background), sockets and state (the redb file) in a temp dir.
//!
//! CPU: process CPU is `getrusage(RUSAGE_SELF)` user + sys. The fake ocserv and the portal double
//! live in this process, each on an OS thread of its own (the double on a current-thread runtime
//! started here), and so does the bench's driver (the main thread, in `block_on`): their CPU is
//! read per thread from `/proc/self/task/TID/schedstat` (on-CPU nanoseconds, the same accounting
//! getrusage sums) and the **agent's** CPU is the process's minus those three threads. Each row
//! prints every figure's distribution (`common::report`); the closing summary gives medians and
//! p90s (the max for the drains' 5 rounds), events/s, CPU per event and the share of one core at
//! the default interval. The agent's idle CPU with 10 000 sessions is measured first (5 s).
//!
//! 1. Start: the registry's first reconcile saves a resync (10 000 connects) and PortalLink
//!    drains them; timed until the double has 10 000 events and `ocserv_agent_outbox_depth` is 0.
//! 2. Reconcile (`RegistryMsg::ReconcileNow`, the agent's own path: STATUS + LIST from the fake,
//!    decode, diff, save of the changes), 3 warm-up + 20 recorded each: on an unchanged list;
//!    where 1 % changed (the fake's range moves on by 100: 100 sessions closed, 100 new), timed to
//!    the reply and, as a second row, until the double also has the 200 events they make (100
//!    connects at once, 100 disconnects after the registry's 2 s `CLOSE_GRACE`) and the outbox is
//!    empty; and unchanged with every session on tun `lo`, so each reconcile reads the byte
//!    counters from sysfs as beside a real ocserv (with the tun absent they fail fast).
//! 3. Drain of 10 000 events, double answering at once and after 2 ms, 5 rounds each:
//!    (a) an update round by the agent's real path: `RegistryMsg::UpdateDue` → 10 000
//!    `Change::Update` saved through StateStore → PortalLink drains, timed from the message until
//!    the outbox is empty and the double has all 10 000; (b) the drain alone: the 10 000 updates
//!    recorded with `ctx.store.record` on the bench thread (the save row, its CPU counted as
//!    the agent's), then `PortalMsg::Drain`, timed until the outbox is empty. Every round checks
//!    that the double received 10 000 distinct updates.
//!
//! `cargo bench --bench session_reporting`. Bounded: fixed counts, every wait has a deadline.
//! Only loopback TCP and Unix sockets in temp dirs.

#![forbid(unsafe_code)]

mod common;
#[allow(dead_code)]
#[path = "../tests/support/portal.rs"]
mod portal;

use std::time::{Duration, Instant, SystemTime};

use common::{report, Devices, FakeOcserv};
use ocserv_agent::actors::{call, PORTAL_LINK, SESSION_REGISTRY};
use ocserv_agent::messages::{PortalMsg, ReconcileReport, RegistryMsg};
use ocserv_agent::store::{unix_ms, Change, SessionRecord};
use portal::{Event, PortalDouble};

const SESSIONS: usize = 10_000;
const WARMUP: usize = 3;
const RECONCILES: usize = 20;
/// 1 % of the sessions: closed and opened by each "changed" reconcile.
const CHANGED: usize = 100;
const DRAIN_ROUNDS: usize = 5;
const LATENCY: Duration = Duration::from_millis(2);
const IDLE: Duration = Duration::from_secs(5);
const LIMIT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(2);

// ---------------------------------------------------------------------------------------------
// CPU accounting

/// On-CPU time of one thread of this process (`/proc/self/task/TID/schedstat`, nanoseconds).
fn thread_cpu(tid: i32) -> Duration {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// user + sys of the whole process, threads that ended included.
fn process_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(u.user_time()) + tv(u.system_time())
}

/// The thread named `name` (`/proc/self/task/*/comm`).
fn thread_named(name: &str) -> i32 {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .find(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no thread named {name}"))
}

/// Threads that are not the agent: the fake ocserv, the portal double, the bench's driver.
struct Meter {
    fake: i32,
    double: i32,
    bench: i32,
}

#[derive(Clone, Copy)]
struct Mark {
    at: Instant,
    process: Duration,
    others: [Duration; 3],
}

/// Wall and CPU between two marks; `others` = fake ocserv, portal double, bench thread.
#[derive(Clone, Copy, Default)]
struct Usage {
    wall: Duration,
    process: Duration,
    others: [Duration; 3],
}

impl Usage {
    fn agent(&self) -> Duration {
        self.process.saturating_sub(self.others.iter().sum())
    }
}

impl Meter {
    fn mark(&self) -> Mark {
        Mark {
            at: Instant::now(),
            others: [self.fake, self.double, self.bench].map(thread_cpu),
            process: process_cpu(),
        }
    }
}

impl Mark {
    fn since(&self, earlier: &Mark) -> Usage {
        Usage {
            wall: self.at - earlier.at,
            process: self.process.saturating_sub(earlier.process),
            others: [0, 1, 2].map(|i| self.others[i].saturating_sub(earlier.others[i])),
        }
    }
}

/// One measured row: its label, the runs, the events each run handles (0: none), the default
/// interval its CPU recurs at (`None`: once).
struct Row {
    label: String,
    runs: Vec<Usage>,
    events: usize,
    every: Option<Duration>,
}

impl Row {
    fn print(&self) {
        println!("\n### {} ({} runs)", self.label, self.runs.len());
        common::print_header();
        let column = |f: &dyn Fn(&Usage) -> Duration| self.runs.iter().map(f).collect::<Vec<_>>();
        report("wall", &column(&|u| u.wall));
        report("CPU, whole process", &column(&|u| u.process));
        report(
            "CPU, agent (process minus the 3 below)",
            &column(&|u| u.agent()),
        );
        report("CPU, fake ocserv thread", &column(&|u| u.others[0]));
        report("CPU, portal double thread", &column(&|u| u.others[1]));
        report("CPU, bench driver thread", &column(&|u| u.others[2]));
    }

    /// Median and p90 (nearest rank; the max under 10 runs) of one figure.
    fn stat(&self, f: fn(&Usage) -> Duration) -> (Duration, Duration) {
        let s = common::summarize(&self.runs.iter().map(f).collect::<Vec<_>>());
        (s.median, if s.n >= 10 { s.p90 } else { s.max })
    }
}

fn share(cpu: Duration, every: Duration) -> String {
    format!("{:.2} %", 100.0 * cpu.as_secs_f64() / every.as_secs_f64())
}

fn summary(rows: &[Row], idle_per_s: Duration) {
    let d = common::fmt_d;
    println!("\n## Summary");
    println!(
        "agent = process minus the fake ocserv, the double and the driver; p90 = max under 10 runs"
    );
    println!(
        "idle agent with {SESSIONS} sessions: {} CPU per second ({} of one core)",
        d(idle_per_s),
        share(idle_per_s, Duration::from_secs(1))
    );
    println!(
        "| what | n | wall median / p90 | CPU process median / p90 | CPU agent median / p90 | \
         CPU fake ocserv | CPU double | events/s | agent CPU per event | \
         agent share of one core at the default interval |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let two = |(m, p): (Duration, Duration)| format!("{} / {}", d(m), d(p));
    for r in rows {
        let (wall, agent) = (r.stat(|u| u.wall), r.stat(Usage::agent));
        let (rate, per_event) = match r.events {
            0 => (String::new(), String::new()),
            n => (
                format!("{:.0}", n as f64 / wall.0.as_secs_f64()),
                d(agent.0 / n as u32),
            ),
        };
        let every = r.every.map_or("(once)".into(), |e| {
            format!("{} (every {e:?})", share(agent.0, e))
        });
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {rate} | {per_event} | {every} |",
            r.label,
            r.runs.len(),
            two(wall),
            two(r.stat(|u| u.process)),
            two(agent),
            d(r.stat(|u| u.others[0]).0),
            d(r.stat(|u| u.others[1]).0),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The rig

/// The portal double on an OS thread and current-thread runtime of its own.
struct Double {
    portal: Option<PortalDouble>,
    tid: i32,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Double {
    fn start() -> Double {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("portal-double".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("double runtime");
                rt.block_on(async move {
                    let portal = PortalDouble::start_plain().await;
                    let _ = tx.send((portal, nix::unistd::gettid().as_raw()));
                    let _ = stopped.await;
                });
            })
            .expect("double thread");
        let (portal, tid) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the double starts");
        Double {
            portal: Some(portal),
            tid,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn get(&self) -> &PortalDouble {
        self.portal.as_ref().expect("double running")
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        drop(self.portal.take());
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {LIMIT:?}");
        tokio::time::sleep(POLL).await;
    }
}

async fn reconcile() -> ReconcileReport {
    call(SESSION_REGISTRY, Duration::from_secs(60), true, |r| {
        RegistryMsg::ReconcileNow(r)
    })
    .await
    .expect("registry answers")
    .expect("reconcile succeeds")
}

fn send<M: ractor::Message>(actor: &str, msg: M) {
    ractor::registry::where_is(actor)
        .unwrap_or_else(|| panic!("{actor} is not running"))
        .send_message(msg)
        .unwrap_or_else(|_| panic!("{actor} refused a message"));
}

/// Checks the double holds `n` distinct events of `kind` (and nothing else); clears them.
fn take_events(double: &PortalDouble, n: usize, kind: fn(&Event) -> bool, what: &str) {
    let unique = double.unique_events();
    let of_kind = unique.iter().filter(|e| kind(e)).count();
    assert_eq!(
        (of_kind, unique.len()),
        (n, n),
        "{what}: events of the expected kind, all distinct events"
    );
    let dup = double.duplicates();
    if dup > 0 {
        println!("note: {what}: {dup} duplicate events (sent again)");
    }
    double.clear_events();
}

async fn run() {
    let double = Double::start();
    let fake = FakeOcserv::start(SESSIONS, Devices::Missing);
    let meter = Meter {
        fake: thread_named("fake-ocserv"),
        double: double.tid,
        bench: nix::unistd::gettid().as_raw(),
    };
    assert!(
        thread_cpu(meter.bench) > Duration::ZERO,
        "per-thread CPU (/proc/self/task/TID/schedstat) unavailable"
    );
    let dir = tempfile::Builder::new()
        .prefix("oa-bench-reporting-")
        .tempdir()
        .expect("temp dir");
    let mut config = ocserv_agent::config::load_with_env(None, &[])
        .expect("embedded defaults are valid")
        .config;
    let (reconcile_every, update_every) = (
        config.ocserv.reconcile_interval,
        config.portal.session_update_interval,
    );
    config.ocserv.control_socket = fake.socket.clone();
    config.ocserv.reconcile_interval = Duration::from_secs(3600);
    config.grpc.socket = dir.path().join("agent.sock");
    config.grpc.listen = None;
    config.hook.socket = dir.path().join("hook.sock");
    config.agent.state_dir = dir.path().join("state");
    config.metrics.listen = "127.0.0.1:0".parse().expect("address");
    config.portal = double.get().config();
    config.portal.session_update_interval = Duration::from_secs(3600);
    config.portal.validate_interval = Duration::ZERO;
    let mut rows = Vec::new();

    // 1. Start: resync of 10 000 saved and drained.
    let m0 = meter.mark();
    let agent = ocserv_agent::app::start(config)
        .await
        .expect("the agent starts");
    let depth = || agent.metrics.outbox_depth.get();
    wait_for("the resync's 10 000 connects drained", || {
        double.get().event_count() >= SESSIONS && depth() == 0
    })
    .await;
    rows.push(Row {
        label: "start: first reconcile, resync of 10 000 saved, 10 000 connects drained".into(),
        runs: vec![meter.mark().since(&m0)],
        events: SESSIONS,
        every: None,
    });
    take_events(
        double.get(),
        SESSIONS,
        |e| matches!(e, Event::Connect(_)),
        "resync",
    );

    // Idle baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m0 = meter.mark();
    tokio::time::sleep(IDLE).await;
    let idle = meter.mark().since(&m0);
    let idle_per_s = idle.agent().div_f64(idle.wall.as_secs_f64());

    // 2. Reconciles.
    let unchanged_reconciles = || async {
        let mut runs = Vec::new();
        for i in 0..WARMUP + RECONCILES {
            let m0 = meter.mark();
            let r = reconcile().await;
            let u = meter.mark().since(&m0);
            assert_eq!((r.sessions, r.opened, r.closed), (SESSIONS, 0, 0));
            if i >= WARMUP {
                runs.push(u);
            }
        }
        runs
    };
    let unchanged = unchanged_reconciles().await;
    assert_eq!(
        double.get().event_count(),
        0,
        "an unchanged list reports nothing"
    );
    let (mut changed, mut changed_reported) = (Vec::new(), Vec::new());
    let mut first = 0;
    for i in 0..WARMUP + RECONCILES {
        first += CHANGED;
        fake.set_range(first, SESSIONS, Devices::Missing);
        let m0 = meter.mark();
        let r = reconcile().await;
        let m1 = meter.mark();
        assert_eq!(
            (r.sessions, r.opened, r.closed),
            (SESSIONS, CHANGED, CHANGED)
        );
        let d = double.get();
        wait_for("the 200 events of a 1 % change", || {
            d.event_count() >= 2 * CHANGED && depth() == 0
        })
        .await;
        let m2 = meter.mark();
        if i >= WARMUP {
            changed.push(m1.since(&m0));
            changed_reported.push(m2.since(&m0));
        }
        let connects = d
            .unique_events()
            .iter()
            .filter(|e| matches!(e, Event::Connect(_)))
            .count();
        assert_eq!(connects, CHANGED, "100 connects and 100 disconnects");
        take_events(d, 2 * CHANGED, |_| true, "1 % change");
    }
    fake.set_range(first, SESSIONS, Devices::Loopback);
    let counters = unchanged_reconciles().await;
    for (label, runs) in [
        ("reconcile, unchanged list (tun absent)", unchanged),
        ("reconcile, 1 % changed (100 closed, 100 new)", changed),
        (
            "same, until its 200 events are saved and drained (incl. the 2 s close grace)",
            changed_reported,
        ),
        (
            "reconcile, unchanged list, counters read from sysfs (tun lo)",
            counters,
        ),
    ] {
        rows.push(Row {
            label: label.into(),
            runs,
            events: 0,
            every: Some(reconcile_every),
        });
    }

    // 3. Drains of 10 000 updates.
    let ctx = agent.ctx.clone();
    let sessions = call(SESSION_REGISTRY, Duration::from_secs(10), true, |reply| {
        RegistryMsg::Query {
            username: None,
            reply,
        }
    })
    .await
    .expect("registry answers")
    .sessions;
    assert_eq!(sessions.len(), SESSIONS);
    for latency in [Duration::ZERO, LATENCY] {
        double.get().set_latency(latency);
        let at = match latency.is_zero() {
            true => "double answering at once".to_owned(),
            false => format!("double at {latency:?}"),
        };
        let (mut round, mut drain, mut save) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..DRAIN_ROUNDS {
            let d = double.get();
            let m0 = meter.mark();
            send(SESSION_REGISTRY, RegistryMsg::UpdateDue);
            wait_for("an update round drained", || {
                d.event_count() >= SESSIONS && depth() == 0
            })
            .await;
            round.push(meter.mark().since(&m0));
            take_events(
                d,
                SESSIONS,
                |e| matches!(e, Event::Update(_)),
                "update round",
            );

            let at_ms = unix_ms(SystemTime::now());
            let changes: Vec<Change> = sessions
                .iter()
                .map(|s| Change::Update {
                    session: SessionRecord::of(s),
                    at_ms,
                })
                .collect();
            let reporting = ocserv_agent::actors::state_store::reporting(&ctx);
            let m0 = meter.mark();
            let recorded = ctx
                .store
                .record(&changes, &reporting, at_ms)
                .expect("the store records");
            let m1 = meter.mark();
            assert_eq!(recorded.updates, SESSIONS);
            send(PORTAL_LINK, PortalMsg::Drain);
            wait_for("the outbox drained", || {
                d.event_count() >= SESSIONS && depth() == 0
            })
            .await;
            // The agent's own code on the bench thread: counted as the agent's.
            let mut saved = m1.since(&m0);
            saved.others[2] = Duration::ZERO;
            save.push(saved);
            drain.push(meter.mark().since(&m1));
            take_events(d, SESSIONS, |e| matches!(e, Event::Update(_)), "drain");
        }
        rows.push(Row {
            label: format!("update round by the real path: UpdateDue → saved → drained, {at}"),
            runs: round,
            events: SESSIONS,
            every: Some(update_every),
        });
        rows.push(Row {
            label: format!("drain alone of 10 000 updates, {at}"),
            runs: drain,
            events: SESSIONS,
            every: Some(update_every),
        });
        if latency.is_zero() {
            rows.push(Row {
                label: "save alone: 10 000 updates in one store.record (on the bench thread)"
                    .into(),
                runs: save,
                events: SESSIONS,
                every: Some(update_every),
            });
        }
    }

    let text = agent.metrics.encode();
    for l in text.lines().filter(|l| {
        l.starts_with("ocserv_agent_portal_requests_total") || l.starts_with("ocserv_agent_outbox")
    }) {
        println!("{l}");
    }
    for r in &rows {
        r.print();
    }
    summary(&rows, idle_per_s);
    agent.shutdown().await;
    drop(fake);
    drop(double);
}

fn main() {
    if !common::invoked_as_bench() {
        return;
    }
    common::print_machine("session_reporting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run());
}
