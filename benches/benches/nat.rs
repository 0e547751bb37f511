//! NAT microbenchmarks: established-flow translation with 100,000 flows in the table (64-byte
//! frames, both directions), new flows per second, and conntrack memory per flow.
//!
//! `cargo bench -p switchyard-benches --bench nat`; `BENCH_CLOCK=cpu` times the established-flow
//! benchmarks by the thread's CPU time instead of the wall clock ([`ThreadCpu`]).

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration as StdDuration, Instant as StdInstant};

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{Criterion, Throughput};
use switchyard_nat::{
    ConntrackConfig, Egress, Emits, NetworkConfig, Router, RouterConfig, RxMeta, UplinkConfig,
    Verdict,
};
use switchyard_switch::{Instant, MacAddr, NetworkId};

const NET: NetworkId = NetworkId(1);
const GW_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0x77, 1]);
const UP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const UP_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x10]);
const NH_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
/// Containers in the benchmark network (10.77.x.y).
const CONTAINERS: u32 = 1000;
const BATCH: usize = 256;

fn sum(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// A 64-byte Ethernet/IPv4/UDP frame with valid checksums.
fn udp64(
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
) -> Vec<u8> {
    let mut f = vec![0u8; 64];
    udp64_into(&mut f, dst_mac, src_mac, src, sport, dst, dport);
    f
}

fn udp64_into(
    f: &mut [u8],
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
) {
    let payload = [0x5a; 22];
    f.fill(0);
    f[0..6].copy_from_slice(&dst_mac.0);
    f[6..12].copy_from_slice(&src_mac.0);
    f[12..14].copy_from_slice(&[8, 0]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&50u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = fold(sum(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let u = &mut f[34..];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&30u16.to_be_bytes());
    u[8..].copy_from_slice(&payload);
    let pseudo = sum(&src.octets()) + sum(&dst.octets()) + 17 + 30;
    let c = fold(pseudo + sum(u));
    u[6..8].copy_from_slice(&c.to_be_bytes());
}

fn container(i: u32) -> (Ipv4Addr, MacAddr) {
    let ip = Ipv4Addr::from_bits(0x0a4d_0000 + 2 + i);
    (ip, MacAddr::local_from_seed(u64::from(i)))
}

fn remote(i: u32) -> Ipv4Addr {
    Ipv4Addr::from_bits(0xc633_6400 + (i % 200))
}

fn router(max: usize) -> Router {
    let mut r = Router::new(RouterConfig {
        conntrack: ConntrackConfig {
            max,
            ..Default::default()
        },
        ..Default::default()
    });
    r.add_network(NetworkConfig {
        id: NET,
        subnet: Ipv4Addr::new(10, 77, 0, 0),
        prefix_len: 16,
        gateway_ip: Ipv4Addr::new(10, 77, 0, 1),
        gateway_mac: GW_MAC,
        internal: false,
        mtu: 1500,
    })
    .unwrap();
    for i in 0..CONTAINERS {
        let (ip, mac) = container(i);
        r.add_endpoint(NET, ip, mac).unwrap();
    }
    r.set_uplink(Some(UplinkConfig {
        addr: UP,
        prefix_len: 24,
        mac: UP_MAC,
        gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
        gateway_mac: Some(NH_MAC),
    }));
    r
}

/// The outbound frame of flow `i` (container, source port, remote all vary).
fn flow_out(i: u32) -> Vec<u8> {
    let (ip, mac) = container(i % CONTAINERS);
    let sport = 1024 + (i / CONTAINERS) as u16;
    udp64(GW_MAC, mac, ip, sport, remote(i), 53)
}

/// `n` established (assured) UDP flows; returns the router and, per flow, the frame a container
/// sends and the reply frame the remote sends back to the translated tuple.
fn established(n: u32) -> (Router, Vec<u8>, Vec<u8>) {
    let mut r = router(262_144);
    let now = Instant::from_secs(1);
    let mut out = Emits::new();
    let (mut outs, mut replies) = (Vec::new(), Vec::new());
    for i in 0..n {
        let f = flow_out(i);
        out.clear();
        assert_eq!(
            r.handle_from_network(NET, &f, RxMeta::default(), now, &mut out),
            Verdict::Forwarded
        );
        let (e, sent) = out.iter().next().unwrap();
        assert_eq!(e, Egress::Uplink);
        let ext = u16::from_be_bytes([sent[34], sent[35]]);
        let rem = Ipv4Addr::new(sent[30], sent[31], sent[32], sent[33]);
        let reply = udp64(UP_MAC, NH_MAC, rem, 53, UP, ext);
        out.clear();
        assert_eq!(
            r.handle_from_uplink(&reply, RxMeta::default(), now, &mut out),
            Verdict::Forwarded
        );
        outs.push(f);
        replies.push(reply);
    }
    // Visit flows in a scattered order, as real traffic would.
    let mut order: Vec<usize> = (0..n as usize).collect();
    let mut x = 0x9E37_79B9u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    // One contiguous buffer each, read in order (like a NIC ring); the flows they hit are
    // scattered over the table.
    let outs = order.iter().flat_map(|&i| outs[i].clone()).collect();
    let replies = order.iter().flat_map(|&i| replies[i].clone()).collect();
    (r, outs, replies)
}

/// The thread's CPU time (user + system), for comparing builds on a machine other work shares:
/// time spent waiting for a core is left out (another process's cache traffic still counts).
struct ThreadCpu(WallTime);

/// CLOCK_THREAD_CPUTIME_ID (getrusage's per-thread times are too coarse for short samples).
#[allow(unsafe_code)]
fn thread_cpu() -> StdDuration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `t`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    StdDuration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

impl Measurement for ThreadCpu {
    type Intermediate = StdDuration;
    type Value = StdDuration;
    fn start(&self) -> StdDuration {
        thread_cpu()
    }
    fn end(&self, start: StdDuration) -> StdDuration {
        thread_cpu().saturating_sub(start)
    }
    fn add(&self, a: &StdDuration, b: &StdDuration) -> StdDuration {
        *a + *b
    }
    fn zero(&self) -> StdDuration {
        StdDuration::ZERO
    }
    fn to_f64(&self, v: &StdDuration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        self.0.formatter()
    }
}

fn bench_established<M: Measurement>(c: &mut Criterion<M>) {
    let (mut r, outs, replies) = established(
        std::env::var("NAT_FLOWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000),
    );
    let now = Instant::from_secs(2);
    let mut out = Emits::new();
    let mut g = c.benchmark_group("nat_established_100k_flows");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut k = 0usize;
    g.bench_function("uplink_to_container_64B", |b| {
        b.iter(|| {
            out.clear();
            for _ in 0..BATCH {
                let f = &replies[k..k + 64];
                k = if k + 64 == replies.len() { 0 } else { k + 64 };
                black_box(r.handle_from_uplink(f, RxMeta::default(), now, &mut out));
            }
        })
    });
    let mut k = 0usize;
    g.bench_function("container_to_uplink_64B", |b| {
        b.iter(|| {
            out.clear();
            for _ in 0..BATCH {
                let f = &outs[k..k + 64];
                k = if k + 64 == outs.len() { 0 } else { k + 64 };
                black_box(r.handle_from_network(NET, f, RxMeta::default(), now, &mut out));
            }
        })
    });
    // The batch API: the same frames handed over BATCH at a time (as a NIC ring delivers them).
    let mut verdicts = Vec::with_capacity(BATCH);
    let mut k = 0usize;
    g.bench_function("uplink_to_container_64B_batch", |b| {
        b.iter(|| {
            out.clear();
            verdicts.clear();
            let mut fs: [&[u8]; BATCH] = [&[]; BATCH];
            for f in fs.iter_mut() {
                *f = &replies[k..k + 64];
                k = if k + 64 == replies.len() { 0 } else { k + 64 };
            }
            r.handle_batch_from_uplink(&fs, RxMeta::default(), now, &mut out, &mut verdicts);
            black_box(&verdicts);
        })
    });
    let mut k = 0usize;
    g.bench_function("container_to_uplink_64B_batch", |b| {
        b.iter(|| {
            out.clear();
            verdicts.clear();
            let mut fs: [&[u8]; BATCH] = [&[]; BATCH];
            for f in fs.iter_mut() {
                *f = &outs[k..k + 64];
                k = if k + 64 == outs.len() { 0 } else { k + 64 };
            }
            r.handle_batch_from_network(NET, &fs, RxMeta::default(), now, &mut out, &mut verdicts);
            black_box(&verdicts);
        })
    });
    g.finish();
}

fn bench_new_flows(c: &mut Criterion) {
    let mut g = c.benchmark_group("nat_new_flows");
    g.throughput(Throughput::Elements(1));
    // Every packet opens a flow nobody used before (port allocation, insert of both tuples,
    // translation). A fresh 262,144-flow table per sample: once full, the oldest unreplied flow
    // is evicted per new one, the steady state of a busy gateway. Building each frame (~64 bytes
    // and two checksums) is inside the measurement, so the NAT alone is a bit faster.
    g.bench_function("udp_masquerade", |b| {
        b.iter_custom(|iters| {
            let mut r = router(262_144);
            let mut out = Emits::new();
            let mut f = [0u8; 64];
            let now = Instant::from_secs(1);
            let t = StdInstant::now();
            for i in 0..iters as u32 {
                if out.len() >= BATCH {
                    out.clear();
                }
                let (ip, mac) = container(i % CONTAINERS);
                let sport = 1024 + (i / CONTAINERS % 64_000) as u16;
                udp64_into(&mut f, GW_MAC, mac, ip, sport, remote(i / 64_000_000), 53);
                black_box(r.handle_from_network(NET, &f, RxMeta::default(), now, &mut out));
            }
            t.elapsed()
        })
    });
    g.finish();
}

/// Not a criterion measurement: fill a 1,000,000-flow table and report its footprint.
fn memory_per_flow() {
    const N: u32 = 1_000_000;
    let mut r = router(N as usize);
    let mut out = Emits::new();
    let now = Instant::from_secs(1);
    let t = StdInstant::now();
    for i in 0..N {
        out.clear();
        let f = flow_out(i);
        r.handle_from_network(NET, &f, RxMeta::default(), now, &mut out);
    }
    let dt = t.elapsed();
    let bytes = r.conntrack_memory();
    println!(
        "conntrack memory: {} flows, {:.1} MiB ({} bytes/flow; bound for a full 1M table: {:.1} MiB); filled in {:.2?} ({:.2} M flows/s incl. frame building)",
        r.conntrack_len(),
        bytes as f64 / (1 << 20) as f64,
        bytes / r.conntrack_len().max(1),
        switchyard_nat::conntrack::Table::<Ipv4Addr>::memory_bytes_for(N as usize) as f64
            / (1 << 20) as f64,
        dt,
        f64::from(N) / dt.as_secs_f64() / 1e6,
    );
    drop(black_box(r));
    let _ = StdDuration::ZERO;
}

fn configured<M: Measurement>(c: Criterion<M>) -> Criterion<M> {
    c.measurement_time(StdDuration::from_secs(4))
        .warm_up_time(StdDuration::from_secs(1))
        .configure_from_args()
}

fn main() {
    memory_per_flow();
    if std::env::var("BENCH_CLOCK").as_deref() == Ok("cpu") {
        let mut c = configured(Criterion::default().with_measurement(ThreadCpu(WallTime)));
        bench_established(&mut c);
        c.final_summary();
        return;
    }
    let mut c = configured(Criterion::default());
    bench_established(&mut c);
    bench_new_flows(&mut c);
    c.final_summary();
}
