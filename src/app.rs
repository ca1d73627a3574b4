//! Starting and stopping the whole agent: raise the descriptor limit, bind the listeners, build
//! the shared context, spawn the supervisor, handle signals, and turn its end into a process exit
//! code.
//!
//! Listeners are bound here, once, so a port conflict is a start-up error naming the key, and
//! restarted server actors keep accepting on the same sockets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ractor::{Actor, ActorRef};
use tokio::sync::watch;

use crate::actors::supervisor::{ExitReason, Supervisor, SupervisorArgs};
use crate::actors::{Context, Endpoints, CONFIG_WRITER, SUPERVISOR};
use crate::config::{Changes, Config};
use crate::messages::{SupervisorMsg, WriterMsg};
use crate::metrics::Metrics;
use crate::policy::cache::Entry;
use crate::policy::local::LocalPolicy;
use crate::serve::{Endpoint, Limits, Listener};
use crate::store::{Store, StoreError};

/// Exit code when the supervisor gave up (restart intensity exceeded): EX_SOFTWARE.
pub const EXIT_ESCALATED: i32 = 70;
/// Exit code when the agent could not start (listener bind, actor start): EX_OSERR.
pub const EXIT_START_FAILED: i32 = 71;
/// Exit code when an ordered shutdown did not finish within `supervisor.shutdown_grace`:
/// EX_TEMPFAIL.
pub const EXIT_SHUTDOWN_TIMEOUT: i32 = 75;

/// Changes the log level of the running process (SIGHUP); an error says why it could not.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send>;

/// A running agent.
pub struct Agent {
    /// The gRPC control socket.
    pub grpc_socket: PathBuf,
    /// The plaintext TCP gRPC address, when configured (`grpc.listen` with `insecure`).
    pub grpc_addr: Option<SocketAddr>,
    pub metrics_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub ctx: Arc<Context>,
    supervisor: ActorRef<SupervisorMsg>,
    /// The supervisor's task: awaited on shutdown, so its name is free again once it returns.
    supervisor_done: Option<tokio::task::JoinHandle<()>>,
    exit: watch::Receiver<Option<ExitReason>>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (logged), so that descriptors run out as late
/// as the operator allows. Returns (soft before, soft after, hard).
pub fn raise_nofile_limit() -> Option<(u64, u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some((soft, hard, hard));
    }
    Some((soft, soft, hard))
}

/// Binds every listener of `config`: the gRPC Unix socket, the optional TCP address, metrics.
fn endpoints(config: &Config) -> eyre::Result<Endpoints> {
    let g = &config.grpc;
    let grpc_limits = Limits {
        max_connections: g.max_connections,
        idle_timeout: g.idle_timeout,
        read_timeout: g.read_timeout,
    };
    let mut grpc = vec![Arc::new(Endpoint::new(
        "grpc_socket",
        Listener::unix(&g.socket, g.allowed_uids.clone(), "grpc.socket")?,
        grpc_limits,
    ))];
    if let Some(addr) = g.listen {
        tracing::warn!(
            listen = %addr,
            "plaintext gRPC on TCP (grpc.insecure = true): any local user can reach it; \
             prefer the control socket"
        );
        grpc.push(Arc::new(Endpoint::new(
            "grpc_tcp",
            Listener::tcp(addr, "grpc.listen")?,
            grpc_limits,
        )));
    }
    let m = &config.metrics;
    let metrics = Arc::new(Endpoint::new(
        "metrics",
        Listener::tcp(m.listen, "metrics.listen")?,
        Limits {
            max_connections: m.max_connections,
            idle_timeout: m.idle_timeout,
            read_timeout: m.header_timeout,
        },
    ));
    let h = &config.hook;
    let hook = Arc::new(Endpoint::new(
        "hook",
        Listener::unix(&h.socket, h.allowed_uids.clone(), "hook.socket")?,
        Limits {
            max_connections: h.max_connections,
            // One request per connection, answered within the request timeout.
            idle_timeout: h.request_timeout,
            read_timeout: h.request_timeout,
        },
    ));
    Ok(Endpoints {
        grpc,
        metrics,
        hook,
    })
}

/// The local policy of `config`: the file of `local_policy.path`, or "admit everyone that ocserv
/// authenticated" without one (said in the log).
pub fn local_policy(config: &Config) -> eyre::Result<LocalPolicy> {
    match &config.local_policy.path {
        Some(path) => {
            crate::policy::local::load(path).map_err(|e| eyre::eyre!("local_policy.path: {e}"))
        }
        None => {
            if config.policy.source == crate::config::PolicySource::Local {
                tracing::info!("{}", config.local_policy.describe());
            }
            Ok(LocalPolicy::admit_all())
        }
    }
}

/// Starts the actor tree with the local policy of `config`. Returns once every actor has
/// started.
pub async fn start(config: Config) -> eyre::Result<Agent> {
    let local = local_policy(&config)?;
    let store = open_store(&config).await?;
    start_with(config, local, store).await
}

/// Opens the durable store of `agent.state_dir` (off the async workers).
pub async fn open_store(config: &Config) -> Result<Store, StoreError> {
    let dir = config.agent.state_dir.clone();
    tokio::task::spawn_blocking(move || Store::open(&dir))
        .await
        .unwrap_or_else(|e| {
            Err(StoreError::Open {
                path: Store::path_in(&config.agent.state_dir),
                reason: e.to_string(),
            })
        })
}

/// Puts the portal decisions kept in the store back into the policy cache, each with its age
/// (and publishes the outbox's depth):
/// a decision fresh before the restart is fresh for the rest of its lifetime, one past it serves
/// only as a stale answer while the portal fails, one past `policy.stale_for` is dropped.
fn restore_decisions(ctx: &Context) -> Result<(), StoreError> {
    let cfg = ctx.config();
    let lifetimes = cfg.policy.lifetimes();
    let usable = |d: &crate::policy::Decision, age: Duration| age < lifetimes.usable_for(d);
    let loaded = ctx
        .store
        .load_decisions(SystemTime::now(), cfg.policy.capacity, usable)?;
    let (now, wall) = (Instant::now(), SystemTime::now());
    let mut cache = ctx.policy_store();
    let mut restored = 0usize;
    // Oldest first, so the newest end up the most recently used.
    for kept in loaded.decisions.into_iter().rev() {
        let age = wall.duration_since(kept.fetched_at).unwrap_or_default();
        if let Some(fetched_at) = now.checked_sub(age) {
            let entry = Entry {
                decision: kept.decision,
                should_disconnect: kept.should_disconnect,
                fetched_at,
            };
            cache.insert(&kept.username, &kept.groupname, entry);
            restored += 1;
        }
    }
    ctx.metrics
        .cache_size
        .set(i64::try_from(cache.len()).unwrap_or(i64::MAX));
    tracing::info!(restored, dropped = loaded.dropped, store = %ctx.store.path().display(),
        "policy decisions restored from the state store");
    let depth = ctx.store.outbox_depth()?;
    ctx.metrics
        .outbox_depth
        .set(i64::try_from(depth).unwrap_or(i64::MAX));
    if depth > 0 {
        tracing::info!(
            depth,
            "events from before the start wait in the outbox for the portal"
        );
    }
    Ok(())
}

/// [`start`] with the local policy loaded and the store open.
pub async fn start_with(config: Config, local: LocalPolicy, store: Store) -> eyre::Result<Agent> {
    let endpoints = endpoints(&config)?;
    let grpc_socket = config.grpc.socket.clone();
    let hook_socket = config.hook.socket.clone();
    let grpc_addr = endpoints.grpc.iter().find_map(|e| e.listener.local_addr());
    let metrics_addr = endpoints
        .metrics
        .listener
        .local_addr()
        .ok_or_else(|| eyre::eyre!("metrics.listen: no local address"))?;
    let metrics = Arc::new(Metrics::new());
    let ctx = Arc::new(Context::new(
        config,
        metrics.clone(),
        endpoints,
        local,
        store,
    ));
    {
        let ctx = ctx.clone();
        tokio::task::spawn_blocking(move || restore_decisions(&ctx))
            .await
            .map_err(|e| eyre::eyre!("restoring policy decisions: {e}"))??;
    }
    let (exit_tx, exit_rx) = watch::channel(None);
    let started = Actor::spawn(
        Some(SUPERVISOR.to_string()),
        Supervisor,
        SupervisorArgs {
            ctx: ctx.clone(),
            exit: exit_tx,
        },
    )
    .await;
    let (supervisor, join) = match started {
        Ok(s) => s,
        Err(e) => {
            let detail = exit_rx
                .borrow()
                .as_ref()
                .map(|r| format!("{r:?}"))
                .unwrap_or_default();
            let _ = std::fs::remove_file(&grpc_socket);
            let _ = std::fs::remove_file(&hook_socket);
            return Err(eyre::eyre!("cannot start the actor tree: {e} {detail}"));
        }
    };
    tracing::info!(
        socket = %grpc_socket.display(),
        grpc_tcp = ?grpc_addr,
        metrics = %metrics_addr,
        "agent started"
    );
    Ok(Agent {
        grpc_socket,
        grpc_addr,
        metrics_addr,
        metrics,
        ctx,
        supervisor,
        supervisor_done: Some(join),
        exit: exit_rx,
    })
}

impl Agent {
    /// Waits until the supervisor stops on its own (escalation) and says why.
    pub async fn wait(&mut self) -> ExitReason {
        match self.exit.wait_for(Option::is_some).await {
            Ok(r) => r.clone().unwrap_or(ExitReason::Shutdown),
            // The supervisor is gone without a word: treat as a failed tree.
            Err(_) => ExitReason::RestartIntensityExceeded { actor: SUPERVISOR },
        }
    }

    /// Ordered shutdown: the front door drains (GOAWAY, calls in flight finish), then every other
    /// actor stops, all within `supervisor.shutdown_grace`; past it, the reason says so.
    pub async fn shutdown(mut self) -> ExitReason {
        if let Some(r) = self.exit.borrow().clone() {
            return r;
        }
        let grace = self.ctx.config().supervisor.shutdown_grace;
        let bound = grace + Duration::from_secs(1);
        let _ = self
            .supervisor
            .call(SupervisorMsg::Shutdown, Some(bound))
            .await;
        let reason = match tokio::time::timeout(bound, self.wait()).await {
            Ok(r) => r,
            Err(_) => return ExitReason::ShutdownTimedOut,
        };
        if let Some(done) = self.supervisor_done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), done).await;
        }
        reason
    }
}

/// The process exit code for a supervisor exit reason.
pub fn exit_code(reason: &ExitReason) -> i32 {
    match reason {
        ExitReason::Shutdown => 0,
        ExitReason::RestartIntensityExceeded { .. } => EXIT_ESCALATED,
        ExitReason::StartFailed { .. } => EXIT_START_FAILED,
        ExitReason::ShutdownTimedOut => EXIT_SHUTDOWN_TIMEOUT,
    }
}

/// Runs until SIGTERM/SIGINT (ordered shutdown, exit 0) or until the supervisor escalates
/// (non-zero). Returns the process exit code.
///
/// Signal handlers are installed before anything that can wait (the first ocserv call), so a
/// signal during start-up is handled once the start is done, never fatal. SIGHUP re-reads the
/// configuration (`config_path` as given on the command line) on a blocking thread; see
/// [`reload`].
pub async fn run(config: Config, config_path: Option<PathBuf>, set_log_level: SetLogLevel) -> i32 {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            eprintln!("ocserv-agent: cannot install signal handlers: {e}");
            return EXIT_START_FAILED;
        }
    };
    if let Some((before, after, hard)) = raise_nofile_limit() {
        tracing::info!(soft_before = before, soft = after, hard, "open file limit");
    }
    // An invalid policy file is a configuration error (exit 64), like an invalid config file.
    let local = match local_policy(&config) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ocserv-agent: {e:#}");
            return crate::config::EXIT_CONFIG;
        }
    };
    // A store that cannot be opened stops the start with its own exit code: never an empty one.
    let store = match open_store(&config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("ocserv-agent: {e}");
            return crate::store::EXIT_STORE;
        }
    };
    let mut agent = match start_with(config, local, store).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ocserv-agent: {e:#}");
            return EXIT_START_FAILED;
        }
    };
    let signalled = loop {
        tokio::select! {
            r = agent.wait() => break Err(r),
            _ = term.recv() => break Ok("SIGTERM"),
            _ = int.recv() => break Ok("SIGINT"),
            _ = hup.recv() => {
                let path = config_path.clone();
                let load = move || crate::config::load(path.as_deref());
                let _ = reload(&agent.ctx, load, &*set_log_level).await;
            }
        }
    };
    let reason = match signalled {
        Err(r) => r,
        Ok(signal) => {
            tracing::info!(signal, "shutting down on signal");
            agent.shutdown().await
        }
    };
    if reason != ExitReason::Shutdown {
        tracing::error!(?reason, "agent stopped");
        eprintln!("ocserv-agent: stopped: {reason:?}");
    }
    exit_code(&reason)
}

/// SIGHUP: re-reads and validates the configuration with `load`, off the async workers. An
/// invalid one is logged and the running one kept (`Err` with the reason). Of a valid one, the
/// [`crate::config::LIVE_KEYS`] are applied at once and every other changed key keeps its running
/// value and is named as needing a restart; the returned [`Changes`] says which is which.
///
/// Then, whatever became of the configuration, the local policy file is re-read
/// ([`reload_local_policy`]); its outcome is logged and counted, not returned.
pub async fn reload<L>(
    ctx: &Context,
    load: L,
    set_log_level: &(dyn Fn(&str) -> Result<(), String> + Send),
) -> Result<Changes, String>
where
    L: FnOnce() -> Result<crate::config::Loaded, crate::config::ConfigError> + Send + 'static,
{
    let result = reload_config(ctx, load, set_log_level).await;
    let _ = reload_local_policy(ctx).await;
    result
}

/// SIGHUP, second half: re-reads the local policy file named by the running configuration
/// (`local_policy.path`, a live key; not set: everyone is admitted), off the async workers.
/// A valid policy replaces the one in force and `ConfigWriter` is told to sync its per-user
/// and per-group files; an invalid one is logged, the running policy kept, and `Err` says why.
/// Either way `ocserv_agent_local_policy_reloads_total{status}` counts it.
pub async fn reload_local_policy(ctx: &Context) -> Result<Arc<LocalPolicy>, String> {
    let path = ctx.config().local_policy.path.clone();
    let read = tokio::task::spawn_blocking(move || match path {
        Some(p) => crate::policy::local::load(&p).map_err(|e| e.to_string()),
        None => Ok(LocalPolicy::admit_all()),
    })
    .await
    .unwrap_or_else(|e| Err(format!("reading the local policy: {e}")));
    let policy = match read {
        Ok(p) => Arc::new(p),
        Err(e) => {
            ctx.metrics.local_policy_reload(false);
            tracing::error!("SIGHUP: {e}; keeping the running local policy");
            return Err(e);
        }
    };
    ctx.metrics.local_policy_reload(true);
    ctx.set_local_policy(policy.clone());
    tracing::info!(
        users = policy.users().len(),
        groups = policy.groups().len(),
        "SIGHUP: local policy reloaded"
    );
    // Not running (restarting): its next incarnation syncs the policy now in force.
    if let Some(writer) = ractor::registry::where_is(CONFIG_WRITER) {
        let _ = writer.send_message(WriterMsg::SyncLocalPolicy(policy.clone()));
    }
    Ok(policy)
}

async fn reload_config<L>(
    ctx: &Context,
    load: L,
    set_log_level: &(dyn Fn(&str) -> Result<(), String> + Send),
) -> Result<Changes, String>
where
    L: FnOnce() -> Result<crate::config::Loaded, crate::config::ConfigError> + Send + 'static,
{
    let new = match tokio::task::spawn_blocking(load).await {
        Ok(Ok(l)) => l.config,
        Ok(Err(e)) => {
            tracing::error!("SIGHUP: {e}; keeping the running configuration");
            return Err(e.to_string());
        }
        Err(e) => {
            tracing::error!("SIGHUP: reading the configuration failed: {e}");
            return Err(e.to_string());
        }
    };
    let old = ctx.config();
    let changes = crate::config::live_changes(&old, &new);
    if changes.applied.is_empty() && changes.need_restart.is_empty() {
        tracing::info!("SIGHUP: configuration unchanged");
        return Ok(changes);
    }
    if changes.applied.iter().any(|k| k == "log.level") {
        if let Err(e) = set_log_level(&new.log.level) {
            tracing::error!("SIGHUP: cannot apply log.level: {e}");
        }
    }
    ctx.reconfigure(crate::config::with_live_keys(&old, &new));
    tracing::info!(
        applied = ?changes.applied,
        need_restart = ?changes.need_restart,
        "SIGHUP: configuration reloaded"
    );
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(&ExitReason::Shutdown), 0);
        assert_eq!(
            exit_code(&ExitReason::RestartIntensityExceeded { actor: "x" }),
            EXIT_ESCALATED
        );
        assert_ne!(
            exit_code(&ExitReason::StartFailed {
                actor: "x",
                error: String::new()
            }),
            0
        );
    }
}
