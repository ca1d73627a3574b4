//! The operator's CLI at a scale the lab cannot host: 20 000 sessions from a fake ocserv that
//! speaks the real control protocol (`ocserv::fake`). The listing must come through whole (the
//! reply is several MiB, over a gRPC client's default 4 MiB decode limit).

mod support;

use std::time::Duration;

use ocserv_agent::ocserv::fake::{self, FakeOcserv};
use support::agent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_twenty_thousand_sessions() {
    const N: usize = 20_000;
    let fake = FakeOcserv::with_sessions((0..N).map(|i| fake::session(i, "lo")).collect());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = agent::config_in(dir.path(), fake.socket());
    cfg.grpc.request_timeout = Duration::from_secs(20);
    // Decoding 20 000 sessions in a debug build on a loaded machine can take seconds; this test
    // is about the CLI's listing, not about ocserv's speed.
    cfg.ocserv.request_timeout = Duration::from_secs(10);
    let a = agent::start(cfg).await;
    let socket = a.grpc_socket.display().to_string();
    let cli = |args: Vec<&str>| {
        let mut cmd = agent::agent_cmd(dir.path(), &args);
        async move {
            tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap()
        }
    };
    let out = cli(vec!["sessions", "--json", "--socket", &socket]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["total_count"], N);
    assert_eq!(doc["sessions"].as_array().unwrap().len(), N);
    let table = cli(vec!["sessions", "--socket", &socket]).await;
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.trim_end().ends_with(&format!("{N} session(s)")),
        "{}",
        &text[text.len() - 200..]
    );
    a.shutdown().await;
}
