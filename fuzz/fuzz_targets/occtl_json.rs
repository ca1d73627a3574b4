//! Fuzz target `occtl_json`: occtl's `--json` output as the occtl backend reads it.
//!
//! Input: the bytes occtl printed on stdout. They go through the generic document scanner
//! (`parse_documents`, `parse_one`) and through every typed extractor (`sessions`, `events`,
//! `status`, `bans`, `cookies`, `iroutes`), each of which must return `Ok` or a `CtlError`.
//!
//! The extractors also take the current time and an earlier-learned UTC offset; those come from
//! the clock and from earlier replies, not from this input, so they are fixed here at a realistic
//! time, with and without an offset hint, plus the offset the first pass learned (as the backend
//! would carry it into the next call).
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use ocserv_agent::ocserv::occtl_json;

/// 2023-11-14T22:13:20Z: a fixed "now" so a crash reproduces from the saved input alone.
const NOW: u64 = 1_700_000_000;

fuzz_target!(|data: &[u8]| {
    let _ = occtl_json::parse_documents(data);
    let _ = occtl_json::parse_one(data);

    let learned = occtl_json::sessions(data, "show users", NOW, None)
        .ok()
        .and_then(|list| list.utc_offset);
    let hint = learned.or(Some(3600));
    let _ = occtl_json::sessions(data, "show users", NOW, hint);
    let _ = occtl_json::events(data, "show events", NOW, None);
    let _ = occtl_json::events(data, "show events", NOW, hint);
    let _ = occtl_json::status(data, "show status");
    let _ = occtl_json::bans(data, "show ip bans");
    let _ = occtl_json::cookies(data, "show cookies all", None);
    let _ = occtl_json::cookies(data, "show cookies all", hint);
    let _ = occtl_json::iroutes(data, "show iroutes");
});
