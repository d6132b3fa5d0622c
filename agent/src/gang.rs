//! The engine flags of one member of a multi-node replica (a gang, `spec.topology`), by
//! layout, as vLLM's native multi-node serving takes them (the sim takes the same). Pure: the
//! drivers append them to the member's command line. Rank 0 is the head: it serves the API
//! and listens for the other ranks on the rendezvous address; ranks > 0 run `--headless`.
//!
//! | layout | flags |
//! |---|---|
//! | tp-pp | `--tensor-parallel-size G --pipeline-parallel-size N --nnodes N --node-rank R --master-addr H --master-port P` |
//! | data-parallel | `--tensor-parallel-size G --data-parallel-size N --data-parallel-size-local 1 --data-parallel-start-rank R --data-parallel-address H --data-parallel-rpc-port P` |
//!
//! | ray | head: `--tensor-parallel-size G --pipeline-parallel-size N` (+ `--distributed-executor-backend ray`, vLLM); workers: no engine |
//!
//! (G GPUs per member, N members, R the member's rank, H:P the head's rendezvous address.)
//! A Model's `engine_args` may not set any of these (`flotilla_api::spec::GANG_FLAGS`).
//!
//! The `ray` layout's rendezvous is a Ray cluster: every member runs `flotilla ray-member`
//! ([`crate::ray_member`], flags from [`ray_member_args`]): the head runs Ray's head node on
//! the rendezvous port and then the engine attached to it; a worker runs a Ray node that
//! joins the head and no engine (it is headless in every sense below). Agents run it only
//! when started with `--ray` (Ray's ports have no authentication; docs/security.md).
//!
//! How an agent runs its member ([`crate::engines::engine`] wires this in):
//!
//! - **Head** (rank 0): the agent allocates a second port from `--engine-port-range` for the
//!   rendezvous before anything else, reports `EngineReport.rendezvous = "<--address>:<port>"`
//!   (IPv6 in brackets) until the engine stops, keeps the port across the engine's restarts
//!   (the workers were told it) and releases it with the engine. It is saved in the state
//!   file, so an adopted head keeps it. The head serves the API and is probed on `/health`
//!   like any engine (a gang's head answers 503 until every rank joined).
//! - **Worker** (rank > 0): with no `head_address` yet it is not launched: it downloads the
//!   weights (engines that need them; the next task finds them in the cache) and then
//!   reports `starting` with [`WAITING_FOR_HEAD`] until the assignment changes (the changed
//!   `gang` makes the agent replace the engine). With it, the engine runs `--headless`: no API
//!   port and no `/health`. It is reported `ready`, with an empty endpoint, once its process
//!   has run [`WORKER_SETTLE`] without exiting; its exit is a crash (restarted, then failed,
//!   as for any engine).
//! - **Per-node environment** (vLLM only; the sim ignores it): `VLLM_HOST_IP` = the agent's
//!   `--address`, and `GLOO_SOCKET_IFNAME`/`NCCL_SOCKET_IFNAME` = `--gang-interface` when set.
//! - **Refused** (reported `failed`): layout `ray` on an agent without `--ray`, an unknown layout, and any member this
//!   module cannot build flags for ([`refusal`]).

use flotilla_api::pb::GangAssignment;

/// How the members split the model (`spec.topology.layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    TpPp,
    DataParallel,
    /// A Ray cluster over the members; the head's engine places the ranks through Ray.
    Ray,
}

impl Layout {
    /// From the assignment's layout word; None for one this agent cannot launch.
    pub fn parse(s: &str) -> Option<Layout> {
        match s {
            "" | "tp-pp" => Some(Layout::TpPp),
            "data-parallel" => Some(Layout::DataParallel),
            "ray" => Some(Layout::Ray),
            _ => None,
        }
    }
}

/// One member's place in its gang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member<'a> {
    pub layout: Layout,
    /// Members in the gang (N).
    pub size: u32,
    pub rank: u32,
    /// GPUs of this member (G).
    pub gpus_per_node: u32,
    /// The head's rendezvous host and port.
    pub head: (&'a str, u16),
}

/// Flags vLLM members get beside [`member_args`] (not the sim, which has no such flags):
/// tp-pp members name the multiprocessing executor (vLLM would pick Ray when a Ray cluster
/// happens to run on the node), a data-parallel head runs one API server instead of one
/// per rank (~0.9 GB each, measured on the CPU build), and a Ray head the Ray executor.
pub fn vllm_member_args(g: &GangAssignment) -> Vec<String> {
    match Layout::parse(&g.layout) {
        Some(Layout::TpPp) => vec!["--distributed-executor-backend".into(), "mp".into()],
        Some(Layout::Ray) if is_head(g) => vec!["--distributed-executor-backend".into(), "ray".into()],
        Some(Layout::DataParallel) if is_head(g) => vec!["--api-server-count".into(), "1".into()],
        _ => Vec::new(),
    }
}

/// The member's flags, or why it cannot be launched.
pub fn member_args(m: &Member<'_>) -> Result<Vec<String>, String> {
    if m.size < 2 || m.rank >= m.size {
        return Err(format!("rank {} of a gang of {} is not a member", m.rank, m.size));
    }
    if m.gpus_per_node == 0 {
        return Err("a gang member needs at least one GPU".into());
    }
    let (host, port) = m.head;
    if host.is_empty() || port == 0 {
        return Err(format!("rank {}: the head's rendezvous address is not known yet", m.rank));
    }
    let s = |v: u32| v.to_string();
    if m.layout == Layout::Ray {
        // Ray places the ranks: the head's engine gets the sizes, a worker runs no engine.
        return Ok(match m.rank {
            0 => {
                vec!["--tensor-parallel-size".into(), s(m.gpus_per_node), "--pipeline-parallel-size".into(), s(m.size)]
            }
            _ => Vec::new(),
        });
    }
    let mut args: Vec<String> = vec!["--tensor-parallel-size".into(), s(m.gpus_per_node)];
    match m.layout {
        Layout::Ray => unreachable!("returned above"),
        Layout::TpPp => args.extend([
            "--pipeline-parallel-size".into(),
            s(m.size),
            "--nnodes".into(),
            s(m.size),
            "--node-rank".into(),
            s(m.rank),
            "--master-addr".into(),
            host.into(),
            "--master-port".into(),
            port.to_string(),
        ]),
        Layout::DataParallel => args.extend([
            "--data-parallel-size".into(),
            s(m.size),
            "--data-parallel-size-local".into(),
            "1".into(),
            "--data-parallel-address".into(),
            host.into(),
            "--data-parallel-rpc-port".into(),
            port.to_string(),
        ]),
    }
    // vLLM 0.32 takes a start rank on the head (even 0) as external load balancing and then
    // refuses headless workers (docs/real-vllm.md, "Multi-node"): workers only.
    if m.layout == Layout::DataParallel && m.rank > 0 {
        args.extend(["--data-parallel-start-rank".into(), s(m.rank)]);
    }
    if m.rank > 0 {
        args.push("--headless".into());
    }
    Ok(args)
}

/// The reason a worker reports while its gang's head has no rendezvous address yet.
pub const WAITING_FOR_HEAD: &str = "waiting for the gang's head (rank 0) to report its rendezvous address";

/// How long a headless worker's process must run without exiting to be reported ready (it
/// has no `/health`).
pub const WORKER_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Why this agent cannot run the member `g`, or None. `ray`: the agent was started with
/// `--ray` (it may run Ray nodes).
pub fn refusal(g: &GangAssignment, ray: bool) -> Option<String> {
    let layout = match Layout::parse(&g.layout) {
        Some(Layout::Ray) if !ray => return Some(RAY_OFF.into()),
        Some(l) => l,
        None => return Some(format!("unknown gang layout {:?}; agents launch tp-pp, data-parallel and ray", g.layout)),
    };
    // Any head will do: only the member's own numbers are checked here.
    let m = Member { layout, size: g.size, rank: g.rank, gpus_per_node: g.gpus_per_node, head: ("head", 1) };
    member_args(&m).err()
}

/// Why an agent without `--ray` refuses a `ray`-layout member.
pub const RAY_OFF: &str =
    "layout ray needs an agent started with --ray PROGRAM (Ray's CLI); this one runs no Ray nodes (docs/agent.md, \"Ray layout\")";

/// The `flotilla ray-member` flags of a `ray`-layout member (after `--ray PROGRAM`): the
/// head's GCS on its rendezvous port, a worker joining the head's reported address.
pub fn ray_member_args(g: &GangAssignment, address: &str, rendezvous_port: Option<u16>) -> Result<Vec<String>, String> {
    let mut v = vec!["--address".to_string(), address.to_string(), "--num-gpus".into(), g.gpus_per_node.to_string()];
    match (is_head(g), rendezvous_port) {
        (true, Some(p)) if p != 0 => v.extend(["--head-port".into(), p.to_string()]),
        (true, _) => return Err("the head has no rendezvous port".into()),
        (false, _) => {
            split_address(&g.head_address)?;
            v.extend(["--join".into(), g.head_address.clone()]);
        }
    }
    Ok(v)
}

/// Whether `g` is a member of a `ray`-layout gang.
pub fn is_ray(g: &GangAssignment) -> bool {
    Layout::parse(&g.layout) == Some(Layout::Ray)
}

/// Whether `g` is the head (rank 0).
pub fn is_head(g: &GangAssignment) -> bool {
    g.rank == 0
}

/// `host:port` of a head's rendezvous address (`[v6]:port` for IPv6) → (host, port).
pub fn split_address(addr: &str) -> Result<(&str, u16), String> {
    let bad = || format!("the head's rendezvous address {addr:?} is not host:port");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains(['[', ']']) {
        return Err(bad());
    }
    Ok((host, port))
}

/// The flags of member `g` on this node: the head's from its own `address` and rendezvous
/// port, a worker's from its assignment's `head_address`.
pub fn launch_args(g: &GangAssignment, address: &str, rendezvous_port: Option<u16>) -> Result<Vec<String>, String> {
    let layout = Layout::parse(&g.layout).ok_or_else(|| format!("unknown gang layout {:?}", g.layout))?;
    let head = if is_head(g) {
        (address, rendezvous_port.unwrap_or(0))
    } else if g.head_address.is_empty() {
        ("", 0)
    } else {
        split_address(&g.head_address)?
    };
    member_args(&Member { layout, size: g.size, rank: g.rank, gpus_per_node: g.gpus_per_node, head })
}

/// The per-node environment of a vLLM member: the address its collectives bind
/// (`VLLM_HOST_IP`), and the interface Gloo and NCCL use when the node names one.
pub fn member_env(address: &str, interface: Option<&str>) -> Vec<(String, String)> {
    let mut env = vec![("VLLM_HOST_IP".to_string(), address.to_string())];
    if let Some(i) = interface {
        env.push(("GLOO_SOCKET_IFNAME".into(), i.into()));
        env.push(("NCCL_SOCKET_IFNAME".into(), i.into()));
    }
    env
}

/// A network interface name as Linux takes one (`IFNAMSIZ`): 1 to 15 bytes, none of `/`,
/// `:`, whitespace or control characters, not `.` or `..`.
pub fn check_interface(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_graphic() && c != '/' && c != ':');
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a network interface name (1 to 15 characters, no '/', ':' or spaces)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(layout: Layout, rank: u32) -> Member<'static> {
        Member { layout, size: 3, rank, gpus_per_node: 8, head: ("10.0.0.5", 29500) }
    }

    #[test]
    fn tp_pp_members_find_the_head_and_workers_are_headless() {
        let head = member_args(&member(Layout::TpPp, 0)).unwrap().join(" ");
        assert_eq!(
            head,
            "--tensor-parallel-size 8 --pipeline-parallel-size 3 --nnodes 3 --node-rank 0 \
             --master-addr 10.0.0.5 --master-port 29500"
        );
        let worker = member_args(&member(Layout::TpPp, 2)).unwrap().join(" ");
        assert!(worker.ends_with("--node-rank 2 --master-addr 10.0.0.5 --master-port 29500 --headless"), "{worker}");
    }

    #[test]
    fn data_parallel_members_are_one_rank_per_node() {
        let w = member_args(&member(Layout::DataParallel, 1)).unwrap().join(" ");
        assert_eq!(
            w,
            "--tensor-parallel-size 8 --data-parallel-size 3 --data-parallel-size-local 1 \
             --data-parallel-address 10.0.0.5 --data-parallel-rpc-port 29500 --data-parallel-start-rank 1 --headless"
        );
        let head = member_args(&member(Layout::DataParallel, 0)).unwrap().join(" ");
        assert!(!head.contains("--data-parallel-start-rank"), "vLLM refuses headless workers then: {head}");
        let g = |layout: &str, rank: u32| GangAssignment {
            size: 2,
            rank,
            layout: layout.into(),
            gpus_per_node: 1,
            head_address: String::new(),
            token: String::new(),
        };
        assert_eq!(vllm_member_args(&g("tp-pp", 1)), ["--distributed-executor-backend", "mp"]);
        assert_eq!(vllm_member_args(&g("data-parallel", 0)), ["--api-server-count", "1"]);
        assert!(vllm_member_args(&g("data-parallel", 1)).is_empty());
        assert_eq!((Layout::parse("data-parallel"), Layout::parse("mesh")), (Some(Layout::DataParallel), None));
        assert_eq!(vllm_member_args(&g("ray", 0)), ["--distributed-executor-backend", "ray"]);
        assert!(vllm_member_args(&g("ray", 1)).is_empty());
    }

    #[test]
    fn impossible_members_are_named() {
        let bad = |m: Member<'_>| member_args(&m).unwrap_err();
        assert!(bad(Member { rank: 3, ..member(Layout::TpPp, 0) }).contains("rank 3 of a gang of 3"));
        assert!(bad(Member { head: ("", 0), ..member(Layout::TpPp, 1) }).contains("not known yet"));
        assert!(bad(Member { gpus_per_node: 0, ..member(Layout::TpPp, 1) }).contains("at least one GPU"));
    }

    fn gang(rank: u32, layout: &str, head_address: &str) -> GangAssignment {
        GangAssignment {
            size: 2,
            rank,
            layout: layout.into(),
            gpus_per_node: 1,
            head_address: head_address.into(),
            token: String::new(),
        }
    }

    #[test]
    fn members_this_agent_cannot_run_are_refused_with_the_reason() {
        assert_eq!(refusal(&gang(0, "ray", ""), false).as_deref(), Some(RAY_OFF));
        assert_eq!(refusal(&gang(0, "ray", ""), true), None);
        assert!(refusal(&gang(0, "mesh", ""), true).unwrap().contains("unknown gang layout \"mesh\""));
        assert!(refusal(&gang(2, "tp-pp", ""), true).unwrap().contains("rank 2 of a gang of 2"));
        assert!(refusal(&GangAssignment { gpus_per_node: 0, ..gang(1, "tp-pp", "") }, true).unwrap().contains("GPU"));
        assert_eq!(
            refusal(&gang(1, "tp-pp", ""), false),
            None,
            "a worker without its head yet waits, it is not refused"
        );
        assert_eq!(refusal(&gang(0, "data-parallel", ""), false), None);
    }

    #[test]
    fn ray_members_run_ray_nodes_and_only_the_head_an_engine() {
        let head = launch_args(&gang(0, "ray", ""), "10.0.0.5", Some(30001)).unwrap().join(" ");
        assert_eq!(head, "--tensor-parallel-size 1 --pipeline-parallel-size 2");
        assert!(launch_args(&gang(1, "ray", "10.0.0.5:30001"), "10.0.0.6", None).unwrap().is_empty());
        let head = ray_member_args(&gang(0, "ray", ""), "10.0.0.5", Some(30001)).unwrap().join(" ");
        assert_eq!(head, "--address 10.0.0.5 --num-gpus 1 --head-port 30001");
        let w = ray_member_args(&gang(1, "ray", "10.0.0.5:30001"), "10.0.0.6", None).unwrap().join(" ");
        assert_eq!(w, "--address 10.0.0.6 --num-gpus 1 --join 10.0.0.5:30001");
        assert!(ray_member_args(&gang(1, "ray", ""), "10.0.0.6", None).is_err());
        assert!(ray_member_args(&gang(0, "ray", ""), "10.0.0.5", None).is_err());
    }

    #[test]
    fn heads_use_their_own_port_and_workers_the_reported_address() {
        let head = launch_args(&gang(0, "tp-pp", ""), "10.0.0.5", Some(30001)).unwrap().join(" ");
        assert!(head.ends_with("--node-rank 0 --master-addr 10.0.0.5 --master-port 30001"), "{head}");
        let w = launch_args(&gang(1, "tp-pp", "[fd00::5]:30001"), "fd00::6", None).unwrap().join(" ");
        assert!(w.ends_with("--master-addr fd00::5 --master-port 30001 --headless"), "{w}");
        assert!(launch_args(&gang(1, "tp-pp", ""), "10.0.0.6", None).unwrap_err().contains("not known yet"));
        assert!(launch_args(&gang(1, "tp-pp", "10.0.0.5"), "10.0.0.6", None).unwrap_err().contains("host:port"));
        assert_eq!(split_address("10.0.0.5:29500"), Ok(("10.0.0.5", 29500)));
        for bad in ["", ":1", "h:0", "h:x", "[::1:5"] {
            assert!(split_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn member_env_and_interfaces() {
        assert_eq!(member_env("10.0.0.5", None), [("VLLM_HOST_IP".to_string(), "10.0.0.5".to_string())]);
        let names: Vec<String> =
            member_env("10.0.0.5", Some("ib0")).into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(names, ["VLLM_HOST_IP=10.0.0.5", "GLOO_SOCKET_IFNAME=ib0", "NCCL_SOCKET_IFNAME=ib0"]);
        for ok in ["eth0", "ens1f0np0", "bond0.100", "enp65s0f1"] {
            assert!(check_interface(ok).is_ok(), "{ok}");
        }
        for bad in ["", "eth0:1", "a/b", "has space", "sixteen-chars-xx", ".."] {
            assert!(check_interface(bad).is_err(), "{bad}");
        }
    }
}
