//! `OcservCtl`, the "occtl executor": the one place that talks to ocserv.
//!
//! Input: [`CtlMsg`] requests. Output: typed results from the configured backend (native control
//! socket or exec'd occtl). Each request runs in its own task, so a slow ocserv never blocks the
//! mailbox, behind the shared [`crate::gate::Gate`] (`ocserv.max_in_flight` calls at once,
//! `ocserv.max_queued` waiting; beyond that a call is refused with [`CtlError::Busy`] without
//! reaching ocserv, whose main loop is single-threaded). The gate lives in the shared context, so
//! the bound holds across restarts of this actor. Every backend call is bounded by
//! `ocserv.request_timeout` (read live: a SIGHUP change rebuilds the backend).
//!
//! Every outcome is counted (`ocserv_agent_ocserv_requests_total`, latency histogram); every
//! exchange sets `ocserv_up` (1 on success, 0 on any failure) and a success feeds readiness
//! ([`crate::health`]). Failures are answered to the caller; they never crash the actor.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::actors::Context;
use crate::config::{Config, OcservConfig};
use crate::messages::CtlMsg;
use crate::ocserv::native::NativeBackend;
use crate::ocserv::occtl::OcctlBackend;
use crate::ocserv::{Backend, BackendKind, CtlError, CtlResult, OcservBackend};

pub struct OcservCtl;

pub struct CtlState {
    ctx: Arc<Context>,
    backend: Backend,
    /// The configuration the backend was built from.
    built_from: Arc<Config>,
}

/// Builds the configured backend.
pub fn backend_from_config(config: &OcservConfig) -> Backend {
    match config.backend {
        BackendKind::Native => Backend::Native(NativeBackend::new(
            config.control_socket.clone(),
            config.request_timeout,
        )),
        BackendKind::Occtl => Backend::Occtl(OcctlBackend::new(
            config.occtl_path.clone(),
            config.control_socket.clone(),
            config.request_timeout,
        )),
    }
}

/// Whether a call was an exchange with ocserv, and whether it succeeded: `None` for calls that
/// never reached ocserv (refused by our own bound, or invalid arguments caught before sending).
pub fn exchange_outcome<T>(result: &CtlResult<T>) -> Option<bool> {
    match result {
        Ok(_) => Some(true),
        // ocserv answered, and its answer was "no".
        Err(CtlError::Refused { .. }) => Some(true),
        Err(CtlError::Busy(_) | CtlError::InvalidArgument { .. }) => None,
        Err(_) => Some(false),
    }
}

/// Runs one backend call in its own task behind the gate: measures it, records the outcome and
/// answers.
fn dispatch<T, F>(
    ctx: &Arc<Context>,
    command: &'static str,
    reply: RpcReplyPort<CtlResult<T>>,
    fut: F,
) where
    T: Send + 'static,
    F: Future<Output = CtlResult<T>> + Send + 'static,
{
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let wait = ctx.config().ocserv.request_timeout;
        let result = match ctx.ocserv_gate.enter(wait).await {
            Ok(permit) => {
                let r = fut.await;
                drop(permit);
                r
            }
            Err(refused) => Err(CtlError::Busy(refused)),
        };
        let m = &ctx.metrics;
        match exchange_outcome(&result) {
            Some(ok) => {
                m.observe_ocserv(command, ok, started.elapsed());
                m.set_ocserv_up(ok);
                if ok {
                    ctx.health.ocserv_answered();
                }
            }
            None => m.observe_ocserv_refused(command),
        }
        if let Err(e) = &result {
            tracing::debug!(command, error = %e, "ocserv request failed");
        }
        // The caller may have given up (timeout); nothing to do then.
        let _ = reply.send(result);
    });
}

impl Actor for OcservCtl {
    type Msg = CtlMsg;
    type State = CtlState;
    type Arguments = Arc<Context>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        ctx: Arc<Context>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let built_from = ctx.config();
        Ok(CtlState {
            backend: backend_from_config(&built_from.ocserv),
            built_from,
            ctx,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let live = state.ctx.config();
        if !Arc::ptr_eq(&live, &state.built_from) {
            if live.ocserv != state.built_from.ocserv {
                state.backend = backend_from_config(&live.ocserv);
            }
            state.built_from = live;
        }
        let b = state.backend.clone();
        let m = &state.ctx;
        match msg {
            CtlMsg::Status(r) => dispatch(m, "status", r, async move { b.status().await }),
            CtlMsg::List(r) => dispatch(m, "list", r, async move { b.list().await }),
            CtlMsg::UserInfo(u, r) => {
                dispatch(m, "user_info", r, async move { b.user_info(&u).await })
            }
            CtlMsg::IdInfo(id, r) => dispatch(m, "id_info", r, async move { b.id_info(id).await }),
            CtlMsg::DisconnectName(u, r) => dispatch(m, "disconnect_name", r, async move {
                b.disconnect_name(&u).await
            }),
            CtlMsg::TerminateUser(u, r) => {
                dispatch(
                    m,
                    "terminate_user",
                    r,
                    async move { b.terminate_user(&u).await },
                )
            }
            CtlMsg::DisconnectSession(k, r) => dispatch(m, "disconnect_session", r, async move {
                b.disconnect_session(&k).await
            }),
            CtlMsg::ListBanned(r) => {
                dispatch(m, "list_banned", r, async move { b.list_banned().await })
            }
            CtlMsg::UnbanIp(ip, r) => {
                dispatch(m, "unban_ip", r, async move { b.unban_ip(ip).await })
            }
            CtlMsg::Reload(r) => dispatch(m, "reload", r, async move { b.reload().await }),
            CtlMsg::ListCookies(r) => {
                dispatch(m, "list_cookies", r, async move { b.list_cookies().await })
            }
            CtlMsg::Crash => panic!("chaos: crash requested for {}", super::OCSERV_CTL),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exchanges_with_ocserv_move_ocserv_up() {
        assert_eq!(exchange_outcome(&Ok(())), Some(true));
        let refused: CtlResult<()> = Err(CtlError::Refused { command: "reload" });
        assert_eq!(exchange_outcome(&refused), Some(true), "ocserv answered");
        let e: CtlResult<()> = Err(CtlError::NoReply { command: "list" });
        assert_eq!(exchange_outcome(&e), Some(false));
        let e: CtlResult<()> = Err(CtlError::Protocol {
            command: "list",
            reason: "garbage".into(),
        });
        assert_eq!(exchange_outcome(&e), Some(false));
        let busy: CtlResult<()> = Err(CtlError::Busy(crate::gate::Refused::QueueFull {
            waiting: 1,
        }));
        assert_eq!(exchange_outcome(&busy), None, "never reached ocserv");
    }
}
