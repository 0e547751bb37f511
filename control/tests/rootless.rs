//! Rootless mode end to end: the daemon and the containers run under an unprivileged uid
//! (65534, through `setpriv`), each container in a user namespace of its own, and traffic to
//! the outside goes through the socket uplink. The "host" is a network namespace the test makes
//! (the daemon runs there), with 198.18.0.1 on its loopback as the host's own address; the test
//! itself (root) plays the programs inside the containers and on the host by opening sockets in
//! their namespaces.
//!
//! Needs root to set up (namespaces, setpriv) and a /dev/net/tun usable by everyone (mode 0666,
//! as distributions ship it; the test sets it when it is not).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{root, BIN};
use serde_json::Value;
use switchyard_control::netns::{run_in, NetNs};

const USER: &str = "65534";
/// The host's own (non-loopback) address, on the host namespace's `lo`.
const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// /dev/net/tun as distributions ship it, and enough fds for a thousand connections.
fn prepare_machine() {
    let tun = std::path::Path::new("/dev/net/tun");
    if let Ok(m) = std::fs::metadata(tun) {
        if m.permissions().mode() & 0o666 != 0o666 {
            std::fs::set_permissions(tun, std::fs::Permissions::from_mode(0o20666)).unwrap();
        }
    }
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(65536), hard);
}

struct Rootless {
    dir: PathBuf,
    socket: PathBuf,
    host_name: String,
    host: PathBuf,
    daemon: Option<Child>,
    runs: Vec<Child>,
    pids: Vec<i32>,
}

impl Rootless {
    fn new(extra: &[&str]) -> Rootless {
        prepare_machine();
        let tag = unique("sy-rl");
        let dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let host_name = format!("{tag}-h");
        let host = NetNs::create_named(&host_name).unwrap();
        let ns = NetNs::open(&host).unwrap();
        run_in(&ns, || {
            let mut nl = switchyard_control::netlink::Netlink::open().unwrap();
            nl.set_up(1).unwrap();
            nl.add_address(1, HOST_IP, 32).unwrap();
        })
        .unwrap();
        let mut env = Rootless {
            socket: dir.join("control.sock"),
            dir,
            host_name,
            host,
            daemon: None,
            runs: Vec::new(),
            pids: Vec::new(),
        };
        env.start(extra);
        env
    }

    /// `switchyard ARGS` as the unprivileged user, in the host namespace.
    fn user_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(["__in-netns", self.host.to_str().unwrap(), "--", "setpriv"])
            .args(["--reuid", USER, "--regid", USER, "--clear-groups", "--"])
            .arg(BIN)
            .args(args)
            .env_remove("XDG_RUNTIME_DIR");
        c
    }

    fn start(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let sock = self.socket.to_str().unwrap().to_string();
        let state = self.dir.join("state").to_str().unwrap().to_string();
        let mut args = vec![
            "daemon",
            "--socket",
            &sock,
            "--state-dir",
            &state,
            "--log-level",
            "debug",
        ];
        args.extend_from_slice(extra);
        let mut child = self
            .user_cmd(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("daemon exited: {st}\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.daemon = Some(child);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut a = vec!["--socket", self.socket.to_str().unwrap()];
        a.extend_from_slice(args);
        self.user_cmd(&a).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "switchyard {args:?}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// `switchyard run --network NET --name NAME [EXTRA] -- sleep 600`, as the user; returns
    /// the container's pid and address once it is attached.
    fn container(&mut self, net: &str, name: &str, extra: &[&str]) -> (i32, Ipv4Addr) {
        let sock = self.socket.to_str().unwrap().to_string();
        let mut a = vec!["--socket", &sock, "run", "--network", net, "--name", name];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--", "sleep", "600"]);
        let child = self
            .user_cmd(&a)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.runs.push(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.json(&["network", "inspect", net]);
            if let Some(e) = v["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
            {
                let pid = e["pid"].as_i64().unwrap() as i32;
                self.pids.push(pid);
                return (pid, e["ip"].as_str().unwrap().parse().unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "{name} never attached\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn host_ns(&self) -> NetNs {
        NetNs::open(&self.host).unwrap()
    }
}

impl Drop for Rootless {
    fn drop(&mut self) {
        for p in &self.pids {
            kill_pid(*p);
        }
        for c in &mut self.runs {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        if std::thread::panicking() {
            eprintln!("daemon log:\n{}", self.log());
        }
        let _ = NetNs::delete_named(&self.host_name);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kill a container's process (the `sleep` that `run` exec'd).
fn kill_pid(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn in_ns<T: Send>(pid: i32, f: impl FnOnce() -> T + Send) -> T {
    run_in(&NetNs::of_pid(pid as u32).unwrap(), f).unwrap()
}

/// A deterministic byte stream and its FNV-1a hash, to check a transfer end to end.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn rootless_switching_outbound_tcp_udp_and_servers_that_close_or_refuse() {
    if !root() {
        return;
    }
    let mut env = Rootless::new(&[]);
    env.ok(&["network", "create", "dev", "--subnet", "10.93.0.0/24"]);
    let (p1, ip1) = env.container("dev", "c1", &[]);
    let (p2, ip2) = env.container("dev", "c2", &[]);
    assert_ne!(ip1, ip2);

    // Container to container, over the switch.
    let l = in_ns(p2, || TcpListener::bind("0.0.0.0:7000")).unwrap();
    let srv = std::thread::spawn(move || {
        let (mut s, peer) = l.accept().unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        s.write_all(&b).unwrap();
        peer
    });
    let mut c = in_ns(p1, || TcpStream::connect((ip2, 7000))).unwrap();
    c.write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    assert_eq!(srv.join().unwrap().ip(), std::net::IpAddr::V4(ip1));

    // Outbound TCP through host sockets: 50 MB down, 10 MB up, both checked.
    let down = pattern(50 << 20, 7);
    let up_len = 10 << 20;
    let want_up = fnv(&pattern(up_len, 9));
    let l = run_in(&env.host_ns(), || TcpListener::bind((HOST_IP, 8000)))
        .unwrap()
        .unwrap();
    let d2 = down.clone();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            r.read_to_end(&mut got).unwrap();
            got
        });
        s.write_all(&d2).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        fnv(&reader.join().unwrap())
    });
    let mut c = in_ns(p1, || TcpStream::connect((HOST_IP, 8000))).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&pattern(up_len, 9)).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let t0 = Instant::now();
    let mut got = Vec::with_capacity(down.len());
    c.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    println!("50 MB down + 10 MB up in {:?}", t0.elapsed());
    assert_eq!(got.len(), down.len());
    assert_eq!(fnv(&got), fnv(&down), "the download arrived intact");
    assert_eq!(srv.join().unwrap(), want_up, "the upload arrived intact");

    // Outbound UDP request/response; the host sees a host address, not the container's.
    let u = run_in(&env.host_ns(), || UdpSocket::bind((HOST_IP, 5300)))
        .unwrap()
        .unwrap();
    let srv = std::thread::spawn(move || {
        let mut b = [0u8; 64];
        let (n, from) = u.recv_from(&mut b).unwrap();
        u.send_to(&[&b[..n], b"!"].concat(), from).unwrap();
        from
    });
    let cu = in_ns(p1, || UdpSocket::bind("0.0.0.0:0")).unwrap();
    cu.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    cu.send_to(b"question", (HOST_IP, 5300)).unwrap();
    let mut b = [0u8; 64];
    let (n, from) = cu.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"question!");
    assert_eq!(from, SocketAddr::from((HOST_IP, 5300)));
    let seen = srv.join().unwrap();
    assert_ne!(seen.ip(), std::net::IpAddr::V4(ip1));

    // A server that closes at once: EOF inside. A closed port: refused (RST) inside.
    let l = run_in(&env.host_ns(), || TcpListener::bind((HOST_IP, 8001)))
        .unwrap()
        .unwrap();
    let srv = std::thread::spawn(move || drop(l.accept().unwrap()));
    let mut c = in_ns(p1, || TcpStream::connect((HOST_IP, 8001))).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(c.read(&mut b).unwrap(), 0, "the host closed: EOF");
    srv.join().unwrap();
    let e = in_ns(p1, || TcpStream::connect((HOST_IP, 8002))).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    // The host's loopback is not reachable without --host-loopback (10.0.2.2 is just an
    // outside address the host has no route to); nor is the gateway.
    let lo = run_in(&env.host_ns(), || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 8003))
    })
    .unwrap()
    .unwrap();
    lo.set_nonblocking(true).unwrap();
    let e = in_ns(p1, || {
        TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::new(10, 0, 2, 2), 8003)),
            Duration::from_secs(5),
        )
    })
    .unwrap_err();
    assert_ne!(e.kind(), std::io::ErrorKind::TimedOut, "{e}: told at once");
    assert_eq!(
        lo.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "nothing reached the host's loopback"
    );
    let gw = Ipv4Addr::new(10, 93, 0, 1);
    let e = in_ns(p1, || TcpStream::connect((gw, 8000))).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);

    // veth needs root.
    let o = env.cli(&["connect", "dev", "--pid", &p1.to_string(), "--type", "veth"]);
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success() && e.contains("veth needs a root daemon"),
        "{e}"
    );

    // A container that dies is reaped by the daemon (its `run` is killed first, so only the
    // daemon's watch can notice).
    let mut run2 = env.runs.remove(1);
    let _ = run2.kill();
    let _ = run2.wait();
    kill_pid(p2);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = env.json(&["network", "inspect", "dev"]);
        if v["endpoints"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "c2 was not reaped");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(env.log().contains("namespace gone"));
}

#[test]
fn rootless_published_ports_keep_the_client_address() {
    if !root() {
        return;
    }
    let mut env = Rootless::new(&[]);
    env.ok(&["network", "create", "pub", "--subnet", "10.94.0.0/24"]);
    let (p, _ip) = env.container("pub", "web", &["-p", "18080:80", "-p", "15353:53/udp"]);
    let gw = Ipv4Addr::new(10, 94, 0, 1);
    let l = in_ns(p, || TcpListener::bind("0.0.0.0:80")).unwrap();
    let u = in_ns(p, || UdpSocket::bind("0.0.0.0:53")).unwrap();
    let tcp = std::thread::spawn(move || {
        (0..2)
            .map(|_| {
                let (mut s, peer) = l.accept().unwrap();
                s.write_all(peer.to_string().as_bytes()).unwrap();
                peer
            })
            .collect::<Vec<_>>()
    });
    let udp = std::thread::spawn(move || {
        (0..2)
            .map(|_| {
                let mut b = [0u8; 64];
                let (n, from) = u.recv_from(&mut b).unwrap();
                u.send_to(&b[..n], from).unwrap();
                from
            })
            .collect::<Vec<_>>()
    });
    let host = env.host_ns();
    // From the host's own address, then from loopback (which appears as the gateway).
    for (src, want) in [(HOST_IP, HOST_IP), (Ipv4Addr::LOCALHOST, gw)] {
        let (mut s, local) = run_in(&host, || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(&SocketAddr::from((src, 0)).into())?;
            s.connect(&SocketAddr::from((src, 18080)).into())?;
            let s: TcpStream = s.into();
            let local = s.local_addr()?;
            Ok::<_, std::io::Error>((s, local))
        })
        .unwrap()
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut seen = String::new();
        s.read_to_string(&mut seen).unwrap();
        assert_eq!(
            seen,
            SocketAddr::from((want, local.port())).to_string(),
            "tcp from {src}"
        );
        let c = run_in(&host, || UdpSocket::bind((src, 0)))
            .unwrap()
            .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.send_to(b"ping", (src, 15353)).unwrap();
        let mut b = [0u8; 16];
        let (n, from) = c.recv_from(&mut b).unwrap();
        assert_eq!(
            (&b[..n], from),
            (&b"ping"[..], SocketAddr::from((src, 15353)))
        );
    }
    let peers = tcp.join().unwrap();
    assert_eq!(peers[0].ip(), std::net::IpAddr::V4(HOST_IP));
    assert_eq!(peers[1].ip(), std::net::IpAddr::V4(gw));
    let peers = udp.join().unwrap();
    assert_eq!(peers[0].ip(), std::net::IpAddr::V4(HOST_IP));
    assert_eq!(peers[1].ip(), std::net::IpAddr::V4(gw));

    // A port below 1024 cannot be bound by the unprivileged daemon: a clear error now.
    let o = env.cli(&["publish", "pub", "web", "80:80"]);
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success() && e.contains("cannot listen on 0.0.0.0:80/tcp"),
        "{e}"
    );
    // A port someone else holds: the same.
    let _held = run_in(&host, || TcpListener::bind("0.0.0.0:18081"))
        .unwrap()
        .unwrap();
    let o = env.cli(&["publish", "pub", "web", "18081:81"]);
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success() && e.contains("18081"), "{e}");

    // Killing the daemon leaves no listener behind.
    let d = env.daemon.take().unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let mut d = d;
    d.wait().unwrap();
    let e = run_in(&host, || TcpStream::connect((HOST_IP, 18080)))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    let listening = run_in(&host, || std::fs::read_to_string("/proc/net/tcp").unwrap()).unwrap();
    let port = format!(":{:04X} ", 18080);
    assert!(
        !listening
            .lines()
            .any(|l| l.contains(&port) && l.contains(" 0A ")),
        "{listening}"
    );
}

#[test]
fn rootless_a_thousand_concurrent_outbound_connections() {
    if !root() {
        return;
    }
    let mut env = Rootless::new(&[]);
    env.ok(&["network", "create", "many", "--subnet", "10.95.0.0/24"]);
    let (p, _) = env.container("many", "c", &[]);
    const N: usize = 1000;
    let l = run_in(&env.host_ns(), || TcpListener::bind((HOST_IP, 9000)))
        .unwrap()
        .unwrap();
    let srv = std::thread::spawn(move || {
        let mut held = Vec::new();
        for _ in 0..N {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            s.write_all(&b).unwrap();
            held.push(s);
        }
        held
    });
    let conns = in_ns(p, || {
        (0..N)
            .map(|i| {
                let mut s = TcpStream::connect((HOST_IP, 9000))?;
                s.write_all(&(i as u32).to_be_bytes())?;
                Ok(s)
            })
            .collect::<std::io::Result<Vec<TcpStream>>>()
    })
    .unwrap();
    for (i, mut s) in conns.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(u32::from_be_bytes(b), i as u32);
    }
    let held = srv.join().unwrap();
    assert_eq!(held.len(), N);
    let stats = env.json(&["stats"]);
    assert!(
        stats["uplink"]["counters"]["tcp_opened"].as_u64().unwrap() >= N as u64,
        "{stats}"
    );
}

#[test]
fn root_daemon_without_uplink_uses_the_socket_uplink() {
    if !root() {
        return;
    }
    let mut env = common::Env::new(&["--host-loopback", "10.0.2.2"]);
    let host = NetNs::open(&env.host).unwrap();
    run_in(&host, || {
        let mut nl = switchyard_control::netlink::Netlink::open().unwrap();
        nl.set_up(1).unwrap();
        nl.add_address(1, HOST_IP, 32).unwrap();
    })
    .unwrap();
    env.ok(&["network", "create", "n", "--subnet", "10.96.0.0/24"]);
    let c = env.container("c");
    env.connect("n", &c, &[]);
    // The host's own address, and its 127.0.0.1 through --host-loopback.
    let l1 = run_in(&host, || TcpListener::bind((HOST_IP, 8100)))
        .unwrap()
        .unwrap();
    let l2 = run_in(&host, || TcpListener::bind((Ipv4Addr::LOCALHOST, 8101)))
        .unwrap()
        .unwrap();
    for (l, dst) in [(l1, HOST_IP), (l2, Ipv4Addr::new(10, 0, 2, 2))] {
        let port = l.local_addr().unwrap().port();
        let srv = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"hi").unwrap();
        });
        let mut s = run_in(&c.ns, || TcpStream::connect((dst, port)))
            .unwrap()
            .unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hi", "through {dst}");
        srv.join().unwrap();
    }
    let stats = env.json(&["stats"]);
    assert_eq!(stats["uplink"]["mode"], "socket", "{stats}");
}

/// `ping -c 1` from inside a container (the test's root plays the container's program).
fn ping(pid: i32, dst: Ipv4Addr) -> std::process::Output {
    in_ns(pid, || {
        Command::new("ping")
            .args(["-n", "-c", "1", "-W", "3"])
            .arg(dst.to_string())
            .output()
    })
    .unwrap()
}

/// `net.ipv4.ping_group_range` of the daemon's (host) namespace: it is per namespace.
fn set_ping_group_range(env: &Rootless, range: &str) {
    run_in(&env.host_ns(), || {
        std::fs::write("/proc/sys/net/ipv4/ping_group_range", range)
    })
    .unwrap()
    .unwrap();
}

#[test]
fn rootless_ping_through_ping_sockets_or_refused_with_one_log_line() {
    if !root() {
        return;
    }
    let mut env = Rootless::new(&[]);
    env.ok(&["network", "create", "icmp", "--subnet", "10.97.0.0/24"]);
    let (p, _) = env.container("icmp", "c", &[]);
    const WARNING: &str = "ICMP echo from containers is refused";

    // Denied (a new namespace's default is "1 0", nobody): the container is told at once,
    // each time, and the daemon says why once.
    set_ping_group_range(&env, "1 0");
    for _ in 0..2 {
        let o = ping(p, HOST_IP);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(!o.status.success(), "{out}");
        assert!(out.contains("Packet filtered"), "{out}");
    }
    assert_eq!(env.log().matches(WARNING).count(), 1, "{}", env.log());
    let c = &env.json(&["stats"])["uplink"]["counters"];
    assert!(c["ping_refused"].as_u64().unwrap() >= 2, "{c}");

    // Allowed for the daemon's gid: echo requests leave through a ping socket of the
    // unprivileged daemon and the replies come back.
    set_ping_group_range(&env, &format!("{USER} {USER}"));
    let o = ping(p, HOST_IP);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", env.log());
    assert!(out.contains("1 received"), "{out}");
    let c = &env.json(&["stats"])["uplink"]["counters"];
    assert!(c["ping_opened"].as_u64().unwrap() >= 1, "{c}");
    assert_eq!(env.log().matches(WARNING).count(), 1);
}

/// What `ss -tin` says about the container's TCP connection to or from `port`.
fn ss_info(pid: i32, port: u16) -> String {
    let o = in_ns(pid, || {
        Command::new("ss")
            .args(["-tin", "state", "established"])
            .arg(format!("( sport = :{port} or dport = :{port} )"))
            .output()
    })
    .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The number after `key:` in `ss -i` output (`mss:1460`, the first of `wscale:2,7`).
fn ss_field(info: &str, key: &str) -> Option<u32> {
    let at = info.find(&format!(" {key}:"))? + key.len() + 2;
    let digits: String = info[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn rootless_window_and_mss_follow_the_network_mtu_half_close_is_carried_and_host_loopback() {
    if !root() {
        return;
    }
    let mut env = Rootless::new(&["--host-loopback", "10.0.2.2"]);
    env.ok(&[
        "network",
        "create",
        "jumbo",
        "--subnet",
        "10.98.0.0/24",
        "--mtu",
        "9000",
    ]);
    env.ok(&["network", "create", "std", "--subnet", "10.99.0.0/24"]);
    let (pj, _) = env.container("jumbo", "j", &["-p", "18090:90"]);
    let (ps, _) = env.container("std", "s", &["-p", "18091:91"]);
    let host = env.host_ns();

    // Outbound: the MSS smoltcp offers the container is the network's MTU less 40, with
    // window scaling on (a window beyond 64 KiB). Each connection also half-closes: the
    // container shuts its sending side, the host reads to EOF and only then answers.
    for (pid, port, mtu) in [(pj, 8200u16, 9000u32), (ps, 8201, 1500)] {
        let l = run_in(&host, || TcpListener::bind((HOST_IP, port)))
            .unwrap()
            .unwrap();
        let srv = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            s.write_all(format!("got {} bytes", got.len()).as_bytes())
                .unwrap();
        });
        let mut c = in_ns(pid, || TcpStream::connect((HOST_IP, port))).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let info = ss_info(pid, port);
        assert_eq!(ss_field(&info, "mss"), Some(mtu - 40), "{info}");
        assert!(ss_field(&info, "wscale").unwrap_or(0) >= 1, "{info}");
        c.write_all(&pattern(3 << 20, 1)).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, format!("got {} bytes", 3 << 20), "mtu {mtu}");
        srv.join().unwrap();
    }

    // --host-loopback under the unprivileged daemon: 10.0.2.2 is the host's 127.0.0.1, and a
    // half-close goes through that path too.
    let l = run_in(&host, || TcpListener::bind((Ipv4Addr::LOCALHOST, 8202)))
        .unwrap()
        .unwrap();
    let srv = std::thread::spawn(move || {
        let (mut s, peer) = l.accept().unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        s.write_all(format!("{got} from {}", peer.ip()).as_bytes())
            .unwrap();
    });
    let mut c = in_ns(ps, || {
        TcpStream::connect((Ipv4Addr::new(10, 0, 2, 2), 8202))
    })
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"hello host").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "hello host from 127.0.0.1");
    srv.join().unwrap();

    // Inbound through a published port, the same both ways: smoltcp connects to the
    // container with the MSS of the network, and the host client's half-close reaches the
    // container's server, which then answers.
    let l = in_ns(pj, || TcpListener::bind("0.0.0.0:90")).unwrap();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let info = ss_info(pj, 90);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        s.write_all(&got).unwrap();
        info
    });
    let mut c = run_in(&host, || TcpStream::connect((HOST_IP, 18090)))
        .unwrap()
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let sent = pattern(1 << 20, 2);
    c.write_all(&sent).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(fnv(&back), fnv(&sent), "the echo after the half-close");
    let info = srv.join().unwrap();
    assert_eq!(ss_field(&info, "mss"), Some(8960), "{info}");
    assert!(ss_field(&info, "wscale").unwrap_or(0) >= 1, "{info}");

    // At MTU 1500, smoltcp's large segments reach the container's tap as GSO frames: the bytes
    // arrive whole in far fewer packets than 1460-byte segments would take, and the
    // container's own MSS stays the network's.
    let l = in_ns(ps, || TcpListener::bind("0.0.0.0:91")).unwrap();
    let rx_before = rx_packets(ps);
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let info = ss_info(ps, 91);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(&fnv(&got).to_be_bytes()).unwrap();
        (info, got.len())
    });
    let mut c = run_in(&host, || TcpStream::connect((HOST_IP, 18091)))
        .unwrap()
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let sent = pattern(8 << 20, 3);
    c.write_all(&sent).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(
        back,
        fnv(&sent).to_be_bytes(),
        "the bytes the container got"
    );
    let (info, n) = srv.join().unwrap();
    assert_eq!(n, 8 << 20);
    assert_eq!(ss_field(&info, "mss"), Some(1460), "{info}");
    let packets = rx_packets(ps) - rx_before;
    assert!(
        packets * 3 < (8 << 20) / 1460,
        "{packets} packets for 8 MiB: not GSO frames"
    );
}

/// Packets received on the container's eth0 (a GSO frame counts once).
fn rx_packets(pid: i32) -> u64 {
    let dev = in_ns(pid, || std::fs::read_to_string("/proc/thread-self/net/dev")).unwrap();
    let line = dev
        .lines()
        .find(|l| l.trim_start().starts_with("eth0:"))
        .unwrap_or_else(|| panic!("no eth0 in {dev}"));
    let fields: Vec<&str> = line.split(':').nth(1).unwrap().split_whitespace().collect();
    fields[1].parse().unwrap()
}

/// Write `chunk`s without blocking until nothing more is taken for a second; the total.
/// Fails past `limit` bytes (buffers growing without bound).
fn fill(s: &mut TcpStream, limit: usize) -> usize {
    s.set_nonblocking(true).unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    let mut total = 0usize;
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(1) {
        match s.write(&chunk) {
            Ok(n) => {
                total += n;
                last = Instant::now();
                assert!(total < limit, "{total} bytes taken and still not blocked");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    total
}

/// Reads exactly `n` bytes of 0x5a.
fn drain(s: &mut TcpStream, n: usize) {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = 0usize;
    let mut b = vec![0u8; 64 << 10];
    while got < n {
        let k = s.read(&mut b).unwrap();
        assert!(k > 0, "EOF after {got} of {n} bytes");
        assert!(b[..k].iter().all(|&x| x == 0x5a));
        got += k;
    }
}

/// A 4 MB download from the host on another flow, checked.
fn other_flow_works(env: &Rootless, pid: i32, port: u16) {
    let data = pattern(4 << 20, 3);
    let want = fnv(&data);
    let l = run_in(&env.host_ns(), || TcpListener::bind((HOST_IP, port)))
        .unwrap()
        .unwrap();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&data).unwrap();
    });
    let mut c = in_ns(pid, || TcpStream::connect((HOST_IP, port))).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(fnv(&got), want, "the other flow was stalled or corrupted");
    srv.join().unwrap();
}

#[test]
fn rootless_a_slow_receiver_is_held_back_without_stalling_other_flows() {
    if !root() {
        return;
    }
    let mut env = Rootless::new(&[]);
    env.ok(&["network", "create", "bp", "--subnet", "10.100.0.0/24"]);
    let (p, _) = env.container("bp", "c", &["-p", "18095:95"]);
    let host = env.host_ns();
    // What may sit in buffers along the way: the sender's and receiver's kernel socket
    // buffers (a few MB each at most with the default tcp_wmem/tcp_rmem) and the uplink's
    // fixed 1 MiB per direction. Far below this unless something grows without bound.
    const LIMIT: usize = 32 << 20;

    // Container -> a host server that does not read.
    let l = run_in(&host, || TcpListener::bind((HOST_IP, 8300)))
        .unwrap()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let n = rx.recv().unwrap();
        drain(&mut s, n);
        s
    });
    let mut c = in_ns(p, || TcpStream::connect((HOST_IP, 8300))).unwrap();
    let taken = fill(&mut c, LIMIT);
    println!("container -> host: {taken} bytes taken before the sender blocked");
    assert!(taken > 0);
    other_flow_works(&env, p, 8301);
    // The receiver wakes up: everything held back arrives, and the flow goes on.
    tx.send(taken).unwrap();
    let _open = srv.join().unwrap();
    let more = fill(&mut c, LIMIT);
    assert!(more > 0, "the flow did not resume");

    // A host client -> a published port whose container server does not read.
    let l = in_ns(p, || TcpListener::bind("0.0.0.0:95")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let n = rx.recv().unwrap();
        drain(&mut s, n);
    });
    let mut h = run_in(&host, || TcpStream::connect((HOST_IP, 18095)))
        .unwrap()
        .unwrap();
    let taken = fill(&mut h, LIMIT);
    println!("host -> container: {taken} bytes taken before the sender blocked");
    assert!(taken > 0);
    other_flow_works(&env, p, 8302);
    tx.send(taken).unwrap();
    srv.join().unwrap();
}
