//! Masquerade: a container's new flow to the outside leaves from the uplink address, with its
//! source port (or ICMP echo id) kept when that external tuple is free, else one from the
//! configured range.

use switchyard_switch::DropReason;

use crate::config::{NetworkConfig, Verdict};
use crate::conntrack::tcp::TcpFlags;
use crate::conntrack::{
    Dir, InsertError, Inserted, Kind, NewConn, State, Tuple, Zone, UPLINK_ZONE,
};
use crate::emit::Emits;
use crate::packet::L4Info;
use crate::ports;
use crate::router::{Router, Rx};

/// The state a flow starts in, if this packet may start one (TCP: a bare SYN only; ICMP: an
/// echo request only).
pub(crate) fn initial_state(l4: &L4Info) -> Result<State, DropReason> {
    match *l4 {
        L4Info::Tcp { flags, .. } if TcpFlags::from_byte(flags).is_initial_syn() => {
            Ok(State::SynSent)
        }
        L4Info::Tcp { .. } => Err(DropReason::InvalidState),
        L4Info::Udp { .. } => Ok(State::UdpUnreplied),
        L4Info::Echo { request: true, .. } => Ok(State::Icmp),
        _ => Err(DropReason::NotForUs),
    }
}

impl Router {
    /// The state a new flow starts in, or the verdict instead: dropped when this packet may
    /// not open a flow, a time-exceeded error back when its TTL runs out here.
    pub(crate) fn open_flow(
        &mut self,
        rx: &Rx,
        l4: &L4Info,
        out: &mut Emits,
    ) -> Result<State, Verdict> {
        let state = initial_state(l4).map_err(Verdict::Dropped)?;
        if rx.ip.ttl <= 1 {
            return Err(self.icmp_error_back(
                rx,
                Some(l4),
                crate::icmp::TIME_EXCEEDED_TTL,
                0,
                DropReason::TtlExceeded,
                out,
            ));
        }
        Ok(state)
    }

    /// Container to outside, first packet of a flow.
    pub(crate) fn masquerade(
        &mut self,
        rx: &Rx,
        n: &NetworkConfig,
        l4: &L4Info,
        key: Tuple,
        out: &mut Emits,
    ) -> Verdict {
        let Some(up) = self.uplink else {
            return Verdict::Dropped(DropReason::NoRoute);
        };
        let state = match self.open_flow(rx, l4, out) {
            Ok(s) => s,
            Err(v) => return v,
        };
        // Replies: remote -> uplink address, to the port we pick.
        let template = Tuple {
            src: key.dst,
            dst: up.addr,
            sport: key.dport,
            dport: 0,
            proto: key.proto,
        };
        self.new_flow(
            rx,
            l4,
            key,
            template,
            UPLINK_ZONE,
            n,
            state,
            Kind::Snat,
            out,
        )
    }

    /// Allocate the reply tuple's port, insert the flow and forward its first packet.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new_flow(
        &mut self,
        rx: &Rx,
        l4: &L4Info,
        key: Tuple,
        template: Tuple,
        reply_zone: Zone,
        n: &NetworkConfig,
        state: State,
        kind: Kind,
        out: &mut Emits,
    ) -> Verdict {
        let Some(port) = ports::allocate(
            &mut self.table,
            reply_zone,
            template,
            key.sport,
            self.cfg.port_range,
            &mut self.rng,
            rx.now,
        ) else {
            self.counters.ports_exhausted += 1;
            return Verdict::Dropped(DropReason::PortsExhausted);
        };
        let reply = Tuple {
            dport: port,
            ..template
        };
        self.insert_and_forward(rx, l4, key, reply, reply_zone, n, state, kind, out)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert_and_forward(
        &mut self,
        rx: &Rx,
        l4: &L4Info,
        key: Tuple,
        reply: Tuple,
        reply_zone: Zone,
        n: &NetworkConfig,
        state: State,
        kind: Kind,
        out: &mut Emits,
    ) -> Verdict {
        let new = NewConn {
            orig: key,
            orig_zone: rx.zone,
            reply,
            reply_zone,
            network: n.id,
            state,
            kind,
        };
        match self.table.insert(new, rx.now) {
            Ok(Inserted::New(r)) | Ok(Inserted::Evicting(r)) => {
                self.forward(rx, l4, r, Dir::Orig, out)
            }
            Err(InsertError::Full) => {
                self.counters.table_full += 1;
                Verdict::Dropped(DropReason::TableFull)
            }
            Err(InsertError::Clash) => Verdict::Dropped(DropReason::InvalidState),
        }
    }
}
