//! `SessionRegistry`: the agent's view of ocserv's live sessions.
//!
//! Inputs: [`RegistryMsg`] queries, a periodic tick every `ocserv.reconcile_interval`, and
//! `Forget` notices after the agent disconnected sessions. It reconciles by asking `OcservCtl` for
//! the session list in a background task and applying the answer with
//! [`SessionTable::reconcile`], so queries are never stuck behind a slow ocserv.
//!
//! Restart: the table is not kept across a crash; `pre_start` rebuilds it with one reconcile
//! against ocserv (the source of truth) before the first query is answered. Until the registry
//! has once agreed with ocserv, views are marked `synced = false` and failed reconciles are
//! retried on a short backoff (50 ms doubling up to the interval) rather than at the next tick.
//! A failed reconcile keeps the last known table (sessions are not declared closed because
//! ocserv did not answer).

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::actors::{call, AbortOnDrop, Context, OCSERV_CTL};
use crate::backoff::Backoff;
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
    /// Failed reconciles in a row; while not yet synced they are retried on this backoff
    /// instead of waiting for the next tick.
    failures: u32,
    retry: Backoff,
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
    /// Applies a fetch result and, while the registry has never agreed with ocserv, schedules
    /// an early retry (after a restart, `OcservCtl` may itself still be coming back).
    fn settle(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        result: Result<Vec<Session>, String>,
    ) -> Result<ReconcileReport, String> {
        let report = self.apply(result);
        match &report {
            Ok(_) => self.failures = 0,
            Err(e) => {
                tracing::warn!(error = %e, "reconcile failed; keeping the last known sessions");
                if !self.synced {
                    myself.send_after(self.retry.delay(self.failures), || RegistryMsg::Tick);
                }
                self.failures = self.failures.saturating_add(1);
            }
        }
        report
    }

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
            failures: 0,
            retry: Backoff::new(
                Duration::from_millis(50),
                interval.max(Duration::from_millis(50)),
                2.0,
            )?,
            _ticker: ticker,
        };
        // Rebuild from ocserv before answering anything; bounded so a dead ocserv cannot hold up
        // the start (a failure is retried early, see `settle`).
        let bound = ctx.config.ocserv.request_timeout + Duration::from_millis(100);
        let result = tokio::time::timeout(bound, fetch(&ctx))
            .await
            .unwrap_or_else(|_| Err("ocserv did not answer the initial session list".into()));
        let _ = state.settle(&myself, result);
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
                let report = state.settle(&myself, result);
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
