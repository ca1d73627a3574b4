//! `ocserv-agent-hook`: the program ocserv's connect-, disconnect- and host-update-script runs
//! (through `contrib/ocserv-agent-hook.sh`, since ocserv-fw can only run `/bin/sh` scripts).
//!
//! Role: turn one script invocation into one question to the agent and an exit code, within a
//! hard deadline, whatever state the agent is in. std only (plus serde_json through
//! `hook_proto`): ocserv forks this for every connect, so start-up must be cheap.
//!
//! Inputs: ocserv's script environment (`REASON`, `ID`, `USERNAME`, ...; see
//! `hook_proto::request_from_env`), and the settings below. Output: the exit code, and one line
//! on stderr whenever it refuses or applies its fail mode (ocserv logs it).
//!
//! ```text
//! ocserv-agent-hook [--socket PATH] [--timeout DURATION] [--fail-mode deny|allow]
//! ```
//! Each flag also reads an environment variable (`OCSERV_AGENT_HOOK_SOCKET`,
//! `OCSERV_AGENT_HOOK_TIMEOUT`, `OCSERV_AGENT_HOOK_FAIL_MODE`); a flag wins over the variable, the
//! variable over the default (`/run/ocserv-agent/hook.sock`, `3s`, `deny`). An empty variable
//! counts as unset. Durations are a decimal number and a unit, `ms` or `s` (`250ms`, `3s`,
//! `1.5s`), from 1 ms to 120 s.
//!
//! Exit codes: 0 admitted; 1 refused (by the agent, by the fail mode `deny`, or because the
//! environment cannot make a valid request); 2 usage or configuration error, reported before
//! anything is sent. ocserv treats every non-zero code as a refusal, so a broken configuration
//! (including an invalid fail mode) refuses every connect loudly instead of admitting silently.
//! `--help` prints the usage and exits 0.
//!
//! Failure behaviour: the deadline (`--timeout`, counted from start) bounds everything. The
//! exchange runs on a worker thread; the main thread waits for its result only until the
//! deadline and then applies the fail mode and exits, so no blocking call (connect to a
//! saturated socket, a silent agent) can hold it longer. While the socket is missing or refuses
//! connections (agent restarting) it retries with a backoff of 20 ms doubling to 200 ms. Once
//! connected, the socket's read and write timeouts are the time left. The fail mode applies when
//! no valid answer arrives in time: socket missing or refusing until the deadline, other connect
//! errors (permission), the agent closing without an answer, an answer that is not a valid frame
//! or not a valid answer (garbage, oversized), or no answer in time. A valid refusal from the
//! agent is never overridden by the fail mode. A request is sent at most once (no retry after
//! sending, so an event is never reported twice by the hook).
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ocserv_agent::hook_proto::{self, HookResponse};

const DEFAULT_SOCKET: &str = "/run/ocserv-agent/hook.sock";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
const MIN_TIMEOUT: Duration = Duration::from_millis(1);
const MAX_TIMEOUT: Duration = Duration::from_secs(120);
const ENV_SOCKET: &str = "OCSERV_AGENT_HOOK_SOCKET";
const ENV_TIMEOUT: &str = "OCSERV_AGENT_HOOK_TIMEOUT";
const ENV_FAIL_MODE: &str = "OCSERV_AGENT_HOOK_FAIL_MODE";
/// First and largest pause between connect attempts while the socket is missing or refusing.
const BACKOFF_FIRST: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(200);
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Longest agent text echoed on stderr.
const MAX_ECHO: usize = 512;

const EXIT_ADMIT: u8 = 0;
const EXIT_DENY: u8 = 1;
const EXIT_USAGE: u8 = 2;

const USAGE: &str = "\
usage: ocserv-agent-hook [--socket PATH] [--timeout DURATION] [--fail-mode deny|allow]

Asks ocserv-agent to decide on one ocserv connect/disconnect/host-update event, read from
ocserv's script environment (REASON, ID, USERNAME, ...). Run by ocserv through
ocserv-agent-hook.sh.

options (each also read from an environment variable; the flag wins):
  --socket PATH        agent hook socket       [OCSERV_AGENT_HOOK_SOCKET, default /run/ocserv-agent/hook.sock]
  --timeout DURATION   overall deadline, e.g. 250ms, 3s, 1.5s (1ms to 120s)
                                               [OCSERV_AGENT_HOOK_TIMEOUT, default 3s]
  --fail-mode MODE     deny or allow, applied when the agent gives no valid answer in time
                                               [OCSERV_AGENT_HOOK_FAIL_MODE, default deny]
  -h, --help           print this help

exit codes: 0 admit, 1 deny, 2 usage or configuration error (ocserv treats it as deny)
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailMode {
    Deny,
    Allow,
}

impl FailMode {
    fn as_str(self) -> &'static str {
        match self {
            FailMode::Deny => "deny",
            FailMode::Allow => "allow",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    socket: PathBuf,
    timeout: Duration,
    fail_mode: FailMode,
}

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Help,
    Run(Settings),
}

/// Parses a duration: decimal digits, an optional fraction, and a unit `ms` or `s`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration like 250ms, 3s or 1.5s");
    let (number, nanos_per_unit) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1_000_000u128)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1_000_000_000u128)
    } else {
        return Err(bad());
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty()
        || !digits(whole)
        || !digits(fraction)
        || (number.contains('.') && fraction.is_empty())
        || whole.len() > 12
        || fraction.len() > 9
    {
        return Err(bad());
    }
    // whole has at most 12 digits and fraction at most 9: no overflow in u128.
    let whole: u128 = whole.parse().map_err(|_| bad())?;
    let scale = 10u128.pow(fraction.len() as u32);
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| bad())?
    };
    let nanos = whole * nanos_per_unit + fraction * nanos_per_unit / scale;
    let limit = MAX_TIMEOUT.as_nanos();
    if nanos > limit {
        return Err(format!("{text:?} is longer than the limit of 120s"));
    }
    // At most 120 s in nanoseconds: fits in u64.
    let d = Duration::from_nanos(nanos as u64);
    if d < MIN_TIMEOUT {
        return Err(format!("{text:?} is shorter than the minimum of 1ms"));
    }
    Ok(d)
}

fn parse_fail_mode(text: &str) -> Result<FailMode, String> {
    match text {
        "deny" => Ok(FailMode::Deny),
        "allow" => Ok(FailMode::Allow),
        _ => Err(format!("{text:?} is not a fail mode; use deny or allow")),
    }
}

fn parse_socket(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("the socket path must not be empty".into());
    }
    if text.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "the socket path is {} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}",
            text.len()
        ));
    }
    Ok(PathBuf::from(text))
}

/// Reads the command line (without the program name) and the three settings variables.
/// `lookup` returns a variable's value; an empty value counts as unset.
fn parse_command(
    args: impl IntoIterator<Item = OsString>,
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<Command, String> {
    let mut socket: Option<String> = None;
    let mut timeout: Option<String> = None;
    let mut fail_mode: Option<String> = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let slot = match flag.as_str() {
            "--socket" => &mut socket,
            "--timeout" => &mut timeout,
            "--fail-mode" => &mut fail_mode,
            _ => return Err(format!("unknown argument {arg:?}")),
        };
        if slot.is_some() {
            return Err(format!("{flag} is given twice"));
        }
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .ok_or_else(|| format!("{flag} needs a value"))?
                .into_string()
                .map_err(|v| format!("the value of {flag}, {v:?}, is not UTF-8"))?,
        };
        *slot = Some(value);
    }

    // Flag, else a non-empty variable, else the default. `source` names where a bad value came from.
    let pick = |flag: Option<String>, name: &str, var: &'static str| {
        if let Some(v) = flag {
            return Ok(Some((v, format!("--{name}"))));
        }
        match lookup(var) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => v
                .into_string()
                .map(|v| Some((v, var.to_owned())))
                .map_err(|v| format!("{var} is not UTF-8: {v:?}")),
        }
    };
    let with_source = |source: String| move |reason: String| format!("invalid {source}: {reason}");

    let socket = match pick(socket, "socket", ENV_SOCKET)? {
        Some((v, source)) => parse_socket(&v).map_err(with_source(source))?,
        None => PathBuf::from(DEFAULT_SOCKET),
    };
    let timeout = match pick(timeout, "timeout", ENV_TIMEOUT)? {
        Some((v, source)) => parse_duration(&v).map_err(with_source(source))?,
        None => DEFAULT_TIMEOUT,
    };
    let fail_mode = match pick(fail_mode, "fail-mode", ENV_FAIL_MODE)? {
        Some((v, source)) => parse_fail_mode(&v).map_err(with_source(source))?,
        None => FailMode::Deny,
    };
    Ok(Command::Run(Settings {
        socket,
        timeout,
        fail_mode,
    }))
}

/// Why no valid answer arrived; the text goes to stderr after "agent ".
#[derive(Debug)]
enum Unreachable {
    /// Connect kept failing with "missing" or "refused" until the deadline.
    NotListening(std::io::Error),
    /// Connect failed in a way retrying cannot fix (permission, not a socket, ...).
    Connect(std::io::Error),
    Send(hook_proto::FrameError),
    Receive(hook_proto::FrameError),
    Invalid(hook_proto::ResponseError),
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreachable::NotListening(e) => write!(f, "not listening ({e})"),
            Unreachable::Connect(e) => write!(f, "socket cannot be connected ({e})"),
            Unreachable::Send(e) => write!(f, "request could not be sent ({e})"),
            Unreachable::Receive(e) => write!(f, "answer could not be read ({e})"),
            Unreachable::Invalid(e) => write!(f, "gave an invalid answer ({e})"),
        }
    }
}

fn retryable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    // WouldBlock: the listen backlog is full (EAGAIN on Unix sockets).
    matches!(
        e.kind(),
        NotFound | ConnectionRefused | WouldBlock | Interrupted
    )
}

/// What the exchange thread reports to the main thread, so that a deadline that passes
/// mid-way is explained by the step it passed in.
#[derive(Debug)]
enum Progress {
    /// A connect attempt failed in a retryable way; another follows after a pause.
    Retrying(std::io::Error),
    Connected,
    Sent,
    Finished(Result<HookResponse, Unreachable>),
}

/// The step the exchange was in when the deadline passed, as shown on stderr.
fn stalled_at(last: &Option<Progress>) -> String {
    match last {
        None => "connecting did not finish before the deadline".into(),
        Some(Progress::Retrying(e)) => format!("agent not listening ({e}) until the deadline"),
        Some(Progress::Connected) => "the request could not be sent before the deadline".into(),
        Some(Progress::Sent) | Some(Progress::Finished(_)) => {
            "no answer before the deadline".into()
        }
    }
}

/// Connects (retrying while the agent is absent), sends the frame once and reads one answer,
/// reporting each step on `progress`.
fn exchange(
    socket: &std::path::Path,
    frame: &[u8],
    deadline: Instant,
    progress: &mpsc::Sender<Progress>,
) -> Result<HookResponse, Unreachable> {
    // The receiver may be gone after the deadline; the process is exiting then.
    let report = |p: Progress| {
        let _ = progress.send(p);
    };
    let mut pause = BACKOFF_FIRST;
    let mut stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if retryable(&e) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Unreachable::NotListening(e));
                }
                report(Progress::Retrying(e));
                thread::sleep(pause.min(left));
                pause = (pause * 2).min(BACKOFF_MAX);
            }
            Err(e) => return Err(Unreachable::Connect(e)),
        }
    };
    report(Progress::Connected);
    // A timeout of zero means "block forever" to std; the main thread's deadline bounds the
    // process anyway, but a positive value keeps this thread from outliving it by much.
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    stream
        .set_write_timeout(Some(left()))
        .and_then(|()| stream.write_all(frame))
        .and_then(|()| stream.flush())
        .map_err(|e| Unreachable::Send(e.into()))?;
    report(Progress::Sent);
    stream
        .set_read_timeout(Some(left()))
        .map_err(|e| Unreachable::Receive(e.into()))?;
    let payload = hook_proto::read_frame(&mut stream).map_err(Unreachable::Receive)?;
    hook_proto::parse_response(&payload).map_err(Unreachable::Invalid)
}

/// One line of agent text for stderr: control characters replaced, length bounded.
fn echo(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ECHO)
        .collect();
    if text.chars().count() > MAX_ECHO {
        out.push('…');
    }
    out
}

fn fail(settings: &Settings, why: &str) -> ExitCode {
    let (code, verdict) = match settings.fail_mode {
        FailMode::Deny => (EXIT_DENY, "refusing"),
        FailMode::Allow => (EXIT_ADMIT, "admitting"),
    };
    eprintln!(
        "ocserv-agent-hook: no decision from the agent at {} within {:?}: {why}; fail mode {}: {verdict}",
        settings.socket.display(),
        settings.timeout,
        settings.fail_mode.as_str(),
    );
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let started = Instant::now();
    let command = parse_command(std::env::args_os().skip(1), |var| std::env::var_os(var));
    let settings = match command {
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::from(EXIT_ADMIT);
        }
        Ok(Command::Run(s)) => s,
        Err(e) => {
            eprintln!("ocserv-agent-hook: {e}; refusing (run with --help for usage)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let deadline = started + settings.timeout;

    let request = match hook_proto::request_from_env(std::env::vars_os()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ocserv-agent-hook: cannot build a request: {e}; refusing");
            return ExitCode::from(EXIT_DENY);
        }
    };
    let frame = match request.to_frame() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ocserv-agent-hook: cannot encode the request: {e}; refusing");
            return ExitCode::from(EXIT_DENY);
        }
    };

    let (tx, rx) = mpsc::channel();
    let socket = settings.socket.clone();
    let spawned = thread::Builder::new()
        .name("exchange".into())
        .spawn(move || {
            let result = exchange(&socket, &frame, deadline, &tx);
            let _ = tx.send(Progress::Finished(result));
        });
    if let Err(e) = spawned {
        return fail(
            &settings,
            &format!("cannot start the exchange thread ({e})"),
        );
    }
    let mut last: Option<Progress> = None;
    let answer = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Progress::Finished(Ok(answer))) => break answer,
            Ok(Progress::Finished(Err(why))) => return fail(&settings, &format!("agent {why}")),
            Ok(step) => last = Some(step),
            Err(mpsc::RecvTimeoutError::Timeout) => return fail(&settings, &stalled_at(&last)),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return fail(&settings, "the exchange thread ended without a result")
            }
        }
    };
    if answer.allowed {
        return ExitCode::from(EXIT_ADMIT);
    }
    let mut line = format!(
        "ocserv-agent-hook: {} session {} of {:?} refused by the agent",
        request.reason.as_str(),
        request.session_id,
        echo(&request.username),
    );
    if let Some(source) = answer.source {
        line.push_str(&format!(" ({})", source.as_str()));
    }
    if let Some(error) = answer.error.as_deref().filter(|e| !e.is_empty()) {
        line.push_str(&format!(": {}", echo(error)));
    }
    if let Some(message) = answer.message.as_deref().filter(|m| !m.is_empty()) {
        line.push_str(&format!(": {}", echo(message)));
    }
    eprintln!("{line}");
    ExitCode::from(EXIT_DENY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Command, String> {
        let env: Vec<(String, OsString)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        parse_command(args.iter().map(OsString::from), move |var| {
            env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone())
        })
    }

    fn settings(socket: &str, ms: u64, fail_mode: FailMode) -> Command {
        Command::Run(Settings {
            socket: socket.into(),
            timeout: Duration::from_millis(ms),
            fail_mode,
        })
    }

    #[test]
    fn durations() {
        for (text, ms) in [
            ("250ms", 250),
            ("3s", 3000),
            ("1.5s", 1500),
            ("0.25s", 250),
            ("1ms", 1),
            ("120s", 120_000),
            ("0.001s", 1),
        ] {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_millis(ms),
                "{text}"
            );
        }
        assert_eq!(
            parse_duration("1.000000001s").unwrap(),
            Duration::from_nanos(1_000_000_001)
        );
        for bad in [
            "",
            "3",
            "s",
            "ms",
            "1.s",
            ".5s",
            "-1s",
            "1 s",
            "1m",
            "1h",
            "1.5.0s",
            "+3s",
            "3S",
            "1.0000000001s",
            "9999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("0s").unwrap_err().contains("minimum"));
        assert!(parse_duration("0.5ms").unwrap_err().contains("minimum"));
        assert!(parse_duration("121s").unwrap_err().contains("limit"));
        assert!(parse_duration("120001ms").unwrap_err().contains("limit"));
    }

    #[test]
    fn defaults_then_env_then_flags() {
        assert_eq!(
            parse_command(Vec::<OsString>::new(), no_env).unwrap(),
            settings(DEFAULT_SOCKET, 3000, FailMode::Deny)
        );
        let env = [
            (ENV_SOCKET, "/tmp/env.sock"),
            (ENV_TIMEOUT, "250ms"),
            (ENV_FAIL_MODE, "allow"),
        ];
        assert_eq!(
            run(&[], &env).unwrap(),
            settings("/tmp/env.sock", 250, FailMode::Allow)
        );
        assert_eq!(
            run(
                &[
                    "--socket",
                    "/tmp/flag.sock",
                    "--timeout=1.5s",
                    "--fail-mode",
                    "deny"
                ],
                &env
            )
            .unwrap(),
            settings("/tmp/flag.sock", 1500, FailMode::Deny)
        );
        // Empty variables count as unset.
        let empty = [(ENV_SOCKET, ""), (ENV_TIMEOUT, ""), (ENV_FAIL_MODE, "")];
        assert_eq!(
            run(&[], &empty).unwrap(),
            settings(DEFAULT_SOCKET, 3000, FailMode::Deny)
        );
        assert_eq!(run(&["--help"], &[]).unwrap(), Command::Help);
        assert_eq!(run(&["--socket", "/x", "-h"], &[]).unwrap(), Command::Help);
    }

    #[test]
    fn usage_errors_name_the_source() {
        for (args, env, needle) in [
            (&["--fail-mode", "open"][..], &[][..], "--fail-mode"),
            (&[], &[(ENV_FAIL_MODE, "alow")][..], ENV_FAIL_MODE),
            (&[], &[(ENV_TIMEOUT, "3")][..], ENV_TIMEOUT),
            (&["--timeout", "0s"], &[], "--timeout"),
            (&["--socket", ""], &[], "--socket"),
            (&["--socket"], &[], "needs a value"),
            (&["--bogus"], &[], "unknown argument"),
            (&["socket"], &[], "unknown argument"),
            (&["--timeout", "1s", "--timeout", "2s"], &[], "twice"),
        ] {
            let e = run(args, env).unwrap_err();
            assert!(e.contains(needle), "{args:?} {env:?}: {e}");
        }
        let long = format!("/{}", "s".repeat(MAX_SOCKET_PATH));
        assert!(run(&["--socket", &long], &[])
            .unwrap_err()
            .contains("at most"));
        // A flag overrides a broken variable: only the value in effect is checked.
        assert!(run(&["--fail-mode", "deny"], &[(ENV_FAIL_MODE, "bogus")]).is_ok());
    }

    #[test]
    fn echo_is_one_bounded_line() {
        assert_eq!(echo("a\nb\tc"), "a b c");
        let long = "x".repeat(MAX_ECHO + 10);
        let e = echo(&long);
        assert!(e.ends_with('…') && e.chars().count() == MAX_ECHO + 1);
        assert_eq!(echo("é"), "é");
    }
}
