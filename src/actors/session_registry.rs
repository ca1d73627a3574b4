//! `SessionRegistry`: the agent's view of ocserv's live sessions.
//!
//! Inputs: [`RegistryMsg`] queries, a tick every `ocserv.reconcile_interval` (re-armed after each
//! tick, so a SIGHUP change applies at the next one), and `Forget` notices, by full identity,
//! after the agent disconnected sessions. It reconciles by asking `OcservCtl` for the session
//! list in a background task and applying the answer with [`SessionTable::reconcile`], so queries
//! are never stuck behind a slow ocserv. The synchronization rules (one fetch at a time, early
//! retries until the first success, tombstones for kicked sessions) are the plain
//! [`SyncState`] and [`Forgotten`].
//!
//! Every view carries its age. A failed reconcile keeps the last known table (sessions are not
//! declared closed because ocserv did not answer), but the age grows, and callers refuse to serve
//! a view older than [`crate::health::STALE_AFTER`] intervals; the sessions gauge is then cleared
//! rather than left claiming a number nobody has seen.
//!
//! A connect the hook admitted makes the session *pending*: ocserv is asked about that one
//! session ([`CONFIRM_AFTER`] after the answer, then backing off) until it shows it connected,
//! so it enters the table within about a second rather than at the next reconcile; one still not
//! connected after the last check is left to the reconcile (the plain rule: [`Pending`]).
//!
//! Restart: the table is not kept across a crash; `pre_start` rebuilds it with one reconcile
//! against ocserv (the source of truth) before the first query is answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::actors::{call, AbortOnDrop, Context, OCSERV_CTL};
use crate::hook_proto::Reason;
use crate::messages::{
    CtlMsg, HookEvent, ReconcileError, ReconcileReport, ReconcileResult, RegistryMsg, SessionsView,
};
use crate::ocserv::Session;
use crate::registry::{
    AfterFetch, Check, EndedSession, Forgotten, Pending, ReconcileDiff, SessionTable, SyncState,
    CONFIRM_AFTER, MAX_ENDED,
};

pub struct SessionRegistry;

type Waiter = RpcReplyPort<ReconcileResult>;

pub struct RegistryState {
    ctx: Arc<Context>,
    table: SessionTable,
    sync: SyncState,
    forgotten: Forgotten,
    last_error: Option<ReconcileError>,
    /// Reconcile requests that arrived while a fetch was under way: served by the next one.
    pending: Vec<Waiter>,
    /// Sessions whose disconnect script reported their end, newest last (bounded).
    ended: std::collections::VecDeque<EndedSession>,
    /// Sessions the connect hook admitted that ocserv does not show connected yet.
    admitted: Pending,
    _ticker: Option<AbortOnDrop>,
}

/// Asks ocserv for the status figures and the session list.
async fn fetch(ctx: &Context) -> Result<Vec<Session>, ReconcileError> {
    let cfg = ctx.config();
    let timeout = cfg.ocserv.request_timeout + cfg.supervisor.call_timeout;
    // Status feeds the ocserv_* gauges; its failure alone does not fail the reconcile.
    if let Ok(Ok(status)) = call(OCSERV_CTL, timeout, true, CtlMsg::Status).await {
        ctx.metrics.set_ocserv_status(&status);
    }
    call(OCSERV_CTL, timeout, true, CtlMsg::List)
        .await?
        .map_err(|e| ReconcileError::Ocserv(Arc::new(e)))
}

impl RegistryState {
    fn arm_tick(&mut self, myself: &ActorRef<RegistryMsg>, after: Duration) {
        self._ticker = Some(myself.send_after(after, || RegistryMsg::Tick).into());
    }

    /// Applies fetch number `fetch`'s result.
    fn apply(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        fetch: u64,
        result: Result<Vec<Session>, ReconcileError>,
    ) -> ReconcileResult {
        let outcome = match result {
            Ok(fresh) => {
                let fresh = self.forgotten.filter(fresh, fetch);
                self.admitted.confirm_listed(&fresh);
                let ReconcileDiff { opened, closed, .. } = self.table.reconcile(fresh);
                for s in &closed {
                    tracing::info!(session = %s.key(), "session closed");
                    self.ended_on_its_own(&s.key());
                }
                for id in &opened {
                    tracing::info!(id, "session opened");
                }
                self.ctx.health.synced();
                self.last_error = None;
                Ok(ReconcileReport {
                    sessions: self.table.len(),
                    opened: opened.len(),
                    closed: closed.len(),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "reconcile failed; keeping the last known sessions");
                self.last_error = Some(e.clone());
                Err(e)
            }
        };
        if let AfterFetch::RetryAfter(d) = self.sync.finish(outcome.is_ok(), Instant::now()) {
            self.arm_tick(myself, d);
        }
        self.publish_gauge();
        outcome
    }

    /// Counts a session that ended without the agent kicking it (its reason is not known
    /// without ocserv's event stream). A session the agent kicks is counted once, with the
    /// kick's reason, when the kick's `Forget` arrives, whichever notice comes first.
    fn ended_on_its_own(&self, key: &crate::ocserv::SessionKey) {
        if self.ctx.kicks.reason_of(key).is_none() {
            self.ctx
                .metrics
                .session_ended(crate::metrics::DisconnectReason::Unspecified);
        }
    }

    /// The sessions gauge shows the table while it is fresh, and nothing once it is stale.
    fn publish_gauge(&self) {
        let fresh = self.age().is_some_and(|age| {
            !crate::health::too_old(age, self.ctx.config().ocserv.reconcile_interval)
        });
        self.ctx
            .metrics
            .set_active_sessions(fresh.then(|| self.table.connected()));
    }

    fn age(&self) -> Option<Duration> {
        self.sync.last_sync().map(|t| t.elapsed())
    }

    fn start_fetch(&mut self, myself: &ActorRef<RegistryMsg>, waiter: Option<Waiter>) {
        self.pending.extend(waiter);
        let Some(fetch) = self.sync.begin() else {
            return;
        };
        let waiters = std::mem::take(&mut self.pending);
        let ctx = self.ctx.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let result = fetch_bounded(&ctx).await;
            // If the registry died meanwhile, its next incarnation fetches on its own.
            let _ = me.send_message(RegistryMsg::Fetched {
                fetch,
                result,
                waiters,
            });
        });
    }

    /// Asks ocserv about pending session `id` after `delay`, in a task of its own; the answer
    /// comes back as `PendingChecked`.
    fn check_pending(
        &self,
        myself: &ActorRef<RegistryMsg>,
        id: u32,
        username: String,
        delay: Duration,
    ) {
        let ctx = self.ctx.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let cfg = ctx.config();
            let timeout = cfg.ocserv.request_timeout + cfg.supervisor.call_timeout;
            let seen = match call(OCSERV_CTL, timeout, true, |r| CtlMsg::IdInfo(id, r)).await {
                Ok(Ok(s)) => s.map(Box::new),
                _ => None,
            };
            let _ = me.send_message(RegistryMsg::PendingChecked { id, username, seen });
        });
    }

    fn on_pending_checked(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        id: u32,
        username: String,
        seen: Option<Box<Session>>,
    ) {
        match self.admitted.check(id, &username, seen.as_deref()) {
            Check::Confirmed => {
                if let Some(s) = seen {
                    if self.table.upsert(*s) {
                        tracing::info!(id, user = %username, "session opened (confirmed after its connect)");
                    }
                    self.publish_gauge();
                }
            }
            Check::Again(delay) => self.check_pending(myself, id, username, delay),
            Check::GaveUp => tracing::info!(id, user = %username,
                "an admitted session is not connected in ocserv yet; left to the next reconcile"),
            Check::NotPending => {}
        }
    }

    /// An admitted connect makes its session pending (confirmed with ocserv shortly); a
    /// disconnect ends the session it names (final counters kept in `ended`); a host-update
    /// (new addresses after DTLS) asks ocserv again at once.
    fn on_hook_event(&mut self, myself: &ActorRef<RegistryMsg>, e: HookEvent) {
        match e.reason {
            Reason::Connect => {
                if self.admitted.admit(e.id, &e.username) {
                    self.check_pending(myself, e.id, e.username, CONFIRM_AFTER[0]);
                }
            }
            Reason::HostUpdate => self.start_fetch(myself, None),
            Reason::Disconnect => {
                let now =
                    e.at.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                let Some(key) = self.table.disconnected(e.id, &e.username, e.duration, now) else {
                    // Ended before it was confirmed: still a session that ended (unless the
                    // agent kicked it: then its Forget counts it).
                    let pending = self.admitted.forget(e.id, &e.username);
                    if pending && !self.ctx.kicks.kicked_id(e.id) {
                        self.ctx
                            .metrics
                            .session_ended(crate::metrics::DisconnectReason::Unspecified);
                    }
                    tracing::debug!(id = e.id, user = %e.username,
                        "disconnect report for a session the registry does not hold");
                    return;
                };
                tracing::info!(session = %key, user = %e.username, bytes_in = ?e.bytes_in,
                    bytes_out = ?e.bytes_out, duration = ?e.duration, "session ended");
                self.table.remove(std::slice::from_ref(&key));
                self.ended_on_its_own(&key);
                self.forgotten
                    .add([key.clone()], self.sync.latest_started());
                if self.ended.len() >= MAX_ENDED {
                    self.ended.pop_front();
                }
                self.ended.push_back(EndedSession {
                    key,
                    username: e.username,
                    bytes_in: e.bytes_in,
                    bytes_out: e.bytes_out,
                    duration: e.duration,
                    ended_at: e.at,
                });
                self.publish_gauge();
            }
        }
    }

    fn view(&mut self, username: Option<&str>) -> SessionsView {
        let sessions = match username {
            None => self.table.all(),
            Some(_) => Arc::new(self.table.sessions(username).cloned().collect()),
        };
        SessionsView {
            sessions,
            version: self.table.version(),
            age: self.age(),
            last_error: self.last_error.clone(),
        }
    }
}

/// [`fetch`] under one overall bound, so a dead ocserv cannot hold a fetch forever.
async fn fetch_bounded(ctx: &Context) -> Result<Vec<Session>, ReconcileError> {
    let cfg = ctx.config();
    let bound = 2 * (cfg.ocserv.request_timeout + cfg.supervisor.call_timeout);
    tokio::time::timeout(bound, fetch(ctx))
        .await
        .unwrap_or(Err(ReconcileError::Actor(
            crate::messages::CallError::Timeout(OCSERV_CTL),
        )))
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
        let interval = ctx.config().ocserv.reconcile_interval;
        let mut state = RegistryState {
            ctx: ctx.clone(),
            table: SessionTable::default(),
            sync: SyncState::new(interval),
            forgotten: Forgotten::default(),
            last_error: None,
            pending: Vec::new(),
            ended: Default::default(),
            admitted: Pending::default(),
            _ticker: None,
        };
        state.arm_tick(&myself, interval);
        // Rebuild from ocserv before answering anything; bounded so a dead ocserv cannot hold up
        // the start (a failure is retried early, see `SyncState::finish`).
        let fetch = state.sync.begin().unwrap_or_default();
        let bound = ctx.config().ocserv.request_timeout + Duration::from_millis(100);
        let result = tokio::time::timeout(bound, fetch_bounded(&ctx))
            .await
            .unwrap_or(Err(ReconcileError::Actor(
                crate::messages::CallError::Timeout(OCSERV_CTL),
            )));
        let _ = state.apply(&myself, fetch, result);
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
            RegistryMsg::Tick => {
                let interval = state.ctx.config().ocserv.reconcile_interval;
                state.arm_tick(&myself, interval);
                state.publish_gauge();
                state.start_fetch(&myself, None);
            }
            RegistryMsg::Fetched {
                fetch,
                result,
                waiters,
            } => {
                let report = state.apply(&myself, fetch, result);
                for w in waiters {
                    let _ = w.send(report.clone());
                }
                if !state.pending.is_empty() {
                    state.start_fetch(&myself, None);
                }
            }
            RegistryMsg::Forget(keys) => {
                state.table.remove(&keys);
                // Every key is a session the agent disconnected: counted here, once.
                for key in &keys {
                    let reason = state.ctx.kicks.reason_of(key);
                    let reason = reason.unwrap_or(crate::metrics::DisconnectReason::Unspecified);
                    state.ctx.metrics.session_ended(reason);
                }
                state.forgotten.add(keys, state.sync.latest_started());
                state.publish_gauge();
            }
            RegistryMsg::HookEvent(event) => state.on_hook_event(&myself, event),
            RegistryMsg::PendingChecked { id, username, seen } => {
                state.on_pending_checked(&myself, id, username, seen)
            }
            RegistryMsg::Crash => {
                panic!("chaos: crash requested for {}", super::SESSION_REGISTRY)
            }
        }
        Ok(())
    }
}
