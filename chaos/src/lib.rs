//! `flotilla chaos`: runs a real multi-process cluster (servers, agents with sim engines, a
//! gateway) on loopback, injects scripted faults, and checks what clients observed.

pub mod linearizability;
pub mod proxy;
