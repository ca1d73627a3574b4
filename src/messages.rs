//! Every message the actors exchange. Requests carry an [`RpcReplyPort`] and are sent with
//! `actors::call`, which bounds every call with a timeout (this module stays below the actors:
//! it imports nothing from them).
//!
//! Each actor also takes a `Crash` message: it makes the actor's handler panic, which the
//! supervisor sees as `ActorFailed`. It is reachable only from inside the process (chaos tests);
//! no network interface sends it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ractor::RpcReplyPort;

use crate::ocserv::{
    Ban, Cookie, CtlError, CtlResult, DisconnectOutcome, ServerStatus, Session, SessionKey,
};
use crate::peruser::write::{RemoveOutcome, WriteOutcome};
use crate::peruser::{Kind, PerUserConfig};
use crate::policy::local::LocalPolicy;
use crate::tree::Child;

/// To `OcservCtl`: one request to ocserv each. Every variant is answered, success or typed error.
/// There is deliberately no "disconnect by ID": an ID is a recyclable PID, so a single session is
/// only ever disconnected by its full identity ([`CtlMsg::DisconnectSession`]).
#[derive(Debug)]
pub enum CtlMsg {
    Status(RpcReplyPort<CtlResult<ServerStatus>>),
    List(RpcReplyPort<CtlResult<Vec<Session>>>),
    UserInfo(String, RpcReplyPort<CtlResult<Vec<Session>>>),
    IdInfo(u32, RpcReplyPort<CtlResult<Option<Session>>>),
    DisconnectName(String, RpcReplyPort<CtlResult<DisconnectOutcome>>),
    TerminateUser(String, RpcReplyPort<CtlResult<DisconnectOutcome>>),
    /// Disconnects one session by its full identity, re-checked by ocserv in the same step;
    /// `NotFound` when the ID is gone or now names another session.
    DisconnectSession(SessionKey, RpcReplyPort<CtlResult<DisconnectOutcome>>),
    ListBanned(RpcReplyPort<CtlResult<Vec<Ban>>>),
    UnbanIp(IpAddr, RpcReplyPort<CtlResult<DisconnectOutcome>>),
    Reload(RpcReplyPort<CtlResult<()>>),
    ListCookies(RpcReplyPort<CtlResult<Vec<Cookie>>>),
    Crash,
}

/// Why a cross-actor call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("actor {0} is not running (restarting?)")]
    Unavailable(&'static str),
    #[error("actor {0} did not answer in time")]
    Timeout(&'static str),
    #[error("actor {0} stopped before answering")]
    Lost(&'static str),
}

/// Why a reconcile failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReconcileError {
    /// ocserv answered badly or not at all.
    #[error("{0}")]
    Ocserv(Arc<CtlError>),
    /// `OcservCtl` could not be reached.
    #[error(transparent)]
    Actor(#[from] CallError),
}

/// A consistent view of the registry, for one query.
#[derive(Debug, Clone)]
pub struct SessionsView {
    /// Matching sessions, ordered by ocserv ID (shared with the registry's table; the whole
    /// list is one allocation shared by every caller until the table changes).
    pub sessions: Arc<Vec<Arc<Session>>>,
    /// The version of the table the view was taken from (see `SessionTable::version`).
    pub version: u64,
    /// How long ago the view last agreed with ocserv; `None` until it has once since the
    /// registry (re)started.
    pub age: Option<Duration>,
    /// Why the last reconcile failed, when it did.
    pub last_error: Option<ReconcileError>,
}

/// What one reconcile did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub sessions: usize,
    pub opened: usize,
    pub closed: usize,
}

pub type ReconcileResult = Result<ReconcileReport, ReconcileError>;

/// To `SessionRegistry`.
#[derive(Debug)]
pub enum RegistryMsg {
    /// Sessions of one user (or all), as of the last reconcile.
    Query {
        username: Option<String>,
        reply: RpcReplyPort<SessionsView>,
    },
    /// Reconcile now; the reply comes once ocserv's list has been applied (or failed).
    ReconcileNow(RpcReplyPort<ReconcileResult>),
    /// Periodic timer.
    Tick,
    /// The session list of fetch number `fetch` (or the error), applied by the actor.
    Fetched {
        fetch: u64,
        result: Result<Vec<Session>, ReconcileError>,
        waiters: Vec<RpcReplyPort<ReconcileResult>>,
    },
    /// Sessions the agent just disconnected, by full identity: dropped at once, and kept out
    /// of any reconcile whose fetch started before this notice.
    Forget(Vec<SessionKey>),
    /// A connect the agent admitted, or a disconnect or host-update, reported by ocserv's
    /// script through the hook. Answered once what it changed is in the durable store (a
    /// disconnect's end), or at once; the hook listener sends it again until answered, and
    /// handling it twice changes nothing.
    HookEvent(HookEvent, Option<RpcReplyPort<()>>),
    /// The outcome of a save of session changes to `StateStore`; on failure the changes (and
    /// their waiters) come back to be sent again.
    Saved {
        ok: bool,
        changes: Vec<crate::store::Change>,
        waiters: Vec<RpcReplyPort<()>>,
    },
    /// Timer: send unsaved changes again.
    SaveNow,
    /// Timer: sessions waiting for their disconnect script may be due.
    CloseDue,
    /// Timer: report every live session's counters (`portal.session_update_interval`).
    UpdateDue,
    /// Timer: revalidate the next slice of live sessions (`portal.validate_interval`).
    ValidateDue,
    /// ocserv's event stream (`ocserv.event_stream`) says these sessions ended, and why.
    Ended(Vec<(crate::ocserv::Session, crate::metrics::DisconnectReason)>),
    /// The task holding the event stream ended (it never should): the registry fails.
    StreamEnded,
    /// What ocserv showed for a session pending since its connect was admitted (`None`: not
    /// listed, or ocserv could not answer).
    PendingChecked {
        id: u32,
        username: String,
        seen: Option<Box<Session>>,
    },
    Crash,
}

/// What ocserv's connect (admitted), disconnect or host-update script reported (through the
/// hook program).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookEvent {
    pub reason: crate::hook_proto::Reason,
    /// ocserv's `ID` (the worker's PID; recycled, so matched together with the username).
    pub id: u32,
    pub username: String,
    pub groupname: String,
    /// `IP_REAL`, `IP_REMOTE` (the client's VPN address) and `DEVICE`.
    pub client_ip: Option<IpAddr>,
    pub vpn_ip: Option<IpAddr>,
    pub device: String,
    /// Disconnect only: the session's final counters (`STATS_BYTES_IN/OUT`) and duration.
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    pub duration: Option<Duration>,
    /// When the agent received it.
    pub at: std::time::SystemTime,
}

impl HookEvent {
    /// What `request` reports, received at `at`.
    pub fn of(r: &crate::hook_proto::HookRequest, at: std::time::SystemTime) -> Self {
        Self {
            reason: r.reason,
            id: r.session_id,
            username: r.username.clone(),
            groupname: r.groupname.clone(),
            client_ip: r.ip_real,
            vpn_ip: r.ip_remote,
            device: r.device.clone(),
            bytes_in: r.stats_bytes_in,
            bytes_out: r.stats_bytes_out,
            duration: r.stats_duration.map(Duration::from_secs),
            at,
        }
    }
}

impl From<&crate::hook_proto::HookRequest> for PolicyQuery {
    fn from(r: &crate::hook_proto::HookRequest) -> Self {
        Self {
            username: r.username.clone(),
            groupname: r.groupname.clone(),
            client_ip: r.ip_real,
            vpn_ip: r.ip_remote,
            session_id: r.session_id,
            device: r.device.clone(),
        }
    }
}

pub use crate::policy::Verdict;

/// To the `PolicyCache`.
#[derive(Debug)]
pub enum PolicyMsg {
    /// May this user connect? Always answered (from the fail mode if need be).
    Decide {
        query: PolicyQuery,
        reply: RpcReplyPort<Verdict>,
    },
    /// The portal's answer (or failure) for one key, from the task the cache spawned; `ticket`
    /// from `PolicyStore::ticket` when the call began.
    Fetched {
        query: PolicyQuery,
        ticket: crate::policy::cache::Ticket,
        result: Result<PortalAnswer, PortalError>,
    },
    Crash,
}

/// To the server actors (`GrpcFrontDoor`, `MetricsServer`, `HookListener`).
#[derive(Debug)]
pub enum ServerMsg {
    /// A serving task ended (with its error, if any): the actor fails unless it is draining.
    Ended {
        listener: &'static str,
        error: Option<String>,
    },
    Crash,
}

/// To the root supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Restart a child (sent after its backoff delay).
    Restart(Child),
    /// A restart finished, or failed with the reason.
    Restarted {
        child: Child,
        result: Result<(), String>,
    },
    /// Ordered shutdown: stop children in reverse start order, then the supervisor.
    Shutdown(RpcReplyPort<()>),
}

/// What the hook knows about a connect, asked of the portal by `PortalLink`
/// ([`PortalMsg::CheckPolicy`]); every field goes into `vpn.v1.CheckPolicyRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyQuery {
    pub username: String,
    /// ocserv's group of the user; empty when it has none.
    pub groupname: String,
    /// The client's real address (ocserv's `IP_REAL`).
    pub client_ip: Option<IpAddr>,
    /// The address ocserv gave the client inside the tunnel (`IP_REMOTE`).
    pub vpn_ip: Option<IpAddr>,
    /// ocserv's `ID` of the session; sent as the decimal string that `GetActiveSessions`
    /// reports as `session_id`.
    pub session_id: u32,
    /// The tun device of the session (`DEVICE`).
    pub device: String,
}

/// The portal's answer to [`PortalMsg::CheckPolicy`], checked whole: every route a network,
/// every DNS server an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalAnswer {
    pub decision: crate::policy::Decision,
    /// `CheckPolicyResponse.should_disconnect`: with an admission, the user's *other* live
    /// sessions go (one session per user); with a denial, every live session of the user goes.
    pub should_disconnect: bool,
}

/// The portal's answer to [`PortalMsg::Validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    pub valid: bool,
    /// The session must go (`force_disconnect`).
    pub force_disconnect: bool,
    /// `invalid_reason`, cleaned like a denial's reason.
    pub reason: String,
}

/// Why `PortalLink` has no answer from the portal. The caller (the policy cache) applies its
/// fail mode to every one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortalError {
    /// No `portal.endpoint` is configured.
    #[error("no portal configured (portal.endpoint is not set)")]
    NotConfigured,
    /// The circuit breaker is open (or half-open with its probe in flight): not asked.
    #[error("the portal's circuit breaker is open; not asked")]
    BreakerOpen,
    /// No answer within `portal.call_timeout`.
    #[error("the portal did not answer within portal.call_timeout")]
    Timeout,
    /// The portal could not be reached: connect, TLS or transport failure, or too many calls
    /// in flight already.
    #[error("the portal is unreachable: {0}")]
    Unavailable(String),
    /// The portal answered with an error status.
    #[error("the portal answered {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    /// The portal's answer cannot be used (refused whole, never half-applied).
    #[error("the portal's answer is invalid: {field}: {reason}")]
    InvalidAnswer { field: String, reason: String },
}

impl PortalError {
    /// The `status` label of `ocserv_agent_portal_requests_total` (success is `ok`; an error
    /// status of the portal is labelled with its gRPC code name, e.g. `PERMISSION_DENIED`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotConfigured => "not_configured",
            Self::BreakerOpen => "breaker_open",
            Self::Timeout => "timeout",
            Self::Unavailable(_) => "unavailable",
            Self::Status { code, .. } => crate::metrics::code_name(*code),
            Self::InvalidAnswer { .. } => "invalid_answer",
        }
    }
}

/// To `PortalLink`.
#[derive(Debug)]
pub enum PortalMsg {
    /// Asks the portal's `vpn.v1.AuthService/CheckPolicy`, behind the circuit breaker and
    /// within `portal.call_timeout`; the answer comes from the call's own task.
    CheckPolicy {
        request: PolicyQuery,
        reply: RpcReplyPort<Result<PortalAnswer, PortalError>>,
    },
    /// The outbox may hold events: drain it unless a drain runs or is backing off.
    Drain,
    /// Asks the portal's `vpn.v1.AuthService/ValidateSession` about one live session, behind
    /// the circuit breaker and within `portal.call_timeout`.
    Validate {
        session: crate::store::SessionRecord,
        reply: RpcReplyPort<Result<Validation, PortalError>>,
    },
    /// A call task's outcome, recorded on the circuit breaker with the permit it was made with.
    CallEnded {
        permit: crate::breaker::Permit,
        outcome: crate::breaker::Outcome,
    },
    Crash,
}

/// Why `ConfigWriter` did not apply a request: the kind and name of the file, the cause and
/// the reason in words. Clone-able so one failure can answer every caller merged into a write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("per-{} file {name:?}: {reason}", match kind { Kind::User => "user", Kind::Group => "group" })]
pub struct WriteFailure {
    pub kind: Kind,
    pub name: String,
    pub cause: WriteFailureCause,
    pub reason: String,
}

/// What kind of failure a [`WriteFailure`] is (callers map it to their own error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailureCause {
    /// The name or the model was refused before anything was touched (unsafe name, invalid
    /// route, too many values, ...): asking again with the same input fails the same way.
    Refused,
    /// Too many writes are queued for the directory; nothing was touched. Retry later.
    Busy,
    /// The file system failed (missing directory, permissions, disk full, ...); the file
    /// holds its previous content.
    Io,
}

/// To `ConfigWriter`: per-user and per-group files. Writes to one directory run one at a time,
/// off the actor; every request with a reply port is answered, success or [`WriteFailure`].
// `Apply` carries the model by value, as its senders build it; the other variants are rare,
// so their unused space in a mailbox slot costs nothing that matters.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum WriterMsg {
    /// Makes the file `name` of `kind` hold `model` (rendered, atomically, only when the content
    /// changes). `reply: None` is fire-and-forget (the outcome is logged and counted).
    Apply {
        kind: Kind,
        name: String,
        model: PerUserConfig,
        reply: Option<RpcReplyPort<Result<WriteOutcome, WriteFailure>>>,
    },
    /// Removes the file `name` of `kind` (kept as the newest backup).
    Remove {
        kind: Kind,
        name: String,
        reply: Option<RpcReplyPort<Result<RemoveOutcome, WriteFailure>>>,
    },
    /// Writes the per-user and per-group files of every admitted user and group of this local
    /// policy that has routes, no-routes or DNS, and removes those of names that had some in
    /// the policy synced before and have none now. Sent after each SIGHUP reload; a (re)started
    /// writer syncs the policy in force on its own.
    SyncLocalPolicy(Arc<LocalPolicy>),
    /// A write task of the directory of `kind` finished (its callers are already answered):
    /// the next queued job of that directory may start.
    Done {
        kind: Kind,
    },
    Crash,
}

/// To `StateStore`: what to keep in the durable store ([`crate::store`]). Writes are
/// write-behind: queued by key (a newer value for a key replaces the queued one) and committed
/// together in one transaction on a blocking thread, one transaction at a time.
#[derive(Debug)]
pub enum StoreMsg {
    /// Keep a portal decision (replacing the one kept for its username and groupname).
    KeepDecision(crate::store::KeptDecision),
    /// Forget the decision for (username, groupname).
    ForgetDecision {
        username: String,
        groupname: String,
    },
    /// Append a management action to the audit log.
    Audit(crate::store::AuditRecord),
    /// Apply session changes to the snapshot and the outbox ([`crate::store::Store::record`]);
    /// answered once they are committed (or failed: the caller sends them again, which is safe,
    /// every change being idempotent).
    Record {
        changes: Vec<crate::store::Change>,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// A transaction finished (sent by its task to whichever incarnation runs now).
    Flushed,
    Crash,
}
