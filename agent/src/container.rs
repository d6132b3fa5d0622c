//! Engines in containers: a Model with `engine_image` runs its engine through the agent's
//! `--container-runtime` (docker or podman) instead of as a process on the node. The
//! engine's command line is built as for a process (same driver, same policy checks), then
//! [`wrap`]ped into `RUNTIME run ... --entrypoint PROGRAM IMAGE ARGS`; the agent supervises
//! the runtime's foreground client as it supervises an engine process (signals reach the
//! container through the client's signal proxy; adoption across an agent restart follows
//! the client's pid), and removes the container by name after every stop ([`remove_args`]),
//! because a client killed after the grace leaves its container running.
//!
//! ```text
//! docker run --rm --name flotilla-<replica> --network host --ipc host --init
//!   [--gpus "device=2,3" | --device nvidia.com/gpu=2 ...]   GPUs: docker's flag, podman's CDI
//!   -e VLLM_API_KEY -e NCCL_... (names only: values come from the client's environment,
//!                                so the key never shows on a command line)
//!   -v MODEL:MODEL:ro -v ENGINE_DIR:ENGINE_DIR:ro           weights and TLS files, read-only
//!   --entrypoint vllm IMAGE serve /models/x --host H --port P ...
//! ```
//!
//! Host networking keeps the engine on the address and port the agent chose, so gateways,
//! probes and the endpoint checks see it exactly as a process. Which images may run is the
//! operator's call: `--engine-image PREFIX` (repeatable); with none given, no image runs
//! (an image is code, as `--trust-remote-code` is). Pure; the engine task runs the commands.

use std::path::{Path, PathBuf};

use crate::driver::EngineCommand;

/// The container runtime an agent drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    Docker,
    Podman,
}

/// `--container-runtime` and what goes with it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Containers {
    pub runtime: Runtime,
    /// The runtime's client (`docker`, `podman`, or a path).
    pub program: PathBuf,
    /// Image prefixes allowed to run (`registry.example.com/vllm/`, `vllm/vllm-openai:`).
    pub allowed: Vec<String>,
}

/// Variables of the engine's environment that stay with the runtime's client: the image
/// has its own PATH and HOME, GPUs are chosen with the runtime's own flags, and the
/// client's connection settings are not the engine's business.
const CLIENT_ONLY: [&str; 8] = [
    "PATH",
    "HOME",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "CONTAINER_HOST",
    "XDG_RUNTIME_DIR",
];

/// The container's name for a replica (replica names are DNS labels, which runtimes accept).
pub fn name(replica: &str) -> String {
    format!("flotilla-{replica}")
}

/// Why an image may not run on this agent, or None when it may.
pub fn refusal(containers: Option<&Containers>, image: &str) -> Option<String> {
    let Some(c) = containers else {
        return Some(format!(
            "engine_image {image:?}: this agent runs no container runtime (start it with --container-runtime docker|podman)"
        ));
    };
    if c.allowed.iter().any(|p| image.starts_with(p.as_str())) {
        return None;
    }
    Some(if c.allowed.is_empty() {
        format!("engine_image {image:?}: this agent allows no images (list trusted prefixes with --engine-image)")
    } else {
        format!(
            "engine_image {image:?} matches none of this agent's --engine-image prefixes ({})",
            c.allowed.join(", ")
        )
    })
}

/// `cmd` (an engine's command line and environment, as for a process) run in `image`.
/// `gpus` are the node's GPU indices; `mounts` are host paths the engine reads (its weights,
/// its TLS files), mounted read-only at the same paths.
pub fn wrap(
    c: &Containers,
    cmd: EngineCommand,
    image: &str,
    replica: &str,
    gpus: &[u32],
    mounts: &[&Path],
) -> EngineCommand {
    let mut args: Vec<String> =
        ["run", "--rm", "--name", &name(replica), "--network", "host", "--ipc", "host", "--init"]
            .map(String::from)
            .into();
    if !gpus.is_empty() {
        let list = gpus.iter().map(u32::to_string).collect::<Vec<_>>();
        match c.runtime {
            // the quotes are docker's own syntax for a list inside the option
            Runtime::Docker => args.extend(["--gpus".into(), format!("\"device={}\"", list.join(","))]),
            Runtime::Podman => {
                for g in list {
                    args.extend(["--device".into(), format!("nvidia.com/gpu={g}")]);
                }
            }
        }
    }
    for (k, _) in cmd.env.iter().filter(|(k, _)| !CLIENT_ONLY.contains(&k.as_str())) {
        args.extend(["-e".into(), k.clone()]);
    }
    for m in mounts {
        let p = m.display();
        args.extend(["-v".into(), format!("{p}:{p}:ro")]);
    }
    args.extend(["--entrypoint".into(), cmd.program.display().to_string(), image.to_string()]);
    args.extend(cmd.args);
    EngineCommand { program: c.program.clone(), args, env: cmd.env }
}

/// `RUNTIME rm -f NAME`: removes the replica's container if one is left (after a stop, and
/// before a start, where a crashed agent's container would hold the name).
pub fn remove_args(replica: &str) -> Vec<String> {
    vec!["rm".into(), "-f".into(), name(replica)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn containers(runtime: Runtime) -> Containers {
        Containers { runtime, program: "docker".into(), allowed: vec!["vllm/vllm-openai:".into()] }
    }

    fn engine() -> EngineCommand {
        EngineCommand {
            program: "vllm".into(),
            args: vec!["serve".into(), "/m/x".into(), "--port".into(), "20001".into()],
            env: vec![
                ("PATH".into(), "/usr/bin".into()),
                ("CUDA_VISIBLE_DEVICES".into(), "2,3".into()),
                ("VLLM_API_KEY".into(), "secret-key".into()),
                ("NCCL_DEBUG".into(), "WARN".into()),
            ],
        }
    }

    #[test]
    fn docker_command_line_keeps_the_key_off_it() {
        let c = containers(Runtime::Docker);
        let w = wrap(&c, engine(), "vllm/vllm-openai:v0.11.0", "demo-ab12c", &[2, 3], &[Path::new("/m/x")]);
        assert_eq!(w.program, PathBuf::from("docker"));
        assert_eq!(
            w.display(),
            "docker run --rm --name flotilla-demo-ab12c --network host --ipc host --init --gpus '\"device=2,3\"' \
             -e VLLM_API_KEY -e NCCL_DEBUG -v /m/x:/m/x:ro --entrypoint vllm vllm/vllm-openai:v0.11.0 serve /m/x --port 20001"
        );
        assert!(!w.display().contains("secret-key"));
        assert!(w.env.contains(&("VLLM_API_KEY".into(), "secret-key".into())), "the client passes the value on");
    }

    #[test]
    fn podman_gets_cdi_devices_and_no_gpus_means_no_device_flags() {
        let c = containers(Runtime::Podman);
        let w = wrap(&c, engine(), "vllm/vllm-openai:v0.11.0", "r", &[0, 5], &[]);
        let s = w.args.join(" ");
        assert!(s.contains("--device nvidia.com/gpu=0 --device nvidia.com/gpu=5"), "{s}");
        let cpu = wrap(&c, engine(), "vllm/vllm-openai:v0.11.0", "r", &[], &[]).display();
        assert!(!cpu.contains("--device") && !cpu.contains("--gpus"), "{cpu}");
        assert_eq!(remove_args("r"), ["rm", "-f", "flotilla-r"]);
    }

    #[test]
    fn only_allowed_prefixes_run() {
        let c = containers(Runtime::Docker);
        assert_eq!(refusal(Some(&c), "vllm/vllm-openai:v0.11.0"), None);
        let other = refusal(Some(&c), "evil/miner:latest").unwrap();
        assert!(other.contains("--engine-image") && other.contains("vllm/vllm-openai:"), "{other}");
        let none = Containers { allowed: vec![], ..c };
        assert!(refusal(Some(&none), "vllm/vllm-openai:v1").unwrap().contains("allows no images"));
        assert!(refusal(None, "vllm/vllm-openai:v1").unwrap().contains("--container-runtime"));
    }
}
