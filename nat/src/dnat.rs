//! Port forwards (DNAT) and hairpin. A forward rewrites the destination to the container and
//! keeps the client's address and port; a container reaching its own network's published port
//! through the uplink address is also source-rewritten to the gateway (Docker's hairpin
//! MASQUERADE), so the target's replies come back through the router.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use switchyard_switch::{DropReason, NetworkId};

use crate::config::{NatError, NetworkConfig, PortForward, Proto, Verdict};
use crate::conntrack::{Kind, Tuple, L4, UPLINK_ZONE};
use crate::emit::Emits;
use crate::packet::L4Info;
use crate::router::{Router, Rx};

pub(crate) fn l4_of(p: Proto) -> L4 {
    match p {
        Proto::Tcp => L4::Tcp,
        Proto::Udp => L4::Udp,
    }
}

type FwdKey = (Proto, Option<Ipv4Addr>, u16);

/// Published ports by (protocol, host address or any, host port).
#[derive(Default)]
pub struct Forwards {
    map: HashMap<FwdKey, PortForward>,
}

impl Forwards {
    pub fn add(&mut self, f: PortForward) -> Result<(), NatError> {
        let k = (f.proto, f.host_ip, f.host_port);
        if self.map.contains_key(&k) {
            return Err(NatError::ForwardExists(f.proto, f.host_ip, f.host_port));
        }
        self.map.insert(k, f);
        Ok(())
    }

    pub fn remove(
        &mut self,
        proto: Proto,
        host_ip: Option<Ipv4Addr>,
        port: u16,
    ) -> Result<PortForward, NatError> {
        self.map
            .remove(&(proto, host_ip, port))
            .ok_or(NatError::UnknownForward(proto, host_ip, port))
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&PortForward) -> bool) {
        self.map.retain(|_, f| keep(f));
    }

    pub fn list(&self) -> Vec<PortForward> {
        let mut v: Vec<_> = self.map.values().copied().collect();
        v.sort_by_key(|f| (f.proto, f.host_ip, f.host_port));
        v
    }

    /// The forward for a packet to `addr:port`: one bound to exactly that address first, then
    /// one bound to any (the uplink) address.
    pub fn find(&self, proto: L4, addr: Ipv4Addr, port: u16) -> Option<PortForward> {
        let proto = match proto {
            L4::Tcp => Proto::Tcp,
            L4::Udp => Proto::Udp,
            L4::Icmp => return None,
        };
        self.map
            .get(&(proto, Some(addr), port))
            .or_else(|| self.map.get(&(proto, None, port)))
            .copied()
    }
}

impl Router {
    /// Outside to a published port, first packet of a flow.
    pub(crate) fn port_forward(
        &mut self,
        rx: &Rx,
        l4: &L4Info,
        key: Tuple,
        f: PortForward,
        out: &mut Emits,
    ) -> Verdict {
        let Some(n) = self.net(f.network).copied() else {
            return Verdict::Dropped(DropReason::NotForUs);
        };
        if n.internal {
            return Verdict::Dropped(DropReason::NoRoute);
        }
        let state = match self.open_flow(rx, l4, out) {
            Ok(s) => s,
            Err(v) => return v,
        };
        // The container replies to the client itself: its address and port are kept.
        let reply = Tuple {
            src: f.container_ip,
            dst: key.src,
            sport: f.container_port,
            dport: key.sport,
            proto: key.proto,
        };
        self.insert_and_forward(rx, l4, key, reply, n.id.0, &n, state, Kind::Dnat, out)
    }

    /// A container to the uplink address: a published port of its own network (hairpin), else
    /// a closed port of ours.
    pub(crate) fn hairpin(
        &mut self,
        rx: &Rx,
        n: &NetworkConfig,
        l4: &L4Info,
        key: Tuple,
        out: &mut Emits,
    ) -> Verdict {
        let Some(f) = self.forwards.find(key.proto, key.dst, key.dport) else {
            return self.local_delivery(rx, l4, out);
        };
        if f.network != n.id {
            return Verdict::Dropped(DropReason::InterNetwork);
        }
        let state = match self.open_flow(rx, l4, out) {
            Ok(s) => s,
            Err(v) => return v,
        };
        // Target container -> gateway address, to the port we pick.
        let template = Tuple {
            src: f.container_ip,
            dst: n.gateway_ip,
            sport: f.container_port,
            dport: 0,
            proto: key.proto,
        };
        let _ = (UPLINK_ZONE, NetworkId(0));
        self.new_flow(rx, l4, key, template, n.id.0, n, state, Kind::Hairpin, out)
    }
}
