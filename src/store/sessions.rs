//! The session snapshot and the portal outbox: what the portal has been told about sessions,
//! and the events it has not acknowledged yet.
//!
//! Tables: `sessions` (every session reported connected and not yet reported ended, with its
//! last known counters), `sessions_ended` (tombstones of sessions reported ended, kept
//! [`ENDED_KEEP`] so that a late or repeated notice of an ended session changes nothing),
//! `outbox` (events by sequence number, oldest first) and `outbox_updates` (the sequence numbers
//! of the outbox's session updates, so the oldest can be dropped first when it is full).
//!
//! [`Store::record`] applies a batch of [`Change`]s in one transaction, and every change is
//! idempotent: a session is reported connected once (a second notice of it, even after it
//! ended, does nothing) and ended once (a notice for a session already ended does nothing; one
//! for a session never reported connected reports both its connect and its end). So callers may
//! repeat a change whenever they are not sure it was kept (a crash between the commit and the
//! answer).
//!
//! A session is known by ocserv's ID (a recycled PID), its username, and its session id
//! (`safe_id`) when both sides have one, else its connect time within
//! [`crate::registry::DURATION_SLACK_SECS`] (a session that ended before ocserv was asked about it
//! is known only from its disconnect script: its connect time is derived from `STATS_DURATION`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::metrics::DisconnectReason;
use crate::ocserv::Session;

/// Live sessions by (ocserv ID, connect time).
pub(super) const SESSIONS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("sessions");
/// Tombstones of ended sessions by (ocserv ID, connect time).
pub(super) const ENDED: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("sessions_ended");
/// Events for the portal by sequence number.
pub(super) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Sequence numbers of the outbox's session updates.
pub(super) const OUTBOX_UPDATES: TableDefinition<u64, ()> = TableDefinition::new("outbox_updates");

/// How long an ended session's tombstone is kept: far longer than any retry of a notice.
pub const ENDED_KEEP: Duration = Duration::from_secs(3600);

/// How far two connect times of one session may be apart when one side has no session id.
const SLACK_SECS: u64 = crate::registry::DURATION_SLACK_SECS;

/// A session as the store keeps it and the portal is told: its identity, who and where, and
/// its last known counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// ocserv's `ID` (the worker's PID).
    pub id: u32,
    /// The 28-character session id, when ocserv was asked about the session.
    pub safe_id: Option<String>,
    /// Unix seconds.
    pub connected_at: u64,
    pub username: String,
    pub groupname: String,
    pub client_ip: Option<IpAddr>,
    pub vpn_ip: Option<IpAddr>,
    pub device: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub user_agent: String,
    #[serde(default)]
    pub vhost: String,
    /// Bytes received from the client (its upload), as last known.
    pub bytes_in: u64,
    /// Bytes sent to the client, as last known.
    pub bytes_out: u64,
}

impl SessionRecord {
    /// The record of a session as ocserv shows it.
    pub fn of(s: &Session) -> Self {
        let counters = s.counters.unwrap_or_default();
        Self {
            id: s.id,
            safe_id: s.safe_id.clone(),
            connected_at: s.connected_at,
            username: s.username.clone(),
            groupname: s.groupname.clone(),
            client_ip: s.client_ip,
            vpn_ip: s.vpn_ip(),
            device: s.device.clone(),
            hostname: s.hostname.clone(),
            user_agent: s.user_agent.clone(),
            vhost: s.vhost.clone(),
            bytes_in: counters.bytes_in,
            bytes_out: counters.bytes_out,
        }
    }

    /// Whether both records are one session (see the module doc).
    pub fn same(&self, other: &SessionRecord) -> bool {
        self.id == other.id
            && self.username == other.username
            && match (&self.safe_id, &other.safe_id) {
                (Some(a), Some(b)) => a == b,
                _ => self.connected_at.abs_diff(other.connected_at) <= SLACK_SECS,
            }
    }

    fn table_key(&self) -> (u32, u64) {
        (self.id, self.connected_at)
    }

    /// The session's full identity, to act on it (re-checked against ocserv by the kick).
    pub fn session_key(&self) -> crate::ocserv::SessionKey {
        crate::ocserv::SessionKey {
            id: self.id,
            safe_id: self.safe_id.clone(),
            connected_at: self.connected_at,
        }
    }
}

/// One change of what the agent knows about sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// ocserv shows this session connected.
    Opened(SessionRecord),
    /// The session ended at `ended_at_ms` (Unix milliseconds) for `reason`; the record's
    /// counters are its final ones when known (the stored ones are used when larger), and
    /// `duration` is the script's `STATS_DURATION` when it reported the end.
    Closed {
        session: SessionRecord,
        ended_at_ms: u64,
        reason: DisconnectReason,
        duration: Option<u64>,
    },
    /// The session's counters at `at_ms` (a `ReportSessionUpdate` when reporting).
    Update { session: SessionRecord, at_ms: u64 },
    /// ocserv's whole list after the registry (re)started: sessions it shows that were never
    /// reported are reported connected; reported ones it no longer shows are reported ended at
    /// `at_ms` with the last known counters, and the reason in `known` when it names the session
    /// (the agent's recent kicks), else unspecified; the others are left alone.
    Resync {
        live: Vec<SessionRecord>,
        at_ms: u64,
        known: Vec<(crate::ocserv::SessionKey, DisconnectReason)>,
    },
}

/// What an outbox event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Connect,
    Disconnect,
    Update,
}

/// One event waiting for the portal's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEvent {
    /// The idempotency key (`metadata["event_id"]`): the same for every retry.
    pub event_id: String,
    pub kind: EventKind,
    pub session: SessionRecord,
    /// Unix milliseconds: when the session connected, ended, or was measured.
    pub at_ms: u64,
    /// Disconnects: the `DisconnectReason` number.
    #[serde(default)]
    pub reason: i32,
    /// Disconnects: the session's length in seconds.
    #[serde(default)]
    pub duration_secs: u64,
}

impl OutboxEvent {
    /// The disconnect reason (unknown numbers read as unspecified).
    pub fn reason(&self) -> DisconnectReason {
        DisconnectReason::try_from(self.reason).unwrap_or(DisconnectReason::Unspecified)
    }
}

/// How [`Store::record`] fills the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reporting {
    /// `agent.id`, part of every event id.
    pub agent_id: String,
    /// Whether events go to the outbox at all (`portal.report_events`); the snapshot is kept
    /// either way.
    pub report: bool,
    /// `portal.outbox_capacity`.
    pub capacity: usize,
}

/// What one [`Store::record`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Sessions newly reported connected.
    pub connects: usize,
    /// The reason of each session newly reported ended.
    pub disconnects: Vec<DisconnectReason>,
    /// Update events queued.
    pub updates: usize,
    /// The oldest update events dropped because the outbox was full.
    pub dropped_updates: usize,
    /// Events in the outbox after the transaction.
    pub depth: u64,
}

/// What [`Store::outbox_peek`] found.
#[derive(Debug, Default)]
pub struct Peeked {
    /// The oldest events, in order.
    pub events: Vec<(u64, OutboxEvent)>,
    /// Entries among them that do not parse (to be removed, never sent).
    pub unreadable: Vec<u64>,
}

fn event_id(agent: &str, kind: EventKind, s: &SessionRecord, at_ms: u64) -> String {
    match kind {
        EventKind::Connect => format!("{agent}:connect:{}:{}", s.id, s.connected_at),
        EventKind::Disconnect => format!("{agent}:disconnect:{}:{}", s.id, s.connected_at),
        EventKind::Update => format!("{agent}:update:{}:{}:{at_ms}", s.id, s.connected_at),
    }
}

/// The stored tombstone of an ended session.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tombstone {
    safe_id: Option<String>,
    username: String,
    ended_at_ms: u64,
}

type Tx = redb::WriteTransaction;

/// One transaction of [`Store::record`].
struct Recording<'a> {
    store: &'a Store,
    tx: &'a Tx,
    reporting: &'a Reporting,
    out: Recorded,
}

impl Recording<'_> {
    fn failed(&self, e: impl std::fmt::Display) -> StoreError {
        self.store.failed(e)
    }

    /// The live record that is `r`'s session.
    fn live(&self, r: &SessionRecord) -> Result<Option<SessionRecord>, StoreError> {
        let table = self.tx.open_table(SESSIONS).map_err(|e| self.failed(e))?;
        let range = table
            .range((r.id, 0)..=(r.id, u64::MAX))
            .map_err(|e| self.failed(e))?;
        for item in range {
            let (_, v) = item.map_err(|e| self.failed(e))?;
            if let Ok(stored) = serde_json::from_slice::<SessionRecord>(v.value()) {
                if stored.same(r) {
                    return Ok(Some(stored));
                }
            }
        }
        Ok(None)
    }

    /// Whether `r`'s session was reported ended.
    fn ended(&self, r: &SessionRecord) -> Result<bool, StoreError> {
        let table = self.tx.open_table(ENDED).map_err(|e| self.failed(e))?;
        let range = table
            .range((r.id, 0)..=(r.id, u64::MAX))
            .map_err(|e| self.failed(e))?;
        for item in range {
            let (k, v) = item.map_err(|e| self.failed(e))?;
            if let Ok(t) = serde_json::from_slice::<Tombstone>(v.value()) {
                let stored = SessionRecord {
                    safe_id: t.safe_id,
                    username: t.username,
                    connected_at: k.value().1,
                    ..r.clone()
                };
                if stored.same(r) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    fn put_live(&self, r: &SessionRecord) -> Result<(), StoreError> {
        let mut table = self.tx.open_table(SESSIONS).map_err(|e| self.failed(e))?;
        let value = serde_json::to_vec(r).map_err(|e| self.failed(e))?;
        table
            .insert(r.table_key(), value.as_slice())
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    fn push(
        &mut self,
        kind: EventKind,
        s: &SessionRecord,
        at_ms: u64,
        reason: DisconnectReason,
        duration_secs: u64,
    ) -> Result<(), StoreError> {
        if !self.reporting.report {
            return Ok(());
        }
        let event = OutboxEvent {
            event_id: event_id(&self.reporting.agent_id, kind, s, at_ms),
            kind,
            session: s.clone(),
            at_ms,
            reason: reason as i32,
            duration_secs,
        };
        let mut outbox = self.tx.open_table(OUTBOX).map_err(|e| self.failed(e))?;
        let seq = outbox
            .last()
            .map_err(|e| self.failed(e))?
            .map_or(0, |(k, _)| k.value())
            + 1;
        let value = serde_json::to_vec(&event).map_err(|e| self.failed(e))?;
        outbox
            .insert(seq, value.as_slice())
            .map_err(|e| self.failed(e))?;
        if kind == EventKind::Update {
            let mut updates = self
                .tx
                .open_table(OUTBOX_UPDATES)
                .map_err(|e| self.failed(e))?;
            updates.insert(seq, ()).map_err(|e| self.failed(e))?;
        }
        Ok(())
    }

    fn connect(&mut self, r: &SessionRecord) -> Result<(), StoreError> {
        self.put_live(r)?;
        self.out.connects += 1;
        self.push(
            EventKind::Connect,
            r,
            r.connected_at.saturating_mul(1000),
            DisconnectReason::Unspecified,
            0,
        )
    }

    /// Reports `r` ended (removing its live record when it has one).
    fn end(
        &mut self,
        r: &SessionRecord,
        ended_at_ms: u64,
        reason: DisconnectReason,
        duration: Option<u64>,
    ) -> Result<(), StoreError> {
        {
            let mut live = self.tx.open_table(SESSIONS).map_err(|e| self.failed(e))?;
            live.remove(r.table_key()).map_err(|e| self.failed(e))?;
            let mut ended = self.tx.open_table(ENDED).map_err(|e| self.failed(e))?;
            let t = Tombstone {
                safe_id: r.safe_id.clone(),
                username: r.username.clone(),
                ended_at_ms,
            };
            let value = serde_json::to_vec(&t).map_err(|e| self.failed(e))?;
            ended
                .insert(r.table_key(), value.as_slice())
                .map_err(|e| self.failed(e))?;
        }
        self.out.disconnects.push(reason);
        let duration =
            duration.unwrap_or_else(|| (ended_at_ms / 1000).saturating_sub(r.connected_at));
        self.push(EventKind::Disconnect, r, ended_at_ms, reason, duration)
    }

    fn apply(&mut self, change: &Change) -> Result<(), StoreError> {
        match change {
            Change::Opened(r) => {
                if self.live(r)?.is_none() && !self.ended(r)? {
                    self.connect(r)?;
                }
            }
            Change::Closed {
                session,
                ended_at_ms,
                reason,
                duration,
            } => match self.live(session)? {
                Some(stored) => {
                    let last = SessionRecord {
                        bytes_in: stored.bytes_in.max(session.bytes_in),
                        bytes_out: stored.bytes_out.max(session.bytes_out),
                        ..stored
                    };
                    self.end(&last, *ended_at_ms, *reason, *duration)?;
                }
                None if self.ended(session)? => {}
                // Never reported: it connected and ended between two looks at ocserv.
                None => {
                    self.connect(session)?;
                    self.end(session, *ended_at_ms, *reason, *duration)?;
                }
            },
            Change::Update { session, at_ms } => {
                if let Some(stored) = self.live(session)? {
                    let now = SessionRecord {
                        bytes_in: stored.bytes_in.max(session.bytes_in),
                        bytes_out: stored.bytes_out.max(session.bytes_out),
                        ..stored
                    };
                    self.put_live(&now)?;
                    self.out.updates += 1;
                    self.push(
                        EventKind::Update,
                        &now,
                        *at_ms,
                        DisconnectReason::Unspecified,
                        0,
                    )?;
                }
            }
            Change::Resync { live, at_ms, known } => {
                let mut by_id: HashMap<u32, Vec<&SessionRecord>> = HashMap::new();
                for r in live {
                    by_id.entry(r.id).or_default().push(r);
                }
                for stored in self.store.read_live(self.tx)? {
                    let shown = by_id
                        .get(&stored.id)
                        .is_some_and(|v| v.iter().any(|r| r.same(&stored)));
                    if !shown {
                        let key = stored.session_key();
                        let reason = known.iter().find(|(k, _)| k.same(&key)).map(|(_, r)| *r);
                        let reason = reason.unwrap_or(DisconnectReason::Unspecified);
                        self.end(&stored, *at_ms, reason, None)?;
                    }
                }
                for r in live {
                    if self.live(r)?.is_none() && !self.ended(r)? {
                        self.connect(r)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Drops the oldest updates while the outbox is over capacity; returns the depth.
    fn bound(&mut self) -> Result<u64, StoreError> {
        let mut outbox = self.tx.open_table(OUTBOX).map_err(|e| self.failed(e))?;
        let mut updates = self
            .tx
            .open_table(OUTBOX_UPDATES)
            .map_err(|e| self.failed(e))?;
        let mut depth = outbox.len().map_err(|e| self.failed(e))?;
        while depth > self.reporting.capacity as u64 {
            let Some((seq, _)) = updates.pop_first().map_err(|e| self.failed(e))? else {
                break;
            };
            outbox.remove(seq.value()).map_err(|e| self.failed(e))?;
            self.out.dropped_updates += 1;
            depth -= 1;
        }
        Ok(depth)
    }

    /// Removes tombstones older than [`ENDED_KEEP`].
    fn prune(&self, now_ms: u64) -> Result<(), StoreError> {
        let horizon = now_ms.saturating_sub(ENDED_KEEP.as_millis() as u64);
        let mut ended = self.tx.open_table(ENDED).map_err(|e| self.failed(e))?;
        ended
            .retain(|_, v| {
                serde_json::from_slice::<Tombstone>(v).is_ok_and(|t| t.ended_at_ms >= horizon)
            })
            .map_err(|e| self.failed(e))
    }
}

impl Store {
    /// Applies `changes` in order in one transaction (all or nothing).
    pub fn record(
        &self,
        changes: &[Change],
        reporting: &Reporting,
        now_ms: u64,
    ) -> Result<Recorded, StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.failed(e))?;
        let mut rec = Recording {
            store: self,
            tx: &tx,
            reporting,
            out: Recorded::default(),
        };
        for change in changes {
            rec.apply(change)?;
        }
        if self.prune_due(now_ms) {
            rec.prune(now_ms)?;
        }
        let depth = rec.bound()?;
        let mut out = rec.out;
        out.depth = depth;
        tx.commit().map_err(|e| self.failed(e))?;
        Ok(out)
    }

    fn read_live(&self, tx: &Tx) -> Result<Vec<SessionRecord>, StoreError> {
        let table = tx.open_table(SESSIONS).map_err(|e| self.failed(e))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.failed(e))? {
            let (_, v) = item.map_err(|e| self.failed(e))?;
            // An unreadable record cannot be reported; it is dropped by the next resync.
            if let Ok(r) = serde_json::from_slice(v.value()) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The sessions reported connected and not yet ended.
    pub fn live_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.failed(e))?;
        let out = self.read_live(&tx)?;
        tx.abort().map_err(|e| self.failed(e))?;
        Ok(out)
    }

    /// The oldest `limit` outbox events, in order.
    pub fn outbox_peek(&self, limit: usize) -> Result<Peeked, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(|e| self.failed(e))?;
        let table = tx.open_table(OUTBOX).map_err(|e| self.failed(e))?;
        let mut out = Peeked::default();
        for item in table.iter().map_err(|e| self.failed(e))?.take(limit) {
            let (k, v) = item.map_err(|e| self.failed(e))?;
            match serde_json::from_slice(v.value()) {
                Ok(event) => out.events.push((k.value(), event)),
                Err(_) => out.unreadable.push(k.value()),
            }
        }
        Ok(out)
    }

    /// Removes acknowledged (or unreadable) events; returns the outbox's depth after.
    pub fn outbox_remove(&self, seqs: &[u64]) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.failed(e))?;
        let depth = {
            let mut outbox = tx.open_table(OUTBOX).map_err(|e| self.failed(e))?;
            let mut updates = tx.open_table(OUTBOX_UPDATES).map_err(|e| self.failed(e))?;
            for seq in seqs {
                outbox.remove(*seq).map_err(|e| self.failed(e))?;
                updates.remove(*seq).map_err(|e| self.failed(e))?;
            }
            outbox.len().map_err(|e| self.failed(e))?
        };
        tx.commit().map_err(|e| self.failed(e))?;
        Ok(depth)
    }

    /// Events in the outbox.
    pub fn outbox_depth(&self) -> Result<u64, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(|e| self.failed(e))?;
        let table = tx.open_table(OUTBOX).map_err(|e| self.failed(e))?;
        table.len().map_err(|e| self.failed(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_700_000_000_000;

    fn rec(id: u32, sid: Option<&str>, at: u64) -> SessionRecord {
        SessionRecord {
            id,
            safe_id: sid.map(str::to_owned),
            connected_at: at,
            username: format!("user{id}"),
            groupname: String::new(),
            client_ip: Some("192.0.2.1".parse().unwrap()),
            vpn_ip: Some("10.10.0.9".parse().unwrap()),
            device: "vpns0".into(),
            hostname: String::new(),
            user_agent: String::new(),
            vhost: String::new(),
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    fn reporting(capacity: usize) -> Reporting {
        Reporting {
            agent_id: "a1".into(),
            report: true,
            capacity,
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    fn closed(r: &SessionRecord, reason: DisconnectReason) -> Change {
        Change::Closed {
            session: r.clone(),
            ended_at_ms: MS + 60_000,
            reason,
            duration: None,
        }
    }

    /// (kind, id, event_id) of every outbox event, in order.
    fn outbox(store: &Store) -> Vec<(EventKind, u32, String)> {
        let peeked = store.outbox_peek(usize::MAX).unwrap();
        assert!(peeked.unreadable.is_empty());
        peeked
            .events
            .into_iter()
            .map(|(_, e)| (e.kind, e.session.id, e.event_id))
            .collect()
    }

    #[test]
    fn a_session_is_reported_connected_once_and_ended_once() {
        let (_dir, store) = open();
        let a = rec(5, Some("AAAA"), 1_700_000_000);
        let r = store
            .record(
                &[Change::Opened(a.clone()), Change::Opened(a.clone())],
                &reporting(100),
                MS,
            )
            .unwrap();
        assert_eq!((r.connects, r.depth), (1, 1));
        let mut last = a.clone();
        (last.bytes_in, last.bytes_out) = (700, 9000);
        let r = store
            .record(
                &[closed(&last, DisconnectReason::AdminForced)],
                &reporting(100),
                MS,
            )
            .unwrap();
        assert_eq!(r.disconnects, vec![DisconnectReason::AdminForced]);
        // Repeated, late and stale notices change nothing.
        let again = [
            closed(&a, DisconnectReason::Unspecified),
            Change::Opened(a.clone()),
            Change::Update {
                session: a.clone(),
                at_ms: MS,
            },
        ];
        let r = store.record(&again, &reporting(100), MS).unwrap();
        assert_eq!(
            r,
            Recorded {
                depth: 2,
                ..Recorded::default()
            }
        );
        assert_eq!(
            outbox(&store),
            vec![
                (EventKind::Connect, 5, "a1:connect:5:1700000000".into()),
                (
                    EventKind::Disconnect,
                    5,
                    "a1:disconnect:5:1700000000".into()
                ),
            ]
        );
        let events = store.outbox_peek(10).unwrap().events;
        let ended = &events[1].1;
        assert_eq!(
            (ended.session.bytes_in, ended.session.bytes_out),
            (700, 9000)
        );
        assert_eq!(ended.reason(), DisconnectReason::AdminForced);
        assert_eq!(ended.duration_secs, 60, "from the connect time to the end");
        assert!(store.live_sessions().unwrap().is_empty());
    }

    #[test]
    fn a_session_known_only_from_its_script_is_matched_or_reported_whole() {
        let (_dir, store) = open();
        let live = rec(7, Some("BBBB"), 1_700_000_000);
        store
            .record(&[Change::Opened(live.clone())], &reporting(100), MS)
            .unwrap();
        // The script's record: no session id, a connect time derived from its duration.
        let from_script = SessionRecord {
            safe_id: None,
            connected_at: 1_700_000_002,
            bytes_in: 42,
            ..live.clone()
        };
        let r = store
            .record(
                &[closed(&from_script, DisconnectReason::Unspecified)],
                &reporting(100),
                MS,
            )
            .unwrap();
        assert_eq!(
            (r.connects, r.disconnects.len()),
            (0, 1),
            "the live one ended"
        );
        // A session never seen connected: its connect and its end, in that order.
        let short = rec(8, None, 1_700_000_010);
        let r = store
            .record(
                &[closed(&short, DisconnectReason::Unspecified)],
                &reporting(100),
                MS,
            )
            .unwrap();
        assert_eq!((r.connects, r.disconnects.len()), (1, 1));
        let kinds: Vec<_> = outbox(&store)
            .into_iter()
            .map(|(k, id, _)| (k, id))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (EventKind::Connect, 7),
                (EventKind::Disconnect, 7),
                (EventKind::Connect, 8),
                (EventKind::Disconnect, 8),
            ]
        );
        // A recycled ID far from that connect time is another session.
        let other = rec(8, Some("CCCC"), 1_700_000_500);
        let r = store
            .record(&[Change::Opened(other)], &reporting(100), MS)
            .unwrap();
        assert_eq!(r.connects, 1);
    }

    #[test]
    fn a_resync_reports_what_changed_while_nobody_looked_and_nothing_else() {
        let (dir, store) = open();
        let (a, b, c) = (
            rec(1, Some("A"), 1_700_000_000),
            rec(2, Some("B"), 1_700_000_000),
            rec(3, Some("C"), 1_700_000_000),
        );
        let mut b_later = b.clone();
        b_later.bytes_in = 500;
        let start = [
            Change::Opened(a.clone()),
            Change::Opened(b.clone()),
            Change::Update {
                session: b_later,
                at_ms: MS,
            },
        ];
        store.record(&start, &reporting(100), MS).unwrap();
        store.outbox_remove(&[1, 2, 3]).unwrap();
        drop(store);
        // The agent restarts: a ended meanwhile, c is new, b still runs.
        let store = Store::open(dir.path()).unwrap();
        let resync = Change::Resync {
            live: vec![b.clone(), c.clone()],
            at_ms: MS + 5_000,
            known: Vec::new(),
        };
        let r = store
            .record(std::slice::from_ref(&resync), &reporting(100), MS)
            .unwrap();
        assert_eq!(
            (r.connects, r.disconnects.clone()),
            (1, vec![DisconnectReason::Unspecified])
        );
        let events = store.outbox_peek(10).unwrap().events;
        let kinds: Vec<_> = events.iter().map(|(_, e)| (e.kind, e.session.id)).collect();
        assert_eq!(
            kinds,
            vec![(EventKind::Disconnect, 1), (EventKind::Connect, 3)]
        );
        let mut live: Vec<_> = store
            .live_sessions()
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        live.sort();
        assert_eq!(live, vec![2, 3]);
        assert_eq!(
            store
                .live_sessions()
                .unwrap()
                .iter()
                .find(|r| r.id == 2)
                .unwrap()
                .bytes_in,
            500,
            "the last known counters are kept"
        );
        let r = store.record(&[resync], &reporting(100), MS).unwrap();
        assert_eq!(
            (r.connects, r.disconnects.len()),
            (0, 0),
            "a second resync is a no-op"
        );
        // A session the agent kicked just before its registry restarted keeps the kick's reason.
        let kicked = Change::Resync {
            live: vec![c.clone()],
            at_ms: MS + 6_000,
            known: vec![(b.session_key(), DisconnectReason::AdminForced)],
        };
        let r = store.record(&[kicked], &reporting(100), MS).unwrap();
        assert_eq!(r.disconnects, vec![DisconnectReason::AdminForced]);
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_updates_never_connects_or_disconnects() {
        let (_dir, store) = open();
        let cap = 4;
        let s: Vec<_> = (1..=3).map(|i| rec(i, Some("S"), 1_700_000_000)).collect();
        let opened: Vec<_> = s.iter().cloned().map(Change::Opened).collect();
        store.record(&opened, &reporting(cap), MS).unwrap();
        let updates: Vec<_> = (0..3)
            .map(|i| Change::Update {
                session: s[0].clone(),
                at_ms: MS + i,
            })
            .collect();
        let r = store.record(&updates, &reporting(cap), MS).unwrap();
        assert_eq!((r.updates, r.dropped_updates, r.depth), (3, 2, 4));
        let ends: Vec<_> = s
            .iter()
            .map(|r| closed(r, DisconnectReason::Unspecified))
            .collect();
        let r = store.record(&ends, &reporting(cap), MS).unwrap();
        assert_eq!(
            (r.dropped_updates, r.depth),
            (1, 6),
            "over capacity with no update left"
        );
        let kinds: Vec<_> = outbox(&store).into_iter().map(|(k, _, _)| k).collect();
        assert!(!kinds.contains(&EventKind::Update));
        assert_eq!(kinds.len(), 6);
    }

    #[test]
    fn without_reporting_the_snapshot_is_kept_and_the_outbox_stays_empty() {
        let (_dir, store) = open();
        let off = Reporting {
            report: false,
            ..reporting(100)
        };
        let a = rec(1, Some("A"), 1_700_000_000);
        let r = store
            .record(&[Change::Opened(a.clone())], &off, MS)
            .unwrap();
        assert_eq!((r.connects, r.depth), (1, 0));
        let r = store
            .record(&[closed(&a, DisconnectReason::PolicyViolation)], &off, MS)
            .unwrap();
        assert_eq!((r.disconnects.len(), r.depth), (1, 0));
    }

    #[test]
    fn acknowledged_events_leave_in_any_order_and_old_tombstones_are_pruned() {
        let (_dir, store) = open();
        let a = rec(1, Some("A"), 1_700_000_000);
        let b = rec(2, Some("B"), 1_700_000_000);
        let changes = [
            Change::Opened(a.clone()),
            Change::Opened(b.clone()),
            closed(&a, DisconnectReason::Unspecified),
        ];
        store.record(&changes, &reporting(100), MS).unwrap();
        assert_eq!(store.outbox_remove(&[2]).unwrap(), 2);
        let left: Vec<_> = store
            .outbox_peek(10)
            .unwrap()
            .events
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, vec![1, 3]);
        // Past ENDED_KEEP, a's tombstone goes: a late notice of it would be a new report.
        let later = MS + 60_000 + ENDED_KEEP.as_millis() as u64 + 1;
        store.record(&[], &reporting(100), later).unwrap();
        let r = store
            .record(&[Change::Opened(a)], &reporting(100), later)
            .unwrap();
        assert_eq!(r.connects, 1);
    }
}
