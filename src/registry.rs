//! The session table and its reconcile rule: plain data and functions, no I/O. The
//! `SessionRegistry` actor owns one [`SessionTable`] and feeds it ocserv's session list.
//!
//! Sessions are keyed by ocserv's `ID` (the worker's PID). PIDs recycle, so an entry whose ID comes
//! back with a different session id (`safe_id`) or connection time is a new session: the old one is
//! reported as closed and the new one as opened.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::ocserv::Session;

/// Live sessions by ocserv ID. Entries are shared (`Arc`) so a query copies pointers, not
/// sessions.
#[derive(Debug, Default, Clone)]
pub struct SessionTable {
    by_id: BTreeMap<u32, Arc<Session>>,
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
            match self.by_id.remove(&s.id) {
                Some(old) if same_session(&old, &s) => {
                    if s.counters.is_none() {
                        s.counters = old.counters;
                    }
                    if s.safe_id.is_none() {
                        s.safe_id = old.safe_id.clone();
                    }
                    if *old != s {
                        diff.updated += 1;
                    }
                }
                Some(old) => {
                    diff.closed.push(old);
                    diff.opened.push(s.id);
                }
                None => diff.opened.push(s.id),
            }
            next.insert(s.id, Arc::new(s));
        }
        diff.closed
            .extend(std::mem::take(&mut self.by_id).into_values());
        self.by_id = next;
        diff
    }

    /// Removes sessions known to be gone (e.g. just disconnected) without waiting for the next
    /// reconcile; returns those that were present.
    pub fn remove(&mut self, ids: &[u32]) -> Vec<Arc<Session>> {
        ids.iter().filter_map(|id| self.by_id.remove(id)).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ocserv::{ByteCounters, SessionState};
    use proptest::prelude::*;

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
