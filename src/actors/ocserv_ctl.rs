//! `OcservCtl`, the "occtl executor": the one place that talks to ocserv.
//!
//! Input: [`CtlMsg`] requests. Output: typed results from the configured backend (native control
//! socket or exec'd occtl). Each request runs in its own task, so a slow ocserv never blocks the
//! mailbox; every backend call is bounded by `ocserv.request_timeout`. Every outcome is counted
//! (`ocserv_agent_ocserv_requests_total`, latency histogram) and updates `ocserv_up`, which
//! `/readyz` reports. Failures are answered to the caller; they never crash the actor.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::actors::Context;
use crate::messages::CtlMsg;
use crate::metrics::Metrics;
use crate::ocserv::native::NativeBackend;
use crate::ocserv::occtl::OcctlBackend;
use crate::ocserv::{Backend, BackendKind, CtlError, CtlResult, OcservBackend};

pub struct OcservCtl;

pub struct CtlState {
    backend: Backend,
    metrics: Arc<Metrics>,
}

/// Builds the configured backend.
pub fn backend_from_config(config: &crate::config::OcservConfig) -> Backend {
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

/// Runs one backend call in its own task: measures it, records the outcome and answers.
fn dispatch<T, F>(
    metrics: &Arc<Metrics>,
    command: &'static str,
    reply: RpcReplyPort<CtlResult<T>>,
    fut: F,
) where
    T: Send + 'static,
    F: Future<Output = CtlResult<T>> + Send + 'static,
{
    let metrics = metrics.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let result = fut.await;
        metrics.observe_ocserv(command, result.is_ok(), started.elapsed());
        match &result {
            Ok(_) => metrics.set_ocserv_up(true),
            Err(e) if e.is_unreachable() => metrics.set_ocserv_up(false),
            Err(CtlError::OcctlMissing { .. }) => metrics.set_ocserv_up(false),
            Err(_) => {}
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
        Ok(CtlState {
            backend: backend_from_config(&ctx.config.ocserv),
            metrics: ctx.metrics.clone(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let b = state.backend.clone();
        let m = &state.metrics;
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
            CtlMsg::DisconnectId(id, r) => {
                dispatch(
                    m,
                    "disconnect_id",
                    r,
                    async move { b.disconnect_id(id).await },
                )
            }
            CtlMsg::TerminateUser(u, r) => {
                dispatch(
                    m,
                    "terminate_user",
                    r,
                    async move { b.terminate_user(&u).await },
                )
            }
            CtlMsg::TerminateId(id, r) => {
                dispatch(
                    m,
                    "terminate_id",
                    r,
                    async move { b.terminate_id(id).await },
                )
            }
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
