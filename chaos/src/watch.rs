//! Follows the store's replica changes through any live server (resuming after the last
//! revision on reconnect, so no event is missed or seen twice) and feeds them to the
//! [`PlacementChecker`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::watch_event::Type;
use flotilla_api::pb::WatchRequest;

use crate::dial::Dialer;
use crate::placement::PlacementChecker;

/// Runs until aborted, recording into `checker`.
pub async fn placement(dialer: Dialer, servers: Vec<String>, checker: Arc<Mutex<PlacementChecker>>) {
    let mut after = 0u64;
    let mut i = 0usize;
    loop {
        let addr = &servers[i % servers.len()];
        i += 1;
        let Some(ch) = dialer.channel(addr, Duration::from_millis(300), Duration::from_secs(3600)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let req = WatchRequest { kind: "replica".into(), after_revision: after };
        let mut stream = match ObjectServiceClient::new(ch).watch(req).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::OutOfRange => {
                let mut c = checker.lock().unwrap_or_else(|p| p.into_inner());
                c.violations
                    .push(format!("watch history compacted past revision {after}; placement not checked there"));
                after = 0;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while let Ok(Some(ev)) = stream.message().await {
            let Some(obj) = ev.object else { continue };
            let binding = match Type::try_from(ev.r#type) {
                Ok(Type::Put) => PlacementChecker::binding_of(&obj.spec_json),
                _ => None,
            };
            checker.lock().unwrap_or_else(|p| p.into_inner()).apply(ev.revision, &obj.name, binding);
            after = after.max(ev.revision);
        }
    }
}

/// Polls (every 200 ms) the sim engine processes of run `run_id` and records when each one
/// exits — whether the harness crashed it or an agent stopped it — as an offset from `t0`.
pub async fn engine_deaths(run_id: String, t0: tokio::time::Instant, out: Arc<Mutex<Vec<Duration>>>) {
    let mut alive: std::collections::HashSet<u32> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let now: std::collections::HashSet<u32> =
            crate::procs::marked(crate::procs::Runs::One(&run_id)).into_iter().filter(|pid| is_engine(*pid)).collect();
        let gone = alive.difference(&now).count();
        if gone > 0 {
            let at = t0.elapsed();
            out.lock().unwrap_or_else(|p| p.into_inner()).extend(std::iter::repeat_n(at, gone));
        }
        alive = now;
    }
}

/// A `flotilla sim` process (agents start sim engines as `<binary> sim ...`).
fn is_engine(pid: u32) -> bool {
    let Some(cmdline) = flotilla_testkit::proc_fs::cmdline(pid) else { return false };
    cmdline.split(|b| *b == 0).nth(1) == Some(b"sim".as_slice())
}
