//! One forwarded connection: waits out a blackhole before dialing the target, then pumps both
//! directions through per-direction FIFO queues, releasing each queue's head when the link's
//! current fault allows it, and cuts the connection when the fault says so.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{sleep_until, Duration, Instant};

use super::{reset, Counters, Direction, Fault, Link, DIAL_TIMEOUT, QUEUE_LIMIT_BYTES};

/// Largest single read; each read becomes one queued chunk.
const READ_CHUNK: usize = 16 << 10;

/// Serves one accepted client connection until it ends or the task is aborted.
pub(super) async fn serve(link: Arc<Link>, client: TcpStream, target: std::net::SocketAddr) {
    let _open = OpenGuard::new(Arc::clone(&link));
    let mut fault_rx = link.fault.subscribe();

    // A partitioned SYN never reaches the server: hold the client until the link heals.
    loop {
        match *fault_rx.borrow_and_update() {
            Fault::Reset => {
                cut(&link, client, None);
                return;
            }
            Fault::Blackhole => {}
            _ => break,
        }
        if fault_rx.changed().await.is_err() {
            return;
        }
    }

    let server = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(server)) => server,
        Ok(Err(error)) => {
            dial_failed(&link, client, &error.to_string());
            return;
        }
        Err(_) => {
            dial_failed(&link, client, "timed out");
            return;
        }
    };
    // The proxy must not add Nagle delays of its own.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    Pump::new(link, client, server, fault_rx).run().await;
}

fn dial_failed(link: &Link, client: TcpStream, error: &str) {
    Counters::add(&link.stats.dial_failures, 1);
    tracing::debug!(link = %link.name, error, "proxy could not reach its target");
    reset(client);
}

/// Resets both sides; counts a cut when a fault caused it.
fn cut(link: &Link, client: TcpStream, server: Option<TcpStream>) {
    Counters::add(&link.stats.connections_cut, 1);
    tracing::debug!(link = %link.name, "connection cut by fault");
    reset(client);
    if let Some(server) = server {
        reset(server);
    }
}

/// Counts the connection as open for as long as it lives, including when its task is aborted.
struct OpenGuard(Arc<Link>);

impl OpenGuard {
    fn new(link: Arc<Link>) -> Self {
        Counters::add(&link.stats.connections_open, 1);
        OpenGuard(link)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Payload {
    Data(Vec<u8>),
    /// The sender half-closed: shut down the receiver's write side.
    Eof,
    /// Reading from the sender failed (it was reset): reset the whole connection.
    Reset,
}

struct Chunk {
    payload: Payload,
    arrived: Instant,
    /// Where in `-jitter..=jitter` this chunk's delay falls, as a fraction in -1..=1; drawn once
    /// so the release time stays put while the chunk waits.
    jitter_unit: f64,
}

impl Chunk {
    fn new(payload: Payload) -> Self {
        Chunk { payload, arrived: Instant::now(), jitter_unit: rand::random_range(-1.0..=1.0) }
    }

    fn release_at(&self, latency: Duration, jitter: Duration) -> Instant {
        let delay = latency.as_secs_f64() + jitter.as_secs_f64() * self.jitter_unit;
        self.arrived + Duration::from_secs_f64(delay.max(0.0))
    }
}

/// One direction of a connection: what was read from the sender and not yet written on.
struct Pipe {
    direction: Direction,
    queue: VecDeque<Chunk>,
    queued_bytes: usize,
    /// How much of the head chunk has been written already.
    written: usize,
    /// False once the sender's EOF (or error) has been queued.
    reading: bool,
}

/// When a pipe's head may be written.
#[derive(Clone, Copy)]
enum Release {
    /// Nothing to write, or the fault holds it back.
    Held,
    Now,
    At(Instant),
}

/// What writing the head of a pipe came to.
enum Wrote {
    Progress,
    /// The connection must be reset: the receiver failed or the sender was reset.
    Broken,
}

impl Pipe {
    fn new(direction: Direction) -> Self {
        Pipe { direction, queue: VecDeque::new(), queued_bytes: 0, written: 0, reading: true }
    }

    fn wants_read(&self) -> bool {
        self.reading && self.queued_bytes < QUEUE_LIMIT_BYTES
    }

    /// Both the sender's EOF was read and everything was delivered.
    fn finished(&self) -> bool {
        !self.reading && self.queue.is_empty()
    }

    /// When the head chunk may be written under `fault`.
    fn release(&self, fault: Fault) -> Release {
        let Some(head) = self.queue.front() else { return Release::Held };
        match fault {
            Fault::Blackhole | Fault::Reset => Release::Held,
            Fault::OneWay(held) if held == self.direction => Release::Held,
            Fault::Delay { latency, jitter } => Release::At(head.release_at(latency, jitter)),
            Fault::None | Fault::OneWay(_) | Fault::Loss { .. } => Release::Now,
        }
    }

    /// Reads what the sender has ready into the queue.
    fn read_from(&mut self, sender: &TcpStream, buf: &mut [u8]) {
        let payload = match sender.try_read(buf) {
            Ok(0) => Payload::Eof,
            Ok(n) => Payload::Data(buf[..n].to_vec()),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => Payload::Reset,
        };
        match &payload {
            Payload::Data(data) => self.queued_bytes += data.len(),
            Payload::Eof | Payload::Reset => self.reading = false,
        }
        self.queue.push_back(Chunk::new(payload));
    }

    /// Writes as much of the head chunk as the receiver takes now.
    async fn write_to(&mut self, receiver: &mut TcpStream, link: &Link) -> Wrote {
        let Some(head) = self.queue.front() else { return Wrote::Progress };
        match &head.payload {
            Payload::Data(data) => match receiver.try_write(&data[self.written..]) {
                Ok(n) => {
                    Counters::add(link.stats.bytes(self.direction), n as u64);
                    self.written += n;
                    if self.written == data.len() {
                        self.queued_bytes -= data.len();
                        self.written = 0;
                        self.queue.pop_front();
                    }
                    Wrote::Progress
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => Wrote::Progress,
                Err(_) => Wrote::Broken,
            },
            Payload::Eof => {
                self.queue.pop_front();
                match receiver.shutdown().await {
                    Ok(()) => Wrote::Progress,
                    Err(_) => Wrote::Broken,
                }
            }
            Payload::Reset => Wrote::Broken,
        }
    }
}

/// Both directions of one established connection.
struct Pump {
    link: Arc<Link>,
    client: TcpStream,
    server: TcpStream,
    fault_rx: watch::Receiver<Fault>,
    to_server: Pipe,
    to_client: Pipe,
}

impl Pump {
    fn new(link: Arc<Link>, client: TcpStream, server: TcpStream, fault_rx: watch::Receiver<Fault>) -> Self {
        Pump {
            link,
            client,
            server,
            fault_rx,
            to_server: Pipe::new(Direction::ClientToServer),
            to_client: Pipe::new(Direction::ServerToClient),
        }
    }

    async fn run(mut self) {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut loss_cut_at = loss_deadline(*self.fault_rx.borrow_and_update());
        loop {
            if self.to_server.finished() && self.to_client.finished() {
                // Both sides sent FIN and both FINs were delivered: close normally.
                return;
            }
            let fault = *self.fault_rx.borrow();
            if fault == Fault::Reset {
                cut(&self.link, self.client, Some(self.server));
                return;
            }
            let to_server_at = self.to_server.release(fault);
            let to_client_at = self.to_client.release(fault);
            let wrote = tokio::select! {
                changed = self.fault_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    loss_cut_at = loss_deadline(*self.fault_rx.borrow_and_update());
                    continue;
                }
                _ = sleep_until_opt(loss_cut_at) => {
                    cut(&self.link, self.client, Some(self.server));
                    return;
                }
                Ok(()) = self.client.readable(), if self.to_server.wants_read() => {
                    self.to_server.read_from(&self.client, &mut buf);
                    continue;
                }
                Ok(()) = self.server.readable(), if self.to_client.wants_read() => {
                    self.to_client.read_from(&self.server, &mut buf);
                    continue;
                }
                Ok(()) = writable_at(&self.server, to_server_at) => {
                    self.to_server.write_to(&mut self.server, &self.link).await
                }
                Ok(()) = writable_at(&self.client, to_client_at) => {
                    self.to_client.write_to(&mut self.client, &self.link).await
                }
            };
            if let Wrote::Broken = wrote {
                // A peer went away (or was reset): pass the failure on as a reset, not a cut by fault.
                reset(self.client);
                reset(self.server);
                return;
            }
        }
    }
}

/// When `fault` cuts an established connection: under `Loss`, a deadline drawn from an
/// exponential clock with `probability` per second; otherwise never.
fn loss_deadline(fault: Fault) -> Option<Instant> {
    let Fault::Loss { probability } = fault else { return None };
    if probability <= 0.0 {
        return None;
    }
    if probability >= 1.0 {
        return Some(Instant::now());
    }
    let rate = -(1.0 - probability).ln(); // cuts per second
    let uniform: f64 = 1.0 - rand::random::<f64>(); // in (0, 1]
    let after = (-uniform.ln() / rate).min(86_400.0);
    Some(Instant::now() + Duration::from_secs_f64(after))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Ready once the release time has come and `stream` can take bytes; never while held.
async fn writable_at(stream: &TcpStream, release: Release) -> io::Result<()> {
    match release {
        Release::Held => std::future::pending().await,
        Release::Now => {}
        Release::At(at) => sleep_until(at).await,
    }
    stream.writable().await
}
