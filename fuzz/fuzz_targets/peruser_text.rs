//! Fuzz target `peruser_text`: text of an ocserv config-per-user or config-per-group file, as
//! `peruser::parse` reads it (the validate-only mode and the render → parse round trip).
//!
//! Input: any bytes, as UTF-8 (lossy). Checks, besides "never panics": whatever `parse`
//! accepts renders to a file that parses back to the same model (nothing accepted is changed or
//! lost by the agent's own rendering), and every rendered line is the header or `key = value`.
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use ocserv_agent::peruser::{parse, render, HEADER};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(model) = parse(&text) {
        let rendered = render(&model);
        assert_eq!(parse(&rendered).expect("a rendered file parses"), model);
        for line in rendered.lines() {
            assert!(
                HEADER.lines().any(|h| h == line) || line.split_once(" = ").is_some(),
                "unexpected rendered line {line:?}"
            );
        }
    }
});
