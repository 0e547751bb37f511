//! Engine integration at the protocol level: Docker's remote network driver API and the CNI
//! plugin, fed hand-written payloads shaped like dockerd's and Podman's, including bad ones.
//! Root only; skipped otherwise.

mod common;

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard_control::netlink::Netlink;
use switchyard_control::netns::{run_in, NetNs};
use switchyard_control::probe;

const CNI: &str = env!("CARGO_BIN_EXE_switchyard-cni");

/// One HTTP POST over the plugin socket, as dockerd sends it; returns (status, JSON body).
fn post(sock: &Path, path: &str, body: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: plugin\r\nUser-Agent: Go-http-client/1.1\r\nContent-Type: application/json\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status: u16 = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// What dockerd does with the interface a driver returns from Join: move it into the
/// container, rename it ethN, give it the address, bring it up, route via the gateway.
fn docker_moves(host: &Path, src: &str, c: &Container, ip: Ipv4Addr, gw: Ipv4Addr) {
    let host = NetNs::open(host).unwrap();
    let target = NetNs::open(&c.path).unwrap();
    run_in(&host, || {
        let mut nl = Netlink::open().unwrap();
        let i = nl
            .link_index(src)
            .unwrap()
            .expect("interface from Join exists");
        nl.move_to_netns(i, target.as_fd()).unwrap();
    })
    .unwrap();
    run_in(&c.ns, || {
        let mut nl = Netlink::open().unwrap();
        let i = nl.link_index(src).unwrap().unwrap();
        nl.rename(i, "eth0").unwrap();
        nl.add_address(i, ip, 24).unwrap();
        nl.set_up(i).unwrap();
        nl.set_up(1).unwrap();
        nl.add_default_route(gw, Some(i)).unwrap();
    })
    .unwrap();
}

#[test]
fn docker_driver_protocol() {
    if !root() {
        return;
    }
    let mut env = Env::prepare(&[]);
    let plugin = env.dir.join("plugins/switchyard.sock");
    env = {
        let mut e = env;
        let p = plugin.to_str().unwrap().to_string();
        e.set_extra(&["--docker-plugin-socket", &p]);
        e.start_daemon();
        e
    };
    let (st, v) = post(&plugin, "/Plugin.Activate", "{}");
    assert_eq!((st, v), (200, json!({"Implements": ["NetworkDriver"]})));
    let (_, v) = post(&plugin, "/NetworkDriver.GetCapabilities", "{}");
    assert_eq!(v["Scope"], "local");

    let nid = "5f".repeat(32);
    let eid = "a1".repeat(32);
    let create = json!({
        "NetworkID": nid,
        "Options": {"com.docker.network.enable_ipv6": false, "com.docker.network.generic": {"switchyard.name": "sy"}},
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "10.90.0.0/24", "Gateway": "10.90.0.1/24", "AuxAddresses": null}],
        "IPv6Data": []
    });
    let (st, v) = post(&plugin, "/NetworkDriver.CreateNetwork", &create.to_string());
    assert_eq!((st, &v), (200, &json!({})));
    let n = env.json(&["network", "inspect", "sy"]);
    assert_eq!(
        (n["id"].as_str(), n["subnet"].as_str()),
        (Some(nid.as_str()), Some("10.90.0.0/24"))
    );
    // Errors come back in Err and change nothing.
    for (path, body) in [
        ("/NetworkDriver.CreateEndpoint", "{not json".to_string()),
        ("/NetworkDriver.CreateEndpoint", json!({"NetworkID": "00".repeat(32), "EndpointID": eid, "Interface": {"Address": "10.90.0.2/24"}}).to_string()),
        ("/NetworkDriver.Join", json!({"NetworkID": nid, "EndpointID": "ff".repeat(32), "SandboxKey": "/nope"}).to_string()),
        ("/NetworkDriver.CreateEndpoint", json!({"NetworkID": nid, "EndpointID": eid, "Interface": {"Address": "10.99.0.2/24"}}).to_string()),
    ] {
        let (st, v) = post(&plugin, path, &body);
        assert_eq!(st, 200);
        assert!(v["Err"].as_str().is_some_and(|e| !e.is_empty()), "{path} {body}: {v}");
    }
    assert_eq!(post(&plugin, "/NetworkDriver.Bogus", "{}").0, 404);

    let ce = json!({"NetworkID": nid, "EndpointID": eid, "Interface": {"Address": "10.90.0.2/24", "AddressIPv6": "", "MacAddress": ""},
        "Options": {"com.docker.network.endpoint.exposedports": [{"Proto": 6, "Port": 80}],
                    "com.docker.network.portmap": [{"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080}]}});
    let (_, v) = post(&plugin, "/NetworkDriver.CreateEndpoint", &ce.to_string());
    let mac = v["Interface"]["MacAddress"]
        .as_str()
        .expect("driver picks the MAC")
        .to_string();
    let (_, v) = post(&plugin, "/NetworkDriver.CreateEndpoint", &ce.to_string());
    assert!(v["Err"].is_string(), "twice: {v}");
    let c = env.container("web");
    let join = json!({"NetworkID": nid, "EndpointID": eid, "SandboxKey": c.path, "Options": {}});
    let (_, v) = post(&plugin, "/NetworkDriver.Join", &join.to_string());
    assert_eq!(v["Gateway"], "10.90.0.1", "{v}");
    assert_eq!(v["InterfaceName"]["DstPrefix"], "eth");
    let src = v["InterfaceName"]["SrcName"].as_str().unwrap().to_string();
    assert!(src.len() <= 15);
    docker_moves(
        &env.host,
        &src,
        &c,
        Ipv4Addr::new(10, 90, 0, 2),
        Ipv4Addr::new(10, 90, 0, 1),
    );
    assert_eq!(
        probe::ping(
            &c.ns,
            Ipv4Addr::new(10, 90, 0, 1),
            2,
            Duration::from_secs(2)
        )
        .unwrap()
        .len(),
        2
    );
    let n = env.json(&["network", "inspect", "sy"]);
    let ep = &n["endpoints"][0];
    assert_eq!(
        (ep["ip"].as_str(), ep["mac"].as_str()),
        (Some("10.90.0.2"), Some(mac.as_str()))
    );
    assert!(env.ok(&["macs", "sy"]).contains(&mac));

    let pec = json!({"NetworkID": nid, "EndpointID": eid, "Options": {"com.docker.network.portmap": [{"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080}]}});
    assert_eq!(
        post(
            &plugin,
            "/NetworkDriver.ProgramExternalConnectivity",
            &pec.to_string()
        )
        .1,
        json!({})
    );
    let name: String = eid.chars().take(12).collect();
    assert!(env
        .ok(&["port", "sy", &name])
        .contains("80/tcp -> 0.0.0.0:8080"));
    let (_, v) = post(
        &plugin,
        "/NetworkDriver.EndpointOperInfo",
        &json!({"NetworkID": nid, "EndpointID": eid}).to_string(),
    );
    assert_eq!(v["Value"]["ip"], "10.90.0.2");

    // docker stop: Revoke, Leave, DeleteEndpoint.
    let r = json!({"NetworkID": nid, "EndpointID": eid}).to_string();
    assert_eq!(
        post(&plugin, "/NetworkDriver.RevokeExternalConnectivity", &r).1,
        json!({})
    );
    assert!(env
        .json(&["port", "sy", &name])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(post(&plugin, "/NetworkDriver.Leave", &r).1, json!({}));
    assert!(env.json(&["network", "inspect", "sy"])["endpoints"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(
        !links(&c.path).contains(&"eth0".to_string()),
        "the tap went with Leave"
    );
    assert_eq!(
        post(&plugin, "/NetworkDriver.DeleteEndpoint", &r).1,
        json!({})
    );
    // The address is free again: a new endpoint may take it.
    let ce2 = json!({"NetworkID": nid, "EndpointID": "b2".repeat(32), "Interface": {"Address": "10.90.0.2/24", "MacAddress": "02:42:0a:5a:00:02"}});
    let (_, v) = post(&plugin, "/NetworkDriver.CreateEndpoint", &ce2.to_string());
    assert_eq!(v, json!({}), "a given MAC is not echoed back");
    assert_eq!(
        post(
            &plugin,
            "/NetworkDriver.DeleteEndpoint",
            &json!({"NetworkID": nid, "EndpointID": "b2".repeat(32)}).to_string()
        )
        .1,
        json!({})
    );
    assert_eq!(
        post(
            &plugin,
            "/NetworkDriver.DeleteNetwork",
            &json!({"NetworkID": nid}).to_string()
        )
        .1,
        json!({})
    );
    assert!(env.err(&["network", "inspect", "sy"]).contains("not found"));
    assert_eq!(
        post(
            &plugin,
            "/NetworkDriver.DeleteNetwork",
            &json!({"NetworkID": nid}).to_string()
        )
        .1,
        json!({}),
        "idempotent"
    );
    env.ok(&["network", "ls"]);
}

fn cni(cmd: &str, conf: &str, envs: &[(&str, &str)]) -> (bool, Value) {
    let mut c = Command::new(CNI);
    c.env_clear()
        .env("CNI_COMMAND", cmd)
        .env("CNI_PATH", "/opt/cni/bin");
    for (k, v) in envs {
        c.env(k, v);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8(o.stdout).unwrap();
    (
        o.status.success(),
        serde_json::from_str(&out).unwrap_or(Value::Null),
    )
}

#[test]
fn cni_plugin_add_check_del() {
    if !root() {
        return;
    }
    let mut env = Env::new(&[]);
    let c = env.container("pod");
    let conf = json!({
        "cniVersion": "1.0.0", "name": "sy2", "type": "switchyard", "network": "sy2",
        "subnet": "10.91.0.0/24", "socket": env.socket,
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [{"hostPort": 8081, "containerPort": 80, "protocol": "tcp"}]}
    })
    .to_string();
    let netns = c.path.to_str().unwrap();
    let id = "0123456789abcdef0123456789abcdef";
    let base = [
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
    ];

    let (ok, v) = cni("VERSION", "", &[]);
    assert!(
        ok && v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0"))
    );
    let (ok, v) = cni("ADD", &conf, &base);
    assert!(ok, "{v}");
    assert_eq!(v["ips"][0]["address"], "10.91.0.2/24");
    assert_eq!(v["ips"][0]["gateway"], "10.91.0.1");
    assert_eq!(v["interfaces"][0]["name"], "eth0");
    assert_eq!(v["interfaces"][0]["sandbox"], netns);
    assert_eq!(v["routes"][0]["dst"], "0.0.0.0/0");
    assert_eq!(
        probe::ping(
            &c.ns,
            Ipv4Addr::new(10, 91, 0, 1),
            1,
            Duration::from_secs(2)
        )
        .unwrap()
        .len(),
        1
    );
    assert!(env
        .ok(&["port", "sy2", "cni-0123456789ab"])
        .contains("80/tcp -> 0.0.0.0:8081"));
    let (ok, v) = cni("ADD", &conf, &base);
    assert!(
        !ok && v["code"].as_u64().is_some() && v["msg"].as_str().unwrap().contains("exists"),
        "ADD twice: {v}"
    );
    assert!(cni("CHECK", &conf, &base).0);
    let (ok, _) = cni("DEL", &conf, &base);
    assert!(ok);
    assert!(!links(&c.path).contains(&"eth0".to_string()));
    assert!(cni("DEL", &conf, &base).0, "DEL is idempotent");
    assert!(
        cni(
            "DEL",
            &conf,
            &[("CNI_CONTAINERID", "never-added"), ("CNI_NETNS", netns)]
        )
        .0
    );
    let (ok, v) = cni("CHECK", &conf, &base);
    assert!(!ok && v["code"] == 3, "{v}");
    // Bad input: the spec's codes, nothing changed.
    let (ok, v) = cni("ADD", "{nope", &base);
    assert!(!ok && v["code"] == 6, "{v}");
    let (ok, v) = cni("ADD", &conf, &[("CNI_CONTAINERID", id)]);
    assert!(!ok && v["code"] == 4, "{v}");
    let (ok, v) = cni("ADD", &conf.replace("1.0.0", "9.9.9"), &base);
    assert!(!ok && v["code"] == 1, "{v}");
    let bad_net = json!({"cniVersion": "1.0.0", "name": "x", "type": "switchyard", "network": "absent", "socket": env.socket}).to_string();
    let (ok, v) = cni("ADD", &bad_net, &base);
    assert!(
        !ok && v["msg"].as_str().unwrap().contains("not found"),
        "{v}"
    );
    assert!(env.json(&["network", "inspect", "sy2"])["endpoints"]
        .as_array()
        .unwrap()
        .is_empty());
}

/// `endpoint.connect` with the namespace as an fd (`netns_fd`, what the CNI plugin sends from
/// rootless Podman's mount namespace): checked, attached, left alone by the reaper although
/// its path is nothing here, and after a restart found again through a process in it (not
/// restored when there is none); with a path that names the same namespace here it is an
/// ordinary endpoint. A descriptor no request asked for is dropped.
#[test]
fn netns_passed_as_fd() {
    use switchyard_control::client::Client;
    use switchyard_control::error::ErrorCode;
    if !root() {
        return;
    }
    let mut env = Env::new(&[]);
    let a = env.container("fda");
    let b = env.container("fdb");
    env.ok(&["network", "create", "fdn", "--subnet", "10.96.0.0/24"]);
    let mut c = Client::connect(&env.socket).unwrap();
    let req =
        |netns: &str| json!({"network": "fdn", "netns": netns, "netns_fd": true, "name": "fda"});

    let e = c
        .call_value("endpoint.connect", req("/elsewhere/fda"))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest, "no fd sent: {e}");
    let user = std::fs::File::open("/proc/self/ns/user").unwrap();
    let e = c
        .call_with_fd::<Value>("endpoint.connect", req("/elsewhere/fda"), user.as_fd())
        .unwrap_err();
    assert!(e.to_string().contains("not a network namespace"), "{e}");
    // An fd on a request that takes none is dropped, not kept for the next one.
    let v: Value = c.call_with_fd("version", json!({}), a.ns.as_fd()).unwrap();
    assert_eq!(v["protocol"], 1);
    let e = c
        .call_value("endpoint.connect", req("/elsewhere/fda"))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest, "{e}");
    assert!(env.json(&["network", "inspect", "fdn"])["endpoints"]
        .as_array()
        .unwrap()
        .is_empty());

    // A path the daemon cannot open: the fd is the namespace.
    let ea: Value = c
        .call_with_fd("endpoint.connect", req("/elsewhere/fda"), a.ns.as_fd())
        .unwrap();
    assert_eq!(ea["netns"], "/elsewhere/fda");
    let gw = Ipv4Addr::new(10, 96, 0, 1);
    let ping = |ns: &NetNs| {
        probe::ping(ns, gw, 1, Duration::from_secs(2))
            .unwrap()
            .len()
    };
    assert_eq!(ping(&a.ns), 1);
    // The path of a namespace the daemon can open: an ordinary endpoint.
    let mut rb = req(b.path.to_str().unwrap());
    rb["name"] = json!("fdb");
    let eb: Value = c
        .call_with_fd("endpoint.connect", rb, b.ns.as_fd())
        .unwrap();
    assert_eq!(eb["netns"], b.path.to_str().unwrap());
    assert_eq!(ping(&b.ns), 1);
    // The reaper (every second) cannot look at /elsewhere/fda: the engine's DEL removes it.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        env.json(&["network", "inspect", "fdn"])["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // One more by fd, with a process in its namespace: a restart finds it through that.
    let cns = env.container("fdc");
    let mut sleeper = Command::new(BIN)
        .args([
            "__in-netns",
            cns.path.to_str().unwrap(),
            "--",
            "sleep",
            "600",
        ])
        .spawn()
        .unwrap();
    let mut rc = req("/elsewhere/fdc");
    rc["name"] = json!("fdc");
    let _: Value = c
        .call_with_fd("endpoint.connect", rc, cns.ns.as_fd())
        .unwrap();
    drop(c);

    env.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    env.start_daemon();
    let eps = env.json(&["network", "inspect", "fdn"])["endpoints"].clone();
    let names: Vec<&str> = eps
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(
        names,
        ["fdb", "fdc"],
        "fda (no process in its namespace) is not restored"
    );
    assert!(env.log().contains("no process is left in it"));
    assert_eq!(
        eps[1]["netns"], "/elsewhere/fdc",
        "the path as the client gave it"
    );
    assert_eq!(ping(&b.ns), 1);
    assert_eq!(ping(&cns.ns), 1);
    env.ok(&["disconnect", "fdn", "fdb"]);
}
