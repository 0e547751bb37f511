//! The command line: Docker-shaped subcommands that talk to the daemon over its socket.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::client::{default_socket, Client};
use crate::error::{Error, Result};
use crate::ipam::Ipv4Net;
use crate::proto::{self, EndpointInfo, EndpointType, NetworkInfo};
use crate::spec::PortMapping;

#[derive(Parser, Debug)]
#[command(
    name = "switchyard",
    version,
    about = "A userspace virtual switch and NAT for containers"
)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "SWITCHYARD_SOCKET")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the daemon (dataplane and control socket) in the foreground.
    Daemon(DaemonArgs),
    /// Manage networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Attach a network namespace to a network.
    Connect(ConnectArgs),
    /// Detach an endpoint from a network and remove its interface.
    Disconnect { network: String, name: String },
    /// Run a command in a fresh network namespace attached to a network.
    Run(RunArgs),
    /// Publish ports of an endpoint.
    Publish {
        network: String,
        name: String,
        #[arg(required = true)]
        specs: Vec<String>,
    },
    /// Withdraw a published port.
    Unpublish {
        network: String,
        name: String,
        spec: String,
    },
    /// List an endpoint's published ports.
    Port {
        network: String,
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// The MAC table.
    Macs {
        network: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Tracked connections.
    Conntrack {
        #[arg(long)]
        json: bool,
    },
    /// Per-port counters and drops by reason.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Copy an endpoint's traffic (both directions) as pcap.
    Capture {
        network: String,
        name: String,
        /// Write the pcap here (`-` for stdout); without it a summary line per frame is printed.
        #[arg(short = 'w')]
        write: Option<PathBuf>,
        /// Stop after this many frames.
        #[arg(short = 'c')]
        count: Option<u64>,
    },
    /// Build a throw-away topology, run real traffic through it, print a summary.
    Demo,
    /// Replay a capture through the in-memory pipeline (no daemon, no privileges).
    Replay(crate::replay::ReplayArgs),
    #[command(hide = true, name = "__in-netns")]
    InNetns {
        path: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    #[command(hide = true, name = "__run-child")]
    RunChild {
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Rootless: make a tap inside a container's user and network namespaces (see userns.rs).
    #[command(hide = true, name = "__tap-helper")]
    TapHelper { request: String },
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Directory for the state file.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Interface the daemon owns as its raw uplink (AF_PACKET).
    #[arg(long, requires = "uplink_addr")]
    pub uplink: Option<String>,
    /// The uplink's address, e.g. 192.0.2.10/24.
    #[arg(long, requires = "uplink")]
    pub uplink_addr: Option<String>,
    /// Next hop for off-link destinations.
    #[arg(long, requires = "uplink")]
    pub uplink_gateway: Option<Ipv4Addr>,
    /// Socket uplink: containers reach the host's 127.0.0.1 through this address (off by
    /// default), like slirp4netns's 10.0.2.2.
    #[arg(long, value_name = "IP", conflicts_with = "uplink")]
    pub host_loopback: Option<Ipv4Addr>,
    /// Seconds before a learned MAC ages out.
    #[arg(long, default_value_t = 300)]
    pub mac_aging: u64,
    /// Most connections tracked at once.
    #[arg(long, default_value_t = 262_144)]
    pub conntrack_max: usize,
    /// Override a conntrack timeout, e.g. `udp_unreplied=5` (repeatable).
    #[arg(long = "conntrack-timeout", value_name = "NAME=SECS")]
    pub conntrack_timeouts: Vec<String>,
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Also serve Docker's remote network driver API (on /run/docker/plugins/switchyard.sock).
    #[arg(long)]
    pub docker_plugin: bool,
    /// Let this group (name or gid) use the control socket too (mode 0660).
    #[arg(long)]
    pub group: Option<String>,
    /// Where to serve the Docker driver API instead of /run/docker/plugins/switchyard.sock.
    #[arg(long, value_name = "PATH")]
    pub docker_plugin_socket: Option<PathBuf>,
    /// Upstream DNS server for names the embedded DNS does not know (repeatable; default: the
    /// nameservers of /etc/resolv.conf).
    #[arg(long = "dns", value_name = "IP")]
    pub dns: Vec<Ipv4Addr>,
    /// Serve the embedded DNS on the default `bridge` network too (off, like Docker's).
    #[arg(long)]
    pub bridge_dns: bool,
    /// Microseconds the dataplane keeps polling without sleeping after it moved frames, so a
    /// quick reply skips a thread wakeup (0: off). Spins only after traffic; an idle daemon
    /// blocks.
    #[arg(
        long,
        value_name = "USECS",
        env = "SWITCHYARD_BUSY_POLL",
        default_value_t = 50
    )]
    pub busy_poll: u64,
    /// Dataplane worker threads [default: 2, or 1 on a one-core machine]. Each container's
    /// port is read by one of them (its flows stay in order), and ports move to the worker of
    /// the ports they talk to (a port talking to the outside to worker 0, with the uplink), so
    /// one conversation runs on one worker and independent ones in parallel; the switch and
    /// the NAT are shared (README, Dataplane threads).
    #[arg(
        long,
        value_name = "N",
        env = "SWITCHYARD_THREADS",
        value_parser = clap::value_parser!(u16).range(1..=64)
    )]
    pub threads: Option<u16>,
}

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// Create a network.
    Create {
        name: String,
        #[arg(long)]
        subnet: Option<String>,
        #[arg(long)]
        gateway: Option<Ipv4Addr>,
        /// No NAT to the outside.
        #[arg(long)]
        internal: bool,
        #[arg(long)]
        mtu: Option<u32>,
        /// A search domain for the network's containers (repeatable): their resolv.conf names
        /// it, and NAME.DOMAIN resolves like NAME.
        #[arg(long = "dns-search", value_name = "DOMAIN")]
        dns_search: Vec<String>,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a network and its endpoints.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a network.
    #[command(alias = "remove")]
    Rm {
        name: String,
        /// Disconnect its endpoints first.
        #[arg(long, short)]
        force: bool,
    },
}

#[derive(Args, Debug)]
pub struct ConnectArgs {
    pub network: String,
    #[arg(long, required_unless_present = "pid", conflicts_with = "pid")]
    pub netns: Option<String>,
    #[arg(long)]
    pub pid: Option<i32>,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub ip: Option<Ipv4Addr>,
    #[arg(long)]
    pub mac: Option<String>,
    #[arg(long)]
    pub ifname: Option<String>,
    #[arg(long = "type", value_parser = ["tap", "veth"])]
    pub kind: Option<String>,
    #[arg(short = 'p', long = "publish")]
    pub publish: Vec<String>,
    /// Another name for the endpoint in its network's DNS (repeatable).
    #[arg(long = "alias", value_name = "NAME")]
    pub aliases: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[arg(long, default_value = "bridge")]
    pub network: String,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(short = 'p', long = "publish")]
    pub publish: Vec<String>,
    #[arg(long = "type", value_parser = ["tap", "veth"])]
    pub kind: Option<String>,
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

/// Columns padded to their widest cell, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::internal(e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn ports_str(ports: &[PortMapping]) -> String {
    ports
        .iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", U[i])
    }
}

pub fn client(socket: &Option<PathBuf>) -> Result<Client> {
    let p = socket.clone().unwrap_or_else(default_socket);
    Client::connect(&p)
}

pub fn network(socket: &Option<PathBuf>, cmd: NetworkCmd) -> Result<i32> {
    let mut c = client(socket)?;
    match cmd {
        NetworkCmd::Create {
            name,
            subnet,
            gateway,
            internal,
            mtu,
            dns_search,
        } => {
            let subnet: Option<Ipv4Net> = subnet.map(|s| s.parse()).transpose()?;
            let info: NetworkInfo = c.call(
                "network.create",
                proto::NetworkCreate {
                    name,
                    subnet,
                    gateway,
                    internal,
                    mtu,
                    dns_search,
                },
            )?;
            println!("{}", info.id);
        }
        NetworkCmd::Ls { json } => {
            let nets: Vec<NetworkInfo> = c.call("network.ls", json!({}))?;
            if json {
                return print_json(&nets).map(|_| 0);
            }
            let rows: Vec<Vec<String>> = nets
                .iter()
                .map(|n| {
                    vec![
                        n.id.chars().take(12).collect(),
                        n.name.clone(),
                        n.driver.clone(),
                        n.scope.clone(),
                        n.subnet.to_string(),
                        n.gateway.to_string(),
                        if n.internal { "true" } else { "false" }.into(),
                        n.endpoints.len().to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "NETWORK ID",
                        "NAME",
                        "DRIVER",
                        "SCOPE",
                        "SUBNET",
                        "GATEWAY",
                        "INTERNAL",
                        "ENDPOINTS"
                    ],
                    &rows
                )
            );
        }
        NetworkCmd::Inspect { name, json } => {
            let n: NetworkInfo = c.call("network.inspect", json!({ "name": name }))?;
            if json {
                return print_json(&n).map(|_| 0);
            }
            println!("Name:      {}", n.name);
            println!("Id:        {}", n.id);
            println!("Driver:    {} ({})", n.driver, n.scope);
            println!("Subnet:    {}", n.subnet);
            println!("Gateway:   {} ({})", n.gateway, n.gateway_mac);
            println!("Internal:  {}", n.internal);
            println!("MTU:       {}", n.mtu);
            println!(
                "DNS:       {}",
                if n.dns {
                    "embedded, at the gateway"
                } else {
                    "none"
                }
            );
            if !n.dns_search.is_empty() {
                println!("Search:    {}", n.dns_search.join(" "));
            }
            println!("Endpoints:");
            let rows: Vec<Vec<String>> = n.endpoints.iter().map(endpoint_row).collect();
            for l in table(
                &["NAME", "IP", "MAC", "TYPE", "IFNAME", "NETNS", "PORTS"],
                &rows,
            )
            .lines()
            {
                println!("  {l}");
            }
        }
        NetworkCmd::Rm { name, force } => {
            c.call_value("network.rm", json!({ "name": name, "force": force }))?;
            println!("{name}");
        }
    }
    Ok(0)
}

fn endpoint_row(e: &EndpointInfo) -> Vec<String> {
    vec![
        e.name.clone(),
        format!("{}/{}", e.ip, e.prefix_len),
        e.mac.to_string(),
        e.kind.to_string(),
        e.ifname.clone(),
        e.netns.clone(),
        ports_str(&e.ports),
    ]
}

pub fn connect(socket: &Option<PathBuf>, a: ConnectArgs) -> Result<i32> {
    let mut c = client(socket)?;
    let mac = a
        .mac
        .map(|m| {
            m.parse()
                .map_err(|e: switchyard_switch::frame::ParseMacError| Error::invalid(e.to_string()))
        })
        .transpose()?;
    let kind = a.kind.as_deref().map(|k| {
        if k == "veth" {
            EndpointType::Veth
        } else {
            EndpointType::Tap
        }
    });
    let e: EndpointInfo = c.call(
        "endpoint.connect",
        proto::Connect {
            network: a.network,
            netns: a.netns,
            pid: a.pid,
            name: a.name,
            ip: a.ip,
            mac,
            ifname: a.ifname,
            kind,
            publish: a.publish,
            aliases: a.aliases,
            ..Default::default()
        },
    )?;
    if a.json {
        return print_json(&e).map(|_| 0);
    }
    println!(
        "{} {} {}/{} {} {}",
        e.name,
        e.ifname,
        e.ip,
        e.prefix_len,
        e.mac,
        ports_str(&e.ports)
    );
    Ok(0)
}

pub fn simple(socket: &Option<PathBuf>, cmd: Cmd) -> Result<i32> {
    let mut c = client(socket)?;
    match cmd {
        Cmd::Disconnect { network, name } => {
            c.call_value(
                "endpoint.disconnect",
                json!({ "network": network, "name": name }),
            )?;
        }
        Cmd::Publish {
            network,
            name,
            specs,
        } => {
            let m: Vec<PortMapping> = c.call(
                "port.publish",
                json!({ "network": network, "name": name, "specs": specs }),
            )?;
            for p in m {
                println!("{p}");
            }
        }
        Cmd::Unpublish {
            network,
            name,
            spec,
        } => {
            c.call_value(
                "port.unpublish",
                json!({ "network": network, "name": name, "specs": [spec] }),
            )?;
        }
        Cmd::Port {
            network,
            name,
            json,
        } => {
            let m: Vec<PortMapping> =
                c.call("port.list", json!({ "network": network, "name": name }))?;
            if json {
                return print_json(&m).map(|_| 0);
            }
            for p in m {
                println!("{p}");
            }
        }
        Cmd::Macs { network, json } => {
            let m: Vec<proto::MacEntry> = c.call("macs", json!({ "network": network }))?;
            if json {
                return print_json(&m).map(|_| 0);
            }
            let rows: Vec<Vec<String>> = m
                .iter()
                .map(|e| {
                    vec![
                        e.network.clone(),
                        e.mac.to_string(),
                        e.port.clone(),
                        e.kind.clone(),
                        e.age.map(|a| format!("{a}s")).unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["NETWORK", "MAC", "PORT", "TYPE", "AGE"], &rows)
            );
        }
        Cmd::Stats { json } => {
            let s: proto::Stats = c.call("stats", json!({}))?;
            if json {
                return print_json(&s).map(|_| 0);
            }
            let rows: Vec<Vec<String>> = s
                .ports
                .iter()
                .map(|p| {
                    let drops: u64 = p.drops.values().sum();
                    let detail = p
                        .drops
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",");
                    vec![
                        p.network.clone(),
                        p.port.clone(),
                        p.rx_packets.to_string(),
                        human_bytes(p.rx_bytes),
                        p.tx_packets.to_string(),
                        human_bytes(p.tx_bytes),
                        drops.to_string(),
                        if detail.is_empty() {
                            "-".into()
                        } else {
                            detail
                        },
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "NETWORK",
                        "PORT",
                        "RX_PKTS",
                        "RX_BYTES",
                        "TX_PKTS",
                        "TX_BYTES",
                        "DROPS",
                        "DROP_REASONS"
                    ],
                    &rows
                )
            );
            if let Value::Object(nat) = &s.nat {
                let kv: Vec<String> = flatten_counters("", &Value::Object(nat.clone()));
                if !kv.is_empty() {
                    println!("nat: {}", kv.join(" "));
                }
            }
            if !s.uplink.is_null() {
                let kv = flatten_counters("", &s.uplink);
                println!("uplink: {}", kv.join(" "));
            }
            if !s.dns.is_null() {
                let kv = flatten_counters("", &s.dns);
                println!("dns: {}", kv.join(" "));
            }
            if let Some(ws) = s.dataplane["workers"].as_array() {
                let per: Vec<String> = ws
                    .iter()
                    .enumerate()
                    .map(|(k, w)| format!("worker{k}: frames={} ports={}", w["frames"], w["ports"]))
                    .collect();
                println!(
                    "dataplane: threads={} migrations={}; {}",
                    ws.len(),
                    s.dataplane["migrations"],
                    per.join("; ")
                );
            }
        }
        Cmd::Conntrack { json } => {
            let v = c.call_value("conntrack", json!({}))?;
            if json {
                return print_json(&v).map(|_| 0);
            }
            print!("{}", conntrack_table(&v));
        }
        _ => unreachable!("dispatched elsewhere"),
    }
    Ok(0)
}

/// `key=value` pairs of a (nested) JSON object, zero counters left out.
fn flatten_counters(prefix: &str, v: &Value) -> Vec<String> {
    match v {
        Value::Object(m) => m
            .iter()
            .flat_map(|(k, v)| {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_counters(&p, v)
            })
            .collect(),
        Value::Number(n) if n.as_u64() == Some(0) => vec![],
        Value::Null => vec![],
        other => vec![format!("{prefix}={}", other.to_string().trim_matches('"'))],
    }
}

/// The conntrack listing as a table, whatever fields each entry carries (scalar fields as
/// columns in their first-seen order, nested tuples flattened as `src:sport -> dst:dport`).
fn conntrack_table(v: &Value) -> String {
    let Value::Array(entries) = v else {
        return String::new();
    };
    let mut headers: Vec<String> = Vec::new();
    let mut rows: Vec<Vec<(String, String)>> = Vec::new();
    for e in entries {
        let Value::Object(m) = e else { continue };
        let mut row = Vec::new();
        for (k, v) in m {
            let s = match v {
                Value::Object(t) => {
                    let g = |k: &str| {
                        t.get(k)
                            .map(|v| v.to_string().trim_matches('"').to_string())
                    };
                    match (g("src"), g("sport"), g("dst"), g("dport")) {
                        (Some(s), Some(sp), Some(d), Some(dp)) => format!("{s}:{sp} -> {d}:{dp}"),
                        _ => Value::Object(t.clone()).to_string(),
                    }
                }
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if !headers.contains(k) {
                headers.push(k.clone());
            }
            row.push((k.clone(), s));
        }
        rows.push(row);
    }
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            headers
                .iter()
                .map(|h| {
                    r.iter()
                        .find(|(k, _)| k == h)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                })
                .collect()
        })
        .collect();
    let upper: Vec<String> = headers.iter().map(|h| h.to_uppercase()).collect();
    let hs: Vec<&str> = upper.iter().map(String::as_str).collect();
    table(&hs, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xxxx".into(), "1".into()],
                vec!["y".into(), "2".into()],
            ],
        );
        assert_eq!(t, "A     LONGER\nxxxx  1\ny     2\n");
    }

    #[test]
    fn cli_parses_contract_forms() {
        let c = Cli::try_parse_from([
            "switchyard",
            "connect",
            "mynet",
            "--netns",
            "/run/netns/c1",
            "--name",
            "c1",
            "-p",
            "8080:80",
            "-p",
            "5353:53/udp",
            "--type",
            "veth",
        ])
        .unwrap();
        match c.cmd {
            Cmd::Connect(a) => {
                assert_eq!(a.publish, vec!["8080:80", "5353:53/udp"]);
                assert_eq!(a.kind.as_deref(), Some("veth"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Cli::try_parse_from(["switchyard", "connect", "mynet"]).is_err(),
            "needs --netns or --pid"
        );
        assert!(
            Cli::try_parse_from(["switchyard", "connect", "n", "--netns", "x", "--pid", "1"])
                .is_err()
        );
        let c = Cli::try_parse_from([
            "switchyard",
            "run",
            "--network",
            "mynet",
            "--name",
            "web",
            "--",
            "python3",
            "-m",
            "http.server",
        ])
        .unwrap();
        match c.cmd {
            Cmd::Run(r) => assert_eq!(r.cmd, vec!["python3", "-m", "http.server"]),
            other => panic!("{other:?}"),
        }
        assert!(
            Cli::try_parse_from(["switchyard", "daemon", "--uplink", "up0"]).is_err(),
            "needs --uplink-addr"
        );
    }
}
