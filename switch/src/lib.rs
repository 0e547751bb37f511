//! switchyard's userspace L2 learning switch.
//!
//! ```text
//!  port rx ──► Switch::handle_frame(ingress, frame, now) ──► Forward
//!                 │ learn src (per network, aging, limits)     ├─ Unicast(port)   one egress
//!                 │ look up dst                                ├─ Flood(network)  every port of that
//!                 │                                            │                  network but the ingress
//!                 └ counters per port, drops by reason         └─ Drop(reason)
//! ```
//! The core ([`switch`], [`mac_table`]) is pure: time is an argument and no file descriptor is
//! touched, so it is unit-tested, benchmarked, fuzzed and replayed in memory. Only
//! [`backend`] does I/O (tap and AF_PACKET fds) and is the one module allowed `unsafe`.

pub mod backend;
pub mod frame;
pub mod gso;
pub mod mac_table;
pub mod port;
pub mod switch;

pub use frame::MacAddr;
pub use port::{DropReason, NetworkId, PortCounters, PortId, PortKind};
pub use smoltcp::time::{Duration, Instant};
pub use switch::{Forward, Switch, SwitchConfig, SwitchError};
