//! `[grpc]`: the management front door. The control channel is a Unix socket checked by peer
//! uid; a plaintext TCP listener exists only when asked for, on loopback, with `insecure = true`
//! (mTLS is not configured yet).

use std::net::SocketAddr;

use super::*;

section! {
    /// `[grpc]`.
    pub struct GrpcConfig {
        /// The gRPC control channel as a Unix socket (its directory created 0750 if missing,
        /// the socket 0660, a stale one replaced). An absolute path.
        socket: PathBuf = "/run/ocserv-agent/agent.sock".into(),
        /// Peer uids (`SO_PEERCRED`) allowed on `socket`; others are refused. Not empty. From
        /// the environment comma-separated, e.g. `0,1000`.
        allowed_uids: Vec<u32> = vec![0],
        /// Optional plaintext TCP listener (IP:port; port 0 picks a free one). Needs
        /// `insecure = true` and a loopback address. Not set by default: no TCP listener.
        listen: Option<SocketAddr> = None,
        /// Allows the plaintext TCP `listen` (whoever can connect to it controls the agent).
        insecure: bool = false,
        /// Connections open at once per listener (socket and TCP); one over the cap is closed
        /// at once. 1 to 1000000.
        max_connections: usize = 4096,
        /// A connection without a request for this long is closed (per listener); 1s to 1d.
        #[serde(with = "humantime_serde")] idle_timeout: Duration = secs(300),
        /// HTTP/2 concurrent streams per connection; 1 to 1024.
        max_streams_per_connection: u32 = 32,
        /// How long a request's headers and body may take to arrive once its stream opened (a
        /// stream that never sends its body is cut); 100ms to 5m.
        #[serde(with = "humantime_serde")] read_timeout: Duration = secs(10),
        /// HTTP/2 keepalive: how often a connection is PINGed; 1s to 1h.
        #[serde(with = "humantime_serde")] keepalive_interval: Duration = secs(30),
        /// HTTP/2 keepalive: a PING unanswered for this long closes the connection; 1s to 5m.
        #[serde(with = "humantime_serde")] keepalive_timeout: Duration = secs(10),
        /// Requests served at once across all connections; more wait. 1 to 65536.
        max_concurrent_requests: usize = 256,
        /// Deadline of one gRPC request, end to end; 1ms to 1h.
        #[serde(with = "humantime_serde")] request_timeout: Duration = secs(5),
    }
}

impl GrpcConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        absolute("grpc.socket", &self.socket)?;
        if self.allowed_uids.is_empty() {
            return fail("grpc.allowed_uids", "must not be empty");
        }
        if let Some(a) = self.listen.filter(|a| !a.ip().is_loopback()) {
            let why =
                "plaintext gRPC is only allowed on a loopback address; mTLS is not configured yet";
            return fail("grpc.listen", format!("{why} (got {a})"));
        }
        if let Some(a) = self.listen.filter(|_| !self.insecure) {
            let why =
                "a plaintext TCP listener needs grpc.insecure = true, even on a loopback address";
            return fail("grpc.listen", format!("{why} (got {a})"));
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
