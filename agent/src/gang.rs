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
//! (G GPUs per member, N members, R the member's rank, H:P the head's rendezvous address.)
//! The `ray` layout starts a Ray cluster instead and is not a flag set. A Model's
//! `engine_args` may not set any of these (`flotilla_api::spec::GANG_FLAGS`).
//!
//! Step 2 of multi-node replicas (docs/actors.md) wires this into the drivers, with the
//! head's rendezvous port allocated by its agent and passed to the workers.

/// How the members split the model (`spec.topology.layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    TpPp,
    DataParallel,
}

impl Layout {
    /// From the assignment's layout word; None for one this agent cannot launch.
    pub fn parse(s: &str) -> Option<Layout> {
        match s {
            "" | "tp-pp" => Some(Layout::TpPp),
            "data-parallel" => Some(Layout::DataParallel),
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
    let mut args: Vec<String> = vec!["--tensor-parallel-size".into(), s(m.gpus_per_node)];
    match m.layout {
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
            "--data-parallel-start-rank".into(),
            s(m.rank),
            "--data-parallel-address".into(),
            host.into(),
            "--data-parallel-rpc-port".into(),
            port.to_string(),
        ]),
    }
    if m.rank > 0 {
        args.push("--headless".into());
    }
    Ok(args)
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
             --data-parallel-start-rank 1 --data-parallel-address 10.0.0.5 --data-parallel-rpc-port 29500 --headless"
        );
        assert_eq!((Layout::parse("data-parallel"), Layout::parse("ray")), (Some(Layout::DataParallel), None));
    }

    #[test]
    fn impossible_members_are_named() {
        let bad = |m: Member<'_>| member_args(&m).unwrap_err();
        assert!(bad(Member { rank: 3, ..member(Layout::TpPp, 0) }).contains("rank 3 of a gang of 3"));
        assert!(bad(Member { head: ("", 0), ..member(Layout::TpPp, 1) }).contains("not known yet"));
        assert!(bad(Member { gpus_per_node: 0, ..member(Layout::TpPp, 1) }).contains("at least one GPU"));
    }
}
