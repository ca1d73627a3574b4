//! Generated protobuf and gRPC code for every contract in `proto/`.
#![allow(clippy::all, missing_docs, unreachable_pub)]

/// `agent.v1`: services the agent serves.
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("agent.v1");
    }
}

/// `vpn.v1`: the portal's services and the agent's ConfigService.
pub mod vpn {
    pub mod v1 {
        tonic::include_proto!("vpn.v1");
    }
}

/// ocserv's control-socket messages (proto2, every field optional).
pub mod ocserv_ctl {
    include!(concat!(env!("OUT_DIR"), "/ocserv.ctl.rs"));
}

/// Encoded `FileDescriptorSet` of all contracts, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
