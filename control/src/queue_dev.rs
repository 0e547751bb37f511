//! A smoltcp device over two in-memory queues: packets to take in, packets given out. The
//! socket uplink and the gateway's DNS-over-TCP server drive smoltcp through it, so neither
//! touches a file descriptor and both stay deterministic.

use std::collections::VecDeque;

use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

/// Where sent packets go: a buffer of `len` bytes for each (its old contents, if any, are
/// overwritten by smoltcp, which writes every byte it asks for).
pub(crate) trait Sink {
    fn next(&mut self, len: usize) -> &mut [u8];
}

/// A fresh vector per packet.
impl Sink for Vec<Vec<u8>> {
    fn next(&mut self, len: usize) -> &mut [u8] {
        let i = self.len();
        self.push(vec![0u8; len]);
        &mut self[i]
    }
}

/// Packets into `out`, in buffers taken from `spare` where it has some: on the socket
/// uplink's bulk path a packet is up to 64 KiB, and a fresh zeroed vector for each one showed
/// in profiles (allocation and memset).
pub(crate) struct Recycling<'a> {
    pub out: &'a mut Vec<Vec<u8>>,
    pub spare: &'a mut Vec<Vec<u8>>,
}

impl Sink for Recycling<'_> {
    fn next(&mut self, len: usize) -> &mut [u8] {
        let mut v = self.spare.pop().unwrap_or_default();
        // Shrinking keeps the old bytes; only growth is zero-filled.
        v.resize(len, 0);
        let i = self.out.len();
        self.out.push(v);
        &mut self.out[i]
    }
}

/// IP packets (`Medium::Ip`) in from `rx`, out to `tx`, at most `mtu` bytes.
pub(crate) struct QueueDev<'a, S: Sink = Vec<Vec<u8>>> {
    pub rx: &'a mut VecDeque<Vec<u8>>,
    pub tx: &'a mut S,
    pub mtu: usize,
}

pub(crate) struct Rx(Vec<u8>);
pub(crate) struct Tx<'a, S: Sink>(&'a mut S);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl<S: Sink> TxToken for Tx<'_, S> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        f(self.0.next(len))
    }
}

impl<S: Sink> Device for QueueDev<'_, S> {
    type RxToken<'b>
        = Rx
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b, S>
    where
        Self: 'b;
    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_, S>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(self.tx)))
    }
    fn transmit(&mut self, _: Instant) -> Option<Tx<'_, S>> {
        Some(Tx(self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = self.mtu;
        // The pipeline verified every checksum on the way in; we only compute ours.
        c.checksum.ipv4 = Checksum::Tx;
        c.checksum.tcp = Checksum::Tx;
        c.checksum.udp = Checksum::Tx;
        c.checksum.icmpv4 = Checksum::Tx;
        c
    }
}

/// A smoltcp interface for a [`QueueDev`] of `mtu` bytes, holding `addr`, with any-IP mode on
/// when `any_ip` (it then answers for every address and each socket listens on its own). The
/// socket uplink, the gateway's DNS over TCP and the upstream DNS client each make theirs here.
pub(crate) fn ip_interface(
    seed: u64,
    mtu: usize,
    addr: std::net::Ipv4Addr,
    any_ip: bool,
    now: Instant,
) -> smoltcp::iface::Interface {
    use smoltcp::iface::{Config, Interface};
    use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
    let (mut q, mut t) = (VecDeque::new(), Vec::new());
    let mut dev = QueueDev {
        rx: &mut q,
        tx: &mut t,
        mtu,
    };
    let mut cfg = Config::new(HardwareAddress::Ip);
    cfg.random_seed = seed;
    let mut i = Interface::new(cfg, &mut dev, now);
    i.set_any_ip(any_ip);
    i.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(addr), 32));
    });
    i
}
