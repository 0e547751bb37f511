//! `switchyard-cni`: a CNI 1.0 plugin (install it as `switchyard` in the engine's CNI plugin
//! directory). ADD attaches the container's namespace to a switchyard network through the
//! daemon's control socket, DEL detaches it (idempotent), CHECK verifies, VERSION reports.
//!
//! Config keys: `"type": "switchyard"`, `"network"` (created when absent if `"subnet"` and
//! optionally `"gateway"` are given), `"socket"` (the control socket: Podman calls DEL from a
//! clean-up process with a scrubbed environment), `"capabilities": {"portMappings": true}`.
//!
//! ADD hands the daemon the namespace as an open fd (`SCM_RIGHTS`), not only as a path: rootless
//! Podman runs plugins in its own user, network and mount namespaces, where `CNI_NETNS` names
//! something the daemon outside cannot open. Port mappings are published through switchyard by a
//! rootful engine only; a rootless one forwards them itself (Podman's rootlessport).

use std::io::Read;
use std::os::fd::AsFd;
use std::process::ExitCode;

use serde::Deserialize;
use serde_json::{json, Value};
use switchyard_control::client::{default_socket, Client};
use switchyard_control::error::{Error, ErrorCode};
use switchyard_control::proto::{self, EndpointInfo, NetworkInfo};

const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A CNI error: code per the spec (1-7, 11; 100+ ours), message, details.
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
}

impl From<Error> for CniError {
    fn from(e: Error) -> Self {
        let code = match e.code {
            ErrorCode::Unavailable => 11, // try again later
            ErrorCode::NotFound => 3,
            ErrorCode::InvalidArgument | ErrorCode::BadRequest => 7,
            ErrorCode::Conflict => 100,
            ErrorCode::Exhausted => 101,
            ErrorCode::System => 5,
            _ => 999,
        };
        CniError {
            code,
            msg: e.message,
            details: format!("{:?}", e.code),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortMap {
    host_port: u16,
    container_port: u16,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(rename = "hostIP", default)]
    host_ip: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RuntimeConfig {
    #[serde(default)]
    port_mappings: Vec<PortMap>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Conf {
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    socket: Option<String>,
    #[serde(default)]
    runtime_config: RuntimeConfig,
}

fn env(k: &str) -> Result<String, CniError> {
    std::env::var(k)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::new(4, format!("{k} is not set")))
}

/// Endpoint name for a container and interface: `cni-` and the first 12 characters of the id
/// (plus the interface, when it is not eth0, so one container can join twice).
fn endpoint_name(container: &str, ifname: &str) -> String {
    let short: String = container
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(12)
        .collect();
    if ifname == "eth0" {
        format!("cni-{short}")
    } else {
        format!("cni-{short}-{ifname}")
    }
}

/// Are we in a user namespace other than the initial one (run by a rootless engine)?
fn in_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"])
}

fn run(cmd: &str, stdin: &[u8]) -> Result<Value, CniError> {
    if cmd == "VERSION" {
        return Ok(json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED }));
    }
    let conf: Conf = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(6, format!("decoding the network configuration: {e}")))?;
    if !SUPPORTED.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            1,
            format!("unsupported cniVersion {}", conf.cni_version),
        ));
    }
    let network = conf
        .network
        .clone()
        .or_else(|| (!conf.name.is_empty()).then(|| conf.name.clone()))
        .ok_or_else(|| CniError::new(7, "the configuration names no \"network\""))?;
    let socket = conf
        .socket
        .clone()
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("SWITCHYARD_SOCKET").map(Into::into))
        .unwrap_or_else(default_socket);
    let container = env("CNI_CONTAINERID")?;
    let ifname = std::env::var("CNI_IFNAME").unwrap_or_else(|_| "eth0".into());
    let name = endpoint_name(&container, &ifname);
    match cmd {
        "ADD" => {
            let netns = env("CNI_NETNS")?;
            let mut c = Client::connect(&socket)?;
            let net: NetworkInfo = match c.call("network.inspect", json!({ "name": network })) {
                Ok(n) => n,
                Err(e) if e.code == ErrorCode::NotFound && conf.subnet.is_some() => c.call(
                    "network.create",
                    json!({ "name": network, "subnet": conf.subnet, "gateway": conf.gateway }),
                )?,
                Err(e) => return Err(e.into()),
            };
            let rootless = in_user_namespace();
            let publish: Vec<String> = conf
                .runtime_config
                .port_mappings
                .iter()
                // A rootless engine forwards its ports itself (Podman's rootlessport, from the
                // host into the container's namespace): publishing them too would take the
                // host port it is about to bind.
                .filter(|_| !rootless)
                .map(|m| {
                    let ip = m
                        .host_ip
                        .as_deref()
                        .filter(|i| !i.is_empty() && *i != "0.0.0.0");
                    let proto = m.protocol.as_deref().unwrap_or("tcp").to_lowercase();
                    match ip {
                        Some(ip) => format!("{ip}:{}:{}/{proto}", m.host_port, m.container_port),
                        None => format!("{}:{}/{proto}", m.host_port, m.container_port),
                    }
                })
                .collect();
            // The namespace goes along as an fd: rootless Podman runs us in a mount namespace of
            // its own, where CNI_NETNS is a path the daemon outside cannot open.
            let ns = std::fs::File::open(&netns)
                .map_err(|e| CniError::new(4, format!("CNI_NETNS {netns}: {e}")))?;
            let e: EndpointInfo = c.call_with_fd(
                "endpoint.connect",
                proto::Connect {
                    network: network.clone(),
                    netns: Some(netns.clone()),
                    netns_fd: true,
                    // Rootful Podman listens on every `-p` host port itself (conmon) to reserve it.
                    engine_holds_ports: !publish.is_empty(),
                    name: Some(name),
                    ifname: Some(ifname.clone()),
                    publish,
                    ..Default::default()
                },
                ns.as_fd(),
            )?;
            Ok(json!({
                "cniVersion": conf.cni_version,
                "interfaces": [{ "name": e.ifname, "mac": e.mac.to_string(), "sandbox": netns }],
                "ips": [{ "address": format!("{}/{}", e.ip, e.prefix_len), "gateway": net.gateway.to_string(), "interface": 0 }],
                "routes": [{ "dst": "0.0.0.0/0", "gw": net.gateway.to_string() }],
                // The network's embedded DNS server, for the runtime's resolv.conf.
                "dns": if net.dns { json!({ "nameservers": [net.gateway.to_string()], "search": net.dns_search }) } else { json!({}) },
            }))
        }
        "DEL" => {
            // Idempotent: nothing to remove is success, as the spec asks.
            let mut c = Client::connect(&socket)?;
            match c.call_value(
                "endpoint.disconnect",
                json!({ "network": network, "name": name }),
            ) {
                Ok(_) => Ok(Value::Null),
                Err(e) if e.code == ErrorCode::NotFound => Ok(Value::Null),
                Err(e) => Err(e.into()),
            }
        }
        "CHECK" => {
            let netns = env("CNI_NETNS")?;
            let mut c = Client::connect(&socket)?;
            let net: NetworkInfo = c.call("network.inspect", json!({ "name": network }))?;
            match net.endpoints.iter().find(|e| e.name == name) {
                Some(e) if e.netns == netns => Ok(Value::Null),
                Some(e) => Err(CniError::new(
                    100,
                    format!(
                        "endpoint {name} is attached to {} instead of {netns}",
                        e.netns
                    ),
                )),
                None => Err(CniError::new(
                    3,
                    format!("endpoint {name} is not attached to {network}"),
                )),
            }
        }
        other => Err(CniError::new(4, format!("unknown CNI_COMMAND {other:?}"))),
    }
}

fn main() -> ExitCode {
    let cmd = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = Vec::new();
    if cmd != "VERSION" {
        let _ = std::io::stdin().take(1 << 20).read_to_end(&mut stdin);
    }
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "1.0.0".into());
    match run(&cmd, &stdin) {
        Ok(Value::Null) => ExitCode::SUCCESS,
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "{}",
                json!({ "cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details })
            );
            ExitCode::FAILURE
        }
    }
}
