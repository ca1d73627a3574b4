//! The native backend: speaks ocserv's control socket (what `occtl` speaks) directly.
//!
//! Inputs: the control socket path (`occtl-socket-file`) and a per-call timeout.
//! Outputs: the shared typed results of [`crate::ocserv`], with per-session byte counters read
//! from the tun devices ([`super::counters`]).
//!
//! Protocol (reference/ocserv.md §1, framing in [`super::codec`]): one request per connection.
//! Each call connects, writes header and body in a single `write_all` of one buffer (a partial
//! frame stalls ocserv's single-threaded main loop), reads one reply frame, checks that the reply
//! code is the one that command expects, and decodes it.
//!
//! Failure behaviour, all as [`CtlError`], never a panic:
//! - the socket cannot be connected to: `Unreachable`, naming the path;
//! - the whole call (including a fallback and reading counters) exceeds the timeout: `Timeout`;
//! - ocserv closes before sending any byte: `NoReply` (what ocserv does with commands it does not
//!   know; `terminate_*` use this to fall back to `disconnect_*` on ocserv < 1.4.2);
//! - a wrong reply code, a truncated or oversize frame, or an undecodable body: `Protocol`;
//! - an invalid username, ID or session id: `InvalidArgument`, before anything is sent.
//!
//! Identity: ocserv's IDs are PIDs and get recycled. [`OcservBackend::disconnect_session`] acts on
//! a [`SessionKey`] (ID plus session id, or connect time): TERMINATE_SESSION by session id where
//! ocserv has it (1.4.2 and later), else ID_INFO and DISCONNECT_ID only when the listed session is
//! the one the key names. (The two requests of the fallback are separate connections, so a PID
//! could in theory be recycled in the milliseconds between them; ocserv 1.1.6 offers nothing
//! tighter.)
//!
//! Work off the async workers: a reply larger than [`super::INLINE_DECODE_LIMIT`] (a LIST of
//! thousands of sessions) is decoded on the blocking pool; reading byte counters always is.
//!
//! A `bool_msg` with status false from DISCONNECT_* / TERMINATE_* / UNBAN_IP means ocserv found
//! nothing to act on (its handlers set status only when a matching session or ban existed), so it
//! becomes [`DisconnectOutcome::NotFound`]. For RELOAD and STOP, false becomes `Refused`.

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::codec::{self, CodecError, Command, FrameDecoder, Reply};
use super::counters;
use super::{
    off_worker, Ban, Cookie, CtlError, CtlResult, DisconnectOutcome, OcservBackend, ServerStatus,
    Session, SessionKey,
};

/// Client for ocserv's control socket. Cheap to clone; holds no connection between calls.
#[derive(Debug, Clone)]
pub struct NativeBackend {
    pub socket: PathBuf,
    pub timeout: Duration,
}

fn protocol(command: Command) -> impl FnOnce(CodecError) -> CtlError {
    move |e| CtlError::Protocol {
        command: command.name(),
        reason: e.to_string(),
    }
}

fn check_username(username: &str) -> CtlResult<()> {
    crate::validate::username(username).map_err(|e| CtlError::InvalidArgument {
        field: "username",
        reason: e.reason,
    })
}

fn check_safe_id(safe_id: &str) -> CtlResult<()> {
    crate::validate::safe_id(safe_id).map_err(|e| CtlError::InvalidArgument {
        field: e.field,
        reason: e.reason,
    })
}

/// Decodes a `user_list_rep`, on the blocking pool when it is large.
async fn decode_sessions(command: Command, reply: Vec<u8>) -> CtlResult<Vec<Session>> {
    off_worker(command.name(), reply.len(), move || {
        codec::decode_sessions(&reply).map_err(protocol(command))
    })
    .await
}

/// ocserv's IDs are PIDs carried as sint32; larger values cannot name a session.
fn wire_id(id: u32) -> CtlResult<i32> {
    i32::try_from(id).map_err(|_| CtlError::InvalidArgument {
        field: "id",
        reason: format!("{id} is larger than ocserv's largest ID {}", i32::MAX),
    })
}

fn outcome(done: bool) -> DisconnectOutcome {
    if done {
        DisconnectOutcome::Done
    } else {
        DisconnectOutcome::NotFound
    }
}

impl NativeBackend {
    pub fn new(socket: PathBuf, timeout: Duration) -> Self {
        Self { socket, timeout }
    }

    /// The control socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Runs `fut` under this backend's timeout; `command` names the call in the error.
    async fn bounded<T>(
        &self,
        command: Command,
        fut: impl Future<Output = CtlResult<T>>,
    ) -> CtlResult<T> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(CtlError::Timeout {
                    command: command.name(),
                    timeout: self.timeout,
                })
            })
    }

    /// One request/reply exchange on a fresh connection, without a timeout of its own.
    /// Returns the reply body.
    async fn exchange(&self, command: Command, body: &[u8]) -> CtlResult<Vec<u8>> {
        let name = command.name();
        let request =
            codec::encode_request(command, body).map_err(|e| CtlError::InvalidArgument {
                field: "request body",
                reason: e.to_string(),
            })?;
        let mut stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| CtlError::Unreachable {
                    path: self.socket.display().to_string(),
                    source,
                })?;
        // One buffer, one write_all: ocserv reads a request as header then body, and a frame
        // split across a slow write would block its main loop.
        stream
            .write_all(&request)
            .await
            .map_err(|source| CtlError::Io {
                command: name,
                source,
            })?;

        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(frame) = decoder.next_frame().map_err(protocol(command))? {
                let expected = command.reply();
                if frame.code != expected.code() {
                    let got = Reply::from_code(frame.code).map_or("an unknown code", Reply::name);
                    return Err(CtlError::Protocol {
                        command: name,
                        reason: format!(
                            "expected reply {} ({}), got {} ({})",
                            expected.name(),
                            expected.code(),
                            got,
                            frame.code
                        ),
                    });
                }
                return Ok(frame.body);
            }
            let n = match stream.read(&mut buf).await {
                Ok(n) => n,
                // A reset before any reply byte is the same "closed without answering".
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionReset
                        && decoder.buffered() == 0 =>
                {
                    0
                }
                Err(source) => {
                    return Err(CtlError::Io {
                        command: name,
                        source,
                    })
                }
            };
            if n == 0 {
                // Nothing buffered: closed without answering. Else: closed inside a frame.
                return Err(match decoder.finish() {
                    Ok(()) => CtlError::NoReply { command: name },
                    Err(e) => protocol(command)(e),
                });
            }
            decoder.push(&buf[..n]);
        }
    }

    async fn sessions(&self, command: Command, body: &[u8]) -> CtlResult<Vec<Session>> {
        let reply = self.exchange(command, body).await?;
        let sessions = decode_sessions(command, reply).await?;
        with_counters(command, sessions).await
    }

    /// ID_INFO, then DISCONNECT_ID only when the session listed under that ID is the one `key`
    /// names (a recycled ID names another session: `NotFound`, nothing is sent).
    async fn disconnect_checked(
        &self,
        key: &SessionKey,
        wire: i32,
    ) -> CtlResult<DisconnectOutcome> {
        let body = codec::id_req(wire);
        let reply = self.exchange(Command::IdInfo, &body).await?;
        let listed = decode_sessions(Command::IdInfo, reply).await?;
        if !listed.iter().any(|s| key.matches(s)) {
            tracing::debug!(session = %key, "session gone or its ID recycled; not disconnecting");
            return Ok(DisconnectOutcome::NotFound);
        }
        Ok(outcome(self.bool_call(Command::DisconnectId, &body).await?))
    }

    async fn bool_call(&self, command: Command, body: &[u8]) -> CtlResult<bool> {
        let reply = self.exchange(command, body).await?;
        codec::decode_bool(&reply).map_err(protocol(command))
    }

    /// `terminate` first; on `NoReply` (ocserv < 1.4.2 closes on unknown commands) `fallback`.
    async fn with_fallback(
        &self,
        terminate: Command,
        fallback: Command,
        body: &[u8],
    ) -> CtlResult<DisconnectOutcome> {
        let done = match self.bool_call(terminate, body).await {
            Err(CtlError::NoReply { .. }) => {
                tracing::debug!(
                    command = terminate.name(),
                    fallback = fallback.name(),
                    "ocserv does not know the command; falling back"
                );
                self.bool_call(fallback, body).await?
            }
            other => other?,
        };
        Ok(outcome(done))
    }

    /// Ends one session by its session id and revokes its cookie (TERMINATE_SESSION, needs
    /// ocserv 1.4.2 or later). There is no fallback: an older ocserv closes without answering,
    /// which is returned as [`CtlError::NoReply`].
    pub async fn terminate_session(&self, safe_id: &str) -> CtlResult<DisconnectOutcome> {
        check_safe_id(safe_id)?;
        let cmd = Command::TerminateSession;
        self.bounded(cmd, async {
            Ok(outcome(
                self.bool_call(cmd, &codec::safe_id_req(safe_id)).await?,
            ))
        })
        .await
    }

    /// Asks ocserv to shut down (STOP). Every VPN session ends: for operators, never automatic.
    pub async fn stop(&self) -> CtlResult<()> {
        let cmd = Command::Stop;
        self.bounded(cmd, async {
            if self.bool_call(cmd, &[]).await? {
                Ok(())
            } else {
                Err(CtlError::Refused {
                    command: cmd.name(),
                })
            }
        })
        .await
    }
}

/// Fills `Session.counters` from the tun devices. File reads are blocking, so the batch runs on
/// the blocking pool rather than stalling the runtime with thousands of small reads.
async fn with_counters(command: Command, sessions: Vec<Session>) -> CtlResult<Vec<Session>> {
    if sessions.iter().all(|s| s.device.is_empty()) {
        return Ok(sessions);
    }
    tokio::task::spawn_blocking(move || {
        let mut sessions = sessions;
        counters::read_many(sessions.iter_mut());
        sessions
    })
    .await
    .map_err(|e| CtlError::Io {
        command: command.name(),
        source: std::io::Error::other(format!("reading byte counters failed: {e}")),
    })
}

impl OcservBackend for NativeBackend {
    async fn status(&self) -> CtlResult<ServerStatus> {
        let cmd = Command::Status;
        self.bounded(cmd, async {
            let reply = self.exchange(cmd, &[]).await?;
            codec::decode_status(&reply).map_err(protocol(cmd))
        })
        .await
    }

    async fn list(&self) -> CtlResult<Vec<Session>> {
        let cmd = Command::List;
        self.bounded(cmd, self.sessions(cmd, &[])).await
    }

    async fn user_info(&self, username: &str) -> CtlResult<Vec<Session>> {
        check_username(username)?;
        let cmd = Command::UserInfo;
        self.bounded(cmd, self.sessions(cmd, &codec::username_req(username)))
            .await
    }

    async fn id_info(&self, id: u32) -> CtlResult<Option<Session>> {
        let wire = wire_id(id)?;
        let cmd = Command::IdInfo;
        let sessions = self
            .bounded(cmd, self.sessions(cmd, &codec::id_req(wire)))
            .await?;
        // ocserv answers with 0 or 1 entries; only an entry with the asked ID counts.
        Ok(sessions.into_iter().find(|s| s.id == id))
    }

    async fn disconnect_name(&self, username: &str) -> CtlResult<DisconnectOutcome> {
        check_username(username)?;
        let cmd = Command::DisconnectName;
        self.bounded(cmd, async {
            Ok(outcome(
                self.bool_call(cmd, &codec::username_req(username)).await?,
            ))
        })
        .await
    }

    async fn disconnect_id(&self, id: u32) -> CtlResult<DisconnectOutcome> {
        let wire = wire_id(id)?;
        let cmd = Command::DisconnectId;
        self.bounded(cmd, async {
            Ok(outcome(self.bool_call(cmd, &codec::id_req(wire)).await?))
        })
        .await
    }

    async fn terminate_user(&self, username: &str) -> CtlResult<DisconnectOutcome> {
        check_username(username)?;
        let body = codec::username_req(username);
        self.bounded(
            Command::TerminateUser,
            self.with_fallback(Command::TerminateUser, Command::DisconnectName, &body),
        )
        .await
    }

    async fn terminate_id(&self, id: u32) -> CtlResult<DisconnectOutcome> {
        let body = codec::id_req(wire_id(id)?);
        self.bounded(
            Command::TerminateId,
            self.with_fallback(Command::TerminateId, Command::DisconnectId, &body),
        )
        .await
    }

    async fn disconnect_session(&self, key: &SessionKey) -> CtlResult<DisconnectOutcome> {
        let wire = wire_id(key.id)?;
        if let Some(sid) = &key.safe_id {
            check_safe_id(sid)?;
        }
        let cmd = if key.safe_id.is_some() {
            Command::TerminateSession
        } else {
            Command::DisconnectId
        };
        self.bounded(cmd, async {
            if let Some(sid) = &key.safe_id {
                // The session id names one session (its cookie) whatever its worker's PID is.
                match self.bool_call(cmd, &codec::safe_id_req(sid)).await {
                    Err(CtlError::NoReply { .. }) => tracing::debug!(
                        "ocserv does not know TERMINATE_SESSION; checking the ID before DISCONNECT_ID"
                    ),
                    other => return Ok(outcome(other?)),
                }
            }
            self.disconnect_checked(key, wire).await
        })
        .await
    }

    async fn list_banned(&self) -> CtlResult<Vec<Ban>> {
        let cmd = Command::ListBanned;
        self.bounded(cmd, async {
            let reply = self.exchange(cmd, &[]).await?;
            codec::decode_bans(&reply).map_err(protocol(cmd))
        })
        .await
    }

    async fn unban_ip(&self, ip: IpAddr) -> CtlResult<DisconnectOutcome> {
        let cmd = Command::UnbanIp;
        self.bounded(cmd, async {
            Ok(outcome(self.bool_call(cmd, &codec::unban_req(ip)).await?))
        })
        .await
    }

    async fn reload(&self) -> CtlResult<()> {
        let cmd = Command::Reload;
        self.bounded(cmd, async {
            if self.bool_call(cmd, &[]).await? {
                Ok(())
            } else {
                Err(CtlError::Refused {
                    command: cmd.name(),
                })
            }
        })
        .await
    }

    async fn list_cookies(&self) -> CtlResult<Vec<Cookie>> {
        let cmd = Command::ListCookies;
        self.bounded(cmd, async {
            let reply = self.exchange(cmd, &[]).await?;
            codec::decode_cookies(&reply).map_err(protocol(cmd))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ocserv::fake::{Act, FakeOcserv};
    use crate::ocserv::SessionState;
    use crate::proto::ocserv_ctl as pb;
    use prost::Message;

    fn backend(f: &FakeOcserv) -> NativeBackend {
        NativeBackend::new(f.socket().to_path_buf(), Duration::from_secs(5))
    }

    fn user(id: i32, name: &str) -> pb::UserInfoRep {
        pb::UserInfoRep {
            id: Some(id),
            username: Some(name.as_bytes().to_vec()),
            status: Some(4),
            // A device that exists nowhere: counters stay None, decoding still works.
            tun: Some("vpnsfake9".into()),
            local_ip: Some("10.99.0.2".into()),
            ..Default::default()
        }
    }

    /// A user with a session id (sent as ocserv does: followed by a NUL) and a connect time.
    fn user_sid(id: i32, name: &str, sid: &str, conn_time: u64) -> pb::UserInfoRep {
        let mut raw = sid.as_bytes().to_vec();
        raw.push(0);
        pb::UserInfoRep {
            safe_id: Some(raw),
            conn_time: Some(conn_time),
            ..user(id, name)
        }
    }

    fn user_list(entries: &[(i32, &str)]) -> Act {
        Act::users(entries.iter().map(|(id, name)| user(*id, name)))
    }

    /// The LIST reply frame as bytes, for tests that cut it.
    fn user_list_frame(entries: &[(i32, &str)]) -> Vec<u8> {
        let Act::Reply(code, body) = user_list(entries) else {
            unreachable!()
        };
        codec::encode_frame(code, &body)
    }

    fn id_of(body: &[u8]) -> i32 {
        pb::IdReq::decode(body).unwrap().id.unwrap()
    }

    #[tokio::test]
    async fn list_reply_decodes_and_request_is_one_frame() {
        let f = FakeOcserv::start(|_, _| user_list(&[(101, "alice"), (202, "jürgen")]));
        let sessions = backend(&f).list().await.unwrap();
        assert_eq!(sessions.len(), 2);
        assert_eq!(
            (sessions[0].id, sessions[0].username.as_str()),
            (101, "alice")
        );
        assert_eq!(sessions[1].username, "jürgen");
        assert_eq!(sessions[1].state, SessionState::Connected);
        assert_eq!(sessions[1].vpn_ipv4, Some("10.99.0.2".parse().unwrap()));
        assert_eq!(sessions[1].counters, None);
        let seen = f.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].code, seen[0].body.len()), (4, 0));
        assert_eq!(seen[0].first_read_len, 5);
    }

    #[tokio::test]
    async fn large_list_reply_decodes() {
        // Well over the inline limit: decoded on the blocking pool, same result.
        let n = 2000;
        let f = FakeOcserv::start(move |_, _| {
            Act::users((1..=n).map(|i| user_sid(i, "someone", "AbCdEfGhIjKlMnOpQrStUvWxYz0=", 1)))
        });
        let sessions = backend(&f).list().await.unwrap();
        assert_eq!(sessions.len(), n as usize);
        assert_eq!(sessions.last().unwrap().id, n as u32);
    }

    #[tokio::test]
    async fn user_info_sends_username_req_in_a_single_write() {
        let f = FakeOcserv::start(|_, _| user_list(&[(7, "jürgen")]));
        let s = backend(&f).user_info("jürgen").await.unwrap();
        assert_eq!(s[0].id, 7);
        let seen = f.requests();
        assert_eq!(seen[0].code, 5);
        let req = pb::UsernameReq::decode(&seen[0].body[..]).unwrap();
        assert_eq!(req.username.as_deref(), Some("jürgen"));
        // The whole frame arrived in the server's first read: header and body were one write.
        assert_eq!(seen[0].first_read_len, 5 + seen[0].body.len());
    }

    #[tokio::test]
    async fn id_info_zero_entries_is_none_and_id_is_zigzag() {
        let f = FakeOcserv::start(|_, body| {
            if id_of(body) == 42 {
                user_list(&[(42, "bob")])
            } else {
                user_list(&[])
            }
        });
        let b = backend(&f);
        assert_eq!(b.id_info(42).await.unwrap().unwrap().username, "bob");
        assert!(b.id_info(43).await.unwrap().is_none());
        assert!(matches!(
            b.id_info(u32::MAX).await,
            Err(CtlError::InvalidArgument { field: "id", .. })
        ));
        let seen = f.requests();
        assert_eq!(seen.len(), 2, "an out-of-range id is never sent");
        assert_eq!(seen[0].body, vec![0x08, 84]);
    }

    #[tokio::test]
    async fn disconnect_false_is_not_found() {
        let f = FakeOcserv::start(|code, body| match code {
            7 => {
                let name = pb::UsernameReq::decode(body).unwrap().username.unwrap();
                Act::bool(105, name == "alice")
            }
            8 => Act::bool(106, false),
            _ => Act::Close,
        });
        let b = backend(&f);
        assert_eq!(
            b.disconnect_name("alice").await.unwrap(),
            DisconnectOutcome::Done
        );
        assert_eq!(
            b.disconnect_name("nobody").await.unwrap(),
            DisconnectOutcome::NotFound
        );
        assert_eq!(
            b.disconnect_id(9).await.unwrap(),
            DisconnectOutcome::NotFound
        );
    }

    #[tokio::test]
    async fn invalid_username_is_refused_before_sending() {
        let f = FakeOcserv::start(|_, _| Act::Close);
        let b = backend(&f);
        for bad in ["", "../x", "a\nb", "-rf"] {
            assert!(
                matches!(
                    b.disconnect_name(bad).await,
                    Err(CtlError::InvalidArgument {
                        field: "username",
                        ..
                    })
                ),
                "{bad:?}"
            );
            assert!(b.user_info(bad).await.is_err());
            assert!(b.terminate_user(bad).await.is_err());
        }
        for bad in ["a b", "", "a-b_c", "x\0"] {
            assert!(
                matches!(
                    b.terminate_session(bad).await,
                    Err(CtlError::InvalidArgument {
                        field: "safe_id",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        assert!(f.requests().is_empty());
    }

    #[tokio::test]
    async fn terminate_falls_back_to_disconnect_on_eof() {
        // Like ocserv 1.1.6: unknown commands are closed without a reply.
        let f = FakeOcserv::start(|code, _| match code {
            7 => Act::bool(105, true),
            8 => Act::bool(106, true),
            _ => Act::Close,
        });
        let b = backend(&f);
        assert_eq!(
            b.terminate_user("alice").await.unwrap(),
            DisconnectOutcome::Done
        );
        assert_eq!(b.terminate_id(77).await.unwrap(), DisconnectOutcome::Done);
        let seen = f.requests();
        let codes: Vec<u8> = seen.iter().map(|s| s.code).collect();
        assert_eq!(codes, vec![13, 7, 14, 8]);
        // The fallback carries the same body.
        assert_eq!(seen[0].body, seen[1].body);
        assert_eq!(seen[2].body, seen[3].body);
        // TERMINATE_SESSION has no fallback.
        assert!(matches!(
            b.terminate_session("AbCdEfGhIjKlMnOpQrStUvWxYz0=").await,
            Err(CtlError::NoReply {
                command: "TERMINATE_SESSION"
            })
        ));
    }

    #[tokio::test]
    async fn terminate_uses_new_command_when_supported() {
        let f = FakeOcserv::start(|code, _| match code {
            13 => Act::bool(111, false),
            15 => Act::bool(113, true),
            _ => Act::Close,
        });
        let b = backend(&f);
        assert_eq!(
            b.terminate_user("alice").await.unwrap(),
            DisconnectOutcome::NotFound
        );
        assert_eq!(
            b.terminate_session("AbCd+/=").await.unwrap(),
            DisconnectOutcome::Done
        );
        let seen = f.requests();
        assert_eq!(
            seen.iter().map(|s| s.code).collect::<Vec<_>>(),
            vec![13, 15]
        );
        let sid = pb::SafeIdReq::decode(&seen[1].body[..]).unwrap().safe_id;
        assert_eq!(sid.unwrap(), b"AbCd+/=\0".to_vec());
    }

    const SID_A: &str = "AbCdEfGhIjKlMnOpQrStUvWxYz0=";
    const SID_B: &str = "ZzZzEfGhIjKlMnOpQrStUvWxYz0=";

    fn key(id: u32, sid: Option<&str>, at: u64) -> SessionKey {
        SessionKey {
            id,
            safe_id: sid.map(str::to_owned),
            connected_at: at,
        }
    }

    /// ocserv 1.1.6 (no TERMINATE_SESSION) where ID 500 now belongs to another session
    /// (session id B, connected later) and ID 600 to the very session the key names.
    fn old_ocserv_with_recycled_id() -> FakeOcserv {
        FakeOcserv::start(|code, body| match code {
            6 => match id_of(body) {
                500 => Act::users([user_sid(500, "mallory", SID_B, 2_000)]),
                600 => Act::users([user_sid(600, "alice", SID_A, 1_000)]),
                _ => Act::users([]),
            },
            8 => Act::bool(106, true),
            _ => Act::Close,
        })
    }

    #[tokio::test]
    async fn disconnect_session_leaves_a_recycled_id_alone() {
        let f = old_ocserv_with_recycled_id();
        let b = backend(&f);
        // By session id: TERMINATE_SESSION unknown, ID_INFO lists another session: NotFound.
        assert_eq!(
            b.disconnect_session(&key(500, Some(SID_A), 1_000))
                .await
                .unwrap(),
            DisconnectOutcome::NotFound
        );
        assert_eq!(f.commands(), vec![15, 6], "no DISCONNECT_ID sent");
        // By connect time (no session id known): the same check.
        assert_eq!(
            b.disconnect_session(&key(500, None, 1_000)).await.unwrap(),
            DisconnectOutcome::NotFound
        );
        // Gone altogether.
        assert_eq!(
            b.disconnect_session(&key(700, Some(SID_A), 1_000))
                .await
                .unwrap(),
            DisconnectOutcome::NotFound
        );
        assert!(
            !f.commands().contains(&8),
            "DISCONNECT_ID never sent: {:?}",
            f.commands()
        );
    }

    #[tokio::test]
    async fn disconnect_session_disconnects_the_matching_one() {
        let f = old_ocserv_with_recycled_id();
        let b = backend(&f);
        assert_eq!(
            b.disconnect_session(&key(600, Some(SID_A), 1_000))
                .await
                .unwrap(),
            DisconnectOutcome::Done
        );
        assert_eq!(f.commands(), vec![15, 6, 8]);
        let seen = f.requests();
        assert_eq!(id_of(&seen[2].body), 600);
        // Without a session id the connect time identifies it; no TERMINATE_SESSION is tried.
        assert_eq!(
            b.disconnect_session(&key(600, None, 1_000)).await.unwrap(),
            DisconnectOutcome::Done
        );
        assert_eq!(f.commands(), vec![15, 6, 8, 6, 8]);
    }

    #[tokio::test]
    async fn disconnect_session_uses_terminate_session_when_supported() {
        let f = FakeOcserv::start(|code, body| match code {
            15 => {
                let sid = pb::SafeIdReq::decode(body).unwrap().safe_id.unwrap();
                Act::bool(113, sid == format!("{SID_A}\0").into_bytes())
            }
            _ => Act::Close,
        });
        let b = backend(&f);
        assert_eq!(
            b.disconnect_session(&key(600, Some(SID_A), 1))
                .await
                .unwrap(),
            DisconnectOutcome::Done
        );
        assert_eq!(
            b.disconnect_session(&key(600, Some(SID_B), 1))
                .await
                .unwrap(),
            DisconnectOutcome::NotFound
        );
        assert_eq!(f.commands(), vec![15, 15], "no ID_INFO, no DISCONNECT_ID");
        // Invalid keys are refused before anything is sent.
        for bad in [key(600, Some("a b"), 1), key(u32::MAX, Some(SID_A), 1)] {
            assert!(matches!(
                b.disconnect_session(&bad).await,
                Err(CtlError::InvalidArgument { .. })
            ));
        }
        assert_eq!(f.commands().len(), 2);
    }

    #[tokio::test]
    async fn timeout_when_server_never_answers() {
        let f = FakeOcserv::start(|_, _| Act::Hang);
        let b = NativeBackend::new(f.socket().to_path_buf(), Duration::from_millis(200));
        let started = std::time::Instant::now();
        let e = b.status().await.unwrap_err();
        assert!(
            matches!(e, CtlError::Timeout { command: "STATUS", timeout } if timeout == Duration::from_millis(200)),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(e.is_unreachable());
    }

    #[tokio::test]
    async fn no_reply_on_immediate_close() {
        let f = FakeOcserv::start(|_, _| Act::Close);
        let e = backend(&f).list().await.unwrap_err();
        assert!(matches!(e, CtlError::NoReply { command: "LIST" }), "{e}");
    }

    #[tokio::test]
    async fn garbage_replies_are_protocol_errors() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("wrong code", codec::encode_frame(105, &[0x08, 1])),
            ("truncated body", {
                let mut v = user_list_frame(&[(1, "a")]);
                v.truncate(v.len() - 3);
                v
            }),
            ("truncated header", vec![104, 1]),
            (
                "oversize length",
                vec![104, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3],
            ),
            (
                "undecodable body",
                codec::encode_frame(104, &[0xff, 0xff, 0xff]),
            ),
            ("negative id", user_list_frame(&[(-5, "x")])),
        ];
        for (what, reply) in cases {
            let f = FakeOcserv::start(move |_, _| Act::raw(reply.clone()));
            let e = backend(&f).list().await.unwrap_err();
            match &e {
                CtlError::Protocol { command, reason } => {
                    assert_eq!(*command, "LIST", "{what}");
                    assert!(!reason.is_empty(), "{what}");
                }
                other => panic!("{what}: expected Protocol, got {other:?}"),
            }
            if what == "wrong code" {
                let msg = e.to_string();
                assert!(
                    msg.contains("LIST_REP") && msg.contains("DISCONNECT_NAME_REP"),
                    "{msg}"
                );
            }
        }
    }

    #[tokio::test]
    async fn missing_socket_is_unreachable_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such.socket");
        let b = NativeBackend::new(path.clone(), Duration::from_secs(1));
        let e = b.status().await.unwrap_err();
        match &e {
            CtlError::Unreachable { path: p, .. } => assert_eq!(p, &path.display().to_string()),
            other => panic!("expected Unreachable, got {other:?}"),
        }
        assert!(e.to_string().contains("no-such.socket"));
    }

    #[tokio::test]
    async fn status_bans_cookies_unban_reload_stop() {
        let f = FakeOcserv::start(|code, body| match code {
            1 => Act::Reply(
                101,
                pb::StatusRep {
                    status: Some(true),
                    pid: Some(55),
                    active_clients: Some(2),
                    kbytes_in: Some(3),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            2 => Act::bool(102, true),
            3 => Act::bool(103, false),
            9 => Act::Reply(
                108,
                pb::BanListRep {
                    info: vec![pb::BanInfoRep {
                        ip: Some(vec![203, 0, 113, 5]),
                        score: Some(50),
                        expires: Some(1000),
                    }],
                }
                .encode_to_vec(),
            ),
            10 => {
                let ip = pb::UnbanReq::decode(body).unwrap().ip.unwrap();
                Act::bool(107, ip == vec![203, 0, 113, 5])
            }
            12 => Act::Reply(
                110,
                pb::SecmListCookiesReplyMsg {
                    cookies: vec![pb::CookieIntRep {
                        safe_id: Some(b"SID\0".to_vec()),
                        username: Some(b"alice".to_vec()),
                        ..Default::default()
                    }],
                }
                .encode_to_vec(),
            ),
            _ => Act::Close,
        });
        let b = backend(&f);
        let st = b.status().await.unwrap();
        assert_eq!((st.pid, st.active_sessions, st.bytes_in), (55, 2, 3000));
        let bans = b.list_banned().await.unwrap();
        assert_eq!(bans[0].ip, "203.0.113.5".parse::<IpAddr>().unwrap());
        assert_eq!(
            b.unban_ip("203.0.113.5".parse().unwrap()).await.unwrap(),
            DisconnectOutcome::Done
        );
        assert_eq!(
            b.unban_ip("203.0.113.6".parse().unwrap()).await.unwrap(),
            DisconnectOutcome::NotFound
        );
        let cookies = b.list_cookies().await.unwrap();
        assert_eq!(
            (cookies[0].safe_id.as_str(), cookies[0].username.as_str()),
            ("SID", "alice")
        );
        b.reload().await.unwrap();
        assert!(matches!(
            b.stop().await,
            Err(CtlError::Refused { command: "STOP" })
        ));
    }
}
