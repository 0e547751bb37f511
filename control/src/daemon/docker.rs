//! Docker's remote network driver API (libnetwork's plugin protocol): JSON over HTTP on a Unix
//! socket, served with tiny_http. Each call maps onto the same operations as the CLI, so
//! `network inspect`, `macs`, `stats` and `conntrack` show Docker's endpoints like any other.
//!
//! What dockerd 20.10 does (measured): it never tells the driver the network's name, so the
//! switchyard network is named by `-o switchyard.name=` or Docker's 12-character id; CreateEndpoint
//! comes with an empty MAC, so we pick one; Join must return the interface (a tap we create in
//! our namespace, which Docker moves into the container and renames `ethN`) **and a gateway**;
//! on `docker stop` the order is Revoke, Leave, DeleteEndpoint.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use switchyard_switch::MacAddr;

use super::{seed_of, Daemon, Endpoint, State};
use crate::dataplane::PortIo;
use crate::error::{Error, Result};
use crate::ipam::Ipv4Net;
use crate::plumbing;
use crate::proto::{self, EndpointType};
use crate::spec::{PortMapping, Proto};
use crate::state::EndpointRecord;

/// Largest request body we read.
const MAX_BODY: u64 = 1 << 20;
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// An endpoint Docker created and has not joined (or has left): its address stays reserved.
#[derive(Clone, Debug)]
pub(super) struct Pending {
    network: String,
    ip: Ipv4Addr,
    mac: MacAddr,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IpData {
    #[serde(default)]
    pool: String,
    #[serde(default)]
    gateway: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(default)]
    options: Value,
    #[serde(default, rename = "IPv4Data")]
    ipv4_data: Vec<IpData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NetworkRef {
    #[serde(rename = "NetworkID")]
    network_id: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Interface {
    #[serde(default)]
    address: String,
    #[serde(default)]
    mac_address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EndpointCall {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
    #[serde(default)]
    interface: Option<Interface>,
    #[serde(default)]
    sandbox_key: String,
    #[serde(default)]
    options: Value,
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::bad_request(format!("malformed request: {e}")))
}

/// The switchyard name for Docker's endpoint: its first 12 hex digits, like `docker ps`.
fn endpoint_name(id: &str) -> String {
    id.chars().take(12).collect()
}

/// Docker's `com.docker.network.portmap` option as our mappings (HostPort 0: a free port).
fn portmap(options: &Value) -> Result<Vec<String>> {
    let Some(list) = options
        .get("com.docker.network.portmap")
        .and_then(Value::as_array)
    else {
        return Ok(Vec::new());
    };
    let mut specs = Vec::new();
    for m in list {
        let proto = match m.get("Proto").and_then(Value::as_u64) {
            Some(6) | None => "tcp",
            Some(17) => "udp",
            Some(p) => return Err(Error::invalid(format!("unsupported port protocol {p}"))),
        };
        let port = m.get("Port").and_then(Value::as_u64).unwrap_or(0);
        let host_port = m.get("HostPort").and_then(Value::as_u64).unwrap_or(0);
        let host_end = m
            .get("HostPortEnd")
            .and_then(Value::as_u64)
            .unwrap_or(host_port);
        let host_ip = m.get("HostIP").and_then(Value::as_str).unwrap_or("");
        let ip = match host_ip {
            "" | "0.0.0.0" => String::new(),
            ip if ip.contains(':') => continue, // IPv6 bindings: not yet
            ip => format!("{ip}:"),
        };
        let spec = if host_port == 0 {
            format!("{port}/{proto}")
        } else if host_end > host_port {
            // A host range for one container port: take the first (Docker tries each in turn).
            format!("{ip}{host_port}:{port}/{proto}")
        } else {
            format!("{ip}{host_port}:{port}/{proto}")
        };
        specs.push(spec);
    }
    Ok(specs)
}

impl Daemon {
    fn docker_network_name(st: &State, id: &str) -> Result<String> {
        st.networks
            .values()
            .find(|n| n.rec.id == id)
            .map(|n| n.rec.name.clone())
            .ok_or_else(|| Error::not_found(format!("network id {id} is not a switchyard network")))
    }

    fn docker_call(&self, path: &str, body: &[u8]) -> Result<Value> {
        match path {
            "/Plugin.Activate" => Ok(json!({ "Implements": ["NetworkDriver"] })),
            "/NetworkDriver.GetCapabilities" => {
                Ok(json!({ "Scope": "local", "ConnectivityScope": "local" }))
            }
            "/NetworkDriver.CreateNetwork" => {
                let c: CreateNetwork = decode(body)?;
                let generic = c
                    .options
                    .get("com.docker.network.generic")
                    .cloned()
                    .unwrap_or(Value::Null);
                let opt = |k: &str| generic.get(k).and_then(Value::as_str).map(str::to_string);
                let name = opt("switchyard.name").unwrap_or_else(|| endpoint_name(&c.network_id));
                let v4 = c.ipv4_data.first().ok_or_else(|| {
                    Error::invalid("Docker gave no IPv4 pool (switchyard networks need one)")
                })?;
                let subnet: Ipv4Net = v4.pool.parse()?;
                let gateway = match v4.gateway.split('/').next() {
                    Some(g) if !g.is_empty() => Some(
                        g.parse::<Ipv4Addr>()
                            .map_err(|_| Error::invalid(format!("bad gateway {:?}", v4.gateway)))?,
                    ),
                    _ => None,
                };
                let mtu = opt("com.docker.network.driver.mtu")
                    .map(|m| {
                        m.parse::<u32>()
                            .map_err(|_| Error::invalid(format!("bad MTU {m:?}")))
                    })
                    .transpose()?;
                let internal = opt("switchyard.internal").is_some_and(|v| v == "true")
                    || c.options
                        .get("com.docker.network.internal")
                        .and_then(Value::as_bool)
                        == Some(true);
                let mut st = self.lock();
                if let Some(n) = st.networks.get(&name) {
                    if n.rec.id == c.network_id {
                        return Ok(json!({})); // Docker retrying after a restart
                    }
                }
                let p = proto::NetworkCreate {
                    name,
                    subnet: Some(subnet),
                    gateway,
                    internal,
                    mtu,
                    dns_search: Vec::new(),
                };
                self.create_network(&mut st, p, Some(c.network_id.clone()), None)?;
                self.persist(&st);
                Ok(json!({}))
            }
            "/NetworkDriver.DeleteNetwork" => {
                let c: NetworkRef = decode(body)?;
                let mut st = self.lock();
                let Ok(name) = Self::docker_network_name(&st, &c.network_id) else {
                    return Ok(json!({})); // already gone: deleting is idempotent
                };
                st.docker_pending.retain(|_, p| p.network != name);
                self.remove_network(&mut st, &name, true)?;
                self.persist(&st);
                Ok(json!({}))
            }
            "/NetworkDriver.CreateEndpoint" => {
                let c: EndpointCall = decode(body)?;
                let mut st = self.lock();
                let name = Self::docker_network_name(&st, &c.network_id)?;
                if st.docker_pending.contains_key(&c.endpoint_id) {
                    return Err(Error::conflict(format!(
                        "endpoint {} exists",
                        c.endpoint_id
                    )));
                }
                let iface = c.interface.unwrap_or_default();
                let ip: Ipv4Addr = iface
                    .address
                    .split('/')
                    .next()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| Error::invalid("Docker gave the endpoint no IPv4 address"))?
                    .parse()
                    .map_err(|_| Error::invalid(format!("bad address {:?}", iface.address)))?;
                let given_mac = !iface.mac_address.is_empty();
                let mac: MacAddr = if given_mac {
                    iface.mac_address.parse().map_err(
                        |e: switchyard_switch::frame::ParseMacError| Error::invalid(e.to_string()),
                    )?
                } else {
                    MacAddr::local_from_seed(seed_of(&["docker", &c.endpoint_id]))
                };
                st.net_mut(&name)?.pool.take(ip)?;
                st.docker_pending.insert(
                    c.endpoint_id.clone(),
                    Pending {
                        network: name,
                        ip,
                        mac,
                    },
                );
                Ok(if given_mac {
                    json!({})
                } else {
                    json!({ "Interface": { "MacAddress": mac.to_string() } })
                })
            }
            "/NetworkDriver.EndpointOperInfo" => {
                let c: EndpointCall = decode(body)?;
                let st = self.lock();
                let name = endpoint_name(&c.endpoint_id);
                for n in st.networks.values() {
                    if let Some(e) = n.endpoints.get(&name) {
                        return Ok(
                            json!({ "Value": { "ip": e.rec.ip, "mac": e.rec.mac, "ports": e.rec.ports } }),
                        );
                    }
                }
                match st.docker_pending.get(&c.endpoint_id) {
                    Some(p) => Ok(json!({ "Value": { "ip": p.ip, "mac": p.mac } })),
                    None => Err(Error::not_found(format!(
                        "endpoint {} not found",
                        c.endpoint_id
                    ))),
                }
            }
            "/NetworkDriver.Join" => {
                let c: EndpointCall = decode(body)?;
                let mut st = self.lock();
                self.docker_join(&mut st, &c)
            }
            "/NetworkDriver.ProgramExternalConnectivity" => {
                let c: EndpointCall = decode(body)?;
                let specs = portmap(&c.options)?;
                if specs.is_empty() {
                    return Ok(json!({}));
                }
                let mut st = self.lock();
                let network = Self::docker_network_name(&st, &c.network_id)?;
                self.publish(
                    &mut st,
                    proto::Publish {
                        network,
                        name: endpoint_name(&c.endpoint_id),
                        specs,
                    },
                )?;
                self.persist(&st);
                Ok(json!({}))
            }
            "/NetworkDriver.RevokeExternalConnectivity" => {
                let c: EndpointCall = decode(body)?;
                let mut st = self.lock();
                let Ok(network) = Self::docker_network_name(&st, &c.network_id) else {
                    return Ok(json!({}));
                };
                let name = endpoint_name(&c.endpoint_id);
                let specs: Vec<String> = st
                    .net(&network)?
                    .endpoints
                    .get(&name)
                    .map(|e| e.rec.ports.iter().map(spec_of).collect())
                    .unwrap_or_default();
                if !specs.is_empty() {
                    self.unpublish(
                        &mut st,
                        proto::Publish {
                            network,
                            name,
                            specs,
                        },
                    )?;
                    self.persist(&st);
                }
                Ok(json!({}))
            }
            "/NetworkDriver.Leave" => {
                let c: EndpointCall = decode(body)?;
                let mut st = self.lock();
                self.docker_leave(&mut st, &c.network_id, &c.endpoint_id)?;
                self.persist(&st);
                Ok(json!({}))
            }
            "/NetworkDriver.DeleteEndpoint" => {
                let c: EndpointCall = decode(body)?;
                let mut st = self.lock();
                // Docker normally leaves first; if not, leave now.
                self.docker_leave(&mut st, &c.network_id, &c.endpoint_id)?;
                if let Some(p) = st.docker_pending.remove(&c.endpoint_id) {
                    if let Ok(n) = st.net_mut(&p.network) {
                        n.pool.release(p.ip);
                    }
                }
                self.persist(&st);
                Ok(json!({}))
            }
            "/NetworkDriver.DiscoverNew" | "/NetworkDriver.DiscoverDelete" => Ok(json!({})),
            other => Err(Error::not_found(format!("unknown call {other}"))),
        }
    }

    fn docker_join(&self, st: &mut State, c: &EndpointCall) -> Result<Value> {
        let network = Self::docker_network_name(st, &c.network_id)?;
        let p = st
            .docker_pending
            .get(&c.endpoint_id)
            .cloned()
            .ok_or_else(|| {
                Error::not_found(format!("endpoint {} was not created", c.endpoint_id))
            })?;
        let name = endpoint_name(&c.endpoint_id);
        let net = st.net(&network)?;
        if net.endpoints.contains_key(&name) {
            return Err(Error::conflict(format!(
                "endpoint {} already joined",
                c.endpoint_id
            )));
        }
        let (nid, gateway, mtu) = (net.nid, net.rec.gateway, net.rec.mtu);
        // The interface Docker moves into the container: a tap made in our namespace.
        let ifname = format!("sy{}", &c.endpoint_id.chars().take(13).collect::<String>());
        // With virtio-net headers and offloads, as `connect` makes them: 64 KB segments cross.
        let tap = plumbing::create_offload_tap(&ifname)
            .map_err(|e| Error::system(format!("creating tap {ifname}: {e}")))?;
        let configure = || -> std::result::Result<(), crate::netlink::NetlinkError> {
            let mut nl = crate::netlink::Netlink::open()?;
            if let Some(i) = nl.link_index(&ifname)? {
                nl.set_mac(i, p.mac.0)?;
                nl.set_mtu(i, mtu)?;
            }
            Ok(())
        };
        configure().map_err(|e| Error::system(e.to_string()))?;
        let ns_inode = crate::netns::NetNs::open(&c.sandbox_key)
            .and_then(|n| n.inode())
            .unwrap_or(0);
        let port = st.alloc_port();
        self.attach_port(nid, port, p.mac, p.ip, Vec::new(), PortIo::Tap(tap))?;
        let rec = EndpointRecord {
            name: name.clone(),
            ip: p.ip,
            mac: p.mac,
            netns: c.sandbox_key.clone(),
            pid: None,
            ns_inode,
            ifname: ifname.clone(),
            kind: EndpointType::Tap,
            host_ifname: None,
            ports: Vec::new(),
            docker_endpoint: Some(c.endpoint_id.clone()),
            aliases: Vec::new(),
            ns_by_fd: false,
        };
        st.docker_pending.remove(&c.endpoint_id);
        st.net_mut(&network)?
            .endpoints
            .insert(name.clone(), Endpoint { rec, port });
        self.persist(st);
        tracing::info!(network = %network, endpoint = %name, ip = %p.ip, "docker endpoint joined");
        Ok(json!({
            "InterfaceName": { "SrcName": ifname, "DstPrefix": "eth" },
            "Gateway": gateway.to_string(),
            "StaticRoutes": [],
            "DisableGatewayService": false,
        }))
    }

    /// Detach a joined Docker endpoint but keep its address reserved (DeleteEndpoint frees it).
    fn docker_leave(&self, st: &mut State, network_id: &str, endpoint_id: &str) -> Result<()> {
        let Ok(network) = Self::docker_network_name(st, network_id) else {
            return Ok(());
        };
        let name = endpoint_name(endpoint_id);
        let Some((ip, mac)) = st
            .net(&network)?
            .endpoints
            .get(&name)
            .map(|e| (e.rec.ip, e.rec.mac))
        else {
            return Ok(());
        };
        self.disconnect_endpoint(st, &network, &name, "docker leave")?;
        st.net_mut(&network)?.pool.take(ip)?;
        st.docker_pending
            .insert(endpoint_id.to_string(), Pending { network, ip, mac });
        Ok(())
    }
}

fn spec_of(m: &PortMapping) -> String {
    let proto = match m.proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    match m.host_ip {
        Some(ip) => format!("{ip}:{}:{}/{proto}", m.host_port, m.container_port),
        None => format!("{}:{}/{proto}", m.host_port, m.container_port),
    }
}

/// Serve the plugin socket until the daemon stops.
pub(super) fn serve(d: Arc<Daemon>, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::system(format!("creating {}: {e}", dir.display())))?;
    }
    let _ = std::fs::remove_file(path);
    let server = tiny_http::Server::http_unix(path)
        .map_err(|e| Error::system(format!("serving {}: {e}", path.display())))?;
    tracing::info!(socket = %path.display(), "docker network driver API ready");
    std::thread::Builder::new()
        .name("docker-plugin".into())
        .spawn(move || {
            for mut req in server.incoming_requests() {
                let mut body = Vec::new();
                let read = req.as_reader().take(MAX_BODY + 1).read_to_end(&mut body);
                let url = req.url().to_string();
                let (status, v) = match read {
                    Err(e) => (400, json!({ "Err": format!("reading the request: {e}") })),
                    Ok(_) if body.len() as u64 > MAX_BODY => {
                        (400, json!({ "Err": "request too large" }))
                    }
                    Ok(_) => match d.docker_call(&url, &body) {
                        Ok(v) => (200, v),
                        Err(e) => {
                            tracing::warn!(call = %url, "docker driver: {e}");
                            let status = if e.message.starts_with("unknown call") {
                                404
                            } else {
                                200
                            };
                            (status, json!({ "Err": e.message }))
                        }
                    },
                };
                let ct =
                    tiny_http::Header::from_bytes(&b"Content-Type"[..], CONTENT_TYPE.as_bytes())
                        .expect("static header");
                let resp = tiny_http::Response::from_string(v.to_string())
                    .with_status_code(status)
                    .with_header(ct);
                let _ = req.respond(resp);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portmap_to_specs() {
        let o = json!({"com.docker.network.portmap": [
            {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080},
            {"Proto": 17, "IP": "", "Port": 53, "HostIP": "127.0.0.1", "HostPort": 5353},
            {"Proto": 6, "Port": 443, "HostPort": 0},
            {"Proto": 6, "Port": 22, "HostIP": "::", "HostPort": 2222}
        ]});
        assert_eq!(
            portmap(&o).unwrap(),
            vec!["8080:80/tcp", "127.0.0.1:5353:53/udp", "443/tcp"]
        );
        assert!(
            portmap(&json!({"com.docker.network.portmap": [{"Proto": 132, "Port": 1}]})).is_err()
        );
        assert!(portmap(&json!({})).unwrap().is_empty());
    }
}
