//! An AF_PACKET socket on one interface: how the daemon drives the host end of a veth pair (or a
//! raw uplink). Reads see every frame the interface receives; writes leave through it.
//!
//! The socket lives in the network namespace of the thread that opens it, and `ifindex` is looked
//! up there.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::socket::{self, sockopt, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType};

use super::ring::{self, RxRing, Slot};
use crate::gso::{VnetHdr, VNET_HDR_LEN};

/// Socket buffer size we ask for, each way (best effort).
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A non-blocking, close-on-exec `AF_PACKET`/`SOCK_RAW` socket bound to one interface for every
/// protocol (`ETH_P_ALL`), which does not read back the frames it writes.
#[derive(Debug)]
pub struct PacketSocket {
    /// With `open_vnet`: received frames are read from this ring (`ring.rs`), and only frames
    /// too large for a slot from the socket's queue.
    ring: Option<RxRing>,
    fd: OwnedFd,
    ifindex: u32,
    /// `PACKET_IGNORE_OUTGOING` was refused (kernel < 4.20): drop outgoing frames ourselves.
    filter_outgoing: bool,
    /// `PACKET_VNET_HDR` is on: every frame read or written carries a `virtio_net_hdr`.
    vnet: bool,
    /// Received frames lost: counted by the kernel (ring or buffer full, see `drops`), plus
    /// frames cut by a ring slot whose whole copy the kernel could not queue.
    drops: AtomicU64,
}

impl PacketSocket {
    /// Opens the socket and binds it to `ifindex`.
    ///
    /// The socket is created with protocol 0, so it receives nothing until `bind` names both the
    /// interface and `ETH_P_ALL`: no frame of another interface slips in between.
    pub fn open(ifindex: u32) -> io::Result<PacketSocket> {
        Self::open_with(ifindex, false)
    }

    /// Like `open`, with `PACKET_VNET_HDR`: frames the kernel did not segment or checksum (GRO,
    /// a TSO peer) arrive whole with a header that says how to finish them ([`RxInfo::vnet`]).
    /// Frames are received through a `PACKET_MMAP` ring when the kernel grants one.
    pub fn open_vnet(ifindex: u32) -> io::Result<PacketSocket> {
        Self::open_with(ifindex, true)
    }

    fn open_with(ifindex: u32, vnet: bool) -> io::Result<PacketSocket> {
        let fd = socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        set_buffers(&fd);
        let filter_outgoing =
            set_int_opt(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1).is_err();
        // Per-frame metadata for `read_meta`: checksum state and the VLAN tag the kernel strips.
        set_int_opt(&fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, 1)?;
        let mut ring = None;
        if vnet {
            set_int_opt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
            // The header must be set before the ring, the ring before `bind`. Without a ring
            // (refused, or no memory) frames are read one `recvmsg` each, as before.
            ring = RxRing::new(fd.as_fd(), ring::FRAME_SIZE, ring::FRAME_NR, VNET_HDR_LEN).ok();
        }
        bind_ifindex(&fd, ifindex)?;
        Ok(PacketSocket {
            ring,
            fd,
            ifindex,
            filter_outgoing,
            vnet,
            drops: AtomicU64::new(0),
        })
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Reads one received frame; `WouldBlock` when none is queued. Frames this host sent out of
    /// the interface (ours included) are never returned.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.vnet {
            // The header is taken off; `read_meta` returns it.
            return self.read_meta(buf).map(|(n, _)| n);
        }
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

    /// Reads one received frame with its metadata: whether its L4 checksum is still partial
    /// (checksum offload on the sending side, `TP_STATUS_CSUMNOTREADY`), and with the VLAN tag
    /// the kernel took off put back in place, so tagged frames cross the switch unchanged.
    /// `buf` needs 4 bytes of room beyond the largest frame for that tag.
    pub fn read_meta(&self, buf: &mut [u8]) -> io::Result<(usize, RxInfo)> {
        let Some(ring) = &self.ring else {
            return self.read_queued(buf);
        };
        loop {
            let step = ring
                .next(|slot| self.take_slot(slot, buf))
                .ok_or(io::ErrorKind::WouldBlock)?;
            match step {
                RingStep::Frame(n, info) => return Ok((n, info)),
                RingStep::Skip => {}
                // The kernel queued the whole frame before it released the slot.
                RingStep::Queued => match self.read_queued(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.drops.fetch_add(1, Ordering::Relaxed);
                    }
                    r => return r,
                },
            }
        }
    }

    /// Copies the frame in a ring slot into `buf`, or says where it is.
    fn take_slot(&self, slot: Slot<'_>, buf: &mut [u8]) -> RingStep {
        if self.filter_outgoing && slot.pkttype == libc::PACKET_OUTGOING {
            return RingStep::Skip;
        }
        if slot.status & libc::TP_STATUS_COPY != 0 {
            return RingStep::Queued;
        }
        let cap = buf.len().saturating_sub(4);
        if slot.data.len() < slot.len || slot.len > cap {
            // Cut by the slot with no whole copy (the socket's buffer was full), or too large.
            self.drops.fetch_add(1, Ordering::Relaxed);
            return RingStep::Skip;
        }
        let mut info = RxInfo::default();
        if self.vnet {
            let Some(h) = VnetHdr::parse(slot.before) else {
                return RingStep::Skip;
            };
            info.partial_csum = h.needs_csum();
            info.vnet = Some(h);
        }
        let n = slot.len;
        buf[..n].copy_from_slice(slot.data);
        info.partial_csum |= slot.status & libc::TP_STATUS_CSUMNOTREADY != 0;
        let n = insert_vlan(buf, n, slot.status, slot.vlan_tci, slot.vlan_tpid);
        RingStep::Frame(n, info)
    }

    /// `read_meta` from the socket's queue, one `recvmsg` a frame.
    fn read_queued(&self, buf: &mut [u8]) -> io::Result<(usize, RxInfo)> {
        loop {
            let cap = buf.len().saturating_sub(4);
            // The vnet header lands in its own buffer (a second iovec): no 64 KB memmove.
            let mut hdr = [0u8; VNET_HDR_LEN];
            let vnet = self.vnet.then_some(&mut hdr);
            let (n, pkttype, aux) = recvmsg_aux(&self.fd, &mut buf[..cap], vnet)?;
            if self.filter_outgoing && pkttype == Some(libc::PACKET_OUTGOING) {
                continue;
            }
            let mut info = RxInfo::default();
            let mut n = n;
            if self.vnet {
                let Some(h) = n
                    .checked_sub(VNET_HDR_LEN)
                    .and_then(|_| VnetHdr::parse(&hdr))
                else {
                    continue;
                };
                n -= VNET_HDR_LEN;
                info.partial_csum = h.needs_csum();
                info.vnet = Some(h);
            }
            if let Some(aux) = aux {
                info.partial_csum |= aux.tp_status & libc::TP_STATUS_CSUMNOTREADY != 0;
                n = insert_vlan(buf, n, aux.tp_status, aux.tp_vlan_tci, aux.tp_vlan_tpid);
            }
            return Ok((n, info));
        }
    }

    /// Frames lost on receive since the socket opened: dropped by the kernel (ring or socket
    /// buffer full) or cut by a ring slot without a whole copy.
    pub fn drops(&self) -> u64 {
        let kernel = ring::take_drops(self.fd.as_fd()).unwrap_or(0);
        self.drops.fetch_add(kernel, Ordering::Relaxed) + kernel
    }

    /// Whether frames are received through a `PACKET_MMAP` ring.
    pub fn has_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// Whether frames carry virtio-net headers (`open_vnet`).
    pub fn is_vnet(&self) -> bool {
        self.vnet
    }

    /// Sends one frame behind the given virtio-net header (sockets from `open_vnet`): a GSO
    /// frame is segmented, a partial checksum completed, by the kernel as the egress needs.
    pub fn write_with_hdr(&self, hdr: &[u8], frame: &[u8]) -> io::Result<usize> {
        let n = nix::sys::uio::writev(&self.fd, &[io::IoSlice::new(hdr), io::IoSlice::new(frame)])?;
        Ok(n.saturating_sub(hdr.len()))
    }

    /// Sends one frame out of the interface; `WouldBlock` when the socket buffer is full.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        if self.vnet {
            // No offload asked of the kernel: a zeroed header.
            let hdr = [0u8; VNET_HDR_LEN];
            let n = nix::sys::uio::writev(
                &self.fd,
                &[io::IoSlice::new(&hdr), io::IoSlice::new(frame)],
            )?;
            return Ok(n.saturating_sub(VNET_HDR_LEN));
        }
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

/// What a ring slot held.
enum RingStep {
    /// A frame, copied into the caller's buffer: its length and metadata.
    Frame(usize, RxInfo),
    /// Nothing for the caller (our own outgoing frame, a bad header, a counted drop).
    Skip,
    /// Too large for the slot: read it whole from the socket's queue.
    Queued,
}

/// Puts back the VLAN tag the kernel took off (`status` says whether there was one) in front
/// of the EtherType of the `n`-byte frame in `buf`; returns the new length. `buf` has 4 bytes
/// of room beyond `n`.
fn insert_vlan(buf: &mut [u8], n: usize, status: u32, tci: u16, tpid: u16) -> usize {
    if status & libc::TP_STATUS_VLAN_VALID == 0 || n < 12 || n + 4 > buf.len() {
        return n;
    }
    let tpid = if status & libc::TP_STATUS_VLAN_TPID_VALID != 0 && tpid != 0 {
        tpid
    } else {
        0x8100
    };
    buf.copy_within(12..n, 16);
    buf[12..14].copy_from_slice(&tpid.to_be_bytes());
    buf[14..16].copy_from_slice(&tci.to_be_bytes());
    n + 4
}

/// Metadata of a received frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxInfo {
    /// The L4 checksum holds only the pseudo-header sum: the sender offloaded it.
    pub partial_csum: bool,
    /// With `open_vnet`: the frame's virtio-net header (GSO kind and size, checksum offsets).
    pub vnet: Option<VnetHdr>,
}

/// `recvmsg` with room for one `PACKET_AUXDATA` control message, into `vnet` (the header of a
/// `PACKET_VNET_HDR` socket) then `buf`. Returns the length of both, the packet type from the
/// source address, and the aux data when the kernel sent it.
fn recvmsg_aux(
    fd: &OwnedFd,
    buf: &mut [u8],
    vnet: Option<&mut [u8; VNET_HDR_LEN]>,
) -> io::Result<(usize, Option<u8>, Option<libc::tpacket_auxdata>)> {
    // Room for one cmsg carrying a tpacket_auxdata, u64-aligned as cmsg headers require.
    let mut control = [0u64; 8];
    // SAFETY: sockaddr_ll is plain old data; all-zero bytes are a valid value.
    let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
    let head = vnet.as_ref().map_or(0, |h| h.len());
    let mut iov = [
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        },
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        },
    ];
    if let Some(h) = vnet {
        iov[0] = libc::iovec {
            iov_base: h.as_mut_ptr().cast(),
            iov_len: h.len(),
        };
    }
    // SAFETY: msghdr is plain old data; all-zero bytes are a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    let first = usize::from(head == 0);
    msg.msg_iov = iov[first..].as_mut_ptr();
    msg.msg_iovlen = (2 - first) as _;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control) as _;
    // SAFETY: every pointer in `msg` points at a live local (`from`, `iov` -> the header and
    // `buf`, `control`) with the size given next to it; the kernel writes at most those sizes.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // MSG_TRUNC makes recvmsg return the real length; a frame larger than `buf` is cut.
    let n = (n as usize).min(head + buf.len());
    let pkttype = (msg.msg_namelen as usize >= mem::size_of::<libc::sockaddr_ll>())
        .then_some(from.sll_pkttype);
    let mut aux = None;
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
    // msg_control/msg_controllen, and we read a tpacket_auxdata only from a cmsg of that type
    // whose length covers it (read_unaligned: CMSG_DATA carries no alignment promise).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_PACKET
                && (*c).cmsg_type == libc::PACKET_AUXDATA
                && (*c).cmsg_len as usize
                    >= libc::CMSG_LEN(mem::size_of::<libc::tpacket_auxdata>() as u32) as usize
            {
                aux = Some(std::ptr::read_unaligned(
                    libc::CMSG_DATA(c).cast::<libc::tpacket_auxdata>(),
                ));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n, pkttype, aux))
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
