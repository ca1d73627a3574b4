//! DESIGN §6: "session list from ocserv: native control socket vs exec'd occtl, native at least
//! 5× faster".
//!
//! Method: a real lab (tests/support/lab.rs: ocserv 1.1.6 in its own network namespace, real
//! openconnect clients in another) with `CLIENTS` connected sessions. In one run, on one tokio
//! runtime, `NativeBackend::list()` and `OcctlBackend::list()` (`/usr/bin/occtl`, exec'd in the
//! agent's namespace as the agent does) are called alternately, `WARMUP` unrecorded calls each,
//! then `ITERATIONS` recorded pairs whose order flips every pair so neither backend always runs
//! second. Each call is timed end to end as the agent sees it: for native, connect, LIST, decode
//! and per-session byte counters; for occtl, fork/exec of occtl, its own socket round trip, JSON
//! parse and the same counters. Both must return the same session IDs. A breakdown row times the
//! byte counters of the listed sessions alone (`ocserv::counters::read`, as both backends call
//! it), which both figures contain.
//!
//! Bounded: fixed call counts and a wall-clock budget for the recorded loop; the lab has
//! deadlines on every wait and is torn down on drop (namespaces, processes, temp dir).
//! Contacts only the lab's own namespaces and its control socket.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::report;
use ocserv_agent::ocserv::native::NativeBackend;
use ocserv_agent::ocserv::occtl::OcctlBackend;
use ocserv_agent::ocserv::{counters, OcservBackend, Session};
use support::lab::{Lab, LabOptions, LabUser};

const CLIENTS: usize = 10;
const WARMUP: usize = 10;
const ITERATIONS: usize = 200;
const BUDGET: Duration = Duration::from_secs(240);
const OCCTL: &str = "/usr/bin/occtl";
const COUNTER_SAMPLES: usize = 200;

fn ids(list: &[Session]) -> Vec<u32> {
    let mut v: Vec<u32> = list.iter().map(|s| s.id).collect();
    v.sort_unstable();
    v
}

async fn timed(b: &impl OcservBackend, what: &str) -> (Duration, Vec<Session>) {
    let t = Instant::now();
    let list = b
        .list()
        .await
        .unwrap_or_else(|e| panic!("{what} list() failed: {e}"));
    (t.elapsed(), list)
}

async fn compare(lab: &Lab) {
    let timeout = Duration::from_secs(10);
    let native = NativeBackend::new(lab.occtl_socket.clone(), timeout);
    let occtl = OcctlBackend::new(PathBuf::from(OCCTL), lab.occtl_socket.clone(), timeout);

    let (_, n) = timed(&native, "native").await;
    let (_, o) = timed(&occtl, "occtl").await;
    assert_eq!(n.len(), CLIENTS, "native lists every lab session");
    assert_eq!(ids(&n), ids(&o), "both backends list the same sessions");
    println!(
        "both backends list {} sessions; with byte counters: native {}, occtl {}",
        n.len(),
        n.iter().filter(|s| s.counters.is_some()).count(),
        o.iter().filter(|s| s.counters.is_some()).count()
    );

    for _ in 0..WARMUP {
        timed(&native, "native").await;
        timed(&occtl, "occtl").await;
    }
    let (mut ns, mut os) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for i in 0..ITERATIONS {
        if started.elapsed() > BUDGET {
            println!("(budget {BUDGET:?} spent after {i} pairs)");
            break;
        }
        if i % 2 == 0 {
            ns.push(timed(&native, "native").await.0);
            os.push(timed(&occtl, "occtl").await.0);
        } else {
            os.push(timed(&occtl, "occtl").await.0);
            ns.push(timed(&native, "native").await.0);
        }
    }
    // What both backends spend on the per-session byte counters (sysfs, or procfs after checking
    // the worker process's start time), timed alone on this thread.
    let mut counters = Vec::new();
    for i in 0..WARMUP + COUNTER_SAMPLES {
        let t = Instant::now();
        let read = n
            .iter()
            .filter_map(|s| counters::read(&s.device, s.id, s.connected_at))
            .count();
        if i >= WARMUP {
            counters.push(t.elapsed());
        }
        assert_eq!(read, n.len(), "every lab session has byte counters");
    }
    common::print_header();
    let a = report("NativeBackend::list() (control socket)", &ns);
    let b = report("OcctlBackend::list() (exec occtl --json)", &os);
    let c = report("breakdown: byte counters of the 10 sessions", &counters);
    let ratio = b.median.as_secs_f64() / a.median.as_secs_f64().max(1e-9);
    let ((tail, bt), (_, at)) = (b.tail(), a.tail());
    let ratio_tail = bt.as_secs_f64() / at.as_secs_f64().max(1e-9);
    println!(
        "occtl / native: median {ratio:.1}x, {tail} {ratio_tail:.1}x → target \"native at least 5x faster\" {}",
        if ratio >= 5.0 { "met" } else { "MISSED" }
    );
    let without = |x: &common::Summary| x.median.saturating_sub(c.median).as_secs_f64();
    println!(
        "medians without the counters' median: native {}, occtl {} ({:.1}x)",
        common::fmt_d(a.median.saturating_sub(c.median)),
        common::fmt_d(b.median.saturating_sub(c.median)),
        without(&b) / without(&a).max(1e-9)
    );
}

fn main() {
    if !common::invoked_as_bench() {
        return;
    }
    common::print_machine("ocserv_list");
    println!("\n## Session list from a real ocserv with {CLIENTS} openconnect clients");
    let users: Vec<LabUser> = (0..CLIENTS)
        .map(|i| LabUser::new(&format!("bench{i}"), &format!("pw-bench-{i}")))
        .collect();
    let t = Instant::now();
    let lab = match Lab::start(LabOptions {
        users: users.clone(),
        ..Default::default()
    }) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ocserv_list: cannot start the lab (needs root and ocserv): {e:#}");
            std::process::exit(1);
        }
    };
    let mut clients = Vec::new();
    for u in &users {
        match lab.connect(&u.name, &u.password) {
            Ok(c) => clients.push(c),
            Err(e) => {
                eprintln!("ocserv_list: client {} did not connect: {e:#}", u.name);
                drop(clients);
                drop(lab);
                std::process::exit(1);
            }
        }
    }
    println!("lab up with {} clients in {:?}", clients.len(), t.elapsed());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(compare(&lab));
    drop(rt);
    drop(clients);
    drop(lab);
}
