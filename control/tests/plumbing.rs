//! Endpoint plumbing against the real kernel: taps and veths in network namespaces each test makes
//! (the "host" side of a veth too) and removes, even on failure. Root only; skipped otherwise.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use switchyard_control::netlink::Netlink;
use switchyard_control::netns::{run_in, NetNs};
use switchyard_control::plumbing::{
    create_tap_endpoint, create_veth_endpoint, first_free_ifname, remove_veth, EndpointSpec,
    PlumbingError,
};
use switchyard_switch::backend::ethtool;
use switchyard_switch::backend::packet::PacketSocket;

const GW: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x77, 0x01];
const IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0x77, 0x02];

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        println!("skipped: needs root (network namespaces)");
        false
    }
}

/// A named namespace, deleted on drop.
struct TestNs {
    name: String,
    path: PathBuf,
    ns: NetNs,
}

impl TestNs {
    fn new() -> TestNs {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "sy-t-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = NetNs::create_named(&name).expect("create netns");
        match NetNs::open(&path) {
            Ok(ns) => TestNs { name, path, ns },
            Err(e) => {
                let _ = NetNs::delete_named(&name);
                panic!("open {}: {e}", path.display());
            }
        }
    }

    /// Runs `f` with a netlink handle in this namespace.
    fn nl<T: Send>(&self, f: impl FnOnce(&mut Netlink) -> T + Send) -> T {
        run_in(&self.ns, || f(&mut Netlink::open().expect("netlink"))).expect("enter netns")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = NetNs::delete_named(&self.name);
    }
}

fn spec(ifname: &str) -> EndpointSpec {
    EndpointSpec {
        ifname: ifname.into(),
        mac: MAC,
        ip: IP,
        prefix_len: 24,
        gateway: GW,
        mtu: 1400,
    }
}

/// Checks what `connect` promises inside the container: MAC, MTU, up, address, default route, lo up.
fn assert_configured(ns: &TestNs, spec: &EndpointSpec) {
    ns.nl(|nl| {
        let index = nl
            .link_index(&spec.ifname)
            .unwrap()
            .expect("interface exists");
        let link = nl.link(index).unwrap().unwrap();
        assert_eq!(link.mac, Some(spec.mac));
        assert_eq!(link.mtu, Some(spec.mtu));
        assert!(link.up, "{} is up", spec.ifname);
        assert_eq!(
            nl.addresses(index).unwrap(),
            vec![(spec.ip, spec.prefix_len)]
        );
        let routes = nl.routes().unwrap();
        assert!(
            routes.iter().any(|r| r.prefix_len == 0
                && r.gateway == Some(spec.gateway)
                && r.oif == Some(index)),
            "default route via {} in {routes:?}",
            spec.gateway
        );
        let lo = nl.link_index("lo").unwrap().unwrap();
        assert!(nl.link(lo).unwrap().unwrap().up, "lo is up");
    });
}

// ---- frames -------------------------------------------------------------------------------

fn arp(op: u16, src_mac: [u8; 6], src_ip: Ipv4Addr, dst_mac: [u8; 6], dst_ip: Ipv4Addr) -> Vec<u8> {
    let eth_dst = if op == 1 { [0xff; 6] } else { dst_mac };
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&src_ip.octets());
    f.extend_from_slice(&if op == 1 { [0; 6] } else { dst_mac });
    f.extend_from_slice(&dst_ip.octets());
    f
}

/// (op, sender mac, sender ip, target ip) of an ARP frame.
fn parse_arp(f: &[u8]) -> Option<(u16, [u8; 6], Ipv4Addr, Ipv4Addr)> {
    if f.len() < 42 || f[12..14] != [0x08, 0x06] {
        return None;
    }
    let op = u16::from_be_bytes([f[20], f[21]]);
    let sha = f[22..28].try_into().ok()?;
    let spa = Ipv4Addr::new(f[28], f[29], f[30], f[31]);
    let tpa = Ipv4Addr::new(f[38], f[39], f[40], f[41]);
    Some((op, sha, spa, tpa))
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0: none).
fn udp_frame(
    src: ([u8; 6], Ipv4Addr, u16),
    dst: ([u8; 6], Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.1.octets());
    ip.extend_from_slice(&dst.1.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src.2.to_be_bytes());
    f.extend_from_slice(&dst.2.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// (dst port, payload) of an Ethernet/IPv4/UDP frame to `dst`.
fn parse_udp(f: &[u8], dst: Ipv4Addr) -> Option<(u16, Vec<u8>)> {
    if f.len() < 42 || f[12..14] != [0x08, 0x00] || f[23] != 17 || f[30..34] != dst.octets() {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let udp = &f[14 + ihl..];
    let port = u16::from_be_bytes([udp[2], udp[3]]);
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    Some((port, udp.get(8..len)?.to_vec()))
}

/// Reads frames with `read` (non-blocking) until `want` returns something or 5 s pass; every
/// frame seen goes through `on_frame` first (to answer ARP, say).
fn wait_for<T>(
    mut read: impl FnMut(&mut [u8]) -> std::io::Result<usize>,
    mut on_frame: impl FnMut(&[u8]),
    mut want: impl FnMut(&[u8]) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    loop {
        match read(&mut buf) {
            Ok(n) => {
                on_frame(&buf[..n]);
                if let Some(t) = want(&buf[..n]) {
                    return t;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "timed out waiting for a frame");
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

// ---- tests --------------------------------------------------------------------------------

#[test]
fn named_netns_create_and_delete() {
    if !root() {
        return;
    }
    let t = TestNs::new();
    assert!(t.path.exists());
    assert_eq!(t.path, Path::new("/run/netns").join(&t.name));
    let again = NetNs::open(&t.path).unwrap();
    assert_eq!(again.inode().unwrap(), t.ns.inode().unwrap());
    assert_ne!(
        t.ns.inode().unwrap(),
        NetNs::current().unwrap().inode().unwrap()
    );
    // run_in really is inside it, and leaves the caller where it was.
    let inside = run_in(&t.ns, || NetNs::current().unwrap().inode().unwrap()).unwrap();
    assert_eq!(inside, t.ns.inode().unwrap());
    assert_ne!(NetNs::current().unwrap().inode().unwrap(), inside);
    // A fresh namespace has only lo.
    assert_eq!(t.nl(|nl| nl.link_names().unwrap()), vec!["lo".to_string()]);
    // The name is taken while it exists.
    assert_eq!(
        NetNs::create_named(&t.name).unwrap_err().kind(),
        std::io::ErrorKind::AlreadyExists
    );

    NetNs::delete_named(&t.name).unwrap();
    assert!(!t.path.exists());
    assert!(NetNs::open(&t.path).is_err());
    NetNs::delete_named(&t.name).unwrap(); // already gone is fine
                                           // Our handle still holds the namespace itself.
    assert_eq!(t.nl(|nl| nl.link_names().unwrap()), vec!["lo".to_string()]);
}

#[test]
fn tap_endpoint_configured_and_passes_frames() {
    if !root() {
        return;
    }
    let c = TestNs::new();
    let spec = spec("eth0");
    let tap = create_tap_endpoint(&c.ns, &spec).expect("tap endpoint");
    assert_eq!(tap.name(), "eth0");
    assert_configured(&c, &spec);
    // Endpoint taps carry virtio-net headers (offloads on); frames here go with an empty one.
    assert!(tap.vnet_hdr());
    let hdr = [0u8; switchyard_switch::gso::VNET_HDR_LEN];
    let write = |f: &[u8]| tap.write_with_hdr(&hdr, f);
    let read = |b: &mut [u8]| -> std::io::Result<usize> {
        let n = tap.read(b)?;
        b.copy_within(hdr.len()..n, 0);
        Ok(n - hdr.len())
    };
    // Into the fd: an ARP request from the gateway gets the container's reply out of the fd.
    write(&arp(1, GW_MAC, GW, [0; 6], IP)).unwrap();
    let reply = wait_for(
        read,
        |_| {},
        |f| parse_arp(f).filter(|a| a.0 == 2 && a.2 == IP),
    );
    assert_eq!(reply.1, MAC, "ARP reply carries the endpoint's MAC");
    assert_eq!(reply.3, GW);

    // Into the namespace: a UDP datagram written into the fd reaches a socket bound inside.
    let sock = run_in(&c.ns, || UdpSocket::bind((IP, 0))).unwrap().unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let port = sock.local_addr().unwrap().port();
    write(&udp_frame(
        (GW_MAC, GW, 5555),
        (MAC, IP, port),
        b"to the container",
    ))
    .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"to the container");
    assert_eq!(from, (GW, 5555).into());

    // Out of the namespace: a datagram to the outside leaves through the fd (via the gateway).
    let outside = Ipv4Addr::new(192, 0, 2, 9);
    sock.send_to(b"to the world", (outside, 9999)).unwrap();
    let got = wait_for(
        read,
        |f| {
            if let Some((1, _, _, target)) = parse_arp(f) {
                if target == GW {
                    write(&arp(2, GW_MAC, GW, MAC, IP)).unwrap();
                }
            }
        },
        |f| parse_udp(f, outside).map(|u| (f[0..6].to_vec(), u)),
    );
    assert_eq!(got.0, GW_MAC.to_vec(), "sent to the gateway's MAC");
    assert_eq!(got.1, (9999, b"to the world".to_vec()));

    drop(tap);
    assert_eq!(
        c.nl(|nl| nl.link_index("eth0").unwrap()),
        None,
        "closing the fd removes the tap"
    );
}

#[test]
fn busy_ifname_is_a_clear_error_and_leaves_nothing() {
    if !root() {
        return;
    }
    let c = TestNs::new();
    let h = TestNs::new();
    let _tap = create_tap_endpoint(&c.ns, &spec("eth0")).unwrap();
    let other = EndpointSpec {
        ip: Ipv4Addr::new(10, 77, 0, 3),
        mac: [0x02, 0, 0, 0, 0x77, 0x03],
        ..spec("eth0")
    };

    let err = create_tap_endpoint(&c.ns, &other).unwrap_err();
    assert!(
        matches!(err, PlumbingError::IfnameBusy { ref ifname } if ifname == "eth0"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("eth0") && err.to_string().contains("in use"),
        "{err}"
    );

    let err = run_in(&h.ns, || create_veth_endpoint(&c.ns, &other, "vy0"))
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, PlumbingError::IfnameBusy { .. }), "{err:?}");
    assert_eq!(h.nl(|nl| nl.link_names().unwrap()), vec!["lo".to_string()]);

    // The existing endpoint is untouched.
    assert_configured(&c, &spec("eth0"));
    let names = c.nl(|nl| nl.link_names().unwrap());
    assert_eq!(names, vec!["lo".to_string(), "eth0".to_string()]);

    // And a busy host-side name is refused before anything is made.
    h.nl(|nl| nl.create_veth("vy1", "vy1p", None).unwrap());
    let err = run_in(&h.ns, || create_veth_endpoint(&c.ns, &spec("eth1"), "vy1"))
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, PlumbingError::HostIfnameBusy { .. }),
        "{err:?}"
    );
    assert_eq!(c.nl(|nl| nl.link_names().unwrap()).len(), 2);
}

#[test]
fn failed_step_rolls_back() {
    if !root() {
        return;
    }
    let c = TestNs::new();
    let h = TestNs::new();
    // A tap's MTU tops out at 65521: the MTU step fails, and the tap is gone with its fd.
    let bad = EndpointSpec {
        mtu: 65535,
        ..spec("eth0")
    };
    let err = create_tap_endpoint(&c.ns, &bad).unwrap_err();
    assert!(matches!(err, PlumbingError::SetMtu(_)), "{err:?}");
    assert!(err.to_string().contains("set mtu 65535 on eth0"), "{err}");
    assert_eq!(c.nl(|nl| nl.link_names().unwrap()), vec!["lo".to_string()]);

    // The gateway made invalid inside the container (a scope-link prohibit route for it): the route step fails, after the veth
    // was made and configured; both ends go.
    let status = std::process::Command::new("ip")
        .args([
            "-n",
            &c.name,
            "route",
            "add",
            "prohibit",
            "10.77.0.1/32",
            "scope",
            "link",
        ])
        .status()
        .expect("run ip");
    assert!(status.success());
    let err = run_in(&h.ns, || create_veth_endpoint(&c.ns, &spec("eth0"), "vy0"))
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, PlumbingError::DefaultRoute(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("netlink: add default route via 10.77.0.1"),
        "{err}"
    );
    assert_eq!(c.nl(|nl| nl.link_names().unwrap()), vec!["lo".to_string()]);
    assert_eq!(h.nl(|nl| nl.link_names().unwrap()), vec!["lo".to_string()]);
}

#[test]
fn veth_endpoint_configured_and_passes_frames() {
    if !root() {
        return;
    }
    let c = TestNs::new();
    let h = TestNs::new();
    let spec = spec("eth0");
    let ep = run_in(&h.ns, || create_veth_endpoint(&c.ns, &spec, "vy0"))
        .unwrap()
        .expect("veth endpoint");
    assert_eq!(ep.host_ifname, "vy0");
    assert!(
        ep.socket.kernel_ignores_outgoing(),
        "PACKET_IGNORE_OUTGOING on 6.x"
    );

    assert_configured(&c, &spec);
    h.nl(|nl| {
        assert_eq!(nl.link_index("vy0").unwrap(), Some(ep.host_ifindex));
        let link = nl.link(ep.host_ifindex).unwrap().unwrap();
        assert!(link.up);
        assert_eq!(link.mtu, Some(spec.mtu));
        assert_eq!(
            nl.link_index("eth0").unwrap(),
            None,
            "the peer went straight to the container"
        );
    });
    let tx_csum = |ns: &TestNs, ifname: &str| {
        run_in(&ns.ns, || ethtool::tx_checksum(ifname))
            .unwrap()
            .unwrap()
    };
    // Offloads stay on: the socket carries virtio-net headers, so TSO segments and partial
    // checksums cross the switch whole.
    assert!(
        tx_csum(&c, "eth0"),
        "tx checksum offload on in the container"
    );
    assert!(tx_csum(&h, "vy0"), "tx checksum offload on at the host end");
    assert!(ep.socket.is_vnet());

    // What the container sends is read from the socket: a UDP send to an on-link address first
    // asks who has it.
    let on_link = Ipv4Addr::new(10, 77, 0, 50);
    let sock = run_in(&c.ns, || UdpSocket::bind((IP, 0))).unwrap().unwrap();
    sock.connect((on_link, 7)).unwrap();
    sock.send(b"x").unwrap();
    let who_has = wait_for(
        |b| ep.socket.read(b),
        |_| {},
        |f| parse_arp(f).filter(|a| a.0 == 1 && a.3 == on_link),
    );
    assert_eq!((who_has.1, who_has.2), (MAC, IP));

    // What we write arrives: an ARP request gets answered.
    let request = arp(1, GW_MAC, GW, [0; 6], IP);
    ep.socket.write(&request).unwrap();
    let mut own = 0;
    let reply = wait_for(
        |b| ep.socket.read(b),
        |f| own += usize::from(f == request.as_slice()),
        |f| parse_arp(f).filter(|a| a.0 == 2 && a.2 == IP),
    );
    assert_eq!((reply.1, reply.3), (MAC, GW));
    // Drain what else is queued for a moment: none of our own writes.
    let until = Instant::now() + Duration::from_millis(200);
    let mut buf = [0u8; 2048];
    while Instant::now() < until {
        match ep.socket.read(&mut buf) {
            Ok(n) => own += usize::from(&buf[..n] == request.as_slice()),
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
    assert_eq!(own, 0, "our own writes are not read back");

    // Outgoing frames of *other* sockets on the interface (the kernel never loops a packet
    // socket's own frames back to it anyway) are hidden too: by PACKET_IGNORE_OUTGOING, or on old
    // kernels by filtering PACKET_OUTGOING on read. Two sockets, one per way, each writes once.
    let mut fallback = run_in(&h.ns, || PacketSocket::open(ep.host_ifindex))
        .unwrap()
        .unwrap();
    fallback.use_userspace_outgoing_filter().unwrap();
    assert!(!fallback.kernel_ignores_outgoing());
    let request = arp(1, GW_MAC, GW, [0; 6], IP);
    fallback.write(&request).unwrap();
    ep.socket.write(&request).unwrap();
    let (mut own, mut replies) = ([0usize; 2], [0usize; 2]);
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        let mut idle = true;
        for (i, sock) in [&ep.socket, &fallback].into_iter().enumerate() {
            if let Ok(n) = sock.read(&mut buf) {
                idle = false;
                own[i] += usize::from(&buf[..n] == request.as_slice());
                replies[i] +=
                    usize::from(parse_arp(&buf[..n]).is_some_and(|a| a.0 == 2 && a.2 == IP));
            }
        }
        if idle {
            thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(own, [0, 0], "no socket reads frames leaving the interface");
    assert_eq!(replies, [2, 2], "both read both ARP replies");

    // A UDP datagram written into the socket reaches a socket bound in the container.
    let rx = run_in(&c.ns, || UdpSocket::bind((IP, 0))).unwrap().unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let port = rx.local_addr().unwrap().port();
    ep.socket
        .write(&udp_frame((GW_MAC, GW, 4444), (MAC, IP, port), b"via veth"))
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = rx.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"via veth");
    assert_eq!(from, (GW, 4444).into());

    // Unicast to the gateway's MAC (not the host end's) is read too: a datagram to the outside.
    let outside = Ipv4Addr::new(192, 0, 2, 9);
    rx.send_to(b"out via veth", (outside, 9999)).unwrap();
    let got = wait_for(
        |b| ep.socket.read(b),
        |f| {
            if let Some((1, _, _, target)) = parse_arp(f) {
                if target == GW {
                    ep.socket.write(&arp(2, GW_MAC, GW, MAC, IP)).unwrap();
                }
            }
        },
        |f| parse_udp(f, outside).map(|u| (f[0..6].to_vec(), u)),
    );
    assert_eq!(got.0, GW_MAC.to_vec());
    assert_eq!(got.1, (9999, b"out via veth".to_vec()));

    // The host end is inert: ARP off, no IPv6 address.
    let out = std::process::Command::new("ip")
        .args(["-n", &h.name, "-o", "addr", "show", "dev", "vy0"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "no address on the host end"
    );
    let out = std::process::Command::new("ip")
        .args(["-n", &h.name, "-o", "link", "show", "dev", "vy0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOARP"));

    // Removing the host end removes both; removing again is fine.
    run_in(&h.ns, || remove_veth("vy0")).unwrap().unwrap();
    assert_eq!(h.nl(|nl| nl.link_index("vy0").unwrap()), None);
    assert_eq!(c.nl(|nl| nl.link_index("eth0").unwrap()), None);
    run_in(&h.ns, || remove_veth("vy0")).unwrap().unwrap();
}

#[test]
fn first_free_ifname_skips_taken_names() {
    if !root() {
        return;
    }
    let c = TestNs::new();
    assert_eq!(first_free_ifname(&c.ns, "eth").unwrap(), "eth0");
    let _eth0 = create_tap_endpoint(&c.ns, &spec("eth0")).unwrap();
    assert_eq!(first_free_ifname(&c.ns, "eth").unwrap(), "eth1");
    // A second network on the same container gets eth1.
    let second = EndpointSpec {
        ifname: first_free_ifname(&c.ns, "eth").unwrap(),
        ip: Ipv4Addr::new(10, 88, 0, 2),
        gateway: Ipv4Addr::new(10, 88, 0, 1),
        mac: [0x02, 0, 0, 0, 0x88, 0x02],
        ..spec("")
    };
    let h = TestNs::new();
    let ep = run_in(&h.ns, || create_veth_endpoint(&c.ns, &second, "vy0"))
        .unwrap()
        .expect("second endpoint");
    assert_eq!(first_free_ifname(&c.ns, "eth").unwrap(), "eth2");
    // eth1 is configured; the default route stays eth0's, as with Docker.
    c.nl(|nl| {
        let eth1 = nl.link_index("eth1").unwrap().unwrap();
        assert_eq!(nl.addresses(eth1).unwrap(), vec![(second.ip, 24)]);
        let defaults: Vec<_> = nl
            .routes()
            .unwrap()
            .into_iter()
            .filter(|r| r.prefix_len == 0)
            .collect();
        assert_eq!(defaults.len(), 1, "{defaults:?}");
        assert_eq!(defaults[0].gateway, Some(GW));
    });
    drop(ep);
    run_in(&h.ns, || remove_veth("vy0")).unwrap().unwrap();
    assert_eq!(first_free_ifname(&c.ns, "eth").unwrap(), "eth1");
}

#[test]
fn tap_with_vnet_header_takes_offloads() {
    if !root() {
        return;
    }
    use switchyard_switch::backend::tap::{offload, Tap, VNET_HDR_LEN};
    let c = TestNs::new();
    let tap = run_in(&c.ns, || Tap::create("tap%d", true))
        .unwrap()
        .unwrap();
    assert_eq!(tap.name(), "tap0", "the kernel fills in %d");
    assert!(tap.vnet_hdr());
    tap.set_vnet_hdr_size(VNET_HDR_LEN as i32).unwrap();
    tap.set_offload(offload::CSUM | offload::TSO4 | offload::TSO6)
        .unwrap();
    // The tap's tx checksum/TSO features follow what the reader said it takes.
    let tso = run_in(&c.ns, || {
        ethtool::get_offload("tap0", ethtool::Offload::Tso).unwrap()
    })
    .unwrap();
    assert!(tso, "TSO on once the reader takes TSO4/TSO6");
    tap.set_offload(0).unwrap();
    assert!(!run_in(&c.ns, || ethtool::tx_checksum("tap0").unwrap()).unwrap());
    // A name already taken by a tap is EBUSY, never a second attachment.
    let err = run_in(&c.ns, || Tap::create("tap0", true))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
}
