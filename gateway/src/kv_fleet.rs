//! Keeps one KV event follower ([`crate::kv_follow`]) per endpoint of every `kv-aware`
//! model in the endpoint table (and of every `auto` one whose prompts the gateway can key),
//! and each such model's [`KvIndex`]: followers start when an endpoint appears, stop
//! (taking the engine's entries along) when it leaves or its model stops being kv-aware,
//! and start again after a broken stream. An engine that publishes nothing
//! (`GET /kv_event_sources` answers `{}`) is asked again every [`RECHECK`]; meanwhile
//! kv-aware routes to it on speculation and load alone. While a follower runs, the
//! engine's sources are checked every [`RECHECK`] too: an engine that restarted on the same
//! address publishes on new ports.
//!
//! ```text
//! Directory::changes ─> reconcile: wanted (model, endpoint) vs running ─> spawn / stop followers
//!                       every second: kv_index_entries, kv_index_bytes, kv_followers per model
//! ```

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use flotilla_api::spec::RoutingStrategy;
use flotilla_engine::EngineClient;
use tokio::sync::watch;

use crate::kv_follow::{follow, Ended};
use crate::metrics::ModelLabels;
use crate::names::ModelName;
use crate::routing::kv_index::KvIndex;
use crate::state::Gateway;
use crate::table::Endpoint;

/// How often an engine's publishing endpoints are asked again.
pub const RECHECK: Duration = Duration::from_secs(10);
/// The block size an index starts with (vLLM's default); the engines' first event sets it.
const DEFAULT_BLOCK_SIZE: usize = 16;

/// One follower's identity: the model, the endpoint id, and the address asked for sources.
type Key = (ModelName, String, String);

/// The followers wanted for the table (pure): every endpoint of a kv-aware model.
pub fn wanted<'a>(
    endpoints: impl IntoIterator<Item = &'a Arc<Endpoint>>,
    kv_aware: impl Fn(&str) -> bool,
) -> BTreeSet<Key> {
    endpoints
        .into_iter()
        .filter(|e| kv_aware(e.model.as_str()))
        .map(|e| (e.model.clone(), e.id.as_str().to_string(), e.authority.to_string()))
        .collect()
}

struct Running {
    stop: watch::Sender<bool>,
}

/// Runs until the gateway is gone.
pub async fn run(gw: Weak<Gateway>) {
    let Some(mut changes) = gw.upgrade().map(|g| g.dir.changes()) else { return };
    let mut running: HashMap<Key, Running> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let Some(gw) = gw.upgrade() else { return };
        reconcile(&gw, &mut running);
        export(&gw, &running);
    }
}

fn reconcile(gw: &Arc<Gateway>, running: &mut HashMap<Key, Running>) {
    let set = gw.dir.endpoints();
    // kv-aware models, and auto ones whose prompts the gateway can key (to learn whether
    // their engines publish)
    let want = wanted(set.by_model.values().flatten(), |m| match gw.configured_routing(m) {
        RoutingStrategy::KvAware => true,
        RoutingStrategy::Auto => gw.token_exact(m),
        _ => false,
    });
    running.retain(|k, r| {
        let keep = want.contains(k);
        if !keep {
            let _ = r.stop.send(true);
        }
        keep
    });
    let models: BTreeSet<&ModelName> = want.iter().map(|(m, _, _)| m).collect();
    let indexes = gw.router.kv_aware.indexes.clone();
    {
        let mut ix = indexes.write().unwrap_or_else(|p| p.into_inner());
        ix.retain(|m, _| models.contains(m));
        for m in &models {
            ix.entry((*m).clone())
                .or_insert_with(|| Arc::new(Mutex::new(KvIndex::new(DEFAULT_BLOCK_SIZE, gw.cfg.kv_index_capacity))));
        }
    }
    for k in want {
        if running.contains_key(&k) {
            continue;
        }
        let Some(index) = indexes.read().unwrap_or_else(|p| p.into_inner()).get(&k.0).cloned() else { continue };
        let tls = set
            .by_model
            .get(&k.0)
            .and_then(|v| v.iter().find(|e| e.id.as_str() == k.1))
            .is_some_and(|e| e.cert.is_some());
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(follow_endpoint(Arc::downgrade(gw), k.clone(), tls, index, stop_rx));
        running.insert(k, Running { stop });
    }
}

fn export(gw: &Gateway, running: &HashMap<Key, Running>) {
    let m = &gw.metrics;
    let indexes = gw.router.kv_aware.indexes.read().unwrap_or_else(|p| p.into_inner());
    for (model, ix) in indexes.iter() {
        let ix = ix.lock().unwrap_or_else(|p| p.into_inner());
        let labels = ModelLabels { model: model.to_string() };
        m.kv_index_entries.get_or_create(&labels).set(ix.entries() as i64);
        m.kv_index_bytes.get_or_create(&labels).set(ix.approx_bytes() as i64);
        m.kv_followers.get_or_create(&labels).set(running.keys().filter(|k| &k.0 == model).count() as i64);
    }
}

/// Follows one endpoint until stopped: asks where it publishes, follows, and starts over
/// after a broken stream or when its sources change.
async fn follow_endpoint(
    gw: Weak<Gateway>,
    (model, engine, authority): Key,
    tls: bool,
    index: Arc<Mutex<KvIndex>>,
    mut stop: watch::Receiver<bool>,
) {
    let client = EngineClient::new().with_tls(tls);
    let mut backoff = Duration::from_millis(500);
    loop {
        let stop_now = *stop.borrow();
        if stop_now {
            break;
        }
        let sources = match client.kv_event_sources(&authority).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::debug!(model = %model, engine, "the engine publishes no KV events");
                if sleep_or_stop(&mut stop, RECHECK).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                tracing::debug!(model = %model, engine, error = %e, "cannot ask where the engine publishes KV events");
                if sleep_or_stop(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(RECHECK);
                continue;
            }
        };
        // follow until stopped, broken, or the engine publishes elsewhere (it restarted)
        let (inner_stop, inner_rx) = watch::channel(false);
        let mut task = tokio::spawn(follow(engine.clone(), sources.clone(), index.clone(), inner_rx));
        let ended = loop {
            tokio::select! {
                r = &mut task => break r.unwrap_or(Ended::Broken("follower panicked".into())),
                _ = stopped(&mut stop) => {
                    let _ = inner_stop.send(true);
                    let _ = task.await;
                    return;
                }
                _ = tokio::time::sleep(RECHECK) => {
                    if let Ok(Some(now)) = client.kv_event_sources(&authority).await {
                        if now != sources {
                            let _ = inner_stop.send(true);
                            let _ = (&mut task).await;
                            break Ended::Broken("the engine publishes elsewhere now".into());
                        }
                    }
                }
            }
        };
        if let (Ended::Broken(_), Some(gw)) = (&ended, gw.upgrade()) {
            gw.metrics.kv_follow_restarts.get_or_create(&ModelLabels { model: model.to_string() }).inc();
        }
        backoff = Duration::from_millis(500);
        if sleep_or_stop(&mut stop, backoff).await {
            return;
        }
    }
    index.lock().unwrap_or_else(|p| p.into_inner()).remove_engine(&engine);
}

/// Returns once `stop` turns true or its sender is gone (the guard `wait_for` lends is
/// dropped here, so callers' futures stay `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps `d`; true when `stop` fired instead.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = stopped(stop) => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_of_a_kv_aware_model_is_followed() {
        let eps: Vec<Arc<Endpoint>> = [("a", "127.0.0.1:1"), ("a", "127.0.0.1:2"), ("b", "127.0.0.1:3")]
            .into_iter()
            .map(|(m, addr)| Arc::new(Endpoint::new(m, addr.parse().unwrap())))
            .collect();
        let w = wanted(&eps, |m| m == "a");
        let got: Vec<&str> = w.iter().map(|(_, e, _)| e.as_str()).collect();
        assert_eq!(got, ["127.0.0.1:1", "127.0.0.1:2"]);
        assert!(wanted(&eps, |_| false).is_empty());
    }
}
