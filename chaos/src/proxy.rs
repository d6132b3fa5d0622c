//! The fault-injecting TCP proxy: one [`Proxy`] sits on every directed link between two
//! processes on loopback (server i → server j, agent → server, gateway → server). The dialing
//! process is given the proxy's address instead of its peer's, so faults need no privileges
//! (no iptables, no netem) and can be changed at any moment through a [`LinkControl`].
//!
//! ```text
//!   client ──dial──▶ Proxy(listen) ──dial──▶ target
//!                      │  per connection, per direction:
//!                      │  read ─▶ FIFO queue (bytes, arrival time) ─▶ release ─▶ write
//!                      └─ watch<Fault>: every connection sees a change at once
//! ```
//!
//! "Client" is the process that dialed; "server" is the target. Each direction of each
//! connection reads eagerly into a bounded FIFO queue and releases the head when the current
//! fault allows it. Holding bytes in the queue (rather than stopping the read) lets delay keep
//! full throughput, and the bound ([`QUEUE_LIMIT_BYTES`]) gives back-pressure as a full TCP
//! window would.
//!
//! # Faults
//!
//! - [`Fault::None`]: forward as soon as bytes arrive.
//! - [`Fault::Blackhole`]: a network partition. Connections are accepted but nothing is
//!   forwarded either way and nothing is closed, so peers see only timeouts, as they would
//!   behind a real partition, where packets vanish and no RST comes back. New connections are
//!   not dialed through to the target while the blackhole lasts (a partitioned SYN never
//!   arrives). **On heal, held bytes are delivered, in order**, and held connections are dialed:
//!   this is what TCP retransmission does after a short real partition. A client that gave up
//!   during the partition (keepalive, deadline) has already closed its socket; its FIN was held
//!   too and is delivered on heal, so the server sees a clean close, and the client's new
//!   connection works at once.
//! - [`Fault::Reset`]: a refused, fast failure, like a crashed process on a live host (the
//!   kernel answers with RST): existing connections are closed with RST on both sides and new
//!   ones are reset as soon as they are accepted, so a client's read or write fails at once
//!   rather than timing out. Contrast with `Blackhole`, where nothing comes back at all: the
//!   two exercise different code paths (fast retry versus deadlines and elections).
//! - [`Fault::OneWay`]: one-way loss. Bytes in the named direction are held back (as with
//!   `Blackhole`, delivered on heal) while the other direction flows. TCP itself cannot run over
//!   a truly one-way path, so this is modelled at the byte level: it shows what happens when
//!   requests arrive but replies do not, or the reverse.
//! - [`Fault::Delay`]: each chunk read is released `latency ± jitter` (uniform) after it arrived,
//!   in each direction, so a round trip through one link gains about `2 × latency`. Order per
//!   direction is kept (a chunk never overtakes the one before it), and throughput is not
//!   throttled, since the delay is a release time in a queue, not a sleep per read.
//! - [`Fault::Loss`]: TCP cannot lose bytes (it retransmits them), so packet loss is modelled
//!   as what it looks like to an application: each new connection is reset on arrival with
//!   `probability`, and each established connection is cut (RST) with `probability` per second
//!   (an exponential clock, so the rate is independent of how often anything is checked).
//!
//! A change of fault applies to existing connections as well as new ones. [`Network`] names
//! the links of a cluster by process and turns scenario steps (partition, isolate, one-way,
//! delay) into faults on the right links.

mod conn;
mod network;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

pub use network::Network;

/// Most bytes one direction of one connection holds (read but not yet forwarded) before the
/// proxy stops reading from the sender, which then sees a full TCP window.
pub const QUEUE_LIMIT_BYTES: usize = 4 << 20;

/// Longest the proxy waits to connect to its target before resetting the client.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Which way bytes travel on a connection through a proxy. The client is the process that
/// dialed the proxy; the server is the proxy's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    /// The other direction.
    pub fn reverse(self) -> Direction {
        match self {
            Direction::ClientToServer => Direction::ServerToClient,
            Direction::ServerToClient => Direction::ClientToServer,
        }
    }
}

/// What a link does to its traffic; see the module documentation for each fault's semantics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Fault {
    /// Forward normally.
    #[default]
    None,
    /// A partition: accept, forward nothing either way, close nothing; deliver on heal.
    Blackhole,
    /// Reset existing connections and every new one (a fast, refused failure).
    Reset,
    /// Hold back bytes travelling in this direction; the other direction flows.
    OneWay(Direction),
    /// Release each chunk `latency ± jitter` (uniform) after it arrived, in each direction.
    Delay { latency: Duration, jitter: Duration },
    /// Reset each new connection with `probability` (0..=1), and cut each established one
    /// with `probability` per second.
    Loss { probability: f64 },
}

impl Fault {
    /// Clamps `Loss::probability` into 0..=1 (NaN becomes 0).
    fn normalized(self) -> Fault {
        match self {
            Fault::Loss { probability } => {
                let probability = if probability.is_nan() { 0.0 } else { probability.clamp(0.0, 1.0) };
                Fault::Loss { probability }
            }
            other => other,
        }
    }

    /// Whether a connection arriving now is reset on arrival.
    fn refuses_new_connection(&self) -> bool {
        match *self {
            Fault::Reset => true,
            Fault::Loss { probability } => rand::random::<f64>() < probability,
            _ => false,
        }
    }
}

/// Counters of one link since its proxy started, for the harness summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    /// Bytes written to the target (client → server).
    pub bytes_client_to_server: u64,
    /// Bytes written back to clients (server → client).
    pub bytes_server_to_client: u64,
    /// TCP connections accepted from clients, including those then refused.
    pub connections_accepted: u64,
    /// Connections reset on arrival (`Reset`, or `Loss` by chance).
    pub connections_refused: u64,
    /// Established (or held) connections cut with RST by a `Reset` or `Loss` fault.
    pub connections_cut: u64,
    /// Connections whose target could not be reached (the client was reset).
    pub dial_failures: u64,
    /// Connections open now.
    pub connections_open: u64,
}

#[derive(Debug, Default)]
struct Counters {
    bytes_client_to_server: AtomicU64,
    bytes_server_to_client: AtomicU64,
    connections_accepted: AtomicU64,
    connections_refused: AtomicU64,
    connections_cut: AtomicU64,
    dial_failures: AtomicU64,
    connections_open: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn bytes(&self, direction: Direction) -> &AtomicU64 {
        match direction {
            Direction::ClientToServer => &self.bytes_client_to_server,
            Direction::ServerToClient => &self.bytes_server_to_client,
        }
    }

    fn snapshot(&self) -> LinkStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LinkStats {
            bytes_client_to_server: get(&self.bytes_client_to_server),
            bytes_server_to_client: get(&self.bytes_server_to_client),
            connections_accepted: get(&self.connections_accepted),
            connections_refused: get(&self.connections_refused),
            connections_cut: get(&self.connections_cut),
            dial_failures: get(&self.dial_failures),
            connections_open: get(&self.connections_open),
        }
    }
}

/// State shared by a proxy's accept loop, its connections and its control handles.
#[derive(Debug)]
struct Link {
    name: String,
    fault: watch::Sender<Fault>,
    stats: Counters,
}

/// A cheap, cloneable handle that sets a link's fault and reads its counters. It stays usable
/// after the proxy stops (setting a fault then has no effect).
#[derive(Clone, Debug)]
pub struct LinkControl {
    link: Arc<Link>,
}

impl LinkControl {
    /// The link's name, as given to [`Proxy::start`].
    pub fn name(&self) -> &str {
        &self.link.name
    }

    /// Sets the fault; existing connections and new ones follow it at once.
    pub fn set(&self, fault: Fault) {
        let fault = fault.normalized();
        let previous = self.link.fault.send_replace(fault);
        if previous != fault {
            tracing::info!(link = %self.link.name, ?fault, ?previous, "link fault set");
        }
    }

    /// Back to [`Fault::None`].
    pub fn heal(&self) {
        self.set(Fault::None);
    }

    /// The fault in force now.
    pub fn fault(&self) -> Fault {
        *self.link.fault.borrow()
    }

    /// The link's counters now.
    pub fn stats(&self) -> LinkStats {
        self.link.stats.snapshot()
    }
}

/// A running proxy: accepts on [`Proxy::local_addr`] and forwards to its target, applying the
/// link's fault. Dropping it stops the accept loop (the port is closed) and ends every
/// forwarded connection; [`Proxy::shutdown`] does the same and waits until it is done.
pub struct Proxy {
    control: LinkControl,
    local_addr: SocketAddr,
    target: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("name", &self.control.name())
            .field("local_addr", &self.local_addr)
            .field("target", &self.target)
            .field("fault", &self.control.fault())
            .finish()
    }
}

impl Proxy {
    /// Binds `listen` (port 0 picks a free port) and starts forwarding to `target`, with no
    /// fault. Must be called within a tokio runtime.
    pub async fn start(name: &str, listen: SocketAddr, target: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let (fault, _) = watch::channel(Fault::None);
        let link = Arc::new(Link { name: name.to_owned(), fault, stats: Counters::default() });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(Arc::clone(&link), listener, target, stopped));
        tracing::debug!(link = %name, %local_addr, %target, "proxy started");
        Ok(Proxy { control: LinkControl { link }, local_addr, target, stop: Some(stop), task })
    }

    /// The address clients dial.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        self.control.name()
    }

    /// A handle that sets the fault and reads the counters.
    pub fn control(&self) -> LinkControl {
        self.control.clone()
    }

    /// Closes the port and every forwarded connection, and waits until all are closed.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The accept task never panics; a join error could only be a runtime shutting down.
        let _ = (&mut self.task).await;
    }
}

// Dropping a `Proxy` drops `stop`, which the accept loop sees as a stop request.

async fn accept_loop(link: Arc<Link>, listener: TcpListener, target: SocketAddr, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    Counters::add(&link.stats.connections_accepted, 1);
                    if link.fault.borrow().refuses_new_connection() {
                        Counters::add(&link.stats.connections_refused, 1);
                        tracing::debug!(link = %link.name, %peer, "connection refused by fault");
                        reset(client);
                        continue;
                    }
                    connections.spawn(conn::serve(Arc::clone(&link), client, target));
                }
                Err(error) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(link = %link.name, %error, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
    tracing::debug!(link = %link.name, "proxy stopped");
}

/// Closes `stream` with RST rather than FIN, so the peer's next read or write fails.
fn reset(stream: TcpStream) {
    // Zero linger makes close() send RST and never blocks; if it cannot be set the close is a
    // FIN instead, which still ends the connection.
    let _ = stream.set_zero_linger();
    drop(stream);
}
