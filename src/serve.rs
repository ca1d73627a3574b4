//! The one server shell behind every listener (gRPC on the Unix socket, gRPC on TCP, metrics
//! HTTP): accept, bound, time out, drain.
//!
//! - An [`Endpoint`] is bound once at start-up (`app::start`) and outlives the server actors: a
//!   restarted actor accepts on the same socket, and the connections it tracks (their count is the
//!   cap) are not cut by the restart.
//! - At most `max_connections` connections at once: one over the cap is closed at once and counted
//!   (`ocserv_agent_connections_refused_total{reason="limit"}`); the cap does not make the agent
//!   unready.
//! - A connection that sends no request within the read timeout, or stays without a request for
//!   the idle timeout, is closed (HTTP/2 GOAWAY, or the end of HTTP/1 keep-alive).
//! - Unix sockets: each connection's `SO_PEERCRED` is read; a peer whose uid is not allowed is
//!   counted, and every request on its connection carries [`Peer::allowed`] = false, which the
//!   gRPC edge answers with `PERMISSION_DENIED`.
//! - Accept errors for lack of descriptors (`EMFILE`, `ENFILE`, ...) back off (10 ms doubling to 1 s),
//!   are logged once per burst and make readiness say so until a descriptor can be had again
//!   (probed after each back-off, so no new client is needed to clear it); transient errors are
//!   skipped; any other
//!   error ends [`Endpoint::serve`] with the error, so the owning actor fails and is restarted.
//! - [`Endpoint::drain`]: stop accepting, ask every connection to finish (GOAWAY), let requests in
//!   flight complete within the grace period; the socket file of a Unix endpoint is removed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::health::Health;
use crate::metrics::Metrics;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a listener serves: an HTTP service, cloned for each connection, answering every request
/// (errors are responses, never `Err`).
pub trait HttpService:
    tower::Service<
        Request<Incoming>,
        Response = Response<Self::ResBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
    type ResBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> HttpService for S
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type ResBody = B;
}

/// What a listener does with each accepted connection (its task ends when the connection is
/// done; it must honour `limits` and finish promptly once `draining` is cancelled).
pub trait Handler: Clone + Send + Sync + 'static {
    fn serve(
        &self,
        io: Io,
        peer: Peer,
        limits: Limits,
        draining: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;

    /// A connection over the listener's cap, closed at once when this returns (it is already
    /// counted). It may be told why without waiting (e.g. [`Io::try_write`]); by default it is
    /// just closed.
    fn refuse(&self, io: Io) {
        drop(io);
    }
}

/// HTTP on a listener (gRPC, or metrics): each connection served by hyper with `service`.
#[derive(Clone)]
pub struct Http<S> {
    pub service: S,
    pub protocol: Protocol,
}

impl<S: HttpService> Handler for Http<S> {
    fn serve(
        &self,
        io: Io,
        peer: Peer,
        limits: Limits,
        draining: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(serve_connection(
            io,
            peer,
            self.service.clone(),
            self.protocol,
            limits,
            draining,
        ))
    }
}

/// Which HTTP version a listener speaks, with its protocol-level limits.
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    /// gRPC.
    Http2 {
        max_streams: u32,
        keepalive_interval: Duration,
        keepalive_timeout: Duration,
    },
    /// Metrics and probes.
    Http1,
}

/// Connection-level bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Closes a connection that stays without a request in flight this long.
    pub idle_timeout: Duration,
    /// Closes a new connection that sends no request within this time; for HTTP/1 also the
    /// time allowed to send a request's headers.
    pub read_timeout: Duration,
}

/// Who is at the other end of a connection; every request carries it as an extension.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Unix sockets: the peer's uid and pid (`SO_PEERCRED`).
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    /// TCP: the peer's address.
    pub addr: Option<SocketAddr>,
    /// False when the uid is not in the listener's allowed list.
    pub allowed: bool,
}

/// A listening socket bound once.
#[derive(Debug)]
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix {
        listener: std::os::unix::net::UnixListener,
        path: PathBuf,
        allowed_uids: Vec<u32>,
    },
}

impl Listener {
    /// A TCP listener; errors name `key`.
    pub fn tcp(addr: SocketAddr, key: &str) -> eyre::Result<Self> {
        use eyre::WrapErr;
        let l = std::net::TcpListener::bind(addr)
            .wrap_err_with(|| format!("{key}: cannot listen on {addr}"))?;
        Ok(Self::Tcp(l))
    }

    /// A Unix socket at `path`, mode 0660; its directory is created with mode 0750 when missing.
    /// A socket file left by a crashed run is replaced; a live one (another agent answering on
    /// it) or anything that is not a socket is an error naming `key`.
    pub fn unix(path: &Path, allowed_uids: Vec<u32>, key: &str) -> eyre::Result<Self> {
        use eyre::{bail, WrapErr};
        use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
        let shown = path.display();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o750)
                    .create(dir)
                    .wrap_err_with(|| format!("{key}: cannot create {}", dir.display()))?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    bail!("{key}: another process is serving on {shown}");
                }
                std::fs::remove_file(path)
                    .wrap_err_with(|| format!("{key}: cannot replace stale socket {shown}"))?;
                tracing::info!(socket = %shown, "replaced a stale socket file");
            }
            Ok(_) => bail!("{key}: {shown} exists and is not a socket; refusing to replace it"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).wrap_err_with(|| format!("{key}: cannot inspect {shown}")),
        }
        let listener = std::os::unix::net::UnixListener::bind(path)
            .wrap_err_with(|| format!("{key}: cannot listen on {shown}"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .wrap_err_with(|| format!("{key}: cannot set mode 0660 on {shown}"))?;
        Ok(Self::Unix {
            listener,
            path: path.to_path_buf(),
            allowed_uids,
        })
    }

    /// Refuses new connections for good. TCP: the listening socket is shut down (accept then
    /// fails, and connects are refused). Unix: the socket file goes, so clients find nothing to
    /// connect to (a shut-down Unix listener would stay readable for ever and make the accept
    /// loop spin).
    fn close(&self) {
        use std::os::fd::AsRawFd;
        match self {
            Self::Tcp(l) => {
                let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            }
            Self::Unix { path, .. } => {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Where it listens, for logs and clients.
    pub fn describe(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Self::Unix { path, .. } => path.display().to_string(),
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(l) => l.local_addr().ok(),
            Self::Unix { .. } => None,
        }
    }
}

/// A listener with its limits and the connections it serves.
#[derive(Debug)]
pub struct Endpoint {
    /// The `listener` label of the connection metrics.
    pub label: &'static str,
    pub listener: Listener,
    pub limits: Limits,
    connections: TaskTracker,
    draining: CancellationToken,
}

/// Accept errors that mean "out of descriptors or memory": back off, never spin.
fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// Accept errors about one connection that went away before it was accepted.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

enum Acceptor {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Acceptor {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Self::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
            Self::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        }
    }
}

impl Endpoint {
    pub fn new(label: &'static str, listener: Listener, limits: Limits) -> Self {
        Self {
            label,
            listener,
            limits,
            connections: TaskTracker::new(),
            draining: CancellationToken::new(),
        }
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    fn acceptor(&self) -> std::io::Result<Acceptor> {
        Ok(match &self.listener {
            Listener::Tcp(l) => {
                let l = l.try_clone()?;
                l.set_nonblocking(true)?;
                Acceptor::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
            Listener::Unix { listener, .. } => {
                let l = listener.try_clone()?;
                l.set_nonblocking(true)?;
                Acceptor::Unix(tokio::net::UnixListener::from_std(l)?)
            }
        })
    }

    /// Whether this process can open one more descriptor now (duplicates the listener's).
    fn descriptor_free(&self) -> bool {
        match &self.listener {
            Listener::Tcp(l) => l.try_clone().is_ok(),
            Listener::Unix { listener, .. } => listener.try_clone().is_ok(),
        }
    }

    /// Accepts and serves until [`Self::drain`] is called (then `Ok`), or until accepting fails
    /// for good (then the error: the caller's actor must fail so it is restarted).
    pub async fn serve<H: Handler>(
        self: Arc<Self>,
        handler: H,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> std::io::Result<()> {
        let acceptor = self.acceptor()?;
        let mut pause = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                _ = self.draining.cancelled() => return Ok(()),
                r = acceptor.accept() => r,
            };
            let (io, peer) = match accepted {
                Ok(a) => {
                    health.out_of_descriptors(false);
                    pause = Duration::from_millis(10);
                    self.peer_of(a)
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    metrics.connection_refused(self.label, "descriptors");
                    if health.out_of_descriptors(true) {
                        tracing::error!(listener = self.label, error = %e,
                            "cannot accept connections: out of descriptors; backing off");
                    }
                    tokio::select! {
                        _ = self.draining.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(1));
                    // The connection that failed may be gone by the next accept, which then just
                    // waits: readiness must not wait for a new client to learn that descriptors
                    // are free again.
                    if self.descriptor_free() {
                        health.out_of_descriptors(false);
                    }
                    continue;
                }
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Err(e),
            };
            if self.connections.len() >= self.limits.max_connections {
                metrics.connection_refused(self.label, "limit");
                handler.refuse(io);
                continue;
            }
            if !peer.allowed {
                metrics.connection_refused(self.label, "peer_uid");
                tracing::warn!(listener = self.label, uid = ?peer.uid, pid = ?peer.pid,
                    "peer not in the allowed uids; its requests are refused");
            }
            let conn = handler.serve(io, peer, self.limits, self.draining.clone());
            self.connections.spawn(conn);
        }
    }

    fn peer_of(&self, a: Accepted) -> (Io, Peer) {
        match a {
            Accepted::Tcp(s, addr) => {
                // Small replies must not wait on the client's delayed ACK (measured: 40 ms).
                let _ = s.set_nodelay(true);
                let peer = Peer {
                    uid: None,
                    pid: None,
                    addr: Some(addr),
                    allowed: true,
                };
                (Io::Tcp(s), peer)
            }
            Accepted::Unix(s) => {
                let cred = s.peer_cred().ok();
                let uid = cred.as_ref().map(|c| c.uid());
                let allowed = match (&self.listener, uid) {
                    (Listener::Unix { allowed_uids, .. }, Some(uid)) => allowed_uids.contains(&uid),
                    _ => false,
                };
                let peer = Peer {
                    uid,
                    pid: cred.and_then(|c| c.pid()),
                    addr: None,
                    allowed,
                };
                (Io::Unix(s), peer)
            }
        }
    }

    /// Stops accepting, asks every connection to finish its requests in flight and close, and
    /// waits for them up to `grace`. Returns false when some were still open at the deadline.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.draining.cancel();
        self.connections.close();
        // Stop accepting at once: new clients are refused instead of queueing in the backlog.
        self.listener.close();
        tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_ok()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }
}

/// Either kind of accepted stream.
pub enum Io {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Io {
    /// Writes what fits into the socket buffer now, without waiting.
    pub fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Io::Tcp(s) => s.try_write(buf),
            Io::Unix(s) => s.try_write(buf),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Requests in flight on one connection and when the last one ended.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last request start or end.
    last: AtomicU64,
    /// Whether any request has arrived yet.
    requests: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Whether a request is in flight, and the time since the last request started or ended.
    fn quiet_for(&self) -> (bool, Duration) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let quiet = now.saturating_sub(self.last.load(Ordering::Relaxed));
        (
            self.in_flight.load(Ordering::Relaxed) > 0,
            Duration::from_millis(quiet),
        )
    }
}

/// Counts a request in flight until its response body is finished or dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        a.requests.fetch_add(1, Ordering::Relaxed);
        a.touch();
        Self(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A response body that keeps its request counted as in flight until it is done.
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves one connection until it ends, goes idle, or the endpoint drains.
fn serve_connection<S: HttpService>(
    io: Io,
    peer: Peer,
    service: S,
    protocol: Protocol,
    limits: Limits,
    draining: CancellationToken,
) -> impl Future<Output = ()> + Send {
    use tower::ServiceExt;
    let activity = Arc::new(Activity {
        epoch: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    });
    let act = activity.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let in_flight = InFlight::begin(&act);
        let call = service.clone().oneshot(req);
        async move {
            let resp = call.await?;
            Ok::<_, Infallible>(resp.map(|b| Tracked {
                inner: http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(
                    b,
                    Into::into,
                )),
                _in_flight: in_flight,
            }))
        }
    });
    let io = TokioIo::new(io);
    async move {
        let conn: Pin<Box<dyn Conn>> = match protocol {
            Protocol::Http2 {
                max_streams,
                keepalive_interval,
                keepalive_timeout,
            } => Box::pin(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(max_streams)
                    .keep_alive_interval(keepalive_interval)
                    .keep_alive_timeout(keepalive_timeout)
                    .max_pending_accept_reset_streams(Some(max_streams as usize))
                    .serve_connection(io, svc),
            ),
            Protocol::Http1 => Box::pin(
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.read_timeout)
                    .serve_connection(io, svc),
            ),
        };
        drive(conn, &activity, protocol, limits, draining).await;
    }
}

/// Either hyper connection, as far as this module needs it.
trait Conn: Future<Output = Result<(), hyper::Error>> + Send {
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S, E> Conn for hyper::server::conn::http2::Connection<I, S, E>
where
    Self: Future<Output = Result<(), hyper::Error>> + Send,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
    S::ResBody: 'static,
    <S::ResBody as Body>::Error: Into<BoxError>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> Conn for hyper::server::conn::http1::Connection<I, S>
where
    Self: Future<Output = Result<(), hyper::Error>> + Send,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::ResBody: 'static,
    <S::ResBody as Body>::Error: Into<BoxError>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// How long a connection asked to close (GOAWAY) may take before it is dropped.
const CLOSE_BOUND: Duration = Duration::from_secs(2);

async fn drive(
    mut conn: Pin<Box<dyn Conn>>,
    activity: &Activity,
    protocol: Protocol,
    limits: Limits,
    draining: CancellationToken,
) {
    loop {
        // Before the first request the read timeout applies, afterwards the idle timeout. An
        // HTTP/1 request (metrics) must be done, response written, within the idle timeout too:
        // a client that never reads its response does not hold the connection for ever. gRPC
        // calls are bounded by the edge (`grpc.read_timeout`, `grpc.request_timeout`).
        let limit = if activity.requests.load(Ordering::Relaxed) == 0 {
            limits.read_timeout
        } else {
            limits.idle_timeout
        };
        let wake = match (activity.quiet_for(), protocol) {
            ((true, quiet), Protocol::Http1) if quiet >= limit => return,
            ((true, _), Protocol::Http2 { .. }) => limit,
            ((false, quiet), _) if quiet >= limit => {
                conn.as_mut().shut_down();
                let _ = tokio::time::timeout(CLOSE_BOUND, conn.as_mut()).await;
                return;
            }
            ((_, quiet), _) => limit - quiet,
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = draining.cancelled() => {
                // GOAWAY: requests in flight finish, no new ones start. The endpoint's drain
                // bounds the wait.
                conn.as_mut().shut_down();
                let _ = conn.as_mut().await;
                return;
            }
            _ = tokio::time::sleep(wake) => {}
        }
    }
}
