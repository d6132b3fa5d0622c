//! `s3://` downloads against a local S3-compatible server (moto, from PyPI). Install it
//! with `bash agent/tests/s3-deps.sh`; this test fails, naming that script, without it.

use std::process::Stdio;
use std::time::Duration;

use flotilla_agent::download::{s3::S3Config, Downloader};
use flotilla_agent::http::HttpClient;
use flotilla_agent::source_policy::{Context, Policy};
use flotilla_testkit::ports::free_port;
use flotilla_testkit::python::python;

struct Moto {
    child: tokio::process::Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn start_moto() -> Moto {
    let py = python();
    let ok = std::process::Command::new(&py)
        .args(["-c", "import moto.server, boto3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "moto is not installed in {}: run `bash agent/tests/s3-deps.sh` first", py.display());
    let port = free_port().expect("a free port");
    let child = tokio::process::Command::new(&py)
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start moto");
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "moto did not listen on {port} within 30s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Moto { child, endpoint }
}

fn seed(endpoint: &str) {
    let script = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="testing",
                  aws_secret_access_key="testing", region_name="us-east-1")
s3.create_bucket(Bucket="models")
s3.put_object(Bucket="models", Key="llama/config.json", Body=b'{"layers": 2}')
s3.put_object(Bucket="models", Key="llama/weights/a b.bin", Body=bytes(range(256)) * 400)
s3.put_object(Bucket="models", Key="single/model.gguf", Body=b"GGUF" * 1000)
s3.put_object(Bucket="models", Key="llama2/other.bin", Body=b"not part of llama")
"#;
    let out = std::process::Command::new(python()).args(["-c", script, endpoint]).output().expect("run boto3");
    assert!(out.status.success(), "seeding moto failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_prefix_and_single_object_download_from_an_s3_compatible_server() {
    let moto = start_moto().await;
    seed(&moto.endpoint);
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Config {
        endpoint: moto.endpoint.clone(),
        region: "us-east-1".into(),
        access_key: "testing".into(),
        secret_key: "testing".into(),
        session_token: None,
    };
    // The operator's --s3-endpoint (here on loopback) is trusted by the source policy.
    let ctx = Context { endpoints: vec![Context::endpoint(&moto.endpoint).unwrap()], ..Context::default() };
    let d = Downloader::new(
        dir.path().join("models"),
        HttpClient::new().unwrap(),
        "http://127.0.0.1:1",
        s3,
        Policy::defaults(&ctx),
    );

    let tree =
        tokio::time::timeout(Duration::from_secs(60), d.fetch("s3://models/llama", &|_| {})).await.unwrap().unwrap();
    assert_eq!(std::fs::read_to_string(tree.join("config.json")).unwrap(), r#"{"layers": 2}"#);
    let weights = std::fs::read(tree.join("weights/a b.bin")).unwrap();
    assert_eq!(weights.len(), 256 * 400);
    assert_eq!(&weights[..4], &[0, 1, 2, 3]);
    assert!(!tree.join("2").exists() && !tree.join("other.bin").exists(), "llama2/ is not under llama/");

    let file = d.fetch("s3://models/single/model.gguf", &|_| {}).await.unwrap();
    assert_eq!(file.file_name().unwrap(), "model.gguf");
    assert_eq!(std::fs::read(&file).unwrap().len(), 4000);

    let err = d.fetch("s3://models/nothing-here", &|_| {}).await.unwrap_err();
    assert!(err.contains("no objects under s3://models/nothing-here"), "{err}");
    let err = d.fetch("s3://no-such-bucket/x", &|_| {}).await.unwrap_err();
    assert!(err.contains("no-such-bucket"), "{err}");
    assert!(!err.contains("Signature=") && !err.contains("Credential="), "no signature in errors: {err}");
}
