//! An AF_PACKET socket on one interface: how the daemon drives the host end of a veth pair (or a
//! raw uplink). Reads see every frame the interface receives; writes leave through it.
//!
//! The socket lives in the network namespace of the thread that opens it, and `ifindex` is looked
//! up there.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{self, sockopt, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType};

/// Socket buffer size we ask for, each way (best effort).
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A non-blocking, close-on-exec `AF_PACKET`/`SOCK_RAW` socket bound to one interface for every
/// protocol (`ETH_P_ALL`), which does not read back the frames it writes.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
    /// `PACKET_IGNORE_OUTGOING` was refused (kernel < 4.20): drop outgoing frames ourselves.
    filter_outgoing: bool,
}

impl PacketSocket {
    /// Opens the socket and binds it to `ifindex`.
    ///
    /// The socket is created with protocol 0, so it receives nothing until `bind` names both the
    /// interface and `ETH_P_ALL`: no frame of another interface slips in between.
    pub fn open(ifindex: u32) -> io::Result<PacketSocket> {
        let fd = socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        set_buffers(&fd);
        let filter_outgoing =
            set_int_opt(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1).is_err();
        bind_ifindex(&fd, ifindex)?;
        Ok(PacketSocket {
            fd,
            ifindex,
            filter_outgoing,
        })
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Reads one received frame; `WouldBlock` when none is queued. Frames this host sent out of
    /// the interface (ours included) are never returned.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.filter_outgoing {
            return Ok(socket::recv(self.fd.as_raw_fd(), buf, MsgFlags::empty())?);
        }
        loop {
            let (n, addr) = socket::recvfrom::<LinkAddr>(self.fd.as_raw_fd(), buf)?;
            if addr.is_some_and(|a| a.pkttype() == libc::PACKET_OUTGOING) {
                continue;
            }
            return Ok(n);
        }
    }

    /// Sends one frame out of the interface; `WouldBlock` when the socket buffer is full.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        Ok(socket::send(self.fd.as_raw_fd(), frame, MsgFlags::empty())?)
    }

    /// Switches to the fallback for kernels without `PACKET_IGNORE_OUTGOING`: the kernel hands us
    /// outgoing frames again and `read` drops them by their `PACKET_OUTGOING` type. For tests.
    #[doc(hidden)]
    pub fn use_userspace_outgoing_filter(&mut self) -> io::Result<()> {
        set_int_opt(&self.fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 0)?;
        self.filter_outgoing = true;
        Ok(())
    }

    /// Whether the kernel filters our outgoing frames (`PACKET_IGNORE_OUTGOING`) or we do.
    pub fn kernel_ignores_outgoing(&self) -> bool {
        !self.filter_outgoing
    }
}

/// Bigger buffers, best effort: the forcing variants need CAP_NET_ADMIN, the plain ones are capped
/// by `net.core.{r,w}mem_max`.
fn set_buffers(fd: &OwnedFd) {
    if socket::setsockopt(fd, sockopt::RcvBufForce, &SOCKET_BUFFER_BYTES).is_err() {
        let _ = socket::setsockopt(fd, sockopt::RcvBuf, &SOCKET_BUFFER_BYTES);
    }
    if socket::setsockopt(fd, sockopt::SndBufForce, &SOCKET_BUFFER_BYTES).is_err() {
        let _ = socket::setsockopt(fd, sockopt::SndBuf, &SOCKET_BUFFER_BYTES);
    }
}

fn set_int_opt(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is an open socket; we pass a pointer to a live c_int and its exact size.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn bind_ifindex(fd: &OwnedFd, ifindex: u32) -> io::Result<()> {
    let ifindex = libc::c_int::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
    // SAFETY: sockaddr_ll is plain old data; all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as libc::c_ushort;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = ifindex;
    // SAFETY: `fd` is an open AF_PACKET socket; `addr` is a live sockaddr_ll and we pass its size.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for PacketSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
