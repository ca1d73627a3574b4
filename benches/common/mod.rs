//! Shared code of the benchmarks (DESIGN §6 targets): a small timing harness, a fake ocserv that
//! speaks ocserv's real control protocol, and helpers to run the real agent binary as a child.
//!
//! Role: every bench binary (`harness = false`) includes this with `mod common;`. Not every bench
//! uses every helper, hence `dead_code` is allowed here.
//!
//! Timing: samples are wall-clock [`Duration`]s; [`Summary`] reports min, median, p90, p99 and max
//! by the nearest-rank method (p99 of 200 samples is the 198th smallest), plus the mean. A p99 is
//! only reported from at least 100 samples (below that it would be the maximum): smaller sets
//! print their tail as "p90 of N" (or "max of N" under 10 samples).
//!
//! Fake ocserv ([`FakeOcserv`]): the library's shared fake control socket
//! (`ocserv_agent::ocserv::fake`, in its session-table mode) serving [`fake_session`]s. A Unix
//! socket in its own temp dir, served on a dedicated OS thread with its own single-threaded tokio
//! runtime, so it never competes with the agent's runtime for worker slots (it does share the
//! machine's two cores). It speaks ocserv's real framing, answers STATUS, LIST, USER_INFO,
//! ID_INFO, DISCONNECT_*, TERMINATE_USER/ID, LIST_BANNED, UNBAN_IP, RELOAD and LIST_COOKIES, and
//! closes the connection on any other command, as ocserv 1.1.6 does with commands it does not
//! know. The LIST reply is encoded once per session set, so the fake's own cost stays out of the
//! agent's figures.
//!
//! Failure behaviour: set-up failures panic with a message naming what failed (a benchmark that
//! cannot set up has nothing to measure); the fake answers malformed requests by closing.
//! Everything started here is stopped on drop (fake thread joined, child agent SIGKILLed and
//! reaped, temp dirs removed). Only loopback and Unix sockets are used.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ocserv_agent::ocserv::fake;
use ocserv_agent::proto::ocserv_ctl as pb;

// ---------------------------------------------------------------------------------------------
// Harness

/// True when the binary was started by `cargo bench` (which passes `--bench`). Anything else
/// (`cargo test --all-targets`, nextest listing tests with `--list`) gets no benchmark run and an
/// empty test list, so test runners never start labs or agents by accident.
pub fn invoked_as_bench() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--bench") {
        return true;
    }
    if !args.iter().any(|a| a == "--list") {
        eprintln!("benchmark binary: run it with `cargo bench --bench <name>`; nothing to do");
    }
    false
}

/// Fewest samples a p99 is reported from. Below it the nearest-rank p99 is the maximum (for any
/// n <= 100 the 99th percentile's rank is n), so the tail is reported as a p90 and labelled with
/// its sample count instead of being called a p99.
pub const MIN_SAMPLES_FOR_P99: usize = 100;

/// min / median / p90 / p99 / max / mean of a set of samples. `p99` is `None` when there are
/// fewer than [`MIN_SAMPLES_FOR_P99`] samples; use [`Summary::tail`] to print the tail honestly.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub min: Duration,
    pub median: Duration,
    pub p90: Duration,
    pub p99: Option<Duration>,
    pub max: Duration,
    pub mean: Duration,
}

impl Summary {
    /// The tail figure and what it is: `("p99", p99)` from at least 100 samples, else
    /// `("p90 of N", p90)`, or `("max of N", max)` when N < 10 (a p90 of so few is the max too).
    pub fn tail(&self) -> (String, Duration) {
        match self.p99 {
            Some(p) => ("p99".to_owned(), p),
            None if self.n >= 10 => (format!("p90 of {}", self.n), self.p90),
            None => (format!("max of {}", self.n), self.max),
        }
    }

    /// The tail as printed: `85.8 ms` for a p99, `7.83 ms (p90 of 20)` otherwise.
    pub fn tail_text(&self) -> String {
        match self.tail() {
            (label, d) if label == "p99" => fmt_d(d),
            (label, d) => format!("{} ({label})", fmt_d(d)),
        }
    }
}

/// Nearest-rank percentile of sorted samples (`q` in 0..=1).
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn summarize(samples: &[Duration]) -> Summary {
    let mut s = samples.to_vec();
    s.sort_unstable();
    let total: Duration = s.iter().sum();
    Summary {
        n: s.len(),
        min: s.first().copied().unwrap_or_default(),
        median: percentile(&s, 0.5),
        p90: percentile(&s, 0.90),
        p99: (s.len() >= MIN_SAMPLES_FOR_P99).then(|| percentile(&s, 0.99)),
        max: s.last().copied().unwrap_or_default(),
        mean: if s.is_empty() {
            Duration::ZERO
        } else {
            total / s.len() as u32
        },
    }
}

/// A duration with three significant digits in a fitting unit.
pub fn fmt_d(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    let (v, unit) = if ns < 1e3 {
        (ns, "ns")
    } else if ns < 1e6 {
        (ns / 1e3, "µs")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {unit}")
}

/// The table header of [`report`]. The tail column is a p99 where n >= 100; otherwise each row
/// names what it shows (`p90 of 20`, `max of 5`).
pub fn print_header() {
    println!(
        "{:<46} {:>5} {:>10} {:>10} {:>24} {:>10} {:>10}",
        "what", "n", "min", "median", "p99 (n<100: p90 of n)", "max", "mean"
    );
}

/// Prints one distribution as a table row and returns its summary.
pub fn report(label: &str, samples: &[Duration]) -> Summary {
    let s = summarize(samples);
    println!(
        "{:<46} {:>5} {:>10} {:>10} {:>24} {:>10} {:>10}",
        label,
        s.n,
        fmt_d(s.min),
        fmt_d(s.median),
        s.tail_text(),
        fmt_d(s.max),
        fmt_d(s.mean)
    );
    s
}

/// Today's date (UTC) as YYYY-MM-DD, for the printed record.
pub fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Prints what the figures were measured on.
pub fn print_machine(bench: &str) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let profile = if cfg!(debug_assertions) {
        "debug (figures not representative)"
    } else {
        "release"
    };
    println!(
        "# {bench} on {} — {cpus} CPU(s), {model}, {profile} build",
        today()
    );
}

// ---------------------------------------------------------------------------------------------
// Fake ocserv

/// What the fake's sessions report as their tun device, which decides what reading byte
/// counters costs the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Devices {
    /// `vpns<N>`, which does not exist here, with IDs that are no live PIDs: each counter read
    /// is a failed sysfs lookup plus a failed procfs open (counters stay unknown).
    Missing,
    /// `lo`: each counter read succeeds from `/sys/class/net/lo/statistics`, the same two file
    /// reads the agent makes per session when it runs in ocserv's network namespace.
    Loopback,
}

/// One `user_info_rep` with every field ocserv 1.1.6 fills for a connected session (the
/// library's [`fake::session`]) on the tun device `devices` names.
pub fn fake_session(i: usize, devices: Devices) -> pb::UserInfoRep {
    match devices {
        Devices::Missing => fake::session(i, &format!("vpns{i}")),
        Devices::Loopback => fake::session(i, "lo"),
    }
}

/// A fake ocserv control socket: the library's shared fake ([`fake::FakeOcserv`]) serving
/// [`fake_session`]s. See the module docs.
pub struct FakeOcserv {
    pub socket: PathBuf,
    inner: fake::FakeOcserv,
}

fn sessions(n: usize, devices: Devices) -> Vec<pb::UserInfoRep> {
    (0..n).map(|i| fake_session(i, devices)).collect()
}

impl FakeOcserv {
    /// Starts serving `n` sessions; returns once the socket accepts.
    pub fn start(n: usize, devices: Devices) -> FakeOcserv {
        let inner = fake::FakeOcserv::with_sessions(sessions(n, devices));
        FakeOcserv {
            socket: inner.socket().to_path_buf(),
            inner,
        }
    }

    /// Replaces the session set (the next LIST sees it).
    pub fn set_sessions(&self, n: usize, devices: Devices) {
        self.inner.set_sessions(sessions(n, devices));
    }

    /// Replaces the session set with sessions `first..first + n` (the next LIST sees it): moving
    /// `first` on by k closes the k lowest sessions and opens k new ones.
    pub fn set_range(&self, first: usize, n: usize, devices: Devices) {
        let set = (first..first + n).map(|i| fake_session(i, devices));
        self.inner.set_sessions(set.collect());
    }

    /// Bytes of the current LIST reply frame.
    pub fn list_reply_len(&self) -> usize {
        self.inner.list_reply_len()
    }
}

// ---------------------------------------------------------------------------------------------
// Loopback helpers and the agent as a child process

/// A free loopback port (bound, read, released: a tiny race is acceptable in a benchmark).
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0 to find a free port")
}

/// A bare HTTP/1.0 GET on loopback; the status code, or `None` when it could not be done.
pub fn http_status(addr: SocketAddr, path: &str, timeout: Duration) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `VmRSS` and `VmHWM` (peak) of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets a process's `VmHWM` to its current `VmRSS` (`echo 5 > /proc/<pid>/clear_refs`), so a
/// later peak belongs to what happened after the reset. False when the kernel refused.
pub fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), b"5").is_ok()
}

/// The real agent binary, run as a child process against a control socket.
pub struct ChildAgent {
    pub child: Child,
    /// Taken right before the process was spawned.
    pub started: Instant,
    /// Plaintext loopback TCP gRPC (`grpc.listen` with `grpc.insecure`).
    pub grpc: SocketAddr,
    /// The gRPC control socket (`grpc.socket`); this process's uid is allowed on it.
    pub socket: PathBuf,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The agent binary cargo built for this bench run (release profile under `cargo bench`).
pub fn agent_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ocserv-agent"))
}

impl ChildAgent {
    /// Spawns `ocserv-agent --config <file> run` with env overrides pointing it at `socket` (the
    /// ocserv control socket), free loopback ports and a control socket of its own in a temp dir.
    /// The config file only allows this process's uid on the agent's control socket; an explicit
    /// file keeps a host's `/etc/ocserv-agent/agent.toml` out of the measurement.
    pub fn spawn(socket: &Path, extra_env: &[(&str, &str)]) -> ChildAgent {
        let dir = tempfile::tempdir().expect("child agent: temp dir");
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "# benchmark: embedded defaults plus env overrides\n[grpc]\nallowed_uids = [{}]\n",
                nix::unistd::getuid().as_raw()
            ),
        )
        .expect("child agent: writing its config file");
        let agent_socket = dir.path().join("agent.sock");
        let log = dir.path().join("agent.log");
        let log_file = std::fs::File::create(&log).expect("child agent: log file");
        let (grpc, metrics) = (free_port(), free_port());
        let mut cmd = Command::new(agent_binary());
        // Neither the agent's overrides nor glibc malloc tuning of the caller's environment may
        // change what is measured; `extra_env` sets them where a benchmark means to.
        for (k, _) in std::env::vars() {
            if k.starts_with("OCSERV_AGENT__") || k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES"
            {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--config")
            .arg(&config)
            .arg("run")
            .env("OCSERV_AGENT__OCSERV__CONTROL_SOCKET", socket)
            .env("OCSERV_AGENT__GRPC__LISTEN", grpc.to_string())
            .env("OCSERV_AGENT__GRPC__INSECURE", "true")
            .env("OCSERV_AGENT__GRPC__SOCKET", &agent_socket)
            .env(
                "OCSERV_AGENT__HOOK__SOCKET",
                agent_socket.with_file_name("hook.sock"),
            )
            .env(
                "OCSERV_AGENT__AGENT__STATE_DIR",
                agent_socket.with_file_name("state"),
            )
            .env("OCSERV_AGENT__METRICS__LISTEN", metrics.to_string())
            .env("OCSERV_AGENT__LOG__LEVEL", "warn")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run the agent binary {}: {e}",
                agent_binary().display()
            )
        });
        ChildAgent {
            child,
            started,
            grpc,
            socket: agent_socket,
            metrics,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls `/readyz` every `poll` until it answers 200; the time from `since`, or `None` at
    /// the deadline or when the process exited.
    pub fn wait_ready(
        &mut self,
        since: Instant,
        poll: Duration,
        limit: Duration,
    ) -> Option<Duration> {
        loop {
            if http_status(self.metrics, "/readyz", Duration::from_millis(500)) == Some(200) {
                return Some(since.elapsed());
            }
            if since.elapsed() > limit || !matches!(self.child.try_wait(), Ok(None)) {
                return None;
            }
            std::thread::sleep(poll);
        }
    }

    /// The agent's log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait for the exit (SIGKILL after 10 s); the time it took to exit.
    pub fn stop(&mut self) -> Duration {
        let t = Instant::now();
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        while matches!(self.child.try_wait(), Ok(None)) {
            if t.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        t.elapsed()
    }
}

impl Drop for ChildAgent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
