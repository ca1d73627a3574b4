//! The real `ocserv-agent-hook` binary against a tiny in-test agent on a Unix socket.
//!
//! Every run clears the environment and sets only the variables the test chooses, so nothing
//! leaks in from the outer environment (`OCSERV_AGENT_HOOK_*` in particular). Deadlines are
//! checked with generous slack: this runs on a loaded 2-core machine, and the point is "never
//! hangs", not speed.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ocserv_agent::hook_proto::{
    self, encode_frame, parse_request, HookRequest, HookResponse, Reason, Source, MAX_FRAME,
};

const HOOK: &str = env!("CARGO_BIN_EXE_ocserv-agent-hook");
/// Added to every deadline before a run counts as hung.
const SLACK: Duration = Duration::from_secs(5);
/// A run that has not ended after this long is killed and the test fails.
const HUNG: Duration = Duration::from_secs(60);

/// What the in-test agent does after reading the request.
#[derive(Clone)]
enum Behaviour {
    /// Answers with this response.
    Answer(HookResponse),
    /// Writes these bytes as they are, then closes.
    Raw(Vec<u8>),
    /// Closes without answering.
    Close,
    /// Keeps the connection open and says nothing until told to stop.
    Silent,
}

/// An in-test agent serving one connection.
struct Agent {
    /// The request payload it read (None when it read no whole frame).
    received: JoinHandle<Option<Vec<u8>>>,
    /// Dropping this ends a `Silent` agent.
    _release: mpsc::Sender<()>,
}

impl Agent {
    fn start(path: &Path, behaviour: Behaviour, bind_after: Duration) -> Agent {
        let (release, released) = mpsc::channel::<()>();
        let path = path.to_owned();
        let received = thread::spawn(move || {
            thread::sleep(bind_after);
            let listener = UnixListener::bind(&path).expect("bind the test socket");
            let (mut stream, _) = listener.accept().expect("accept");
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let request = hook_proto::read_frame(&mut stream).ok();
            match behaviour {
                Behaviour::Answer(r) => {
                    let _ = stream.write_all(&r.to_frame().unwrap());
                }
                Behaviour::Raw(bytes) => {
                    let _ = stream.write_all(&bytes);
                }
                Behaviour::Close => {}
                Behaviour::Silent => {
                    let _ = released.recv_timeout(HUNG);
                }
            }
            request
        });
        Agent {
            received,
            _release: release,
        }
    }

    fn request(self) -> HookRequest {
        let payload = self.received.join().unwrap().expect("agent got a request");
        assert!(payload.len() <= MAX_FRAME);
        parse_request(&payload).expect("the hook's request parses")
    }
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

fn connect_env() -> Vec<(OsString, OsString)> {
    [
        ("REASON", "connect"),
        ("ID", "31337"),
        ("USERNAME", "alice"),
        ("GROUPNAME", "staff"),
        ("DEVICE", "vpns3"),
        ("IP_REAL", "203.0.113.9"),
        ("IP_REMOTE", "192.168.99.40"),
    ]
    .iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect()
}

/// Runs `program` with exactly `env` and `args`, killing it (and failing) if it hangs.
fn run_program(
    program: &Path,
    pre_args: &[&str],
    args: &[&str],
    env: &[(OsString, OsString)],
) -> Outcome {
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(pre_args)
        .args(args)
        .env_clear()
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the hook");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > HUNG {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the hook ran for more than {HUNG:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let elapsed = started.elapsed();
    Outcome {
        code: status.code().expect("exited, not killed by a signal"),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        elapsed,
    }
}

fn run_hook(args: &[&str], env: &[(OsString, OsString)]) -> Outcome {
    run_program(Path::new(HOOK), &[], args, env)
}

fn sock(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("hook.sock")
}

fn args<'a>(socket: &'a Path, timeout: &'a str) -> Vec<&'a str> {
    vec!["--socket", socket.to_str().unwrap(), "--timeout", timeout]
}

#[test]
fn admitted_exits_0_and_sends_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir);
    let agent = Agent::start(
        &s,
        Behaviour::Answer(HookResponse::allow(Source::Fresh)),
        Duration::ZERO,
    );
    let o = run_hook(&args(&s, "5s"), &connect_env());
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    assert_eq!(o.stderr, "");
    let r = agent.request();
    assert_eq!(r.reason, Reason::Connect);
    assert_eq!(r.session_id, 31337);
    assert_eq!(r.username, "alice");
}

#[test]
fn denied_exits_1_and_prints_the_agents_reason() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir);
    let answer = HookResponse::deny(Source::Cached, "account revoked\nby admin")
        .with_message("contact the helpdesk");
    let agent = Agent::start(&s, Behaviour::Answer(answer), Duration::ZERO);
    // fail mode allow must not turn a real refusal into an admission.
    let mut a = args(&s, "5s");
    a.extend(["--fail-mode", "allow"]);
    let o = run_hook(&a, &connect_env());
    assert_eq!(o.code, 1, "stderr: {}", o.stderr);
    assert!(
        o.stderr.contains("account revoked by admin"),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("contact the helpdesk"), "{}", o.stderr);
    assert!(o.stderr.contains("(cached)"), "{}", o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    agent.request();
}

#[test]
fn agent_absent_fail_mode_deny_refuses_within_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir);
    let o = run_hook(&args(&s, "400ms"), &connect_env());
    assert_eq!(o.code, 1, "stderr: {}", o.stderr);
    assert!(o.stderr.contains("fail mode deny"), "{}", o.stderr);
    assert!(o.stderr.contains("not listening"), "{}", o.stderr);
    // It kept retrying until the deadline, and stopped then.
    assert!(o.elapsed >= Duration::from_millis(400), "{:?}", o.elapsed);
    assert!(
        o.elapsed < Duration::from_millis(400) + SLACK,
        "{:?}",
        o.elapsed
    );
}

#[test]
fn agent_absent_fail_mode_allow_admits_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir);
    let mut a = args(&s, "300ms");
    a.extend(["--fail-mode", "allow"]);
    let o = run_hook(&a, &connect_env());
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    assert!(o.stderr.contains("fail mode allow"), "{}", o.stderr);
    assert!(o.stderr.contains("admitting"), "{}", o.stderr);
    assert!(o.stderr.contains("not listening"), "{}", o.stderr);
    assert!(o.elapsed < Duration::from_millis(300) + SLACK);

    // The same through the environment variables alone (what the shipped wrapper relies on).
    let mut env = connect_env();
    env.push(("OCSERV_AGENT_HOOK_SOCKET".into(), s.clone().into()));
    env.push(("OCSERV_AGENT_HOOK_TIMEOUT".into(), "300ms".into()));
    env.push(("OCSERV_AGENT_HOOK_FAIL_MODE".into(), "allow".into()));
    let o = run_hook(&[], &env);
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    assert!(o.stderr.contains(s.to_str().unwrap()), "{}", o.stderr);
    // The flag wins over the variable.
    let o = run_hook(&["--fail-mode", "deny"], &env);
    assert_eq!(o.code, 1, "stderr: {}", o.stderr);
    assert!(o.stderr.contains("fail mode deny"), "{}", o.stderr);
}

#[test]
fn silent_agent_gets_the_fail_mode_within_the_deadline() {
    for (mode, code) in [("deny", 1), ("allow", 0)] {
        let dir = tempfile::tempdir().unwrap();
        let s = sock(&dir);
        let agent = Agent::start(&s, Behaviour::Silent, Duration::ZERO);
        let mut a = args(&s, "500ms");
        a.extend(["--fail-mode", mode]);
        let o = run_hook(&a, &connect_env());
        assert_eq!(o.code, code, "{mode}: {}", o.stderr);
        assert!(
            o.stderr.contains(&format!("fail mode {mode}")),
            "{}",
            o.stderr
        );
        assert!(o.elapsed >= Duration::from_millis(500), "{:?}", o.elapsed);
        assert!(
            o.elapsed < Duration::from_millis(500) + SLACK,
            "{:?}",
            o.elapsed
        );
        drop(agent._release);
        let payload = agent.received.join().unwrap().expect("request was sent");
        parse_request(&payload).unwrap();
    }
}

#[test]
fn agent_restarting_socket_appears_later_and_its_answer_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir);
    // The agent refuses; the fail mode would admit: exit 1 proves the agent's answer was used.
    let agent = Agent::start(
        &s,
        Behaviour::Answer(HookResponse::deny(Source::Fresh, "not today")),
        Duration::from_millis(300),
    );
    let mut a = args(&s, "10s");
    a.extend(["--fail-mode", "allow"]);
    let o = run_hook(&a, &connect_env());
    assert_eq!(o.code, 1, "stderr: {}", o.stderr);
    assert!(o.stderr.contains("not today"), "{}", o.stderr);
    assert!(!o.stderr.contains("fail mode"), "{}", o.stderr);
    assert!(o.elapsed >= Duration::from_millis(300));
    agent.request();
}

#[test]
fn invalid_answers_get_the_fail_mode() {
    let garbage = encode_frame(b"this is not json").unwrap();
    let mut oversized = (MAX_FRAME as u32 + 1).to_be_bytes().to_vec();
    oversized.extend(vec![b' '; 64]);
    let cases: Vec<(&str, Behaviour, &str)> = vec![
        ("garbage", Behaviour::Raw(garbage), "invalid answer"),
        (
            "no allowed",
            Behaviour::Raw(encode_frame(br#"{"message":"hi"}"#).unwrap()),
            "invalid answer",
        ),
        ("oversized", Behaviour::Raw(oversized), "frame length"),
        (
            "empty frame",
            Behaviour::Raw(vec![0, 0, 0, 0]),
            "frame length is 0",
        ),
        (
            "truncated",
            Behaviour::Raw(vec![0, 0, 0, 50, b'{']),
            "truncated",
        ),
        ("closed", Behaviour::Close, "truncated"),
    ];
    for (name, behaviour, why) in cases {
        for (mode, code) in [("allow", 0), ("deny", 1)] {
            let dir = tempfile::tempdir().unwrap();
            let s = sock(&dir);
            let agent = Agent::start(&s, behaviour.clone(), Duration::ZERO);
            let mut a = args(&s, "5s");
            a.extend(["--fail-mode", mode]);
            let o = run_hook(&a, &connect_env());
            assert_eq!(o.code, code, "{name}/{mode}: {}", o.stderr);
            assert!(
                o.stderr.contains(&format!("fail mode {mode}")),
                "{name}: {}",
                o.stderr
            );
            assert!(o.stderr.contains(why), "{name}: {}", o.stderr);
            assert_eq!(o.stderr.lines().count(), 1, "{name}: {}", o.stderr);
            agent.request();
        }
    }
}

#[test]
fn disconnect_request_carries_every_field_from_the_env() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir);
    let agent = Agent::start(
        &s,
        Behaviour::Answer(HookResponse::allow(Source::LocalPolicy)),
        Duration::ZERO,
    );
    let env: Vec<(OsString, OsString)> = [
        ("REASON", "disconnect"),
        ("ID", "4711"),
        ("USERNAME", "jürgen"),
        ("GROUPNAME", "ops"),
        ("VHOST", "vpn.example"),
        ("DEVICE", "vpns7"),
        ("IP_REAL", "2001:db8::7"),
        ("IP_REAL_LOCAL", "2001:db8::1"),
        ("IP_LOCAL", "192.168.99.1"),
        ("IP_REMOTE", "192.168.99.77"),
        ("HOSTNAME", "agent-host"),
        ("REMOTE_HOSTNAME", "juergen-laptop"),
        ("USER_AGENT", "AnyConnect Windows 4.10.07061"),
        ("DEVICE_TYPE", "windows-64"),
        ("DEVICE_PLATFORM", "win"),
        (
            "OCSERV_ROUTES",
            "10.10.0.0/255.255.0.0 172.16.0.0/255.240.0.0 ",
        ),
        ("OCSERV_DNS", "192.168.99.1 "),
        ("STATS_BYTES_IN", "1048576"),
        ("STATS_BYTES_OUT", "73400320"),
        ("STATS_DURATION", "3600"),
    ]
    .iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect();
    let o = run_hook(&args(&s, "5s"), &env);
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    let payload = agent.received.join().unwrap().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert!(
        json["session_id"].is_u64(),
        "the hook sends a number: {json}"
    );
    let r = parse_request(&payload).unwrap();
    let ip = |s: &str| Some(s.parse().unwrap());
    assert_eq!(
        r,
        HookRequest {
            reason: Reason::Disconnect,
            username: "jürgen".into(),
            groupname: "ops".into(),
            ip_real: ip("2001:db8::7"),
            ip_remote: ip("192.168.99.77"),
            device: "vpns7".into(),
            session_id: 4711,
            vhost: Some("vpn.example".into()),
            ip_real_local: ip("2001:db8::1"),
            ip_local: ip("192.168.99.1"),
            user_agent: Some("AnyConnect Windows 4.10.07061".into()),
            hostname: Some("juergen-laptop".into()),
            device_type: Some("windows-64".into()),
            device_platform: Some("win".into()),
            routes: vec![
                "10.10.0.0/255.255.0.0".into(),
                "172.16.0.0/255.240.0.0".into()
            ],
            dns: vec!["192.168.99.1".parse().unwrap()],
            stats_bytes_in: Some(1_048_576),
            stats_bytes_out: Some(73_400_320),
            stats_duration: Some(3600),
        }
    );
}

#[test]
fn odd_environments_never_panic() {
    // Non-UTF-8 values and about 1 MB of environment in all. Linux caps one environment string
    // at 128 KiB (MAX_ARG_STRLEN), so the megabyte is spread over eight variables.
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir);
    let agent = Agent::start(
        &s,
        Behaviour::Answer(HookResponse::allow(Source::Fresh)),
        Duration::ZERO,
    );
    let mut env = connect_env();
    env.push((
        "USER_AGENT".into(),
        OsString::from_vec(b"client\xff\xfe/1.0".to_vec()),
    ));
    let big = |b: u8| OsString::from_vec(vec![b; 130_000]);
    let routes: String = (0..6000)
        .map(|i| format!("10.{}.{}.0/255.255.255.0 ", i / 256, i % 256))
        .collect::<String>()[..130_000]
        .to_owned();
    env.push(("OCSERV_ROUTES".into(), routes.into()));
    for (var, byte) in [
        ("REMOTE_HOSTNAME", b'h'),
        ("DEVICE_TYPE", 0x01),
        ("DEVICE_PLATFORM", 0xff),
        ("OCSERV_ROUTES4", b'4'),
        ("OCSERV_ROUTES6", b'6'),
        ("OCSERV_NO_ROUTES", b'n'),
        ("UNRELATED", b'u'),
    ] {
        env.push((var.into(), big(byte)));
    }
    let o = run_hook(&args(&s, "5s"), &env);
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    let r = agent.request();
    assert_eq!(r.user_agent.as_deref(), Some("client\u{fffd}\u{fffd}/1.0"));
    assert_eq!(r.hostname.unwrap().len(), hook_proto::MAX_TEXT_BYTES);
    assert_eq!(
        r.device_type.unwrap(),
        "\u{1}".repeat(hook_proto::MAX_TEXT_BYTES)
    );
    // 0xff is not UTF-8: each byte became U+FFFD (3 bytes), then the text was cut.
    let platform = r.device_platform.unwrap();
    assert!(platform.chars().all(|c| c == '\u{fffd}'));
    assert!(platform.len() > hook_proto::MAX_TEXT_BYTES - 3);
    // The route list was cut to its budget, keeping the leading routes.
    assert!(
        r.routes.len() > 100 && r.routes.len() < 6000,
        "{}",
        r.routes.len()
    );
    assert_eq!(r.routes[1], "10.0.1.0/255.255.255.0");
}

/// The listener at `path` saw no connection at all.
fn assert_never_contacted(listener: &UnixListener) {
    listener.set_nonblocking(true).unwrap();
    let e = listener.accept().map(|_| ()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
}

#[test]
fn unusable_environments_are_refused_without_asking() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir);
    let listener = UnixListener::bind(&s).unwrap();
    let with = |var: &str, value: OsString| {
        let mut env: Vec<_> = connect_env()
            .into_iter()
            .filter(|(k, _)| k != var)
            .collect();
        env.push((var.into(), value));
        env
    };
    let cases: Vec<(Vec<(OsString, OsString)>, &str)> = vec![
        (Vec::new(), "REASON"),
        (with("REASON", "login".into()), "REASON"),
        (with("ID", "".into()), "ID"),
        (with("ID", OsString::from_vec(b"12\xff".to_vec())), "ID"),
        (with("USERNAME", "".into()), "USERNAME"),
        (with("USERNAME", "u".repeat(100_000).into()), "USERNAME"),
        (with("IP_REAL", "not-an-address".into()), "IP_REAL"),
        (
            with("OCSERV_ROUTES", "r".repeat(130_000).into()),
            "OCSERV_ROUTES",
        ),
    ];
    for (env, var) in cases {
        // Fail mode allow: an unusable environment is still a refusal, never an admission.
        let mut a = args(&s, "5s");
        a.extend(["--fail-mode", "allow"]);
        let o = run_hook(&a, &env);
        assert_eq!(o.code, 1, "{var}: {}", o.stderr);
        assert!(o.stderr.contains(var), "{var}: {}", o.stderr);
        assert!(o.stderr.contains("refusing"), "{var}: {}", o.stderr);
        assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    }
    assert_never_contacted(&listener);
}

#[test]
fn usage_errors_exit_2_and_never_admit() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir);
    let listener = UnixListener::bind(&s).unwrap();
    let mut env = connect_env();
    env.push(("OCSERV_AGENT_HOOK_SOCKET".into(), s.clone().into()));
    for (extra_env, a, needle) in [
        (
            Some(("OCSERV_AGENT_HOOK_FAIL_MODE", "alow")),
            vec![],
            "OCSERV_AGENT_HOOK_FAIL_MODE",
        ),
        (
            Some(("OCSERV_AGENT_HOOK_TIMEOUT", "3")),
            vec![],
            "OCSERV_AGENT_HOOK_TIMEOUT",
        ),
        (None, vec!["--fail-mode", "open"], "--fail-mode"),
        (None, vec!["--timeout", "forever"], "--timeout"),
        (None, vec!["--frobnicate"], "unknown argument"),
        (None, vec!["--socket"], "needs a value"),
    ] {
        let mut env = env.clone();
        if let Some((k, v)) = extra_env {
            env.push((k.into(), v.into()));
        }
        let o = run_hook(&a, &env);
        assert_eq!(o.code, 2, "{a:?}: {}", o.stderr);
        assert!(o.stderr.contains(needle), "{a:?}: {}", o.stderr);
        assert!(o.stderr.contains("--help"), "{}", o.stderr);
    }
    assert_never_contacted(&listener);

    let o = run_hook(&["--help"], &[]);
    assert_eq!(o.code, 0);
    assert!(o.stdout.contains("--fail-mode deny|allow"), "{}", o.stdout);
    assert!(
        o.stdout.contains("OCSERV_AGENT_HOOK_TIMEOUT"),
        "{}",
        o.stdout
    );
}

/// The shipped wrapper, copied into a directory beside a symlink to the binary, both exec'd
/// directly (as ocserv does) and run as `/bin/sh wrapper` (as ocserv-fw does).
#[test]
fn through_the_shell_wrapper() {
    let wrapper_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ocserv-agent-hook.sh");
    let mode = std::fs::metadata(&wrapper_src)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "the wrapper is executable: {mode:o}");
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = dir.path().join("libexec");
    std::fs::create_dir(&bin_dir).unwrap();
    let wrapper = bin_dir.join("ocserv-agent-hook.sh");
    std::fs::copy(&wrapper_src, &wrapper).unwrap();
    std::os::unix::fs::symlink(HOOK, bin_dir.join("ocserv-agent-hook")).unwrap();
    let sh = Path::new("/bin/sh");

    for (program, pre) in [
        (wrapper.as_path(), None),
        (sh, Some(wrapper.to_str().unwrap())),
    ] {
        let pre: Vec<&str> = pre.into_iter().collect();
        for (answer, code) in [
            (HookResponse::allow(Source::Cached), 0),
            (HookResponse::deny(Source::Fresh, "wrapped refusal"), 1),
        ] {
            let s = dir.path().join("hook.sock");
            let _ = std::fs::remove_file(&s);
            let agent = Agent::start(&s, Behaviour::Answer(answer), Duration::ZERO);
            let o = run_program(program, &pre, &args(&s, "5s"), &connect_env());
            assert_eq!(o.code, code, "{program:?}: {}", o.stderr);
            if code == 1 {
                assert!(o.stderr.contains("wrapped refusal"), "{}", o.stderr);
            }
            assert_eq!(agent.request().session_id, 31337);
        }
        // Arguments pass through, and so does the environment.
        let missing = dir.path().join("absent.sock");
        let mut env = connect_env();
        env.push(("OCSERV_AGENT_HOOK_FAIL_MODE".into(), "allow".into()));
        let o = run_program(program, &pre, &args(&missing, "200ms"), &env);
        assert_eq!(o.code, 0, "{program:?}: {}", o.stderr);
        assert!(o.stderr.contains("fail mode allow"), "{}", o.stderr);
        let o = run_program(program, &pre, &["--help"], &[]);
        assert_eq!(o.code, 0, "{program:?}: {}", o.stderr);
        assert!(
            o.stdout.starts_with("usage: ocserv-agent-hook"),
            "{}",
            o.stdout
        );
    }
}
