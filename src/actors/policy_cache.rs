//! `PolicyCache`: answers "may this user connect?" for the hook listener.
//!
//! - `policy.source = "local"`: the local policy decides ([`crate::policy::local`]); source
//!   `local_policy`. Nothing is cached (the evaluation is a map lookup).
//! - `policy.source = "portal"`: decisions keyed by (username, groupname) in the shared
//!   [`PolicyStore`] (an LRU bounded by `policy.capacity`, kept in the `Context` so that it
//!   survives a restart of this actor; each portal decision is also kept in the durable store
//!   through the `StateStore`, and restored at the next start). A fresh entry is served
//!   (`cached`); one in its last fifth is served and refreshed in the background; a miss, a
//!   stale or expired entry asks the `PortalLink`. Concurrent misses for one key make one portal
//!   call and all wait for it (single-flight). When the portal fails or its breaker is open, the
//!   fail mode decides ([`crate::policy::without_portal`]): a stale entry only then.
//! - A portal admission's routes and DNS become the user's per-user file (`ConfigWriter`), for
//!   the user's next session.
//! - A portal answer with `should_disconnect` disconnects the user's other live sessions (all
//!   of them when the connect is denied), by full identity, in a task of its own; the cached
//!   answer does the same for every connect it answers (the portal's one session per user holds
//!   within the cache's lifetime too). Those kicks count as `policy_violation`.
//!
//! The portal call runs in a spawned task whose result comes back as [`PolicyMsg::Fetched`], so
//! a slow portal never delays a cache hit. Waiters whose answer is lost with a crash of this
//! actor are answered by the hook listener from the fail mode (it sees the call fail).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::actors::{
    call, config_writer, Context, CONFIG_WRITER, OCSERV_CTL, PORTAL_LINK, STATE_STORE,
};
use crate::config::PolicySource;
use crate::messages::{
    CtlMsg, PolicyMsg, PolicyQuery, PortalAnswer, PortalError, PortalMsg, StoreMsg, WriterMsg,
};
use crate::policy::cache::{freshness, Entry, Freshness, InFlight, Join};
use crate::policy::{Source, Verdict};

pub struct PolicyCache;

/// Time allowed beyond `portal.call_timeout` for reaching the portal link itself.
const LINK_MARGIN: Duration = Duration::from_millis(200);

pub struct CacheState {
    ctx: Arc<Context>,
    /// Keys with a portal call under way, and who waits for it.
    in_flight: InFlight<RpcReplyPort<Verdict>>,
}

impl CacheState {
    fn decide(
        &mut self,
        myself: &ActorRef<PolicyMsg>,
        query: PolicyQuery,
        reply: RpcReplyPort<Verdict>,
    ) {
        let cfg = self.ctx.config();
        if cfg.policy.source == PolicySource::Local {
            let decision = self
                .ctx
                .local_policy()
                .decide(&query.username, &query.groupname);
            let _ = reply.send(Verdict {
                decision,
                source: Source::LocalPolicy,
            });
            return;
        }
        let now = Instant::now();
        let lifetimes = cfg.policy.lifetimes();
        let cached = {
            let mut store = self.ctx.policy_store();
            store
                .get(&query.username, &query.groupname)
                .map(|e| (e.clone(), freshness(e, now, &lifetimes)))
        };
        let metrics = &self.ctx.metrics;
        match cached {
            Some((entry, fresh @ (Freshness::Fresh | Freshness::RefreshAhead))) => {
                metrics.cache_request("hit");
                // The portal's one-session-per-user (or revocation) holds for every connect
                // its cached answer admits or denies, not only the one that fetched it.
                if entry.should_disconnect {
                    disconnect_others(self.ctx.clone(), query.clone(), entry.decision.allowed);
                }
                let _ = reply.send(Verdict {
                    decision: entry.decision,
                    source: Source::Cached,
                });
                let refresh = fresh == Freshness::RefreshAhead;
                if refresh && self.in_flight.begin(&query.username, &query.groupname) {
                    self.fetch(myself, query);
                }
            }
            other => {
                let stale = matches!(other, Some((_, Freshness::Stale)));
                metrics.cache_request(if stale { "stale" } else { "miss" });
                if let Join::First = self
                    .in_flight
                    .join(&query.username, &query.groupname, reply)
                {
                    self.fetch(myself, query);
                }
            }
        }
    }

    /// Asks the portal link in a task of its own; the answer comes back as `Fetched`.
    fn fetch(&self, myself: &ActorRef<PolicyMsg>, query: PolicyQuery) {
        let ticket = self.ctx.policy_store().ticket();
        let timeout = self.ctx.config().portal.call_timeout + LINK_MARGIN;
        let me = myself.clone();
        tokio::spawn(async move {
            let result = call(PORTAL_LINK, timeout, true, |reply| PortalMsg::CheckPolicy {
                request: query.clone(),
                reply,
            })
            .await
            .unwrap_or_else(|e| Err(PortalError::Unavailable(e.to_string())));
            // If this actor died meanwhile, its waiters were answered from the fail mode.
            let _ = me.send_message(PolicyMsg::Fetched {
                query,
                ticket,
                result,
            });
        });
    }

    fn fetched(
        &mut self,
        query: PolicyQuery,
        ticket: crate::policy::cache::Ticket,
        result: Result<PortalAnswer, PortalError>,
    ) {
        let cfg = self.ctx.config();
        let now = Instant::now();
        let waiters = self.in_flight.complete(&query.username, &query.groupname);
        let verdict = match result {
            Ok(answer) => {
                let entry = Entry {
                    decision: answer.decision.clone(),
                    should_disconnect: answer.should_disconnect,
                    fetched_at: now,
                };
                let (kept, size) = {
                    let mut store = self.ctx.policy_store();
                    let kept =
                        store.insert_fetched(&query.username, &query.groupname, entry, ticket);
                    (kept, store.len())
                };
                if kept {
                    keep_decision(&query, &answer);
                }
                self.ctx
                    .metrics
                    .cache_size
                    .set(i64::try_from(size).unwrap_or(i64::MAX));
                if answer.should_disconnect {
                    disconnect_others(self.ctx.clone(), query.clone(), answer.decision.allowed);
                }
                write_user_file(&query.username, &answer.decision);
                Verdict {
                    decision: answer.decision,
                    source: Source::Fresh,
                }
            }
            Err(e) => {
                tracing::warn!(user = %query.username, error = %e,
                    fail_mode = ?cfg.policy.fail_mode, "portal decision unavailable");
                without_portal(&self.ctx, &query)
            }
        };
        for w in waiters {
            let _ = w.send(verdict.clone());
        }
    }
}

/// The verdict without asking the portal, from what the context holds: the local policy, or
/// the fail mode over the cached entry ([`crate::policy::without_portal`]). Used when the portal
/// fails, and by the hook listener when this actor cannot answer in time.
pub fn without_portal(ctx: &Context, query: &PolicyQuery) -> Verdict {
    let cfg = ctx.config();
    let local = ctx.local_policy();
    let store = ctx.policy_store();
    crate::policy::without_portal(
        cfg.policy.source,
        cfg.policy.fail_mode,
        &cfg.policy.lifetimes(),
        &local,
        store.peek(&query.username, &query.groupname),
        (&query.username, &query.groupname),
        Instant::now(),
    )
}

/// A portal decision is also kept in the durable store (write-behind), so that an agent
/// restarted during a portal outage can still answer from it as a stale entry.
fn keep_decision(query: &PolicyQuery, answer: &PortalAnswer) {
    let Some(store) = ractor::registry::where_is(STATE_STORE) else {
        return tracing::warn!(user = %query.username, "state store not running; decision not kept on disk");
    };
    let _ = store.send_message(StoreMsg::KeepDecision(crate::store::KeptDecision {
        username: query.username.clone(),
        groupname: query.groupname.clone(),
        decision: answer.decision.clone(),
        should_disconnect: answer.should_disconnect,
        fetched_at: std::time::SystemTime::now(),
    }));
}

/// The routes and DNS of a portal admission become the user's per-user file (ocserv reads it at
/// the user's next session open: this connect's settings were read before the script ran); an
/// answer without any removes a file an earlier answer left. Fire and forget: the writer logs
/// and counts the outcome.
fn write_user_file(username: &str, decision: &crate::policy::Decision) {
    let Some(writer) = ractor::registry::where_is(CONFIG_WRITER) else {
        return tracing::warn!(user = %username, "config writer not running; per-user file not updated");
    };
    let kind = crate::peruser::Kind::User;
    let name = username.to_owned();
    let msg = if config_writer::has_file(decision) {
        WriterMsg::Apply {
            kind,
            name,
            model: config_writer::model_of(decision),
            reply: None,
        }
    } else {
        WriterMsg::Remove {
            kind,
            name,
            reply: None,
        }
    };
    let _ = writer.send_message(msg);
}

/// The portal asked for the user's other sessions to go (`should_disconnect`): all live sessions
/// of the user except the one connecting (which ocserv does not list yet), each by full identity
/// as ocserv lists it now; all of them when the connect itself is denied.
fn disconnect_others(ctx: Arc<Context>, query: PolicyQuery, admitted: bool) {
    tokio::spawn(async move {
        let timeout = ctx.config().ocserv.request_timeout;
        let deadline = Instant::now() + 2 * timeout;
        let user = query.username.clone();
        let sessions = match call(OCSERV_CTL, timeout, true, |r| {
            CtlMsg::UserInfo(user.clone(), r)
        })
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return tracing::warn!(user = %query.username, error = %e, "should_disconnect: cannot list the user's sessions")
            }
            Err(e) => {
                return tracing::warn!(user = %query.username, error = %e, "should_disconnect: cannot list the user's sessions")
            }
        };
        let targets: Vec<_> = sessions
            .iter()
            .filter(|s| !admitted || s.id != query.session_id)
            .map(|s| s.key())
            .collect();
        let reason = crate::metrics::DisconnectReason::PolicyViolation;
        let kicked = crate::grpc::kick_sessions(&ctx, &targets, reason, deadline).await;
        tracing::info!(user = %query.username, disconnected = kicked.done.len(),
            errors = ?kicked.errors, "sessions disconnected at the portal's request");
    });
}

impl Actor for PolicyCache {
    type Msg = PolicyMsg;
    type State = CacheState;
    type Arguments = Arc<Context>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        ctx: Arc<Context>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(CacheState {
            ctx,
            in_flight: InFlight::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PolicyMsg::Decide { query, reply } => state.decide(&myself, query, reply),
            PolicyMsg::Fetched {
                query,
                ticket,
                result,
            } => state.fetched(query, ticket, result),
            PolicyMsg::Crash => panic!("chaos: crash requested for {}", super::POLICY_CACHE),
        }
        Ok(())
    }
}
