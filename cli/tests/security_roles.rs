//! A server with TLS on, its certificates made by `flotilla tls`: every (role, method) pair
//! of the role table against the real binary. Allowed calls reach their handler (whatever
//! they answer, it is not a refusal); refused ones get PERMISSION_DENIED, or UNAUTHENTICATED
//! for a certificate naming no identity, and write nothing (store revision unchanged). Also:
//! the CLI with an admin certificate applies, with a viewer one is refused, and without TLS
//! cannot talk to the server at all; an agent's certificate opens only its own node's session.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::pb;
use flotilla_security::certs::{self, CertRequest, Issued};
use flotilla_security::{authz, Identity, Role, Tls, TlsFiles};
use flotilla_testkit::procs::{log_tail, Group};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

fn flotilla(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).current_dir(dir).env_remove("FLOTILLA_TLS_CERT").output().expect("run flotilla")
}

/// `flotilla tls cert create` for `role` (a --role word) and `name`; the three files.
fn cert(dir: &Path, role: &str, name: &str) -> TlsFiles {
    if dir.join(format!("{role}-{name}.pem")).exists() {
        return cert_files(dir, role, name);
    }
    let out = flotilla(dir, &["tls", "cert", "create", "--role", role, "--name", name, "--ip", "127.0.0.1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    TlsFiles {
        cert: dir.join(format!("{role}-{name}.pem")),
        key: dir.join(format!("{role}-{name}-key.pem")),
        ca: dir.join("ca.pem"),
    }
}

fn tls_flags(f: &TlsFiles) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        f.cert.display().to_string(),
        "--tls-key".into(),
        f.key.display().to_string(),
        "--tls-ca".into(),
        f.ca.display().to_string(),
    ]
}

struct Server {
    _proc: Group,
    addr: String,
}

async fn start_server(dir: &Path, files: &TlsFiles) -> Server {
    start_member(dir, files, 1, &["--bootstrap"]).await.0
}

/// Server `id` with `extra` arguments; it and its peer address (if it has a peer listener).
async fn start_member(dir: &Path, files: &TlsFiles, id: u64, extra: &[&str]) -> (Server, Option<String>) {
    let log = dir.join(format!("server-{id}.log"));
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--id", &id.to_string(), "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.join(format!("data-{id}")))
        .args(tls_flags(files))
        .env("RUST_LOG", "warn");
    let proc = Group::spawn("flotilla server", cmd, &log);
    for _ in 0..300 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(addr) = text.split_whitespace().find_map(|w| w.strip_prefix("grpc=")) {
            let peer = text.split_whitespace().find_map(|w| w.strip_prefix("peer=")).map(str::to_string);
            return (Server { _proc: proc, addr: addr.to_string() }, peer);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no address:\n{}", log_tail(&log, 20));
}

async fn channel(addr: &str, tls: &Arc<Tls>) -> Channel {
    let ep = Endpoint::from_shared(format!("http://{addr}")).unwrap().timeout(Duration::from_secs(10));
    flotilla_security::connect::connect(ep, Some(tls), addr).await.expect("TLS connection")
}

/// The status code of an answer.
fn code<T>(r: Result<T, tonic::Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

/// Calls `path` with a request that changes nothing even where allowed; the status code.
async fn call(ch: Channel, path: &str, node: &str) -> Code {
    use pb::adapter_service_client::AdapterServiceClient as Adapters;
    use pb::agent_service_client::AgentServiceClient as Agents;
    use pb::autoscale_service_client::AutoscaleServiceClient as Autoscale;
    use pb::cluster_service_client::ClusterServiceClient as Cluster;
    use pb::fleet_service_client::FleetServiceClient as Fleet;
    use pb::object_service_client::ObjectServiceClient as Objects;
    use pb::raft_service_client::RaftServiceClient as Raft;
    let garbage = || pb::RaftPayload { data: b"not json".to_vec() };
    let method = path.rsplit('/').next().unwrap();
    match method {
        "Apply" => code(
            Objects::new(ch).apply(pb::ApplyRequest { manifest: "kind: Nope".into(), expected_revision: None }).await,
        ),
        "Get" => code(
            Objects::new(ch).get(pb::GetRequest { kind: "Model".into(), name: "absent".into(), stale: false }).await,
        ),
        "List" => code(Objects::new(ch).list(pb::ListRequest { kind: "Model".into(), ..Default::default() }).await),
        "Delete" => code(
            Objects::new(ch)
                .delete(pb::DeleteRequest { kind: "Model".into(), name: "absent".into(), expected_revision: None })
                .await,
        ),
        "Watch" => code(Objects::new(ch).watch(pb::WatchRequest { kind: "Model".into(), after_revision: 0 }).await),
        "Status" => code(Cluster::new(ch).status(pb::StatusRequest { local: true }).await),
        "AddMember" => code(
            Cluster::new(ch).add_member(pb::AddMemberRequest { id: 0, addr: String::new(), learner_only: true }).await,
        ),
        "RemoveMember" => code(Cluster::new(ch).remove_member(pb::RemoveMemberRequest { id: 0 }).await),
        "Audit" => code(Cluster::new(ch).audit(pb::AuditRequest::default()).await),
        "Events" => code(Cluster::new(ch).events(pb::EventsRequest::default()).await),
        "Snapshot" => code(Cluster::new(ch).snapshot(pb::SnapshotRequest {}).await),
        "CreateKey" => code(
            pb::tenant_key_service_client::TenantKeyServiceClient::new(ch)
                .create_key(pb::CreateTenantKeyRequest { tenant: "absent".into() })
                .await,
        ),
        "RevokeKey" => code(
            pb::tenant_key_service_client::TenantKeyServiceClient::new(ch)
                .revoke_key(pb::RevokeTenantKeyRequest { tenant: "absent".into(), id: "0".into() })
                .await,
        ),
        "AppendEntries" => code(Raft::new(ch).append_entries(garbage()).await),
        "Vote" => code(Raft::new(ch).vote(garbage()).await),
        "InstallSnapshot" => code(Raft::new(ch).install_snapshot(garbage()).await),
        "Session" => {
            // a registration without an agent id: refused by the handler if it gets there
            let reg = pb::Register { node_name: node.into(), ..Default::default() };
            let msg = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Register(reg)) };
            code(Agents::new(ch).session(futures::stream::iter([msg])).await)
        }
        "WatchEndpoints" => code(Fleet::new(ch).watch_endpoints(pb::WatchEndpointsRequest::default()).await),
        "ListNodes" => code(Fleet::new(ch).list_nodes(pb::ListNodesRequest {}).await),
        "SetNode" => code(Fleet::new(ch).set_node(pb::NodeActionRequest { name: "absent".into(), action: 0 }).await),
        "EnsureLoaded" => code(
            Adapters::new(ch)
                .ensure_loaded(pb::EnsureLoadedRequest { adapter: "absent".into(), ..Default::default() })
                .await,
        ),
        "ReportUsage" => code(Adapters::new(ch).report_usage(pb::ReportUsageRequest::default()).await),
        "ReportDemand" => code(Autoscale::new(ch).report_demand(pb::ReportDemandRequest::default()).await),
        other => panic!("no request for {other}"),
    }
}

async fn revision(ch: Channel) -> u64 {
    pb::object_service_client::ObjectServiceClient::new(ch)
        .list(pb::ListRequest { kind: "Model".into(), ..Default::default() })
        .await
        .expect("list")
        .into_inner()
        .store_revision
}

fn write_anonymous(dir: &Path) -> TlsFiles {
    let ca = Issued {
        cert_pem: std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        key_pem: std::fs::read_to_string(dir.join("ca-key.pem")).unwrap(),
    };
    let leaf = certs::issue(&ca, &CertRequest { identity: None, dns: vec![], ips: vec![], days: 1 }).unwrap();
    let (cert, key) = (dir.join("anon.pem"), dir.join("anon-key.pem"));
    std::fs::write(&cert, leaf.cert_pem).unwrap();
    std::fs::write(&key, leaf.key_pem).unwrap();
    TlsFiles { cert, key, ca: dir.join("ca.pem") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_and_method_against_the_table() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = flotilla(dir, &["tls", "ca", "create"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = flotilla(dir, &["tls", "ca", "create"]);
    assert_eq!(again.status.code(), Some(2), "an existing CA is never overwritten");
    let server = start_server(dir, &cert(dir, "server", "s1")).await;
    let admin = Tls::load(cert(dir, "admin", "alice")).unwrap();
    flotilla_testkit::wait::wait_until("a leader over TLS", Duration::from_secs(30), || {
        channel_ok(&server.addr, &admin)
    })
    .await;

    let roles: [(Option<Role>, &str, &str); 7] = [
        (Some(Role::Admin), "admin", "alice"),
        (Some(Role::Operator), "operator", "olga"),
        (Some(Role::Viewer), "viewer", "vic"),
        (Some(Role::Agent), "agent", "n1"),
        (Some(Role::Gateway), "gateway", "gw1"),
        (Some(Role::Peer), "server", "s2"),
        (None, "anonymous", ""),
    ];
    let admin_ch = channel(&server.addr, &admin).await;
    for (role, word, name) in roles {
        let files = if role.is_some() { cert(dir, word, name) } else { write_anonymous(dir) };
        let tls = Tls::load(files).unwrap();
        assert_eq!(tls.own_identity().map(|i| i.role), role);
        let ch = channel(&server.addr, &tls).await;
        // reflection is not a flotilla proto: the table's unit test covers its row
        for (path, allowed) in authz::TABLE.iter().filter(|(p, _)| !p.contains("ServerReflection")) {
            let before = revision(admin_ch.clone()).await;
            let got = call(ch.clone(), path, name).await;
            let after = revision(admin_ch.clone()).await;
            match role {
                Some(r) if allowed.contains(&r) => assert!(
                    !matches!(got, Code::PermissionDenied | Code::Unauthenticated),
                    "{word} may call {path} but got {got:?}"
                ),
                Some(_) => assert_eq!(got, Code::PermissionDenied, "{word} on {path}"),
                None => assert_eq!(got, Code::Unauthenticated, "no identity on {path}"),
            }
            if !matches!(role, Some(r) if allowed.contains(&r)) {
                assert_eq!(before, after, "a refused {path} by {word} wrote something");
            }
        }
    }

    // the CLI: an admin applies, a viewer is refused with the reason, no TLS gets nowhere
    let manifest = dir.join("m.yaml");
    std::fs::write(&manifest, common::model("secured")).unwrap();
    let m = manifest.display().to_string();
    let as_role = |files: &TlsFiles, args: &[&str]| {
        let mut all: Vec<String> = vec!["--server".into(), server.addr.clone()];
        all.extend(tls_flags(files));
        all.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        flotilla(dir, &refs)
    };
    let viewer = cert_files(dir, "viewer", "vic");
    let out = as_role(&viewer, &["apply", "-f", &m]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("viewer/vic may not call /flotilla.v1.ObjectService/Apply"), "{err}");
    let out = as_role(&cert_files(dir, "admin", "alice"), &["apply", "-f", &m]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tenant = dir.join("t.yaml");
    std::fs::write(&tenant, "kind: Tenant\nmetadata:\n  name: team-a\nspec: {}\n").unwrap();
    let out = as_role(&cert_files(dir, "operator", "olga"), &["apply", "-f", &tenant.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("operator/olga may not write Tenant objects"), "{err}");
    // tenants' key hashes: only gateways (and servers) read them
    let keyed = dir.join("k.yaml");
    std::fs::write(&keyed, "kind: Tenant\nmetadata:\n  name: team-b\nspec:\n  api_keys: [team-b-secret-1]\n").unwrap();
    let admin_files = cert_files(dir, "admin", "alice");
    assert!(as_role(&admin_files, &["apply", "-f", &keyed.display().to_string()]).status.success());
    let hash = flotilla_api::spec::hash_api_key("team-b-secret-1");
    for out in [
        as_role(&admin_files, &["get", "tenant", "team-b", "-o", "json"]),
        as_role(&viewer, &["get", "tenants", "-o", "yaml"]),
    ] {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains(&hash) && !text.contains("team-b-secret-1"), "a key hash leaked: {text}");
    }
    assert!(String::from_utf8_lossy(&as_role(&admin_files, &["get", "tenant", "team-b", "-o", "json"]).stdout)
        .contains("sha256:<redacted>"));
    let mut watch = pb::object_service_client::ObjectServiceClient::new(channel(&server.addr, &admin).await)
        .watch(pb::WatchRequest { kind: "Tenant".into(), after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let event = watch.message().await.unwrap().unwrap();
    assert!(!event.object.unwrap().spec_json.contains(&hash), "an admin's watch shows no hash");
    let gw = Tls::load(cert_files(dir, "gateway", "gw1")).unwrap();
    let seen = pb::object_service_client::ObjectServiceClient::new(channel(&server.addr, &gw).await)
        .get(pb::GetRequest { kind: "Tenant".into(), name: "team-b".into(), stale: false })
        .await
        .unwrap()
        .into_inner();
    assert!(seen.object.unwrap().spec_json.contains(&hash), "a gateway reads the hash it authenticates with");
    let out = as_role(&viewer, &["get", "model", "secured", "-o", "json"]);
    assert!(out.status.success(), "a viewer reads: {}", String::from_utf8_lossy(&out.stderr));
    let out = flotilla(dir, &["--server", &server.addr, "get", "models"]);
    assert_eq!(out.status.code(), Some(1), "plain text to a TLS server");
    let out = flotilla(dir, &["--server", &server.addr, "--tls-cert", "x.pem", "get", "models"]);
    assert_eq!(out.status.code(), Some(2), "partial TLS flags are a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key is missing"));

    // tenant keys: made by the server, shown once, kept as id + hash, refused when shared
    let out = as_role(&admin_files, &["tenant", "key", "create", "team-b", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (key, key_id) = (made["key"].as_str().unwrap().to_string(), made["id"].as_str().unwrap().to_string());
    assert!(key.starts_with(&format!("ftk_{key_id}_")) && key.len() == 85, "{key}");
    let listed = as_role(&admin_files, &["tenant", "key", "list", "team-b", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["keys"][0]["id"], key_id.as_str(), "{listed}");
    let shown = as_role(&admin_files, &["get", "tenant", "team-b", "-o", "json"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&key_id) && !shown.contains(&flotilla_api::spec::hash_api_key(&key)), "{shown}");
    let seen = pb::object_service_client::ObjectServiceClient::new(channel(&server.addr, &gw).await)
        .get(pb::GetRequest { kind: "Tenant".into(), name: "team-b".into(), stale: false })
        .await
        .unwrap()
        .into_inner();
    assert!(seen.object.unwrap().spec_json.contains(&flotilla_api::spec::hash_api_key(&key)), "gateways read it");
    let shared = dir.join("shared.yaml");
    std::fs::write(&shared, "kind: Tenant\nmetadata:\n  name: team-c\nspec:\n  api_keys: [team-b-secret-1]\n").unwrap();
    let out = as_role(&admin_files, &["apply", "-f", &shared.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("spec.api_keys[0]") && err.contains("is a key of tenant team-b already"), "{err}");
    let out = as_role(&cert_files(dir, "operator", "olga"), &["tenant", "key", "create", "team-b"]);
    assert_eq!(out.status.code(), Some(1), "only admins make tenant keys");
    assert!(as_role(&admin_files, &["tenant", "key", "revoke", "team-b", &key_id]).status.success());
    let out = as_role(&admin_files, &["tenant", "key", "revoke", "team-b", &key_id]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no key"), "revoked once");
    let listed = as_role(&admin_files, &["tenant", "key", "list", "team-b", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["keys"], serde_json::json!([]), "{listed}");

    // bearer tokens: made by an admin, used with the CA alone, refused once revoked or expired
    let out = as_role(&admin_files, &["token", "create", "--role", "viewer", "--name", "ci", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = made["token"].as_str().unwrap().to_string();
    let id = made["id"].as_str().unwrap().to_string();
    let ca = dir.join("ca.pem").display().to_string();
    let with_token = |token: &str, args: &[&str]| {
        let mut all: Vec<&str> = vec!["--server", &server.addr, "--tls-ca", &ca, "--token", token];
        all.extend(args);
        flotilla(dir, &all)
    };
    let out = with_token(&token, &["get", "models"]);
    assert!(out.status.success(), "a viewer token reads: {}", String::from_utf8_lossy(&out.stderr));
    let out = with_token(&token, &["apply", "-f", &m]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("viewer/ci may not call"), "a viewer token cannot write");
    let out = as_role(&cert_files(dir, "operator", "olga"), &["token", "create", "--role", "admin", "--name", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not write Token objects"), "only admins make tokens");
    let listed = as_role(&admin_files, &["token", "list", "-o", "json"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains(&id) && !text.contains(&token[21..]), "{text}");
    assert!(!text.contains(&flotilla_api::spec::hash_api_key(&token[21..])), "no token hash in a listing: {text}");
    assert!(as_role(&admin_files, &["token", "revoke", &id]).status.success());
    let out = with_token(&token, &["get", "models"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs an identity"), "a revoked token is refused");

    // an operator token limited by a selector writes only objects labelled so, before and after
    let out = as_role(
        &admin_files,
        &["token", "create", "--role", "operator", "--name", "search-ci", "--selector", "team=search", "-o", "json"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let scoped: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let scoped = scoped["token"].as_str().unwrap().to_string();
    let out = as_role(&admin_files, &["token", "create", "--role", "viewer", "--name", "v", "--selector", "team=x"]);
    assert_eq!(out.status.code(), Some(2), "a selector limits operators only");
    let labelled = |name: &str, team: Option<&str>| {
        let labels = team.map_or_else(String::new, |t| format!("  labels:\n    team: {t}\n"));
        let text = common::model(name).replacen("metadata:\n", &format!("metadata:\n{labels}"), 1);
        let path = dir.join(format!("{name}-{}.yaml", team.unwrap_or("none")));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    assert!(as_role(&admin_files, &["apply", "-f", &labelled("ads-model", Some("ads"))]).status.success());
    let out = with_token(&scoped, &["apply", "-f", &labelled("search-model", Some("search"))]);
    assert!(out.status.success(), "inside its scope: {}", String::from_utf8_lossy(&out.stderr));
    for (what, file, says) in [
        ("create outside", labelled("loose-model", None), "loose-model as written has labels {}"),
        ("take over", labelled("ads-model", Some("search")), "ads-model as it is has labels {team=ads}"),
        ("move out", labelled("search-model", Some("ads")), "search-model as written has labels {team=ads}"),
    ] {
        let out = with_token(&scoped, &["apply", "-f", &file]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains("limited to objects labelled team=search") && err.contains(says), "{what}: {err}");
    }
    let out = with_token(&scoped, &["delete", "model", "ads-model"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("limited to objects"), "another team's delete is refused");
    let out = with_token(&scoped, &["node", "drain", "n1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not call /flotilla.v1.FleetService/SetNode"));
    assert!(with_token(&scoped, &["delete", "model", "search-model"]).status.success(), "its own delete works");
    let out = as_role(&admin_files, &["get", "model", "ads-model", "-o", "json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"team\": \"ads\""), "nothing refused was written");
    let out =
        as_role(&admin_files, &["token", "create", "--role", "viewer", "--name", "brief", "--ttl", "1s", "-o", "json"]);
    let brief: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let out = with_token(brief["token"].as_str().unwrap(), &["get", "models"]);
    assert_eq!(out.status.code(), Some(1), "an expired token is refused");
    let out = flotilla(dir, &["--server", &server.addr, "--token", &token, "get", "models"]);
    assert_eq!(out.status.code(), Some(2), "a token without TLS is a usage error");

    // an agent's certificate for node n1 cannot open node n2's session
    let agent = Tls::load(cert_files(dir, "agent", "n1")).unwrap();
    let got = call(channel(&server.addr, &agent).await, "/flotilla.v1.AgentService/Session", "n2").await;
    assert_eq!(got, Code::PermissionDenied);
    let _ = Identity::new(Role::Agent, "n1");

    // a request id is bound to its caller: an admin repeating its own id gets its first answer
    // (an idempotent retry), another caller sending the same id gets a request of its own
    let replay = || {
        let manifest = common::model("replayed");
        let mut req = tonic::Request::new(pb::ApplyRequest { manifest, expected_revision: Some(0) });
        req.metadata_mut().insert(flotilla_cluster::FORWARDED_HEADER, "1".parse().unwrap());
        req.metadata_mut()
            .insert(flotilla_cluster::REQUEST_ID_HEADER, "0000000000000000000000000000abcd".parse().unwrap());
        req
    };
    let mut objects = pb::object_service_client::ObjectServiceClient::new(admin_ch.clone());
    let first = objects.apply(replay()).await.expect("first create").into_inner();
    let again = objects.apply(replay()).await.expect("the same caller's retry").into_inner();
    assert_eq!(again.object, first.object, "a retry answers the first result, not a conflict");
    let olga = Tls::load(cert_files(dir, "operator", "olga")).unwrap();
    let mut theirs = pb::object_service_client::ObjectServiceClient::new(channel(&server.addr, &olga).await);
    assert_eq!(code(theirs.apply(replay()).await), Code::FailedPrecondition, "another caller's id is its own");

    // the audit log names who wrote what, and how it ended; only an admin reads it
    let out = as_role(&admin_files, &["audit", "--who", "admin/alice", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = log["entries"].as_array().unwrap();
    let seen = |target: &str, result: &str| {
        entries.iter().any(|e| e["target"] == target && e["result"] == result && e["method"] == "Apply")
    };
    assert!(seen("Model/replayed", "created"), "{log}");
    let created = entries.iter().filter(|e| e["target"] == "Model/replayed").count();
    assert_eq!(created, 1, "the retry was not applied (nor audited) twice: {log}");
    assert!(entries.iter().all(|e| e["who"] == "admin/alice" && e["at_ms"].as_u64() > Some(0)), "{log}");
    let out = as_role(&admin_files, &["audit", "--who", "operator/olga", "-o", "json"]);
    let log: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let olga = log["entries"].as_array().unwrap();
    assert!(
        olga.iter().all(|e| e["target"] != "Tenant/team-a"),
        "a refused write is not audited (it is logged where refused): {log}"
    );
    assert!(
        olga.iter().any(|e| e["method"] == "Delete" && e["target"] == "Model/absent" && e["result"] == "not_found"),
        "an allowed write is, whatever its result: {log}"
    );
    let out = as_role(&viewer, &["audit"]);
    assert_eq!(out.status.code(), Some(1), "a viewer may not read the audit log");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not call /flotilla.v1.ClusterService/Audit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cert_files(dir: &Path, role: &str, name: &str) -> TlsFiles {
    let p = |s: String| -> PathBuf { dir.join(s) };
    TlsFiles { cert: p(format!("{role}-{name}.pem")), key: p(format!("{role}-{name}-key.pem")), ca: p("ca.pem".into()) }
}

async fn channel_ok(addr: &str, tls: &Arc<Tls>) -> bool {
    let ep = Endpoint::from_shared(format!("http://{addr}")).unwrap().timeout(Duration::from_secs(2));
    let Ok(ch) = flotilla_security::connect::connect(ep, Some(tls), addr).await else { return false };
    pb::cluster_service_client::ClusterServiceClient::new(ch)
        .status(pb::StatusRequest { local: false })
        .await
        .is_ok_and(|s| s.into_inner().leader_id != 0)
}

/// Three servers with `--peer-addr`: Raft and forwarded calls travel on the peer listeners,
/// which serve servers only, and the API listeners serve no Raft method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_listener_carries_raft_and_forwards_and_serves_servers_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(flotilla(dir, &["tls", "ca", "create"]).status.success());
    let peer_flag = ["--peer-addr", "127.0.0.1:0"];
    let (s1, p1) = start_member(dir, &cert(dir, "server", "s1"), 1, &[&peer_flag[..], &["--bootstrap"]].concat()).await;
    let p1 = p1.expect("a peer listener");
    let join = ["--join", s1.addr.as_str()];
    let (s2, _) = start_member(dir, &cert(dir, "server", "s2"), 2, &[&peer_flag[..], &join[..]].concat()).await;
    let (s3, _) = start_member(dir, &cert(dir, "server", "s3"), 3, &[&peer_flag[..], &join[..]].concat()).await;
    let admin = Tls::load(cert(dir, "admin", "alice")).unwrap();
    let status = || async {
        let ch = channel(&s1.addr, &admin).await;
        pb::cluster_service_client::ClusterServiceClient::new(ch).status(pb::StatusRequest { local: false }).await
    };
    let mut members = vec![];
    for _ in 0..200 {
        if let Ok(s) = status().await {
            members = s.into_inner().members;
            if members.iter().filter(|m| m.voter && m.reachable).count() == 3 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(members.iter().filter(|m| m.voter && m.reachable).count(), 3, "{members:?}");
    assert!(members.iter().any(|m| m.addr == p1), "members are known by their peer addresses: {members:?}");
    let api: Vec<&str> = [&s1, &s2, &s3].iter().map(|s| s.addr.as_str()).collect();
    assert!(members.iter().all(|m| !api.contains(&m.addr.as_str())), "{members:?}");

    // writes through every server (followers forward over the peer listeners)
    for (i, addr) in api.iter().enumerate() {
        let manifest = format!("kind: Tenant\nmetadata: {{name: via-{i}}}\nspec: {{}}\n");
        let mut c = pb::object_service_client::ObjectServiceClient::new(channel(addr, &admin).await);
        c.apply(pb::ApplyRequest { manifest, expected_revision: None }).await.expect("a write through a server");
    }
    // no Raft on the API listener, whoever asks
    let peer_cert = Tls::load(cert(dir, "server", "s9")).unwrap();
    let got = call(channel(&s1.addr, &peer_cert).await, "/flotilla.v1.RaftService/Vote", "").await;
    assert_eq!(got, Code::Unimplemented, "the API listener serves no Raft method");
    // the peer listener serves servers only
    let got = call(channel(&p1, &admin).await, "/flotilla.v1.ObjectService/Apply", "").await;
    assert_eq!(got, Code::PermissionDenied, "an admin on the peer listener");
    let got = call(channel(&p1, &peer_cert).await, "/flotilla.v1.RaftService/Vote", "").await;
    assert!(!matches!(got, Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented), "{got:?}");
}

/// A federation server with TLS reaches a member cluster with TLS as a client: with the
/// member's operator token in the Cluster's `token_file` (the member's servers verified by
/// the federation's own CA) it creates the member Model; with a viewer token it is refused
/// and creates nothing, and the FederatedModel's status names the refusal. An operator of
/// the federation may write FederatedModels but not Clusters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_writes_a_tls_member_with_its_operator_token_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(flotilla(dir, &["tls", "ca", "create"]).status.success());
    std::fs::create_dir_all(dir.join("member")).unwrap();
    std::fs::create_dir_all(dir.join("fed")).unwrap();
    let member = start_server(&dir.join("member"), &cert(dir, "server", "member")).await;
    let fed = start_member(&dir.join("fed"), &cert(dir, "server", "fed"), 1, &["--bootstrap", "--federation"]).await.0;
    let admin = cert(dir, "admin", "alice");
    let admin_tls = Tls::load(admin.clone()).unwrap();
    for addr in [&member.addr, &fed.addr] {
        flotilla_testkit::wait::wait_until("a leader over TLS", Duration::from_secs(30), || {
            channel_ok(addr, &admin_tls)
        })
        .await;
    }
    let as_admin = |server: &str, args: &[&str]| {
        let mut all: Vec<String> = vec!["--server".into(), server.into()];
        all.extend(tls_flags(&admin));
        all.extend(args.iter().map(|s| s.to_string()));
        flotilla(dir, &all.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // the member's tokens for the federation: an operator's, and a viewer's that cannot write
    for (role, file) in [("operator", "good.token"), ("viewer", "bad.token")] {
        let out = as_admin(&member.addr, &["token", "create", "--role", role, "--name", "federation", "-o", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        std::fs::write(dir.join(file), made["token"].as_str().unwrap()).unwrap();
    }
    let manifests = dir.join("federation.yaml");
    let mut yaml = String::new();
    for tier in ["good", "bad"] {
        yaml.push_str(&format!(
            "kind: Cluster\nmetadata: {{name: {tier}, labels: {{tier: {tier}}}}}\nspec:\n  servers: ['{}']\n  token_file: {}\n---\n",
            member.addr,
            dir.join(format!("{tier}.token")).display()
        ));
        yaml.push_str(&format!(
            "kind: FederatedModel\nmetadata: {{name: from-{tier}}}\nspec:\n  replicas: 1\n  template: {{engine: sim, source: file:///m}}\n  placement: {{clusters: tier={tier}}}\n---\n"
        ));
    }
    std::fs::write(&manifests, yaml).unwrap();
    let out = as_admin(&fed.addr, &["apply", "-f", manifests.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let models = |labels: bool| {
        let out = as_admin(&member.addr, &["get", "models", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .map(|m| match labels {
                true => format!("{}:{}", m["metadata"]["name"], m["metadata"]["labels"]["flotilla.io/federated-by"]),
                false => m["metadata"]["name"].as_str().unwrap_or_default().to_string(),
            })
            .collect::<Vec<_>>()
    };
    flotilla_testkit::wait::wait_until(
        "the member Model made with the operator token",
        Duration::from_secs(30),
        || {
            let found = models(false).contains(&"from-good".to_string());
            async move { found }
        },
    )
    .await;
    assert_eq!(models(true), ["\"from-good\":\"from-good\""], "labelled; nothing made with the viewer token");
    let fed_status = |name: &str| {
        let out = as_admin(&fed.addr, &["get", "fedmodel", name, "-o", "json"]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    flotilla_testkit::wait::wait_until("the refusal reported", Duration::from_secs(30), || {
        let s = fed_status("from-bad");
        async move { s.contains("may not") }
    })
    .await;

    // the federation's own roles: an operator writes FederatedModels, not Clusters
    let operator = cert(dir, "operator", "olga");
    let as_operator = |file: &Path| {
        let mut all: Vec<String> = vec!["--server".into(), fed.addr.clone()];
        all.extend(tls_flags(&operator));
        all.extend(["apply".into(), "-f".into(), file.display().to_string()]);
        flotilla(dir, &all.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let one = dir.join("one.yaml");
    std::fs::write(&one, "kind: FederatedModel\nmetadata: {name: by-operator}\nspec: {replicas: 0, template: {engine: sim, source: file:///m}}\n").unwrap();
    assert!(as_operator(&one).status.success(), "an operator writes FederatedModels");
    std::fs::write(
        &one,
        format!("kind: Cluster\nmetadata: {{name: sneaky}}\nspec: {{servers: ['{}']}}\n", member.addr),
    )
    .unwrap();
    let out = as_operator(&one);
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not write Cluster objects"), "{out:?}");
}
