//! The session table and its reconcile rule: plain data and functions, no I/O. The
//! `SessionRegistry` actor owns one [`SessionTable`] and feeds it ocserv's session list.
//!
//! Sessions are keyed by ocserv's `ID` (the worker's PID). PIDs recycle, so an entry whose ID comes
//! back with a different session id (`safe_id`) or connection time is a new session: the old one is
//! reported as closed and the new one as opened.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::ocserv::{Session, SessionKey};

/// Live sessions by ocserv ID. Entries are shared (`Arc`) so a query copies pointers, not
/// sessions, and an entry that a reconcile finds unchanged keeps its allocation (a reconcile
/// allocates only for what changed).
///
/// Every change gives the table a new [`version`](Self::version), unique in the process (also
/// across tables, so a restarted registry never reuses the number of a different content): a
/// reply encoded for one version can be served again as long as the version stands.
#[derive(Debug, Clone)]
pub struct SessionTable {
    by_id: BTreeMap<u32, Arc<Session>>,
    version: u64,
    /// Every session in ID order, built on first use after a change.
    all: Option<Arc<Vec<Arc<Session>>>>,
}

impl Default for SessionTable {
    fn default() -> Self {
        Self {
            by_id: BTreeMap::new(),
            version: next_version(),
            all: None,
        }
    }
}

/// Table versions, unique in the process.
fn next_version() -> u64 {
    static VERSIONS: AtomicU64 = AtomicU64::new(1);
    VERSIONS.fetch_add(1, Ordering::Relaxed)
}

/// What one reconcile changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileDiff {
    /// Sessions that ocserv lists and the table did not have.
    pub opened: Vec<u32>,
    /// Sessions the table had and ocserv no longer lists.
    pub closed: Vec<Arc<Session>>,
    /// Sessions present on both sides whose details (state, counters, addresses) changed.
    pub updated: usize,
    /// Sessions ocserv shows connected that the table did not hold connected (new ones, and
    /// ones whose connect script has now admitted them), by ID.
    pub connected: Vec<u32>,
}

fn is_connected(s: &Session) -> bool {
    s.state == crate::ocserv::SessionState::Connected
}

fn same_session(a: &Session, b: &Session) -> bool {
    a.key().matches(b)
}

impl SessionTable {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn get(&self, id: u32) -> Option<&Session> {
        self.by_id.get(&id).map(Arc::as_ref)
    }

    /// The version of the table's content; changes with every change.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn changed(&mut self) {
        self.version = next_version();
        self.all = None;
    }

    /// Every session ordered by ID, shared: a second call before the next change costs nothing.
    pub fn all(&mut self) -> Arc<Vec<Arc<Session>>> {
        self.all
            .get_or_insert_with(|| Arc::new(self.by_id.values().cloned().collect()))
            .clone()
    }

    /// Sessions ordered by ID, optionally only those of one user.
    pub fn sessions<'a>(
        &'a self,
        username: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Arc<Session>> {
        self.by_id
            .values()
            .filter(move |s| username.is_none_or(|u| s.username == u))
    }

    /// Number of sessions ocserv considers connected.
    pub fn connected(&self) -> usize {
        self.by_id
            .values()
            .filter(|s| s.state == crate::ocserv::SessionState::Connected)
            .count()
    }

    /// Makes the table equal to ocserv's `fresh` list and says what changed. A session whose
    /// counters could not be read this time keeps its last known counters.
    pub fn reconcile(&mut self, fresh: Vec<Session>) -> ReconcileDiff {
        let mut diff = ReconcileDiff::default();
        let mut next = BTreeMap::new();
        for mut s in fresh {
            let was_connected = self
                .by_id
                .get(&s.id)
                .is_some_and(|old| same_session(old, &s) && is_connected(old));
            if is_connected(&s) && !was_connected {
                diff.connected.push(s.id);
            }
            let entry = match self.by_id.remove(&s.id) {
                Some(old) if same_session(&old, &s) => {
                    if s.counters.is_none() {
                        s.counters = old.counters;
                    }
                    if s.safe_id.is_none() {
                        s.safe_id = old.safe_id.clone();
                    }
                    if *old == s {
                        old
                    } else {
                        diff.updated += 1;
                        Arc::new(s)
                    }
                }
                Some(old) => {
                    diff.closed.push(old);
                    diff.opened.push(s.id);
                    Arc::new(s)
                }
                None => {
                    diff.opened.push(s.id);
                    Arc::new(s)
                }
            };
            next.insert(entry.id, entry);
        }
        diff.closed
            .extend(std::mem::take(&mut self.by_id).into_values());
        self.by_id = next;
        if !diff.opened.is_empty() || !diff.closed.is_empty() || diff.updated > 0 {
            self.changed();
        }
        diff
    }

    /// Removes sessions known to be gone (e.g. just disconnected) without waiting for the next
    /// reconcile, each only if the table holds that very session (not a newer one under a
    /// recycled ID); returns those removed.
    pub fn remove(&mut self, keys: &[SessionKey]) -> Vec<Arc<Session>> {
        let removed: Vec<_> = keys
            .iter()
            .filter_map(|k| match self.by_id.get(&k.id) {
                Some(s) if k.matches(s) => self.by_id.remove(&k.id),
                _ => None,
            })
            .collect();
        if !removed.is_empty() {
            self.changed();
        }
        removed
    }

    /// Puts one session as ocserv just showed it into the table (between reconciles): added when
    /// its ID is new or now names another session (the old one replaced and returned), updated
    /// when it is the same session. Returns whether it is newly connected (as
    /// [`ReconcileDiff::connected`]) and the session it replaced.
    pub fn upsert(&mut self, mut s: Session) -> (bool, Option<Arc<Session>>) {
        let newly = is_connected(&s);
        let (newly, replaced) = match self.by_id.get(&s.id) {
            Some(old) if same_session(old, &s) => {
                if s.counters.is_none() {
                    s.counters = old.counters;
                }
                if s.safe_id.is_none() {
                    s.safe_id = old.safe_id.clone();
                }
                if **old == s {
                    return (false, None);
                }
                (newly && !is_connected(old), None)
            }
            Some(old) => (newly, Some(old.clone())),
            None => (newly, None),
        };
        self.by_id.insert(s.id, Arc::new(s));
        self.changed();
        (newly, replaced)
    }
}

/// Delays before each ocserv check of a pending session, each counted from the one before: the
/// first comes right after the hook's answer lets ocserv finish the connect. A session still not
/// connected after the last check (about 3.7 s in all) is no longer pending: the next reconcile
/// finds it if it connects later. So an admitted connect costs ocserv at most four one-session
/// requests, usually one.
pub const CONFIRM_AFTER: [Duration; 4] = [
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// Sessions waiting for confirmation, at most: beyond it (a login storm larger than ocserv's
/// usual `max-clients`) sessions are found by the next reconcile instead.
pub const MAX_PENDING: usize = 4096;

/// Sessions the connect hook admitted and ocserv does not show as connected yet, by ID.
#[derive(Debug, Default)]
pub struct Pending {
    by_id: BTreeMap<u32, PendingSession>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PendingSession {
    username: String,
    /// Checks made so far.
    checks: usize,
}

/// What to do after ocserv was asked about a pending session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// ocserv shows it connected: it is live now.
    Confirmed,
    /// Not yet: ask again after this delay.
    Again(Duration),
    /// Not connected at the last check: no longer pending.
    GaveUp,
    /// Not pending (already confirmed by a reconcile, or its ID now pending for another user).
    NotPending,
}

impl Pending {
    /// Records a session the connect hook admitted (replacing one pending under the same ID: IDs
    /// are recycled PIDs). False when [`MAX_PENDING`] are pending already.
    pub fn admit(&mut self, id: u32, username: &str) -> bool {
        if self.by_id.len() >= MAX_PENDING && !self.by_id.contains_key(&id) {
            return false;
        }
        let username = username.to_owned();
        self.by_id.insert(
            id,
            PendingSession {
                username,
                checks: 0,
            },
        );
        true
    }

    /// Applies what ocserv showed for pending `id` of `username` (`None`: not listed, or
    /// ocserv could not answer).
    pub fn check(&mut self, id: u32, username: &str, seen: Option<&Session>) -> Check {
        let Some(p) = self.by_id.get_mut(&id).filter(|p| p.username == username) else {
            return Check::NotPending;
        };
        let live = seen.is_some_and(|s| {
            s.id == id
                && s.username == username
                && s.state == crate::ocserv::SessionState::Connected
        });
        if live {
            self.by_id.remove(&id);
            return Check::Confirmed;
        }
        p.checks += 1;
        match CONFIRM_AFTER.get(p.checks) {
            Some(delay) => Check::Again(*delay),
            None => {
                self.by_id.remove(&id);
                Check::GaveUp
            }
        }
    }

    /// Forgets pending `id` of `username` (its disconnect came first); true when it was pending.
    pub fn forget(&mut self, id: u32, username: &str) -> bool {
        let pending = self.by_id.get(&id).is_some_and(|p| p.username == username);
        if pending {
            self.by_id.remove(&id);
        }
        pending
    }

    /// Removes the pending sessions that a session list shows connected; returns how many.
    pub fn confirm_listed<'a>(&mut self, sessions: impl IntoIterator<Item = &'a Session>) -> usize {
        let before = self.by_id.len();
        for s in sessions {
            let live = s.state == crate::ocserv::SessionState::Connected;
            if live
                && self
                    .by_id
                    .get(&s.id)
                    .is_some_and(|p| p.username == s.username)
            {
                self.by_id.remove(&s.id);
            }
        }
        before - self.by_id.len()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// How long a session that left ocserv's list (or that the agent kicked) waits for its
/// disconnect script's final counters before it is reported ended with the last known ones.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Sessions waiting [`CLOSE_GRACE`] at most, beyond which the oldest are released at once.
pub const MAX_CLOSING: usize = 10_000;

/// Sessions that ended as far as ocserv's list (or a kick, or the event stream) tells, waiting
/// briefly for their disconnect script, whose report carries the final counters.
#[derive(Debug, Default)]
pub struct Closing {
    entries: std::collections::VecDeque<ClosingSession>,
}

/// One session in [`Closing`].
#[derive(Debug, Clone, PartialEq)]
pub struct ClosingSession {
    pub session: Arc<Session>,
    /// Why it ended, when known (a kick's or the event stream's reason).
    pub reason: Option<crate::metrics::DisconnectReason>,
    due: Instant,
}

impl Closing {
    /// Adds `session` (once: a second notice keeps the first, completing its reason); returns
    /// the sessions released at once to stay within [`MAX_CLOSING`].
    pub fn add(
        &mut self,
        session: Arc<Session>,
        reason: Option<crate::metrics::DisconnectReason>,
        now: Instant,
    ) -> Vec<ClosingSession> {
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| same_session(&e.session, &session))
        {
            e.reason = e.reason.or(reason);
            return Vec::new();
        }
        self.entries.push_back(ClosingSession {
            session,
            reason,
            due: now + CLOSE_GRACE,
        });
        let excess = self.entries.len().saturating_sub(MAX_CLOSING);
        self.entries.drain(..excess).collect()
    }

    /// The waiting session that a disconnect script reports (same ID and username).
    pub fn take(&mut self, id: u32, username: &str) -> Option<ClosingSession> {
        let at = self
            .entries
            .iter()
            .position(|e| e.session.id == id && e.session.username == username)?;
        self.entries.remove(at)
    }

    /// The sessions whose grace has passed at `now`.
    pub fn due(&mut self, now: Instant) -> Vec<ClosingSession> {
        let (due, wait): (Vec<_>, Vec<_>) = self.entries.drain(..).partition(|e| e.due <= now);
        self.entries = wait.into();
        due
    }

    /// When the next session is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries.iter().map(|e| e.due).min()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The record of a session known only from its disconnect script's report (it ended before
/// ocserv was asked about it): its connect time derived from `STATS_DURATION`.
pub fn hook_record(e: &crate::messages::HookEvent) -> crate::store::SessionRecord {
    let ended =
        e.at.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
    let lasted = e.duration.map_or(0, |d| d.as_secs());
    crate::store::SessionRecord {
        id: e.id,
        safe_id: None,
        connected_at: ended.saturating_sub(lasted),
        username: e.username.clone(),
        groupname: e.groupname.clone(),
        client_ip: e.client_ip,
        vpn_ip: e.vpn_ip,
        device: e.device.clone(),
        hostname: String::new(),
        user_agent: String::new(),
        vhost: String::new(),
        bytes_in: e.bytes_in.unwrap_or(0),
        bytes_out: e.bytes_out.unwrap_or(0),
    }
}

/// How many slices `portal.validate_interval` is cut into: one slice per second, at most 300
/// (so a slice comes every second up to a 5-minute interval, and longer intervals keep 300).
pub fn validation_slices(interval: Duration) -> u64 {
    interval.as_secs().clamp(1, 300)
}

/// The sessions to revalidate in slice `round` of `slices`: each session falls in one slice
/// (by its identity), so every live session is validated once per interval and a thousand
/// sessions make a few calls a second, never a burst.
pub fn validation_slice<'a>(
    sessions: impl IntoIterator<Item = &'a Session>,
    round: u64,
    slices: u64,
) -> Vec<&'a Session> {
    let slices = slices.max(1);
    sessions
        .into_iter()
        .filter(|s| is_connected(s))
        .filter(|s| (u64::from(s.id) ^ s.connected_at.rotate_left(17)) % slices == round % slices)
        .collect()
}

/// How far a connect time derived from the script's `STATS_DURATION` may be from the table's
/// (both in whole seconds, and the script runs a moment after the session ended).
pub const DURATION_SLACK_SECS: u64 = 5;

impl SessionTable {
    /// The table's session that a disconnect script's report names: same ID and username and,
    /// when the duration is known, a connect time that fits it. `None` when the ID names another
    /// (or no) session: a recycled PID must never end someone else's session.
    pub fn disconnected(
        &self,
        id: u32,
        username: &str,
        duration: Option<Duration>,
        now_unix: u64,
    ) -> Option<SessionKey> {
        let s = self.by_id.get(&id)?;
        if s.username != username {
            return None;
        }
        if let Some(d) = duration {
            let derived = now_unix.saturating_sub(d.as_secs());
            if s.connected_at != 0 && s.connected_at.abs_diff(derived) > DURATION_SLACK_SECS {
                return None;
            }
        }
        Some(s.key())
    }
}

/// Sessions the agent itself just disconnected, so that a reconcile whose fetch started before
/// the kick cannot bring them back. Fetches are numbered in start order; a tombstone recorded
/// while fetch `n` was the latest started filters the results of fetches `<= n` and is dropped
/// once a later fetch is applied (that fetch saw ocserv after the kick, and its word wins).
#[derive(Debug, Default, Clone)]
pub struct Forgotten {
    entries: Vec<(SessionKey, u64)>,
}

/// At most this many tombstones are kept (oldest dropped first) while fetches keep failing.
pub const MAX_FORGOTTEN: usize = 10_000;

impl Forgotten {
    /// Records `keys` as gone; `latest_started` is the number of the latest fetch started.
    pub fn add(&mut self, keys: impl IntoIterator<Item = SessionKey>, latest_started: u64) {
        self.entries
            .extend(keys.into_iter().map(|k| (k, latest_started)));
        if self.entries.len() > MAX_FORGOTTEN {
            let excess = self.entries.len() - MAX_FORGOTTEN;
            self.entries.drain(..excess);
        }
    }

    /// Removes from `fresh` (the result of fetch number `fetch`) the sessions forgotten after
    /// that fetch started, and drops the tombstones that fetch made obsolete.
    pub fn filter(&mut self, fresh: Vec<Session>, fetch: u64) -> Vec<Session> {
        let fresh = fresh
            .into_iter()
            .filter(|s| {
                !self
                    .entries
                    .iter()
                    .any(|(k, at)| fetch <= *at && k.matches(s))
            })
            .collect();
        self.entries.retain(|(_, at)| *at >= fetch);
        fresh
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The registry's synchronization state: fetches in flight, the last success, and the early
/// retry schedule used until the registry has once agreed with ocserv (after a restart `OcservCtl`
/// may itself still be coming back, and waiting a whole interval would leave the view empty).
#[derive(Debug, Clone)]
pub struct SyncState {
    last_sync: Option<Instant>,
    failures: u32,
    /// Number of the latest fetch started (0: none yet).
    started: u64,
    in_flight: bool,
    retry: Backoff,
}

/// What the actor should do after a fetch result was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFetch {
    /// Nothing until the next tick.
    Wait,
    /// Not yet synchronized: try again after this delay.
    RetryAfter(Duration),
}

impl SyncState {
    /// Early retries start at 50 ms and double up to the reconcile interval.
    pub fn new(reconcile_interval: Duration) -> Self {
        let first = Duration::from_millis(50);
        Self {
            last_sync: None,
            failures: 0,
            started: 0,
            in_flight: false,
            retry: Backoff::new(first, reconcile_interval.max(first), 2.0)
                .expect("50 ms initial, max >= initial, multiplier 2 are valid"),
        }
    }

    /// Starts a fetch unless one is under way; returns its number.
    pub fn begin(&mut self) -> Option<u64> {
        if self.in_flight {
            return None;
        }
        self.in_flight = true;
        self.started += 1;
        Some(self.started)
    }

    /// Number of the latest fetch started.
    pub fn latest_started(&self) -> u64 {
        self.started
    }

    /// Records the outcome of the fetch under way.
    pub fn finish(&mut self, ok: bool, now: Instant) -> AfterFetch {
        self.in_flight = false;
        if ok {
            self.last_sync = Some(now);
            self.failures = 0;
            return AfterFetch::Wait;
        }
        let attempt = self.failures;
        self.failures = self.failures.saturating_add(1);
        if self.last_sync.is_none() {
            AfterFetch::RetryAfter(self.retry.delay(attempt))
        } else {
            AfterFetch::Wait
        }
    }

    /// When the view last agreed with ocserv (None: never since this registry started).
    pub fn last_sync(&self) -> Option<Instant> {
        self.last_sync
    }

    /// Failed fetches in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ocserv::{ByteCounters, SessionState};
    use proptest::prelude::*;

    #[test]
    fn a_pending_session_is_confirmed_retried_or_given_up() {
        let mut p = Pending::default();
        assert!(p.admit(7, "ann"));
        let mut early = session(7, "ann", 100);
        early.state = SessionState::AuthFailed;
        // Still in the script's "auth failed" state, then not listed: ask again, backing off.
        assert_eq!(
            p.check(7, "ann", Some(&early)),
            Check::Again(CONFIRM_AFTER[1])
        );
        assert_eq!(p.check(7, "ann", None), Check::Again(CONFIRM_AFTER[2]));
        // Another user under the same (recycled) ID is not ann's session.
        let bob = session(7, "bob", 100);
        assert_eq!(
            p.check(7, "ann", Some(&bob)),
            Check::Again(CONFIRM_AFTER[3])
        );
        assert_eq!(p.check(7, "bob", Some(&bob)), Check::NotPending);
        assert_eq!(
            p.check(7, "ann", Some(&session(7, "ann", 100))),
            Check::Confirmed
        );
        assert!(p.is_empty());
        assert_eq!(p.check(7, "ann", None), Check::NotPending);

        // At most one check per delay: the last one gives up.
        assert!(p.admit(8, "cy"));
        for delay in &CONFIRM_AFTER[1..] {
            assert_eq!(p.check(8, "cy", None), Check::Again(*delay));
        }
        assert_eq!(p.check(8, "cy", None), Check::GaveUp);
        assert!(p.is_empty());

        assert!(p.admit(9, "di"));
        assert!(!p.forget(9, "other"), "only by its own user");
        assert!(p.forget(9, "di"));
        assert_eq!(p.check(9, "di", None), Check::NotPending);
    }

    #[test]
    fn pending_sessions_are_bounded_and_confirmed_by_a_list() {
        let mut p = Pending::default();
        for id in 0..MAX_PENDING as u32 {
            assert!(p.admit(id, "u"));
        }
        assert!(!p.admit(u32::MAX, "u"), "full");
        assert!(p.admit(3, "v"), "a recycled ID replaces its entry");
        let mut not_yet = session(4, "u", 1);
        not_yet.state = SessionState::AuthFailed;
        let listed = [
            session(1, "u", 1),
            session(2, "other", 1),
            session(3, "v", 1),
            not_yet,
        ];
        assert_eq!(p.confirm_listed(&listed), 2, "1 and 3");
        assert_eq!(p.len(), MAX_PENDING - 2);
    }

    #[test]
    fn upsert_adds_replaces_or_updates_one_session() {
        let mut t = SessionTable::default();
        let v0 = t.version();
        assert_eq!(
            t.upsert(session(5, "ann", 100)),
            (true, None),
            "new and connected"
        );
        assert_ne!(t.version(), v0);
        let v1 = t.version();
        assert_eq!(
            t.upsert(session(5, "ann", 100)),
            (false, None),
            "the same session"
        );
        assert_eq!(t.version(), v1, "unchanged: same version");
        let mut later = session(5, "ann", 100);
        later.state = SessionState::AuthFailed;
        assert_eq!(t.upsert(later), (false, None));
        assert_eq!(t.get(5).unwrap().state, SessionState::AuthFailed);
        let (newly, _) = t.upsert(session(5, "ann", 100));
        assert!(newly, "connected again after a state that was not");
        let (newly, replaced) = t.upsert(session(5, "bob", 200));
        assert!(newly, "a recycled ID is a new session");
        assert_eq!(
            replaced.unwrap().username,
            "ann",
            "the old one is handed back"
        );
        assert_eq!(t.get(5).unwrap().username, "bob");
        assert_eq!(t.len(), 1);
    }

    pub(crate) fn session(id: u32, user: &str, at: u64) -> Session {
        Session {
            id,
            // Distinct per (id, connect time), as ocserv's session ids are.
            safe_id: Some(format!("{id:0>14}{at:0>14}")),
            username: user.into(),
            groupname: String::new(),
            state: SessionState::Connected,
            client_ip: None,
            vpn_ipv4: None,
            vpn_ipv6: None,
            server_ptp_ipv4: None,
            device: format!("vpns{id}"),
            connected_at: at,
            hostname: String::new(),
            user_agent: String::new(),
            vhost: String::new(),
            tls_ciphersuite: String::new(),
            dtls_ciphersuite: String::new(),
            mtu: None,
            dns: vec![],
            routes: vec![],
            counters: None,
        }
    }

    #[test]
    fn opens_closes_and_updates() {
        let mut t = SessionTable::default();
        let d = t.reconcile(vec![session(1, "a", 10), session(2, "b", 10)]);
        assert_eq!(d.opened, vec![1, 2]);
        assert!(d.closed.is_empty());

        let mut s2 = session(2, "b", 10);
        s2.counters = Some(ByteCounters {
            bytes_in: 5,
            bytes_out: 6,
        });
        let d = t.reconcile(vec![s2, session(3, "a", 11)]);
        assert_eq!(d.opened, vec![3]);
        assert_eq!(d.closed.iter().map(|s| s.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(d.updated, 1);
        assert_eq!(
            t.sessions(Some("a")).map(|s| s.id).collect::<Vec<_>>(),
            vec![3]
        );
    }

    #[test]
    fn recycled_pid_is_a_new_session() {
        let mut t = SessionTable::default();
        t.reconcile(vec![session(7, "a", 10)]);
        let d = t.reconcile(vec![session(7, "b", 99)]);
        assert_eq!(d.opened, vec![7]);
        assert_eq!(d.closed[0].username, "a");
        assert_eq!(t.get(7).unwrap().username, "b");
    }

    #[test]
    fn a_shifted_connect_time_with_the_same_session_id_is_the_same_session() {
        // occtl's connect time is local time learned through a UTC offset: a DST change or an
        // unknown offset shifts it, and that must not look like a closed and reopened session.
        let mut t = SessionTable::default();
        t.reconcile(vec![session(7, "a", 10)]);
        let mut shifted = session(7, "a", 10);
        shifted.connected_at += 3600;
        let d = t.reconcile(vec![shifted]);
        assert!(d.opened.is_empty() && d.closed.is_empty(), "{d:?}");
        // Without a session id on one side, the connect time decides.
        let mut bare = session(7, "a", 3610);
        bare.safe_id = None;
        let d = t.reconcile(vec![bare]);
        assert!(d.opened.is_empty() && d.closed.is_empty(), "{d:?}");
    }

    #[test]
    fn unreadable_counters_keep_last_known() {
        let mut t = SessionTable::default();
        let mut s = session(1, "a", 10);
        s.counters = Some(ByteCounters {
            bytes_in: 1,
            bytes_out: 2,
        });
        t.reconcile(vec![s]);
        t.reconcile(vec![session(1, "a", 10)]);
        assert_eq!(t.get(1).unwrap().counters.unwrap().bytes_out, 2);
    }

    #[test]
    fn unchanged_sessions_keep_their_allocation_and_the_version() {
        let mut t = SessionTable::default();
        t.reconcile(vec![session(1, "a", 10), session(2, "b", 10)]);
        let v = t.version();
        let all = t.all();
        assert!(Arc::ptr_eq(&all, &t.all()), "the snapshot is shared");
        let d = t.reconcile(vec![session(1, "a", 10), session(2, "b", 10)]);
        assert_eq!(d, ReconcileDiff::default());
        assert_eq!(t.version(), v, "nothing changed");
        assert!(Arc::ptr_eq(&all[0], &t.all()[0]), "entry reused");

        let mut s2 = session(2, "b", 10);
        s2.mtu = Some(1400);
        t.reconcile(vec![session(1, "a", 10), s2]);
        let v2 = t.version();
        assert_ne!(v2, v, "an update is a new version");
        assert!(!Arc::ptr_eq(&all, &t.all()), "and a new snapshot");
        assert_eq!(t.all()[1].mtu, Some(1400));
        t.remove(&[session(1, "a", 10).key()]);
        assert_ne!(t.version(), v2, "a removal is a new version");
        assert_eq!(t.all().len(), 1);
        // A new table never reuses another table's version.
        assert!(SessionTable::default().version() > t.version());
    }

    #[test]
    fn a_disconnect_report_names_only_the_very_session() {
        let mut t = SessionTable::default();
        t.reconcile(vec![session(7, "a", 1_000)]);
        let d = |secs| Some(Duration::from_secs(secs));
        assert_eq!(
            t.disconnected(7, "a", d(500), 1_500),
            Some(session(7, "a", 1_000).key())
        );
        assert_eq!(t.disconnected(7, "a", None, 9_999).map(|k| k.id), Some(7));
        assert_eq!(t.disconnected(7, "b", d(500), 1_500), None, "another user");
        assert_eq!(t.disconnected(8, "a", d(500), 1_500), None, "another ID");
        assert_eq!(
            t.disconnected(7, "a", d(10), 1_500),
            None,
            "a session that connected long before the reported one (recycled PID)"
        );
        assert!(
            t.disconnected(7, "a", d(497), 1_502).is_some(),
            "within the slack"
        );
    }

    #[test]
    fn remove_takes_only_the_very_session() {
        let mut t = SessionTable::default();
        t.reconcile(vec![session(1, "a", 10), session(2, "b", 10)]);
        // A key of an older session under the recycled ID 2 removes nothing.
        assert!(t.remove(&[session(2, "old", 5).key()]).is_empty());
        assert_eq!(t.remove(&[session(1, "a", 10).key()]).len(), 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_fetch_started_before_a_kick_cannot_bring_the_session_back() {
        let mut f = Forgotten::default();
        let kicked = session(4, "a", 10);
        // Fetch 1 started, then the agent kicked session 4, then fetch 1 came back still listing it.
        f.add([kicked.key()], 1);
        let fresh = f.filter(vec![kicked.clone(), session(5, "b", 10)], 1);
        assert_eq!(fresh.iter().map(|s| s.id).collect::<Vec<_>>(), vec![5]);
        assert_eq!(f.len(), 1, "still needed for fetch 1's stragglers");
        // Fetch 2 started after the kick: its word wins and the tombstone goes.
        let fresh = f.filter(vec![kicked.clone()], 2);
        assert_eq!(fresh.len(), 1);
        assert!(f.is_empty());
        // A new session under the recycled ID is never filtered.
        f.add([kicked.key()], 3);
        assert_eq!(f.filter(vec![session(4, "c", 99)], 3).len(), 1);
    }

    #[test]
    fn every_connected_session_is_validated_once_per_round_of_slices() {
        let mut sessions: Vec<Session> = (1..=1000)
            .map(|i| session(i, "u", 1_700_000_000 + u64::from(i)))
            .collect();
        sessions[0].state = SessionState::AuthFailed;
        let slices = validation_slices(Duration::from_secs(300));
        assert_eq!(slices, 300);
        let mut seen = std::collections::HashMap::new();
        let mut largest = 0;
        for round in 7..7 + slices {
            let slice = validation_slice(&sessions, round, slices);
            largest = largest.max(slice.len());
            for s in slice {
                *seen.entry(s.id).or_insert(0) += 1;
            }
        }
        assert_eq!(
            seen.len(),
            999,
            "every connected session, not the one still authenticating"
        );
        assert!(seen.values().all(|n| *n == 1), "once each");
        assert!(largest <= 15, "no burst: at most {largest} in one slice");
        assert_eq!(validation_slices(Duration::from_millis(500)), 1);
        assert_eq!(validation_slices(Duration::from_secs(86_400)), 300);
    }

    #[test]
    fn closing_sessions_wait_for_their_script_or_their_grace() {
        let t0 = Instant::now();
        let mut c = Closing::default();
        let a = Arc::new(session(1, "ann", 100));
        assert!(c.add(a.clone(), None, t0).is_empty());
        assert!(c
            .add(
                a.clone(),
                Some(crate::metrics::DisconnectReason::IdleTimeout),
                t0
            )
            .is_empty());
        assert_eq!(
            c.len(),
            1,
            "one entry per session; the later notice gives its reason"
        );
        c.add(
            Arc::new(session(2, "bob", 100)),
            None,
            t0 + Duration::from_secs(1),
        );
        assert!(
            c.take(1, "bob").is_none(),
            "ID and username must both match"
        );
        let taken = c.take(1, "ann").expect("the script came");
        assert_eq!(
            taken.reason,
            Some(crate::metrics::DisconnectReason::IdleTimeout)
        );
        assert!(
            c.due(t0 + CLOSE_GRACE).is_empty(),
            "bob's grace runs a second longer"
        );
        assert_eq!(
            c.next_due(),
            Some(t0 + Duration::from_secs(1) + CLOSE_GRACE)
        );
        let due = c.due(t0 + Duration::from_secs(1) + CLOSE_GRACE);
        assert_eq!(due.len(), 1);
        assert!(c.is_empty());
    }

    #[test]
    fn tombstones_are_bounded() {
        let mut f = Forgotten::default();
        f.add(
            (0..MAX_FORGOTTEN as u32 + 5).map(|i| session(i, "a", 1).key()),
            1,
        );
        assert_eq!(f.len(), MAX_FORGOTTEN);
    }

    #[test]
    fn sync_state_retries_early_only_until_first_sync() {
        let mut s = SyncState::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(s.begin(), Some(1));
        assert_eq!(s.begin(), None, "one fetch at a time");
        let AfterFetch::RetryAfter(d) = s.finish(false, t) else {
            panic!("never synced: early retry")
        };
        assert!(d <= Duration::from_millis(50));
        assert_eq!(s.begin(), Some(2));
        let AfterFetch::RetryAfter(d2) = s.finish(false, t) else {
            panic!("never synced: early retry")
        };
        assert!(d2 >= Duration::from_millis(50) && d2 <= Duration::from_millis(100));
        assert_eq!(s.failures(), 2);
        s.begin();
        assert_eq!(s.finish(true, t), AfterFetch::Wait);
        assert_eq!((s.last_sync(), s.failures()), (Some(t), 0));
        s.begin();
        assert_eq!(
            s.finish(false, t),
            AfterFetch::Wait,
            "synced once: wait for the tick"
        );
        assert_eq!(s.last_sync(), Some(t), "a failure keeps the last sync time");
    }

    proptest! {
        #[test]
        fn table_equals_fresh_list_after_reconcile(
            before in proptest::collection::btree_map(0u32..50, 0u64..3, 0..20),
            after in proptest::collection::btree_map(0u32..50, 0u64..3, 0..20),
        ) {
            let mut t = SessionTable::default();
            t.reconcile(before.iter().map(|(id, at)| session(*id, "u", *at)).collect());
            let d = t.reconcile(after.iter().map(|(id, at)| session(*id, "u", *at)).collect());
            let ids: Vec<u32> = t.sessions(None).map(|s| s.id).collect();
            prop_assert_eq!(ids, after.keys().copied().collect::<Vec<_>>());
            // every session that left the table or was replaced is reported closed exactly once
            for s in &d.closed {
                prop_assert!(before.get(&s.id) == Some(&s.connected_at));
                prop_assert!(after.get(&s.id) != Some(&s.connected_at));
            }
            let closed = d.closed.len();
            let expected = before.iter().filter(|(id, at)| after.get(id) != Some(at)).count();
            prop_assert_eq!(closed, expected);
        }
    }
}
