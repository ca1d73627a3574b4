//! The actor tree (DESIGN §2): one actor per file, wired by [`supervisor::Supervisor`].
//!
//! Callers find an actor by its registered name at call time, because a restarted actor has a new
//! `ActorRef`; [`call`] does the lookup, retries while the actor is being restarted, and bounds the
//! whole call with a timeout.

pub mod grpc_front_door;
pub mod metrics_server;
pub mod ocserv_ctl;
pub mod session_registry;
pub mod supervisor;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::{Message, RpcReplyPort};

use crate::config::Config;
use crate::metrics::Metrics;

/// The children of the root supervisor, in start order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Child {
    OcservCtl,
    SessionRegistry,
    MetricsServer,
    GrpcFrontDoor,
}

impl Child {
    pub const ALL: [Child; 4] = [
        Child::OcservCtl,
        Child::SessionRegistry,
        Child::MetricsServer,
        Child::GrpcFrontDoor,
    ];

    /// The child registered under `name`, if any.
    pub fn from_name(name: &str) -> Option<Child> {
        Child::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Chaos hook, reachable only from inside the process: stops the running actor with
    /// `kill()` (the supervisor sees `ActorTerminated`) or makes its handler panic through its
    /// `Crash` message (`ActorFailed`). Returns the struck incarnation's id, or `None` when the
    /// actor is not running.
    pub fn strike(self, panic: bool) -> Option<ractor::ActorId> {
        use crate::messages::{CtlMsg, RegistryMsg, ServerMsg};
        let cell = ractor::registry::where_is(self.name())?;
        if !panic {
            cell.kill();
        } else {
            let delivered = match self {
                Child::OcservCtl => cell.send_message(CtlMsg::Crash).is_ok(),
                Child::SessionRegistry => cell.send_message(RegistryMsg::Crash).is_ok(),
                Child::MetricsServer | Child::GrpcFrontDoor => {
                    cell.send_message(ServerMsg::Crash).is_ok()
                }
            };
            if !delivered {
                return None;
            }
        }
        Some(cell.get_id())
    }

    /// The registered actor name (also the `actor` label of the restart counter).
    pub fn name(self) -> &'static str {
        match self {
            Child::OcservCtl => OCSERV_CTL,
            Child::SessionRegistry => SESSION_REGISTRY,
            Child::MetricsServer => METRICS_SERVER,
            Child::GrpcFrontDoor => GRPC_FRONT_DOOR,
        }
    }
}

pub const SUPERVISOR: &str = "supervisor";
pub const OCSERV_CTL: &str = "ocserv_ctl";
pub const SESSION_REGISTRY: &str = "session_registry";
pub const METRICS_SERVER: &str = "metrics_server";
pub const GRPC_FRONT_DOOR: &str = "grpc_front_door";

/// What every actor is started with. Listeners are bound once at start-up (`app::start`) and shared, so a
/// restarted server actor accepts on the same socket and clients never see the port closed.
pub struct Context {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// The plaintext TCP gRPC listener; `None` when `grpc.listen` is not set.
    pub grpc_listener: Option<Arc<std::net::TcpListener>>,
    pub metrics_listener: Arc<std::net::TcpListener>,
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

/// Calls the actor registered as `name`. While the actor is absent (between a crash and its
/// restart) the lookup is retried until `timeout`. When the actor dies with the request in its
/// mailbox the request is sent again only if `idempotent`.
pub async fn call<M, T>(
    name: &'static str,
    timeout: Duration,
    idempotent: bool,
    build: impl Fn(RpcReplyPort<T>) -> M,
) -> Result<T, CallError>
where
    M: Message,
    T: Send + 'static,
{
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(CallError::Unavailable(name));
        }
        if let Some(cell) = ractor::registry::where_is(name) {
            match ractor::rpc::call(&cell, &build, Some(remaining)).await {
                Ok(CallResult::Success(v)) => return Ok(v),
                Ok(CallResult::Timeout) => return Err(CallError::Timeout(name)),
                Ok(CallResult::SenderError) if !idempotent => return Err(CallError::Lost(name)),
                // Not delivered, or dropped unanswered by a dying actor: try the next incarnation.
                Ok(CallResult::SenderError) | Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(1).min(remaining)).await;
    }
}

/// A tokio listener on a clone of a listening socket bound once at start-up: a restarted
/// server actor accepts on the same socket, so clients never find the port closed.
pub fn accept_on(shared: &std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    let listener = shared.try_clone()?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// The state of a server actor: its serving task, aborted when the actor dies.
pub struct ServingState {
    _server: AbortOnDrop,
}

impl ServingState {
    pub fn new<T>(server: tokio::task::JoinHandle<T>) -> Self {
        Self {
            _server: server.into(),
        }
    }
}

/// Aborts a background task when dropped: actor state holds these so that a killed actor (whose
/// `post_stop` does not run) never leaves a timer or server task behind.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> From<tokio::task::JoinHandle<T>> for AbortOnDrop {
    fn from(h: tokio::task::JoinHandle<T>) -> Self {
        Self(h.abort_handle())
    }
}
