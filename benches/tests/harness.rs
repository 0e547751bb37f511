//! End to end: `switchyard-bench --quick` for switchyard (tap) and the kernel bridge (and for
//! Open vSwitch and Docker when installed) produces every figure and removes every namespace it
//! made, also when interrupted. Root only.
//!
//! The harness needs the `switchyard` binary next to its own. A test here cannot name another
//! package's binary (`CARGO_BIN_EXE_*` is per package), so: under `cargo test --workspace` the
//! control crate's own tests already build `target/<profile>/switchyard`; otherwise this test
//! builds it with `cargo build -p switchyard --bin switchyard` into the same target directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_switchyard-bench");

/// Root, and the tools the kernel dataplane and the TCP tests use (Debian: iperf3, iptables).
fn root() -> bool {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: needs root (network namespaces)");
        return false;
    }
    installed(
        &["iperf3", "iptables-restore", "ip"],
        "iperf3 iptables iproute2",
    )
}

/// Whether every one of `tools` is on PATH; if not, says the test is skipped and what to
/// install (the Debian `packages`).
fn installed(tools: &[&str], packages: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in tools {
        if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
            println!("skipped: {tool} not installed (apt-get install {packages})");
            return false;
        }
    }
    true
}

/// `switchyard` next to the harness, built if missing.
fn switchyard_bin() -> PathBuf {
    let dir = Path::new(BENCH).parent().expect("bin dir").to_path_buf();
    let bin = dir.join("switchyard");
    if bin.is_file() {
        return bin;
    }
    // <target>/<profile>/switchyard-bench: build into the same <target> and profile.
    let target = dir.parent().expect("target dir");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "switchyard", "--bin", "switchyard"])
        .arg("--target-dir")
        .arg(target)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("run cargo build -p switchyard");
    assert!(st.success(), "cargo build -p switchyard failed");
    assert!(bin.is_file(), "{} not built", bin.display());
    bin
}

fn leftovers(pid: u32) -> Vec<String> {
    let prefix = format!("syb-{pid}-");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("switchyard-bench did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `switchyard-bench --quick ARGS` writing its JSON and results into `dir`, within `secs`; it
/// must succeed and leave no namespace. Its pid and the JSON.
fn quick_run(dir: &Path, args: &[&str], secs: u64) -> (u32, Value) {
    let sy = switchyard_bin();
    std::fs::create_dir_all(dir).unwrap();
    let json = dir.join("out.json");
    let mut child = Command::new(BENCH)
        .arg("--quick")
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--results-dir")
        .arg(dir)
        .arg("--switchyard")
        .arg(&sy)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn switchyard-bench");
    let pid = child.id();
    let st = wait(&mut child, Duration::from_secs(secs));
    assert!(st.success(), "switchyard-bench failed: {st}");
    assert_eq!(
        leftovers(pid),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    let text = std::fs::read_to_string(&json).unwrap();
    // The results dir holds the same run's JSON next to its table and chart.
    for kept in [
        "switchyard-bench.json",
        "switchyard-bench.md",
        "switchyard-bench.svg",
    ] {
        assert!(dir.join(kept).is_file(), "{kept} not written");
    }
    let kept = std::fs::read_to_string(dir.join("switchyard-bench.json")).unwrap();
    assert_eq!(kept, text, "the results dir's JSON is not this run's");
    let v = serde_json::from_str(&text).unwrap();
    (pid, v)
}

/// The run set up exactly `dps`, and each has every figure of every test: a positive median from
/// non-empty positive samples, "n/a" for the kernel's CPU figures, and a ratio to the kernel for
/// switchyard-tap.
fn assert_every_figure(v: &Value, dps: &[&str]) {
    let names: Vec<&str> = v["dataplanes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["status"], "ok", "{d}");
            d["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(names, dps);
    let results = v["results"].as_array().unwrap();
    let expected: &[(&str, &[&str])] = &[
        ("tcp_c2c", &["gbps", "cpu_s_per_gbit"]),
        ("tcp_nat", &["gbps", "cpu_s_per_gbit"]),
        ("tcp_pub", &["gbps", "cpu_s_per_gbit"]),
        ("udp_c2c", &["mpps", "sent_mpps", "cpu_s_per_mpkt"]),
        ("udp_nat", &["mpps", "sent_mpps", "cpu_s_per_mpkt"]),
        ("rr_c2c", &["p50_us", "p99_us"]),
        ("rr_nat", &["p50_us", "p99_us"]),
        ("cps_nat", &["cps"]),
    ];
    let mut failures = Vec::new();
    for (test, metrics) in expected {
        for m in *metrics {
            for dp in dps {
                let r = results
                    .iter()
                    .find(|r| r["test"] == *test && r["metric"] == *m && r["dataplane"] == *dp);
                let Some(r) = r else {
                    failures.push(format!("{test} {m} {dp}: missing"));
                    continue;
                };
                let status = r["status"].as_str().unwrap();
                if *dp == "kernel" && m.starts_with("cpu_") {
                    // The kernel forwards in softirq context: no process to account.
                    assert!(status.starts_with("n/a"), "{r}");
                    continue;
                }
                let median = r["median"].as_f64().unwrap_or(0.0);
                let samples_ok = r["samples"]
                    .as_array()
                    .is_some_and(|s| !s.is_empty() && s.iter().all(|x| x.as_f64() > Some(0.0)));
                if status != "ok" || median <= 0.0 || !samples_ok {
                    failures.push(format!("{test} {m} {dp}: {status} median {median}"));
                }
                if *dp == "switchyard-tap"
                    && !m.starts_with("cpu_")
                    && r["ratio_to_kernel"].as_f64().unwrap_or(0.0) <= 0.0
                {
                    failures.push(format!("{test} {m} {dp}: no ratio to kernel"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "figures missing:\n{}",
        failures.join("\n")
    );
}

#[test]
fn quick_run_produces_every_figure_and_cleans_up() {
    if !root() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("syb-test-{}", std::process::id()));
    let (_, v) = quick_run(&dir, &["--dataplanes", "switchyard-tap,kernel"], 150);
    assert_every_figure(&v, &["switchyard-tap", "kernel"]);
    assert!(v["generator_ceiling"]["sent_mpps"].as_f64().unwrap() > 0.0);
    let svg = std::fs::read_to_string(dir.join("switchyard-bench.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("kernel"));
    let md = std::fs::read_to_string(dir.join("switchyard-bench.md")).unwrap();
    assert!(md.contains("| figure | switchyard-tap | kernel |"), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn interrupted_run_removes_its_namespaces() {
    if !root() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("syb-test-int-{}", std::process::id()));
    let mut child = Command::new(BENCH)
        .args([
            "--dataplanes",
            "kernel",
            "--only",
            "tcp_c2c",
            "--tcp-secs",
            "20",
        ])
        .arg("--results-dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn switchyard-bench");
    let pid = child.id();
    // Wait until the topology is up and iperf3 runs, then Ctrl-C.
    let deadline = Instant::now() + Duration::from_secs(30);
    while leftovers(pid).len() < 4 {
        assert!(Instant::now() < deadline, "topology never appeared");
        assert!(child.try_wait().unwrap().is_none(), "harness exited early");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let st = wait(&mut child, Duration::from_secs(30));
    assert!(!st.success(), "an interrupted run fails");
    assert_eq!(
        leftovers(pid),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Processes whose command line names one of the run's scratch directories (dockerd, its
/// containerd and shims, the switchyard daemon).
fn processes_of_run(pid: u32) -> Vec<String> {
    let tag = format!("syb-{pid}-");
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .filter(|c| c.contains(&tag))
                .collect()
        })
        .unwrap_or_default()
}

/// The Docker dataplanes: containers started by a dockerd of the harness's own, on a
/// `-d switchyard` network and on Docker's bridge, measured like the others; nothing of
/// Docker's is left afterwards (processes, the plugin socket, namespaces).
#[test]
fn docker_dataplanes_measure_and_clean_up() {
    if !root() {
        return;
    }
    if !installed(&["dockerd", "docker"], "docker.io busybox-static") {
        return;
    }
    if !Path::new("/bin/busybox").is_file() {
        println!("skipped: /bin/busybox not installed (apt-get install busybox-static)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("syb-dtest-{}", std::process::id()));
    let args = [
        "--dataplanes",
        "switchyard-docker,docker-bridge",
        "--only",
        "tcp_c2c,tcp_pub",
    ];
    let (pid, v) = quick_run(&dir, &args, 300);
    assert_eq!(
        processes_of_run(pid),
        Vec::<String>::new(),
        "processes left"
    );
    assert!(!Path::new(&format!("/run/docker/plugins/syb{pid}.sock")).exists());
    for d in v["dataplanes"].as_array().unwrap() {
        assert_eq!(d["status"], "ok", "{d}");
    }
    for dp in ["switchyard-docker", "docker-bridge"] {
        for test in ["tcp_c2c", "tcp_pub"] {
            let r = v["results"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["test"] == test && r["metric"] == "gbps" && r["dataplane"] == dp)
                .unwrap_or_else(|| panic!("{test} {dp}: missing"));
            assert!(
                r["status"] == "ok" && r["median"].as_f64().unwrap_or(0.0) > 0.0,
                "{r}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Open vSwitch with the userspace datapath, TSO on and off: every figure of every test
/// (the NAT paths through the host's iptables included), and nothing of its own left afterwards:
/// no namespace, no ovsdb-server or ovs-vswitchd, no scratch dir with its database.
#[test]
fn ovs_dataplanes_produce_every_figure_and_clean_up() {
    if !root() {
        return;
    }
    let tools = [
        "ovs-vswitchd",
        "ovsdb-server",
        "ovs-vsctl",
        "ovsdb-tool",
        "ethtool",
    ];
    if !installed(&tools, "openvswitch-switch ethtool") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("syb-otest-{}", std::process::id()));
    let (pid, v) = quick_run(&dir, &["--dataplanes", "ovs,ovs-notso"], 200);
    assert_eq!(
        processes_of_run(pid),
        Vec::<String>::new(),
        "processes left"
    );
    for dp in ["ovs", "ovs-notso"] {
        let scratch = std::env::temp_dir().join(format!("syb-{pid}-{dp}"));
        assert!(!scratch.exists(), "{} left", scratch.display());
    }
    assert_every_figure(&v, &["ovs", "ovs-notso"]);
    let _ = std::fs::remove_dir_all(&dir);
}
