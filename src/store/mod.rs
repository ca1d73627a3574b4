//! The durable store (DESIGN §4): one redb file, [`FILE_NAME`], in `agent.state_dir`.
//!
//! Opened once at start, before any actor, and kept in the shared context: it outlives every
//! actor (redb refuses a second open of one file, so a restarted `StateStore` goes on with the
//! same database). A store that cannot be opened (the directory cannot be made, permissions, a
//! corrupt or foreign file, another agent holding it) stops the start with [`EXIT_STORE`] and a
//! message naming the file: the agent never starts on an empty store silently.
//!
//! Tables: `meta` (the schema version); the session snapshot and the portal outbox
//! ([`sessions`]); `policy_decisions` (the portal's decisions the policy
//! cache holds, with their wall-clock fetch time, so that an agent restarted during a portal
//! outage still honours `fail_mode = "stale"` for users it admitted before); `audit` (every
//! management action: when, who, what, with which arguments, and the result; the newest
//! [`AUDIT_KEEP`] are kept). Values are JSON of plain persisted types; what is read back is
//! validated like outside input: an entry that does not parse is dropped, never trusted.
//!
//! Every function here blocks on the disk (each commit is fsynced): call them from a blocking
//! thread.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::policy::Decision;

mod sessions;
pub use sessions::{
    Change, EventKind, OutboxEvent, Peeked, Recorded, Reporting, SessionRecord, ENDED_KEEP,
};

/// The store's file in `agent.state_dir`.
pub const FILE_NAME: &str = "state.redb";

/// Exit code when the store cannot be opened (`EX_IOERR`).
pub const EXIT_STORE: i32 = 74;

/// The layout this version writes; a file of another version is refused, never rewritten.
const SCHEMA_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DECISIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("policy_decisions");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// How many audit records are kept: older ones are removed as new ones are added.
pub const AUDIT_KEEP: u64 = 100_000;

/// One management action, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the action was answered, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Who asked: the peer's uid and pid on the control socket, or its address over TCP.
    pub caller: String,
    /// The RPC, e.g. `DisconnectUser`.
    pub action: String,
    /// The request's fields.
    pub args: std::collections::BTreeMap<String, String>,
    /// `ok: ...` with what was done, or `error CODE: message`.
    pub result: String,
}

/// What one transaction writes.
#[derive(Debug, Default)]
pub struct Batch {
    /// Decisions to keep.
    pub decisions: Vec<KeptDecision>,
    /// Decisions to forget, by (username, groupname).
    pub forget: Vec<(String, String)>,
    /// Audit records to append, oldest first.
    pub audit: Vec<AuditRecord>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty() && self.forget.is_empty() && self.audit.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("agent.state_dir: cannot create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent.state_dir: cannot open the state store {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("state store {path}: {reason}")]
    Failed { path: PathBuf, reason: String },
}

/// A cached decision as it is kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredDecision {
    allowed: bool,
    reason: Option<String>,
    routes: Vec<String>,
    no_routes: Vec<String>,
    dns: Vec<String>,
    #[serde(default)]
    should_disconnect: bool,
    /// When the portal answered, in milliseconds since the Unix epoch.
    fetched_at_ms: u64,
}

impl StoredDecision {
    fn of(k: &KeptDecision) -> Self {
        let d = &k.decision;
        let strings = |v: &[_]| v.iter().map(ToString::to_string).collect();
        Self {
            allowed: d.allowed,
            reason: d.reason.clone(),
            routes: strings(&d.routes),
            no_routes: strings(&d.no_routes),
            dns: d.dns.iter().map(ToString::to_string).collect(),
            should_disconnect: k.should_disconnect,
            fetched_at_ms: unix_ms(k.fetched_at),
        }
    }

    /// The decision of (username, groupname) back, every address re-parsed; `None` when
    /// anything is off.
    fn kept(&self, username: String, groupname: String) -> Option<KeptDecision> {
        let nets = |v: &[String]| v.iter().map(|s| s.parse().ok()).collect::<Option<Vec<_>>>();
        let decision = Decision {
            allowed: self.allowed,
            reason: self.reason.clone(),
            routes: nets(&self.routes)?,
            no_routes: nets(&self.no_routes)?,
            dns: self
                .dns
                .iter()
                .map(|s| s.parse().ok())
                .collect::<Option<Vec<_>>>()?,
        };
        Some(KeptDecision {
            username,
            groupname,
            decision,
            should_disconnect: self.should_disconnect,
            fetched_at: UNIX_EPOCH + Duration::from_millis(self.fetched_at_ms),
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// The key of one (username, groupname): unambiguous whatever the names hold.
fn key(username: &str, groupname: &str) -> String {
    serde_json::to_string(&(username, groupname)).unwrap_or_default()
}

fn unkey(key: &str) -> Option<(String, String)> {
    serde_json::from_str(key).ok()
}

/// One portal decision kept in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptDecision {
    pub username: String,
    pub groupname: String,
    pub decision: Decision,
    /// The answer's `should_disconnect`.
    pub should_disconnect: bool,
    /// When the portal gave it.
    pub fetched_at: SystemTime,
}

/// What [`Store::load_decisions`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Usable entries, newest first.
    pub decisions: Vec<KeptDecision>,
    /// Entries dropped from the file: unreadable, past their use, or beyond the capacity.
    pub dropped: usize,
}

/// The open store.
pub struct Store {
    db: Database,
    path: PathBuf,
    /// [`AUDIT_KEEP`] (smaller in tests).
    audit_keep: u64,
    /// When ended sessions' tombstones were last pruned (Unix ms).
    last_prune_ms: std::sync::Mutex<u64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// The store file for `state_dir`.
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE_NAME)
    }

    /// Opens (or creates) the store in `state_dir`, creating the directory with mode 0700 when
    /// it is missing.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        if !state_dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(state_dir)
                .map_err(|source| StoreError::Dir {
                    path: state_dir.to_path_buf(),
                    source,
                })?;
        }
        let path = Self::path_in(state_dir);
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(e) => {
                return Err(StoreError::Open {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        let store = Store {
            db,
            path,
            audit_keep: AUDIT_KEEP,
            last_prune_ms: Default::default(),
        };
        store.check_schema().map_err(|e| match e {
            StoreError::Failed { path, reason } => StoreError::Open { path, reason },
            other => other,
        })?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether tombstones are due for pruning (at most once a minute).
    fn prune_due(&self, now_ms: u64) -> bool {
        let mut last = self.last_prune_ms.lock().unwrap_or_else(|p| p.into_inner());
        let due = now_ms.saturating_sub(*last) >= 60_000;
        if due {
            *last = now_ms;
        }
        due
    }

    fn failed(&self, reason: impl std::fmt::Display) -> StoreError {
        StoreError::Failed {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    /// A new file gets this version's schema; an existing one must have it.
    fn check_schema(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.failed(e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| self.failed(e))?;
            let found = meta
                .get("schema_version")
                .map_err(|e| self.failed(e))?
                .map(|v| v.value());
            match found {
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(self.failed(format!(
                        "schema version {other}, this agent reads {SCHEMA_VERSION}"
                    )))
                }
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| self.failed(e))?;
                }
            }
            tx.open_table(DECISIONS).map_err(|e| self.failed(e))?;
            tx.open_table(AUDIT).map_err(|e| self.failed(e))?;
            tx.open_table(sessions::SESSIONS)
                .map_err(|e| self.failed(e))?;
            tx.open_table(sessions::ENDED).map_err(|e| self.failed(e))?;
            tx.open_table(sessions::OUTBOX)
                .map_err(|e| self.failed(e))?;
            tx.open_table(sessions::OUTBOX_UPDATES)
                .map_err(|e| self.failed(e))?;
        }
        tx.commit().map_err(|e| self.failed(e))
    }

    /// Writes `batch` in one transaction (all of it or nothing).
    pub fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.failed(e))?;
        {
            let mut table = tx.open_table(DECISIONS).map_err(|e| self.failed(e))?;
            for kept in &batch.decisions {
                let value =
                    serde_json::to_vec(&StoredDecision::of(kept)).map_err(|e| self.failed(e))?;
                table
                    .insert(
                        key(&kept.username, &kept.groupname).as_str(),
                        value.as_slice(),
                    )
                    .map_err(|e| self.failed(e))?;
            }
            for (user, group) in &batch.forget {
                table
                    .remove(key(user, group).as_str())
                    .map_err(|e| self.failed(e))?;
            }
        }
        if !batch.audit.is_empty() {
            let mut table = tx.open_table(AUDIT).map_err(|e| self.failed(e))?;
            let last = table
                .last()
                .map_err(|e| self.failed(e))?
                .map_or(0, |(k, _)| k.value());
            let mut next = last;
            for record in &batch.audit {
                next += 1;
                let value = serde_json::to_vec(record).map_err(|e| self.failed(e))?;
                table
                    .insert(next, value.as_slice())
                    .map_err(|e| self.failed(e))?;
            }
            if next > self.audit_keep {
                table
                    .retain_in(..=next - self.audit_keep, |_, _| false)
                    .map_err(|e| self.failed(e))?;
            }
        }
        tx.commit().map_err(|e| self.failed(e))
    }

    /// The newest `limit` audit records with their sequence numbers, oldest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(|e| self.failed(e))?;
        let table = tx.open_table(AUDIT).map_err(|e| self.failed(e))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.failed(e))?.rev().take(limit) {
            let (k, v) = item.map_err(|e| self.failed(e))?;
            if let Ok(record) = serde_json::from_slice(v.value()) {
                out.push((k.value(), record));
            }
        }
        out.reverse();
        Ok(out)
    }

    /// The kept decisions still `usable` (given the decision and its age at `now`), at most
    /// `capacity` of them, newest first; every other entry is removed from the file in the same
    /// transaction.
    pub fn load_decisions(
        &self,
        now: SystemTime,
        capacity: usize,
        usable: impl Fn(&Decision, Duration) -> bool,
    ) -> Result<Loaded, StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.failed(e))?;
        let mut loaded = Loaded::default();
        {
            let mut table = tx.open_table(DECISIONS).map_err(|e| self.failed(e))?;
            let mut keep = Vec::new();
            let mut drop = Vec::new();
            for item in table.iter().map_err(|e| self.failed(e))? {
                let (k, v) = item.map_err(|e| self.failed(e))?;
                let k = k.value().to_string();
                let parsed = unkey(&k).and_then(|(user, group)| {
                    serde_json::from_slice::<StoredDecision>(v.value())
                        .ok()
                        .and_then(|s| s.kept(user, group))
                });
                match parsed {
                    Some(kept)
                        if usable(
                            &kept.decision,
                            now.duration_since(kept.fetched_at).unwrap_or_default(),
                        ) =>
                    {
                        keep.push((k, kept))
                    }
                    _ => drop.push(k),
                }
            }
            keep.sort_by_key(|(_, kept)| std::cmp::Reverse(kept.fetched_at));
            for (k, _) in keep.iter().skip(capacity) {
                drop.push(k.clone());
            }
            keep.truncate(capacity);
            for k in &drop {
                table.remove(k.as_str()).map_err(|e| self.failed(e))?;
            }
            loaded.dropped = drop.len();
            loaded.decisions = keep.into_iter().map(|(_, r)| r).collect();
        }
        tx.commit().map_err(|e| self.failed(e))?;
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow_with_routes() -> Decision {
        Decision {
            allowed: true,
            routes: vec!["10.1.0.0/16".parse().unwrap()],
            no_routes: vec!["10.1.2.0/24".parse().unwrap()],
            dns: vec!["10.1.0.53".parse().unwrap(), "fd00::53".parse().unwrap()],
            ..Decision::default()
        }
    }

    fn any(_: &Decision, _: Duration) -> bool {
        true
    }

    fn kept(
        user: &str,
        group: &str,
        decision: Decision,
        should_disconnect: bool,
        fetched_at: SystemTime,
    ) -> KeptDecision {
        KeptDecision {
            username: user.into(),
            groupname: group.into(),
            decision,
            should_disconnect,
            fetched_at,
        }
    }

    #[test]
    fn decisions_survive_a_reopen_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let deny = Decision::deny("suspended".to_string());
        {
            let s = Store::open(&state).unwrap();
            s.commit(&Batch {
                decisions: vec![
                    kept("alice", "staff", allow_with_routes(), true, at),
                    kept("bob", "", deny.clone(), false, at),
                ],
                ..Batch::default()
            })
            .unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the state directory is created 0700");
        let s = Store::open(&state).unwrap();
        let now = at + Duration::from_secs(5);
        let got = s.load_decisions(now, 10, any).unwrap();
        assert_eq!(got.dropped, 0);
        let mut got = got.decisions;
        got.sort_by(|a, b| a.username.cmp(&b.username));
        assert_eq!(
            got,
            vec![
                kept("alice", "staff", allow_with_routes(), true, at),
                kept("bob", "", deny, false, at),
            ]
        );
    }

    #[test]
    fn names_cannot_collide_in_keys() {
        assert_ne!(key("a\0b", "c"), key("a", "b\0c"));
        assert_ne!(key("ab", ""), key("a", "b"));
        assert_eq!(unkey(&key("a\"b", "g")), Some(("a\"b".into(), "g".into())));
    }

    #[test]
    fn loading_drops_what_is_unusable_unreadable_or_beyond_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let records: Vec<KeptDecision> = (0..5)
            .map(|i| {
                let at = t0 + Duration::from_secs(i);
                kept(&format!("u{i}"), "", Decision::allow(), false, at)
            })
            .collect();
        s.commit(&Batch {
            decisions: records,
            ..Batch::default()
        })
        .unwrap();
        // A value that is not a decision, and one whose route does not parse.
        let tx = s.db.begin_write().unwrap();
        {
            let mut t = tx.open_table(DECISIONS).unwrap();
            t.insert(key("junk", "").as_str(), b"not json".as_slice())
                .unwrap();
            let mut bad = StoredDecision::of(&kept("bad", "", Decision::allow(), false, t0));
            bad.routes = vec!["10.0.0.1/8\nroute = 0.0.0.0/0".into()];
            let bad = serde_json::to_vec(&bad).unwrap();
            t.insert(key("bad", "").as_str(), bad.as_slice()).unwrap();
            t.insert("not a key", b"{}".as_slice()).unwrap();
        }
        tx.commit().unwrap();
        // u0 is too old to use; of the rest, the capacity keeps the 3 newest.
        let now = t0 + Duration::from_secs(10);
        let usable = |_: &Decision, age: Duration| age < Duration::from_secs(10);
        let got = s.load_decisions(now, 3, usable).unwrap();
        let names: Vec<_> = got.decisions.iter().map(|r| r.username.as_str()).collect();
        assert_eq!(names, ["u4", "u3", "u2"]);
        assert_eq!(got.dropped, 5, "u0, u1, junk, bad and the bad key");
        // They are gone from the file, not only skipped.
        let again = s.load_decisions(now, 10, any).unwrap();
        assert_eq!(again.decisions.len(), 3);
        assert_eq!(again.dropped, 0);
        s.commit(&Batch {
            forget: vec![("u4".into(), String::new())],
            ..Batch::default()
        })
        .unwrap();
        assert_eq!(s.load_decisions(now, 10, any).unwrap().decisions.len(), 2);
    }

    #[test]
    fn an_unusable_store_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // Not a redb file.
        std::fs::write(dir.path().join(FILE_NAME), vec![0x5a; 8192]).unwrap();
        let e = Store::open(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::Open { .. }), "{e:?}");
        assert!(e.to_string().contains(FILE_NAME), "{e}");
        // The directory is a file.
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let e = Store::open(&file.join("state")).unwrap_err();
        assert!(
            e.to_string().starts_with("agent.state_dir: cannot create"),
            "{e}"
        );
    }

    #[test]
    fn a_second_open_of_one_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let e = Store::open(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::Open { .. }), "{e:?}");
    }

    #[test]
    fn another_schema_version_is_refused_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let tx = s.db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("schema_version", 99)
                .unwrap();
            tx.commit().unwrap();
        }
        let e = Store::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("schema version 99"), "{e}");
    }
    fn record(i: u64) -> AuditRecord {
        AuditRecord {
            at_ms: 1_700_000_000_000 + i,
            caller: "uid 0 pid 42".into(),
            action: "DisconnectUser".into(),
            args: [("username".to_string(), format!("u{i}"))].into(),
            result: "ok: 1 session".into(),
        }
    }

    #[test]
    fn audit_records_are_appended_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.commit(&Batch {
                audit: vec![record(1), record(2)],
                ..Batch::default()
            })
            .unwrap();
            s.commit(&Batch {
                audit: vec![record(3)],
                ..Batch::default()
            })
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let all = s.audit(10).unwrap();
        assert_eq!(
            all,
            vec![(1, record(1)), (2, record(2)), (3, record(3))],
            "sequence numbers continue across transactions"
        );
        assert_eq!(s.audit(2).unwrap(), vec![(2, record(2)), (3, record(3))]);
    }

    #[test]
    fn only_the_newest_audit_records_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.audit_keep = 3;
        for i in 1..=5 {
            s.commit(&Batch {
                audit: vec![record(i)],
                ..Batch::default()
            })
            .unwrap();
        }
        let kept: Vec<u64> = s.audit(100).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(kept, [3, 4, 5]);
    }
}
