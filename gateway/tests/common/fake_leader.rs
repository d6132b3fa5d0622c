//! A fake leader's `AdapterService`: `EnsureLoaded` really loads the adapter on a sim
//! engine through its `/v1/load_lora_adapter` (`sim://NAME`) and answers with the
//! endpoints holding it; `ReportUsage` is recorded. Served next to [`FakeCp`]'s
//! FleetService and ObjectService on one port.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_api::pb;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use super::fake_cp::FakeCp;

/// One engine of the fake fleet.
#[derive(Debug, Clone)]
pub struct Engine {
    pub replica: String,
    pub model: String,
    pub addr: SocketAddr,
}

#[derive(Debug, Default)]
pub struct State {
    pub engines: Vec<Engine>,
    /// Adapters that exist (name → base model).
    pub known: HashMap<String, String>,
    /// Adapters whose load fails with FAILED_PRECONDITION and this message.
    pub failing: HashMap<String, String>,
    /// Adapters whose load fails with RESOURCE_EXHAUSTED and this message.
    pub busy: HashMap<String, String>,
    /// What the fake loaded, per engine address.
    pub loaded: HashMap<SocketAddr, BTreeSet<String>>,
    pub calls: Vec<pb::EnsureLoadedRequest>,
    pub usage: Vec<pb::AdapterUsage>,
    /// Every `ReportUsage`, whole.
    pub reports: Vec<pb::ReportUsageRequest>,
    /// Time each load takes.
    pub delay: Duration,
}

#[derive(Clone, Default)]
pub struct FakeAdapters {
    pub state: Arc<Mutex<State>>,
    /// When set, every call answers not_leader with this hint.
    pub not_leader: Option<String>,
}

impl FakeAdapters {
    pub fn new(engines: Vec<Engine>) -> Self {
        let f = FakeAdapters::default();
        f.state.lock().unwrap().engines = engines;
        f
    }

    pub fn follower(leader: SocketAddr) -> Self {
        FakeAdapters { not_leader: Some(leader.to_string()), ..Default::default() }
    }

    pub fn calls_for(&self, adapter: &str) -> usize {
        self.state.lock().unwrap().calls.iter().filter(|c| c.adapter == adapter).count()
    }

    /// Requests reported per (adapter, address).
    pub fn usage(&self) -> HashMap<(String, String), u32> {
        let mut m = HashMap::new();
        for u in &self.state.lock().unwrap().usage {
            *m.entry((u.adapter.clone(), u.address.clone())).or_default() += u.requests;
        }
        m
    }

    /// The endpoint snapshot of the fleet with what the fake believes is loaded.
    pub fn snapshot(&self) -> pb::EndpointSet {
        let st = self.state.lock().unwrap();
        let endpoints = st
            .engines
            .iter()
            .map(|e| pb::Endpoint {
                replica: e.replica.clone(),
                model: e.model.clone(),
                address: e.addr.to_string(),
                node: "n1".into(),
                loaded_adapters: st.loaded.get(&e.addr).map(|s| s.iter().cloned().collect()).unwrap_or_default(),
                ..Default::default()
            })
            .collect();
        pb::EndpointSet { endpoints, store_revision: 1 }
    }

    /// Serves FleetService and ObjectService (from `cp`) and AdapterService on one port.
    pub async fn serve(self, cp: FakeCp) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let fleet = pb::fleet_service_server::FleetServiceServer::new(cp.clone());
        let objects = pb::object_service_server::ObjectServiceServer::new(cp);
        let adapters = pb::adapter_service_server::AdapterServiceServer::new(self);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(fleet)
                .add_service(objects)
                .add_service(adapters)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = rx.await;
                })
                .await;
        });
        (addr, tx)
    }

    fn endpoints_holding(&self, adapter: &str) -> Vec<pb::Endpoint> {
        self.snapshot().endpoints.into_iter().filter(|e| e.loaded_adapters.iter().any(|a| a == adapter)).collect()
    }
}

#[tonic::async_trait]
impl pb::adapter_service_server::AdapterService for FakeAdapters {
    async fn ensure_loaded(
        &self,
        r: Request<pb::EnsureLoadedRequest>,
    ) -> Result<Response<pb::EnsureLoadedResponse>, Status> {
        if let Some(l) = &self.not_leader {
            return Err(Status::failed_precondition(format!("cluster.not_leader: leader={l}")));
        }
        let req = r.into_inner();
        let (target, delay) = {
            let mut st = self.state.lock().unwrap();
            st.calls.push(req.clone());
            let Some(base) = st.known.get(&req.adapter).cloned() else {
                return Err(Status::not_found(format!("adapter {} does not exist", req.adapter)));
            };
            if let Some(m) = st.failing.get(&req.adapter) {
                return Err(Status::failed_precondition(m.clone()));
            }
            if let Some(m) = st.busy.get(&req.adapter) {
                return Err(Status::resource_exhausted(m.clone()));
            }
            let holding = st.loaded.iter().any(|(_, s)| s.contains(&req.adapter));
            let target = (!holding || !req.avoid_replicas.is_empty())
                .then(|| {
                    st.engines
                        .iter()
                        .filter(|e| e.model == base && !req.avoid_replicas.contains(&e.replica))
                        .find(|e| !st.loaded.get(&e.addr).is_some_and(|s| s.contains(&req.adapter)))
                        .map(|e| e.addr)
                })
                .flatten();
            (target, st.delay)
        };
        let start = tokio::time::Instant::now();
        let mut cold = false;
        if let Some(addr) = target {
            tokio::time::sleep(delay).await;
            let body = serde_json::json!({"lora_name": req.adapter, "lora_path": format!("sim://{}", req.adapter)});
            let resp = super::post(addr, "/v1/load_lora_adapter", body, &[]).await;
            if resp.status != 200 && !resp.text().contains("already been loaded") {
                return Err(Status::failed_precondition(format!("engine refused: {}", resp.text())));
            }
            self.state.lock().unwrap().loaded.entry(addr).or_default().insert(req.adapter.clone());
            cold = true;
        }
        let endpoints = self.endpoints_holding(&req.adapter);
        if endpoints.is_empty() {
            return Err(Status::failed_precondition(format!("no ready replica for {}", req.adapter)));
        }
        Ok(Response::new(pb::EnsureLoadedResponse { endpoints, cold, waited_ms: start.elapsed().as_millis() as u64 }))
    }

    async fn report_usage(
        &self,
        r: Request<pb::ReportUsageRequest>,
    ) -> Result<Response<pb::ReportUsageResponse>, Status> {
        if let Some(l) = &self.not_leader {
            return Err(Status::failed_precondition(format!("cluster.not_leader: leader={l}")));
        }
        let r = r.into_inner();
        let mut st = self.state.lock().unwrap();
        st.usage.extend(r.usage.iter().cloned());
        st.reports.push(r);
        Ok(Response::new(pb::ReportUsageResponse {}))
    }
}
