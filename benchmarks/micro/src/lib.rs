//! roost-microbench: criterion micro-benchmarks of the per-message hot path — MQTT frame
//! decode, property-bag decode, SAS verification, rkyv archive and events-log append.
//! Run with `cargo bench -p roost-microbench`; results go into docs/benchmarks.md.
