//! Multi-node gangs (issue 22) over real TCP on 127.0.0.1: the head serves only once every
//! rank has joined its rendezvous, fails (503, then stops with an error) when a rank leaves,
//! refuses duplicate, out-of-range and garbage joins; workers retry until the head appears
//! and end when it goes; bad flag combinations are usage errors (exit code 2) naming the flag.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use flotilla_sim::{GangArgs, SimArgs, SimError, WorkerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

/// Every await of a test is bounded by this.
const BOUND: Duration = Duration::from_secs(15);

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f).await.unwrap_or_else(|_| panic!("{what} did not happen within {BOUND:?}"))
}

fn member(nnodes: u32, rank: u32, port: u16) -> SimArgs {
    SimArgs {
        gang: GangArgs {
            pipeline_parallel_size: nnodes,
            nnodes,
            node_rank: rank,
            master_addr: Some("127.0.0.1".into()),
            master_port: Some(port),
            headless: rank > 0,
            rendezvous_timeout_seconds: 30.0,
            ..GangArgs::default()
        },
        ..args()
    }
}

async fn worker(nnodes: u32, rank: u32, port: u16) -> WorkerHandle {
    flotilla_sim::start_worker(member(nnodes, rank, port)).await.expect("worker starts")
}

/// Polls `/health` until it answers `want` (bounded).
async fn health_becomes(addr: SocketAddr, want: u16) -> Resp {
    bounded("health change", async {
        loop {
            let r = get(addr, "/health").await;
            if r.status == want {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_rank_gang_serves_only_after_both_workers_connect() {
    let head = start(member(3, 0, 0)).await;
    let (a, port) = (head.local_addr(), head.gang_addr().expect("a head has a rendezvous").port());
    let r = get(a, "/health").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("ranks 1, 2"), "{}", r.body);
    let r = complete(a, "demo", "hello there", 4).await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("waiting for ranks 1, 2 of the gang"), "{}", r.body);
    assert_eq!(get(a, "/metrics").await.status, 200, "metrics answer while the gang forms");

    let mut w1 = worker(3, 1, port).await;
    assert!(bounded("rank 1 joins", w1.joined()).await);
    let r = get(a, "/health").await;
    assert_eq!(r.status, 503, "one worker of two is not a gang");
    assert!(r.body.contains("ranks 2 "), "{}", r.body);

    let mut w2 = worker(3, 2, port).await;
    assert!(bounded("rank 2 joins", w2.joined()).await);
    health_becomes(a, 200).await;
    let r = complete(a, "demo", "hello there", 4).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);

    head.shutdown().await.unwrap();
    // the head's end closes the workers' connections: both end with an error
    assert!(bounded("rank 1 ends", w1.stopped()).await.is_err());
    assert!(bounded("rank 2 ends", w2.stopped()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_leaving_makes_the_head_unhealthy_then_fail() {
    let mut head = start(member(2, 0, 0)).await;
    let (a, port) = (head.local_addr(), head.gang_addr().unwrap().port());
    let w1 = worker(2, 1, port).await;
    health_becomes(a, 200).await;
    let started = tokio::time::Instant::now();
    w1.shutdown().await.unwrap(); // its socket closes, as when the process is killed
    let r = health_becomes(a, 503).await;
    assert!(started.elapsed() < flotilla_sim::GANG_LOSS_EXIT_DELAY, "503 only after {:?}", started.elapsed());
    assert!(r.body.contains("rank 1 of the gang disconnected"), "{}", r.body);
    let r = complete(a, "demo", "hello", 2).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let err = bounded("the head fails", head.stopped()).await.unwrap_err();
    assert!(matches!(err, SimError::Gang(_)), "{err}");
    assert_eq!(err.exit_code(), 1, "the process exits non-zero");
    assert!(err.to_string().contains("rank 1"), "{err}");
    assert!(started.elapsed() >= flotilla_sim::GANG_LOSS_EXIT_DELAY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_end_with_an_error_when_the_head_goes() {
    let head = start(member(2, 0, 0)).await;
    let (a, port) = (head.local_addr(), head.gang_addr().unwrap().port());
    let mut w1 = worker(2, 1, port).await;
    health_becomes(a, 200).await;
    head.shutdown().await.unwrap();
    let err = bounded("the worker ends", w1.stopped()).await.unwrap_err();
    assert_eq!(err.exit_code(), 1);
    assert!(err.to_string().contains("lost the connection to the head"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_out_of_range_and_garbage_joins_are_refused() {
    let head = start(member(3, 0, 0)).await;
    let (a, gang) = (head.local_addr(), head.gang_addr().unwrap());
    let w1 = worker(3, 1, gang.port()).await;
    assert!(bounded("rank 1 joins", w1.joined()).await);

    let mut dup = worker(3, 1, gang.port()).await;
    let err = bounded("the duplicate ends", dup.stopped()).await.unwrap_err();
    assert!(err.to_string().contains("duplicate rank"), "{err}");
    assert_eq!(err.exit_code(), 1);

    // a member of a 4-node gang knocking at a 3-node head
    let mut stranger = worker(4, 3, gang.port()).await;
    let err = bounded("the stranger ends", stranger.stopped()).await.unwrap_err();
    assert!(err.to_string().contains("world 4"), "{err}");

    // garbage gets one error line and a closed socket
    let mut s = tokio::net::TcpStream::connect(gang).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    bounded("the garbage answer", s.read_to_string(&mut answer)).await.unwrap();
    assert!(answer.starts_with("error not a gang hello"), "{answer:?}");

    // none of that disturbed the gang: rank 1 still holds, rank 2 completes it
    let r = get(a, "/health").await;
    assert!(r.status == 503 && r.body.contains("ranks 2 "), "{} {}", r.status, r.body);
    let w2 = worker(3, 2, gang.port()).await;
    assert!(bounded("rank 2 joins", w2.joined()).await);
    health_becomes(a, 200).await;
    head.shutdown().await.unwrap();
    drop((w1, w2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_retries_until_the_head_listens() {
    let port = free_port(); // free a moment ago
    let w1 = worker(2, 1, port).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // several refused attempts
    let head = start(member(2, 0, port)).await;
    assert!(bounded("rank 1 joins late", w1.joined()).await);
    health_becomes(head.local_addr(), 200).await;
    head.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_timeouts_end_workers_and_heads() {
    let port = free_port();
    let mut a = member(2, 1, port);
    a.gang.rendezvous_timeout_seconds = 0.4;
    let mut w = flotilla_sim::start_worker(a).await.unwrap();
    let err = bounded("the worker gives up", w.stopped()).await.unwrap_err();
    assert!(err.to_string().contains("could not join the head"), "{err}");

    let mut h = member(2, 0, 0);
    h.gang.rendezvous_timeout_seconds = 0.4;
    let mut head = start(h).await;
    let err = bounded("the head gives up", head.stopped()).await.unwrap_err();
    assert!(err.to_string().contains("did not form"), "{err}");
    assert_eq!(err.exit_code(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_ranks_join_the_head_by_start_rank() {
    let dp = |start: u32, port: u16| SimArgs {
        gang: GangArgs {
            data_parallel_size: 4,
            data_parallel_size_local: Some(2),
            data_parallel_start_rank: Some(start),
            data_parallel_address: Some("127.0.0.1".into()),
            data_parallel_rpc_port: Some(port),
            headless: start > 0,
            ..GangArgs::default()
        },
        ..args()
    };
    let head = start(dp(0, 0)).await;
    let port = head.gang_addr().unwrap().port();
    assert!(get(head.local_addr(), "/health").await.body.contains("ranks 2, 3"));
    let w = flotilla_sim::start_worker(dp(2, port)).await.unwrap();
    assert!(bounded("ranks 2..4 join", w.joined()).await);
    health_becomes(head.local_addr(), 200).await;
    // four ranks' batch slots behind one head
    let body = get(head.local_addr(), "/metrics").await.body;
    assert!(body.contains("vllm:cache_config_info"), "{body}");
    head.shutdown().await.unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subcommand_exits_1_when_its_gang_breaks() {
    // `flotilla sim` (run) as the head: a worker's loss ends it with a runtime error
    let port = free_port();
    let head = tokio::spawn(flotilla_sim::run(member(2, 0, port)));
    let w = worker(2, 1, port).await;
    assert!(bounded("rank 1 joins", w.joined()).await);
    w.shutdown().await.unwrap();
    let err = bounded("the head's run ends", head).await.unwrap().unwrap_err();
    assert_eq!(err.exit_code(), 1, "{err}");
    // `flotilla sim --headless` (run) as the worker: the head's loss ends it the same way
    let port = free_port();
    let head = start(member(2, 0, port)).await;
    let w = tokio::spawn(flotilla_sim::run(member(2, 1, port)));
    health_becomes(head.local_addr(), 200).await;
    head.shutdown().await.unwrap();
    let err = bounded("the worker's run ends", w).await.unwrap().unwrap_err();
    assert_eq!(err.exit_code(), 1, "{err}");
    assert!(err.to_string().contains("lost the connection to the head"), "{err}");
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SimArgs,
}

fn usage_error(argv: &[&str]) -> SimError {
    // "-pp" stands for a two-stage pipeline, so that two nodes split the model evenly
    let argv = argv.iter().flat_map(|a| if *a == "-pp" { vec!["--pipeline-parallel-size", "2"] } else { vec![*a] });
    let cli = Cli::try_parse_from(std::iter::once("sim").chain(argv)).expect("clap parses");
    cli.args.validate().expect_err("invalid")
}

#[tokio::test]
async fn bad_flag_combinations_exit_2_naming_the_flag() {
    for (argv, flag) in [
        (&["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--master-port", "1"][..], "--node-rank"),
        (&["--nnodes", "2", "-pp", "--node-rank", "1", "--headless", "--master-port", "1"], "--master-addr"),
        (&["--nnodes", "2", "-pp", "--master-addr", "h"], "--master-port"),
        (&["--nnodes", "2", "-pp", "--node-rank", "1", "--master-addr", "h", "--master-port", "1"], "--headless"),
        (&["--nnodes", "2", "-pp", "--master-addr", "h", "--master-port", "1", "--headless"], "--headless"),
        (&["--headless"], "--headless"),
        (&["--nnodes", "2", "--tensor-parallel-size", "3", "--master-addr", "h", "--master-port", "1"], "--nnodes"),
        (&["--data-parallel-size", "2", "--data-parallel-size-local", "1"], "--data-parallel-address"),
        (&["--data-parallel-size", "2", "--data-parallel-size-local", "3"], "--data-parallel-size-local"),
        (&["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    ] {
        let err = usage_error(argv);
        assert_eq!(err.exit_code(), 2, "{argv:?}: {err}");
        assert!(err.to_string().contains(flag), "{argv:?}: {err}");
    }
    // the subcommand's entry point returns the same usage error before binding anything
    let (_, a) = Cli::try_parse_from(["sim", "--port", "0", "--headless"]).map(|c| ((), c.args)).unwrap();
    let err = flotilla_sim::run(a).await.unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("--headless"), "{err}");
    // and the flags parse as vLLM spells them
    let c = Cli::try_parse_from([
        "sim",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.1",
        "--master-port",
        "29501",
        "--headless",
        "--tensor-parallel-size",
        "8",
        "--pipeline-parallel-size",
        "2",
    ])
    .unwrap();
    assert!(matches!(c.args.validate().unwrap().gang, flotilla_sim::GangRole::Worker { first: 1, world: 2, .. }));
}
