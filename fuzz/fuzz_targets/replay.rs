#![no_main]
//! Any bytes as the capture of `switchyard replay` (the fuzz topology; classic pcap packets
//! enter c1): never a panic. A replay that succeeds gives one record per packet, and its
//! output pcapng reads back with every frame it emitted.

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pcap_file::pcapng::{Block, PcapNgParser};
use switchyard_control::replay::{self, Options};
use switchyard_control::topology::Topology;
use switchyard_fuzz::TOPOLOGY;

static TOPO: OnceLock<Topology> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let topo = TOPO.get_or_init(|| Topology::parse(TOPOLOGY).expect("fuzz topology"));
    let opts = Options {
        port: Some("c1".into()),
        partial_csum: data.len() % 2 == 1,
    };
    let Ok(r) = replay::replay(topo, data, &opts) else {
        return;
    };
    for (i, rec) in r.records.iter().enumerate() {
        assert_eq!(rec.n, i as u64 + 1);
    }
    let out = r.to_pcapng().expect("output pcapng");
    let (mut rest, mut parser) = PcapNgParser::new(&out).expect("output parses");
    let mut frames = 0;
    while !rest.is_empty() {
        let (more, block) = parser.next_block(rest).expect("output block parses");
        rest = more;
        if let Block::EnhancedPacket(p) = block {
            assert_eq!(&p.data[..], &r.emitted[frames].frame[..]);
            frames += 1;
        }
    }
    assert_eq!(frames, r.emitted.len());
});
