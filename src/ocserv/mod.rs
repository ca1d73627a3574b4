//! Talking to ocserv: typed results, typed errors, and the [`OcservBackend`] trait implemented by
//! the native control-socket client ([`native`]) and the exec'd-`occtl` fallback ([`occtl`]).
//!
//! Both backends return the same types, so the rest of the agent never knows which one is in use.
//! Every call is bounded by the backend's timeout; failures are [`CtlError`]s, never panics.

pub mod codec;
pub mod counters;
#[doc(hidden)]
pub mod fake;
pub mod native;
pub mod occtl;
pub mod occtl_json;
pub mod top;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// ocserv's per-session state (`status` in `user_info_rep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    PreAuth,
    /// Shown by ocserv as "auth failed" also while the connect-script is still running.
    AuthFailed,
    Init,
    Authenticating,
    Connected,
    Unknown,
}

impl SessionState {
    /// From the control protocol's numeric status.
    pub fn from_code(code: u32) -> Self {
        match code {
            0 => Self::PreAuth,
            1 => Self::AuthFailed,
            2 => Self::Init,
            3 => Self::Authenticating,
            4 => Self::Connected,
            _ => Self::Unknown,
        }
    }

    /// From occtl's `State` string.
    pub fn from_occtl(s: &str) -> Self {
        match s {
            "connected" => Self::Connected,
            "pre-auth" => Self::PreAuth,
            "authenticating" => Self::Authenticating,
            "auth failed" => Self::AuthFailed,
            "init" => Self::Init,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreAuth => "pre-auth",
            Self::AuthFailed => "auth failed",
            Self::Init => "init",
            Self::Authenticating => "authenticating",
            Self::Connected => "connected",
            Self::Unknown => "unknown",
        }
    }
}

/// Byte counters of one session, seen from the server's tun device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ByteCounters {
    /// Bytes received from the client (its upload; `rx` on the server's tun).
    pub bytes_in: u64,
    /// Bytes sent to the client (its download; `tx` on the server's tun).
    pub bytes_out: u64,
}

/// One ocserv session as both backends report it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Session {
    /// ocserv's `ID`: the worker's PID. Unique among live sessions only.
    pub id: u32,
    /// The 28-character base64 session id ("Full session"), without ocserv's trailing NUL.
    pub safe_id: Option<String>,
    pub username: String,
    /// Empty when the user has no group (occtl prints `(none)`).
    pub groupname: String,
    pub state: SessionState,
    /// The client's real (public) address.
    pub client_ip: Option<IpAddr>,
    /// The client's VPN address (ocserv's `local_ip` / occtl's `IPv4`).
    pub vpn_ipv4: Option<Ipv4Addr>,
    pub vpn_ipv6: Option<Ipv6Addr>,
    /// The server side of the point-to-point link.
    pub server_ptp_ipv4: Option<Ipv4Addr>,
    /// The tun device, e.g. `vpns0`; empty before the tunnel is up.
    pub device: String,
    /// Unix seconds.
    pub connected_at: u64,
    pub hostname: String,
    pub user_agent: String,
    pub vhost: String,
    pub tls_ciphersuite: String,
    pub dtls_ciphersuite: String,
    pub mtu: Option<u32>,
    pub dns: Vec<String>,
    pub routes: Vec<String>,
    /// Filled from the tun device when it could be read.
    pub counters: Option<ByteCounters>,
}

/// The full identity of one session. ocserv's `ID` is the worker's PID and is recycled, so a
/// session is only ever acted on by its ID **and** its 28-character session id (`safe_id`), or,
/// when the backend could not tell the session id, its connect time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct SessionKey {
    pub id: u32,
    pub safe_id: Option<String>,
    /// Unix seconds; only compared when one side has no `safe_id`.
    pub connected_at: u64,
}

impl SessionKey {
    /// True when `s` is this very session (not merely a session with the same recycled ID).
    pub fn matches(&self, s: &Session) -> bool {
        self.identifies(s.id, s.safe_id.as_deref(), s.connected_at)
    }

    /// True when both keys name the same session.
    pub fn same(&self, other: &SessionKey) -> bool {
        self.identifies(other.id, other.safe_id.as_deref(), other.connected_at)
    }

    /// The rule: the same ID, and the same session id when both have one, else the same
    /// connection time.
    fn identifies(&self, id: u32, safe_id: Option<&str>, connected_at: u64) -> bool {
        self.id == id
            && match (self.safe_id.as_deref(), safe_id) {
                (Some(a), Some(b)) => a == b,
                _ => self.connected_at == connected_at,
            }
    }
}

impl std::fmt::Display for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.safe_id {
            Some(sid) => write!(f, "{} ({sid})", self.id),
            None => write!(f, "{} (connected at {})", self.id, self.connected_at),
        }
    }
}

impl Session {
    /// This session's full identity.
    pub fn key(&self) -> SessionKey {
        SessionKey {
            id: self.id,
            safe_id: self.safe_id.clone(),
            connected_at: self.connected_at,
        }
    }

    /// The VPN address to show: IPv4 when present, else IPv6.
    pub fn vpn_ip(&self) -> Option<IpAddr> {
        self.vpn_ipv4
            .map(IpAddr::V4)
            .or(self.vpn_ipv6.map(IpAddr::V6))
    }
}

/// Server-wide status (`STATUS` / `show status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerStatus {
    pub running: bool,
    pub pid: u32,
    pub sec_mod_pids: Vec<u32>,
    pub active_sessions: u32,
    /// Unix seconds.
    pub start_time: u64,
    pub banned_ips: u32,
    pub sessions_closed: u64,
    pub total_sessions_closed: u64,
    pub auth_failures: u64,
    pub total_auth_failures: u64,
    /// Bytes of closed sessions since the last reset (ocserv counts kilobytes).
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// One entry of ocserv's ban list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ban {
    pub ip: IpAddr,
    pub score: u32,
    /// Unix seconds; 0 when unknown.
    pub expires: u64,
}

/// One cookie (`LIST_COOKIES` / `show sessions all`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Cookie {
    pub safe_id: String,
    pub username: String,
    pub groupname: String,
    pub user_agent: String,
    pub remote_ip: Option<IpAddr>,
    pub session_is_open: bool,
    pub tls_auth_ok: bool,
    pub in_use: bool,
    /// Unix seconds.
    pub created: u64,
    pub expires: u64,
    pub vhost: String,
}

/// The outcome of a disconnect or terminate request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectOutcome {
    /// ocserv confirmed.
    Done,
    /// ocserv answered "no such user / id".
    NotFound,
}

/// Which backend implements the calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// ocserv's control socket, spoken directly.
    Native,
    /// `occtl --json`, exec'd with an argument vector.
    Occtl,
}

/// Why a call to ocserv failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot connect to ocserv control socket {path}: {source}")]
    Unreachable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ocserv did not answer {command} within {timeout:?}")]
    Timeout {
        command: &'static str,
        timeout: Duration,
    },
    #[error("ocserv closed the connection without answering {command} (command not supported by this ocserv?)")]
    NoReply { command: &'static str },
    #[error("i/o error during {command}: {source}")]
    Io {
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed reply to {command}: {reason}")]
    Protocol {
        command: &'static str,
        reason: String,
    },
    #[error("ocserv refused {command}")]
    Refused { command: &'static str },
    #[error("cannot run occtl at {path}: {source}")]
    OcctlMissing {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("occtl {command} failed (exit code {code:?}): {stderr}")]
    OcctlFailed {
        command: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("invalid argument {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The agent's own bound on calls to ocserv refused this one (not sent to ocserv).
    #[error("too many requests to ocserv at once: {0}")]
    Busy(crate::gate::Refused),
}

impl CtlError {
    /// True when ocserv itself could not be reached (as opposed to answering badly).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. } | Self::Timeout { .. } | Self::OcctlFailed { .. }
        )
    }
}

pub type CtlResult<T> = Result<T, CtlError>;

/// What every backend can do. Results are typed the same way whichever backend answers.
///
/// Names passed in have already been validated by [`crate::validate::username`].
pub trait OcservBackend: Send + Sync {
    fn status(&self) -> impl std::future::Future<Output = CtlResult<ServerStatus>> + Send;
    /// All sessions, with byte counters where the tun device could be read.
    fn list(&self) -> impl std::future::Future<Output = CtlResult<Vec<Session>>> + Send;
    /// Sessions of one user (empty when none).
    fn user_info(
        &self,
        username: &str,
    ) -> impl std::future::Future<Output = CtlResult<Vec<Session>>> + Send;
    /// One session by ID (`None` when no such session).
    fn id_info(
        &self,
        id: u32,
    ) -> impl std::future::Future<Output = CtlResult<Option<Session>>> + Send;
    fn disconnect_name(
        &self,
        username: &str,
    ) -> impl std::future::Future<Output = CtlResult<DisconnectOutcome>> + Send;
    fn disconnect_id(
        &self,
        id: u32,
    ) -> impl std::future::Future<Output = CtlResult<DisconnectOutcome>> + Send;
    /// Disconnects every session of the user and revokes its cookies where ocserv can
    /// (TERMINATE_USER, ocserv >= 1.4.2); falls back to DISCONNECT_NAME when the server closes
    /// without a reply (older ocserv).
    fn terminate_user(
        &self,
        username: &str,
    ) -> impl std::future::Future<Output = CtlResult<DisconnectOutcome>> + Send;
    /// As [`Self::terminate_user`] for one session ID (TERMINATE_ID, else DISCONNECT_ID).
    fn terminate_id(
        &self,
        id: u32,
    ) -> impl std::future::Future<Output = CtlResult<DisconnectOutcome>> + Send;
    /// Ends exactly the session `key` names, never another session that has since been given
    /// the same (recycled) ID: the identity is re-checked against ocserv in the same call.
    ///
    /// Native: with a session id, TERMINATE_SESSION (ocserv >= 1.4.2, which also revokes the
    /// cookie); when ocserv closes without answering (older versions), ID_INFO, and DISCONNECT_ID
    /// only if the listed session [`SessionKey::matches`]. occtl: `show id ID`, the same check,
    /// then `disconnect id ID`. A session that is gone or is another session now is
    /// [`DisconnectOutcome::NotFound`].
    fn disconnect_session(
        &self,
        key: &SessionKey,
    ) -> impl std::future::Future<Output = CtlResult<DisconnectOutcome>> + Send;
    fn list_banned(&self) -> impl std::future::Future<Output = CtlResult<Vec<Ban>>> + Send;
    fn unban_ip(
        &self,
        ip: IpAddr,
    ) -> impl std::future::Future<Output = CtlResult<DisconnectOutcome>> + Send;
    fn reload(&self) -> impl std::future::Future<Output = CtlResult<()>> + Send;
    fn list_cookies(&self) -> impl std::future::Future<Output = CtlResult<Vec<Cookie>>> + Send;
}

/// The configured backend: one enum so callers need no trait objects.
#[derive(Debug, Clone)]
pub enum Backend {
    Native(native::NativeBackend),
    Occtl(occtl::OcctlBackend),
}

macro_rules! delegate {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            Backend::Native($b) => $e.await,
            Backend::Occtl($b) => $e.await,
        }
    };
}

impl OcservBackend for Backend {
    async fn status(&self) -> CtlResult<ServerStatus> {
        delegate!(self, b => b.status())
    }
    async fn list(&self) -> CtlResult<Vec<Session>> {
        delegate!(self, b => b.list())
    }
    async fn user_info(&self, username: &str) -> CtlResult<Vec<Session>> {
        delegate!(self, b => b.user_info(username))
    }
    async fn id_info(&self, id: u32) -> CtlResult<Option<Session>> {
        delegate!(self, b => b.id_info(id))
    }
    async fn disconnect_name(&self, username: &str) -> CtlResult<DisconnectOutcome> {
        delegate!(self, b => b.disconnect_name(username))
    }
    async fn disconnect_id(&self, id: u32) -> CtlResult<DisconnectOutcome> {
        delegate!(self, b => b.disconnect_id(id))
    }
    async fn terminate_user(&self, username: &str) -> CtlResult<DisconnectOutcome> {
        delegate!(self, b => b.terminate_user(username))
    }
    async fn terminate_id(&self, id: u32) -> CtlResult<DisconnectOutcome> {
        delegate!(self, b => b.terminate_id(id))
    }
    async fn disconnect_session(&self, key: &SessionKey) -> CtlResult<DisconnectOutcome> {
        delegate!(self, b => b.disconnect_session(key))
    }
    async fn list_banned(&self) -> CtlResult<Vec<Ban>> {
        delegate!(self, b => b.list_banned())
    }
    async fn unban_ip(&self, ip: IpAddr) -> CtlResult<DisconnectOutcome> {
        delegate!(self, b => b.unban_ip(ip))
    }
    async fn reload(&self) -> CtlResult<()> {
        delegate!(self, b => b.reload())
    }
    async fn list_cookies(&self) -> CtlResult<Vec<Cookie>> {
        delegate!(self, b => b.list_cookies())
    }
}

/// Replies larger than this are decoded and mapped on the heavy-work thread; smaller ones
/// inline, where a thread hop would cost more latency than the work itself.
pub const INLINE_DECODE_LIMIT: usize = 64 * 1024;

/// Runs CPU-heavy work (decoding a large reply, mapping thousands of sessions) off the async
/// workers, on [`crate::heavy`]'s thread, when its input is larger than [`INLINE_DECODE_LIMIT`]
/// bytes, inline otherwise. `command` names the call if the work panics.
pub(crate) async fn off_worker<T, F>(
    command: &'static str,
    input_len: usize,
    work: F,
) -> CtlResult<T>
where
    F: FnOnce() -> CtlResult<T> + Send + 'static,
    T: Send + 'static,
{
    if input_len <= INLINE_DECODE_LIMIT {
        return work();
    }
    crate::heavy::run(crate::heavy::Lane::Ocserv, work)
        .await
        .unwrap_or_else(|e| {
            Err(CtlError::Io {
                command,
                source: std::io::Error::other(format!("decoding the reply failed: {e}")),
            })
        })
}

impl Backend {
    pub fn kind(&self) -> BackendKind {
        match self {
            Self::Native(_) => BackendKind::Native,
            Self::Occtl(_) => BackendKind::Occtl,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small inputs are handled on the calling thread; large ones on the heavy-work thread,
    /// never on the (here: only) async worker.
    #[tokio::test(flavor = "current_thread")]
    async fn large_inputs_are_decoded_off_the_async_worker() {
        let here = std::thread::current().id();
        let small = off_worker("LIST", INLINE_DECODE_LIMIT, move || {
            Ok(std::thread::current().id())
        })
        .await
        .unwrap();
        assert_eq!(small, here);
        let large = off_worker("LIST", INLINE_DECODE_LIMIT + 1, move || {
            Ok(std::thread::current().id())
        })
        .await
        .unwrap();
        assert_ne!(large, here);
        // Errors come back unchanged; a panic becomes an error naming the command.
        let e = off_worker::<(), _>("LIST", usize::MAX, || {
            Err(CtlError::Refused { command: "LIST" })
        })
        .await
        .unwrap_err();
        assert!(matches!(e, CtlError::Refused { command: "LIST" }));
        let e = off_worker::<(), _>("LIST", usize::MAX, || panic!("boom"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &e,
                CtlError::Io {
                    command: "LIST",
                    ..
                }
            ) && e.to_string().contains("LIST"),
            "{e}"
        );
    }

    #[test]
    fn key_matches_by_session_id_else_connect_time() {
        let s = |id, sid: Option<&str>, at| Session {
            safe_id: sid.map(str::to_owned),
            ..crate::registry::tests::session(id, "alice", at)
        };
        let key = s(7, Some("A"), 100).key();
        assert!(key.matches(&s(7, Some("A"), 160)), "the session id decides");
        assert!(
            !key.matches(&s(7, Some("B"), 100)),
            "recycled ID, other session"
        );
        assert!(!key.matches(&s(8, Some("A"), 100)));
        let bare = s(7, None, 100).key();
        assert!(bare.matches(&s(7, Some("A"), 100)));
        assert!(!bare.matches(&s(7, None, 101)));
    }
}
