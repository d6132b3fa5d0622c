//! A fake control plane for the gateway's watch path: FleetService.WatchEndpoints streams
//! whatever snapshot the test publishes (or answers `cluster.not_leader` with a hint), and
//! ObjectService.List/Watch serve the objects the test sets (Model, Tenant, Adapter).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use flotilla_api::pb;
use tokio::sync::{broadcast, oneshot, watch};
use tokio_stream::wrappers::{BroadcastStream, TcpListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct FakeCp {
    pub endpoints: watch::Sender<pb::EndpointSet>,
    objects: Arc<Mutex<(Vec<pb::Object>, u64)>>,
    events: broadcast::Sender<pb::WatchEvent>,
    /// When set, WatchEndpoints answers not_leader with this hint.
    pub not_leader: Option<String>,
}

impl FakeCp {
    pub fn new(not_leader: Option<String>) -> Self {
        FakeCp {
            endpoints: watch::channel(pb::EndpointSet::default()).0,
            objects: Arc::new(Mutex::new((Vec::new(), 1))),
            events: broadcast::channel(64).0,
            not_leader,
        }
    }

    /// Publishes a snapshot of endpoints (model, address).
    pub fn set_endpoints(&self, eps: &[(&str, SocketAddr)]) {
        let keyless: Vec<(&str, SocketAddr, &str)> = eps.iter().map(|(m, a)| (*m, *a, "")).collect();
        self.set_keyed_endpoints(&keyless);
    }

    /// Publishes a snapshot of endpoints (model, address, engine API key).
    pub fn set_keyed_endpoints(&self, eps: &[(&str, SocketAddr, &str)]) {
        let endpoints = eps
            .iter()
            .enumerate()
            .map(|(i, (m, a, k))| pb::Endpoint {
                replica: format!("r{i}"),
                model: m.to_string(),
                address: a.to_string(),
                node: "n1".into(),
                api_key: k.to_string(),
                ..Default::default()
            })
            .collect();
        self.endpoints.send_replace(pb::EndpointSet { endpoints, store_revision: 1 });
    }

    /// Publishes a snapshot of endpoints (model, address, certificate pin; empty: plain HTTP).
    pub fn set_pinned_endpoints(&self, eps: &[(&str, SocketAddr, &str)]) {
        let endpoints = eps
            .iter()
            .enumerate()
            .map(|(i, (m, a, pin))| pb::Endpoint {
                replica: format!("r{i}"),
                model: m.to_string(),
                address: a.to_string(),
                node: "n1".into(),
                engine_cert_sha256: pin.to_string(),
                ..Default::default()
            })
            .collect();
        self.endpoints.send_replace(pb::EndpointSet { endpoints, store_revision: 1 });
    }

    /// Creates or replaces an object and streams the change to watchers.
    pub fn put(&self, kind: &str, name: &str, spec: serde_json::Value) {
        self.put_with_status(kind, name, spec, serde_json::json!({}));
    }

    /// [`FakeCp::put`] with a status.
    pub fn put_with_status(&self, kind: &str, name: &str, spec: serde_json::Value, status: serde_json::Value) {
        let mut g = self.objects.lock().unwrap();
        g.1 += 1;
        let rev = g.1;
        let o = pb::Object {
            kind: kind.into(),
            name: name.into(),
            spec_json: spec.to_string(),
            status_json: status.to_string(),
            revision: rev,
            create_revision: rev,
            ..Default::default()
        };
        g.0.retain(|x| !(x.kind == kind && x.name == name));
        g.0.push(o.clone());
        let _ = self.events.send(pb::WatchEvent { r#type: 0, object: Some(o), revision: rev });
    }

    pub async fn serve(self) -> (SocketAddr, oneshot::Sender<()>) {
        self.serve_on("127.0.0.1:0").await
    }

    /// [`FakeCp::serve`] on `addr` (a port chosen before the fake starts).
    pub async fn serve_on(self, addr: &str) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let fleet = pb::fleet_service_server::FleetServiceServer::new(self.clone());
        let objects = pb::object_service_server::ObjectServiceServer::new(self);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(fleet)
                .add_service(objects)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = rx.await;
                })
                .await;
        });
        (addr, tx)
    }
}

#[tonic::async_trait]
impl pb::fleet_service_server::FleetService for FakeCp {
    type WatchEndpointsStream = BoxStream<pb::EndpointSet>;
    async fn watch_endpoints(
        &self,
        _: Request<pb::WatchEndpointsRequest>,
    ) -> Result<Response<Self::WatchEndpointsStream>, Status> {
        if let Some(l) = &self.not_leader {
            return Err(Status::failed_precondition(format!("cluster.not_leader: leader={l}")));
        }
        let s = WatchStream::new(self.endpoints.subscribe()).map(Ok);
        Ok(Response::new(Box::pin(s)))
    }
    async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_node(&self, _: Request<pb::NodeActionRequest>) -> Result<Response<pb::NodeActionResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

#[tonic::async_trait]
impl pb::object_service_server::ObjectService for FakeCp {
    async fn apply(&self, _: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get(&self, _: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list(&self, r: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let kind = r.into_inner().kind;
        let g = self.objects.lock().unwrap();
        let objects = g.0.iter().filter(|o| o.kind == kind).cloned().collect();
        Ok(Response::new(pb::ListResponse { objects, store_revision: g.1 }))
    }
    async fn delete(&self, _: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type WatchStream = BoxStream<pb::WatchEvent>;
    async fn watch(&self, r: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let req = r.into_inner();
        let s = BroadcastStream::new(self.events.subscribe()).filter_map(move |e| match e {
            Ok(e) if e.object.as_ref().is_some_and(|o| o.kind == req.kind) && e.revision > req.after_revision => {
                Some(Ok(e))
            }
            _ => None,
        });
        Ok(Response::new(Box::pin(s)))
    }
}
