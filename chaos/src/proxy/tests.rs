//! Proxy tests against an echo server on loopback; every wait is bounded.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use super::{Direction, Fault, Network, Proxy};

/// How long a read must stay silent to count as stalled.
const STALL: Duration = Duration::from_millis(300);
/// How soon traffic must flow again after a heal.
const HEAL: Duration = Duration::from_secs(1);
/// How soon a reset must be seen.
const FAST: Duration = Duration::from_millis(200);

fn any_port() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// An echo server that first sends `banner` (if any) and reports every chunk it receives.
struct EchoServer {
    addr: SocketAddr,
    received: mpsc::UnboundedReceiver<Vec<u8>>,
    task: JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoServer {
    async fn start(banner: &'static [u8]) -> EchoServer {
        let listener = TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, received) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                connections.spawn(async move {
                    if !banner.is_empty() && stream.write_all(banner).await.is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        let _ = tx.send(buf[..n].to_vec());
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        EchoServer { addr, received, task }
    }

    /// What was received within `wait`, concatenated; returns early once `enough` bytes came.
    async fn received(&mut self, enough: usize, wait: Duration) -> Vec<u8> {
        let mut all = Vec::new();
        let deadline = Instant::now() + wait;
        while all.len() < enough {
            match tokio::time::timeout_at(deadline, self.received.recv()).await {
                Ok(Some(chunk)) => all.extend(chunk),
                _ => break,
            }
        }
        all
    }
}

async fn proxy_to(server: &EchoServer) -> Proxy {
    Proxy::start("test", any_port(), server.addr).await.unwrap()
}

async fn read_n(stream: &mut TcpStream, n: usize, wait: Duration) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    timeout(wait, stream.read_exact(&mut buf)).await.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    Ok(buf)
}

async fn round_trip(addr: SocketAddr, msg: &[u8], wait: Duration) -> io::Result<Vec<u8>> {
    timeout(wait, async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(msg).await?;
        read_n(&mut stream, msg.len(), wait).await
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// True if nothing (not even EOF) can be read from `stream` for `STALL`.
async fn stalls(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    timeout(STALL, stream.read(&mut buf)).await.is_err()
}

#[tokio::test]
async fn forwards_both_ways_and_counts() {
    let server = EchoServer::start(b"").await;
    let proxy = proxy_to(&server).await;
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    stream.write_all(b"hello").await.unwrap();
    assert_eq!(read_n(&mut stream, 5, HEAL).await.unwrap(), b"hello");

    let stats = proxy.control().stats();
    assert_eq!((stats.bytes_client_to_server, stats.bytes_server_to_client), (5, 5));
    assert_eq!((stats.connections_accepted, stats.connections_open), (1, 1));
    assert_eq!(proxy.control().name(), "test");
}

#[tokio::test]
async fn half_close_is_forwarded() {
    let server = EchoServer::start(b"").await;
    let proxy = proxy_to(&server).await;
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    stream.write_all(b"bye").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut all = Vec::new();
    timeout(HEAL, stream.read_to_end(&mut all)).await.unwrap().unwrap();
    assert_eq!(all, b"bye");
}

#[tokio::test]
async fn blackhole_stalls_then_heal_delivers_held_bytes_and_new_connections_work() {
    let mut server = EchoServer::start(b"").await;
    let proxy = proxy_to(&server).await;
    let link = proxy.control();
    let mut before = TcpStream::connect(proxy.local_addr()).await.unwrap();
    before.write_all(b"a").await.unwrap();
    assert_eq!(read_n(&mut before, 1, HEAL).await.unwrap(), b"a");
    assert_eq!(server.received(1, HEAL).await, b"a");

    link.set(Fault::Blackhole);
    before.write_all(b"held").await.unwrap();
    let mut during = TcpStream::connect(proxy.local_addr()).await.unwrap(); // accepted, not dialed
    during.write_all(b"also").await.unwrap();
    assert!(stalls(&mut before).await, "an established connection must stall, not close");
    assert!(stalls(&mut during).await, "a new connection must stall, not close");
    assert!(server.received(1, Duration::from_millis(10)).await.is_empty());

    link.heal();
    let started = Instant::now();
    assert_eq!(round_trip(proxy.local_addr(), b"new", HEAL).await.unwrap(), b"new");
    assert_eq!(read_n(&mut before, 4, HEAL).await.unwrap(), b"held");
    assert_eq!(read_n(&mut during, 4, HEAL).await.unwrap(), b"also");
    assert!(started.elapsed() < HEAL);
}

#[tokio::test]
async fn reset_fails_fast_then_heal_restores() {
    let server = EchoServer::start(b"").await;
    let proxy = proxy_to(&server).await;
    let link = proxy.control();
    let mut before = TcpStream::connect(proxy.local_addr()).await.unwrap();
    before.write_all(b"a").await.unwrap();
    read_n(&mut before, 1, HEAL).await.unwrap();

    link.set(Fault::Reset);
    let started = Instant::now();
    let mut buf = [0u8; 8];
    let existing = timeout(FAST, before.read(&mut buf)).await.expect("existing connection not closed in time");
    assert!(existing.is_err(), "expected a reset, got {existing:?}");

    let started_new = Instant::now();
    let new = round_trip(proxy.local_addr(), b"x", FAST).await;
    assert!(new.is_err() && started_new.elapsed() < FAST, "new connection: {new:?} after {:?}", started_new.elapsed());
    assert!(started.elapsed() < 2 * FAST);
    let stats = link.stats();
    assert_eq!((stats.connections_cut, stats.connections_refused), (1, 1));

    link.heal();
    assert_eq!(round_trip(proxy.local_addr(), b"ok", HEAL).await.unwrap(), b"ok");
}

#[tokio::test]
async fn one_way_server_to_client_delivers_requests_but_not_replies() {
    let mut server = EchoServer::start(b"").await;
    let proxy = proxy_to(&server).await;
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    proxy.control().set(Fault::OneWay(Direction::ServerToClient));
    stream.write_all(b"ping").await.unwrap();
    assert_eq!(server.received(4, HEAL).await, b"ping");
    assert!(stalls(&mut stream).await, "the reply must be held back");

    proxy.control().heal();
    assert_eq!(read_n(&mut stream, 4, HEAL).await.unwrap(), b"ping");
}

#[tokio::test]
async fn one_way_client_to_server_delivers_replies_but_not_requests() {
    let mut server = EchoServer::start(b"hi").await;
    let proxy = proxy_to(&server).await;
    proxy.control().set(Fault::OneWay(Direction::ClientToServer));
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    assert_eq!(read_n(&mut stream, 2, HEAL).await.unwrap(), b"hi", "server-to-client bytes must flow");
    stream.write_all(b"ping").await.unwrap();
    assert!(server.received(1, STALL).await.is_empty(), "the request must be held back");
    assert!(stalls(&mut stream).await);

    proxy.control().heal();
    assert_eq!(server.received(4, HEAL).await, b"ping");
    assert_eq!(read_n(&mut stream, 4, HEAL).await.unwrap(), b"ping");
}

#[tokio::test]
async fn delay_adds_latency_each_way() {
    let server = EchoServer::start(b"").await;
    let proxy = proxy_to(&server).await;
    let latency = Duration::from_millis(100);
    proxy.control().set(Fault::Delay { latency, jitter: Duration::ZERO });
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let started = Instant::now();
    stream.write_all(b"x").await.unwrap();
    read_n(&mut stream, 1, Duration::from_secs(2)).await.unwrap();
    let rtt = started.elapsed();
    // Latency applies in each direction, so a round trip gains about twice of it.
    assert!(rtt >= latency.mul_f64(1.8), "round trip {rtt:?} under 2 × {latency:?}");
    assert!(rtt < latency * 2 + Duration::from_millis(500), "round trip {rtt:?} far over 2 × {latency:?}");
}

#[tokio::test]
async fn delay_with_jitter_keeps_order_and_throughput() {
    let server = EchoServer::start(b"").await;
    let proxy = proxy_to(&server).await;
    let latency = Duration::from_millis(30);
    proxy.control().set(Fault::Delay { latency, jitter: Duration::from_millis(25) });
    let stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut rx, mut tx) = stream.into_split();
    const WRITES: u32 = 10_000;
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let mut all = vec![0u8; WRITES as usize * 4];
        timeout(Duration::from_secs(4), rx.read_exact(&mut all)).await.map(|read| read.map(|_| all))
    });
    for i in 0..WRITES {
        tx.write_all(&i.to_be_bytes()).await.unwrap();
    }
    let all = reader.await.unwrap().expect("echo not back in time").unwrap();
    for (i, word) in all.chunks_exact(4).enumerate() {
        assert_eq!(u32::from_be_bytes(word.try_into().unwrap()), i as u32, "out of order at write {i}");
    }
    // A sleep per chunk would take thousands of latencies; a release queue takes about two.
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn loss_of_one_resets_new_and_cuts_established_connections() {
    let server = EchoServer::start(b"").await;
    let proxy = proxy_to(&server).await;
    let mut before = TcpStream::connect(proxy.local_addr()).await.unwrap();
    before.write_all(b"a").await.unwrap();
    read_n(&mut before, 1, HEAL).await.unwrap();

    proxy.control().set(Fault::Loss { probability: 7.0 }); // clamped to 1
    assert_eq!(proxy.control().fault(), Fault::Loss { probability: 1.0 });
    let mut buf = [0u8; 8];
    assert!(timeout(FAST, before.read(&mut buf)).await.expect("not cut in time").is_err());
    assert!(round_trip(proxy.local_addr(), b"x", FAST).await.is_err());

    proxy.control().set(Fault::Loss { probability: 0.0 });
    assert_eq!(round_trip(proxy.local_addr(), b"ok", HEAL).await.unwrap(), b"ok");
    let stats = proxy.control().stats();
    assert_eq!((stats.connections_cut, stats.connections_refused), (1, 1));
}

#[tokio::test]
async fn unreachable_target_resets_the_client() {
    let closed = TcpListener::bind(any_port()).await.unwrap().local_addr().unwrap();
    let proxy = Proxy::start("dead", any_port(), closed).await.unwrap();
    assert!(round_trip(proxy.local_addr(), b"x", FAST).await.is_err());
    assert_eq!(proxy.control().stats().dial_failures, 1);
}

#[tokio::test]
async fn dropping_or_shutting_down_closes_port_and_connections() {
    let server = EchoServer::start(b"").await;
    let proxy = proxy_to(&server).await;
    let addr = proxy.local_addr();
    let mut open = TcpStream::connect(addr).await.unwrap();
    open.write_all(b"a").await.unwrap();
    read_n(&mut open, 1, HEAL).await.unwrap();
    drop(proxy);
    let mut buf = [0u8; 8];
    let ended = timeout(HEAL, open.read(&mut buf)).await.expect("connection outlived its proxy");
    assert!(matches!(ended, Ok(0) | Err(_)));
    let deadline = Instant::now() + HEAL;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "port still open after drop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let proxy = proxy_to(&server).await;
    let addr = proxy.local_addr();
    let mut open = TcpStream::connect(addr).await.unwrap();
    open.write_all(b"a").await.unwrap();
    read_n(&mut open, 1, HEAL).await.unwrap();
    let control = proxy.control();
    proxy.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err(), "port still open after shutdown");
    assert!(matches!(open.read(&mut buf).await, Ok(0) | Err(_)));
    assert_eq!(control.stats().connections_open, 0);
}

/// Three echo servers and a proxy for each ordered pair, `(x, y)` leading to `y`'s server.
async fn three_node_network() -> (Network, Vec<EchoServer>) {
    let names = ["a", "b", "c"];
    let mut servers = Vec::new();
    for _ in names {
        servers.push(EchoServer::start(b"").await);
    }
    let mut network = Network::new();
    for from in names {
        for (to, server) in names.iter().zip(&servers) {
            if from != *to {
                network.add_link(from, to, server.addr).await.unwrap();
            }
        }
    }
    (network, servers)
}

#[tokio::test]
async fn network_partition_blocks_only_links_across_groups() {
    let (network, _servers) = three_node_network().await;
    assert_eq!(network.partition(&["a"], &["b", "c"]), 4);

    let pairs: Vec<(&str, &str)> = network.links().collect();
    let outcomes = futures::future::join_all(
        pairs.iter().map(|&(from, to)| round_trip(network.addr(from, to).unwrap(), b"ping", STALL)),
    )
    .await;
    for (&(from, to), outcome) in pairs.iter().zip(outcomes) {
        let crosses = (from == "a") != (to == "a");
        assert_eq!(outcome.is_err(), crosses, "{from}->{to}: {outcome:?}");
    }

    network.heal_all();
    let outcomes = futures::future::join_all(
        pairs.iter().map(|&(from, to)| round_trip(network.addr(from, to).unwrap(), b"ok", HEAL)),
    )
    .await;
    assert!(outcomes.iter().all(|o| o.as_deref().ok() == Some(b"ok".as_slice())), "{outcomes:?}");
    assert_eq!(network.stats().len(), 6);
    network.shutdown().await;
}

#[tokio::test]
async fn network_sets_faults_by_process_name() {
    let nowhere = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
    let mut network = Network::new();
    for (from, to) in [("a", "b"), ("b", "a"), ("a", "c"), ("gateway", "a")] {
        network.add_link(from, to, nowhere).await.unwrap();
    }
    let fault = |from, to| network.link(from, to).unwrap().fault();

    assert_eq!(network.one_way("a", "b"), 2);
    assert_eq!(fault("a", "b"), Fault::OneWay(Direction::ClientToServer));
    assert_eq!(fault("b", "a"), Fault::OneWay(Direction::ServerToClient));
    assert_eq!(network.one_way("b", "a"), 2, "both ways lost is a blackhole");
    assert_eq!((fault("a", "b"), fault("b", "a")), (Fault::Blackhole, Fault::Blackhole));
    assert_eq!(network.one_way("gateway", "c"), 0);

    network.heal_all();
    assert!(network.links().all(|(from, to)| fault(from, to) == Fault::None));
    assert_eq!(network.isolate("c"), 1);
    assert_eq!(fault("a", "c"), Fault::Blackhole);
    assert_eq!(network.isolate("a"), 4);

    let (latency, jitter) = (Duration::from_millis(5), Duration::from_millis(1));
    assert_eq!(network.delay("b", "a", latency, jitter), 2);
    assert_eq!(fault("a", "b"), Fault::Delay { latency, jitter });
    assert_eq!(network.heal("a", "b"), 2);
    assert_eq!(fault("b", "a"), Fault::None);
    assert!(network.set("gateway", "a", Fault::Reset));
    assert!(!network.set("gateway", "b", Fault::Reset));
    assert_eq!(network.partition(&["x"], &["y"]), 0);
    assert_eq!(network.link("gateway", "a").unwrap().name(), "gateway->a");
}
