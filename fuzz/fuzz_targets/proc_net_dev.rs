//! Fuzz target `proc_net_dev`: the text of `/proc/<pid>/net/dev` as the counters reader sees it.
//!
//! Input: the file's bytes. The reader uses `read_to_string`, so only valid UTF-8 ever reaches
//! the parser; other inputs are skipped here too. The text is searched for a fixed device
//! (`vpns0`, ocserv's usual name) and, when the input's first line passes `valid_device`, for
//! that name as well (the name then comes from outside input, as it does from ocserv).
//!
//! Checks, besides "never panics": a name accepted by `valid_device` can never step out of its
//! directory when joined to a path (no `/`, no NUL, not `.` or `..`) and fits IFNAMSIZ.
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use ocserv_agent::ocserv::counters::{parse_proc_net_dev, valid_device, MAX_DEVICE_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_proc_net_dev(text, "vpns0");

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
