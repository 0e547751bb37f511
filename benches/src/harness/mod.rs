//! `switchyard-bench`: builds the same container topology for several dataplanes in namespaces
//! it owns, runs the same tests through each (interleaved per repetition, so drift on a shared
//! machine cancels), and reports medians, min/max and ratios to the kernel bridge.

pub mod report;
pub mod sys;
pub mod topo;
pub mod work;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;

use topo::{Topo, C1_PORT, EXT_IP};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "switchyard-bench",
    about = "Compare container dataplanes side by side: switchyard, the kernel bridge + iptables, Open vSwitch, pasta, slirp4netns"
)]
pub struct Args {
    /// One repetition with short durations (a smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Repetitions (dataplanes interleaved within each); default 3, 1 with --quick.
    #[arg(long)]
    pub reps: Option<usize>,
    /// Write every sample and summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Comma-separated tests (default: all): tcp_c2c,tcp_nat,tcp_pub,udp_c2c,udp_nat,rr_c2c,rr_nat,cps_nat.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Comma-separated dataplanes (default: switchyard-tap,switchyard-veth,switchyard-socket,
    /// kernel,ovs,pasta,slirp4netns where installed; on request only: switchyard-socket-1500,
    /// switchyard-tap-nobp and switchyard-socket-nobp (the daemon with --busy-poll 0),
    /// switchyard-tap-1t, switchyard-veth-1t and switchyard-socket-1t (--threads 1),
    /// switchyard-docker and docker-bridge, which run a dockerd of their own, and ovs-notso
    /// (Open vSwitch with userspace TSO off).
    #[arg(long, value_delimiter = ',')]
    pub dataplanes: Vec<String>,
    /// The switchyard binary (default: `switchyard` next to this executable).
    #[arg(long)]
    pub switchyard: Option<PathBuf>,
    /// Where the chart and the markdown table go (default: benches/results of the source tree).
    #[arg(long)]
    pub results_dir: Option<PathBuf>,
    /// Seconds per TCP throughput run (default 5, 1 with --quick).
    #[arg(long)]
    pub tcp_secs: Option<u32>,
    /// Seconds per UDP, latency and connection-rate run (default 3, 1 with --quick).
    #[arg(long)]
    pub secs: Option<f64>,
}

/// A test: id (for --only), title, and whether it needs the second container.
pub struct TestDef {
    pub id: &'static str,
    pub title: &'static str,
    pub needs_c2: bool,
}

pub const TESTS: &[TestDef] = &[
    TestDef {
        id: "tcp_c2c",
        title: "TCP throughput c1 -> c2",
        needs_c2: true,
    },
    TestDef {
        id: "tcp_nat",
        title: "TCP throughput c1 -> ext (SNAT)",
        needs_c2: false,
    },
    TestDef {
        id: "tcp_pub",
        title: "TCP throughput ext -> published port",
        needs_c2: false,
    },
    TestDef {
        id: "udp_c2c",
        title: "UDP 64 B packets c1 -> c2",
        needs_c2: true,
    },
    TestDef {
        id: "udp_nat",
        title: "UDP 64 B packets c1 -> ext (SNAT)",
        needs_c2: false,
    },
    TestDef {
        id: "rr_c2c",
        title: "TCP request/response c1 -> c2",
        needs_c2: true,
    },
    TestDef {
        id: "rr_nat",
        title: "TCP request/response c1 -> ext (SNAT)",
        needs_c2: false,
    },
    TestDef {
        id: "cps_nat",
        title: "TCP connections/s c1 -> ext (SNAT)",
        needs_c2: false,
    },
];

/// What a figure means.
pub struct MetricDef {
    pub id: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// Only produced when the dataplane is a process whose CPU time we can read.
    pub needs_process: bool,
}

pub const METRICS: &[MetricDef] = &[
    MetricDef {
        id: "gbps",
        unit: "Gbit/s",
        higher_is_better: true,
        needs_process: false,
    },
    MetricDef {
        id: "mpps",
        unit: "Mpps received",
        higher_is_better: true,
        needs_process: false,
    },
    MetricDef {
        id: "sent_mpps",
        unit: "Mpps offered",
        higher_is_better: true,
        needs_process: false,
    },
    MetricDef {
        id: "p50_us",
        unit: "us p50",
        higher_is_better: false,
        needs_process: false,
    },
    MetricDef {
        id: "p99_us",
        unit: "us p99",
        higher_is_better: false,
        needs_process: false,
    },
    MetricDef {
        id: "cps",
        unit: "conn/s",
        higher_is_better: true,
        needs_process: false,
    },
    MetricDef {
        id: "cpu_s_per_gbit",
        unit: "dataplane CPU s per Gbit",
        higher_is_better: false,
        needs_process: true,
    },
    MetricDef {
        id: "cpu_s_per_mpkt",
        unit: "dataplane CPU s per M packets",
        higher_is_better: false,
        needs_process: true,
    },
];

/// The figures each test produces.
pub fn metrics_of(test: &str) -> &'static [&'static str] {
    match test {
        "tcp_c2c" | "tcp_nat" | "tcp_pub" => &["gbps", "cpu_s_per_gbit"],
        "udp_c2c" | "udp_nat" => &["mpps", "sent_mpps", "cpu_s_per_mpkt"],
        "rr_c2c" | "rr_nat" => &["p50_us", "p99_us"],
        "cps_nat" => &["cps"],
        _ => &[],
    }
}

pub fn metric(id: &str) -> &'static MetricDef {
    METRICS.iter().find(|m| m.id == id).expect("known metric")
}

/// Everything a run measured.
#[derive(Default)]
pub struct Results {
    /// (test, metric, dataplane) -> samples.
    pub samples: BTreeMap<(String, String, String), Vec<f64>>,
    /// (test, dataplane) -> errors, one per failed repetition.
    pub errors: BTreeMap<(String, String), Vec<String>>,
    /// Dataplanes in run order, with their status ("ok" or why skipped) and notes.
    pub dataplanes: Vec<(String, String, Vec<String>, bool)>,
    pub tests: Vec<String>,
    pub generator: Vec<(&'static str, f64)>,
    pub reps: usize,
    pub quick: bool,
    pub tcp_secs: u32,
    pub secs: f64,
    pub started_unix: u64,
    pub elapsed_s: f64,
    pub versions: Vec<(String, String)>,
}

fn default_switchyard() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("switchyard")))
        .unwrap_or_else(|| PathBuf::from("switchyard"))
}

/// `cargo run --bin switchyard-bench` rebuilds the harness but not the `switchyard` binary next
/// to it, so a run after a source change would quietly measure an old daemon: say so.
fn warn_if_stale(switchyard: &Path) {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let me = std::env::current_exe().ok();
    if let (Some(sy), Some(me)) = (mtime(switchyard), me.as_deref().and_then(mtime)) {
        if sy < me {
            eprintln!(
                "switchyard-bench: note: {} is older than this harness; if its sources changed, \
                 run `cargo build --release --bins` first",
                switchyard.display()
            );
        }
    }
}

/// Runs one test on one topology.
fn run_test(t: &Topo, test: &str, a: &Args) -> work::Outcome {
    let tcp = a.tcp_secs.unwrap_or(if a.quick { 1 } else { 5 });
    let secs = a.secs.unwrap_or(if a.quick { 1.0 } else { 3.0 });
    let c2 = || {
        Ok::<_, String>((
            t.c2.as_deref().ok_or("no c2")?,
            t.c2_ip.ok_or("no c2 address")?,
        ))
    };
    let ext = |port| SocketAddrV4::new(EXT_IP, port);
    match test {
        "tcp_c2c" => {
            let (c2, ip) = c2()?;
            work::tcp_throughput(&t.c1, c2, 5201, SocketAddrV4::new(ip, 5201), tcp, t.cpu_pid)
        }
        "tcp_nat" => work::tcp_throughput(&t.c1, &t.ext, 5201, ext(5201), tcp, t.cpu_pid),
        "tcp_pub" => work::tcp_throughput(&t.ext, &t.c1, C1_PORT, t.published, tcp, t.cpu_pid),
        "udp_c2c" => {
            let (c2, ip) = c2()?;
            work::udp_pps(
                &t.c1,
                c2,
                9000,
                SocketAddrV4::new(ip, 9000),
                secs,
                t.cpu_pid,
            )
        }
        "udp_nat" => work::udp_pps(&t.c1, &t.ext, 9000, ext(9000), secs, t.cpu_pid),
        "rr_c2c" => {
            let (c2, ip) = c2()?;
            work::rr_latency(&t.c1, c2, 7000, SocketAddrV4::new(ip, 7000), secs)
        }
        "rr_nat" => work::rr_latency(&t.c1, &t.ext, 7000, ext(7000), secs),
        "cps_nat" => work::conn_rate(&t.c1, &t.ext, 7100, ext(7100), secs),
        other => Err(format!("unknown test {other}")),
    }
}

fn fmt_figs(figs: &[(&str, f64)]) -> String {
    figs.iter()
        .map(|(m, v)| format!("{m}={}", report::num(*v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The whole run. Returns the results (also on partial failure) or a setup error.
pub fn run(a: &Args) -> Result<Results, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (network namespaces, veth, iptables inside them)".into());
    }
    let t_start = Instant::now();
    let reps = a.reps.unwrap_or(if a.quick { 1 } else { 3 }).max(1);
    let switchyard = a.switchyard.clone().unwrap_or_else(default_switchyard);
    if a.switchyard.is_none() {
        warn_if_stale(&switchyard);
    }
    let tests: Vec<String> = if a.only.is_empty() {
        TESTS.iter().map(|t| t.id.to_string()).collect()
    } else {
        for t in &a.only {
            if !TESTS.iter().any(|d| d.id == t) {
                return Err(format!(
                    "unknown test {t:?} (known: {})",
                    TESTS.iter().map(|t| t.id).collect::<Vec<_>>().join(",")
                ));
            }
        }
        TESTS
            .iter()
            .filter(|d| a.only.iter().any(|t| t == d.id))
            .map(|d| d.id.to_string())
            .collect()
    };
    let explicit = !a.dataplanes.is_empty();
    let wanted: Vec<String> = if explicit {
        for d in &a.dataplanes {
            if !topo::ALL.contains(&d.as_str()) {
                return Err(format!(
                    "unknown dataplane {d:?} (known: {})",
                    topo::ALL.join(",")
                ));
            }
        }
        a.dataplanes.clone()
    } else {
        topo::DEFAULT.iter().map(|s| s.to_string()).collect()
    };
    let mut res = Results {
        reps,
        quick: a.quick,
        tcp_secs: a.tcp_secs.unwrap_or(if a.quick { 1 } else { 5 }),
        secs: a.secs.unwrap_or(if a.quick { 1.0 } else { 3.0 }),
        tests: tests.clone(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        versions: versions(&switchyard),
        ..Default::default()
    };

    // The generator's own ceiling, on loopback.
    if tests.iter().any(|t| t.starts_with("udp")) {
        eprint!("UDP generator ceiling on loopback ... ");
        let _ = std::io::stderr().flush();
        match work::udp_ceiling(if a.quick { 0.5 } else { 2.0 }) {
            Ok(f) => {
                eprintln!(
                    "{} Mpps sent, {} Mpps received ({} flows, sendmmsg/recvmmsg batches of 64, {} B payload = 64 B frames)",
                    report::num(f[0].1),
                    report::num(f[1].1),
                    work::UDP_FLOWS,
                    work::UDP_PAYLOAD
                );
                res.generator = f;
            }
            Err(e) => eprintln!("failed: {e}"),
        }
    }

    // Build every topology first; they stay up side by side for the interleaved runs.
    let mut topos: Vec<Topo> = Vec::new();
    for dp in &wanted {
        if let Err(why) = topo::available(dp, &switchyard) {
            eprintln!("{dp:<16} skipped: {why}");
            res.dataplanes
                .push((dp.clone(), format!("skipped: {why}"), Vec::new(), false));
            if explicit && !matches!(dp.as_str(), "ovs" | "ovs-notso" | "pasta" | "slirp4netns") {
                return Err(format!("{dp}: {why}"));
            }
            continue;
        }
        eprint!("{dp:<16} building topology ... ");
        let _ = std::io::stderr().flush();
        let t0 = Instant::now();
        match topo::build(dp, &switchyard) {
            Ok(t) => {
                eprintln!("ok ({:.1} s)", t0.elapsed().as_secs_f64());
                res.dataplanes.push((
                    dp.clone(),
                    "ok".into(),
                    t.notes.clone(),
                    t.cpu_pid.is_some(),
                ));
                topos.push(t);
            }
            Err(e) => {
                eprintln!("failed: {e}");
                res.dataplanes
                    .push((dp.clone(), format!("failed: {e}"), Vec::new(), false));
            }
        }
        if sys::stopping() {
            return Err("interrupted".into());
        }
    }
    if topos.is_empty() {
        return Err("no dataplane could be set up".into());
    }

    let total: usize = reps
        * tests
            .iter()
            .map(|t| {
                let def = TESTS.iter().find(|d| d.id == t).expect("known");
                topos
                    .iter()
                    .filter(|tp| !def.needs_c2 || tp.c2.is_some())
                    .count()
            })
            .sum::<usize>();
    let mut done = 0usize;
    let mut dead: Vec<String> = Vec::new();
    for rep in 1..=reps {
        for test in &tests {
            let def = TESTS.iter().find(|d| d.id == test).expect("known");
            for t in topos.iter_mut() {
                if def.needs_c2 && t.c2.is_none() {
                    continue;
                }
                done += 1;
                eprint!(
                    "[{done:>3}/{total}] rep {rep}/{reps} {test:<8} {:<16} ",
                    t.dataplane
                );
                let _ = std::io::stderr().flush();
                let key = (test.clone(), t.dataplane.clone());
                if dead.contains(&t.dataplane) {
                    eprintln!("skipped (dataplane died)");
                    res.errors
                        .entry(key)
                        .or_default()
                        .push("dataplane process died earlier".into());
                    continue;
                }
                let t0 = Instant::now();
                let out = run_test(t, test, a);
                if sys::stopping() {
                    return Err("interrupted".into());
                }
                match out {
                    Ok(figs) => {
                        eprintln!("{}  ({:.1} s)", fmt_figs(&figs), t0.elapsed().as_secs_f64());
                        for (m, v) in figs {
                            res.samples
                                .entry((test.clone(), m.to_string(), t.dataplane.clone()))
                                .or_default()
                                .push(v);
                        }
                    }
                    Err(e) => {
                        eprintln!("FAILED: {e}");
                        res.errors.entry(key).or_default().push(e);
                    }
                }
                if let Err(e) = t.check_alive() {
                    eprintln!("  {}: {e}", t.dataplane);
                    dead.push(t.dataplane.clone());
                }
            }
        }
    }
    eprintln!("removing topologies ...");
    drop(topos);
    res.elapsed_s = t_start.elapsed().as_secs_f64();
    Ok(res)
}

fn versions(switchyard: &std::path::Path) -> Vec<(String, String)> {
    let mut v = vec![(
        "switchyard".to_string(),
        sys::version_of(&switchyard.to_string_lossy(), &["--version"]),
    )];
    for (p, args) in [
        ("iperf3", &["--version"][..]),
        ("iptables", &["-V"][..]),
        ("pasta", &["--version"][..]),
        ("slirp4netns", &["--version"][..]),
        ("ovs-vswitchd", &["--version"][..]),
    ] {
        if sys::have(p) {
            v.push((p.to_string(), sys::version_of(p, args)));
        }
    }
    let (kernel, model, cpus) = sys::machine();
    v.push(("kernel".into(), kernel));
    v.push(("cpu".into(), format!("{cpus} x {model}")));
    v
}
