//! Port backends: the only I/O in this crate. `memory` is a queue pair for tests, benches and
//! replay; `tap` and `packet` wrap the kernel interfaces a container endpoint is made of, `ring` is
//! `packet`'s receive ring.

#[allow(unsafe_code)]
pub mod ethtool;
#[allow(unsafe_code)]
pub mod fdpass;
pub mod memory;
#[allow(unsafe_code)]
pub mod packet;
#[allow(unsafe_code)]
pub mod ring;
#[allow(unsafe_code)]
pub mod tap;
