//! Per-session byte counters, read from the session's tun device (the control protocol has none).
//!
//! Inputs: the device name from ocserv (`vpns0`, ...) and the worker's PID (the session `ID`).
//! Output: [`ByteCounters`] where `bytes_in` is the tun's rx (what the client uploaded) and
//! `bytes_out` its tx.
//!
//! Where: first `/sys/class/net/<device>/statistics/{rx,tx}_bytes`, which shows devices of the
//! agent's own network namespace. When the device is not there (ocserv runs in another namespace,
//! as in the test lab), `/proc/<worker_pid>/net/dev`, which the kernel renders for the network
//! namespace of that process, i.e. ocserv's.
//!
//! Failure behaviour: `None` whenever the counters cannot be read (device name refused, device
//! gone, worker exited, unparsable file). Never panics; callers treat `None` as "unknown".
//! The device name is validated before it becomes part of a path.

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

/// Reads the counters of `device`, trying our namespace first, then the worker's.
pub fn read(device: &str, worker_pid: u32) -> Option<ByteCounters> {
    read_from(
        Path::new("/sys/class/net"),
        Path::new("/proc"),
        device,
        worker_pid,
    )
}

/// [`read`] with the sysfs and procfs roots given, so tests can point it at a tempdir.
pub fn read_from(
    sys_class_net: &Path,
    proc_root: &Path,
    device: &str,
    worker_pid: u32,
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
    let text = std::fs::read_to_string(
        proc_root
            .join(worker_pid.to_string())
            .join("net")
            .join("dev"),
    )
    .ok()?;
    parse_proc_net_dev(&text, device)
}

/// Finds `device` in the text of `/proc/<pid>/net/dev` and returns its rx/tx byte counts.
///
/// The format: two header lines, then one line per device, `name: rx_bytes rx_packets ...
/// (8 rx fields) tx_bytes ...`. The name may be left-padded, and with long counters there may be
/// no space after the colon, so the line is split at its first `:` rather than on whitespace.
pub fn parse_proc_net_dev(text: &str, device: &str) -> Option<ByteCounters> {
    text.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != device {
            return None;
        }
        let mut fields = rest.split_whitespace();
        let rx = fields.next()?.parse().ok()?;
        // tx_bytes is the 9th number: skip the 7 remaining rx fields.
        let tx = fields.nth(7)?.parse().ok()?;
        Some(ByteCounters {
            bytes_in: rx,
            bytes_out: tx,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    #[test]
    fn reads_sysfs_first_then_proc() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let proc_root = dir.path().join("proc");
        std::fs::create_dir_all(sys.join("vpns0/statistics")).unwrap();
        std::fs::write(sys.join("vpns0/statistics/rx_bytes"), "100\n").unwrap();
        std::fs::write(sys.join("vpns0/statistics/tx_bytes"), "200\n").unwrap();
        std::fs::create_dir_all(proc_root.join("77/net")).unwrap();
        std::fs::write(proc_root.join("77/net/dev"), SAMPLE).unwrap();

        assert_eq!(
            read_from(&sys, &proc_root, "vpns0", 77),
            Some(ByteCounters {
                bytes_in: 100,
                bytes_out: 200
            })
        );
        // Not in "our" namespace: falls back to the worker's view.
        assert_eq!(
            read_from(&sys, &proc_root, "veth-srv", 77),
            Some(ByteCounters {
                bytes_in: 12_345_678_901_234,
                bytes_out: 42
            })
        );
        assert_eq!(read_from(&sys, &proc_root, "veth-srv", 78), None);
        assert_eq!(read_from(&sys, &proc_root, "veth-srv", 0), None);
        // A refused name is never looked up, even if such a path exists.
        assert_eq!(read_from(&sys, &proc_root, "../sys/vpns0", 77), None);
    }

    #[test]
    fn reads_loopback_of_this_process() {
        // `lo` exists in every namespace; its counters must be readable through /proc too.
        let pid = std::process::id();
        assert!(read_from(Path::new("/nonexistent"), Path::new("/proc"), "lo", pid).is_some());
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
