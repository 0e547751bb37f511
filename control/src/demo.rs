//! `switchyard demo`: a throw-away topology with real traffic, then a summary.
//!
//! A daemon runs in a namespace of its own (so even its veth ends stay off the host), three
//! "containers" (namespaces) join one network: c1 by tap, c2 by veth, c3 by tap with a fixed
//! address serving HTTP. Everything is removed at the end, also when a step fails.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cli::table;
use crate::client::Client;
use crate::error::{Error, Result};
use crate::netns::NetNs;
use crate::probe;
use crate::proto::{self, EndpointInfo, EndpointType, MacEntry};

struct Teardown {
    daemon: Option<Child>,
    netns: Vec<String>,
    dir: PathBuf,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = d.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        for n in &self.netns {
            let _ = NetNs::delete_named(n);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Step {
    what: String,
    ok: bool,
    detail: String,
}

fn rtt_summary(r: &[Duration]) -> String {
    let us: Vec<f64> = r.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    let min = us.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = us.iter().cloned().fold(0.0, f64::max);
    let avg = us.iter().sum::<f64>() / us.len().max(1) as f64;
    format!(
        "{} replies, rtt min/avg/max {min:.0}/{avg:.0}/{max:.0} us",
        r.len()
    )
}

/// Spawn `switchyard daemon` inside `netns_path` (via the hidden `__in-netns` helper).
fn spawn_daemon(netns_path: &str, socket: &str, state: &str, log: &str) -> Result<Child> {
    let uplink = [
        "--uplink",
        "up0",
        "--uplink-addr",
        "192.0.2.10/24",
        "--uplink-gateway",
        "192.0.2.1",
    ];
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(log)?;
    Command::new(&exe)
        .args(["__in-netns", netns_path, "--"])
        .arg(&exe)
        .args([
            "daemon",
            "--socket",
            socket,
            "--state-dir",
            state,
            "--log-level",
            "info",
        ])
        .args(uplink)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| Error::system(format!("starting the daemon: {e}")))
}

fn wait_for_socket(path: &str, child: &mut Child) -> Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(c) = Client::connect(std::path::Path::new(path)) {
            return Ok(c);
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(Error::system(format!("the daemon exited early ({st})")));
        }
        if Instant::now() > deadline {
            return Err(Error::system("the daemon did not come up within 15 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run() -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::new(
            crate::error::ErrorCode::PermissionDenied,
            "demo needs root: it creates network namespaces (run it with sudo)",
        ));
    }
    let tag = format!("sy-demo-{}", std::process::id());
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir)?;
    let mut td = Teardown {
        daemon: None,
        netns: Vec::new(),
        dir: dir.clone(),
    };
    let started = Instant::now();
    println!("switchyard demo: building a throw-away topology ({tag}-*)");
    let mut ns = Vec::new();
    for n in ["host", "c1", "c2", "c3", "ext"] {
        let name = format!("{tag}-{n}");
        let path = NetNs::create_named(&name)
            .map_err(|e| Error::system(format!("creating namespace {name}: {e}")))?;
        td.netns.push(name);
        ns.push(path);
    }
    // "Outside": a namespace holding 192.0.2.1/24, joined by a veth to the daemon's namespace,
    // where the daemon owns `up0` and the address 192.0.2.10 (the raw uplink).
    make_outside(&ns[0], &ns[4])?;
    let sock = dir.join("control.sock").display().to_string();
    let log = dir.join("daemon.log").display().to_string();
    let state = dir.join("state").display().to_string();
    td.daemon = Some(spawn_daemon(
        &ns[0].display().to_string(),
        &sock,
        &state,
        &log,
    )?);
    let mut c = wait_for_socket(&sock, td.daemon.as_mut().expect("set"))?;

    let subnet = "10.199.0.0/24";
    c.call_value(
        "network.create",
        json!({ "name": "demo", "subnet": subnet }),
    )?;
    let mut eps = Vec::new();
    for (i, (name, kind, ip)) in [
        ("c1", EndpointType::Tap, None),
        ("c2", EndpointType::Veth, None),
        ("c3", EndpointType::Tap, Some(Ipv4Addr::new(10, 199, 0, 50))),
    ]
    .into_iter()
    .enumerate()
    {
        let publish = if name == "c3" {
            vec!["8080:8080".to_string()]
        } else {
            vec![]
        };
        let e: EndpointInfo = c.call(
            "endpoint.connect",
            proto::Connect {
                network: "demo".into(),
                netns: Some(ns[i + 1].display().to_string()),
                name: Some(name.into()),
                ip,
                kind: Some(kind),
                publish,
                ..Default::default()
            },
        )?;
        println!(
            "  {name}: {} {}/{} {} ({kind})",
            e.ifname, e.ip, e.prefix_len, e.mac
        );
        eps.push(e);
    }
    let nsh: Vec<NetNs> = ns[1..]
        .iter()
        .map(NetNs::open)
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::system(e.to_string()))?;
    let gw = Ipv4Addr::new(10, 199, 0, 1);
    let (ip1, ip2, ip3) = (eps[0].ip, eps[1].ip, eps[2].ip);
    let mut steps: Vec<Step> = Vec::new();
    let mut record = |what: String, r: std::result::Result<String, String>| {
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        steps.push(Step { what, ok, detail });
    };
    let t = Duration::from_secs(2);
    record(
        format!("c1 -> gateway {gw}: ARP + ICMP echo"),
        probe::ping(&nsh[0], gw, 3, t).map(|r| rtt_summary(&r)),
    );
    record(
        format!("c1 (tap) -> c3 {ip3}: ICMP echo"),
        probe::ping(&nsh[0], ip3, 5, t).map(|r| rtt_summary(&r)),
    );
    record(
        format!("c2 (veth) -> c1 {ip1}: ICMP echo"),
        probe::ping(&nsh[1], ip1, 5, t).map(|r| rtt_summary(&r)),
    );
    let len = 8 << 20;
    let server = probe::serve_http(&nsh[2], 80, len, 2);
    for (who, n) in [("c1", &nsh[0]), ("c2", &nsh[1])] {
        let r = match &server {
            Ok(_) => probe::http_get(n, ip3, 80).map(|(b, d)| {
                format!(
                    "{} MiB, content checked, {:.0} ms ({:.2} Gbit/s)",
                    b >> 20,
                    d.as_secs_f64() * 1e3,
                    b as f64 * 8.0 / d.as_secs_f64() / 1e9
                )
            }),
            Err(e) => Err(e.clone()),
        };
        record(format!("{who} -> c3 {ip3}:80: HTTP GET"), r);
    }
    let echo = probe::serve_udp_echo(&nsh[1], 7777, 100);
    record(
        format!("c1 -> c2 {ip2}:7777: 100 UDP datagrams echoed"),
        echo.and_then(|_| probe::udp_echo(&nsh[0], ip2, 7777, 100))
            .map(|n| format!("{n}/100 echoed, content checked")),
    );
    // Through the NAT: out to the world, and in through a published port.
    let ext = NetNs::open(&ns[4]).map_err(|e| Error::system(e.to_string()))?;
    let outside = Ipv4Addr::new(192, 0, 2, 1);
    let uplink_ip = Ipv4Addr::new(192, 0, 2, 10);
    let masq = probe::serve_tell_peer(&ext, 8000, 1)
        .and_then(|_| probe::ask_peer(&nsh[0], outside, 8000))
        .and_then(|seen| match seen.ip() {
            std::net::IpAddr::V4(ip) if ip == uplink_ip => {
                Ok(format!("the server saw {seen} (masquerade)"))
            }
            other => Err(format!("the server saw {other}, not {uplink_ip}")),
        });
    record(
        format!("c1 -> outside {outside}:8000 through the NAT"),
        masq,
    );
    let published = probe::serve_tell_peer(&nsh[2], 8080, 1)
        .and_then(|_| probe::ask_peer(&ext, uplink_ip, 8080))
        .and_then(|seen| match seen.ip() {
            std::net::IpAddr::V4(ip) if ip == outside => {
                Ok(format!("c3 saw the real client {seen}"))
            }
            other => Err(format!("c3 saw {other}, not the client {outside}")),
        });
    record(
        format!("outside -> {uplink_ip}:8080 published to c3:8080"),
        published,
    );
    let macs: Vec<MacEntry> = c.call("macs", json!({ "network": "demo" }))?;
    let stats: proto::Stats = c.call("stats", json!({}))?;

    println!();
    let rows: Vec<Vec<String>> = steps
        .iter()
        .map(|s| {
            vec![
                if s.ok { "ok" } else { "FAIL" }.into(),
                s.what.clone(),
                s.detail.clone(),
            ]
        })
        .collect();
    print!("{}", table(&["RESULT", "TRAFFIC", "DETAIL"], &rows));
    println!("\nMAC table of network demo ({subnet}):");
    let rows: Vec<Vec<String>> = macs
        .iter()
        .map(|m| {
            vec![
                m.mac.to_string(),
                m.port.clone(),
                m.kind.clone(),
                m.age.map(|a| format!("{a}s")).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    for l in table(&["MAC", "PORT", "TYPE", "AGE"], &rows).lines() {
        println!("  {l}");
    }
    println!("\nPort counters:");
    let rows: Vec<Vec<String>> = stats
        .ports
        .iter()
        .filter(|p| p.network == "demo")
        .map(|p| {
            vec![
                p.port.clone(),
                p.rx_packets.to_string(),
                p.tx_packets.to_string(),
                p.drops.values().sum::<u64>().to_string(),
            ]
        })
        .collect();
    for l in table(&["PORT", "RX_PKTS", "TX_PKTS", "DROPS"], &rows).lines() {
        println!("  {l}");
    }
    let failed = steps.iter().filter(|s| !s.ok).count();
    drop(c);
    drop(td);
    let leftovers: Vec<String> = std::fs::read_dir(crate::netns::NETNS_RUN_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&tag))
                .collect()
        })
        .unwrap_or_default();
    println!(
        "\n{} of {} checks passed in {:.1} s; topology removed{}",
        steps.len() - failed,
        steps.len(),
        started.elapsed().as_secs_f64(),
        if leftovers.is_empty() {
            String::new()
        } else {
            format!(" (LEFT BEHIND: {leftovers:?})")
        }
    );
    Ok(if failed == 0 && leftovers.is_empty() {
        0
    } else {
        1
    })
}

/// The demo's outside: veth `up0` (daemon side, no address) <-> `up0-peer` (192.0.2.1/24).
fn make_outside(host: &std::path::Path, ext: &std::path::Path) -> Result<()> {
    use std::os::fd::AsFd;
    let sys = |e: &dyn std::fmt::Display| Error::system(format!("making the outside: {e}"));
    let host = NetNs::open(host).map_err(|e| sys(&e))?;
    let ext_ns = NetNs::open(ext).map_err(|e| sys(&e))?;
    crate::netns::run_in(
        &host,
        || -> std::result::Result<(), crate::netlink::NetlinkError> {
            let mut nl = crate::netlink::Netlink::open()?;
            let i = nl.create_veth("up0", "up0-peer", Some(ext_ns.as_fd()))?;
            nl.set_up(i)
        },
    )
    .map_err(|e| sys(&e))?
    .map_err(|e| sys(&e))?;
    crate::netns::run_in(
        &ext_ns,
        || -> std::result::Result<(), crate::netlink::NetlinkError> {
            let mut nl = crate::netlink::Netlink::open()?;
            let i = nl
                .link_index("up0-peer")?
                .ok_or_else(|| crate::netlink::NetlinkError::not_found("up0-peer"))?;
            nl.add_address(i, Ipv4Addr::new(192, 0, 2, 1), 24)?;
            nl.set_up(i)?;
            nl.set_up(1)
        },
    )
    .map_err(|e| sys(&e))?
    .map_err(|e| sys(&e))
}

/// `__in-netns PATH -- CMD...`: enter a network namespace and exec. The process is single-
/// threaded here, so switching the namespace of the main thread is safe.
pub fn exec_in_netns(path: &str, cmd: &[String]) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let ns = std::fs::File::open(path).map_err(|e| Error::not_found(format!("{path}: {e}")))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| Error::system(format!("setns {path}: {e}")))?;
    drop(ns);
    let err = Command::new(&cmd[0]).args(&cmd[1..]).exec();
    Err(Error::system(format!("running {:?}: {err}", cmd[0])))
}
