//! `flotilla ray-member`: one member of a `ray`-layout gang (`spec.topology.layout: ray`) as
//! one process that the agent supervises like any engine. The agent runs it in the member's
//! own process group; it runs Ray's node (`ray start --block`) and, on the head, the engine,
//! and it ends when either of them does, so that the agent's crash and restart logic sees
//! the member as one process:
//!
//! - **Head** (`--head-port P`): `ray start --head --block --port P` (Ray's GCS listens on
//!   the gang's rendezvous port), then, once that port accepts connections, the engine
//!   command given after `--` with `RAY_ADDRESS=ADDRESS:P` (vLLM's Ray executor attaches to
//!   that cluster; `--distributed-executor-backend ray` is in the engine's flags).
//! - **Worker** (`--join HOST:P`): `ray start --block --address HOST:P` and nothing else:
//!   the head's engine places its workers on this node through Ray.
//!
//! Either child's exit ends the member: the other is stopped (SIGTERM, then SIGKILL after
//! [`STOP_GRACE`]) and the exit status is 1 (the agent reports a crash; a gang loses its
//! member and is placed again, as vLLM cannot lose a rank). SIGTERM or SIGINT (the agent
//! stopping the member) stops both and exits 0. Every Ray node gets the member's GPU count
//! (`--num-gpus`), the agent's address (`--node-ip-address`), no dashboard and no usage
//! stats, and the dashboard agent's listen port 0: several Ray nodes (members of different
//! gangs) may share a machine; the head's Ray client server gets a free port picked here.
//! Ray's other ports are Ray's defaults (docs/agent.md, "Ray layout"); Ray authenticates
//! none of them, which is why agents run this only with `--ray`.
//!
//! Ray replaces a `127.0.0.1`/`localhost` head address with the machine's outward address
//! (`ray._private.services.resolve_ip_for_localhost`): on one host, give members other
//! loopback addresses (`127.0.0.2`, ...) as the tests do.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::error::AgentError;

/// How long a stopped child may take before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// `flotilla ray-member` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct RayMemberArgs {
    /// The `ray` program (Ray's CLI).
    #[arg(long, default_value = "ray")]
    pub ray: PathBuf,
    /// This node's address: Ray's `--node-ip-address`, and where the head's GCS listens.
    #[arg(long)]
    pub address: String,
    /// GPUs of this member (Ray's `--num-gpus`).
    #[arg(long, default_value_t = 0)]
    pub num_gpus: u32,
    /// Run the head: Ray's GCS on this port, then the engine command after `--`.
    #[arg(long, conflicts_with = "join", value_name = "PORT")]
    pub head_port: Option<u16>,
    /// Run a worker: join the Ray head at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub join: Option<String>,
    /// How long the head waits for Ray's GCS to listen before it gives up (seconds).
    #[arg(long, default_value_t = 120)]
    pub start_timeout_s: u64,
    /// The head's engine command (after `--`).
    #[arg(last = true)]
    pub engine: Vec<String>,
}

/// What the member runs, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Head { port: u16, engine: Vec<String> },
    Worker { head: String },
}

impl RayMemberArgs {
    /// The role the flags name, or what is wrong with them.
    pub fn role(&self) -> Result<Role, AgentError> {
        if self.address.is_empty() {
            return Err(AgentError::invalid("address", "is empty"));
        }
        match (self.head_port, &self.join) {
            (Some(0), _) => Err(AgentError::invalid("head-port", "must be a port, not 0")),
            (Some(_), _) if self.engine.is_empty() => {
                Err(AgentError::invalid("head-port", "a head runs an engine: give its command after --"))
            }
            (Some(port), None) => Ok(Role::Head { port, engine: self.engine.clone() }),
            (None, Some(head)) => {
                crate::gang::split_address(head).map_err(|r| AgentError::invalid("join", r))?;
                if !self.engine.is_empty() {
                    return Err(AgentError::invalid(
                        "join",
                        "a worker runs no engine of its own: remove the command after --",
                    ));
                }
                Ok(Role::Worker { head: head.clone() })
            }
            _ => Err(AgentError::invalid("head-port", "give --head-port PORT (head) or --join HOST:PORT (worker)")),
        }
    }
}

/// `ray start ...` for `role` on this node. `client_port`: the head's Ray client server
/// port (Ray's default, 10001, would collide between two heads on one machine, and Ray
/// takes no 0 for it).
pub fn ray_start_args(args: &RayMemberArgs, role: &Role, client_port: u16) -> Vec<String> {
    let mut v: Vec<String> = vec!["start".into(), "--block".into()];
    match role {
        Role::Head { port, .. } => v.extend([
            "--head".into(),
            "--port".into(),
            port.to_string(),
            "--ray-client-server-port".into(),
            client_port.to_string(),
            "--include-dashboard=false".into(),
        ]),
        Role::Worker { head } => v.extend(["--address".into(), head.clone()]),
    }
    v.extend([
        "--node-ip-address".into(),
        args.address.clone(),
        "--num-gpus".into(),
        args.num_gpus.to_string(),
        "--dashboard-agent-listen-port".into(),
        "0".into(),
        "--disable-usage-stats".into(),
    ]);
    v
}

/// `host:port` with IPv6 hosts in brackets.
fn join_host_port(host: &str, port: u16) -> String {
    match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    }
}

fn spawn(program: &str, args: &[String], env: &[(&str, String)]) -> Result<Child, AgentError> {
    let mut cmd = Command::new(program);
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v))).kill_on_drop(true);
    cmd.spawn().map_err(|e| AgentError::invalid("ray-member", format!("cannot start {program}: {e}")))
}

/// SIGTERM to `child`, then SIGKILL after [`STOP_GRACE`].
async fn stop(child: &mut Child) {
    let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) else { return };
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

fn describe(what: &str, status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => format!("{what} exited: {}", crate::engines::process::describe_exit(s)),
        Err(e) => format!("{what} could not be waited for: {e}"),
    }
}

/// Runs the member until a child ends or it is told to stop. Ok(0): told to stop; Ok(1):
/// a child ended (the reason is printed on stderr, in the engine's log).
pub async fn run(args: RayMemberArgs) -> Result<i32, AgentError> {
    let role = args.role()?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| AgentError::invalid("ray-member", e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| AgentError::invalid("ray-member", e.to_string()))?;
    let ray_program = args.ray.display().to_string();
    let client_port = match role {
        // A port the kernel just handed out and took back: another process could take it
        // before Ray binds it, which fails this start (the agent restarts the member).
        Role::Head { .. } => std::net::TcpListener::bind((args.address.as_str(), 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| AgentError::invalid("address", format!("cannot bind {}: {e}", args.address)))?,
        Role::Worker { .. } => 0,
    };
    let ray_args = ray_start_args(&args, &role, client_port);
    eprintln!("flotilla ray-member: {ray_program} {}", ray_args.join(" "));
    let mut ray = spawn(&ray_program, &ray_args, &[])?;
    let mut engine: Option<Child> = None;
    if let Role::Head { port, engine: command } = &role {
        let gcs = join_host_port(&args.address, *port);
        let deadline = Instant::now() + Duration::from_secs(args.start_timeout_s);
        loop {
            if tokio::net::TcpStream::connect(&gcs).await.is_ok() {
                break;
            }
            tokio::select! {
                s = ray.wait() => {
                    eprintln!("flotilla ray-member: {} before its GCS listened on {gcs}", describe("ray start --head", s));
                    return Ok(1);
                }
                _ = term.recv() => { stop(&mut ray).await; return Ok(0) }
                _ = int.recv() => { stop(&mut ray).await; return Ok(0) }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if Instant::now() >= deadline {
                eprintln!("flotilla ray-member: Ray's GCS did not listen on {gcs} within {} s", args.start_timeout_s);
                stop(&mut ray).await;
                return Ok(1);
            }
        }
        eprintln!("flotilla ray-member: Ray head up on {gcs}; starting the engine: {}", command.join(" "));
        match spawn(&command[0], &command[1..], &[("RAY_ADDRESS", gcs.clone())]) {
            Ok(c) => engine = Some(c),
            Err(e) => {
                eprintln!("flotilla ray-member: {e}");
                stop(&mut ray).await;
                return Ok(1);
            }
        }
    }
    let engine_exit = async {
        match engine.as_mut() {
            Some(c) => c.wait().await,
            None => std::future::pending().await,
        }
    };
    let code = tokio::select! {
        s = ray.wait() => { eprintln!("flotilla ray-member: {}", describe("ray start", s)); 1 }
        s = engine_exit => { eprintln!("flotilla ray-member: {}", describe("the engine", s)); 1 }
        _ = term.recv() => 0,
        _ = int.recv() => 0,
    };
    // Engine first: it holds Ray workers that the node's stop would otherwise fail under it.
    if let Some(c) = engine.as_mut() {
        stop(c).await;
    }
    stop(&mut ray).await;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RayMemberArgs,
    }

    fn parse(argv: &[&str]) -> Result<Role, String> {
        let cli = Cli::try_parse_from(std::iter::once("ray-member").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.args.role().map_err(|e| e.to_string())
    }

    #[test]
    fn roles_are_checked() {
        assert_eq!(
            parse(&["--address", "10.0.0.5", "--head-port", "20001", "--", "vllm", "serve", "m"]).unwrap(),
            Role::Head { port: 20001, engine: vec!["vllm".into(), "serve".into(), "m".into()] }
        );
        assert_eq!(
            parse(&["--address", "10.0.0.6", "--join", "10.0.0.5:20001"]).unwrap(),
            Role::Worker { head: "10.0.0.5:20001".into() }
        );
        assert!(parse(&["--address", "a", "--head-port", "20001"]).unwrap_err().contains("give its command after --"));
        assert!(parse(&["--address", "a", "--join", "nowhere"]).unwrap_err().contains("not host:port"));
        assert!(parse(&["--address", "a", "--join", "h:1", "--", "x"]).unwrap_err().contains("runs no engine"));
        assert!(parse(&["--address", "a"]).unwrap_err().contains("--head-port PORT (head) or --join"));
        assert!(parse(&["--address", "a", "--head-port", "1", "--join", "h:1"]).is_err(), "one role only");
        assert!(parse(&["--address", "", "--join", "h:1"]).unwrap_err().contains("address"));
    }

    #[test]
    fn ray_start_flags_by_role() {
        let args = RayMemberArgs {
            ray: "ray".into(),
            address: "10.0.0.6".into(),
            num_gpus: 8,
            head_port: None,
            join: Some("10.0.0.5:20001".into()),
            start_timeout_s: 120,
            engine: vec![],
        };
        let worker = ray_start_args(&args, &args.role().unwrap(), 0).join(" ");
        assert_eq!(
            worker,
            "start --block --address 10.0.0.5:20001 --node-ip-address 10.0.0.6 --num-gpus 8 \
             --dashboard-agent-listen-port 0 --disable-usage-stats"
        );
        let head = ray_start_args(&args, &Role::Head { port: 20001, engine: vec!["x".into()] }, 40001).join(" ");
        assert!(
            head.starts_with(
                "start --block --head --port 20001 --ray-client-server-port 40001 --include-dashboard=false \
                 --node-ip-address 10.0.0.6"
            ),
            "{head}"
        );
        assert_eq!(join_host_port("::1", 5), "[::1]:5");
    }
}
