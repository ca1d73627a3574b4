//! The hook socket protocol (reference/contract.md §2): frames, requests and answers exchanged
//! between `ocserv-agent-hook` (run by ocserv's connect/disconnect/host-update scripts) and the
//! agent's HookListener. Pure code over byte slices plus two blocking helpers for the hook
//! program; no runtime, nothing that needs the agent's actors.
//!
//! Inputs: the hook's environment as data ([`request_from_env`]); raw frame headers and payloads
//! as they arrive on the socket ([`frame_len`], [`read_frame`], [`parse_request`],
//! [`parse_response`]). Outputs: typed [`HookRequest`] / [`HookResponse`] values and encoded
//! frames ([`encode_frame`], [`write_frame`]).
//!
//! Framing, both directions: a 4-byte big-endian length, then that many bytes of UTF-8 JSON.
//! A length of 0 or above [`MAX_FRAME`] is refused as soon as the header is read, before
//! anything is buffered for the body.
//!
//! Failure behaviour: nothing here panics on any input. Every refusal is a typed error whose
//! text names the field (or environment variable) and the reason, and whose `cause()` is a fixed
//! string fit for a metric label ([`FrameError::cause`], [`RequestError::cause`],
//! [`EnvError::cause`], [`ResponseError::cause`]). Values never appear in causes, and error texts
//! quote at most a short, escaped prefix of a refused value.
//!
//! Validation: [`parse_request`] checks shapes and syntax (required fields present, types,
//! addresses and numbers parse, sizes within the bounds below). It refuses an empty username but
//! deliberately not an unsafe one: the listener denies those through its own name rule
//! (`validate::username`) so the denial is answered and counted like any other decision.
//! [`request_from_env`] applies the same rules to ocserv's script variables, so a request it
//! builds always parses back to itself.
//!
//! Size bounds (why a request always fits in one frame): identity texts (`username`,
//! `groupname`, `vhost`, `device`) are at most [`MAX_NAME_BYTES`] bytes and are refused, never
//! cut, when longer (a cut name would be another name). Informational texts (`user_agent`,
//! `hostname`, `device_type`, `device_platform`) are cut by the hook to [`MAX_TEXT_BYTES`]
//! bytes at a character boundary. Routes are printable ASCII without `"` or `\`, each at most
//! [`MAX_ROUTE_BYTES`] bytes; the hook keeps the leading routes while there are at most
//! [`MAX_ROUTES`] of them and their lengths plus one separator each stay within
//! [`MAX_ROUTES_TOTAL_BYTES`]; later routes are left out (they are informational: ocserv, not the
//! agent, applies them). DNS servers are addresses, at most [`MAX_DNS`] (later ones left out).
//! JSON escaping at most sextuples a text byte (`\u001f`), so the worst case is about 50 KiB,
//! under the 64 KiB frame limit; [`encode_frame`] still refuses anything larger.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::net::IpAddr;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

/// Largest frame payload in bytes (64 KiB); larger frames are refused.
pub const MAX_FRAME: usize = 64 * 1024;
/// Bytes in a frame header (the big-endian length).
pub const HEADER_LEN: usize = 4;
/// Longest identity text (`username`, `groupname`, `vhost`, `device`), in bytes. Longer values
/// are refused, not cut. The agent's own name rule is stricter (`validate::MAX_NAME_LEN`).
pub const MAX_NAME_BYTES: usize = 256;
/// Longest informational text (`user_agent`, `hostname`, `device_type`, `device_platform`), in
/// bytes; the hook cuts longer values, the parser refuses them.
pub const MAX_TEXT_BYTES: usize = 1024;
/// Longest single route, in bytes (an IPv6 network in netmask form is 79).
pub const MAX_ROUTE_BYTES: usize = 96;
/// Most routes carried in one request.
pub const MAX_ROUTES: usize = 1024;
/// Budget for all routes of one request: the sum of each route's length plus one.
pub const MAX_ROUTES_TOTAL_BYTES: usize = 16 * 1024;
/// Most DNS servers carried in one request.
pub const MAX_DNS: usize = 32;
/// Largest accepted `session_id`: ocserv's `ID` is a PID carried as a protobuf `sint32`.
pub const MAX_SESSION_ID: u64 = i32::MAX as u64;

/// Longest prefix of a refused value quoted in an error text.
const QUOTE_CHARS: usize = 32;

// ---------------------------------------------------------------------------------------------
// Frames

/// Why a frame was refused or could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame length is 0; an empty frame is refused")]
    Empty,
    #[error("frame length {len} is over the limit of {MAX_FRAME} bytes")]
    TooLarge { len: usize },
    #[error("frame truncated: the peer closed after {got} of {expected} bytes")]
    Truncated { expected: usize, got: usize },
    #[error("frame i/o failed: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Fixed metric label: `frame_empty`, `frame_too_large`, `frame_truncated` or `frame_io`.
    pub fn cause(&self) -> &'static str {
        match self {
            FrameError::Empty => "frame_empty",
            FrameError::TooLarge { .. } => "frame_too_large",
            FrameError::Truncated { .. } => "frame_truncated",
            FrameError::Io(_) => "frame_io",
        }
    }
}

/// The payload length announced by a frame header; 0 and lengths over [`MAX_FRAME`] are refused.
pub fn frame_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        Err(FrameError::Empty)
    } else if len > MAX_FRAME {
        Err(FrameError::TooLarge { len })
    } else {
        Ok(len)
    }
}

/// One frame (header and payload) ready for a single `write_all`.
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: payload.len() });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    // Cannot truncate: the length was checked against MAX_FRAME just above.
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Reads one whole frame and returns its payload. Blocking; the caller sets the timeouts.
/// A peer that closes mid-frame (or before sending anything) gives [`FrameError::Truncated`].
pub fn read_frame(reader: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    read_full(reader, &mut header)?;
    let len = frame_len(header)?;
    let mut payload = vec![0u8; len];
    read_full(reader, &mut payload)?;
    Ok(payload)
}

/// Writes `payload` as one frame in a single `write_all`, then flushes.
pub fn write_frame(writer: &mut impl Write, payload: &[u8]) -> Result<(), FrameError> {
    let frame = encode_frame(payload)?;
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

/// `read_exact` that reports how much arrived before the peer closed.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(FrameError::Truncated {
                    expected: buf.len(),
                    got,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Requests

/// Why ocserv ran the script (`REASON`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    Connect,
    Disconnect,
    HostUpdate,
}

impl Reason {
    /// The wire (and metric label) spelling: `connect`, `disconnect`, `host-update`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Connect => "connect",
            Reason::Disconnect => "disconnect",
            Reason::HostUpdate => "host-update",
        }
    }

    /// The reason spelled `text`, if any.
    pub fn from_wire(text: &str) -> Option<Reason> {
        match text {
            "connect" => Some(Reason::Connect),
            "disconnect" => Some(Reason::Disconnect),
            "host-update" => Some(Reason::HostUpdate),
            _ => None,
        }
    }
}

/// One hook request (reference/contract.md §2), validated as described in the module doc.
///
/// Empty optional texts are `None`, never `Some("")`. `groupname` and `device` are empty when
/// ocserv gave none. The hook always sends `session_id` as a JSON number and `ip_real` /
/// `ip_remote` as strings (`""` when absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookRequest {
    pub reason: Reason,
    pub username: String,
    pub groupname: String,
    /// The client's public address (`IP_REAL`).
    #[serde(serialize_with = "ip_or_empty")]
    pub ip_real: Option<IpAddr>,
    /// The client's VPN address (`IP_REMOTE`).
    #[serde(serialize_with = "ip_or_empty")]
    pub ip_remote: Option<IpAddr>,
    /// The tun device (`DEVICE`), e.g. `vpns0`.
    pub device: String,
    /// ocserv's `ID`: the worker's PID, 1 to [`MAX_SESSION_ID`].
    pub session_id: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost: Option<String>,
    /// The server address the client reached (`IP_REAL_LOCAL`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_real_local: Option<IpAddr>,
    /// The server's tun address (`IP_LOCAL`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_local: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// The client-advertised hostname.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_platform: Option<String>,
    /// Routes as ocserv printed them (`OCSERV_ROUTES`, netmask form); informational.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    /// DNS servers pushed to the client (`OCSERV_DNS`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
    /// Disconnect only: bytes from the client (its upload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats_bytes_in: Option<u64>,
    /// Disconnect only: bytes to the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats_bytes_out: Option<u64>,
    /// Disconnect only: session length in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats_duration: Option<u64>,
}

fn ip_or_empty<S: Serializer>(ip: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
    match ip {
        Some(ip) => s.collect_str(ip),
        None => s.serialize_str(""),
    }
}

impl HookRequest {
    /// The request as JSON (the frame payload).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings, numbers and addresses into a Vec cannot fail; the fallback
        // (an empty payload, refused by `encode_frame`) only exists so this never panics.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The request as one complete frame.
    pub fn to_frame(&self) -> Result<Vec<u8>, FrameError> {
        encode_frame(&self.to_json())
    }
}

/// Why a request payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("hook request is {len} bytes, over the limit of {MAX_FRAME}")]
    TooLarge { len: usize },
    #[error("hook request is not UTF-8 (invalid byte at offset {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
    #[error("hook request is not valid JSON: {reason}")]
    InvalidJson { reason: String },
    #[error("hook request must be a JSON object, got {found}")]
    NotAnObject { found: &'static str },
    #[error("hook request field `{field}` is missing")]
    MissingField { field: &'static str },
    #[error("hook request field `reason`: unknown value {value}; expected connect, disconnect or host-update")]
    UnknownReason { value: String },
    #[error("hook request field `username` must not be empty")]
    EmptyUsername,
    #[error("hook request field `{field}` {reason}")]
    InvalidField { field: &'static str, reason: String },
}

impl RequestError {
    /// Fixed metric label: `frame_too_large`, `not_utf8`, `invalid_json`, `not_an_object`,
    /// `missing_field`, `unknown_reason`, `empty_username` or `invalid_field`.
    pub fn cause(&self) -> &'static str {
        match self {
            RequestError::TooLarge { .. } => "frame_too_large",
            RequestError::NotUtf8 { .. } => "not_utf8",
            RequestError::InvalidJson { .. } => "invalid_json",
            RequestError::NotAnObject { .. } => "not_an_object",
            RequestError::MissingField { .. } => "missing_field",
            RequestError::UnknownReason { .. } => "unknown_reason",
            RequestError::EmptyUsername => "empty_username",
            RequestError::InvalidField { .. } => "invalid_field",
        }
    }

    /// The request field the error is about, when there is one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            RequestError::MissingField { field } | RequestError::InvalidField { field, .. } => {
                Some(field)
            }
            RequestError::UnknownReason { .. } => Some("reason"),
            RequestError::EmptyUsername => Some("username"),
            _ => None,
        }
    }
}

/// A short, escaped prefix of `value` for error texts.
fn quote(value: &str) -> String {
    let mut prefix: String = value.chars().take(QUOTE_CHARS).collect();
    if prefix.len() < value.len() {
        prefix.push('…');
    }
    format!("{prefix:?}")
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Field-level checks shared by [`parse_request`] and [`request_from_env`]. `Err` carries only
/// the reason; the caller names the field or variable.
mod rules {
    use super::*;

    pub(super) fn name(value: &str) -> Result<(), String> {
        if value.len() > MAX_NAME_BYTES {
            return Err(format!(
                "is {} bytes long, the limit is {MAX_NAME_BYTES}",
                value.len()
            ));
        }
        Ok(())
    }

    pub(super) fn text(value: &str) -> Result<(), String> {
        if value.len() > MAX_TEXT_BYTES {
            return Err(format!(
                "is {} bytes long, the limit is {MAX_TEXT_BYTES}",
                value.len()
            ));
        }
        Ok(())
    }

    pub(super) fn ip(value: &str) -> Result<Option<IpAddr>, String> {
        if value.is_empty() {
            return Ok(None);
        }
        value
            .parse()
            .map(Some)
            .map_err(|_| format!("is not an IP address: {}", quote(value)))
    }

    /// A decimal integer written with ASCII digits only (no sign, no spaces), at most `max`.
    pub(super) fn decimal(value: &str, max: u64) -> Result<u64, String> {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("is not a decimal integer: {}", quote(value)));
        }
        match value.parse::<u64>() {
            Ok(n) if n <= max => Ok(n),
            _ => Err(format!("is over the limit of {max}: {}", quote(value))),
        }
    }

    pub(super) fn session_id(n: u64) -> Result<u32, String> {
        if n == 0 || n > MAX_SESSION_ID {
            return Err(format!(
                "must be a process id from 1 to {MAX_SESSION_ID}, got {n}"
            ));
        }
        // In range 1..=i32::MAX, so it fits.
        Ok(n as u32)
    }

    pub(super) fn route(value: &str) -> Result<(), String> {
        if value.is_empty() || value.len() > MAX_ROUTE_BYTES {
            return Err(format!(
                "has a route of {} bytes; each must be 1 to {MAX_ROUTE_BYTES}",
                value.len()
            ));
        }
        if let Some(c) = value
            .chars()
            .find(|c| !c.is_ascii_graphic() || *c == '"' || *c == '\\')
        {
            return Err(format!(
                "has a route with the character {c:?}; routes are printable ASCII without quotes or backslashes"
            ));
        }
        Ok(())
    }

    pub(super) fn routes_total(routes: &[String]) -> Result<(), String> {
        if routes.len() > MAX_ROUTES {
            return Err(format!(
                "has {} routes, the limit is {MAX_ROUTES}",
                routes.len()
            ));
        }
        let total: usize = routes.iter().map(|r| r.len() + 1).sum();
        if total > MAX_ROUTES_TOTAL_BYTES {
            return Err(format!(
                "has {total} bytes of routes, the limit is {MAX_ROUTES_TOTAL_BYTES}"
            ));
        }
        Ok(())
    }
}

/// Reads the fields of one request object with the field name in every error.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// The field's value; JSON `null` counts as absent.
    fn get(&self, field: &'static str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    fn invalid(field: &'static str, reason: String) -> RequestError {
        RequestError::InvalidField { field, reason }
    }

    fn string(&self, field: &'static str) -> Result<Option<&str>, RequestError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Self::invalid(
                field,
                format!("must be a string, got {}", json_kind(v)),
            )),
        }
    }

    fn name(&self, field: &'static str) -> Result<String, RequestError> {
        let s = self.string(field)?.unwrap_or("");
        rules::name(s).map_err(|r| Self::invalid(field, r))?;
        Ok(s.to_owned())
    }

    fn optional_name(&self, field: &'static str) -> Result<Option<String>, RequestError> {
        let s = self.name(field)?;
        Ok((!s.is_empty()).then_some(s))
    }

    fn text(&self, field: &'static str) -> Result<Option<String>, RequestError> {
        let s = self.string(field)?.unwrap_or("");
        rules::text(s).map_err(|r| Self::invalid(field, r))?;
        Ok((!s.is_empty()).then(|| s.to_owned()))
    }

    fn ip(&self, field: &'static str) -> Result<Option<IpAddr>, RequestError> {
        let s = self.string(field)?.unwrap_or("");
        rules::ip(s).map_err(|r| Self::invalid(field, r))
    }

    /// A non-negative integer sent as a JSON number or as a decimal string (older clients).
    fn integer(&self, field: &'static str, max: u64) -> Result<Option<u64>, RequestError> {
        let n = match self.get(field) {
            None => return Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(n) if n <= max => n,
                Some(n) => {
                    return Err(Self::invalid(
                        field,
                        format!("is over the limit of {max}: {n}"),
                    ))
                }
                None => {
                    return Err(Self::invalid(
                        field,
                        format!("must be a non-negative integer, got {n}"),
                    ))
                }
            },
            Some(Value::String(s)) => {
                rules::decimal(s, max).map_err(|r| Self::invalid(field, r))?
            }
            Some(v) => {
                return Err(Self::invalid(
                    field,
                    format!("must be an integer, got {}", json_kind(v)),
                ))
            }
        };
        Ok(Some(n))
    }

    /// A list of strings, sent as a JSON array or as one space-separated string (ocserv's own
    /// spelling, which older clients forwarded as is).
    fn list(&self, field: &'static str) -> Result<Vec<&str>, RequestError> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(s.split_ascii_whitespace().collect()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    v => Err(Self::invalid(
                        field,
                        format!("must hold strings only, found {}", json_kind(v)),
                    )),
                })
                .collect(),
            Some(v) => Err(Self::invalid(
                field,
                format!("must be an array of strings, got {}", json_kind(v)),
            )),
        }
    }
}

/// Parses and validates one request payload (see the module doc for the rules). Unknown fields
/// are ignored; JSON `null` counts as an absent field.
pub fn parse_request(bytes: &[u8]) -> Result<HookRequest, RequestError> {
    if bytes.len() > MAX_FRAME {
        return Err(RequestError::TooLarge { len: bytes.len() });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| RequestError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| RequestError::InvalidJson {
        reason: e.to_string(),
    })?;
    let Value::Object(map) = &value else {
        return Err(RequestError::NotAnObject {
            found: json_kind(&value),
        });
    };
    let f = Fields(map);

    let reason = match f.get("reason") {
        None => return Err(RequestError::MissingField { field: "reason" }),
        Some(Value::String(s)) => {
            Reason::from_wire(s).ok_or_else(|| RequestError::UnknownReason { value: quote(s) })?
        }
        Some(v) => {
            return Err(Fields::invalid(
                "reason",
                format!("must be a string, got {}", json_kind(v)),
            ))
        }
    };
    if f.get("username").is_none() {
        return Err(RequestError::MissingField { field: "username" });
    }
    let username = f.name("username")?;
    if username.is_empty() {
        return Err(RequestError::EmptyUsername);
    }
    let session_id = f
        .integer("session_id", u64::MAX)?
        .ok_or(RequestError::MissingField {
            field: "session_id",
        })?;
    let session_id = rules::session_id(session_id).map_err(|r| Fields::invalid("session_id", r))?;

    let mut routes = Vec::new();
    for r in f.list("routes")? {
        rules::route(r).map_err(|why| Fields::invalid("routes", why))?;
        routes.push(r.to_owned());
    }
    rules::routes_total(&routes).map_err(|why| Fields::invalid("routes", why))?;

    let dns_items = f.list("dns")?;
    if dns_items.len() > MAX_DNS {
        return Err(Fields::invalid(
            "dns",
            format!("has {} servers, the limit is {MAX_DNS}", dns_items.len()),
        ));
    }
    let mut dns = Vec::with_capacity(dns_items.len());
    for d in dns_items {
        match rules::ip(d) {
            Ok(Some(ip)) => dns.push(ip),
            Ok(None) => {}
            Err(why) => return Err(Fields::invalid("dns", format!("has an entry that {why}"))),
        }
    }

    Ok(HookRequest {
        reason,
        username,
        groupname: f.name("groupname")?,
        ip_real: f.ip("ip_real")?,
        ip_remote: f.ip("ip_remote")?,
        device: f.name("device")?,
        session_id,
        vhost: f.optional_name("vhost")?,
        ip_real_local: f.ip("ip_real_local")?,
        ip_local: f.ip("ip_local")?,
        user_agent: f.text("user_agent")?,
        hostname: f.text("hostname")?,
        device_type: f.text("device_type")?,
        device_platform: f.text("device_platform")?,
        routes,
        dns,
        stats_bytes_in: f.integer("stats_bytes_in", u64::MAX)?,
        stats_bytes_out: f.integer("stats_bytes_out", u64::MAX)?,
        stats_duration: f.integer("stats_duration", u64::MAX)?,
    })
}

// ---------------------------------------------------------------------------------------------
// Requests from ocserv's script environment

/// Why the hook's environment cannot make a request. The hook refuses (exit 1) without asking
/// the agent: ocserv always sets these variables correctly, so this is a misuse or a bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("environment variable {var} is missing or empty")]
    Missing { var: &'static str },
    #[error("environment variable {var} {reason}")]
    Invalid { var: &'static str, reason: String },
}

impl EnvError {
    /// Fixed metric label: `env_missing` or `env_invalid`.
    pub fn cause(&self) -> &'static str {
        match self {
            EnvError::Missing { .. } => "env_missing",
            EnvError::Invalid { .. } => "env_invalid",
        }
    }

    /// The environment variable the error is about.
    pub fn var(&self) -> &'static str {
        match self {
            EnvError::Missing { var } | EnvError::Invalid { var, .. } => var,
        }
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary.
fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Builds a request from ocserv's script environment, given as data (pass
/// `std::env::vars_os()`; tests pass any map). Pure and panic-free on any input.
///
/// Mapping: `REASON` → `reason`, `ID` → `session_id`, `USERNAME`, `GROUPNAME`, `VHOST`,
/// `DEVICE`, `IP_REAL`, `IP_REAL_LOCAL`, `IP_LOCAL`, `IP_REMOTE`, `USER_AGENT`, `DEVICE_TYPE`,
/// `DEVICE_PLATFORM` → the same names in lower case; `REMOTE_HOSTNAME` → `hostname`, or
/// `HOSTNAME` when `REMOTE_HOSTNAME` is not set at all (older ocserv; `HOSTNAME` may then be
/// inherited rather than client-advertised); `OCSERV_ROUTES` and `OCSERV_DNS` (space-separated,
/// trailing space) → `routes` and `dns`; `STATS_BYTES_IN`, `STATS_BYTES_OUT`, `STATS_DURATION`
/// → the `stats_*` numbers. When a variable appears twice the last one wins.
///
/// Values that are not UTF-8 are converted lossily (invalid bytes become U+FFFD). Missing or
/// empty values become empty strings, `None` or empty lists. Bounds (module doc): identity texts
/// over [`MAX_NAME_BYTES`] are refused; informational texts are cut to [`MAX_TEXT_BYTES`];
/// routes and DNS servers past their bounds are left out. So every request returned here
/// encodes to a frame of at most [`MAX_FRAME`] bytes and [`parse_request`] gives it back
/// unchanged.
///
/// Refused (an [`EnvError`] naming the variable): `REASON` missing or unknown; `ID` missing or
/// not a PID; `USERNAME` empty; an identity text too long; an address, DNS server, route or
/// statistic that does not parse.
pub fn request_from_env(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<HookRequest, EnvError> {
    const WANTED: &[&str] = &[
        "REASON",
        "ID",
        "USERNAME",
        "GROUPNAME",
        "VHOST",
        "DEVICE",
        "IP_REAL",
        "IP_REAL_LOCAL",
        "IP_LOCAL",
        "IP_REMOTE",
        "HOSTNAME",
        "REMOTE_HOSTNAME",
        "USER_AGENT",
        "DEVICE_TYPE",
        "DEVICE_PLATFORM",
        "OCSERV_ROUTES",
        "OCSERV_DNS",
        "STATS_BYTES_IN",
        "STATS_BYTES_OUT",
        "STATS_DURATION",
    ];
    let mut env: HashMap<&'static str, String> = HashMap::new();
    for (key, value) in vars {
        let Some(key) = key.to_str() else { continue };
        if let Some(wanted) = WANTED.iter().find(|w| **w == key) {
            env.insert(*wanted, value.to_string_lossy().into_owned());
        }
    }
    let get = |var: &'static str| env.get(var).map(String::as_str).unwrap_or("");
    let invalid = |var: &'static str| move |reason: String| EnvError::Invalid { var, reason };
    let name = |var: &'static str| -> Result<String, EnvError> {
        let v = get(var);
        rules::name(v).map_err(invalid(var))?;
        Ok(v.to_owned())
    };
    let text = |var: &'static str| -> Option<String> {
        let v = cut(get(var).to_owned(), MAX_TEXT_BYTES);
        (!v.is_empty()).then_some(v)
    };
    let ip = |var: &'static str| rules::ip(get(var)).map_err(invalid(var));
    let stat = |var: &'static str| -> Result<Option<u64>, EnvError> {
        let v = get(var);
        if v.is_empty() {
            return Ok(None);
        }
        rules::decimal(v, u64::MAX).map(Some).map_err(invalid(var))
    };

    let reason = match get("REASON") {
        "" => return Err(EnvError::Missing { var: "REASON" }),
        r => Reason::from_wire(r).ok_or_else(|| EnvError::Invalid {
            var: "REASON",
            reason: format!(
                "is {}; expected connect, disconnect or host-update",
                quote(r)
            ),
        })?,
    };
    let session_id = match get("ID") {
        "" => return Err(EnvError::Missing { var: "ID" }),
        id => rules::decimal(id, u64::MAX)
            .and_then(rules::session_id)
            .map_err(invalid("ID"))?,
    };
    let username = name("USERNAME")?;
    if username.is_empty() {
        return Err(EnvError::Missing { var: "USERNAME" });
    }

    let mut routes: Vec<String> = Vec::new();
    let mut routes_total = 0;
    for r in get("OCSERV_ROUTES").split_ascii_whitespace() {
        rules::route(r).map_err(invalid("OCSERV_ROUTES"))?;
        if routes.len() == MAX_ROUTES || routes_total + r.len() + 1 > MAX_ROUTES_TOTAL_BYTES {
            break;
        }
        routes_total += r.len() + 1;
        routes.push(r.to_owned());
    }
    let mut dns = Vec::new();
    for d in get("OCSERV_DNS").split_ascii_whitespace().take(MAX_DNS) {
        if let Some(ip) = rules::ip(d).map_err(invalid("OCSERV_DNS"))? {
            dns.push(ip);
        }
    }
    let hostname = if env.contains_key("REMOTE_HOSTNAME") {
        text("REMOTE_HOSTNAME")
    } else {
        text("HOSTNAME")
    };
    let vhost = name("VHOST")?;

    Ok(HookRequest {
        reason,
        username,
        groupname: name("GROUPNAME")?,
        ip_real: ip("IP_REAL")?,
        ip_remote: ip("IP_REMOTE")?,
        device: name("DEVICE")?,
        session_id,
        vhost: (!vhost.is_empty()).then_some(vhost),
        ip_real_local: ip("IP_REAL_LOCAL")?,
        ip_local: ip("IP_LOCAL")?,
        user_agent: text("USER_AGENT"),
        hostname,
        device_type: text("DEVICE_TYPE"),
        device_platform: text("DEVICE_PLATFORM"),
        routes,
        dns,
        stats_bytes_in: stat("STATS_BYTES_IN")?,
        stats_bytes_out: stat("STATS_BYTES_OUT")?,
        stats_duration: stat("STATS_DURATION")?,
    })
}

// ---------------------------------------------------------------------------------------------
// Responses

/// Where a decision came from (metric label and wire value): the one definition, shared with
/// the policy cache.
pub use crate::policy::Source;

/// The agent's answer to one hook request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookResponse {
    pub allowed: bool,
    /// Why the request was refused or invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A human-readable note (the hook prints it on stderr when denied).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

impl HookResponse {
    /// Admit, decided by `source`.
    pub fn allow(source: Source) -> Self {
        HookResponse {
            allowed: true,
            error: None,
            message: None,
            source: Some(source),
        }
    }

    /// Refuse, decided by `source`, for `reason` (sent as `error`).
    pub fn deny(source: Source, reason: impl Into<String>) -> Self {
        HookResponse {
            allowed: false,
            error: Some(reason.into()),
            message: None,
            source: Some(source),
        }
    }

    /// Refuse an invalid request (`error` says why, e.g. a [`RequestError`]'s text); the
    /// decision is the agent's own, so `source` is `local_policy`.
    pub fn invalid(error: impl Into<String>) -> Self {
        Self::deny(Source::LocalPolicy, error)
    }

    /// The same answer with a human-readable `message`.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// The answer as JSON (the frame payload).
    pub fn to_json(&self) -> Vec<u8> {
        // Cannot fail for bools and strings; the fallback is a refusal, never an admission.
        serde_json::to_vec(self).unwrap_or_else(|_| br#"{"allowed":false}"#.to_vec())
    }

    /// The answer as one frame. Fails only when `error`/`message` push it past [`MAX_FRAME`].
    pub fn to_frame(&self) -> Result<Vec<u8>, FrameError> {
        encode_frame(&self.to_json())
    }
}

/// Why an answer from the agent was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent answer is invalid: {reason}")]
pub struct ResponseError {
    pub reason: String,
}

impl ResponseError {
    /// Fixed metric label: `invalid_response`.
    pub fn cause(&self) -> &'static str {
        "invalid_response"
    }
}

/// Parses the agent's answer. `allowed` must be a boolean; `error` and `message` strings or
/// absent; an unknown `source` is read as absent (a newer agent may add sources), and unknown
/// fields are ignored.
pub fn parse_response(bytes: &[u8]) -> Result<HookResponse, ResponseError> {
    #[derive(Deserialize)]
    struct Raw {
        allowed: bool,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        source: Option<String>,
    }
    let raw: Raw = serde_json::from_slice(bytes).map_err(|e| ResponseError {
        reason: e.to_string(),
    })?;
    Ok(HookResponse {
        allowed: raw.allowed,
        error: raw.error,
        message: raw.message,
        source: raw.source.as_deref().and_then(Source::from_wire),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn connect_env() -> Vec<(OsString, OsString)> {
        env(&[
            ("REASON", "connect"),
            ("ID", "4242"),
            ("USERNAME", "alice"),
            ("GROUPNAME", "staff"),
            ("VHOST", "default"),
            ("DEVICE", "vpns0"),
            ("IP_REAL", "203.0.113.7"),
            ("IP_REAL_LOCAL", "198.51.100.1"),
            ("IP_LOCAL", "192.168.99.1"),
            ("IP_REMOTE", "192.168.99.23"),
            ("HOSTNAME", "inherited-host"),
            ("REMOTE_HOSTNAME", "alice-laptop"),
            ("USER_AGENT", "Open AnyConnect VPN Agent v9.01"),
            ("DEVICE_TYPE", "linux-64"),
            ("DEVICE_PLATFORM", "linux"),
            (
                "OCSERV_ROUTES",
                "10.0.0.0/255.0.0.0 fd00::/ffff:ffff:ffff:ffff:: ",
            ),
            ("OCSERV_DNS", "192.168.99.1 2001:db8::53 "),
            ("PATH", "/usr/bin"),
        ])
    }

    fn sample() -> HookRequest {
        request_from_env(connect_env()).unwrap()
    }

    #[test]
    fn env_maps_every_variable() {
        let r = sample();
        assert_eq!(r.reason, Reason::Connect);
        assert_eq!(r.session_id, 4242);
        assert_eq!(r.username, "alice");
        assert_eq!(r.groupname, "staff");
        assert_eq!(r.vhost.as_deref(), Some("default"));
        assert_eq!(r.device, "vpns0");
        assert_eq!(r.ip_real, Some("203.0.113.7".parse().unwrap()));
        assert_eq!(r.ip_real_local, Some("198.51.100.1".parse().unwrap()));
        assert_eq!(r.ip_local, Some("192.168.99.1".parse().unwrap()));
        assert_eq!(r.ip_remote, Some("192.168.99.23".parse().unwrap()));
        assert_eq!(r.hostname.as_deref(), Some("alice-laptop"));
        assert_eq!(
            r.user_agent.as_deref(),
            Some("Open AnyConnect VPN Agent v9.01")
        );
        assert_eq!(r.device_type.as_deref(), Some("linux-64"));
        assert_eq!(r.device_platform.as_deref(), Some("linux"));
        assert_eq!(
            r.routes,
            vec!["10.0.0.0/255.0.0.0", "fd00::/ffff:ffff:ffff:ffff::"]
        );
        assert_eq!(
            r.dns,
            vec![
                "192.168.99.1".parse::<IpAddr>().unwrap(),
                "2001:db8::53".parse().unwrap()
            ]
        );
        assert_eq!(r.stats_bytes_in, None);
    }

    #[test]
    fn env_disconnect_carries_stats_and_hostname_falls_back() {
        let r = request_from_env(env(&[
            ("REASON", "disconnect"),
            ("ID", "7"),
            ("USERNAME", "bob"),
            ("HOSTNAME", "bob-pc"),
            ("STATS_BYTES_IN", "123456"),
            ("STATS_BYTES_OUT", "18446744073709551615"),
            ("STATS_DURATION", "61"),
        ]))
        .unwrap();
        assert_eq!(r.reason, Reason::Disconnect);
        assert_eq!(r.hostname.as_deref(), Some("bob-pc"));
        assert_eq!(r.stats_bytes_in, Some(123_456));
        assert_eq!(r.stats_bytes_out, Some(u64::MAX));
        assert_eq!(r.stats_duration, Some(61));
        assert_eq!(r.groupname, "");
        assert_eq!(r.ip_real, None);
        assert_eq!(r.vhost, None);
        // An empty REMOTE_HOSTNAME is ocserv saying "none": no fallback to the inherited name.
        let r = request_from_env(env(&[
            ("REASON", "host-update"),
            ("ID", "7"),
            ("USERNAME", "bob"),
            ("HOSTNAME", "machine"),
            ("REMOTE_HOSTNAME", ""),
        ]))
        .unwrap();
        assert_eq!(r.reason, Reason::HostUpdate);
        assert_eq!(r.hostname, None);
    }

    #[test]
    fn env_refusals_name_the_variable() {
        let base = [("REASON", "connect"), ("ID", "5"), ("USERNAME", "u")];
        let with = |k: &str, v: &str| {
            let mut e: Vec<(&str, &str)> = base.iter().copied().filter(|(b, _)| *b != k).collect();
            e.push((k, v));
            request_from_env(env(&e)).unwrap_err()
        };
        for (k, v, var, cause) in [
            ("REASON", "", "REASON", "env_missing"),
            ("REASON", "login", "REASON", "env_invalid"),
            ("ID", "", "ID", "env_missing"),
            ("ID", "0", "ID", "env_invalid"),
            ("ID", "-3", "ID", "env_invalid"),
            ("ID", "2147483648", "ID", "env_invalid"),
            ("ID", "12a", "ID", "env_invalid"),
            ("USERNAME", "", "USERNAME", "env_missing"),
            ("IP_REAL", "1.2.3", "IP_REAL", "env_invalid"),
            ("IP_REMOTE", "x", "IP_REMOTE", "env_invalid"),
            (
                "OCSERV_DNS",
                "8.8.8.8 dns.example",
                "OCSERV_DNS",
                "env_invalid",
            ),
            (
                "OCSERV_ROUTES",
                "10.0.0.0/8 a\"b",
                "OCSERV_ROUTES",
                "env_invalid",
            ),
            ("STATS_DURATION", "1.5", "STATS_DURATION", "env_invalid"),
            (
                "STATS_BYTES_IN",
                "99999999999999999999",
                "STATS_BYTES_IN",
                "env_invalid",
            ),
        ] {
            let e = with(k, v);
            assert_eq!((e.var(), e.cause()), (var, cause), "{k}={v:?}: {e}");
            assert!(e.to_string().contains(var), "{e}");
        }
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        for var in ["USERNAME", "GROUPNAME", "VHOST", "DEVICE"] {
            let e = with(var, &long);
            assert_eq!(e.var(), var);
            assert!(e.to_string().contains("limit"), "{e}");
        }
    }

    #[test]
    fn env_cuts_long_texts_and_long_route_lists() {
        let mut e = connect_env();
        e.push(("USER_AGENT".into(), "é".repeat(MAX_TEXT_BYTES).into()));
        let many: String = (0..5000)
            .map(|i| format!("10.{}.{}.0/255.255.255.0 ", i / 256, i % 256))
            .collect();
        e.push(("OCSERV_ROUTES".into(), many.into()));
        let many_dns: String = (0..100).map(|i| format!("10.0.0.{i} ")).collect();
        e.push(("OCSERV_DNS".into(), many_dns.into()));
        let r = request_from_env(e).unwrap();
        let ua = r.user_agent.as_deref().unwrap();
        assert!(ua.len() <= MAX_TEXT_BYTES && ua.len() >= MAX_TEXT_BYTES - 1);
        assert!(ua.chars().all(|c| c == 'é'));
        assert!(!r.routes.is_empty() && r.routes.len() < 5000);
        assert!(r.routes.iter().map(|x| x.len() + 1).sum::<usize>() <= MAX_ROUTES_TOTAL_BYTES);
        assert_eq!(r.routes[0], "10.0.0.0/255.255.255.0");
        assert_eq!(r.dns.len(), MAX_DNS);
        let frame = r.to_frame().unwrap();
        assert_eq!(parse_request(&frame[HEADER_LEN..]).unwrap(), r);
    }

    #[test]
    fn env_non_utf8_is_lossy() {
        use std::os::unix::ffi::OsStringExt;
        let mut e = connect_env();
        e.push((
            "USER_AGENT".into(),
            OsString::from_vec(b"ua\xff\xfe".to_vec()),
        ));
        e.push((OsString::from_vec(b"\xffKEY".to_vec()), "ignored".into()));
        let r = request_from_env(e).unwrap();
        assert_eq!(r.user_agent.as_deref(), Some("ua\u{fffd}\u{fffd}"));
    }

    #[test]
    fn round_trip_through_frame() {
        let mut r = sample();
        r.stats_bytes_in = Some(1);
        r.stats_bytes_out = Some(2);
        r.stats_duration = Some(3);
        let frame = r.to_frame().unwrap();
        let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - HEADER_LEN);
        let mut cursor = Cursor::new(frame);
        let payload = read_frame(&mut cursor).unwrap();
        assert_eq!(parse_request(&payload).unwrap(), r);
        let json: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(json["session_id"], Value::from(4242));
        assert_eq!(json["reason"], Value::from("connect"));
    }

    #[test]
    fn session_id_as_number_or_numeric_string() {
        for raw in [
            r#"{"reason":"connect","username":"u","session_id":17}"#,
            r#"{"reason":"connect","username":"u","session_id":"17","extra":{"x":[1]}}"#,
        ] {
            let r = parse_request(raw.as_bytes()).unwrap();
            assert_eq!(r.session_id, 17);
            assert_eq!(r.groupname, "");
            assert_eq!(r.ip_remote, None);
        }
    }

    #[test]
    fn old_client_spellings_are_accepted() {
        let r = parse_request(
            br#"{"reason":"disconnect","username":"u","session_id":"9","groupname":null,
                "routes":"10.0.0.0/255.0.0.0 ","dns":"1.1.1.1 ","stats_bytes_in":"10",
                "ip_real":"","vhost":""}"#,
        )
        .unwrap();
        assert_eq!(r.routes, vec!["10.0.0.0/255.0.0.0"]);
        assert_eq!(r.dns, vec!["1.1.1.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.stats_bytes_in, Some(10));
        assert_eq!(r.vhost, None);
    }

    #[test]
    fn unsafe_usernames_are_left_to_the_listener() {
        let r =
            parse_request(br#"{"reason":"connect","username":"../etc","session_id":1}"#).unwrap();
        assert_eq!(r.username, "../etc");
    }

    #[test]
    fn every_request_refusal_has_its_cause_and_field() {
        let ok =
            |extra: &str| format!(r#"{{"reason":"connect","username":"u","session_id":1{extra}}}"#);
        let cases: Vec<(Vec<u8>, &str, Option<&str>)> = vec![
            (vec![b'{'; MAX_FRAME + 1], "frame_too_large", None),
            (b"{\"reason\":\"\xff\"}".to_vec(), "not_utf8", None),
            (b"{\"reason\":".to_vec(), "invalid_json", None),
            (b"".to_vec(), "invalid_json", None),
            (b"[1,2]".to_vec(), "not_an_object", None),
            (
                br#"{"username":"u","session_id":1}"#.to_vec(),
                "missing_field",
                Some("reason"),
            ),
            (
                br#"{"reason":"connect","session_id":1}"#.to_vec(),
                "missing_field",
                Some("username"),
            ),
            (
                br#"{"reason":"connect","username":"u"}"#.to_vec(),
                "missing_field",
                Some("session_id"),
            ),
            (
                br#"{"reason":"login","username":"u","session_id":1}"#.to_vec(),
                "unknown_reason",
                Some("reason"),
            ),
            (
                br#"{"reason":7,"username":"u","session_id":1}"#.to_vec(),
                "invalid_field",
                Some("reason"),
            ),
            (
                br#"{"reason":"connect","username":"","session_id":1}"#.to_vec(),
                "empty_username",
                Some("username"),
            ),
            (
                br#"{"reason":"connect","username":5,"session_id":1}"#.to_vec(),
                "invalid_field",
                Some("username"),
            ),
            (
                br#"{"reason":"connect","username":"u","session_id":0}"#.to_vec(),
                "invalid_field",
                Some("session_id"),
            ),
            (
                br#"{"reason":"connect","username":"u","session_id":-1}"#.to_vec(),
                "invalid_field",
                Some("session_id"),
            ),
            (
                br#"{"reason":"connect","username":"u","session_id":1.5}"#.to_vec(),
                "invalid_field",
                Some("session_id"),
            ),
            (
                br#"{"reason":"connect","username":"u","session_id":"1x"}"#.to_vec(),
                "invalid_field",
                Some("session_id"),
            ),
            (
                br#"{"reason":"connect","username":"u","session_id":2147483648}"#.to_vec(),
                "invalid_field",
                Some("session_id"),
            ),
            (
                br#"{"reason":"connect","username":"u","session_id":true}"#.to_vec(),
                "invalid_field",
                Some("session_id"),
            ),
            (
                ok(r#","ip_real":"1.2.3.4.5""#).into_bytes(),
                "invalid_field",
                Some("ip_real"),
            ),
            (
                ok(r#","ip_remote":"nope""#).into_bytes(),
                "invalid_field",
                Some("ip_remote"),
            ),
            (
                ok(r#","ip_local":4"#).into_bytes(),
                "invalid_field",
                Some("ip_local"),
            ),
            (
                ok(r#","ip_real_local":"::g""#).into_bytes(),
                "invalid_field",
                Some("ip_real_local"),
            ),
            (
                ok(r#","dns":["1.1.1.1","x"]"#).into_bytes(),
                "invalid_field",
                Some("dns"),
            ),
            (
                ok(r#","dns":[1]"#).into_bytes(),
                "invalid_field",
                Some("dns"),
            ),
            (
                ok(r#","routes":["a b"]"#).into_bytes(),
                "invalid_field",
                Some("routes"),
            ),
            (
                ok(r#","routes":{}"#).into_bytes(),
                "invalid_field",
                Some("routes"),
            ),
            (
                ok(r#","stats_bytes_in":-5"#).into_bytes(),
                "invalid_field",
                Some("stats_bytes_in"),
            ),
            (
                ok(r#","stats_bytes_out":"lots""#).into_bytes(),
                "invalid_field",
                Some("stats_bytes_out"),
            ),
            (
                ok(r#","stats_duration":[]"#).into_bytes(),
                "invalid_field",
                Some("stats_duration"),
            ),
            (
                ok(&format!(
                    r#","groupname":"{}""#,
                    "g".repeat(MAX_NAME_BYTES + 1)
                ))
                .into_bytes(),
                "invalid_field",
                Some("groupname"),
            ),
            (
                ok(&format!(
                    r#","user_agent":"{}""#,
                    "a".repeat(MAX_TEXT_BYTES + 1)
                ))
                .into_bytes(),
                "invalid_field",
                Some("user_agent"),
            ),
            (
                ok(r#","hostname":false"#).into_bytes(),
                "invalid_field",
                Some("hostname"),
            ),
        ];
        for (bytes, cause, field) in cases {
            let e = parse_request(&bytes).unwrap_err();
            let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
            assert_eq!(e.cause(), cause, "{shown}: {e}");
            assert_eq!(e.field(), field, "{shown}: {e}");
            if let Some(field) = field {
                assert!(e.to_string().contains(field), "{e}");
            }
        }
        // Too many routes, too many route bytes, too many DNS servers.
        let routes: Vec<String> = (0..MAX_ROUTES + 1).map(|_| "r".to_owned()).collect();
        let e = parse_request(
            ok(&format!(
                r#","routes":{}"#,
                serde_json::to_string(&routes).unwrap()
            ))
            .as_bytes(),
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("routes"));
        let routes: Vec<String> = (0..200).map(|_| "r".repeat(MAX_ROUTE_BYTES)).collect();
        let e = parse_request(
            ok(&format!(
                r#","routes":{}"#,
                serde_json::to_string(&routes).unwrap()
            ))
            .as_bytes(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("bytes of routes"), "{e}");
        let dns: Vec<String> = (0..MAX_DNS + 1).map(|i| format!("10.0.0.{i}")).collect();
        let e = parse_request(
            ok(&format!(
                r#","dns":{}"#,
                serde_json::to_string(&dns).unwrap()
            ))
            .as_bytes(),
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("dns"));
    }

    #[test]
    fn frame_refusals() {
        assert_eq!(frame_len([0, 0, 0, 0]).unwrap_err().cause(), "frame_empty");
        assert_eq!(frame_len([0, 1, 0, 0]).unwrap(), MAX_FRAME);
        assert_eq!(
            frame_len([0, 1, 0, 1]).unwrap_err().cause(),
            "frame_too_large"
        );
        assert_eq!(frame_len([0xff; 4]).unwrap_err().cause(), "frame_too_large");
        assert_eq!(frame_len([0, 0, 0, 1]).unwrap(), 1);
        assert_eq!(encode_frame(b"").unwrap_err().cause(), "frame_empty");
        assert_eq!(
            encode_frame(&vec![b'x'; MAX_FRAME + 1])
                .unwrap_err()
                .cause(),
            "frame_too_large"
        );
        assert_eq!(
            encode_frame(&vec![b'x'; MAX_FRAME]).unwrap().len(),
            MAX_FRAME + 4
        );

        let truncated = |bytes: &[u8]| read_frame(&mut Cursor::new(bytes.to_vec())).unwrap_err();
        for (bytes, expected, got) in [
            (&b""[..], 4, 0),
            (&b"\0\0"[..], 4, 2),
            (&b"\0\0\0\x05abc"[..], 5, 3),
        ] {
            match truncated(bytes) {
                FrameError::Truncated {
                    expected: e,
                    got: g,
                } => assert_eq!((e, g), (expected, got)),
                other => panic!("{bytes:?}: {other}"),
            }
        }
        assert_eq!(truncated(b"\0\0\0\0").cause(), "frame_empty");
        assert_eq!(truncated(b"\x01\0\0\0").cause(), "frame_too_large");

        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::new(ErrorKind::TimedOut, "slow"))
            }
        }
        assert_eq!(read_frame(&mut Broken).unwrap_err().cause(), "frame_io");

        let mut out = Vec::new();
        write_frame(&mut out, b"{}").unwrap();
        assert_eq!(out, b"\0\0\0\x02{}");
        assert_eq!(
            write_frame(&mut out, b"").unwrap_err().cause(),
            "frame_empty"
        );
    }

    #[test]
    fn responses_round_trip_and_tolerate_new_sources() {
        for r in [
            HookResponse::allow(Source::Fresh),
            HookResponse::allow(Source::Stale).with_message("portal down"),
            HookResponse::deny(Source::Cached, "revoked"),
            HookResponse::deny(Source::FailClosed, "portal unreachable").with_message("try later"),
            HookResponse::invalid("hook request field `username` must not be empty"),
        ] {
            let frame = r.to_frame().unwrap();
            assert_eq!(parse_response(&frame[4..]).unwrap(), r);
        }
        let r = HookResponse::allow(Source::FailOpen);
        assert_eq!(
            String::from_utf8(r.to_json()).unwrap(),
            r#"{"allowed":true,"source":"fail_open"}"#
        );
        let r = parse_response(br#"{"allowed":true,"source":"quantum","x":1}"#).unwrap();
        assert_eq!((r.allowed, r.source), (true, None));
        assert_eq!(HookResponse::invalid("x").source, Some(Source::LocalPolicy));
        for bad in [
            &b"{}"[..],
            b"{\"allowed\":\"yes\"}",
            b"[]",
            b"\xff",
            b"{\"allowed\":true,\"error\":1}",
        ] {
            assert_eq!(parse_response(bad).unwrap_err().cause(), "invalid_response");
        }
        for s in [
            Source::Fresh,
            Source::Cached,
            Source::Stale,
            Source::FailOpen,
            Source::FailClosed,
            Source::LocalPolicy,
        ] {
            assert_eq!(Source::from_wire(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), Value::from(s.as_str()));
        }
        for r in [Reason::Connect, Reason::Disconnect, Reason::HostUpdate] {
            assert_eq!(Reason::from_wire(r.as_str()), Some(r));
            assert_eq!(serde_json::to_value(r).unwrap(), Value::from(r.as_str()));
        }
    }

    /// Any byte string (and any OS string as a key or value).
    fn os_string() -> impl Strategy<Value = OsString> {
        use std::os::unix::ffi::OsStringExt;
        prop_oneof![
            4 => "\\PC{0,40}".prop_map(OsString::from),
            2 => proptest::collection::vec(any::<u8>(), 0..60).prop_map(OsString::from_vec),
            1 => (any::<u8>(), 0usize..200_000).prop_map(|(b, n)| OsString::from_vec(vec![b; n])),
            1 => Just(OsString::from("connect")),
            1 => (1u32..100_000).prop_map(|n| OsString::from(n.to_string())),
            1 => "([0-9]{1,3}\\.){3}[0-9]{1,3}".prop_map(OsString::from),
            1 => "(([0-9]{1,3}\\.){3}[0-9]{1,3} ){0,40}".prop_map(OsString::from),
            1 => "([!-~]{1,20} ){0,40}".prop_map(OsString::from),
        ]
    }

    fn env_key() -> impl Strategy<Value = OsString> {
        prop_oneof![
            8 => proptest::sample::select(vec![
                "REASON", "ID", "USERNAME", "GROUPNAME", "VHOST", "DEVICE", "IP_REAL",
                "IP_REAL_LOCAL", "IP_LOCAL", "IP_REMOTE", "HOSTNAME", "REMOTE_HOSTNAME",
                "USER_AGENT", "DEVICE_TYPE", "DEVICE_PLATFORM", "OCSERV_ROUTES", "OCSERV_DNS",
                "STATS_BYTES_IN", "STATS_BYTES_OUT", "STATS_DURATION",
            ]).prop_map(OsString::from),
            1 => os_string(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever the environment, building a request never panics, and a request that can be
        /// built fits in one frame and parses back to itself.
        #[test]
        fn any_env_gives_a_frame_that_parses_back(
            base in proptest::bool::ANY,
            extra in proptest::collection::vec((env_key(), os_string()), 0..12),
        ) {
            let mut vars = if base { connect_env() } else { Vec::new() };
            vars.extend(extra);
            if let Ok(req) = request_from_env(vars) {
                let frame = req.to_frame().unwrap();
                prop_assert!(frame.len() - HEADER_LEN <= MAX_FRAME);
                let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
                prop_assert_eq!(len, frame.len() - HEADER_LEN);
                prop_assert_eq!(parse_request(&frame[HEADER_LEN..]).unwrap(), req);
            }
        }

        /// The worst case for size: every text at its bound, made of bytes JSON escapes the
        /// most, and the longest route list.
        #[test]
        fn worst_case_env_still_fits(c in 0u8..0x20, routes in 1usize..40) {
            let name = String::from(c as char).repeat(MAX_NAME_BYTES);
            let text = String::from(c as char).repeat(MAX_TEXT_BYTES * 3);
            let route = "1".repeat(routes);
            let route_list = format!("{route} ").repeat(MAX_ROUTES_TOTAL_BYTES);
            let dns = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 ".repeat(100);
            let mut e = connect_env();
            for var in ["USERNAME", "GROUPNAME", "VHOST", "DEVICE"] {
                e.push((var.into(), name.clone().into()));
            }
            for var in ["USER_AGENT", "REMOTE_HOSTNAME", "DEVICE_TYPE", "DEVICE_PLATFORM"] {
                e.push((var.into(), text.clone().into()));
            }
            e.push(("OCSERV_ROUTES".into(), route_list.into()));
            e.push(("OCSERV_DNS".into(), dns.into()));
            for var in ["STATS_BYTES_IN", "STATS_BYTES_OUT", "STATS_DURATION"] {
                e.push((var.into(), u64::MAX.to_string().into()));
            }
            let req = request_from_env(e).unwrap();
            let frame = req.to_frame().unwrap();
            prop_assert!(frame.len() <= MAX_FRAME + HEADER_LEN);
            prop_assert_eq!(parse_request(&frame[HEADER_LEN..]).unwrap(), req);
        }

        /// Arbitrary bytes never panic the frame and request parsers, and every refusal has a
        /// cause from the fixed set.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if bytes.len() >= 4 {
                let _ = frame_len(bytes[..4].try_into().unwrap());
            }
            if let Err(e) = parse_request(&bytes) {
                prop_assert!(["not_utf8", "invalid_json", "not_an_object", "missing_field",
                    "unknown_reason", "empty_username", "invalid_field"].contains(&e.cause()));
            }
            let _ = parse_response(&bytes);
            let _ = read_frame(&mut Cursor::new(bytes));
        }
    }
}
