//! The gRPC front door's edge: what every request goes through before and after a tonic handler.
//!
//! In order:
//! 1. A connection whose peer uid is not allowed ([`crate::serve::Peer::allowed`]) gets
//!    `PERMISSION_DENIED` for every request.
//! 2. Unary calls (`agent.v1.VPNAgentService/*`, `grpc.health.v1.Health/Check`,
//!    `agent.v1.AgentService/HealthCheck`) must deliver their
//!    whole request within `grpc.read_timeout` and at most [`MAX_REQUEST_BYTES`]; a stream that
//!    opens and never sends is answered `DEADLINE_EXCEEDED` and holds nothing meanwhile.
//! 3. `agent.v1.VPNAgentService` calls then take a slot of the shared gate
//!    (`grpc.max_concurrent_requests` in flight, global across connections and front-door
//!    restarts); when none frees up within a fifth of `grpc.request_timeout` the call is answered
//!    `RESOURCE_EXHAUSTED`. Health checks and reflection never wait behind it.
//! 4. Unary calls are bounded by `grpc.request_timeout` from their first byte
//!    (`DEADLINE_EXCEEDED` naming the key).
//! 5. Every request is counted in `ocserv_agent_grpc_requests_total{method,code}` with the status
//!    the client really received, including those refused before a handler ran (decode failures,
//!    oversized messages, unsupported compression). A [`ReplyPermit`] a handler attached to its
//!    response is held until the response body has been sent.
//! 6. A handler that attached an [`EncodedReply`] (its message already encoded, possibly shared
//!    by many callers) has it sent as the response message in place of what tonic encoded: the
//!    bytes go out as they are, never copied per call.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Code, Status};

use crate::actors::Context;
use crate::serve::Peer;

/// Largest unary request accepted (tonic's own default decoding limit).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Memory reserved for a reply being built and sent; see [`Edge`] step 5.
#[derive(Debug, Clone)]
pub struct ReplyPermit(pub Arc<OwnedSemaphorePermit>);

/// A response message already encoded as protobuf (without gRPC's 5-byte frame header), in
/// pieces. Cloning shares the bytes; see step 6.
#[derive(Debug, Clone, Default)]
pub struct EncodedReply {
    pub(crate) chunks: Vec<Bytes>,
    len: usize,
}

impl EncodedReply {
    pub fn new(chunks: Vec<Bytes>) -> Self {
        let len = chunks.iter().map(Bytes::len).sum();
        Self { chunks, len }
    }

    /// Length of the encoded message in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The message as one buffer (tests, benchmarks).
    pub fn to_vec(&self) -> Vec<u8> {
        self.chunks.concat()
    }

    /// The gRPC response body: one uncompressed message frame, then `grpc-status: 0`.
    fn into_body(self) -> Result<EncodedBody, Status> {
        let len = u32::try_from(self.len).map_err(|_| {
            Status::resource_exhausted("the reply exceeds gRPC's 4 GiB frame limit")
        })?;
        let mut header = [0u8; 5];
        header[1..].copy_from_slice(&len.to_be_bytes());
        let mut frames = std::collections::VecDeque::with_capacity(self.chunks.len() + 1);
        frames.push_back(Bytes::copy_from_slice(&header));
        frames.extend(self.chunks);
        Ok(EncodedBody {
            frames,
            trailers_sent: false,
        })
    }
}

/// The body of an [`EncodedReply`]: its pieces as data frames, then the OK trailers.
struct EncodedBody {
    frames: std::collections::VecDeque<Bytes>,
    trailers_sent: bool,
}

impl Body for EncodedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if self.trailers_sent {
            return Poll::Ready(None);
        }
        self.trailers_sent = true;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.trailers_sent
    }
}

/// The method label of a request path: a fixed set, never a caller-supplied string.
pub fn method_label(path: &str) -> &'static str {
    const KNOWN: [&str; 12] = [
        "NotifyConnect",
        "NotifyDisconnect",
        "GetActiveSessions",
        "DisconnectUser",
        "UpdateUserRoutes",
        "Check",
        "Watch",
        "ServerReflectionInfo",
        "AgentStream",
        "ExecuteCommand",
        "UpdateConfig",
        "HealthCheck",
    ];
    let name = path.rsplit('/').next().unwrap_or_default();
    KNOWN.into_iter().find(|k| *k == name).unwrap_or("unknown")
}

const AGENT_SERVICE: &str = "/agent.v1.VPNAgentService/";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const AGENT_HEALTH_CHECK: &str = "/agent.v1.AgentService/HealthCheck";

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    ctx: Arc<Context>,
}

impl<S> Edge<S> {
    pub fn new(inner: S, ctx: Arc<Context>) -> Self {
        Self { inner, ctx }
    }
}

fn refuse(status: Status) -> Response<tonic::body::Body> {
    status.into_http()
}

/// The grpc-status of a trailers-only response (errors answered before any message).
fn status_in(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

impl<S> tower::Service<Request<Incoming>> for Edge<S>
where
    S: tower::Service<
            Request<tonic::body::Body>,
            Response = Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Counted>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let inner = self.inner.clone();
        let ctx = self.ctx.clone();
        Box::pin(async move {
            let method = method_label(req.uri().path());
            let resp = admit(inner, &ctx, req).await;
            Ok(Counted::wrap(resp, method, ctx.metrics.clone()))
        })
    }
}

async fn admit<S>(
    mut inner: S,
    ctx: &Context,
    req: Request<Incoming>,
) -> Response<tonic::body::Body>
where
    S: tower::Service<
        Request<tonic::body::Body>,
        Response = Response<tonic::body::Body>,
        Error = Infallible,
    >,
{
    let started = Instant::now();
    let cfg = ctx.config();
    let path = req.uri().path().to_owned();
    match req.extensions().get::<Peer>() {
        Some(p) if p.allowed => {}
        other => {
            let uid = other.and_then(|p| p.uid);
            return refuse(Status::permission_denied(format!(
                "peer uid {uid:?} is not in grpc.allowed_uids"
            )));
        }
    }
    let unary =
        path.starts_with(AGENT_SERVICE) || path == HEALTH_CHECK || path == AGENT_HEALTH_CHECK;
    if !unary {
        let Ok(resp) = inner.call(req.map(tonic::body::Body::new)).await;
        return resp;
    }
    let (parts, body) = req.into_parts();
    let read_timeout = cfg.grpc.read_timeout;
    let body = match tokio::time::timeout(
        read_timeout,
        http_body_util::Limited::new(body, MAX_REQUEST_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return refuse(Status::resource_exhausted(format!(
                "request body: {e} (at most {MAX_REQUEST_BYTES} bytes)"
            )))
        }
        Err(_) => {
            return refuse(Status::deadline_exceeded(format!(
                "the request did not arrive within grpc.read_timeout ({})",
                humantime::format_duration(read_timeout)
            )))
        }
    };
    let req = Request::from_parts(
        parts,
        tonic::body::Body::new(http_body_util::Full::new(body)),
    );
    let request_timeout = cfg.grpc.request_timeout;
    let _slot = if path.starts_with(AGENT_SERVICE) {
        match ctx.grpc_gate.enter(request_timeout / 5).await {
            Ok(p) => Some(p),
            Err(e) => {
                return refuse(Status::resource_exhausted(format!(
                    "the agent is at grpc.max_concurrent_requests: {e}"
                )))
            }
        }
    } else {
        None
    };
    let remaining = request_timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(remaining, inner.call(req)).await {
        Ok(Ok(r)) => r,
        Err(_) => refuse(Status::deadline_exceeded(format!(
            "not done within grpc.request_timeout ({})",
            humantime::format_duration(request_timeout)
        ))),
    }
}

/// A response body that counts its request once, with the status the client received, and holds
/// the reply's [`ReplyPermit`] until it has been sent.
pub struct Counted {
    inner: tonic::body::Body,
    method: &'static str,
    /// Set until the request has been counted.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    _permit: Option<ReplyPermit>,
}

impl Counted {
    fn wrap(
        resp: Response<tonic::body::Body>,
        method: &'static str,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Response<Self> {
        let (mut parts, mut inner) = resp.into_parts();
        let permit = parts.extensions.remove::<ReplyPermit>();
        if let Some(reply) = parts.extensions.remove::<EncodedReply>() {
            if status_in(&parts.headers).is_none() {
                inner = match reply.into_body() {
                    Ok(body) => tonic::body::Body::new(body),
                    Err(status) => return Counted::wrap(refuse(status), method, metrics),
                };
            }
        }
        let mut body = Counted {
            inner,
            method,
            metrics: Some(metrics),
            _permit: permit,
        };
        if let Some(code) = status_in(&parts.headers) {
            body.count(code);
        }
        Response::from_parts(parts, body)
    }

    fn count(&mut self, code: Code) {
        if let Some(m) = self.metrics.take() {
            m.grpc_request(self.method, code);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        // Dropped before its trailers: the client went away or the stream was reset.
        self.count(Code::Cancelled);
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_in) {
                    self.count(code);
                }
            }
            Poll::Ready(Some(Err(s))) => {
                let code = s.code();
                self.count(code);
            }
            Poll::Ready(None) => self.count(Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_a_fixed_set() {
        assert_eq!(
            method_label("/agent.v1.VPNAgentService/GetActiveSessions"),
            "GetActiveSessions"
        );
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "Check");
        assert_eq!(method_label("/x.Y/alice"), "unknown");
        assert_eq!(method_label(""), "unknown");
    }

    #[tokio::test]
    async fn an_encoded_reply_is_one_grpc_frame_then_ok_trailers() {
        let reply = EncodedReply::new(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cde")]);
        let collected = reply.into_body().unwrap().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(status_in(&trailers), Some(Code::Ok));
        assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x05abcde");
    }

    #[test]
    fn trailers_only_status_is_read() {
        let r: Response<tonic::body::Body> = Status::not_found("x").into_http();
        assert_eq!(status_in(r.headers()), Some(Code::NotFound));
        assert_eq!(status_in(&HeaderMap::new()), None);
    }
}
