//! What an agent may tell the server (pure): checked before anything it says is kept in
//! memory or written through Raft.
//!
//! - Where engines are: an engine endpoint's host must be the IP the agent's connection
//!   comes from (its gRPC peer address), or loopback when that connection is itself from
//!   loopback (an agent on the servers' own host: dev and tests); its port must be inside
//!   the agent's engine port range (`Register.engine_ports`, 1024 <= low <= high; absent from
//!   older agents: the default 20000-29999). The node address given at registration obeys
//!   the same host rule. So an agent cannot point the gateways at another machine, or at a
//!   port of its own host that is not an engine's (a server's, say).
//! - How much: labels as manifests' (at most 64, bounded keys and values), at most
//!   [`MAX_GPUS`] GPUs, [`MAX_ENGINES`] engine reports per heartbeat, [`MAX_ADAPTERS`]
//!   adapters per engine, names of at most [`MAX_NAME`] bytes and states of at most
//!   [`MAX_STATE`]. Out of bounds is refused with INVALID_ARGUMENT naming the field (the
//!   agent exits: a refusal it cannot fix by retrying).
//! - An engine's certificate pin (`engine_cert_sha256`) is empty or 64 lower-case hex
//!   digits: it goes to the gateways as it is.
//! - Free text is truncated, not refused (an honest agent's crash reason quotes an engine's
//!   log line): reasons to [`MAX_REASON`] bytes, GPU types and versions to [`MAX_SHORT`].
//!   Load figures that are not finite numbers (an engine's `NaN`) become 0. A GPU's
//!   evidence keeps [`MAX_EVIDENCE`] lines of at most [`MAX_EVIDENCE_LEN`] bytes; its state
//!   must be `healthy`, `degraded`, `failed` or empty (older agents), else it is refused.
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use flotilla_api::pb::{EngineReport, GpuInfo, Heartbeat, Register};

use crate::ActorsError;

/// Most labels of a node (as manifests).
pub const MAX_LABELS: usize = 64;
/// Most GPUs of a node.
pub const MAX_GPUS: usize = 256;
/// Most engine reports in one heartbeat.
pub const MAX_ENGINES: usize = 1024;
/// Most adapters (assigned or loaded) reported for one engine.
pub const MAX_ADAPTERS: usize = 1024;
/// Longest replica, adapter or agent id, in bytes.
pub const MAX_NAME: usize = 253;
/// Longest engine or adapter state word, in bytes.
pub const MAX_STATE: usize = 32;
/// Reasons are cut to this many bytes.
pub const MAX_REASON: usize = 1024;
/// GPU types and versions are cut to this many bytes.
pub const MAX_SHORT: usize = 128;
/// Most evidence lines kept per GPU (more are dropped).
pub const MAX_EVIDENCE: usize = 8;
/// Evidence lines are cut to this many bytes.
pub const MAX_EVIDENCE_LEN: usize = 256;
/// The engine port range of agents that do not send one (the agent's default).
pub const DEFAULT_ENGINE_PORTS: RangeInclusive<u16> = 20000..=29999;

/// Where one agent's engines may be: fixed at registration, checked on every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentScope {
    /// The IP the agent's connection comes from.
    pub peer: IpAddr,
    /// Its engine ports.
    pub ports: RangeInclusive<u16>,
}

fn invalid(field: impl std::fmt::Display, why: impl std::fmt::Display) -> ActorsError {
    ActorsError::InvalidArgument(format!("{field}: {why}"))
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
pub fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

fn bounded(field: impl std::fmt::Display, s: &str, max: usize) -> Result<(), ActorsError> {
    if s.len() > max {
        return Err(invalid(field, format!("is {} bytes, over the maximum of {max}", s.len())));
    }
    Ok(())
}

fn at_most(field: &str, n: usize, max: usize, what: &str) -> Result<(), ActorsError> {
    if n > max {
        return Err(invalid(field, format!("has {n} {what}, over the maximum of {max}")));
    }
    Ok(())
}

/// Loopback: an IP that is, or `localhost`.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Checks that `host` (an IP, or `localhost`) may be this agent's: its peer address, or
/// loopback when the peer is loopback.
pub fn check_host(host: &str, peer: IpAddr) -> Result<(), String> {
    let peer = peer.to_canonical();
    if peer.is_loopback() && is_loopback(host) {
        return Ok(());
    }
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.to_canonical() == peer => Ok(()),
        Ok(_) => Err(format!("host {host} is not this agent's address {peer} (the address its connection comes from)")),
        Err(_) => Err(format!("host {host:?} is not an IP address (this agent connects from {peer})")),
    }
}

/// Checks an engine endpoint `host:port` (`[v6]:port` for IPv6) against the agent's scope.
pub fn check_endpoint(endpoint: &str, scope: &AgentScope) -> Result<(), String> {
    let (host, port) = match endpoint.parse::<SocketAddr>() {
        Ok(a) => (a.ip().to_string(), a.port()),
        Err(_) => {
            let (host, port) = endpoint.rsplit_once(':').ok_or_else(|| format!("{endpoint:?} is not host:port"))?;
            let port = port.parse::<u16>().map_err(|_| format!("{endpoint:?} is not host:port"))?;
            (host.to_string(), port)
        }
    };
    if !scope.ports.contains(&port) {
        return Err(format!(
            "port {port} is outside this agent's engine port range {}-{}",
            scope.ports.start(),
            scope.ports.end()
        ));
    }
    check_host(&host, scope.peer)
}

/// Checks a registration from `peer` (truncating its free text) and returns the scope its
/// heartbeats are held to. `peer` is `None` when the transport does not say (never over
/// TCP): such an agent is refused, as nothing it reports could be checked.
pub fn check_registration(reg: &mut Register, peer: Option<IpAddr>) -> Result<AgentScope, ActorsError> {
    let Some(peer) = peer else {
        return Err(invalid("register", "the server cannot tell which address this agent connects from"));
    };
    bounded("register.node_name", &reg.node_name, MAX_NAME)?;
    bounded("register.agent_id", &reg.agent_id, MAX_NAME)?;
    truncate(&mut reg.version, MAX_SHORT);
    bounded("register.address", &reg.address, MAX_NAME)?;
    check_host(reg.address.trim(), peer).map_err(|e| invalid("register.address", e))?;
    let labels = reg.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    flotilla_api::validate_labels("register.labels", &labels)
        .map_err(|e| ActorsError::InvalidArgument(e.to_string()))?;
    at_most("register.gpus", reg.gpus.len(), MAX_GPUS, "GPUs")?;
    for (i, g) in reg.gpus.iter_mut().enumerate() {
        check_gpu(&format!("register.gpus[{i}]"), g)?;
    }
    let ports = match &reg.engine_ports {
        None => DEFAULT_ENGINE_PORTS,
        Some(r) if 1024 <= r.low && r.low <= r.high && r.high <= 65535 => r.low as u16..=r.high as u16,
        Some(r) => {
            return Err(invalid(
                "register.engine_ports",
                format!("{}-{} is not a range with 1024 <= low <= high <= 65535", r.low, r.high),
            ))
        }
    };
    Ok(AgentScope { peer, ports })
}

fn finite(x: &mut f64) {
    if !x.is_finite() {
        *x = 0.0;
    }
}

fn check_engine(i: usize, e: &mut EngineReport, scope: &AgentScope) -> Result<(), ActorsError> {
    let field = |name: &str| format!("heartbeat.engines[{i}].{name}");
    bounded(field("replica"), &e.replica, MAX_NAME)?;
    bounded(field("state"), &e.state, MAX_STATE)?;
    truncate(&mut e.reason, MAX_REASON);
    // The API endpoint, and a gang head's rendezvous (which the leader hands to the gang's
    // workers): both on the agent's own host and engine ports.
    for (name, addr) in [("endpoint", &e.endpoint), ("rendezvous", &e.rendezvous)] {
        if !addr.is_empty() {
            bounded(field(name), addr, MAX_NAME)?;
            check_endpoint(addr, scope).map_err(|why| invalid(field(name), why))?;
        }
    }
    let token = &e.gang_token;
    if !token.is_empty() && (token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(invalid(field("gang_token"), "is not 64 hex digits"));
    }
    let pin = &e.engine_cert_sha256;
    let sha256 = pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !pin.is_empty() && !sha256 {
        return Err(invalid(
            field("engine_cert_sha256"),
            format!("{:?} is not a SHA-256 (64 lower-case hex digits)", pin.chars().take(80).collect::<String>()),
        ));
    }
    for x in [
        &mut e.download_progress,
        &mut e.download_bytes_per_second,
        &mut e.num_requests_running,
        &mut e.num_requests_waiting,
        &mut e.kv_cache_usage,
        &mut e.generation_tokens_total,
        &mut e.prompt_tokens_total,
        &mut e.requests_finished_total,
    ] {
        finite(x);
    }
    for (name, list) in [("loaded_adapters", &e.loaded_adapters), ("active_adapters", &e.active_adapters)] {
        at_most(&field(name), list.len(), MAX_ADAPTERS, "adapters")?;
        for (j, a) in list.iter().enumerate() {
            bounded(field(&format!("{name}[{j}]")), a, MAX_NAME)?;
        }
    }
    at_most(&field("adapters"), e.adapters.len(), MAX_ADAPTERS, "adapters")?;
    for (j, a) in e.adapters.iter_mut().enumerate() {
        bounded(field(&format!("adapters[{j}].name")), &a.name, MAX_NAME)?;
        bounded(field(&format!("adapters[{j}].state")), &a.state, MAX_STATE)?;
        truncate(&mut a.reason, MAX_REASON);
    }
    Ok(())
}

/// Checks a heartbeat against the agent's scope and bounds (truncating its free text).
pub fn check_heartbeat(hb: &mut Heartbeat, scope: &AgentScope) -> Result<(), ActorsError> {
    at_most("heartbeat.engines", hb.engines.len(), MAX_ENGINES, "engine reports")?;
    at_most("heartbeat.gpus", hb.gpus.len(), MAX_GPUS, "GPUs")?;
    for (i, e) in hb.engines.iter_mut().enumerate() {
        check_engine(i, e, scope)?;
    }
    for (i, g) in hb.gpus.iter_mut().enumerate() {
        check_gpu(&format!("heartbeat.gpus[{i}]"), g)?;
    }
    Ok(())
}

/// A GPU's free text is cut; its state word must be known.
fn check_gpu(field: &str, g: &mut GpuInfo) -> Result<(), ActorsError> {
    truncate(&mut g.gpu_type, MAX_SHORT);
    truncate(&mut g.health_reason, MAX_REASON);
    if flotilla_api::spec::GpuHealthState::from_report(&g.state, g.healthy).is_none() {
        let mut shown = g.state.clone();
        truncate(&mut shown, MAX_STATE);
        return Err(invalid(format!("{field}.state"), format!("{shown:?} is not one of healthy, degraded, failed")));
    }
    g.evidence.truncate(MAX_EVIDENCE);
    for e in &mut g.evidence {
        truncate(e, MAX_EVIDENCE_LEN);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use flotilla_api::pb::{AdapterReport, PortRange};

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn scope(peer: &str) -> AgentScope {
        AgentScope { peer: ip(peer), ports: 20000..=20099 }
    }

    #[test]
    fn endpoints_must_be_on_the_agents_own_host_and_ports() {
        let table: &[(&str, &str, Result<(), &str>)] = &[
            ("127.0.0.1", "127.0.0.1:20001", Ok(())),
            ("127.0.0.1", "127.0.0.2:20001", Ok(())),
            ("127.0.0.1", "localhost:20001", Ok(())),
            ("127.0.0.1", "[::1]:20001", Ok(())),
            ("::1", "127.0.0.1:20001", Ok(())),
            ("::ffff:127.0.0.1", "127.0.0.1:20001", Ok(())),
            ("10.0.0.7", "10.0.0.7:20099", Ok(())),
            ("::ffff:10.0.0.7", "10.0.0.7:20000", Ok(())),
            ("fd00::7", "[fd00::7]:20000", Ok(())),
            ("127.0.0.1", "10.1.2.3:20001", Err("host 10.1.2.3 is not this agent's address 127.0.0.1")),
            ("10.0.0.7", "10.0.0.8:20001", Err("host 10.0.0.8 is not this agent's address 10.0.0.7")),
            ("10.0.0.7", "127.0.0.1:20001", Err("host 127.0.0.1 is not this agent's address")),
            ("10.0.0.7", "localhost:20001", Err("\"localhost\" is not an IP address")),
            ("10.0.0.7", "gpu-01:20001", Err("\"gpu-01\" is not an IP address")),
            ("127.0.0.1", "127.0.0.1:7070", Err("port 7070 is outside this agent's engine port range 20000-20099")),
            ("127.0.0.1", "127.0.0.1:20100", Err("port 20100 is outside")),
            ("127.0.0.1", "127.0.0.1", Err("is not host:port")),
            ("127.0.0.1", "127.0.0.1:x", Err("is not host:port")),
            ("127.0.0.1", "127.0.0.1:99999", Err("is not host:port")),
        ];
        for (peer, endpoint, want) in table {
            let got = check_endpoint(endpoint, &scope(peer));
            match (want, &got) {
                (Ok(()), Ok(())) => {}
                (Err(part), Err(msg)) if msg.contains(part) => {}
                _ => panic!("peer {peer}, endpoint {endpoint}: want {want:?}, got {got:?}"),
            }
        }
    }

    fn register() -> Register {
        Register {
            node_name: "n1".into(),
            agent_id: "a1".into(),
            address: "127.0.0.1".into(),
            gpus: vec![GpuInfo { index: 0, gpu_type: "A100-80GB".into(), healthy: true, ..Default::default() }],
            engine_ports: Some(PortRange { low: 20000, high: 20099 }),
            ..Default::default()
        }
    }

    #[test]
    fn registrations_out_of_bounds_are_refused_naming_the_field() {
        type Edit = fn(&mut Register);
        let table: &[(&str, Edit, Option<&str>)] = &[
            ("ok", |_| {}, None),
            ("no range: the default", |r| r.engine_ports = None, None),
            ("long version is cut", |r| r.version = "v".repeat(10_000), None),
            ("long health reason is cut", |r| r.gpus[0].health_reason = "x".repeat(10_000), None),
            ("address elsewhere", |r| r.address = "10.9.9.9".into(), Some("register.address: host 10.9.9.9")),
            ("address a name", |r| r.address = "gpu-01".into(), Some("register.address")),
            (
                "privileged ports",
                |r| r.engine_ports = Some(PortRange { low: 80, high: 30000 }),
                Some("register.engine_ports: 80-30000"),
            ),
            (
                "inverted ports",
                |r| r.engine_ports = Some(PortRange { low: 30000, high: 20000 }),
                Some("register.engine_ports"),
            ),
            (
                "ports past 65535",
                |r| r.engine_ports = Some(PortRange { low: 20000, high: 70000 }),
                Some("register.engine_ports"),
            ),
            (
                "too many labels",
                |r| r.labels = (0..65).map(|i| (format!("k{i}"), "v".into())).collect(),
                Some("register.labels: has 65 labels"),
            ),
            ("long label value", |r| r.labels = [("k".to_string(), "v".repeat(300))].into(), Some("register.labels.k")),
            ("bad label key", |r| r.labels = [("k=".to_string(), "v".into())].into(), Some("register.labels")),
            ("too many GPUs", |r| r.gpus = vec![GpuInfo::default(); MAX_GPUS + 1], Some("register.gpus: has 257 GPUs")),
            ("long agent id", |r| r.agent_id = "a".repeat(300), Some("register.agent_id: is 300 bytes")),
            ("long node name", |r| r.node_name = "n".repeat(300), Some("register.node_name: is 300 bytes")),
            ("long address", |r| r.address = "1".repeat(300), Some("register.address: is 300 bytes")),
        ];
        for (what, edit, want) in table {
            let mut r = register();
            edit(&mut r);
            match (check_registration(&mut r, Some(ip("127.0.0.1"))), want) {
                (Ok(s), None) => {
                    assert!(r.version.len() <= MAX_SHORT && r.gpus[0].health_reason.len() <= MAX_REASON, "{what}");
                    let want_ports = if r.engine_ports.is_some() { 20000..=20099 } else { DEFAULT_ENGINE_PORTS };
                    assert_eq!(s, AgentScope { peer: ip("127.0.0.1"), ports: want_ports }, "{what}");
                }
                (Err(e), Some(part)) => {
                    assert_eq!(e.code(), "actors.invalid_argument", "{what}");
                    assert!(e.to_string().contains(part), "{what}: {e}");
                }
                (got, _) => panic!("{what}: want {want:?}, got {got:?}"),
            }
        }
        assert!(check_registration(&mut register(), None).unwrap_err().to_string().contains("cannot tell"));
    }

    fn engine() -> EngineReport {
        EngineReport {
            replica: "m-1".into(),
            state: "ready".into(),
            endpoint: "127.0.0.1:20001".into(),
            loaded_adapters: vec!["sql".into()],
            adapters: vec![AdapterReport { name: "sql".into(), state: "loaded".into(), ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn heartbeats_out_of_bounds_are_refused_and_free_text_is_cut() {
        type Edit = fn(&mut Heartbeat);
        let table: &[(&str, Edit, Option<&str>)] = &[
            ("ok", |_| {}, None),
            ("no endpoint yet", |h| h.engines[0].endpoint.clear(), None),
            (
                "long reasons are cut",
                |h| {
                    h.engines[0].reason = "é".repeat(5_000);
                    h.engines[0].adapters[0].reason = "x".repeat(5_000);
                },
                None,
            ),
            ("NaN load", |h| h.engines[0].kv_cache_usage = f64::NAN, None),
            ("a certificate pin", |h| h.engines[0].engine_cert_sha256 = "0a".repeat(32), None),
            (
                "a pin that is not a SHA-256",
                |h| h.engines[0].engine_cert_sha256 = "0A".repeat(32),
                Some("heartbeat.engines[0].engine_cert_sha256: \"0A0A"),
            ),
            (
                "a long pin",
                |h| h.engines[0].engine_cert_sha256 = "a".repeat(1 << 20),
                Some("heartbeat.engines[0].engine_cert_sha256"),
            ),
            (
                "endpoint elsewhere",
                |h| h.engines[0].endpoint = "10.1.2.3:20001".into(),
                Some("heartbeat.engines[0].endpoint: host 10.1.2.3"),
            ),
            (
                "long endpoint",
                |h| h.engines[0].endpoint = "1".repeat(1 << 20),
                Some("heartbeat.engines[0].endpoint: is 1048576 bytes"),
            ),
            (
                "endpoint off range",
                |h| h.engines[0].endpoint = "127.0.0.1:7070".into(),
                Some("heartbeat.engines[0].endpoint: port 7070"),
            ),
            (
                "too many engines",
                |h| h.engines = vec![EngineReport::default(); MAX_ENGINES + 1],
                Some("heartbeat.engines: has 1025 engine reports"),
            ),
            ("too many GPUs", |h| h.gpus = vec![GpuInfo::default(); MAX_GPUS + 1], Some("heartbeat.gpus")),
            (
                "long replica",
                |h| h.engines[0].replica = "r".repeat(254),
                Some("heartbeat.engines[0].replica: is 254 bytes"),
            ),
            ("long state", |h| h.engines[0].state = "s".repeat(33), Some("heartbeat.engines[0].state")),
            (
                "too many loaded",
                |h| h.engines[0].loaded_adapters = vec!["a".into(); MAX_ADAPTERS + 1],
                Some("heartbeat.engines[0].loaded_adapters: has 1025"),
            ),
            (
                "long loaded name",
                |h| h.engines[0].loaded_adapters = vec!["a".repeat(254)],
                Some("heartbeat.engines[0].loaded_adapters[0]"),
            ),
            ("a gang head's rendezvous", |h| h.engines[0].rendezvous = "127.0.0.1:20002".into(), None),
            (
                "rendezvous elsewhere",
                |h| h.engines[0].rendezvous = "10.1.2.3:20002".into(),
                Some("heartbeat.engines[0].rendezvous: host 10.1.2.3"),
            ),
            (
                "rendezvous off range",
                |h| h.engines[0].rendezvous = "127.0.0.1:29500".into(),
                Some("heartbeat.engines[0].rendezvous: port 29500"),
            ),
            (
                "long rendezvous",
                |h| h.engines[0].rendezvous = "1".repeat(1 << 20),
                Some("heartbeat.engines[0].rendezvous: is 1048576 bytes"),
            ),
            ("a ray head's gang token", |h| h.engines[0].gang_token = "ab".repeat(32), None),
            (
                "gang token not hex",
                |h| h.engines[0].gang_token = "x".repeat(1 << 20),
                Some("heartbeat.engines[0].gang_token: is not 64 hex digits"),
            ),
            (
                "too many active",
                |h| h.engines[0].active_adapters = vec!["a".into(); MAX_ADAPTERS + 1],
                Some("heartbeat.engines[0].active_adapters: has 1025"),
            ),
            (
                "long active name",
                |h| h.engines[0].active_adapters = vec!["a".repeat(254)],
                Some("heartbeat.engines[0].active_adapters[0]"),
            ),
            (
                "too many adapters",
                |h| h.engines[0].adapters = vec![AdapterReport::default(); MAX_ADAPTERS + 1],
                Some("heartbeat.engines[0].adapters: has 1025"),
            ),
            (
                "long adapter name",
                |h| h.engines[0].adapters[0].name = "a".repeat(254),
                Some("heartbeat.engines[0].adapters[0].name"),
            ),
        ];
        for (what, edit, want) in table {
            let mut hb = Heartbeat { engines: vec![engine()], gpus: vec![] };
            edit(&mut hb);
            match (check_heartbeat(&mut hb, &scope("127.0.0.1")), want) {
                (Ok(()), None) => {
                    let e = &hb.engines[0];
                    assert!(e.reason.len() <= MAX_REASON && e.adapters[0].reason.len() <= MAX_REASON, "{what}");
                    assert!(e.kv_cache_usage.is_finite(), "{what}");
                }
                (Err(e), Some(part)) => assert!(e.to_string().contains(part), "{what}: {e}"),
                (got, _) => panic!("{what}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        for (s, max, want) in [("abc", 5, "abc"), ("abcdef", 3, "abc"), ("ééé", 3, "é"), ("ééé", 4, "éé"), ("", 0, "")]
        {
            let mut s = s.to_string();
            truncate(&mut s, max);
            assert_eq!(s, want);
        }
    }

    #[test]
    fn gpu_evidence_is_bounded_and_unknown_states_refused() {
        let mut hb = Heartbeat {
            engines: vec![],
            gpus: vec![GpuInfo {
                index: 0,
                state: "failed".into(),
                evidence: vec!["é".repeat(300); 20],
                ..Default::default()
            }],
        };
        check_heartbeat(&mut hb, &scope("127.0.0.1")).unwrap();
        assert_eq!(hb.gpus[0].evidence.len(), MAX_EVIDENCE);
        assert!(hb.gpus[0].evidence.iter().all(|e| e.len() <= MAX_EVIDENCE_LEN && e.len() >= MAX_EVIDENCE_LEN - 1));
        hb.gpus[0].state = "on fire".into();
        let e = check_heartbeat(&mut hb, &scope("127.0.0.1")).unwrap_err().to_string();
        assert!(e.contains("heartbeat.gpus[0].state: \"on fire\" is not one of healthy, degraded, failed"), "{e}");
        let mut reg = register();
        reg.gpus[0].state = "x".repeat(5000);
        let e = check_registration(&mut reg, Some(ip("127.0.0.1"))).unwrap_err().to_string();
        assert!(e.contains("register.gpus[0].state") && e.len() < 200, "{e}");
    }
}
