//! A tap device: the kernel end of a container endpoint whose frames the daemon reads and writes
//! through a file descriptor.
//!
//! The device is created by `TUNSETIFF` on a fresh `/dev/net/tun` fd and lives in the network
//! namespace of the thread that *opened* `/dev/net/tun`, so open it on a thread that has entered the
//! container namespace (see `switchyard_control::netns::run_in`). It is not persistent: closing
//! the fd (dropping the [`Tap`]) removes the interface. While the fd is open it also holds a
//! reference on that namespace, which therefore outlives its last process.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Offload flags for [`Tap::set_offload`] (`TUN_F_*` from `<linux/if_tun.h>`).
pub mod offload {
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
    pub const UFO: u32 = libc::TUN_F_UFO;
}

/// Size of `struct virtio_net_hdr_v1` (with `num_buffers`), the header a vnet-hdr tap prepends.
pub const VNET_HDR_LEN: usize = 12;

/// The ioctls this module issues, each generated once.
mod ioctls {
    nix::ioctl_write_ptr_bad!(tunsetiff, libc::TUNSETIFF, libc::ifreq);
    nix::ioctl_read_bad!(tungetfeatures, libc::TUNGETFEATURES, libc::c_uint);
    nix::ioctl_write_int_bad!(tunsetoffload, libc::TUNSETOFFLOAD);
    nix::ioctl_write_ptr_bad!(tunsetvnethdrsz, libc::TUNSETVNETHDRSZ, libc::c_int);
}

/// An open, non-persistent tap interface (`IFF_TAP | IFF_NO_PI`, optionally `IFF_VNET_HDR`).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    vnet_hdr: bool,
}

impl Tap {
    /// Creates the tap interface `name` in the calling thread's network namespace and returns its
    /// fd, non-blocking and close-on-exec.
    ///
    /// Fails with `EBUSY` when an interface of that name already exists as a tun/tap device (we
    /// never attach to someone else's persistent tap: `IFF_TUN_EXCL`) and `EINVAL` when it exists
    /// as another kind of device. `name` may hold one `%d` for the kernel to fill in; [`Tap::name`]
    /// gives the final name.
    pub fn create(name: &str, vnet_hdr: bool) -> io::Result<Tap> {
        let ifr_name = ifname_to_c(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")?; // std adds O_CLOEXEC
        if vnet_hdr && get_features(&file)? & libc::IFF_VNET_HDR as libc::c_uint == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "tun: the kernel has no IFF_VNET_HDR",
            ));
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_TUN_EXCL;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        let mut ifr = zeroed_ifreq();
        ifr.ifr_name = ifr_name;
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: `file` is an open /dev/net/tun fd and `ifr` a valid, initialised ifreq that
        // outlives the call; TUNSETIFF reads it and writes the final name back into it.
        unsafe { ioctls::tunsetiff(file.as_raw_fd(), &ifr) }.map_err(io::Error::from)?;
        let name = c_ifname_to_string(&ifr.ifr_name);
        Ok(Tap {
            file,
            name,
            vnet_hdr,
        })
    }

    /// A tap another process created and passed to us (see [`super::fdpass`]).
    pub fn from_fd(fd: std::os::fd::OwnedFd, name: String, vnet_hdr: bool) -> Tap {
        Tap {
            file: File::from(fd),
            name,
            vnet_hdr,
        }
    }

    /// The interface name (as the kernel assigned it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether frames carry a virtio-net header in front.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Reads one frame (one per call; a short buffer truncates it). `WouldBlock` when none is
    /// queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame into the interface, as if it had arrived on the wire. `WouldBlock` passes
    /// through.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    /// Writes one frame behind a virtio-net header (taps made with `vnet_hdr`), in one writev.
    pub fn write_with_hdr(&self, hdr: &[u8], frame: &[u8]) -> io::Result<usize> {
        let n = nix::sys::uio::writev(
            &self.file,
            &[io::IoSlice::new(hdr), io::IoSlice::new(frame)],
        )?;
        Ok(n.saturating_sub(hdr.len()))
    }

    /// Sets the offloads the reader can take (`offload::*` flags): frames may then arrive with
    /// partial checksums or as GSO super-frames, described in the vnet header.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: `self.file` is our tap fd; TUNSETOFFLOAD takes its argument by value.
        unsafe { ioctls::tunsetoffload(self.file.as_raw_fd(), flags as libc::c_int) }
            .map(drop)
            .map_err(io::Error::from)
    }

    /// Sets the length of the vnet header (10 or 12); only meaningful with `vnet_hdr`.
    pub fn set_vnet_hdr_size(&self, size: i32) -> io::Result<()> {
        // SAFETY: `self.file` is our tap fd and `size` a live c_int the kernel only reads.
        unsafe { ioctls::tunsetvnethdrsz(self.file.as_raw_fd(), &size) }
            .map(drop)
            .map_err(io::Error::from)
    }
}

fn get_features(file: &File) -> io::Result<libc::c_uint> {
    let mut features: libc::c_uint = 0;
    // SAFETY: `file` is an open /dev/net/tun fd; the kernel writes one c_uint into `features`.
    unsafe { ioctls::tungetfeatures(file.as_raw_fd(), &mut features) }.map_err(io::Error::from)?;
    Ok(features)
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// An all-zero `ifreq` (a valid value: arrays, integers and a null pointer).
pub(crate) fn zeroed_ifreq() -> libc::ifreq {
    // SAFETY: ifreq is plain old data for which all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// Checks an interface name the way the kernel's `dev_valid_name` does and makes it a C array.
pub(crate) fn ifname_to_c(name: &str) -> io::Result<[libc::c_char; libc::IFNAMSIZ]> {
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !bytes
            .iter()
            .any(|&b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if !valid {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, &b) in out.iter_mut().zip(bytes) {
        *o = b as libc::c_char;
    }
    Ok(out)
}

fn c_ifname_to_string(raw: &[libc::c_char; libc::IFNAMSIZ]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_validation() {
        assert!(ifname_to_c("eth0").is_ok());
        assert!(ifname_to_c("tap%d").is_ok());
        assert!(ifname_to_c("123456789012345").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "a:b", "1234567890123456"] {
            assert_eq!(
                ifname_to_c(bad).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
        let c = ifname_to_c("eth0").unwrap();
        assert_eq!(c_ifname_to_string(&c), "eth0");
    }
}
