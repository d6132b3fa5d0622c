//! Engine drivers: how an assignment becomes a command line. [`SimDriver`] runs
//! `flotilla sim`; [`VllmDriver`] fills the `--vllm-command` template. Pure: they build an
//! [`EngineCommand`] (program, args, env) that the engine task
//! ([`crate::engines::engine`]) spawns. An engine that serves TLS ([`crate::engine_tls`])
//! gets `--ssl-certfile F --ssl-keyfile F` last, the same flags for vLLM and the sim.
//!
//! A member of a multi-node replica ([`GangLaunch`], from [`crate::gang`]) gets its member
//! flags after the Model's `engine_args` (and before the TLS flags). A headless worker
//! serves no API: the sim gets no `--host`/`--port` (it would ignore them), vLLM's template
//! gets `{port}` = 0 (`vllm serve --headless` starts no API server), and neither gets TLS
//! flags. vLLM members also get the per-node environment (`VLLM_HOST_IP`, and
//! `GLOO_SOCKET_IFNAME`/`NCCL_SOCKET_IFNAME` with `--gang-interface`); the sim none.

use std::path::{Path, PathBuf};

use flotilla_api::pb::ReplicaAssignment;

use crate::error::AgentError;

/// A command line ready to spawn.
#[derive(Clone, PartialEq, Eq)]
pub struct EngineCommand {
    /// Program to run.
    pub program: PathBuf,
    /// Arguments, one word each.
    pub args: Vec<String>,
    /// The engine's environment: a driver sets what it needs (the GPUs); the engine task
    /// lays it over the allowed part of the agent's ([`crate::engine_env`]) and adds the
    /// key. The process gets this and nothing else.
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for EngineCommand {
    /// Names of the environment only: it holds the engine's API key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("EngineCommand")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env", &names)
            .finish()
    }
}

impl EngineCommand {
    /// `program arg ...` for logs.
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&shlex::try_quote(a).map(|c| c.into_owned()).unwrap_or_else(|_| a.clone()));
        }
        s
    }
}

/// Everything a driver needs to build one engine's command.
#[derive(Debug, Clone)]
pub struct LaunchSpec<'a> {
    /// The assignment.
    pub assignment: &'a ReplicaAssignment,
    /// Host to listen on.
    pub host: &'a str,
    /// Port to listen on.
    pub port: u16,
    /// Local model path once downloaded (vLLM); None for engines that need no weights.
    pub model_path: Option<&'a Path>,
    /// The engine's certificate and key files when it serves TLS.
    pub tls: Option<&'a crate::engine_tls::EngineCert>,
    /// Its member of a multi-node replica; None for a one-node replica.
    pub gang: Option<&'a GangLaunch>,
}

/// A gang member's part of its command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GangLaunch {
    /// The member flags ([`crate::gang::launch_args`]).
    pub args: Vec<String>,
    /// A worker (rank > 0): `--headless`, no API, no port, no TLS.
    pub headless: bool,
    /// The per-node environment of vLLM members ([`crate::gang::member_env`]).
    pub env: Vec<(String, String)>,
    /// Flags only vLLM members get ([`crate::gang::vllm_member_args`]).
    pub vllm_args: Vec<String>,
    /// A `ray`-layout member: the command is `flotilla ray-member`, with the engine's after
    /// `--` on the head ([`member_command`]).
    pub ray: Option<RayLaunch>,
}

/// How a `ray`-layout member is run: `BINARY ARGS...` (`ray-member --ray PROGRAM ...`),
/// with the gang's token as Ray's auth token in the environment (never on a command line).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RayLaunch {
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub token: String,
}

impl std::fmt::Debug for RayLaunch {
    /// Without the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RayLaunch").field("binary", &self.binary).field("args", &self.args).finish_non_exhaustive()
    }
}

/// `--kv-events-config` for an engine of `replica` (the agent's `--kv-events`): vLLM's ZMQ
/// publisher and replay socket on free ports of the node address (`tcp://*:0` binds
/// `VLLM_HOST_IP`, the sim its `--host`), topic `kv@<replica>`. A Model may not set the flag
/// itself (`engine_policy`): it could send the token ids anywhere.
pub fn kv_events_args(replica: &str) -> [String; 2] {
    let config = serde_json::json!({
        "enable_kv_cache_events": true,
        "publisher": "zmq",
        "endpoint": "tcp://*:0",
        "replay_endpoint": "tcp://*:0",
        "topic": format!("kv@{replica}"),
    });
    ["--kv-events-config".into(), config.to_string()]
}

/// The command that runs `spec`: the driver's, except for a `ray`-layout member, which runs
/// `flotilla ray-member` ([`crate::ray_member`]): a worker with no engine at all, the head
/// with the driver's command after `--`. The environment is the driver's either way (the
/// member passes it on to Ray and the engine), plus `RAY_AUTH_MODE=token` and the gang's
/// token as `RAY_AUTH_TOKEN`: Ray's ports refuse whoever does not hold it.
pub fn member_command(driver: &dyn EngineDriver, spec: &LaunchSpec<'_>) -> Result<EngineCommand, AgentError> {
    let Some(ray) = spec.gang.and_then(|g| g.ray.as_ref()) else { return driver.command(spec) };
    let mut args = ray.args.clone();
    let mut env = match spec.headless() {
        // No engine: the GPUs and the node's network environment are Ray's.
        true => {
            let mut env = gpu_env(spec.assignment);
            env.extend(spec.gang.into_iter().flat_map(|g| g.env.iter().cloned()));
            env
        }
        false => {
            let engine = driver.command(spec)?;
            args.push("--".into());
            args.push(engine.program.display().to_string());
            args.extend(engine.args);
            engine.env
        }
    };
    env.push(("RAY_AUTH_MODE".into(), "token".into()));
    env.push(("RAY_AUTH_TOKEN".into(), ray.token.clone()));
    Ok(EngineCommand { program: ray.binary.clone(), args, env })
}

/// The bound GPUs, by PCI bus order, as CUDA (vLLM, Ray) sees them.
fn gpu_env(a: &ReplicaAssignment) -> Vec<(String, String)> {
    let visible = a.gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    vec![("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()), ("CUDA_VISIBLE_DEVICES".into(), visible)]
}

impl LaunchSpec<'_> {
    fn headless(&self) -> bool {
        self.gang.is_some_and(|g| g.headless)
    }

    fn member_args(&self) -> impl Iterator<Item = String> + '_ {
        self.gang.into_iter().flat_map(|g| g.args.iter().cloned())
    }
}

/// `--ssl-certfile CERT --ssl-keyfile KEY` (vLLM's and the sim's flags) when `spec` serves TLS.
fn tls_args(spec: &LaunchSpec<'_>) -> Vec<String> {
    match spec.tls.filter(|_| !spec.headless()) {
        Some(t) => vec![
            "--ssl-certfile".into(),
            t.cert.display().to_string(),
            "--ssl-keyfile".into(),
            t.key.display().to_string(),
        ],
        None => Vec::new(),
    }
}

/// Builds engine command lines.
pub trait EngineDriver: Send + Sync + std::fmt::Debug {
    /// Whether the model must be downloaded before the engine starts.
    fn needs_weights(&self) -> bool;
    /// The command line for `spec`.
    fn command(&self, spec: &LaunchSpec<'_>) -> Result<EngineCommand, AgentError>;
}

/// Runs `<binary> [sim] --host H --port P --model NAME [sim-args] [engine_args] [member flags]`
/// (a headless worker without `--host`/`--port`).
///
/// The sim needs no weights: sim engines skip the download entirely, so a `file://` source
/// that does not exist on the node is fine for `engine: sim`.
#[derive(Debug, Clone)]
pub struct SimDriver {
    /// The program (`flotilla`, or a standalone sim binary).
    pub binary: PathBuf,
    /// The subcommand word (`sim`), or empty.
    pub subcommand: String,
    /// Extra words for every sim engine.
    pub extra_args: Vec<String>,
}

impl EngineDriver for SimDriver {
    fn needs_weights(&self) -> bool {
        false
    }

    fn command(&self, spec: &LaunchSpec<'_>) -> Result<EngineCommand, AgentError> {
        let mut args = Vec::new();
        if !self.subcommand.is_empty() {
            args.push(self.subcommand.clone());
        }
        if !spec.headless() {
            args.extend(["--host".into(), spec.host.to_string(), "--port".into(), spec.port.to_string()]);
        }
        args.extend(["--model".into(), served_model(spec.assignment).to_owned()]);
        args.extend(self.extra_args.iter().cloned());
        args.extend(spec.assignment.engine_args.iter().cloned());
        args.extend(spec.member_args());
        args.extend(tls_args(spec));
        Ok(EngineCommand { program: self.binary.clone(), args, env: Vec::new() })
    }
}

/// The model name an engine serves (`{model}` in the vLLM template, the sim's `--model`): a
/// P/D member's engines serve the disaggregated Model's name
/// ([`flotilla_api::spec::served_name`]), so gateways pass clients' bodies on unchanged.
pub fn served_model(a: &flotilla_api::pb::ReplicaAssignment) -> &str {
    let role = a.kv_transfer.as_ref().and_then(|k| flotilla_api::spec::EngineRole::parse(&k.role));
    flotilla_api::spec::served_name(&a.model, role)
}

/// Fills the vLLM command template (already split into words by [`parse_template`]).
#[derive(Debug, Clone)]
pub struct VllmDriver {
    /// Template words.
    pub template: Vec<String>,
}

const PLACEHOLDERS: [&str; 7] = ["{source}", "{model}", "{port}", "{host}", "{replica}", "{gpus}", "{args}"];

/// Refuses operator-given words (`--sim-args`, `--vllm-command`) that set what the agent
/// gives each engine itself: an API key (through `VLLM_API_KEY`; a `--api-key` flag would
/// win over it, leaving the gateways with the wrong key) or TLS (`--ssl-*`: the agent's
/// certificate, whose pin gateways check, per `--engine-tls`).
pub fn refuse_agent_flags(flag: &'static str, words: &[String]) -> Result<(), AgentError> {
    let name = |w: &String| w.split('=').next().unwrap_or(w).replace('_', "-");
    for w in words {
        let n = name(w);
        if n == "--api-key" {
            return Err(AgentError::invalid(
                flag,
                format!("{w:?}: the agent gives each engine its own API key (VLLM_API_KEY); remove the flag"),
            ));
        }
        if n.starts_with("--ssl-") || n == "--enable-ssl-refresh" {
            return Err(AgentError::invalid(
                flag,
                format!("{w:?}: the agent sets engines' TLS itself (--engine-tls); remove the flag"),
            ));
        }
    }
    Ok(())
}

/// Splits a template shell-words-style and checks it: known placeholders only, `{port}` and
/// `{host}` present (engines listen on the agent's `--address` only, not on every
/// interface), `{args}` a word of its own, no `--api-key` or `--ssl-*` ([`refuse_agent_flags`]).
pub fn parse_template(template: &str) -> Result<Vec<String>, AgentError> {
    let words = shlex::split(template)
        .ok_or_else(|| AgentError::invalid("vllm-command", format!("{template:?} has unbalanced quotes")))?;
    if words.is_empty() {
        return Err(AgentError::invalid("vllm-command", "is empty"));
    }
    refuse_agent_flags("vllm-command", &words)?;
    for w in &words {
        let mut rest = w.as_str();
        while let Some(start) = rest.find('{') {
            let end = rest[start..].find('}').map(|e| start + e + 1).unwrap_or(rest.len());
            let ph = &rest[start..end];
            if !PLACEHOLDERS.contains(&ph) {
                return Err(AgentError::invalid(
                    "vllm-command",
                    format!("unknown placeholder {ph:?}; use {}", PLACEHOLDERS.join(" ")),
                ));
            }
            if ph == "{args}" && w != "{args}" {
                return Err(AgentError::invalid("vllm-command", "{args} must be a word of its own"));
            }
            rest = &rest[end..];
        }
    }
    if !words.iter().any(|w| w.contains("{port}")) {
        return Err(AgentError::invalid("vllm-command", format!("{template:?} has no {{port}} placeholder")));
    }
    if !words.iter().any(|w| w.contains("{host}")) {
        return Err(AgentError::invalid(
            "vllm-command",
            format!("{template:?} has no {{host}} placeholder; add --host {{host}}: engines listen on --address only"),
        ));
    }
    Ok(words)
}

impl EngineDriver for VllmDriver {
    fn needs_weights(&self) -> bool {
        true
    }

    fn command(&self, spec: &LaunchSpec<'_>) -> Result<EngineCommand, AgentError> {
        let a = spec.assignment;
        let source = match spec.model_path {
            Some(p) => p.display().to_string(),
            None => a.source.clone(),
        };
        let gpus = a.gpus.len().to_string();
        let port = spec.port.to_string();
        let mut words = Vec::new();
        for w in &self.template {
            if w == "{args}" {
                words.extend(a.engine_args.iter().cloned());
                continue;
            }
            words.push(
                w.replace("{source}", &source)
                    .replace("{model}", served_model(a))
                    .replace("{port}", &port)
                    .replace("{host}", spec.host)
                    .replace("{replica}", &a.replica)
                    .replace("{gpus}", &gpus),
            );
        }
        let mut it = words.into_iter();
        let program = it.next().map(PathBuf::from).ok_or_else(|| AgentError::Engine {
            replica: a.replica.clone(),
            reason: "the vllm command template is empty".into(),
        })?;
        let mut args: Vec<String> = it.collect();
        args.extend(spec.member_args());
        args.extend(spec.gang.into_iter().flat_map(|g| g.vllm_args.iter().cloned()));
        args.extend(tls_args(spec));
        let mut env = gpu_env(a);
        env.extend(spec.gang.into_iter().flat_map(|g| g.env.iter().cloned()));
        Ok(EngineCommand { program, args, env })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment() -> ReplicaAssignment {
        ReplicaAssignment {
            replica: "demo-0".into(),
            model: "demo".into(),
            engine: "vllm".into(),
            source: "hf://org/m".into(),
            engine_args: vec!["--max-model-len".into(), "8192".into()],
            gpus: vec![2, 3],
            adapters: vec![],
            engine_image: String::new(),
            traceparent: String::new(),
            gang: None,
            kv_transfer: None,
        }
    }

    #[test]
    fn sim_command_line() {
        let d = SimDriver {
            binary: "/usr/bin/flotilla".into(),
            subcommand: "sim".into(),
            extra_args: vec!["--speedup".into(), "20".into()],
        };
        let a = assignment();
        let spec =
            LaunchSpec { assignment: &a, host: "127.0.0.1", port: 20001, model_path: None, tls: None, gang: None };
        let c = d.command(&spec).unwrap();
        assert_eq!(
            c.display(),
            "/usr/bin/flotilla sim --host 127.0.0.1 --port 20001 --model demo --speedup 20 --max-model-len 8192"
        );
        let cert = crate::engine_tls::EngineCert {
            cert: "/d/engines/demo-0/tls-cert.pem".into(),
            key: "/d/engines/demo-0/tls-key.pem".into(),
            pin: flotilla_engine::CertFingerprint::of_der(b"x"),
        };
        let c = d.command(&LaunchSpec { tls: Some(&cert), ..spec }).unwrap();
        assert!(
            c.display().ends_with(
                "--max-model-len 8192 --ssl-certfile /d/engines/demo-0/tls-cert.pem --ssl-keyfile /d/engines/demo-0/tls-key.pem"
            ),
            "{}",
            c.display()
        );
        assert!(!d.needs_weights());
        let bare = SimDriver { subcommand: String::new(), ..d };
        let c = bare
            .command(&LaunchSpec { assignment: &a, host: "0.0.0.0", port: 1, model_path: None, tls: None, gang: None })
            .unwrap();
        assert_eq!(c.args[0], "--host");
    }

    #[test]
    fn a_pd_members_engine_serves_the_disaggregated_name() {
        let member = |role: &str| ReplicaAssignment {
            model: format!("llama-{role}"),
            kv_transfer: Some(flotilla_api::pb::KvTransferAssignment { connector: "nixl".into(), role: role.into() }),
            ..assignment()
        };
        let t = parse_template("vllm serve {source} --host {host} --port {port} --served-model-name {model} {args}")
            .unwrap();
        let vllm = VllmDriver { template: t };
        let sim = SimDriver { binary: "/f".into(), subcommand: "sim".into(), extra_args: vec![] };
        for role in ["prefill", "decode"] {
            let a = member(role);
            let spec = LaunchSpec { assignment: &a, host: "h", port: 1, model_path: None, tls: None, gang: None };
            assert!(vllm.command(&spec).unwrap().display().contains("--served-model-name llama "), "{role}");
            assert!(sim.command(&spec).unwrap().display().contains("--model llama "), "{role}");
        }
        // a plain Model whose name happens to end in a role serves its own name
        let a = ReplicaAssignment { model: "x-decode".into(), ..assignment() };
        assert_eq!(served_model(&a), "x-decode");
    }

    #[test]
    fn vllm_template_fills_placeholders_and_gpus() {
        let t = parse_template("vllm serve {source} --host {host} --port {port} --served-model-name {model} {args}")
            .unwrap();
        let d = VllmDriver { template: t };
        let a = assignment();
        let path = PathBuf::from("/data/models/abc");
        let spec = LaunchSpec {
            assignment: &a,
            host: "10.0.0.5",
            port: 20002,
            model_path: Some(&path),
            tls: None,
            gang: None,
        };
        let c = d.command(&spec).unwrap();
        assert_eq!(
            c.display(),
            "vllm serve /data/models/abc --host 10.0.0.5 --port 20002 --served-model-name demo --max-model-len 8192"
        );
        let cert = crate::engine_tls::EngineCert {
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
            pin: flotilla_engine::CertFingerprint::of_der(b"x"),
        };
        let c = d.command(&LaunchSpec { tls: Some(&cert), ..spec }).unwrap();
        assert!(
            c.display().ends_with("--max-model-len 8192 --ssl-certfile /c.pem --ssl-keyfile /k.pem"),
            "{}",
            c.display()
        );
        assert!(c.env.contains(&("CUDA_VISIBLE_DEVICES".into(), "2,3".into())));
        assert!(d.needs_weights());
    }

    fn member(rank: u32) -> (ReplicaAssignment, GangLaunch) {
        let g = flotilla_api::pb::GangAssignment {
            size: 2,
            rank,
            layout: "tp-pp".into(),
            gpus_per_node: 2,
            head_address: if rank == 0 { String::new() } else { "10.0.0.5:30001".into() },
            token: String::new(),
        };
        let own = if rank == 0 { "10.0.0.5" } else { "10.0.0.6" };
        let launch = GangLaunch {
            args: crate::gang::launch_args(&g, own, Some(30001)).unwrap(),
            headless: rank > 0,
            env: crate::gang::member_env(own, Some("ib0")),
            vllm_args: crate::gang::vllm_member_args(&g),
            ray: None,
        };
        (ReplicaAssignment { gang: Some(g), ..assignment() }, launch)
    }

    #[test]
    fn sim_gang_members_get_the_member_flags_and_workers_no_api() {
        let d = SimDriver { binary: "/usr/bin/flotilla".into(), subcommand: "sim".into(), extra_args: vec![] };
        let cert = crate::engine_tls::EngineCert {
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
            pin: flotilla_engine::CertFingerprint::of_der(b"x"),
        };
        let (a, head) = member(0);
        let spec = LaunchSpec {
            assignment: &a,
            host: "10.0.0.5",
            port: 30000,
            model_path: None,
            tls: Some(&cert),
            gang: Some(&head),
        };
        let c = d.command(&spec).unwrap();
        assert_eq!(
            c.display(),
            "/usr/bin/flotilla sim --host 10.0.0.5 --port 30000 --model demo --max-model-len 8192 \
             --tensor-parallel-size 2 --pipeline-parallel-size 2 --nnodes 2 --node-rank 0 \
             --master-addr 10.0.0.5 --master-port 30001 --ssl-certfile /c.pem --ssl-keyfile /k.pem"
        );
        assert!(c.env.is_empty(), "the sim takes no per-node environment");
        let (a, worker) = member(1);
        let c = d
            .command(&LaunchSpec {
                assignment: &a,
                host: "10.0.0.6",
                port: 0,
                model_path: None,
                tls: Some(&cert),
                gang: Some(&worker),
            })
            .unwrap();
        assert_eq!(
            c.display(),
            "/usr/bin/flotilla sim --model demo --max-model-len 8192 --tensor-parallel-size 2 \
             --pipeline-parallel-size 2 --nnodes 2 --node-rank 1 --master-addr 10.0.0.5 --master-port 30001 --headless"
        );
    }

    #[test]
    fn ray_members_run_ray_member_with_the_engine_on_the_head_only() {
        let g = |rank: u32| flotilla_api::pb::GangAssignment {
            size: 2,
            rank,
            layout: "ray".into(),
            gpus_per_node: 2,
            head_address: if rank == 0 { String::new() } else { "10.0.0.5:30001".into() },
            token: String::new(),
        };
        let launch = |rank: u32, own: &str| GangLaunch {
            args: crate::gang::launch_args(&g(rank), own, Some(30001)).unwrap(),
            headless: rank > 0,
            env: crate::gang::member_env(own, None),
            vllm_args: crate::gang::vllm_member_args(&g(rank)),
            ray: Some(RayLaunch {
                binary: "/usr/bin/flotilla".into(),
                args: ["ray-member", "--ray", "/opt/ray"]
                    .into_iter()
                    .map(String::from)
                    .chain(crate::gang::ray_member_args(&g(rank), own, Some(30001)).unwrap())
                    .collect(),
                token: "ab".repeat(32),
            }),
        };
        let d =
            VllmDriver { template: parse_template("vllm serve {source} --host {host} --port {port} {args}").unwrap() };
        let a = ReplicaAssignment { gang: Some(g(0)), ..assignment() };
        let head = launch(0, "10.0.0.5");
        let spec = LaunchSpec {
            assignment: &a,
            host: "10.0.0.5",
            port: 30000,
            model_path: None,
            tls: None,
            gang: Some(&head),
        };
        let c = member_command(&d, &spec).unwrap();
        assert_eq!(
            c.display(),
            "/usr/bin/flotilla ray-member --ray /opt/ray --address 10.0.0.5 --num-gpus 2 --head-port 30001 -- \
             vllm serve hf://org/m --host 10.0.0.5 --port 30000 --max-model-len 8192 --tensor-parallel-size 2 \
             --pipeline-parallel-size 2 --distributed-executor-backend ray"
        );
        assert!(c.env.contains(&("CUDA_VISIBLE_DEVICES".into(), "2,3".into())), "{c:?}");
        let a = ReplicaAssignment { gang: Some(g(1)), ..assignment() };
        let worker = launch(1, "10.0.0.6");
        let spec =
            LaunchSpec { assignment: &a, host: "10.0.0.6", port: 0, model_path: None, tls: None, gang: Some(&worker) };
        let c = member_command(&d, &spec).unwrap();
        assert_eq!(
            c.display(),
            "/usr/bin/flotilla ray-member --ray /opt/ray --address 10.0.0.6 --num-gpus 2 --join 10.0.0.5:30001"
        );
        assert!(c.env.contains(&("VLLM_HOST_IP".into(), "10.0.0.6".into())), "{c:?}");
        assert!(c.env.contains(&("CUDA_VISIBLE_DEVICES".into(), "2,3".into())), "Ray sees the member's GPUs: {c:?}");
        assert!(c.env.contains(&("RAY_AUTH_MODE".into(), "token".into())), "{c:?}");
        assert!(c.env.contains(&("RAY_AUTH_TOKEN".into(), "ab".repeat(32))), "{c:?}");
        assert!(!c.display().contains(&"ab".repeat(32)), "the token is not on the command line");
    }

    #[test]
    fn vllm_gang_members_get_the_member_flags_and_the_node_environment() {
        let d =
            VllmDriver { template: parse_template("vllm serve {source} --host {host} --port {port} {args}").unwrap() };
        let path = PathBuf::from("/data/models/abc");
        let (a, head) = member(0);
        let spec = LaunchSpec {
            assignment: &a,
            host: "10.0.0.5",
            port: 30000,
            model_path: Some(&path),
            tls: None,
            gang: Some(&head),
        };
        let c = d.command(&spec).unwrap();
        assert_eq!(
            c.display(),
            "vllm serve /data/models/abc --host 10.0.0.5 --port 30000 --max-model-len 8192 \
             --tensor-parallel-size 2 --pipeline-parallel-size 2 --nnodes 2 --node-rank 0 \
             --master-addr 10.0.0.5 --master-port 30001 --distributed-executor-backend mp"
        );
        for var in [("VLLM_HOST_IP", "10.0.0.5"), ("GLOO_SOCKET_IFNAME", "ib0"), ("NCCL_SOCKET_IFNAME", "ib0")] {
            assert!(c.env.contains(&(var.0.into(), var.1.into())), "{var:?} in {:?}", c);
        }
        assert!(c.env.contains(&("CUDA_VISIBLE_DEVICES".into(), "2,3".into())));
        let (a, worker) = member(1);
        let c =
            d.command(&LaunchSpec { assignment: &a, host: "10.0.0.6", port: 0, gang: Some(&worker), ..spec }).unwrap();
        assert_eq!(
            c.display(),
            "vllm serve /data/models/abc --host 10.0.0.6 --port 0 --max-model-len 8192 \
             --tensor-parallel-size 2 --pipeline-parallel-size 2 --nnodes 2 --node-rank 1 \
             --master-addr 10.0.0.5 --master-port 30001 --headless --distributed-executor-backend mp"
        );
        assert!(c.env.contains(&("VLLM_HOST_IP".into(), "10.0.0.6".into())));
    }

    #[test]
    fn templates_are_checked() {
        assert!(parse_template("python -m vllm.entrypoints.openai.api_server --model '{source}' --host={host} --port={port} --tensor-parallel-size {gpus}").is_ok());
        assert!(parse_template("vllm serve {source} --host {host}").is_err(), "no port");
        let open = parse_template("vllm serve {source} --port {port}").unwrap_err().to_string();
        assert!(open.contains("--host {host}"), "engines listen on --address only: {open}");
        let keyed = parse_template("vllm serve {source} --host {host} --port {port} --api_key=k").unwrap_err();
        assert!(keyed.to_string().contains("VLLM_API_KEY"), "{keyed}");
        for tls in ["--ssl-keyfile /k", "--ssl_certfile=/c", "--enable-ssl-refresh"] {
            let t = format!("vllm serve {{source}} --host {{host}} --port {{port}} {tls}");
            let e = parse_template(&t).unwrap_err().to_string();
            assert!(e.contains("--engine-tls"), "{tls}: {e}");
        }
        assert!(parse_template("vllm serve {nope} --host {host} --port {port}").is_err());
        assert!(parse_template("vllm --host {host} --port {port} x{args}").is_err());
        assert!(parse_template("vllm 'unclosed {port}").is_err());
    }
}
