//! The gRPC front door against a real lab: only allowed uids control the agent; the control
//! socket's life cycle (directory and socket modes, stale and live sockets, removal on stop);
//! streams that never send and silent connections cannot starve it (read timeout, stream and
//! connection caps, idle timeout); reflection advertises what is served; requests refused before
//! a handler are counted; running out of descriptors is reported as such and recovers; health
//! follows readiness and a stale view is never served.
//!
//! Raw HTTP/2 (the `h2` crate) and raw Unix streams stand in for hostile or careless clients; the
//! operator's own client is the CLI's connector (`ocserv_agent::cli::connect`).

mod support;

use std::collections::BTreeSet;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ocserv_agent::actors::GRPC_FRONT_DOOR;
use ocserv_agent::health::NotReady;
use ocserv_agent::ocserv::BackendKind;
use support::agent::{self, wait_for};
use support::lab::{Lab, LabOptions, LabUser};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const GET_SESSIONS: &str = "/agent.v1.VPNAgentService/GetActiveSessions";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const NOBODY: u32 = 65534;

fn lab(users: &[LabUser]) -> Lab {
    Lab::start(LabOptions {
        users: users.to_vec(),
        ..Default::default()
    })
    .expect("lab starts")
}

/// A gRPC channel on a Unix socket (for the health and reflection clients), as the CLI opens it.
async fn channel(path: &Path) -> Channel {
    let target = ocserv_agent::cli::Target::Socket(path.to_path_buf());
    ocserv_agent::cli::connect_channel(&target)
        .await
        .map_err(|e| e.message)
        .expect("connect to the agent's socket")
}

/// `grpc.health.v1.Health/Check` for the whole server ("").
async fn health_check(path: &Path) -> Result<ServingStatus, tonic::Status> {
    let mut c = HealthClient::new(channel(path).await);
    let r = c
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(r.into_inner().status())
}

async fn metrics_text(a: &ocserv_agent::app::Agent) -> String {
    agent::http_get(a.metrics_addr, "/metrics").await.1
}

/// Waits until `/readyz` answers 200 (the agent has agreed with ocserv at least once).
async fn wait_ready(a: &ocserv_agent::app::Agent) {
    let addr = a.metrics_addr;
    wait_for("/readyz 200", Duration::from_secs(10), || async move {
        (agent::http_get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
}

/// A gRPC message frame: compressed flag, big-endian length, bytes.
fn grpc_frame(compressed: bool, msg: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(5 + msg.len());
    f.push(u8::from(compressed));
    f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    f.extend_from_slice(msg);
    Bytes::from(f)
}

/// A gRPC request's headers for `path`.
fn grpc_request(path: &str, extra: &[(&str, &str)]) -> http::Request<()> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("http://agent.sock{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

/// A raw HTTP/2 connection to the socket; the connection is driven by a task whose result says
/// how it ended.
async fn h2_connect(
    path: &Path,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let io = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect to the socket");
    let (send, conn) = h2::client::handshake(io).await.expect("HTTP/2 handshake");
    (send, tokio::spawn(conn))
}

/// Percent-decoding of `grpc-message`.
fn unpercent(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The gRPC status (code, message) of a response read with h2: from the headers of a
/// trailers-only response, else from the trailers after the body.
async fn grpc_status(resp: h2::client::ResponseFuture) -> (i32, String) {
    let resp = resp.await.expect("a response");
    let from = |h: &http::HeaderMap| {
        let code = h
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())?;
        let msg = h
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .map(unpercent)
            .unwrap_or_default();
        Some((code, msg))
    };
    if let Some(s) = from(resp.headers()) {
        return s;
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("response body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body
        .trailers()
        .await
        .expect("response trailers")
        .expect("trailers present");
    from(&trailers).expect("grpc-status in the trailers")
}

/// Sends one unary call with `body` (already framed) on a raw h2 connection; returns its status.
async fn h2_unary(
    send: h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: Bytes,
) -> (i32, String) {
    let mut send = send.ready().await.expect("h2 ready");
    let (resp, mut stream) = send.send_request(req, false).expect("send request");
    stream.send_data(body, true).expect("send body");
    grpc_status(resp).await
}

/// True when the peer has closed the stream (EOF or reset); consumes whatever bytes are buffered
/// without waiting.
fn closed_now(s: &mut std::os::unix::net::UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Reads until the peer closes, within `timeout`; returns the bytes received, or None when the
/// stream was still open at the deadline.
async fn read_to_close(s: &mut tokio::net::UnixStream, timeout: Duration) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    let mut total = 0;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(total),
            Ok(Ok(n)) => total += n,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Only allowed uids control the agent.
// ---------------------------------------------------------------------------------------------

/// Runs the real CLI as uid/gid 65534: `disconnect USER --socket PATH`.
async fn cli_as_nobody(user: &str, socket: &Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_ocserv-agent"))
        .args(["disconnect", user, "--socket"])
        .arg(socket)
        .env_clear()
        // The gid too: with gid 0 the 0660 root:root socket would let the process in by its group.
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .await
        .expect("run the CLI as uid 65534")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_uids_control_the_agent() {
    let lab = lab(&[LabUser::new("carol", "pw-carol")]);
    let carol = lab.connect("carol", "pw-carol").unwrap();
    // A socket directory uid 65534 can traverse, so that only the socket's own mode and the peer
    // check stand in its way.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("agent.sock");
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.grpc.socket = socket.clone();
    assert_eq!(cfg.grpc.allowed_uids, vec![0], "root only by default");
    let a = agent::start(cfg).await;
    let mut root = agent::client(&a).await;
    let before = agent::wait_sessions(&mut root, "carol", 1).await;

    // (a) Mode 0660, owned by root: uid 65534 cannot even connect.
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode");
    let out = cli_as_nobody("carol", &socket).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(ocserv_agent::cli::EXIT_UNAVAILABLE),
        "uid 65534 on a 0660 socket: {out:?}"
    );
    assert!(
        stderr.to_lowercase().contains("permission"),
        "the message mentions permission: {stderr}"
    );
    assert!(carol.is_alive(), "carol's openconnect still runs");
    let now = agent::sessions(&mut root, "carol").await.unwrap();
    assert_eq!(now.len(), 1, "carol's session still listed");
    assert_eq!(now[0].session_id, before[0].session_id);

    // (b) The socket opened to everyone: uid 65534 connects, and every request it makes is
    // refused by the peer check.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = cli_as_nobody("carol", &socket).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(ocserv_agent::cli::EXIT_REFUSED),
        "uid 65534 on a 0666 socket is refused by the agent: {out:?}"
    );
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    let refused = agent::metric(
        &metrics_text(&a).await,
        "ocserv_agent_connections_refused_total{listener=\"grpc_socket\",reason=\"peer_uid\"}",
    )
    .unwrap_or(0.0);
    assert!(refused >= 1.0, "the refused peer is counted: {refused}");
    let denied = agent::metric(
        &metrics_text(&a).await,
        "ocserv_agent_grpc_requests_total{method=\"DisconnectUser\",code=\"PERMISSION_DENIED\"}",
    )
    .unwrap_or(0.0);
    assert!(denied >= 1.0, "the refused request is counted: {denied}");
    // Had the kick gone through, openconnect would exit within moments; give it time to.
    assert!(
        !carol.wait_exit(Duration::from_secs(2)),
        "carol's openconnect still runs"
    );
    assert_eq!(
        agent::ocserv_ids(&lab),
        vec![before[0].session_id.parse::<u32>().unwrap()]
    );

    // (c) Root still controls it.
    let now = agent::sessions(&mut root, "carol").await.unwrap();
    assert_eq!(now.len(), 1, "root lists carol's session");
    let mut fresh = agent::socket_client(&socket).await;
    assert_eq!(agent::sessions(&mut fresh, "").await.unwrap().len(), 1);
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Socket life cycle.
// ---------------------------------------------------------------------------------------------

/// The control socket in a fresh temp dir, at `run/ocserv-agent/agent.sock` (not created yet).
fn socket_in(base: &tempfile::TempDir) -> PathBuf {
    base.path()
        .join("run")
        .join("ocserv-agent")
        .join("agent.sock")
}

fn config_with_socket(lab: &Lab, socket: &Path) -> ocserv_agent::config::Config {
    let mut c = agent::config_for(lab, BackendKind::Native);
    c.grpc.socket = socket.to_path_buf();
    c
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

// Each case starts its agent in its own test (process): `Agent::shutdown` returns before the
// supervisor's name is unregistered, so a second `app::start` right after it in the same process
// can fail with "Actor 'supervisor' is already registered".

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_is_created_with_its_modes_and_removed_on_stop() {
    use ocserv_agent::actors::supervisor::ExitReason;
    let lab = lab(&[]);
    let base = tempfile::tempdir().unwrap();
    let socket = socket_in(&base);
    let dir = socket.parent().unwrap().to_path_buf();
    assert!(!dir.exists());
    let a = agent::start(config_with_socket(&lab, &socket)).await;
    assert_eq!(mode(&dir), 0o750, "socket directory mode");
    assert_eq!(mode(&socket), 0o660, "socket mode");
    let mut c = agent::client(&a).await;
    agent::sessions(&mut c, "")
        .await
        .expect("served on the new socket");
    drop(c);
    assert_eq!(a.shutdown().await, ExitReason::Shutdown);
    assert!(
        !socket.exists(),
        "the socket file is removed on a clean stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_control_socket_is_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let lab = lab(&[]);
    let base = tempfile::tempdir().unwrap();
    let socket = socket_in(&base);
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    // A socket file whose listener is gone, as a crashed run leaves it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(
        std::fs::symlink_metadata(&socket)
            .unwrap()
            .file_type()
            .is_socket(),
        "the stale socket file stays after its listener is dropped"
    );
    let a = agent::start(config_with_socket(&lab, &socket)).await;
    assert_eq!(mode(&socket), 0o660, "socket mode");
    let mut c = agent::client(&a).await;
    agent::sessions(&mut c, "")
        .await
        .expect("served on the replaced socket");
    drop(c);
    a.shutdown().await;
    assert!(!socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_socket_or_other_file_at_the_path_is_refused() {
    let lab = lab(&[]);
    let base = tempfile::tempdir().unwrap();
    let socket = socket_in(&base);
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();

    // A live socket (another process accepting on it) is not taken over.
    let live = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let err = ocserv_agent::app::start(config_with_socket(&lab, &socket))
        .await
        .err()
        .expect("start fails while another listener serves the socket");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("grpc.socket"),
        "the error names the key: {msg}"
    );
    let _client = std::os::unix::net::UnixStream::connect(&socket)
        .expect("the other listener still owns the socket");
    live.set_nonblocking(true).unwrap();
    live.accept()
        .expect("and the connection reached it, not the agent");
    drop(live);
    std::fs::remove_file(&socket).unwrap();

    // A regular file at the path is refused and left alone.
    std::fs::write(&socket, b"not a socket").unwrap();
    let err = ocserv_agent::app::start(config_with_socket(&lab, &socket))
        .await
        .err()
        .expect("start fails on a regular file");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("grpc.socket"),
        "the error names the key: {msg}"
    );
    assert_eq!(
        std::fs::read(&socket).unwrap(),
        b"not a socket",
        "the regular file is not deleted"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Streams that never send cannot starve the agent.
// ---------------------------------------------------------------------------------------------

const STREAMS: u32 = 16;
const CONNECTIONS: usize = 20;

/// Opens `CONNECTIONS` raw HTTP/2 connections, each with `STREAMS` GetActiveSessions streams
/// that never send a body. Returns the response futures with their send halves (kept open) and
/// the time each stream was opened, plus the max concurrent streams the server advertised on
/// each connection.
#[allow(clippy::type_complexity)]
async fn open_hanging_streams(
    socket: &Path,
) -> (
    Vec<(h2::client::ResponseFuture, h2::SendStream<Bytes>, Instant)>,
    Vec<usize>,
    Vec<tokio::task::JoinHandle<Result<(), h2::Error>>>,
) {
    let mut streams = Vec::new();
    let mut advertised = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let (send, conn) = h2_connect(socket).await;
        // One complete call first: once its answer is in, the server's SETTINGS have been read.
        let (code, msg) = h2_unary(
            send.clone(),
            grpc_request(HEALTH_CHECK, &[]),
            grpc_frame(false, &[]),
        )
        .await;
        assert_eq!(code, 0, "health check on a raw connection: {msg}");
        advertised.push(send.current_max_send_streams());
        let mut send = send;
        for _ in 0..STREAMS {
            send = send.ready().await.expect("h2 ready");
            let (resp, body) = send
                .send_request(grpc_request(GET_SESSIONS, &[]), false)
                .expect("open a stream");
            streams.push((resp, body, Instant::now()));
        }
        conns.push(conn);
    }
    (streams, advertised, conns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_never_send_do_not_starve_the_agent() {
    let lab = lab(&[LabUser::new("erin", "pw-erin")]);
    let _erin = lab.connect("erin", "pw-erin").unwrap();
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.grpc.max_streams_per_connection = STREAMS;
    // Fewer request slots than hanging streams: a stream that held a slot while waiting for its
    // body would lock every caller out.
    cfg.grpc.max_concurrent_requests = 64;
    // Long enough that the streams hang for the whole test.
    cfg.grpc.read_timeout = Duration::from_secs(60);
    cfg.grpc.request_timeout = Duration::from_secs(60);
    let a = agent::start(cfg).await;
    let mut c = agent::client(&a).await;
    agent::wait_sessions(&mut c, "erin", 1).await;

    let (mut streams, advertised, _conns) = open_hanging_streams(&a.grpc_socket).await;
    assert_eq!(streams.len(), CONNECTIONS * STREAMS as usize);
    assert!(
        advertised.iter().all(|&n| n == STREAMS as usize),
        "the server's SETTINGS advertise max_concurrent_streams = {STREAMS}: {advertised:?}"
    );

    // A normal client is answered promptly, on its existing connection and on a new one, and
    // health checks answer, while the streams hang.
    let mut fresh = agent::client(&a).await;
    for round in 0..5 {
        for (name, cl) in [("existing", &mut c), ("new", &mut fresh)] {
            let r = tokio::time::timeout(Duration::from_secs(2), agent::sessions(cl, "erin"))
                .await
                .unwrap_or_else(|_| panic!("round {round}: {name} client not answered within 2 s"));
            assert_eq!(r.expect("GetActiveSessions").len(), 1);
        }
        let h = tokio::time::timeout(Duration::from_secs(2), health_check(&a.grpc_socket))
            .await
            .expect("health check answered within 2 s");
        assert_eq!(h.expect("health check"), ServingStatus::Serving);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The streams were hanging all along: none has been answered.
    for (i, (resp, _, _)) in streams.iter_mut().enumerate() {
        assert!(
            still_pending(resp),
            "stream {i} is still waiting for its answer"
        );
    }
    drop(streams);
    a.shutdown().await;
}

/// True while the response future is still pending (polled once, without waiting).
fn still_pending(resp: &mut h2::client::ResponseFuture) -> bool {
    use std::future::Future;
    use std::task::{Context, Poll};
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    matches!(std::pin::Pin::new(resp).poll(&mut cx), Poll::Pending)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_never_send_are_answered_after_the_read_timeout() {
    let lab = lab(&[]);
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.grpc.max_streams_per_connection = STREAMS;
    cfg.grpc.read_timeout = Duration::from_secs(1);
    cfg.grpc.request_timeout = Duration::from_secs(30);
    let a = agent::start(cfg).await;
    wait_ready(&a).await;

    let (streams, advertised, _conns) = open_hanging_streams(&a.grpc_socket).await;
    assert!(
        advertised.iter().all(|&n| n == STREAMS as usize),
        "the server's SETTINGS advertise max_concurrent_streams = {STREAMS}: {advertised:?}"
    );
    let answers = streams.into_iter().map(|(resp, body, opened)| async move {
        let _keep_open = body;
        // Far below grpc.request_timeout (30 s): the read timeout answers, not the request one.
        let r = tokio::time::timeout(Duration::from_secs(10), grpc_status(resp)).await;
        (r, opened.elapsed())
    });
    let answers = join_all(answers.collect()).await;
    for (i, (r, took)) in answers.into_iter().enumerate() {
        let (code, msg) = r.unwrap_or_else(|_| panic!("stream {i} not answered within 10 s"));
        assert_eq!(
            code,
            tonic::Code::DeadlineExceeded as i32,
            "stream {i}: {msg}"
        );
        assert!(
            msg.contains("grpc.read_timeout"),
            "stream {i} answered by the read timeout: {msg}"
        );
        assert!(
            took >= Duration::from_millis(900),
            "stream {i} was held until the read timeout, not refused at once: {took:?}"
        );
    }
    let text = metrics_text(&a).await;
    let counted = agent::metric(
        &text,
        "ocserv_agent_grpc_requests_total{method=\"GetActiveSessions\",code=\"DEADLINE_EXCEEDED\"}",
    );
    assert_eq!(
        counted,
        Some((CONNECTIONS * STREAMS as usize) as f64),
        "every stream is counted once"
    );
    // And the agent serves normally afterwards.
    let mut c = agent::client(&a).await;
    agent::sessions(&mut c, "").await.expect("served");
    a.shutdown().await;
}

/// Awaits every future (spawned, so that they progress together).
async fn join_all<T: Send + 'static>(
    futs: Vec<impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 4. Connection cap, read and idle timeouts.
// ---------------------------------------------------------------------------------------------

const CAP: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once_and_silent_ones_after_the_read_timeout() {
    let lab = lab(&[]);
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.grpc.max_connections = CAP;
    cfg.grpc.read_timeout = Duration::from_secs(1);
    cfg.grpc.idle_timeout = Duration::from_secs(2);
    let a = agent::start(cfg).await;
    wait_ready(&a).await;
    let ep = a.ctx.grpc_endpoints[0].clone();
    assert_eq!(ep.connections(), 0);

    // Fill the cap with connections that send nothing.
    let mut silent = Vec::new();
    for _ in 0..CAP {
        silent.push(std::os::unix::net::UnixStream::connect(&a.grpc_socket).unwrap());
    }
    wait_for(
        "the agent to accept the silent connections",
        Duration::from_secs(5),
        || {
            let ep = ep.clone();
            async move { (ep.connections() == CAP).then_some(()) }
        },
    )
    .await;

    // One more: closed at once, without even the server's HTTP/2 preface.
    let mut ninth = tokio::net::UnixStream::connect(&a.grpc_socket)
        .await
        .unwrap();
    let got = read_to_close(&mut ninth, Duration::from_secs(3)).await;
    assert_eq!(
        got,
        Some(0),
        "the connection over the cap is closed without being served"
    );
    for (i, s) in silent.iter_mut().enumerate() {
        assert!(
            !closed_now(s),
            "silent connection {i} was still open when the one over the cap was closed"
        );
    }
    let text = metrics_text(&a).await;
    let limit = agent::metric(
        &text,
        "ocserv_agent_connections_refused_total{listener=\"grpc_socket\",reason=\"limit\"}",
    )
    .unwrap_or(0.0);
    assert!(limit >= 1.0, "the refused connection is counted:\n{text}");
    // Reaching the cap does not make the agent unready.
    let (status, body) = agent::http_get(a.metrics_addr, "/readyz").await;
    assert_eq!(status, 200, "/readyz at the cap: {body}");

    // The silent ones are closed once the read timeout has passed.
    let mut silent: Vec<_> = silent
        .into_iter()
        .map(|s| {
            s.set_nonblocking(true).unwrap();
            tokio::net::UnixStream::from_std(s).unwrap()
        })
        .collect();
    for (i, s) in silent.iter_mut().enumerate() {
        assert!(
            read_to_close(s, Duration::from_secs(5)).await.is_some(),
            "silent connection {i} closed after grpc.read_timeout"
        );
    }
    wait_for(
        "the silent connections to be gone",
        Duration::from_secs(5),
        || {
            let ep = ep.clone();
            async move { (ep.connections() == 0).then_some(()) }
        },
    )
    .await;
    let mut c = agent::client(&a).await;
    agent::sessions(&mut c, "")
        .await
        .expect("a normal client is served again");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let lab = lab(&[]);
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.grpc.read_timeout = Duration::from_secs(1);
    cfg.grpc.idle_timeout = Duration::from_secs(2);
    let a = agent::start(cfg).await;
    wait_ready(&a).await;
    let ep = a.ctx.grpc_endpoints[0].clone();

    // A raw HTTP/2 connection: one call, then nothing. The agent sends GOAWAY and closes it.
    let (send, conn) = h2_connect(&a.grpc_socket).await;
    let (code, msg) = h2_unary(
        send.clone(),
        grpc_request(GET_SESSIONS, &[]),
        grpc_frame(false, &[]),
    )
    .await;
    assert_eq!(code, 0, "{msg}");
    let t = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(6), conn)
        .await
        .expect("the idle connection is closed within idle_timeout + 4 s")
        .expect("connection task");
    match ended {
        Ok(()) => {}
        Err(e) => assert!(
            e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR),
            "closed with a graceful GOAWAY: {e:?}"
        ),
    }
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "the connection had made a request: closed by the idle timeout (2 s), not the read \
         timeout (1 s): {:?}",
        t.elapsed()
    );
    assert!(
        send.ready().await.is_err(),
        "no new stream on a closed connection"
    );

    // The operator's client: one call, then idle; the agent closes it, its next call reconnects.
    let mut c = agent::client(&a).await;
    agent::sessions(&mut c, "").await.expect("first call");
    wait_for(
        "the idle client connection to be closed",
        Duration::from_secs(6),
        || {
            let ep = ep.clone();
            async move { (ep.connections() == 0).then_some(()) }
        },
    )
    .await;
    agent::sessions(&mut c, "")
        .await
        .expect("the next call reconnects");
    a.shutdown().await;
}

/// `ocserv_agent_connections_open` follows connections closing, not only opening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_gauge_goes_down_when_connections_close() {
    let lab = lab(&[]);
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.grpc.read_timeout = Duration::from_secs(1);
    let a = agent::start(cfg).await;
    wait_ready(&a).await;
    let gauge = "ocserv_agent_connections_open{listener=\"grpc_socket\"}";
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(
            tokio::net::UnixStream::connect(&a.grpc_socket)
                .await
                .unwrap(),
        );
    }
    let addr = a.metrics_addr;
    wait_for(
        "the gauge to show 3 open",
        Duration::from_secs(5),
        || async move {
            let text = agent::http_get(addr, "/metrics").await.1;
            (agent::metric(&text, gauge) == Some(3.0)).then_some(())
        },
    )
    .await;
    for s in silent.iter_mut() {
        assert!(read_to_close(s, Duration::from_secs(5)).await.is_some());
    }
    let ep = a.ctx.grpc_endpoints[0].clone();
    wait_for("the connections to be gone", Duration::from_secs(5), || {
        let ep = ep.clone();
        async move { (ep.connections() == 0).then_some(()) }
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = agent::http_get(addr, "/metrics").await.1;
        let v = agent::metric(&text, gauge);
        if v == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{gauge} still {v:?} 5 s after every connection closed (the endpoint counts 0)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Reflection.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_advertises_exactly_the_services_served() {
    use tonic_reflection::pb::{v1, v1alpha};
    let lab = lab(&[]);
    let a = agent::start(agent::config_for(&lab, BackendKind::Native)).await;
    let ch = channel(&a.grpc_socket).await;

    let mut c = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = c
        .server_reflection_info(tokio_stream::once(req))
        .await
        .expect("v1 reflection answers")
        .into_inner();
    let reply = answers.message().await.unwrap().expect("one reply");
    let v1_names: BTreeSet<String> = match reply.message_response {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a service list: {other:?}"),
    };

    let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = c
        .server_reflection_info(tokio_stream::once(req))
        .await
        .expect("v1alpha reflection answers (older grpcurl)")
        .into_inner();
    let reply = answers.message().await.unwrap().expect("one reply");
    let v1alpha_names: BTreeSet<String> = match reply.message_response {
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a service list: {other:?}"),
    };

    for names in [&v1_names, &v1alpha_names] {
        assert!(
            !names.contains("vpn.v1.AuthService") && !names.contains("vpn.v1.EventService"),
            "the portal's services are called, not served: {names:?}"
        );
    }
    // Exactly what is served: the agent's services, health, and both reflection versions.
    let expected: BTreeSet<String> = [
        "agent.v1.VPNAgentService",
        "agent.v1.AgentService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(v1_names, expected, "v1 list");
    assert_eq!(v1alpha_names, expected, "v1alpha list");
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Requests refused before a handler are counted.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_a_handler_are_counted() {
    let lab = lab(&[]);
    let a = agent::start(agent::config_for(&lab, BackendKind::Native)).await;
    wait_ready(&a).await;
    let count = |text: &str, code: &str| {
        agent::metric(
            text,
            &format!(
                "ocserv_agent_grpc_requests_total{{method=\"GetActiveSessions\",code=\"{code}\"}}"
            ),
        )
        .unwrap_or(0.0)
    };
    let before = metrics_text(&a).await;
    let (send, _conn) = h2_connect(&a.grpc_socket).await;

    // A well-formed gRPC frame whose message is not protobuf: field 1, length 5, one byte.
    let (code, msg) = h2_unary(
        send.clone(),
        grpc_request(GET_SESSIONS, &[]),
        grpc_frame(false, &[0x0a, 0x05, b'a']),
    )
    .await;
    assert_eq!(
        code,
        tonic::Code::Internal as i32,
        "invalid protobuf: {msg}"
    );

    // A compressed message in an encoding the agent does not accept.
    let (code, msg) = h2_unary(
        send.clone(),
        grpc_request(GET_SESSIONS, &[("grpc-encoding", "gzip")]),
        grpc_frame(true, &[0x1f, 0x8b, 0x08, 0x00]),
    )
    .await;
    assert_eq!(
        code,
        tonic::Code::Unimplemented as i32,
        "gzip-compressed request: {msg}"
    );

    let after = metrics_text(&a).await;
    assert_eq!(
        count(&after, "INTERNAL") - count(&before, "INTERNAL"),
        1.0,
        "the undecodable request is counted as INTERNAL:\n{after}"
    );
    assert_eq!(
        count(&after, "UNIMPLEMENTED") - count(&before, "UNIMPLEMENTED"),
        1.0,
        "the compressed request is counted as UNIMPLEMENTED:\n{after}"
    );
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Out of descriptors.
// ---------------------------------------------------------------------------------------------

/// Restores the soft descriptor limit when dropped (also when the test panics, so that the
/// lab's clean-up can spawn its commands).
struct NofileGuard(u64, u64);

impl Drop for NofileGuard {
    fn drop(&mut self) {
        let _ = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            self.0,
            self.1,
        );
    }
}

fn open_fds() -> u64 {
    // The directory handle itself is one of the entries.
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64 - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_is_reported_and_recovers() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let lab = lab(&[]);
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    // The held connections must stay open for the whole test.
    cfg.grpc.read_timeout = Duration::from_secs(120);
    cfg.grpc.idle_timeout = Duration::from_secs(120);
    let a = agent::start(cfg).await;
    wait_ready(&a).await;
    assert_eq!(a.ctx.health.check(), Ok(()));
    let front_door = ractor::registry::where_is(GRPC_FRONT_DOOR)
        .expect("front door running")
        .get_id();
    let ep = a.ctx.grpc_endpoints[0].clone();
    let socket: PathBuf = a.grpc_socket.clone();

    // Spare descriptors to give back one at a time, so that the last one goes to a connection
    // the agent then cannot accept (rather than to the agent, leaving this side short).
    let mut spare: Vec<std::fs::File> = (0..4)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let _restore = NofileGuard(soft, hard);
    let limit = open_fds() + 30;
    setrlimit(Resource::RLIMIT_NOFILE, limit, hard).unwrap();

    let out_of_fds =
        |h: &ocserv_agent::health::Health| matches!(h.check(), Err(NotReady::OutOfDescriptors(_)));
    let mut held = Vec::new();
    for _ in 0..200 {
        if out_of_fds(&a.ctx.health) {
            break;
        }
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(s) => {
                held.push(s);
                // Wait for the agent to accept it (or to fail to).
                let deadline = Instant::now() + Duration::from_secs(2);
                while ep.connections() < held.len()
                    && !out_of_fds(&a.ctx.health)
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::EMFILE) => {
                if spare.pop().is_none() {
                    break;
                }
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
    wait_for(
        "readiness to report OutOfDescriptors",
        Duration::from_secs(5),
        || {
            let h = a.ctx.health.clone();
            async move { out_of_fds(&h).then_some(()) }
        },
    )
    .await;
    let why = a.ctx.health.check().unwrap_err();
    assert!(
        why.to_string().contains("descriptors"),
        "readiness blames descriptors, not ocserv: {why}"
    );
    // Let the accept loop back off and retry for a while: it must neither crash nor end.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = a.metrics.encode();
    let refused = agent::metric(
        &text,
        "ocserv_agent_connections_refused_total{listener=\"grpc_socket\",reason=\"descriptors\"}",
    )
    .unwrap_or(0.0);
    assert!(refused >= 1.0, "failed accepts are counted:\n{text}");
    assert_eq!(
        ractor::registry::where_is(GRPC_FRONT_DOOR).map(|c| c.get_id()),
        Some(front_door),
        "the front door was not restarted"
    );
    assert!(
        agent::metric(
            &text,
            "ocserv_agent_actor_restarts_total{actor=\"grpc_front_door\"}"
        )
        .is_none_or(|v| v == 0.0),
        "no restart counted:\n{text}"
    );

    // Give the descriptors back: readiness recovers and a normal client is served.
    drop(held);
    drop(spare);
    drop(_restore);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(why) = a.ctx.health.check() {
        assert!(
            Instant::now() < deadline,
            "readiness did not recover within 10 s: {why}\n{}",
            a.metrics.encode()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = agent::client(&a).await;
    agent::sessions(&mut c, "").await.expect("served again");
    assert_eq!(
        ractor::registry::where_is(GRPC_FRONT_DOOR).map(|c| c.get_id()),
        Some(front_door)
    );
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Health follows readiness.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_readiness_and_stale_views_are_not_served() {
    let mut lab = lab(&[LabUser::new("gina", "pw-gina")]);
    let gina = lab.connect("gina", "pw-gina").unwrap();
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.ocserv.reconcile_interval = Duration::from_millis(300);
    let a = agent::start(cfg).await;
    let mut c = agent::client(&a).await;
    agent::wait_sessions(&mut c, "gina", 1).await;
    let socket = a.grpc_socket.clone();
    let health_is = |want: ServingStatus| {
        let socket = socket.clone();
        move || {
            let socket = socket.clone();
            async move { (health_check(&socket).await.ok()? == want).then_some(()) }
        }
    };
    wait_for(
        "Health/Check SERVING",
        Duration::from_secs(5),
        health_is(ServingStatus::Serving),
    )
    .await;

    // agent.v1.AgentService/HealthCheck: every tier healthy (no portal configured), through the
    // CLI too; a tier outside 1..=3 is refused naming the field.
    for tier in 1..=3 {
        let h = agent::health(&a, tier).await.expect("HealthCheck answers");
        assert!(h.healthy, "tier {tier}: {h:?}");
        assert_eq!(h.checks.len(), tier as usize, "tier {tier}: {h:?}");
    }
    assert!(agent::health(&a, 3).await.unwrap().checks["portal"].starts_with("not configured"));
    for bad in [0, 4] {
        let e = agent::health(&a, bad).await.expect_err("tier out of range");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("tier: "), "{}", e.message());
    }
    let cli_health = |tier: &str| {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket.display().to_string();
        agent::agent_cmd(dir.path(), &["health", "--socket", &socket, "--tier", tier])
            .output()
            .unwrap()
    };
    let out = cli_health("2");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ocserv: ok"),
        "{out:?}"
    );

    lab.stop_ocserv().unwrap();
    wait_for(
        "Health/Check NOT_SERVING after ocserv stopped",
        Duration::from_secs(10),
        health_is(ServingStatus::NotServing),
    )
    .await;
    let h = agent::health(&a, 2).await.expect("HealthCheck answers");
    assert!(!h.healthy, "tier 2 with ocserv down: {h:?}");
    assert!(h.status_message.starts_with("ocserv: "), "{h:?}");
    assert!(
        agent::health(&a, 1).await.unwrap().healthy,
        "liveness does not depend on ocserv"
    );
    let out = cli_health("2");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tier 2: unhealthy: ocserv: "),
        "{out:?}"
    );
    let (status, body) = agent::http_get(a.metrics_addr, "/readyz").await;
    assert_eq!(status, 503, "/readyz: {body}");
    assert!(
        body.starts_with("not ready: "),
        "/readyz gives a reason: {body}"
    );
    let err = agent::sessions(&mut c, "")
        .await
        .expect_err("the stale list is not served");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("old"),
        "the answer names the view's age: {}",
        err.message()
    );
    let text = metrics_text(&a).await;
    let gauge = agent::metric(&text, "ocserv_agent_active_sessions ");
    assert!(
        gauge.is_some_and(f64::is_nan),
        "the sessions gauge claims no number while the view is stale: {gauge:?}\n{text}"
    );
    drop(gina);

    lab.start_ocserv().unwrap();
    wait_for(
        "Health/Check SERVING after ocserv is back",
        Duration::from_secs(10),
        health_is(ServingStatus::Serving),
    )
    .await;
    agent::sessions(&mut c, "").await.expect("served again");
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 9. The metrics server has the same discipline.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_clients_that_dawdle_or_crowd_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let lab = lab(&[]);
    let mut cfg = agent::config_for(&lab, BackendKind::Native);
    cfg.metrics.header_timeout = Duration::from_millis(500);
    cfg.metrics.max_connections = 4;
    let a = agent::start(cfg).await;
    // A request whose headers never end is closed after the header timeout.
    let mut slow = tokio::net::TcpStream::connect(a.metrics_addr)
        .await
        .unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "closed, not left open");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    // Over the connection cap: closed at once and counted; the cap does not block probes for long.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            tokio::net::TcpStream::connect(a.metrics_addr)
                .await
                .unwrap(),
        );
    }
    let mut extra = tokio::net::TcpStream::connect(a.metrics_addr)
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut buf))
        .await
        .expect("the extra connection is closed at once");
    assert_eq!(n.unwrap_or(0), 0);
    drop(held);
    let text = a.metrics.encode();
    assert!(
        text.contains(
            "ocserv_agent_connections_refused_total{listener=\"metrics\",reason=\"limit\"}"
        ),
        "{text}"
    );
    a.shutdown().await;
}
