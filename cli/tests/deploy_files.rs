//! The files in deploy/ against the binary they deploy: every systemd unit passes
//! `systemd-analyze verify` (where systemd is installed) and its ExecStart command line,
//! parsed from the unit, is one the binary accepts with the example config; the install
//! script lays out a role under a dry-run root and refuses an unknown role with exit 2; the
//! Nomad job specs parse as HCL2 and their tasks' configs use only keys the binary knows.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::BIN;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The words of a unit's `ExecStart=` line.
fn exec_start(unit: &str) -> Vec<String> {
    let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("an ExecStart line");
    line.split_whitespace().map(String::from).collect()
}

#[test]
fn units_verify_and_their_command_lines_parse() {
    let tmp = tempfile::tempdir().unwrap();
    for role in ["server", "agent", "gateway"] {
        let text = std::fs::read_to_string(deploy().join(format!("systemd/flotilla-{role}.service"))).unwrap();
        let words = exec_start(&text);
        assert_eq!(words[0], "/usr/local/bin/flotilla", "{role}: the path install.sh puts the binary at");
        assert_eq!(&words[1..3], [role, "--config"], "{role}");
        assert_eq!(words[3], format!("/etc/flotilla/{role}.toml"), "{role}: the path install.sh puts the config at");
        // The same command line, with this build's binary and the example config.
        let example = deploy().join(format!("config/{role}.toml"));
        let out = Command::new(BIN).args(&words[1..3]).arg(&example).args(&words[4..]).arg("--help").output().unwrap();
        assert!(out.status.success(), "{role}: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(
            tmp.path().join(format!("flotilla-{role}.service")),
            text.replace("/usr/local/bin/flotilla", BIN),
        )
        .unwrap();
    }
    let agent = std::fs::read_to_string(deploy().join("systemd/flotilla-agent.service")).unwrap();
    assert!(agent.contains("\nKillMode=process\n"), "engines must outlive an agent restart (adoption)");
    match Command::new("systemd-analyze")
        .arg("verify")
        .args(["server", "agent", "gateway"].map(|r| tmp.path().join(format!("flotilla-{r}.service"))))
        .output()
    {
        Ok(out) => assert!(
            out.status.success() && out.stderr.is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => println!("systemd-analyze verify SKIPPED: {e}"),
    }
}

#[test]
fn install_script_lays_out_a_role_and_refuses_an_unknown_one() {
    let root = tempfile::tempdir().unwrap();
    let script = deploy().join("vm/install.sh");
    let out = Command::new("bash").arg(&script).args(["agent", BIN]).env("ROOT", root.path()).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for f in ["usr/local/bin/flotilla", "etc/flotilla/agent.toml", "etc/systemd/system/flotilla-agent.service"] {
        assert!(root.path().join(f).is_file(), "{f} installed");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(root.path().join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        (mode("etc/flotilla"), mode("etc/flotilla/tls"), mode("etc/flotilla/agent.toml")),
        (0o750, 0o750, 0o640)
    );
    // A config already there is kept.
    std::fs::write(root.path().join("etc/flotilla/agent.toml"), "node_name = \"mine\"\n").unwrap();
    let again = Command::new("bash").arg(&script).args(["agent", BIN]).env("ROOT", root.path()).output().unwrap();
    assert!(again.status.success());
    assert_eq!(std::fs::read_to_string(root.path().join("etc/flotilla/agent.toml")).unwrap(), "node_name = \"mine\"\n");
    let bad = Command::new("bash").arg(&script).args(["database", BIN]).env("ROOT", root.path()).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("usage"));
}

#[test]
fn nomad_job_specs_parse_and_use_only_known_keys() {
    let py = flotilla_testkit::python::require_python();
    let check = deploy().join("nomad/check.py");
    let jobs: Vec<PathBuf> = std::fs::read_dir(deploy().join("nomad"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".nomad.hcl"))
        .collect();
    assert_eq!(jobs.len(), 3, "servers, agents, gateways: {jobs:?}");
    let out = Command::new(&py).arg(&check).arg(BIN).args(&jobs).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}\n(bash .ci/deploy-deps.sh installs python-hcl2)");
    assert_eq!(text.matches(": ok").count(), 5, "3 servers, agents, gateways: {text}");
    // The check can fail: a misspelt key in a copy of a job is caught.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.nomad.hcl");
    let agents = std::fs::read_to_string(deploy().join("nomad/flotilla-agents.nomad.hcl")).unwrap();
    std::fs::write(&bad, agents.replace("nvidia = true", "nvida = true")).unwrap();
    let out = Command::new(&py).arg(&check).arg(BIN).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown key `nvida`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The compose file's services: each flotilla command line is one the binary accepts; the
/// `certs` service's script, run here with /tls in a temp dir, makes every certificate the
/// other services name; and the fixed addresses agree (each server's certificate carries
/// the IP it listens on, each agent reports the address its certificate names).
#[test]
fn compose_services_use_real_flags_and_the_certificates_the_certs_service_makes() {
    let text = std::fs::read_to_string(deploy().join("docker/compose.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("compose.yaml parses as YAML");
    let services = doc["services"].as_mapping().expect("services");
    let tls = tempfile::tempdir().unwrap();
    let script = doc["services"]["certs"]["command"][0].as_str().expect("the certs script");
    let mut made = 0;
    for line in script.lines().map(str::trim) {
        // the loop body: one server certificate per id
        let lines: Vec<String> = if line.contains("--name s$$i") {
            (1..=3).map(|i| line.replace("$$i", &i.to_string())).collect()
        } else {
            vec![line.to_string()]
        };
        for l in lines.iter().filter(|l| l.starts_with("flotilla tls")) {
            let words: Vec<String> =
                l.split_whitespace().skip(1).map(|w| w.replace("/tls", &tls.path().display().to_string())).collect();
            let out = Command::new(BIN).args(&words).output().unwrap();
            assert!(out.status.success(), "{l}: {}", String::from_utf8_lossy(&out.stderr));
            made += 1;
        }
    }
    assert_eq!(made, 8, "a CA, 3 servers, 2 agents, a gateway, an admin");
    let mut checked = 0;
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        if name == "certs" {
            continue;
        }
        let words: Vec<String> = svc["command"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name}: a command list"))
            .iter()
            .map(|w| w.as_str().map(String::from).unwrap_or_else(|| panic!("{name}: {w:?} is not a string")))
            .collect();
        for w in words.iter().filter(|w| w.starts_with("/tls/")) {
            let file = tls.path().join(w.trim_start_matches("/tls/"));
            assert!(file.exists(), "{name}: {w} is not made by the certs service");
        }
        let ip = svc["networks"]["flotilla"]["ipv4_address"].as_str().unwrap_or_else(|| panic!("{name}: fixed IP"));
        let listens_on_it =
            words.iter().any(|w| w.starts_with(&format!("{ip}:")) || *w == ip || w.starts_with("0.0.0.0:"));
        assert!(listens_on_it, "{name}: its addresses name its IP {ip}: {words:?}");
        let out = Command::new(BIN).args(&words).arg("--help").output().unwrap();
        assert!(out.status.success(), "{name}: {words:?}: {}", String::from_utf8_lossy(&out.stderr));
        checked += 1;
    }
    assert_eq!(checked, 6, "3 servers, 2 agents, a gateway");
    let docker = std::fs::read_to_string(deploy().join("docker/Dockerfile")).unwrap();
    assert!(docker.contains("\nUSER flotilla\n"), "the image runs unprivileged");
    assert!(docker.contains("cargo build --release --locked -p flotilla"), "the build stage builds the binary");
}

/// `podman build` of deploy/docker/Dockerfile where podman can reach its base images;
/// skipped with the reason otherwise (these machines reach package registries only).
#[test]
fn image_builds_where_a_container_engine_can() {
    if std::env::var("FLOTILLA_BUILD_IMAGE").as_deref() != Ok("1") {
        println!("image build SKIPPED: set FLOTILLA_BUILD_IMAGE=1 (needs podman or docker and access to docker.io)");
        return;
    }
    let engine = ["podman", "docker"]
        .into_iter()
        .find(|e| Command::new(e).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("FLOTILLA_BUILD_IMAGE=1 but neither podman nor docker runs");
    let root = deploy().join("..");
    let out = Command::new(engine)
        .args(["build", "-f", "deploy/docker/Dockerfile", "-t", "flotilla:test", "."])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{engine} build: {}", String::from_utf8_lossy(&out.stderr));
    let version = Command::new(engine).args(["run", "--rm", "flotilla:test", "--version"]).output().unwrap();
    assert!(version.status.success(), "{}", String::from_utf8_lossy(&version.stderr));
}
