//! Rootless endpoints. An unprivileged daemon cannot enter a container's network namespace
//! from a thread: the namespace belongs to the container's user namespace, and a
//! multithreaded process may not join a user namespace. So a short-lived helper process (this
//! binary, re-executed as `__tap-helper`) gets the network namespace as an fd over `SCM_RIGHTS`
//! on a socketpair that is its stdout, joins the user namespace that owns it
//! (`NS_GET_USERNS`) and then the namespace itself, creates and configures the tap there
//! ([`plumbing`]), and passes the tap fd back the same way. The daemon stays in the host
//! namespaces.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use serde::{Deserialize, Serialize};
use switchyard_switch::backend::fdpass;
use switchyard_switch::backend::tap::Tap;

use crate::netns::NetNs;
use crate::plumbing::{self, EndpointSpec};

/// What the daemon asks of the helper.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TapRequest {
    /// Empty: the first free `ethN` in the namespace.
    pub ifname: String,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct TapReply {
    ok: bool,
    #[serde(default)]
    ifname: String,
    #[serde(default)]
    error: String,
    /// The tap was made with IFF_VNET_HDR and offloads.
    #[serde(default)]
    vnet: bool,
}

/// How long the helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(20);

/// Daemon side: run the helper for `req` in the network namespace `ns`; the tap and its
/// interface name.
pub fn create_tap(req: &TapRequest, ns: &NetNs) -> Result<(Tap, String), String> {
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let (mine, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let arg = serde_json::to_string(req).map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("__tap-helper")
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::from(OwnedFd::from(theirs)))
        .spawn()
        .map_err(|e| format!("starting the namespace helper: {e}"))?;
    let _ = mine.set_read_timeout(Some(HELPER_TIMEOUT));
    if let Err(e) = fdpass::send_with_fd(&mine, b"netns", Some(ns.as_fd())) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("passing the namespace to the helper: {e}"));
    }
    let mut buf = vec![0u8; 4096];
    let got = fdpass::recv_with_fd(&mine, &mut buf);
    if got.is_err() {
        let _ = child.kill();
    }
    let status = child.wait();
    let (n, fd) = got.map_err(|e| format!("namespace helper: {e}"))?;
    let reply: TapReply = serde_json::from_slice(&buf[..n]).map_err(|_| {
        format!(
            "the namespace helper ended without an answer ({})",
            status.map(|s| s.to_string()).unwrap_or_default()
        )
    })?;
    if !reply.ok {
        return Err(reply.error);
    }
    let fd = fd.ok_or("the namespace helper sent no tap")?;
    Ok((
        Tap::from_fd(fd, reply.ifname.clone(), reply.vnet),
        reply.ifname,
    ))
}

/// Helper side (`switchyard __tap-helper JSON`): stdout is the socket to answer on.
pub fn helper(arg: &str) -> i32 {
    let out = match io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(_) => return 1,
    };
    let (reply, tap) = match serde_json::from_str::<TapRequest>(arg)
        .map_err(|e| format!("bad request: {e}"))
        .and_then(|r| {
            let mut buf = [0u8; 16];
            let ns = match fdpass::recv_with_fd(&out, &mut buf) {
                Ok((_, Some(fd))) => NetNs::from_fd(fd).map_err(|e| e.to_string())?,
                Ok((_, None)) => return Err("the daemon sent no namespace".to_string()),
                Err(e) => return Err(format!("receiving the namespace: {e}")),
            };
            make_tap(&r, &ns)
        }) {
        Ok((tap, ifname)) => (
            TapReply {
                ok: true,
                ifname,
                error: String::new(),
                vnet: tap.vnet_hdr(),
            },
            Some(tap),
        ),
        Err(error) => (
            TapReply {
                ok: false,
                ifname: String::new(),
                error,
                vnet: false,
            },
            None,
        ),
    };
    let msg = serde_json::to_vec(&reply).unwrap_or_default();
    let sent = fdpass::send_with_fd(&out, &msg, tap.as_ref().map(|t| t.as_fd()));
    i32::from(sent.is_err() || !reply.ok)
}

fn make_tap(r: &TapRequest, net: &NetNs) -> Result<(Tap, String), String> {
    let user = net
        .owning_userns()
        .map_err(|e| format!("the user namespace owning the network namespace: {e}"))?;
    let own = File::open("/proc/self/ns/user").and_then(|f| f.metadata());
    let same = own
        .ok()
        .zip(user.metadata().ok())
        .is_some_and(|(a, b)| a.ino() == b.ino());
    if !same {
        setns(user.as_fd(), CloneFlags::CLONE_NEWUSER)
            .map_err(|e| format!("entering the user namespace that owns the network namespace: {e} (is it another user's?)"))?;
    }
    setns(net.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|e| {
            format!("entering the network namespace: {e} (an unprivileged daemon can enter only namespaces owned by a user namespace of its own user)")
        })?;
    let here = NetNs::current().map_err(|e| e.to_string())?;
    let ifname = if r.ifname.is_empty() {
        plumbing::first_free_ifname(&here, "eth").map_err(|e| e.to_string())?
    } else {
        r.ifname.clone()
    };
    let spec = EndpointSpec {
        ifname: ifname.clone(),
        mac: r.mac,
        ip: r.ip,
        prefix_len: r.prefix_len,
        gateway: r.gateway,
        mtu: r.mtu,
    };
    let tap = plumbing::create_tap_endpoint(&here, &spec).map_err(|e| {
        let s = e.to_string();
        if s.contains("/dev/net/tun") || s.contains("Permission denied") {
            format!(
                "{s} (rootless taps need /dev/net/tun usable by everyone: chmod 0666 /dev/net/tun)"
            )
        } else {
            s
        }
    })?;
    Ok((tap, ifname))
}
