//! Session reporting with a real ocserv, real openconnect clients and the portal test double:
//! every session's connect and disconnect reach the portal's `vpn.v1.EventService` exactly
//! once, with the session's details, whether the portal is up, down for the whole test, or the
//! agent is killed meanwhile; the portal's session updates and revalidations disconnect exactly
//! the session they name; the event stream names why a session ended. Needs root.

mod support;

/// The hook program cargo built for this test.
const HOOK: &str = env!("CARGO_BIN_EXE_ocserv-agent-hook");

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ocserv_agent::config::Config;
use ocserv_agent::metrics::DisconnectReason;
use ocserv_agent::ocserv::BackendKind;
use ocserv_agent::proto::agent::v1::DisconnectUserRequest;
use support::agent::{self, agent_cmd, wait_for};
use support::hook;
use support::lab::{Lab, LabUser};
use support::portal::{Event, PortalDouble};

/// The agent's configuration for `lab`, reporting to `portal`; no session updates and no
/// revalidation unless a test asks.
fn reporting_config(lab: &Lab, portal: &PortalDouble) -> Config {
    let mut cfg = agent::config_for(lab, BackendKind::Native);
    cfg.hook.socket = hook::socket(lab);
    cfg.portal = portal.config();
    cfg.portal.session_update_interval = Duration::ZERO;
    cfg.portal.validate_interval = Duration::ZERO;
    cfg
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn users(names: &[&str]) -> Vec<LabUser> {
    names
        .iter()
        .map(|n| LabUser::new(n, &format!("pw-{n}")))
        .collect()
}

fn connects(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| matches!(e, Event::Connect(_)))
        .collect()
}

fn disconnects(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| matches!(e, Event::Disconnect(_)))
        .collect()
}

/// The disconnect of `user`'s session `session_id`, if reported.
fn ended<'a>(events: &'a [Event], session_id: &str) -> Option<&'a Event> {
    events
        .iter()
        .find(|e| matches!(e, Event::Disconnect(_)) && e.session_id() == session_id)
}

fn reason_of(e: &Event) -> DisconnectReason {
    match e {
        Event::Disconnect(d) => DisconnectReason::try_from(d.reason).unwrap(),
        other => panic!("not a disconnect: {other}"),
    }
}

/// Every session's events (by `session_id` and connect time) in arrival order: each must be
/// exactly a connect, or a connect then a disconnect.
fn assert_once_in_order(events: &[Event]) -> BTreeMap<String, Vec<&'static str>> {
    let mut connected_at: HashMap<String, i64> = HashMap::new();
    let mut per: BTreeMap<String, Vec<&'static str>> = BTreeMap::new();
    for e in events {
        match e {
            Event::Connect(c) => {
                let at = c.connected_at.unwrap().seconds;
                connected_at.insert(c.session_id.clone(), at);
                per.entry(format!("{}@{at}", c.session_id))
                    .or_default()
                    .push("connect");
            }
            Event::Disconnect(d) => {
                let at = connected_at.get(&d.session_id).copied().unwrap_or(-1);
                per.entry(format!("{}@{at}", d.session_id))
                    .or_default()
                    .push("disconnect");
            }
            Event::Update(_) => {}
        }
    }
    for (session, kinds) in &per {
        assert!(
            *kinds == ["connect"] || *kinds == ["connect", "disconnect"],
            "session {session}: {kinds:?}; all events: {events:#?}"
        );
    }
    per
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_session_is_reported_once_with_its_details_and_reason() {
    let lab = hook::lab(&users(&["alice", "bob", "carol"]), HOOK);
    let portal = PortalDouble::start_tls().await;
    let cfg = reporting_config(&lab, &portal);
    let agent_id = cfg.agent.id.clone();
    let a = agent::start(cfg).await;

    let mut alice = lab.connect("alice", "pw-alice").unwrap();
    let _bob = lab.connect("bob", "pw-bob").unwrap();
    let mut carol = lab.connect("carol", "pw-carol").unwrap();
    let seen = portal
        .wait_events(|e| connects(e).len() == 3, Duration::from_secs(20))
        .await;
    let ids = agent::ocserv_ids(&lab);
    let mut by_user = HashMap::new();
    for e in connects(&seen) {
        let Event::Connect(c) = e else { unreachable!() };
        let client = [&alice, &_bob, &carol]
            .into_iter()
            .find(|cl| cl.user == c.username)
            .expect("a lab user");
        let id: u32 = c.session_id.parse().expect("ocserv's ID in decimal");
        assert!(ids.contains(&id), "{id} is listed by ocserv ({ids:?})");
        assert_eq!(c.vpn_ip, client.vpn_ip().unwrap().to_string(), "{c:?}");
        assert!(c.client_ip.parse::<std::net::IpAddr>().is_ok(), "{c:?}");
        assert!(c.device.starts_with(&lab.device_prefix), "{c:?}");
        let at = c.connected_at.unwrap().seconds;
        assert!((now_secs() - at).abs() < 60, "real connect time: {c:?}");
        assert_eq!(c.metadata["agent_id"], agent_id);
        assert_eq!(
            c.metadata.get("safe_id").map(String::len),
            Some(28),
            "{c:?}"
        );
        assert!(!c.metadata["event_id"].is_empty());
        by_user.insert(c.username.clone(), c.session_id.clone());
    }

    // alice moves some bytes, then leaves; bob is kicked by an operator; carol leaves.
    alice.send_traffic(20).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    alice.stop();
    let mut c = agent::client(&a).await;
    let kicked = c
        .disconnect_user(DisconnectUserRequest {
            username: "bob".into(),
            reason: "operator".into(),
            disconnect_all_sessions: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kicked.sessions_disconnected, 1);
    carol.stop();
    let seen = portal
        .wait_events(|e| disconnects(e).len() == 3, Duration::from_secs(20))
        .await;
    let alice_end = ended(&seen, &by_user["alice"]).expect("alice's end");
    let Event::Disconnect(d) = alice_end else {
        unreachable!()
    };
    let stats = d.stats.unwrap();
    assert!(
        stats.bytes_received >= 20 * 1000,
        "alice's pings: {stats:?}"
    );
    assert!(stats.bytes_sent >= 20 * 1000, "the replies: {stats:?}");
    assert!((0..60).contains(&stats.duration_seconds), "{stats:?}");
    assert!((now_secs() - d.disconnected_at.unwrap().seconds).abs() < 60);
    assert_eq!(reason_of(alice_end), DisconnectReason::Unspecified);
    let bob_end = ended(&seen, &by_user["bob"]).expect("bob's end");
    assert_eq!(reason_of(bob_end), DisconnectReason::AdminForced);
    let carol_end = ended(&seen, &by_user["carol"]).expect("carol's end");
    assert_eq!(reason_of(carol_end), DisconnectReason::Unspecified);

    // Many reconciles later: nothing more, nothing twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = portal.events();
    assert_eq!(all.len(), 6, "{all:#?}");
    assert_eq!(portal.duplicates(), 0);
    assert_once_in_order(&all);
    let text = agent::http_get(a.metrics_addr, "/metrics").await.1;
    assert_eq!(agent::metric(&text, "ocserv_agent_outbox_depth"), Some(0.0));
    let counted = |r: &str| {
        agent::metric(&text, &format!("ocserv_disconnect_total{{reason=\"{r}\"}}")).unwrap_or(0.0)
    };
    assert_eq!(
        (counted("unspecified"), counted("admin_forced")),
        (2.0, 1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_down_for_the_whole_test_gets_every_event_in_order_once_it_is_up() {
    let lab = hook::lab(&users(&["dan", "eve", "fay"]), HOOK);
    let portal = PortalDouble::start_plain().await;
    portal.stop().await;
    let a = agent::start(reporting_config(&lab, &portal)).await;

    let mut dan = lab.connect("dan", "pw-dan").unwrap();
    let eve = lab.connect("eve", "pw-eve").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    dan.stop();
    let mut fay = lab.connect("fay", "pw-fay").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    fay.stop();
    let depth = wait_for(
        "5 events in the outbox",
        Duration::from_secs(20),
        || async {
            let text = agent::http_get(a.metrics_addr, "/metrics").await.1;
            let d = agent::metric(&text, "ocserv_agent_outbox_depth").unwrap_or(0.0);
            (d >= 5.0).then_some(d)
        },
    )
    .await;
    assert_eq!(depth, 5.0, "3 connects and 2 disconnects wait");
    assert!(portal.events().is_empty());

    portal.resume().await;
    let seen = portal
        .wait_events(
            |e| connects(e).len() == 3 && disconnects(e).len() == 2,
            Duration::from_secs(60),
        )
        .await;
    let per = assert_once_in_order(&seen);
    assert_eq!(per.len(), 3, "{per:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(portal.unique_events().len(), 5, "{:#?}", portal.events());
    assert!(eve.is_alive(), "no VPN session dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_the_ends_seen_while_down_are_reported_and_live_sessions_are_not_new() {
    let lab = hook::lab(&users(&["gus", "hal", "ivy"]), HOOK);
    let portal = PortalDouble::start_plain().await;
    let dir = tempfile::tempdir().unwrap();
    let spawn = || {
        agent_cmd(dir.path(), &["run"])
            .env("OCSERV_AGENT__OCSERV__CONTROL_SOCKET", &lab.occtl_socket)
            .env("OCSERV_AGENT__OCSERV__RECONCILE_INTERVAL", "300ms")
            .env("OCSERV_AGENT__HOOK__SOCKET", hook::socket(&lab))
            .env("OCSERV_AGENT__METRICS__LISTEN", "127.0.0.1:0")
            .env("OCSERV_AGENT__PORTAL__ENDPOINT", portal.endpoint.as_str())
            .env("OCSERV_AGENT__PORTAL__SESSION_UPDATE_INTERVAL", "0s")
            .env("OCSERV_AGENT__PORTAL__VALIDATE_INTERVAL", "0s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    // The hook's connects wait for the agent to be up.
    let mut gus = lab.connect("gus", "pw-gus").unwrap();
    let mut hal = lab.connect("hal", "pw-hal").unwrap();
    let ivy = lab.connect("ivy", "pw-ivy").unwrap();
    gus.send_traffic(10).unwrap();
    let seen = portal
        .wait_events(|e| connects(e).len() == 3, Duration::from_secs(30))
        .await;
    let ids: HashMap<String, String> = seen
        .iter()
        .map(|e| (e.username().to_string(), e.session_id().to_string()))
        .collect();
    // Let a reconcile read gus's counters into the snapshot? Counters are kept at connect and at
    // each session update; updates are off here, so the last known counters are the connect's.
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();

    gus.stop();
    hal.stop();
    assert!(gus.wait_exit(Duration::from_secs(20)) && hal.wait_exit(Duration::from_secs(20)));
    let mut second = spawn();
    let seen = portal
        .wait_events(|e| disconnects(e).len() == 2, Duration::from_secs(30))
        .await;
    for user in ["gus", "hal"] {
        let end = ended(&seen, &ids[user]).unwrap_or_else(|| panic!("{user}'s end"));
        assert_eq!(
            reason_of(end),
            DisconnectReason::Unspecified,
            "unknown while down"
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = portal.unique_events();
    assert_eq!(
        connects(&all).len(),
        3,
        "ivy is not reported again: {all:#?}"
    );
    assert_eq!(disconnects(&all).len(), 2, "{all:#?}");
    assert_once_in_order(&all);
    assert!(ivy.is_alive(), "no VPN session dropped");
    assert!(agent::ocserv_ids(&lab).contains(&ids["ivy"].parse().unwrap()));
    second.kill().unwrap();
    second.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_disconnects_exactly_the_session_it_names() {
    let lab = hook::lab(&users(&["jo", "kim"]), HOOK);
    let portal = PortalDouble::start_plain().await;
    let mut cfg = reporting_config(&lab, &portal);
    cfg.portal.session_update_interval = Duration::from_secs(1);
    let a = agent::start(cfg).await;
    let jo1 = lab.connect("jo", "pw-jo").unwrap();
    let jo2 = lab.connect("jo", "pw-jo").unwrap();
    let kim = lab.connect("kim", "pw-kim").unwrap();
    let seen = portal
        .wait_events(|e| connects(e).len() == 3, Duration::from_secs(20))
        .await;
    let jo_ids: Vec<String> = connects(&seen)
        .iter()
        .filter(|e| e.username() == "jo")
        .map(|e| e.session_id().to_string())
        .collect();
    let kim_id = connects(&seen)
        .iter()
        .find(|e| e.username() == "kim")
        .unwrap()
        .session_id()
        .to_string();
    let jo_vpn_ip = |id: &str| {
        connects(&seen)
            .iter()
            .find_map(|e| match e {
                Event::Connect(c) if c.session_id == id => Some(c.vpn_ip.clone()),
                _ => None,
            })
            .unwrap()
    };
    let (first, second) = match jo_vpn_ip(&jo_ids[0]) == jo1.vpn_ip().unwrap().to_string() {
        true => ((&jo1, &jo_ids[0]), (&jo2, &jo_ids[1])),
        false => ((&jo2, &jo_ids[0]), (&jo1, &jo_ids[1])),
    };

    // A session update answered with should_disconnect ends that session only.
    portal.disconnect_on_update(first.1, "quota used up");
    assert!(
        first.0.wait_exit(Duration::from_secs(20)),
        "jo's first session is kicked"
    );
    let seen = portal
        .wait_events(|e| ended(e, first.1).is_some(), Duration::from_secs(20))
        .await;
    assert_eq!(
        reason_of(ended(&seen, first.1).unwrap()),
        DisconnectReason::PolicyViolation
    );
    assert!(second.0.is_alive() && kim.is_alive(), "only that session");

    // A revalidation answered with force_disconnect ends that session only.
    portal.invalidate(&kim_id, "account locked");
    let mut cfg = (*a.ctx.config()).clone();
    cfg.portal.validate_interval = Duration::from_secs(2);
    a.ctx.reconfigure(cfg);
    assert!(
        kim.wait_exit(Duration::from_secs(20)),
        "kim's session is kicked"
    );
    let seen = portal
        .wait_events(|e| ended(e, &kim_id).is_some(), Duration::from_secs(20))
        .await;
    assert_eq!(
        reason_of(ended(&seen, &kim_id).unwrap()),
        DisconnectReason::PolicyViolation
    );
    // jo's other session is revalidated too (in its own slice of the interval), and stays.
    wait_for(
        "jo's other session revalidated",
        Duration::from_secs(10),
        || async {
            let asked = portal
                .validations()
                .iter()
                .any(|(_, v)| v.session_id == *second.1);
            asked.then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(second.0.is_alive(), "jo's other session stays");
    let audit = wait_for("both kicks audited", Duration::from_secs(10), || async {
        let got = a.ctx.store.audit(10).unwrap();
        (got.len() >= 2).then_some(got)
    })
    .await;
    let actions: Vec<_> = audit
        .iter()
        .map(|(_, r)| (r.action.as_str(), r.caller.as_str()))
        .collect();
    assert!(
        actions.contains(&("ReportSessionUpdate", "portal")),
        "{audit:?}"
    );
    assert!(
        actions.contains(&("ValidateSession", "portal")),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|(_, r)| r.args["reason"] == "account locked"),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_shorter_than_the_reconcile_interval_are_reported_through_the_hooks() {
    let lab = hook::lab(&users(&["lee"]), HOOK);
    let portal = PortalDouble::start_plain().await;
    let mut cfg = reporting_config(&lab, &portal);
    cfg.ocserv.reconcile_interval = Duration::from_secs(3600);
    let _a = agent::start(cfg).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // past the first reconcile

    let mut lee = lab.connect("lee", "pw-lee").unwrap();
    lee.stop();
    let seen = portal
        .wait_events(|e| disconnects(e).len() == 1, Duration::from_secs(20))
        .await;
    assert_eq!(connects(&seen).len(), 1, "{seen:#?}");
    assert_once_in_order(&seen);

    // A session that ocserv never showed the agent (it ended before it was asked about it):
    // both its events come from its scripts.
    let socket = hook::socket(&lab);
    let id = 4_000_000;
    let connect = hook::connect("lee", "", id);
    let disconnect = hook::frame(&format!(
        r#"{{"reason":"disconnect","username":"lee","groupname":"","ip_real":"192.0.2.9","ip_remote":"10.99.0.9","device":"vpns9","session_id":{id},"stats_bytes_in":"1234","stats_bytes_out":"5678","stats_duration":"1"}}"#
    ));
    tokio::task::spawn_blocking(move || {
        assert!(hook::exchange(&socket, &connect).unwrap().allowed);
        assert!(hook::exchange(&socket, &disconnect).unwrap().allowed);
    })
    .await
    .unwrap();
    let seen = portal
        .wait_events(|e| disconnects(e).len() == 2, Duration::from_secs(20))
        .await;
    let end = ended(&seen, &id.to_string()).expect("the short one's end");
    let Event::Disconnect(d) = end else {
        unreachable!()
    };
    let stats = d.stats.unwrap();
    assert_eq!(
        (
            stats.bytes_received,
            stats.bytes_sent,
            stats.duration_seconds
        ),
        (1234, 5678, 1)
    );
    assert_once_in_order(&seen);
    assert_eq!(connects(&seen).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_names_why_a_session_ended() {
    let lab = hook::lab(&users(&["max", "ned"]), HOOK);
    let portal = PortalDouble::start_plain().await;
    let mut cfg = reporting_config(&lab, &portal);
    cfg.ocserv.event_stream = true;
    cfg.ocserv.reconcile_interval = Duration::from_secs(3600);
    let _a = agent::start(cfg).await;
    let mut max = lab.connect("max", "pw-max").unwrap();
    let ned = lab.connect("ned", "pw-ned").unwrap();
    let seen = portal
        .wait_events(|e| connects(e).len() == 2, Duration::from_secs(20))
        .await;
    let id_of = |user: &str| {
        seen.iter()
            .find(|e| e.username() == user)
            .unwrap()
            .session_id()
            .to_string()
    };
    let (max_id, ned_id) = (id_of("max"), id_of("ned"));
    // An admin's occtl disconnect (not the agent's): ocserv says "server disconnected".
    let out = lab.occtl(&["disconnect", "id", &ned_id]).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(ned.wait_exit(Duration::from_secs(20)));
    max.stop();
    let seen = portal
        .wait_events(|e| disconnects(e).len() == 2, Duration::from_secs(20))
        .await;
    assert_eq!(
        reason_of(ended(&seen, &ned_id).unwrap()),
        DisconnectReason::AdminForced
    );
    assert_eq!(
        reason_of(ended(&seen, &max_id).unwrap()),
        DisconnectReason::UserInitiated
    );
}

/// Chaos: while clients connect and leave, StateStore, SessionRegistry and PortalLink are
/// killed or made to panic every few hundred milliseconds. Afterwards the portal has exactly
/// the storm's events (one connect per session, one disconnect per ended one, in order) and the
/// registry lists what ocserv lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_under_actor_kills_reports_exactly_the_storm() {
    use ocserv_agent::actors::{Child, PORTAL_LINK, SESSION_REGISTRY, STATE_STORE};
    use rand::Rng;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let names: Vec<String> = (0..6).map(|i| format!("storm{i}")).collect();
    let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
    let lab = Arc::new(hook::lab(&users(&names_ref), HOOK));
    let portal = PortalDouble::start_plain().await;
    let a = agent::start(reporting_config(&lab, &portal)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let sessions = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..3 {
        let (lab, stop, sessions) = (lab.clone(), stop.clone(), sessions.clone());
        workers.push(tokio::task::spawn_blocking(move || {
            let mut rng = rand::rng();
            let mut kept = None;
            while !stop.load(Ordering::Relaxed) {
                let user = format!("storm{}", rng.random_range(0..6));
                let Ok(mut client) = lab.connect(&user, &format!("pw-{user}")) else {
                    continue;
                };
                sessions.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(rng.random_range(100..1500)));
                if w == 0 && kept.is_none() {
                    kept = Some(client); // one session stays up through the storm
                } else {
                    client.stop();
                }
            }
            kept
        }));
    }
    let targets = [STATE_STORE, SESSION_REGISTRY, PORTAL_LINK];
    let mut strikes = 0;
    let storm = std::time::Instant::now();
    while storm.elapsed() < Duration::from_secs(15) {
        let (target, panic, pause) = {
            let mut rng = rand::rng();
            let t = targets[rng.random_range(0..targets.len())];
            (t, rng.random_bool(0.5), rng.random_range(100..400))
        };
        if Child::from_name(target)
            .and_then(|c| c.strike(panic))
            .is_some()
        {
            strikes += 1;
        }
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut kept = Vec::new();
    for w in workers {
        kept.extend(w.await.unwrap());
    }
    let n = sessions.load(Ordering::Relaxed);
    assert!(
        n >= 10 && strikes >= 30,
        "a storm: {n} sessions, {strikes} strikes"
    );
    eprintln!(
        "storm: {n} sessions ({} still up), {strikes} strikes",
        kept.len()
    );

    let live = kept.len();
    let seen = portal
        .wait_events(
            |e| connects(e).len() >= n && disconnects(e).len() >= n - live,
            Duration::from_secs(60),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = portal.unique_events();
    assert_eq!(
        (connects(&all).len(), disconnects(&all).len()),
        (n, n - live),
        "exactly the storm's events ({} duplicates dropped): {seen:#?}",
        portal.duplicates()
    );
    assert_once_in_order(&all);
    assert!(kept.iter().all(|c| c.is_alive()), "no VPN session dropped");

    let mut c = agent::client(&a).await;
    let listed = agent::wait_sessions(&mut c, "", live).await;
    let mut ids: Vec<u32> = listed
        .iter()
        .map(|s| s.session_id.parse().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        agent::ocserv_ids(&lab),
        "the registry equals ocserv's list"
    );
}
