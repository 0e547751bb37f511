//! Port backends: the only I/O in this crate. `memory` is a queue pair for tests, benches and
//! replay; `tap` and `packet` wrap the kernel interfaces a container endpoint is made of.

pub mod memory;
