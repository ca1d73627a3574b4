//! Readiness: one rule, shared by `/readyz`, `grpc.health.v1` and `GetActiveSessions`.
//!
//! The agent is ready while
//! - its last successful exchange with ocserv is younger than [`STALE_AFTER`] reconcile
//!   intervals (one failed call does not flap it; a stream of timeouts, protocol errors or closed
//!   connections does),
//! - its session view was last synchronized with ocserv within the same bound, and
//! - it is not out of file descriptors (then it says so instead of blaming ocserv).
//!
//! Readiness never depends on the portal. [`Health`] is the shared record the actors feed (it lives
//! outside every actor, so it survives their restarts); [`verdict`] is the plain rule.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::breaker::BreakerState;

/// How many reconcile intervals without a successful exchange make the agent unready and its
/// session view stale.
pub const STALE_AFTER: u32 = 3;

/// The bound past which data from ocserv is no longer served as truth.
pub fn stale_bound(reconcile_interval: Duration) -> Duration {
    reconcile_interval * STALE_AFTER
}

/// True when data of this age must not be served as truth.
pub fn too_old(age: Duration, reconcile_interval: Duration) -> bool {
    age > stale_bound(reconcile_interval)
}

/// Why the agent is not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("out of file descriptors for {0:?} (accepting connections fails with EMFILE/ENFILE)")]
    OutOfDescriptors(Duration),
    #[error("ocserv has not answered successfully yet")]
    OcservNeverAnswered,
    #[error("ocserv has not answered successfully for {0:?}")]
    OcservSilent(Duration),
    #[error("the session list has not been synchronized with ocserv yet")]
    NeverSynced,
    #[error("the session list was last synchronized with ocserv {0:?} ago")]
    SessionsStale(Duration),
}

/// The inputs of the rule, as ages (None: never happened).
#[derive(Debug, Clone, Copy, Default)]
pub struct Inputs {
    pub since_ocserv_ok: Option<Duration>,
    pub since_sync: Option<Duration>,
    pub out_of_descriptors_for: Option<Duration>,
    pub reconcile_interval: Duration,
}

/// The rule. Own resources first: when the agent cannot accept connections, that is the cause to
/// report, not ocserv.
pub fn verdict(i: Inputs) -> Result<(), NotReady> {
    if let Some(d) = i.out_of_descriptors_for {
        return Err(NotReady::OutOfDescriptors(d));
    }
    match i.since_ocserv_ok {
        None => return Err(NotReady::OcservNeverAnswered),
        Some(age) if too_old(age, i.reconcile_interval) => return Err(NotReady::OcservSilent(age)),
        Some(_) => {}
    }
    match i.since_sync {
        None => Err(NotReady::NeverSynced),
        Some(age) if too_old(age, i.reconcile_interval) => Err(NotReady::SessionsStale(age)),
        Some(_) => Ok(()),
    }
}

/// Lock-free record of the events readiness depends on. Times are milliseconds since `epoch`
/// plus one; 0 means "never" (or, for descriptors, "not exhausted").
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    ocserv_ok: AtomicU64,
    synced: AtomicU64,
    out_of_fds: AtomicU64,
    reconcile_interval_ms: AtomicU64,
}

impl Health {
    pub fn new(reconcile_interval: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            ocserv_ok: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            out_of_fds: AtomicU64::new(0),
            reconcile_interval_ms: AtomicU64::new(millis(reconcile_interval)),
        }
    }

    fn stamp(&self) -> u64 {
        millis(self.epoch.elapsed()) + 1
    }

    fn age(&self, cell: &AtomicU64) -> Option<Duration> {
        match cell.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(self.stamp().saturating_sub(t))),
        }
    }

    /// ocserv answered a request successfully.
    pub fn ocserv_answered(&self) {
        self.ocserv_ok.store(self.stamp(), Ordering::Relaxed);
    }

    /// The session registry agreed with ocserv's list.
    pub fn synced(&self) {
        self.synced.store(self.stamp(), Ordering::Relaxed);
    }

    /// Accepting a connection failed for lack of descriptors (`true`), or succeeded again.
    /// Returns true when this call started a burst (to log once per burst).
    pub fn out_of_descriptors(&self, exhausted: bool) -> bool {
        if exhausted {
            self.out_of_fds
                .compare_exchange(0, self.stamp(), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        } else {
            self.out_of_fds.store(0, Ordering::Relaxed);
            false
        }
    }

    /// The reconcile interval in force (changes on SIGHUP).
    pub fn set_reconcile_interval(&self, d: Duration) {
        self.reconcile_interval_ms
            .store(millis(d), Ordering::Relaxed);
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms.load(Ordering::Relaxed))
    }

    /// Age of the last successful synchronization of the session view.
    pub fn since_sync(&self) -> Option<Duration> {
        self.age(&self.synced)
    }

    pub fn inputs(&self) -> Inputs {
        Inputs {
            since_ocserv_ok: self.age(&self.ocserv_ok),
            since_sync: self.age(&self.synced),
            out_of_descriptors_for: self.age(&self.out_of_fds),
            reconcile_interval: self.reconcile_interval(),
        }
    }

    pub fn check(&self) -> Result<(), NotReady> {
        verdict(self.inputs())
    }
}

/// The tiers of `agent.v1.AgentService/HealthCheck` (`contract.md` §1); each includes the ones
/// below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// The process answers and every actor of the tree is running.
    Liveness = 1,
    /// And ocserv is reachable: the readiness rule ([`verdict`]) holds.
    Ocserv = 2,
    /// And the portal the decisions depend on is usable (its circuit breaker is closed).
    EndToEnd = 3,
}

impl Tier {
    /// The tier a request asks for; any other value is refused with the reason.
    pub fn from_request(tier: i32) -> Result<Tier, String> {
        match tier {
            1 => Ok(Tier::Liveness),
            2 => Ok(Tier::Ocserv),
            3 => Ok(Tier::EndToEnd),
            other => Err(format!(
                "must be 1 (liveness), 2 (ocserv reachable) or 3 (end-to-end incl. portal), not {other}"
            )),
        }
    }
}

/// What the deepest tier knows about the portal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalView {
    /// `portal.endpoint` is set.
    pub configured: bool,
    pub breaker: BreakerState,
    /// How long ago the last call ended, and its status label (`ok`, `timeout`, ...).
    pub last_call: Option<(Duration, &'static str)>,
}

/// The answer of a health check: a verdict, one line saying why, and the detail of each check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub healthy: bool,
    pub message: String,
    pub checks: std::collections::BTreeMap<String, String>,
}

/// The health rule: `missing` are the actors of the tree not running now, `ready` the readiness
/// verdict, `portal` the portal's state. A check below the tier asked for is neither run nor
/// reported.
pub fn report(
    tier: Tier,
    missing: &[&str],
    ready: Result<(), NotReady>,
    portal: &PortalView,
) -> Report {
    let mut checks = std::collections::BTreeMap::new();
    let mut failed = Vec::new();
    let mut check = |name: &str, result: Result<String, String>| {
        let text = match result {
            Ok(t) => t,
            Err(t) => {
                failed.push(format!("{name}: {t}"));
                t
            }
        };
        checks.insert(name.to_string(), text);
    };
    check(
        "actors",
        match missing {
            [] => Ok("all running".to_string()),
            m => Err(format!("not running: {}", m.join(", "))),
        },
    );
    if tier >= Tier::Ocserv {
        check(
            "ocserv",
            ready.map(|()| "ok".to_string()).map_err(|e| e.to_string()),
        );
    }
    if tier >= Tier::EndToEnd {
        check("portal", portal_check(portal));
    }
    let healthy = failed.is_empty();
    Report {
        healthy,
        message: if healthy {
            "healthy".to_string()
        } else {
            failed.join("; ")
        },
        checks,
    }
}

fn portal_check(p: &PortalView) -> Result<String, String> {
    if !p.configured {
        // Config validation refuses `policy.source = "portal"` without an endpoint.
        return Ok("not configured (connect decisions come from the local policy)".to_string());
    }
    let last = match p.last_call {
        None => "no call yet".to_string(),
        Some((ago, status)) => format!("last call {status} {}s ago", ago.as_secs()),
    };
    let text = format!("circuit breaker {}; {last}", p.breaker.as_str());
    match p.breaker {
        BreakerState::Closed => Ok(text),
        BreakerState::HalfOpen | BreakerState::Open => Err(text),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn ready(ok: u64, sync: u64) -> Inputs {
        Inputs {
            since_ocserv_ok: Some(S(ok)),
            since_sync: Some(S(sync)),
            out_of_descriptors_for: None,
            reconcile_interval: S(10),
        }
    }

    #[test]
    fn ready_within_three_intervals_and_not_after() {
        assert_eq!(verdict(ready(0, 0)), Ok(()));
        // One missed reconcile (a single failed call) does not flap readiness.
        assert_eq!(verdict(ready(29, 29)), Ok(()));
        assert_eq!(verdict(ready(30, 30)), Ok(()));
        assert_eq!(verdict(ready(31, 5)), Err(NotReady::OcservSilent(S(31))));
        assert_eq!(verdict(ready(5, 31)), Err(NotReady::SessionsStale(S(31))));
    }

    #[test]
    fn never_answered_or_synced_is_not_ready() {
        let mut i = ready(0, 0);
        i.since_sync = None;
        assert_eq!(verdict(i), Err(NotReady::NeverSynced));
        i.since_ocserv_ok = None;
        assert_eq!(verdict(i), Err(NotReady::OcservNeverAnswered));
    }

    #[test]
    fn own_resources_are_blamed_before_ocserv() {
        let mut i = ready(100, 100);
        i.out_of_descriptors_for = Some(S(1));
        assert_eq!(verdict(i), Err(NotReady::OutOfDescriptors(S(1))));
        assert!(verdict(i)
            .unwrap_err()
            .to_string()
            .contains("file descriptors"));
    }

    #[test]
    fn health_records_events_and_bursts() {
        let h = Health::new(S(10));
        assert_eq!(h.check(), Err(NotReady::OcservNeverAnswered));
        h.ocserv_answered();
        h.synced();
        assert_eq!(h.check(), Ok(()));
        assert!(h.out_of_descriptors(true), "first EMFILE starts a burst");
        assert!(!h.out_of_descriptors(true), "later ones are the same burst");
        assert!(matches!(h.check(), Err(NotReady::OutOfDescriptors(_))));
        h.out_of_descriptors(false);
        assert_eq!(h.check(), Ok(()));
        assert!(h.out_of_descriptors(true), "a new burst after recovery");
        h.set_reconcile_interval(Duration::from_millis(250));
        assert_eq!(h.reconcile_interval(), Duration::from_millis(250));
    }
    fn portal(configured: bool, breaker: BreakerState) -> PortalView {
        PortalView {
            configured,
            breaker,
            last_call: Some((S(2), "timeout")),
        }
    }

    #[test]
    fn tiers_are_1_to_3_and_nothing_else() {
        assert_eq!(Tier::from_request(1), Ok(Tier::Liveness));
        assert_eq!(Tier::from_request(2), Ok(Tier::Ocserv));
        assert_eq!(Tier::from_request(3), Ok(Tier::EndToEnd));
        for bad in [0, 4, -1, i32::MAX] {
            let e = Tier::from_request(bad).unwrap_err();
            assert!(e.contains(&bad.to_string()), "{e}");
        }
    }

    #[test]
    fn each_tier_runs_only_its_checks() {
        let down = Err(NotReady::OcservNeverAnswered);
        let open = portal(true, BreakerState::Open);
        let live = report(Tier::Liveness, &[], down.clone(), &open);
        assert!(
            live.healthy,
            "liveness ignores ocserv and the portal: {live:?}"
        );
        assert_eq!(live.checks.keys().collect::<Vec<_>>(), ["actors"]);
        let ocserv = report(Tier::Ocserv, &[], down.clone(), &open);
        assert!(!ocserv.healthy);
        assert_eq!(
            ocserv.message,
            "ocserv: ocserv has not answered successfully yet"
        );
        assert!(!ocserv.checks.contains_key("portal"));
        let all = report(Tier::EndToEnd, &["policy_cache"], down, &open);
        assert!(!all.healthy);
        assert_eq!(all.checks.len(), 3);
        assert!(
            all.message
                .starts_with("actors: not running: policy_cache; ocserv: "),
            "{}",
            all.message
        );
        assert!(
            all.message
                .ends_with("portal: circuit breaker open; last call timeout 2s ago"),
            "{}",
            all.message
        );
    }

    #[test]
    fn the_portal_is_healthy_only_with_its_breaker_closed_or_when_not_configured() {
        let tier3 = |p: PortalView| report(Tier::EndToEnd, &[], Ok(()), &p);
        let closed = tier3(portal(true, BreakerState::Closed));
        assert!(closed.healthy, "{closed:?}");
        assert_eq!(closed.message, "healthy");
        assert_eq!(
            closed.checks["portal"],
            "circuit breaker closed; last call timeout 2s ago"
        );
        assert!(!tier3(portal(true, BreakerState::HalfOpen)).healthy);
        assert!(!tier3(portal(true, BreakerState::Open)).healthy);
        let absent = tier3(portal(false, BreakerState::Open));
        assert!(absent.healthy);
        assert!(absent.checks["portal"].starts_with("not configured"));
        let fresh = tier3(PortalView {
            last_call: None,
            ..portal(true, BreakerState::Closed)
        });
        assert_eq!(
            fresh.checks["portal"],
            "circuit breaker closed; no call yet"
        );
    }
}
