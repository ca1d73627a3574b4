//! ocserv-agent: a supervised tree of ractor actors that sits beside an ocserv and makes it
//! remotely manageable. See `README.md` for operation and `DESIGN.md` for the architecture.
#![forbid(unsafe_code)]

pub mod actors;
pub mod agent_service;
pub mod app;
pub mod backoff;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod events;
pub mod gate;
pub mod grpc;
pub mod grpc_edge;
pub mod health;
pub mod heavy;
pub mod hook_proto;
pub mod messages;
pub mod metrics;
pub mod ocserv;
pub mod peruser;
pub mod policy;
pub mod proto;
pub mod registry;
pub mod restart;
pub mod serve;
pub mod store;
pub mod tree;
pub mod validate;
