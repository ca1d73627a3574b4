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
    pub active_sessions: Gauge,
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
        let m_active = Gauge::default();
        agent.register(
            "active_sessions",
            "Live ocserv sessions known to the session registry",
            m_active.clone(),
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
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        agent.register("build_info", "Build information", build_info);

        let ocserv = root.sub_registry_with_prefix("ocserv");
        let ocserv_up = Gauge::default();
        ocserv.register(
            "up",
            "1 when ocserv answered the last request, else 0",
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
        Self {
            registry: root,
            active_sessions: m_active,
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
        }
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

    /// Whether ocserv answered the last request; what `/readyz` reports.
    pub fn set_ocserv_up(&self, up: bool) {
        self.ocserv_up.set(i64::from(up));
    }

    pub fn ocserv_is_up(&self) -> bool {
        self.ocserv_up.get() == 1
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

    pub fn grpc_request(&self, method: &'static str, code: tonic::Code) {
        self.grpc_requests
            .get_or_create(&GrpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
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
        m.set_ocserv_status(&ServerStatus {
            active_sessions: 3,
            bytes_in: 5000,
            total_auth_failures: 2,
            ..Default::default()
        });
        let text = m.encode();
        for needle in [
            "ocserv_agent_active_sessions 0",
            "ocserv_agent_ocserv_requests_total{command=\"list\",status=\"ok\"} 1",
            "ocserv_agent_ocserv_request_duration_seconds_count{command=\"list\"} 1",
            "ocserv_agent_actor_restarts_total{actor=\"session_registry\"} 1",
            "ocserv_agent_grpc_requests_total{method=\"GetActiveSessions\",code=\"NOT_FOUND\"} 1",
            "ocserv_agent_build_info{version=\"",
            "ocserv_up 0",
            "ocserv_total_sessions 3",
            "ocserv_bytes_in_total 5000",
            "ocserv_auth_failures_total 2",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
