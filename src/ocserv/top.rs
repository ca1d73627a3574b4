//! ocserv's TOP event stream (command 11): the sessions at subscription time, then one event per
//! session that connects or disconnects, on one long-lived connection to the control socket.
//!
//! Inputs: the control socket path (`occtl-socket-file`) and a timeout for subscribing.
//! Outputs: [`TopStream`] ([`subscribe`]) with the initial sessions and [`TopEvent`]s read one at a
//! time, or a callback fed forever by [`follow`], which resubscribes after every failure.
//!
//! Protocol (reference/ocserv.md §1, framing in [`super::codec`]): the TOP request is header plus
//! an empty body, written in one `write_all` (a partial frame stalls ocserv's main loop). ocserv
//! answers with a LIST_REP (104, a `user_list_rep`: every session at that moment), then writes a
//! TOP_UPDATE_REP (109, a `top_update_rep`) whenever a session connects or disconnects. Frames are
//! bounded by the codec's [`codec::MAX_REPLY_BODY`]. Every field of `top_update_rep` is optional
//! when decoding: a missing `connected` is 0 (a disconnect, proto2's default), a disconnect
//! without `discon_reason` is [`Cause::Unspecified`] (ocserv leaves the field out when it has no
//! reason), a missing `user` is no sessions. The session entries go through the same conversion
//! as every other reply ([`codec::session_from_pb`]): a missing or negative ID is a protocol
//! error. Sessions from TOP carry no byte counters (`counters` is `None`; LIST has them).
//!
//! Failure behaviour, all as [`CtlError`] with command `TOP`, never a panic:
//! - the socket cannot be connected to: `Unreachable`; no first reply within the timeout:
//!   `Timeout`; ocserv closes before any byte: `NoReply`;
//! - a first reply other than 104, an event other than 109, an oversize or truncated frame, an
//!   undecodable body: `Protocol`. A stream is finished after its first error: later calls to
//!   [`TopStream::next`] return `Ok(None)`.
//!
//! Disconnect causes (`discon_reason`) and the portal's [`DisconnectReason`] ([`Cause::reason`]):
//!
//! | `discon_reason` | [`Cause`] | [`DisconnectReason`] |
//! |---|---|---|
//! | absent | `Unspecified` | `Unspecified` |
//! | 1 | `Unspecified` | `Unspecified` |
//! | 2 | `UserDisconnected` | `UserInitiated` |
//! | 3 | `ServerDisconnected` | `AdminForced` |
//! | 4 | `IdleTimeout` | `IdleTimeout` |
//! | 5 | `DpdTimeout` | `ConnectionError` |
//! | 6 | `Error` | `ConnectionError` |
//! | 7 | `SessionTimeout` | `SessionLimit` |
//! | 8 | `ClientTemporarilyDisconnected` | `ConnectionError` |
//! | 9 | `HealthProbe` | `Unspecified` |
//! | anything else | `Other(n)` | `Unspecified` |
//!
//! What ocserv does that callers must know:
//! - **One listener slot.** ocserv sends events to one TOP connection only. While the agent holds
//!   it, an admin's `occtl show events` shows the initial list and then goes silent (and the
//!   other way round: while `occtl show events` runs, the agent's subscription gets its initial
//!   list and then nothing, without an error or EOF). In upstream's source, a failed write of an
//!   event also frees the slot without closing the connection; the stream then goes silent too.
//!   Silence therefore does not prove that nothing happened: keep reconciling with LIST.
//! - **Connect fires before the connect-script's verdict.** A session the script denies gets a
//!   TOP connect event and never a disconnect event; treat a connect as "attempted" until LIST
//!   or the hook confirms it.
//! - Events between a stream's end and the next subscription are lost; the next subscription's
//!   initial list ([`TopStream::initial`]) is the state to reconcile against.

use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::codec::{self, CodecError, Command, Frame, FrameDecoder, Reply};
use super::{off_worker, CtlError, CtlResult, Session};
use crate::backoff::Backoff;
use crate::metrics::DisconnectReason;
use crate::proto::ocserv_ctl as pb;

const COMMAND: Command = Command::Top;

/// Longest [`TopEvent::cause_text`], in bytes.
pub const MAX_CAUSE_TEXT: usize = 256;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Why ocserv says a session ended (`top_update_rep.discon_reason`, ocserv's `REASON_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// 1, or no reason given.
    Unspecified,
    /// 2: the client said goodbye.
    UserDisconnected,
    /// 3: ocserv ended it (occtl disconnect/terminate, a reload that removed the user).
    ServerDisconnected,
    /// 4
    IdleTimeout,
    /// 5: dead-peer detection.
    DpdTimeout,
    /// 6
    Error,
    /// 7: `session-timeout` reached.
    SessionTimeout,
    /// 8: the client went away and may come back with its cookie.
    ClientTemporarilyDisconnected,
    /// 9: a health-check probe connection.
    HealthProbe,
    /// A code this agent does not know (newer ocserv, or 0).
    Other(u32),
}

impl Cause {
    /// From the wire's `discon_reason`.
    pub fn from_code(code: u32) -> Self {
        match code {
            1 => Self::Unspecified,
            2 => Self::UserDisconnected,
            3 => Self::ServerDisconnected,
            4 => Self::IdleTimeout,
            5 => Self::DpdTimeout,
            6 => Self::Error,
            7 => Self::SessionTimeout,
            8 => Self::ClientTemporarilyDisconnected,
            9 => Self::HealthProbe,
            other => Self::Other(other),
        }
    }

    /// The portal's disconnect reason for this cause (table in the module docs).
    pub fn reason(self) -> DisconnectReason {
        match self {
            Self::Unspecified | Self::HealthProbe | Self::Other(_) => DisconnectReason::Unspecified,
            Self::UserDisconnected => DisconnectReason::UserInitiated,
            Self::ServerDisconnected => DisconnectReason::AdminForced,
            Self::IdleTimeout => DisconnectReason::IdleTimeout,
            Self::DpdTimeout | Self::Error | Self::ClientTemporarilyDisconnected => {
                DisconnectReason::ConnectionError
            }
            Self::SessionTimeout => DisconnectReason::SessionLimit,
        }
    }
}

/// One TOP_UPDATE_REP: a session connected or disconnected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopEvent {
    pub connected: bool,
    /// Disconnects only (`None` for a connect).
    pub cause: Option<Cause>,
    /// ocserv's text for the cause, control characters replaced by spaces, at most
    /// [`MAX_CAUSE_TEXT`] bytes. Empty when ocserv sent none.
    pub cause_text: String,
    /// The session(s) concerned; ocserv sends exactly one.
    pub sessions: Vec<Session>,
}

/// Decodes a TOP_UPDATE_REP body (see the module docs for the rules).
pub fn decode_event(body: &[u8]) -> Result<TopEvent, CodecError> {
    let rep = pb::TopUpdateRep::decode(body).map_err(|e| CodecError::Decode {
        message: "top_update_rep",
        reason: e.to_string(),
    })?;
    let connected = rep.connected.unwrap_or(0) != 0;
    let cause = (!connected).then(|| {
        rep.discon_reason
            .map_or(Cause::Unspecified, Cause::from_code)
    });
    let sessions = rep
        .user
        .map(|list| list.user)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, u)| codec::session_from_pb(i, u))
        .collect::<Result<_, _>>()?;
    Ok(TopEvent {
        connected,
        cause,
        cause_text: clean_text(rep.discon_reason_txt.as_deref().unwrap_or("")),
        sessions,
    })
}

/// Control characters become spaces; cut to [`MAX_CAUSE_TEXT`] bytes on a character boundary.
fn clean_text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len().min(MAX_CAUSE_TEXT));
    for c in raw.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_CAUSE_TEXT {
            break;
        }
        out.push(c);
    }
    out
}

fn protocol(e: CodecError) -> CtlError {
    CtlError::Protocol {
        command: COMMAND.name(),
        reason: e.to_string(),
    }
}

fn unexpected(expected: Reply, code: u8) -> CtlError {
    let got = Reply::from_code(code).map_or("an unknown code", Reply::name);
    CtlError::Protocol {
        command: COMMAND.name(),
        reason: format!(
            "expected reply {} ({}), got {} ({})",
            expected.name(),
            expected.code(),
            got,
            code
        ),
    }
}

/// An open TOP subscription. Dropping it closes the connection (and frees ocserv's slot).
#[derive(Debug)]
pub struct TopStream {
    /// The sessions when the subscription started (LIST_REP), without byte counters.
    pub initial: Vec<Session>,
    conn: UnixStream,
    /// Bytes received but not yet returned as a frame: kept here, not in a future, so that
    /// cancelling [`Self::next`] loses nothing.
    decoder: FrameDecoder,
    chunk: Box<[u8]>,
    finished: bool,
}

impl TopStream {
    /// The next event; `Ok(None)` once ocserv closed the stream cleanly (between frames).
    ///
    /// Cancellation safe: the only await is a socket read, which either completes (and its
    /// bytes go into the stream's buffer before anything else can happen) or reads nothing, so
    /// dropping the future (a losing `select!` branch) loses no event. Decoding is inline: an
    /// event carries one session.
    ///
    /// After an error or `Ok(None)` the stream is finished and returns `Ok(None)`.
    pub async fn next(&mut self) -> CtlResult<Option<TopEvent>> {
        if self.finished {
            return Ok(None);
        }
        let result = self.next_event().await;
        if !matches!(result, Ok(Some(_))) {
            self.finished = true;
        }
        result
    }

    async fn next_event(&mut self) -> CtlResult<Option<TopEvent>> {
        let Some(frame) = self.read_frame().await? else {
            return Ok(None);
        };
        if frame.code != Reply::TopUpdate.code() {
            return Err(unexpected(Reply::TopUpdate, frame.code));
        }
        decode_event(&frame.body).map(Some).map_err(protocol)
    }

    /// The next whole frame; `Ok(None)` on EOF between frames. Cancellation safe (see
    /// [`Self::next`]).
    async fn read_frame(&mut self) -> CtlResult<Option<Frame>> {
        loop {
            if let Some(frame) = self.decoder.next_frame().map_err(protocol)? {
                return Ok(Some(frame));
            }
            let n = match self.conn.read(&mut self.chunk).await {
                Ok(n) => n,
                // A reset between frames is ocserv going away: the same as a close.
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionReset
                        && self.decoder.buffered() == 0 =>
                {
                    0
                }
                Err(source) => {
                    return Err(CtlError::Io {
                        command: COMMAND.name(),
                        source,
                    })
                }
            };
            if n == 0 {
                // Nothing buffered: a clean end. Else: closed inside a frame.
                self.decoder.finish().map_err(protocol)?;
                return Ok(None);
            }
            self.decoder.push(&self.chunk[..n]);
        }
    }
}

/// Connects to the control socket, sends TOP and reads the initial session list, all within
/// `timeout`. Events are then read with [`TopStream::next`], without a timeout (ocserv may stay
/// quiet for hours). Not meant to be cancelled half-way: a dropped subscription simply closes
/// its connection.
pub async fn subscribe(socket: &Path, timeout: Duration) -> CtlResult<TopStream> {
    tokio::time::timeout(timeout, open(socket))
        .await
        .unwrap_or_else(|_| {
            Err(CtlError::Timeout {
                command: COMMAND.name(),
                timeout,
            })
        })
}

async fn open(socket: &Path) -> CtlResult<TopStream> {
    let name = COMMAND.name();
    let request = codec::encode_request(COMMAND, &[]).map_err(|e| CtlError::InvalidArgument {
        field: "request body",
        reason: e.to_string(),
    })?;
    let mut conn = UnixStream::connect(socket)
        .await
        .map_err(|source| CtlError::Unreachable {
            path: socket.display().to_string(),
            source,
        })?;
    // One buffer, one write_all: a frame split across writes would block ocserv's main loop.
    conn.write_all(&request)
        .await
        .map_err(|source| CtlError::Io {
            command: name,
            source,
        })?;
    let mut stream = TopStream {
        initial: Vec::new(),
        conn,
        decoder: FrameDecoder::new(),
        chunk: vec![0u8; READ_CHUNK].into_boxed_slice(),
        finished: false,
    };
    let frame = stream
        .read_frame()
        .await?
        .ok_or(CtlError::NoReply { command: name })?;
    if frame.code != Reply::List.code() {
        return Err(unexpected(Reply::List, frame.code));
    }
    // The initial list may hold thousands of sessions: decoded off the async workers if large.
    let body = frame.body;
    stream.initial = off_worker(name, body.len(), move || {
        codec::decode_sessions(&body).map_err(protocol)
    })
    .await?;
    Ok(stream)
}

/// Follows the TOP stream forever: subscribes, passes every event to `sink` in order, and after
/// any error or EOF resubscribes once the backoff's next delay has passed. The backoff restarts
/// from its first delay after every successful subscription.
///
/// Logging: the first failure after a working subscription (or at start) is one `warn`;
/// further failed attempts while ocserv stays unreachable are `debug`; a subscription that
/// works again after failures is one `info`.
///
/// `sink` runs on the reading task: it must not block (send to a channel). The initial list of
/// each subscription is not passed to it; events missed between two subscriptions are lost, so
/// a caller that must not miss a disconnect reconciles with LIST. ocserv has a **single TOP
/// listener slot**: while the agent follows, an admin's `occtl show events` goes silent. A TOP
/// connect event fires **before** the connect-script's verdict: a denied session never gets a
/// disconnect event. See the module docs.
///
/// Never returns; drop (abort) the future to stop following, which closes the connection.
pub async fn follow(
    socket: PathBuf,
    timeout: Duration,
    backoff: Backoff,
    mut sink: impl FnMut(TopEvent) + Send,
) -> ! {
    let mut attempt: u32 = 0;
    let mut failing = false;
    loop {
        let failure = match subscribe(&socket, timeout).await {
            Ok(mut stream) => {
                attempt = 0;
                if failing {
                    tracing::info!(
                        socket = %socket.display(),
                        sessions = stream.initial.len(),
                        "ocserv TOP event stream subscribed again"
                    );
                } else {
                    tracing::debug!(
                        socket = %socket.display(),
                        sessions = stream.initial.len(),
                        "subscribed to ocserv's TOP event stream"
                    );
                }
                failing = false;
                loop {
                    match stream.next().await {
                        Ok(Some(event)) => sink(event),
                        Ok(None) => break "ocserv closed the TOP event stream".to_owned(),
                        Err(e) => break e.to_string(),
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        let delay = backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        if failing {
            tracing::debug!(
                error = %failure,
                attempt,
                retry_in = ?delay,
                "ocserv TOP event stream still unavailable"
            );
        } else {
            tracing::warn!(
                error = %failure,
                retry_in = ?delay,
                "ocserv TOP event stream lost; resubscribing"
            );
        }
        failing = true;
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ocserv::fake::{Act, FakeOcserv, TopFeed};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const SID_A: &str = "AbCdEfGhIjKlMnOpQrStUvWxYz0=";
    const SID_B: &str = "ZzZzEfGhIjKlMnOpQrStUvWxYz0=";
    /// Only a bound for tests that fail; nothing waits for it when they pass.
    const LIMIT: Duration = Duration::from_secs(10);

    fn user(id: i32, name: &str, sid: &str) -> pb::UserInfoRep {
        let mut raw = sid.as_bytes().to_vec();
        raw.push(0);
        pb::UserInfoRep {
            id: Some(id),
            username: Some(name.as_bytes().to_vec()),
            status: Some(4),
            safe_id: Some(raw),
            conn_time: Some(1_700_000_000),
            ..Default::default()
        }
    }

    async fn open_with(f: &FakeOcserv) -> TopStream {
        subscribe(f.socket(), LIMIT).await.unwrap()
    }

    async fn next(s: &mut TopStream) -> CtlResult<Option<TopEvent>> {
        tokio::time::timeout(LIMIT, s.next())
            .await
            .expect("an event or an end")
    }

    async fn feed(feeds: &mut tokio::sync::mpsc::UnboundedReceiver<TopFeed>) -> TopFeed {
        tokio::time::timeout(LIMIT, feeds.recv())
            .await
            .expect("a subscription")
            .expect("the fake is running")
    }

    fn assert_protocol(r: CtlResult<Option<TopEvent>>, what: &str) {
        match r {
            Err(CtlError::Protocol { command, reason }) => {
                assert_eq!(command, "TOP", "{what}");
                assert!(!reason.is_empty(), "{what}");
            }
            other => panic!("{what}: expected Protocol, got {other:?}"),
        }
    }

    #[test]
    fn causes_and_their_portal_reasons() {
        use DisconnectReason as R;
        let table = [
            (1, Cause::Unspecified, R::Unspecified),
            (2, Cause::UserDisconnected, R::UserInitiated),
            (3, Cause::ServerDisconnected, R::AdminForced),
            (4, Cause::IdleTimeout, R::IdleTimeout),
            (5, Cause::DpdTimeout, R::ConnectionError),
            (6, Cause::Error, R::ConnectionError),
            (7, Cause::SessionTimeout, R::SessionLimit),
            (8, Cause::ClientTemporarilyDisconnected, R::ConnectionError),
            (9, Cause::HealthProbe, R::Unspecified),
            (0, Cause::Other(0), R::Unspecified),
            (10, Cause::Other(10), R::Unspecified),
            (u32::MAX, Cause::Other(u32::MAX), R::Unspecified),
        ];
        for (code, cause, reason) in table {
            assert_eq!(Cause::from_code(code), cause, "{code}");
            assert_eq!(cause.reason(), reason, "{code}");
        }
    }

    #[test]
    fn event_fields_are_optional_and_text_is_cleaned() {
        // An empty body: a disconnect (proto2's default) with no reason and no session.
        let e = decode_event(&[]).unwrap();
        assert_eq!(
            e,
            TopEvent {
                connected: false,
                cause: Some(Cause::Unspecified),
                cause_text: String::new(),
                sessions: vec![],
            }
        );
        // A connect never has a cause, whatever else was sent.
        let body = pb::TopUpdateRep {
            connected: Some(1),
            discon_reason: Some(4),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(decode_event(&body).unwrap().cause, None);
        // Control characters replaced; cut to 256 bytes on a character boundary.
        let long = format!("a\nb\u{7}c{}", "é".repeat(300));
        let body = pb::TopUpdateRep {
            discon_reason_txt: Some(long),
            ..Default::default()
        }
        .encode_to_vec();
        let text = decode_event(&body).unwrap().cause_text;
        assert!(text.starts_with("a b c"), "{text:?}");
        assert!(text.len() <= MAX_CAUSE_TEXT && text.len() >= MAX_CAUSE_TEXT - 1);
        assert!(!text.chars().any(char::is_control));
        // Garbage and bad entries are errors.
        assert!(decode_event(&[0xff, 0xff, 0xff]).is_err());
        let body = pb::TopUpdateRep {
            user: Some(pb::UserListRep {
                user: vec![user(-1, "x", SID_A)],
            }),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(decode_event(&body).is_err());
    }

    #[tokio::test]
    async fn subscribe_gets_the_initial_list_in_one_write() {
        let (f, mut feeds) = FakeOcserv::with_top(vec![user(101, "alice", SID_A)]);
        let s = open_with(&f).await;
        assert_eq!(s.initial.len(), 1);
        assert_eq!(
            (s.initial[0].id, s.initial[0].username.as_str()),
            (101, "alice")
        );
        assert_eq!(s.initial[0].safe_id.as_deref(), Some(SID_A));
        assert_eq!(s.initial[0].counters, None);
        let seen = f.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].code, seen[0].body.len()), (11, 0));
        assert_eq!(seen[0].first_read_len, 5, "header and body in one write");
        // The subscription stays open: the fake still holds a live feed.
        assert!(feed(&mut feeds).await.push(Vec::new()));
    }

    #[tokio::test]
    async fn disconnect_connect_and_unknown_reason_events() {
        let (f, mut feeds) = FakeOcserv::with_top(vec![]);
        let mut s = open_with(&f).await;
        assert!(s.initial.is_empty());
        let top = feed(&mut feeds).await;

        top.event(
            false,
            Some(4),
            Some("idle timeout"),
            vec![user(4242, "jürgen", SID_A)],
        );
        let e = next(&mut s).await.unwrap().unwrap();
        assert!(!e.connected);
        assert_eq!(e.cause, Some(Cause::IdleTimeout));
        assert_eq!(e.cause.unwrap().reason(), DisconnectReason::IdleTimeout);
        assert_eq!(e.cause_text, "idle timeout");
        assert_eq!(e.sessions.len(), 1);
        let session = &e.sessions[0];
        assert_eq!(
            (
                session.id,
                session.username.as_str(),
                session.safe_id.as_deref()
            ),
            (4242, "jürgen", Some(SID_A))
        );

        top.event(true, None, None, vec![user(4243, "bob", SID_B)]);
        let e = next(&mut s).await.unwrap().unwrap();
        assert!(e.connected);
        assert_eq!((e.cause, e.cause_text.as_str()), (None, ""));
        assert_eq!(e.sessions[0].id, 4243);
        assert_eq!(e.sessions[0].safe_id.as_deref(), Some(SID_B));

        top.event(false, Some(42), None, vec![user(4243, "bob", SID_B)]);
        let e = next(&mut s).await.unwrap().unwrap();
        assert_eq!(e.cause, Some(Cause::Other(42)));
        assert_eq!(e.cause.unwrap().reason(), DisconnectReason::Unspecified);

        // A disconnect without a reason (ocserv omits it when it has none).
        top.event(false, None, None, vec![user(4244, "carol", SID_B)]);
        let e = next(&mut s).await.unwrap().unwrap();
        assert_eq!(e.cause, Some(Cause::Unspecified));
    }

    #[tokio::test]
    async fn eof_is_none_and_the_stream_stays_finished() {
        let (f, mut feeds) = FakeOcserv::with_top(vec![user(1, "a", SID_A)]);
        let mut s = open_with(&f).await;
        let top = feed(&mut feeds).await;
        top.event(true, None, None, vec![user(2, "b", SID_B)]);
        drop(top);
        // What was pushed before the close still arrives, then the clean end.
        assert_eq!(next(&mut s).await.unwrap().unwrap().sessions[0].id, 2);
        assert!(next(&mut s).await.unwrap().is_none());
        assert!(next(&mut s).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn garbage_frames_are_protocol_errors() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "undecodable body",
                codec::encode_frame(109, &[0xff, 0xff, 0xff]),
            ),
            ("wrong code", codec::encode_frame(104, &[])),
            ("unknown code", codec::encode_frame(7, &[])),
            (
                "oversize length",
                vec![109, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3],
            ),
            (
                "negative id",
                crate::ocserv::fake::top_update_frame(
                    false,
                    Some(2),
                    None,
                    vec![user(-5, "x", SID_A)],
                ),
            ),
        ];
        for (what, bytes) in cases {
            let (f, mut feeds) = FakeOcserv::with_top(vec![]);
            let mut s = open_with(&f).await;
            feed(&mut feeds).await.push(bytes);
            let r = next(&mut s).await;
            if what == "wrong code" {
                let msg = r.as_ref().unwrap_err().to_string();
                assert!(
                    msg.contains("TOP_UPDATE_REP") && msg.contains("LIST_REP"),
                    "{msg}"
                );
            }
            assert_protocol(r, what);
            assert!(next(&mut s).await.unwrap().is_none(), "{what}: finished");
        }
    }

    #[tokio::test]
    async fn close_inside_a_frame_is_a_protocol_error() {
        let (f, mut feeds) = FakeOcserv::with_top(vec![]);
        let mut s = open_with(&f).await;
        let top = feed(&mut feeds).await;
        let frame =
            crate::ocserv::fake::top_update_frame(true, None, None, vec![user(1, "a", SID_A)]);
        top.push(frame[..frame.len() - 2].to_vec());
        drop(top);
        assert_protocol(next(&mut s).await, "truncated");
    }

    #[tokio::test]
    async fn next_is_cancellation_safe_and_frames_may_share_a_read() {
        // Initial list and first event queued before the client connects: they may well
        // arrive in one read, and the event must not be lost to the subscription.
        let (act, top) = Act::top([user(1, "a", SID_A)]);
        top.event(true, None, None, vec![user(2, "b", SID_B)]);
        let f = FakeOcserv::start(move |_, _| act.clone());
        let mut s = open_with(&f).await;
        assert_eq!(s.initial[0].id, 1);
        assert_eq!(next(&mut s).await.unwrap().unwrap().sessions[0].id, 2);

        // Half a frame, then a cancelled read, then the rest: one whole event.
        let frame =
            crate::ocserv::fake::top_update_frame(false, Some(2), None, vec![user(3, "c", SID_A)]);
        let (head, tail) = frame.split_at(frame.len() / 2);
        top.push(head.to_vec());
        for _ in 0..3 {
            let cancelled = tokio::time::timeout(Duration::from_millis(20), s.next()).await;
            assert!(cancelled.is_err(), "half a frame is not an event");
        }
        top.push(tail.to_vec());
        let e = next(&mut s).await.unwrap().unwrap();
        assert_eq!(
            (e.sessions[0].id, e.cause),
            (3, Some(Cause::UserDisconnected))
        );
    }

    #[tokio::test]
    async fn subscribe_failures_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such.socket");
        match subscribe(&missing, LIMIT).await.unwrap_err() {
            CtlError::Unreachable { path, .. } => assert_eq!(path, missing.display().to_string()),
            other => panic!("expected Unreachable, got {other:?}"),
        }

        let f = FakeOcserv::start(|_, _| Act::Close);
        assert!(matches!(
            subscribe(f.socket(), LIMIT).await.unwrap_err(),
            CtlError::NoReply { command: "TOP" }
        ));

        let f = FakeOcserv::start(|_, _| Act::Hang);
        let short = Duration::from_millis(100);
        assert!(matches!(
            subscribe(f.socket(), short).await.unwrap_err(),
            CtlError::Timeout { command: "TOP", timeout } if timeout == short
        ));

        let f = FakeOcserv::start(|_, _| Act::bool(101, true));
        match subscribe(f.socket(), LIMIT).await.unwrap_err() {
            CtlError::Protocol { command, reason } => {
                assert_eq!(command, "TOP");
                assert!(
                    reason.contains("LIST_REP") && reason.contains("STATUS_REP"),
                    "{reason}"
                );
            }
            other => panic!("expected Protocol, got {other:?}"),
        }

        let f = FakeOcserv::start(|_, _| Act::raw(codec::encode_frame(104, &[0xff, 0xff])));
        assert!(matches!(
            subscribe(f.socket(), LIMIT).await.unwrap_err(),
            CtlError::Protocol { command: "TOP", .. }
        ));
    }

    #[tokio::test]
    async fn follow_resubscribes_after_failures_and_eof() {
        // The first TOP request is closed without a reply; every later one streams.
        let (feeds_tx, mut feeds) = tokio::sync::mpsc::unbounded_channel();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let f = FakeOcserv::start(move |code, _| {
            assert_eq!(code, 11);
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                return Act::Close;
            }
            let (act, feed) = Act::top([user(1, "a", SID_A)]);
            let _ = feeds_tx.send(feed);
            act
        });
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let backoff =
            Backoff::new(Duration::from_millis(1), Duration::from_millis(5), 2.0).unwrap();
        let task = tokio::spawn(follow(f.socket().to_path_buf(), LIMIT, backoff, move |e| {
            let _ = events_tx.send(e);
        }));
        for round in 0..3i32 {
            let top = feed(&mut feeds).await;
            top.event(false, Some(7), None, vec![user(100 + round, "a", SID_A)]);
            let e = tokio::time::timeout(LIMIT, events.recv())
                .await
                .expect("an event")
                .expect("follow is running");
            assert_eq!(e.sessions[0].id, 100 + round as u32);
            assert_eq!(e.cause, Some(Cause::SessionTimeout));
            // The fake ends this subscription; follow must come back for another.
            drop(top);
        }
        // The failed attempt, three subscriptions, and a fourth held open.
        let _fourth = feed(&mut feeds).await;
        task.abort();
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert!(f.commands().iter().all(|c| *c == 11));
    }
}
