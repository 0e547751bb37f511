//! A smoltcp device over two in-memory queues: packets to take in, packets given out. The
//! socket uplink and the gateway's DNS-over-TCP server drive smoltcp through it, so neither
//! touches a file descriptor and both stay deterministic.

use std::collections::VecDeque;

use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

/// IP packets (`Medium::Ip`) in from `rx`, out to `tx`, at most `mtu` bytes.
pub(crate) struct QueueDev<'a> {
    pub rx: &'a mut VecDeque<Vec<u8>>,
    pub tx: &'a mut Vec<Vec<u8>>,
    pub mtu: usize,
}

pub(crate) struct Rx(Vec<u8>);
pub(crate) struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut v = vec![0u8; len];
        let r = f(&mut v);
        self.0.push(v);
        r
    }
}

impl Device for QueueDev<'_> {
    type RxToken<'b>
        = Rx
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;
    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(self.tx)))
    }
    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
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
