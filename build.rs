//! Compiles `proto/` with the pure-Rust `protox` (no system `protoc`), generates prost/tonic code,
//! and writes the encoded descriptor set that gRPC server reflection serves.

use prost::Message;
use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/agent/v1/agent.proto",
    "proto/vpn/v1/auth.proto",
    "proto/vpn/v1/events.proto",
    "proto/vpn/v1/config.proto",
    "proto/ocserv/ctl.proto",
];

fn main() {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let fds = protox::compile(PROTOS, ["proto"]).unwrap_or_else(|e| panic!("protox: {e}"));
    fs::write(out.join("descriptor.bin"), fds.encode_to_vec()).expect("write descriptor set");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("tonic-prost-build: {e}"));
}
