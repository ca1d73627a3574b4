//! `PortalLink` against the portal test double (`support::portal`): the agent runs in-process
//! (`ocserv_agent::app::start`) beside a fake ocserv, and the tests ask the link directly, as the
//! policy cache does. mTLS with every field mapped both ways; untrusted peers refused; the call
//! deadline; the circuit breaker's whole cycle with its gauge; an invalid answer refused whole;
//! crashes of the actor during calls. Also the double's own `EventService` and `ValidateSession`
//! recording, which later tests rely on.
//!
//! Hermetic: the configuration is built from the embedded defaults (no file under /etc, no
//! `OCSERV_AGENT__*` variables). Deadlines are generous and nothing asserts speed.

mod support;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ocserv_agent::actors::{self, Child, PORTAL_LINK};
use ocserv_agent::app::Agent;
use ocserv_agent::config::{Config, PortalConfig};
use ocserv_agent::messages::{PolicyQuery, PortalAnswer, PortalError, PortalMsg};
use ocserv_agent::ocserv::fake::FakeOcserv;
use support::agent::{self, metric};
use support::portal::PortalDouble;

struct Setup {
    agent: Agent,
    _fake: FakeOcserv,
    _dir: tempfile::TempDir,
}

/// The embedded defaults (never the machine's file or environment) around `portal`.
fn config(dir: &Path, fake: &FakeOcserv, portal: PortalConfig) -> Config {
    let mut c = agent::config_in(dir, fake.socket());
    c.portal = portal;
    c
}

async fn start(portal: PortalConfig) -> Setup {
    let fake = FakeOcserv::with_sessions(vec![]);
    let dir = tempfile::tempdir().unwrap();
    let agent = agent::start(config(dir.path(), &fake, portal)).await;
    Setup {
        agent,
        _fake: fake,
        _dir: dir,
    }
}

fn query(user: &str) -> PolicyQuery {
    PolicyQuery {
        username: user.to_string(),
        groupname: "staff".into(),
        client_ip: Some("192.0.2.10".parse().unwrap()),
        vpn_ip: Some("10.10.0.7".parse().unwrap()),
        session_id: 31337,
        device: "vpns3".into(),
    }
}

/// Asks the link as the policy cache does (re-sent if the actor dies with it in its mailbox).
async fn ask(user: &str) -> Result<PortalAnswer, PortalError> {
    let q = query(user);
    actors::call(PORTAL_LINK, Duration::from_secs(15), true, |reply| {
        PortalMsg::CheckPolicy {
            request: q.clone(),
            reply,
        }
    })
    .await
    .expect("the portal link answers")
}

fn gauge(a: &Agent) -> Option<f64> {
    metric(
        &a.metrics.encode(),
        "ocserv_agent_circuit_breaker_state{service=\"auth\"}",
    )
}

/// Waits for the breaker gauge to read `v`: the call's task answers the caller right after it
/// reported the outcome to the actor, which sets the gauge when it handles that report.
async fn gauge_is(a: &Agent, v: f64, what: &str) {
    let what = format!("breaker gauge {v} ({what})");
    agent::wait_for(&what, Duration::from_secs(10), || {
        let g = gauge(a);
        async move { (g == Some(v)).then_some(()) }
    })
    .await
}

fn requests(a: &Agent, status: &str) -> f64 {
    let line =
        format!("ocserv_agent_portal_requests_total{{method=\"CheckPolicy\",status=\"{status}\"}}");
    metric(&a.metrics.encode(), &line).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_call_fills_and_maps_every_field() {
    let portal = PortalDouble::start_tls().await;
    // By IP address, verified against the certificate's name given as server_name.
    let mut cfg = portal.config();
    cfg.endpoint = Some(format!("https://127.0.0.1:{}", portal.addr.port()));
    cfg.server_name = Some("localhost".into());
    let s = start(cfg).await;
    assert_eq!(gauge(&s.agent), Some(0.0), "gauge exported from the start");

    portal.answer(
        "alice",
        ocserv_agent::proto::vpn::v1::CheckPolicyResponse {
            should_disconnect: true,
            ..PortalDouble::allow(
                &["10.1.0.0/16", "192.168.7.0/255.255.255.0", "fd00:1::/64"],
                &["10.1.0.53", "fd00::53"],
            )
        },
    );
    portal.answer("bob", PortalDouble::deny("account expired"));
    portal.answer_error("carol", tonic::Code::PermissionDenied, "unknown agent");

    let before = SystemTime::now();
    let a = ask("alice").await.expect("alice allowed");
    assert!(a.decision.allowed);
    assert!(a.should_disconnect);
    assert_eq!(a.decision.reason, None);
    let routes: Vec<String> = a.decision.routes.iter().map(|n| n.to_string()).collect();
    assert_eq!(routes, ["10.1.0.0/16", "192.168.7.0/24", "fd00:1::/64"]);
    let dns: Vec<IpAddr> = vec!["10.1.0.53".parse().unwrap(), "fd00::53".parse().unwrap()];
    assert_eq!(a.decision.dns, dns);
    assert!(a.decision.no_routes.is_empty());

    let r = portal.last_request("alice").expect("the double saw alice");
    assert_eq!(r.username, "alice");
    assert_eq!(r.groupname, "staff");
    assert_eq!(r.client_ip, "192.0.2.10");
    assert_eq!(r.vpn_ip, "10.10.0.7");
    assert_eq!(r.session_id, "31337");
    assert_eq!(r.device, "vpns3");
    let t = r.request_time.expect("request_time filled");
    let sent = SystemTime::UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32);
    let after = SystemTime::now();
    // Timestamps keep whole seconds plus nanos: within the call's own interval.
    assert!(
        sent + Duration::from_millis(1) >= before && sent <= after,
        "{sent:?} not within the call"
    );

    let b = ask("bob").await.expect("bob answered");
    assert!(!b.decision.allowed);
    assert_eq!(b.decision.reason.as_deref(), Some("account expired"));
    assert!(!b.should_disconnect);

    let c = ask("carol").await.unwrap_err();
    assert_eq!(
        c,
        PortalError::Status {
            code: tonic::Code::PermissionDenied,
            message: "unknown agent".into()
        }
    );
    assert_eq!(portal.calls("alice"), 1);
    assert_eq!(requests(&s.agent, "ok"), 2.0);
    assert_eq!(requests(&s.agent, "PERMISSION_DENIED"), 1.0);
    let text = s.agent.metrics.encode();
    assert_eq!(
        metric(
            &text,
            "ocserv_agent_portal_request_duration_seconds_count{method=\"CheckPolicy\"}"
        ),
        Some(3.0)
    );
    // A clear refusal by the portal is the portal working: the breaker stays closed.
    assert_eq!(gauge(&s.agent), Some(0.0));
    s.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_peers_are_refused_and_reach_nothing() {
    let portal = PortalDouble::start_tls().await;
    let tls = portal.tls.as_ref().unwrap();
    let mut wrong_ca = portal.config();
    wrong_ca.ca_file = Some(tls.other_ca.clone());
    wrong_ca.breaker.consecutive_failures = 100;
    let s = start(wrong_ca.clone()).await;

    for _ in 0..2 {
        match ask("alice").await {
            Err(PortalError::Unavailable(why)) => {
                assert!(!why.is_empty());
                eprintln!("wrong CA: {why}");
            }
            other => panic!("wrong CA answered {other:?}"),
        }
    }
    assert_eq!(portal.total_calls(), 0, "no call got through");

    // A client certificate of a CA the portal does not trust (live reconfiguration, as SIGHUP).
    let mut rogue = wrong_ca.clone();
    rogue.ca_file = Some(tls.ca.clone());
    rogue.cert_file = Some(tls.rogue_cert.clone());
    rogue.key_file = Some(tls.rogue_key.clone());
    let mut c = (*s.agent.ctx.config()).clone();
    c.portal = rogue;
    s.agent.ctx.reconfigure(c);
    match ask("alice").await {
        Err(PortalError::Unavailable(why)) => eprintln!("rogue client: {why}"),
        other => panic!("a rogue client certificate answered {other:?}"),
    }
    assert_eq!(portal.total_calls(), 0, "no call got through");

    // The right files: the same link works.
    let mut good = portal.config();
    good.breaker.consecutive_failures = 100;
    let mut c = (*s.agent.ctx.config()).clone();
    c.portal = good;
    s.agent.ctx.reconfigure(c);
    assert!(
        ask("alice")
            .await
            .expect("trusted both ways")
            .decision
            .allowed
    );
    assert_eq!(portal.calls("alice"), 1);
    assert_eq!(requests(&s.agent, "unavailable"), 3.0);
    s.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_portal_is_cut_at_call_timeout() {
    let portal = PortalDouble::start_tls().await;
    portal.set_latency(Duration::from_secs(20));
    let mut cfg = portal.config();
    cfg.call_timeout = Duration::from_millis(300);
    let s = start(cfg).await;
    let t = Instant::now();
    assert_eq!(ask("slow").await, Err(PortalError::Timeout));
    // Far below the portal's 20 s: the deadline, not the portal, ended the call.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(portal.calls("slow"), 1);
    assert_eq!(requests(&s.agent, "timeout"), 1.0);
    s.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_rejects_probes_once_and_closes() {
    let portal = PortalDouble::start_tls().await;
    let mut cfg = portal.config();
    cfg.call_timeout = Duration::from_secs(2);
    cfg.breaker.consecutive_failures = 3;
    // Long enough that the steps while open (20 refused calls, a restart of the link) fit in it
    // on a loaded 2-core machine.
    cfg.breaker.open_for = Duration::from_millis(3000);
    let s = start(cfg).await;
    let a = &s.agent;
    // open_for plus the most jitter (25 %), and a margin.
    let past_open = Duration::from_millis(3000 * 5 / 4 + 200);

    // The portal answers, but does not decide: UNAVAILABLE counts as a failure.
    portal.fail_with(Some((tonic::Code::Unavailable, "overloaded")));
    for i in 0..3 {
        let e = ask("u").await.unwrap_err();
        assert!(
            matches!(
                e,
                PortalError::Status {
                    code: tonic::Code::Unavailable,
                    ..
                }
            ),
            "{e:?}"
        );
        if i < 2 {
            assert_eq!(gauge(a), Some(0.0), "after failure {}", i + 1);
        }
    }
    assert_eq!(portal.calls("u"), 3);
    gauge_is(a, 2.0, "open after 3 failures").await;
    // HealthCheck's deepest tier shows the portal's state; the tiers below never depend on it.
    let deep = agent::health(a, 3).await.expect("tier 3 answered");
    assert!(!deep.healthy, "{deep:?}");
    assert!(
        deep.status_message
            .starts_with("portal: circuit breaker open; last call UNAVAILABLE"),
        "{deep:?}"
    );
    assert!(deep.timestamp.is_some());
    let ocserv_tier = agent::health(a, 2).await.expect("tier 2 answered");
    assert!(ocserv_tier.healthy, "{ocserv_tier:?}");
    assert!(!ocserv_tier.checks.contains_key("portal"));
    // Open: answered at once, and the portal sees nothing.
    for _ in 0..20 {
        assert_eq!(ask("u").await, Err(PortalError::BreakerOpen));
    }
    assert_eq!(portal.calls("u"), 3, "no call while open");
    assert_eq!(requests(a, "breaker_open"), 20.0);

    // A crash of the link keeps the breaker open (it lives in the shared context).
    let old = Child::PortalLink.strike(true).expect("portal link running");
    back_again(old).await;
    assert_eq!(ask("u").await, Err(PortalError::BreakerOpen));
    assert_eq!(portal.calls("u"), 3, "no call after the restart either");

    // open_for passed: the gauge still says open until the next call lets one probe through.
    tokio::time::sleep(past_open).await;
    assert_eq!(gauge(a), Some(2.0));
    let e = ask("u").await.unwrap_err();
    assert!(matches!(e, PortalError::Status { .. }), "probe: {e:?}");
    assert_eq!(portal.calls("u"), 4, "exactly the probe");
    gauge_is(a, 2.0, "failed probe: open again").await;
    assert_eq!(ask("u").await, Err(PortalError::BreakerOpen));
    assert_eq!(portal.calls("u"), 4);

    // The portal is back (slowly): one probe goes through, everything else is rejected
    // while it is in flight (half-open), and its success closes the breaker.
    portal.fail_with(None);
    portal.set_latency(Duration::from_millis(600));
    tokio::time::sleep(past_open).await;
    let probe = tokio::spawn(ask("u"));
    agent::wait_for("the probe at the portal", Duration::from_secs(10), || {
        let n = portal.calls("u");
        async move { (n == 5).then_some(()) }
    })
    .await;
    assert_eq!(gauge(a), Some(1.0), "half-open while probing");
    assert_eq!(ask("other").await, Err(PortalError::BreakerOpen));
    assert_eq!(portal.calls("other"), 0);
    assert!(
        probe
            .await
            .unwrap()
            .expect("probe answered")
            .decision
            .allowed
    );
    gauge_is(a, 0.0, "closed after the probe's success").await;
    let deep = agent::health(a, 3).await.expect("tier 3 answered");
    assert!(deep.healthy, "{deep:?}");
    assert!(
        deep.checks["portal"].starts_with("circuit breaker closed; last call ok"),
        "{deep:?}"
    );
    portal.set_latency(Duration::ZERO);
    for _ in 0..3 {
        assert!(ask("other").await.unwrap().decision.allowed);
    }
    assert_eq!(portal.calls("other"), 3, "fresh answers resume");

    // An outage (port closed, connections dropped) opens it the same way, and it closes once
    // the portal serves again on the same port.
    portal.stop().await;
    for _ in 0..3 {
        match ask("u").await {
            Err(PortalError::Unavailable(_)) => {}
            other => panic!("portal down answered {other:?}"),
        }
    }
    gauge_is(a, 2.0, "open after the outage's failures").await;
    assert_eq!(ask("u").await, Err(PortalError::BreakerOpen));
    portal.resume().await;
    tokio::time::sleep(past_open).await;
    assert!(
        ask("u")
            .await
            .expect("probe after the outage")
            .decision
            .allowed
    );
    gauge_is(a, 0.0, "closed after the outage").await;
    s.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_answer_is_refused_whole() {
    let portal = PortalDouble::start_plain().await;
    portal.answer(
        "bad",
        PortalDouble::allow(&["10.0.0.0/8", "10.1.2.3/8"], &["10.0.0.53"]),
    );
    portal.answer(
        "baddns",
        PortalDouble::allow(&["10.0.0.0/8"], &["resolver.example"]),
    );
    let mut cfg = portal.config();
    cfg.breaker.consecutive_failures = 1;
    let s = start(cfg).await;
    match ask("bad").await {
        Err(PortalError::InvalidAnswer { field, reason }) => {
            assert_eq!(field, "routes[1]");
            assert!(reason.contains("10.1.2.3/8"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    match ask("baddns").await {
        Err(PortalError::InvalidAnswer { field, .. }) => assert_eq!(field, "dns_servers[0]"),
        other => panic!("{other:?}"),
    }
    assert_eq!(requests(&s.agent, "invalid_answer"), 2.0);
    // One user's bad data is not the portal failing: the breaker (1 failure opens it) is still
    // closed when the next call comes (the outcomes were handled before it).
    assert!(ask("fine").await.unwrap().decision.allowed);
    assert_eq!(gauge(&s.agent), Some(0.0));
    s.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_the_link_answers_not_configured() {
    let s = start(PortalConfig::default()).await;
    assert_eq!(ask("anyone").await, Err(PortalError::NotConfigured));
    assert_eq!(requests(&s.agent, "not_configured"), 1.0);
    s.agent.shutdown().await;
}

/// Waits until a new incarnation of the portal link is registered.
async fn back_again(old: ractor::ActorId) {
    agent::wait_for("portal_link restarted", Duration::from_secs(10), || {
        let back = ractor::registry::where_is(PORTAL_LINK).is_some_and(|c| c.get_id() != old);
        async move { back.then_some(()) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_kills_and_panics_of_the_link() {
    let portal = PortalDouble::start_tls().await;
    portal.set_latency(Duration::from_millis(200));
    let mut cfg = portal.config();
    cfg.breaker.consecutive_failures = 1000;
    let s = start(cfg).await;
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut load = tokio::task::JoinSet::new();
    for w in 0..8 {
        let answered = answered.clone();
        load.spawn(async move {
            for i in 0..15 {
                let user = format!("w{w}-{i}");
                let a = ask(&user).await;
                assert!(
                    a.as_ref().is_ok_and(|a| a.decision.allowed),
                    "{user}: {a:?}"
                );
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let old = Child::PortalLink
            .strike(round % 2 == 0)
            .expect("portal link running");
        back_again(old).await;
    }
    while let Some(r) = load.join_next().await {
        r.expect("every call answered with the portal's decision");
    }
    assert_eq!(answered.load(std::sync::atomic::Ordering::Relaxed), 120);
    agent::wait_for("6 restarts counted", Duration::from_secs(10), || {
        let text = s.agent.metrics.encode();
        let line = "ocserv_agent_actor_restarts_total{actor=\"portal_link\"}";
        let n = metric(&text, line);
        async move { (n == Some(6.0)).then_some(()) }
    })
    .await;
    assert!(ask("after").await.unwrap().decision.allowed);
    s.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_tls_file_stops_the_start_naming_its_key() {
    let portal = PortalDouble::start_tls().await;
    let fake = FakeOcserv::with_sessions(vec![]);
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\nnot base64 !!\n").unwrap();
    let mut cfg = portal.config();
    cfg.cert_file = Some(junk);
    let err = ocserv_agent::app::start(config(dir.path(), &fake, cfg))
        .await
        .err()
        .expect("the start fails");
    let text = format!("{err:#}");
    assert!(text.contains("portal.cert_file"), "{text}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    assert_eq!(portal.total_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_double_records_events_and_validations() {
    use ocserv_agent::actors::portal_link;
    use ocserv_agent::proto::vpn::v1::event_service_client::EventServiceClient;
    use ocserv_agent::proto::vpn::v1::{
        ReportConnectRequest, ReportDisconnectRequest, ReportSessionUpdateRequest,
        ValidateSessionRequest,
    };
    use support::portal::Event;

    let portal = PortalDouble::start_tls().await;
    let mut auth = portal_link::client(&portal.config())
        .expect("client built")
        .expect("endpoint configured");
    // Events over the agent's mTLS client configuration, to the same port.
    let tls = tokio_rustls::TlsConnector::from(Arc::new(
        portal_link::tls_config(&portal.config()).expect("client TLS"),
    ));
    let addr = portal.addr;
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = tls.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let mut events = EventServiceClient::new(
        tonic::transport::Endpoint::from_shared(portal.endpoint.clone())
            .unwrap()
            .connect_with_connector_lazy(connector),
    );

    let meta = |id: &str| [("event_id".to_string(), id.to_string())].into();
    let connect = ReportConnectRequest {
        username: "alice".into(),
        session_id: "s1".into(),
        metadata: meta("e1"),
        ..Default::default()
    };
    let disconnect = ReportDisconnectRequest {
        username: "alice".into(),
        session_id: "s1".into(),
        metadata: meta("e2"),
        ..Default::default()
    };
    let update = ReportSessionUpdateRequest {
        username: "bob".into(),
        session_id: "s2".into(),
        ..Default::default()
    };
    portal.disconnect_on_update("s2", "revoked");
    portal.invalidate("s2", "account locked");

    for _ in 0..2 {
        let r = events.report_connect(connect.clone()).await.unwrap();
        assert!(r.into_inner().success);
    }
    portal.set_event_answer(false);
    let r = events.report_disconnect(disconnect.clone()).await.unwrap();
    assert!(!r.into_inner().success);
    portal.set_event_answer(true);
    let r = events.report_session_update(update.clone()).await.unwrap();
    let r = r.into_inner();
    assert!(r.success && r.should_disconnect, "{r:?}");
    assert_eq!(r.disconnect_reason, "revoked");

    let before = Instant::now();
    let ask = |session: &str| ValidateSessionRequest {
        username: "bob".into(),
        session_id: session.into(),
        ..Default::default()
    };
    let v = auth.validate_session(ask("s2")).await.unwrap().into_inner();
    assert!(!v.valid && v.force_disconnect, "{v:?}");
    assert_eq!(v.invalid_reason, "account locked");
    assert!(
        auth.validate_session(ask("s1"))
            .await
            .unwrap()
            .into_inner()
            .valid
    );
    let seen = portal.validations();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].0 >= before && seen[0].1 == ask("s2"));

    let c = Event::Connect(connect);
    let (d, u) = (Event::Disconnect(disconnect), Event::Update(update));
    assert_eq!(
        portal.events(),
        [c.clone(), c.clone(), d.clone(), u.clone()]
    );
    assert_eq!(portal.unique_events(), [c.clone(), d, u.clone()]);
    assert_eq!(portal.duplicates(), 1);
    assert_eq!(
        (c.event_id(), u.event_id(), u.username()),
        ("e1", "", "bob")
    );
    let got = portal
        .wait_events(|e| e.len() == 3, Duration::from_secs(5))
        .await;
    assert_eq!(got[2].session_id(), "s2");

    // The configured error answers events too (they reached the service: recorded).
    portal.fail_with(Some((tonic::Code::Unavailable, "down")));
    let e = events
        .report_session_update(ReportSessionUpdateRequest::default())
        .await;
    assert_eq!(e.unwrap_err().code(), tonic::Code::Unavailable);
    assert_eq!(portal.events().len(), 5);
    portal.clear_events();
    assert!(portal.events().is_empty());
}
