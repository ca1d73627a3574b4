//! The rules of the decision cache, as pure functions and plain data (the PolicyCache actor
//! wires I/O to them).
//!
//! - [`freshness`]: is a cached [`Entry`] fresh, fresh but due for a background refresh
//!   ([`Freshness::RefreshAhead`], past [`REFRESH_AHEAD_PERCENT`] of its lifetime), stale
//!   (usable only when the portal fails or the breaker is open) or expired. Admissions and
//!   denials have their own lifetimes ([`Lifetimes`]).
//! - [`on_portal_failure`]: the answer when the portal cannot be asked, by [`FailMode`].
//! - [`PolicyStore`]: the bounded LRU of entries keyed by (username, groupname), with exact
//!   invalidation of one user. It holds no reference to any actor, so it can live in shared
//!   state (`Arc<Mutex<PolicyStore>>`) and outlive a restart of the actor that fills it. It
//!   lives in memory only: a process restart starts empty.
//! - [`InFlight`]: single-flight bookkeeping (one portal call per key, its waiters queued).
//!
//! Times are `Instant`s passed in by the caller; nothing here reads a clock or fails.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use lru::LruCache;

use super::{Decision, FailMode, Source};

/// A fresh entry is refreshed in the background once this share (in percent) of its lifetime
/// has passed and it is asked for, so a key in use never drops to a miss.
pub const REFRESH_AHEAD_PERCENT: u32 = 80;

/// The reason of a denial made because the portal could not be asked.
pub const UNAVAILABLE_REASON: &str = "the policy service is unavailable";

/// How long cached decisions live (from `[policy]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Fresh lifetime of an admission.
    pub allow_ttl: Duration,
    /// Fresh lifetime of a denial.
    pub deny_ttl: Duration,
    /// How long past its fresh lifetime an entry may still serve as a stale answer.
    pub stale_for: Duration,
}

impl Lifetimes {
    /// The fresh lifetime of `decision`.
    pub fn ttl(&self, decision: &Decision) -> Duration {
        match decision.allowed {
            true => self.allow_ttl,
            false => self.deny_ttl,
        }
    }

    /// How long `decision` is of any use: its fresh lifetime, then `stale_for` as a stale
    /// answer; past it the entry is expired.
    pub fn usable_for(&self, decision: &Decision) -> Duration {
        self.ttl(decision).saturating_add(self.stale_for)
    }
}

/// One cached portal decision and when it was fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub decision: Decision,
    /// The portal's `should_disconnect` with it: applied on every connect it answers.
    pub should_disconnect: bool,
    pub fetched_at: Instant,
}

/// How usable a cached entry is at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Freshness {
    /// Serve it.
    Fresh,
    /// Serve it, and refresh it in the background.
    RefreshAhead,
    /// Do not serve it, ask the portal; when that fails, [`on_portal_failure`] may use it.
    Stale,
    /// Of no use any more.
    Expired,
}

/// The freshness of `entry` at `now`: fresh for its lifetime (the last
/// `100 - REFRESH_AHEAD_PERCENT` % of it as `RefreshAhead`), then stale for `stale_for`, then
/// expired. An entry from the future (`now` before `fetched_at`) counts as just fetched.
pub fn freshness(entry: &Entry, now: Instant, lifetimes: &Lifetimes) -> Freshness {
    let age = now.saturating_duration_since(entry.fetched_at);
    let ttl = lifetimes.ttl(&entry.decision);
    let share = ttl.as_nanos() * u128::from(REFRESH_AHEAD_PERCENT) / 100;
    let refresh_at = Duration::from_nanos(u64::try_from(share).unwrap_or(u64::MAX));
    match age {
        a if a < refresh_at => Freshness::Fresh,
        a if a < ttl => Freshness::RefreshAhead,
        a if a < lifetimes.usable_for(&entry.decision) => Freshness::Stale,
        _ => Freshness::Expired,
    }
}

/// The answer when the portal failed (error, deadline) or the breaker is open, for a request
/// whose cached entry (if any) is `entry`:
/// - a fresh entry (it may have been stored since the request missed) is served: `cached`;
/// - `open` admits (`fail_open`), `closed` denies (`fail_closed`);
/// - `stale` serves a stale entry (`stale`), and denies without one (`fail_closed`).
///
/// An expired entry counts as none.
pub fn on_portal_failure(
    fail_mode: FailMode,
    entry: Option<&Entry>,
    now: Instant,
    lifetimes: &Lifetimes,
) -> (Decision, Source) {
    let state = entry.map(|e| (e, freshness(e, now, lifetimes)));
    match (state, fail_mode) {
        (Some((e, Freshness::Fresh | Freshness::RefreshAhead)), _) => {
            (e.decision.clone(), Source::Cached)
        }
        (Some((e, Freshness::Stale)), FailMode::Stale) => (e.decision.clone(), Source::Stale),
        (_, FailMode::Open) => (Decision::allow(), Source::FailOpen),
        (_, FailMode::Closed) => (Decision::deny(UNAVAILABLE_REASON), Source::FailClosed),
        (_, FailMode::Stale) => {
            let why = format!("{UNAVAILABLE_REASON} and no earlier decision is cached");
            (Decision::deny(why), Source::FailClosed)
        }
    }
}

/// A cache key: (username, groupname). The groupname may be empty.
pub type Key = (String, String);

fn key(username: &str, groupname: &str) -> Key {
    (username.to_owned(), groupname.to_owned())
}

/// Proof of when a portal call began, for [`PolicyStore::insert_fetched`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// The bounded store of cached decisions: LRU by (username, groupname), at most `capacity`.
#[derive(Debug)]
pub struct PolicyStore {
    entries: LruCache<Key, Entry>,
    /// Username → the groupnames it has entries under: exact invalidation of one user without
    /// scanning (and never by prefix).
    by_user: HashMap<String, HashSet<String>>,
    /// Invalidations so far: a portal answer fetched across one is not stored.
    invalidations: u64,
}

impl PolicyStore {
    /// An empty store of at most `capacity` entries (0 is taken as 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
            by_user: HashMap::new(),
            invalidations: 0,
        }
    }

    /// Entries held: the `ocserv_agent_cache_size` gauge.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.entries.cap().get()
    }

    /// The entry for the key, marked as recently used.
    pub fn get(&mut self, username: &str, groupname: &str) -> Option<&Entry> {
        self.entries.get(&key(username, groupname))
    }

    /// The entry for the key, leaving the LRU order alone.
    pub fn peek(&self, username: &str, groupname: &str) -> Option<&Entry> {
        self.entries.peek(&key(username, groupname))
    }

    /// Stores `entry`, replacing the key's previous one; the least recently used entry goes
    /// when the store is full.
    pub fn insert(&mut self, username: &str, groupname: &str, entry: Entry) {
        let k = key(username, groupname);
        if let Some((old, _)) = self.entries.push(k.clone(), entry) {
            if old != k {
                self.unindex(&old);
            }
        }
        let groups = self.by_user.entry(k.0).or_default();
        groups.insert(k.1);
    }

    /// Taken before a portal call; see [`PolicyStore::insert_fetched`].
    pub fn ticket(&self) -> Ticket {
        Ticket(self.invalidations)
    }

    /// Stores a portal answer unless an invalidation happened since `ticket` was taken (the
    /// answer may predate the change that caused it); returns whether it was stored.
    pub fn insert_fetched(
        &mut self,
        username: &str,
        groupname: &str,
        entry: Entry,
        ticket: Ticket,
    ) -> bool {
        if ticket != self.ticket() {
            return false;
        }
        self.insert(username, groupname, entry);
        true
    }

    /// Removes one key's entry.
    pub fn remove(&mut self, username: &str, groupname: &str) -> Option<Entry> {
        let k = key(username, groupname);
        let removed = self.entries.pop(&k);
        self.unindex(&k);
        self.invalidations = self.invalidations.wrapping_add(1);
        removed
    }

    /// Removes every entry of exactly `username` (any groupname); returns how many.
    pub fn invalidate_user(&mut self, username: &str) -> usize {
        self.invalidations = self.invalidations.wrapping_add(1);
        let groups = self.by_user.remove(username).unwrap_or_default();
        let popped = groups.into_iter().filter_map(|g| {
            let k = (username.to_owned(), g);
            self.entries.pop(&k)
        });
        popped.count()
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.invalidations = self.invalidations.wrapping_add(1);
        self.entries.clear();
        self.by_user.clear();
    }

    /// Changes the capacity (0 is taken as 1), dropping the least recently used entries over it.
    pub fn resize(&mut self, capacity: usize) {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        while self.entries.len() > capacity.get() {
            if let Some((k, _)) = self.entries.pop_lru() {
                self.unindex(&k);
            }
        }
        self.entries.resize(capacity);
    }

    /// Drops the entries that are [`Freshness::Expired`] at `now`; returns how many.
    pub fn purge_expired(&mut self, now: Instant, lifetimes: &Lifetimes) -> usize {
        let expired: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, e)| freshness(e, now, lifetimes) == Freshness::Expired)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            self.entries.pop(k);
            self.unindex(k);
        }
        expired.len()
    }

    fn unindex(&mut self, (user, group): &Key) {
        if let Some(groups) = self.by_user.get_mut(user) {
            groups.remove(group);
            if groups.is_empty() {
                self.by_user.remove(user);
            }
        }
    }
}

/// Whether a miss starts the portal call for its key or waits for the one in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// No call in flight for the key: make it (the waiter is queued too).
    First,
    /// A call is in flight: the waiter is answered when it completes.
    Joined,
}

/// Single-flight bookkeeping: the keys with a portal call in flight, each with the waiters
/// (reply ports, in the actor) to answer when it completes. Plain data: the caller makes the
/// call and reports its completion.
#[derive(Debug)]
pub struct InFlight<W> {
    calls: HashMap<Key, Vec<W>>,
}

impl<W> Default for InFlight<W> {
    fn default() -> Self {
        Self {
            calls: HashMap::new(),
        }
    }
}

impl<W> InFlight<W> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `waiter` for the key; [`Join::First`] when no call was in flight (make one).
    pub fn join(&mut self, username: &str, groupname: &str, waiter: W) -> Join {
        let mut first = false;
        let waiters = self
            .calls
            .entry(key(username, groupname))
            .or_insert_with(|| {
                first = true;
                Vec::new()
            });
        waiters.push(waiter);
        [Join::Joined, Join::First][usize::from(first)]
    }

    /// Marks a call in flight with nobody waiting yet (a background refresh); `false` when
    /// one already is (do not call again).
    pub fn begin(&mut self, username: &str, groupname: &str) -> bool {
        let k = key(username, groupname);
        match self.calls.contains_key(&k) {
            true => false,
            false => {
                self.calls.insert(k, Vec::new());
                true
            }
        }
    }

    /// The call for the key completed (or failed): its waiters, to answer; none if no call
    /// was in flight.
    pub fn complete(&mut self, username: &str, groupname: &str) -> Vec<W> {
        self.calls
            .remove(&key(username, groupname))
            .unwrap_or_default()
    }

    pub fn is_in_flight(&self, username: &str, groupname: &str) -> bool {
        self.calls.contains_key(&key(username, groupname))
    }

    /// Keys with a call in flight.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Waiters queued across all keys.
    pub fn waiters(&self) -> usize {
        self.calls.values().map(Vec::len).sum()
    }

    /// Forgets every call, returning all waiters (to answer on shutdown).
    pub fn drain(&mut self) -> Vec<W> {
        self.calls.drain().flat_map(|(_, w)| w).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use proptest::prelude::*;

    const L: Lifetimes = Lifetimes {
        allow_ttl: Duration::from_secs(100),
        deny_ttl: Duration::from_secs(10),
        stale_for: Duration::from_secs(50),
    };

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn entry(allowed: bool, at: Instant) -> Entry {
        let decision = match allowed {
            true => Decision::allow(),
            false => Decision::deny("portal says no"),
        };
        Entry {
            decision,
            should_disconnect: false,
            fetched_at: at,
        }
    }

    #[test]
    fn freshness_by_age_with_separate_lifetimes() {
        let t = Instant::now();
        let (allow, deny) = (entry(true, t), entry(false, t));
        let at = |e: &Entry, d: Duration| freshness(e, t + d, &L);
        use Freshness::*;
        let allow_steps = [
            (s(0), Fresh),
            (s(79), Fresh),
            (s(80), RefreshAhead),
            (s(99), RefreshAhead),
            (s(100), Stale),
            (s(149), Stale),
            (s(150), Expired),
            (s(10_000), Expired),
        ];
        for (age, f) in allow_steps {
            assert_eq!(at(&allow, age), f, "allow at {age:?}");
        }
        let deny_steps = [
            (s(7), Fresh),
            (s(8), RefreshAhead),
            (s(10), Stale),
            (s(59), Stale),
            (s(60), Expired),
        ];
        for (age, f) in deny_steps {
            assert_eq!(at(&deny, age), f, "deny at {age:?}");
        }
        // From the future: just fetched. No stale window: fresh, then expired.
        assert_eq!(freshness(&entry(true, t + s(5)), t, &L), Fresh);
        let none = Lifetimes {
            stale_for: Duration::ZERO,
            ..L
        };
        assert_eq!(freshness(&allow, t + s(100), &none), Expired);
        assert_eq!(
            freshness(&allow, t + Duration::from_millis(99_999), &none),
            RefreshAhead
        );
    }

    #[test]
    fn fail_modes_resolve_as_documented() {
        let t = Instant::now();
        let stale_allow = entry(true, t);
        let now = t + s(120); // stale for the admission
        let stale = Some(&stale_allow);
        let later = t + s(150);

        let (d, src) = on_portal_failure(FailMode::Stale, stale, now, &L);
        assert_eq!((d.allowed, src), (true, Source::Stale));
        let (d, src) = on_portal_failure(FailMode::Stale, None, now, &L);
        assert_eq!((d.allowed, src), (false, Source::FailClosed));
        assert!(d.reason.unwrap().contains("no earlier decision"));
        let (d, src) = on_portal_failure(FailMode::Stale, stale, later, &L);
        assert_eq!(
            (d.allowed, src),
            (false, Source::FailClosed),
            "expired counts as none"
        );
        // A stale denial stays a denial, as stale.
        let stale_deny = entry(false, t);
        let (d, src) = on_portal_failure(FailMode::Stale, Some(&stale_deny), t + s(20), &L);
        assert_eq!(
            (d.allowed, d.reason.as_deref(), src),
            (false, Some("portal says no"), Source::Stale)
        );

        for e in [None, stale] {
            let (d, src) = on_portal_failure(FailMode::Open, e, now, &L);
            assert_eq!((d, src), (Decision::allow(), Source::FailOpen));
            let (d, src) = on_portal_failure(FailMode::Closed, e, now, &L);
            assert_eq!((d.allowed, src), (false, Source::FailClosed));
            assert_eq!(d.reason.as_deref(), Some(UNAVAILABLE_REASON));
        }
        // A fresh entry is served whatever the mode.
        for mode in [FailMode::Stale, FailMode::Open, FailMode::Closed] {
            let (d, src) = on_portal_failure(mode, Some(&stale_deny), t + s(9), &L);
            assert_eq!((d.allowed, src), (false, Source::Cached), "{mode:?}");
        }
    }

    #[test]
    fn store_is_bounded_lru_and_counts() {
        let t = Instant::now();
        let mut st = PolicyStore::new(2);
        assert_eq!((st.len(), st.capacity(), st.is_empty()), (0, 2, true));
        st.insert("a", "g", entry(true, t));
        st.insert("b", "g", entry(true, t));
        assert!(
            st.get("a", "g").is_some(),
            "a is now the most recently used"
        );
        st.insert("c", "g", entry(false, t));
        assert_eq!(st.len(), 2);
        assert!(st.peek("b", "g").is_none(), "b was the least recently used");
        assert!(st.peek("a", "g").is_some() && st.peek("c", "g").is_some());
        // Replacing a key keeps the count.
        st.insert("a", "g", entry(false, t));
        assert_eq!(
            (st.len(), st.peek("a", "g").unwrap().decision.allowed),
            (2, false)
        );
        // Evicted keys leave the user index: invalidating b finds nothing.
        assert_eq!(st.invalidate_user("b"), 0);
        assert_eq!(PolicyStore::new(0).capacity(), 1);
    }

    #[test]
    fn invalidation_is_exact_never_by_prefix() {
        let t = Instant::now();
        let mut st = PolicyStore::new(100);
        for (u, g) in [
            ("al", "x"),
            ("al", "y"),
            ("al", ""),
            ("alice", "x"),
            ("xal", "x"),
            ("Al", "x"),
        ] {
            st.insert(u, g, entry(true, t));
        }
        assert_eq!(st.invalidate_user("al"), 3);
        assert_eq!(st.len(), 3);
        for (u, g) in [("alice", "x"), ("xal", "x"), ("Al", "x")] {
            assert!(st.peek(u, g).is_some(), "{u} kept");
        }
        assert_eq!(st.invalidate_user("al"), 0);
        assert_eq!(
            st.remove("alice", "x").map(|e| e.decision.allowed),
            Some(true)
        );
        assert_eq!(st.remove("alice", "x"), None);
        st.clear();
        assert!(st.is_empty());
    }

    #[test]
    fn an_answer_fetched_across_an_invalidation_is_not_stored() {
        let t = Instant::now();
        let mut st = PolicyStore::new(10);
        let ticket = st.ticket();
        assert!(st.insert_fetched("a", "g", entry(true, t), ticket));
        let ticket = st.ticket();
        st.invalidate_user("someone");
        assert!(!st.insert_fetched("a", "h", entry(true, t), ticket));
        assert!(st.peek("a", "h").is_none());
        assert!(st.insert_fetched("a", "h", entry(true, t), st.ticket()));
    }

    #[test]
    fn resize_and_purge_keep_the_index() {
        let t = Instant::now();
        let mut st = PolicyStore::new(10);
        for i in 0..10 {
            st.insert(&format!("u{i}"), "g", entry(i % 2 == 0, t));
        }
        st.resize(4);
        assert_eq!((st.len(), st.capacity()), (4, 4));
        assert!(st.peek("u9", "g").is_some() && st.peek("u0", "g").is_none());
        assert_eq!(st.invalidate_user("u0"), 0);
        // u6, u8 allowed (alive until 150 s); u7, u9 denied (expired at 60 s).
        assert_eq!(st.purge_expired(t + s(60), &L), 2);
        assert_eq!(st.len(), 2);
        assert_eq!(st.invalidate_user("u7"), 0);
        assert_eq!(st.invalidate_user("u8"), 1);
    }

    #[test]
    fn store_can_be_shared_and_outlive_its_user() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Arc<Mutex<PolicyStore>>>();
        let shared = Arc::new(Mutex::new(PolicyStore::new(10)));
        let t = Instant::now();
        let actor = {
            let store = Arc::clone(&shared);
            std::thread::spawn(move || store.lock().unwrap().insert("a", "g", entry(true, t)))
        };
        actor.join().unwrap();
        assert!(
            shared.lock().unwrap().peek("a", "g").is_some(),
            "survives its writer"
        );
    }

    #[test]
    fn single_flight_makes_one_call_per_key() {
        let mut f: InFlight<u32> = InFlight::new();
        assert_eq!(f.join("a", "g", 1), Join::First);
        assert_eq!(f.join("a", "g", 2), Join::Joined);
        assert_eq!(
            f.join("a", "h", 3),
            Join::First,
            "another groupname is another key"
        );
        assert_eq!(f.join("ab", "g", 4), Join::First);
        assert_eq!((f.len(), f.waiters()), (3, 4));
        assert!(f.is_in_flight("a", "g") && !f.is_in_flight("b", "g"));
        assert_eq!(f.complete("a", "g"), [1, 2]);
        assert!(f.complete("a", "g").is_empty(), "completed once");
        assert_eq!(
            f.join("a", "g", 5),
            Join::First,
            "a new miss after completion calls again"
        );
        // A background refresh marks the key; misses join it.
        assert!(f.begin("r", "g"));
        assert!(!f.begin("r", "g"));
        assert_eq!(f.join("r", "g", 6), Join::Joined);
        assert_eq!(f.complete("r", "g"), [6]);
        let mut rest = f.drain();
        rest.sort();
        assert_eq!((rest, f.is_empty()), (vec![3, 4, 5], true));
    }

    proptest! {
        /// The store agrees with a model: bounded, an entry per key, exact invalidation.
        #[test]
        fn store_matches_a_model(ops in proptest::collection::vec((0u8..4, 0usize..6, 0usize..3), 1..200)) {
            let users = ["a", "al", "alice", "b", "", "a l"];
            let groups = ["", "g", "al"];
            let t = Instant::now();
            let mut st = PolicyStore::new(5);
            let mut model: Vec<(usize, usize)> = Vec::new(); // most recent last
            for (op, u, g) in ops {
                match op {
                    0 | 1 => {
                        st.insert(users[u], groups[g], entry(true, t));
                        model.retain(|k| *k != (u, g));
                        model.push((u, g));
                        if model.len() > 5 {
                            model.remove(0);
                        }
                    }
                    2 => {
                        let hit = st.get(users[u], groups[g]).is_some();
                        let pos = model.iter().position(|k| *k == (u, g));
                        prop_assert_eq!(hit, pos.is_some());
                        if let Some(p) = pos {
                            let k = model.remove(p);
                            model.push(k);
                        }
                    }
                    _ => {
                        let n = st.invalidate_user(users[u]);
                        let before = model.len();
                        model.retain(|(mu, _)| *mu != u);
                        prop_assert_eq!(n, before - model.len());
                    }
                }
                prop_assert_eq!(st.len(), model.len());
                for (mu, mg) in &model {
                    prop_assert!(st.peek(users[*mu], groups[*mg]).is_some());
                }
            }
        }
    }
}
