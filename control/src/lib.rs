//! switchyard's control plane as a library: the `switchyard` binary and the integration tests
//! build on it.

pub mod capture;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod dataplane;
pub mod demo;
pub mod dns;
pub mod error;
pub mod ipam;
pub mod netlink;
pub mod netns;
pub mod pipeline;
pub mod plumbing;
pub mod probe;
pub mod proto;
mod queue_dev;
pub mod replay;
pub mod run;
pub mod spec;
pub mod state;
pub mod topology;
pub mod uplink;
pub mod userns;
