//! The ocserv control-socket codec: framing, command and reply codes, and conversion of the
//! protobuf replies into the shared types of [`crate::ocserv`]. Pure code, no I/O.
//!
//! Inputs: a command plus an encoded request body (to [`encode_request`]); raw reply bytes as they
//! arrive from the socket (to [`FrameDecoder`]); reply bodies (to the `decode_*` helpers).
//! Outputs: one request buffer to write in a single `write_all`; whole reply [`Frame`]s; typed
//! [`Session`]s, [`ServerStatus`], [`Ban`]s and [`Cookie`]s.
//!
//! Failure behaviour: every problem is a [`CodecError`]; nothing here panics on outside input.
//! A request body over [`MAX_REQUEST_BODY`] bytes is refused (ocserv reads requests into a
//! 256-byte buffer and drops larger ones). A reply announcing more than [`MAX_REPLY_BODY`] bytes is
//! refused as soon as its header is complete, before anything is buffered for it.
//!
//! Framing, both directions: `[code: u8][length: u32, host byte order][body]`. ocserv writes the
//! length in its own host order; this agent only supports little-endian hosts (x86_64, aarch64),
//! where host order is little-endian, and refuses to compile elsewhere rather than guess.
//!
//! Decoding rules (reference/ocserv.md §1): every protobuf field is optional. Byte fields become
//! text through UTF-8 (valid UTF-8 such as "jürgen" survives intact; invalid bytes are replaced,
//! never a panic). `safe_id` loses ocserv's trailing NUL. Addresses are parsed; an unparsable one
//! becomes `None`. A session entry whose `id` (a PID) is missing or negative makes the whole reply
//! a protocol error rather than being skipped: dropping one entry would make the reconcile loop
//! believe that session ended and report a disconnect that never happened.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use prost::Message;

use super::{Ban, Cookie, ServerStatus, Session, SessionState};
use crate::proto::ocserv_ctl as pb;

#[cfg(target_endian = "big")]
compile_error!(
    "ocserv frames carry their length in host byte order; this codec encodes little-endian \
     lengths and therefore supports little-endian hosts only"
);

/// Bytes in a frame header: one code byte and a 32-bit length.
pub const HEADER_LEN: usize = 5;
/// Largest request body ocserv accepts (its receive buffer is 256 bytes).
pub const MAX_REQUEST_BODY: usize = 256;
/// Largest reply body this decoder accepts. A LIST reply is roughly 1 KiB per session, so this
/// leaves room for well over 10 000 sessions while bounding memory against a corrupt length.
pub const MAX_REPLY_BODY: usize = 16 * 1024 * 1024;

/// A request code (`CTL_CMD_*` in ocserv).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Command {
    Status = 1,
    Reload = 2,
    Stop = 3,
    List = 4,
    UserInfo = 5,
    IdInfo = 6,
    DisconnectName = 7,
    DisconnectId = 8,
    ListBanned = 9,
    UnbanIp = 10,
    Top = 11,
    ListCookies = 12,
    TerminateUser = 13,
    TerminateId = 14,
    TerminateSession = 15,
}

impl Command {
    /// Every command, in code order.
    pub const ALL: [Command; 15] = [
        Self::Status,
        Self::Reload,
        Self::Stop,
        Self::List,
        Self::UserInfo,
        Self::IdInfo,
        Self::DisconnectName,
        Self::DisconnectId,
        Self::ListBanned,
        Self::UnbanIp,
        Self::Top,
        Self::ListCookies,
        Self::TerminateUser,
        Self::TerminateId,
        Self::TerminateSession,
    ];

    /// The byte on the wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The command for a wire byte, if it is one.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The name used in errors and logs (ocserv's own, without the `CTL_CMD_` prefix).
    pub fn name(self) -> &'static str {
        match self {
            Self::Status => "STATUS",
            Self::Reload => "RELOAD",
            Self::Stop => "STOP",
            Self::List => "LIST",
            Self::UserInfo => "USER_INFO",
            Self::IdInfo => "ID_INFO",
            Self::DisconnectName => "DISCONNECT_NAME",
            Self::DisconnectId => "DISCONNECT_ID",
            Self::ListBanned => "LIST_BANNED",
            Self::UnbanIp => "UNBAN_IP",
            Self::Top => "TOP",
            Self::ListCookies => "LIST_COOKIES",
            Self::TerminateUser => "TERMINATE_USER",
            Self::TerminateId => "TERMINATE_ID",
            Self::TerminateSession => "TERMINATE_SESSION",
        }
    }

    /// The reply code ocserv answers this command with (TOP: its first reply).
    pub fn reply(self) -> Reply {
        match self {
            Self::Status => Reply::Status,
            Self::Reload => Reply::Reload,
            Self::Stop => Reply::Stop,
            Self::List | Self::UserInfo | Self::IdInfo | Self::Top => Reply::List,
            Self::DisconnectName => Reply::DisconnectName,
            Self::DisconnectId => Reply::DisconnectId,
            Self::ListBanned => Reply::ListBanned,
            Self::UnbanIp => Reply::UnbanIp,
            Self::ListCookies => Reply::ListCookies,
            Self::TerminateUser => Reply::TerminateUser,
            Self::TerminateId => Reply::TerminateId,
            Self::TerminateSession => Reply::TerminateSession,
        }
    }
}

/// A reply code (`CTL_CMD_*_REP` in ocserv).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reply {
    Status = 101,
    Reload = 102,
    Stop = 103,
    List = 104,
    DisconnectName = 105,
    DisconnectId = 106,
    UnbanIp = 107,
    ListBanned = 108,
    TopUpdate = 109,
    ListCookies = 110,
    TerminateUser = 111,
    TerminateId = 112,
    TerminateSession = 113,
}

impl Reply {
    /// Every reply, in code order.
    pub const ALL: [Reply; 13] = [
        Self::Status,
        Self::Reload,
        Self::Stop,
        Self::List,
        Self::DisconnectName,
        Self::DisconnectId,
        Self::UnbanIp,
        Self::ListBanned,
        Self::TopUpdate,
        Self::ListCookies,
        Self::TerminateUser,
        Self::TerminateId,
        Self::TerminateSession,
    ];

    /// The byte on the wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The reply for a wire byte, if it is one.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The name used in errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Status => "STATUS_REP",
            Self::Reload => "RELOAD_REP",
            Self::Stop => "STOP_REP",
            Self::List => "LIST_REP",
            Self::DisconnectName => "DISCONNECT_NAME_REP",
            Self::DisconnectId => "DISCONNECT_ID_REP",
            Self::UnbanIp => "UNBAN_IP_REP",
            Self::ListBanned => "LIST_BANNED_REP",
            Self::TopUpdate => "TOP_UPDATE_REP",
            Self::ListCookies => "LIST_COOKIES_REP",
            Self::TerminateUser => "TERMINATE_USER_REP",
            Self::TerminateId => "TERMINATE_ID_REP",
            Self::TerminateSession => "TERMINATE_SESSION_REP",
        }
    }
}

/// Why encoding or decoding failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("request body for {command} is {len} bytes, ocserv accepts at most {max}")]
    RequestTooLarge {
        command: &'static str,
        len: usize,
        max: usize,
    },
    #[error("reply announces a {len}-byte body, the limit is {max}")]
    ReplyTooLarge { len: usize, max: usize },
    #[error("connection closed inside a frame ({buffered} bytes of an incomplete frame received)")]
    Truncated { buffered: usize },
    #[error("cannot decode {message}: {reason}")]
    Decode {
        message: &'static str,
        reason: String,
    },
    #[error("{message} entry {index} has {reason}")]
    BadEntry {
        message: &'static str,
        index: usize,
        reason: String,
    },
}

/// Builds one request frame: `[cmd][len u32 LE][body]`, ready for a single write.
pub fn encode_request(cmd: Command, body: &[u8]) -> Result<Vec<u8>, CodecError> {
    if body.len() > MAX_REQUEST_BODY {
        return Err(CodecError::RequestTooLarge {
            command: cmd.name(),
            len: body.len(),
            max: MAX_REQUEST_BODY,
        });
    }
    Ok(encode_frame(cmd.code(), body))
}

/// Builds a frame with any code and no size check (replies in tests and fake servers).
pub fn encode_frame(code: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(code);
    // `as u32` cannot truncate for the bodies built here (requests are <= 256 bytes); a reply
    // body over 4 GiB is not something ocserv or our tests produce.
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// `username_req` body.
pub fn username_req(username: &str) -> Vec<u8> {
    pb::UsernameReq {
        username: Some(username.to_owned()),
    }
    .encode_to_vec()
}

/// `id_req` body (`id` is a zigzag sint32 on the wire).
pub fn id_req(id: i32) -> Vec<u8> {
    pb::IdReq { id: Some(id) }.encode_to_vec()
}

/// `unban_req` body: the raw 4 or 16 address bytes.
pub fn unban_req(ip: IpAddr) -> Vec<u8> {
    let raw = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    pb::UnbanReq { ip: Some(raw) }.encode_to_vec()
}

/// `safe_id_req` body. The id is sent followed by a NUL byte, the form in which ocserv itself
/// stores and reports it (`user_info_rep.safe_id`).
pub fn safe_id_req(safe_id: &str) -> Vec<u8> {
    let mut raw = safe_id.as_bytes().to_vec();
    raw.push(0);
    pb::SafeIdReq { safe_id: Some(raw) }.encode_to_vec()
}

/// One complete reply frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub code: u8,
    pub body: Vec<u8>,
}

impl Frame {
    /// The typed reply code, if the byte is a known one.
    pub fn reply(&self) -> Option<Reply> {
        Reply::from_code(self.code)
    }
}

/// Incremental decoder for reply frames: feed bytes as they arrive, take frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_body: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder with the default body limit [`MAX_REPLY_BODY`].
    pub fn new() -> Self {
        Self::with_max_body(MAX_REPLY_BODY)
    }

    /// A decoder refusing bodies over `max_body` bytes.
    pub fn with_max_body(max_body: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_body,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed. An oversize length is an
    /// error as soon as the header is complete, so a corrupt header never makes us wait for or
    /// buffer gigabytes.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        let Some(header) = self.buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let code = header[0];
        let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > self.max_body {
            return Err(CodecError::ReplyTooLarge {
                len,
                max: self.max_body,
            });
        }
        let total = HEADER_LEN + len;
        if self.buf.len() < total {
            // Reserve for the announced body once, now that it is known to be within bounds.
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let body = self.buf[HEADER_LEN..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(Frame { code, body }))
    }

    /// Call at end of stream: an error when a partial frame is left over.
    pub fn finish(&self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

fn decode<M: Message + Default>(message: &'static str, body: &[u8]) -> Result<M, CodecError> {
    M::decode(body).map_err(|e| CodecError::Decode {
        message,
        reason: e.to_string(),
    })
}

/// Text from a byte field: valid UTF-8 unchanged, invalid bytes replaced.
fn text(bytes: Option<&[u8]>) -> String {
    bytes
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

/// A session id without ocserv's trailing NUL(s); `None` when empty.
fn safe_id(bytes: Option<&[u8]>) -> Option<String> {
    let s = text(bytes);
    let s = s.trim_end_matches('\0');
    (!s.is_empty()).then(|| s.to_owned())
}

/// Parses an address as ocserv prints it: plain, in brackets, with a port or an IPv6 zone.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    let unbracketed = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    let unzoned = unbracketed.split('%').next().unwrap_or(unbracketed);
    unzoned.parse::<IpAddr>().ok()
}

fn parse_v4(s: Option<&str>) -> Option<Ipv4Addr> {
    match parse_ip(s?)? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    }
}

fn parse_v6(s: Option<&str>) -> Option<Ipv6Addr> {
    match parse_ip(s?)? {
        IpAddr::V6(a) => Some(a),
        IpAddr::V4(_) => None,
    }
}

/// An address from raw bytes (4 or 16), or from text as very old ocserv versions sent it.
fn ip_from_bytes(raw: &[u8]) -> Option<IpAddr> {
    match raw.len() {
        4 => <[u8; 4]>::try_from(raw).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(raw).ok().map(IpAddr::from),
        _ => std::str::from_utf8(raw)
            .ok()
            .map(|s| s.trim_end_matches('\0'))
            .and_then(parse_ip),
    }
}

/// Converts one `user_info_rep`; `index` names the entry in errors.
pub fn session_from_pb(index: usize, u: pb::UserInfoRep) -> Result<Session, CodecError> {
    let bad = |reason: String| CodecError::BadEntry {
        message: "user_info_rep",
        index,
        reason,
    };
    let id = match u.id {
        None => return Err(bad("no id".into())),
        Some(id) => u32::try_from(id).map_err(|_| bad(format!("negative id {id}")))?,
    };
    Ok(Session {
        id,
        safe_id: safe_id(u.safe_id.as_deref()),
        username: text(u.username.as_deref()),
        groupname: text(u.groupname.as_deref()),
        // A missing status is not "pre-auth" (proto2's default): say we do not know.
        state: u
            .status
            .map_or(SessionState::Unknown, SessionState::from_code),
        client_ip: u.ip.as_deref().and_then(parse_ip),
        // ocserv's names are inverted: local_ip is the client's VPN address.
        vpn_ipv4: parse_v4(u.local_ip.as_deref()),
        vpn_ipv6: parse_v6(u.local_ip6.as_deref()),
        server_ptp_ipv4: parse_v4(u.remote_ip.as_deref()),
        device: u.tun.unwrap_or_default(),
        connected_at: u.conn_time.unwrap_or(0),
        hostname: text(u.hostname.as_deref()),
        user_agent: text(u.user_agent.as_deref()),
        vhost: text(u.vhost.as_deref()),
        tls_ciphersuite: u.tls_ciphersuite.unwrap_or_default(),
        dtls_ciphersuite: u.dtls_ciphersuite.unwrap_or_default(),
        // ocserv only sets mtu when it is known (> 0).
        mtu: u.mtu.filter(|m| *m > 0),
        dns: u.dns,
        routes: u.routes,
        counters: None,
    })
}

/// Decodes a `user_list_rep` (replies to LIST, USER_INFO, ID_INFO).
pub fn decode_sessions(body: &[u8]) -> Result<Vec<Session>, CodecError> {
    let list: pb::UserListRep = decode("user_list_rep", body)?;
    list.user
        .into_iter()
        .enumerate()
        .map(|(i, u)| session_from_pb(i, u))
        .collect()
}

/// Decodes a `status_rep`. ocserv counts closed-session traffic in kilobytes (1000 bytes).
pub fn decode_status(body: &[u8]) -> Result<ServerStatus, CodecError> {
    let s: pb::StatusRep = decode("status_rep", body)?;
    Ok(ServerStatus {
        running: s.status.unwrap_or(false),
        pid: s.pid.unwrap_or(0),
        sec_mod_pids: s.sec_mod_pids,
        active_sessions: s.active_clients.unwrap_or(0),
        start_time: s.start_time.unwrap_or(0),
        banned_ips: s.banned_ips.unwrap_or(0),
        sessions_closed: s.sessions_closed.unwrap_or(0),
        total_sessions_closed: s.total_sessions_closed.unwrap_or(0),
        auth_failures: s.auth_failures.unwrap_or(0),
        total_auth_failures: s.total_auth_failures.unwrap_or(0),
        bytes_in: s.kbytes_in.unwrap_or(0).saturating_mul(1000),
        bytes_out: s.kbytes_out.unwrap_or(0).saturating_mul(1000),
    })
}

/// Decodes a `ban_list_rep`. An entry whose address cannot be read is an error: a ban list
/// silently missing an entry would hide a banned client.
pub fn decode_bans(body: &[u8]) -> Result<Vec<Ban>, CodecError> {
    let list: pb::BanListRep = decode("ban_list_rep", body)?;
    list.info
        .into_iter()
        .enumerate()
        .map(|(index, b)| {
            let raw = b.ip.unwrap_or_default();
            let ip = ip_from_bytes(&raw).ok_or_else(|| CodecError::BadEntry {
                message: "ban_info_rep",
                index,
                reason: format!("an unreadable address of {} bytes", raw.len()),
            })?;
            Ok(Ban {
                ip,
                score: b.score.unwrap_or(0),
                expires: b.expires.unwrap_or(0),
            })
        })
        .collect()
}

/// Decodes the cookie list (`secm_list_cookies_reply_msg`).
pub fn decode_cookies(body: &[u8]) -> Result<Vec<Cookie>, CodecError> {
    let list: pb::SecmListCookiesReplyMsg = decode("secm_list_cookies_reply_msg", body)?;
    Ok(list
        .cookies
        .into_iter()
        .map(|c| Cookie {
            safe_id: safe_id(c.safe_id.as_deref()).unwrap_or_default(),
            username: text(c.username.as_deref()),
            groupname: text(c.groupname.as_deref()),
            user_agent: text(c.user_agent.as_deref()),
            remote_ip: c.remote_ip.as_deref().and_then(parse_ip),
            session_is_open: c.session_is_open.unwrap_or(false),
            tls_auth_ok: c.tls_auth_ok.unwrap_or(false),
            in_use: c.in_use.unwrap_or(false),
            created: c.created.unwrap_or(0),
            expires: c.expires.unwrap_or(0),
            vhost: text(c.vhost.as_deref()),
        })
        .collect())
}

/// Decodes a `bool_msg`; a missing status is false (ocserv leaves it unset on failure).
pub fn decode_bool(body: &[u8]) -> Result<bool, CodecError> {
    let m: pb::BoolMsg = decode("bool_msg", body)?;
    Ok(m.status.unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn user(id: i32, name: &[u8]) -> pb::UserInfoRep {
        pb::UserInfoRep {
            id: Some(id),
            username: Some(name.to_vec()),
            ..Default::default()
        }
    }

    #[test]
    fn request_frame_layout() {
        let body = id_req(1234);
        let frame = encode_request(Command::DisconnectId, &body).unwrap();
        assert_eq!(frame[0], 8);
        assert_eq!(&frame[1..5], &(body.len() as u32).to_le_bytes());
        assert_eq!(&frame[5..], &body[..]);
        // Empty body: a 5-byte frame with length 0.
        assert_eq!(
            encode_request(Command::Status, &[]).unwrap(),
            vec![1, 0, 0, 0, 0]
        );
    }

    #[test]
    fn request_body_limit_is_enforced_with_typed_error() {
        assert!(encode_request(Command::UserInfo, &[0; MAX_REQUEST_BODY]).is_ok());
        let e = encode_request(Command::UserInfo, &[0; MAX_REQUEST_BODY + 1]).unwrap_err();
        assert_eq!(
            e,
            CodecError::RequestTooLarge {
                command: "USER_INFO",
                len: MAX_REQUEST_BODY + 1,
                max: MAX_REQUEST_BODY
            }
        );
        assert!(e.to_string().contains("USER_INFO"));
    }

    #[test]
    fn longest_valid_username_fits_in_a_request() {
        let name = "ü".repeat(crate::validate::MAX_NAME_LEN / 2);
        assert!(crate::validate::username(&name).is_ok());
        assert!(username_req(&name).len() <= MAX_REQUEST_BODY);
    }

    #[test]
    fn codes_match_ocserv() {
        assert_eq!(Command::Status.reply().code(), 101);
        assert_eq!(Command::UserInfo.reply(), Reply::List);
        assert_eq!(Command::IdInfo.reply().code(), 104);
        assert_eq!(Command::DisconnectId.reply().code(), 106);
        assert_eq!(Command::UnbanIp.reply().code(), 107);
        assert_eq!(Command::ListBanned.reply().code(), 108);
        assert_eq!(Command::ListCookies.reply().code(), 110);
        assert_eq!(Command::TerminateSession.reply().code(), 113);
        for c in Command::ALL {
            assert_eq!(Command::from_code(c.code()), Some(c));
        }
        for r in Reply::ALL {
            assert_eq!(Reply::from_code(r.code()), Some(r));
        }
        assert_eq!(Command::from_code(0), None);
        assert_eq!(Reply::from_code(100), None);
    }

    #[test]
    fn id_req_is_zigzag() {
        // sint32 1 is zigzag 2: field 1 varint -> [0x08, 0x02].
        assert_eq!(id_req(1), vec![0x08, 0x02]);
        assert_eq!(id_req(-1), vec![0x08, 0x01]);
    }

    #[test]
    fn unban_and_safe_id_bodies() {
        let m = pb::UnbanReq::decode(&unban_req("192.0.2.7".parse().unwrap())[..]).unwrap();
        assert_eq!(m.ip.unwrap(), vec![192, 0, 2, 7]);
        let m = pb::UnbanReq::decode(&unban_req("2001:db8::1".parse().unwrap())[..]).unwrap();
        assert_eq!(m.ip.unwrap().len(), 16);
        let m = pb::SafeIdReq::decode(&safe_id_req("abc")[..]).unwrap();
        assert_eq!(m.safe_id.unwrap(), b"abc\0".to_vec());
    }

    #[test]
    fn decoder_handles_split_and_concatenated_frames() {
        let mut wire = encode_frame(104, b"hello");
        wire.extend(encode_frame(105, b""));
        let mut d = FrameDecoder::new();
        for b in &wire[..3] {
            d.push(&[*b]);
            assert_eq!(d.next_frame().unwrap(), None);
        }
        d.push(&wire[3..]);
        assert_eq!(
            d.next_frame().unwrap(),
            Some(Frame {
                code: 104,
                body: b"hello".to_vec()
            })
        );
        let f = d.next_frame().unwrap().unwrap();
        assert_eq!(
            (f.code, f.body.len(), f.reply()),
            (105, 0, Some(Reply::DisconnectName))
        );
        assert_eq!(d.next_frame().unwrap(), None);
        assert!(d.finish().is_ok());
    }

    #[test]
    fn decoder_refuses_oversize_length_from_header_alone() {
        let mut d = FrameDecoder::new();
        d.push(&[104, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next_frame(),
            Err(CodecError::ReplyTooLarge { len, .. }) if len == u32::MAX as usize
        ));
        let mut d = FrameDecoder::with_max_body(4);
        d.push(&encode_frame(104, b"12345"));
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn decoder_reports_truncation_at_eof() {
        let mut d = FrameDecoder::new();
        d.push(&encode_frame(104, b"hello")[..7]);
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.finish(), Err(CodecError::Truncated { buffered: 7 }));
    }

    #[test]
    fn session_fields_are_mapped() {
        let mut safe = b"AbCdEfGhIjKlMnOpQrStUvWxYz0=".to_vec();
        safe.push(0);
        let u = pb::UserInfoRep {
            id: Some(4242),
            username: Some("jürgen".as_bytes().to_vec()),
            groupname: Some(b"staff".to_vec()),
            ip: Some("198.51.100.9".into()),
            tun: Some("vpns0".into()),
            remote_ip: Some("10.10.0.1".into()),
            local_ip: Some("10.10.0.23".into()),
            local_ip6: Some("fd00::23".into()),
            conn_time: Some(1_700_000_000),
            hostname: Some(b"laptop".to_vec()),
            user_agent: Some(b"Open AnyConnect VPN Agent v9.01".to_vec()),
            status: Some(4),
            tls_ciphersuite: Some("(TLS1.3)-(AES-256-GCM)".into()),
            mtu: Some(1400),
            dns: vec!["192.0.2.53".into()],
            routes: vec!["10.0.0.0/255.0.0.0".into()],
            safe_id: Some(safe),
            vhost: Some(b"default".to_vec()),
            ..Default::default()
        };
        let body = pb::UserListRep { user: vec![u] }.encode_to_vec();
        let s = decode_sessions(&body).unwrap().remove(0);
        assert_eq!(s.id, 4242);
        assert_eq!(s.username, "jürgen");
        assert_eq!(s.groupname, "staff");
        assert_eq!(s.safe_id.as_deref(), Some("AbCdEfGhIjKlMnOpQrStUvWxYz0="));
        assert_eq!(s.state, SessionState::Connected);
        assert_eq!(s.client_ip, Some("198.51.100.9".parse().unwrap()));
        assert_eq!(s.vpn_ipv4, Some("10.10.0.23".parse().unwrap()));
        assert_eq!(s.server_ptp_ipv4, Some("10.10.0.1".parse().unwrap()));
        assert_eq!(s.vpn_ipv6, Some("fd00::23".parse().unwrap()));
        assert_eq!(s.device, "vpns0");
        assert_eq!(s.connected_at, 1_700_000_000);
        assert_eq!(s.mtu, Some(1400));
        assert_eq!(s.dns, vec!["192.0.2.53"]);
        assert_eq!(s.vhost, "default");
        assert_eq!(s.counters, None);
    }

    #[test]
    fn empty_and_garbage_fields_do_not_fail() {
        let u = pb::UserInfoRep {
            id: Some(7),
            username: Some(vec![b'a', 0xff, 0xfe]),
            ip: Some("not an address".into()),
            local_ip: Some(String::new()),
            remote_ip: Some("2001:db8::1".into()),
            mtu: Some(0),
            safe_id: Some(vec![0]),
            ..Default::default()
        };
        let s = session_from_pb(0, u).unwrap();
        assert_eq!(s.username, "a\u{fffd}\u{fffd}");
        assert_eq!(s.client_ip, None);
        assert_eq!(s.vpn_ipv4, None);
        assert_eq!(s.server_ptp_ipv4, None);
        assert_eq!(s.mtu, None);
        assert_eq!(s.safe_id, None);
        assert_eq!(s.state, SessionState::Unknown);
    }

    #[test]
    fn negative_or_missing_id_is_an_error_naming_the_entry() {
        let body = pb::UserListRep {
            user: vec![user(5, b"a"), user(-3, b"b")],
        }
        .encode_to_vec();
        let e = decode_sessions(&body).unwrap_err();
        assert!(e.to_string().contains("entry 1"), "{e}");
        assert!(e.to_string().contains("negative id -3"), "{e}");
        let body = pb::UserListRep {
            user: vec![pb::UserInfoRep::default()],
        }
        .encode_to_vec();
        assert!(decode_sessions(&body).is_err());
    }

    #[test]
    fn parse_ip_forms() {
        for (s, want) in [
            ("192.0.2.1", Some("192.0.2.1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("[2001:db8::1]:443", Some("2001:db8::1")),
            ("192.0.2.1:443", Some("192.0.2.1")),
            ("fe80::1%eth0", Some("fe80::1")),
            ("", None),
            ("(none)", None),
        ] {
            assert_eq!(parse_ip(s), want.map(|w| w.parse().unwrap()), "{s}");
        }
    }

    #[test]
    fn status_converts_kbytes() {
        let body = pb::StatusRep {
            status: Some(true),
            pid: Some(100),
            sec_mod_pids: vec![101],
            active_clients: Some(3),
            kbytes_in: Some(5),
            kbytes_out: Some(u64::MAX),
            ..Default::default()
        }
        .encode_to_vec();
        let s = decode_status(&body).unwrap();
        assert!(s.running);
        assert_eq!((s.pid, s.active_sessions), (100, 3));
        assert_eq!(s.sec_mod_pids, vec![101]);
        assert_eq!(s.bytes_in, 5000);
        assert_eq!(s.bytes_out, u64::MAX);
        assert_eq!(decode_status(&[]).unwrap(), ServerStatus::default());
    }

    #[test]
    fn bans_raw_and_text_addresses() {
        let body = pb::BanListRep {
            info: vec![
                pb::BanInfoRep {
                    ip: Some(vec![192, 0, 2, 9]),
                    score: Some(80),
                    expires: Some(99),
                },
                pb::BanInfoRep {
                    ip: Some(b"2001:db8::9".to_vec()),
                    score: None,
                    expires: None,
                },
            ],
        }
        .encode_to_vec();
        let bans = decode_bans(&body).unwrap();
        assert_eq!(bans[0].ip, "192.0.2.9".parse::<IpAddr>().unwrap());
        assert_eq!((bans[0].score, bans[0].expires), (80, 99));
        assert_eq!(bans[1].ip, "2001:db8::9".parse::<IpAddr>().unwrap());
        let body = pb::BanListRep {
            info: vec![pb::BanInfoRep {
                ip: Some(vec![1, 2, 3]),
                ..Default::default()
            }],
        }
        .encode_to_vec();
        assert!(decode_bans(&body).is_err());
    }

    #[test]
    fn cookies_convert() {
        let body = pb::SecmListCookiesReplyMsg {
            cookies: vec![pb::CookieIntRep {
                safe_id: Some(b"SID=\0".to_vec()),
                username: Some("ユーザー".as_bytes().to_vec()),
                remote_ip: Some("203.0.113.4".into()),
                in_use: Some(true),
                created: Some(10),
                expires: Some(20),
                ..Default::default()
            }],
        }
        .encode_to_vec();
        let c = decode_cookies(&body).unwrap().remove(0);
        assert_eq!(c.safe_id, "SID=");
        assert_eq!(c.username, "ユーザー");
        assert_eq!(c.remote_ip, Some("203.0.113.4".parse().unwrap()));
        assert!(c.in_use && !c.session_is_open);
        assert_eq!((c.created, c.expires), (10, 20));
    }

    #[test]
    fn bool_msg() {
        assert!(decode_bool(&pb::BoolMsg { status: Some(true) }.encode_to_vec()).unwrap());
        assert!(!decode_bool(
            &pb::BoolMsg {
                status: Some(false)
            }
            .encode_to_vec()
        )
        .unwrap());
        assert!(!decode_bool(&[]).unwrap());
        assert!(decode_bool(&[0xff]).is_err());
    }

    proptest! {
        #[test]
        fn request_round_trip(code_idx in 0usize..15, body in proptest::collection::vec(any::<u8>(), 0..=MAX_REQUEST_BODY)) {
            let cmd = Command::ALL[code_idx];
            let wire = encode_request(cmd, &body).unwrap();
            let mut d = FrameDecoder::new();
            d.push(&wire);
            let f = d.next_frame().unwrap().unwrap();
            prop_assert_eq!(f.code, cmd.code());
            prop_assert_eq!(f.body, body);
            prop_assert!(d.finish().is_ok());
        }

        #[test]
        fn frames_survive_any_split(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 1..4), chunk in 1usize..64) {
            let mut wire = Vec::new();
            for (i, b) in bodies.iter().enumerate() {
                wire.extend(encode_frame(101 + i as u8, b));
            }
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f.body);
                }
            }
            prop_assert_eq!(got, bodies);
            prop_assert!(d.finish().is_ok());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048), chunk in 1usize..32) {
            let mut d = FrameDecoder::with_max_body(1024);
            for piece in bytes.chunks(chunk) {
                d.push(piece);
                while let Ok(Some(f)) = d.next_frame() {
                    let _ = decode_sessions(&f.body);
                    let _ = decode_status(&f.body);
                    let _ = decode_bans(&f.body);
                    let _ = decode_cookies(&f.body);
                    let _ = decode_bool(&f.body);
                }
            }
            let _ = d.finish();
            let _ = decode_sessions(&bytes);
            let _ = decode_bans(&bytes);
            let _ = decode_cookies(&bytes);
        }

        #[test]
        fn sessions_round_trip(id in 0i32..=i32::MAX, name in "\\PC{0,40}", sid in "[A-Za-z0-9+/=]{0,28}", status in 0u32..6) {
            let mut raw_sid = sid.clone().into_bytes();
            raw_sid.push(0);
            let u = pb::UserInfoRep {
                id: Some(id),
                username: Some(name.clone().into_bytes()),
                safe_id: Some(raw_sid),
                status: Some(status),
                ..Default::default()
            };
            let body = pb::UserListRep { user: vec![u] }.encode_to_vec();
            let s = decode_sessions(&body).unwrap().remove(0);
            prop_assert_eq!(s.id, id as u32);
            prop_assert_eq!(s.username, name);
            prop_assert_eq!(s.safe_id, (!sid.is_empty()).then_some(sid));
            prop_assert_eq!(s.state, SessionState::from_code(status));
        }
    }
}
