//! Connect-time policy from the portal: a real ocserv running the shipped hook, real openconnect
//! clients, the portal test double over mTLS; single-flight and fail modes at the hook socket;
//! actor kills during a storm of hook requests. Needs root (network namespaces).

mod support;

/// The hook program cargo built for this test.
const HOOK: &str = env!("CARGO_BIN_EXE_ocserv-agent-hook");

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ocserv_agent::actors::Child;
use ocserv_agent::config::{Config, PolicySource};
use ocserv_agent::ocserv::BackendKind;
use ocserv_agent::policy::{FailMode, Source};
use support::agent::{self, wait_for};
use support::hook::{self, exchange};
use support::lab::{LabOptions, LabUser};
use support::portal::PortalDouble;

fn portal_config(lab: &support::lab::Lab, portal: &PortalDouble) -> Config {
    let mut cfg = agent::config_for(lab, BackendKind::Native);
    cfg.policy.source = PolicySource::Portal;
    cfg.portal = portal.config();
    cfg
}

/// Asks the hook socket as the hook program would, off the async workers.
async fn ask(
    socket: &std::path::Path,
    user: &str,
    id: u32,
) -> ocserv_agent::hook_proto::HookResponse {
    let socket = socket.to_path_buf();
    let frame = hook::connect(user, "", id);
    tokio::task::spawn_blocking(move || exchange(&socket, &frame))
        .await
        .unwrap()
        .expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_admits_denies_and_its_routes_reach_the_next_session() {
    let users = [
        LabUser::new("alice", "pw-alice"),
        LabUser::new("bob", "pw-bob"),
    ];
    let lab = hook::lab(&users, HOOK);
    let portal = PortalDouble::start_tls().await;
    portal.answer(
        "alice",
        PortalDouble::allow(&["10.77.0.0/16"], &["10.77.0.53"]),
    );
    portal.answer("bob", PortalDouble::deny("bob owes the library a book"));
    let mut cfg = portal_config(&lab, &portal);
    cfg.hook.socket = hook::socket(&lab);
    cfg.config_writer.per_user_dir = Some(lab.config_per_user_dir.clone());
    let a = agent::start(cfg).await;

    let first = lab
        .connect("alice", "pw-alice")
        .expect("the portal admits alice");
    assert!(
        lab.connect("bob", "pw-bob").is_err(),
        "the portal denies bob"
    );
    // The reason is logged: the hook prints the agent's refusal on stderr, which ocserv logs.
    let log = std::fs::read_to_string(&lab.ocserv_log).unwrap();
    assert!(
        log.lines().any(|l| l.contains("refused by the agent")
            && l.contains("\"bob\"")
            && l.contains("bob owes the library a book")),
        "bob's refusal and the portal's reason in ocserv's log:\n{log}"
    );
    let req = portal.last_request("alice").expect("alice was asked about");
    assert_eq!(req.username, "alice");
    assert!(
        !req.session_id.is_empty() && req.session_id.parse::<u32>().is_ok(),
        "{req:?}"
    );
    assert!(
        !req.client_ip.is_empty() && !req.device.is_empty(),
        "every field filled: {req:?}"
    );
    let text = a.metrics.encode();
    let decided = |decision: &str| {
        agent::metric(
            &text,
            &format!("ocserv_agent_hook_decisions_total{{reason=\"connect\",decision=\"{decision}\",source=\"fresh\"}}"),
        )
    };
    assert_eq!(
        (decided("allow"), decided("deny")),
        (Some(1.0), Some(1.0)),
        "{text}"
    );

    // The decision's routes and DNS become alice's per-user file, pushed at her next login.
    let file = lab.config_per_user_dir.join("alice");
    wait_for("alice's per-user file", Duration::from_secs(5), || {
        let file = file.clone();
        async move { file.exists().then_some(()) }
    })
    .await;
    drop(first);
    let second = lab
        .connect("alice", "pw-alice")
        .expect("admitted again (cached)");
    let pushed = second.pushed();
    assert!(
        pushed.contains("10.77.0.0") && pushed.contains("10.77.0.53"),
        "ocserv pushed the portal's route and DNS:\n{pushed}"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_for_one_user_make_one_portal_call() {
    let lab = support::lab::Lab::start(LabOptions::default()).expect("lab starts");
    let portal = PortalDouble::start_plain().await;
    // Slow enough that all 50 arrive while the first call is out (within portal.call_timeout,
    // 1 s by default).
    portal.set_latency(Duration::from_millis(700));
    let cfg = portal_config(&lab, &portal);
    let socket = cfg.hook.socket.clone();
    let a = agent::start(cfg).await;
    let asks: Vec<_> = (0..50)
        .map(|i| {
            let socket = socket.clone();
            tokio::spawn(async move { ask(&socket, "zoe", 100 + i).await })
        })
        .collect();
    for ask in asks {
        let answer = ask.await.unwrap();
        assert!(answer.allowed, "{answer:?}");
        assert!(
            matches!(answer.source, Some(Source::Fresh | Source::Cached)),
            "{answer:?}"
        );
    }
    assert_eq!(
        portal.calls("zoe"),
        1,
        "one portal call for 50 concurrent misses"
    );
    // A hit now comes from the cache.
    assert_eq!(ask(&socket, "zoe", 200).await.source, Some(Source::Cached));
    assert_eq!(portal.calls("zoe"), 1);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_down_each_fail_mode_does_what_it_says_in_time() {
    let users = [
        LabUser::new("yann", "pw-yann"),
        LabUser::new("xena", "pw-xena"),
    ];
    let lab = hook::lab(&users, HOOK);
    let portal = PortalDouble::start_plain().await;
    let mut cfg = portal_config(&lab, &portal);
    cfg.hook.socket = hook::socket(&lab);
    cfg.policy.allow_ttl = Duration::from_secs(1);
    cfg.policy.fail_mode = FailMode::Stale;
    cfg.portal.call_timeout = Duration::from_millis(300);
    let socket = cfg.hook.socket.clone();
    let a = agent::start(cfg.clone()).await;
    let before = lab
        .connect("yann", "pw-yann")
        .expect("the portal admits yann before the outage");
    drop(before);

    // The portal hangs (slower than call_timeout): answers still come well before the hook's 3 s.
    portal.set_latency(Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(1200)).await; // yann's entry is stale now
    let started = Instant::now();
    let stale = ask(&socket, "yann", 2).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        (stale.allowed, stale.source),
        (true, Some(Source::Stale)),
        "{stale:?}"
    );
    let never_seen = ask(&socket, "xena", 3).await;
    assert_eq!(
        (never_seen.allowed, never_seen.source),
        (false, Some(Source::FailClosed))
    );
    // The same through ocserv and openconnect: yann's login is admitted from the stale entry,
    // xena (never seen) is refused.
    let stale_login = lab
        .connect("yann", "pw-yann")
        .expect("yann still connects from the stale entry");
    assert!(
        lab.connect("xena", "pw-xena").is_err(),
        "a never-seen user is refused while the portal is down"
    );
    let text = a.metrics.encode();
    for (decision, source, at_least) in [("allow", "stale", 2.0), ("deny", "fail_closed", 2.0)] {
        let n = agent::metric(
            &text,
            &format!("ocserv_agent_hook_decisions_total{{reason=\"connect\",decision=\"{decision}\",source=\"{source}\"}}"),
        );
        assert!(n >= Some(at_least), "{decision}/{source}: {n:?}\n{text}");
    }
    drop(stale_login);

    for (mode, allowed, source) in [
        (FailMode::Open, true, Source::FailOpen),
        (FailMode::Closed, false, Source::FailClosed),
    ] {
        let mut next = cfg.clone();
        next.policy.fail_mode = mode;
        ocserv_agent::app::reload(
            &a.ctx,
            move || {
                Ok(ocserv_agent::config::Loaded {
                    config: next,
                    source: ocserv_agent::config::ConfigSource::EmbeddedDefaults,
                    defaults_used: Vec::new(),
                })
            },
            &|_| Ok(()),
        )
        .await
        .unwrap();
        let answer = ask(&socket, "xena", 4).await;
        assert_eq!(
            (answer.allowed, answer.source),
            (allowed, Some(source)),
            "{mode:?}: {answer:?}"
        );
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_policy_actors_during_a_storm_never_costs_an_answer_or_a_session() {
    let users = [
        LabUser::new("vpn1", "pw-vpn1"),
        LabUser::new("vpn2", "pw-vpn2"),
        LabUser::new("vpn3", "pw-vpn3"),
    ];
    let lab = Arc::new(hook::lab(&users, HOOK));
    let portal = PortalDouble::start_plain().await;
    portal.set_latency(Duration::from_millis(20));
    for i in 0..20 {
        let answer = if i % 4 == 0 {
            PortalDouble::deny("no")
        } else {
            PortalDouble::allow(&[], &[])
        };
        portal.answer(&format!("u{i}"), answer);
    }
    let mut cfg = portal_config(&lab, &portal);
    cfg.policy.fail_mode = FailMode::Stale;
    cfg.hook.socket = hook::socket(&lab);
    let socket = cfg.hook.socket.clone();
    let deadline = cfg.hook.request_timeout;
    let a = agent::start(cfg).await;
    // Two live VPN sessions, admitted by the portal through the real hook.
    let live = [
        lab.connect("vpn1", "pw-vpn1").expect("vpn1 is admitted"),
        lab.connect("vpn2", "pw-vpn2").expect("vpn2 is admitted"),
    ];
    let before = agent::ocserv_ids(&lab);
    assert_eq!(before.len(), 2, "{before:?}");
    // Warm the cache: every user's decision is known (and stays usable as stale).
    for i in 0..20 {
        ask(&socket, &format!("u{i}"), i).await;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let striker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let victims = [
                Child::HookListener,
                Child::PolicyCache,
                Child::PortalLink,
                Child::ConfigWriter,
            ];
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                victims[n % 4].strike(n % 2 == 0);
                n += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            n
        })
    };
    // One more real login in the middle of the storm (the hook's own deadline, 3 s, applies).
    let login = {
        let lab = lab.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            tokio::task::spawn_blocking(move || lab.connect("vpn3", "pw-vpn3"))
                .await
                .unwrap()
        })
    };
    let mut answers: HashMap<bool, usize> = HashMap::new();
    let storm: Vec<_> = (0..400u32)
        .map(|k| {
            let socket = socket.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(u64::from(k) * 5)).await;
                let user = format!("u{}", k % 20);
                let started = Instant::now();
                let frame = hook::connect(&user, "", 1000 + k);
                // A client like the hook: retries while the socket is being re-created, within
                // its own 3 s deadline.
                let answer = tokio::task::spawn_blocking(move || loop {
                    if let Some(a) = std::panic::catch_unwind(|| exchange(&socket, &frame))
                        .ok()
                        .flatten()
                    {
                        return Some(a);
                    }
                    if started.elapsed() > Duration::from_secs(3) {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                })
                .await
                .unwrap();
                (k, answer, started.elapsed())
            })
        })
        .collect();
    for task in storm {
        let (k, answer, took) = task.await.unwrap();
        let answer = answer.unwrap_or_else(|| panic!("request {k} got no answer within 3 s"));
        assert!(
            took < deadline + Duration::from_secs(1),
            "request {k} took {took:?}"
        );
        let expected = (k % 20) % 4 != 0;
        assert_eq!(answer.allowed, expected, "request {k}: {answer:?}");
        *answers.entry(answer.allowed).or_default() += 1;
    }
    let during = login
        .await
        .unwrap()
        .expect("a real login during the storm is admitted");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let strikes = striker.await.unwrap();
    assert!(strikes >= 20, "the actors were struck {strikes} times");
    assert_eq!(answers.values().sum::<usize>(), 400);
    // Cached entries survived the cache's restarts: the warm-up's decisions are still there.
    assert!(a.ctx.policy_store().len() >= 20);

    // The VPN sessions lived through it: the clients still run, ocserv still lists the same
    // sessions (same IDs) plus the one made during the storm, and the agent agrees with ocserv.
    for c in live.iter().chain([&during]) {
        assert!(c.is_alive(), "{} was disconnected:\n{}", c.user, c.log());
    }
    let after = agent::ocserv_ids(&lab);
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(
        before.iter().all(|id| after.contains(id)),
        "before the storm {before:?}, after {after:?}"
    );
    let c = agent::client(&a).await;
    wait_for(
        "the agent's sessions to equal ocserv's",
        Duration::from_secs(10),
        || {
            let mut c = c.clone();
            let after = after.clone();
            async move {
                let mut ids: Vec<u32> = agent::sessions(&mut c, "")
                    .await
                    .ok()?
                    .iter()
                    .filter_map(|s| s.session_id.parse().ok())
                    .collect();
                ids.sort_unstable();
                (ids == after).then_some(())
            }
        },
    )
    .await;
    a.shutdown().await;
}

/// `ocserv_disconnect_total{reason}` from the agent's metrics (0 when absent).
fn ended(a: &ocserv_agent::app::Agent, reason: &str) -> f64 {
    agent::metric(
        &a.metrics.encode(),
        &format!("ocserv_disconnect_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

async fn ended_is(a: &ocserv_agent::app::Agent, reason: &str, n: f64) {
    wait_for(
        &format!("{n} disconnect(s) counted as {reason}"),
        Duration::from_secs(15),
        || async { (ended(a, reason) == n).then_some(()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_disconnect_keeps_one_session_per_user_and_every_end_is_counted_with_its_reason() {
    let users = [LabUser::new("kim", "pw-kim"), LabUser::new("lou", "pw-lou")];
    let lab = hook::lab(&users, HOOK);
    let portal = PortalDouble::start_plain().await;
    // One session per user for kim: admitted, and her other sessions go.
    portal.answer(
        "kim",
        ocserv_agent::proto::vpn::v1::CheckPolicyResponse {
            should_disconnect: true,
            ..PortalDouble::allow(&[], &[])
        },
    );
    portal.answer("lou", PortalDouble::allow(&[], &[]));
    let mut cfg = portal_config(&lab, &portal);
    cfg.hook.socket = hook::socket(&lab);
    let a = agent::start(cfg).await;
    let mut c = agent::client(&a).await;

    let first = lab.connect("kim", "pw-kim").expect("kim's first session");
    let second = lab.connect("kim", "pw-kim").expect("kim's second session");
    // The second connect was answered from the cache: the portal's rule holds for it too.
    assert_eq!(portal.calls("kim"), 1);
    assert!(
        first.wait_exit(Duration::from_secs(15)),
        "the first session is disconnected"
    );
    assert!(second.is_alive(), "the new session stays");
    let listed = agent::wait_sessions(&mut c, "kim", 1).await;
    assert_eq!(
        agent::ocserv_ids(&lab),
        vec![listed[0].session_id.parse::<u32>().unwrap()],
        "ocserv and the agent agree: only the second session is left"
    );
    ended_is(&a, "policy_violation", 1.0).await;

    // An operator's kick.
    let lou = lab.connect("lou", "pw-lou").expect("lou");
    agent::wait_sessions(&mut c, "lou", 1).await;
    let kicked = c
        .disconnect_user(ocserv_agent::proto::agent::v1::DisconnectUserRequest {
            username: "lou".into(),
            reason: "test".into(),
            disconnect_all_sessions: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kicked.sessions_disconnected, 1);
    assert!(lou.wait_exit(Duration::from_secs(15)));
    ended_is(&a, "admin_forced", 1.0).await;

    // A session that ends on its own (the client leaves): reason not known.
    drop(second);
    ended_is(&a, "unspecified", 1.0).await;
    // Nothing is counted twice (a kicked session's own disconnect report comes too).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for reason in ["policy_violation", "admin_forced", "unspecified"] {
        assert_eq!(ended(&a, reason), 1.0, "{reason} counted once");
    }
    a.shutdown().await;
}
