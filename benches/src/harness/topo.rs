//! The topology, built once per dataplane in namespaces the harness owns:
//!
//! ```text
//!   c1 (198.18.0.2) --+                                     +-- ext (192.0.2.1/24)
//!                     +-- dataplane in its "host" namespace -+
//!   c2 (198.18.0.3) --+   uplink address 192.0.2.10/24      (veth up0 <-> ext0)
//! ```
//!
//! Containers reach `ext` only through source NAT to 192.0.2.10; `ext` reaches c1:80 through the
//! published port 192.0.2.10:8080. Every dataplane's "host" is a namespace of its own too: the
//! real host's interfaces, routes, firewall and sysctls are never touched.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::sys::{self, ip, run_cmd, run_cmd_input, spawn_in, sysctl};

pub const SUBNET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const C1_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const C2_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const PUBLISHED_PORT: u16 = 8080;
pub const C1_PORT: u16 = 80;
/// The network MTU of `switchyard-socket` (pasta's default; slirp4netns runs with it here).
pub const SOCKET_MTU: u32 = 65520;

/// Dataplanes run when --dataplanes is not given (those installed).
pub const DEFAULT: &[&str] = &[
    "switchyard-tap",
    "switchyard-veth",
    "switchyard-socket",
    "kernel",
    "ovs",
    "pasta",
    "slirp4netns",
];

/// The dataplanes the harness knows. `ovs-notso` (Open vSwitch without userspace TSO) is on
/// request only: it shows what OVS costs without offloads, not a configuration to compare with.
/// `switchyard-docker` and `docker-bridge` (on request) run dockerd: containers started by
/// Docker on a `-d switchyard` network, and on Docker's own bridge network.
pub const ALL: &[&str] = &[
    "switchyard-tap",
    "switchyard-veth",
    "switchyard-socket",
    "switchyard-socket-1500",
    "switchyard-tap-nobp",
    "switchyard-socket-nobp",
    "switchyard-tap-1t",
    "switchyard-veth-1t",
    "switchyard-socket-1t",
    "switchyard-docker",
    "kernel",
    "docker-bridge",
    "ovs",
    "ovs-notso",
    "pasta",
    "slirp4netns",
];

/// The dataplanes that run a `switchyard` daemon of their own (`switchyard_dp`).
const SWITCHYARD_DAEMON: &[&str] = &[
    "switchyard-tap",
    "switchyard-veth",
    "switchyard-socket",
    "switchyard-socket-1500",
    "switchyard-tap-nobp",
    "switchyard-socket-nobp",
    "switchyard-tap-1t",
    "switchyard-veth-1t",
    "switchyard-socket-1t",
];

/// What the tests need to know about one built topology.
pub struct Topo {
    pub dataplane: String,
    pub c1: PathBuf,
    pub c2: Option<PathBuf>,
    pub ext: PathBuf,
    /// c1's address as the dataplane assigned it.
    pub c1_ip: Ipv4Addr,
    pub c2_ip: Option<Ipv4Addr>,
    /// The published port as seen from `ext`.
    pub published: SocketAddrV4,
    /// The process doing the forwarding, for CPU accounting (None: the kernel itself).
    pub cpu_pid: Option<u32>,
    pub notes: Vec<String>,
    namespaces: Vec<String>,
    children: Vec<Child>,
    dir: PathBuf,
    /// Run before the children stop (e.g. removing Docker's containers while dockerd runs).
    before_stop: Vec<Box<dyn FnOnce()>>,
    /// Files outside `dir` to remove at the end (Docker's plugin socket).
    files: Vec<PathBuf>,
}

impl Drop for Topo {
    fn drop(&mut self) {
        for f in self.before_stop.drain(..) {
            f();
        }
        for c in self.children.iter_mut().rev() {
            sys::stop_child(c, Duration::from_secs(5));
        }
        for n in &self.namespaces {
            sys::delete_ns(n);
        }
        sys::umount_under(&self.dir);
        sys::remove_dir(&self.dir);
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
    }
}

/// Whether a dataplane can run here; Err says why not.
pub fn available(dp: &str, switchyard: &Path) -> Result<(), String> {
    let need = |p: &str| {
        if sys::have(p) {
            Ok(())
        } else {
            Err(format!("{p} not installed"))
        }
    };
    let need_if = |cond: bool, p: &str| if cond { need(p) } else { Ok(()) };
    let need_file = |path: &str, package: &str| {
        if Path::new(path).is_file() {
            Ok(())
        } else {
            Err(format!("{path} not installed ({package})"))
        }
    };
    match dp {
        d if SWITCHYARD_DAEMON.contains(&d) => {
            if switchyard.is_file() {
                Ok(())
            } else {
                Err(format!(
                    "{} not found (build it: cargo build --release -p switchyard, or pass --switchyard)",
                    switchyard.display()
                ))
            }
        }
        "kernel" => need("iptables-restore"),
        "switchyard-docker" | "docker-bridge" => {
            if dp == "switchyard-docker" && !switchyard.is_file() {
                return Err(format!("{} not found", switchyard.display()));
            }
            need("dockerd")
                .and(need("docker"))
                .and(need("tar"))
                .and(need_if(dp == "docker-bridge", "iptables"))
                .and(need_file(BUSYBOX, "busybox-static"))
        }
        "pasta" => need("pasta"),
        "slirp4netns" => need("slirp4netns"),
        "ovs" | "ovs-notso" => need("ovs-vswitchd")
            .and(need("ovsdb-server"))
            .and(need("ovs-vsctl"))
            .and(need("ovsdb-tool"))
            .and(need("iptables-restore"))
            .and(need_if(dp == "ovs-notso", "ethtool"))
            .and(need_file(OVS_SCHEMA, "openvswitch-common")),
        other => Err(format!("unknown dataplane {other:?}")),
    }
}

/// Builds the topology for `dp`. On error everything made so far is removed (the Topo drops).
pub fn build(dp: &str, switchyard: &Path) -> Result<Topo, String> {
    let tag = format!("{}{}", sys::prefix(), dp);
    let dir = std::env::temp_dir().join(&tag);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    sys::register_dir(&dir);
    let mut t = Topo {
        dataplane: dp.to_string(),
        c1: PathBuf::new(),
        c2: None,
        ext: PathBuf::new(),
        c1_ip: C1_IP,
        c2_ip: Some(C2_IP),
        published: SocketAddrV4::new(UPLINK_IP, PUBLISHED_PORT),
        cpu_pid: None,
        notes: Vec::new(),
        namespaces: Vec::new(),
        children: Vec::new(),
        dir,
        before_stop: Vec::new(),
        files: Vec::new(),
    };
    let host = t.ns(&tag, "h")?;
    t.ext = t.ns(&tag, "ext")?;
    // Docker makes its containers' namespaces itself.
    let docker = matches!(dp, "switchyard-docker" | "docker-bridge");
    if !docker {
        t.c1 = t.ns(&tag, "c1")?;
    }
    let two_containers = !matches!(dp, "pasta" | "slirp4netns");
    if docker {
        // c1 and c2 are set once Docker started them.
    } else if two_containers {
        t.c2 = Some(t.ns(&tag, "c2")?);
    } else {
        t.c2_ip = None;
    }
    // The outside: a veth whose ext end holds 192.0.2.1/24.
    let (hn, en) = (format!("{tag}-h"), format!("{tag}-ext"));
    ip(&[
        "-n", &hn, "link", "add", "up0", "type", "veth", "peer", "name", "ext0", "netns", &en,
    ])?;
    ip(&[
        "-n",
        &en,
        "addr",
        "add",
        &format!("{EXT_IP}/24"),
        "dev",
        "ext0",
    ])?;
    ip(&["-n", &en, "link", "set", "ext0", "up"])?;
    ip(&["-n", &hn, "link", "set", "up0", "up"])?;
    match dp {
        d if SWITCHYARD_DAEMON.contains(&d) => switchyard_dp(&mut t, &host, switchyard, dp)?,
        "switchyard-docker" => docker_dp(&mut t, &host, Some(switchyard))?,
        "docker-bridge" => docker_dp(&mut t, &host, None)?,
        "kernel" => kernel_dp(&mut t, &host)?,
        "ovs" => ovs_dp(&mut t, &host, true)?,
        "ovs-notso" => ovs_dp(&mut t, &host, false)?,
        "pasta" => pasta_dp(&mut t, &host)?,
        "slirp4netns" => slirp_dp(&mut t, &host)?,
        other => return Err(format!("unknown dataplane {other:?}")),
    }
    // Clients close second (no TIME_WAIT); a wide port range for the connection-rate test.
    sysctl(&t.c1, "net/ipv4/ip_local_port_range", "1024 65000")?;
    Ok(t)
}

impl Topo {
    fn ns(&mut self, tag: &str, short: &str) -> Result<PathBuf, String> {
        let name = format!("{tag}-{short}");
        let path = sys::create_ns(&name)?;
        self.namespaces.push(name.clone());
        // IPv6 off everywhere: no router solicitations or MLD in the measurements.
        sysctl(&path, "net/ipv6/conf/all/disable_ipv6", "1")?;
        sysctl(&path, "net/ipv6/conf/default/disable_ipv6", "1")?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(path)
    }

    fn log(&self, name: &str) -> Result<fs::File, String> {
        fs::File::create(self.dir.join(name)).map_err(|e| e.to_string())
    }

    fn read_log(&self, name: &str) -> String {
        let s = fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let tail: Vec<&str> = s.lines().rev().take(5).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Checks that a child started by this topology is still running.
    fn alive(&mut self, i: usize, log: &str) -> Result<(), String> {
        if let Ok(Some(st)) = self.children[i].try_wait() {
            return Err(format!("exited: {st}: {}", self.read_log(log)));
        }
        Ok(())
    }

    /// Whether every dataplane process is still alive (after a test).
    pub fn check_alive(&mut self) -> Result<(), String> {
        for c in &mut self.children {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(format!("dataplane process {} exited: {st}", c.id()));
            }
        }
        Ok(())
    }

    fn name_of(p: &Path) -> String {
        p.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

fn container(ns: &Path, addr: Ipv4Addr) -> Result<(), String> {
    let n = Topo::name_of(ns);
    ip(&[
        "-n",
        &n,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &n, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        &n,
        "route",
        "add",
        "default",
        "via",
        &GATEWAY.to_string(),
    ])
}

// ---- switchyard ----

/// `switchyard-tap` / `switchyard-veth`: the raw uplink (AF_PACKET on up0, packet NAT).
/// `switchyard-socket`: the socket uplink (the rootless default): up0 holds the uplink address
/// in the host namespace and flows leave through host sockets; the network's MTU is 65520,
/// as pasta's default and slirp4netns's here, so the three compare like for like.
/// `switchyard-socket-1500`: the same with a network's default MTU.
/// `-nobp` (tap, socket): the daemon with busy polling off, for an A/B within one run.
/// `-1t` (tap, veth, socket): the daemon with one dataplane thread (`--threads 1`).
fn switchyard_dp(t: &mut Topo, host: &Path, bin: &Path, dp: &str) -> Result<(), String> {
    let nobp = dp.ends_with("-nobp");
    let one_thread = dp.ends_with("-1t");
    let dp = dp.trim_end_matches("-nobp").trim_end_matches("-1t");
    let kind = if dp.ends_with("veth") { "veth" } else { "tap" };
    let socket_uplink = dp.starts_with("switchyard-socket");
    let mtu = if dp.ends_with("-1500") {
        1500
    } else {
        SOCKET_MTU
    };
    if socket_uplink {
        uplink_address(host)?;
    }
    let mut extra: Vec<&str> = Vec::new();
    if nobp {
        extra.extend(["--busy-poll", "0"]);
    }
    if one_thread {
        extra.extend(["--threads", "1"]);
    }
    let socket = start_switchyard(t, host, bin, !socket_uplink, &extra)?;
    let cli = |args: &[&str]| -> Result<String, String> {
        let out = run_cmd(
            None,
            Command::new(bin).arg("--socket").arg(&socket).args(args),
            Duration::from_secs(20),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (mtu, subnet) = (mtu.to_string(), format!("{SUBNET}/24"));
    let mut create = vec!["network", "create", "bench", "--subnet", &subnet];
    if socket_uplink {
        create.extend(["--mtu", &mtu]);
    }
    cli(&create)?;
    let c1 = t.c1.to_string_lossy().into_owned();
    let pubspec = format!("{PUBLISHED_PORT}:{C1_PORT}");
    cli(&[
        "connect",
        "bench",
        "--netns",
        &c1,
        "--name",
        "c1",
        "--type",
        kind,
        "--ip",
        &C1_IP.to_string(),
        "-p",
        &pubspec,
    ])?;
    let c2 = t.c2.as_ref().expect("c2").to_string_lossy().into_owned();
    cli(&[
        "connect",
        "bench",
        "--netns",
        &c2,
        "--name",
        "c2",
        "--type",
        kind,
        "--ip",
        &C2_IP.to_string(),
    ])?;
    t.notes.push(if socket_uplink {
        format!("switchyard daemon, {kind} endpoints, socket uplink (host sockets), MTU {mtu}")
    } else {
        format!("switchyard daemon, {kind} endpoints, raw uplink up0 (AF_PACKET)")
    });
    Ok(())
}

/// The switchyard daemon in `host` with the raw uplink up0 (`raw_uplink`, else the socket
/// uplink) and `extra` arguments; its control socket once it accepts.
fn start_switchyard(
    t: &mut Topo,
    host: &Path,
    bin: &Path,
    raw_uplink: bool,
    extra: &[&str],
) -> Result<PathBuf, String> {
    let socket = t.dir.join("control.sock");
    let log = t.log("daemon.log")?;
    let raw = [
        "--uplink",
        "up0",
        "--uplink-addr",
        &format!("{UPLINK_IP}/24"),
    ]
    .map(String::from);
    let child = spawn_in(
        host,
        Command::new(bin)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(t.dir.join("state"))
            .args(if raw_uplink { &raw[..] } else { &[] })
            .args(["--log-level", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    t.cpu_pid = Some(child.id());
    t.children.push(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        t.alive(0, "daemon.log")
            .map_err(|e| format!("switchyard daemon {e}"))?;
        if Instant::now() > deadline || sys::stopping() {
            return Err("switchyard daemon did not open its socket in 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(socket)
}

// ---- Docker: dockerd driving a switchyard network, or its own bridge ----

/// The static busybox the containers' image is made of.
const BUSYBOX: &str = "/bin/busybox";

/// The docker client: Debian's (the same version as dockerd) when present.
fn docker_bin() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// dockerd in `host`, with its data-root, exec-root, pidfile and API socket under the topology's
/// dir. With `switchyard`, the switchyard daemon beside it is its network driver and c1, c2 join
/// a `-d switchyard` network (the tap endpoints, raw uplink and NAT of `switchyard-tap`);
/// without, they are on Docker's own bridge (docker0 at the gateway address, its iptables
/// rules, no userland proxy). The containers run `sleep` from an image of the host's static
/// busybox; the workloads run in their network namespaces.
fn docker_dp(t: &mut Topo, host: &Path, switchyard: Option<&Path>) -> Result<(), String> {
    // dockerd looks for legacy plugins at /run/docker/plugins/NAME.sock only: a name of our own.
    let driver = format!("syb{}", std::process::id());
    match switchyard {
        Some(bin) => {
            let plugin = PathBuf::from(format!("/run/docker/plugins/{driver}.sock"));
            t.files.push(plugin.clone());
            let plugin = plugin.to_string_lossy().into_owned();
            start_switchyard(t, host, bin, true, &["--docker-plugin-socket", &plugin])?;
        }
        // The host's own address, for Docker's masquerade and published port.
        None => uplink_address(host)?,
    }
    let d = t.dir.join("docker");
    fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    fs::write(d.join("daemon.json"), "{}").map_err(|e| e.to_string())?;
    let p = |s: &str| d.join(s).to_string_lossy().into_owned();
    let api = format!("unix://{}", p("docker.sock"));
    let mut cmd = Command::new("dockerd");
    cmd.args([
        "--config-file",
        &p("daemon.json"),
        "--data-root",
        &p("data"),
    ])
    .args(["--exec-root", &p("exec"), "--pidfile", &p("dockerd.pid")])
    .args(["-H", &api, "--storage-driver", "vfs"])
    .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
    .args([
        "--userland-proxy=false",
        "--ip6tables=false",
        "--shutdown-timeout",
        "2",
    ]);
    if switchyard.is_some() {
        cmd.args([
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
        ]);
    } else {
        cmd.arg("--bip").arg(format!("{GATEWAY}/24"));
    }
    let log = t.log("dockerd.log")?;
    let out = log.try_clone().map_err(|e| e.to_string())?;
    let child = spawn_in(host, cmd.stdin(Stdio::null()).stdout(out).stderr(log))?;
    t.children.push(child);
    let dockerd = t.children.len() - 1;
    let docker = {
        let api = api.clone();
        move |args: &[&str]| -> Result<String, String> {
            let out = run_cmd(
                None,
                Command::new(docker_bin()).args(["-H", &api]).args(args),
                Duration::from_secs(120),
            )?;
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while docker(&["info"]).is_err() {
        t.alive(dockerd, "dockerd.log")
            .map_err(|e| format!("dockerd {e}"))?;
        if Instant::now() > deadline || sys::stopping() {
            return Err("dockerd did not answer in 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    {
        let docker = docker.clone();
        t.before_stop.push(Box::new(move || {
            let _ = docker(&["rm", "-f", "c1", "c2"]);
            let _ = docker(&["network", "prune", "-f"]);
        }));
    }
    let root = t.dir.join("rootfs");
    fs::create_dir_all(root.join("bin")).map_err(|e| e.to_string())?;
    fs::copy(BUSYBOX, root.join("bin/busybox")).map_err(|e| format!("{BUSYBOX}: {e}"))?;
    let tar = t.dir.join("busybox.tar");
    run_cmd(
        None,
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
        Duration::from_secs(60),
    )?;
    docker(&["import", &tar.to_string_lossy(), "syb-busybox"])?;
    let net = match switchyard {
        Some(_) => {
            docker(&[
                "network",
                "create",
                "-d",
                &driver,
                "-o",
                "switchyard.name=bench",
                "--subnet",
                &format!("{SUBNET}/24"),
                "--gateway",
                &GATEWAY.to_string(),
                "bench",
            ])?;
            "bench"
        }
        None => "bridge",
    };
    let pubspec = format!("{PUBLISHED_PORT}:{C1_PORT}");
    let mut started = Vec::new();
    for (name, publish) in [("c1", Some(pubspec.as_str())), ("c2", None)] {
        let mut a = vec!["run", "-d", "--network", net, "--name", name];
        if let Some(p) = publish {
            a.extend_from_slice(&["-p", p]);
        }
        a.extend_from_slice(&["syb-busybox", "/bin/busybox", "sleep", "100000000"]);
        docker(&a)?;
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", name])?;
        let ip_fmt = format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}");
        let addr: Ipv4Addr = docker(&["inspect", "-f", &ip_fmt, name])?
            .parse()
            .map_err(|e| format!("{name}'s address: {e}"))?;
        let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        sysctl(&ns, "net/ipv6/conf/all/disable_ipv6", "1")?;
        started.push((ns, addr));
    }
    let (c2, c2_ip) = started.pop().expect("c2");
    let (c1, c1_ip) = started.pop().expect("c1");
    (t.c1, t.c1_ip, t.c2, t.c2_ip) = (c1, c1_ip, Some(c2), Some(c2_ip));
    let version = docker(&["version", "-f", "{{.Server.Version}}"]).unwrap_or_default();
    t.notes.push(match switchyard {
        Some(_) => format!(
            "dockerd {version}, containers on a -d switchyard network (tap endpoints from the remote driver), raw uplink up0, -p through switchyard"
        ),
        None => format!(
            "dockerd {version}, containers on Docker's bridge network (veth, docker0, Docker's iptables rules, no userland proxy)"
        ),
    });
    Ok(())
}

// ---- kernel bridge + iptables, the way Docker sets it up ----

/// Docker's rules for one bridge network `br` with subnet SUBNET/24 and one published port.
fn docker_rules(br: &str) -> String {
    let c1 = C1_IP;
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s {SUBNET}/24 ! -o {br} -j MASQUERADE
-A POSTROUTING -s {c1}/32 -d {c1}/32 -p tcp -m tcp --dport {C1_PORT} -j MASQUERADE
-A DOCKER -i {br} -j RETURN
-A DOCKER ! -i {br} -p tcp -m tcp --dport {PUBLISHED_PORT} -j DNAT --to-destination {c1}:{C1_PORT}
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o {br} -j DOCKER
-A FORWARD -i {br} ! -o {br} -j ACCEPT
-A FORWARD -i {br} -o {br} -j ACCEPT
-A DOCKER -d {c1}/32 ! -i {br} -o {br} -p tcp -m tcp --dport {C1_PORT} -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i {br} ! -o {br} -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o {br} -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
"
    )
}

/// The uplink address on the host's up0, for dataplanes that route in the kernel.
fn uplink_address(host: &Path) -> Result<(), String> {
    let hn = Topo::name_of(host);
    ip(&[
        "-n",
        &hn,
        "addr",
        "add",
        &format!("{UPLINK_IP}/24"),
        "dev",
        "up0",
    ])
}

/// Host-side routing and NAT (shared by `kernel` and `ovs`): ip_forward, br_netfilter, Docker's
/// iptables rules, the uplink address.
fn host_nat(t: &mut Topo, host: &Path, br: &str, bridge_nf: bool) -> Result<(), String> {
    uplink_address(host)?;
    sysctl(host, "net/ipv4/ip_forward", "1")?;
    if bridge_nf {
        // br_netfilter: bridged traffic goes through iptables too, as Docker turns it on.
        match sysctl(host, "net/bridge/bridge-nf-call-iptables", "1") {
            Ok(()) => t.notes.push("br_netfilter on".into()),
            Err(e) => t.notes.push(format!("br_netfilter not available ({e})")),
        }
    }
    run_cmd_input(
        Some(host),
        &mut Command::new("iptables-restore"),
        Some(&docker_rules(br)),
        Duration::from_secs(20),
    )?;
    Ok(())
}

fn kernel_dp(t: &mut Topo, host: &Path) -> Result<(), String> {
    let hn = Topo::name_of(host);
    ip(&["-n", &hn, "link", "add", "br0", "type", "bridge"])?;
    ip(&[
        "-n",
        &hn,
        "addr",
        "add",
        &format!("{GATEWAY}/24"),
        "dev",
        "br0",
    ])?;
    ip(&["-n", &hn, "link", "set", "br0", "up"])?;
    let c2 = t.c2.clone().expect("c2");
    for (i, (ns, addr)) in [(t.c1.clone(), C1_IP), (c2, C2_IP)].iter().enumerate() {
        let hv = format!("veth{i}");
        let cn = Topo::name_of(ns);
        ip(&[
            "-n", &hn, "link", "add", &hv, "type", "veth", "peer", "name", "eth0", "netns", &cn,
        ])?;
        ip(&["-n", &hn, "link", "set", &hv, "master", "br0", "up"])?;
        container(ns, *addr)?;
    }
    host_nat(t, host, "br0", true)?;
    t.notes
        .push("Linux bridge + veth, iptables (nft) MASQUERADE/DNAT as Docker".into());
    Ok(())
}

// ---- Open vSwitch, userspace (netdev) datapath ----

/// The packaged schema of the Open vSwitch database.
const OVS_SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";

/// Points every Open vSwitch program at the topology's dir, never the host's /var/run/openvswitch
/// or /etc/openvswitch.
fn ovs_env<'a>(c: &'a mut Command, dir: &Path) -> &'a mut Command {
    c.env("OVS_RUNDIR", dir)
        .env("OVS_LOGDIR", dir)
        .env("OVS_DBDIR", dir)
        .env("OVS_SYSCONFDIR", dir)
        .env("OVS_PKGDATADIR", "/usr/share/openvswitch")
}

/// Starts the Open vSwitch daemon `prog` (ovsdb-server, ovs-vswitchd) in `host` with `args`, its
/// pidfile, control socket and log in the topology's dir; returns its index in the children.
fn ovs_daemon(t: &mut Topo, host: &Path, prog: &str, args: &[String]) -> Result<usize, String> {
    let d = t.dir.clone();
    let file = |ext: &str| d.join(format!("{prog}.{ext}")).display().to_string();
    let mut c = Command::new(prog);
    ovs_env(&mut c, &d)
        .args(args)
        .arg(format!("--pidfile={}", file("pid")))
        .arg(format!("--unixctl={}", file("ctl")))
        .arg(format!("--log-file={}", file("log")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(t.log(&format!("{prog}.err"))?);
    let child = spawn_in(host, &mut c)?;
    t.children.push(child);
    Ok(t.children.len() - 1)
}

/// `ovs` / `ovs-notso`: ovsdb-server and ovs-vswitchd of the topology's own (database, sockets,
/// logs in its dir, in its host namespace), one bridge with the userspace datapath, the
/// containers' veths as its ports, and its internal port (a tap with this datapath) as their
/// gateway. As when OVS replaces Docker's bridge, the host routes and NATs between the internal
/// port and the uplink with Docker's iptables rules (no br_netfilter: no Linux bridge here).
/// `tso`: userspace TSO, OVS's `other_config:userspace-tso-enable`. Without it OVS reads the
/// veths' AF_PACKET sockets without virtio-net headers, so the containers must not hand it
/// partial checksums or TSO frames: their `eth0` gets `ethtool -K eth0 tx off`, as OVS's
/// documentation tells for veths on a userspace bridge.
fn ovs_dp(t: &mut Topo, host: &Path, tso: bool) -> Result<(), String> {
    let hn = Topo::name_of(host);
    let d = t.dir.clone();
    let db = d.join("conf.db");
    run_cmd(
        None,
        ovs_env(&mut Command::new("ovsdb-tool"), &d)
            .arg("create")
            .arg(&db)
            .arg(OVS_SCHEMA),
        Duration::from_secs(20),
    )?;
    let dbsock = d.join("db.sock");
    let server = ovs_daemon(
        t,
        host,
        "ovsdb-server",
        &[
            db.display().to_string(),
            format!("--remote=punix:{}", dbsock.display()),
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&dbsock).is_err() {
        t.alive(server, "ovsdb-server.err")
            .map_err(|e| format!("ovsdb-server {e}"))?;
        if Instant::now() > deadline || sys::stopping() {
            return Err("ovsdb-server did not open its socket in 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Before ovs-vswitchd runs, --no-wait; after, each command waits until it has applied the
    // change (so br0 exists once add-br returns).
    let vsctl = |wait: bool, args: &[&str]| -> Result<(), String> {
        let mut c = Command::new("ovs-vsctl");
        ovs_env(&mut c, &d)
            .arg(format!("--db=unix:{}", dbsock.display()))
            .arg("--timeout=20")
            .args(if wait { &[][..] } else { &["--no-wait"][..] })
            .args(args);
        run_cmd(Some(host), &mut c, Duration::from_secs(25)).map(|_| ())
    };
    vsctl(false, &["init"])?;
    let tso_opt = format!("other_config:userspace-tso-enable={tso}");
    vsctl(false, &["set", "Open_vSwitch", ".", &tso_opt])?;
    let vswitchd = ovs_daemon(
        t,
        host,
        "ovs-vswitchd",
        &[format!("unix:{}", dbsock.display()), "--verbose=err".into()],
    )?;
    t.cpu_pid = Some(t.children[vswitchd].id());
    vsctl(
        true,
        &[
            "add-br",
            "br0",
            "--",
            "set",
            "bridge",
            "br0",
            "datapath_type=netdev",
        ],
    )
    .map_err(|e| format!("{e}: {}", t.read_log("ovs-vswitchd.log")))?;
    let c2 = t.c2.clone().expect("c2");
    for (i, (ns, addr)) in [(t.c1.clone(), C1_IP), (c2, C2_IP)].iter().enumerate() {
        let hv = format!("veth{i}");
        let cn = Topo::name_of(ns);
        ip(&[
            "-n", &hn, "link", "add", &hv, "type", "veth", "peer", "name", "eth0", "netns", &cn,
        ])?;
        // OVS reads the port through AF_PACKET, and the host's kernel still sees every frame
        // on it: with ARP on it would answer the containers' ARP for the gateway with this
        // veth's MAC, and their traffic would reach the host's stack through veth0 (where
        // Docker's FORWARD rules, written for br0, drop it) instead of through OVS.
        ip(&["-n", &hn, "link", "set", &hv, "arp", "off", "up"])?;
        vsctl(true, &["add-port", "br0", &hv])?;
        container(ns, *addr)?;
        if !tso {
            run_cmd(
                Some(ns),
                Command::new("ethtool").args(["-K", "eth0", "tx", "off"]),
                Duration::from_secs(10),
            )?;
        }
    }
    ip(&["-n", &hn, "link", "set", "br0", "up"])?;
    ip(&[
        "-n",
        &hn,
        "addr",
        "add",
        &format!("{GATEWAY}/24"),
        "dev",
        "br0",
    ])?;
    host_nat(t, host, "br0", false)?;
    t.alive(vswitchd, "ovs-vswitchd.err")
        .map_err(|e| format!("ovs-vswitchd {e}"))?;
    t.notes.push(format!(
        "OVS userspace datapath (netdev, veth ports, userspace TSO {}), internal port as gateway, host iptables NAT as Docker",
        if tso { "on" } else { "off, containers' tx offloads off" }
    ));
    Ok(())
}

// ---- pasta ----

fn pasta_dp(t: &mut Topo, host: &Path) -> Result<(), String> {
    let hn = Topo::name_of(host);
    ip(&[
        "-n",
        &hn,
        "addr",
        "add",
        &format!("{UPLINK_IP}/24"),
        "dev",
        "up0",
    ])?;
    // pasta wants a routable external interface: a default route via ext.
    ip(&[
        "-n",
        &hn,
        "route",
        "add",
        "default",
        "via",
        &EXT_IP.to_string(),
    ])?;
    let mut c = Command::new("pasta");
    // As root pasta would switch to nobody and then fail to enter the namespace.
    c.args(["-f", "-q", "--runas", "0:0", "--config-net", "-a"])
        .arg(C1_IP.to_string())
        .args(["-n", "24", "-g"])
        .arg(GATEWAY.to_string())
        .args(["-I", "eth0", "-t"])
        .arg(format!("{PUBLISHED_PORT}:{C1_PORT}"))
        .args(["-u", "none", "-T", "none", "-U", "none", "--netns"])
        .arg(&t.c1)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(t.log("pasta.log")?);
    let child = spawn_in(host, &mut c)?;
    t.cpu_pid = Some(child.id());
    t.children.push(child);
    wait_addr(t, 0, "pasta.log", C1_IP)?;
    let pid = t.children[0].id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sys::listening(pid, PUBLISHED_PORT) {
        t.alive(0, "pasta.log").map_err(|e| format!("pasta {e}"))?;
        if Instant::now() > deadline {
            return Err("pasta does not listen on the published port".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    t.notes
        .push("pasta (tap in c1, sockets in the host namespace); no c1->c2 path".into());
    Ok(())
}

/// Waits until c1 has `addr` on an interface (the dataplane configures it).
fn wait_addr(t: &mut Topo, child: usize, log: &str, addr: Ipv4Addr) -> Result<(), String> {
    let cn = Topo::name_of(&t.c1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run_cmd(
            None,
            Command::new("ip").args(["-n", &cn, "-4", "-o", "addr"]),
            Duration::from_secs(10),
        )?;
        if String::from_utf8_lossy(&out.stdout).contains(&format!(" {addr}/")) {
            return Ok(());
        }
        t.alive(child, log)
            .map_err(|e| format!("{} {e}", t.dataplane))?;
        if Instant::now() > deadline || sys::stopping() {
            return Err(format!("{addr} did not appear in c1"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- slirp4netns ----

fn slirp_dp(t: &mut Topo, host: &Path) -> Result<(), String> {
    let hn = Topo::name_of(host);
    ip(&[
        "-n",
        &hn,
        "addr",
        "add",
        &format!("{UPLINK_IP}/24"),
        "dev",
        "up0",
    ])?;
    let api = t.dir.join("slirp.sock");
    let mut c = Command::new("slirp4netns");
    c.args([
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        "--netns-type=path",
    ])
    .arg(format!("--cidr={SUBNET}/24"))
    .arg(format!("--api-socket={}", api.display()))
    .arg(&t.c1)
    .arg("eth0")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(t.log("slirp4netns.log")?);
    let child = spawn_in(host, &mut c)?;
    t.cpu_pid = Some(child.id());
    t.children.push(child);
    // slirp4netns gives the guest .100 of the CIDR.
    t.c1_ip = sys::host(SUBNET, 100);
    wait_addr(t, 0, "slirp4netns.log", t.c1_ip)?;
    let req = format!(
        "{{\"execute\": \"add_hostfwd\", \"arguments\": {{\"proto\": \"tcp\", \"host_addr\": \"0.0.0.0\", \"host_port\": {PUBLISHED_PORT}, \"guest_port\": {C1_PORT}}}}}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        match slirp_api(&api, &req) {
            Ok(r) => break r,
            Err(e) if Instant::now() > deadline => return Err(format!("slirp4netns API: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    if !reply.contains("return") || reply.contains("error") {
        return Err(format!("slirp4netns add_hostfwd: {reply}"));
    }
    t.notes.push(format!(
        "slirp4netns (guest {}, MTU 65520); no c1->c2 path",
        t.c1_ip
    ));
    Ok(())
}

fn slirp_api(path: &Path, req: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(req.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
