//! The daemon: control socket, network and endpoint lifecycle, persistence, liveness watch.
//!
//! Threads: one accepting the control socket (a short-lived thread per client), one watching
//! endpoint namespaces, one waiting for SIGTERM/SIGINT, and the dataplane thread. The control
//! state sits behind one mutex; the dataplane is reached only through [`Dataplane::call`].

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration as StdDuration;

use serde_json::{json, Value};
use switchyard_nat::{NetworkConfig, PortForward, Proto as NatProto, RouterConfig, UplinkConfig};
use switchyard_switch::backend::fdpass;
use switchyard_switch::mac_table::MacTableConfig;
use switchyard_switch::{Duration, MacAddr, NetworkId, PortId, PortKind, SwitchConfig};

use crate::dataplane::{Dataplane, PortIo};
use crate::error::{Error, ErrorCode, Result};
use crate::ipam::{self, Ipv4Net, Pool};
use crate::netns::NetNs;
use crate::pipeline::Pipeline;
use crate::plumbing::{self, EndpointSpec};
use crate::proto::{self, Call, EndpointInfo, EndpointType, NetworkInfo, Response};
use crate::spec::{PortMapping, Proto, PublishSpec};
use crate::state::{self, EndpointRecord, Loaded, NetworkRecord, Persisted};

mod docker;

/// Most control clients served at once; more get an "unavailable" reply.
const MAX_CLIENTS: usize = 128;
/// A client that sends nothing for this long is dropped (it holds no lock meanwhile).
const CLIENT_IDLE: StdDuration = StdDuration::from_secs(60);
const DEFAULT_NETWORK: &str = "bridge";

/// The raw uplink (`--uplink IFACE --uplink-addr CIDR [--uplink-gateway IP]`).
#[derive(Clone, Debug)]
pub struct UplinkArgs {
    pub iface: String,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub uplink: Option<UplinkArgs>,
    /// Socket uplink: the address containers use to reach the host's 127.0.0.1.
    pub host_loopback: Option<Ipv4Addr>,
    pub mac_aging: StdDuration,
    pub conntrack_max: usize,
    /// Conntrack timeouts overridden by name (`tcp_established`, `udp_unreplied`, ...).
    pub conntrack_timeouts: Vec<(String, u64)>,
    /// Serve Docker's remote network driver API on this socket.
    pub docker_plugin: Option<PathBuf>,
    /// Members of this group may use the control socket too (mode 0660).
    pub group: Option<u32>,
    /// Upstream DNS servers (`--dns`); empty: the host's /etc/resolv.conf.
    pub dns: Vec<Ipv4Addr>,
    /// Serve the embedded DNS on the default `bridge` network too.
    pub bridge_dns: bool,
    /// How long the dataplane polls without sleeping after moving frames (zero: off).
    pub busy_poll: StdDuration,
    /// Dataplane worker threads (`--threads`).
    pub threads: usize,
}

/// Apply `NAME=SECS` overrides to the conntrack timeouts.
pub fn apply_timeouts(
    c: &mut switchyard_nat::conntrack::ConntrackConfig,
    t: &[(String, u64)],
) -> Result<()> {
    for (k, secs) in t {
        let d = Duration::from_secs(*secs);
        let slot = match k.as_str() {
            "tcp_syn_sent" => &mut c.tcp_syn_sent,
            "tcp_syn_recv" => &mut c.tcp_syn_recv,
            "tcp_established" => &mut c.tcp_established,
            "tcp_fin_wait" => &mut c.tcp_fin_wait,
            "tcp_close_wait" => &mut c.tcp_close_wait,
            "tcp_last_ack" => &mut c.tcp_last_ack,
            "tcp_time_wait" => &mut c.tcp_time_wait,
            "tcp_close" => &mut c.tcp_close,
            "udp_unreplied" => &mut c.udp_unreplied,
            "udp_assured" => &mut c.udp_assured,
            "icmp" => &mut c.icmp,
            other => {
                return Err(Error::invalid(format!(
                    "unknown conntrack timeout {other:?} (tcp_syn_sent, tcp_syn_recv, tcp_established, tcp_fin_wait, tcp_close_wait, tcp_last_ack, tcp_time_wait, tcp_close, udp_unreplied, udp_assured, icmp)"
                )))
            }
        };
        *slot = d;
    }
    Ok(())
}

struct Endpoint {
    rec: EndpointRecord,
    port: PortId,
}

struct Network {
    rec: NetworkRecord,
    nid: NetworkId,
    pool: Pool,
    router_port: PortId,
    endpoints: BTreeMap<String, Endpoint>,
    /// The embedded DNS server answers at the gateway.
    dns: bool,
}

impl Network {
    fn info(&self) -> NetworkInfo {
        NetworkInfo {
            id: self.rec.id.clone(),
            name: self.rec.name.clone(),
            driver: "switchyard".into(),
            scope: "local".into(),
            subnet: self.rec.subnet,
            gateway: self.rec.gateway,
            gateway_mac: self.rec.gateway_mac,
            internal: self.rec.internal,
            mtu: self.rec.mtu,
            dns: self.dns,
            dns_search: self.rec.dns_search.clone(),
            created: self.rec.created,
            endpoints: self
                .endpoints
                .values()
                .map(|e| self.endpoint_info(e))
                .collect(),
        }
    }

    fn endpoint_info(&self, e: &Endpoint) -> EndpointInfo {
        EndpointInfo {
            name: e.rec.name.clone(),
            network: self.rec.name.clone(),
            ip: e.rec.ip,
            prefix_len: self.rec.subnet.prefix_len(),
            mac: e.rec.mac,
            netns: e.rec.netns.clone(),
            pid: e.rec.pid,
            ifname: e.rec.ifname.clone(),
            kind: e.rec.kind,
            host_ifname: e.rec.host_ifname.clone(),
            ports: e.rec.ports.clone(),
            aliases: e.rec.aliases.clone(),
        }
    }
}

#[derive(Default)]
struct State {
    networks: BTreeMap<String, Network>,
    next_nid: u16,
    next_port: u32,
    /// Docker endpoints created but not joined (or left): address reserved, no port yet.
    docker_pending: BTreeMap<String, docker::Pending>,
}

impl State {
    fn net(&self, name: &str) -> Result<&Network> {
        self.networks
            .get(name)
            .ok_or_else(|| Error::not_found(format!("network {name:?} not found")))
    }
    fn net_mut(&mut self, name: &str) -> Result<&mut Network> {
        self.networks
            .get_mut(name)
            .ok_or_else(|| Error::not_found(format!("network {name:?} not found")))
    }
    fn alloc_port(&mut self) -> PortId {
        self.next_port += 1;
        PortId(self.next_port)
    }
    fn alloc_nid(&mut self) -> Result<NetworkId> {
        for _ in 0..u16::MAX {
            self.next_nid = self.next_nid.wrapping_add(1).max(1);
            let id = NetworkId(self.next_nid);
            if !self.networks.values().any(|n| n.nid == id) {
                return Ok(id);
            }
        }
        Err(Error::exhausted("too many networks"))
    }
    fn all_mappings(&self) -> Vec<PortMapping> {
        self.networks
            .values()
            .flat_map(|n| n.endpoints.values())
            .flat_map(|e| e.rec.ports.iter().copied())
            .collect()
    }
    fn persisted(&self) -> Persisted {
        Persisted {
            format: 0,
            networks: self
                .networks
                .values()
                .map(|n| {
                    let mut r = n.rec.clone();
                    r.endpoints = n.endpoints.values().map(|e| e.rec.clone()).collect();
                    r
                })
                .collect(),
        }
    }
}

pub struct Daemon {
    cfg: DaemonConfig,
    state: Mutex<State>,
    dp: Mutex<Option<Dataplane>>,
    uid: u32,
    stopping: AtomicBool,
    clients: AtomicUsize,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_err()
    {
        let seed = now_secs() ^ u64::from(std::process::id());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = MacAddr::local_from_seed(seed.wrapping_add(i as u64)).0[5];
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn seed_of(parts: &[&str]) -> u64 {
    // FNV-1a: stable across runs (unlike std's RandomState), which keeps MACs stable.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn valid_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid {kind} name {name:?}: use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
        )))
    }
}

/// Search domains as resolv.conf takes them (glibc reads 6 at most): DNS names, normalised,
/// each once.
fn valid_search(domains: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for d in domains {
        let n = crate::dns::normalize(d).ok_or_else(|| {
            Error::invalid(format!(
                "invalid search domain {d:?}: use a DNS name (letters, digits, '-', '_', dots between labels)"
            ))
        })?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    if out.len() > 6 {
        return Err(Error::invalid("at most 6 search domains"));
    }
    Ok(out)
}

fn valid_ifname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 15
        || name.contains(['/', ' ', ':'])
        || name == "."
        || name == ".."
    {
        return Err(Error::invalid(format!(
            "invalid interface name {name:?} (1-15 characters, no '/', ':' or spaces)"
        )));
    }
    Ok(())
}

fn to_nat_proto(p: Proto) -> NatProto {
    match p {
        Proto::Tcp => NatProto::Tcp,
        Proto::Udp => NatProto::Udp,
    }
}

fn forward_of(nid: NetworkId, ip: Ipv4Addr, m: &PortMapping) -> PortForward {
    PortForward {
        proto: to_nat_proto(m.proto),
        host_ip: m.host_ip,
        host_port: m.host_port,
        network: nid,
        container_ip: ip,
        container_port: m.container_port,
    }
}

/// Is the namespace an endpoint was attached to still there, and still the same one?
/// The inode of the network namespace mounted at `path`; None while `path` is not one.
fn nsfs_inode(path: &str) -> Option<u64> {
    NetNs::open(path).and_then(|ns| ns.inode()).ok()
}

fn namespace_alive(rec: &EndpointRecord) -> bool {
    let ns = match rec.pid {
        Some(pid) => NetNs::of_pid(pid as u32),
        None => NetNs::open(&rec.netns),
    };
    ns.and_then(|ns| ns.inode())
        .is_ok_and(|ino| ino == rec.ns_inode)
}

/// A published port in the router and, with the socket uplink, its host listener: a port
/// that cannot be bound is a clear error now, not a silent hole later.
fn add_forward(dp: &mut crate::dataplane::DpState, f: &PortForward) -> Result<()> {
    dp.pipeline
        .router
        .add_forward(*f)
        .map_err(|e| Error::conflict(format!("{e:?}")))?;
    if let Some(h) = dp.socket_uplink() {
        if let Err(e) = h.publish(f) {
            let _ = dp
                .pipeline
                .router
                .remove_forward(f.proto, f.host_ip, f.host_port);
            let ip = f.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
            let proto = format!("{:?}", f.proto).to_lowercase();
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied && f.host_port < 1024 {
                " (ports below net.ipv4.ip_unprivileged_port_start need privileges)"
            } else {
                ""
            };
            return Err(Error::conflict(format!(
                "cannot listen on {ip}:{}/{proto} for a published port: {e}{hint}",
                f.host_port
            )));
        }
    }
    Ok(())
}

fn remove_forward(dp: &mut crate::dataplane::DpState, f: &PortForward) {
    let _ = dp
        .pipeline
        .router
        .remove_forward(f.proto, f.host_ip, f.host_port);
    if let Some(h) = dp.socket_uplink() {
        h.unpublish(f.proto, f.host_ip, f.host_port);
    }
}

impl Daemon {
    fn dp<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::dataplane::DpState) -> R + Send + 'static,
    ) -> Result<R> {
        let g = self.dp.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_ref() {
            Some(dp) => dp.call(f),
            None => Err(Error::unavailable("the daemon is shutting down")),
        }
    }

    /// With the socket uplink, can the host bind this port now? (Picking a free port.)
    fn host_port_free(&self, m: &PortMapping) -> bool {
        if self.cfg.uplink.is_some() {
            return true;
        }
        let addr = (m.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), m.host_port);
        match m.proto {
            Proto::Tcp => std::net::TcpListener::bind(addr).is_ok(),
            Proto::Udp => std::net::UdpSocket::bind(addr).is_ok(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, st: &State) {
        if let Err(e) = state::save(&self.cfg.state_dir, &st.persisted()) {
            tracing::error!("saving state: {e}");
        }
    }

    // ---- networks ----

    fn create_network(
        &self,
        st: &mut State,
        p: proto::NetworkCreate,
        id: Option<String>,
        created: Option<u64>,
    ) -> Result<NetworkInfo> {
        valid_name("network", &p.name)?;
        if st.networks.contains_key(&p.name) {
            return Err(Error::conflict(format!(
                "network {:?} already exists",
                p.name
            )));
        }
        let taken: Vec<Ipv4Net> = st.networks.values().map(|n| n.rec.subnet).collect();
        let subnet = match p.subnet {
            Some(s) => {
                if let Some(o) = st.networks.values().find(|n| n.rec.subnet.overlaps(&s)) {
                    return Err(Error::conflict(format!(
                        "subnet {s} overlaps subnet {} of network {:?}",
                        o.rec.subnet, o.rec.name
                    )));
                }
                s
            }
            None => ipam::next_free_subnet(&taken)
                .ok_or_else(|| Error::exhausted("no free subnet left in the default pools"))?,
        };
        if let Some(u) = &self.cfg.uplink {
            let up = Ipv4Net::new(
                Ipv4Addr::from(
                    u32::from(u.addr)
                        & Ipv4Net::new(Ipv4Addr::UNSPECIFIED, u.prefix_len)
                            .map(|n| n.mask())
                            .unwrap_or(0),
                ),
                u.prefix_len,
            )?;
            if up.overlaps(&subnet) {
                return Err(Error::conflict(format!(
                    "subnet {subnet} overlaps the uplink's subnet {up}"
                )));
            }
        }
        if let Some(h) = self.cfg.host_loopback.filter(|h| subnet.contains(*h)) {
            return Err(Error::conflict(format!(
                "subnet {subnet} holds the daemon's --host-loopback address {h}"
            )));
        }
        let gateway = match p.gateway {
            Some(g) => g,
            None => subnet
                .nth(1)
                .ok_or_else(|| Error::invalid("subnet too small"))?,
        };
        let pool = Pool::new(subnet, gateway)?;
        let dns_search = valid_search(&p.dns_search)?;
        let mtu = p.mtu.unwrap_or(1500);
        if !(68..=65520).contains(&mtu) {
            return Err(Error::invalid(format!("invalid MTU {mtu} (68-65520)")));
        }
        let nid = st.alloc_nid()?;
        let router_port = st.alloc_port();
        let gateway_mac = MacAddr::local_from_seed(seed_of(&["gateway", &p.name]));
        let rec = NetworkRecord {
            id: id.unwrap_or_else(|| random_hex(32)),
            name: p.name.clone(),
            subnet,
            gateway,
            gateway_mac,
            internal: p.internal,
            mtu,
            dns_search: dns_search.clone(),
            created: created.unwrap_or_else(now_secs),
            endpoints: Vec::new(),
        };
        let ncfg = NetworkConfig {
            id: nid,
            subnet: subnet.network(),
            prefix_len: subnet.prefix_len(),
            gateway_ip: gateway,
            gateway_mac,
            internal: p.internal,
            mtu: mtu as usize,
        };
        let dns = (p.name != DEFAULT_NETWORK || self.cfg.bridge_dns).then(|| crate::dns::NetInfo {
            subnet: subnet.network(),
            prefix_len: subnet.prefix_len(),
            gateway,
            internal: p.internal,
            search: dns_search,
            mtu: mtu as usize,
        });
        let has_dns = dns.is_some();
        self.dp(move |dp| -> Result<()> {
            let now = dp.now();
            // All or nothing: a router port that cannot be added leaves no half-made network.
            dp.pipeline
                .add_network(ncfg, router_port, now)
                .map_err(|e| Error::internal(e.to_string()))?;
            dp.pipeline.set_dns_network(nid, dns);
            Ok(())
        })??;
        let net = Network {
            dns: has_dns,
            rec,
            nid,
            pool,
            router_port,
            endpoints: BTreeMap::new(),
        };
        let info = net.info();
        st.networks.insert(p.name.clone(), net);
        tracing::info!(network = %p.name, %subnet, %gateway, "network created");
        Ok(info)
    }

    fn remove_network(&self, st: &mut State, name: &str, force: bool) -> Result<()> {
        let net = st.net(name)?;
        if !net.endpoints.is_empty() {
            if !force {
                let names: Vec<&str> = net.endpoints.keys().map(String::as_str).collect();
                return Err(Error::conflict(format!(
                    "network {name:?} has active endpoints ({}); disconnect them or use --force",
                    names.join(", ")
                )));
            }
            let eps: Vec<String> = net.endpoints.keys().cloned().collect();
            for e in eps {
                self.disconnect_endpoint(st, name, &e, "network removed")?;
            }
        }
        let net = st.net(name)?;
        let (nid, rp) = (net.nid, net.router_port);
        self.dp(move |dp| {
            let _ = dp.pipeline.switch.remove_port(rp);
            dp.pipeline.set_router_port(nid, None);
            let _ = dp.pipeline.switch.remove_network(nid);
            let _ = dp.pipeline.router.remove_network(nid);
            dp.pipeline.set_dns_network(nid, None);
        })?;
        st.networks.remove(name);
        tracing::info!(network = %name, "network removed");
        Ok(())
    }

    // ---- endpoints ----

    fn connect(
        &self,
        st: &mut State,
        mut p: proto::Connect,
        restore: Option<&EndpointRecord>,
    ) -> Result<EndpointInfo> {
        let passed = p.ns_fd.take();
        if p.netns_fd && (passed.is_none() || p.netns.is_none() || p.pid.is_some()) {
            return Err(Error::bad_request(
                "netns_fd: send the namespace's fd with the request (SCM_RIGHTS) and its path as netns, without pid",
            ));
        }
        let mut ns_by_fd = false;
        let (ns, netns_path, pid) = match (&p.netns, p.pid) {
            (Some(_), Some(_)) => return Err(Error::invalid("give --netns or --pid, not both")),
            (None, None) => return Err(Error::invalid("give --netns PATH or --pid PID")),
            (Some(path), None) if p.netns_fd => {
                let given = passed
                    .map(NetNs::from_fd)
                    .transpose()
                    .map_err(|e| Error::invalid(format!("the namespace passed for {path}: {e}")))?;
                let given = given.ok_or_else(|| Error::internal("no namespace fd"))?;
                // The path, when it names that namespace here too: the daemon can then reopen it
                // (reaping, restore). Otherwise (another mount namespace) the fd is all there is.
                let ino = given.inode().ok();
                match NetNs::open(path) {
                    Ok(ns) if ns.inode().ok() == ino => (ns, path.clone(), None),
                    _ => {
                        ns_by_fd = true;
                        (given, path.clone(), None)
                    }
                }
            }
            (Some(path), None) => {
                let ns = NetNs::open(path)
                    .map_err(|e| Error::not_found(format!("network namespace {path}: {e}")))?;
                (ns, path.clone(), None)
            }
            (None, Some(pid)) => {
                if pid <= 0 {
                    return Err(Error::invalid(format!("invalid pid {pid}")));
                }
                let ns = NetNs::of_pid(pid as u32).map_err(|e| {
                    Error::not_found(format!("network namespace of pid {pid}: {e}"))
                })?;
                (ns, format!("/proc/{pid}/ns/net"), Some(pid))
            }
        };
        let ns_inode = ns
            .inode()
            .map_err(|e| Error::system(format!("namespace inode: {e}")))?;
        if let Some(r) = restore {
            if r.ns_inode != ns_inode {
                return Err(Error::not_found(
                    "the namespace at that path is a different one now",
                ));
            }
        }
        let host_ns = NetNs::current().ok().and_then(|n| n.inode().ok());
        if host_ns == Some(ns_inode) {
            return Err(Error::invalid("that is the daemon's own network namespace"));
        }
        let name = match &p.name {
            Some(n) => n.clone(),
            None => match pid {
                Some(pid) => format!("pid{pid}"),
                None => Path::new(&netns_path)
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "endpoint".into()),
            },
        };
        valid_name("endpoint", &name)?;
        for a in &p.aliases {
            if crate::dns::normalize(a).is_none() {
                return Err(Error::invalid(format!(
                    "invalid alias {a:?}: use a DNS name (letters, digits, '-', '_', dots between labels)"
                )));
            }
        }
        let kind = p.kind.unwrap_or_default();
        // Rootless: a helper process enters the namespace through the user namespace owning it.
        let rootless = self.uid != 0;
        if rootless && kind == EndpointType::Veth {
            return Err(Error::invalid(
                "--type veth needs a root daemon; a rootless daemon makes tap endpoints (the default)",
            ));
        }
        let net = st.net(&p.network)?;
        if net.endpoints.contains_key(&name) {
            return Err(Error::conflict(format!(
                "endpoint {name:?} already exists on network {:?}",
                p.network
            )));
        }
        if let Some(other) = net.endpoints.values().find(|e| e.rec.ns_inode == ns_inode) {
            return Err(Error::conflict(format!(
                "that namespace is already connected to network {:?} as {:?}",
                p.network, other.rec.name
            )));
        }
        let mac = p.mac.unwrap_or_else(|| {
            MacAddr::local_from_seed(seed_of(&[&p.network, &name, &net.rec.id]))
        });
        if mac.is_invalid_source() {
            return Err(Error::invalid(format!(
                "MAC {mac} is not a unicast address"
            )));
        }
        if mac == net.rec.gateway_mac || net.endpoints.values().any(|e| e.rec.mac == mac) {
            return Err(Error::conflict(format!(
                "MAC {mac} is already in use on {:?}",
                p.network
            )));
        }
        if p.engine_holds_ports && !p.publish.is_empty() {
            self.check_engine_ports(&p)?;
        }
        // Publish specs are checked before anything is created.
        let mut mappings: Vec<PortMapping> = Vec::new();
        let existing = st.all_mappings();
        for s in &p.publish {
            let spec: PublishSpec = s.parse()?;
            let m = spec.expand(|m| {
                !existing.iter().any(|o| o.collides(m))
                    && !mappings.iter().any(|o| o.collides(m))
                    && (spec.host_ports.is_some() || self.host_port_free(m))
            })?;
            mappings.extend(m);
        }
        let mut ifname = match &p.ifname {
            Some(i) => {
                valid_ifname(i)?;
                i.clone()
            }
            // The helper picks the first free ethN inside.
            None if rootless => String::new(),
            None => {
                plumbing::first_free_ifname(&ns, "eth").map_err(|e| Error::system(e.to_string()))?
            }
        };
        let (nid, gateway, prefix, mtu, net_id, search) = (
            net.nid,
            net.rec.gateway,
            net.rec.subnet.prefix_len(),
            net.rec.mtu,
            net.rec.id.clone(),
            net.rec.dns_search.clone(),
        );
        let net = st.net_mut(&p.network)?;
        let ip = match p.ip {
            Some(ip) => {
                net.pool.take(ip)?;
                ip
            }
            None => net.pool.allocate()?,
        };
        let port = st.alloc_port();
        let espec = EndpointSpec {
            ifname: ifname.clone(),
            mac: mac.0,
            ip,
            prefix_len: prefix,
            gateway,
            mtu,
        };
        let release = |st: &mut State| {
            if let Ok(n) = st.net_mut(&p.network) {
                n.pool.release(ip);
            }
        };
        let (io, host_ifname) = match kind {
            EndpointType::Tap if rootless => {
                let req = crate::userns::TapRequest {
                    ifname: espec.ifname.clone(),
                    mac: espec.mac,
                    ip,
                    prefix_len: prefix,
                    gateway,
                    mtu,
                };
                match crate::userns::create_tap(&req, &ns) {
                    Ok((t, name)) => {
                        ifname = name;
                        (PortIo::Tap(t), None)
                    }
                    Err(e) => {
                        release(st);
                        return Err(Error::system(e));
                    }
                }
            }
            EndpointType::Tap => match plumbing::create_tap_endpoint(&ns, &espec) {
                Ok(t) => (PortIo::Tap(t), None),
                Err(e) => {
                    release(st);
                    return Err(Error::system(e.to_string()));
                }
            },
            EndpointType::Veth => {
                let host = format!("sy{}x{}", nid.0, port.0);
                let _ = plumbing::remove_veth(&host);
                match plumbing::create_veth_endpoint(&ns, &espec, &host) {
                    Ok(v) => (PortIo::Packet(v.socket), Some(v.host_ifname)),
                    Err(e) => {
                        release(st);
                        return Err(Error::system(e.to_string()));
                    }
                }
            }
        };
        let forwards: Vec<PortForward> = mappings.iter().map(|m| forward_of(nid, ip, m)).collect();
        let r = self.attach_port(nid, port, mac, ip, forwards, io);
        if let Err(e) = r {
            release(st);
            if let Some(h) = &host_ifname {
                let _ = plumbing::remove_veth(h);
            }
            return Err(e);
        }
        let rec = EndpointRecord {
            name: name.clone(),
            ip,
            mac,
            netns: netns_path,
            pid,
            ns_inode,
            ifname,
            kind,
            host_ifname,
            ports: mappings,
            docker_endpoint: None,
            aliases: p.aliases.clone(),
            ns_by_fd,
        };
        self.dns_names(nid, ip, &rec, gateway, &search);
        let net = st.net_mut(&p.network)?;
        net.endpoints.insert(name.clone(), Endpoint { rec, port });
        let info = net.endpoint_info(&net.endpoints[&name]);
        tracing::info!(network = %p.network, endpoint = %name, %ip, %mac, kind = %kind, network_id = %&net_id[..12], "endpoint connected");
        Ok(info)
    }

    /// An engine that listens on its published host ports itself (rootful Podman) in the
    /// namespace where the socket uplink would listen for them too: refuse with what to do,
    /// rather than let the engine fail on "address already in use" after the endpoint is made.
    fn check_engine_ports(&self, p: &proto::Connect) -> Result<()> {
        let here = NetNs::current().and_then(|n| n.inode()).ok();
        if p.peer_netns.is_none() || p.peer_netns != here {
            return Ok(());
        }
        if !self.dp(|dp| dp.socket_uplink().is_some())? {
            return Ok(());
        }
        Err(Error::conflict(format!(
            "published ports {}: the container engine listens on these host ports itself (rootful Podman's conmon reserves every -p port) in the network namespace where switchyard's socket uplink would listen for them too, so the two collide. Give the daemon a raw uplink (--uplink IFACE), or run the container without -p and publish through switchyard: `switchyard publish {} cni-CONTAINERID12 SPEC` (keeps the client's address)",
            p.publish.join(", "),
            p.network
        )))
    }

    /// The endpoint's name and aliases into its network's DNS (when the network has DNS), and
    /// `/etc/netns/NAME/resolv.conf` for a namespace at `/run/netns/NAME`.
    fn dns_names(
        &self,
        nid: NetworkId,
        ip: Ipv4Addr,
        rec: &EndpointRecord,
        gateway: Ipv4Addr,
        search: &[String],
    ) {
        let mut names = vec![rec.name.clone()];
        names.extend(rec.aliases.iter().cloned());
        let served = self.dp(move |dp| {
            if !dp.pipeline.dns.names.serves(nid) {
                return Ok(false);
            }
            dp.pipeline.dns.names.add(nid, ip, &names).map(|_| true)
        });
        match served {
            Ok(Ok(true)) => {
                crate::dns::write_netns_resolv(&rec.netns, gateway, search);
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(endpoint = %rec.name, "DNS names not added: {e}"),
            Err(e) => tracing::warn!(endpoint = %rec.name, "DNS names not added: {e}"),
        }
    }

    /// Put an endpoint's port on the switch, its address and forwards in the router, and its fd
    /// in the dataplane's poll set; all or nothing.
    pub(crate) fn attach_port(
        &self,
        nid: NetworkId,
        port: PortId,
        mac: MacAddr,
        ip: Ipv4Addr,
        forwards: Vec<PortForward>,
        io: PortIo,
    ) -> Result<()> {
        self.dp(move |dp| -> Result<()> {
            let now = dp.now();
            dp.pipeline
                .switch
                .add_port(port, nid, PortKind::Endpoint, Some(mac), false, now)
                .map_err(|e| Error::conflict(e.to_string()))?;
            let undo = |dp: &mut crate::dataplane::DpState| {
                let _ = dp.pipeline.switch.remove_port(port);
                dp.pipeline.router.remove_endpoint(nid, ip);
            };
            if let Err(e) = dp.pipeline.router.add_endpoint(nid, ip, mac) {
                undo(dp);
                return Err(Error::internal(format!("{e:?}")));
            }
            for (i, f) in forwards.iter().enumerate() {
                if let Err(e) = add_forward(dp, f) {
                    for g in &forwards[..i] {
                        remove_forward(dp, g);
                    }
                    undo(dp);
                    return Err(e);
                }
            }
            if let Err(e) = dp.attach(port, io) {
                undo(dp);
                return Err(Error::system(format!("polling the endpoint: {e}")));
            }
            Ok(())
        })?
    }

    fn disconnect_endpoint(
        &self,
        st: &mut State,
        network: &str,
        name: &str,
        why: &str,
    ) -> Result<()> {
        let net = st.net_mut(network)?;
        let ep = net.endpoints.remove(name).ok_or_else(|| {
            Error::not_found(format!(
                "endpoint {name:?} not found on network {network:?}"
            ))
        })?;
        net.pool.release(ep.rec.ip);
        let (nid, port, ip) = (net.nid, ep.port, ep.rec.ip);
        let fwd: Vec<PortForward> = ep
            .rec
            .ports
            .iter()
            .map(|m| forward_of(nid, ip, m))
            .collect();
        let io = self.dp(move |dp| {
            let io = dp.detach(port);
            let _ = dp.pipeline.switch.remove_port(port);
            dp.pipeline.router.remove_endpoint(nid, ip);
            dp.pipeline.dns.names.remove(nid, ip);
            for f in &fwd {
                remove_forward(dp, f);
            }
            io
        });
        crate::dns::remove_netns_resolv(&ep.rec.netns, net.rec.gateway);
        // Closing a tap fd removes the device (and lets its namespace go).
        drop(io);
        if let Some(h) = &ep.rec.host_ifname {
            if let Err(e) = plumbing::remove_veth(h) {
                tracing::warn!(endpoint = %name, "removing veth {h}: {e}");
            }
        }
        tracing::info!(network = %network, endpoint = %name, reason = why, "endpoint disconnected");
        Ok(())
    }

    fn publish(&self, st: &mut State, p: proto::Publish) -> Result<Vec<PortMapping>> {
        let existing = st.all_mappings();
        let net = st.net(&p.network)?;
        let ep = net.endpoints.get(&p.name).ok_or_else(|| {
            Error::not_found(format!(
                "endpoint {:?} not found on network {:?}",
                p.name, p.network
            ))
        })?;
        let mut new: Vec<PortMapping> = Vec::new();
        for s in &p.specs {
            let spec: PublishSpec = s.parse()?;
            new.extend(spec.expand(|m| {
                !existing.iter().any(|o| o.collides(m))
                    && !new.iter().any(|o| o.collides(m))
                    && (spec.host_ports.is_some() || self.host_port_free(m))
            })?);
        }
        let (nid, ip) = (net.nid, ep.rec.ip);
        let fwd: Vec<PortForward> = new.iter().map(|m| forward_of(nid, ip, m)).collect();
        self.dp(move |dp| -> Result<()> {
            for (i, f) in fwd.iter().enumerate() {
                if let Err(e) = add_forward(dp, f) {
                    for g in &fwd[..i] {
                        remove_forward(dp, g);
                    }
                    return Err(e);
                }
            }
            Ok(())
        })??;
        let net = st.net_mut(&p.network)?;
        let ep = net.endpoints.get_mut(&p.name).expect("checked");
        ep.rec.ports.extend(new.iter().copied());
        tracing::info!(network = %p.network, endpoint = %p.name, count = new.len(), "ports published");
        Ok(new)
    }

    fn unpublish(&self, st: &mut State, p: proto::Publish) -> Result<Vec<PortMapping>> {
        let net = st.net(&p.network)?;
        let ep = net.endpoints.get(&p.name).ok_or_else(|| {
            Error::not_found(format!(
                "endpoint {:?} not found on network {:?}",
                p.network, p.name
            ))
        })?;
        let mut gone: Vec<PortMapping> = Vec::new();
        for s in &p.specs {
            let spec: PublishSpec = s.parse()?;
            let matching: Vec<PortMapping> = ep
                .rec
                .ports
                .iter()
                .filter(|m| {
                    m.proto == spec.proto
                        && (spec.container_ports.0..=spec.container_ports.1)
                            .contains(&m.container_port)
                        && spec
                            .host_ports
                            .is_none_or(|(a, b)| (a..=b).contains(&m.host_port))
                        && (spec.host_ip.is_none() || spec.host_ip == m.host_ip)
                })
                .copied()
                .collect();
            if matching.is_empty() {
                return Err(Error::not_found(format!(
                    "{s:?} is not published on {:?}",
                    p.name
                )));
            }
            gone.extend(matching);
        }
        let (nid, ip) = (net.nid, ep.rec.ip);
        let fwd: Vec<PortForward> = gone.iter().map(|m| forward_of(nid, ip, m)).collect();
        self.dp(move |dp| {
            for f in &fwd {
                remove_forward(dp, f);
            }
        })?;
        let net = st.net_mut(&p.network)?;
        let ep = net.endpoints.get_mut(&p.name).expect("checked");
        ep.rec.ports.retain(|m| !gone.contains(m));
        Ok(gone)
    }

    // ---- queries ----

    fn macs(&self, st: &State, network: Option<String>) -> Result<Vec<proto::MacEntry>> {
        if let Some(n) = &network {
            st.net(n)?;
        }
        let entries = self.dp(|dp| {
            let now = dp.now();
            dp.pipeline
                .switch
                .table()
                .entries(now)
                .into_iter()
                .map(|(n, m, e)| (n, m, e.port, e.is_static, (now - e.last_seen).secs()))
                .collect::<Vec<_>>()
        })?;
        let mut out = Vec::new();
        for (nid, mac, port, is_static, age) in entries {
            let Some(net) = st.networks.values().find(|n| n.nid == nid) else {
                continue;
            };
            if network.as_deref().is_some_and(|n| n != net.rec.name) {
                continue;
            }
            let pname = if port == net.router_port {
                "gateway".to_string()
            } else {
                match net.endpoints.values().find(|e| e.port == port) {
                    Some(e) => e.rec.name.clone(),
                    None => continue,
                }
            };
            out.push(proto::MacEntry {
                network: net.rec.name.clone(),
                mac,
                port: pname,
                kind: if is_static { "static" } else { "learned" }.into(),
                age: (!is_static).then_some(age),
            });
        }
        out.sort_by(|a, b| (&a.network, &a.port, a.mac).cmp(&(&b.network, &b.port, b.mac)));
        Ok(out)
    }

    fn stats(&self, st: &State) -> Result<proto::Stats> {
        let dns = self.dp(|dp| {
            let d = &dp.pipeline.dns;
            let mut v = serde_json::to_value(d.counters()).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("pending".into(), json!(d.pending_len()));
                m.insert("cached".into(), json!(d.cache_len()));
                let t = &dp.pipeline.dns_tcp;
                let mut tcp = serde_json::to_value(t.counters()).unwrap_or(Value::Null);
                if let Value::Object(tm) = &mut tcp {
                    tm.insert("connections".into(), json!(t.len()));
                }
                m.insert("tcp".into(), tcp);
                let (c, open) = dp.dns_upstream_tcp();
                let mut up = serde_json::to_value(c).unwrap_or(Value::Null);
                if let Value::Object(um) = &mut up {
                    um.insert("open".into(), json!(open));
                }
                m.insert("tcp_upstream".into(), up);
            }
            v
        })?;
        let (counters, up, nat, sock, (workers, migrations)) = self.dp(|dp| {
            let sw = &dp.pipeline.switch;
            let c: Vec<_> = sw
                .ports()
                .filter_map(|p| {
                    let lost = dp.port_rx_lost(p);
                    sw.counters(p)
                        .map(|c| (p, c.clone(), lost, dp.port_worker(p)))
                })
                .collect();
            let nat = serde_json::to_value(dp.pipeline.router.counters()).unwrap_or(Value::Null);
            (
                c,
                dp.uplink_counters(),
                nat,
                dp.socket_counters(),
                (dp.workers(), dp.migrations()),
            )
        })?;
        let mut ports = Vec::new();
        for net in st.networks.values() {
            let mut names: Vec<(PortId, String)> = net
                .endpoints
                .values()
                .map(|e| (e.port, e.rec.name.clone()))
                .collect();
            names.push((net.router_port, "gateway".into()));
            for (pid, pname) in names {
                let Some((_, c, lost, worker)) = counters.iter().find(|(p, ..)| *p == pid) else {
                    continue;
                };
                ports.push(proto::PortStats {
                    network: net.rec.name.clone(),
                    port: pname,
                    rx_packets: c.rx_packets,
                    rx_bytes: c.rx_bytes,
                    tx_packets: c.tx_packets,
                    tx_bytes: c.tx_bytes,
                    drops: c
                        .drops_by_reason()
                        .map(|(r, n)| (r.as_str().to_string(), n))
                        // Lost in the kernel before we read them (a veth's ring was full).
                        .chain((*lost > 0).then(|| ("rx_lost".to_string(), *lost)))
                        .collect(),
                    learn_refused: c.learn_refused,
                    worker: *worker,
                });
            }
        }
        let uplink = match &self.cfg.uplink {
            Some(u) => {
                json!({"interface": u.iface, "address": format!("{}/{}", u.addr, u.prefix_len), "counters": up})
            }
            None => match sock {
                Some(c) => json!({
                    "mode": "socket",
                    "host_loopback": self.cfg.host_loopback,
                    "counters": c,
                }),
                None => Value::Null,
            },
        };
        Ok(proto::Stats {
            ports,
            uplink,
            nat,
            dns,
            dataplane: json!({
                "threads": workers.len(),
                "migrations": migrations,
                "workers": workers,
            }),
        })
    }

    fn conntrack(&self) -> Result<Value> {
        self.dp(|dp| {
            let now = dp.now();
            serde_json::to_value(dp.pipeline.router.conntrack(now)).unwrap_or(Value::Null)
        })
    }

    // ---- dispatch ----

    fn handle(&self, call: Call) -> Result<Value> {
        fn to<T: serde::Serialize>(v: T) -> Result<Value> {
            serde_json::to_value(v).map_err(|e| Error::internal(e.to_string()))
        }
        if self.stopping.load(Ordering::SeqCst) {
            return Err(Error::unavailable("the daemon is shutting down"));
        }
        match call {
            Call::Version => to(proto::Version {
                version: env!("CARGO_PKG_VERSION").into(),
                protocol: proto::VERSION,
            }),
            Call::NetworkCreate(p) => {
                let mut st = self.lock();
                let r = self.create_network(&mut st, p, None, None)?;
                self.persist(&st);
                to(r)
            }
            Call::NetworkLs => {
                let st = self.lock();
                to(st.networks.values().map(Network::info).collect::<Vec<_>>())
            }
            Call::NetworkInspect(p) => {
                let st = self.lock();
                to(st.net(&p.name)?.info())
            }
            Call::NetworkRm(p) => {
                let mut st = self.lock();
                let r = self.remove_network(&mut st, &p.name, p.force);
                self.persist(&st);
                r?;
                to(json!({}))
            }
            Call::Connect(p) => {
                let mut st = self.lock();
                let r = self.connect(&mut st, p, None)?;
                self.persist(&st);
                to(r)
            }
            Call::Disconnect(p) => {
                let mut st = self.lock();
                self.disconnect_endpoint(&mut st, &p.network, &p.name, "requested")?;
                self.persist(&st);
                to(json!({}))
            }
            Call::Publish(p) => {
                if p.specs.is_empty() {
                    return Err(Error::invalid("give at least one port spec"));
                }
                let mut st = self.lock();
                let r = self.publish(&mut st, p)?;
                self.persist(&st);
                to(r)
            }
            Call::Unpublish(p) => {
                let mut st = self.lock();
                let r = self.unpublish(&mut st, p)?;
                self.persist(&st);
                to(r)
            }
            Call::PortList(p) => {
                let st = self.lock();
                let net = st.net(&p.network)?;
                let ep = net.endpoints.get(&p.name).ok_or_else(|| {
                    Error::not_found(format!(
                        "endpoint {:?} not found on network {:?}",
                        p.name, p.network
                    ))
                })?;
                to(ep.rec.ports.clone())
            }
            Call::Macs(p) => {
                let st = self.lock();
                to(self.macs(&st, p.network)?)
            }
            Call::Stats => {
                let st = self.lock();
                to(self.stats(&st)?)
            }
            Call::Conntrack => self.conntrack(),
            Call::Capture(_) => Err(Error::bad_request(
                "capture streams: it is served by `serve`",
            )),
        }
    }

    /// Serve one client: requests in, replies out, until EOF, an oversized line or idleness.
    fn serve(&self, stream: UnixStream) {
        let _ = stream.set_read_timeout(Some(CLIENT_IDLE));
        let _ = stream.set_write_timeout(Some(StdDuration::from_secs(10)));
        let Ok(wr) = stream.try_clone() else { return };
        let mut wr = std::io::BufWriter::new(wr);
        let mut rd = BufReader::new(FdReader {
            sock: stream,
            fds: VecDeque::new(),
        });
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = match (&mut rd)
                .take(proto::MAX_REQUEST as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let too_long = n > proto::MAX_REQUEST;
            let (id, mut call) = proto::decode(&line);
            if let Ok(Call::Capture(p)) = call {
                // The connection becomes the capture stream; it ends when the client goes.
                self.stream_capture(id, p, &mut wr, &rd.get_ref().sock);
                return;
            }
            if let Ok(Call::Connect(p)) = &mut call {
                if p.netns_fd {
                    p.ns_fd = rd.get_mut().fds.pop_front();
                }
                if p.engine_holds_ports {
                    p.peer_netns = peer_netns(&rd.get_ref().sock);
                }
            }
            if rd.buffer().is_empty() {
                // Descriptors no request of this batch asked for.
                rd.get_mut().fds.clear();
            }
            let resp = reply(
                id,
                call.and_then(|c| {
                    let r = self.handle(c);
                    if let Err(e) = &r {
                        tracing::debug!("request failed: {e}");
                    }
                    r
                }),
            );
            let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{}".to_vec());
            out.push(b'\n');
            if wr.write_all(&out).and_then(|_| wr.flush()).is_err() || too_long {
                return;
            }
        }
    }

    /// `capture`: reply, then stream records until the client leaves or the endpoint goes.
    fn stream_capture(
        &self,
        id: u64,
        p: proto::EndpointRef,
        wr: &mut impl Write,
        peer: &UnixStream,
    ) {
        let port = {
            let st = self.lock();
            st.net(&p.network).and_then(|n| {
                n.endpoints.get(&p.name).map(|e| e.port).ok_or_else(|| {
                    Error::not_found(format!(
                        "endpoint {:?} not found on network {:?}",
                        p.name, p.network
                    ))
                })
            })
        };
        let started = port.and_then(|port| self.dp(move |dp| dp.add_capture(port)));
        let (cid, rx) = match started {
            Ok(x) => x,
            Err(e) => {
                let r = reply(id, Err(e));
                let _ = writeln!(wr, "{}", serde_json::to_string(&r).unwrap_or_default());
                let _ = wr.flush();
                return;
            }
        };
        tracing::info!(network = %p.network, endpoint = %p.name, "capture started");
        let ok = reply(id, Ok(json!({ "network": p.network, "name": p.name })));
        let mut alive = writeln!(wr, "{}", serde_json::to_string(&ok).unwrap_or_default())
            .and_then(|_| wr.flush())
            .is_ok();
        let mut rec = Vec::with_capacity(2048);
        while alive && !self.stopping.load(Ordering::SeqCst) {
            match rx.recv_timeout(StdDuration::from_millis(500)) {
                Ok(c) => {
                    rec.clear();
                    rec.push(match c.dir {
                        crate::dataplane::Direction::FromContainer => 0,
                        crate::dataplane::Direction::ToContainer => 1,
                    });
                    rec.extend_from_slice(&c.micros.to_le_bytes());
                    rec.extend_from_slice(&(c.frame.len() as u32).to_le_bytes());
                    rec.extend_from_slice(&c.frame);
                    alive = wr.write_all(&rec).is_ok();
                    if rx.is_empty() {
                        alive = alive && wr.flush().is_ok();
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    // Notice a client that went away while nothing was captured.
                    use nix::sys::socket::{recv, MsgFlags};
                    use std::os::fd::AsRawFd;
                    let mut b = [0u8; 1];
                    alive = wr.flush().is_ok()
                        && !matches!(
                            recv(
                                peer.as_raw_fd(),
                                &mut b,
                                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
                            ),
                            Ok(0)
                        );
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = self.dp(move |dp| dp.remove_capture(cid));
        tracing::info!(network = %p.network, endpoint = %p.name, "capture ended");
    }

    /// Remove endpoints whose namespace went away (container exited, netns unmounted). An
    /// endpoint whose namespace came as an fd is its engine's to remove (CNI DEL): the daemon
    /// cannot look at that path.
    fn reap(&self) {
        let mut st = self.lock();
        // Docker drives its endpoints' lifecycle (Leave, DeleteEndpoint): at Join its sandbox
        // path is still an empty file that the namespace is mounted on later. Never reap them
        // here; learn their namespace once it is there (a restart checks it).
        let mut learned = false;
        for n in st.networks.values_mut() {
            for e in n.endpoints.values_mut() {
                if e.rec.docker_endpoint.is_some() {
                    if let Some(ino) = nsfs_inode(&e.rec.netns) {
                        if ino != e.rec.ns_inode {
                            e.rec.ns_inode = ino;
                            learned = true;
                        }
                    }
                }
            }
        }
        if learned {
            self.persist(&st);
        }
        let dead: Vec<(String, String)> = st
            .networks
            .values()
            .flat_map(|n| {
                n.endpoints
                    .values()
                    .filter(|e| {
                        e.rec.docker_endpoint.is_none()
                            && !e.rec.ns_by_fd
                            && !namespace_alive(&e.rec)
                    })
                    .map(|e| (n.rec.name.clone(), e.rec.name.clone()))
            })
            .collect();
        if dead.is_empty() {
            return;
        }
        for (n, e) in &dead {
            if let Err(err) = self.disconnect_endpoint(&mut st, n, e, "namespace gone") {
                tracing::warn!(network = %n, endpoint = %e, "reaping: {err}");
            }
        }
        self.persist(&st);
    }

    fn restore(&self, st: &mut State) {
        let loaded = match state::load(&self.cfg.state_dir) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("state: {e}");
                return;
            }
        };
        let p = match loaded {
            Loaded::Missing => return,
            Loaded::Corrupt { moved_to, why } => {
                tracing::error!(
                    "state file is corrupt ({why}); kept aside as {} and starting without it",
                    moved_to.display()
                );
                return;
            }
            Loaded::Ok(p) => p,
        };
        for n in p.networks {
            let create = proto::NetworkCreate {
                name: n.name.clone(),
                subnet: Some(n.subnet),
                gateway: Some(n.gateway),
                internal: n.internal,
                mtu: Some(n.mtu),
                dns_search: n.dns_search.clone(),
            };
            if let Err(e) = self.create_network(st, create, Some(n.id.clone()), Some(n.created)) {
                tracing::error!(network = %n.name, "restoring network: {e}");
                continue;
            }
            for mut e in n.endpoints {
                if e.docker_endpoint.is_some() {
                    // Docker mounts the sandbox after Join: a restart soon after may find the
                    // namespace there before the reaper recorded it.
                    if let Some(ino) = nsfs_inode(&e.netns) {
                        e.ns_inode = ino;
                    }
                }
                // A namespace that came as an fd: its path means nothing here, but a process
                // still in it (the container's) leads back to it.
                let mut found = None;
                if e.ns_by_fd {
                    found = crate::netns::find_by_inode(e.ns_inode);
                    if found.is_none() {
                        tracing::warn!(network = %n.name, endpoint = %e.name, netns = %e.netns, "not restored: its namespace came as a file descriptor and no process is left in it");
                        continue;
                    }
                } else if !namespace_alive(&e) {
                    tracing::info!(network = %n.name, endpoint = %e.name, "not restored: its namespace is gone");
                    if let Some(h) = &e.host_ifname {
                        let _ = plumbing::remove_veth(h);
                    }
                    continue;
                }
                if let Some(h) = &e.host_ifname {
                    // A killed daemon leaves its veth behind; the pair is made anew.
                    let _ = plumbing::remove_veth(h);
                }
                let c = proto::Connect {
                    network: n.name.clone(),
                    netns: e.pid.is_none().then(|| e.netns.clone()),
                    pid: e.pid,
                    name: Some(e.name.clone()),
                    ip: Some(e.ip),
                    mac: Some(e.mac),
                    // Docker renamed its interface inside the container: take the first free ethN.
                    ifname: e.docker_endpoint.is_none().then(|| e.ifname.clone()),
                    kind: Some(e.kind),
                    aliases: e.aliases.clone(),
                    publish: e
                        .ports
                        .iter()
                        .map(|m| match m.host_ip {
                            Some(ip) => {
                                format!("{ip}:{}:{}/{}", m.host_port, m.container_port, m.proto)
                            }
                            None => format!("{}:{}/{}", m.host_port, m.container_port, m.proto),
                        })
                        .collect(),
                    netns_fd: found.is_some(),
                    ns_fd: found.map(OwnedFd::from),
                    ..Default::default()
                };
                match self.connect(st, c, Some(&e)) {
                    Ok(_) => {
                        if let Some(ep) = st
                            .networks
                            .get_mut(&n.name)
                            .and_then(|net| net.endpoints.get_mut(&e.name))
                        {
                            ep.rec.docker_endpoint = e.docker_endpoint.clone();
                        }
                        tracing::info!(network = %n.name, endpoint = %e.name, "endpoint restored")
                    }
                    Err(err) => {
                        tracing::warn!(network = %n.name, endpoint = %e.name, "not restored: {err}")
                    }
                }
            }
        }
    }

    /// SIGTERM/SIGINT: remove the interfaces we made, keep the state file for the next start.
    fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let st = self.lock();
        let dp = self.dp.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(dp) = dp {
            drop(dp.shutdown());
        }
        for n in st.networks.values() {
            for e in n.endpoints.values() {
                if let Some(h) = &e.rec.host_ifname {
                    let _ = plumbing::remove_veth(h);
                }
                // Written again when the endpoint is restored.
                crate::dns::remove_netns_resolv(&e.rec.netns, n.rec.gateway);
            }
        }
        let _ = std::fs::remove_file(&self.cfg.socket);
        tracing::info!(
            "stopped; interfaces removed, state kept in {}",
            self.cfg.state_dir.display()
        );
    }
}

fn reply(id: u64, r: Result<Value>) -> Response {
    match r {
        Ok(v) => Response {
            v: proto::VERSION,
            id,
            ok: true,
            result: Some(v),
            error: None,
        },
        Err(e) => Response {
            v: proto::VERSION,
            id,
            ok: false,
            result: None,
            error: Some(e),
        },
    }
}

/// Create the socket's directory without following a symlink someone else planted.
fn prepare_socket_dir(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(Error::new(
                ErrorCode::PermissionDenied,
                format!("{} is a symlink; refusing to use it", dir.display()),
            ))
        }
        Ok(m) if !m.is_dir() => {
            return Err(Error::system(format!(
                "{} is not a directory",
                dir.display()
            )))
        }
        Ok(m) => {
            use std::os::unix::fs::MetadataExt;
            let me = nix::unistd::geteuid().as_raw();
            if m.uid() != me && m.uid() != 0 {
                return Err(Error::new(
                    ErrorCode::PermissionDenied,
                    format!("{} belongs to uid {}, not to us", dir.display(), m.uid()),
                ));
            }
        }
        Err(_) => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::system(format!("creating {}: {e}", dir.display())))?;
        }
    }
    Ok(())
}

fn bind_socket(path: &Path, group: Option<u32>) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        prepare_socket_dir(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::conflict(format!(
                "another daemon is serving {}",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .map_err(|e| Error::system(format!("removing stale {}: {e}", path.display())))?;
    }
    // Bind under a temporary name and rename when ready: clients that wait for the socket to
    // accept see it only once the daemon can serve, and never with loose permissions.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)
        .map_err(|e| Error::system(format!("binding {}: {e}", tmp.display())))?;
    match group {
        None => std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?,
        Some(g) => {
            // The group may connect: the socket 0660, its directory searchable by the group.
            std::os::unix::fs::chown(&tmp, None, Some(g))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))?;
            if let Some(dir) = path.parent() {
                std::os::unix::fs::chown(dir, None, Some(g))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))?;
            }
        }
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        Error::system(format!(
            "renaming {} to {}: {e}",
            tmp.display(),
            path.display()
        ))
    })?;
    Ok(l)
}

/// The reading side of a control connection: `recvmsg`, so that a file descriptor sent with a
/// request's bytes (`SCM_RIGHTS`, `endpoint.connect` with `netns_fd`) is kept for it.
struct FdReader {
    sock: UnixStream,
    fds: VecDeque<OwnedFd>,
}

/// Descriptors a connection may have waiting for their requests; more are closed.
const MAX_PENDING_FDS: usize = 4;

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let (n, fd) = fdpass::recv_with_fd(&self.sock, buf)?;
        if let Some(fd) = fd {
            if self.fds.len() < MAX_PENDING_FDS {
                self.fds.push_back(fd);
            }
        }
        Ok(n)
    }
}

/// The network namespace (inode) of the process at the other end of `stream`.
fn peer_netns(stream: &UnixStream) -> Option<u64> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let pid = getsockopt(stream, PeerCredentials).ok()?.pid();
    NetNs::of_pid(u32::try_from(pid).ok()?)
        .and_then(|n| n.inode())
        .ok()
}

fn peer_allowed(
    stream: &UnixStream,
    me: u32,
    group: Option<u32>,
) -> std::result::Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    match getsockopt(stream, PeerCredentials) {
        Ok(c) if c.uid() == 0 || c.uid() == me => Ok(()),
        Ok(c) if group.is_some_and(|g| c.gid() == g || in_supplementary_groups(c.pid(), g)) => {
            Ok(())
        }
        Ok(c) => Err(format!("uid {} (pid {})", c.uid(), c.pid())),
        Err(e) => Err(format!("unknown peer ({e})")),
    }
}

/// Whether process `pid` has `gid` among its supplementary groups (`Groups:` in its status).
fn in_supplementary_groups(pid: i32, gid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
        })
        .unwrap_or(false)
}

/// Run the daemon until SIGTERM/SIGINT.
pub fn run(cfg: DaemonConfig) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    // Block the stop signals in every thread; one thread waits for them.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    sigs.thread_block()
        .map_err(|e| Error::system(format!("blocking signals: {e}")))?;

    if let Some(h) = cfg.host_loopback {
        if h.is_loopback() || h.is_unspecified() || h.is_multicast() || h.is_broadcast() {
            return Err(Error::invalid(format!(
                "--host-loopback {h}: give an ordinary unicast address outside every network (e.g. 10.0.2.2)"
            )));
        }
    }
    raise_nofile();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.state_dir)
        .map_err(|e| Error::system(format!("creating {}: {e}", cfg.state_dir.display())))?;

    let uplink_sock = match &cfg.uplink {
        Some(u) => Some(open_uplink(u)?),
        None => None,
    };
    let mut rcfg = RouterConfig::default();
    rcfg.conntrack.max = cfg.conntrack_max;
    apply_timeouts(&mut rcfg.conntrack, &cfg.conntrack_timeouts)?;
    // A per-run seed: port allocation and hashing are not predictable from outside.
    rcfg.seed = u64::from_str_radix(&random_hex(8), 16).unwrap_or(rcfg.seed);
    let scfg = SwitchConfig {
        mac_table: MacTableConfig {
            aging: Duration::from_millis(cfg.mac_aging.as_millis() as u64),
            ..MacTableConfig::default()
        },
    };
    let mut uplink_cfg = None;
    if let Some(u) = &cfg.uplink {
        let (mac, mtu) = uplink_link(&u.iface)?;
        rcfg.uplink_mtu = mtu;
        uplink_cfg = Some(UplinkConfig {
            addr: u.addr,
            prefix_len: u.prefix_len,
            mac,
            gateway: u.gateway,
            gateway_mac: None,
        });
    }
    let mut pipeline = Pipeline::new(scfg, rcfg);
    pipeline.router.set_uplink(uplink_cfg);
    let mut upstreams = if cfg.dns.is_empty() {
        crate::dns::host_upstreams()
    } else {
        cfg.dns.clone()
    };
    if cfg.uplink.is_some() {
        // From the uplink address a host-local resolver (127.0.0.53) is out of reach.
        upstreams.retain(|ip| !ip.is_loopback());
    }
    tracing::info!(upstreams = ?upstreams, bridge = cfg.bridge_dns, "embedded DNS");
    let dcfg = crate::dns::DnsConfig {
        upstreams: crate::dns::upstream_addrs(&upstreams),
        seed: rcfg.seed.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15,
        ..Default::default()
    };
    // Seeded per run too: the initial sequence numbers of TCP toward the upstreams (a spoofed
    // answer would need them).
    pipeline.dns_up_tcp =
        crate::dns::UpstreamTcp::new(dcfg.tcp_timeout, rcfg.seed.rotate_left(29) ^ 0x7c9a);
    pipeline.dns = crate::dns::DnsServer::new(dcfg);
    let dp = Dataplane::spawn(pipeline, uplink_sock, cfg.busy_poll, cfg.threads)
        .map_err(|e| Error::system(format!("starting the dataplane: {e}")))?;
    if cfg.uplink.is_none() {
        // The default uplink: container flows leave through ordinary host sockets.
        let sc = crate::uplink::SocketUplinkConfig {
            host_loopback: cfg.host_loopback,
            ..Default::default()
        };
        let seed = rcfg.seed;
        dp.call(move |st| st.set_socket_uplink(Some(sc), seed))?
            .map_err(|e| Error::system(format!("starting the socket uplink: {e}")))?;
        tracing::info!(host_loopback = ?cfg.host_loopback, "socket uplink: outside traffic leaves through host sockets");
    }
    let d = Arc::new(Daemon {
        cfg: cfg.clone(),
        state: Mutex::new(State::default()),
        dp: Mutex::new(Some(dp)),
        uid: nix::unistd::geteuid().as_raw(),
        stopping: AtomicBool::new(false),
        clients: AtomicUsize::new(0),
    });
    {
        let mut st = d.lock();
        d.restore(&mut st);
        if !st.networks.contains_key(DEFAULT_NETWORK) {
            let p = proto::NetworkCreate {
                name: DEFAULT_NETWORK.into(),
                subnet: Some("172.17.0.0/16".parse().expect("valid")),
                gateway: Some(Ipv4Addr::new(172, 17, 0, 1)),
                internal: false,
                mtu: None,
                dns_search: Vec::new(),
            };
            if let Err(e) = d.create_network(&mut st, p, None, None) {
                tracing::warn!("default network {DEFAULT_NETWORK:?} not created: {e}");
            }
        }
        d.persist(&st);
    }
    if let Some(p) = &cfg.docker_plugin {
        docker::serve(d.clone(), p)?;
    }
    let listener = bind_socket(&cfg.socket, cfg.group)?;
    tracing::info!(socket = %cfg.socket.display(), "ready");

    {
        let d = d.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || loop {
                std::thread::sleep(StdDuration::from_secs(1));
                if d.stopping.load(Ordering::SeqCst) {
                    return;
                }
                d.reap();
            })?;
    }
    {
        let d = d.clone();
        std::thread::Builder::new().name("control".into()).spawn(move || {
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                if let Err(who) = peer_allowed(&stream, d.uid, d.cfg.group) {
                    tracing::warn!("refused control client {who}: only root and uid {} may use this socket", d.uid);
                    let mut s = stream;
                    let r = reply(0, Err(Error::new(ErrorCode::PermissionDenied, format!("permission denied: only root and uid {} may use this daemon", d.uid))));
                    let _ = writeln!(s, "{}", serde_json::to_string(&r).unwrap_or_default());
                    continue;
                }
                if d.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    d.clients.fetch_sub(1, Ordering::SeqCst);
                    let mut s = stream;
                    let r = reply(0, Err(Error::unavailable("too many clients; try again")));
                    let _ = writeln!(s, "{}", serde_json::to_string(&r).unwrap_or_default());
                    continue;
                }
                let d2 = d.clone();
                let spawned = std::thread::Builder::new().name("client".into()).spawn(move || {
                    d2.serve(stream);
                    d2.clients.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    d.clients.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })?;
    }
    let sig = sigs
        .wait()
        .map_err(|e| Error::system(format!("waiting for signals: {e}")))?;
    tracing::info!("{sig:?}: stopping");
    d.shutdown();
    Ok(())
}

/// Each socket-uplink flow holds a host socket: lift the soft fd limit to the hard one.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            tracing::debug!("could not raise the open-file limit from {soft}");
        }
    }
}

fn open_uplink(u: &UplinkArgs) -> Result<switchyard_switch::backend::packet::PacketSocket> {
    let idx = nix::net::if_::if_nametoindex(u.iface.as_str())
        .map_err(|e| Error::not_found(format!("uplink interface {}: {e}", u.iface)))?;
    // With virtio-net headers: GRO'd or TSO frames arrive whole, and an established flow's
    // cross the NAT and leave whole (the kernel cuts them if the interface cannot).
    switchyard_switch::backend::packet::PacketSocket::open_vnet(idx)
        .map_err(|e| Error::system(format!("opening uplink {}: {e}", u.iface)))
}

/// The uplink interface's MAC and MTU, and make sure it is up.
fn uplink_link(iface: &str) -> Result<(MacAddr, usize)> {
    let mut nl = crate::netlink::Netlink::open().map_err(|e| Error::system(e.to_string()))?;
    let idx = nl
        .link_index(iface)
        .map_err(|e| Error::system(e.to_string()))?
        .ok_or_else(|| Error::not_found(format!("uplink interface {iface} not found")))?;
    let link = nl
        .link(idx)
        .map_err(|e| Error::system(e.to_string()))?
        .ok_or_else(|| Error::not_found(format!("uplink interface {iface} not found")))?;
    if !link.up {
        nl.set_up(idx).map_err(|e| Error::system(e.to_string()))?;
    }
    let mac = link
        .mac
        .map(MacAddr)
        .ok_or_else(|| Error::invalid(format!("uplink {iface} has no Ethernet address")))?;
    Ok((mac, link.mtu.unwrap_or(1500) as usize))
}
