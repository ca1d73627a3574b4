//! Every message the actors exchange. Requests carry an [`RpcReplyPort`] and are sent with
//! [`crate::actors::call`], which bounds every call with a timeout.
//!
//! Each actor also takes a `Crash` message: it makes the actor's handler panic, which the
//! supervisor sees as `ActorFailed`. It is reachable only from inside the process (chaos tests);
//! no network interface sends it.

use std::net::IpAddr;
use std::sync::Arc;

use ractor::RpcReplyPort;

use crate::ocserv::{Ban, Cookie, CtlResult, DisconnectOutcome, ServerStatus, Session};

/// To `OcservCtl`: one request to ocserv each. Every variant is answered, success or typed error.
#[derive(Debug)]
pub enum CtlMsg {
    Status(RpcReplyPort<CtlResult<ServerStatus>>),
    List(RpcReplyPort<CtlResult<Vec<Session>>>),
    UserInfo(String, RpcReplyPort<CtlResult<Vec<Session>>>),
    IdInfo(u32, RpcReplyPort<CtlResult<Option<Session>>>),
    DisconnectName(String, RpcReplyPort<CtlResult<DisconnectOutcome>>),
    DisconnectId(u32, RpcReplyPort<CtlResult<DisconnectOutcome>>),
    TerminateUser(String, RpcReplyPort<CtlResult<DisconnectOutcome>>),
    TerminateId(u32, RpcReplyPort<CtlResult<DisconnectOutcome>>),
    ListBanned(RpcReplyPort<CtlResult<Vec<Ban>>>),
    UnbanIp(IpAddr, RpcReplyPort<CtlResult<DisconnectOutcome>>),
    Reload(RpcReplyPort<CtlResult<()>>),
    ListCookies(RpcReplyPort<CtlResult<Vec<Cookie>>>),
    Crash,
}

/// A consistent view of the registry, for one query.
#[derive(Debug, Clone)]
pub struct SessionsView {
    /// Matching sessions, ordered by ocserv ID (shared with the registry's table).
    pub sessions: Vec<Arc<Session>>,
    /// False until the registry has once agreed with ocserv since it (re)started.
    pub synced: bool,
    /// Why the last reconcile failed, when it did.
    pub last_error: Option<String>,
}

/// What one reconcile did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub sessions: usize,
    pub opened: usize,
    pub closed: usize,
}

/// To `SessionRegistry`.
#[derive(Debug)]
pub enum RegistryMsg {
    /// Sessions of one user (or all), as of the last reconcile.
    Query {
        username: Option<String>,
        reply: RpcReplyPort<SessionsView>,
    },
    /// Reconcile now; the reply comes once ocserv's list has been applied (or failed).
    ReconcileNow(RpcReplyPort<Result<ReconcileReport, String>>),
    /// Periodic timer.
    Tick,
    /// A fetched session list (or the error), applied by the actor.
    Fetched {
        result: Result<Vec<Session>, String>,
        waiters: Vec<RpcReplyPort<Result<ReconcileReport, String>>>,
    },
    /// Sessions the agent just disconnected: drop them without waiting for the next reconcile.
    Forget(Vec<u32>),
    Crash,
}

/// To the `GrpcFrontDoor` and `MetricsServer` actors: they serve on their own; only chaos.
#[derive(Debug)]
pub enum ServerMsg {
    Crash,
}

/// To the root supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Restart a child (sent after its backoff delay).
    Restart(crate::actors::Child),
    /// A restart finished, or failed with the reason.
    Restarted {
        child: crate::actors::Child,
        result: Result<(), String>,
    },
    /// Ordered shutdown: stop children in reverse start order, then the supervisor.
    Shutdown(RpcReplyPort<()>),
}
