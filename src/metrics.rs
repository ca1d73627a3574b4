//! The one metrics registry of the agent (prefix `ocserv_agent_`, plus the `ocserv_` figures read
//! from ocserv), registered once at start-up and shared by every actor through [`Metrics`].
//!
//! Names follow `reference/contract.md` §3. Usernames never become labels: every label value comes
//! from a fixed, small set (command names, status words, actor names, gRPC method and code).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::ocserv::ServerStatus;
pub use crate::proto::vpn::v1::DisconnectReason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandStatus {
    pub command: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    pub command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActorLabel {
    pub actor: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: &'static str,
    /// `limit` (over the connection cap), `peer_uid` (a peer not in `allowed_uids`),
    /// `descriptors` (accept failed for lack of file descriptors).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookDecisionLabels {
    /// `connect`, `disconnect`, `host-update`.
    pub reason: &'static str,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// `fresh`, `cached`, `stale`, `fail_open`, `fail_closed`, `local_policy`; `none` for the
    /// disconnect and host-update reports (recorded, not decided).
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodStatus {
    pub method: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindStatus {
    /// `user` or `group`.
    pub kind: &'static str,
    /// `written`, `unchanged`, `removed`, `error` (the file system failed) or `refused` (unsafe
    /// name, invalid model or a full queue: nothing was touched).
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableStatus {
    pub table: &'static str,
    pub status: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~3.3 s
    Histogram::new(exponential_buckets(0.000_05, 3.0, 11))
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// NaN while the session view is stale (see `crate::health`).
    pub active_sessions: FloatGauge,
    pub session_view_age: FloatGauge,
    pub ready: Gauge,
    pub connections_open: Family<ListenerLabel, Gauge>,
    pub connections_refused: Family<RefusedLabels, Counter>,
    pub ocserv_requests: Family<CommandStatus, Counter>,
    pub ocserv_request_duration: Family<CommandLabel, Histogram, fn() -> Histogram>,
    pub actor_restarts: Family<ActorLabel, Counter>,
    pub grpc_requests: Family<GrpcLabels, Counter>,
    pub ocserv_up: Gauge,
    pub ocserv_total_sessions: Gauge,
    pub ocserv_bytes_in: Counter<u64, AtomicU64>,
    pub ocserv_bytes_out: Counter<u64, AtomicU64>,
    pub ocserv_banned_ips: Gauge,
    pub ocserv_auth_failures: Counter<u64, AtomicU64>,
    pub ocserv_disconnects: Family<ReasonLabel, Counter>,
    pub hook_decisions: Family<HookDecisionLabels, Counter>,
    pub hook_decision_duration: Histogram,
    pub hook_requests_refused: Family<CauseLabel, Counter>,
    pub cache_requests: Family<ResultLabel, Counter>,
    pub cache_size: Gauge,
    pub portal_requests: Family<MethodStatus, Counter>,
    pub portal_request_duration: Family<MethodLabel, Histogram, fn() -> Histogram>,
    pub circuit_breaker_state: Family<ServiceLabel, Gauge>,
    pub config_writes: Family<KindStatus, Counter>,
    pub local_policy_reloads: Family<StatusLabel, Counter>,
    pub store_writes: Family<TableStatus, Counter>,
    pub outbox_depth: Gauge,
    pub outbox_dropped: Counter,
}

/// The `reason` label of a disconnect: the proto name without its prefix, lowercase.
pub fn reason_label(reason: DisconnectReason) -> &'static str {
    match reason {
        DisconnectReason::Unspecified => "unspecified",
        DisconnectReason::UserInitiated => "user_initiated",
        DisconnectReason::AdminForced => "admin_forced",
        DisconnectReason::IdleTimeout => "idle_timeout",
        DisconnectReason::SessionLimit => "session_limit",
        DisconnectReason::CertificateRevoked => "certificate_revoked",
        DisconnectReason::PolicyViolation => "policy_violation",
        DisconnectReason::ServerShutdown => "server_shutdown",
        DisconnectReason::ConnectionError => "connection_error",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        let agent = root.sub_registry_with_prefix("ocserv_agent");
        let m_active = FloatGauge::default();
        agent.register(
            "active_sessions",
            "Live ocserv sessions known to the session registry (NaN while its view is stale)",
            m_active.clone(),
        );
        let session_view_age = FloatGauge::default();
        agent.register_with_unit(
            "session_view_age",
            "Time since the session registry last agreed with ocserv (NaN: never)",
            prometheus_client::registry::Unit::Seconds,
            session_view_age.clone(),
        );
        let ready = Gauge::default();
        agent.register("ready", "1 when /readyz answers 200, else 0", ready.clone());
        let connections_open = Family::<ListenerLabel, Gauge>::default();
        agent.register(
            "connections_open",
            "Open connections per listener",
            connections_open.clone(),
        );
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        agent.register(
            "connections_refused",
            "Connections closed at once or refused, by listener and cause",
            connections_refused.clone(),
        );
        let ocserv_requests = Family::<CommandStatus, Counter>::default();
        agent.register(
            "ocserv_requests",
            "Requests to ocserv by command and outcome",
            ocserv_requests.clone(),
        );
        let ocserv_request_duration =
            Family::<CommandLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        agent.register_with_unit(
            "ocserv_request_duration",
            "Latency of requests to ocserv",
            prometheus_client::registry::Unit::Seconds,
            ocserv_request_duration.clone(),
        );
        let actor_restarts = Family::<ActorLabel, Counter>::default();
        agent.register(
            "actor_restarts",
            "Actor restarts performed by the supervisor",
            actor_restarts.clone(),
        );
        let grpc_requests = Family::<GrpcLabels, Counter>::default();
        agent.register(
            "grpc_requests",
            "gRPC requests served, by method and status code",
            grpc_requests.clone(),
        );
        let hook_decisions = Family::<HookDecisionLabels, Counter>::default();
        agent.register(
            "hook_decisions",
            "Answers to hook requests, by script reason, decision and source",
            hook_decisions.clone(),
        );
        let hook_decision_duration = latency_histogram();
        agent.register_with_unit(
            "hook_decision_duration",
            "Time from accepting a hook request to its answer",
            prometheus_client::registry::Unit::Seconds,
            hook_decision_duration.clone(),
        );
        let hook_requests_refused = Family::<CauseLabel, Counter>::default();
        agent.register(
            "hook_requests_refused",
            "Hook requests answered with an error (bad frame, bad request, peer, limit, timeout)",
            hook_requests_refused.clone(),
        );
        let cache_requests = Family::<ResultLabel, Counter>::default();
        agent.register(
            "cache_requests",
            "Policy cache lookups for portal decisions, by result (hit, stale, miss)",
            cache_requests.clone(),
        );
        let cache_size = Gauge::default();
        agent.register(
            "cache_size",
            "Decisions held by the policy cache",
            cache_size.clone(),
        );
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        agent.register("build_info", "Build information", build_info);
        let store_writes = Family::<TableStatus, Counter>::default();
        agent.register(
            "store_writes",
            "Transactions of the durable state store by table and outcome (ok, error)",
            store_writes.clone(),
        );
        let outbox_depth = Gauge::default();
        agent.register(
            "outbox_depth",
            "Events waiting in the durable outbox for the portal's acknowledgement",
            outbox_depth.clone(),
        );
        let outbox_dropped = Counter::default();
        agent.register(
            "outbox_dropped",
            "Session updates dropped from the full outbox (connects and disconnects never are)",
            outbox_dropped.clone(),
        );
        let portal_requests = Family::<MethodStatus, Counter>::default();
        agent.register(
            "portal_requests",
            "Calls to the portal by method and outcome (ok, timeout, unavailable, breaker_open, \
             not_configured, invalid_answer, or the portal's gRPC status code)",
            portal_requests.clone(),
        );
        let portal_request_duration =
            Family::<MethodLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        agent.register_with_unit(
            "portal_request_duration",
            "Latency of calls that reached out to the portal",
            prometheus_client::registry::Unit::Seconds,
            portal_request_duration.clone(),
        );
        let circuit_breaker_state = Family::<ServiceLabel, Gauge>::default();
        agent.register(
            "circuit_breaker_state",
            "Circuit breaker in front of a portal service: 0 closed, 1 half-open, 2 open",
            circuit_breaker_state.clone(),
        );
        let config_writes = Family::<KindStatus, Counter>::default();
        agent.register(
            "config_writes",
            "Per-user and per-group config file requests, by kind and outcome",
            config_writes.clone(),
        );
        let local_policy_reloads = Family::<StatusLabel, Counter>::default();
        agent.register(
            "local_policy_reloads",
            "Local policy file reloads on SIGHUP: ok, or error (the running policy is kept)",
            local_policy_reloads.clone(),
        );

        let ocserv = root.sub_registry_with_prefix("ocserv");
        let ocserv_up = Gauge::default();
        ocserv.register(
            "up",
            "1 when the agent's last exchange with ocserv succeeded, else 0",
            ocserv_up.clone(),
        );
        let ocserv_total_sessions = Gauge::default();
        ocserv.register(
            "total_sessions",
            "Sessions ocserv reports as active (server STATUS)",
            ocserv_total_sessions.clone(),
        );
        let ocserv_bytes_in = Counter::<u64, AtomicU64>::default();
        ocserv.register(
            "bytes_in",
            "Bytes received from clients over closed sessions, as ocserv counts them",
            ocserv_bytes_in.clone(),
        );
        let ocserv_bytes_out = Counter::<u64, AtomicU64>::default();
        ocserv.register(
            "bytes_out",
            "Bytes sent to clients over closed sessions, as ocserv counts them",
            ocserv_bytes_out.clone(),
        );
        let ocserv_banned_ips = Gauge::default();
        ocserv.register(
            "banned_ips",
            "Addresses in ocserv's ban list",
            ocserv_banned_ips.clone(),
        );
        let ocserv_auth_failures = Counter::<u64, AtomicU64>::default();
        ocserv.register(
            "auth_failures",
            "Authentication failures since ocserv started",
            ocserv_auth_failures.clone(),
        );
        let ocserv_disconnects = Family::<ReasonLabel, Counter>::default();
        ocserv.register(
            "disconnect",
            "Sessions that ended, by reason (the DisconnectReason reported to the portal, \
             lowercase: admin_forced, policy_violation, unspecified, ...)",
            ocserv_disconnects.clone(),
        );
        Self {
            registry: root,
            active_sessions: m_active,
            session_view_age,
            ready,
            connections_open,
            connections_refused,
            ocserv_requests,
            ocserv_request_duration,
            actor_restarts,
            grpc_requests,
            ocserv_up,
            ocserv_total_sessions,
            ocserv_bytes_in,
            ocserv_bytes_out,
            ocserv_banned_ips,
            ocserv_auth_failures,
            ocserv_disconnects,
            hook_decisions,
            hook_decision_duration,
            hook_requests_refused,
            cache_requests,
            cache_size,
            portal_requests,
            portal_request_duration,
            circuit_breaker_state,
            config_writes,
            local_policy_reloads,
            store_writes,
            outbox_depth,
            outbox_dropped,
        }
    }

    /// One answered hook request.
    pub fn hook_decision(
        &self,
        reason: &'static str,
        decision: &'static str,
        source: &'static str,
        elapsed: Duration,
    ) {
        self.hook_decisions
            .get_or_create(&HookDecisionLabels {
                reason,
                decision,
                source,
            })
            .inc();
        self.hook_decision_duration.observe(elapsed.as_secs_f64());
    }

    /// A hook request answered with an error, or a connection refused, by cause.
    pub fn hook_refused(&self, cause: &'static str) {
        self.hook_requests_refused
            .get_or_create(&CauseLabel { cause })
            .inc();
    }

    /// A policy cache lookup: `hit`, `stale` or `miss`.
    pub fn cache_request(&self, result: &'static str) {
        self.cache_requests
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The text exposition format, for `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Records one request to ocserv.
    pub fn observe_ocserv(&self, command: &'static str, ok: bool, elapsed: Duration) {
        let status = if ok { "ok" } else { "error" };
        self.ocserv_requests
            .get_or_create(&CommandStatus { command, status })
            .inc();
        self.ocserv_request_duration
            .get_or_create(&CommandLabel { command })
            .observe(elapsed.as_secs_f64());
    }

    /// A call refused before it reached ocserv (our own bound, or an invalid argument).
    pub fn observe_ocserv_refused(&self, command: &'static str) {
        self.ocserv_requests
            .get_or_create(&CommandStatus {
                command,
                status: "refused",
            })
            .inc();
    }

    /// Whether the agent's last exchange with ocserv succeeded.
    pub fn set_ocserv_up(&self, up: bool) {
        self.ocserv_up.set(i64::from(up));
    }

    /// The number of connected sessions, or `None` while nobody knows it (stale view).
    pub fn set_active_sessions(&self, n: Option<usize>) {
        self.active_sessions.set(n.map_or(f64::NAN, |n| n as f64));
    }

    /// Refreshes the figures computed at scrape time from the shared health record.
    pub fn refresh(&self, health: &crate::health::Health) {
        let inputs = health.inputs();
        self.session_view_age
            .set(inputs.since_sync.map_or(f64::NAN, |d| d.as_secs_f64()));
        self.ready
            .set(i64::from(crate::health::verdict(inputs).is_ok()));
        if inputs
            .since_sync
            .is_none_or(|age| crate::health::too_old(age, inputs.reconcile_interval))
        {
            self.set_active_sessions(None);
        }
    }

    pub fn set_connections_open(&self, listener: &'static str, n: usize) {
        self.connections_open
            .get_or_create(&ListenerLabel { listener })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusedLabels { listener, reason })
            .inc();
    }

    /// Copies ocserv's server-wide figures. ocserv's own counters are absolute and reset when it
    /// restarts; storing them as they are lets Prometheus see the reset.
    pub fn set_ocserv_status(&self, status: &ServerStatus) {
        self.ocserv_total_sessions
            .set(i64::from(status.active_sessions));
        self.ocserv_banned_ips.set(i64::from(status.banned_ips));
        self.ocserv_bytes_in
            .inner()
            .store(status.bytes_in, Ordering::Relaxed);
        self.ocserv_bytes_out
            .inner()
            .store(status.bytes_out, Ordering::Relaxed);
        self.ocserv_auth_failures
            .inner()
            .store(status.total_auth_failures, Ordering::Relaxed);
    }

    pub fn actor_restarted(&self, actor: &'static str) {
        self.actor_restarts
            .get_or_create(&ActorLabel { actor })
            .inc();
    }

    /// Records one per-user or per-group file request (`kind`: `user`/`group`).
    pub fn config_write(&self, kind: &'static str, status: &'static str) {
        self.config_writes
            .get_or_create(&KindStatus { kind, status })
            .inc();
    }

    /// Records one reload of the local policy file (`ok` or `error`).
    pub fn local_policy_reload(&self, ok: bool) {
        let status = if ok { "ok" } else { "error" };
        self.local_policy_reloads
            .get_or_create(&StatusLabel { status })
            .inc();
    }

    pub fn grpc_request(&self, method: &'static str, code: tonic::Code) {
        self.grpc_requests
            .get_or_create(&GrpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
    }
}

impl Metrics {
    /// Counts one session that ended, with its reason.
    pub fn session_ended(&self, reason: DisconnectReason) {
        self.ocserv_disconnects
            .get_or_create(&ReasonLabel {
                reason: reason_label(reason),
            })
            .inc();
    }

    /// Counts one transaction of the durable store on `table`.
    pub fn store_write(&self, table: &'static str, ok: bool) {
        let status = if ok { "ok" } else { "error" };
        self.store_writes
            .get_or_create(&TableStatus { table, status })
            .inc();
    }

    /// Records one call to the portal: its outcome, and its latency when it reached out to the
    /// portal (`elapsed` is `None` for calls answered without a network call).
    pub fn observe_portal(
        &self,
        method: &'static str,
        status: &'static str,
        elapsed: Option<Duration>,
    ) {
        self.portal_requests
            .get_or_create(&MethodStatus { method, status })
            .inc();
        if let Some(elapsed) = elapsed {
            self.portal_request_duration
                .get_or_create(&MethodLabel { method })
                .observe(elapsed.as_secs_f64());
        }
    }

    /// The state of the circuit breaker in front of `service` (`auth`, ...).
    pub fn set_breaker_state(&self, service: &'static str, state: crate::breaker::BreakerState) {
        self.circuit_breaker_state
            .get_or_create(&ServiceLabel { service })
            .set(state.gauge());
    }
}

/// The canonical upper-snake name of a gRPC status code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_contract_names() {
        let m = Metrics::new();
        m.observe_ocserv("list", true, Duration::from_millis(1));
        m.actor_restarted("session_registry");
        m.grpc_request("GetActiveSessions", tonic::Code::NotFound);
        m.set_active_sessions(Some(0));
        m.connection_refused("grpc_socket", "peer_uid");
        m.observe_portal("CheckPolicy", "ok", Some(Duration::from_millis(3)));
        m.observe_portal("CheckPolicy", "breaker_open", None);
        m.set_breaker_state("auth", crate::breaker::BreakerState::Open);
        m.config_write("user", "written");
        m.local_policy_reload(false);
        m.set_ocserv_status(&ServerStatus {
            active_sessions: 3,
            bytes_in: 5000,
            total_auth_failures: 2,
            ..Default::default()
        });
        let text = m.encode();
        for needle in [
            "ocserv_agent_active_sessions 0.0",
            "ocserv_agent_ocserv_requests_total{command=\"list\",status=\"ok\"} 1",
            "ocserv_agent_ocserv_request_duration_seconds_count{command=\"list\"} 1",
            "ocserv_agent_actor_restarts_total{actor=\"session_registry\"} 1",
            "ocserv_agent_grpc_requests_total{method=\"GetActiveSessions\",code=\"NOT_FOUND\"} 1",
            "ocserv_agent_build_info{version=\"",
            "ocserv_up 0",
            "ocserv_agent_connections_refused_total{listener=\"grpc_socket\",reason=\"peer_uid\"} 1",
            "ocserv_total_sessions 3",
            "ocserv_bytes_in_total 5000",
            "ocserv_auth_failures_total 2",
            "ocserv_agent_portal_requests_total{method=\"CheckPolicy\",status=\"ok\"} 1",
            "ocserv_agent_portal_requests_total{method=\"CheckPolicy\",status=\"breaker_open\"} 1",
            "ocserv_agent_portal_request_duration_seconds_count{method=\"CheckPolicy\"} 1",
            "ocserv_agent_circuit_breaker_state{service=\"auth\"} 2",
            "ocserv_agent_config_writes_total{kind=\"user\",status=\"written\"} 1",
            "ocserv_agent_local_policy_reloads_total{status=\"error\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn a_stale_view_clears_the_sessions_gauge() {
        let m = Metrics::new();
        let h = crate::health::Health::new(Duration::from_secs(10));
        m.set_active_sessions(Some(3));
        h.ocserv_answered();
        h.synced();
        m.refresh(&h);
        assert_eq!(m.active_sessions.get(), 3.0);
        assert_eq!(m.ready.get(), 1);
        let never = crate::health::Health::new(Duration::from_secs(10));
        m.refresh(&never);
        assert!(m.active_sessions.get().is_nan());
        assert!(m.session_view_age.get().is_nan());
        assert_eq!(m.ready.get(), 0);
    }
}
