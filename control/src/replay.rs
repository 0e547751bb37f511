//! `switchyard replay`: a capture through the in-memory pipeline (DESIGN.md §3, "Replay").
//!
//! The topology ([`Topology`]) is built into the same [`Pipeline`] the daemon runs, and every
//! packet of the capture enters it on the port its interface names, at the packet's timestamp.
//! What each packet causes is recorded as one [`Record`] (the `--json` lines) and the frames
//! that leave are collected per port ([`Replay::to_pcapng`], the `--out` file).
//!
//! Choices the contract leaves open, made here:
//! - The whole capture is read and checked before the first packet is processed, so a malformed
//!   capture prints nothing but the error, and an unknown interface name fails only when a
//!   packet uses it (an interface nothing arrives on is harmless).
//! - An interface without an `if_name` enters `--port` when given, else it is an error.
//! - `uplink` is a valid ingress even without `[uplink]`; such packets are dropped (`no_route`).
//! - The pipeline's clock never goes back: a packet stamped earlier than the one before it is
//!   processed at the later time (its output keeps its own stamp). Housekeeping (MAC aging,
//!   conntrack, fragment and ARP expiry) runs before each packet at that packet's time.
//! - `egress` names each port once, in order of its first frame for that packet.
//! - OUT is little-endian pcapng: one section, IDBs (`if_name`, nanosecond `if_tsresol`) in
//!   order of the port's first frame, then the frames in emission order.
//! - `--partial-csum` completes the IPv4 header checksum and, for unfragmented packets, the
//!   TCP, UDP (unless zero: no checksum) and ICMP checksums of every input frame before it
//!   enters the pipeline, so translated and switched copies both leave with valid ones.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration as StdDuration;

use clap::Args;
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::section_header::SectionHeaderBlock;
use pcap_file::pcapng::{Block, PcapNgParser, PcapNgWriter};
use pcap_file::{DataLink, Endianness, PcapError};
use serde::Serialize;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet, TcpPacket,
    UdpPacket,
};
use switchyard_nat::RxMeta;
use switchyard_switch::{Instant, PortId};

use crate::error::{Error, Result};
use crate::pipeline::{Out, Pipeline};
use crate::topology::{Topology, UPLINK_PORT};

/// `switchyard replay` arguments.
#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    /// The topology, in TOML.
    #[arg(long, value_name = "FILE")]
    pub topology: PathBuf,
    /// The capture to replay: pcapng (interface names are ingress ports) or classic pcap.
    #[arg(long = "in", value_name = "IN")]
    pub input: PathBuf,
    /// Write what left each port here, as pcapng.
    #[arg(long, value_name = "OUT")]
    pub out: Option<PathBuf>,
    /// Ingress port of a classic pcap (and of pcapng interfaces without a name).
    #[arg(long, value_name = "NAME")]
    pub port: Option<String>,
    /// One JSON line per input packet on stdout.
    #[arg(long)]
    pub json: bool,
    /// Complete the checksums of input frames first (captures from offloading interfaces).
    #[arg(long)]
    pub partial_csum: bool,
}

/// How a capture is replayed.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Ingress of classic pcap packets and of unnamed pcapng interfaces.
    pub port: Option<String>,
    pub partial_csum: bool,
}

/// What one input packet caused (one `--json` line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    pub n: u64,
    pub ingress: String,
    pub verdict: &'static str,
    pub reason: Option<&'static str>,
    pub egress: Vec<String>,
}

/// A frame that left a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emitted {
    /// Index into [`Replay::ports`].
    pub port: usize,
    /// Time of the input packet that caused it, in nanoseconds since the epoch.
    pub time_ns: u64,
    pub frame: Vec<u8>,
}

/// The result of a replay.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    pub records: Vec<Record>,
    /// Port names: the endpoints in topology order, then `uplink`.
    pub ports: Vec<String>,
    /// Frames out, in emission order.
    pub emitted: Vec<Emitted>,
}

/// The port a packet enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ingress {
    Port(PortId),
    Uplink,
}

/// One packet of the capture.
struct InPacket<'a> {
    /// Index into the capture's interface list.
    iface: usize,
    time_ns: u64,
    data: Cow<'a, [u8]>,
}

/// One capture interface.
struct Iface {
    name: Option<String>,
    linktype: DataLink,
    /// Nanoseconds per tick, as (numerator, denominator).
    tick: (u128, u128),
    offset_s: u64,
}

struct Capture<'a> {
    ifaces: Vec<Iface>,
    packets: Vec<InPacket<'a>>,
}

const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

fn capture_error(e: PcapError) -> Error {
    let what = match e {
        PcapError::IncompleteBuffer => "truncated".to_string(),
        PcapError::IoError(e) => e.to_string(),
        PcapError::InvalidField(f) => format!("invalid field ({f})"),
        PcapError::Utf8Error(_) | PcapError::FromUtf8Error(_) => {
            "invalid UTF-8 in an option".into()
        }
        PcapError::InvalidInterfaceId(i) => format!("no interface {i}"),
    };
    Error::invalid(what)
}

/// Nanoseconds per tick of an `if_tsresol` value.
fn tick_of(tsresol: u8) -> (u128, u128) {
    let exp = u32::from(tsresol & 0x7f);
    if tsresol & 0x80 == 0 {
        // 10^-exp seconds
        if exp <= 9 {
            (10u128.pow(9 - exp), 1)
        } else {
            (1, 10u128.checked_pow(exp - 9).unwrap_or(u128::MAX))
        }
    } else {
        // 2^-exp seconds
        (1_000_000_000, 1u128.checked_shl(exp).unwrap_or(u128::MAX))
    }
}

impl Iface {
    fn time_ns(&self, ticks: u64) -> u64 {
        let ns = u128::from(ticks) * self.tick.0 / self.tick.1;
        let ns = ns.saturating_add(u128::from(self.offset_s) * 1_000_000_000);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}

fn read_pcapng(bytes: &[u8]) -> Result<Capture<'_>> {
    let (mut rest, mut parser) = PcapNgParser::new(bytes).map_err(capture_error)?;
    let mut cap = Capture {
        ifaces: Vec::new(),
        packets: Vec::new(),
    };
    // Index in `cap.ifaces` of the current section's first interface.
    let mut base = 0;
    let mut last_ns = 0;
    while !rest.is_empty() {
        let (r, block) = parser.next_block(rest).map_err(capture_error)?;
        rest = r;
        let (iface, ticks_ns, data) = match block {
            Block::SectionHeader(_) => {
                base = cap.ifaces.len();
                continue;
            }
            Block::InterfaceDescription(idb) => {
                let mut iface = Iface {
                    name: None,
                    linktype: idb.linktype,
                    tick: tick_of(6),
                    offset_s: 0,
                };
                for o in &idb.options {
                    match o {
                        InterfaceDescriptionOption::IfName(n) => iface.name = Some(n.to_string()),
                        InterfaceDescriptionOption::IfTsResol(r) => iface.tick = tick_of(*r),
                        InterfaceDescriptionOption::IfTsOffset(s) => iface.offset_s = *s,
                        _ => {}
                    }
                }
                cap.ifaces.push(iface);
                continue;
            }
            // pcap-file reads the raw tick count into `timestamp` as if it were nanoseconds.
            Block::EnhancedPacket(p) => (
                p.interface_id as usize,
                Some(u64::try_from(p.timestamp.as_nanos()).unwrap_or(u64::MAX)),
                p.data,
            ),
            Block::Packet(p) => (usize::from(p.interface_id), Some(p.timestamp), p.data),
            // No timestamp: it happened no earlier than the packet before it.
            Block::SimplePacket(p) => (0, None, p.data),
            _ => continue,
        };
        let n = cap.packets.len() + 1;
        let index = base + iface;
        let Some(ifc) = cap.ifaces[base..].get(iface) else {
            return Err(Error::invalid(format!(
                "packet {n}: no interface {iface} in its section"
            )));
        };
        if ifc.linktype != DataLink::ETHERNET {
            return Err(Error::invalid(format!(
                "packet {n}: interface {} has link type {:?}, not Ethernet",
                ifc.name.as_deref().unwrap_or("(unnamed)"),
                ifc.linktype
            )));
        }
        let time_ns = ticks_ns.map(|t| ifc.time_ns(t)).unwrap_or(last_ns);
        last_ns = time_ns;
        cap.packets.push(InPacket {
            iface: index,
            time_ns,
            data,
        });
    }
    Ok(cap)
}

fn read_pcap(bytes: &[u8]) -> Result<Capture<'_>> {
    use pcap_file::pcap::PcapParser;
    use pcap_file::TsResolution;
    let (mut rest, parser) = PcapParser::new(bytes).map_err(capture_error)?;
    let header = parser.header();
    if header.datalink != DataLink::ETHERNET {
        return Err(Error::invalid(format!(
            "link type {:?}, not Ethernet",
            header.datalink
        )));
    }
    let frac_ns: u64 = match header.ts_resolution {
        TsResolution::MicroSecond => 1000,
        TsResolution::NanoSecond => 1,
    };
    let mut cap = Capture {
        ifaces: vec![Iface {
            name: None,
            linktype: DataLink::ETHERNET,
            tick: (1, 1),
            offset_s: 0,
        }],
        packets: Vec::new(),
    };
    while !rest.is_empty() {
        // The raw packet: pcap-file's checked one refuses a packet cut by the snaplen.
        let (r, p) = parser.next_raw_packet(rest).map_err(capture_error)?;
        rest = r;
        let time_ns = u64::from(p.ts_sec) * 1_000_000_000 + u64::from(p.ts_frac) * frac_ns;
        cap.packets.push(InPacket {
            iface: 0,
            time_ns,
            data: p.data,
        });
    }
    Ok(cap)
}

fn read_capture(bytes: &[u8]) -> Result<Capture<'_>> {
    match bytes.get(..4) {
        Some(m) if m == PCAPNG_MAGIC => read_pcapng(bytes),
        Some([0xa1, 0xb2, 0xc3, 0xd4] | [0xd4, 0xc3, 0xb2, 0xa1])
        | Some([0xa1, 0xb2, 0x3c, 0x4d] | [0x4d, 0x3c, 0xb2, 0xa1]) => read_pcap(bytes),
        _ => Err(Error::invalid("not a pcapng or pcap file")),
    }
}

/// Complete the IPv4 header checksum and, for a whole datagram, its TCP/UDP/ICMP checksum
/// (a UDP checksum of zero means none and stays zero). Anything unparsable is left alone.
pub fn complete_checksums(frame: &mut [u8]) {
    let Ok(mut eth) = EthernetFrame::new_checked(frame) else {
        return;
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return;
    };
    if ip.version() != 4 {
        return;
    }
    ip.fill_checksum();
    if ip.more_frags() || ip.frag_offset() != 0 {
        return;
    }
    let (src, dst) = (
        IpAddress::Ipv4(ip.src_addr()),
        IpAddress::Ipv4(ip.dst_addr()),
    );
    let proto = ip.next_header();
    let l4 = ip.payload_mut();
    match proto {
        IpProtocol::Tcp => {
            if let Ok(mut t) = TcpPacket::new_checked(l4) {
                t.fill_checksum(&src, &dst);
            }
        }
        IpProtocol::Udp => {
            if let Ok(mut u) = UdpPacket::new_checked(l4) {
                if u.checksum() != 0 {
                    u.fill_checksum(&src, &dst);
                }
            }
        }
        IpProtocol::Icmp => {
            if let Ok(mut i) = Icmpv4Packet::new_checked(l4) {
                i.fill_checksum();
            }
        }
        _ => {}
    }
}

/// Replay `capture` (pcapng or pcap bytes) through `topo`'s pipeline.
pub fn replay(topo: &Topology, capture: &[u8], opts: &Options) -> Result<Replay> {
    let cap = read_capture(capture).map_err(|e| e.context("capture"))?;

    // Ports: endpoints by name, then the uplink.
    let mut ports: Vec<String> = topo.endpoints.iter().map(|e| e.name.clone()).collect();
    ports.push(UPLINK_PORT.to_string());
    let uplink_index = ports.len() - 1;
    let by_port: HashMap<PortId, usize> = topo
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| (e.port, i))
        .collect();

    // Resolve each used interface to its ingress port, before anything is processed.
    let mut ingress_of: Vec<Option<(Ingress, usize)>> = vec![None; cap.ifaces.len()];
    for (k, p) in cap.packets.iter().enumerate() {
        if ingress_of[p.iface].is_some() {
            continue;
        }
        let name = cap.ifaces[p.iface]
            .name
            .as_deref()
            .or(opts.port.as_deref())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "packet {}: its interface has no name; give --port NAME",
                    k + 1
                ))
            })?;
        let resolved = if name == UPLINK_PORT {
            (Ingress::Uplink, uplink_index)
        } else if let Some(e) = topo.endpoint(name) {
            (Ingress::Port(e.port), by_port[&e.port])
        } else {
            let mut known: Vec<&str> = topo.endpoints.iter().map(|e| e.name.as_str()).collect();
            known.push(UPLINK_PORT);
            return Err(Error::invalid(format!(
                "packet {}: interface {name:?} is not a port of the topology (ports: {})",
                k + 1,
                known.join(", ")
            )));
        };
        ingress_of[p.iface] = Some(resolved);
    }

    let mut pipeline: Pipeline = topo.build(Instant::ZERO)?;
    let mut out = Replay {
        records: Vec::with_capacity(cap.packets.len()),
        ports,
        emitted: Vec::new(),
    };
    let mut clock_us: i64 = 0;
    let mut frame = Vec::new();
    for (k, p) in cap.packets.iter().enumerate() {
        let (ingress, ingress_index) =
            ingress_of[p.iface].ok_or_else(|| Error::internal("an interface was not resolved"))?;
        // At most ~1.8e16 us (u64 nanoseconds), far from Instant's i64 limits.
        clock_us = clock_us.max((p.time_ns / 1000) as i64);
        let now = Instant::from_micros(clock_us);
        pipeline.expire(now);
        frame.clear();
        frame.extend_from_slice(&p.data);
        if opts.partial_csum {
            complete_checksums(&mut frame);
        }
        let first = out.emitted.len();
        let mut tx = |o: Out, f: &[u8]| -> bool {
            let port = match o {
                Out::Uplink => uplink_index,
                Out::Port(id) => match by_port.get(&id) {
                    Some(&i) => i,
                    // Only endpoint ports are handed out; nothing else can take a frame.
                    None => return false,
                },
            };
            out.emitted.push(Emitted {
                port,
                time_ns: p.time_ns,
                frame: f.to_vec(),
            });
            true
        };
        let meta = RxMeta::default();
        let v = match ingress {
            Ingress::Port(id) => pipeline.from_port(id, &frame, meta, now, &mut tx),
            Ingress::Uplink => pipeline.from_uplink(&frame, meta, now, &mut tx),
        };
        let mut egress: Vec<String> = Vec::new();
        for e in &out.emitted[first..] {
            let name = &out.ports[e.port];
            if !egress.contains(name) {
                egress.push(name.clone());
            }
        }
        out.records.push(Record {
            n: k as u64 + 1,
            ingress: out.ports[ingress_index].clone(),
            verdict: v.name(),
            reason: v.reason().map(|r| r.as_str()),
            egress,
        });
    }
    Ok(out)
}

impl Replay {
    /// The output capture: little-endian pcapng, one interface per port that emitted
    /// something (in order of its first frame), frames in emission order. Deterministic.
    pub fn to_pcapng(&self) -> Result<Vec<u8>> {
        let section = SectionHeaderBlock {
            endianness: Endianness::Little,
            ..Default::default()
        };
        let werr = |e: PcapError| Error::internal(format!("writing pcapng: {e}"));
        let mut w = PcapNgWriter::with_section_header(Vec::new(), section).map_err(werr)?;
        let mut iface_of: Vec<Option<u32>> = vec![None; self.ports.len()];
        let mut order: Vec<usize> = Vec::new();
        for e in &self.emitted {
            if iface_of[e.port].is_none() {
                iface_of[e.port] = Some(order.len() as u32);
                order.push(e.port);
            }
        }
        for &port in &order {
            let idb = InterfaceDescriptionBlock {
                linktype: DataLink::ETHERNET,
                snaplen: 0,
                options: vec![
                    InterfaceDescriptionOption::IfName(Cow::Borrowed(self.ports[port].as_str())),
                    InterfaceDescriptionOption::IfTsResol(9),
                ],
            };
            w.write_pcapng_block(idb).map_err(werr)?;
        }
        for e in &self.emitted {
            let epb = EnhancedPacketBlock {
                interface_id: iface_of[e.port].expect("assigned above"),
                // Nanoseconds: the interfaces say if_tsresol 9, and pcap-file writes the
                // duration's nanoseconds as the tick count.
                timestamp: StdDuration::from_nanos(e.time_ns),
                original_len: e.frame.len() as u32,
                data: Cow::Borrowed(&e.frame),
                options: Vec::new(),
            };
            w.write_pcapng_block(epb).map_err(werr)?;
        }
        Ok(w.into_inner())
    }

    /// The `--json` lines, each ending in a newline.
    pub fn json_lines(&self) -> String {
        let mut s = String::new();
        for r in &self.records {
            s.push_str(&serde_json::to_string(r).expect("records serialise"));
            s.push('\n');
        }
        s
    }

    /// A human summary: verdict counts and frames out per port.
    pub fn summary(&self) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for r in &self.records {
            match counts.iter_mut().find(|(v, _)| *v == r.verdict) {
                Some((_, c)) => *c += 1,
                None => counts.push((r.verdict, 1)),
            }
        }
        let verdicts: Vec<String> = counts.iter().map(|(v, c)| format!("{c} {v}")).collect();
        let mut per_port: Vec<(usize, usize)> = Vec::new();
        for e in &self.emitted {
            match per_port.iter_mut().find(|(p, _)| *p == e.port) {
                Some((_, c)) => *c += 1,
                None => per_port.push((e.port, 1)),
            }
        }
        let ports: Vec<String> = per_port
            .iter()
            .map(|(p, c)| format!("{} {c}", self.ports[*p]))
            .collect();
        format!(
            "{} packets in ({}); {} frames out ({})",
            self.records.len(),
            if verdicts.is_empty() {
                "none".to_string()
            } else {
                verdicts.join(", ")
            },
            self.emitted.len(),
            if ports.is_empty() {
                "none".to_string()
            } else {
                ports.join(", ")
            }
        )
    }
}

/// `switchyard replay`.
pub fn run(a: ReplayArgs) -> Result<i32> {
    let topo = Topology::load(&a.topology)?;
    let bytes = std::fs::read(&a.input)
        .map_err(|e| Error::from(e).context(format!("reading {}", a.input.display())))?;
    let opts = Options {
        port: a.port.clone(),
        partial_csum: a.partial_csum,
    };
    let r = replay(&topo, &bytes, &opts).map_err(|e| e.context(a.input.display()))?;
    if let Some(path) = &a.out {
        let pcap = r.to_pcapng()?;
        std::fs::write(path, pcap)
            .map_err(|e| Error::from(e).context(format!("writing {}", path.display())))?;
    }
    let mut stdout = std::io::stdout().lock();
    let text = if a.json {
        r.json_lines()
    } else {
        format!("{}\n", r.summary())
    };
    stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
        .map_err(|e| Error::from(e).context("writing to stdout"))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcapng::blocks::simple_packet::SimplePacketBlock;

    const TOPO: &str = r#"
[[network]]
name = "n"
subnet = "10.1.0.0/24"
gateway = "10.1.0.1"
gateway_mac = "02:00:00:00:01:01"
[[endpoint]]
network = "n"
name = "a"
mac = "02:00:00:00:01:02"
ip = "10.1.0.2"
[[endpoint]]
network = "n"
name = "b"
mac = "02:00:00:00:01:03"
ip = "10.1.0.3"
"#;

    fn idb(name: Option<&str>, tsresol: Option<u8>) -> InterfaceDescriptionBlock<'_> {
        let mut options = Vec::new();
        if let Some(n) = name {
            options.push(InterfaceDescriptionOption::IfName(Cow::Borrowed(n)));
        }
        if let Some(r) = tsresol {
            options.push(InterfaceDescriptionOption::IfTsResol(r));
        }
        InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen: 0,
            options,
        }
    }

    fn epb(iface: u32, ticks: u64, data: &[u8]) -> EnhancedPacketBlock<'_> {
        EnhancedPacketBlock {
            interface_id: iface,
            timestamp: StdDuration::from_nanos(ticks),
            original_len: data.len() as u32,
            data: Cow::Borrowed(data),
            options: Vec::new(),
        }
    }

    /// a -> b, unicast (b's MAC is static).
    const A_TO_B: [u8; 14] = [2, 0, 0, 0, 1, 3, 2, 0, 0, 0, 1, 2, 0x88, 0xb5];
    const B_TO_A: [u8; 14] = [2, 0, 0, 0, 1, 2, 2, 0, 0, 0, 1, 3, 0x88, 0xb5];

    fn section() -> SectionHeaderBlock<'static> {
        SectionHeaderBlock {
            endianness: Endianness::Big,
            ..Default::default()
        }
    }

    #[test]
    fn sections_resolutions_and_simple_packets() {
        let mut w = PcapNgWriter::with_section_header(Vec::new(), section()).unwrap();
        // Section 1: "a" in nanoseconds, then a simple packet on interface 0.
        w.write_pcapng_block(idb(Some("a"), Some(9))).unwrap();
        w.write_pcapng_block(epb(0, 1_500_000_000, &A_TO_B))
            .unwrap();
        w.write_pcapng_block(SimplePacketBlock {
            original_len: 14,
            data: Cow::Borrowed(&A_TO_B),
        })
        .unwrap();
        // Section 2: interface ids start again; "b" in microseconds (the default), and an
        // unnamed interface that enters --port.
        w.write_block(&Block::SectionHeader(section())).unwrap();
        w.write_pcapng_block(idb(Some("b"), None)).unwrap();
        w.write_pcapng_block(idb(None, Some(0x80 | 10))).unwrap();
        w.write_pcapng_block(epb(0, 2_000_000, &B_TO_A)).unwrap();
        w.write_pcapng_block(epb(1, 3 * 1024, &A_TO_B)).unwrap();
        let bytes = w.into_inner();

        let topo = Topology::parse(TOPO).unwrap();
        let opts = Options {
            port: Some("a".into()),
            partial_csum: false,
        };
        let r = replay(&topo, &bytes, &opts).unwrap();
        let got: Vec<(&str, &str, &[String])> = r
            .records
            .iter()
            .map(|x| (x.ingress.as_str(), x.verdict, x.egress.as_slice()))
            .collect();
        let (a, b) = (["a".to_string()], ["b".to_string()]);
        assert_eq!(
            got,
            vec![
                ("a", "forwarded", &b[..]),
                ("a", "forwarded", &b[..]),
                ("b", "forwarded", &a[..]),
                ("a", "forwarded", &b[..]),
            ]
        );
        let times: Vec<u64> = r.emitted.iter().map(|e| e.time_ns).collect();
        assert_eq!(
            times,
            vec![1_500_000_000, 1_500_000_000, 2_000_000_000, 3_000_000_000],
            "ns, the simple packet at the time before it, us, 2^-10 s"
        );

        // Without --port the unnamed interface is an error, naming the packet.
        let e = replay(&topo, &bytes, &Options::default()).unwrap_err();
        assert!(e.to_string().contains("packet 4"), "{e}");
    }

    #[test]
    fn output_is_little_endian_pcapng_with_named_nanosecond_interfaces() {
        let mut w = PcapNgWriter::with_section_header(Vec::new(), section()).unwrap();
        w.write_pcapng_block(idb(Some("b"), None)).unwrap();
        w.write_pcapng_block(epb(0, 7, &B_TO_A)).unwrap();
        let topo = Topology::parse(TOPO).unwrap();
        let r = replay(&topo, &w.into_inner(), &Options::default()).unwrap();
        let out = r.to_pcapng().unwrap();
        assert_eq!(&out[..4], &PCAPNG_MAGIC);
        assert_eq!(
            &out[8..12],
            &[0x4d, 0x3c, 0x2b, 0x1a],
            "little-endian byte-order magic"
        );
        let cap = read_capture(&out).unwrap();
        assert_eq!(cap.ifaces.len(), 1);
        assert_eq!(cap.ifaces[0].name.as_deref(), Some("a"));
        assert_eq!(cap.ifaces[0].tick, (1, 1));
        assert_eq!(cap.packets[0].time_ns, 7_000);
        assert_eq!(&cap.packets[0].data[..], &B_TO_A);
    }

    #[test]
    fn partial_checksums_are_completed() {
        // IPv4/UDP with both checksums zeroed... except UDP zero means none: use 0x1234.
        let mut f = vec![0u8; 14 + 20 + 8 + 4];
        f[12..14].copy_from_slice(&[8, 0]);
        f[14..34].copy_from_slice(&[
            0x45, 0, 0, 32, 0, 1, 0, 0, 64, 17, 0, 0, 10, 1, 0, 2, 10, 1, 0, 3,
        ]);
        f[34..42].copy_from_slice(&[0, 1, 0, 2, 0, 12, 0x12, 0x34]);
        complete_checksums(&mut f);
        let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
        assert!(ip.verify_checksum());
        let (s, d) = (
            IpAddress::Ipv4(ip.src_addr()),
            IpAddress::Ipv4(ip.dst_addr()),
        );
        assert!(UdpPacket::new_checked(ip.payload())
            .unwrap()
            .verify_checksum(&s, &d));
        // A zero UDP checksum stays zero.
        f[40..42].copy_from_slice(&[0, 0]);
        complete_checksums(&mut f);
        assert_eq!(&f[40..42], &[0, 0]);
        // Anything else is left alone.
        let mut junk = vec![0xffu8; 20];
        complete_checksums(&mut junk);
        assert_eq!(junk, vec![0xff; 20]);
    }
}
