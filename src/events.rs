//! The portal's events (`vpn.v1.EventService`) made from outbox entries, and the order they go
//! out in: plain functions, no I/O (`PortalLink` sends them).
//!
//! Every request carries `metadata["event_id"]` (the entry's idempotency key, the same for every
//! retry) and `metadata["agent_id"]` (`agent.id`), plus `safe_id` (ocserv's 28-character session
//! id) when known, and `groupname`, `vhost`, `hostname` and `user_agent` when not empty.
//! `session_id` is ocserv's `ID` as a decimal string, as everywhere in the contract. Counters
//! are the server's view: `bytes_received` is what the client sent (`STATS_BYTES_IN`),
//! `bytes_sent` what it received.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use prost_types::Timestamp;

use crate::proto::vpn::v1::{
    ReportConnectRequest, ReportDisconnectRequest, ReportSessionUpdateRequest, SessionStats,
    SessionStatus,
};
use crate::store::{EventKind, OutboxEvent, SessionRecord};

/// One request to the portal's `EventService`.
#[derive(Debug, Clone, PartialEq)]
pub enum EventRequest {
    Connect(ReportConnectRequest),
    Disconnect(ReportDisconnectRequest),
    Update(ReportSessionUpdateRequest),
}

impl EventRequest {
    /// The RPC's name (the `method` label of the portal metrics).
    pub fn method(&self) -> &'static str {
        match self {
            Self::Connect(_) => "ReportConnect",
            Self::Disconnect(_) => "ReportDisconnect",
            Self::Update(_) => "ReportSessionUpdate",
        }
    }
}

fn timestamp_ms(ms: u64) -> Timestamp {
    Timestamp::from(UNIX_EPOCH + Duration::from_millis(ms))
}

fn metadata(e: &OutboxEvent, agent_id: &str) -> HashMap<String, String> {
    let s = &e.session;
    let mut m = HashMap::from([
        ("event_id".to_string(), e.event_id.clone()),
        ("agent_id".to_string(), agent_id.to_string()),
    ]);
    let optional = [
        ("safe_id", s.safe_id.clone().unwrap_or_default()),
        ("groupname", s.groupname.clone()),
        ("vhost", s.vhost.clone()),
        ("hostname", s.hostname.clone()),
        ("user_agent", s.user_agent.clone()),
    ];
    for (k, v) in optional {
        if !v.is_empty() {
            m.insert(k.to_string(), v);
        }
    }
    m
}

fn stats(s: &SessionRecord, duration_secs: u64) -> SessionStats {
    SessionStats {
        duration_seconds: i64::try_from(duration_secs).unwrap_or(i64::MAX),
        bytes_received: s.bytes_in,
        bytes_sent: s.bytes_out,
        packets_received: 0,
        packets_sent: 0,
    }
}

/// The request of one outbox event.
pub fn request_of(e: &OutboxEvent, agent_id: &str) -> EventRequest {
    let s = &e.session;
    let ip = |a: Option<std::net::IpAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    match e.kind {
        EventKind::Connect => EventRequest::Connect(ReportConnectRequest {
            username: s.username.clone(),
            session_id: s.id.to_string(),
            client_ip: ip(s.client_ip),
            vpn_ip: ip(s.vpn_ip),
            device: s.device.clone(),
            connected_at: Some(timestamp_ms(s.connected_at.saturating_mul(1000))),
            groupname: s.groupname.clone(),
            metadata: metadata(e, agent_id),
        }),
        EventKind::Disconnect => EventRequest::Disconnect(ReportDisconnectRequest {
            username: s.username.clone(),
            session_id: s.id.to_string(),
            disconnected_at: Some(timestamp_ms(e.at_ms)),
            reason: e.reason().into(),
            stats: Some(stats(s, e.duration_secs)),
            metadata: metadata(e, agent_id),
        }),
        EventKind::Update => EventRequest::Update(ReportSessionUpdateRequest {
            username: s.username.clone(),
            session_id: s.id.to_string(),
            update_time: Some(timestamp_ms(e.at_ms)),
            current_stats: Some(stats(s, (e.at_ms / 1000).saturating_sub(s.connected_at))),
            status: SessionStatus::Active.into(),
            metadata: metadata(e, agent_id),
        }),
    }
}

/// Splits events (in outbox order) by session, each session's events in their order, the
/// sessions in the order of their first event: sessions may go out side by side, one session's
/// events one after the other.
pub fn by_session(events: Vec<(u64, OutboxEvent)>) -> Vec<Vec<(u64, OutboxEvent)>> {
    let mut index: HashMap<(u32, u64), usize> = HashMap::new();
    let mut groups: Vec<Vec<(u64, OutboxEvent)>> = Vec::new();
    for (seq, e) in events {
        let key = (e.session.id, e.session.connected_at);
        let at = *index.entry(key).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[at].push((seq, e));
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::DisconnectReason;

    fn record(id: u32, at: u64) -> SessionRecord {
        SessionRecord {
            id,
            safe_id: Some("c2Vzc2lvbi1pZC0xMjM0NTY3ODkwMTI=".into()),
            connected_at: at,
            username: "alice".into(),
            groupname: "staff".into(),
            client_ip: Some("192.0.2.7".parse().unwrap()),
            vpn_ip: Some("10.10.0.2".parse().unwrap()),
            device: "vpns0".into(),
            hostname: String::new(),
            user_agent: "Open AnyConnect".into(),
            vhost: String::new(),
            bytes_in: 1500,
            bytes_out: 9000,
        }
    }

    fn event(kind: EventKind, id: u32, at: u64, at_ms: u64) -> OutboxEvent {
        OutboxEvent {
            event_id: format!("agent-1:{kind:?}:{id}:{at}"),
            kind,
            session: record(id, at),
            at_ms,
            reason: DisconnectReason::PolicyViolation as i32,
            duration_secs: 42,
        }
    }

    #[test]
    fn every_field_of_each_event_is_filled() {
        let c = request_of(&event(EventKind::Connect, 7, 1_700_000_000, 0), "agent-1");
        let EventRequest::Connect(c) = c else {
            panic!("{c:?}")
        };
        assert_eq!((c.username.as_str(), c.session_id.as_str()), ("alice", "7"));
        assert_eq!(
            (c.client_ip.as_str(), c.vpn_ip.as_str()),
            ("192.0.2.7", "10.10.0.2")
        );
        assert_eq!(
            (c.device.as_str(), c.groupname.as_str()),
            ("vpns0", "staff")
        );
        assert_eq!(c.connected_at.unwrap().seconds, 1_700_000_000);
        assert_eq!(c.metadata["event_id"], "agent-1:Connect:7:1700000000");
        assert_eq!(c.metadata["agent_id"], "agent-1");
        assert_eq!(c.metadata["safe_id"], "c2Vzc2lvbi1pZC0xMjM0NTY3ODkwMTI=");
        assert_eq!(c.metadata["user_agent"], "Open AnyConnect");
        assert!(
            !c.metadata.contains_key("vhost"),
            "empty values are left out"
        );

        let ended = event(EventKind::Disconnect, 7, 1_700_000_000, 1_700_000_042_500);
        let EventRequest::Disconnect(d) = request_of(&ended, "agent-1") else {
            panic!()
        };
        assert_eq!(d.reason, DisconnectReason::PolicyViolation as i32);
        let t = d.disconnected_at.unwrap();
        assert_eq!((t.seconds, t.nanos), (1_700_000_042, 500_000_000));
        let st = d.stats.unwrap();
        assert_eq!(
            (st.duration_seconds, st.bytes_received, st.bytes_sent),
            (42, 1500, 9000)
        );

        let update = event(EventKind::Update, 7, 1_700_000_000, 1_700_000_060_000);
        let EventRequest::Update(u) = request_of(&update, "agent-1") else {
            panic!()
        };
        assert_eq!(u.current_stats.unwrap().duration_seconds, 60);
        assert_eq!(u.status, SessionStatus::Active as i32);
        assert_eq!(u.metadata["event_id"], update.event_id);
    }

    #[test]
    fn events_are_grouped_by_session_keeping_order() {
        let events = vec![
            (1, event(EventKind::Connect, 1, 100, 0)),
            (2, event(EventKind::Connect, 2, 100, 0)),
            (3, event(EventKind::Disconnect, 1, 100, 5)),
            (4, event(EventKind::Connect, 1, 200, 0)),
            (5, event(EventKind::Disconnect, 2, 100, 6)),
        ];
        let seqs: Vec<Vec<u64>> = by_session(events)
            .into_iter()
            .map(|g| g.into_iter().map(|(s, _)| s).collect())
            .collect();
        assert_eq!(seqs, vec![vec![1, 3], vec![2, 5], vec![4]]);
    }
}
