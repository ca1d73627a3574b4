//! `StateStore`: the actors' way into the durable store ([`crate::store`]).
//!
//! The store itself is opened at start and lives in the [`Context`] (it outlives this actor);
//! this actor turns messages into transactions without ever waiting on the disk in its handler:
//! writes are queued by key (a newer value for a key replaces the queued one, so the queue is
//! bounded by the number of distinct keys) and committed together in one transaction on a
//! blocking thread, one transaction at a time. The task reports back with
//! [`StoreMsg::Flushed`]; then whatever queued meanwhile goes in the next transaction.
//!
//! Audit records queue in order, at most [`MAX_QUEUED_AUDIT`] (beyond it the oldest queued are
//! dropped, logged and counted: only a disk that stalls for minutes gets there).
//!
//! Session changes ([`StoreMsg::Record`]) go in the same write, after the batch of decisions and
//! audit records, as a transaction of their own; their callers are answered once it committed
//! (or failed, so they send them again). Then every disconnect it reported is counted in
//! `ocserv_disconnect_total{reason}` (exactly once per session, whoever noticed the end first),
//! `ocserv_agent_outbox_depth` is set, and `PortalLink` is told to drain when events were added.
//!
//! A failed transaction is logged and counted (`ocserv_agent_store_writes_total{status="error"}`)
//! and its writes are dropped: the decisions kept are a copy of what the cache holds in memory,
//! and the audit records are also in the log. What was queued when this actor crashes is lost
//! the same way.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use ractor::RpcReplyPort;

use crate::actors::{Context, PORTAL_LINK, STATE_STORE};
use crate::messages::{PortalMsg, StoreMsg};
use crate::store::{AuditRecord, Batch, Change, KeptDecision, Recorded, Reporting};

/// Audit records waiting for a transaction, at most.
pub const MAX_QUEUED_AUDIT: usize = 10_000;

pub struct StateStore;

type Key = (String, String);

pub struct StoreState {
    ctx: Arc<Context>,
    /// Decisions to write (`Some`) or forget (`None`), by key.
    decisions: HashMap<Key, Option<KeptDecision>>,
    /// Audit records to append, oldest first.
    audit: VecDeque<AuditRecord>,
    /// Session changes to record, oldest first, and who waits for them.
    changes: Vec<Change>,
    waiters: Vec<RpcReplyPort<Result<(), String>>>,
    /// A transaction is under way.
    flushing: bool,
}

/// The outbox settings in force.
pub fn reporting(ctx: &Context) -> Reporting {
    let cfg = ctx.config();
    Reporting {
        agent_id: cfg.agent.id.clone(),
        report: cfg.portal.reports_events(),
        capacity: cfg.portal.outbox_capacity,
    }
}

/// Counts and publishes what a recording did.
pub fn publish_recorded(ctx: &Context, r: &Recorded) {
    for reason in &r.disconnects {
        ctx.metrics.session_ended(*reason);
    }
    ctx.metrics.outbox_depth.set(r.depth as i64);
    if r.dropped_updates > 0 {
        ctx.metrics.outbox_dropped.inc_by(r.dropped_updates as u64);
        tracing::warn!(
            dropped = r.dropped_updates,
            depth = r.depth,
            "outbox full: oldest session updates dropped"
        );
    }
    let capacity = ctx.config().portal.outbox_capacity as u64;
    if r.depth > capacity {
        tracing::warn!(
            depth = r.depth,
            capacity,
            "outbox over portal.outbox_capacity with connects and disconnects only (never dropped)"
        );
    }
    if r.connects + r.disconnects.len() + r.updates > 0 {
        if let Some(cell) = ractor::registry::where_is(PORTAL_LINK) {
            let _ = cell.send_message(PortalMsg::Drain);
        }
    }
}

impl StoreState {
    /// Commits everything queued in one transaction on a blocking thread, unless one is under
    /// way already (then this runs again when it reports).
    fn flush(&mut self) {
        let idle = self.decisions.is_empty() && self.audit.is_empty() && self.changes.is_empty();
        if self.flushing || idle {
            return;
        }
        let changes = std::mem::take(&mut self.changes);
        let had_changes = !changes.is_empty();
        let waiters = std::mem::take(&mut self.waiters);
        let reporting = reporting(&self.ctx);
        let mut batch = Batch {
            audit: self.audit.drain(..).collect(),
            ..Batch::default()
        };
        for ((user, group), value) in self.decisions.drain() {
            match value {
                Some(kept) => batch.decisions.push(kept),
                None => batch.forget.push((user, group)),
            }
        }
        self.flushing = true;
        let ctx = self.ctx.clone();
        let (decisions, audit) = (
            !batch.decisions.is_empty() || !batch.forget.is_empty(),
            !batch.audit.is_empty(),
        );
        // The blocking task is awaited by a task of its own, so that even a panic in it frees
        // the store for the next transaction (the actor never waits on a task that died).
        tokio::spawn(async move {
            let writer = ctx.clone();
            let task = tokio::task::spawn_blocking(move || {
                let now_ms = crate::store::unix_ms(std::time::SystemTime::now());
                let kept = match batch.is_empty() {
                    true => Ok(()),
                    false => writer.store.commit(&batch),
                };
                let recorded = match changes.is_empty() {
                    true => None,
                    false => Some(writer.store.record(&changes, &reporting, now_ms)),
                };
                (kept, recorded)
            });
            let (result, recorded) = task.await.unwrap_or_else(|e| {
                let died = || crate::store::StoreError::Failed {
                    path: ctx.store.path().to_path_buf(),
                    reason: format!("the write task failed: {e}"),
                };
                (Err(died()), had_changes.then(|| Err(died())))
            });
            if let Some(recorded) = recorded {
                ctx.metrics.store_write("sessions", recorded.is_ok());
                let answer = match recorded {
                    Ok(r) => {
                        publish_recorded(&ctx, &r);
                        Ok(())
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "state store: session changes not kept (sent again)");
                        Err(e.to_string())
                    }
                };
                for w in waiters {
                    let _ = w.send(answer.clone());
                }
            }
            if let Err(e) = &result {
                tracing::error!(error = %e, "state store write failed; this batch is not kept");
            }
            if decisions {
                ctx.metrics.store_write("policy_decisions", result.is_ok());
            }
            if audit {
                ctx.metrics.store_write("audit", result.is_ok());
            }
            if let Some(cell) = ractor::registry::where_is(STATE_STORE) {
                let _ = cell.send_message(StoreMsg::Flushed);
            }
        });
    }
}

impl Actor for StateStore {
    type Msg = StoreMsg;
    type State = StoreState;
    type Arguments = Arc<Context>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        ctx: Arc<Context>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(StoreState {
            ctx,
            decisions: HashMap::new(),
            audit: VecDeque::new(),
            changes: Vec::new(),
            waiters: Vec::new(),
            flushing: false,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            StoreMsg::KeepDecision(kept) => {
                let key = (kept.username.clone(), kept.groupname.clone());
                state.decisions.insert(key, Some(kept));
            }
            StoreMsg::ForgetDecision {
                username,
                groupname,
            } => {
                state.decisions.insert((username, groupname), None);
            }
            StoreMsg::Audit(record) => {
                if state.audit.len() >= MAX_QUEUED_AUDIT {
                    let lost = state.audit.pop_front();
                    tracing::error!(
                        ?lost,
                        "audit queue full (the store is not keeping up); oldest record dropped"
                    );
                    state.ctx.metrics.store_write("audit", false);
                }
                state.audit.push_back(record);
            }
            StoreMsg::Record { changes, reply } => {
                state.changes.extend(changes);
                state.waiters.push(reply);
            }
            // From a task of this incarnation or of one before it: either way the store is free.
            StoreMsg::Flushed => state.flushing = false,
            StoreMsg::Crash => panic!("chaos: crash requested for {STATE_STORE}"),
        }
        state.flush();
        Ok(())
    }
}
