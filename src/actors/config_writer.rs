//! `ConfigWriter`: ocserv's config-per-user and config-per-group files (DESIGN §2, §4;
//! `reference/ocserv.md` §4).
//!
//! Inputs ([`WriterMsg`]):
//! - `Apply` / `Remove` of one file, from the portal's pushes and the policy cache's decisions
//!   (fire-and-forget with `reply: None`, or answered with the outcome or a [`WriteFailure`]);
//! - `SyncLocalPolicy` after each SIGHUP reload: the files of every admitted user and group
//!   of the local policy that has routes, no-routes or DNS ([`model_of`]) are written, and the
//!   files of names that had some in the policy synced before and have none now are removed.
//!   A (re)started writer syncs the policy in force ([`Context::local_policy`]) on its own, so
//!   the files are right from the very first session. With `policy.source = "portal"` the
//!   local policy decides nothing and no sync happens (the portal's decisions own the files).
//!
//! Outputs: the files, via the plain [`Writer`] (validate → render → temp file + fsync +
//! rename + fsync of the directory → backup ring), and `ocserv_agent_config_writes_total
//! {kind,status}`, one count per request: `written`, `unchanged` (including a removal of an
//! absent file and any request to a disabled directory), `removed`, `error` (the file system
//! failed), `refused` (unsafe name, invalid model or a full queue: nothing was touched).
//!
//! Work off the actor: the name and model are checked in the handler (cheap, so a refusal is
//! answered at once and never queued); the disk work runs on a blocking thread and reports
//! back with [`WriterMsg::Done`]. Writes to one directory run one at a time: a FIFO queue per
//! directory in the actor's state, plus a lock per directory in the [`Context`] held by the
//! blocking write itself, so even the write of a crashed incarnation never overlaps one of its
//! successor's. The write task owns its callers' reply ports: a write under way when the actor
//! dies still finishes and answers them.
//!
//! Bounds: a request for a name whose latest queued job is of the same sort (write or remove)
//! replaces that job's content and joins its callers (only the newest content matters; every
//! joined caller gets the outcome of the write that carried the newest content). Beyond
//! [`MAX_QUEUED`] distinct jobs in one directory's queue, `Apply` and `Remove` are answered
//! with [`WriteFailureCause::Busy`] and counted `refused`. A local policy sync is not refused
//! (its size is bounded by the policy file's); it merges like any other request.
//!
//! Decisions:
//! - A directory whose key is not set (`config_writer.per_user_dir` / `per_group_dir`) is
//!   disabled: requests are still checked (an unsafe name is refused the same way), then
//!   answered `Ok(WriteOutcome::Unchanged)` / `Ok(RemoveOutcome::Absent)` without touching the
//!   disk: nothing was changed, and the operator chose not to have files.
//! - A configured directory that is missing or not a directory does **not** stop the start:
//!   the error is logged at start naming the key, and every write fails with it (counted
//!   `error`) until the operator creates it (ocserv's directories may be created after the
//!   agent). A writer that cannot be built at all (`config_writer.backups` above
//!   [`crate::peruser::write::MAX_BACKUPS`]) is treated the same way.
//! - `config_writer.backups` is read live: a SIGHUP change rebuilds the writers.
//!
//! Restart: nothing but the files on disk survives; queued jobs of a dead incarnation are lost
//! (their callers see the actor stop, and `actors::call` resends an idempotent request), and
//! the new incarnation re-syncs the local policy, removing the files of names the last
//! reload dropped ([`Context::previous_local_policy`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::actors::{call, Context, CONFIG_WRITER};
use crate::config::{Config, PolicySource};
use crate::messages::{CallError, WriteFailure, WriteFailureCause, WriterMsg};
use crate::peruser::write::{RemoveOutcome, WriteError, WriteOutcome, Writer};
use crate::peruser::{Kind, PerUserConfig};
use crate::policy::local::LocalPolicy;
use crate::policy::Decision;

/// Most distinct jobs waiting in one directory's queue before requests are refused as busy.
pub const MAX_QUEUED: usize = 1024;

pub struct ConfigWriter;

/// One lock per config directory, held by each write (see the module documentation).
#[derive(Debug, Default)]
pub struct DirLocks {
    user: Arc<Mutex<()>>,
    group: Arc<Mutex<()>>,
}

impl DirLocks {
    /// The lock of `kind`'s directory.
    pub fn of(&self, kind: Kind) -> Arc<Mutex<()>> {
        match kind {
            Kind::User => self.user.clone(),
            Kind::Group => self.group.clone(),
        }
    }
}

/// The `kind` label of `ocserv_agent_config_writes_total`.
pub fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::User => "user",
        Kind::Group => "group",
    }
}

/// The per-user (or per-group) file of a decision: its routes, no-routes and DNS servers.
/// A denial carries none of them, so its model is empty.
pub fn model_of(decision: &Decision) -> PerUserConfig {
    PerUserConfig {
        routes: decision.routes.clone(),
        no_routes: decision.no_routes.clone(),
        dns: decision.dns.clone(),
        ..PerUserConfig::default()
    }
}

/// Whether a decision gets a per-user file: an admission with routes, no-routes or DNS.
pub fn has_file(d: &Decision) -> bool {
    d.allowed && !(d.routes.is_empty() && d.no_routes.is_empty() && d.dns.is_empty())
}

/// Asks the running `ConfigWriter` to write one file, within `timeout` (resent to the next
/// incarnation if the writer dies with it queued: a write of the same content is idempotent).
pub async fn apply(
    kind: Kind,
    name: &str,
    model: &PerUserConfig,
    timeout: Duration,
) -> Result<Result<WriteOutcome, WriteFailure>, CallError> {
    call(CONFIG_WRITER, timeout, true, |reply| WriterMsg::Apply {
        kind,
        name: name.to_owned(),
        model: model.clone(),
        reply: Some(reply),
    })
    .await
}

/// Asks the running `ConfigWriter` to remove one file, within `timeout`.
pub async fn remove(
    kind: Kind,
    name: &str,
    timeout: Duration,
) -> Result<Result<RemoveOutcome, WriteFailure>, CallError> {
    call(CONFIG_WRITER, timeout, true, |reply| WriterMsg::Remove {
        kind,
        name: name.to_owned(),
        reply: Some(reply),
    })
    .await
}

/// A policy's user or group entries by name.
type Entries<'a> = &'a BTreeMap<String, Decision>;

type WritePort = RpcReplyPort<Result<WriteOutcome, WriteFailure>>;
type RemovePort = RpcReplyPort<Result<RemoveOutcome, WriteFailure>>;

/// What one queued job does.
enum Op {
    Write {
        model: Box<PerUserConfig>,
        waiters: Vec<WritePort>,
    },
    Remove {
        waiters: Vec<RemovePort>,
    },
}

/// One queued job: a file, what to do with it, and how many requests it carries (callers with
/// a reply port and fire-and-forget ones), for the metrics.
struct Job {
    name: String,
    op: Op,
    requests: u64,
}

/// What a finished job did.
enum Finished {
    Write(WriteOutcome),
    Remove(RemoveOutcome),
}

/// One directory: its writer (`None`: disabled; `Some(Err)`: cannot be built, with why), its
/// queue, and whether a job of it is under way.
struct Dir {
    writer: Option<Result<Arc<Writer>, String>>,
    busy: bool,
    queue: VecDeque<Job>,
}

impl Dir {
    fn new(kind: Kind, config: &Config) -> Self {
        Dir {
            writer: build_writer(kind, config),
            busy: false,
            queue: VecDeque::new(),
        }
    }
}

/// The config key of `kind`'s directory.
fn dir_key(kind: Kind) -> &'static str {
    match kind {
        Kind::User => "config_writer.per_user_dir",
        Kind::Group => "config_writer.per_group_dir",
    }
}

fn build_writer(kind: Kind, config: &Config) -> Option<Result<Arc<Writer>, String>> {
    let c = &config.config_writer;
    let dir = match kind {
        Kind::User => c.per_user_dir.as_ref(),
        Kind::Group => c.per_group_dir.as_ref(),
    }?;
    Some(
        Writer::new(dir, kind, c.backups as usize)
            .map(Arc::new)
            .map_err(|e| format!("config_writer.backups: {e}")),
    )
}

pub struct WriterState {
    ctx: Arc<Context>,
    user: Dir,
    group: Dir,
    /// The configuration the writers were built from (`backups` is live).
    built_from: Arc<Config>,
    /// The local policy whose files were last synced: a later sync removes the files of the
    /// names it drops.
    synced: Option<Arc<LocalPolicy>>,
}

fn failure(kind: Kind, name: &str, cause: WriteFailureCause, reason: String) -> WriteFailure {
    WriteFailure {
        kind,
        name: name.to_owned(),
        cause,
        reason,
    }
}

fn from_write_error(kind: Kind, name: &str, e: &WriteError) -> WriteFailure {
    let cause = match e {
        WriteError::Name(_) | WriteError::Config(_) => WriteFailureCause::Refused,
        WriteError::Dir { .. } | WriteError::Io { .. } | WriteError::TooManyBackups(_) => {
            WriteFailureCause::Io
        }
    };
    failure(kind, name, cause, e.to_string())
}

/// The metric status of a failure.
fn failure_status(f: &WriteFailure) -> &'static str {
    match f.cause {
        WriteFailureCause::Refused | WriteFailureCause::Busy => "refused",
        WriteFailureCause::Io => "error",
    }
}

impl WriterState {
    fn dir(&mut self, kind: Kind) -> &mut Dir {
        match kind {
            Kind::User => &mut self.user,
            Kind::Group => &mut self.group,
        }
    }

    /// Rebuilds the writers when the configuration they were built from changed (SIGHUP).
    fn follow_config(&mut self) {
        let live = self.ctx.config();
        if Arc::ptr_eq(&live, &self.built_from) {
            return;
        }
        if live.config_writer != self.built_from.config_writer {
            self.user.writer = build_writer(Kind::User, &live);
            self.group.writer = build_writer(Kind::Group, &live);
        }
        self.built_from = live;
    }

    fn count(&self, kind: Kind, status: &'static str, n: u64) {
        let c = self
            .ctx
            .metrics
            .config_writes
            .get_or_create(&crate::metrics::KindStatus {
                kind: kind_label(kind),
                status,
            });
        c.inc_by(n);
    }

    /// Answers a request that never reaches the disk, counts and logs it.
    fn refuse<T: std::fmt::Debug>(
        &self,
        reply: Option<RpcReplyPort<Result<T, WriteFailure>>>,
        f: WriteFailure,
    ) {
        self.count(f.kind, failure_status(&f), 1);
        tracing::warn!(error = %f, "per-user config request not applied");
        if let Some(r) = reply {
            let _ = r.send(Err(f));
        }
    }

    /// Checks, then queues (or merges) one request. `bounded`: refuse it when the queue is full.
    fn enqueue(
        &mut self,
        myself: &ActorRef<WriterMsg>,
        kind: Kind,
        name: String,
        op: Op,
        bounded: bool,
    ) {
        // Checked before anything else, so an unsafe name is refused the same way whether the
        // directory is configured or not.
        let checked = kind
            .check_name(&name)
            .map_err(WriteError::from)
            .and_then(|()| match &op {
                Op::Write { model, .. } => model.validate().map_err(WriteError::from),
                Op::Remove { .. } => Ok(()),
            });
        if let Err(e) = checked {
            let f = from_write_error(kind, &name, &e);
            return self.answer_failure(op, f);
        }
        let dir = self.dir(kind);
        match &dir.writer {
            None => {
                self.count(kind, "unchanged", 1);
                match op {
                    Op::Write { waiters, .. } => answer_all(waiters, Ok(WriteOutcome::Unchanged)),
                    Op::Remove { waiters } => answer_all(waiters, Ok(RemoveOutcome::Absent)),
                }
                return;
            }
            Some(Err(reason)) => {
                let f = failure(kind, &name, WriteFailureCause::Io, reason.clone());
                return self.answer_failure(op, f);
            }
            Some(Ok(_)) => {}
        }
        // Merge with the latest queued job of this name when it is of the same sort: only the
        // newest content matters. (A job of another sort in between keeps the order.)
        if let Some(last) = dir.queue.iter_mut().rev().find(|j| j.name == name) {
            match (&mut last.op, op) {
                (
                    Op::Write { model, waiters },
                    Op::Write {
                        model: m,
                        waiters: w,
                    },
                ) => {
                    *model = m;
                    waiters.extend(w);
                    last.requests += 1;
                    return;
                }
                (Op::Remove { waiters }, Op::Remove { waiters: w }) => {
                    waiters.extend(w);
                    last.requests += 1;
                    return;
                }
                (_, op) => return self.push(myself, kind, name, op, bounded),
            }
        }
        self.push(myself, kind, name, op, bounded)
    }

    fn push(
        &mut self,
        myself: &ActorRef<WriterMsg>,
        kind: Kind,
        name: String,
        op: Op,
        bounded: bool,
    ) {
        let dir = self.dir(kind);
        if bounded && dir.queue.len() >= MAX_QUEUED {
            let why = format!(
                "{MAX_QUEUED} writes are already queued for the {} directory; try again later",
                kind_label(kind)
            );
            let f = failure(kind, &name, WriteFailureCause::Busy, why);
            return self.answer_failure(op, f);
        }
        dir.queue.push_back(Job {
            name,
            op,
            requests: 1,
        });
        self.pump(myself, kind);
    }

    fn answer_failure(&self, op: Op, f: WriteFailure) {
        match op {
            Op::Write { waiters, .. } => {
                let reply = waiters.into_iter().next();
                self.refuse(reply, f)
            }
            Op::Remove { waiters } => {
                let reply = waiters.into_iter().next();
                self.refuse(reply, f)
            }
        }
    }

    /// Starts the next queued job of `kind`'s directory unless one is under way.
    fn pump(&mut self, myself: &ActorRef<WriterMsg>, kind: Kind) {
        let ctx = self.ctx.clone();
        let dir = self.dir(kind);
        if dir.busy {
            return;
        }
        let writer = match &dir.writer {
            Some(Ok(w)) => w.clone(),
            _ => {
                // The writer was disabled or broken by a reload: answer what is queued.
                let jobs: Vec<Job> = dir.queue.drain(..).collect();
                for job in jobs {
                    self.enqueue_again(myself, kind, job);
                }
                return;
            }
        };
        let Some(job) = dir.queue.pop_front() else {
            return;
        };
        dir.busy = true;
        spawn_job(ctx, myself.clone(), kind, writer, job);
    }

    /// Re-runs the checks of a job whose directory changed under it (a reload disabled it or
    /// broke its writer), one request at a time, so each of its callers is answered and
    /// counted.
    fn enqueue_again(&mut self, myself: &ActorRef<WriterMsg>, kind: Kind, job: Job) {
        let Job { name, op, requests } = job;
        match op {
            Op::Write { model, waiters } => {
                let mut ports = waiters.into_iter();
                for _ in 0..requests {
                    let op = Op::Write {
                        model: model.clone(),
                        waiters: ports.next().into_iter().collect(),
                    };
                    self.enqueue(myself, kind, name.clone(), op, false);
                }
            }
            Op::Remove { waiters } => {
                let mut ports = waiters.into_iter();
                for _ in 0..requests {
                    let op = Op::Remove {
                        waiters: ports.next().into_iter().collect(),
                    };
                    self.enqueue(myself, kind, name.clone(), op, false);
                }
            }
        }
    }

    /// Queues the files of `policy` (and the removal of those `before` had and `policy` has
    /// not), unless the local policy decides nothing (`policy.source = "portal"`).
    fn sync(
        &mut self,
        myself: &ActorRef<WriterMsg>,
        policy: Arc<LocalPolicy>,
        before: Option<Arc<LocalPolicy>>,
    ) {
        if self.ctx.config().policy.source != PolicySource::Local {
            tracing::debug!("policy.source is not local: local policy files are not written");
            return;
        }
        let pairs: [(Kind, Entries, Option<Entries>); 2] = [
            (
                Kind::User,
                policy.users(),
                before.as_deref().map(LocalPolicy::users),
            ),
            (
                Kind::Group,
                policy.groups(),
                before.as_deref().map(LocalPolicy::groups),
            ),
        ];
        let mut queued = 0usize;
        for (kind, now, then) in pairs {
            if self.dir(kind).writer.is_none() {
                let n = now.values().filter(|d| has_file(d)).count();
                if n > 0 {
                    tracing::warn!(
                        entries = n,
                        key = dir_key(kind),
                        "the local policy has routes or DNS for {} entries, but {} is not set: \
                         they are not applied",
                        kind_label(kind),
                        dir_key(kind)
                    );
                }
                continue;
            }
            for (name, d) in now.iter().filter(|(_, d)| has_file(d)) {
                let op = Op::Write {
                    model: Box::new(model_of(d)),
                    waiters: Vec::new(),
                };
                self.enqueue(myself, kind, name.clone(), op, false);
                queued += 1;
            }
            let dropped = then
                .into_iter()
                .flatten()
                .filter(|(name, d)| has_file(d) && !now.get(*name).is_some_and(has_file));
            for (name, _) in dropped {
                let op = Op::Remove {
                    waiters: Vec::new(),
                };
                self.enqueue(myself, kind, name.clone(), op, false);
                queued += 1;
            }
        }
        tracing::info!(
            files = queued,
            "local policy: per-user and per-group files queued"
        );
        self.synced = Some(policy);
    }
}

fn answer_all<T: Clone + Send + std::fmt::Debug + 'static>(
    waiters: Vec<RpcReplyPort<Result<T, WriteFailure>>>,
    result: Result<T, WriteFailure>,
) {
    for w in waiters {
        // The caller may have given up (timeout); nothing to do then.
        let _ = w.send(result.clone());
    }
}

/// Runs one job on a blocking thread under its directory's lock, answers its callers, counts
/// and logs the outcome, then tells the actor (if it still lives) that the directory is free.
fn spawn_job(
    ctx: Arc<Context>,
    me: ActorRef<WriterMsg>,
    kind: Kind,
    writer: Arc<Writer>,
    job: Job,
) {
    let Job { name, op, requests } = job;
    let (model, write_waiters, remove_waiters) = match op {
        Op::Write { model, waiters } => (Some(model), waiters, Vec::new()),
        Op::Remove { waiters } => (None, Vec::new(), waiters),
    };
    let lock = ctx.config_dir_locks.of(kind);
    tokio::spawn(async move {
        let n = name.clone();
        let ran = tokio::task::spawn_blocking(move || {
            let _held = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match model {
                Some(m) => writer.write(&n, &m).map(Finished::Write),
                None => writer.remove(&n).map(Finished::Remove),
            }
        })
        .await;
        let result = match ran {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) => Err(from_write_error(kind, &name, &e)),
            Err(e) => Err(failure(
                kind,
                &name,
                WriteFailureCause::Io,
                format!("the write task failed: {e}"),
            )),
        };
        let status = match &result {
            Ok(Finished::Write(WriteOutcome::Written)) => "written",
            Ok(Finished::Write(WriteOutcome::Unchanged)) => "unchanged",
            Ok(Finished::Remove(RemoveOutcome::Removed)) => "removed",
            Ok(Finished::Remove(RemoveOutcome::Absent)) => "unchanged",
            Err(f) => failure_status(f),
        };
        ctx.metrics
            .config_writes
            .get_or_create(&crate::metrics::KindStatus {
                kind: kind_label(kind),
                status,
            })
            .inc_by(requests);
        match &result {
            Ok(_) => tracing::debug!(kind = kind_label(kind), name, status, "per-user config"),
            Err(f) => tracing::warn!(error = %f, "per-user config write failed"),
        }
        match result {
            Ok(Finished::Write(o)) => answer_all(write_waiters, Ok(o)),
            Ok(Finished::Remove(o)) => answer_all(remove_waiters, Ok(o)),
            Err(f) => {
                answer_all(write_waiters, Err(f.clone()));
                answer_all(remove_waiters, Err(f));
            }
        }
        // If the actor died meanwhile its successor starts with an empty queue.
        let _ = me.send_message(WriterMsg::Done { kind });
    });
}

impl Actor for ConfigWriter {
    type Msg = WriterMsg;
    type State = WriterState;
    type Arguments = Arc<Context>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: Arc<Context>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let config = ctx.config();
        let mut state = WriterState {
            user: Dir::new(Kind::User, &config),
            group: Dir::new(Kind::Group, &config),
            built_from: config,
            synced: None,
            ctx: ctx.clone(),
        };
        for kind in [Kind::User, Kind::Group] {
            match &state.dir(kind).writer {
                None => tracing::debug!(key = dir_key(kind), "not set: no files of this kind"),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "per-{} files cannot be written", kind_label(kind))
                }
                Some(Ok(w)) => match tokio::fs::metadata(w.dir()).await {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => tracing::error!(
                        key = dir_key(kind),
                        dir = %w.dir().display(),
                        "is not a directory: every write fails until it is one"
                    ),
                    Err(e) => tracing::error!(
                        key = dir_key(kind),
                        dir = %w.dir().display(),
                        error = %e,
                        "cannot be used: every write fails until it exists"
                    ),
                },
            }
        }
        state.sync(&myself, ctx.local_policy(), ctx.previous_local_policy());
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.follow_config();
        match msg {
            WriterMsg::Apply {
                kind,
                name,
                model,
                reply,
            } => {
                let op = Op::Write {
                    model: Box::new(model),
                    waiters: reply.into_iter().collect(),
                };
                state.enqueue(&myself, kind, name, op, true);
            }
            WriterMsg::Remove { kind, name, reply } => {
                let op = Op::Remove {
                    waiters: reply.into_iter().collect(),
                };
                state.enqueue(&myself, kind, name, op, true);
            }
            WriterMsg::SyncLocalPolicy(policy) => {
                let before = state.synced.clone();
                state.sync(&myself, policy, before);
            }
            WriterMsg::Done { kind } => {
                state.dir(kind).busy = false;
                state.pump(&myself, kind);
            }
            WriterMsg::Crash => panic!("chaos: crash requested for {CONFIG_WRITER}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_becomes_its_routes_and_dns_only() {
        let d = Decision {
            allowed: true,
            reason: None,
            routes: vec!["10.1.0.0/16".parse().unwrap()],
            no_routes: vec!["10.1.9.0/24".parse().unwrap()],
            dns: vec!["10.1.0.53".parse().unwrap()],
        };
        let m = model_of(&d);
        assert_eq!(m.routes, d.routes);
        assert_eq!(m.no_routes, d.no_routes);
        assert_eq!(m.dns, d.dns);
        assert_eq!(
            PerUserConfig {
                routes: vec![],
                no_routes: vec![],
                dns: vec![],
                ..m
            },
            PerUserConfig::default()
        );
        assert!(has_file(&d));
        assert!(!has_file(&Decision::allow()), "nothing to write");
        assert!(!has_file(&Decision::deny("no")), "a denial has no file");
    }

    #[test]
    fn failures_name_kind_and_name_and_map_to_statuses() {
        let f = failure(Kind::Group, "staff", WriteFailureCause::Busy, "full".into());
        assert_eq!(f.to_string(), "per-group file \"staff\": full");
        assert_eq!(failure_status(&f), "refused");
        let e = Kind::User
            .check_name("../x")
            .map_err(WriteError::from)
            .unwrap_err();
        let f = from_write_error(Kind::User, "../x", &e);
        assert_eq!(f.cause, WriteFailureCause::Refused);
        assert!(f.to_string().contains("username"), "{f}");
        let io = WriteError::Dir {
            dir: "/nowhere".into(),
            reason: "does not exist".into(),
        };
        let f = from_write_error(Kind::User, "a", &io);
        assert_eq!(
            (f.cause, failure_status(&f)),
            (WriteFailureCause::Io, "error")
        );
    }
}
