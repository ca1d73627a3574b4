//! `[grpc]`: the management front door. The control channel is a Unix socket checked by peer
//! uid; a plaintext TCP listener exists only when asked for, on loopback, with `insecure = true`
//! (mTLS is not configured yet).

use super::*;

section! {
    "grpc" => pub struct GrpcConfig {
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
        /// Connections open at once per listener (socket and TCP); one more is closed at once.
        max_connections: usize = 4096, in 1..=1_000_000,
        /// A connection without a request for this long is closed (per listener).
        #[serde(with = "human")] idle_timeout: Duration = secs(300), in secs(1)..=secs(86_400),
        /// HTTP/2 concurrent streams per connection.
        max_streams_per_connection: u32 = 32, in 1..=1024,
        /// How long a request's headers and body may take to arrive once its stream opened (a
        /// stream that never sends its body is cut).
        #[serde(with = "human")] read_timeout: Duration = secs(10), in ms(100)..=secs(300),
        /// HTTP/2 keepalive: how often a connection is PINGed.
        #[serde(with = "human")] keepalive_interval: Duration = secs(30), in secs(1)..=secs(3600),
        /// HTTP/2 keepalive: a PING unanswered for this long closes the connection.
        #[serde(with = "human")] keepalive_timeout: Duration = secs(10), in secs(1)..=secs(300),
        /// Requests served at once across all connections; more wait.
        max_concurrent_requests: usize = 256, in 1..=65536,
        /// Deadline of one gRPC request, end to end.
        #[serde(with = "human")] request_timeout: Duration = secs(5), in ms(1)..=secs(3600),
    }
}

impl GrpcConfig {
    fn rules(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }
}
