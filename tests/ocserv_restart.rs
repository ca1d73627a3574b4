//! ocserv stopped and started again under a running agent: `/readyz` goes unready then ready, the
//! registry recovers, errors are counted and never fatal.

mod support;

use std::time::Duration;

use ocserv_agent::ocserv::BackendKind;
use support::agent::{self, wait_for};
use support::lab::{Lab, LabOptions, LabUser};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_rides_through_an_ocserv_restart() {
    let mut lab = Lab::start(LabOptions {
        users: vec![LabUser::new("frank", "pw-frank")],
        ..Default::default()
    })
    .unwrap();
    let first = lab.connect("frank", "pw-frank").unwrap();
    let a = agent::start(agent::config_for(&lab, BackendKind::Native)).await;
    let mut c = agent::client(&a).await;
    agent::wait_sessions(&mut c, "frank", 1).await;
    let ready = |want: u16| {
        let addr = a.metrics_addr;
        move || async move { (agent::http_get(addr, "/readyz").await.0 == want).then_some(()) }
    };
    wait_for("/readyz 200", Duration::from_secs(5), ready(200)).await;

    lab.stop_ocserv().unwrap();
    wait_for(
        "/readyz 503 after ocserv stopped",
        Duration::from_secs(10),
        ready(503),
    )
    .await;
    assert_eq!(agent::http_get(a.metrics_addr, "/healthz").await.0, 200);
    // The client lost its server; openconnect keeps retrying or exits: either way it is gone from ocserv.
    drop(first);

    lab.start_ocserv().unwrap();
    wait_for(
        "/readyz 200 after ocserv restarted",
        Duration::from_secs(10),
        ready(200),
    )
    .await;
    // The registry drops the sessions of the old ocserv and picks up new ones.
    let _second = lab.connect("frank", "pw-frank").unwrap();
    let s = agent::wait_sessions(&mut c, "frank", 1).await;
    assert_eq!(
        s[0].session_id.parse::<u32>().unwrap(),
        agent::ocserv_ids(&lab)[0]
    );

    let (_, text) = agent::http_get(a.metrics_addr, "/metrics").await;
    let errors = agent::metric(
        &text,
        "ocserv_agent_ocserv_requests_total{command=\"list\",status=\"error\"}",
    )
    .unwrap_or(0.0);
    assert!(errors >= 1.0, "failed list requests are counted:\n{text}");
    assert_eq!(agent::metric(&text, "ocserv_up "), Some(1.0));
    a.shutdown().await;
}
