//! TEMPORARY compile shim until switchyard_nat::Router lands. Not committed.
#![allow(dead_code, unused)]
use std::net::Ipv4Addr;
use switchyard_switch::{DropReason, Instant, MacAddr, NetworkId};
#[derive(Default, Clone, Copy)]
pub struct RxMeta {
    pub partial_csum: bool,
}
#[derive(Default)]
pub struct ConntrackConfig {
    pub max: usize,
}
#[derive(Default)]
pub struct RouterConfig {
    pub conntrack: ConntrackConfig,
}
pub struct NetworkConfig {
    pub id: NetworkId,
    pub subnet: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway_ip: Ipv4Addr,
    pub gateway_mac: MacAddr,
    pub internal: bool,
    pub mtu: usize,
}
pub struct UplinkConfig {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: MacAddr,
    pub gateway: Option<Ipv4Addr>,
    pub gateway_mac: Option<MacAddr>,
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}
#[derive(Clone, Debug)]
pub struct PortForward {
    pub proto: Proto,
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub network: NetworkId,
    pub container_ip: Ipv4Addr,
    pub container_port: u16,
}
#[derive(Clone, Copy, Debug)]
pub enum Egress {
    Network(NetworkId),
    Uplink,
}
#[derive(Default)]
pub struct Emits {
    v: Vec<(Egress, Vec<u8>)>,
}
impl Emits {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn clear(&mut self) {
        self.v.clear()
    }
    pub fn iter(&self) -> impl Iterator<Item = (Egress, &[u8])> {
        self.v.iter().map(|(e, f)| (*e, f.as_slice()))
    }
}
pub enum Verdict {
    Forwarded,
    Answered,
    Dropped(DropReason),
    Consumed,
}
#[derive(Debug)]
pub struct NatError;
#[derive(serde::Serialize, Default)]
pub struct NatCounters {
    pub x: u64,
}
pub struct Router {
    c: NatCounters,
}
impl Router {
    pub fn new(_: RouterConfig) -> Self {
        Router {
            c: NatCounters::default(),
        }
    }
    pub fn add_network(&mut self, _: NetworkConfig) -> Result<(), NatError> {
        Ok(())
    }
    pub fn remove_network(&mut self, _: NetworkId) -> Result<(), NatError> {
        Ok(())
    }
    pub fn set_uplink(&mut self, _: Option<UplinkConfig>) {}
    pub fn add_endpoint(&mut self, _: NetworkId, _: Ipv4Addr, _: MacAddr) -> Result<(), NatError> {
        Ok(())
    }
    pub fn remove_endpoint(&mut self, _: NetworkId, _: Ipv4Addr) {}
    pub fn add_forward(&mut self, _: PortForward) -> Result<(), NatError> {
        Ok(())
    }
    pub fn remove_forward(
        &mut self,
        _: Proto,
        _: Option<Ipv4Addr>,
        _: u16,
    ) -> Result<(), NatError> {
        Ok(())
    }
    pub fn handle_from_network(
        &mut self,
        _: NetworkId,
        _: &[u8],
        _: RxMeta,
        _: Instant,
        _: &mut Emits,
    ) -> Verdict {
        Verdict::Dropped(DropReason::Unsupported)
    }
    pub fn handle_from_uplink(
        &mut self,
        _: &[u8],
        _: RxMeta,
        _: Instant,
        _: &mut Emits,
    ) -> Verdict {
        Verdict::Dropped(DropReason::Unsupported)
    }
    pub fn expire(&mut self, _: Instant) {}
    pub fn conntrack(&self, _: Instant) -> Vec<u32> {
        vec![]
    }
    pub fn counters(&self) -> &NatCounters {
        &self.c
    }
}
