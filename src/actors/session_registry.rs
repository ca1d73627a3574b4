//! `SessionRegistry`: the agent's view of ocserv's live sessions.
//!
//! Inputs: [`RegistryMsg`] queries, a periodic tick every `ocserv.reconcile_interval`, and
//! `Forget` notices after the agent disconnected sessions. It reconciles by asking `OcservCtl` for
//! the session list in a background task and applying the answer with
//! [`SessionTable::reconcile`], so queries are never stuck behind a slow ocserv.
//!
//! Restart: the table is not kept across a crash; `pre_start` rebuilds it with one reconcile
//! against ocserv (the source of truth) before the first query is answered. Until the registry
//! has once agreed with ocserv, views are marked `synced = false`. A failed reconcile keeps the
//! last known table (sessions are not declared closed because ocserv did not answer).

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::actors::{call, AbortOnDrop, Context, OCSERV_CTL};
use crate::messages::{CtlMsg, ReconcileReport, RegistryMsg, SessionsView};
use crate::ocserv::Session;
use crate::registry::{ReconcileDiff, SessionTable};

pub struct SessionRegistry;

type Waiter = RpcReplyPort<Result<ReconcileReport, String>>;

pub struct RegistryState {
    ctx: Arc<Context>,
    table: SessionTable,
    synced: bool,
    last_error: Option<String>,
    /// A fetch is under way; reconcile requests that arrive meanwhile wait for the next one.
    in_flight: bool,
    pending: Vec<Waiter>,
    _ticker: AbortOnDrop,
}

/// Asks ocserv for the status figures and the session list.
async fn fetch(ctx: &Context) -> Result<Vec<Session>, String> {
    let timeout = ctx.config.ocserv.request_timeout + ctx.config.supervisor.call_timeout;
    // Status feeds the ocserv_* gauges; its failure alone does not fail the reconcile.
    if let Ok(Ok(status)) = call(OCSERV_CTL, timeout, true, CtlMsg::Status).await {
        ctx.metrics.set_ocserv_status(&status);
    }
    match call(OCSERV_CTL, timeout, true, CtlMsg::List).await {
        Ok(Ok(list)) => Ok(list),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

impl RegistryState {
    fn apply(&mut self, result: Result<Vec<Session>, String>) -> Result<ReconcileReport, String> {
        let sessions = match result {
            Ok(s) => s,
            Err(e) => {
                self.last_error = Some(e.clone());
                return Err(e);
            }
        };
        self.last_error = None;
        let ReconcileDiff { opened, closed, .. } = self.table.reconcile(sessions);
        self.synced = true;
        for s in &closed {
            tracing::info!(id = s.id, "session closed");
        }
        for id in &opened {
            tracing::info!(id, "session opened");
        }
        self.ctx
            .metrics
            .active_sessions
            .set(self.table.connected() as i64);
        Ok(ReconcileReport {
            sessions: self.table.len(),
            opened: opened.len(),
            closed: closed.len(),
        })
    }

    fn start_fetch(&mut self, myself: &ActorRef<RegistryMsg>, waiter: Option<Waiter>) {
        self.pending.extend(waiter);
        if self.in_flight {
            return;
        }
        self.in_flight = true;
        let waiters = std::mem::take(&mut self.pending);
        let ctx = self.ctx.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let result = fetch(&ctx).await;
            // If the registry died meanwhile, its next incarnation fetches on its own.
            let _ = me.send_message(RegistryMsg::Fetched { result, waiters });
        });
    }

    fn view(&self, username: Option<&str>) -> SessionsView {
        SessionsView {
            sessions: self.table.sessions(username).cloned().collect(),
            synced: self.synced,
            last_error: self.last_error.clone(),
        }
    }
}

impl Actor for SessionRegistry {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = Arc<Context>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: Arc<Context>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let interval = ctx.config.ocserv.reconcile_interval;
        let ticker = myself.send_interval(interval, || RegistryMsg::Tick).into();
        let mut state = RegistryState {
            ctx: ctx.clone(),
            table: SessionTable::default(),
            synced: false,
            last_error: None,
            in_flight: false,
            pending: Vec::new(),
            _ticker: ticker,
        };
        // Rebuild from ocserv before answering anything; bounded so a dead ocserv cannot hold up
        // the start (the next tick retries).
        let bound = ctx.config.ocserv.request_timeout + Duration::from_millis(100);
        match tokio::time::timeout(bound, fetch(&ctx)).await {
            Ok(result) => {
                if let Err(e) = state.apply(result) {
                    tracing::warn!(error = %e, "initial reconcile failed; will retry");
                }
            }
            Err(_) => {
                tracing::warn!("initial reconcile timed out; will retry");
                state.last_error = Some("ocserv did not answer the initial session list".into());
            }
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RegistryMsg::Query { username, reply } => {
                let _ = reply.send(state.view(username.as_deref()));
            }
            RegistryMsg::ReconcileNow(reply) => state.start_fetch(&myself, Some(reply)),
            RegistryMsg::Tick => state.start_fetch(&myself, None),
            RegistryMsg::Fetched { result, waiters } => {
                state.in_flight = false;
                let report = state.apply(result);
                if let Err(e) = &report {
                    tracing::warn!(error = %e, "reconcile failed; keeping the last known sessions");
                }
                for w in waiters {
                    let _ = w.send(report.clone());
                }
                if !state.pending.is_empty() {
                    state.start_fetch(&myself, None);
                }
            }
            RegistryMsg::Forget(ids) => {
                state.table.remove(&ids);
                state
                    .ctx
                    .metrics
                    .active_sessions
                    .set(state.table.connected() as i64);
            }
            RegistryMsg::Crash => {
                panic!("chaos: crash requested for {}", super::SESSION_REGISTRY)
            }
        }
        Ok(())
    }
}
