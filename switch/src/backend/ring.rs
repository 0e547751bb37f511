//! A `PACKET_MMAP` receive ring (`TPACKET_V2`) on an AF_PACKET socket: the kernel writes each
//! frame into a slot of memory we share with it and flips the slot's status, so a busy socket is
//! drained without a syscall per frame (a `recvmsg` with its cmsg and address was a quarter of the
//! dataplane's time per 64-byte frame on a veth).
//!
//! A frame larger than a slot (a 64 KB GSO frame) arrives cut, marked `TP_STATUS_COPY`: with
//! `PACKET_COPY_THRESH` the kernel also queues it whole on the socket, where the caller reads it
//! with `recvmsg` (see `PacketSocket::read_meta`).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// Bytes per slot: a 1500-byte frame with its headers fits; larger ones take the copy path.
pub const FRAME_SIZE: u32 = 2048;
/// Slots per ring: 2 MB a socket, bursts of about 1,000 frames while the dataplane is off-CPU.
pub const FRAME_NR: u32 = 1024;
/// Slots are grouped in blocks the kernel allocates contiguously (order-5 pages, or vmalloc).
const BLOCK_SIZE: u32 = 128 << 10;

/// One received frame as the kernel left it in its slot.
#[derive(Debug)]
pub struct Slot<'a> {
    /// `TP_STATUS_*` bits (`TP_STATUS_COPY`, `TP_STATUS_CSUMNOTREADY`, VLAN validity).
    pub status: u32,
    /// The frame's length on the wire; `data` is shorter when the slot cut it.
    pub len: usize,
    /// The captured bytes from the Ethernet header on.
    pub data: &'a [u8],
    /// The `len_before` bytes in front of the frame (room for a virtio-net header), when the
    /// slot has that many.
    pub before: &'a [u8],
    pub vlan_tci: u16,
    pub vlan_tpid: u16,
    /// `sll_pkttype` of the address behind the header (`PACKET_OUTGOING`, ...).
    pub pkttype: u8,
}

/// A mapped `TPACKET_V2` receive ring; unmapped on drop (the socket closes after it).
#[derive(Debug)]
pub struct RxRing {
    base: NonNull<u8>,
    map_len: usize,
    frame_size: usize,
    frame_nr: usize,
    /// The next slot to look at. A lock rather than `&mut self` because ports are read
    /// through shared references; a second reader finds it taken and sees an empty ring.
    head: Mutex<usize>,
    /// Bytes wanted in front of each frame (`Slot::before`).
    len_before: usize,
}

// SAFETY: the mapping is owned by this value alone (a private MAP_SHARED mapping of our socket
// that nothing else references); slots are touched only by the holder of `head`'s lock, and
// their status words through atomics, so moving or sharing the ring between threads is sound.
unsafe impl Send for RxRing {}
// SAFETY: see `Send`: every access to slot memory goes through `next`, serialized by `head`.
unsafe impl Sync for RxRing {}

impl RxRing {
    /// Switches `fd` to `TPACKET_V2`, asks for whole copies of frames that do not fit a slot,
    /// and maps a ring of `frame_nr` slots of `frame_size` bytes. Call before `bind`, so that no
    /// frame is queued on the socket ahead of the ring (it would pass for a copy).
    /// `len_before`: bytes wanted in front of each frame (`PACKET_VNET_HDR` puts its header there).
    pub fn new(
        fd: BorrowedFd<'_>,
        frame_size: u32,
        frame_nr: u32,
        len_before: usize,
    ) -> io::Result<RxRing> {
        let block_size = BLOCK_SIZE.max(frame_size);
        if frame_size == 0
            || !(frame_size as usize).is_multiple_of(libc::TPACKET_ALIGNMENT)
            || !block_size.is_multiple_of(frame_size)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ring slot size must divide the block and be 16-byte aligned",
            ));
        }
        let per_block = block_size / frame_size;
        let block_nr = frame_nr.div_ceil(per_block).max(1);
        let frame_nr = block_nr * per_block;
        setsockopt(
            fd,
            libc::PACKET_VERSION,
            &(libc::tpacket_versions::TPACKET_V2 as libc::c_int),
        )?;
        setsockopt(fd, libc::PACKET_COPY_THRESH, &(1 as libc::c_int))?;
        let req = libc::tpacket_req {
            tp_block_size: block_size,
            tp_block_nr: block_nr,
            tp_frame_size: frame_size,
            tp_frame_nr: frame_nr,
        };
        setsockopt(fd, libc::PACKET_RX_RING, &req)?;
        let map_len = block_size as usize * block_nr as usize;
        // SAFETY: a fresh shared mapping of the ring the kernel just allocated for this socket,
        // of exactly its size; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RxRing {
            base: NonNull::new(p.cast()).ok_or_else(io::Error::last_os_error)?,
            map_len,
            frame_size: frame_size as usize,
            frame_nr: frame_nr as usize,
            head: Mutex::new(0),
            len_before,
        })
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> usize {
        self.frame_nr
    }

    /// Hands the frame at the head to `f` and gives its slot back to the kernel; `None` when the
    /// kernel has not filled it yet (or another thread is reading).
    pub fn next<R>(&self, f: impl FnOnce(Slot<'_>) -> R) -> Option<R> {
        let mut head = self.head.try_lock().ok()?;
        let at = *head * self.frame_size;
        // SAFETY: `at + frame_size <= map_len` (head < frame_nr, slots are contiguous since
        // blocks are whole multiples of slots); a slot starts 16-byte aligned, so its first u32,
        // tp_status, may be viewed as an atomic: the kernel and we hand the slot over through it.
        let slot = unsafe { self.base.as_ptr().add(at) };
        // SAFETY: as above; `slot` is aligned for u32 and lives as long as the mapping (`self`).
        let status_word = unsafe { &*slot.cast::<AtomicU32>() };
        let status = status_word.load(Ordering::Acquire);
        if status & libc::TP_STATUS_USER == 0 {
            return None;
        }
        // SAFETY: the slot is ours until we store TP_STATUS_KERNEL (the Acquire load above
        // orders our reads after the kernel's writes); the header is plain old data at the
        // slot's start, read unaligned-safe.
        let hdr = unsafe { std::ptr::read_unaligned(slot.cast::<libc::tpacket2_hdr>()) };
        // SAFETY: the slot is `frame_size` readable bytes, ours until released below; the
        // slice does not outlive this call.
        let bytes = unsafe { std::slice::from_raw_parts(slot.cast_const(), self.frame_size) };
        let sll_at = (mem::size_of::<libc::tpacket2_hdr>() + libc::TPACKET_ALIGNMENT - 1)
            & !(libc::TPACKET_ALIGNMENT - 1);
        let pkttype = bytes
            .get(sll_at + mem::offset_of!(libc::sockaddr_ll, sll_pkttype))
            .copied()
            .unwrap_or(0);
        // Offsets come from the kernel; clamp them to the slot all the same.
        let mac = usize::from(hdr.tp_mac).min(self.frame_size);
        let end = mac
            .saturating_add(hdr.tp_snaplen as usize)
            .min(self.frame_size);
        let before = mac
            .checked_sub(self.len_before)
            .map_or(&bytes[..0], |b| &bytes[b..mac]);
        let r = f(Slot {
            status,
            len: hdr.tp_len as usize,
            data: &bytes[mac..end],
            before,
            vlan_tci: hdr.tp_vlan_tci,
            vlan_tpid: hdr.tp_vlan_tpid,
            pkttype,
        });
        status_word.store(libc::TP_STATUS_KERNEL, Ordering::Release);
        *head = (*head + 1) % self.frame_nr;
        Some(r)
    }
}

impl Drop for RxRing {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` are the mapping made in `new`, unmapped once; no slice into
        // it outlives `next`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.map_len);
        }
    }
}

/// Frames the kernel dropped on `fd` since the last call (ring or socket buffer full); the
/// kernel resets the count on each read.
pub fn take_drops(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut st = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: `st` is a live tpacket_stats and `len` its size; the kernel writes at most `len`.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut st as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(st.tp_drops))
}

fn setsockopt<T>(fd: BorrowedFd<'_>, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live T and we pass its exact size; the kernel only reads it.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            name,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::backend::packet::PacketSocket;
    use crate::gso::{VnetHdr, GSO_TCPV4, VNET_F_NEEDS_CSUM, VNET_HDR_LEN};

    /// An EtherType no kernel traffic uses: IPv6 chatter on the new links is ignored by it.
    const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

    /// Runs `f` with the ifindexes of a veth pair (`a`, `b`) in a network namespace of its own
    /// thread, gone with the thread (even on panic). `None` when not root.
    fn on_veth_pair<R: Send>(f: impl FnOnce(u32, u32) -> R + Send) -> Option<R> {
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: needs root (network namespaces)");
            return None;
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
                // No IPv6 chatter (router solicitations, MLD) to crowd the ring's drop count;
                // /proc/sys/net is the namespace of the thread that opens it.
                for p in ["all", "default"] {
                    let _ =
                        std::fs::write(format!("/proc/sys/net/ipv6/conf/{p}/disable_ipv6"), "1");
                }
                // `ip` forks from this thread and so runs in its namespace.
                for args in [
                    &[
                        "link", "add", "name", "sya", "type", "veth", "peer", "name", "syb",
                    ][..],
                    &["link", "set", "sya", "up"],
                    &["link", "set", "syb", "up"],
                ] {
                    let st = Command::new("ip").args(args).status().expect("ip");
                    assert!(st.success(), "ip {args:?}");
                }
                let idx = |n: &str| nix::net::if_::if_nametoindex(n).expect("ifindex");
                f(idx("sya"), idx("syb"))
            })
            .join()
            .unwrap()
        })
        .into()
    }

    fn frame(seq: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xaa]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xbb]);
        f[12..14].copy_from_slice(&ETHERTYPE);
        f[14..18].copy_from_slice(&seq.to_be_bytes());
        f
    }

    /// Sequence numbers of our test frames read from `rx` until it is empty.
    fn drain(rx: &PacketSocket, buf: &mut [u8], got: &mut Vec<u32>) {
        while let Ok((n, _)) = rx.read_meta(buf) {
            if n >= 18 && buf[12..14] == ETHERTYPE {
                got.push(u32::from_be_bytes(buf[14..18].try_into().unwrap()));
            }
        }
    }

    #[test]
    fn frames_arrive_in_order_across_wraparound() {
        on_veth_pair(|a, b| {
            let rx = PacketSocket::open_vnet(a).unwrap();
            assert!(rx.has_ring());
            let tx = PacketSocket::open(b).unwrap();
            let mut buf = vec![0u8; 65_600];
            let mut got = Vec::new();
            // Three and a half times round the ring, read in bursts of 100.
            let total = (FRAME_NR * 7 / 2) as usize;
            for seq in 0..total as u32 {
                tx.write(&frame(seq, 64 + seq as usize % 1400)).unwrap();
                if seq % 100 == 99 {
                    drain(&rx, &mut buf, &mut got);
                }
            }
            drain(&rx, &mut buf, &mut got);
            assert_eq!(got, (0..total as u32).collect::<Vec<_>>());
            assert_eq!(rx.drops(), 0);
        });
    }

    #[test]
    fn vnet_headers_in_slots_and_gso_frames_larger_than_a_slot() {
        on_veth_pair(|a, b| {
            let rx = PacketSocket::open_vnet(a).unwrap();
            let tx = PacketSocket::open_vnet(b).unwrap();
            // A small frame, a 64 KB TCP/IPv4 GSO frame, a small frame, in that order.
            let payload = 64_000usize;
            let mut big = vec![0u8; 14 + 20 + 20 + payload];
            big[12..14].copy_from_slice(&[0x08, 0x00]);
            big[14] = 0x45;
            big[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
            big[22] = 64;
            big[23] = 6;
            big[26..34].copy_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
            big[46] = 0x50;
            for (i, b) in big[54..].iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            let h = VnetHdr {
                flags: VNET_F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: 54,
                gso_size: 1448,
                csum_start: 34,
                csum_offset: 16,
            };
            // A TCP frame with a partial checksum that fits a slot: its header comes from the
            // slot, in front of the frame.
            let small = &big[..54 + 100];
            let mut small = small.to_vec();
            small[16..18].copy_from_slice(&140u16.to_be_bytes());
            let partial = VnetHdr {
                gso_type: 0,
                hdr_len: 0,
                gso_size: 0,
                ..h
            };
            tx.write(&frame(1, 64)).unwrap();
            tx.write_with_hdr(&h.emit(), &big).unwrap();
            tx.write(&frame(2, 64)).unwrap();
            tx.write_with_hdr(&partial.emit(), &small).unwrap();
            let mut buf = vec![0u8; 65_600];
            let mut seen = Vec::new();
            while let Ok((n, info)) = rx.read_meta(&mut buf) {
                if buf[12..14] == ETHERTYPE {
                    seen.push(format!("seq {}", buf[17]));
                } else if buf[12..14] == [0x08, 0x00] && n == small.len() {
                    assert_eq!(&buf[..n], &small[..]);
                    let v = info.vnet.expect("vnet header");
                    assert!(v.needs_csum() && info.partial_csum);
                    assert_eq!((v.gso(), v.csum_start, v.csum_offset), (0, 34, 16));
                    seen.push("small".into());
                } else if buf[12..14] == [0x08, 0x00] {
                    assert_eq!(&buf[..n], &big[..], "the whole frame");
                    let v = info.vnet.expect("vnet header");
                    assert_eq!((v.gso(), v.gso_size), (GSO_TCPV4, 1448));
                    assert!(info.partial_csum);
                    seen.push("big".into());
                }
            }
            assert_eq!(seen, ["seq 1", "big", "seq 2", "small"]);
            assert_eq!(rx.drops(), 0);
        });
    }

    #[test]
    fn a_full_ring_drops_and_counts_it() {
        on_veth_pair(|a, b| {
            let rx = PacketSocket::open_vnet(a).unwrap();
            let tx = PacketSocket::open(b).unwrap();
            let sent = FRAME_NR * 2;
            for seq in 0..sent {
                tx.write(&frame(seq, 64)).unwrap();
            }
            let mut buf = vec![0u8; 65_600];
            let mut got = Vec::new();
            drain(&rx, &mut buf, &mut got);
            // The ring kept the first frames, in order, and counted the rest.
            assert!(got.len() >= FRAME_NR as usize, "{} read", got.len());
            assert_eq!(got, (0..got.len() as u32).collect::<Vec<_>>());
            assert_eq!(got.len() as u64 + rx.drops(), u64::from(sent));
            // A ring emptied takes frames again.
            tx.write(&frame(sent, 64)).unwrap();
            got.clear();
            drain(&rx, &mut buf, &mut got);
            assert_eq!(got, [sent]);
        });
    }

    #[test]
    fn vlan_tags_the_kernel_strips_are_put_back() {
        on_veth_pair(|a, b| {
            let rx = PacketSocket::open_vnet(a).unwrap();
            let tx = PacketSocket::open(b).unwrap();
            let mut sent = Vec::new();
            for (i, tpid) in [[0x81, 0x00], [0x88, 0xa8]].into_iter().enumerate() {
                // dst, src, the tag (TPID, TCI 0x0123 + i), our EtherType, a sequence number.
                let mut f = frame(0, 64);
                f.splice(12..12, [tpid[0], tpid[1], 0x01, 0x23 + i as u8]);
                f.truncate(64);
                tx.write(&f).unwrap();
                sent.push(f);
            }
            let mut buf = vec![0u8; 65_600];
            let mut got = Vec::new();
            while let Ok((n, _)) = rx.read_meta(&mut buf) {
                if n >= 18 && buf[16..18] == ETHERTYPE {
                    got.push(buf[..n].to_vec());
                }
            }
            assert_eq!(got, sent);
        });
    }

    #[test]
    fn slot_sizes_are_checked() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let fd = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Packet,
            nix::sys::socket::SockType::Raw,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        use std::os::fd::AsFd;
        let e = RxRing::new(fd.as_fd(), 1000, 16, VNET_HDR_LEN).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let r = RxRing::new(fd.as_fd(), 4096, 10, VNET_HDR_LEN).unwrap();
        assert_eq!(r.capacity(), 32, "whole blocks of 32 slots");
        assert!(r.next(|_| ()).is_none(), "nothing received");
    }
}
