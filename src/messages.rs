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
    Crash,
}

/// To the `GrpcFrontDoor` and `MetricsServer` actors.
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
