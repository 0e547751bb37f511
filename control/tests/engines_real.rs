//! End to end with the real engines: Debian's dockerd 20.10 (with switchyard as its remote network
//! driver) and rootful Podman 4.3 (with `switchyard-cni` as its CNI plugin), each in
//! directories and namespaces the test owns. Root only; each test skips with a message when its
//! engine (or busybox for the image) is not installed.
//!
//! No image can be pulled: the tests import a tiny image built from the host's static busybox.
//! Everything (containers, images, dockerd and its containerd, mounts, namespaces, temp dirs, the
//! plugin socket) is removed on drop, also when the test fails.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CNI: &str = env!("CARGO_BIN_EXE_switchyard-cni");
const BUSYBOX: &str = "/bin/busybox";

const UPLINK_ARGS: [&str; 6] = [
    "--uplink",
    "up0",
    "--uplink-addr",
    "192.0.2.10/24",
    "--uplink-gateway",
    "192.0.2.1",
];

/// Is `prog` on PATH (or an absolute path that exists)?
fn have(prog: &str) -> bool {
    if prog.starts_with('/') {
        return Path::new(prog).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).exists()))
}

fn missing(progs: &[&str]) -> Option<String> {
    let m: Vec<&str> = progs.iter().copied().filter(|p| !have(p)).collect();
    (!m.is_empty()).then(|| m.join(", "))
}

/// Run `prog args` bounded by `secs` (coreutils `timeout`, killed 5 s later if need be).
fn run(prog: &str, args: &[&str], envs: &[(&str, &str)], secs: u32) -> Output {
    Command::new("timeout")
        .args(["-k", "5", &secs.to_string(), prog])
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Retry `f` until it returns Some or `secs` pass.
fn until<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn write_exec(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// (busybox 1.35's `wget -T` segfaults: bound it with `timeout` instead.)
/// A CGI script that answers with the client's address as the server saw it.
/// (httpd on a dual-stack socket says `[::ffff:10.90.0.3]`: printed as `10.90.0.3`.)
const PEER_CGI: &str = "#!/bin/sh\necho 'Content-Type: text/plain'\necho\na=${REMOTE_ADDR#[}\na=${a%]}\necho \"${a#::ffff:}\"\n";

/// A rootfs tarball: the static busybox with its applets, `/www/index.html` and
/// `/www/cgi-bin/peer` for `httpd -h /www`.
fn busybox_tarball(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "www/cgi-bin", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(root.join("www/index.html"), "hello from switchyard\n").unwrap();
    write_exec(&root.join("www/cgi-bin/peer"), PEER_CGI);
    let tar = dir.join("busybox.tar");
    let o = run(
        "tar",
        &[
            "-C",
            root.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            ".",
        ],
        &[],
        60,
    );
    assert!(o.status.success(), "tar: {}", text(&o));
    tar
}

/// Lazily unmount whatever is still mounted under `dir` (deepest first).
fn umount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A busybox httpd in `ns` on `addr:port` serving `PEER_CGI`; killed on drop.
struct Httpd {
    child: Child,
}

impl Httpd {
    fn start(ns: &Path, dir: &Path, listen: &str) -> Httpd {
        let www = dir.join("ext-www");
        std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
        write_exec(&www.join("cgi-bin/peer"), PEER_CGI);
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args([BUSYBOX, "httpd", "-f", "-p", listen, "-h"])
            .arg(&www)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn httpd");
        Httpd { child }
    }
}

impl Drop for Httpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `wget -qO-` from namespace `ns` (the host's busybox).
fn wget_from(ns: &Path, url: &str) -> Option<String> {
    let o = run(
        "nsenter",
        &[
            &format!("--net={}", ns.display()),
            BUSYBOX,
            "wget",
            "-qO-",
            url,
        ],
        &[],
        10,
    );
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn endpoints(env: &Env, net: &str) -> Vec<Value> {
    env.json(&["network", "inspect", net])["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Interfaces in the daemon's namespace besides lo and the uplink.
fn stray_links(env: &Env) -> Vec<String> {
    links(&env.host)
        .into_iter()
        .filter(|l| l != "lo" && l != "up0")
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Docker

/// A dockerd (and the containerd it manages) in the daemon's namespace, with its own data-root,
/// exec-root, pidfile and API socket under `dir`; stopped and cleaned up on drop.
struct Dockerd {
    dir: PathBuf,
    api: String,
    child: Option<Child>,
    plugin_socket: PathBuf,
}

/// The docker client: Debian's (same version as dockerd) when present.
fn docker_bin() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

impl Dockerd {
    fn start(netns: &Path, dir: PathBuf, plugin_socket: PathBuf) -> Dockerd {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("daemon.json"), "{}").unwrap();
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let api = format!("unix://{}", dir.join("docker.sock").display());
        let p = |s: &str| dir.join(s).to_str().unwrap().to_string();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg("dockerd")
            .args(["--config-file", &p("daemon.json")])
            .args(["--data-root", &p("data")])
            .args(["--exec-root", &p("exec")])
            .args(["--pidfile", &p("dockerd.pid")])
            .args(["-H", &api])
            .args(["--storage-driver", "vfs"])
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
                "--ip-forward=false",
                "--userland-proxy=false",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn dockerd");
        let mut d = Dockerd {
            dir,
            api,
            child: Some(child),
            plugin_socket,
        };
        let ready = until(60, || {
            if let Some(Ok(Some(st))) = d.child.as_mut().map(|c| c.try_wait()) {
                panic!("dockerd exited: {st}\n{}", d.log());
            }
            d.docker(&["info"]).status.success().then_some(())
        });
        assert!(ready.is_some(), "dockerd did not start\n{}", d.log());
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    fn docker(&self, args: &[&str]) -> Output {
        let mut a = vec!["-H", &self.api];
        a.extend_from_slice(args);
        run(docker_bin(), &a, &[], 120)
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        assert!(o.status.success(), "docker {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// A container's address on network `net`.
    fn ip(&self, container: &str, net: &str) -> String {
        self.ok(&[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
            container,
        ])
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let ids = self.docker(&["ps", "-aq"]);
            for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
                let _ = self.docker(&["rm", "-f", id]);
            }
            let _ = self.docker(&["network", "prune", "-f"]);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if until(30, || child.try_wait().ok().flatten()).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if std::thread::panicking() {
                eprintln!("dockerd log:\n{}", self.log());
            }
        }
        umount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.plugin_socket);
    }
}

#[test]
fn docker_with_switchyard_driver() {
    if !root() {
        return;
    }
    if let Some(m) = missing(&[
        "dockerd",
        docker_bin(),
        "nsenter",
        "timeout",
        "tar",
        BUSYBOX,
    ]) {
        println!("skipped: not installed: {m} (apt-get install docker.io busybox-static)");
        return;
    }
    let t0 = Instant::now();
    let mut env = Env::prepare(&UPLINK_ARGS);
    let ext = env.outside();
    // dockerd finds legacy plugins only at /run/docker/plugins/NAME.sock: a unique driver name.
    let driver = format!(
        "sy{}",
        env.tag.trim_start_matches("sy-e-").replace('-', "x")
    );
    let plugin_socket = PathBuf::from(format!("/run/docker/plugins/{driver}.sock"));
    let mut args: Vec<String> = UPLINK_ARGS.iter().map(|s| s.to_string()).collect();
    args.push("--docker-plugin-socket".into());
    args.push(plugin_socket.to_str().unwrap().into());
    env.set_extra(&args.iter().map(String::as_str).collect::<Vec<_>>());
    env.start_daemon();
    let _httpd = Httpd::start(&ext.path, &env.dir, "192.0.2.1:8000");

    let d = Dockerd::start(&env.host, env.dir.join("d"), plugin_socket.clone());
    let tar = busybox_tarball(&env.dir);
    d.ok(&["import", tar.to_str().unwrap(), "sy-busybox"]);

    d.ok(&[
        "network",
        "create",
        "-d",
        &driver,
        "-o",
        "switchyard.name=sy",
        "--subnet",
        "10.90.0.0/24",
        "--gateway",
        "10.90.0.1",
        "sy",
    ]);
    assert_eq!(
        env.json(&["network", "inspect", "sy"])["subnet"],
        "10.90.0.0/24"
    );
    d.ok(&[
        "run",
        "-d",
        "--network",
        "sy",
        "--name",
        "web",
        "-p",
        "8080:80",
        "sy-busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    d.ok(&[
        "run",
        "-d",
        "--network",
        "sy",
        "--name",
        "client",
        "sy-busybox",
        "sleep",
        "600",
    ]);
    let web = d.ip("web", "sy");
    let client = d.ip("client", "sy");
    assert!(web.starts_with("10.90.0.") && client.starts_with("10.90.0."));
    assert_eq!(
        endpoints(&env, "sy").len(),
        2,
        "switchyard shows Docker's endpoints"
    );

    // Container to container, and to the gateway.
    d.ok(&["exec", "client", "ping", "-c", "1", "-W", "3", &web]);
    d.ok(&["exec", "client", "ping", "-c", "1", "-W", "3", "10.90.0.1"]);
    let page = d.ok(&[
        "exec",
        "client",
        "timeout",
        "5",
        "wget",
        "-qO-",
        &format!("http://{web}/"),
    ]);
    assert_eq!(page, "hello from switchyard");
    let peer = d.ok(&[
        "exec",
        "client",
        "timeout",
        "5",
        "wget",
        "-qO-",
        &format!("http://{web}/cgi-bin/peer"),
    ]);
    assert_eq!(peer, client, "container to container keeps addresses");

    // To the outside through NAT: the outside sees the uplink address.
    let seen = d.ok(&[
        "exec",
        "client",
        "timeout",
        "5",
        "wget",
        "-qO-",
        "http://192.0.2.1:8000/cgi-bin/peer",
    ]);
    assert_eq!(seen, "192.0.2.10");

    // The published port from the outside reaches the container with the client's address kept.
    let url = "http://192.0.2.10:8080/cgi-bin/peer";
    assert_eq!(
        until(10, || wget_from(&ext.path, url)).as_deref(),
        Some("192.0.2.1"),
        "-p 8080:80 from the outside\n{}",
        env.log()
    );

    // docker stop releases the endpoint and its port; docker start restores both.
    d.ok(&["stop", "-t", "1", "web"]);
    assert_eq!(endpoints(&env, "sy").len(), 1, "stop releases the endpoint");
    assert_eq!(wget_from(&ext.path, url), None, "stop releases the port");
    d.ok(&["start", "web"]);
    assert_eq!(endpoints(&env, "sy").len(), 2);
    assert_eq!(
        until(10, || wget_from(&ext.path, url)).as_deref(),
        Some("192.0.2.1"),
        "start restores the port"
    );
    let web2 = d.ip("web", "sy");
    d.ok(&["exec", "client", "ping", "-c", "1", "-W", "3", &web2]);

    // A daemon restart keeps the Docker-made network and its endpoints.
    env.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    env.start_daemon();
    assert_eq!(endpoints(&env, "sy").len(), 2, "restored\n{}", env.log());
    d.ok(&["exec", "client", "ping", "-c", "1", "-W", "3", &web2]);
    assert_eq!(
        until(10, || wget_from(&ext.path, url)).as_deref(),
        Some("192.0.2.1"),
        "the port after a restart"
    );

    // Removal leaves nothing behind.
    d.ok(&["rm", "-f", "web", "client"]);
    assert!(endpoints(&env, "sy").is_empty());
    d.ok(&["network", "rm", "sy"]);
    assert!(env.err(&["network", "inspect", "sy"]).contains("not found"));
    assert_eq!(stray_links(&env), Vec::<String>::new(), "no interface left");
    assert_eq!(wget_from(&ext.path, url), None);
    println!("docker end to end: {:.1}s", t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// Podman

/// Rootful Podman with its storage, run dir, containers.conf, CNI config and plugin dirs all
/// under `dir`; containers and mounts removed on drop. Root here lacks CAP_SYS_RESOURCE: with
/// Podman's default nofile and nproc (raised, or even our own limits) runc fails with "error
/// setting rlimits"; 1024 works.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    fn new(dir: PathBuf) -> Podman {
        for d in ["root", "runroot", "tmp", "cni-bin", "cni-conf"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let p = |s: &str| dir.join(s).to_str().unwrap().to_string();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                r#"[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{}"]
network_config_dir = "{}"
"#,
                p("cni-bin"),
                p("cni-conf"),
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                p("root"),
                p("runroot")
            ),
        )
        .unwrap();
        std::fs::copy(CNI, dir.join("cni-bin/switchyard")).unwrap();
        Podman { dir }
    }

    fn podman(&self, args: &[&str]) -> Output {
        let p = |s: &str| self.dir.join(s).to_str().unwrap().to_string();
        let (root, runroot, tmp) = (p("root"), p("runroot"), p("tmp"));
        let mut a = vec![
            "--root",
            &root,
            "--runroot",
            &runroot,
            "--tmpdir",
            &tmp,
            "--storage-driver",
            "vfs",
        ];
        a.extend_from_slice(args);
        let conf = p("containers.conf");
        let storage = p("storage.conf");
        run(
            "podman",
            &a,
            &[
                ("CONTAINERS_CONF", &conf),
                ("CONTAINERS_STORAGE_CONF", &storage),
            ],
            120,
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.podman(args);
        assert!(o.status.success(), "podman {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-a", "-f", "-t", "0"]);
        let _ = self.podman(&["rmi", "-a", "-f"]);
        umount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn podman_with_switchyard_cni() {
    if !root() {
        return;
    }
    if let Some(m) = missing(&["podman", "runc", "conmon", "timeout", "tar", BUSYBOX]) {
        println!("skipped: not installed: {m} (apt-get install podman runc busybox-static)");
        return;
    }
    let t0 = Instant::now();
    let env = Env::new(&[]);
    let pm = Podman::new(env.dir.join("p"));
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "sy2",
        "plugins": [{
            "type": "switchyard",
            "network": "sy2",
            "subnet": "10.91.0.0/24",
            "gateway": "10.91.0.1",
            "socket": env.socket,
            "capabilities": {"portMappings": true}
        }]
    });
    std::fs::File::create(pm.dir.join("cni-conf/sy2.conflist"))
        .unwrap()
        .write_all(conflist.to_string().as_bytes())
        .unwrap();
    let tar = busybox_tarball(&env.dir);
    pm.ok(&["import", tar.to_str().unwrap(), "localhost/sy-busybox"]);

    pm.ok(&[
        "run",
        "-d",
        "--network",
        "sy2",
        "--name",
        "web2",
        "localhost/sy-busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    let eps = endpoints(&env, "sy2");
    assert_eq!(eps.len(), 1, "the CNI ADD made an endpoint: {eps:?}");
    let web = eps[0]["ip"].as_str().unwrap().to_string();
    assert!(web.starts_with("10.91.0."), "{web}");
    let out = pm.ok(&[
        "run",
        "--rm",
        "--network",
        "sy2",
        "localhost/sy-busybox",
        "sh",
        "-c",
        &format!(
            "ping -c 1 -W 3 10.91.0.1 >/dev/null && ping -c 1 -W 3 {web} >/dev/null && \
             timeout 5 wget -qO- http://{web}/cgi-bin/peer && ip -4 -o addr show eth0"
        ),
    ]);
    let mut lines = out.lines();
    let peer = lines.next().unwrap_or_default().to_string();
    assert!(peer.starts_with("10.91.0.") && peer != web, "{out}");
    assert!(
        lines
            .next()
            .is_some_and(|l| l.contains(&format!("{peer}/24"))),
        "the client's address is the one the server saw: {out}"
    );
    // The --rm container's DEL released its endpoint; removing web2 releases the other.
    assert_eq!(
        until(10, || (endpoints(&env, "sy2").len() == 1).then_some(())),
        Some(()),
        "DEL on --rm"
    );
    pm.ok(&["rm", "-f", "-t", "0", "web2"]);
    assert_eq!(
        until(10, || endpoints(&env, "sy2").is_empty().then_some(())),
        Some(()),
        "DEL on removal: {:?}",
        endpoints(&env, "sy2")
    );
    assert_eq!(stray_links(&env), Vec::<String>::new(), "no interface left");
    println!("podman end to end: {:.1}s", t0.elapsed().as_secs_f64());
}
