//! The gRPC services the agent serves, as plain tonic service types; the `GrpcFrontDoor` actor
//! serves them behind [`crate::grpc_edge::Edge`], which counts every request and bounds it.
//! Handlers validate every field first (`INVALID_ARGUMENT` naming the field), then ask the actors
//! by name with a bounded [`call`], and map failures to status codes: unknown user → `NOT_FOUND`,
//! ocserv unreachable or data too old → `UNAVAILABLE`, the agent's own bounds →
//! `RESOURCE_EXHAUSTED`. The legacy `success`/`error_message` fields are filled too, for portals
//! that read them.
//!
//! Sessions are acted on only by their full identity ([`SessionKey`]), re-checked by ocserv in the
//! same step; concurrent kicks of one session go through [`Kicks`], so exactly one caller is told
//! it disconnected it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::actors::{call, CallError, Context, SESSION_REGISTRY};
use crate::grpc_edge::{EncodedReply, ReplyPermit};
use crate::messages::{CtlMsg, RegistryMsg, SessionsView};
use crate::metrics::DisconnectReason;
use crate::ocserv::{counters, ByteCounters, CtlError, DisconnectOutcome, Session, SessionKey};
use crate::proto::agent::v1 as pb;
use crate::proto::agent::v1::vpn_agent_service_server::VpnAgentService;
use crate::serve::Peer;

/// Memory for replies being encoded and sent at once, in KiB (shared by all callers). A reply
/// shared by every caller (the whole list without stats) is not charged: it exists once.
pub const REPLY_BUDGET_KIB: u32 = 24 * 1024;

/// What one session costs in a reply encoded for one caller, in bytes of malloc heap: its
/// encoded bytes (281 at 10 000 sessions, 291 with counters; `sessions_scale` benchmark) in
/// chunks of [`CHUNK`] bytes, with room for a chunk left partly empty.
pub const REPLY_BYTES_PER_SESSION: usize = 320;

/// Sessions in a reply above which it is encoded on the heavy-work thread.
const HEAVY_ABOVE: usize = 1000;

/// Size of the pieces a reply is encoded into (and sent as): below glibc's mmap threshold, so
/// building replies reuses the same heap blocks rather than mapping and unmapping megabytes.
pub const CHUNK: usize = 64 * 1024;

/// Field numbers of `agent.v1.GetActiveSessionsResponse` (`proto/agent/v1/agent.proto`); a test
/// checks the encoding against prost's own.
const SESSIONS_FIELD: u32 = 1;
const TOTAL_COUNT_FIELD: u32 = 2;

/// The reply budget a listing of `n` sessions takes, in KiB (at least 1, at most the budget).
pub fn reply_cost_kib(n: usize) -> u32 {
    let kib = (n.saturating_mul(REPLY_BYTES_PER_SESSION) / 1024).max(1);
    u32::try_from(kib).unwrap_or(u32::MAX).min(REPLY_BUDGET_KIB)
}

/// Encodes a `GetActiveSessionsResponse` listing `sessions` straight into [`CHUNK`]-sized
/// pieces, one `VpnSession` at a time (never the whole message as structs). With `stats`, each
/// session's counters are read fresh from its device (falling back to the last known ones).
pub fn encode_sessions(sessions: &[Arc<Session>], stats: bool) -> EncodedReply {
    let mut chunks = Vec::new();
    let mut buf = bytes::BytesMut::with_capacity(CHUNK);
    let mut flush = |buf: &mut bytes::BytesMut| {
        if !buf.is_empty() {
            chunks.push(std::mem::replace(buf, bytes::BytesMut::with_capacity(CHUNK)).freeze());
        }
    };
    for s in sessions {
        let counters = stats
            .then(|| counters::read(&s.device, s.id, s.connected_at))
            .flatten()
            .or(s.counters)
            .filter(|_| stats);
        let m = vpn_session(s, counters);
        let len = prost::encoding::message::encoded_len(SESSIONS_FIELD, &m);
        // (BytesMut's `remaining_mut` counts what it could grow to; the room left is this.)
        if buf.capacity() - buf.len() < len {
            flush(&mut buf);
        }
        prost::encoding::message::encode(SESSIONS_FIELD, &m, &mut buf);
    }
    let total = u32::try_from(sessions.len()).unwrap_or(u32::MAX);
    if total != 0 {
        prost::encoding::uint32::encode(TOTAL_COUNT_FIELD, &total, &mut buf);
    }
    flush(&mut buf);
    EncodedReply::new(chunks)
}

/// How long a kicked session stays known as kicked, so a late concurrent caller is not told it
/// disconnected it again.
const KICK_MEMORY: Duration = Duration::from_secs(60);

enum KickEntry {
    /// Being disconnected, and why; the sender says `true` when done (dropped on failure).
    InProgress(SessionKey, DisconnectReason, watch::Receiver<bool>),
    Done(SessionKey, DisconnectReason, Instant),
}

/// Sessions being (or just) disconnected by the agent. Lives in the shared context, outside any
/// actor, so it holds across restarts.
#[derive(Default)]
pub struct Kicks {
    by_id: Mutex<HashMap<u32, KickEntry>>,
}

/// The right to disconnect one session; tell how it went with [`Claim::finish`].
pub struct Claim<'a> {
    kicks: &'a Kicks,
    key: SessionKey,
    reason: DisconnectReason,
    done: watch::Sender<bool>,
}

/// The outcome of [`Kicks::claim`].
pub enum Claimed<'a> {
    /// This caller disconnects it.
    Mine(Claim<'a>),
    /// Another caller disconnected it.
    Taken,
}

impl Kicks {
    /// Why the agent is disconnecting (or recently disconnected) the session `key`, if it is.
    pub fn reason_of(&self, key: &SessionKey) -> Option<DisconnectReason> {
        let map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&key.id)? {
            KickEntry::InProgress(k, reason, _) | KickEntry::Done(k, reason, _) if k.same(key) => {
                Some(*reason)
            }
            _ => None,
        }
    }

    /// Every session the agent is disconnecting or recently disconnected, with the reason.
    pub fn recent(&self) -> Vec<(SessionKey, DisconnectReason)> {
        let map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        map.values()
            .map(|e| match e {
                KickEntry::InProgress(k, reason, _) | KickEntry::Done(k, reason, _) => {
                    (k.clone(), *reason)
                }
            })
            .collect()
    }

    /// Why the agent is disconnecting (or recently disconnected) a session under ocserv ID
    /// `id`: for a session known only by its ID and the time its script reported (IDs
    /// recycle, so only to name a reason, never to act).
    pub fn reason_of_id(&self, id: u32) -> Option<DisconnectReason> {
        let map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&id)? {
            KickEntry::InProgress(_, reason, _) | KickEntry::Done(_, reason, _) => Some(*reason),
        }
    }

    /// Claims `key` for disconnection for `reason`. While another caller is disconnecting the
    /// same session, waits (until `deadline`) for its outcome: done → [`Claimed::Taken`];
    /// failed → claim again.
    pub async fn claim(
        &self,
        key: &SessionKey,
        reason: DisconnectReason,
        deadline: Instant,
    ) -> Option<Claimed<'_>> {
        loop {
            let mut wait = {
                let mut map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
                map.retain(
                    |_, e| !matches!(e, KickEntry::Done(_, _, at) if at.elapsed() > KICK_MEMORY),
                );
                match map.get(&key.id) {
                    Some(KickEntry::Done(k, _, _)) if k == key => return Some(Claimed::Taken),
                    Some(KickEntry::InProgress(k, _, rx)) if k == key => rx.clone(),
                    _ => {
                        let (tx, rx) = watch::channel(false);
                        map.insert(key.id, KickEntry::InProgress(key.clone(), reason, rx));
                        return Some(Claimed::Mine(Claim {
                            kicks: self,
                            key: key.clone(),
                            reason,
                            done: tx,
                        }));
                    }
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let outcome = tokio::time::timeout(left, wait.wait_for(|done| *done))
                .await
                .map(|r| r.is_ok());
            match outcome {
                Ok(true) => return Some(Claimed::Taken),
                // The other caller failed: try ourselves.
                Ok(false) => continue,
                Err(_) => return None,
            }
        }
    }
}

impl Claim<'_> {
    /// Records the outcome: `true` when this caller disconnected the session.
    pub fn finish(self, disconnected: bool) {
        let mut map = self.kicks.by_id.lock().unwrap_or_else(|p| p.into_inner());
        if disconnected {
            map.insert(
                self.key.id,
                KickEntry::Done(self.key.clone(), self.reason, Instant::now()),
            );
            let _ = self.done.send(true);
        } else if matches!(map.get(&self.key.id), Some(KickEntry::InProgress(k, _, _)) if *k == self.key)
        {
            map.remove(&self.key.id);
        }
    }
}

/// `agent.v1.VPNAgentService`.
#[derive(Clone)]
pub struct VpnAgent {
    ctx: Arc<Context>,
    /// Bound of one cross-actor call.
    call_timeout: Duration,
    /// The whole list without stats, encoded once per registry version and served to every
    /// caller (the lock makes concurrent callers of a new version wait for one encoding).
    whole_list: Arc<tokio::sync::Mutex<Option<(u64, EncodedReply)>>>,
}

impl VpnAgent {
    pub fn new(ctx: Arc<Context>, call_timeout: Duration) -> Self {
        Self {
            ctx,
            call_timeout,
            whole_list: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// Asks ocserv through `OcservCtl`, within `deadline`.
    async fn ctl<T: Send + 'static>(
        &self,
        deadline: Instant,
        idempotent: bool,
        build: impl Fn(ractor::RpcReplyPort<Result<T, CtlError>>) -> CtlMsg,
    ) -> Result<T, Status> {
        let left = deadline.saturating_duration_since(Instant::now());
        call(crate::actors::OCSERV_CTL, left, idempotent, build)
            .await
            .map_err(actor_status)?
            .map_err(ctl_status)
    }
}

fn actor_status(e: CallError) -> Status {
    match e {
        CallError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

/// Maps an ocserv failure to a status code.
pub fn ctl_status(e: CtlError) -> Status {
    match &e {
        CtlError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        CtlError::Timeout { .. } => Status::deadline_exceeded(e.to_string()),
        CtlError::Protocol { .. } | CtlError::NoReply { .. } => Status::internal(e.to_string()),
        CtlError::Busy(_) => Status::resource_exhausted(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

/// Who made a request: the peer's uid and pid on a Unix socket, or its address over TCP.
pub fn caller(peer: Option<&Peer>) -> String {
    match peer {
        Some(Peer {
            uid: Some(uid),
            pid,
            ..
        }) => match pid {
            Some(pid) => format!("uid {uid} pid {pid}"),
            None => format!("uid {uid}"),
        },
        Some(Peer {
            addr: Some(addr), ..
        }) => format!("tcp {addr}"),
        _ => "unknown".to_string(),
    }
}

/// Records a management action in the log and, through the `StateStore`, in the durable audit
/// log: when, who, what with which arguments, and the result (`ok` describes a success).
pub fn audit<T>(
    ctx: &Context,
    action: &str,
    peer: Option<&Peer>,
    args: &[(&str, String)],
    result: &Result<T, Status>,
    ok: impl FnOnce(&T) -> String,
) {
    let result = match result {
        Ok(r) => ok(r),
        Err(s) => format!(
            "error {}: {}",
            crate::metrics::code_name(s.code()),
            s.message()
        ),
    };
    record_action(ctx, action, caller(peer), args, result);
}

/// Writes one audit record (the log line and the durable record).
pub fn record_action(
    ctx: &Context,
    action: &str,
    caller: String,
    args: &[(&str, String)],
    result: String,
) {
    let record = crate::store::AuditRecord {
        at_ms: crate::store::unix_ms(std::time::SystemTime::now()),
        caller,
        action: action.to_string(),
        args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        result,
    };
    tracing::info!(action, caller = %record.caller, args = ?record.args, result = %record.result,
        "management action");
    match ractor::registry::where_is(crate::actors::STATE_STORE) {
        Some(store) => {
            let _ = store.send_message(crate::messages::StoreMsg::Audit(record));
        }
        None => {
            tracing::error!(
                action,
                "state store not running; audit record only in the log"
            );
            ctx.metrics.store_write("audit", false);
        }
    }
}

/// Disconnects one session the portal asked to end (`action`: `ValidateSession` with
/// `force_disconnect`, or `ReportSessionUpdate` with `should_disconnect`), by its full identity,
/// for `POLICY_VIOLATION`, and records it in the audit log with the portal's reason.
pub async fn portal_kick(
    ctx: &Context,
    action: &str,
    key: SessionKey,
    username: &str,
    why: &str,
    deadline: Instant,
) {
    let kicked = kick_sessions(
        ctx,
        std::slice::from_ref(&key),
        DisconnectReason::PolicyViolation,
        deadline,
    )
    .await;
    let result = match (kicked.done.len(), kicked.errors.first()) {
        (1, _) => "ok: session disconnected".to_string(),
        (_, Some(e)) => format!("error: {e}"),
        _ if kicked.not_attempted > 0 => "error: not attempted in time".to_string(),
        _ => "ok: the session had already ended".to_string(),
    };
    let args = [
        ("username", username.to_string()),
        ("session", key.to_string()),
        ("reason", why.to_string()),
    ];
    record_action(ctx, action, "portal".to_string(), &args, result);
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

fn timestamp(unix: u64) -> Option<prost_types::Timestamp> {
    (unix > 0).then(|| prost_types::Timestamp {
        seconds: i64::try_from(unix).unwrap_or(i64::MAX),
        nanos: 0,
    })
}

/// One registry session as the portal sees it. `session_id` is ocserv's ID; the 28-character
/// session id and other details go into `metadata` (kept small: a 10 000-session reply must fit
/// a default gRPC client's 4 MiB message limit; cipher suites are left to `occtl`).
pub fn vpn_session(s: &Session, counters: Option<ByteCounters>) -> pb::VpnSession {
    let mut metadata = HashMap::new();
    let mut put = |k: &str, v: String| {
        if !v.is_empty() {
            metadata.insert(k.to_string(), v);
        }
    };
    put("ocserv_session_id", s.safe_id.clone().unwrap_or_default());
    put("groupname", s.groupname.clone());
    put("device", s.device.clone());
    put("state", s.state.as_str().to_string());
    put("hostname", s.hostname.clone());
    put("user_agent", s.user_agent.clone());
    put("vhost", s.vhost.clone());
    put(
        "vpn_ipv6",
        s.vpn_ipv6.map(|a| a.to_string()).unwrap_or_default(),
    );
    let counters = counters.unwrap_or_default();
    pb::VpnSession {
        session_id: s.id.to_string(),
        username: s.username.clone(),
        client_ip: s.client_ip.map(|a| a.to_string()).unwrap_or_default(),
        vpn_ip: s.vpn_ip().map(|a| a.to_string()).unwrap_or_default(),
        connected_at: timestamp(s.connected_at),
        bytes_in: counters.bytes_in,
        bytes_out: counters.bytes_out,
        device_id: s.hostname.clone(),
        metadata,
    }
}

/// Encodes a view's sessions; a large list (or one that reads counters from files) on the
/// heavy-work thread.
async fn encode_view(view: SessionsView, stats: bool) -> Result<EncodedReply, Status> {
    if !stats && view.sessions.len() <= HEAVY_ABOVE {
        return Ok(encode_sessions(&view.sessions, false));
    }
    crate::heavy::run(crate::heavy::Lane::Replies, move || {
        encode_sessions(&view.sessions, stats)
    })
    .await
    .map_err(|e| Status::internal(format!("encoding the session list: {e}")))
}

/// What [`kick_sessions`] did.
#[derive(Debug, Default)]
pub struct Kicked {
    /// Sessions this call disconnected.
    pub done: Vec<SessionKey>,
    /// Why others failed, one line each.
    pub errors: Vec<String>,
    /// Sessions not tried before the deadline.
    pub not_attempted: usize,
}

/// Disconnects each session by its full identity (re-checked by ocserv in the same step) before
/// `deadline`. Concurrent kicks of one session count once ([`Kicks`]): a session another caller
/// is kicking is neither done nor an error here. The registry is told to forget what was done.
pub async fn kick_sessions(
    ctx: &Context,
    targets: &[SessionKey],
    reason: DisconnectReason,
    deadline: Instant,
) -> Kicked {
    let mut out = Kicked::default();
    for key in targets {
        let claim = match ctx.kicks.claim(key, reason, deadline).await {
            Some(Claimed::Mine(c)) => c,
            // Another caller disconnected it: not ours to count.
            Some(Claimed::Taken) => continue,
            None => {
                out.not_attempted += 1;
                continue;
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            claim.finish(false);
            out.not_attempted += 1;
            continue;
        }
        let k = key.clone();
        let outcome = call(crate::actors::OCSERV_CTL, left, false, |r| {
            CtlMsg::DisconnectSession(k.clone(), r)
        })
        .await
        .map_err(actor_status)
        .and_then(|r| r.map_err(ctl_status));
        match outcome {
            Ok(DisconnectOutcome::Done) => {
                claim.finish(true);
                out.done.push(key.clone());
            }
            // Ended on its own, or its ID now names another session: nothing done.
            Ok(DisconnectOutcome::NotFound) => claim.finish(false),
            Err(e) => {
                claim.finish(false);
                out.errors.push(format!("session {key}: {}", e.message()));
            }
        }
    }
    if !out.done.is_empty() {
        // Best effort: the next reconcile removes them anyway.
        if let Some(cell) = ractor::registry::where_is(SESSION_REGISTRY) {
            let _ = cell.send_message(RegistryMsg::Forget(out.done.clone()));
        }
    }
    out
}

/// Which of a user's sessions a `DisconnectUser` takes: all of them, or only the newest (latest
/// connection time, then highest ID).
pub fn disconnect_targets(sessions: &[Session], all: bool) -> Vec<SessionKey> {
    if all {
        return sessions.iter().map(Session::key).collect();
    }
    sessions
        .iter()
        .max_by_key(|s| (s.connected_at, s.id))
        .map(|s| vec![s.key()])
        .unwrap_or_default()
}

/// Refuses to serve a view that is not known to be current (DESIGN: stale data is never served
/// as truth).
pub fn check_fresh(view: &SessionsView, reconcile_interval: Duration) -> Result<(), Status> {
    let why = || {
        view.last_error
            .as_ref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default()
    };
    match view.age {
        None => Err(Status::unavailable(format!(
            "the session list has not been synchronized with ocserv yet{}",
            why()
        ))),
        Some(age) if crate::health::too_old(age, reconcile_interval) => {
            Err(Status::unavailable(format!(
                "the session list is {} old (last agreement with ocserv; served only while younger than {}){}",
                humantime::format_duration(Duration::from_secs(age.as_secs())),
                humantime::format_duration(crate::health::stale_bound(reconcile_interval)),
                why()
            )))
        }
        Some(_) => Ok(()),
    }
}

#[tonic::async_trait]
impl VpnAgentService for VpnAgent {
    async fn notify_connect(
        &self,
        _request: Request<pb::NotifyConnectRequest>,
    ) -> Result<Response<pb::NotifyConnectResponse>, Status> {
        Err(Status::unimplemented(
            "NotifyConnect is not served by this agent version",
        ))
    }

    async fn notify_disconnect(
        &self,
        _request: Request<pb::NotifyDisconnectRequest>,
    ) -> Result<Response<pb::NotifyDisconnectResponse>, Status> {
        Err(Status::unimplemented(
            "NotifyDisconnect is not served by this agent version",
        ))
    }

    async fn get_active_sessions(
        &self,
        request: Request<pb::GetActiveSessionsRequest>,
    ) -> Result<Response<pb::GetActiveSessionsResponse>, Status> {
        let (permit, reply) = self.get_active_sessions_inner(request.into_inner()).await?;
        // The message itself travels as `reply`, already encoded; the edge sends it in place of
        // this empty one (see `grpc_edge::EncodedReply`).
        let mut resp = Response::new(pb::GetActiveSessionsResponse::default());
        resp.extensions_mut().insert(reply);
        if let Some(permit) = permit {
            resp.extensions_mut().insert(permit);
        }
        Ok(resp)
    }

    async fn disconnect_user(
        &self,
        request: Request<pb::DisconnectUserRequest>,
    ) -> Result<Response<pb::DisconnectUserResponse>, Status> {
        let peer = request.extensions().get::<Peer>().cloned();
        let req = request.into_inner();
        let args = [
            ("username", req.username.clone()),
            ("reason", req.reason.clone()),
            (
                "disconnect_all_sessions",
                req.disconnect_all_sessions.to_string(),
            ),
        ];
        let result = self.disconnect_user_inner(req).await;
        audit(
            &self.ctx,
            "DisconnectUser",
            peer.as_ref(),
            &args,
            &result,
            |r| match r.error_message.is_empty() {
                true => format!("ok: {} session(s) disconnected", r.sessions_disconnected),
                false => format!(
                    "ok: {} session(s) disconnected; {}",
                    r.sessions_disconnected, r.error_message
                ),
            },
        );
        result.map(Response::new)
    }

    async fn update_user_routes(
        &self,
        _request: Request<pb::UpdateUserRoutesRequest>,
    ) -> Result<Response<pb::UpdateUserRoutesResponse>, Status> {
        Err(Status::unimplemented(
            "UpdateUserRoutes is not served by this agent version",
        ))
    }
}

impl VpnAgent {
    async fn get_active_sessions_inner(
        &self,
        req: pb::GetActiveSessionsRequest,
    ) -> Result<(Option<ReplyPermit>, EncodedReply), Status> {
        let username = if req.username_filter.is_empty() {
            None
        } else {
            crate::validate::name("username_filter", &req.username_filter)
                .map_err(|e| invalid(e.field, e.reason))?;
            Some(req.username_filter)
        };
        let include_stats = req.include_stats;
        let query = || async {
            let view: SessionsView = call(SESSION_REGISTRY, self.call_timeout, true, |reply| {
                RegistryMsg::Query {
                    username: username.clone(),
                    reply,
                }
            })
            .await
            .map_err(actor_status)?;
            check_fresh(&view, self.ctx.config().ocserv.reconcile_interval)?;
            Ok::<_, Status>(view)
        };
        let view = query().await?;
        if username.is_none() && !include_stats {
            return Ok((None, self.whole_list(view).await?));
        }
        // Bound the memory of replies being encoded and sent at once; the permit travels with
        // the response until it has been written (see `grpc_edge`). A caller that has to wait
        // for room does not hold its view meanwhile: it asks again once it has the room.
        let cost = reply_cost_kib(view.sessions.len());
        let gate = &self.ctx.reply_gate;
        let (permit, view) = match gate.enter_many(cost, Duration::ZERO).await {
            Ok(p) => (p, view),
            Err(_) => {
                drop(view);
                let wait = self.ctx.config().grpc.request_timeout / 2;
                let p = gate.enter_many(cost, wait).await.map_err(|e| {
                    Status::resource_exhausted(format!("too many large replies in flight: {e}"))
                })?;
                (p, query().await?)
            }
        };
        let reply = encode_view(view, include_stats).await?;
        Ok((Some(ReplyPermit(Arc::new(permit))), reply))
    }

    /// The whole list without stats for `view`'s version or a newer one: encoded by the first
    /// caller that needs it, shared by all.
    async fn whole_list(&self, view: SessionsView) -> Result<EncodedReply, Status> {
        let mut cached = self.whole_list.lock().await;
        if let Some((version, reply)) = cached.as_ref() {
            if *version >= view.version {
                return Ok(reply.clone());
            }
        }
        let version = view.version;
        let reply = encode_view(view, false).await?;
        *cached = Some((version, reply.clone()));
        Ok(reply)
    }

    /// `DisconnectUser` itself; the caller logs and audits the outcome.
    async fn disconnect_user_inner(
        &self,
        req: pb::DisconnectUserRequest,
    ) -> Result<pb::DisconnectUserResponse, Status> {
        // One deadline for the whole call, inside the edge's grpc.request_timeout, so that
        // every outcome (a partial one too) is answered rather than cut.
        let budget = self.ctx.config().grpc.request_timeout;
        let deadline = Instant::now() + budget.mul_f64(0.9);
        crate::validate::username(&req.username).map_err(|e| invalid(e.field, e.reason))?;
        if req.reason.len() > 1024 || req.reason.chars().any(char::is_control) {
            return Err(invalid(
                "reason",
                "must be at most 1024 bytes without control characters",
            ));
        }
        // Ask ocserv itself, not the registry: the answer must be current.
        let username = req.username.clone();
        let sessions = self
            .ctl(deadline, true, |r| CtlMsg::UserInfo(username.clone(), r))
            .await?;
        let targets = disconnect_targets(&sessions, req.disconnect_all_sessions);
        let Kicked {
            done,
            mut errors,
            not_attempted,
        } = kick_sessions(&self.ctx, &targets, DisconnectReason::AdminForced, deadline).await;
        if not_attempted > 0 {
            errors.push(format!(
                "{not_attempted} session(s) not attempted within grpc.request_timeout ({})",
                humantime::format_duration(budget)
            ));
        }
        if done.is_empty() {
            return Err(if !errors.is_empty() {
                Status::unavailable(errors.join("; "))
            } else {
                Status::not_found(format!(
                    "username: no live session for user {:?}",
                    req.username
                ))
            });
        }
        Ok(pb::DisconnectUserResponse {
            success: errors.is_empty(),
            sessions_disconnected: u32::try_from(done.len()).unwrap_or(u32::MAX),
            error_message: errors.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::session;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn the_streamed_encoding_is_prosts_own_across_chunks() {
        use prost::Message;
        for n in [0usize, 1, 3, 2_000] {
            let sessions: Vec<Arc<Session>> = (0..n as u32)
                .map(|i| {
                    let mut s = session(i + 1, &format!("user{i}"), 1_700_000_000 + u64::from(i));
                    s.hostname = "h".repeat(i as usize % 40);
                    s.counters = Some(ByteCounters {
                        bytes_in: u64::from(i) * 3,
                        bytes_out: 7,
                    });
                    Arc::new(s)
                })
                .collect();
            for stats in [false, true] {
                let reply = encode_sessions(&sessions, stats);
                let whole = pb::GetActiveSessionsResponse {
                    sessions: sessions
                        .iter()
                        .map(|s| vpn_session(s, s.counters.filter(|_| stats)))
                        .collect(),
                    total_count: n as u32,
                };
                let bytes = reply.to_vec();
                assert_eq!(bytes.len(), reply.len());
                let decoded = pb::GetActiveSessionsResponse::decode(bytes.as_slice()).unwrap();
                assert_eq!(decoded, whole, "n = {n}, stats = {stats}");
                // (Byte-for-byte equality would depend on the metadata map's order.)
                assert_eq!(bytes.len(), whole.encoded_len());
                if n == 2_000 {
                    assert!(reply.chunks.len() > 1, "a large reply is sent in pieces");
                    assert!(reply.chunks.iter().all(|c| c.len() <= CHUNK));
                }
            }
        }
    }

    const ADMIN: DisconnectReason = DisconnectReason::AdminForced;

    #[tokio::test]
    async fn a_kick_is_claimed_once_and_a_failed_one_is_retried() {
        let kicks = Arc::new(Kicks::default());
        let key = session(7, "a", 10).key();
        let Some(Claimed::Mine(first)) = kicks.claim(&key, ADMIN, far()).await else {
            panic!("first caller claims")
        };
        // A concurrent caller waits for the outcome.
        let k2 = kicks.clone();
        let key2 = key.clone();
        let waiter = tokio::spawn(async move {
            matches!(k2.claim(&key2, ADMIN, far()).await, Some(Claimed::Taken))
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            kicks.reason_of(&key),
            Some(ADMIN),
            "known while in progress"
        );
        first.finish(true);
        assert!(
            waiter.await.unwrap(),
            "the second caller is told it was taken"
        );
        assert_eq!(kicks.reason_of(&key), Some(ADMIN), "and once done");
        // Later callers too, while the kick is remembered.
        assert!(matches!(
            kicks.claim(&key, ADMIN, far()).await,
            Some(Claimed::Taken)
        ));
        // A new session under the recycled ID is a different claim.
        let other = session(7, "b", 99).key();
        assert_eq!(
            kicks.reason_of(&other),
            None,
            "another session under the same ID"
        );
        let Some(Claimed::Mine(c)) = kicks.claim(&other, ADMIN, far()).await else {
            panic!("a recycled ID is not the kicked session")
        };
        // A failed kick lets a waiting caller try itself.
        let k3 = kicks.clone();
        let o2 = other.clone();
        let retry = tokio::spawn(async move {
            matches!(k3.claim(&o2, ADMIN, far()).await, Some(Claimed::Mine(_)))
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.finish(false);
        assert!(retry.await.unwrap());
    }

    #[tokio::test]
    async fn a_claim_waits_no_longer_than_the_deadline() {
        let kicks = Kicks::default();
        let key = session(1, "a", 1).key();
        let _held = kicks.claim(&key, ADMIN, far()).await;
        let soon = Instant::now() + Duration::from_millis(30);
        assert!(kicks.claim(&key, ADMIN, soon).await.is_none());
    }

    #[test]
    fn reply_cost_is_bounded() {
        assert_eq!(reply_cost_kib(0), 1);
        assert_eq!(reply_cost_kib(10_000), 3_125);
        assert_eq!(reply_cost_kib(10_000_000), REPLY_BUDGET_KIB);
    }

    #[test]
    fn newest_session_is_the_single_target() {
        let s = vec![
            session(10, "a", 100),
            session(5, "a", 200),
            session(7, "a", 200),
        ];
        let ids = |v: Vec<SessionKey>| v.into_iter().map(|k| k.id).collect::<Vec<_>>();
        assert_eq!(ids(disconnect_targets(&s, false)), vec![7]);
        assert_eq!(ids(disconnect_targets(&s, true)), vec![10, 5, 7]);
        assert_eq!(disconnect_targets(&s, false)[0], s[2].key());
        assert!(disconnect_targets(&[], true).is_empty());
        assert!(disconnect_targets(&[], false).is_empty());
    }

    #[test]
    fn session_mapping_fills_contract_fields() {
        let mut s = session(42, "jürgen", 1_700_000_000);
        s.groupname = "staff".into();
        s.client_ip = Some("192.0.2.7".parse().unwrap());
        s.vpn_ipv4 = Some("10.0.0.5".parse().unwrap());
        let c = ByteCounters {
            bytes_in: 10,
            bytes_out: 20,
        };
        let p = vpn_session(&s, Some(c));
        assert_eq!(p.session_id, "42");
        assert_eq!(p.username, "jürgen");
        assert_eq!(p.client_ip, "192.0.2.7");
        assert_eq!(p.vpn_ip, "10.0.0.5");
        assert_eq!(p.connected_at.unwrap().seconds, 1_700_000_000);
        assert_eq!((p.bytes_in, p.bytes_out), (10, 20));
        assert_eq!(p.metadata["groupname"], "staff");
        assert_eq!(p.metadata["ocserv_session_id"].len(), 28);
        let p = vpn_session(&s, None);
        assert_eq!((p.bytes_in, p.bytes_out), (0, 0));
    }
}
