//! Fuzz target `config_toml`: the agent's configuration file.
//!
//! Input: the bytes of `agent.toml`. They are written to a fresh temporary file (the loader's
//! public entry point takes a path) and loaded with an empty environment through
//! `config::load_with_env`, which must return `Ok` or a `ConfigError`, never panic.
//!
//! The file is removed again after every input (when the `NamedTempFile` drops), so a long run
//! leaves nothing behind in the temporary directory; only an input that crashes the process
//! leaves its one file.
#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;
use ocserv_agent::config;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::Builder::new()
        .prefix("ocserv-agent-fuzz-")
        .suffix(".toml")
        .tempfile()
        .expect("create a temporary config file");
    std::io::Write::write_all(&mut file, data).expect("write the fuzzed config file");
    match config::load_with_env(Some(file.path()), &[]) {
        Ok(_) => {}
        Err(e) => {
            // Every refusal names a key (or the file) and a reason (DESIGN §8).
            assert!(
                !e.key.is_empty() && !e.reason.is_empty(),
                "ConfigError without key or reason: {e:?}"
            );
        }
    }
});
