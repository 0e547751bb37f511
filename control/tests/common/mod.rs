//! End-to-end test environment: a daemon in a namespace of its own and "containers" as named
//! namespaces, all with unique names, all removed on drop (also when the test fails).
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchyard_control::netns::NetNs;

pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// The daemon's raw uplink on `up0` (see [`Env::outside`]), holding 192.0.2.10.
pub const UPLINK_ARGS: [&str; 6] = [
    "--uplink",
    "up0",
    "--uplink-addr",
    "192.0.2.10/24",
    "--uplink-gateway",
    "192.0.2.1",
];

pub fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        println!("skipped: needs root (network namespaces)");
        false
    }
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub struct Env {
    pub tag: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub host: PathBuf,
    daemon: Option<Child>,
    netns: Vec<String>,
    extra: Vec<String>,
}

pub struct Container {
    pub name: String,
    pub path: PathBuf,
    pub ns: NetNs,
}

impl Env {
    /// A daemon (with extra daemon arguments) in a fresh namespace.
    pub fn new(extra: &[&str]) -> Env {
        let mut env = Env::prepare(extra);
        env.start_daemon();
        env
    }

    /// The daemon's namespace, made but with no daemon yet (for setting up an uplink first).
    pub fn prepare(extra: &[&str]) -> Env {
        let tag = unique("sy-e");
        let dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(&dir).unwrap();
        let mut env = Env {
            socket: dir.join("control.sock"),
            host: PathBuf::new(),
            dir,
            tag: tag.clone(),
            daemon: None,
            netns: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        env.host = NetNs::create_named(&format!("{tag}-h")).expect("host netns");
        env.netns.push(format!("{tag}-h"));
        env
    }

    /// An "outside" namespace joined to the daemon's namespace by a veth: `up0` on the daemon's
    /// side (no address: the daemon owns 192.0.2.10 in userspace), 192.0.2.1/24 outside.
    pub fn outside(&mut self) -> Container {
        let ext = self.container("ext");
        let host = NetNs::open(&self.host).unwrap();
        let ext_fd = NetNs::open(&ext.path).unwrap();
        switchyard_control::netns::run_in(&host, || {
            use std::os::fd::AsFd;
            let mut nl = switchyard_control::netlink::Netlink::open().unwrap();
            nl.create_veth("up0", "up0-peer", Some(ext_fd.as_fd()))
                .unwrap();
            let i = nl.link_index("up0").unwrap().unwrap();
            nl.set_up(i).unwrap();
        })
        .unwrap();
        switchyard_control::netns::run_in(&ext.ns, || {
            let mut nl = switchyard_control::netlink::Netlink::open().unwrap();
            let i = nl.link_index("up0-peer").unwrap().unwrap();
            nl.add_address(i, Ipv4Addr::new(192, 0, 2, 1), 24).unwrap();
            nl.set_up(i).unwrap();
            nl.set_up(1).unwrap();
        })
        .unwrap();
        ext
    }

    /// Replace the extra daemon arguments (before `start_daemon`).
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let mut child = Command::new(BIN)
            .args([
                "__in-netns",
                self.host.to_str().unwrap(),
                "--",
                BIN,
                "daemon",
            ])
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--log-level", "debug"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("daemon exited: {st}\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.daemon = Some(child);
    }

    pub fn daemon_pid(&self) -> i32 {
        self.daemon.as_ref().unwrap().id() as i32
    }

    /// Stop the daemon with `sig` and wait for it.
    pub fn stop_daemon(&mut self, sig: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let mut d = self.daemon.take().expect("daemon running");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.id() as i32), sig);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = d.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = d.kill();
                return d.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn container(&mut self, short: &str) -> Container {
        let name = format!("{}-{short}", self.tag);
        let path = NetNs::create_named(&name).expect("container netns");
        self.netns.push(name.clone());
        let ns = NetNs::open(&path).unwrap();
        Container { name, path, ns }
    }

    /// Run the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run cli")
    }

    /// Run the CLI and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "switchyard {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Run the CLI with `--json` appended and parse stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("json output")
    }

    /// Run the CLI and require failure; returns the stderr line.
    pub fn err(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(!o.status.success(), "switchyard {args:?} should fail");
        let e = String::from_utf8(o.stderr).unwrap();
        assert_eq!(e.lines().count(), 1, "one error line: {e:?}");
        assert!(e.starts_with("switchyard: error: "), "{e:?}");
        e
    }

    pub fn connect(&self, net: &str, c: &Container, extra: &[&str]) -> Value {
        let mut a = vec![
            "connect",
            net,
            "--netns",
            c.path.to_str().unwrap(),
            "--name",
            short(&c.name),
        ];
        a.extend_from_slice(extra);
        self.json(&a)
    }
}

pub fn short(name: &str) -> &str {
    name.rsplit('-').next().unwrap()
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            self.stop_daemon(nix::sys::signal::Signal::SIGTERM);
        }
        for n in &self.netns {
            let _ = NetNs::delete_named(n);
            // The daemon's /etc/netns/NAME/resolv.conf, should it have been left behind.
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(n));
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("daemon log:\n{}", self.log());
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn ip_of(v: &Value) -> Ipv4Addr {
    v["ip"].as_str().unwrap().parse().unwrap()
}

/// Interface names in a namespace.
pub fn links(path: &Path) -> Vec<String> {
    let ns = NetNs::open(path).unwrap();
    switchyard_control::netns::run_in(&ns, || {
        switchyard_control::netlink::Netlink::open()
            .unwrap()
            .link_names()
            .unwrap()
    })
    .unwrap()
}
