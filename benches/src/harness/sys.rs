//! Process and namespace plumbing for the harness: a global registry of everything it created
//! (named namespaces, child processes, scratch directories) so that a signal can remove it all,
//! commands run inside a namespace, and small /proc readers.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use switchyard_control::netns::{run_in, NetNs, NETNS_RUN_DIR};

/// Set once a stop signal arrived: long loops check it and give up early.
pub static STOP: AtomicBool = AtomicBool::new(false);

pub fn stopping() -> bool {
    STOP.load(Ordering::Relaxed)
}

#[derive(Default)]
struct Registry {
    namespaces: Vec<String>,
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static REG: Mutex<Registry> = Mutex::new(Registry {
    namespaces: Vec::new(),
    pids: Vec::new(),
    dirs: Vec::new(),
});

fn reg() -> std::sync::MutexGuard<'static, Registry> {
    REG.lock().unwrap_or_else(|p| p.into_inner())
}

/// The prefix of every namespace this process creates: `syb-<pid>-`.
pub fn prefix() -> String {
    format!("syb-{}-", std::process::id())
}

/// Creates the named namespace `/run/netns/NAME` and records it for cleanup.
pub fn create_ns(name: &str) -> Result<PathBuf, String> {
    let path = NetNs::create_named(name).map_err(|e| format!("creating netns {name}: {e}"))?;
    reg().namespaces.push(name.to_string());
    Ok(path)
}

/// Removes a namespace created by [`create_ns`].
pub fn delete_ns(name: &str) {
    let _ = NetNs::delete_named(name);
    reg().namespaces.retain(|n| n != name);
}

pub fn register_dir(dir: &Path) {
    reg().dirs.push(dir.to_path_buf());
}

pub fn remove_dir(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
    reg().dirs.retain(|d| d != dir);
}

/// Lazily unmounts whatever is still mounted under `dir`, deepest first (what dockerd left).
pub fn umount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Spawns `cmd` with its network namespace set to the one at `ns` (the child inherits the
/// namespace of the thread that forks it), and records its pid for cleanup.
pub fn spawn_in(ns: &Path, cmd: &mut Command) -> Result<Child, String> {
    let what = format!("{:?}", cmd.get_program());
    let handle = NetNs::open(ns).map_err(|e| e.to_string())?;
    let child = run_in(&handle, || cmd.spawn())
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("spawning {what}: {e}"))?;
    reg().pids.push(child.id());
    Ok(child)
}

/// Runs `cmd` to completion inside `ns` (None: here), with a time limit; fails on a non-zero
/// exit, with its stderr.
pub fn run_cmd(ns: Option<&Path>, cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    run_cmd_input(ns, cmd, None, limit)
}

/// [`run_cmd`] with `input` written to the command's stdin.
pub fn run_cmd_input(
    ns: Option<&Path>,
    cmd: &mut Command,
    input: Option<&str>,
    limit: Duration,
) -> Result<Output, String> {
    let what = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = match ns {
        Some(ns) => spawn_in(ns, cmd)?,
        None => {
            let c = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
            reg().pids.push(c.id());
            c
        }
    };
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        io::Write::write_all(&mut stdin, text.as_bytes()).map_err(|e| format!("{what}: {e}"))?;
    }
    let out = wait_output(child, limit).map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out)
}

/// Waits for a child (with piped output) at most `limit`, killing it past that.
pub fn wait_output(mut child: Child, limit: Duration) -> Result<Output, String> {
    let pid = child.id();
    // Read the pipes on threads so a chatty child cannot block on a full pipe.
    let so = child.stdout.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = io::Read::read_to_end(&mut s, &mut v);
            v
        })
    });
    let se = child.stderr.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = io::Read::read_to_end(&mut s, &mut v);
            v
        })
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() > deadline || stopping() => {
                let _ = child.kill();
                let st = child.wait().map_err(|e| e.to_string())?;
                unregister_pid(pid);
                let mut err = String::from_utf8_lossy(
                    &se.map(|t| t.join().unwrap_or_default()).unwrap_or_default(),
                )
                .into_owned();
                err.truncate(400);
                return Err(format!("timed out after {limit:?} ({st}) {}", err.trim()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    };
    unregister_pid(pid);
    Ok(Output {
        status,
        stdout: so.map(|t| t.join().unwrap_or_default()).unwrap_or_default(),
        stderr: se.map(|t| t.join().unwrap_or_default()).unwrap_or_default(),
    })
}

pub fn unregister_pid(pid: u32) {
    reg().pids.retain(|p| *p != pid);
}

/// Stops a child: SIGTERM, then SIGKILL after `grace`; reaps it.
pub fn stop_child(child: &mut Child, grace: Duration) {
    let pid = child.id();
    if let Ok(None) = child.try_wait() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
    }
    let _ = child.wait();
    unregister_pid(pid);
}

/// `ip ARGS` (iproute2) in the harness's own namespace; `-n NAME` in ARGS picks a namespace.
pub fn ip(args: &[&str]) -> Result<(), String> {
    run_cmd(None, Command::new("ip").args(args), Duration::from_secs(10)).map(|_| ())
}

/// Writes a sysctl of the namespace at `ns` (`key` like `net/ipv4/ip_forward`). Network sysctls
/// resolve to the namespace of the thread that opens the file.
pub fn sysctl(ns: &Path, key: &str, value: &str) -> Result<(), String> {
    let handle = NetNs::open(ns).map_err(|e| e.to_string())?;
    let path = format!("/proc/sys/{key}");
    run_in(&handle, || fs::write(&path, value))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("sysctl {key}={value}: {e}"))
}

/// Whether the process `pid` (so its namespace) has a TCP socket listening on `port`.
pub fn listening(pid: u32, port: u16) -> bool {
    let want = format!(":{port:04X} ");
    ["tcp", "tcp6"].iter().any(|f| {
        fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .map(|t| {
                t.lines()
                    .skip(1)
                    .any(|l| l.split_whitespace().nth(3) == Some("0A") && l.contains(&want))
            })
            .unwrap_or(false)
    })
}

/// Waits until `pid` listens on TCP `port`, or fails after `limit`.
pub fn wait_listening(child: &mut Child, port: u16, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !listening(child.id(), port) {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("exited before listening on {port}: {st}"));
        }
        if Instant::now() > deadline || stopping() {
            return Err(format!("nothing listening on port {port} after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// CPU seconds (user + system, all threads) that process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Some(ticks as f64 / hz)
}

/// Namespaces under /run/netns whose name starts with `prefix`.
pub fn leftover_namespaces(prefix: &str) -> Vec<String> {
    fs::read_dir(NETNS_RUN_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes everything still registered: children first (so their interfaces go), then the
/// namespaces, then scratch directories.
pub fn cleanup_all() {
    let (pids, names, dirs) = {
        let mut r = reg();
        (
            std::mem::take(&mut r.pids),
            std::mem::take(&mut r.namespaces),
            std::mem::take(&mut r.dirs),
        )
    };
    for p in &pids {
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|p| kill(Pid::from_raw(*p as i32), None).is_ok() && !is_zombie(*p))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in &pids {
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
    }
    for n in names {
        let _ = NetNs::delete_named(&n);
    }
    for d in dirs {
        let _ = fs::remove_dir_all(d);
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 2..].chars().next())
                .is_some_and(|c| c == 'Z')
        })
        .unwrap_or(true)
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and every thread spawned after), and starts
/// a thread that, on one of them, removes everything registered and exits. Call first in main.
pub fn install_signal_cleanup() -> Result<(), String> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block().map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                STOP.store(true, Ordering::SeqCst);
                eprintln!("\nswitchyard-bench: {sig:?}: removing namespaces and stopping");
                cleanup_all();
                std::process::exit(130);
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The kernel release, CPU model and count, for the report.
pub fn machine() -> (String, String, usize) {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let model = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (kernel, model, cpus)
}

/// Whether `prog` is on PATH.
pub fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// First line of `prog ARGS` output (stdout or stderr), for version strings.
pub fn version_of(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            let s = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&s)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// `a.b.c.d` + offset in the last octet.
pub fn host(net: Ipv4Addr, last: u8) -> Ipv4Addr {
    let o = net.octets();
    Ipv4Addr::new(o[0], o[1], o[2], last)
}
