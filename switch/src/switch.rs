//! The learning switch: ports grouped into isolated networks, one MAC table, one decision per
//! frame. Pure: `handle_frame` takes the time and returns where the frame goes; the caller
//! (the dataplane loop, replay, a test) does the writing and reports tx back.

use std::fmt;

use crate::frame::{MacAddr, ETH_HEADER_LEN, ETH_OVERHEAD};
use crate::mac_table::{Learn, MacTable, MacTableConfig};
use crate::port::{DropReason, NetworkId, PortCounters, PortId, PortKind};
use crate::Instant;

/// Where a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// Out of exactly this port (never the ingress).
    Unicast(PortId),
    /// Out of every port of this network but the ingress: see [`Switch::flood_ports`].
    Flood(NetworkId),
    /// Nowhere; already counted on the ingress port.
    Drop(DropReason),
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SwitchConfig {
    pub mac_table: MacTableConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchError {
    UnknownNetwork(NetworkId),
    NetworkExists(NetworkId),
    NetworkNotEmpty(NetworkId),
    PortExists(PortId),
    UnknownPort(PortId),
    MacInUse(MacAddr),
}

impl fmt::Display for SwitchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchError::UnknownNetwork(n) => write!(f, "no network with id {}", n.0),
            SwitchError::NetworkExists(n) => write!(f, "network id {} exists", n.0),
            SwitchError::NetworkNotEmpty(n) => write!(f, "network id {} still has ports", n.0),
            SwitchError::PortExists(p) => write!(f, "port id {} exists", p.0),
            SwitchError::UnknownPort(p) => write!(f, "no port with id {}", p.0),
            SwitchError::MacInUse(m) => write!(f, "MAC {m} is already assigned on this network"),
        }
    }
}

impl std::error::Error for SwitchError {}

struct PortState {
    network: NetworkId,
    kind: PortKind,
    /// The MAC the daemon gave this port (a static entry); with anti-spoofing, the only
    /// source address accepted from it.
    mac: Option<MacAddr>,
    anti_spoof: bool,
    counters: PortCounters,
}

struct NetworkState {
    id: NetworkId,
    mtu: usize,
    ports: Vec<PortId>,
}

/// The switch.
pub struct Switch {
    ports: Vec<Option<PortState>>,
    networks: Vec<NetworkState>,
    table: MacTable,
}

impl Switch {
    pub fn new(cfg: SwitchConfig) -> Self {
        Switch {
            ports: Vec::new(),
            networks: Vec::new(),
            table: MacTable::new(cfg.mac_table),
        }
    }

    pub fn add_network(&mut self, id: NetworkId, mtu: usize) -> Result<(), SwitchError> {
        if self.networks.iter().any(|n| n.id == id) {
            return Err(SwitchError::NetworkExists(id));
        }
        self.networks.push(NetworkState {
            id,
            mtu,
            ports: Vec::new(),
        });
        Ok(())
    }

    pub fn remove_network(&mut self, id: NetworkId) -> Result<(), SwitchError> {
        let i = self
            .networks
            .iter()
            .position(|n| n.id == id)
            .ok_or(SwitchError::UnknownNetwork(id))?;
        if !self.networks[i].ports.is_empty() {
            return Err(SwitchError::NetworkNotEmpty(id));
        }
        self.networks.swap_remove(i);
        self.table.remove_network(id);
        Ok(())
    }

    fn network(&self, id: NetworkId) -> Option<&NetworkState> {
        self.networks.iter().find(|n| n.id == id)
    }

    pub fn network_mtu(&self, id: NetworkId) -> Option<usize> {
        self.network(id).map(|n| n.mtu)
    }

    /// Attach a port. With `mac`, that address is pinned to the port as a static entry.
    pub fn add_port(
        &mut self,
        id: PortId,
        network: NetworkId,
        kind: PortKind,
        mac: Option<MacAddr>,
        anti_spoof: bool,
        now: Instant,
    ) -> Result<(), SwitchError> {
        if self.port(id).is_some() {
            return Err(SwitchError::PortExists(id));
        }
        if self.network(network).is_none() {
            return Err(SwitchError::UnknownNetwork(network));
        }
        if let Some(m) = mac {
            if let Some(other) = self.table.lookup(network, m, now) {
                if self.port(other).is_some_and(|p| p.mac == Some(m)) {
                    return Err(SwitchError::MacInUse(m));
                }
            }
        }
        let idx = id.0 as usize;
        if self.ports.len() <= idx {
            self.ports.resize_with(idx + 1, || None);
        }
        self.ports[idx] = Some(PortState {
            network,
            kind,
            mac,
            anti_spoof,
            counters: PortCounters::default(),
        });
        if let Some(m) = mac {
            self.table.add_static(network, m, id, now);
        }
        let net = self
            .networks
            .iter_mut()
            .find(|n| n.id == network)
            .expect("checked above");
        net.ports.push(id);
        Ok(())
    }

    /// Detach a port: its static and learned entries go with it. Returns its last counters.
    pub fn remove_port(&mut self, id: PortId) -> Result<PortCounters, SwitchError> {
        let st = self
            .ports
            .get_mut(id.0 as usize)
            .and_then(Option::take)
            .ok_or(SwitchError::UnknownPort(id))?;
        if let Some(n) = self.networks.iter_mut().find(|n| n.id == st.network) {
            n.ports.retain(|p| *p != id);
        }
        self.table.remove_port(id);
        Ok(st.counters)
    }

    fn port(&self, id: PortId) -> Option<&PortState> {
        self.ports.get(id.0 as usize).and_then(Option::as_ref)
    }

    pub fn port_network(&self, id: PortId) -> Option<NetworkId> {
        self.port(id).map(|p| p.network)
    }

    pub fn port_kind(&self, id: PortId) -> Option<PortKind> {
        self.port(id).map(|p| p.kind)
    }

    pub fn port_mac(&self, id: PortId) -> Option<MacAddr> {
        self.port(id).and_then(|p| p.mac)
    }

    pub fn counters(&self, id: PortId) -> Option<&PortCounters> {
        self.port(id).map(|p| &p.counters)
    }

    pub fn ports(&self) -> impl Iterator<Item = PortId> + '_ {
        self.ports
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_some())
            .map(|(i, _)| PortId(i as u32))
    }

    /// The ports a flooded frame from `ingress` leaves by: every port of `net` but `ingress`.
    pub fn flood_ports(
        &self,
        net: NetworkId,
        ingress: PortId,
    ) -> impl Iterator<Item = PortId> + '_ {
        self.network(net)
            .map(|n| n.ports.as_slice())
            .unwrap_or(&[])
            .iter()
            .copied()
            .filter(move |p| *p != ingress)
    }

    pub fn table(&self) -> &MacTable {
        &self.table
    }

    pub fn table_mut(&mut self) -> &mut MacTable {
        &mut self.table
    }

    /// Decide where `frame`, received on `ingress` at `now`, goes. Counts rx and drops.
    #[inline]
    pub fn handle_frame(&mut self, ingress: PortId, frame: &[u8], now: Instant) -> Forward {
        self.handle_frame_sized(ingress, frame, now, frame.len())
    }

    /// Like [`Switch::handle_frame`] for an offloaded (GSO) frame, whose wire size, checked
    /// against the MTU, is `wire_len` (headers plus one segment), not its length.
    #[inline]
    pub fn handle_frame_sized(
        &mut self,
        ingress: PortId,
        frame: &[u8],
        now: Instant,
        wire_len: usize,
    ) -> Forward {
        let Some(port) = self
            .ports
            .get_mut(ingress.0 as usize)
            .and_then(Option::as_mut)
        else {
            return Forward::Drop(DropReason::UnknownPort);
        };
        port.counters.rx_packets += 1;
        port.counters.rx_bytes += frame.len() as u64;
        let net = port.network;
        let (Some(dst), Some(src)) = (MacAddr::dst_of(frame), MacAddr::src_of(frame)) else {
            port.counters.drop(DropReason::Runt);
            return Forward::Drop(DropReason::Runt);
        };
        if frame.len() < ETH_HEADER_LEN {
            port.counters.drop(DropReason::Runt);
            return Forward::Drop(DropReason::Runt);
        }
        let mtu = match self.networks.iter().find(|n| n.id == net) {
            Some(n) => n.mtu,
            None => {
                port.counters.drop(DropReason::UnknownPort);
                return Forward::Drop(DropReason::UnknownPort);
            }
        };
        if wire_len > mtu + ETH_OVERHEAD {
            port.counters.drop(DropReason::Oversize);
            return Forward::Drop(DropReason::Oversize);
        }
        if src.is_invalid_source() {
            port.counters.drop(DropReason::InvalidSourceMac);
            return Forward::Drop(DropReason::InvalidSourceMac);
        }
        if port.anti_spoof && port.mac.is_some_and(|m| m != src) {
            port.counters.drop(DropReason::SpoofedSourceMac);
            return Forward::Drop(DropReason::SpoofedSourceMac);
        }
        match self.table.learn(net, src, ingress, now) {
            Learn::Learned | Learn::Static => {}
            Learn::Refused => port.counters.learn_refused += 1,
            Learn::StaticConflict => {
                port.counters.drop(DropReason::StaticMacConflict);
                return Forward::Drop(DropReason::StaticMacConflict);
            }
        }
        if dst.is_multicast() {
            return Forward::Flood(net);
        }
        match self.table.lookup(net, dst, now) {
            Some(p) if p == ingress => {
                port.counters.drop(DropReason::Hairpin);
                Forward::Drop(DropReason::Hairpin)
            }
            Some(p) => Forward::Unicast(p),
            None => Forward::Flood(net),
        }
    }

    /// Record a frame written out of `port`.
    #[inline]
    pub fn note_tx(&mut self, port: PortId, bytes: usize) {
        if let Some(p) = self.ports.get_mut(port.0 as usize).and_then(Option::as_mut) {
            p.counters.tx_packets += 1;
            p.counters.tx_bytes += bytes as u64;
        }
    }

    /// A write counted by [`Self::note_tx`] failed afterwards (the dataplane writes some frames
    /// after the pipeline has returned): count it as a `TxFailed` drop instead.
    pub fn revoke_tx(&mut self, port: PortId, bytes: usize) {
        if let Some(p) = self.ports.get_mut(port.0 as usize).and_then(Option::as_mut) {
            p.counters.tx_packets = p.counters.tx_packets.saturating_sub(1);
            p.counters.tx_bytes = p.counters.tx_bytes.saturating_sub(bytes as u64);
            p.counters.drop(DropReason::TxFailed);
        }
    }

    /// Record a drop on `port` decided outside the switch (tx failure, router verdicts).
    #[inline]
    pub fn note_drop(&mut self, port: PortId, reason: DropReason) {
        if let Some(p) = self.ports.get_mut(port.0 as usize).and_then(Option::as_mut) {
            p.counters.drop(reason);
        }
    }

    /// Age out dynamic MAC entries.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.table.expire(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Duration;
    use proptest::prelude::*;

    fn t(ms: u64) -> Instant {
        Instant::from_millis(ms as i64)
    }

    fn frame(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len.max(14)];
        f[0..6].copy_from_slice(&dst.0);
        f[6..12].copy_from_slice(&src.0);
        f[12] = 0x08;
        f.truncate(len);
        f
    }

    fn m(i: u8) -> MacAddr {
        MacAddr([0x02, 0, 0, 0, 0, i])
    }

    /// Two networks: ports 0,1,2 on network 1, ports 3,4 on network 2.
    fn two_nets() -> Switch {
        let mut s = Switch::new(SwitchConfig::default());
        s.add_network(NetworkId(1), 1500).unwrap();
        s.add_network(NetworkId(2), 1500).unwrap();
        for p in 0..3 {
            s.add_port(
                PortId(p),
                NetworkId(1),
                PortKind::Endpoint,
                None,
                false,
                t(0),
            )
            .unwrap();
        }
        for p in 3..5 {
            s.add_port(
                PortId(p),
                NetworkId(2),
                PortKind::Endpoint,
                None,
                false,
                t(0),
            )
            .unwrap();
        }
        s
    }

    #[test]
    fn unknown_unicast_floods_then_learned_goes_unicast() {
        let mut s = two_nets();
        let f = frame(m(2), m(1), 60);
        assert_eq!(
            s.handle_frame(PortId(0), &f, t(0)),
            Forward::Flood(NetworkId(1))
        );
        let out: Vec<_> = s.flood_ports(NetworkId(1), PortId(0)).collect();
        assert_eq!(out, vec![PortId(1), PortId(2)]);
        let back = frame(m(1), m(2), 60);
        assert_eq!(
            s.handle_frame(PortId(1), &back, t(1)),
            Forward::Unicast(PortId(0))
        );
        assert_eq!(
            s.handle_frame(PortId(0), &f, t(2)),
            Forward::Unicast(PortId(1))
        );
    }

    #[test]
    fn networks_are_isolated() {
        let mut s = two_nets();
        s.handle_frame(PortId(3), &frame(MacAddr::BROADCAST, m(9), 60), t(0));
        // m(9) lives on network 2; network 1 must not find it.
        assert_eq!(
            s.handle_frame(PortId(0), &frame(m(9), m(1), 60), t(1)),
            Forward::Flood(NetworkId(1))
        );
        assert!(s.flood_ports(NetworkId(1), PortId(0)).all(|p| p.0 < 3));
    }

    #[test]
    fn bad_frames_are_dropped_by_reason() {
        let mut s = two_nets();
        assert_eq!(
            s.handle_frame(PortId(0), &[0u8; 13], t(0)),
            Forward::Drop(DropReason::Runt)
        );
        assert_eq!(
            s.handle_frame(PortId(0), &frame(m(2), m(1), 1519), t(0)),
            Forward::Drop(DropReason::Oversize)
        );
        assert_eq!(
            s.handle_frame(PortId(0), &frame(m(2), m(1), 1518), t(0)),
            Forward::Flood(NetworkId(1)),
            "MTU + 18 is allowed (VLAN tag)"
        );
        assert_eq!(
            s.handle_frame(PortId(0), &frame(m(2), MacAddr::BROADCAST, 60), t(0)),
            Forward::Drop(DropReason::InvalidSourceMac)
        );
        assert_eq!(
            s.handle_frame(PortId(0), &frame(m(2), MacAddr::ZERO, 60), t(0)),
            Forward::Drop(DropReason::InvalidSourceMac)
        );
        assert_eq!(
            s.handle_frame(PortId(42), &frame(m(2), m(1), 60), t(0)),
            Forward::Drop(DropReason::UnknownPort)
        );
        let c = s.counters(PortId(0)).unwrap();
        assert_eq!(c.rx_packets, 5);
        assert_eq!(c.dropped(DropReason::Runt), 1);
        assert_eq!(c.dropped(DropReason::Oversize), 1);
        assert_eq!(c.dropped(DropReason::InvalidSourceMac), 2);
    }

    #[test]
    fn static_entries_anti_spoof_and_removal() {
        let mut s = Switch::new(SwitchConfig::default());
        s.add_network(NetworkId(1), 1500).unwrap();
        s.add_port(
            PortId(0),
            NetworkId(1),
            PortKind::Endpoint,
            Some(m(1)),
            true,
            t(0),
        )
        .unwrap();
        s.add_port(
            PortId(1),
            NetworkId(1),
            PortKind::Router,
            Some(m(100)),
            false,
            t(0),
        )
        .unwrap();
        s.add_port(
            PortId(2),
            NetworkId(1),
            PortKind::Endpoint,
            None,
            false,
            t(0),
        )
        .unwrap();
        assert_eq!(
            s.add_port(
                PortId(3),
                NetworkId(1),
                PortKind::Endpoint,
                Some(m(1)),
                false,
                t(0)
            ),
            Err(SwitchError::MacInUse(m(1)))
        );
        // Known before any traffic: static entries.
        assert_eq!(
            s.handle_frame(PortId(2), &frame(m(100), m(5), 60), t(0)),
            Forward::Unicast(PortId(1))
        );
        assert_eq!(
            s.handle_frame(PortId(0), &frame(m(5), m(7), 60), t(0)),
            Forward::Drop(DropReason::SpoofedSourceMac)
        );
        assert_eq!(
            s.handle_frame(PortId(2), &frame(m(5), m(1), 60), t(0)),
            Forward::Drop(DropReason::StaticMacConflict)
        );
        s.remove_port(PortId(0)).unwrap();
        assert_eq!(s.table().lookup(NetworkId(1), m(1), t(0)), None);
        assert!(s.remove_network(NetworkId(1)).is_err());
    }

    #[test]
    fn aging_sends_back_to_flooding() {
        let mut s = Switch::new(SwitchConfig {
            mac_table: MacTableConfig {
                aging: Duration::from_secs(2),
                ..Default::default()
            },
        });
        s.add_network(NetworkId(1), 1500).unwrap();
        s.add_port(
            PortId(0),
            NetworkId(1),
            PortKind::Endpoint,
            None,
            false,
            t(0),
        )
        .unwrap();
        s.add_port(
            PortId(1),
            NetworkId(1),
            PortKind::Endpoint,
            None,
            false,
            t(0),
        )
        .unwrap();
        s.handle_frame(PortId(1), &frame(m(1), m(2), 60), t(0));
        assert_eq!(
            s.handle_frame(PortId(0), &frame(m(2), m(1), 60), t(1000)),
            Forward::Unicast(PortId(1))
        );
        assert_eq!(
            s.handle_frame(PortId(0), &frame(m(2), m(1), 60), t(2500)),
            Forward::Flood(NetworkId(1))
        );
        assert_eq!(
            s.expire(t(2500)),
            1,
            "m(2) aged; m(1) was refreshed at 2500"
        );
    }

    #[derive(Debug, Clone)]
    struct Op {
        port: u32,
        dst: u8,
        src: u8,
        len: usize,
        dt_ms: u64,
    }

    fn op() -> impl Strategy<Value = Op> {
        (0u32..6, 0u8..12, 0u8..12, 0usize..1600, 0u64..3000).prop_map(
            |(port, dst, src, len, dt_ms)| Op {
                port,
                dst,
                src,
                len,
                dt_ms,
            },
        )
    }

    fn mac_of(i: u8) -> MacAddr {
        match i {
            0 => MacAddr::BROADCAST,
            1 => MacAddr([0x01, 0x00, 0x5e, 0, 0, 1]),
            2 => MacAddr::ZERO,
            n => m(n),
        }
    }

    proptest! {
        /// No frame leaves by its ingress port, none crosses networks, a learned unicast MAC gets
        /// exactly one output, and rx counters add up to frames offered.
        #[test]
        fn forwarding_invariants(ops in proptest::collection::vec(op(), 1..300)) {
            let mut s = Switch::new(SwitchConfig {
                mac_table: MacTableConfig { aging: Duration::from_secs(5), max_entries: 16, max_per_port: 4 },
            });
            s.add_network(NetworkId(1), 1500).unwrap();
            s.add_network(NetworkId(2), 1500).unwrap();
            for p in 0..6u32 {
                let net = if p < 3 { NetworkId(1) } else { NetworkId(2) };
                s.add_port(PortId(p), net, PortKind::Endpoint, None, false, t(0)).unwrap();
            }
            let mut now = 0u64;
            let mut offered = [0u64; 6];
            for o in &ops {
                now += o.dt_ms;
                let f = frame(mac_of(o.dst), mac_of(o.src), o.len);
                offered[o.port as usize] += 1;
                let my_net = s.port_network(PortId(o.port)).unwrap();
                match s.handle_frame(PortId(o.port), &f, t(now)) {
                    Forward::Unicast(p) => {
                        prop_assert_ne!(p, PortId(o.port));
                        prop_assert_eq!(s.port_network(p), Some(my_net));
                        prop_assert_eq!(s.table().lookup(my_net, mac_of(o.dst), t(now)), Some(p));
                    }
                    Forward::Flood(n) => {
                        prop_assert_eq!(n, my_net);
                        for p in s.flood_ports(n, PortId(o.port)) {
                            prop_assert_ne!(p, PortId(o.port));
                            prop_assert_eq!(s.port_network(p), Some(my_net));
                        }
                    }
                    Forward::Drop(_) => {}
                }
                prop_assert!(s.table().dynamic_len() <= 16);
                for p in 0..6u32 {
                    prop_assert!(s.table().port_dynamic_len(PortId(p)) <= 4);
                }
            }
            for p in 0..6u32 {
                prop_assert_eq!(s.counters(PortId(p)).unwrap().rx_packets, offered[p as usize]);
            }
        }
    }
}
