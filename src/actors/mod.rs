//! The actor tree (DESIGN §2): one actor per file, wired by [`supervisor::Supervisor`].
//!
//! Callers find an actor by its registered name at call time, because a restarted actor has a new
//! `ActorRef`; [`call`] does the lookup, retries while the actor is being restarted, and bounds the
//! whole call with a timeout.

pub mod config_writer;
pub mod grpc_front_door;
pub mod hook_listener;
pub mod metrics_server;
pub mod ocserv_ctl;
pub mod policy_cache;
pub mod portal_link;
pub mod session_registry;
pub mod state_store;
pub mod supervisor;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::{ActorProcessingErr, ActorRef, Message, RpcReplyPort};

use crate::config::Config;
use crate::gate::Gate;
use crate::health::Health;
use crate::messages::ServerMsg;
use crate::metrics::Metrics;
use crate::policy::cache::PolicyStore;
use crate::policy::local::LocalPolicy;
use crate::serve::Endpoint;

pub use crate::tree::{
    Child, CONFIG_WRITER, GRPC_FRONT_DOOR, HOOK_LISTENER, METRICS_SERVER, OCSERV_CTL, POLICY_CACHE,
    PORTAL_LINK, SESSION_REGISTRY, STATE_STORE, SUPERVISOR,
};

impl Child {
    /// Chaos hook, reachable only from inside the process: stops the running actor with
    /// `kill()` (the supervisor sees `ActorTerminated`) or makes its handler panic through its
    /// `Crash` message (`ActorFailed`). Returns the struck incarnation's id, or `None` when the
    /// actor is not running.
    pub fn strike(self, panic: bool) -> Option<ractor::ActorId> {
        use crate::messages::{
            CtlMsg, PolicyMsg, PortalMsg, RegistryMsg, ServerMsg, StoreMsg, WriterMsg,
        };
        let cell = ractor::registry::where_is(self.name())?;
        if !panic {
            cell.kill();
        } else {
            let delivered = match self {
                Child::StateStore => cell.send_message(StoreMsg::Crash).is_ok(),
                Child::OcservCtl => cell.send_message(CtlMsg::Crash).is_ok(),
                Child::SessionRegistry => cell.send_message(RegistryMsg::Crash).is_ok(),
                Child::ConfigWriter => cell.send_message(WriterMsg::Crash).is_ok(),
                Child::PolicyCache => cell.send_message(PolicyMsg::Crash).is_ok(),
                Child::PortalLink => cell.send_message(PortalMsg::Crash).is_ok(),
                Child::MetricsServer | Child::GrpcFrontDoor | Child::HookListener => {
                    cell.send_message(ServerMsg::Crash).is_ok()
                }
            };
            if !delivered {
                return None;
            }
        }
        Some(cell.get_id())
    }
}

/// The listeners, bound once at start-up.
pub struct Endpoints {
    /// The gRPC Unix socket, then the TCP address when configured.
    pub grpc: Vec<Arc<Endpoint>>,
    pub metrics: Arc<Endpoint>,
    pub hook: Arc<Endpoint>,
}

/// What every actor is started with: configuration, and everything that must outlive an actor's
/// restart (metrics, readiness record, the gates that bound work in flight, the listeners bound
/// once at start-up so clients never find a socket closed).
pub struct Context {
    config: RwLock<Arc<Config>>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Calls to ocserv in flight (`ocserv.max_in_flight`, `ocserv.max_queued`).
    pub ocserv_gate: Gate,
    /// `agent.v1` requests in flight (`grpc.max_concurrent_requests`).
    pub grpc_gate: Gate,
    /// Memory of large replies being built and sent, in KiB ([`crate::grpc::REPLY_BUDGET_KIB`]).
    pub reply_gate: Gate,
    /// Sessions being disconnected right now, so concurrent kicks of one session count once.
    pub kicks: crate::grpc::Kicks,
    /// The gRPC listeners: the Unix socket, then the TCP address when configured.
    pub grpc_endpoints: Vec<Arc<Endpoint>>,
    pub metrics_endpoint: Arc<Endpoint>,
    /// The hook socket (`hook.socket`).
    pub hook_endpoint: Arc<Endpoint>,
    /// Cached connect decisions, outside the `PolicyCache` actor so they survive its restarts;
    /// the portal's decisions are also kept in the durable store (loaded at start).
    policy_store: Mutex<PolicyStore>,
    /// The durable store, opened at start; the `StateStore` actor writes to it.
    pub store: crate::store::Store,
    /// What the portal link keeps across its restarts: the circuit breaker (an open breaker
    /// stays open) and the bound on portal calls in flight.
    pub portal: portal_link::PortalShared,
    /// Cleared when a server could not drain its connections within the shutdown grace, so an
    /// ordered shutdown that cut calls short reports a failure.
    pub drained_in_time: AtomicBool,
    /// The local policy in force (loaded at start from `local_policy.path`, replaced on SIGHUP)
    /// and the one it replaced: kept here so a restarted `ConfigWriter` re-syncs its files.
    local_policy: RwLock<LocalPolicies>,
    /// One lock per config directory, held by each write: writes to one directory never
    /// overlap, not even a write of a crashed `ConfigWriter` with one of its successor.
    pub config_dir_locks: config_writer::DirLocks,
}

/// The local policy in force and the one it replaced (see [`Context::local_policy`]).
struct LocalPolicies {
    current: Arc<LocalPolicy>,
    previous: Option<Arc<LocalPolicy>>,
}

impl Context {
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        endpoints: Endpoints,
        local_policy: LocalPolicy,
        store: crate::store::Store,
    ) -> Self {
        let c = &config;
        Self {
            store,
            policy_store: Mutex::new(PolicyStore::new(c.policy.capacity)),
            hook_endpoint: endpoints.hook,
            health: Arc::new(Health::new(c.ocserv.reconcile_interval)),
            ocserv_gate: Gate::new(c.ocserv.max_in_flight as u32, c.ocserv.max_queued),
            grpc_gate: Gate::new(
                c.grpc.max_concurrent_requests as u32,
                c.grpc.max_concurrent_requests,
            ),
            reply_gate: Gate::new(
                crate::grpc::REPLY_BUDGET_KIB,
                c.grpc.max_concurrent_requests,
            ),
            kicks: Default::default(),
            portal: Default::default(),
            config: RwLock::new(Arc::new(config)),
            metrics,
            grpc_endpoints: endpoints.grpc,
            metrics_endpoint: endpoints.metrics,
            drained_in_time: AtomicBool::new(true),
            local_policy: RwLock::new(LocalPolicies {
                current: Arc::new(local_policy),
                previous: None,
            }),
            config_dir_locks: Default::default(),
        }
    }

    /// The local policy in force.
    pub fn local_policy(&self) -> Arc<LocalPolicy> {
        self.local_policy
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .current
            .clone()
    }

    /// The local policy the one in force replaced (on the last SIGHUP that changed it), if any.
    pub fn previous_local_policy(&self) -> Option<Arc<LocalPolicy>> {
        self.local_policy
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .previous
            .clone()
    }

    /// Swaps in a new, validated local policy (on SIGHUP).
    pub fn set_local_policy(&self, policy: Arc<LocalPolicy>) {
        let mut p = self
            .local_policy
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = std::mem::replace(&mut p.current, policy);
        p.previous = Some(old);
    }

    /// The configuration in force (values that SIGHUP may change are read through here).
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The cached connect decisions (lock briefly; never across an await).
    pub fn policy_store(&self) -> std::sync::MutexGuard<'_, PolicyStore> {
        self.policy_store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Swaps in a new configuration (after validation, on SIGHUP).
    pub fn reconfigure(&self, config: Config) {
        self.health
            .set_reconcile_interval(config.ocserv.reconcile_interval);
        *self
            .config
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(config);
    }
}

pub use crate::messages::CallError;

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

/// What makes one server actor differ from another: its registered name and what it serves.
/// The actor itself, [`ServerActor`], is written once.
pub trait Serves: Send + Sync + 'static {
    /// The registered name (one of [`crate::tree`]'s).
    const NAME: &'static str;

    /// Starts serving (in `pre_start`): builds the connection handler and calls [`serve_on`].
    fn start(
        myself: &ActorRef<ServerMsg>,
        ctx: &Arc<Context>,
    ) -> Result<ServingState, ActorProcessingErr>;
}

/// The one server actor: serves what `S` says; fails when a serving task ends (so it is
/// restarted), panics on `Crash`, drains its endpoints when stopped.
pub struct ServerActor<S>(std::marker::PhantomData<fn() -> S>);

impl<S> Default for ServerActor<S> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<S: Serves> ractor::Actor for ServerActor<S> {
    type Msg = ServerMsg;
    type State = ServingState;
    type Arguments = Arc<Context>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: Arc<Context>,
    ) -> Result<Self::State, ActorProcessingErr> {
        S::start(&myself, &ctx)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        server_handle(S::NAME, msg, state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        server_drain(S::NAME, state).await;
        Ok(())
    }
}

/// The state of a server actor: its serving tasks (aborted when the actor dies, while the
/// connections they accepted go on) and the endpoints they serve.
pub struct ServingState {
    pub ctx: Arc<Context>,
    endpoints: Vec<Arc<Endpoint>>,
    _tasks: Vec<AbortOnDrop>,
}

/// A background task a server actor runs beside its listeners (e.g. health following
/// readiness), named for the log; it is expected to run as long as the actor.
pub type Companion = (
    &'static str,
    std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
);

/// Starts serving each endpoint's connections with `service`, and the `companions` beside them. When any of these
/// tasks ends, the actor is told ([`ServerMsg::Ended`]) and, unless it is draining, fails so the
/// supervisor restarts it: nothing stops serving while its actor looks alive.
pub fn serve_on<H: crate::serve::Handler>(
    myself: &ActorRef<ServerMsg>,
    ctx: &Arc<Context>,
    endpoints: Vec<Arc<Endpoint>>,
    service: H,
    companions: Vec<Companion>,
) -> ServingState {
    let mut tasks: Vec<AbortOnDrop> = companions
        .into_iter()
        .map(|(listener, task)| {
            let me = myself.clone();
            tokio::spawn(async move {
                task.await;
                let error = Some("background task ended".to_owned());
                let _ = me.send_message(ServerMsg::Ended { listener, error });
            })
            .into()
        })
        .collect();
    for ep in &endpoints {
        let (ep, me, svc) = (ep.clone(), myself.clone(), service.clone());
        let (metrics, health) = (ctx.metrics.clone(), ctx.health.clone());
        tasks.push(
            tokio::spawn(async move {
                let listener = ep.label;
                let r = ep.serve(svc, metrics, health).await;
                let _ = me.send_message(ServerMsg::Ended {
                    listener,
                    error: r.err().map(|e| e.to_string()),
                });
            })
            .into(),
        );
    }
    ServingState {
        ctx: ctx.clone(),
        endpoints,
        _tasks: tasks,
    }
}

/// The message handler every server actor shares.
fn server_handle(
    actor: &'static str,
    msg: ServerMsg,
    state: &ServingState,
) -> Result<(), ActorProcessingErr> {
    match msg {
        ServerMsg::Crash => panic!("chaos: crash requested for {actor}"),
        ServerMsg::Ended { listener, error } => {
            if state.endpoints.iter().any(|e| e.is_draining()) {
                return Ok(());
            }
            let why = error.unwrap_or_else(|| "stopped accepting".into());
            tracing::error!(actor, listener, error = %why, "server task ended; failing so it is restarted");
            Err(format!("{listener}: server task ended: {why}").into())
        }
    }
}

/// Orderly stop of a server actor: drain its endpoints within the shutdown grace.
async fn server_drain(actor: &'static str, state: &ServingState) {
    let grace = state.ctx.config().supervisor.shutdown_grace;
    for ep in &state.endpoints {
        if !ep.drain(grace).await {
            state.ctx.drained_in_time.store(false, Ordering::Relaxed);
            tracing::warn!(
                actor,
                listener = ep.label,
                open = ep.connections(),
                "connections still open at the end of the shutdown grace"
            );
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
