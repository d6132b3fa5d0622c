//! `--config FILE` with the real binary: a gateway configured by a file serves what the file
//! says, a flag on the command line wins over it, a bad key stops the role with exit code 2
//! naming the key and line (a bad `otlp_endpoint` too), and every key of the example files
//! in deploy/config/ is one the binary knows.
mod common;

use std::process::Command;

use common::*;

#[test]
fn the_example_config_files_use_only_keys_the_binary_knows() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config");
    for role in ["server", "agent", "gateway"] {
        let file = dir.join(format!("{role}.toml"));
        // --help stops before any value is used; unknown keys fail before it.
        let out = Command::new(BIN).args([role, "--config"]).arg(&file).arg("--help").output().unwrap();
        assert!(out.status.success(), "{role}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn a_bad_key_is_refused_with_its_line_and_nothing_starts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\n# a comment\nlisen = \"x\"\n").unwrap();
    let out = Command::new(BIN).args(["gateway", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3: unknown key `lisen`"), "{err}");
    assert!(out.stdout.is_empty(), "nothing started: {}", String::from_utf8_lossy(&out.stdout));
    std::fs::write(&file, "no_auth = \"maybe\"\n").unwrap();
    let out = Command::new(BIN).args(["gateway", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`no_auth` is a switch"));
}

#[test]
fn a_bad_otlp_endpoint_stops_the_role_and_other_commands_refuse_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\notlp_endpoint = \"127.0.0.1:4317\"\n").unwrap();
    let out = Command::new(BIN).args(["gateway", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--otlp-endpoint \"127.0.0.1:4317\" is not an http:// URL"), "{err}");
    let out = Command::new(BIN).args(["get", "models", "--otlp-endpoint", "http://127.0.0.1:4317"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--otlp-endpoint is for the roles"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_runs_from_its_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    // The backend need not answer: /v1/models lists what the gateway was configured with.
    std::fs::write(&file, "listen = \"127.0.0.1:1\"\nno_auth = true\nbackend = [\"from-file=http://127.0.0.1:9\"]\n")
        .unwrap();
    // GatewayProc puts `--listen 127.0.0.1:0` on the command line: it wins over the file's.
    let gw = GatewayProc::start("127.0.0.1:1", &["--config", file.to_str().unwrap()]);
    let (code, body) = raw_http::http_get(&gw.addr, "/v1/models").await.expect("the gateway answers");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("from-file"), "the file's backend: {body}");
}

/// A gateway given only `--backend`s watches no control plane unless `--server` names one:
/// it used to dial the default 127.0.0.1:7070 and log a connect error every 2 s (and would
/// have taken the models of whatever cluster ran there).
#[test]
fn a_static_gateway_dials_no_default_server() {
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("gw.log")).unwrap();
    let mut child = Command::new(BIN)
        .args(["gateway", "--no-auth", "--listen", "127.0.0.1:0", "--backend", "m=http://127.0.0.1:9"])
        .env_remove("FLOTILLA_SERVER")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    #[allow(clippy::disallowed_methods)] // a child process's log, no runtime here
    std::thread::sleep(std::time::Duration::from_secs(3));
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(dir.path().join("gw.log")).unwrap();
    assert!(text.contains("listening") || text.contains("127.0.0.1:"), "the gateway ran: {text}");
    assert!(!text.contains("7070"), "dialled the default server:\n{text}");
}
