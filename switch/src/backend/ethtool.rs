//! The few legacy `SIOCETHTOOL` feature switches the endpoint plumbing needs.
//!
//! Why: a veth with tx checksum offload hands AF_PACKET readers packets whose L4 checksum is only
//! partial (`CHECKSUM_PARTIAL`); forwarded as-is to a tap on the other side of the switch, they
//! arrive corrupt. Until the daemon carries checksum metadata end to end, container-side veths get
//! tx checksumming off, and the kernel then drops TSO and SG with it (`netdev_fix_features`).
//!
//! Every call acts on the interface of that name in the calling thread's network namespace.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};

use super::tap::{ifname_to_c, zeroed_ifreq};

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GSG: u32 = 0x18;
const ETHTOOL_SSG: u32 = 0x19;
const ETHTOOL_GTSO: u32 = 0x1e;
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_GGSO: u32 = 0x23;
const ETHTOOL_SGSO: u32 = 0x24;

/// `struct ethtool_value` from `<linux/ethtool.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

mod ioctls {
    nix::ioctl_write_ptr_bad!(siocethtool, libc::SIOCETHTOOL, libc::ifreq);
}

/// An offload feature with a legacy get/set pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offload {
    TxChecksum,
    ScatterGather,
    Tso,
    Gso,
}

impl Offload {
    fn cmds(self) -> (u32, u32) {
        match self {
            Offload::TxChecksum => (ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM),
            Offload::ScatterGather => (ETHTOOL_GSG, ETHTOOL_SSG),
            Offload::Tso => (ETHTOOL_GTSO, ETHTOOL_STSO),
            Offload::Gso => (ETHTOOL_GGSO, ETHTOOL_SGSO),
        }
    }
}

/// Turns tx checksum offload of `ifname` on or off (`ethtool -K IFNAME tx on|off`).
pub fn set_tx_checksum(ifname: &str, on: bool) -> io::Result<()> {
    set_offload(ifname, Offload::TxChecksum, on)
}

/// Whether tx checksum offload of `ifname` is on.
pub fn tx_checksum(ifname: &str) -> io::Result<bool> {
    get_offload(ifname, Offload::TxChecksum)
}

/// Turns off tx checksum, scatter-gather, TSO and GSO of `ifname`: every frame a reader of that
/// interface sees is then complete and checksummed.
pub fn set_offloads_off(ifname: &str) -> io::Result<()> {
    for feature in [
        Offload::TxChecksum,
        Offload::ScatterGather,
        Offload::Tso,
        Offload::Gso,
    ] {
        set_offload(ifname, feature, false)?;
    }
    Ok(())
}

/// Sets one offload feature.
pub fn set_offload(ifname: &str, feature: Offload, on: bool) -> io::Result<()> {
    let mut value = EthtoolValue {
        cmd: feature.cmds().1,
        data: u32::from(on),
    };
    ethtool(ifname, &mut value)
}

/// Reads one offload feature.
pub fn get_offload(ifname: &str, feature: Offload) -> io::Result<bool> {
    let mut value = EthtoolValue {
        cmd: feature.cmds().0,
        data: 0,
    };
    ethtool(ifname, &mut value)?;
    Ok(value.data != 0)
}

fn ethtool(ifname: &str, value: &mut EthtoolValue) -> io::Result<()> {
    let sock: OwnedFd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut ifr = zeroed_ifreq();
    ifr.ifr_name = ifname_to_c(ifname)?;
    ifr.ifr_ifru.ifru_data = (value as *mut EthtoolValue).cast();
    // SAFETY: `sock` is an open socket; `ifr` names the interface and its data pointer points to
    // `value`, a live `struct ethtool_value` the kernel reads (set) or fills (get) during the call.
    unsafe { ioctls::siocethtool(sock.as_raw_fd(), &ifr) }.map_err(io::Error::from)?;
    Ok(())
}
