//! `HookListener`: the Unix socket that ocserv's connect, disconnect and host-update scripts ask
//! through the hook program (`ocserv-agent-hook`, protocol in [`crate::hook_proto`]).
//!
//! One request and one answer per connection, on the shared [`crate::serve`] shell: the socket
//! (`hook.socket`; directory 0750, socket 0660, a stale one replaced, removed on a clean stop),
//! `SO_PEERCRED` checked against `hook.allowed_uids`, at most `hook.max_connections` at once
//! (one more gets an error answer at once and is counted), and the whole exchange bounded by
//! `hook.request_timeout` from accept to answer.
//!
//! - A frame of length 0 or above 64 KiB, a truncated frame, invalid JSON, an empty username, an
//!   unknown reason, a peer uid not allowed: an error answer (`allowed: false`), counted in
//!   `ocserv_agent_hook_requests_refused_total{cause}`.
//! - `connect`: a username or groupname that is unsafe as a file name is denied before any policy
//!   source is asked; otherwise the `PolicyCache` decides, within what is left of the deadline.
//!   When the cache cannot answer in time (restarting, say), the answer is what the fail mode
//!   promises, decided here from the same shared store ([`crate::policy::fallback`]), so the hook
//!   always gets an answer before its own deadline.
//! - `disconnect` and `host-update`: acknowledged at once, and handed to the `SessionRegistry`
//!   (as an admitted connect is) by a delivery task that sends again until the registry answers
//!   (it answers a disconnect once its end is in the durable store), for up to
//!   [`DELIVERY_DEADLINE`]: a registry that restarts meanwhile still gets it. At most
//!   [`MAX_DELIVERIES`] deliveries are under way; beyond that a report is dropped (logged), and the
//!   registry's reconcile finds the session's end on its own.
//!
//! Every answer to a connect is counted in `ocserv_agent_hook_decisions_total{reason,decision,
//! source}` and timed in `ocserv_agent_hook_decision_duration_seconds`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ractor::{ActorProcessingErr, ActorRef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::actors::{call, serve_on, Context, Serves, ServingState};
use crate::hook_proto::{self, HookRequest, HookResponse, Reason, HEADER_LEN};
use crate::messages::{HookEvent, PolicyMsg, PolicyQuery, RegistryMsg, ServerMsg, Verdict};
use crate::serve::{Handler, Io, Limits, Peer};

pub struct HookListener;

/// Time kept back from the deadline to write the answer.
const ANSWER_MARGIN: Duration = Duration::from_millis(50);

/// Serves the hook protocol on each accepted connection.
#[derive(Clone)]
pub struct HookHandler {
    ctx: Arc<Context>,
}

impl Handler for HookHandler {
    fn serve(
        &self,
        io: Io,
        peer: Peer,
        _limits: Limits,
        // Each exchange is bounded by `hook.request_timeout`, well inside the stop's grace, so a
        // stop lets the answers in flight go out.
        _draining: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let ctx = self.ctx.clone();
        Box::pin(async move { one_exchange(&ctx, io, peer).await })
    }

    fn refuse(&self, io: Io) {
        // Over the connection cap: an error answer at once, without a task (the frame fits in
        // a fresh socket's buffer), then the connection closes.
        self.ctx.metrics.hook_refused("connection_limit");
        if let Ok(frame) = HookResponse::invalid("the agent is at hook.max_connections").to_frame()
        {
            let _ = io.try_write(&frame);
        }
    }
}

/// Why a request got an error answer instead of a decision.
struct Refusal {
    cause: &'static str,
    error: String,
}

impl Refusal {
    fn new(cause: &'static str, error: impl Into<String>) -> Self {
        Self {
            cause,
            error: error.into(),
        }
    }
}

async fn one_exchange(ctx: &Arc<Context>, mut io: Io, peer: Peer) {
    let started = Instant::now();
    let deadline = started + ctx.config().hook.request_timeout;
    let answer = match tokio::time::timeout_at(deadline.into(), read_request(&mut io, &peer)).await
    {
        Err(_) => {
            // Nothing (complete) arrived in time: nobody is waiting for an answer.
            ctx.metrics.hook_refused("timeout");
            return;
        }
        Ok(Err(refusal)) => {
            ctx.metrics.hook_refused(refusal.cause);
            tracing::debug!(cause = refusal.cause, error = %refusal.error, "hook request refused");
            HookResponse::invalid(refusal.error)
        }
        Ok(Ok(request)) => answer(ctx, request, deadline, started).await,
    };
    if let Ok(frame) = answer.to_frame() {
        let left = deadline.saturating_duration_since(Instant::now()) + ANSWER_MARGIN;
        let _ = tokio::time::timeout(left, async {
            io.write_all(&frame).await?;
            io.shutdown().await
        })
        .await;
    }
}

async fn read_request(io: &mut Io, peer: &Peer) -> Result<HookRequest, Refusal> {
    let mut header = [0u8; HEADER_LEN];
    io.read_exact(&mut header)
        .await
        .map_err(|_| Refusal::new("frame_truncated", "the frame header was cut short"))?;
    let len = hook_proto::frame_len(header).map_err(|e| Refusal::new(e.cause(), e.to_string()))?;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.map_err(|_| {
        Refusal::new(
            "frame_truncated",
            format!("the frame announced {len} bytes and was cut short"),
        )
    })?;
    if !peer.allowed {
        return Err(Refusal::new(
            "peer_uid",
            format!("peer uid {:?} is not in hook.allowed_uids", peer.uid),
        ));
    }
    hook_proto::parse_request(&payload).map_err(|e| Refusal::new(e.cause(), e.to_string()))
}

async fn answer(
    ctx: &Arc<Context>,
    request: HookRequest,
    deadline: Instant,
    started: Instant,
) -> HookResponse {
    match request.reason {
        Reason::Connect => {
            let verdict = decide(ctx, &request, deadline).await;
            let response = match verdict.decision.allowed {
                true => HookResponse::allow(verdict.source),
                false => HookResponse::deny(
                    verdict.source,
                    verdict
                        .decision
                        .reason
                        .clone()
                        .unwrap_or_else(|| "denied by policy".into()),
                ),
            };
            ctx.metrics.hook_decision(
                request.reason.as_str(),
                verdict.decision.label(),
                verdict.source.as_str(),
                started.elapsed(),
            );
            if verdict.decision.allowed {
                // The session is pending until ocserv shows it connected.
                report(HookEvent::of(&request, SystemTime::now()));
            } else {
                tracing::info!(user = %request.username, group = %request.groupname,
                    id = request.session_id, source = verdict.source.as_str(),
                    reason = ?verdict.decision.reason, "connect denied");
            }
            response
        }
        Reason::Disconnect | Reason::HostUpdate => {
            report(HookEvent::of(&request, SystemTime::now()));
            // Not a decision: the report is taken (`allowed`), with no policy source.
            ctx.metrics
                .hook_decision(request.reason.as_str(), "allow", "none", started.elapsed());
            HookResponse {
                allowed: true,
                error: None,
                message: Some("recorded".into()),
                source: None,
            }
        }
    }
}

/// How long a report is sent again while the registry does not answer.
pub const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);

/// Reports being delivered at once, at most.
pub const MAX_DELIVERIES: usize = 4096;

static DELIVERIES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_DELIVERIES);

/// Tells the `SessionRegistry` what a script reported, from a task that sends again until the
/// registry answers (handling a report twice changes nothing).
fn report(event: HookEvent) {
    let Ok(slot) = DELIVERIES.try_acquire() else {
        tracing::error!(id = event.id, user = %event.username, reason = event.reason.as_str(),
            "too many hook reports being delivered; this one is dropped (the reconcile finds it)");
        return;
    };
    tokio::spawn(async move {
        let _slot = slot;
        let deadline = Instant::now() + DELIVERY_DEADLINE;
        let each = Duration::from_secs(10);
        loop {
            let sent = call(super::SESSION_REGISTRY, each, true, |r| {
                RegistryMsg::HookEvent(event.clone(), Some(r))
            })
            .await;
            match sent {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    tracing::error!(error = %e, id = event.id, user = %event.username,
                        "hook report not delivered to the session registry; given up");
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
}

/// The verdict for a connect: unsafe names denied here; else the cache's answer, or (when the
/// cache cannot answer in time) what the fail mode promises.
async fn decide(ctx: &Arc<Context>, request: &HookRequest, deadline: Instant) -> Verdict {
    if let Some(denied) = unsafe_names(request) {
        return denied;
    }
    let query = PolicyQuery::from(request);
    let left = deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(ANSWER_MARGIN);
    match call(super::POLICY_CACHE, left, true, |reply| PolicyMsg::Decide {
        query: query.clone(),
        reply,
    })
    .await
    {
        Ok(verdict) => verdict,
        Err(e) => {
            tracing::warn!(error = %e, user = %request.username,
                "the policy cache did not answer in time; answering from the fail mode");
            super::policy_cache::without_portal(ctx, &query)
        }
    }
}

/// Names that would reach a path in ocserv's config-per-user/-group directories are denied
/// whatever the policy says (ocserv ≤ 1.5.0 does not sanitize them).
fn unsafe_names(request: &HookRequest) -> Option<Verdict> {
    let user = crate::validate::file_name("username", &request.username);
    let group = match request.groupname.is_empty() {
        true => Ok(()),
        false => crate::validate::file_name("groupname", &request.groupname),
    };
    let e = user.and(group).err()?;
    Some(Verdict {
        decision: crate::policy::Decision::deny(e.to_string()),
        source: crate::policy::Source::LocalPolicy,
    })
}

impl Serves for HookListener {
    const NAME: &'static str = super::HOOK_LISTENER;

    fn start(
        myself: &ActorRef<ServerMsg>,
        ctx: &Arc<Context>,
    ) -> Result<ServingState, ActorProcessingErr> {
        let handler = HookHandler { ctx: ctx.clone() };
        Ok(serve_on(
            myself,
            ctx,
            vec![ctx.hook_endpoint.clone()],
            handler,
            Vec::new(),
        ))
    }
}
