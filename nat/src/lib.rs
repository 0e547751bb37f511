//! switchyard's gateway and connection-tracking NAT. Pure logic: time is an argument.
#![forbid(unsafe_code)]

pub mod checksum;
pub mod conntrack;
pub mod emit;
