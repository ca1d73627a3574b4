//! Starting and stopping the whole agent: bind the listeners, build the metrics registry, spawn
//! the supervisor, and turn its end into a process exit code.
//!
//! Listeners are bound here, once, so a port conflict is a start-up error naming the address, and
//! restarted server actors keep accepting on the same sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use eyre::WrapErr;
use ractor::{Actor, ActorRef};
use tokio::sync::watch;

use crate::actors::supervisor::{ExitReason, Supervisor, SupervisorArgs};
use crate::actors::{Context, SUPERVISOR};
use crate::config::Config;
use crate::messages::SupervisorMsg;
use crate::metrics::Metrics;

/// Exit code when the supervisor gave up (restart intensity exceeded): EX_SOFTWARE.
pub const EXIT_ESCALATED: i32 = 70;
/// Exit code when the agent could not start (listener bind, actor start): EX_OSERR.
pub const EXIT_START_FAILED: i32 = 71;

/// A running agent.
pub struct Agent {
    /// The plaintext TCP gRPC listener, when `grpc.listen` is set.
    pub grpc_addr: Option<SocketAddr>,
    pub metrics_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    supervisor: ActorRef<SupervisorMsg>,
    exit: watch::Receiver<Option<ExitReason>>,
    grace: Duration,
}

fn bind(addr: SocketAddr, key: &str) -> eyre::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr).wrap_err_with(|| format!("{key}: cannot listen on {addr}"))
}

/// Starts the actor tree. Returns once every actor has started.
pub async fn start(config: Config) -> eyre::Result<Agent> {
    let config = Arc::new(config);
    let grpc_listener = match config.grpc.listen {
        Some(addr) => Some(bind(addr, "grpc.listen")?),
        None => None,
    };
    let metrics_listener = bind(config.metrics.listen, "metrics.listen")?;
    let grpc_addr = grpc_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let metrics = Arc::new(Metrics::new());
    let ctx = Arc::new(Context {
        config: config.clone(),
        metrics: metrics.clone(),
        grpc_listener: grpc_listener.map(Arc::new),
        metrics_listener: Arc::new(metrics_listener),
    });
    let (exit_tx, exit_rx) = watch::channel(None);
    let (supervisor, _join) = Actor::spawn(
        Some(SUPERVISOR.to_string()),
        Supervisor,
        SupervisorArgs { ctx, exit: exit_tx },
    )
    .await
    .map_err(|e| {
        let detail = exit_rx
            .borrow()
            .as_ref()
            .map(|r| format!("{r:?}"))
            .unwrap_or_default();
        eyre::eyre!("cannot start the actor tree: {e} {detail}")
    })?;
    tracing::info!(grpc = ?grpc_addr, metrics = %metrics_addr, "agent started");
    Ok(Agent {
        grpc_addr,
        metrics_addr,
        metrics,
        supervisor,
        exit: exit_rx,
        grace: config.supervisor.shutdown_grace,
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

    /// Ordered shutdown within the configured grace period.
    pub async fn shutdown(mut self) -> ExitReason {
        if let Some(r) = self.exit.borrow().clone() {
            return r;
        }
        let grace = self.grace + Duration::from_secs(1);
        let _ = self
            .supervisor
            .call(SupervisorMsg::Shutdown, Some(grace))
            .await;
        let _ = tokio::time::timeout(grace, self.wait()).await;
        ExitReason::Shutdown
    }
}

/// The process exit code for a supervisor exit reason.
pub fn exit_code(reason: &ExitReason) -> i32 {
    match reason {
        ExitReason::Shutdown => 0,
        ExitReason::RestartIntensityExceeded { .. } => EXIT_ESCALATED,
        ExitReason::StartFailed { .. } => EXIT_START_FAILED,
    }
}

/// Runs until SIGTERM/SIGINT (ordered shutdown, exit 0) or until the supervisor escalates
/// (non-zero). Returns the process exit code.
///
/// SIGHUP re-reads and validates the configuration (`config_path` as given on the command line)
/// and logs the verdict; this version applies configuration changes only at the next start, so
/// a SIGHUP never stops the agent and never swaps a half-valid configuration in.
pub async fn run(config: Config, config_path: Option<std::path::PathBuf>) -> i32 {
    use tokio::signal::unix::{signal, SignalKind};
    let mut agent = match start(config).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ocserv-agent: {e:#}");
            return EXIT_START_FAILED;
        }
    };
    let (mut term, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(h)) => (t, h),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("ocserv-agent: cannot install signal handlers: {e}");
            return EXIT_START_FAILED;
        }
    };
    let signalled = loop {
        tokio::select! {
            r = agent.wait() => break Err(r),
            _ = term.recv() => break Ok("SIGTERM"),
            _ = tokio::signal::ctrl_c() => break Ok("SIGINT"),
            _ = hup.recv() => match crate::config::load(config_path.as_deref()) {
                Ok(_) => tracing::info!(
                    "SIGHUP: configuration is valid; changes take effect at the next restart"
                ),
                Err(e) => tracing::error!("SIGHUP: {e}; keeping the running configuration"),
            },
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
