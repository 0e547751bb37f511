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

/// The image's web server: busybox httpd on port 80, serving `/www`.
const HTTPD: [&str; 6] = ["httpd", "-f", "-p", "80", "-h", "/www"];

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

/// Podman with its storage, run dir, containers.conf, CNI config and plugin dirs all under
/// `dir`, run inside the test's network namespace `netns` (its `-p` reservations bind there, not
/// on the host); containers, mounts and the rootless pause process removed on drop.
///
/// Rootful: root here lacks CAP_SYS_RESOURCE: with Podman's default nofile and nproc (raised, or
/// even our own limits) runc fails with "error setting rlimits"; 1024 works.
/// Rootless: as uid 65534 with HOME and XDG_RUNTIME_DIR under `dir`. That user has no subordinate
/// ids here (and the test leaves /etc alone), so Podman uses its single mapping (container root
/// is the user; the busybox image has nothing else).
struct Podman {
    dir: PathBuf,
    netns: PathBuf,
    rootless: bool,
}

/// The unprivileged user of the rootless tests.
const USER: &str = "65534";
/// A command prefix that runs the rest as that user.
const AS_USER: [&str; 7] = [
    "setpriv",
    "--reuid",
    USER,
    "--regid",
    USER,
    "--clear-groups",
    "--",
];

impl Podman {
    fn new(dir: PathBuf, netns: &Path, rootless: bool) -> Podman {
        for d in [
            "root", "runroot", "tmp", "cni-bin", "cni-conf", "home", "run",
        ] {
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
        if rootless {
            chown_tree(&dir, USER);
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join("run"), std::fs::Permissions::from_mode(0o700))
                .unwrap();
        }
        Podman {
            dir,
            netns: netns.to_path_buf(),
            rootless,
        }
    }

    fn podman(&self, args: &[&str]) -> Output {
        let p = |s: &str| self.dir.join(s).to_str().unwrap().to_string();
        let net = format!("--net={}", self.netns.display());
        let mut a: Vec<String> = vec![net];
        if self.rootless {
            a.extend(AS_USER.iter().map(|x| x.to_string()));
            a.extend([
                "env".into(),
                "-i".into(),
                "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
                format!("HOME={}", p("home")),
                format!("XDG_RUNTIME_DIR={}", p("run")),
            ]);
        } else {
            a.push("env".into());
        }
        a.push(format!("CONTAINERS_CONF={}", p("containers.conf")));
        a.push(format!("CONTAINERS_STORAGE_CONF={}", p("storage.conf")));
        a.push("podman".into());
        for (flag, d) in [
            ("--root", "root"),
            ("--runroot", "runroot"),
            ("--tmpdir", "tmp"),
        ] {
            a.push(flag.into());
            a.push(p(d));
        }
        a.extend(["--storage-driver".into(), "vfs".into()]);
        a.extend(args.iter().map(|s| s.to_string()));
        run(
            "nsenter",
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            &[],
            120,
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.podman(args);
        assert!(o.status.success(), "podman {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// Write the network config `name.conflist` for the plugin.
    fn conflist(&self, name: &str, subnet: &str, socket: &Path) {
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [{
                "type": "switchyard",
                "network": name,
                "subnet": subnet,
                "socket": socket,
                "capabilities": {"portMappings": true}
            }]
        });
        let path = self.dir.join(format!("cni-conf/{name}.conflist"));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(conflist.to_string().as_bytes())
            .unwrap();
        if self.rootless {
            chown_tree(&path, USER);
        }
    }

    /// Import the busybox image as `localhost/sy-busybox`.
    fn import_busybox(&self, scratch: &Path) {
        let tar = busybox_tarball(scratch);
        if self.rootless {
            chown_tree(&tar, USER);
        }
        self.ok(&["import", tar.to_str().unwrap(), "localhost/sy-busybox"]);
    }
}

/// `chown -R USER:USER path`.
fn chown_tree(path: &Path, user: &str) {
    let o = run(
        "chown",
        &["-R", &format!("{user}:{user}"), path.to_str().unwrap()],
        &[],
        60,
    );
    assert!(o.status.success(), "chown: {}", text(&o));
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-a", "-f", "-t", "0"]);
        let _ = self.podman(&["rmi", "-a", "-f"]);
        if self.rootless {
            // The process that holds rootless Podman's user and mount namespaces.
            // (Podman keeps its pid in its --tmpdir.)
            let pid = std::fs::read_to_string(self.dir.join("tmp/pause.pid"));
            if let Some(pid) = pid.ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        umount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn podman_missing(extra: &[&str]) -> bool {
    let mut need = vec![
        "podman", "runc", "conmon", "nsenter", "timeout", "tar", BUSYBOX,
    ];
    need.extend_from_slice(extra);
    if let Some(m) = missing(&need) {
        println!(
            "skipped: not installed: {m} (apt-get install podman runc slirp4netns busybox-static)"
        );
        return true;
    }
    false
}

/// The endpoint of a Podman container (`cni-` and the first 12 characters of its id).
fn cni_endpoint(pm: &Podman, container: &str) -> String {
    let id = pm.ok(&["inspect", "-f", "{{.Id}}", container]);
    format!("cni-{}", &id[..12])
}

/// Two containers on a switchyard network reach each other (the server sees the client's
/// address) and the outside through NAT (the outside sees `uplink_ip`); the client is `--rm`.
fn two_containers_talk(pm: &Podman, env: &Env, net: &str, uplink_ip: &str) -> String {
    let eps = endpoints(env, net);
    assert_eq!(eps.len(), 1, "the CNI ADD made an endpoint: {eps:?}");
    let web = eps[0]["ip"].as_str().unwrap().to_string();
    let gw = env.json(&["network", "inspect", net])["gateway"]
        .as_str()
        .unwrap()
        .to_string();
    let out = pm.ok(&[
        "run",
        "--rm",
        "--network",
        net,
        "localhost/sy-busybox",
        "sh",
        "-c",
        &format!(
            "ping -c 1 -W 3 {gw} >/dev/null && ping -c 1 -W 3 {web} >/dev/null && \
             timeout 5 wget -qO- http://{web}/cgi-bin/peer && \
             timeout 5 wget -qO- http://192.0.2.1:8000/cgi-bin/peer && ip -4 -o addr show eth0"
        ),
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let peer = lines[0];
    assert!(
        peer != web && lines[2].contains(&format!(" {peer}/")),
        "the server saw the client's address: {out}"
    );
    assert_eq!(
        lines[1], uplink_ip,
        "the outside sees the uplink address: {out}"
    );
    // The --rm container's DEL released its endpoint.
    assert_eq!(
        until(10, || (endpoints(env, net).len() == 1).then_some(())),
        Some(()),
        "DEL on --rm"
    );
    web
}

/// `podman run -d --network NET --name NAME [-p PUBLISH] busybox httpd` (serving `/www`).
fn run_web(pm: &Podman, net: &str, name: &str, publish: Option<&str>) -> Output {
    let mut a = vec!["run", "-d", "--network", net, "--name", name];
    if let Some(p) = publish {
        a.extend_from_slice(&["-p", p]);
    }
    a.push("localhost/sy-busybox");
    a.extend_from_slice(&HTTPD);
    pm.podman(&a)
}

/// From the outside namespace, `url` (a published port's peer CGI) answers with the outside's
/// own address: the container saw the client's address.
fn keeps_client_address(env: &Env, ext: &Container, url: &str) {
    assert_eq!(
        until(10, || wget_from(&ext.path, url)).as_deref(),
        Some("192.0.2.1"),
        "{url} from the outside\n{}",
        env.log()
    );
}

/// `podman rm` runs DEL: the network has no endpoint left and `url` no longer answers.
fn removal_releases(
    pm: &Podman,
    env: &Env,
    net: &str,
    container: &str,
    ext: &Container,
    url: &str,
) {
    pm.ok(&["rm", "-f", "-t", "0", container]);
    assert_eq!(
        until(10, || endpoints(env, net).is_empty().then_some(())),
        Some(()),
        "DEL on removal: {:?}",
        endpoints(env, net)
    );
    assert_eq!(wget_from(&ext.path, url), None, "the port is released");
}

/// Rootful Podman in the daemon's namespace, the daemon with a raw uplink: `-p` works although
/// conmon holds the host port in that namespace (the raw uplink takes published ports off the
/// wire), and the container sees the client's address.
#[test]
fn podman_with_switchyard_cni() {
    if !root() || podman_missing(&[]) {
        return;
    }
    let t0 = Instant::now();
    let mut env = Env::prepare(&UPLINK_ARGS);
    let ext = env.outside();
    env.start_daemon();
    let _httpd = Httpd::start(&ext.path, &env.dir, "192.0.2.1:8000");
    let pm = Podman::new(env.dir.join("p"), &env.host, false);
    pm.conflist("sy2", "10.91.0.0/24", &env.socket);
    pm.import_busybox(&env.dir);

    let o = run_web(&pm, "sy2", "web2", Some("8080:80"));
    assert!(o.status.success(), "{}", text(&o));
    let web = two_containers_talk(&pm, &env, "sy2", "192.0.2.10");
    assert!(web.starts_with("10.91.0."), "{web}");
    let ep = cni_endpoint(&pm, "web2");
    let ports = env.json(&["port", "sy2", &ep]);
    assert_eq!(ports[0]["host_port"], 8080, "{ports}");
    let url = "http://192.0.2.10:8080/cgi-bin/peer";
    keeps_client_address(&env, &ext, url);

    // podman stop releases the endpoint and its port (DEL); podman start restores them (ADD).
    pm.ok(&["stop", "-t", "0", "web2"]);
    assert_eq!(
        until(10, || endpoints(&env, "sy2").is_empty().then_some(())),
        Some(()),
        "DEL on stop"
    );
    assert_eq!(wget_from(&ext.path, url), None, "stop releases the port");
    pm.ok(&["start", "web2"]);
    keeps_client_address(&env, &ext, url);
    // A daemon restart keeps the CNI-made network, endpoint and port.
    let eps = endpoints(&env, "sy2");
    env.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    env.start_daemon();
    assert_eq!(endpoints(&env, "sy2"), eps, "restored\n{}", env.log());
    keeps_client_address(&env, &ext, url);
    removal_releases(&pm, &env, "sy2", "web2", &ext, url);
    assert_eq!(stray_links(&env), Vec::<String>::new(), "no interface left");
    println!("podman end to end: {:.1}s", t0.elapsed().as_secs_f64());
}

/// Rootful Podman in the daemon's namespace, the daemon with the socket uplink: conmon's
/// reservation of a `-p` host port and the uplink's listener for it would collide. The ADD fails
/// with a CNI error that says so and what to do, and leaves nothing behind; without `-p` the
/// container runs.
#[test]
fn podman_port_held_by_conmon_and_socket_uplink_is_a_clear_error() {
    if !root() || podman_missing(&[]) {
        return;
    }
    let env = Env::new(&[]);
    let pm = Podman::new(env.dir.join("p"), &env.host, false);
    pm.conflist("sy5", "10.95.0.0/24", &env.socket);
    pm.import_busybox(&env.dir);
    let o = run_web(&pm, "sy5", "web5", Some("8085:80"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        err.contains("8085:80/tcp")
            && err.contains("conmon")
            && err.contains("--uplink")
            && err.contains("switchyard publish sy5")
            && !err.contains("address already in use"),
        "{err}"
    );
    assert!(endpoints(&env, "sy5").is_empty(), "nothing left behind");
    pm.ok(&["rm", "-f", "-t", "0", "web5"]);
    let o = run_web(&pm, "sy5", "web5", None);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(endpoints(&env, "sy5").len(), 1);
}

/// The switchyard daemon as the unprivileged user in namespace `netns`; stopped on drop.
struct UserDaemon {
    child: Child,
}

impl UserDaemon {
    fn start(env: &Env) -> UserDaemon {
        UserDaemon {
            child: UserDaemon::spawn(env),
        }
    }

    /// The daemon process, once its socket accepts.
    fn spawn(env: &Env) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env.dir.join("daemon.log"))
            .unwrap();
        let state = env.dir.join("user-state");
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", env.host.display()))
            .args(AS_USER)
            .args(["env", "-i", common::BIN, "daemon", "--log-level", "debug"])
            .arg("--socket")
            .arg(&env.socket)
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        let ready = until(20, || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("daemon exited: {st}\n{}", env.log());
            }
            std::os::unix::net::UnixStream::connect(&env.socket).ok()
        });
        assert!(ready.is_some(), "daemon did not start\n{}", env.log());
        child
    }
}

impl UserDaemon {
    /// SIGTERM and wait (then SIGKILL); nothing when it has ended.
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if until(10, || self.child.try_wait().ok().flatten()).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for UserDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Rootless Podman (uid 65534) with a rootless daemon (the same uid, socket uplink) in the test's
/// "host" namespace, joined to an outside namespace by a veth. Podman runs the plugin in its
/// rootless network and mount namespaces, where CNI_NETNS is a path the daemon cannot open: the
/// plugin passes the namespace as an fd. `-p` is rootlessport's (the plugin leaves it alone; the
/// container sees a forwarder's address); `switchyard publish` on the endpoint keeps the
/// client's address.
#[test]
fn rootless_podman_with_switchyard_cni() {
    if !root() || podman_missing(&["slirp4netns", "setpriv"]) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // /dev/net/tun as distributions ship it (the rootless tests set it the same way).
    let tun = Path::new("/dev/net/tun");
    if std::fs::metadata(tun).is_ok_and(|m| m.permissions().mode() & 0o666 != 0o666) {
        std::fs::set_permissions(tun, std::fs::Permissions::from_mode(0o20666)).unwrap();
    }
    let t0 = Instant::now();
    let mut env = Env::prepare(&[]);
    let ext = env.outside();
    // The socket uplink uses the host's own sockets: the host has 192.0.2.10 on up0.
    let host = switchyard_control::netns::NetNs::open(&env.host).unwrap();
    switchyard_control::netns::run_in(&host, || {
        let mut nl = switchyard_control::netlink::Netlink::open().unwrap();
        let i = nl.link_index("up0").unwrap().unwrap();
        nl.add_address(i, std::net::Ipv4Addr::new(192, 0, 2, 10), 24)
            .unwrap();
    })
    .unwrap();
    std::fs::set_permissions(&env.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut daemon = UserDaemon::start(&env);
    let _httpd = Httpd::start(&ext.path, &env.dir, "192.0.2.1:8000");
    let pm = Podman::new(env.dir.join("p"), &env.host, true);
    pm.conflist("sy3", "10.92.0.0/24", &env.socket);
    pm.import_busybox(&env.dir.join("img"));

    let o = run_web(&pm, "sy3", "web3", Some("8082:80"));
    assert!(o.status.success(), "{}", text(&o));
    let eps = endpoints(&env, "sy3");
    assert!(
        eps[0]["netns"]
            .as_str()
            .is_some_and(|n| n.starts_with(pm.dir.join("run").to_str().unwrap())),
        "the namespace is rootless Podman's: {eps:?}"
    );
    let web = two_containers_talk(&pm, &env, "sy3", "192.0.2.10");
    assert!(web.starts_with("10.92.0."), "{web}");
    // A daemon restart finds the namespace again through the container's process.
    daemon.stop();
    daemon.child = UserDaemon::spawn(&env);
    assert_eq!(
        endpoints(&env, "sy3"),
        eps,
        "restored as it was\n{}",
        env.log()
    );
    assert_eq!(two_containers_talk(&pm, &env, "sy3", "192.0.2.10"), web);

    // -p through rootlessport reaches the container.
    let page = until(10, || wget_from(&ext.path, "http://192.0.2.10:8082/"));
    assert_eq!(
        page.as_deref(),
        Some("hello from switchyard"),
        "{}",
        env.log()
    );
    // switchyard's own forward keeps the client's address.
    let ep = cni_endpoint(&pm, "web3");
    env.ok(&["publish", "sy3", &ep, "8083:80"]);
    let url = "http://192.0.2.10:8083/cgi-bin/peer";
    keeps_client_address(&env, &ext, url);
    removal_releases(&pm, &env, "sy3", "web3", &ext, url);
    println!(
        "rootless podman end to end: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
