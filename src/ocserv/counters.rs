//! Per-session byte counters, read from the session's tun device (the control protocol has none).
//!
//! Inputs: the device name from ocserv (`vpns0`, ...), the worker's PID (the session `ID`) and
//! the session's connect time. Output: [`ByteCounters`] where `bytes_in` is the tun's rx (what
//! the client uploaded) and `bytes_out` its tx.
//!
//! Where: first `/sys/class/net/<device>/statistics/{rx,tx}_bytes`, which shows devices of the
//! agent's own network namespace. When the device is not there (ocserv runs in another namespace,
//! as in the test lab), `/proc/<worker_pid>/net/dev`, which the kernel renders for the network
//! namespace of that process, i.e. ocserv's.
//!
//! Identity: ocserv's IDs are PIDs and get recycled, so the process that holds the PID now may
//! not be the session's worker (it may be anything, in any namespace, with its own device of the
//! same name). Before `/proc/<pid>/net/dev` is read, the process's start time (field 22 of
//! `/proc/<pid>/stat`, clock ticks since boot, plus `btime` from `/proc/stat`) must be no later
//! than the session's connect time plus [`START_SLACK_SECS`]: the worker is forked before its
//! session connects, a process that took over the PID afterwards started later. A connect time
//! of 0 (unknown) cannot be checked, so the fallback is not used.
//!
//! Many sessions at once ([`read_many`], what a reconcile uses): the agent's own namespace is
//! read once (`/proc/self/net/dev`, every device in one file, the same counters as sysfs), and each
//! worker namespace once (`/proc/<pid>/net/dev` of the first worker that passes the identity
//! check, then reused for every session whose worker is in the same namespace, told by the inode
//! of `/proc/<pid>/ns/net`): a few file reads per reconcile instead of two or three per session.
//!
//! Failure behaviour: `None` whenever the counters cannot be read (device name refused, device
//! gone, worker exited, process younger than the session, unparsable file). Never panics; callers
//! treat `None` as "unknown". The device name is validated before it becomes part of a path.

use std::collections::HashMap;
use std::path::Path;

use super::ByteCounters;

/// Longest Linux interface name (IFNAMSIZ - 1).
pub const MAX_DEVICE_LEN: usize = 15;

/// True when `device` is a plausible interface name that is safe to put in a path:
/// 1..=15 bytes of ASCII letters, digits, `-`, `_`, `.`, and not made of dots only.
pub fn valid_device(device: &str) -> bool {
    !device.is_empty()
        && device.len() <= MAX_DEVICE_LEN
        && device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !device.bytes().all(|b| b == b'.')
}

/// How much later than the session's connect time (unix seconds) its worker may have started:
/// covers the rounding of both clocks to whole seconds (the kernel's `btime` is truncated).
pub const START_SLACK_SECS: u64 = 2;

/// Reads the counters of `device`, trying our namespace first, then the worker's (only when the
/// process holding `worker_pid` started no later than `connected_at`, unix seconds, plus
/// [`START_SLACK_SECS`]; see the module docs).
pub fn read(device: &str, worker_pid: u32, connected_at: u64) -> Option<ByteCounters> {
    read_from(
        Path::new("/sys/class/net"),
        Path::new("/proc"),
        Clock::system()?,
        device,
        worker_pid,
        connected_at,
    )
}

/// What turns a process's start (clock ticks since boot) into unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// The kernel's `USER_HZ`.
    pub ticks_per_sec: u64,
    /// `btime` of `/proc/stat`: boot time, unix seconds.
    pub boot_time: u64,
}

impl Clock {
    /// This system's clock, read once it could be read: neither value changes while the system
    /// runs, and reading `/proc/stat` for every session of a large list is measurable
    /// (`ocserv_list` bench). A failed read (out of descriptors, say) is not remembered.
    pub fn system() -> Option<Clock> {
        static SYSTEM: std::sync::OnceLock<Clock> = std::sync::OnceLock::new();
        if let Some(c) = SYSTEM.get() {
            return Some(*c);
        }
        let c = Clock::of(Path::new("/proc"))?;
        Some(*SYSTEM.get_or_init(|| c))
    }

    /// The clock as seen under `proc_root`.
    pub fn of(proc_root: &Path) -> Option<Clock> {
        Some(Clock {
            ticks_per_sec: clock_ticks_per_sec()?,
            boot_time: parse_btime(&std::fs::read_to_string(proc_root.join("stat")).ok()?)?,
        })
    }
}

/// The kernel's `USER_HZ` (the unit of `/proc/<pid>/stat` times), `None` if unknown.
pub fn clock_ticks_per_sec() -> Option<u64> {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
}

/// [`read`] with the sysfs and procfs roots and the clock tick rate given, so tests can point it
/// at a tempdir.
pub fn read_from(
    sys_class_net: &Path,
    proc_root: &Path,
    clock: Clock,
    device: &str,
    worker_pid: u32,
    connected_at: u64,
) -> Option<ByteCounters> {
    if !valid_device(device) {
        return None;
    }
    let dev_dir = sys_class_net.join(device);
    if dev_dir.exists() {
        let stat = |name: &str| -> Option<u64> {
            std::fs::read_to_string(dev_dir.join("statistics").join(name))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        return Some(ByteCounters {
            bytes_in: stat("rx_bytes")?,
            bytes_out: stat("tx_bytes")?,
        });
    }
    // PID 0 would name no process (and /proc/0 does not exist); skip the read.
    if worker_pid == 0 {
        return None;
    }
    if !started_by(proc_root, clock, worker_pid, connected_at) {
        return None;
    }
    let text = std::fs::read_to_string(
        proc_root
            .join(worker_pid.to_string())
            .join("net")
            .join("dev"),
    )
    .ok()?;
    parse_proc_net_dev(&text, device)
}

/// True when the process `pid` under `proc_root` started no later than `connected_at` (unix
/// seconds) plus [`START_SLACK_SECS`]; false when that cannot be told (unknown connect time,
/// process gone, unreadable files).
pub fn started_by(proc_root: &Path, clock: Clock, pid: u32, connected_at: u64) -> bool {
    if connected_at == 0 {
        return false;
    }
    process_start_time(proc_root, clock, pid)
        .is_some_and(|start| start <= connected_at.saturating_add(START_SLACK_SECS))
}

/// When process `pid` started, in unix seconds (rounded down): the boot time plus field 22 of
/// `/proc/<pid>/stat` divided by the tick rate.
pub fn process_start_time(proc_root: &Path, clock: Clock, pid: u32) -> Option<u64> {
    if clock.ticks_per_sec == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let ticks = parse_stat_start_ticks(&stat)?;
    clock.boot_time.checked_add(ticks / clock.ticks_per_sec)
}

/// Field 22 (`starttime`, clock ticks after boot) of a `/proc/<pid>/stat` line.
///
/// Field 2 is the command name in parentheses and may itself contain spaces and `)`, so the
/// fields are counted after the **last** `)`: the first field there is field 3.
pub fn parse_stat_start_ticks(text: &str) -> Option<u64> {
    let (_, rest) = text.rsplit_once(')')?;
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// `btime` (boot time, unix seconds) from the text of `/proc/stat`.
pub fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Finds `device` in the text of `/proc/<pid>/net/dev` and returns its rx/tx byte counts.
///
/// The format: two header lines, then one line per device, `name: rx_bytes rx_packets ...
/// (8 rx fields) tx_bytes ...`. The name may be left-padded, and with long counters there may be
/// no space after the colon, so the line is split at its first `:` rather than on whitespace.
pub fn parse_proc_net_dev(text: &str, device: &str) -> Option<ByteCounters> {
    text.lines()
        .filter_map(parse_net_dev_line)
        .find_map(|(name, c)| (name == device).then_some(c))
}

/// Every device of a `/proc/.../net/dev` text (see [`parse_proc_net_dev`]).
pub fn parse_proc_net_dev_all(text: &str) -> HashMap<String, ByteCounters> {
    text.lines()
        .filter_map(parse_net_dev_line)
        .map(|(name, c)| (name.to_string(), c))
        .collect()
}

/// One device line: its name and counters; `None` for headers and garbled lines.
fn parse_net_dev_line(line: &str) -> Option<(&str, ByteCounters)> {
    let (name, rest) = line.split_once(':')?;
    let mut fields = rest.split_whitespace();
    let rx = fields.next()?.parse().ok()?;
    // tx_bytes is the 9th number: skip the 7 remaining rx fields.
    let tx = fields.nth(7)?.parse().ok()?;
    Some((
        name.trim(),
        ByteCounters {
            bytes_in: rx,
            bytes_out: tx,
        },
    ))
}

/// Fills the counters of every session with a device (see the module docs), `None` where they
/// cannot be read.
pub fn read_many<'a>(sessions: impl IntoIterator<Item = &'a mut super::Session>) {
    read_many_from(
        Path::new("/proc/self/net/dev"),
        Path::new("/proc"),
        Clock::system(),
        sessions,
    )
}

/// [`read_many`] with its files given, so tests can point it at a tempdir.
pub fn read_many_from<'a>(
    own_net_dev: &Path,
    proc_root: &Path,
    clock: Option<Clock>,
    sessions: impl IntoIterator<Item = &'a mut super::Session>,
) {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::read_to_string(own_net_dev)
        .map(|t| parse_proc_net_dev_all(&t))
        .unwrap_or_default();
    // The devices of each worker namespace seen, by the namespace's (device, inode).
    let mut namespaces: HashMap<(u64, u64), HashMap<String, ByteCounters>> = HashMap::new();
    let mut in_worker_ns = |device: &str, pid: u32, connected_at: u64| -> Option<ByteCounters> {
        if pid == 0 || !started_by(proc_root, clock?, pid, connected_at) {
            return None;
        }
        let dir = proc_root.join(pid.to_string());
        let ns = std::fs::metadata(dir.join("ns").join("net")).ok()?;
        let devices = match namespaces.entry((ns.dev(), ns.ino())) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let text = std::fs::read_to_string(dir.join("net").join("dev")).ok()?;
                e.insert(parse_proc_net_dev_all(&text))
            }
        };
        devices.get(device).copied()
    };
    for s in sessions {
        if s.device.is_empty() {
            continue;
        }
        s.counters = match valid_device(&s.device) {
            false => None,
            true => own
                .get(&s.device)
                .copied()
                .or_else(|| in_worker_ns(&s.device, s.id, s.connected_at)),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

    const SAMPLE: &str = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1234      10    0    0    0     0          0         0     1234      10    0    0    0     0       0          0
 vpns0:   52800     411    0    0    0     0          0         0   987654     600    0    0    0     0       0          0
veth-srv:12345678901234 5 0 0 0 0 0 0 42 1 0 0 0 0 0 0
";

    #[test]
    fn parses_padded_and_unpadded_lines() {
        assert_eq!(
            parse_proc_net_dev(SAMPLE, "vpns0"),
            Some(ByteCounters {
                bytes_in: 52800,
                bytes_out: 987654
            })
        );
        assert_eq!(
            parse_proc_net_dev(SAMPLE, "veth-srv"),
            Some(ByteCounters {
                bytes_in: 12_345_678_901_234,
                bytes_out: 42
            })
        );
        assert_eq!(parse_proc_net_dev(SAMPLE, "vpns1"), None);
        // Header lines contain '|' not ':' and must never match.
        assert_eq!(parse_proc_net_dev(SAMPLE, "face |bytes"), None);
    }

    #[test]
    fn short_or_garbled_lines_give_none() {
        assert_eq!(parse_proc_net_dev("vpns0: 1 2 3\n", "vpns0"), None);
        assert_eq!(
            parse_proc_net_dev("vpns0: x 0 0 0 0 0 0 0 5 0\n", "vpns0"),
            None
        );
        assert_eq!(parse_proc_net_dev("", "vpns0"), None);
    }

    #[test]
    fn device_names_are_validated() {
        for ok in ["vpns0", "tun-test_1", "eth0.100", "a"] {
            assert!(valid_device(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "vpns0\n",
            "sixteen-chars-xx",
            "ü",
            "a b",
        ] {
            assert!(!valid_device(bad), "{bad:?}");
        }
    }

    /// Boot time of the fake /proc tree.
    const BTIME: u64 = 1_700_000_000;
    const HZ: u64 = 100;
    const CLOCK: Clock = Clock {
        ticks_per_sec: HZ,
        boot_time: BTIME,
    };

    /// A `/proc/<pid>/stat` line whose process started `secs` after boot; the command name has
    /// spaces and parentheses, as real ones can.
    fn stat_line(pid: u32, secs: u64) -> String {
        let ticks = secs * HZ;
        format!(
            "{pid} (ocserv-worker (x) y) S 1 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {ticks} \
             12345678 200 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 17 1 0 0 0 0 0\n"
        )
    }

    /// A fake /proc and /sys tree: `vpns0` in "our" namespace; `veth-srv` only in the net/dev
    /// of processes 77 (started at BTIME+100) and 78 (started at BTIME+5000).
    fn fake_tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let proc_root = dir.path().join("proc");
        std::fs::create_dir_all(sys.join("vpns0/statistics")).unwrap();
        std::fs::write(sys.join("vpns0/statistics/rx_bytes"), "100\n").unwrap();
        std::fs::write(sys.join("vpns0/statistics/tx_bytes"), "200\n").unwrap();
        std::fs::create_dir_all(&proc_root).unwrap();
        std::fs::write(
            proc_root.join("stat"),
            format!("cpu  1 2 3 4\nintr 5\nctxt 6\nbtime {BTIME}\nprocesses 7\n"),
        )
        .unwrap();
        for (pid, secs) in [(77, 100), (78, 5000)] {
            std::fs::create_dir_all(proc_root.join(format!("{pid}/net"))).unwrap();
            std::fs::write(proc_root.join(format!("{pid}/net/dev")), SAMPLE).unwrap();
            std::fs::write(proc_root.join(format!("{pid}/stat")), stat_line(pid, secs)).unwrap();
        }
        (dir, sys, proc_root)
    }

    #[test]
    fn reads_sysfs_first_then_proc() {
        let (_dir, sys, proc_root) = fake_tree();
        let at = BTIME + 130;
        assert_eq!(
            read_from(&sys, &proc_root, CLOCK, "vpns0", 77, at),
            Some(ByteCounters {
                bytes_in: 100,
                bytes_out: 200
            })
        );
        // Not in "our" namespace: falls back to the worker's view.
        assert_eq!(
            read_from(&sys, &proc_root, CLOCK, "veth-srv", 77, at),
            Some(ByteCounters {
                bytes_in: 12_345_678_901_234,
                bytes_out: 42
            })
        );
        assert_eq!(read_from(&sys, &proc_root, CLOCK, "veth-srv", 79, at), None);
        assert_eq!(read_from(&sys, &proc_root, CLOCK, "veth-srv", 0, at), None);
        // A refused name is never looked up, even if such a path exists.
        assert_eq!(
            read_from(&sys, &proc_root, CLOCK, "../sys/vpns0", 77, at),
            None
        );
    }

    #[test]
    fn many_sessions_read_each_namespace_once_and_check_every_worker() {
        use crate::ocserv::Session;
        let (dir, _sys, proc_root) = fake_tree();
        let own = dir.path().join("own_net_dev");
        let ours: String = SAMPLE
            .lines()
            .filter(|l| !l.starts_with("veth"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&own, ours).unwrap();
        // Workers 77 and 76 share one namespace (their ns/net name the same inode), 78 started
        // after the session (a recycled PID).
        let ns = dir.path().join("ns-a");
        std::fs::write(&ns, "").unwrap();
        std::fs::create_dir_all(proc_root.join("76/net")).unwrap();
        std::fs::write(proc_root.join("76/stat"), stat_line(76, 90)).unwrap();
        for pid in [76, 77, 78] {
            std::fs::create_dir_all(proc_root.join(format!("{pid}/ns"))).unwrap();
            std::os::unix::fs::symlink(&ns, proc_root.join(format!("{pid}/ns/net"))).unwrap();
        }
        let at = BTIME + 130;
        let session = |id: u32, device: &str| Session {
            device: device.into(),
            ..crate::registry::tests::session(id, "u", at)
        };
        let mut sessions = [
            session(1, "vpns0"),     // in our namespace
            session(77, "veth-srv"), // the worker's namespace, read once...
            session(76, "veth-srv"), // ...and reused (76 has no net/dev of its own)
            session(78, "veth-srv"), // recycled PID: never read
            session(79, "../vpns0"), // refused name
            session(80, ""),         // no device yet
        ];
        read_many_from(&own, &proc_root, Some(CLOCK), sessions.iter_mut());
        let got: Vec<_> = sessions
            .iter()
            .map(|s| s.counters.map(|c| c.bytes_out))
            .collect();
        assert_eq!(
            got,
            vec![Some(987_654), Some(42), Some(42), None, None, None]
        );
        assert_eq!(sessions[1].counters.unwrap().bytes_in, 12_345_678_901_234);
        assert_eq!(
            parse_proc_net_dev_all(SAMPLE).len(),
            3,
            "lo, vpns0, veth-srv"
        );
    }

    #[test]
    fn a_process_younger_than_the_session_is_never_read() {
        let (_dir, sys, proc_root) = fake_tree();
        // Session connected at BTIME+130: process 78 (started at BTIME+5000) holds a recycled
        // PID, its net/dev is not the session's.
        assert_eq!(
            read_from(&sys, &proc_root, CLOCK, "veth-srv", 78, BTIME + 130),
            None
        );
        // Process 77 started at BTIME+100: fine up to the slack, refused beyond it.
        assert!(read_from(&sys, &proc_root, CLOCK, "veth-srv", 77, BTIME + 100).is_some());
        assert!(read_from(&sys, &proc_root, CLOCK, "veth-srv", 77, BTIME + 98).is_some());
        assert_eq!(
            read_from(&sys, &proc_root, CLOCK, "veth-srv", 77, BTIME + 97),
            None
        );
        // Unknown connect time or tick rate: cannot check, no counters from /proc.
        assert_eq!(read_from(&sys, &proc_root, CLOCK, "veth-srv", 77, 0), None);
        assert_eq!(
            read_from(
                &sys,
                &proc_root,
                Clock {
                    ticks_per_sec: 0,
                    ..CLOCK
                },
                "veth-srv",
                77,
                BTIME + 130
            ),
            None
        );
        // The sysfs path needs no PID and is not affected.
        assert!(read_from(&sys, &proc_root, CLOCK, "vpns0", 78, BTIME + 130).is_some());
    }

    #[test]
    fn parses_stat_start_time_and_btime() {
        assert_eq!(parse_stat_start_ticks(&stat_line(5, 123)), Some(123 * HZ));
        assert_eq!(parse_stat_start_ticks("5 (a) S 1 2 3"), None);
        assert_eq!(parse_stat_start_ticks("no parens at all"), None);
        assert_eq!(parse_stat_start_ticks(""), None);
        assert_eq!(parse_btime("cpu 1\nbtime 1234\n"), Some(1234));
        assert_eq!(parse_btime("cpu 1\nbtimex 1\n"), None);
        assert_eq!(parse_btime("btime soon\n"), None);
        let (_dir, _sys, proc_root) = fake_tree();
        assert_eq!(process_start_time(&proc_root, CLOCK, 77), Some(BTIME + 100));
        assert_eq!(process_start_time(&proc_root, CLOCK, 79), None);
    }

    #[test]
    fn this_process_is_checked_against_the_real_proc() {
        let pid = std::process::id();
        let clock = Clock::system().expect("CLK_TCK and btime");
        assert_eq!(Clock::of(Path::new("/proc")), Some(clock));
        let start = process_start_time(Path::new("/proc"), clock, pid).expect("own start time");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            start <= now + 1 && start + 24 * 3600 > now,
            "{start} vs {now}"
        );
        // `lo` exists in every namespace: readable through /proc for a session that connected
        // after this process started, refused for one that "connected" long before.
        let nowhere = Path::new("/nonexistent");
        let proc_root = Path::new("/proc");
        assert!(read_from(nowhere, proc_root, clock, "lo", pid, now).is_some());
        assert_eq!(
            read_from(nowhere, proc_root, clock, "lo", pid, start - 60),
            None
        );
    }

    proptest! {
        #[test]
        fn parser_never_panics(text in "\\PC{0,400}", dev in "[a-z0-9]{1,8}") {
            let _ = parse_proc_net_dev(&text, &dev);
        }

        #[test]
        fn parser_finds_any_well_formed_line(dev in "[a-z][a-z0-9_-]{0,14}", rx in any::<u64>(), tx in any::<u64>(), pad in 0usize..6) {
            let text = format!("h1\nh2\n{}{dev}:{rx} 1 0 0 0 0 0 0 {tx} 2 0 0 0 0 0 0\n", " ".repeat(pad));
            prop_assert_eq!(parse_proc_net_dev(&text, &dev), Some(ByteCounters { bytes_in: rx, bytes_out: tx }));
        }
    }
}
