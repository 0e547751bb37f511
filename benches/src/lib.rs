//! Benchmarks for switchyard: criterion microbenchmarks (`benches/`) and the end-to-end harness
//! `switchyard-bench` ([`harness`]).

pub mod harness;
