//! Shared support code for integration tests, examples and fixture captures.
//!
//! Role: gives every test a real ocserv with real openconnect clients, isolated in network
//! namespaces (see [`lab`]). Included from tests with `mod support;` and from examples with
//! `#[path = "../tests/support/mod.rs"] mod support;`, so it only uses regular and dev
//! dependencies. Not every user calls every helper, hence `dead_code` is allowed here.
#![allow(dead_code)]

pub mod agent;
pub mod hook;
pub mod lab;
pub mod portal;

#[allow(unused_imports)]
pub use lab::{Client, Lab, LabOptions, LabUser};
