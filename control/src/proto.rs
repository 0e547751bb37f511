//! The control protocol: newline-delimited JSON over a Unix stream socket, one request per line,
//! one reply per request, in order. Documented with examples in docs/protocol.md.
//! These are the wire types; the daemon's own state types stay in `daemon.rs`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

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
    /// Search domains for the network's containers' resolv.conf; `NAME.DOMAIN` resolves like
    /// `NAME` at the embedded DNS server.
    #[serde(default)]
    pub dns_search: Vec<String>,
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
    /// More names the endpoint answers to in its network's DNS (besides `name`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The namespace comes as a file descriptor (`SCM_RIGHTS`) with the request's bytes;
    /// `netns` is then its path as the sender sees it (a CNI plugin in rootless Podman's mount
    /// namespace).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub netns_fd: bool,
    /// That descriptor, once received.
    #[serde(skip)]
    pub ns_fd: Option<OwnedFd>,
    /// The engine itself listens on the `publish` host ports in the requester's network
    /// namespace (rootful Podman's conmon reserves them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub engine_holds_ports: bool,
    /// The requester's network namespace (its inode), when `engine_holds_ports`.
    #[serde(skip)]
    pub peer_netns: Option<u64>,
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

/// Header of one captured frame in a `capture` stream, after the JSON reply line:
/// direction (0: sent by the container, 1: delivered to it), wall-clock microseconds since the
/// Unix epoch (little endian), frame length (little endian), then the frame.
pub const CAPTURE_RECORD_HEADER: usize = 1 + 8 + 4;

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
    /// DNS aliases (`connect --alias`).
    #[serde(default)]
    pub aliases: Vec<String>,
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
    /// The embedded DNS server answers at the gateway (every network but `bridge`, unless the
    /// daemon runs with `--bridge-dns`).
    #[serde(default)]
    pub dns: bool,
    /// Search domains (`network create --dns-search`).
    #[serde(default)]
    pub dns_search: Vec<String>,
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
    /// The dataplane worker that reads the port (none for the gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    pub ports: Vec<PortStats>,
    pub uplink: serde_json::Value,
    pub nat: serde_json::Value,
    /// The embedded DNS server's counters (one per outcome), pending forwards, cached answers.
    #[serde(default)]
    pub dns: serde_json::Value,
    /// The dataplane's worker threads:
    /// `{"threads":N,"migrations":M,"workers":[{"frames":F,"ports":P}]}`.
    #[serde(default)]
    pub dataplane: serde_json::Value,
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

/// A request decoded into its typed call. Decoding is pure (the control fuzz target drives it):
/// any bytes give a call or an error, never a panic.
#[derive(Debug)]
pub enum Call {
    Version,
    NetworkCreate(NetworkCreate),
    NetworkLs,
    NetworkInspect(NetworkName),
    NetworkRm(NetworkRm),
    Connect(Connect),
    Disconnect(EndpointRef),
    Publish(Publish),
    Unpublish(Publish),
    PortList(EndpointRef),
    Macs(Macs),
    Stats,
    Conntrack,
    /// Streams a copy of an endpoint's traffic: see docs/protocol.md.
    Capture(EndpointRef),
}

fn params<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, Error> {
    let v = if v.is_null() {
        serde_json::Value::Object(Default::default())
    } else {
        v.clone()
    };
    serde_json::from_value(v).map_err(|e| Error::bad_request(format!("invalid params: {e}")))
}

/// Decode one request line: size, JSON, version, method and parameter types are all checked.
/// The id is returned whenever it could be read, so errors can still be matched to requests.
pub fn decode(line: &[u8]) -> (u64, Result<Call, Error>) {
    if line.len() > MAX_REQUEST {
        return (
            0,
            Err(Error::bad_request(format!(
                "request larger than {MAX_REQUEST} bytes"
            ))),
        );
    }
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            return (
                0,
                Err(Error::bad_request(format!("malformed request: {e}"))),
            )
        }
    };
    (req.id, decode_request(&req))
}

pub fn decode_request(req: &Request) -> Result<Call, Error> {
    if req.v != VERSION {
        return Err(Error::bad_request(format!(
            "unsupported protocol version {} (this daemon speaks {VERSION})",
            req.v
        )));
    }
    let p = &req.params;
    Ok(match req.method.as_str() {
        "version" => Call::Version,
        "network.create" => Call::NetworkCreate(params(p)?),
        "network.ls" => Call::NetworkLs,
        "network.inspect" => Call::NetworkInspect(params(p)?),
        "network.rm" => Call::NetworkRm(params(p)?),
        "endpoint.connect" => Call::Connect(params(p)?),
        "endpoint.disconnect" => Call::Disconnect(params(p)?),
        "port.publish" => Call::Publish(params(p)?),
        "port.unpublish" => Call::Unpublish(params(p)?),
        "port.list" => Call::PortList(params(p)?),
        "macs" => Call::Macs(params(p)?),
        "stats" => Call::Stats,
        "conntrack" => Call::Conntrack,
        "capture" => Call::Capture(params(p)?),
        m => return Err(Error::bad_request(format!("unknown method {m:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn code(line: &str) -> Option<ErrorCode> {
        decode(line.as_bytes()).1.err().map(|e| e.code)
    }

    #[test]
    fn decodes_and_rejects() {
        assert!(matches!(
            decode(br#"{"v":1,"id":7,"method":"network.create","params":{"name":"n","subnet":"10.1.0.0/24"}}"#),
            (7, Ok(Call::NetworkCreate(_)))
        ));
        assert!(matches!(
            decode(br#"{"v":1,"method":"stats"}"#).1,
            Ok(Call::Stats)
        ));
        assert_eq!(code("not json"), Some(ErrorCode::BadRequest));
        assert_eq!(
            code(r#"{"v":2,"method":"stats"}"#),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(
            code(r#"{"v":1,"method":"nope"}"#),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(
            code(r#"{"v":1,"method":"network.create","params":{"name":5}}"#),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(
            code(
                r#"{"v":1,"method":"network.create","params":{"name":"x","subnet":"10.0.0.1/24"}}"#
            ),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(
            code(r#"{"v":1,"method":"endpoint.connect","params":{"network":"x","bogus":1}}"#),
            Some(ErrorCode::BadRequest)
        );
        let big = format!(
            r#"{{"v":1,"method":"stats","pad":"{}"}}"#,
            "x".repeat(MAX_REQUEST)
        );
        assert_eq!(code(&big), Some(ErrorCode::BadRequest));
    }
}
