//! The control protocol: newline-delimited JSON over a Unix stream socket, one request per line,
//! one reply per request, in order. Documented with examples in docs/protocol.md.
//! These are the wire types; the daemon's own state types stay in `daemon.rs`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use switchyard_switch::MacAddr;

use crate::error::Error;
use crate::ipam::Ipv4Net;
use crate::spec::PortMapping;

/// Protocol version carried in every message as `"v"`.
pub const VERSION: u32 = 1;
/// Longest request line accepted; longer ones get an error reply and the connection closes.
pub const MAX_REQUEST: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(default)]
    pub id: u64,
    pub method: String,
    #[serde(default)]
    pub params: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub id: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EndpointType {
    #[default]
    Tap,
    Veth,
}

impl std::fmt::Display for EndpointType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EndpointType::Tap => "tap",
            EndpointType::Veth => "veth",
        })
    }
}

// ---- parameters ----

#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    pub name: String,
    #[serde(default)]
    pub subnet: Option<Ipv4Net>,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub mtu: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkName {
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRm {
    pub name: String,
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Connect {
    pub network: String,
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub mac: Option<MacAddr>,
    #[serde(default)]
    pub ifname: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<EndpointType>,
    #[serde(default)]
    pub publish: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointRef {
    pub network: String,
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    pub network: String,
    pub name: String,
    pub specs: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Macs {
    #[serde(default)]
    pub network: Option<String>,
}

// ---- results ----

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub name: String,
    pub network: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: MacAddr,
    pub netns: String,
    #[serde(default)]
    pub pid: Option<i32>,
    pub ifname: String,
    #[serde(rename = "type")]
    pub kind: EndpointType,
    #[serde(default)]
    pub host_ifname: Option<String>,
    pub ports: Vec<PortMapping>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkInfo {
    /// 64 hex digits, like Docker's network ids (`ls` shows the first 12).
    pub id: String,
    pub name: String,
    pub driver: String,
    pub scope: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub gateway_mac: MacAddr,
    pub internal: bool,
    pub mtu: u32,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MacEntry {
    pub network: String,
    pub mac: MacAddr,
    /// Endpoint name, or `gateway` for the network's router port.
    pub port: String,
    /// `static` (an endpoint or gateway the daemon created) or `learned`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Seconds since last seen, for learned entries.
    #[serde(default)]
    pub age: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PortStats {
    pub network: String,
    /// Endpoint name, or `gateway`.
    pub port: String,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: BTreeMap<String, u64>,
    pub learn_refused: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    pub ports: Vec<PortStats>,
    pub uplink: serde_json::Value,
    pub nat: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PortList {
    pub network: String,
    pub name: String,
    pub ports: Vec<PortMapping>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Version {
    pub version: String,
    pub protocol: u32,
}
