//! Network namespaces: open one by path or pid, create and delete named ones the way
//! `ip netns add|delete` does, and run code inside one.
//!
//! The daemon's own threads never change namespace: [`run_in`] does its work on a fresh thread
//! that enters the target namespace first and ends with the work, so a namespace switch can never
//! leak into a thread we do not own.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

/// Where named namespaces live (iproute2's `NETNS_RUN_DIR`).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// An open handle on a network namespace (an nsfs fd). Holding it keeps the namespace alive.
#[derive(Debug)]
pub struct NetNs {
    file: File,
}

impl NetNs {
    /// Opens the namespace bound at `path` (`/run/netns/NAME`, `/proc/PID/ns/net`, ...). A path
    /// that is not a namespace (say a `/run/netns` file whose bind mount is gone) is an error.
    pub fn open(path: impl AsRef<Path>) -> io::Result<NetNs> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| annotate(e, format!("open netns {}", path.display())))?;
        let fs = fstatfs(&file).map_err(io::Error::from)?;
        if fs.filesystem_type() != NSFS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a namespace", path.display()),
            ));
        }
        Ok(NetNs { file })
    }

    /// A namespace handed over as a file descriptor (say over `SCM_RIGHTS` by a process that can
    /// open a path we cannot see): it must be a network namespace.
    pub fn from_fd(fd: OwnedFd) -> io::Result<NetNs> {
        let file = File::from(fd);
        let fs = fstatfs(&file).map_err(io::Error::from)?;
        if fs.filesystem_type() != NSFS_MAGIC
            || ns_ioctl(file.as_fd(), NS_GET_NSTYPE)? != libc::CLONE_NEWNET
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the file descriptor is not a network namespace",
            ));
        }
        Ok(NetNs { file })
    }

    /// The user namespace that owns this network namespace (`NS_GET_USERNS`): the one a
    /// process must be in (with capabilities) to configure it.
    pub fn owning_userns(&self) -> io::Result<File> {
        let fd = ns_ioctl(self.file.as_fd(), NS_GET_USERNS)
            .map_err(|e| annotate(e, "NS_GET_USERNS".into()))?;
        Ok(File::from(owned_from_ioctl(fd)))
    }

    /// The namespace of process `pid`.
    pub fn of_pid(pid: u32) -> io::Result<NetNs> {
        NetNs::open(format!("/proc/{pid}/ns/net"))
    }

    /// The calling thread's namespace.
    pub fn current() -> io::Result<NetNs> {
        NetNs::open("/proc/thread-self/ns/net")
    }

    /// The namespace's inode number: two handles name the same namespace iff their inodes (on the
    /// one nsfs) are equal. Use it to check that a path still holds the namespace we attached to.
    pub fn inode(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.ino())
    }

    /// Creates `/run/netns/NAME` holding a new, empty network namespace, as `ip netns add NAME`.
    /// Fails with `AlreadyExists` when the name is taken.
    pub fn create_named(name: &str) -> io::Result<PathBuf> {
        check_name(name)?;
        prepare_run_dir()?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o000)
            .open(&path)
            .map_err(|e| annotate(e, format!("create {}", path.display())))?;
        let bound = thread::scope(|s| {
            s.spawn(|| -> io::Result<()> {
                unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|e| annotate(e.into(), "unshare(CLONE_NEWNET)".into()))?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    Some("none"),
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| annotate(e.into(), format!("bind mount onto {}", path.display())))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        if let Err(e) = bound {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    }

    /// Removes `/run/netns/NAME` (`ip netns delete NAME`): the namespace itself goes once no
    /// process, fd or interface holds it. A name that is not there is fine.
    pub fn delete_named(name: &str) -> io::Result<()> {
        check_name(name)?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        match umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(annotate(e.into(), format!("umount {}", path.display()))),
        }
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(annotate(e, format!("remove {}", path.display())))
            }
            _ => Ok(()),
        }
    }
}

impl From<NetNs> for OwnedFd {
    fn from(ns: NetNs) -> OwnedFd {
        ns.file.into()
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The network namespace with inode `ino`, reached through a process in it (a scan of /proc,
/// for a namespace known only by its inode, say one that came as an fd before a restart). None
/// when no process we may look at is in it.
pub fn find_by_inode(ino: u64) -> Option<NetNs> {
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .map(|e| e.path().join("ns/net"))
        .filter(|p| fs::metadata(p).is_ok_and(|m| m.ino() == ino))
        .find_map(|p| NetNs::open(p).ok().filter(|n| n.inode().ok() == Some(ino)))
}

/// Runs `f` on a fresh thread that has first entered `ns`, and returns its result. The thread
/// ends with `f`, so no thread of the caller ever changes namespace. Anything `f` opens that is
/// bound to a namespace (sockets, a tap fd, a netlink handle) stays bound to `ns` after it returns.
/// A panic in `f` is resumed in the caller.
pub fn run_in<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    on_fresh_thread(
        || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| annotate(e.into(), "setns(CLONE_NEWNET)".into()))
        },
        f,
    )
}

/// Runs `f` on a fresh thread in a new, anonymous network namespace, which goes away with the
/// thread unless `f` keeps something of it (e.g. `NetNs::current()`).
pub fn run_in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> io::Result<T> {
    on_fresh_thread(
        || {
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| annotate(e.into(), "unshare(CLONE_NEWNET)".into()))
        },
        f,
    )
}

fn on_fresh_thread<T: Send>(
    enter: impl FnOnce() -> io::Result<()> + Send,
    f: impl FnOnce() -> T + Send,
) -> io::Result<T> {
    thread::scope(|s| {
        s.spawn(|| {
            enter()?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Serialises the one-time mount setup of `/run/netns` between our own threads.
static RUN_DIR_SETUP: Mutex<()> = Mutex::new(());

/// What `ip netns add` does first: `/run/netns` exists and is a shared mount (bind-mounted onto
/// itself if it is not a mount point yet), so namespace mounts under it propagate to other mount
/// namespaces and stay visible to everyone.
fn prepare_run_dir() -> io::Result<()> {
    let _guard = RUN_DIR_SETUP.lock().unwrap_or_else(|p| p.into_inner());
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(NETNS_RUN_DIR)
        .map_err(|e| annotate(e, format!("create {NETNS_RUN_DIR}")))?;
    let mut bound = false;
    loop {
        match mount(
            Some(""),
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        ) {
            Ok(()) => return Ok(()),
            // Not a mount point: make it one, once.
            Err(Errno::EINVAL) if !bound => {
                mount(
                    Some(NETNS_RUN_DIR),
                    NETNS_RUN_DIR,
                    Some("none"),
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|e| annotate(e.into(), format!("bind mount {NETNS_RUN_DIR}")))?;
                bound = true;
            }
            Err(e) => {
                return Err(annotate(
                    e.into(),
                    format!("make {NETNS_RUN_DIR} a shared mount"),
                ))
            }
        }
    }
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid netns name {name:?}"),
        ));
    }
    Ok(())
}

/// Prefixes an io::Error with what we were doing; its kind (what callers match on) is kept.
/// `_IO(0xb7, 1)` and `_IO(0xb7, 3)` from linux/nsfs.h.
const NS_GET_USERNS: u32 = 0xb701;
const NS_GET_NSTYPE: u32 = 0xb703;

/// An nsfs ioctl that takes no argument; its non-negative result.
#[allow(unsafe_code)]
fn ns_ioctl(fd: BorrowedFd<'_>, request: u32) -> io::Result<libc::c_int> {
    // SAFETY: NS_GET_USERNS and NS_GET_NSTYPE take no argument and touch no memory of ours; the
    // kernel checks that `fd` (valid for the borrow) is a namespace.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[allow(unsafe_code)]
fn owned_from_ioctl(fd: libc::c_int) -> OwnedFd {
    // SAFETY: NS_GET_USERNS returned a new fd (close-on-exec) that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn annotate(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_from_fds_and_their_owners() {
        let open = |p: &str| OwnedFd::from(File::open(p).unwrap());
        let net = NetNs::from_fd(open("/proc/self/ns/net")).unwrap();
        assert_eq!(
            net.inode().unwrap(),
            NetNs::current().unwrap().inode().unwrap()
        );
        let owner = net.owning_userns().unwrap().metadata().unwrap().ino();
        let mine = fs::metadata("/proc/self/ns/user").unwrap().ino();
        assert_eq!(owner, mine);
        for not_net in [
            "/proc/self/ns/user",
            "/proc/self/ns/mnt",
            "/proc/self/status",
        ] {
            let e = NetNs::from_fd(open(not_net)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{not_net}: {e}");
        }
    }
}
