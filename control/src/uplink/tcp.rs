//! TCP through the socket uplink: each container flow is terminated by its own smoltcp socket
//! and relayed to a non-blocking host `TcpStream`.
//!
//! One smoltcp [`Interface`] per network MTU (any-IP mode: it answers for every address) is
//! polled with one [`SocketSet`] per flow, so a packet only ever meets its own socket (smoltcp
//! walks every socket of a set per packet). The flow's packets queue in `rxq` and are fed in
//! one poll per dataplane round, which also batches the ACKs.
//!
//! Backpressure: the relay moves bytes only while the other side takes them. A host that does
//! not read leaves smoltcp's receive buffer full, so the window closes towards the container;
//! a container that does not read leaves the send buffer full, so we stop reading the host
//! socket and the kernel closes its window. Buffers are fixed per flow (`buffer` bytes each
//! way). Half-close is carried both ways: a FIN from the container becomes
//! `shutdown(Write)` on the host socket, EOF from the host becomes `close()` (FIN) inside.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration as SDuration, Instant as SInstant};
use smoltcp::wire::{IpAddress, IpEndpoint, IpListenEndpoint};

use super::wire::{self, Parsed};
use crate::queue_dev::{ip_interface, QueueDev as Dev, Recycling};

/// The smoltcp interfaces (one per MTU) and an empty socket set for answering strays.
pub(super) struct Stack {
    ifaces: HashMap<usize, Interface>,
    empty: SocketSet<'static>,
    seed: u64,
}

impl Stack {
    pub fn new(seed: u64) -> Stack {
        Stack {
            ifaces: HashMap::new(),
            empty: SocketSet::new(vec![]),
            seed,
        }
    }

    pub fn iface(&mut self, mtu: usize, now: SInstant) -> &mut Interface {
        let seed = self.seed;
        self.ifaces.entry(mtu).or_insert_with(|| {
            let addr = Ipv4Addr::new(169, 254, 255, 254);
            ip_interface(seed ^ mtu as u64, mtu, addr, true, now)
        })
    }

    /// Let smoltcp answer a packet no flow takes: a RST for TCP (never for a RST).
    pub fn answer_stray(&mut self, pkt: &[u8], now: SInstant, out: &mut Vec<Vec<u8>>) {
        let mut q = VecDeque::from([pkt.to_vec()]);
        let mut empty = std::mem::replace(&mut self.empty, SocketSet::new(vec![]));
        let iface = self.iface(1500, now);
        let mut dev = Dev {
            rx: &mut q,
            tx: out,
            mtu: 1500,
        };
        iface.poll(now, &mut dev, &mut empty);
        self.empty = empty;
    }
}

/// The container side of a flow: its address and port, and the remote it talks to (as the
/// container knows it, before any host-loopback mapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub c: Ipv4Addr,
    pub cport: u16,
    pub r: Ipv4Addr,
    pub rport: u16,
}

pub(super) enum Phase {
    /// Host connect in progress; the container's SYN waits for its outcome.
    Connecting {
        syn: Vec<u8>,
    },
    Open,
}

/// What the host connect came to.
pub(super) enum Connect {
    Pending,
    Done,
    Failed(io::Error),
}

/// The interface MTU of flows in networks with a smaller one: smoltcp sends segments up to this
/// (told [`GSO_MSS`] as the container's MSS), which enter the network as GSO frames cut at the
/// container's real MSS (a vnet tap takes them whole: one write instead of forty-odd).
pub(super) const GSO_MTU: usize = 65_520;
pub(super) const GSO_MSS: u16 = (GSO_MTU - 40) as u16;

pub(super) struct TcpFlow {
    pub key: Key,
    /// The network's MTU.
    pub mtu: usize,
    /// The MSS the container's SYN (or SYN-ACK) offered, where smoltcp was told [`GSO_MSS`].
    pub mss: Option<u16>,
    pub phase: Phase,
    pub set: SocketSet<'static>,
    pub handle: Option<SocketHandle>,
    pub rxq: VecDeque<Vec<u8>>,
    pub host: mio::net::TcpStream,
    pub readable: bool,
    pub writable: bool,
    /// EOF (or an error) read from the host.
    pub host_eof: bool,
    /// We shut the host socket's write half (the container sent FIN).
    pub host_shut: bool,
    /// epoll reported the host's read side closed (or an error): read until EOF, not only
    /// until a short read.
    pub host_rdhup: bool,
    /// Next smoltcp timer, as registered in the uplink's timer set.
    pub deadline: Option<SInstant>,
}

/// How long an ACK for the container's data may wait for a reply to ride on. The host's reply
/// to a request usually comes within this, which saves a packet into the tap per round trip
/// (measured: one write of two per request/response); a full segment's worth of unacked data
/// or a window update is still acked at once, so bulk transfers do not wait on it.
const ACK_DELAY: SDuration = SDuration::from_millis(1);

/// smoltcp socket with `buffer` bytes each way, no Nagle (we relay a stream; the container and
/// host stacks coalesce their own writes), a short delayed ACK, a timeout so a vanished peer
/// frees the flow.
fn new_socket(buffer: usize) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; buffer]),
        tcp::SocketBuffer::new(vec![0u8; buffer]),
    );
    s.set_nagle_enabled(false);
    s.set_ack_delay(Some(ACK_DELAY));
    s.set_timeout(Some(SDuration::from_secs(120)));
    s
}

impl TcpFlow {
    /// An outbound flow whose host connect was started.
    pub fn outbound(key: Key, mtu: usize, syn: Vec<u8>, host: mio::net::TcpStream) -> TcpFlow {
        TcpFlow {
            key,
            mtu,
            mss: None,
            phase: Phase::Connecting { syn },
            set: SocketSet::new(vec![]),
            handle: None,
            rxq: VecDeque::new(),
            host,
            readable: false,
            writable: false,
            host_eof: false,
            host_shut: false,
            host_rdhup: false,
            deadline: None,
        }
    }

    /// An accepted host connection for a published port: smoltcp connects to the container
    /// from the client's address.
    pub fn inbound(
        key: Key,
        mtu: usize,
        host: mio::net::TcpStream,
        stack: &mut Stack,
        buffer: usize,
        now: SInstant,
    ) -> Result<TcpFlow, tcp::ConnectError> {
        let mut s = new_socket(buffer);
        let iface = stack.iface(mtu.max(GSO_MTU), now);
        s.connect(
            iface.context(),
            IpEndpoint::new(IpAddress::Ipv4(key.c), key.cport),
            IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(key.r)),
                port: key.rport,
            },
        )?;
        let mut set = SocketSet::new(vec![]);
        let handle = set.add(s);
        Ok(TcpFlow {
            key,
            mtu,
            mss: None,
            phase: Phase::Open,
            set,
            handle: Some(handle),
            rxq: VecDeque::new(),
            host,
            readable: true,
            writable: true,
            host_eof: false,
            host_shut: false,
            host_rdhup: false,
            deadline: None,
        })
    }

    /// The MTU smoltcp works with for this flow.
    fn iface_mtu(&self) -> usize {
        self.mtu.max(GSO_MTU)
    }

    /// A SYN (or SYN-ACK) from the container on its way to smoltcp: below [`GSO_MTU`], its MSS
    /// is remembered and smoltcp told [`GSO_MSS`] instead.
    pub fn take_syn_mss(&mut self, pkt: &mut [u8], p: &Parsed) {
        if self.mtu < GSO_MTU {
            if let Some(m) = wire::replace_syn_mss(pkt, p, GSO_MSS) {
                self.mss = Some(m);
            }
        }
    }

    /// The payload size to cut a super-packet of smoltcp's at (its TCP header `thl` bytes):
    /// the container's MSS less the TCP options, within the network's MTU.
    pub fn gso_size(&self, thl: usize) -> usize {
        let mss = self.mss.map_or(self.mtu, usize::from);
        mss.saturating_sub(thl.saturating_sub(20))
            .min(self.mtu.saturating_sub(20 + thl))
    }

    /// Has the host connect finished?
    pub fn connect_state(&self) -> Connect {
        match self.host.take_error() {
            Ok(Some(e)) | Err(e) => return Connect::Failed(e),
            Ok(None) => {}
        }
        match self.host.peer_addr() {
            Ok(_) => Connect::Done,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Connect::Pending,
            Err(e) => Connect::Failed(e),
        }
    }

    /// The host side connected: a smoltcp socket takes the container's SYN.
    pub fn open(&mut self, buffer: usize) {
        let Phase::Connecting { syn } = std::mem::replace(&mut self.phase, Phase::Open) else {
            return;
        };
        let mut s = new_socket(buffer);
        let _ = s.listen(IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(self.key.r)),
            port: self.key.rport,
        });
        self.handle = Some(self.set.add(s));
        self.rxq.push_front(syn);
    }

    /// Feed queued packets, relay both ways, send what smoltcp has. True when the flow is over.
    pub fn step(
        &mut self,
        stack: &mut Stack,
        now: SInstant,
        out: &mut Vec<Vec<u8>>,
        spare: &mut Vec<Vec<u8>>,
    ) -> bool {
        let Some(h) = self.handle else {
            self.rxq.clear();
            return false;
        };
        let iface_mtu = self.iface_mtu();
        let iface = stack.iface(iface_mtu, now);
        let mut sink = Recycling { out, spare };
        let mut dev = Dev {
            rx: &mut self.rxq,
            tx: &mut sink,
            mtu: iface_mtu,
        };
        iface.poll(now, &mut dev, &mut self.set);
        let s: &mut tcp::Socket = self.set.get_mut(h);
        let moved = relay(
            s,
            &mut self.host,
            &mut self.readable,
            &mut self.writable,
            &mut self.host_eof,
            &mut self.host_shut,
            self.host_rdhup,
        );
        if moved {
            let mut dev = Dev {
                rx: &mut self.rxq,
                tx: &mut sink,
                mtu: iface_mtu,
            };
            iface.poll(now, &mut dev, &mut self.set);
        }
        self.deadline = iface.poll_at(now, &self.set);
        let s: &mut tcp::Socket = self.set.get_mut(h);
        match s.state() {
            State::Listen => true,
            State::TimeWait => true,
            State::Closed => {
                if !(self.host_eof && self.host_shut) {
                    // Reset or timed out inside: reset the host side too.
                    let _ = socket2::SockRef::from(&self.host)
                        .set_linger(Some(std::time::Duration::ZERO));
                }
                true
            }
            _ => false,
        }
    }

    pub fn peer(&self) -> SocketAddr {
        SocketAddr::from((self.key.r, self.key.rport))
    }
}

/// Move bytes both ways while both sides take them; true when anything moved.
///
/// A short read or write means the host socket is drained or full: with edge-triggered epoll
/// the next arrival (or freed space) brings a new event, so the call that would only say
/// EAGAIN is skipped (one syscall per request/response). EOF after data that was read
/// whole raises no new edge, hence `rdhup` (epoll saw the peer's FIN): then read to the end.
fn relay(
    s: &mut tcp::Socket,
    host: &mut mio::net::TcpStream,
    readable: &mut bool,
    writable: &mut bool,
    host_eof: &mut bool,
    host_shut: &mut bool,
    rdhup: bool,
) -> bool {
    let mut moved = false;
    // Container -> host.
    while *writable && s.can_recv() {
        let r = s.recv(|buf| match host.write(buf) {
            Ok(n) => (n, Ok((n, buf.len()))),
            Err(e) => (0, Err(e)),
        });
        match r {
            Ok(Ok((0, _))) => break,
            Ok(Ok((n, len))) => {
                moved = true;
                if n < len {
                    *writable = false;
                }
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => *writable = false,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => {
                s.abort();
                *host_eof = true;
                return true;
            }
            Err(_) => break,
        }
    }
    let fin_in = matches!(
        s.state(),
        State::CloseWait | State::LastAck | State::Closing | State::TimeWait
    );
    if fin_in && !s.can_recv() && !*host_shut {
        let _ = host.shutdown(std::net::Shutdown::Write);
        *host_shut = true;
        moved = true;
    }
    // Host -> container.
    while *readable && !*host_eof && s.can_send() {
        let r = s.send(|buf| match host.read(buf) {
            Ok(n) => (n, Ok((n, buf.len()))),
            Err(e) => (0, Err(e)),
        });
        match r {
            Ok(Ok((0, _))) => {
                *host_eof = true;
                s.close();
                moved = true;
            }
            Ok(Ok((n, len))) => {
                moved = true;
                if n < len && !rdhup {
                    *readable = false;
                }
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => *readable = false,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => {
                // Reset by the host: reset inside.
                s.abort();
                *host_eof = true;
                *host_shut = true;
                moved = true;
            }
            Err(_) => break,
        }
    }
    moved
}
