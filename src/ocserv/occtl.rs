//! The fallback backend: runs `occtl -s SOCKET --json ARGS...` and parses its output with
//! [`super::occtl_json`].
//!
//! Inputs: the occtl binary, ocserv's control socket and a per-call timeout. Outputs: the shared
//! types of [`crate::ocserv`] through [`OcservBackend`], plus inherent methods for the occtl
//! commands the trait does not cover (`show iroutes`, `show sessions all|valid`,
//! `show session SID`, `show ip ban points`, `show events`, `stop now`) and [`OcctlBackend::run_json`]
//! for an allowlisted generic command.
//!
//! How occtl is run: never through a shell. `tokio::process::Command` with an argument vector,
//! stdin from /dev/null (`show events` gets a pipe, see [`OcctlBackend::events`]), stdout and
//! stderr captured up to a bound, `kill_on_drop(true)` and a hard timeout (occtl has none of its
//! own). Names are validated before they become arguments: occtl treats `?` and `help` as a
//! request for help and exits 0, and it matches commands by prefix.
//!
//! Failure behaviour: a missing binary is [`CtlError::OcctlMissing`]; the deadline is
//! [`CtlError::Timeout`]; "cannot connect to the socket" is [`CtlError::Unreachable`]; other
//! non-zero exits are [`CtlError::OcctlFailed`] with the stderr text; unparsable output is
//! [`CtlError::Protocol`] naming the command. Exit codes per reference/ocserv.md §2: `show user`
//! and `show id` exit 2 when nothing matches (an empty answer, not an error); `disconnect` and
//! `unban` exit 1 with "could not ..." on stdout when nothing matches ([`DisconnectOutcome::NotFound`]).
//!
//! Identity: sessions carry their session id from occtl's "Full session" (an entry without a
//! usable one fails the whole list, see [`occtl_json::sessions`]), so the `connected_at` derived
//! from local time never identifies a session. [`OcservBackend::disconnect_session`] runs
//! `show id ID`, checks that the listed session is the one the key names, and only then runs
//! `disconnect id ID` (two runs of occtl: a PID recycled in the moment between them is not
//! caught; occtl 1.1.6 has no `terminate`).
//!
//! Work off the async workers: output larger than [`super::INLINE_DECODE_LIMIT`] is parsed (and
//! mapped to sessions) on the blocking pool, whatever the command; a timed-out occtl is killed
//! and reaped before the call returns.
//!
//! Limits of occtl 1.1.6 compared with the native backend: UTF-8 names come back mangled
//! ([`occtl_json::OcctlSession::name_mangled`]); there is no `terminate` command, so
//! `terminate_*` disconnect (cookies of 1.1.6 are invalidated by disconnect anyway unless
//! `persistent-cookies` is set); per-session byte counters are only printed when occtl runs in
//! ocserv's network namespace, so missing ones are read from the tun device with
//! [`super::counters::read`]; `connected_at` has minute precision (see
//! [`occtl_json::local_to_unix`]).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::occtl_json::{
    self, Documents, Events, Extracted, OcctlCookie, OcctlSession, UserIroutes, Value,
};
use super::*;

/// Most stdout kept from one occtl run (the parser's own limit).
pub const MAX_STDOUT: usize = occtl_json::MAX_INPUT;
/// Most stderr kept from one occtl run.
pub const MAX_STDERR: usize = 64 * 1024;
/// Longest `show events` collection accepted by [`OcctlBackend::events`].
pub const MAX_EVENTS_DURATION: Duration = Duration::from_secs(3600);

/// No UTC offset learned yet.
const NO_OFFSET: i64 = i64::MIN;
/// How long to wait for a SIGKILLed occtl to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(2);

/// The exec'd-occtl backend. Cheap to clone (clones share the learned UTC offset).
#[derive(Debug, Clone)]
pub struct OcctlBackend {
    occtl: PathBuf,
    socket: PathBuf,
    timeout: Duration,
    /// Local UTC offset learned from session times (see `occtl_json::local_to_unix`).
    utc_offset: Arc<AtomicI64>,
}

/// Which cookies `show sessions` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieFilter {
    All,
    /// Only cookies that can still be used to reconnect.
    Valid,
}

/// The result of [`OcctlBackend::run_json`].
#[derive(Debug, Clone, PartialEq)]
pub struct OcctlOutput {
    /// The command words and arguments as run (after `-s SOCKET --json`).
    pub args: Vec<String>,
    pub exit_code: Option<i32>,
    /// JSON documents found on stdout (none for text-only commands such as `reload`).
    pub documents: Vec<Value>,
    /// Non-JSON stdout lines.
    pub text: Vec<String>,
    /// stderr, without occtl's `nl: cannot find ...` counter warnings.
    pub stderr: String,
}

/// What one argument of an allowlisted command must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arg {
    None,
    Username,
    Id,
    Ip,
    Sid,
}

/// The commands [`OcctlBackend::run_json`] accepts: exact words (occtl's prefix matching is not
/// offered), the label used in errors, and the kind of the one argument.
const ALLOWED: &[(&[&str], &str, Arg)] = &[
    (&["show", "status"], "show status", Arg::None),
    (&["show", "users"], "show users", Arg::None),
    (&["show", "user"], "show user", Arg::Username),
    (&["show", "id"], "show id", Arg::Id),
    (&["show", "ip", "bans"], "show ip bans", Arg::None),
    (
        &["show", "ip", "ban", "points"],
        "show ip ban points",
        Arg::None,
    ),
    (&["show", "iroutes"], "show iroutes", Arg::None),
    (&["show", "sessions", "all"], "show sessions all", Arg::None),
    (
        &["show", "sessions", "valid"],
        "show sessions valid",
        Arg::None,
    ),
    (&["show", "session"], "show session", Arg::Sid),
    (&["disconnect", "user"], "disconnect user", Arg::Username),
    (&["disconnect", "id"], "disconnect id", Arg::Id),
    (&["unban", "ip"], "unban ip", Arg::Ip),
    (&["reload"], "reload", Arg::None),
];

/// Captured result of one run.
struct Run {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Refuses names occtl would misread, on top of [`crate::validate::username`].
fn check_username(name: &str) -> CtlResult<()> {
    crate::validate::username(name).map_err(|e| CtlError::InvalidArgument {
        field: e.field,
        reason: e.reason,
    })?;
    // occtl prints help (exit 0) for these instead of running the command.
    if name == "?" || name.eq_ignore_ascii_case("help") {
        return Err(CtlError::InvalidArgument {
            field: "username",
            reason: format!("{name:?} is read by occtl as a request for help"),
        });
    }
    // occtl re-splits its command line on whitespace.
    if name.trim() != name || name.contains(char::is_whitespace) {
        return Err(CtlError::InvalidArgument {
            field: "username",
            reason: "must not contain whitespace when occtl is used".into(),
        });
    }
    Ok(())
}

/// occtl reads IDs with `atoi` and treats 0 as "print help".
fn check_id(id: u32) -> CtlResult<String> {
    if id == 0 || id > i32::MAX as u32 {
        return Err(CtlError::InvalidArgument {
            field: "id",
            reason: format!("{id} is not a valid session ID (1..={})", i32::MAX),
        });
    }
    Ok(id.to_string())
}

/// A session id as `show session` takes it ([`crate::validate::safe_id`]).
fn check_sid(sid: &str) -> CtlResult<()> {
    crate::validate::safe_id(sid).map_err(|e| CtlError::InvalidArgument {
        field: e.field,
        reason: e.reason,
    })
}

/// Parses occtl's stdout with `parse`, on the blocking pool when it is large
/// ([`super::off_worker`]).
async fn parse_output<T: Send + 'static>(
    label: &'static str,
    stdout: Vec<u8>,
    parse: impl FnOnce(&[u8]) -> CtlResult<T> + Send + 'static,
) -> CtlResult<T> {
    off_worker(label, stdout.len(), move || parse(&stdout)).await
}

/// stderr without the tun-counter warnings occtl prints outside ocserv's namespace.
fn clean_stderr(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with("nl: cannot find"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads at most `limit` bytes; `Err(())` when there was more.
async fn read_bounded<R: AsyncRead + Unpin>(r: Option<R>, limit: usize) -> Result<Vec<u8>, ()> {
    let Some(r) = r else { return Ok(Vec::new()) };
    let mut buf = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    match r.take(cap).read_to_end(&mut buf).await {
        Ok(_) if buf.len() > limit => Err(()),
        // A read error leaves what was read; the exit code tells the rest.
        _ => Ok(buf),
    }
}

impl OcctlBackend {
    pub fn new(occtl: PathBuf, socket: PathBuf, timeout: Duration) -> Self {
        Self {
            occtl,
            socket,
            timeout,
            utc_offset: Arc::new(AtomicI64::new(NO_OFFSET)),
        }
    }

    fn offset_hint(&self) -> Option<i64> {
        Some(self.utc_offset.load(Ordering::Relaxed)).filter(|&o| o != NO_OFFSET)
    }

    fn learn_offset(&self, offset: Option<i64>) {
        if let Some(o) = offset {
            self.utc_offset.store(o, Ordering::Relaxed);
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.occtl);
        cmd.arg("-s")
            .arg(&self.socket)
            .arg("--json")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    fn spawn(&self, mut cmd: Command) -> CtlResult<tokio::process::Child> {
        cmd.spawn().map_err(|source| CtlError::OcctlMissing {
            path: self.occtl.display().to_string(),
            source,
        })
    }

    /// Runs occtl once with stdin closed; the whole run (spawn to exit) is bounded by the timeout.
    async fn exec(&self, label: &'static str, args: &[&str]) -> CtlResult<Run> {
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null());
        let mut child = self.spawn(cmd)?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let work = async {
            let (out, err, status) = tokio::join!(
                read_bounded(stdout, MAX_STDOUT),
                read_bounded(stderr, MAX_STDERR),
                child.wait()
            );
            (out, err, status)
        };
        let (out, err, status) = match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                // kill_on_drop alone would leave a zombie until the runtime reaps orphans: kill
                // and reap now, so the process is gone when this returns.
                let _ = child.start_kill();
                if tokio::time::timeout(REAP_TIMEOUT, child.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(command = label, "a killed occtl did not exit in time");
                }
                return Err(CtlError::Timeout {
                    command: label,
                    timeout: self.timeout,
                });
            }
        };
        let status = status.map_err(|source| CtlError::Io {
            command: label,
            source,
        })?;
        let stdout = out.map_err(|()| CtlError::Protocol {
            command: label,
            reason: format!("occtl wrote more than {MAX_STDOUT} bytes"),
        })?;
        let stderr = match err {
            Ok(e) => String::from_utf8_lossy(&e).into_owned(),
            Err(()) => format!("(more than {MAX_STDERR} bytes of stderr)"),
        };
        Ok(Run {
            code: status.code(),
            stdout,
            stderr,
        })
    }

    /// The error for a failed run: unreachable socket, or a generic occtl failure.
    fn failure(&self, label: &'static str, run: &Run) -> CtlError {
        let stderr = clean_stderr(&run.stderr);
        let lower = stderr.to_ascii_lowercase();
        if lower.contains("connecting to ocserv socket")
            || lower.contains("error opening socket")
            || lower.contains("unreachable")
        {
            return CtlError::Unreachable {
                path: self.socket.display().to_string(),
                source: std::io::Error::other(stderr.trim().to_owned()),
            };
        }
        let stdout = String::from_utf8_lossy(&run.stdout);
        let detail = if stderr.trim().is_empty() {
            stdout.trim().chars().take(500).collect()
        } else {
            stderr.trim().to_owned()
        };
        CtlError::OcctlFailed {
            command: label.to_owned(),
            code: run.code,
            stderr: detail,
        }
    }

    /// Runs a JSON command that must exit 0 (or `ok_codes`) and returns stdout.
    async fn json(&self, label: &'static str, args: &[&str], ok_codes: &[i32]) -> CtlResult<Run> {
        let run = self.exec(label, args).await?;
        match run.code {
            Some(0) => Ok(run),
            Some(c) if ok_codes.contains(&c) => Ok(run),
            _ => Err(self.failure(label, &run)),
        }
    }

    /// Runs a text command answered by "... was disconnected" / "could not ..." (exit 1).
    async fn action(&self, label: &'static str, args: &[&str]) -> CtlResult<DisconnectOutcome> {
        let run = self.exec(label, args).await?;
        let stdout = String::from_utf8_lossy(&run.stdout);
        match run.code {
            Some(0) if !stdout.contains("could not") => Ok(DisconnectOutcome::Done),
            Some(0 | 1) if stdout.contains("could not") => Ok(DisconnectOutcome::NotFound),
            _ => Err(self.failure(label, &run)),
        }
    }

    /// Parses a session reply (on the blocking pool when it is large) and remembers the UTC
    /// offset learned from it.
    async fn parse_sessions(
        &self,
        label: &'static str,
        stdout: Vec<u8>,
    ) -> CtlResult<Vec<OcctlSession>> {
        let (now, hint) = (now_secs(), self.offset_hint());
        let list = parse_output(label, stdout, move |out| {
            occtl_json::sessions(out, label, now, hint)
        })
        .await?;
        self.learn_offset(list.utc_offset);
        Ok(list.sessions)
    }

    /// [`Self::parse_sessions`], then fills missing byte counters from the tun devices.
    async fn session_list(
        &self,
        label: &'static str,
        stdout: Vec<u8>,
    ) -> CtlResult<Vec<OcctlSession>> {
        Ok(fill_counters(self.parse_sessions(label, stdout).await?).await)
    }

    /// `show users` with occtl's extra details (mangled-name flags, iroutes, limits).
    pub async fn list_detailed(&self) -> CtlResult<Vec<OcctlSession>> {
        const L: &str = "show users";
        let run = self.json(L, &["show", "users"], &[]).await?;
        self.session_list(L, run.stdout).await
    }

    /// `show user NAME` with occtl's extra details; empty when the user has no session.
    pub async fn user_info_detailed(&self, username: &str) -> CtlResult<Vec<OcctlSession>> {
        const L: &str = "show user";
        check_username(username)?;
        let run = self.json(L, &["show", "user", username], &[2]).await?;
        if run.code == Some(2) {
            return Ok(Vec::new());
        }
        self.session_list(L, run.stdout).await
    }

    /// `show iroutes`: every session's iroutes.
    pub async fn iroutes(&self) -> CtlResult<Extracted<UserIroutes>> {
        const L: &str = "show iroutes";
        let run = self.json(L, &["show", "iroutes"], &[]).await?;
        parse_output(L, run.stdout, |out| occtl_json::iroutes(out, L)).await
    }

    /// `show sessions all|valid`: the cookies sec-mod holds, with occtl's state text.
    pub async fn sessions(&self, filter: CookieFilter) -> CtlResult<Extracted<OcctlCookie>> {
        let (label, word) = match filter {
            CookieFilter::All => ("show sessions all", "all"),
            CookieFilter::Valid => ("show sessions valid", "valid"),
        };
        let run = self.json(label, &["show", "sessions", word], &[]).await?;
        let hint = self.offset_hint();
        parse_output(label, run.stdout, move |out| {
            occtl_json::cookies(out, label, hint)
        })
        .await
    }

    /// `show session SID` (the full 28-character id; a prefix finds nothing).
    pub async fn session(&self, safe_id: &str) -> CtlResult<Extracted<OcctlCookie>> {
        const L: &str = "show session";
        check_sid(safe_id)?;
        let run = self.json(L, &["show", "session", safe_id], &[2]).await?;
        if run.code == Some(2) {
            return Ok(Extracted::default());
        }
        let hint = self.offset_hint();
        parse_output(L, run.stdout, move |out| occtl_json::cookies(out, L, hint)).await
    }

    /// `show ip ban points`: every address with a score, banned or not.
    pub async fn ban_points(&self) -> CtlResult<Vec<Ban>> {
        const L: &str = "show ip ban points";
        let run = self.json(L, &["show", "ip", "ban", "points"], &[]).await?;
        Ok(parse_output(L, run.stdout, |out| occtl_json::bans(out, L))
            .await?
            .items)
    }

    /// `stop now`: asks ocserv to shut down (every session ends).
    pub async fn stop_now(&self) -> CtlResult<()> {
        const L: &str = "stop now";
        let run = self.exec(L, &["stop", "now"]).await?;
        if run.code == Some(0) {
            Ok(())
        } else {
            Err(self.failure(L, &run))
        }
    }

    /// `show events` for `duration`, then stops occtl and parses what it printed.
    ///
    /// occtl leaves its loop when it reads `q` on stdin and then exits normally; its stdout is
    /// block-buffered on a pipe, so a signal would lose the buffered tail. It gets `q` after
    /// `duration`, then `timeout` to exit before it is killed. ocserv has one event listener
    /// slot: while this runs, no other `show events` (or native TOP) client gets updates.
    pub async fn events(&self, duration: Duration) -> CtlResult<Events> {
        const L: &str = "show events";
        if duration > MAX_EVENTS_DURATION {
            return Err(CtlError::InvalidArgument {
                field: "duration",
                reason: format!("{duration:?} is longer than {MAX_EVENTS_DURATION:?}"),
            });
        }
        let mut cmd = self.command(&["show", "events"]);
        cmd.stdin(Stdio::piped());
        let mut child = self.spawn(cmd)?;
        let mut stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let reader = tokio::spawn(read_bounded(stdout, MAX_STDOUT));
        let err_reader = tokio::spawn(read_bounded(stderr, MAX_STDERR));

        // Ends early if occtl exits by itself (socket unreachable, ocserv stopped).
        let exited = tokio::time::timeout(duration, child.wait()).await;
        let status = match exited {
            Ok(status) => status,
            Err(_) => {
                if let Some(mut input) = stdin.take() {
                    let _ = input.write_all(b"q").await;
                    let _ = input.flush().await;
                }
                match tokio::time::timeout(self.timeout, child.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        let _ = child.start_kill();
                        child.wait().await
                    }
                }
            }
        }
        .map_err(|source| CtlError::Io { command: L, source })?;
        drop(stdin);
        let stdout = match reader.await {
            Ok(Ok(out)) => out,
            Ok(Err(())) => {
                return Err(CtlError::Protocol {
                    command: L,
                    reason: format!("occtl wrote more than {MAX_STDOUT} bytes"),
                })
            }
            Err(e) => {
                return Err(CtlError::Io {
                    command: L,
                    source: std::io::Error::other(e.to_string()),
                })
            }
        };
        let stderr = match err_reader.await {
            Ok(Ok(e)) => String::from_utf8_lossy(&e).into_owned(),
            _ => String::new(),
        };
        let run = Run {
            code: status.code(),
            stdout,
            stderr,
        };
        if run.stdout.iter().all(u8::is_ascii_whitespace) {
            return Err(self.failure(L, &run));
        }
        let (now, hint) = (now_secs(), self.offset_hint());
        let events = parse_output(L, run.stdout, move |out| {
            occtl_json::events(out, L, now, hint)
        })
        .await?;
        self.learn_offset(events.initial.utc_offset);
        Ok(events)
    }

    /// Runs one allowlisted occtl command given as words (`["show", "user", "alice"]`) and returns
    /// what it printed, parsed. Refuses anything not in the allowlist, `show events` (unbounded:
    /// use [`Self::events`]) and `stop now` (use [`Self::stop_now`]), with `InvalidArgument`.
    /// Arguments are validated and re-serialized (IDs as numbers, IPs as parsed addresses).
    pub async fn run_json(&self, args: &[String]) -> CtlResult<OcctlOutput> {
        let (label, argv) = allowlisted(args)?;
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let run = self.exec(label, &refs).await?;
        // 2: `show user`/`show id`/`show session` found nothing; 1: "could not ..." for actions.
        let stdout_text = String::from_utf8_lossy(&run.stdout);
        let benign = match run.code {
            Some(0) | Some(2) => true,
            Some(1) => stdout_text.contains("could not"),
            _ => false,
        };
        if !benign {
            return Err(self.failure(label, &run));
        }
        let stderr = clean_stderr(&run.stderr);
        let Documents { values, text } = parse_output(label, run.stdout, move |out| {
            occtl_json::parse_documents(out).map_err(|e| CtlError::Protocol {
                command: label,
                reason: format!("unparsable occtl output {e}"),
            })
        })
        .await?;
        Ok(OcctlOutput {
            args: argv,
            exit_code: run.code,
            documents: values,
            text,
            stderr,
        })
    }
}

/// Checks `args` against [`ALLOWED`]; returns the label and the re-serialized arguments.
fn allowlisted(args: &[String]) -> CtlResult<(&'static str, Vec<String>)> {
    let refuse = |reason: String| CtlError::InvalidArgument {
        field: "command",
        reason,
    };
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["show", "events", ..] => {
            return Err(refuse(
                "`show events` streams without end; use the bounded events call".into(),
            ))
        }
        ["stop", ..] => return Err(refuse("`stop now` is not allowed here".into())),
        _ => {}
    }
    // Longest match first, so `show ip ban points` wins over nothing shorter by accident.
    let mut best: Option<&(&[&str], &str, Arg)> = None;
    for entry in ALLOWED {
        let (cmd, _, _) = entry;
        if words.len() >= cmd.len()
            && words[..cmd.len()] == cmd[..]
            && best.is_none_or(|(b, _, _)| b.len() < cmd.len())
        {
            best = Some(entry);
        }
    }
    let Some((cmd, label, kind)) = best else {
        return Err(refuse(format!(
            "{:?} is not an allowed occtl command",
            words.join(" ")
        )));
    };
    let rest = &words[cmd.len()..];
    let mut argv: Vec<String> = cmd.iter().map(|w| (*w).to_owned()).collect();
    match (kind, rest) {
        (Arg::None, []) => {}
        (Arg::Username, [name]) => {
            check_username(name)?;
            argv.push((*name).to_owned());
        }
        (Arg::Id, [id]) => {
            let n: u32 = id.parse().map_err(|_| CtlError::InvalidArgument {
                field: "id",
                reason: format!("{id:?} is not a number"),
            })?;
            argv.push(check_id(n)?);
        }
        (Arg::Ip, [ip]) => {
            let ip: IpAddr = ip.parse().map_err(|_| CtlError::InvalidArgument {
                field: "ip",
                reason: format!("{ip:?} is not an IP address"),
            })?;
            argv.push(ip.to_string());
        }
        (Arg::Sid, [sid]) => {
            check_sid(sid)?;
            argv.push((*sid).to_owned());
        }
        _ => {
            return Err(refuse(format!(
                "`{label}` takes {} argument(s), got {}",
                usize::from(*kind != Arg::None),
                rest.len()
            )))
        }
    }
    Ok((label, argv))
}

/// Reads byte counters from the tun device where occtl printed none (or zeros): occtl cannot
/// read them outside ocserv's network namespace.
async fn fill_counters(sessions: Vec<OcctlSession>) -> Vec<OcctlSession> {
    let needs = |s: &OcctlSession| {
        !s.session.device.is_empty()
            && s.session
                .counters
                .is_none_or(|c| c.bytes_in == 0 && c.bytes_out == 0)
    };
    if !sessions.iter().any(needs) {
        return sessions;
    }
    let backup = sessions.clone();
    // File reads: off the async workers.
    tokio::task::spawn_blocking(move || {
        let mut sessions = sessions;
        for s in sessions.iter_mut().filter(|s| needs(s)) {
            // A derived connect time is rounded down to the minute: the worker may have
            // started up to 59 s after it.
            let at = s.session.connected_at;
            let latest = if at == 0 || s.connected_at_exact {
                at
            } else {
                at.saturating_add(59)
            };
            if let Some(c) = counters::read(&s.session.device, s.session.id, latest) {
                s.session.counters = Some(c);
            }
        }
        sessions
    })
    .await
    .unwrap_or(backup)
}

impl OcservBackend for OcctlBackend {
    async fn status(&self) -> CtlResult<ServerStatus> {
        const L: &str = "show status";
        let run = self.json(L, &["show", "status"], &[]).await?;
        parse_output(L, run.stdout, |out| occtl_json::status(out, L)).await
    }

    async fn list(&self) -> CtlResult<Vec<Session>> {
        Ok(self
            .list_detailed()
            .await?
            .into_iter()
            .map(|s| s.session)
            .collect())
    }

    async fn user_info(&self, username: &str) -> CtlResult<Vec<Session>> {
        Ok(self
            .user_info_detailed(username)
            .await?
            .into_iter()
            .map(|s| s.session)
            .collect())
    }

    async fn id_info(&self, id: u32) -> CtlResult<Option<Session>> {
        const L: &str = "show id";
        let arg = check_id(id)?;
        let run = self.json(L, &["show", "id", &arg], &[2]).await?;
        if run.code == Some(2) {
            return Ok(None);
        }
        Ok(self
            .session_list(L, run.stdout)
            .await?
            .into_iter()
            .map(|s| s.session)
            .find(|s| s.id == id))
    }

    async fn disconnect_name(&self, username: &str) -> CtlResult<DisconnectOutcome> {
        check_username(username)?;
        self.action("disconnect user", &["disconnect", "user", username])
            .await
    }

    async fn disconnect_id(&self, id: u32) -> CtlResult<DisconnectOutcome> {
        let arg = check_id(id)?;
        self.action("disconnect id", &["disconnect", "id", &arg])
            .await
    }

    /// occtl 1.1.6 has no `terminate`: this disconnects, which also invalidates the user's
    /// cookies unless ocserv runs with `persistent-cookies = true`.
    async fn terminate_user(&self, username: &str) -> CtlResult<DisconnectOutcome> {
        self.disconnect_name(username).await
    }

    /// As [`Self::terminate_user`]: a disconnect by ID.
    async fn terminate_id(&self, id: u32) -> CtlResult<DisconnectOutcome> {
        self.disconnect_id(id).await
    }

    async fn disconnect_session(&self, key: &SessionKey) -> CtlResult<DisconnectOutcome> {
        const L: &str = "show id";
        let arg = check_id(key.id)?;
        let run = self.json(L, &["show", "id", &arg], &[2]).await?;
        if run.code == Some(2) {
            return Ok(DisconnectOutcome::NotFound);
        }
        let listed = self.parse_sessions(L, run.stdout).await?;
        if !listed.iter().any(|s| key.matches(&s.session)) {
            tracing::debug!(session = %key, "session gone or its ID recycled; not disconnecting");
            return Ok(DisconnectOutcome::NotFound);
        }
        self.action("disconnect id", &["disconnect", "id", &arg])
            .await
    }

    async fn list_banned(&self) -> CtlResult<Vec<Ban>> {
        const L: &str = "show ip bans";
        let run = self.json(L, &["show", "ip", "bans"], &[]).await?;
        Ok(parse_output(L, run.stdout, |out| occtl_json::bans(out, L))
            .await?
            .items)
    }

    async fn unban_ip(&self, ip: IpAddr) -> CtlResult<DisconnectOutcome> {
        // Re-serialized from the parsed address, never caller text.
        let text = ip.to_string();
        self.action("unban ip", &["unban", "ip", &text]).await
    }

    async fn reload(&self) -> CtlResult<()> {
        const L: &str = "reload";
        let run = self.exec(L, &["reload"]).await?;
        if run.code == Some(0) {
            Ok(())
        } else {
            Err(self.failure(L, &run))
        }
    }

    async fn list_cookies(&self) -> CtlResult<Vec<Cookie>> {
        Ok(self
            .sessions(CookieFilter::All)
            .await?
            .items
            .into_iter()
            .map(|c| c.cookie)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn allowlist_accepts_and_reserializes() {
        let (label, argv) = allowlisted(&words("show ip ban points")).unwrap();
        assert_eq!(label, "show ip ban points");
        assert_eq!(argv, words("show ip ban points"));
        let (_, argv) = allowlisted(&words("unban ip 2001:db8:0::1")).unwrap();
        assert_eq!(argv, words("unban ip 2001:db8::1"));
        let (_, argv) = allowlisted(&words("disconnect id 0042")).unwrap();
        assert_eq!(argv, words("disconnect id 42"));
        assert_eq!(
            allowlisted(&words("show sessions valid")).unwrap().0,
            "show sessions valid"
        );
    }

    #[test]
    fn allowlist_refuses_with_invalid_argument() {
        for bad in [
            "show events",
            "stop now",
            "show",
            "show user",
            "show user a b",
            "show status extra",
            "sh users",
            "show user ?",
            "show user help",
            "show user -x",
            "disconnect id 0",
            "disconnect id -1",
            "disconnect id 4294967295",
            "unban ip 10.0.0.300",
            "show session ../x",
            "reset",
        ] {
            let e = allowlisted(&words(bad)).unwrap_err();
            assert!(matches!(e, CtlError::InvalidArgument { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn stderr_cleaning_drops_counter_warnings() {
        assert_eq!(
            clean_stderr(
                "nl: cannot find vpns0\nerror connecting to ocserv socket 'x': No such file\n"
            ),
            "error connecting to ocserv socket 'x': No such file"
        );
    }

    #[tokio::test]
    async fn names_are_checked_before_exec() {
        // The binary does not exist: a validation error proves nothing was exec'd.
        let b = OcctlBackend::new(
            "/nonexistent/occtl".into(),
            "/nonexistent.sock".into(),
            Duration::from_secs(1),
        );
        for name in ["?", "help", "a/b", "-rf", "a b", ""] {
            let e = b.disconnect_name(name).await.unwrap_err();
            assert!(
                matches!(e, CtlError::InvalidArgument { .. }),
                "{name:?}: {e}"
            );
        }
        assert!(matches!(
            b.id_info(0).await,
            Err(CtlError::InvalidArgument { .. })
        ));
        assert!(matches!(
            b.session("bad sid").await,
            Err(CtlError::InvalidArgument { .. })
        ));
        assert!(matches!(
            b.events(MAX_EVENTS_DURATION + Duration::from_secs(1)).await,
            Err(CtlError::InvalidArgument { .. })
        ));
        let e = b.list().await.unwrap_err();
        assert!(
            matches!(&e, CtlError::OcctlMissing { path, .. } if path == "/nonexistent/occtl"),
            "{e}"
        );
    }

    /// A stand-in "occtl" (a test-only script; the backend itself never runs a shell) in its
    /// own temp dir.
    fn script(body: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("occtl");
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        (dir, path)
    }

    /// Neither running nor a zombie: `kill(pid, 0)` says there is no such process.
    fn gone(pid: i32) -> bool {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH)
    }

    #[tokio::test]
    async fn timeout_kills_a_hanging_occtl() {
        // An occtl that never answers; it writes its PID first (`exec` keeps the PID).
        let (dir, occtl) = script("echo $$ > \"$(dirname \"$0\")/pid\"\nexec sleep 30\n");
        let b = OcctlBackend::new(
            occtl,
            "/nonexistent.sock".into(),
            Duration::from_millis(300),
        );
        let started = std::time::Instant::now();
        let e = b.status().await.unwrap_err();
        assert!(
            matches!(
                e,
                CtlError::Timeout {
                    command: "show status",
                    ..
                }
            ),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Polled with a blocking sleep: this single-threaded runtime cannot reap anything
        // meanwhile, so only the backend itself can have made the process disappear.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while !gone(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone(pid), "occtl {pid} still exists after the timeout");
    }

    /// The session `show id 10212` lists (a real capture): its ID and session id.
    const BOB_ID: u32 = 10212;
    const BOB_SID: &str = "RZkbAyh99yWRpxKvdYrG+sfJVyA=";

    /// An occtl that answers `show id 10212` with the captured fixture, `show id` of anything
    /// else with "not found" (exit 2), and `disconnect id N` with success; it logs every command.
    fn fake_occtl() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let fixture =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/occtl/id-bob.stdout");
        let (dir, occtl) = script(&format!(
            r#"log="$(dirname "$0")/log"
shift 3
echo "$*" >> "$log"
case "$1 $2 $3" in
  "show id {BOB_ID}") cat '{}' ;;
  "show id "*) printf '[\n]\n'; exit 2 ;;
  "disconnect id "*) echo "connection $3 was disconnected" ;;
  *) exit 1 ;;
esac
"#,
            fixture.display()
        ));
        let log = dir.path().join("log");
        (dir, occtl, log)
    }

    fn commands(log: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[tokio::test]
    async fn disconnect_session_checks_the_identity_first() {
        let (_dir, occtl, log) = fake_occtl();
        let b = OcctlBackend::new(occtl, "/x.sock".into(), Duration::from_secs(5));
        let key = |id, sid: &str| SessionKey {
            id,
            safe_id: Some(sid.to_owned()),
            connected_at: 1,
        };
        // The ID now belongs to another session (another session id): not disconnected.
        assert_eq!(
            b.disconnect_session(&key(BOB_ID, "AbCdEfGhIjKlMnOpQrStUvWxYz0="))
                .await
                .unwrap(),
            DisconnectOutcome::NotFound
        );
        // Gone altogether.
        assert_eq!(
            b.disconnect_session(&key(4242, BOB_SID)).await.unwrap(),
            DisconnectOutcome::NotFound
        );
        assert_eq!(commands(&log), ["show id 10212", "show id 4242"]);
        // The very session: disconnected by ID.
        assert_eq!(
            b.disconnect_session(&key(BOB_ID, BOB_SID)).await.unwrap(),
            DisconnectOutcome::Done
        );
        assert_eq!(
            commands(&log)[2..],
            ["show id 10212", "disconnect id 10212"]
        );
        assert!(matches!(
            b.disconnect_session(&key(0, BOB_SID)).await,
            Err(CtlError::InvalidArgument { field: "id", .. })
        ));
    }

    /// occtl output with an entry the parser cannot use fails the call: a list is never
    /// silently shorter.
    #[tokio::test]
    async fn an_unusable_entry_fails_the_list() {
        let (dir, occtl) = script("cat \"$(dirname \"$0\")/users.json\"\n");
        std::fs::write(
            dir.path().join("users.json"),
            r#"[ { "ID": 5, "Username": "a", "State": "connected", "Full session": "RZkbAyh99yWRpxKvdYrG+sfJVyA=" },
  { "ID": "?", "Username": "b", "State": "connected", "Full session": "GDnAGg6Vqa8411Hw9xjkUEGvwSg=" } ]
"#,
        )
        .unwrap();
        let b = OcctlBackend::new(occtl, "/x.sock".into(), Duration::from_secs(5));
        let e = b.list().await.unwrap_err();
        assert!(
            matches!(&e, CtlError::Protocol { command: "show users", reason } if reason.contains("entry 1")),
            "{e}"
        );
    }

    /// A `show users` reply far over the inline limit is parsed (on the blocking pool).
    #[tokio::test]
    async fn large_output_is_parsed() {
        let n = 1000;
        let mut text = String::from("[\n");
        for i in 1..=n {
            let comma = if i < n { "," } else { "" };
            text.push_str(&format!(
                "{{ \"ID\": {i}, \"Username\": \"user{i}\", \"State\": \"connected\", \
                 \"Full session\": \"{i:0>27}=\", \"Hostname\": \"{}\" }}{comma}\n",
                "h".repeat(100),
            ));
        }
        text.push_str("]\n");
        assert!(text.len() > INLINE_DECODE_LIMIT);
        let (dir, occtl) = script("cat \"$(dirname \"$0\")/users.json\"\n");
        std::fs::write(dir.path().join("users.json"), &text).unwrap();
        let b = OcctlBackend::new(occtl, "/x.sock".into(), Duration::from_secs(10));
        let list = b.list().await.unwrap();
        assert_eq!(list.len(), n);
        assert_eq!(list[n - 1].username, format!("user{n}"));
        assert_eq!(list[n - 1].safe_id.as_deref().map(str::len), Some(28));
    }
}
