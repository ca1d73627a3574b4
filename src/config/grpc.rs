//! `[grpc]`: the management front door. The control channel is a Unix socket checked by peer
//! uid; a plaintext TCP listener exists only when asked for, on loopback, with `insecure = true`
//! (mTLS is not configured yet).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{absolute, duration, ms, number, secs, ConfigError};

/// `[grpc]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// The gRPC control channel as a Unix socket (its directory created 0750 if missing, the
    /// socket 0660, a stale one replaced). An absolute path.
    pub socket: PathBuf,
    /// Peer uids (`SO_PEERCRED`) allowed on `socket`; others are refused. Not empty. From the
    /// environment as a comma-separated list, e.g. `0,1000`.
    pub allowed_uids: Vec<u32>,
    /// Optional plaintext TCP listener (IP:port; port 0 picks a free one). Needs
    /// `insecure = true` and a loopback address. Not set by default: no TCP listener.
    pub listen: Option<SocketAddr>,
    /// Allows the plaintext TCP `listen` (anyone who can reach it controls the agent).
    pub insecure: bool,
    /// Connections open at once per listener (socket and TCP); one over the cap is closed at
    /// once. 1 to 1000000.
    pub max_connections: usize,
    /// A connection without a request for this long is closed (per listener); 1s to 1d.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// HTTP/2 concurrent streams per connection; 1 to 1024.
    pub max_streams_per_connection: u32,
    /// How long a request's headers and body may take to arrive once its stream opened (a
    /// stream that never sends its body is cut); 100ms to 5m.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// HTTP/2 keepalive: how often a connection is PINGed; 1s to 1h.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// HTTP/2 keepalive: a PING unanswered for this long closes the connection; 1s to 5m.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Requests served at once across all connections; more wait. 1 to 65536.
    pub max_concurrent_requests: usize,
    /// Deadline of one gRPC request, end to end; 1ms to 1h.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            socket: "/run/ocserv-agent/agent.sock".into(),
            allowed_uids: vec![0],
            listen: None,
            insecure: false,
            max_connections: 4096,
            idle_timeout: secs(300),
            max_streams_per_connection: 32,
            read_timeout: secs(10),
            keepalive_interval: secs(30),
            keepalive_timeout: secs(10),
            max_concurrent_requests: 256,
            request_timeout: secs(5),
        }
    }
}

impl GrpcConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        absolute("grpc.socket", &self.socket)?;
        if self.allowed_uids.is_empty() {
            return Err(ConfigError::new("grpc.allowed_uids", "must not be empty"));
        }
        match self.listen {
            Some(a) if !a.ip().is_loopback() => Err(ConfigError::new(
                "grpc.listen",
                format!("plaintext gRPC is only allowed on a loopback address; mTLS is not configured yet (got {a})"),
            ))?,
            Some(a) if !self.insecure => Err(ConfigError::new(
                "grpc.listen",
                format!("a plaintext TCP listener needs grpc.insecure = true, even on a loopback address (got {a})"),
            ))?,
            _ => {}
        }
        number("grpc.max_connections", self.max_connections, 1..=1_000_000)?;
        duration(
            "grpc.idle_timeout",
            self.idle_timeout,
            secs(1)..=secs(86_400),
        )?;
        number(
            "grpc.max_streams_per_connection",
            self.max_streams_per_connection,
            1..=1024,
        )?;
        duration("grpc.read_timeout", self.read_timeout, ms(100)..=secs(300))?;
        duration(
            "grpc.keepalive_interval",
            self.keepalive_interval,
            secs(1)..=secs(3600),
        )?;
        duration(
            "grpc.keepalive_timeout",
            self.keepalive_timeout,
            secs(1)..=secs(300),
        )?;
        number(
            "grpc.max_concurrent_requests",
            self.max_concurrent_requests,
            1..=65536,
        )?;
        duration(
            "grpc.request_timeout",
            self.request_timeout,
            ms(1)..=secs(3600),
        )
    }
}
