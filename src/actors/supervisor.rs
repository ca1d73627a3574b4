//! The root supervisor: starts every child by name, restarts any child that fails (panic or
//! error) **or** terminates (a `kill()` arrives as terminated), with jittered exponential backoff,
//! and escalates when restarts exceed the intensity limit (`supervisor.restart_intensity` restarts
//! within `supervisor.restart_window`): it stops every child in order and reports
//! [`ExitReason::RestartIntensityExceeded`], on which the process exits non-zero (and systemd
//! restarts it). No child holds a VPN session: restarting any of them never disconnects a client.
//!
//! The restart decision is the plain [`RestartPolicy`] (`crate::restart`); the actor only wires
//! events to it.

use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::watch;

use crate::actors::config_writer::ConfigWriter;
use crate::actors::grpc_front_door::GrpcFrontDoor;
use crate::actors::hook_listener::HookListener;
use crate::actors::metrics_server::MetricsServer;
use crate::actors::ocserv_ctl::OcservCtl;
use crate::actors::policy_cache::PolicyCache;
use crate::actors::portal_link::PortalLink;
use crate::actors::session_registry::SessionRegistry;
use crate::actors::state_store::StateStore;
use crate::actors::{Child, Context, ServerActor};
use crate::messages::SupervisorMsg;
use crate::restart::{Decision, RestartPolicy};

/// Why the supervisor stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// Asked to shut down (signal or API).
    Shutdown,
    /// Too many restarts in the window: the tree cannot heal itself.
    RestartIntensityExceeded { actor: &'static str },
    /// A child could not be started at all.
    StartFailed { actor: &'static str, error: String },
    /// An ordered shutdown did not finish within `supervisor.shutdown_grace`.
    ShutdownTimedOut,
}

pub struct Supervisor;

pub struct SupervisorArgs {
    pub ctx: Arc<Context>,
    pub exit: watch::Sender<Option<ExitReason>>,
}

pub struct SupervisorState {
    ctx: Arc<Context>,
    exit: watch::Sender<Option<ExitReason>>,
    policy: RestartPolicy,
    /// Restarts under way: a child's `pre_start` may wait on another child (the registry asks
    /// `OcservCtl` for the session list), so restarts run off the supervisor's mailbox.
    restarting: Vec<tokio::task::JoinHandle<()>>,
    stopping: bool,
}

/// Spawns `child` under its registered name, linked to the supervisor; returns once its
/// `pre_start` has finished.
async fn spawn_child(
    child: Child,
    ctx: &Arc<Context>,
    sup: ActorCell,
) -> Result<(), ractor::SpawnErr> {
    let name = Some(child.name().to_string());
    let c = ctx.clone();
    match child {
        Child::StateStore => drop(Actor::spawn_linked(name, StateStore, c, sup).await?),
        Child::OcservCtl => drop(Actor::spawn_linked(name, OcservCtl, c, sup).await?),
        Child::SessionRegistry => drop(Actor::spawn_linked(name, SessionRegistry, c, sup).await?),
        Child::PortalLink => drop(Actor::spawn_linked(name, PortalLink, c, sup).await?),
        Child::ConfigWriter => drop(Actor::spawn_linked(name, ConfigWriter, c, sup).await?),
        Child::MetricsServer => {
            drop(Actor::spawn_linked(name, ServerActor::<MetricsServer>::default(), c, sup).await?)
        }
        Child::GrpcFrontDoor => {
            drop(Actor::spawn_linked(name, ServerActor::<GrpcFrontDoor>::default(), c, sup).await?)
        }
        Child::PolicyCache => drop(Actor::spawn_linked(name, PolicyCache, c, sup).await?),
        Child::HookListener => {
            drop(Actor::spawn_linked(name, ServerActor::<HookListener>::default(), c, sup).await?)
        }
    }
    Ok(())
}

impl SupervisorState {
    /// Stops the children in reverse start order (front door first: it stops accepting and lets
    /// the calls in flight finish while the actors they need are still there), all within the
    /// shutdown grace. Returns false when something had to be killed at the deadline.
    async fn stop_children(&mut self) -> bool {
        self.stopping = true;
        let deadline = tokio::time::Instant::now() + self.ctx.config().supervisor.shutdown_grace;
        let mut clean = true;
        // Let restarts under way finish first, so no child appears after the stop.
        for task in self.restarting.drain(..) {
            clean &= tokio::time::timeout_at(deadline, task).await.is_ok();
        }
        for child in Child::ALL.iter().rev() {
            if let Some(cell) = ractor::registry::where_is(child.name()) {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if cell.stop_and_wait(None, Some(left)).await.is_err() {
                    tracing::warn!(actor = child.name(), "did not stop within grace; killing");
                    cell.kill();
                    clean = false;
                }
            }
        }
        clean
    }

    /// What to do after `child` stopped or failed to start: restart it after its backoff delay,
    /// or escalate when the restart intensity is exceeded.
    async fn after_stop(&mut self, myself: &ActorRef<SupervisorMsg>, child: Child) {
        match self.policy.on_stop(child, Instant::now()) {
            Decision::RestartAfter(delay) => {
                myself.send_after(delay, move || SupervisorMsg::Restart(child));
            }
            Decision::Escalate => {
                tracing::error!(
                    actor = child.name(),
                    intensity = self.ctx.config().supervisor.restart_intensity,
                    window = ?self.ctx.config().supervisor.restart_window,
                    "restart intensity exceeded; stopping the agent"
                );
                let reason = ExitReason::RestartIntensityExceeded {
                    actor: child.name(),
                };
                self.finish(myself, reason).await;
            }
        }
    }

    async fn finish(&mut self, myself: &ActorRef<SupervisorMsg>, reason: ExitReason) {
        let clean = self.stop_children().await
            && self
                .ctx
                .drained_in_time
                .load(std::sync::atomic::Ordering::Relaxed);
        let reason = match reason {
            ExitReason::Shutdown if !clean => ExitReason::ShutdownTimedOut,
            other => other,
        };
        self.exit.send_replace(Some(reason));
        myself.stop(None);
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let s = &args.ctx.config().supervisor;
        let mut state = SupervisorState {
            policy: RestartPolicy::new(s.backoff(), s.restart_intensity, s.restart_window),
            ctx: args.ctx,
            exit: args.exit,
            restarting: Vec::new(),
            stopping: false,
        };
        for child in Child::ALL {
            if let Err(e) = spawn_child(child, &state.ctx, myself.get_cell()).await {
                let reason = ExitReason::StartFailed {
                    actor: child.name(),
                    error: e.to_string(),
                };
                state.stop_children().await;
                state.exit.send_replace(Some(reason));
                return Err(format!("cannot start {}: {e}", child.name()).into());
            }
        }
        tracing::info!("all actors started");
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart(child) if !state.stopping => {
                let (ctx, me) = (state.ctx.clone(), myself.clone());
                state.restarting.retain(|t| !t.is_finished());
                state.restarting.push(tokio::spawn(async move {
                    let result = spawn_child(child, &ctx, me.get_cell())
                        .await
                        .map_err(|e| e.to_string());
                    let _ = me.send_message(SupervisorMsg::Restarted { child, result });
                }));
            }
            SupervisorMsg::Restart(_) => {}
            SupervisorMsg::Restarted { child, result } => match result {
                Ok(()) => {
                    tracing::info!(actor = child.name(), "actor restarted");
                    state.ctx.metrics.actor_restarted(child.name());
                }
                Err(e) if !state.stopping => {
                    tracing::error!(actor = child.name(), error = %e, "restart failed");
                    state.after_stop(&myself, child).await;
                }
                Err(_) => {}
            },
            SupervisorMsg::Shutdown(reply) => {
                tracing::info!("shutting down");
                state.finish(&myself, ExitReason::Shutdown).await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                format!("terminated: {}", reason.as_deref().unwrap_or("killed")),
            ),
            _ => return Ok(()),
        };
        let Some(child) = cell.get_name().as_deref().and_then(Child::from_name) else {
            return Ok(());
        };
        if state.stopping {
            return Ok(());
        }
        tracing::warn!(actor = child.name(), %why, "actor stopped");
        state.after_stop(&myself, child).await;
        Ok(())
    }
}
