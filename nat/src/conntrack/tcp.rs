//! The TCP connection state machine, a condensed netfilter `tcp_conntracks` table.
//!
//! No sequence-window tracking (netfilter's `tcp_in_window`): the NAT only needs the states to
//! pick timeouts and to know when a connection is assured, and a segment that does not fit the
//! state still passes unchanged (netfilter marks it INVALID; Docker does not drop those either).

use super::{Dir, State};

/// The flags the state machine reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

impl TcpFlags {
    /// From the TCP header's flag byte (offset 13).
    pub fn from_byte(b: u8) -> Self {
        TcpFlags {
            fin: b & 0x01 != 0,
            syn: b & 0x02 != 0,
            rst: b & 0x04 != 0,
            ack: b & 0x10 != 0,
        }
    }

    /// A segment that may open a connection: SYN alone.
    pub fn is_initial_syn(self) -> bool {
        self.syn && !self.ack && !self.rst && !self.fin
    }
}

/// Which side has sent a FIN so far (kept in the connection's flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fins {
    pub orig: bool,
    pub reply: bool,
}

impl Fins {
    fn set(&mut self, dir: Dir) {
        match dir {
            Dir::Orig => self.orig = true,
            Dir::Reply => self.reply = true,
        }
    }
    fn has(self, dir: Dir) -> bool {
        match dir {
            Dir::Orig => self.orig,
            Dir::Reply => self.reply,
        }
    }
}

/// Next state for a segment travelling in `dir`. `fins` is updated in place.
pub fn transition(state: State, fins: &mut Fins, dir: Dir, f: TcpFlags) -> State {
    use State::*;
    if f.rst {
        return Close;
    }
    if f.syn && !f.ack {
        return match (state, dir) {
            // Port reuse after close: the same tuple starts over (netfilter's sTW/sCL -> sSS).
            (TimeWait | Close, Dir::Orig) => {
                *fins = Fins::default();
                SynSent
            }
            // Simultaneous open.
            (SynSent, Dir::Reply) => SynRecv,
            (s, _) => s,
        };
    }
    if f.syn && f.ack {
        return match (state, dir) {
            (SynSent | SynRecv, Dir::Reply) => SynRecv,
            (s, _) => s,
        };
    }
    if f.fin {
        fins.set(dir);
        return match state {
            SynSent => state,
            _ if fins.orig && fins.reply => match state {
                TimeWait | Close => state,
                _ => LastAck,
            },
            SynRecv | Established => FinWait,
            s => s,
        };
    }
    if f.ack {
        return match state {
            SynRecv if dir == Dir::Orig => Established,
            // The other side acknowledged the first FIN.
            FinWait if !fins.has(dir) => CloseWait,
            // Both FINs seen: this ACK is the last one.
            LastAck if fins.orig && fins.reply => TimeWait,
            s => s,
        };
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    fn f(s: &str) -> TcpFlags {
        TcpFlags {
            syn: s.contains('S'),
            ack: s.contains('A'),
            fin: s.contains('F'),
            rst: s.contains('R'),
        }
    }

    fn run(steps: &[(Dir, &str)]) -> Vec<State> {
        let mut st = SynSent;
        let mut fins = Fins::default();
        steps
            .iter()
            .map(|(d, fl)| {
                st = transition(st, &mut fins, *d, f(fl));
                st
            })
            .collect()
    }

    #[test]
    fn handshake_data_and_close() {
        use Dir::*;
        let s = run(&[
            (Reply, "SA"),
            (Orig, "A"),
            (Orig, "A"),
            (Orig, "FA"),
            (Reply, "A"),
            (Reply, "FA"),
            (Orig, "A"),
            (Orig, "S"),
        ]);
        assert_eq!(
            s,
            vec![
                SynRecv,
                Established,
                Established,
                FinWait,
                CloseWait,
                LastAck,
                TimeWait,
                SynSent
            ]
        );
    }

    #[test]
    fn rst_closes_from_any_state() {
        use Dir::*;
        assert_eq!(run(&[(Reply, "R")]), vec![Close]);
        assert_eq!(run(&[(Reply, "SA"), (Orig, "A"), (Orig, "RA")])[2], Close);
    }

    #[test]
    fn simultaneous_fins_and_stray_segments() {
        use Dir::*;
        let s = run(&[
            (Reply, "SA"),
            (Orig, "A"),
            (Orig, "FA"),
            (Reply, "FA"),
            (Orig, "A"),
        ]);
        assert_eq!(s[2..], [FinWait, LastAck, TimeWait]);
        // An ACK before the SYN-ACK changes nothing.
        assert_eq!(run(&[(Orig, "A")]), vec![SynSent]);
        assert!(f("S").is_initial_syn() && !f("SA").is_initial_syn());
    }
}
