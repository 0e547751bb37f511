//! The control plane end to end: CLI errors, IPAM, network lifecycle, hostile protocol input,
//! parallel clients, persistence across SIGKILL and SIGTERM, access control, `run`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use switchyard_control::probe;

#[test]
fn cli_usage_errors_are_one_line() {
    for args in [
        vec!["connect"],
        vec!["network"],
        vec!["network", "create"],
        vec!["bogus"],
        vec!["connect", "n", "--netns", "x", "--pid", "1"],
        vec!["daemon", "--uplink", "up0"],
    ] {
        let o = Command::new(BIN).args(&args).output().unwrap();
        assert!(!o.status.success(), "{args:?}");
        let e = String::from_utf8(o.stderr).unwrap();
        assert_eq!(e.lines().count(), 1, "{args:?}: {e:?}");
        assert!(e.starts_with("switchyard: error: "), "{e:?}");
    }
    let o = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8(o.stdout).unwrap().trim(),
        format!("switchyard {}", env!("CARGO_PKG_VERSION"))
    );
    let o = Command::new(BIN)
        .args(["--socket", "/nonexistent/sy.sock", "network", "ls"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8(o.stderr).unwrap();
    assert!(
        e.starts_with("switchyard: error: cannot reach the daemon") && e.lines().count() == 1,
        "{e}"
    );
}

#[test]
fn network_lifecycle_and_its_errors() {
    if !root() {
        return;
    }
    let mut env = Env::new(&[]);
    let nets = env.json(&["network", "ls"]);
    let bridge = nets
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "bridge")
        .expect("default network");
    assert_eq!(bridge["subnet"], "172.17.0.0/16");
    assert_eq!(bridge["gateway"], "172.17.0.1");
    // Without --subnet: the next free /16 from 172.18.0.0.
    env.ok(&["network", "create", "auto1"]);
    env.ok(&["network", "create", "auto2"]);
    assert_eq!(
        env.json(&["network", "inspect", "auto1"])["subnet"],
        "172.18.0.0/16"
    );
    assert_eq!(
        env.json(&["network", "inspect", "auto2"])["subnet"],
        "172.19.0.0/16"
    );
    env.ok(&[
        "network",
        "create",
        "mynet",
        "--subnet",
        "10.77.0.0/24",
        "--mtu",
        "9000",
        "--internal",
    ]);
    let n = env.json(&["network", "inspect", "mynet"]);
    assert_eq!(
        (n["mtu"].as_u64(), n["internal"].as_bool()),
        (Some(9000), Some(true))
    );
    assert_eq!(n["id"].as_str().unwrap().len(), 64);
    let before = env.json(&["network", "ls"]);
    for (args, want) in [
        (
            vec!["network", "create", "mynet", "--subnet", "10.78.0.0/24"],
            "already exists",
        ),
        (
            vec!["network", "create", "other", "--subnet", "10.77.0.128/25"],
            "overlaps",
        ),
        (
            vec!["network", "create", "other", "--subnet", "10.0.0.0/8"],
            "overlaps",
        ),
        (
            vec![
                "network",
                "create",
                "other",
                "--subnet",
                "10.79.0.0/24",
                "--gateway",
                "10.80.0.1",
            ],
            "not in subnet",
        ),
        (
            vec!["network", "create", "other", "--subnet", "10.79.0.0/33"],
            "invalid CIDR",
        ),
        (
            vec!["network", "create", "other", "--subnet", "10.79.0.1/24"],
            "host bits",
        ),
        (
            vec!["network", "create", "bad/name"],
            "invalid network name",
        ),
        (vec!["network", "create", "other", "--mtu", "70000"], "MTU"),
        (vec!["network", "inspect", "nope"], "not found"),
        (vec!["network", "rm", "nope"], "not found"),
    ] {
        let e = env.err(&args);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert_eq!(
        env.json(&["network", "ls"]),
        before,
        "errors changed nothing"
    );
    // rm refuses with endpoints, --force disconnects them.
    env.ok(&["network", "create", "busy", "--subnet", "10.90.0.0/24"]);
    let c = env.container("c");
    env.connect("busy", &c, &[]);
    let e = env.err(&["network", "rm", "busy"]);
    assert!(
        e.contains("active endpoints") && e.contains("--force"),
        "{e}"
    );
    env.ok(&["network", "rm", "--force", "busy"]);
    assert!(!links(&c.path).contains(&"eth0".to_string()));
    env.ok(&["network", "rm", "auto1"]);
    assert!(env
        .err(&["network", "inspect", "auto1"])
        .contains("not found"));
}

#[test]
fn ipam_and_endpoint_errors_leave_nothing_behind() {
    if !root() {
        return;
    }
    let mut env = Env::new(&[]);
    env.ok(&["network", "create", "small", "--subnet", "10.88.0.0/29"]);
    let cs: Vec<_> = (0..6).map(|i| env.container(&format!("c{i}"))).collect();
    let e0 = env.connect("small", &cs[0], &[]);
    assert_eq!(ip_of(&e0), Ipv4Addr::new(10, 88, 0, 2));
    let p = |c: &Container| c.path.to_str().unwrap().to_string();
    for (args, want) in [
        (
            vec![
                "connect".to_string(),
                "small".into(),
                "--netns".into(),
                p(&cs[1]),
                "--ip".into(),
                "10.88.1.2".into(),
            ],
            "not in subnet",
        ),
        (
            vec![
                "connect".into(),
                "small".into(),
                "--netns".into(),
                p(&cs[1]),
                "--ip".into(),
                "10.88.0.1".into(),
            ],
            "reserved",
        ),
        (
            vec![
                "connect".into(),
                "small".into(),
                "--netns".into(),
                p(&cs[1]),
                "--ip".into(),
                "10.88.0.7".into(),
            ],
            "reserved",
        ),
        (
            vec![
                "connect".into(),
                "small".into(),
                "--netns".into(),
                p(&cs[1]),
                "--ip".into(),
                "10.88.0.2".into(),
            ],
            "in use",
        ),
        (
            vec![
                "connect".into(),
                "small".into(),
                "--netns".into(),
                p(&cs[1]),
                "--name".into(),
                short(&cs[0].name).into(),
            ],
            "already exists",
        ),
        (
            vec![
                "connect".into(),
                "small".into(),
                "--netns".into(),
                "/run/netns/does-not-exist-sy".into(),
            ],
            "namespace",
        ),
        (
            vec![
                "connect".into(),
                "small".into(),
                "--netns".into(),
                p(&cs[1]),
                "--ifname".into(),
                "lo".into(),
            ],
            "in use",
        ),
        (
            vec![
                "connect".into(),
                "small".into(),
                "--netns".into(),
                p(&cs[1]),
                "--mac".into(),
                "01:00:5e:00:00:01".into(),
            ],
            "unicast",
        ),
        (
            vec![
                "connect".into(),
                "small".into(),
                "--netns".into(),
                p(&cs[1]),
                "-p".into(),
                "80:80:80:80".into(),
            ],
            "invalid port spec",
        ),
        (
            vec![
                "connect".into(),
                "nonet".into(),
                "--netns".into(),
                p(&cs[1]),
            ],
            "not found",
        ),
    ] {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = env.err(&a);
        assert!(e.contains(want), "{args:?}: {e}");
        assert_eq!(
            links(&cs[1].path),
            vec!["lo".to_string()],
            "nothing left after {args:?}"
        );
    }
    // Four more fit (.3-.6), the fifth is refused clearly.
    for c in &cs[1..5] {
        env.connect("small", c, &[]);
    }
    let e = env.err(&["connect", "small", "--netns", cs[5].path.to_str().unwrap()]);
    assert!(e.contains("no free address"), "{e}");
    assert_eq!(links(&cs[5].path), vec!["lo".to_string()]);
    // Released on disconnect.
    env.ok(&["disconnect", "small", short(&cs[2].name)]);
    let e5 = env.connect("small", &cs[5], &[]);
    assert_eq!(ip_of(&e5), Ipv4Addr::new(10, 88, 0, 4));
    // A second network on one container gets eth1.
    env.ok(&["network", "create", "second", "--subnet", "10.89.0.0/24"]);
    let e = env.connect("second", &cs[0], &[]);
    assert_eq!(e["ifname"], "eth1");
}

fn raw_request(sock: &std::path::Path, line: &[u8]) -> Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(line).unwrap();
    let mut r = BufReader::new(s);
    let mut out = String::new();
    r.read_line(&mut out).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("reply {out:?}: {e}"))
}

#[test]
fn hostile_protocol_input_gets_errors_and_the_daemon_lives() {
    if !root() {
        return;
    }
    let env = Env::new(&[]);
    // A stalled client holding a half line does not block anyone.
    let mut stalled = UnixStream::connect(&env.socket).unwrap();
    stalled.write_all(br#"{"v":1,"method":"net"#).unwrap();
    for (line, code) in [
        (&b"not json\n"[..], "bad_request"),
        (br#"{"v":1,"method":"nope"}"#.as_slice(), "bad_request"),
        (br#"{"v":9,"method":"stats"}"#.as_slice(), "bad_request"),
        (
            br#"{"v":1,"method":"network.create","params":{"name":42}}"#.as_slice(),
            "bad_request",
        ),
        (
            br#"{"v":1,"method":"network.create","params":"x"}"#.as_slice(),
            "bad_request",
        ),
        (
            br#"{"v":1,"method":"endpoint.connect","params":{"network":"bridge","pid":-5}}"#
                .as_slice(),
            "invalid_argument",
        ),
        (
            br#"{"v":1,"method":"endpoint.connect","params":{"network":"bridge","pid":999999999}}"#
                .as_slice(),
            "not_found",
        ),
        (&[0xff, 0xfe, 0x00, b'\n'][..], "bad_request"),
    ] {
        let mut l = line.to_vec();
        if !l.ends_with(b"\n") {
            l.push(b'\n');
        }
        let r = raw_request(&env.socket, &l);
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(
            r["error"]["code"],
            code,
            "{}: {r}",
            String::from_utf8_lossy(line)
        );
    }
    // Oversized: an error reply, then the connection closes.
    let mut big = br#"{"v":1,"method":"stats","x":""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 2 << 20));
    big.extend_from_slice(b"\"}\n");
    let mut s = UnixStream::connect(&env.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&big);
    let mut out = String::new();
    BufReader::new(&s).read_line(&mut out).unwrap();
    assert!(out.contains("larger than"), "{out}");
    // Several requests on one connection, answered in order with their ids.
    let mut s = UnixStream::connect(&env.socket).unwrap();
    s.write_all(b"{\"v\":1,\"id\":1,\"method\":\"version\"}\n{\"v\":1,\"id\":2,\"method\":\"network.ls\"}\n").unwrap();
    let mut r = BufReader::new(s);
    for want in [1, 2] {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(
            (v["id"].as_u64(), v["ok"].as_bool()),
            (Some(want), Some(true)),
            "{v}"
        );
    }
    drop(stalled);
    env.ok(&["network", "ls"]);
}

#[test]
fn fifty_parallel_clients_leave_consistent_state() {
    if !root() {
        return;
    }
    let mut env = Env::new(&[]);
    env.ok(&["network", "create", "par", "--subnet", "10.66.0.0/24"]);
    let cs: Vec<_> = (0..50).map(|i| env.container(&format!("p{i}"))).collect();
    let env = &env;
    std::thread::scope(|s| {
        for (i, c) in cs.iter().enumerate() {
            s.spawn(move || {
                let kind = if i % 2 == 0 { "tap" } else { "veth" };
                for _ in 0..2 {
                    env.connect("par", c, &["--type", kind]);
                    env.ok(&["disconnect", "par", short(&c.name)]);
                }
                env.connect("par", c, &["--type", kind]);
            });
        }
    });
    let n = env.json(&["network", "inspect", "par"]);
    let eps = n["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 50);
    let mut ips: Vec<&str> = eps.iter().map(|e| e["ip"].as_str().unwrap()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50, "no address given twice");
    assert_eq!(
        env.json(&["macs", "par"]).as_array().unwrap().len(),
        51,
        "50 endpoints + gateway"
    );
    for c in &cs {
        assert_eq!(links(&c.path), vec!["lo".to_string(), "eth0".to_string()]);
    }
    std::thread::scope(|s| {
        for c in &cs {
            s.spawn(move || env.ok(&["disconnect", "par", short(&c.name)]));
        }
    });
    assert_eq!(env.json(&["macs", "par"]).as_array().unwrap().len(), 1);
    let host_links = links(&env.host);
    assert_eq!(
        host_links,
        vec!["lo".to_string()],
        "no veth left in the daemon's namespace"
    );
    // Every address is free again: the next one is the first.
    let e = env.connect("par", &cs[0], &[]);
    assert_eq!(ip_of(&e), Ipv4Addr::new(10, 66, 0, 2));
}

#[test]
fn state_survives_sigkill_and_sigterm() {
    if !root() {
        return;
    }
    let mut env = Env::new(&[]);
    env.ok(&["network", "create", "keep", "--subnet", "10.55.0.0/24"]);
    let (c1, c2, c3) = (
        env.container("c1"),
        env.container("c2"),
        env.container("c3"),
    );
    let e1 = env.connect("keep", &c1, &[]);
    let e2 = env.connect("keep", &c2, &["--type", "veth", "-p", "8080:80"]);
    env.connect("keep", &c3, &[]);
    assert_eq!(
        probe::ping(&c1.ns, ip_of(&e2), 1, Duration::from_secs(2))
            .unwrap()
            .len(),
        1
    );

    // SIGKILL: nothing is cleaned, the restarted daemon re-attaches; c3's namespace is gone by then.
    env.stop_daemon(Signal::SIGKILL);
    switchyard_control::netns::NetNs::delete_named(&c3.name).unwrap();
    env.start_daemon();
    let n = env.json(&["network", "inspect", "keep"]);
    let names: Vec<&str> = n["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["c1", "c2"], "c3 dropped: {}", env.log());
    assert!(env.log().contains("not restored: its namespace is gone"));
    let r2 = n["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "c2")
        .unwrap();
    assert_eq!(
        (r2["ip"].clone(), r2["mac"].clone()),
        (e2["ip"].clone(), e2["mac"].clone())
    );
    assert_eq!(r2["ports"][0]["host_port"], 8080);
    let deadline = Instant::now() + Duration::from_secs(5);
    while probe::ping(&c1.ns, ip_of(&e2), 1, Duration::from_millis(500)).is_err() {
        assert!(Instant::now() < deadline, "traffic after restart");
    }
    assert_eq!(
        probe::ping(&c2.ns, ip_of(&e1), 2, Duration::from_secs(2))
            .unwrap()
            .len(),
        2
    );

    // SIGTERM: interfaces removed, state kept, restored on the next start.
    let host_if = r2["host_ifname"].as_str().unwrap().to_string();
    assert!(env.stop_daemon(Signal::SIGTERM).success());
    assert_eq!(links(&c1.path), vec!["lo".to_string()]);
    assert_eq!(links(&c2.path), vec!["lo".to_string()]);
    assert!(!links(&env.host).contains(&host_if));
    env.start_daemon();
    assert_eq!(
        env.json(&["network", "inspect", "keep"])["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while probe::ping(&c1.ns, ip_of(&e2), 1, Duration::from_millis(500)).is_err() {
        assert!(Instant::now() < deadline, "traffic after SIGTERM + restart");
    }
}

#[test]
fn corrupt_state_is_kept_aside() {
    if !root() {
        return;
    }
    let mut env = Env::new(&[]);
    env.ok(&["network", "create", "x", "--subnet", "10.44.0.0/24"]);
    env.stop_daemon(Signal::SIGTERM);
    let state = env.dir.join("state/state.json");
    let body = std::fs::read(&state).unwrap();
    std::fs::write(&state, &body[..body.len() / 2]).unwrap();
    env.start_daemon();
    assert!(env.log().contains("state file is corrupt"), "{}", env.log());
    let aside: Vec<_> = std::fs::read_dir(env.dir.join("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        &body[..body.len() / 2]
    );
}

#[test]
fn only_root_and_the_daemon_user_are_served() {
    if !root() {
        return;
    }
    let env = Env::new(&[]);
    // Open up the file modes so only SO_PEERCRED stands in the way.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&env.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&env.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            BIN,
            "--socket",
        ])
        .arg(&env.socket)
        .args(["network", "ls"])
        .output()
        .unwrap();
    let e = String::from_utf8(o.stderr).unwrap();
    assert!(!o.status.success());
    assert!(e.contains("permission denied"), "{e}");
    assert!(
        env.log().contains("refused control client uid 65534"),
        "{}",
        env.log()
    );
    env.ok(&["network", "ls"]);
}

#[test]
fn run_forwards_exit_status_and_disconnects() {
    if !root() {
        return;
    }
    let env = Env::new(&[]);
    env.ok(&["network", "create", "r", "--subnet", "10.33.0.0/24"]);
    let o = Command::new(BIN)
        .arg("--socket")
        .arg(&env.socket)
        .args([
            "run",
            "--network",
            "r",
            "--name",
            "job",
            "--",
            "sh",
            "-c",
            "ip -o -4 addr show eth0; exit 3",
        ])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("10.33.0.2/24"));
    assert!(env.json(&["network", "inspect", "r"])["endpoints"]
        .as_array()
        .unwrap()
        .is_empty());
    // A command killed from outside: the daemon notices its namespace is gone and cleans up.
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(&env.socket)
        .args([
            "run",
            "--network",
            "r",
            "--name",
            "sleeper",
            "--",
            "sleep",
            "100",
        ])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        let n = env.json(&["network", "inspect", "r"]);
        if let Some(p) = n["endpoints"]
            .as_array()
            .unwrap()
            .first()
            .and_then(|e| e["pid"].as_i64())
        {
            break p as i32;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    };
    // Kill the CLI first (SIGKILL: it can't clean up), then the command.
    let _ = child.kill();
    let _ = child.wait();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !env.json(&["network", "inspect", "r"])["endpoints"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "endpoint of a dead command reaped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(env.log().contains("namespace gone"));
    // A command that does not exist: 127, nothing left.
    let o = Command::new(BIN)
        .arg("--socket")
        .arg(&env.socket)
        .args(["run", "--network", "r", "--", "/no/such/cmd"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(127));
}

#[test]
fn a_group_can_be_let_in() {
    if !root() {
        return;
    }
    let env = Env::new(&["--group", "65534"]);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::metadata(&env.socket).unwrap();
    assert_eq!((m.permissions().mode() & 0o777, m.gid()), (0o660, 65534));
    let as_user = |uid: &str, gid: &str| {
        Command::new("setpriv")
            .args([
                "--reuid",
                uid,
                "--regid",
                gid,
                "--clear-groups",
                BIN,
                "--socket",
            ])
            .arg(&env.socket)
            .args(["network", "ls", "--json"])
            .output()
            .unwrap()
    };
    let member = as_user("12345", "65534");
    assert!(
        member.status.success(),
        "{}",
        String::from_utf8_lossy(&member.stderr)
    );
    assert!(String::from_utf8_lossy(&member.stdout).contains("\"bridge\""));
    let other = as_user("23456", "23456");
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).starts_with("switchyard: error: "));
}
