//! Fuzz target `proc_net_dev`: the text of `/proc/<pid>/net/dev` as the counters reader sees it,
//! and of `/proc/<pid>/stat` and `/proc/stat`, which it reads to check a worker's start time
//! (a `stat` line carries the process's own name, which any process can set).
//!
//! Input: the file's bytes. The reader uses `read_to_string`, so only valid UTF-8 ever reaches
//! the parsers; other inputs are skipped here too. The text is searched for a fixed device
//! (`vpns0`, ocserv's usual name) and, when the input's first line passes `valid_device`, for
//! that name as well (the name then comes from outside input, as it does from ocserv); the same
//! text goes to `parse_stat_start_ticks` and `parse_btime`.
//!
//! Checks, besides "never panics": a name accepted by `valid_device` can never step out of its
//! directory when joined to a path (no `/`, no NUL, not `.` or `..`) and fits IFNAMSIZ.
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use ocserv_agent::ocserv::counters::{
    parse_btime, parse_proc_net_dev, parse_stat_start_ticks, valid_device, MAX_DEVICE_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_proc_net_dev(text, "vpns0");
    let _ = parse_stat_start_ticks(text);
    let _ = parse_btime(text);

    let first = text.lines().next().unwrap_or("");
    if valid_device(first) {
        assert!(
            !first.is_empty()
                && first.len() <= MAX_DEVICE_LEN
                && !first.contains(['/', '\0'])
                && first != "."
                && first != "..",
            "valid_device accepted {first:?}"
        );
        let _ = parse_proc_net_dev(text, first);
    }
});
