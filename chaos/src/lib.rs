//! `flotilla chaos`: runs a real multi-process cluster (servers, agents with sim engines, a
//! gateway) on loopback, injects scripted faults, and checks what clients observed.
//!
//! ```text
//!  scenario (YAML) ─> cluster (processes + one fault proxy per link) ─> run
//!      workloads: store_client (CAS registers), data_plane (gateway), watch (placement)
//!      faults: kill/pause/partition/delay/disk/engine, on a timed schedule
//!      checkers: linearizability + lost writes, placement, data-plane attribution
//! ```

pub mod cli;
pub mod cluster;
pub mod data_plane;
pub mod dial;
pub mod faults;
pub mod linearizability;
pub mod placement;
pub mod procs;
pub mod proxy;
pub mod run;
pub mod scenario;
pub mod store_client;
pub mod watch;
