//! The dataplane's I/O for the embedded DNS server ([`crate::dns`]): with no raw uplink,
//! upstream queries go out of one host UDP socket (opened on first use, in the daemon's own
//! network namespace) and its answers come back through the mio loop; the server's timers run
//! on the loop's clock. With a raw uplink the pipeline sends upstream queries as packets from
//! the uplink address and nothing here is used but the timers.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant as WallInstant};

use mio::{Interest, Token};

use super::{Direction, DpState, Out, TOKEN_BASE};

/// The DNS socket's mio token (port tokens are far below, socket-uplink tokens above).
pub(super) const DNS_TOKEN: Token = Token(TOKEN_BASE - 1);

/// The DNS server's host-side state in the dataplane.
#[derive(Default)]
pub(super) struct DnsIo {
    sock: Option<mio::net::UdpSocket>,
    /// Host socket errors (open, send): logged once, counted.
    pub errors: u64,
}

impl DpState {
    /// When the loop should wake for the DNS server's timers (an upstream timeout, a TCP
    /// retransmission or idle timeout).
    pub(super) fn dns_due(&self) -> Option<WallInstant> {
        let (at, now) = (self.pipeline.dns_poll_at()?, self.now());
        let left = if at > now {
            (at - now).total_micros()
        } else {
            0
        };
        Some(WallInstant::now() + Duration::from_micros(left))
    }

    /// One round: read answers (when `readable`), send queued upstream queries, run timers.
    pub(super) fn dns_round(&mut self, readable: bool) {
        let now = self.now();
        let DpState {
            pipeline,
            ports,
            uplink,
            captures,
            dns_io,
            registry,
            ..
        } = self;
        let (ports, captures, uplink) = (&*ports, &*captures, uplink.as_ref());
        let capturing = !captures.list.is_empty();
        let mut tx = |o: Out, frame: &[u8]| -> bool {
            match o {
                Out::Port(p) => {
                    let Some(io) = ports.get(p.0 as usize).and_then(Option::as_ref) else {
                        return false;
                    };
                    let ok = io.write(frame, None, &mut Vec::new()).is_ok();
                    if capturing && ok {
                        captures.copy(p, Direction::ToContainer, frame);
                    }
                    ok
                }
                Out::Uplink => uplink.is_some_and(|u| u.write(frame).is_ok()),
            }
        };
        if readable {
            if let Some(s) = &dns_io.sock {
                let mut buf = [0u8; 4096];
                // Edge-triggered: drain to WouldBlock, or the rest waits for the next datagram.
                loop {
                    match s.recv_from(&mut buf) {
                        Ok((n, SocketAddr::V4(from))) => {
                            pipeline.dns_from_host(from, &buf[..n], now, &mut tx)
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }
        }
        if pipeline.dns_poll_at().is_some_and(|t| t <= now) {
            pipeline.dns_expire(now, &mut tx);
        }
        let ups = pipeline.dns_take_upstream();
        if ups.is_empty() {
            return;
        }
        if dns_io.sock.is_none() {
            match open_socket(registry) {
                Ok(s) => dns_io.sock = Some(s),
                Err(e) => {
                    if dns_io.errors == 0 {
                        tracing::warn!("DNS: opening the upstream socket: {e}");
                    }
                    dns_io.errors += 1;
                    return;
                }
            }
        }
        let Some(s) = &dns_io.sock else { return };
        for (to, payload) in ups {
            if let Err(e) = s.send_to(&payload, SocketAddr::V4(to)) {
                if dns_io.errors == 0 {
                    tracing::warn!(upstream = %to, "DNS: sending upstream: {e}");
                }
                dns_io.errors += 1;
            }
        }
    }
}

fn open_socket(registry: &mio::Registry) -> std::io::Result<mio::net::UdpSocket> {
    let mut s = mio::net::UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(
        std::net::Ipv4Addr::UNSPECIFIED,
        0,
    )))?;
    registry.register(&mut s, DNS_TOKEN, Interest::READABLE)?;
    Ok(s)
}
