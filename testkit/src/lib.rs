//! Test support shared by every test suite and by the chaos harness: one place for what the
//! suites used to copy — spawning and stopping processes, free ports, log tails, `/proc`
//! scans, polling with a limit, small HTTP clients, the venv's Python, and the in-process
//! cluster.
//!
//! ```text
//!   default (std, tokio, rustix, rand)       feature "http"     feature "cluster"
//!   procs  ports  proc_fs  wait               http (hyper)       cluster (TestCluster)
//!                                             feature "otlp": otlp (an OTLP collector)
//!   raw_http  python  manifests  promtool  proxy
//!        ▲                                        ▲                   ▲
//!   chaos (product code); cli, agent, sim,   real-vLLM tier      flotilla-tests,
//!   gateway tests                                                actors tests
//! ```
//!
//! Why chaos depends on this crate as a normal dependency rather than on a second, non-test
//! crate: the chaos harness *is* a test harness that ships inside the binary (`flotilla
//! chaos`), and the pieces it shares with the test suites (process groups, signals, free
//! ports, log tails, `/proc` scans) are the same code, not similar code. One crate keeps one
//! copy; the features keep the product build light — with default features this crate pulls
//! in only tokio, rustix and rand, which chaos already uses, and neither the hyper client nor
//! the server stack.
#![forbid(unsafe_code)]

#[cfg(feature = "cluster")]
pub mod cluster;
#[cfg(feature = "http")]
pub mod http;
pub mod manifests;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod ports;
pub mod proc_fs;
pub mod procs;
pub mod promtool;
pub mod proxy;
pub mod python;
pub mod raw_http;
pub mod sse_timeline;
pub mod wait;
