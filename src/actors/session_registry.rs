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
//! Reporting: every change of what the agent knows about sessions becomes a [`Change`] saved
//! through `StateStore` into the durable snapshot and outbox ([`crate::store`]), one save at a
//! time, in order, sent again after a failure (every change is idempotent, so a save that
//! committed but was not answered does no harm). A session is reported connected once ocserv
//! shows it connected (confirmed shortly after the hook's verdict, or found by a reconcile); it
//! is reported ended when its disconnect script reports it (final counters; the hook listener
//! waits for the save and sends again until it is made), or, when it left ocserv's list, was
//! kicked by the agent or ended on the event stream, after [`CLOSE_GRACE`] waiting for that
//! script, with the last known counters. The reason is the agent's kick's (`ADMIN_FORCED`,
//! `POLICY_VIOLATION`), else the event stream's, else `UNSPECIFIED`. Every
//! `portal.session_update_interval` each live session's counters are saved as an update.
//!
//! Revalidation: `portal.validate_interval` is cut into slices ([`validation_slices`], one a
//! second); each tick asks the portal's `ValidateSession` about the sessions of one slice, a few
//! at a time, from a task; `force_disconnect` kicks that very session (`POLICY_VIOLATION`,
//! audited).
//!
//! Event stream (`ocserv.event_stream`): a task holds ocserv's TOP stream (resubscribing after
//! any failure) and passes disconnects with their reason; the actor fails if that task ever
//! ends, so it is restarted.
//!
//! Restart: the table is not kept across a crash; `pre_start` rebuilds it with one reconcile
//! against ocserv (the source of truth) before the first query is answered, and the first
//! successful reconcile of each incarnation is saved as a [`Change::Resync`]: the store reports
//! the sessions that ended meanwhile (the reason of the agent's recent kick of it, else unknown;
//! last known counters) and the ones it never heard of, and leaves the others alone (never
//! reported twice).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::actors::{call, AbortOnDrop, Context, OCSERV_CTL, PORTAL_LINK, STATE_STORE};
use crate::hook_proto::Reason;
use crate::messages::{
    CtlMsg, HookEvent, PortalMsg, ReconcileError, ReconcileReport, ReconcileResult, RegistryMsg,
    SessionsView, StoreMsg,
};
use crate::metrics::DisconnectReason;
use crate::ocserv::{Session, SessionKey};
use crate::registry::{
    hook_record, validation_slice, validation_slices, AfterFetch, Check, Closing, ClosingSession,
    Forgotten, Pending, ReconcileDiff, SessionTable, SyncState, CLOSE_GRACE, CONFIRM_AFTER,
};
use crate::store::{unix_ms, Change, SessionRecord};

pub struct SessionRegistry;

type Waiter = RpcReplyPort<ReconcileResult>;
type HookWaiter = RpcReplyPort<()>;

/// Unsaved changes kept at most while the store fails: beyond it, updates are dropped first.
pub const MAX_UNSAVED: usize = 100_000;

/// Validation calls of one slice in flight at once.
const VALIDATIONS_AT_ONCE: usize = 4;

pub struct RegistryState {
    ctx: Arc<Context>,
    table: SessionTable,
    sync: SyncState,
    forgotten: Forgotten,
    last_error: Option<ReconcileError>,
    /// Reconcile requests that arrived while a fetch was under way: served by the next one.
    pending: Vec<Waiter>,
    /// Sessions the connect hook admitted that ocserv does not show connected yet.
    admitted: Pending,
    /// Sessions that ended, waiting briefly for their disconnect script.
    closing: Closing,
    /// This incarnation's first successful reconcile has been queued as a resync.
    resynced: bool,
    /// Changes not yet saved, oldest first, and the hook reports waiting for them.
    unsaved: Vec<Change>,
    unsaved_waiters: Vec<HookWaiter>,
    saving: bool,
    save_failures: u32,
    validate_round: u64,
    _ticker: Option<AbortOnDrop>,
    close_timer: Option<AbortOnDrop>,
    save_timer: Option<AbortOnDrop>,
    update_timer: Option<AbortOnDrop>,
    validate_timer: Option<AbortOnDrop>,
    _stream: Option<AbortOnDrop>,
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

fn connected(s: &Session) -> bool {
    s.state == crate::ocserv::SessionState::Connected
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
                let ReconcileDiff {
                    opened,
                    closed,
                    connected: now_connected,
                    ..
                } = self.table.reconcile(fresh);
                for s in &closed {
                    tracing::info!(session = %s.key(), "session closed");
                }
                for id in &opened {
                    tracing::info!(id, "session opened");
                }
                if self.resynced {
                    for id in &now_connected {
                        if let Some(s) = self.table.get(*id) {
                            let change = Change::Opened(SessionRecord::of(s));
                            self.queue(myself, change, None);
                        }
                    }
                } else {
                    let live = self.table.sessions(None).filter(|s| connected(s));
                    let live = live.map(|s| SessionRecord::of(s)).collect();
                    let at_ms = unix_ms(SystemTime::now());
                    self.resynced = true;
                    let known = self.ctx.kicks.recent();
                    self.queue(myself, Change::Resync { live, at_ms, known }, None);
                }
                let closed_count = closed.len();
                for s in closed.into_iter().filter(|s| connected(s)) {
                    self.closing_add(myself, s, None);
                }
                self.ctx.health.synced();
                self.last_error = None;
                Ok(ReconcileReport {
                    sessions: self.table.len(),
                    opened: opened.len(),
                    closed: closed_count,
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

    /// Queues `change` for saving (with the hook report waiting for it) and saves.
    fn queue(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        change: Change,
        waiter: Option<HookWaiter>,
    ) {
        self.queue_all(myself, [change], waiter);
    }

    /// [`Self::queue`] for many changes at once (one bound check, one save).
    fn queue_all(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        changes: impl IntoIterator<Item = Change>,
        waiter: Option<HookWaiter>,
    ) {
        self.unsaved.extend(changes);
        self.unsaved_waiters.extend(waiter);
        if self.unsaved.len() > MAX_UNSAVED {
            let before = self.unsaved.len();
            self.unsaved.retain(|c| !matches!(c, Change::Update { .. }));
            tracing::error!(
                dropped = before - self.unsaved.len(),
                "the state store is not keeping up; unsaved session updates dropped"
            );
        }
        self.save(myself);
    }

    /// Sends everything unsaved to `StateStore` in one save, unless one is under way or a retry
    /// is waiting.
    fn save(&mut self, myself: &ActorRef<RegistryMsg>) {
        if self.saving || self.save_timer.is_some() || self.unsaved.is_empty() {
            return;
        }
        self.saving = true;
        let changes = std::mem::take(&mut self.unsaved);
        let waiters = std::mem::take(&mut self.unsaved_waiters);
        let me = myself.clone();
        let bound = self
            .ctx
            .config()
            .supervisor
            .call_timeout
            .max(Duration::from_secs(10));
        tokio::spawn(async move {
            let saved = call(STATE_STORE, bound, true, |reply| StoreMsg::Record {
                changes: changes.clone(),
                reply,
            })
            .await;
            let ok = matches!(saved, Ok(Ok(())));
            if !ok {
                tracing::warn!(result = ?saved, "session changes not saved yet; sending them again");
            }
            let changes = if ok { Vec::new() } else { changes };
            let _ = me.send_message(RegistryMsg::Saved {
                ok,
                changes,
                waiters,
            });
        });
    }

    fn on_saved(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        ok: bool,
        mut changes: Vec<Change>,
        mut waiters: Vec<HookWaiter>,
    ) {
        self.saving = false;
        if ok {
            self.save_failures = 0;
            for w in waiters {
                let _ = w.send(());
            }
        } else {
            changes.append(&mut self.unsaved);
            self.unsaved = changes;
            waiters.append(&mut self.unsaved_waiters);
            self.unsaved_waiters = waiters;
            let delay = crate::backoff::Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(5),
                2.0,
            )
            .map_or(Duration::from_secs(1), |b| b.delay(self.save_failures));
            self.save_failures = self.save_failures.saturating_add(1);
            self.save_timer = Some(myself.send_after(delay, || RegistryMsg::SaveNow).into());
            return;
        }
        self.save(myself);
    }

    /// Why the session `key` ended: the agent's kick, else what is known, else unspecified.
    fn reason(&self, key: &SessionKey, known: Option<DisconnectReason>) -> DisconnectReason {
        self.ctx
            .kicks
            .reason_of(key)
            .or(known)
            .unwrap_or(DisconnectReason::Unspecified)
    }

    /// Queues the end of a session.
    fn close(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        session: SessionRecord,
        reason: DisconnectReason,
        ended_at: SystemTime,
        duration: Option<Duration>,
        waiter: Option<HookWaiter>,
    ) {
        tracing::info!(id = session.id, user = %session.username, reason = crate::metrics::reason_label(reason),
            bytes_in = session.bytes_in, bytes_out = session.bytes_out, "session ended");
        let change = Change::Closed {
            session,
            ended_at_ms: unix_ms(ended_at),
            reason,
            duration: duration.map(|d| d.as_secs()),
        };
        self.queue(myself, change, waiter);
    }

    /// A session that ended as ocserv's list, a kick or the event stream tells: it waits
    /// [`CLOSE_GRACE`] for its disconnect script.
    fn closing_add(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        s: Arc<Session>,
        reason: Option<DisconnectReason>,
    ) {
        for released in self.closing.add(s, reason, Instant::now()) {
            self.close_waited(myself, released);
        }
        if self.close_timer.is_none() {
            let after = CLOSE_GRACE + Duration::from_millis(10);
            self.close_timer = Some(myself.send_after(after, || RegistryMsg::CloseDue).into());
        }
    }

    /// Reports a session whose disconnect script did not come in time (last known counters).
    fn close_waited(&mut self, myself: &ActorRef<RegistryMsg>, c: ClosingSession) {
        let reason = self.reason(&c.session.key(), c.reason);
        let record = SessionRecord::of(&c.session);
        self.close(myself, record, reason, SystemTime::now(), None, None);
    }

    fn on_close_due(&mut self, myself: &ActorRef<RegistryMsg>) {
        self.close_timer = None;
        for c in self.closing.due(Instant::now()) {
            self.close_waited(myself, c);
        }
        if let Some(next) = self.closing.next_due() {
            let after = next.saturating_duration_since(Instant::now()) + Duration::from_millis(10);
            self.close_timer = Some(myself.send_after(after, || RegistryMsg::CloseDue).into());
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
                    let record = SessionRecord::of(&s);
                    let (newly, replaced) = self.table.upsert(*s);
                    if let Some(old) = replaced.filter(|old| connected(old)) {
                        self.closing_add(myself, old, None);
                    }
                    if newly {
                        tracing::info!(id, user = %username, "session opened (confirmed after its connect)");
                        if self.resynced {
                            self.queue(myself, Change::Opened(record), None);
                        }
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
    /// disconnect ends the session it names, with its final counters; a host-update (new
    /// addresses after DTLS) asks ocserv again at once.
    fn on_hook_event(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        e: HookEvent,
        waiter: Option<HookWaiter>,
    ) {
        match e.reason {
            Reason::Connect => {
                if self.admitted.admit(e.id, &e.username) {
                    self.check_pending(myself, e.id, e.username.clone(), CONFIRM_AFTER[0]);
                }
                waiter.map(|w| w.send(()));
            }
            Reason::HostUpdate => {
                self.start_fetch(myself, None);
                waiter.map(|w| w.send(()));
            }
            Reason::Disconnect => self.on_disconnect(myself, e, waiter),
        }
    }

    fn on_disconnect(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        e: HookEvent,
        waiter: Option<HookWaiter>,
    ) {
        let now =
            e.at.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
        let finals = |mut r: SessionRecord| {
            r.bytes_in = e.bytes_in.unwrap_or(r.bytes_in);
            r.bytes_out = e.bytes_out.unwrap_or(r.bytes_out);
            r
        };
        let held = self.table.disconnected(e.id, &e.username, e.duration, now);
        let (record, known) = match held {
            Some(key) => {
                let removed = self.table.remove(std::slice::from_ref(&key));
                self.forgotten.add([key], self.sync.latest_started());
                self.publish_gauge();
                let record = removed.first().map(|s| SessionRecord::of(s));
                (record.map(finals).unwrap_or_else(|| hook_record(&e)), None)
            }
            None => match self.closing.take(e.id, &e.username) {
                Some(c) => (finals(SessionRecord::of(&c.session)), c.reason),
                None => {
                    // Not confirmed yet (or already reported ended: the store then does
                    // nothing): known from the script alone.
                    self.admitted.forget(e.id, &e.username);
                    let known = self.ctx.kicks.reason_of_id(e.id);
                    (hook_record(&e), known)
                }
            },
        };
        let reason = self.reason(&record.session_key(), known);
        self.close(myself, record, reason, e.at, e.duration, waiter);
    }

    /// Sessions the agent disconnected: out of the table at once, reported ended (with the
    /// kick's reason) once their script reported or the grace passed.
    fn on_forget(&mut self, myself: &ActorRef<RegistryMsg>, keys: Vec<SessionKey>) {
        for s in self.table.remove(&keys) {
            let reason = self.ctx.kicks.reason_of(&s.key());
            self.closing_add(myself, s, reason);
        }
        self.forgotten.add(keys, self.sync.latest_started());
        self.publish_gauge();
    }

    /// Sessions the event stream says ended, with ocserv's reason.
    fn on_stream_ended(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        ended: Vec<(Session, DisconnectReason)>,
    ) {
        for (s, reason) in ended {
            let key = s.key();
            let held = self.table.remove(std::slice::from_ref(&key));
            let session = held.into_iter().next().unwrap_or_else(|| Arc::new(s));
            self.forgotten.add([key], self.sync.latest_started());
            self.closing_add(myself, session, Some(reason));
        }
        self.publish_gauge();
    }

    fn arm_updates(&mut self, myself: &ActorRef<RegistryMsg>) {
        let every = self.ctx.config().portal.session_update_interval;
        // Disabled (0s): look again later, a SIGHUP may enable it.
        let after = if every.is_zero() {
            Duration::from_secs(10)
        } else {
            every
        };
        self.update_timer = Some(myself.send_after(after, || RegistryMsg::UpdateDue).into());
    }

    /// Saves every live session's counters (a `ReportSessionUpdate` each).
    fn on_update_due(&mut self, myself: &ActorRef<RegistryMsg>) {
        self.arm_updates(myself);
        let cfg = self.ctx.config();
        if cfg.portal.session_update_interval.is_zero() || !cfg.portal.reports_events() {
            return;
        }
        let at_ms = unix_ms(SystemTime::now());
        let updates: Vec<_> = self
            .table
            .sessions(None)
            .filter(|s| connected(s))
            .map(|s| Change::Update {
                session: SessionRecord::of(s),
                at_ms,
            })
            .collect();
        self.queue_all(myself, updates, None);
    }

    fn arm_validation(&mut self, myself: &ActorRef<RegistryMsg>) {
        let every = self.ctx.config().portal.validate_interval;
        let after = match every.is_zero() {
            true => Duration::from_secs(10),
            false => every / validation_slices(every) as u32,
        };
        self.validate_timer = Some(myself.send_after(after, || RegistryMsg::ValidateDue).into());
    }

    /// Asks the portal about the next slice of live sessions, from a task.
    fn on_validate_due(&mut self, myself: &ActorRef<RegistryMsg>) {
        self.arm_validation(myself);
        let cfg = self.ctx.config();
        let every = cfg.portal.validate_interval;
        if every.is_zero() || cfg.portal.endpoint.is_none() {
            return;
        }
        self.validate_round = self.validate_round.wrapping_add(1);
        let slice: Vec<SessionRecord> = validation_slice(
            self.table.sessions(None).map(|s| s.as_ref()),
            self.validate_round,
            validation_slices(every),
        )
        .into_iter()
        .map(SessionRecord::of)
        .collect();
        if slice.is_empty() {
            return;
        }
        tokio::spawn(validate(self.ctx.clone(), slice));
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

/// Asks the portal about each session of `slice`, a few at a time; kicks those it wants gone.
async fn validate(ctx: Arc<Context>, slice: Vec<SessionRecord>) {
    let mut calls = tokio::task::JoinSet::new();
    for session in slice {
        if calls.len() >= VALIDATIONS_AT_ONCE {
            calls.join_next().await;
        }
        calls.spawn(validate_one(ctx.clone(), session));
    }
    while calls.join_next().await.is_some() {}
}

async fn validate_one(ctx: Arc<Context>, session: SessionRecord) {
    let bound = ctx.config().portal.call_timeout + ctx.config().supervisor.call_timeout;
    let asked = call(PORTAL_LINK, bound, false, |reply| PortalMsg::Validate {
        session: session.clone(),
        reply,
    })
    .await;
    match asked {
        Ok(Ok(v)) if v.force_disconnect => {
            let key = session.session_key();
            let deadline = Instant::now() + bound + ctx.config().ocserv.request_timeout;
            let user = &session.username;
            crate::grpc::portal_kick(&ctx, "ValidateSession", key, user, &v.reason, deadline).await;
        }
        Ok(Ok(v)) if !v.valid => tracing::info!(id = session.id, user = %session.username,
            reason = %v.reason, "the portal says the session is invalid (not forced off)"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, id = session.id, "session not revalidated"),
        Err(e) => tracing::debug!(error = %e, id = session.id, "session not revalidated"),
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

/// Holds ocserv's event stream and passes its disconnects to this incarnation; the actor is
/// told (and fails) if the task ever ends.
fn follow_stream(ctx: &Context, myself: &ActorRef<RegistryMsg>) -> AbortOnDrop {
    let cfg = ctx.config();
    let (socket, timeout) = (
        cfg.ocserv.control_socket.clone(),
        cfg.ocserv.request_timeout,
    );
    let me = myself.clone();
    let backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(30), 2.0)
            .expect("valid backoff");
    let task = tokio::spawn(crate::ocserv::top::follow(
        socket,
        timeout,
        backoff,
        move |event| {
            if event.connected {
                return;
            }
            let reason = event
                .cause
                .map_or(DisconnectReason::Unspecified, |c| c.reason());
            let ended = event.sessions.into_iter().map(|s| (s, reason)).collect();
            let _ = me.send_message(RegistryMsg::Ended(ended));
        },
    ));
    let handle = AbortOnDrop(task.abort_handle());
    let me = myself.clone();
    tokio::spawn(async move {
        // Cancelled when this incarnation stops; anything else is the task dying.
        if !task.await.is_err_and(|e| e.is_cancelled()) {
            let _ = me.send_message(RegistryMsg::StreamEnded);
        }
    });
    handle
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
        let stream = ctx
            .config()
            .ocserv
            .event_stream
            .then(|| follow_stream(&ctx, &myself));
        let mut state = RegistryState {
            ctx: ctx.clone(),
            table: SessionTable::default(),
            sync: SyncState::new(interval),
            forgotten: Forgotten::default(),
            last_error: None,
            pending: Vec::new(),
            admitted: Pending::default(),
            closing: Closing::default(),
            resynced: false,
            unsaved: Vec::new(),
            unsaved_waiters: Vec::new(),
            saving: false,
            save_failures: 0,
            validate_round: rand::random(),
            _ticker: None,
            close_timer: None,
            save_timer: None,
            update_timer: None,
            validate_timer: None,
            _stream: stream,
        };
        state.arm_tick(&myself, interval);
        state.arm_updates(&myself);
        state.arm_validation(&myself);
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
            RegistryMsg::Forget(keys) => state.on_forget(&myself, keys),
            RegistryMsg::HookEvent(event, waiter) => state.on_hook_event(&myself, event, waiter),
            RegistryMsg::PendingChecked { id, username, seen } => {
                state.on_pending_checked(&myself, id, username, seen)
            }
            RegistryMsg::Saved {
                ok,
                changes,
                waiters,
            } => state.on_saved(&myself, ok, changes, waiters),
            RegistryMsg::SaveNow => {
                state.save_timer = None;
                state.save(&myself);
            }
            RegistryMsg::CloseDue => state.on_close_due(&myself),
            RegistryMsg::UpdateDue => state.on_update_due(&myself),
            RegistryMsg::ValidateDue => state.on_validate_due(&myself),
            RegistryMsg::Ended(ended) => state.on_stream_ended(&myself, ended),
            RegistryMsg::StreamEnded => {
                return Err("the ocserv event stream task ended".into());
            }
            RegistryMsg::Crash => {
                panic!("chaos: crash requested for {}", super::SESSION_REGISTRY)
            }
        }
        Ok(())
    }
}
