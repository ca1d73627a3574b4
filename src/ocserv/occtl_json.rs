//! A tolerant parser for `occtl --json` output (ocserv 1.1.6) and its typed extraction.
//!
//! Role: occtl 1.1.6 prints JSON that is often invalid (reference/ocserv.md §2, quirks 1-10), so
//! `serde_json` cannot be used. This module has its own small recursive-descent parser into an
//! ordered [`Value`] that keeps duplicate keys in order, and functions that turn a parsed reply
//! into the shared types of [`crate::ocserv`].
//!
//! Inputs: the raw bytes occtl wrote to stdout. Outputs: [`Value`]s ([`parse_documents`]) and typed
//! lists ([`sessions`], [`status`], [`bans`], [`cookies`], [`iroutes`], [`events`]).
//!
//! Tolerated: trailing commas in objects and arrays (quirks 1, 2, 4), missing commas between
//! members or elements (quirk 3: `show iroutes` runs users together), duplicate keys (quirks 3, 5,
//! 6), several documents in a row with text lines between them (quirk 10), invalid escapes,
//! raw control characters and invalid UTF-8 inside strings (kept lossily).
//!
//! Failure behaviour: never panics. Hard limits ([`MAX_INPUT`], [`MAX_DEPTH`]) bound work and
//! stack. A reply that cannot be parsed at all is a [`CtlError::Protocol`] naming the command and
//! the byte offset. A session list ([`sessions`]) with an entry that cannot be used (no numeric
//! `ID`, no usable session id, not an object) is a `Protocol` error for the whole list, naming
//! the entry and the reason, as on the native path: a silently shorter list would make the
//! reconcile loop report a disconnect that never happened. Elsewhere (bans, cookies, iroutes,
//! the `show events` stream) such an entry is skipped and its reason collected in [`Skipped`],
//! so one odd entry never hides the others.
//!
//! Identity: a session's key is its `ID` plus its session id (`Full session`); every entry must
//! carry a valid one (checked with [`crate::validate::safe_id`]), unless occtl printed the exact
//! connect time (`raw_connected_at`, occtl >= 1.2.3) or the session is still pre-auth. The
//! `connected_at` derived from local time and a learned UTC offset ([`local_to_unix`]) is for
//! display only: it moves when the offset is unknown or shifts (DST) and never identifies a
//! session.
//!
//! Known limits of occtl 1.1.6 output that no parser can undo:
//! - bytes >= 0x80 in names become `\u00ff` (quirk 7): such names are kept as printed and flagged
//!   (`name_mangled`); only the native backend has the real UTF-8 name.
//! - times are local time without zone at minute precision (`"2026-11-26 21:06"`) plus an elapsed
//!   time (`"  3m:07s"`); 1.1.6 has no `raw_connected_at`. See [`local_to_unix`] for how
//!   `connected_at` is derived, and when it stays 0.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Ban, ByteCounters, Cookie, CtlError, CtlResult, ServerStatus, Session, SessionState};

/// Largest reply accepted, in bytes (10 000 sessions of `show users` are about 15 MB).
pub const MAX_INPUT: usize = 32 * 1024 * 1024;
/// Deepest nesting accepted (occtl nests at most 3 levels).
pub const MAX_DEPTH: usize = 32;

/// One JSON value. Objects keep every member in input order, duplicates included.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// An integer that fits in i64.
    Int(i64),
    /// Any other number.
    Float(f64),
    String(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

impl Value {
    /// The first member named `key` (objects only).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Every member named `key`, in input order (objects only).
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        let members: &[(String, Value)] = match self {
            Value::Object(m) => m,
            _ => &[],
        };
        members
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A non-negative integer, also from occtl's string-typed numbers (`"1434"`).
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) => u64::try_from(*i).ok(),
            Value::String(s) => {
                let t = s.trim();
                if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                    t.parse().ok()
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// A boolean, also from occtl's `"True"`/`"False"` and `0`/`1`.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::Int(0) => Some(false),
            Value::Int(1) => Some(true),
            Value::String(s) => match s.trim() {
                "True" | "true" | "yes" | "1" => Some(true),
                "False" | "false" | "no" | "0" => Some(false),
                _ => None,
            },
            _ => None,
        }
    }

    /// The string elements of an array (other elements are ignored).
    pub fn string_items(&self) -> Vec<String> {
        match self {
            Value::Array(items) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Why the input could not be parsed, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at byte {offset}: {reason}")]
pub struct ParseError {
    pub offset: usize,
    pub reason: String,
}

/// Everything found in one occtl output: JSON documents in order, and the non-JSON text lines
/// between them (e.g. `show events`' "Press 'q' or CTRL+C to quit").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Documents {
    pub values: Vec<Value>,
    pub text: Vec<String>,
}

/// Parses a sequence of JSON documents; lines that do not start a document are collected as text.
pub fn parse_documents(input: &[u8]) -> Result<Documents, ParseError> {
    scan(input, false)
}

/// The document loop. With `truncated_tail_ok`, a document that fails to parse after at least one
/// complete one ends the scan instead of failing it (a stream that was stopped mid-document).
fn scan(input: &[u8], truncated_tail_ok: bool) -> Result<Documents, ParseError> {
    if input.len() > MAX_INPUT {
        return Err(ParseError {
            offset: MAX_INPUT,
            reason: format!("input is {} bytes, the limit is {MAX_INPUT}", input.len()),
        });
    }
    let mut p = Parser { s: input, i: 0 };
    let mut docs = Documents::default();
    loop {
        p.skip_ws();
        match p.peek() {
            None => return Ok(docs),
            Some(b'[' | b'{') => match p.value(0) {
                Ok(v) => docs.values.push(v),
                Err(_) if truncated_tail_ok && !docs.values.is_empty() => return Ok(docs),
                Err(e) => return Err(e),
            },
            Some(_) => {
                // Not a document: a text line (occtl mixes them in `show events`).
                let start = p.i;
                while p.peek().is_some_and(|c| c != b'\n') {
                    p.i += 1;
                }
                let line = String::from_utf8_lossy(&input[start..p.i])
                    .trim()
                    .to_owned();
                docs.text.push(line);
            }
        }
    }
}

/// Parses exactly one document (surrounding text lines are ignored); errors when there is none.
pub fn parse_one(input: &[u8]) -> Result<Value, ParseError> {
    let docs = parse_documents(input)?;
    docs.values.into_iter().next().ok_or_else(|| ParseError {
        offset: input.len(),
        reason: "no JSON document in the output".into(),
    })
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn err<T>(&self, reason: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            offset: self.i,
            reason: reason.into(),
        })
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, ParseError> {
        if depth >= MAX_DEPTH {
            return self.err(format!("nesting deeper than {MAX_DEPTH}"));
        }
        self.skip_ws();
        match self.peek() {
            None => self.err("unexpected end of input, expected a value"),
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(Value::String),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            Some(c) => self.err(format!("unexpected byte {:?}, expected a value", c as char)),
        }
    }

    fn literal(&mut self, word: &str, v: Value) -> Result<Value, ParseError> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            self.err(format!("invalid literal, expected {word}"))
        }
    }

    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.i;
        while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        let text = String::from_utf8_lossy(&self.s[start..self.i]);
        if let Ok(i) = text.parse::<i64>() {
            return Ok(Value::Int(i));
        }
        match text.parse::<f64>() {
            Ok(f) => Ok(Value::Float(f)),
            Err(_) => Err(ParseError {
                offset: start,
                reason: format!("invalid number {text:?}"),
            }),
        }
    }

    /// A string; the opening quote is at `self.i`. Invalid escapes are kept as written, raw
    /// control bytes are kept, invalid UTF-8 becomes U+FFFD.
    fn string(&mut self) -> Result<String, ParseError> {
        let start = self.i;
        self.i += 1;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(ParseError {
                    offset: start,
                    reason: "unterminated string".into(),
                });
            };
            self.i += 1;
            match c {
                b'"' => return Ok(String::from_utf8_lossy(&out).into_owned()),
                b'\\' => {
                    let Some(e) = self.peek() else { continue };
                    self.i += 1;
                    match e {
                        b'"' => out.push(b'"'),
                        b'\\' => out.push(b'\\'),
                        b'/' => out.push(b'/'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => self.unicode_escape(&mut out),
                        other => out.extend_from_slice(&[b'\\', other]),
                    }
                }
                _ => out.push(c),
            }
        }
    }

    /// After `\u`: four hex digits, with surrogate pairs; anything else is kept literally.
    fn unicode_escape(&mut self, out: &mut Vec<u8>) {
        let hex4 = |p: &Self, at: usize| -> Option<u32> {
            let h = p.s.get(at..at + 4)?;
            let t = std::str::from_utf8(h).ok()?;
            if t.bytes().all(|b| b.is_ascii_hexdigit()) {
                u32::from_str_radix(t, 16).ok()
            } else {
                None
            }
        };
        let Some(hi) = hex4(self, self.i) else {
            out.extend_from_slice(b"\\u");
            return;
        };
        self.i += 4;
        let mut code = hi;
        if (0xD800..0xDC00).contains(&hi) && self.s.get(self.i..self.i + 2) == Some(b"\\u") {
            if let Some(lo) = hex4(self, self.i + 2).filter(|lo| (0xDC00..0xE000).contains(lo)) {
                self.i += 6;
                code = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
            }
        }
        let ch = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
        let mut buf = [0u8; 4];
        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
    }

    fn array(&mut self, depth: usize) -> Result<Value, ParseError> {
        self.i += 1;
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                None => return self.err("unterminated array"),
                Some(b']') => {
                    self.i += 1;
                    return Ok(Value::Array(items));
                }
                // Leading, doubled or trailing commas (quirks 2 and 4) are skipped.
                Some(b',') => self.i += 1,
                Some(_) => items.push(self.value(depth + 1)?),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, ParseError> {
        self.i += 1;
        let mut members = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                None => return self.err("unterminated object"),
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Value::Object(members));
                }
                // Trailing commas (quirk 1); a missing comma (quirk 3) needs no special case.
                Some(b',') => self.i += 1,
                Some(b'"') => {
                    let key = self.string()?;
                    self.skip_ws();
                    if self.peek() != Some(b':') {
                        return self.err(format!("expected ':' after key {key:?}"));
                    }
                    self.i += 1;
                    let v = self.value(depth + 1)?;
                    members.push((key, v));
                }
                Some(c) => {
                    return self.err(format!(
                        "unexpected byte {:?} in object, expected a key",
                        c as char
                    ))
                }
            }
        }
    }
}

/// An entry of a reply that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Position of the entry in the reply (0-based).
    pub index: usize,
    pub reason: String,
}

/// Typed entries of one reply plus the entries that were skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted<T> {
    pub items: Vec<T>,
    pub skipped: Vec<Skipped>,
}

impl<T> Default for Extracted<T> {
    fn default() -> Self {
        Extracted {
            items: Vec::new(),
            skipped: Vec::new(),
        }
    }
}

/// A session from `show users` / `show user` / `show id` / `show events`, with what only occtl
/// tells (or hides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcctlSession {
    pub session: Session,
    /// The username contained bytes >= 0x80, which occtl 1.1.6 printed as `\u00ff` (quirk 7):
    /// `session.username` is not the real name. Use the native backend for UTF-8 names.
    pub name_mangled: bool,
    /// As `name_mangled`, for the group name.
    pub group_mangled: bool,
    /// The user has no routes (`"Routes": []` then `"Routes": "defaultroute"`, quirk 6):
    /// everything goes through the tunnel. `session.routes` is then empty.
    pub default_route: bool,
    /// Seconds since the session connected, from `_Connected at` (precision: seconds below an
    /// hour, minutes below 2 days, days above).
    pub elapsed_secs: Option<u64>,
    /// `Connected at` as printed (local time, no zone).
    pub connected_at_local: String,
    /// `session.connected_at` is occtl's exact `raw_connected_at` (occtl >= 1.2.3). When false it
    /// was derived from the local time at minute precision (rounded down), or is 0 (unknown).
    pub connected_at_exact: bool,
    /// The `iRoutes` list.
    pub iroutes: Vec<String>,
    /// The rate limits as printed (`"250.0 KB/sec"`), when set.
    pub limit_rx: Option<String>,
    pub limit_tx: Option<String>,
}

/// The sessions of one reply, the skipped entries, and the local UTC offset (seconds east of
/// UTC) used to turn `Connected at` into unix seconds, if one was known.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionList {
    pub sessions: Vec<OcctlSession>,
    pub skipped: Vec<Skipped>,
    pub utc_offset: Option<i64>,
}

fn protocol(command: &'static str, reason: impl std::fmt::Display) -> CtlError {
    CtlError::Protocol {
        command,
        reason: reason.to_string(),
    }
}

fn parse_reply(input: &[u8], command: &'static str) -> CtlResult<Value> {
    parse_one(input).map_err(|e| protocol(command, format!("unparsable occtl output {e}")))
}

/// The entries of a list reply: an array, a single object, or several documents.
fn entries(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        other => vec![other],
    }
}

/// A string member, `""` when absent or not a string.
fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn mangled(s: &str) -> bool {
    s.contains('\u{ff}')
}

fn id_of(v: &Value) -> Result<u32, String> {
    match v.get("ID") {
        None => Err("no \"ID\"".into()),
        Some(id) => id
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("\"ID\" is not a positive 32-bit number: {id:?}")),
    }
}

/// The last member named `key` whose value is an integer (string or number): for `TX` this
/// skips the `"TX": "400.0 KB/sec"` of a rate limit (quirk 5) and takes the raw counter.
fn last_counter(v: &Value, key: &str) -> Option<u64> {
    v.get_all(key).filter_map(Value::as_u64).last()
}

/// Parses occtl's elapsed-time format (`"   12s"`, `" 3m:07s"`, `" 2h:05m"`, `" 3days"`).
pub fn parse_elapsed(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    for part in s.split(':') {
        let part = part.trim();
        let digits = part.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = part.get(..digits)?.parse().ok()?;
        let unit = match part.get(digits..)?.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" | "day" | "days" => 86_400,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    Some(total)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Reads occtl's local time `"YYYY-MM-DD HH:MM"` (optionally `:SS`) as if it were UTC.
pub fn parse_local_time(s: &str) -> Option<i64> {
    let (date, time) = s.trim().split_once(' ')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.trim().split(':').map(|p| p.parse::<i64>().ok());
    let (h, mi) = (t.next()??, t.next()??);
    let sec = t.next().flatten().unwrap_or(0);
    if d.next().is_some()
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&da)
        || !(0..24).contains(&h)
        || !(0..60).contains(&mi)
        || !(0..61).contains(&sec)
        || !(1970..=9999).contains(&y)
    {
        return None;
    }
    Some(days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + sec)
}

/// Turns a local time (already read as if UTC by [`parse_local_time`]) into unix seconds with
/// the local `utc_offset` (seconds east of UTC); `None` when the offset is unknown or the result
/// is before 1970.
///
/// Why this way: occtl 1.1.6 prints only local time without zone, and the agent (which has no
/// time-zone database) learns the offset from the sessions themselves: for a session younger than
/// 2 days, `local - (now - elapsed)` is the offset to within about a minute, and real offsets are
/// multiples of 15 minutes ([`estimate_utc_offset`]). The result is stable across calls (it
/// depends only on the printed minute and the offset), which the registry needs; its precision
/// is one minute.
pub fn local_to_unix(local_as_utc: i64, utc_offset: Option<i64>) -> Option<u64> {
    u64::try_from(local_as_utc.checked_sub(utc_offset?)?).ok()
}

/// Estimates the local UTC offset from one session: rounds `local - (now - elapsed)` to 15
/// minutes. Only trusted when the elapsed time has minute precision (under 2 days).
pub fn estimate_utc_offset(local_as_utc: i64, elapsed: u64, now: u64) -> Option<i64> {
    if elapsed >= 2 * 86_400 {
        return None;
    }
    let started = i64::try_from(now)
        .ok()?
        .checked_sub(i64::try_from(elapsed).ok()?)?;
    let diff = local_as_utc.checked_sub(started)?;
    let rounded = (diff as f64 / 900.0).round() as i64 * 900;
    // Real offsets lie within -12 h..+14 h.
    (-12 * 3600..=14 * 3600)
        .contains(&rounded)
        .then_some(rounded)
}

fn ip4(v: &Value, key: &str) -> Option<Ipv4Addr> {
    v.get(key)?.as_str()?.trim().parse().ok()
}

fn ip6(v: &Value, key: &str) -> Option<Ipv6Addr> {
    v.get(key)?.as_str()?.trim().parse().ok()
}

fn ip_any(v: &Value, key: &str) -> Option<IpAddr> {
    v.get(key)?.as_str()?.trim().parse().ok()
}

/// One `show users` entry; `Err` with the reason when it has no usable ID.
fn session_entry(v: &Value) -> Result<OcctlSession, String> {
    if !matches!(v, Value::Object(_)) {
        return Err("not an object".into());
    }
    let id = id_of(v)?;
    let username = text(v, "Username");
    let mut groupname = text(v, "Groupname");
    if groupname == "(none)" {
        groupname.clear();
    }
    // Routes: the array when it has entries, else "defaultroute" means "no routes" (quirk 6).
    let mut routes = Vec::new();
    let mut default_route = false;
    for r in v.get_all("Routes") {
        match r {
            Value::Array(_) if routes.is_empty() => routes = r.string_items(),
            Value::String(s) if s == "defaultroute" => default_route = true,
            _ => {}
        }
    }
    if !routes.is_empty() {
        default_route = false;
    }
    let rx = last_counter(v, "RX");
    let tx = last_counter(v, "TX");
    let counters = (rx.is_some() || tx.is_some()).then(|| ByteCounters {
        bytes_in: rx.unwrap_or(0),
        bytes_out: tx.unwrap_or(0),
    });
    // `"Limit RX"` then `"TX"` (both set), or `"Limit TX"` alone: a TX that is not a number.
    let limit_rx = v.get("Limit RX").and_then(Value::as_str).map(str::to_owned);
    let limit_tx = v
        .get("Limit TX")
        .or_else(|| v.get_all("TX").find(|t| t.as_u64().is_none()))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let raw_connected_at = v.get("raw_connected_at").and_then(Value::as_u64);
    let connected_at = raw_connected_at.unwrap_or(0);
    let connected_at_local = {
        let a = text(v, "Connected at");
        if a.is_empty() {
            text(v, "Last connected at")
        } else {
            a
        }
    };
    let state = SessionState::from_occtl(&text(v, "State"));
    let safe_id = Some(text(v, "Full session")).filter(|s| !s.is_empty());
    match &safe_id {
        Some(sid) => crate::validate::safe_id(sid)
            .map_err(|e| format!("ID {id}: invalid \"Full session\" {sid:?}: {}", e.reason))?,
        None if raw_connected_at.is_none() && state != SessionState::PreAuth => {
            return Err(format!(
                "ID {id}: no \"Full session\" (and no \"raw_connected_at\"): the session \
                 cannot be identified"
            ))
        }
        None => {}
    }
    let session = Session {
        id,
        safe_id,
        username: username.clone(),
        groupname: groupname.clone(),
        state,
        client_ip: ip_any(v, "Remote IP"),
        vpn_ipv4: ip4(v, "IPv4"),
        vpn_ipv6: ip6(v, "IPv6"),
        server_ptp_ipv4: ip4(v, "P-t-P IPv4"),
        device: text(v, "Device"),
        connected_at,
        hostname: text(v, "Hostname"),
        user_agent: text(v, "User-Agent"),
        vhost: text(v, "vhost"),
        tls_ciphersuite: text(v, "TLS ciphersuite"),
        dtls_ciphersuite: text(v, "DTLS cipher"),
        mtu: v
            .get("MTU")
            .and_then(Value::as_u64)
            .and_then(|m| u32::try_from(m).ok()),
        dns: v.get("DNS").map(Value::string_items).unwrap_or_default(),
        routes,
        counters,
    };
    Ok(OcctlSession {
        session,
        name_mangled: mangled(&username),
        group_mangled: mangled(&groupname),
        default_route,
        elapsed_secs: v
            .get("_Connected at")
            .and_then(Value::as_str)
            .and_then(parse_elapsed),
        connected_at_local,
        connected_at_exact: raw_connected_at.is_some(),
        iroutes: v
            .get("iRoutes")
            .map(Value::string_items)
            .unwrap_or_default(),
        limit_rx,
        limit_tx,
    })
}

/// Fills `connected_at` where occtl gave no `raw_connected_at`, learning the UTC offset from the
/// freshest session when possible, else using `utc_offset_hint`.
fn fill_connected_at(list: &mut SessionList, now: u64, utc_offset_hint: Option<i64>) {
    let freshest = list
        .sessions
        .iter()
        .filter_map(|s| {
            let local = parse_local_time(&s.connected_at_local)?;
            let elapsed = s.elapsed_secs?;
            Some((elapsed, estimate_utc_offset(local, elapsed, now)?))
        })
        .min_by_key(|(elapsed, _)| *elapsed);
    let offset = freshest.map(|(_, o)| o).or(utc_offset_hint);
    list.utc_offset = offset;
    for s in &mut list.sessions {
        if s.session.connected_at == 0 {
            s.session.connected_at = parse_local_time(&s.connected_at_local)
                .and_then(|l| local_to_unix(l, offset))
                .unwrap_or(0);
        }
    }
}

fn collect_sessions(values: Vec<Value>) -> SessionList {
    let mut list = SessionList::default();
    for (index, v) in values.into_iter().enumerate() {
        match session_entry(&v) {
            Ok(s) => list.sessions.push(s),
            Err(reason) => list.skipped.push(Skipped { index, reason }),
        }
    }
    list
}

/// `show users`, `show user NAME`, `show id ID`: the sessions, with `connected_at` derived as
/// described in [`local_to_unix`] (`now` is the current unix time, `utc_offset_hint` an offset
/// learned earlier, used when no session in this reply is young enough to learn it from).
///
/// An entry that cannot be used makes the whole reply a [`CtlError::Protocol`] naming the entry
/// (its position) and the reason; the returned list's `skipped` is therefore always empty.
pub fn sessions(
    input: &[u8],
    command: &'static str,
    now: u64,
    utc_offset_hint: Option<i64>,
) -> CtlResult<SessionList> {
    let v = parse_reply(input, command)?;
    let mut list = collect_sessions(entries(v));
    if let Some(first) = list.skipped.first() {
        let more = match list.skipped.len() {
            1 => String::new(),
            n => format!(" (and {} more unusable entries)", n - 1),
        };
        return Err(protocol(
            command,
            format!(
                "session entry {} cannot be used: {}{more}",
                first.index, first.reason
            ),
        ));
    }
    fill_connected_at(&mut list, now, utc_offset_hint);
    Ok(list)
}

/// What `show events` printed: the initial session list, then one session per event.
///
/// occtl 1.1.6 prints no connect/disconnect flag (quirk 10): an event whose session is no longer
/// listed by `show users` was a disconnect.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Events {
    pub initial: SessionList,
    pub updates: SessionList,
    /// Text lines between the documents.
    pub text: Vec<String>,
}

/// `show events` output, possibly cut short at the end (occtl was stopped): a trailing partial
/// document is ignored, complete ones are kept.
pub fn events(
    input: &[u8],
    command: &'static str,
    now: u64,
    utc_offset_hint: Option<i64>,
) -> CtlResult<Events> {
    let docs =
        scan(input, true).map_err(|e| protocol(command, format!("unparsable occtl output {e}")))?;
    let mut values = docs.values.into_iter();
    let Some(first) = values.next() else {
        return Err(protocol(command, "no JSON document in the output"));
    };
    let mut initial = collect_sessions(entries(first));
    let mut updates = collect_sessions(values.flat_map(entries).collect());
    fill_connected_at(&mut initial, now, utc_offset_hint);
    fill_connected_at(&mut updates, now, initial.utc_offset.or(utc_offset_hint));
    Ok(Events {
        initial,
        updates,
        text: docs.text,
    })
}

/// `show status`.
pub fn status(input: &[u8], command: &'static str) -> CtlResult<ServerStatus> {
    let v = parse_reply(input, command)?;
    // Accept `[ {...} ]` too, defensively.
    let v = match v {
        Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
        other => other,
    };
    if !matches!(v, Value::Object(_)) {
        return Err(protocol(command, "expected one JSON object"));
    }
    let num = |key: &str| v.get(key).and_then(Value::as_u64);
    let n32 = |key: &str| num(key).and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
    let Some(status) = v.get("Status").and_then(Value::as_str) else {
        return Err(protocol(command, "no \"Status\" member"));
    };
    Ok(ServerStatus {
        running: status == "online",
        pid: n32("Server PID"),
        sec_mod_pids: v
            .get_all("Sec-mod PID")
            .filter_map(Value::as_u64)
            .filter_map(|n| u32::try_from(n).ok())
            .collect(),
        active_sessions: n32("Active sessions"),
        start_time: num("raw_up_since").unwrap_or(0),
        banned_ips: n32("IPs in ban list"),
        sessions_closed: num("Sessions handled").unwrap_or(0),
        total_sessions_closed: num("Total sessions").unwrap_or(0),
        auth_failures: num("Authentication failures").unwrap_or(0),
        total_auth_failures: num("Total authentication failures").unwrap_or(0),
        bytes_in: num("raw_rx").unwrap_or(0),
        bytes_out: num("raw_tx").unwrap_or(0),
    })
}

/// `show ip bans` and `show ip ban points`. occtl prints no expiry: `expires` is 0.
pub fn bans(input: &[u8], command: &'static str) -> CtlResult<Extracted<Ban>> {
    let v = parse_reply(input, command)?;
    let mut out = Extracted::default();
    for (index, e) in entries(v).into_iter().enumerate() {
        let ip = e.get("IP").and_then(Value::as_str).map(str::trim);
        let Some(ip) = ip.and_then(|s| s.parse::<IpAddr>().ok()) else {
            out.skipped.push(Skipped {
                index,
                reason: format!("no valid \"IP\": {:?}", e.get("IP")),
            });
            continue;
        };
        let score = e
            .get("Score")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        out.items.push(Ban {
            ip,
            score,
            expires: 0,
        });
    }
    Ok(out)
}

/// A cookie from `show sessions all|valid` / `show session SID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcctlCookie {
    pub cookie: Cookie,
    /// ocserv's state text: `authenticated`, `authenticating`, `auth failed`, ...
    pub state: String,
    /// See [`OcctlSession::name_mangled`].
    pub name_mangled: bool,
    /// `Created` as printed (local time, no zone); `cookie.created` is derived from it only
    /// when a UTC offset was given.
    pub created_local: String,
}

/// `show sessions all|valid`, `show session SID`. `utc_offset` (seconds east of UTC, e.g. the one
/// learned by [`sessions`]) converts `Created`; without it `created` is 0. `expires` is not
/// printed by occtl 1.1.6 and stays 0.
pub fn cookies(
    input: &[u8],
    command: &'static str,
    utc_offset: Option<i64>,
) -> CtlResult<Extracted<OcctlCookie>> {
    let v = parse_reply(input, command)?;
    let mut out = Extracted::default();
    for (index, e) in entries(v).into_iter().enumerate() {
        let safe_id = text(&e, "Full session");
        if safe_id.is_empty() {
            out.skipped.push(Skipped {
                index,
                reason: "no \"Full session\"".into(),
            });
            continue;
        }
        let username = text(&e, "Username");
        let mut groupname = text(&e, "Groupname");
        if groupname == "(none)" {
            groupname.clear();
        }
        let flag = |key: &str| e.get(key).and_then(Value::as_bool).unwrap_or(false);
        let created_local = text(&e, "Created");
        out.items.push(OcctlCookie {
            cookie: Cookie {
                safe_id,
                username: username.clone(),
                groupname,
                user_agent: text(&e, "User-Agent"),
                remote_ip: ip_any(&e, "Remote IP"),
                session_is_open: flag("session_is_open"),
                tls_auth_ok: flag("tls_auth_ok"),
                in_use: flag("in_use"),
                created: parse_local_time(&created_local)
                    .and_then(|l| local_to_unix(l, utc_offset))
                    .unwrap_or(0),
                expires: 0,
                vhost: text(&e, "vhost"),
            },
            state: text(&e, "State"),
            name_mangled: mangled(&username),
            created_local,
        });
    }
    Ok(out)
}

/// One session's iroutes from `show iroutes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIroutes {
    pub id: u32,
    pub username: String,
    pub name_mangled: bool,
    pub device: String,
    /// The session's VPN address (occtl's `IP`).
    pub vpn_ip: Option<IpAddr>,
    pub iroutes: Vec<String>,
}

/// `show iroutes`: one object with every session's members run together (quirk 3); each `ID`
/// member starts a new session. `{}` means no sessions.
pub fn iroutes(input: &[u8], command: &'static str) -> CtlResult<Extracted<UserIroutes>> {
    let v = parse_reply(input, command)?;
    let members = match v {
        Value::Object(m) => m,
        // A fixed occtl (>= 1.4.0) prints an array of objects: flatten it the same way.
        Value::Array(items) => items
            .into_iter()
            .flat_map(|i| match i {
                Value::Object(m) => m,
                _ => Vec::new(),
            })
            .collect(),
        _ => return Err(protocol(command, "expected a JSON object")),
    };
    let mut groups: Vec<Vec<(String, Value)>> = Vec::new();
    for (k, val) in members {
        if k == "ID" || groups.is_empty() {
            groups.push(Vec::new());
        }
        if let Some(g) = groups.last_mut() {
            g.push((k, val));
        }
    }
    let mut out = Extracted::default();
    for (index, g) in groups.into_iter().enumerate() {
        let e = Value::Object(g);
        let id = match id_of(&e) {
            Ok(id) => id,
            Err(reason) => {
                out.skipped.push(Skipped { index, reason });
                continue;
            }
        };
        let username = text(&e, "Username");
        out.items.push(UserIroutes {
            id,
            name_mangled: mangled(&username),
            username,
            device: text(&e, "Device"),
            vpn_ip: ip_any(&e, "IP"),
            iroutes: e
                .get("iRoutes")
                .map(Value::string_items)
                .unwrap_or_default(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn obj(v: &Value) -> &[(String, Value)] {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other:?}"),
        }
    }

    #[test]
    fn quirk1_trailing_comma_in_object() {
        let v = parse_one(b"[ {\n \"in_use\":  1,\n  }\n]").unwrap();
        let Value::Array(items) = v else { panic!() };
        assert_eq!(items[0].get("in_use"), Some(&Value::Int(1)));
    }

    #[test]
    fn quirk2_stray_brace_comma_before_bracket() {
        let v = parse_one(b"[\n  {\n \"a\": 1,\n  },\n\n  {\n \"a\": 2,\n  },\n]\n").unwrap();
        let Value::Array(items) = v else { panic!() };
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].get("a"), Some(&Value::Int(2)));
    }

    #[test]
    fn quirk3_iroutes_run_together_and_empty() {
        let input = br#"
  {
    "ID":  10,
    "Username":  "bob",
    "Device":  "vpns0",
    "IP":  "10.0.0.2",
    "iRoutes":	["192.168.50.0/255.255.255.0"],
    "IP":  "10.0.0.2"
    "ID":  11,
    "Username":  "erin",
    "Device":  "vpns1",
    "IP":  "10.0.0.3",
    "iRoutes":	[],
    "IP":  "10.0.0.3"
  }
"#;
        let r = iroutes(input, "show iroutes").unwrap();
        assert_eq!(r.items.len(), 2);
        assert_eq!(r.items[0].id, 10);
        assert_eq!(r.items[0].iroutes, ["192.168.50.0/255.255.255.0"]);
        assert_eq!(r.items[1].username, "erin");
        assert_eq!(r.items[1].vpn_ip, Some("10.0.0.3".parse().unwrap()));
        assert!(r.items[1].iroutes.is_empty());
        let empty = iroutes(b"  {\n  }\n", "show iroutes").unwrap();
        assert!(empty.items.is_empty() && empty.skipped.is_empty());
    }

    #[test]
    fn quirk4_trailing_comma_in_bans() {
        let b = bans(
            b"[\n  {\n \"IP\": \"10.1.1.1\",\n \"Score\": 30\n  },\n]\n",
            "show ip bans",
        )
        .unwrap();
        assert_eq!(b.items.len(), 1);
        assert_eq!(b.items[0].score, 30);
        assert_eq!(b.items[0].ip, "10.1.1.1".parse::<IpAddr>().unwrap());
    }

    const USER: &str = r#"[ {
    "ID":  3478,
    "Username":  "carol",
    "Groupname":  "(none)",
    "State":  "connected",
    "Device":  "vpns4",
    "MTU":  "1434",
    "Remote IP":  "10.231.160.2",
    "IPv4":  "10.232.160.36",
    "P-t-P IPv4":  "10.232.160.1",
    "Limit RX":  "250.0 KB/sec",
    "TX":  "400.0 KB/sec",
    "RX":  "48",
    "TX":  "200",
    "Connected at":  "2026-11-26 21:06",
    "_Connected at":  "    1s",
    "Full session":  "GDnAGg6Vqa8411Hw9xjkUEGvwSg=",
    "DNS":	["10.0.0.53"],
    "Routes":	[],
    "Routes":  "defaultroute",
    "Restricted to routes":  "False"
  } ]"#;

    #[test]
    fn quirk5_duplicate_tx_keeps_limit_and_counter() {
        let v = parse_one(USER.as_bytes()).unwrap();
        let Value::Array(items) = &v else { panic!() };
        let txs: Vec<_> = items[0].get_all("TX").collect();
        assert_eq!(txs.len(), 2, "both TX members are kept in order");
        let l = sessions(USER.as_bytes(), "show users", 0, None).unwrap();
        let s = &l.sessions[0];
        assert_eq!(
            s.session.counters,
            Some(ByteCounters {
                bytes_in: 48,
                bytes_out: 200
            })
        );
        assert_eq!(s.limit_rx.as_deref(), Some("250.0 KB/sec"));
        assert_eq!(s.limit_tx.as_deref(), Some("400.0 KB/sec"));
    }

    #[test]
    fn quirk6_duplicate_routes_means_default_route() {
        let l = sessions(USER.as_bytes(), "show users", 0, None).unwrap();
        let s = &l.sessions[0];
        assert!(s.default_route);
        assert!(s.session.routes.is_empty());
        let with_routes = USER.replace(r#""Routes":	[]"#, r#""Routes":	["10.0.0.0/255.0.0.0"]"#);
        let l = sessions(with_routes.as_bytes(), "show users", 0, None).unwrap();
        assert_eq!(l.sessions[0].session.routes, ["10.0.0.0/255.0.0.0"]);
        assert!(!l.sessions[0].default_route);
    }

    #[test]
    fn quirk7_mangled_names_are_flagged() {
        let input = USER.replace("\"carol\"", r#""j\u00ff\u00ffrgen""#);
        let l = sessions(input.as_bytes(), "show users", 0, None).unwrap();
        assert_eq!(l.sessions[0].session.username, "j\u{ff}\u{ff}rgen");
        assert!(l.sessions[0].name_mangled);
        let clean = sessions(USER.as_bytes(), "show users", 0, None).unwrap();
        assert!(!clean.sessions[0].name_mangled);
    }

    #[test]
    fn quirk8_unescaped_array_values_and_invalid() {
        // A backslash and a control byte inside an array value: kept, not fatal.
        let v =
            parse_one(b"{\"DNS\": [\"a\\qb\", \"c\td\"], \"Hostname\": \"(invalid)\"}").unwrap();
        assert_eq!(v.get("DNS").unwrap().string_items(), ["a\\qb", "c\td"]);
        assert_eq!(v.get("Hostname").unwrap().as_str(), Some("(invalid)"));
        // Invalid UTF-8 is replaced, not an error.
        let v = parse_one(b"{\"a\": \"\xff\xfe\"}").unwrap();
        assert_eq!(v.get("a").unwrap().as_str(), Some("\u{fffd}\u{fffd}"));
    }

    #[test]
    fn quirk9_string_numbers_and_booleans() {
        let v = parse_one(br#"{"MTU": "1434", "B": "True", "C": "False", "N": 5, "X": "1.5"}"#)
            .unwrap();
        assert_eq!(v.get("MTU").unwrap().as_u64(), Some(1434));
        assert_eq!(v.get("B").unwrap().as_bool(), Some(true));
        assert_eq!(v.get("C").unwrap().as_bool(), Some(false));
        assert_eq!(v.get("N").unwrap().as_u64(), Some(5));
        assert_eq!(v.get("X").unwrap().as_u64(), None);
        let l = sessions(USER.as_bytes(), "show users", 0, None).unwrap();
        assert_eq!(l.sessions[0].session.mtu, Some(1434));
        assert_eq!(l.sessions[0].session.groupname, "");
    }

    #[test]
    fn quirk10_several_documents_with_text() {
        let d = parse_documents(
            b"[\n]\n\nPress 'q' or CTRL+C to quit\n\n[ {\"ID\": 1} ]\n[ {\"ID\": 2} ]\n",
        )
        .unwrap();
        assert_eq!(d.values.len(), 3);
        assert_eq!(d.text, ["Press 'q' or CTRL+C to quit"]);
        // A stream stopped mid-document keeps the complete ones.
        let e = events(
            b"[\n]\ntext\n[ {\"ID\": 7, \"Username\": \"a\", \"State\": \"pre-auth\"} ]\n[ {\"ID\": 8,",
            "show events",
            0,
            None,
        )
        .unwrap();
        assert!(e.initial.sessions.is_empty());
        assert_eq!(e.updates.sessions.len(), 1);
        assert_eq!(e.updates.sessions[0].session.id, 7);
    }

    #[test]
    fn duplicate_keys_keep_order() {
        let v = parse_one(br#"{"k": 1, "k": "two", "other": null, "k": [3]}"#).unwrap();
        let keys: Vec<&str> = obj(&v).iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["k", "k", "other", "k"]);
        let ks: Vec<&Value> = v.get_all("k").collect();
        assert_eq!(
            ks,
            [
                &Value::Int(1),
                &Value::String("two".into()),
                &Value::Array(vec![Value::Int(3)])
            ]
        );
    }

    #[test]
    fn escapes_and_surrogates() {
        let v = parse_one(br#"["a\"b\\c\/\n\u00e9\ud83d\ude00\u12"]"#).unwrap();
        let Value::Array(items) = v else { panic!() };
        assert_eq!(items[0].as_str(), Some("a\"b\\c/\n\u{e9}\u{1f600}\\u12"));
    }

    #[test]
    fn errors_have_offsets_and_limits_hold() {
        let e = parse_one(b"[ {\"a\" 1} ]").unwrap_err();
        assert_eq!(e.offset, 7, "{e}");
        assert!(e.reason.contains("':'"), "{e}");
        let e = parse_one(b"[\"abc").unwrap_err();
        assert!(e.reason.contains("unterminated string"), "{e}");
        let deep = "[".repeat(MAX_DEPTH + 5);
        let e = parse_one(deep.as_bytes()).unwrap_err();
        assert!(e.reason.contains("nesting"), "{e}");
        let big = vec![b' '; MAX_INPUT + 1];
        assert!(parse_one(&big).unwrap_err().reason.contains("limit"));
        assert!(parse_one(b"   \n").unwrap_err().reason.contains("no JSON"));
        let err = sessions(b"[ {", "show users", 0, None).unwrap_err();
        assert!(
            matches!(&err, CtlError::Protocol { command: "show users", reason } if reason.contains("byte")),
            "{err}"
        );
    }

    /// An entry occtl printed but that cannot be used makes the whole session list an error
    /// naming the entry and the reason, never a silently shorter list.
    #[test]
    fn an_unusable_session_entry_fails_the_whole_list() {
        const SID: &str = "GDnAGg6Vqa8411Hw9xjkUEGvwSg=";
        let good = format!(
            r#"{{"ID": 9, "Username": "c", "State": "connected", "Full session": "{SID}"}}"#
        );
        let cases = [
            (
                r#"{"ID": "x", "Username": "a"}"#.to_owned(),
                "entry 1",
                "\"ID\" is not a positive",
            ),
            (r#"{"Username": "b"}"#.to_owned(), "entry 1", "no \"ID\""),
            ("5".to_owned(), "entry 1", "not an object"),
            (
                r#"{"ID": 0, "Username": "z"}"#.to_owned(),
                "entry 1",
                "\"ID\"",
            ),
            (
                r#"{"ID": 12, "Username": "d", "State": "connected"}"#.to_owned(),
                "entry 1",
                "ID 12: no \"Full session\"",
            ),
            (
                r#"{"ID": 13, "Username": "d", "State": "connected", "Full session": "a b"}"#
                    .to_owned(),
                "entry 1",
                "ID 13: invalid \"Full session\"",
            ),
        ];
        for (bad, entry, why) in cases {
            let input = format!("[ {good}, {bad} ]");
            let e = sessions(input.as_bytes(), "show users", 0, None).unwrap_err();
            let CtlError::Protocol { command, reason } = &e else {
                panic!("{bad}: expected Protocol, got {e:?}")
            };
            assert_eq!(*command, "show users");
            assert!(
                reason.contains(entry) && reason.contains(why),
                "{bad}: {reason}"
            );
        }
        let input = format!(r#"[ 1, {good}, 2, 3 ]"#);
        let e = sessions(input.as_bytes(), "show user", 0, None).unwrap_err();
        assert!(
            e.to_string().contains("entry 0") && e.to_string().contains("2 more"),
            "{e}"
        );
        // Usable: a session id, or the exact connect time, or a session still in pre-auth.
        let ok = format!(
            r#"[ {good}, {{"ID": 10, "raw_connected_at": 1700000000}},
                 {{"ID": 11, "State": "pre-auth"}} ]"#
        );
        let l = sessions(ok.as_bytes(), "show users", 0, None).unwrap();
        assert_eq!(l.sessions.len(), 3);
        assert!(l.skipped.is_empty());
        assert_eq!(l.sessions[0].session.safe_id.as_deref(), Some(SID));
        // Elsewhere one bad entry is still skipped with its reason.
        let b = bans(br#"[ {"IP": "nope", "Score": 1} ]"#, "show ip bans").unwrap();
        assert!(b.items.is_empty() && b.skipped[0].reason.contains("IP"));
        let ev = events(format!("[ {good}, 5 ]").as_bytes(), "show events", 0, None).unwrap();
        assert_eq!(ev.initial.sessions.len(), 1);
        assert_eq!(ev.initial.skipped.len(), 1);
    }

    /// The session key never depends on the connect time derived from local time: the same
    /// reply read with two different UTC offsets gives different `connected_at` values but the
    /// same identity.
    #[test]
    fn identity_does_not_move_with_the_learned_offset() {
        let old = r#"[{"ID": 2, "State": "connected", "Full session": "GDnAGg6Vqa8411Hw9xjkUEGvwSg=",
                      "Connected at": "2023-11-10 09:00", "_Connected at": " 5days"}]"#;
        let now = 1_700_000_000;
        let a = sessions(old.as_bytes(), "show users", now, Some(3600)).unwrap();
        let b = sessions(old.as_bytes(), "show users", now, Some(7200)).unwrap();
        let (a, b) = (&a.sessions[0], &b.sessions[0]);
        assert_ne!(a.session.connected_at, b.session.connected_at);
        assert!(!a.connected_at_exact);
        assert!(a.session.key().matches(&b.session));
        assert!(b.session.key().matches(&a.session));
    }

    #[test]
    fn elapsed_and_local_time() {
        assert_eq!(parse_elapsed("    1s"), Some(1));
        assert_eq!(parse_elapsed(" 3m:07s"), Some(187));
        assert_eq!(parse_elapsed(" 2h:05m"), Some(7500));
        assert_eq!(parse_elapsed(" 3days"), Some(3 * 86_400));
        assert_eq!(parse_elapsed("   ?   "), None);
        assert_eq!(parse_elapsed(""), None);
        assert_eq!(parse_local_time("1970-01-01 00:00"), Some(0));
        assert_eq!(parse_local_time("2023-11-14 22:13"), Some(1_699_999_980));
        assert_eq!(parse_local_time("2023-13-14 22:13"), None);
        assert_eq!(parse_local_time("garbage"), None);
    }

    #[test]
    fn connected_at_learns_the_utc_offset() {
        // Local time is UTC+02:00; the session connected 61 s before `now`.
        let started: i64 = 1_700_000_000;
        let now = (started + 61) as u64;
        let local = started + 7200; // 2023-11-15 00:13:20 local
        assert_eq!(estimate_utc_offset(local - 20, 61, now), Some(7200));
        let input = r#"[{"ID": 1, "Full session": "GDnAGg6Vqa8411Hw9xjkUEGvwSg=", "Connected at": "2023-11-15 00:13", "_Connected at": " 1m:01s"},
                {"ID": 2, "Full session": "GDnAGg6Vqa8411Hw9xjkUEGvwSg=", "Connected at": "2023-11-10 09:00", "_Connected at": " 5days"}]"#;
        let l = sessions(input.as_bytes(), "show users", now, None).unwrap();
        assert_eq!(l.utc_offset, Some(7200));
        // Minute precision: 22:13:00 UTC.
        assert_eq!(l.sessions[0].session.connected_at, 1_699_999_980);
        assert_eq!(
            l.sessions[1].session.connected_at,
            parse_local_time("2023-11-10 07:00").unwrap() as u64
        );
        // Only old sessions: nothing to learn from, the hint is used; no hint: 0.
        let old = r#"[{"ID": 2, "Full session": "GDnAGg6Vqa8411Hw9xjkUEGvwSg=", "Connected at": "2023-11-10 09:00", "_Connected at": " 5days"}]"#;
        let l = sessions(old.as_bytes(), "show users", now, Some(3600)).unwrap();
        assert_eq!(
            l.sessions[0].session.connected_at,
            parse_local_time("2023-11-10 08:00").unwrap() as u64
        );
        let l = sessions(old.as_bytes(), "show users", now, None).unwrap();
        assert_eq!(l.sessions[0].session.connected_at, 0);
        // raw_connected_at (occtl >= 1.2.3) wins.
        let raw = r#"[{"ID": 3, "raw_connected_at": 1234, "Connected at": "2023-11-10 09:00"}]"#;
        let l = sessions(raw.as_bytes(), "show users", now, Some(0)).unwrap();
        assert_eq!(l.sessions[0].session.connected_at, 1234);
        assert!(l.sessions[0].connected_at_exact);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(s in "\\PC{0,300}") {
            let _ = parse_documents(s.as_bytes());
            let _ = sessions(s.as_bytes(), "show users", 1_700_000_000, None);
            let _ = iroutes(s.as_bytes(), "show iroutes");
            let _ = cookies(s.as_bytes(), "show sessions all", Some(0));
            let _ = bans(s.as_bytes(), "show ip bans");
            let _ = status(s.as_bytes(), "show status");
            let _ = events(s.as_bytes(), "show events", 0, None);
            let _ = parse_elapsed(&s);
            let _ = parse_local_time(&s);
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_documents(&b);
            let _ = sessions(&b, "show users", u64::MAX, Some(i64::MIN + 1));
        }

        #[test]
        fn never_panics_on_json_like_text(s in "[\\[\\]{}\",:a-z0-9 \\\\u\\n-]{0,200}") {
            let _ = parse_documents(s.as_bytes());
            let _ = iroutes(s.as_bytes(), "show iroutes");
            let _ = sessions(s.as_bytes(), "show users", 0, None);
        }

        #[test]
        fn valid_json_parses_like_serde(v in arb_json()) {
            // Documents start with `[` or `{` (top-level scalars are text lines to occtl output).
            let text = serde_json::to_string_pretty(&[&v]).unwrap();
            let ours = parse_one(text.as_bytes()).unwrap();
            prop_assert_eq!(ours, Value::Array(vec![from_serde(&v)]));
        }
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|i| serde_json::json!(i)),
            "\\PC{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[a-zA-Z ]{0,6}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn from_serde(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(0.0)),
            },
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(a) => Value::Array(a.iter().map(from_serde).collect()),
            serde_json::Value::Object(m) => {
                Value::Object(m.iter().map(|(k, v)| (k.clone(), from_serde(v))).collect())
            }
        }
    }
}
