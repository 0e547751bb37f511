//! Benchmarks for switchyard.
