//! `switchyard run`: a command in a fresh network namespace, attached to a network for as long
//! as it lives.
//!
//! The CLI re-executes itself as `__run-child` with SIGUSR1 blocked. The child unshares a network
//! namespace and waits for SIGUSR1; the CLI sees the child's namespace change, asks the daemon to
//! connect the child's pid, then sends SIGUSR1 and the child execs the command (keeping its pid,
//! so the daemon's watch on that pid follows the command itself). Re-executing avoids `fork` in
//! a process that may have threads, and needs no `unsafe` fd passing.
//!
//! Rootless (not root): the child unshares a user namespace together with the network
//! namespace, the parent maps its uid and gid to root inside, and the daemon attaches the tap
//! through its namespace helper (see `userns.rs`).

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use serde_json::json;

use crate::cli::RunArgs;
use crate::client::Client;
use crate::error::{Error, Result};
use crate::netns::NetNs;
use crate::proto::{self, EndpointInfo, EndpointType};

/// Signals `run` passes on to the command instead of acting on them.
fn forwarded() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        s.add(sig);
    }
    s
}

fn go_signal() -> SigSet {
    let mut s = SigSet::empty();
    s.add(Signal::SIGUSR1);
    s
}

pub fn run(socket: PathBuf, a: RunArgs) -> Result<i32> {
    let mut client = Client::connect(&socket)?;
    let exe = std::env::current_exe().map_err(|e| Error::system(format!("own path: {e}")))?;
    let my_ns = NetNs::current()
        .and_then(|n| n.inode())
        .map_err(|e| Error::system(format!("own namespace: {e}")))?;
    let mut mask = forwarded();
    mask.add(Signal::SIGUSR1);
    mask.thread_block()
        .map_err(|e| Error::system(format!("sigprocmask: {e}")))?;
    let mut child = Command::new(exe)
        .arg("__run-child")
        .arg("--")
        .args(&a.cmd)
        .spawn()
        .map_err(|e| Error::system(format!("starting the command: {e}")))?;
    let pid = child.id() as i32;
    // Wait until the child is in its own namespace (or gone).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(Error::system(format!(
                "the command's namespace could not be created ({st})"
            )));
        }
        let ino = NetNs::of_pid(pid as u32).and_then(|n| n.inode());
        if ino.is_ok_and(|i| i != my_ns) {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::system("timed out creating the command's namespace"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if rootless() {
        if let Err(e) = map_ids(pid) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    }
    let kind = a.kind.as_deref().map(|k| {
        if k == "veth" {
            EndpointType::Veth
        } else {
            EndpointType::Tap
        }
    });
    let ep: EndpointInfo = match client.call(
        "endpoint.connect",
        proto::Connect {
            network: a.network.clone(),
            pid: Some(pid),
            name: a.name.clone(),
            publish: a.publish.clone(),
            kind,
            ..Default::default()
        },
    ) {
        Ok(ep) => ep,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    // On a network with DNS the command gets a resolv.conf naming the gateway; the child
    // bind-mounts it in a private mount namespace (see `child`).
    let resolv = resolv_path(pid as u32);
    let _ = std::fs::remove_file(&resolv);
    if let Ok(n) =
        client.call::<proto::NetworkInfo>("network.inspect", json!({ "name": a.network }))
    {
        if n.dns {
            let text = crate::dns::container_resolv_conf(n.gateway, &n.dns_search);
            let w = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&resolv)
                .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
            if let Err(e) = w {
                eprintln!("switchyard: warning: writing {}: {e}", resolv.display());
            }
        }
    }
    std::thread::spawn(move || {
        let sigs = forwarded();
        loop {
            if let Ok(sig) = sigs.wait() {
                let _ = kill(Pid::from_raw(pid), sig);
            }
        }
    });
    let _ = kill(Pid::from_raw(pid), Signal::SIGUSR1);
    let status = child.wait();
    let _ = std::fs::remove_file(&resolv);
    let status = status.map_err(|e| Error::system(format!("waiting for the command: {e}")))?;
    // The daemon also reaps endpoints whose process is gone; whichever comes first wins.
    let _ = client.call_value(
        "endpoint.disconnect",
        json!({ "network": a.network, "name": ep.name }),
    );
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    })
}

fn rootless() -> bool {
    !nix::unistd::geteuid().is_root()
}

/// Rootless: map our uid and gid to root in the child's new user namespace (written from the
/// parent, with setgroups denied as an unprivileged mapping requires).
fn map_ids(pid: i32) -> Result<()> {
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let write = |file: &str, text: String| {
        std::fs::write(format!("/proc/{pid}/{file}"), text)
            .map_err(|e| Error::system(format!("writing /proc/{pid}/{file}: {e}")))
    };
    write("setgroups", "deny".into())?;
    write("uid_map", format!("0 {uid} 1\n"))?;
    write("gid_map", format!("0 {gid} 1\n"))
}

/// The child half: a new network namespace (and, rootless, a user namespace that owns it),
/// then wait for the go, then exec.
pub fn child(cmd: Vec<String>) -> Result<i32> {
    // Die with the CLI while waiting; the command itself outlives it (the daemon reaps it).
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let flags = if rootless() {
        CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET
    } else {
        CloneFlags::CLONE_NEWNET
    };
    nix::sched::unshare(flags).map_err(|e| {
        Error::system(format!(
            "unshare({flags:?}): {e} (rootless mode needs unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0)"
        ))
    })?;
    go_signal()
        .wait()
        .map_err(|e| Error::system(format!("waiting for the daemon: {e}")))?;
    let _ = nix::sys::prctl::set_pdeathsig(None);
    let resolv = resolv_path(std::process::id());
    if resolv.exists() {
        if let Err(e) = mount_resolv(&resolv) {
            eprintln!("switchyard: warning: no resolv.conf for the network's DNS: {e}");
        }
    }
    let mut all = forwarded();
    all.add(Signal::SIGUSR1);
    let _ = all.thread_unblock();
    let err = Command::new(&cmd[0]).args(&cmd[1..]).exec();
    eprintln!("switchyard: error: running {:?}: {err}", cmd[0]);
    Ok(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

/// Where `run` leaves the resolv.conf for the command with pid `pid`.
fn resolv_path(pid: u32) -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("switchyard-run-{pid}.resolv.conf"))
}

/// In a private mount namespace, `file` over /etc/resolv.conf (what `ip netns exec` does with
/// /etc/netns/NAME/resolv.conf).
fn mount_resolv(file: &std::path::Path) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|e| Error::system(format!("unshare(CLONE_NEWNS): {e}")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::system(format!("making / private: {e}")))?;
    mount(
        Some(file),
        "/etc/resolv.conf",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| Error::system(format!("bind mount over /etc/resolv.conf: {e}")))
}
